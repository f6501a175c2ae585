//! Test harness: a real Mosquitto on an ephemeral loopback port and real edgeferry processes.
//! Every process started here is stopped here, by its own PID.
#![allow(dead_code)]

pub mod certs;
pub mod cloud;
pub mod flash;
pub mod loader;
pub mod nats;
pub mod postgres;
pub mod wsclient;

use std::collections::BTreeMap;
use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// A free loopback TCP port (bound then released; good enough for tests on loopback).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until `cond` holds or panics with `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The fields of a `/proc/.../stat` file after the command name (which may hold spaces and
/// parentheses): index 0 is the state, field 3 of proc(5).
fn stat_fields(path: &str) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(path).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// CPU seconds (user + system) a process has used so far, from `/proc/PID/stat` (clock
/// ticks of 1/100 s, Linux's fixed USER_HZ); 0 once it is gone.
pub fn cpu_secs(pid: u32) -> f64 {
    let Some(fields) = stat_fields(&format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of proc(5); field 3 (the state) is index 0 here.
    (tick(11) + tick(12)) as f64 / 100.0
}

/// Sends a signal to one process we started.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status();
}

/// SIGSTOP, and returns only once every thread of the process is stopped.
///
/// `kill` returns when the signal is queued: the kernel wakes one thread to start the group
/// stop, and on a loaded machine the process's other threads go on running until that one
/// gets a CPU: nats-server stored 8 batches in that gap in a run on a loaded machine here.
pub fn freeze(pid: u32) {
    signal(pid, "STOP");
    wait_for("every thread stopped", Duration::from_secs(10), || {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return false;
        };
        tasks.flatten().all(|t| {
            let path = t.path().join("stat");
            stat_fields(&path.to_string_lossy())
                .and_then(|f| f.first().cloned())
                .is_some_and(|state| state == "T" || state == "t")
        })
    });
}

/// A Mosquitto broker with persistence and no queue limit, in its own temp dir.
pub struct Mosquitto {
    child: Option<Child>,
    pub port: u16,
    pub dir: TempDir,
    /// Extra listener configuration (e.g. a TLS listener), appended to mosquitto.conf.
    extra: String,
}

/// The Mosquitto lines README asks operators for beyond persistence and the queue limit (the
/// benchmarks measure in that setup): a window that lets a commit group fill its page.
pub const README_BROKER: &str = "max_inflight_messages 1000";

impl Mosquitto {
    pub fn start() -> Mosquitto {
        Self::start_with("")
    }

    /// The broker's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Starts with extra configuration lines (written after the plain listener).
    pub fn start_with(extra: &str) -> Mosquitto {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Mosquitto {
            child: None,
            port: free_port(),
            dir,
            extra: extra.to_string(),
        };
        // A free port can be taken between `free_port` and Mosquitto's bind (other tests run
        // at once and open connections, whose local ports come from the same range); then
        // Mosquitto exits at once and whatever holds the port answers the probe. So the
        // broker must still be running once its port answers, else: another port.
        for _ in 0..5 {
            m.spawn();
            std::thread::sleep(Duration::from_millis(100));
            let Some(status) = m.exited() else {
                return m;
            };
            eprintln!(
                "mosquitto on port {} exited at start ({status}); trying another port:\n{}",
                m.port,
                m.log()
            );
            m.child = None;
            m.port = free_port();
        }
        panic!("mosquitto would not stay up on five ports");
    }

    /// How the broker process ended, if it has.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok()?
    }

    /// What the broker logged (its `log_dest file`).
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    fn spawn(&mut self) {
        let conf = self.dir.path().join("mosquitto.conf");
        let is_root = std::env::var("USER").map(|u| u == "root").unwrap_or(false)
            || Command::new("id")
                .arg("-u")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
                .unwrap_or(false);
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\n\
                 allow_anonymous true\n\
                 persistence true\n\
                 persistence_location {dir}/\n\
                 max_queued_messages 0\n\
                 log_dest file {dir}/mosquitto.log\n\
                 {user}{extra}\n",
                extra = self.extra,
                port = self.port,
                dir = self.dir.path().display(),
                user = if is_root { "user root\n" } else { "" },
            ),
        )
        .unwrap();
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start mosquitto (the test command installs it: see README)");
        self.child = Some(child);
        let port = self.port;
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            // Exited (its port taken): the caller decides.
            if self.exited().is_some() {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "mosquitto did not listen on {port} within 10 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Stops the broker gracefully (it saves its persistence file) and starts it again.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
        self.assert_running();
    }

    /// After a restart on the same port there is no other port to try.
    fn assert_running(&mut self) {
        if let Some(status) = self.exited() {
            panic!("mosquitto exited on restart ({status}):\n{}", self.log());
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), "TERM");
            let _ = c.wait();
        }
    }

    /// SIGKILLs the broker (it saves nothing: what it holds is what its last autosave wrote).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a stopped or killed broker again on the same port and persistence directory.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the broker is still running");
        self.spawn();
        self.assert_running();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn mosquitto_bin() -> &'static str {
    if Path::new("/usr/sbin/mosquitto").exists() {
        "/usr/sbin/mosquitto"
    } else {
        "mosquitto"
    }
}

/// An edgeferry process with its own config and data dir.
pub struct Gateway {
    child: Option<Child>,
    pub dir: TempDir,
    pub config: PathBuf,
    starts: u32,
}

/// The config used by tests; `extra` is appended (more sections).
pub fn gateway_config(dir: &Path, mqtt_url: &str, mqtt_extra: &str, extra: &str) -> String {
    format!(
        r#"
[gateway]
id = "gw-test"
data_dir = "{data}"

[mqtt]
url = "{mqtt_url}"
commit_interval = "5ms"
reconnect_max = "1s"
{mqtt_extra}

[[mqtt.subscribe]]
filter = "sensors/#"
template = "sensors/{{site}}/{{device}}/{{metric}}"
format = "json"
value = "value"
timestamp = "ts"

[[mqtt.subscribe]]
filter = "plain/+/+"
template = "plain/{{device}}/{{metric}}"
format = "number"

[store]
# Large segments: nothing is trimmed, so tests can count every reading in the journal.
segment_size = "256MiB"

[admin]
listen = "127.0.0.1:0"

[log]
level = "info"
{extra}
"#,
        data = dir.join("data").display(),
    )
}

impl Gateway {
    pub fn new(mqtt_url: &str) -> Gateway {
        Self::with_config(mqtt_url, "", "")
    }

    pub fn with_config(mqtt_url: &str, mqtt_extra: &str, extra: &str) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            gateway_config(dir.path(), mqtt_url, mqtt_extra, extra),
        )
        .unwrap();
        Gateway {
            child: None,
            dir,
            config,
            starts: 0,
        }
    }

    pub fn log_path(&self, n: u32) -> PathBuf {
        self.dir.path().join(format!("edgeferry-{n}.log"))
    }

    /// All log output of every start so far.
    pub fn logs(&self) -> String {
        (1..=self.starts)
            .map(|n| std::fs::read_to_string(self.log_path(n)).unwrap_or_default())
            .collect()
    }

    /// Log output of the current (last) start.
    pub fn current_log(&self) -> String {
        std::fs::read_to_string(self.log_path(self.starts)).unwrap_or_default()
    }

    /// Starts edgeferry without waiting.
    pub fn spawn(&mut self) {
        self.spawn_with_env(&[]);
    }

    /// Starts edgeferry with extra environment variables, without waiting.
    pub fn spawn_with_env(&mut self, env: &[(&str, String)]) {
        assert!(self.child.is_none(), "already running");
        self.starts += 1;
        let log = std::fs::File::create(self.log_path(self.starts)).unwrap();
        // Tests are hermetic: unless a test is about the clock (its configuration has a
        // `[clock]` section), the gateway's clock counts as synchronised whatever this
        // machine's NTP state, so fixed sensor timestamps do not make it "suspect".
        let about_the_clock = std::fs::read_to_string(&self.config)
            .unwrap_or_default()
            .contains("[clock]");
        let clock: &[(&str, &str)] = if about_the_clock {
            &[]
        } else {
            &[("EDGEFERRY__CLOCK__SYNCHRONISED", "yes")]
        };
        let child = Command::new(env!("CARGO_BIN_EXE_edgeferry"))
            .arg("run")
            .arg("-c")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .envs(clock.iter().copied())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// Starts edgeferry and waits until it reports ready (state recovered, subscribed).
    pub fn start(&mut self) {
        self.spawn();
        self.wait_ready();
    }

    pub fn wait_ready(&mut self) {
        let start = Instant::now();
        loop {
            if self.current_log().contains("ready: state recovered") {
                return;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                panic!("edgeferry exited early ({st}):\n{}", self.current_log());
            }
            if start.elapsed() > Duration::from_secs(20) {
                panic!("edgeferry not ready after 20 s:\n{}", self.current_log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `timeout` for the process to exit by itself; true if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(_)) = c.try_wait()
            {
                self.child = None;
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL: a crash at an arbitrary point.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("not running");
        signal(c.id(), "TERM");
        let start = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = c.kill();
                panic!(
                    "edgeferry did not stop within 30 s:\n{}",
                    self.current_log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs another subcommand against this gateway's config and returns (status, stdout, stderr).
    pub fn command(&self, args: &[&str]) -> (ExitStatus, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_edgeferry"))
            .args(args)
            .arg("-c")
            .arg(&self.config)
            .output()
            .unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `GET path` on the running daemon's admin endpoint (body of any status), or `None`
    /// when it does not answer.
    ///
    /// The address comes from `data/admin.addr`; when that does not answer (the daemon could
    /// not write it, e.g. on a failing disk, so it is missing or a previous run's), from the
    /// "admin listening on" line of the current run's log.
    pub fn admin_get(&self, path: &str) -> Option<String> {
        let get = |addr: &str| {
            edgeferry::admin::http_get(addr.trim(), path, Duration::from_secs(3))
                .ok()
                .map(|(_, body)| body)
        };
        let recorded = std::fs::read_to_string(self.dir.path().join("data/admin.addr"));
        if let Some(body) = recorded.ok().and_then(|a| get(&a)) {
            return Some(body);
        }
        let log = self.current_log();
        let logged = log
            .lines()
            .rev()
            .find_map(|l| l.split("admin listening on ").nth(1))?
            .split_whitespace()
            .next()?;
        get(logged)
    }

    /// A metric from `/metrics`, summed over its label sets; `None` when absent (or the
    /// daemon does not answer).
    pub fn metric(&self, name: &str) -> Option<f64> {
        let text = self.admin_get("/metrics")?;
        let values: Vec<f64> = text
            .lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|r| r.starts_with([' ', '{']))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    }

    /// Every reading in the journal (the daemon must be stopped: the journal is locked).
    pub fn journal(&self) -> Vec<JournalReading> {
        let (st, out, err) = self.command(&["dump-journal"]);
        assert!(st.success(), "dump-journal failed: {err}");
        let mut v = Vec::new();
        for line in out.lines() {
            let rec: serde_json::Value = serde_json::from_str(line).unwrap();
            for r in rec["readings"].as_array().unwrap() {
                v.push(JournalReading {
                    metric: r["metric"].as_str().unwrap().to_string(),
                    tags: serde_json::from_value(r["tags"].clone()).unwrap(),
                    value: r["value"].as_f64().unwrap(),
                    time_ms: r["time_ms"].as_i64().unwrap(),
                });
            }
        }
        v
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill9();
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct JournalReading {
    pub metric: String,
    pub tags: BTreeMap<String, String>,
    pub value: f64,
    pub time_ms: i64,
}

/// Asserts that the journal's values are exactly 0..n, each once; reports missing and
/// duplicated ones otherwise.
pub fn assert_exactly_once(values: impl IntoIterator<Item = f64>, n: usize) {
    let mut seen = vec![0u32; n];
    let mut foreign = Vec::new();
    for v in values {
        let i = v as usize;
        if v.fract() == 0.0 && v >= 0.0 && i < n {
            seen[i] += 1;
        } else {
            foreign.push(v);
        }
    }
    let missing: Vec<usize> = (0..n).filter(|&i| seen[i] == 0).collect();
    let dups: Vec<(usize, u32)> = (0..n)
        .filter(|&i| seen[i] > 1)
        .map(|i| (i, seen[i]))
        .collect();
    assert!(
        missing.is_empty() && dups.is_empty() && foreign.is_empty(),
        "{} missing (first {:?}), {} duplicated (first {:?}), unexpected {:?}",
        missing.len(),
        &missing[..missing.len().min(10)],
        dups.len(),
        &dups[..dups.len().min(10)],
        &foreign[..foreign.len().min(10)]
    );
}

/// Publishes with QoS 1 through a real rumqttc client and waits for every PUBACK.
pub struct Publisher {
    rt: tokio::runtime::Runtime,
    client: rumqttc::AsyncClient,
    acked: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    pub fn connect(port: u16, id: &str) -> Publisher {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(16 << 20, 16 << 20);
        o.set_inflight(200);
        let (client, mut el) = rumqttc::AsyncClient::new(o, 1000);
        let acked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let a = acked.clone();
        let task = rt.spawn(async move {
            loop {
                match el.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                        a.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Publisher {
            rt,
            client,
            acked,
            task,
        }
    }

    pub fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        let c = self.client.clone();
        let topic = topic.to_string();
        let payload = payload.into();
        self.rt.block_on(async move {
            c.publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
        });
    }

    pub fn acked(&self) -> usize {
        self.acked.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn wait_acked(&self, n: usize, timeout: Duration) {
        wait_for(&format!("{n} PUBACKs"), timeout, || self.acked() >= n);
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The JSON payload of reading number `i`.
pub fn reading_payload(i: usize) -> String {
    format!(
        r#"{{"value":{i},"ts":{}}}"#,
        1_700_000_000_000u64 + i as u64
    )
}

/// Reads a whole file or returns an empty string.
pub fn read_all(p: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(p) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

/// A reference collector (`edgeferry collect`) on a fixed loopback port, so a gateway's
/// `[upstream] url` stays valid across collector restarts.
pub struct Collector {
    child: Option<Child>,
    pub dir: TempDir,
    pub port: u16,
    args: Vec<String>,
}

impl Collector {
    /// A collector that is not running yet (the upstream is "down").
    pub fn new(args: &[&str]) -> Collector {
        Collector {
            child: None,
            dir: tempfile::tempdir().unwrap(),
            port: free_port(),
            args: args.iter().map(|s| s.to_string()).collect(),
        }
    }

    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/", self.port)
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("collect.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_edgeferry"))
            .arg("collect")
            .args([
                "--listen",
                &format!("127.0.0.1:{}", self.port),
                "--data-dir",
            ])
            .arg(self.dir.path())
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let port = self.port;
        wait_for("the collector to listen", Duration::from_secs(20), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), "TERM");
            let _ = c.wait();
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn log(&self) -> String {
        read_all(&self.dir.path().join("collect.log"))
    }

    /// `GET path` on its `--metrics-listen` address: (status code, body); `None` before it
    /// listens or when it does not answer.
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        let addr = std::fs::read_to_string(self.dir.path().join("metrics.addr")).ok()?;
        http_get(addr.trim(), path)
    }

    /// A metric from its `/metrics`, summed over its label sets (0 when absent).
    pub fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics").unwrap_or_default();
        text.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|r| r.starts_with([' ', '{']))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Every JSON line written under out/, in file order.
    pub fn lines(&self) -> Vec<serde_json::Value> {
        let mut v = Vec::new();
        let Ok(rd) = std::fs::read_dir(self.dir.path().join("out")) else {
            return v;
        };
        let mut files: Vec<_> = rd.flatten().map(|e| e.path()).collect();
        files.sort();
        for f in files {
            for line in read_all(&f).lines() {
                if let Ok(j) = serde_json::from_str::<serde_json::Value>(line) {
                    v.push(j);
                }
            }
        }
        v
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `GET path` from `addr` over a plain blocking socket (usable inside a test's runtime,
/// unlike `edgeferry::admin::http_get`): (status code, body).
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut r = String::new();
    s.read_to_string(&mut r).ok()?;
    let code = r.split(' ').nth(1)?.parse().ok()?;
    Some((code, r.split("\r\n\r\n").nth(1).unwrap_or("").to_string()))
}

/// What the central side concludes from aggregate lines: per window length, the sum of `count`
/// over the highest version of each (series, window_start); panics if one (window, version)
/// appears with two different contents.
pub fn central_counts(lines: &[serde_json::Value]) -> BTreeMap<u64, u64> {
    let mut best: BTreeMap<(String, String, u64), (u64, serde_json::Value)> = BTreeMap::new();
    let mut seen: BTreeMap<(String, String, u64, u64), serde_json::Value> = BTreeMap::new();
    for l in lines.iter().filter(|l| l["kind"] == "aggregate") {
        let key = (
            l["series"].as_str().unwrap().to_string(),
            l["window_start"].as_str().unwrap().to_string(),
            l["window_secs"].as_u64().unwrap(),
        );
        let version = l["version"].as_u64().unwrap();
        let mut content = l.clone();
        if let Some(o) = content.as_object_mut() {
            o.remove("batch");
            o.remove("epoch");
        }
        let vk = (key.0.clone(), key.1.clone(), key.2, version);
        if let Some(prev) = seen.get(&vk) {
            assert_eq!(
                prev, &content,
                "window {vk:?} emitted twice with different contents"
            );
        }
        seen.insert(vk, content);
        let e = best.entry(key).or_insert((0, serde_json::Value::Null));
        if version >= e.0 {
            *e = (version, l.clone());
        }
    }
    let mut per_len = BTreeMap::new();
    for ((_, _, secs), (_, l)) in best {
        *per_len.entry(secs).or_insert(0) += l["count"].as_u64().unwrap();
    }
    per_len
}

/// A `/proc/PID/status` field in KiB (`"VmHWM:"`, `"VmRSS:"`); `None` once the process is gone.
pub fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let l = s.lines().find(|l| l.starts_with(key))?;
    l.split_whitespace().nth(1)?.parse().ok()
}

/// A publisher thread on the broker at `port`: four readings every 20 ms (~200/s) over
/// `series` series (`sensors/site0/devN/temperature`) until `stop`, then waits for every
/// PUBACK; joins to the number published.
pub fn publish_until_stopped(
    port: u16,
    id: &'static str,
    series: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let p = Publisher::connect(port, id);
        let mut i = 0;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            for _ in 0..4 {
                p.publish(
                    &format!("sensors/site0/dev{}/temperature", i % series),
                    live_payload(i),
                );
                i += 1;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        p.wait_acked(i, Duration::from_secs(60));
        i
    })
}

/// Subscribes to `filter` on the broker as `client_id` and collects (topic, payload, arrival
/// ms) of every JSON message.
pub fn subscriber(
    port: u16,
    filter: &str,
    client_id: &str,
) -> std::sync::Arc<std::sync::Mutex<Vec<(String, serde_json::Value, u64)>>> {
    subscribe_with(port, filter, client_id, |p| {
        let v = serde_json::from_slice(&p.payload).unwrap();
        (p.topic.clone(), v, now_ms())
    })
}

/// Subscribes to `filter` on the broker as `client_id` (QoS 1) and collects what `take`
/// makes of every message; returns once the broker acknowledged the subscription.
pub fn subscribe_with<T: Send + 'static>(
    port: u16,
    filter: &str,
    client_id: &str,
    take: fn(&rumqttc::Publish) -> T,
) -> std::sync::Arc<std::sync::Mutex<Vec<T>>> {
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let g = got.clone();
    let filter = filter.to_string();
    let client_id = client_id.to_string();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let o = rumqttc::MqttOptions::new(client_id, "127.0.0.1", port);
            let (client, mut el) = rumqttc::AsyncClient::new(o, 100);
            client
                .subscribe(filter, rumqttc::QoS::AtLeastOnce)
                .await
                .unwrap();
            loop {
                match el.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        g.lock().unwrap().push(take(&p));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    got
}

/// Epoch milliseconds now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A JSON reading for value `i` stamped with the current time (so windows close in real time).
pub fn live_payload(i: usize) -> String {
    format!(r#"{{"value":{i},"ts":{}}}"#, now_ms())
}

/// Copies a data directory as a backup tool would (lock files left out): the "older copy" a
/// gateway is restored from.
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else if e.file_name() != "LOCK" {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}
