//! Idle, unauthenticated connections cannot lock gateways out of the collector: they have
//! their own small budget (per address and in all, oldest closed first, a handshake deadline),
//! separate from the gateways' sessions. A real gateway, restarted again and again during a
//! flood of 2,000 idle TCP connections, reconnects within seconds and every reading arrives;
//! a gateway refused at the session limit is told so with HTTP 503; a plain TCP health check
//! is not a warning. Every limit that bites is counted in the collector's `/metrics`.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Holds `per_source` idle TCP connections open from each source address for `hold_s`,
/// reopening every one the collector closes (an attacker that keeps the pressure up). Prints
/// `opened N` once the first round is open.
const FLOODER: &str = r#"
import resource, selectors, socket, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
port, sources, per, hold = int(sys.argv[1]), sys.argv[2].split(","), int(sys.argv[3]), float(sys.argv[4])
sel = selectors.DefaultSelector()
def dial(src):
    s = socket.socket()
    s.bind((src, 0))
    try:
        s.connect(("127.0.0.1", port))
    except OSError:
        s.close()
        return False
    sel.register(s, selectors.EVENT_READ, src)
    return True
opened = sum(dial(src) for src in sources for _ in range(per))
print("opened", opened, flush=True)
reopened = 0
until = time.time() + hold
while time.time() < until:
    for key, _ in sel.select(0.2):
        s = key.fileobj
        try:
            data = s.recv(4096)
        except OSError:
            data = b""
        if not data:
            sel.unregister(s)
            s.close()
            reopened += dial(key.data)
            time.sleep(0.001)
print("reopened", reopened, flush=True)
"#;

struct Flood {
    child: Child,
}

impl Flood {
    fn start(port: u16, sources: &[String], per_source: usize, hold_s: u64) -> Flood {
        let mut child = Command::new("python3")
            .args(["-c", FLOODER, &port.to_string(), &sources.join(",")])
            .args([per_source.to_string(), hold_s.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        eprintln!("flood: {} from {} address(es)", line.trim(), sources.len());
        assert!(line.starts_with("opened"), "{line}");
        Flood { child }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn collector_metric(c: &Collector, name: &str) -> f64 {
    let addr = std::fs::read_to_string(c.dir.path().join("metrics.addr")).unwrap();
    let (_, text) =
        edgeferry::admin::http_get(addr.trim(), "/metrics", Duration::from_secs(3)).unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn vm_hwm_kib(pid: u32) -> u64 {
    common::proc_status_kib(pid, "VmHWM:").unwrap()
}

fn upstream_connected(gw: &Gateway) -> bool {
    gw.admin_get("/status")
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .is_some_and(|s| s["upstream"]["connected"] == true)
}

/// A collector with a token, its metrics served, and a gateway that uses the token.
fn setup(tokens_dir: &std::path::Path, extra: &[&str]) -> (Mosquitto, Collector, Gateway) {
    let token = tokens_dir.join("tokens");
    std::fs::write(&token, "flood-test-token\n").unwrap();
    let mut args = vec![
        "--token-file".to_string(),
        token.display().to_string(),
        "--metrics-listen".to_string(),
        "127.0.0.1:0".to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let broker = Mosquitto::start();
    let mut collector = Collector::new(&args);
    collector.start();
    wait_for("collector metrics", Duration::from_secs(10), || {
        collector.dir.path().join("metrics.addr").exists()
    });
    let gw = Gateway::with_config(
        &broker.url(),
        "",
        &format!(
            "[process]\nwindows = [\"1s\"]\nallowed_lateness = \"500ms\"\n\n\
             [upstream]\nurl = \"{}\"\ntoken_file = {:?}\nlinger = \"100ms\"\nreconnect_max = \"1s\"\n",
            collector.url(),
            token.display().to_string()
        ),
    );
    (broker, collector, gw)
}

fn counted(collector: &Collector) -> u64 {
    central_counts(&collector.lines())
        .get(&1)
        .copied()
        .unwrap_or(0)
}

/// Publishes for `secs` while restarting the gateway `restarts` times; returns how many were
/// published and the longest time a restarted gateway took to be connected upstream again.
fn publish_through_restarts(
    broker: &Mosquitto,
    gw: &mut Gateway,
    secs: u64,
    restarts: usize,
) -> (usize, Duration) {
    let p = Publisher::connect(broker.port, "pub-flood");
    let mut i = 0;
    let mut worst = Duration::ZERO;
    let period = Duration::from_secs(secs) / (restarts as u32 + 1);
    for round in 0..=restarts {
        let until = Instant::now() + period;
        while Instant::now() < until {
            p.publish(&format!("plain/dev{}/temperature", i % 4), i.to_string());
            i += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        if round < restarts {
            assert!(gw.stop().success());
            let started = Instant::now();
            gw.start();
            wait_for(
                "the restarted gateway upstream",
                Duration::from_secs(15),
                || upstream_connected(gw),
            );
            worst = worst.max(started.elapsed());
        }
    }
    p.wait_acked(i, Duration::from_secs(30));
    (i, worst)
}

#[test]
fn two_thousand_idle_connections_from_one_address_do_not_lock_a_gateway_out() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, collector, mut gw) = setup(dir.path(), &[]);
    gw.start();
    wait_for("gateway upstream", Duration::from_secs(15), || {
        upstream_connected(&gw)
    });
    // TCP health checks first: connect and close. Not a warning.
    for _ in 0..5 {
        drop(std::net::TcpStream::connect(("127.0.0.1", collector.port)).unwrap());
    }
    let flood = Flood::start(collector.port, &["127.0.0.2".into()], 2000, 60);
    let (n, worst) = publish_through_restarts(&broker, &mut gw, 16, 4);
    wait_for(
        "every reading at the central side",
        Duration::from_secs(60),
        || counted(&collector) >= n as u64,
    );
    std::thread::sleep(Duration::from_secs(1));
    let refused = collector_metric(
        &collector,
        "edgeferry_collect_refused_total{reason=\"per_address\"",
    );
    let hwm = vm_hwm_kib(collector.pid().unwrap());
    let total = counted(&collector);
    eprintln!(
        "fault: 2000 idle connections from 127.0.0.2 held for the whole run, gateway restarted 4 \
         times; published {n}, counted {total}, lost {}, slowest reconnect {worst:?}, refused \
         per address {refused}, collector VmHWM {} KiB",
        n as i64 - total as i64,
        hwm
    );
    drop(flood);
    assert_eq!(total, n as u64, "every reading once");
    assert!(
        worst < Duration::from_secs(10),
        "reconnected within seconds: {worst:?}"
    );
    assert!(refused > 0.0, "the per-address limit bit and was counted");
    assert!(
        hwm < 128 * 1024,
        "collector memory stays bounded: {hwm} KiB"
    );
    let log = collector.log();
    assert!(
        !log.contains("WebSocket upgrade failed"),
        "a probe is not a warning:\n{log}"
    );
    assert!(log.contains("collect --max-pending-per-address"), "{log}");
    assert!(gw.stop().success());
}

#[test]
fn a_flood_from_many_addresses_ages_out_oldest_first_and_the_gateway_gets_through() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, collector, mut gw) = setup(dir.path(), &["--max-pending", "64"]);
    gw.start();
    wait_for("gateway upstream", Duration::from_secs(15), || {
        upstream_connected(&gw)
    });
    let sources: Vec<String> = (1..=200).map(|i| format!("127.0.1.{i}")).collect();
    let flood = Flood::start(collector.port, &sources, 10, 60);
    let (n, worst) = publish_through_restarts(&broker, &mut gw, 12, 3);
    wait_for(
        "every reading at the central side",
        Duration::from_secs(60),
        || counted(&collector) >= n as u64,
    );
    std::thread::sleep(Duration::from_secs(1));
    let evicted = collector_metric(&collector, "edgeferry_collect_pending_evicted_total");
    let pending = collector_metric(&collector, "edgeferry_collect_pending_connections");
    let hwm = vm_hwm_kib(collector.pid().unwrap());
    let total = counted(&collector);
    eprintln!(
        "fault: 2000 idle connections from 200 addresses, kept up; gateway restarted 3 times; \
         published {n}, counted {total}, slowest reconnect {worst:?}, evicted {evicted}, \
         pending now {pending}, collector VmHWM {hwm} KiB"
    );
    drop(flood);
    assert_eq!(total, n as u64);
    assert!(worst < Duration::from_secs(10), "{worst:?}");
    assert!(evicted > 0.0, "the total limit bit and was counted");
    assert!(pending <= 64.0, "{pending}");
    assert!(hwm < 128 * 1024, "{hwm} KiB");
    assert!(gw.stop().success());
}

#[test]
fn a_gateway_beyond_the_session_limit_is_told_503_and_gets_in_when_a_place_frees() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, collector, mut first) = setup(dir.path(), &["--max-connections", "1"]);
    first.start();
    wait_for("first gateway upstream", Duration::from_secs(15), || {
        upstream_connected(&first)
    });
    // A second gateway with the same token and collector.
    let cfg = std::fs::read_to_string(&first.config).unwrap();
    let mut second = Gateway::with_config(&broker.url(), "", "");
    std::fs::write(
        &second.config,
        cfg.replace(
            &first.dir.path().join("data").display().to_string(),
            &second.dir.path().join("data").display().to_string(),
        )
        .replace("id = \"gw-test\"", "id = \"gw-second\""),
    )
    .unwrap();
    second.start();
    wait_for(
        "the 503 in the second gateway's log",
        Duration::from_secs(15),
        || second.current_log().contains("HTTP 503"),
    );
    assert!(!upstream_connected(&second));
    assert!(
        collector_metric(
            &collector,
            "edgeferry_collect_refused_total{reason=\"sessions_full\""
        ) > 0.0
    );
    assert!(first.stop().success());
    wait_for(
        "the second gateway connected",
        Duration::from_secs(15),
        || upstream_connected(&second),
    );
    assert!(second.stop().success());
}

#[test]
fn clients_that_stall_their_handshake_are_closed_at_the_deadline_and_counted_by_stage() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("tokens");
    std::fs::write(&token, "stall-test-token\n").unwrap();
    let mut c = Collector::new(&[
        "--token-file",
        token.to_str().unwrap(),
        "--metrics-listen",
        "127.0.0.1:0",
        "--handshake-timeout",
        "1s",
    ]);
    c.start();
    wait_for("collector metrics", Duration::from_secs(10), || {
        c.dir.path().join("metrics.addr").exists()
    });
    // Closed by the collector: a read returns end of stream (or the connection is reset).
    let closed_within = |s: &mut std::net::TcpStream, limit: Duration| -> Duration {
        use std::io::Read;
        let t = Instant::now();
        s.set_read_timeout(Some(limit)).unwrap();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) if t.elapsed() < limit => return t.elapsed(),
                Ok(0) | Err(_) => panic!("not closed within {limit:?}"),
                Ok(_) => {}
            }
        }
    };
    // Connects and sends nothing: the WebSocket upgrade never starts.
    let mut silent = std::net::TcpStream::connect(("127.0.0.1", c.port)).unwrap();
    let waited = closed_within(&mut silent, Duration::from_secs(5));
    assert!(
        waited >= Duration::from_millis(900),
        "closed at the deadline, not before: {waited:?}"
    );
    // Upgrades with a valid token, then never says Hello.
    let mut mute = std::net::TcpStream::connect(("127.0.0.1", c.port)).unwrap();
    std::io::Write::write_all(
        &mut mute,
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
          Authorization: Bearer stall-test-token\r\n\r\n",
    )
    .unwrap();
    closed_within(&mut mute, Duration::from_secs(5));
    wait_for("both counted", Duration::from_secs(5), || {
        collector_metric(&c, "edgeferry_collect_handshake_timeouts_total") >= 2.0
    });
    let by_stage = |stage: &str| {
        collector_metric(
            &c,
            &format!("edgeferry_collect_handshake_timeouts_total{{stage=\"{stage}\"}}"),
        )
    };
    assert_eq!((by_stage("upgrade"), by_stage("hello")), (1.0, 1.0));
    assert_eq!(
        collector_metric(
            &c,
            "edgeferry_collect_connections_closed_total{reason=\"hello_timeout\"}"
        ),
        1.0
    );
    let log = c.log();
    assert!(log.contains("WebSocket upgrade timed out"), "{log}");
    assert!(
        log.contains("no Hello within the handshake timeout"),
        "{log}"
    );
}
