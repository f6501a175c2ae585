//! Ingest benchmark: edgeferry against a bare rumqttc subscriber, through one real Mosquitto.
//!
//! `cargo bench --bench ingest` runs the full benchmark (N = `EDGEFERRY_BENCH_N`, default
//! 200,000; live phases of 10 s at 10,000 readings/s). Without `--bench` (as `cargo test
//! --all-targets` runs it) it is a smoke run: N = 2,000 and 1 s live phases; it checks that
//! every reading arrived, never how fast.
//!
//! Phases, all through the same broker:
//! 1. bare drain: a rumqttc QoS 1 subscriber (persistent session, auto-ack, TCP_NODELAY) drains
//!    N messages queued while it was away;
//! 2. edgeferry drain: the same for the real daemon (journal + group commit + ack after sync);
//!    the ratio edgeferry ÷ bare is the figure that matters;
//! 3. live latency at 10,000 msg/s: publish → receive from the journal (`received_ms - ts`),
//!    receive → commit from `/metrics` when it exists, and a bare subscriber for comparison;
//! 4. resident memory during the live phase and during a live phase over 10,000 series;
//! 5. publish → alert;
//! 6. the stall witness (issue 11): phase 3 again with a bare subscriber on the same
//!    messages, so a late reading seen by both was delayed before the broker's delivery or on
//!    the host, and one seen late only by edgeferry was delayed on edgeferry's side; with the
//!    host's steal and iowait time and Mosquitto's CPU over the phase.
//!
//! Every edgeferry phase runs the example config's shape: windows 10 s and 1 min, the
//! `overheat` rule on every reading, and an upstream `edgeferry collect` connected.
//!
//! Every message's `ts` is the publisher's clock at publish time; everything runs on one host,
//! so `received_ms - ts` is a latency (1 ms resolution on both sides).

#[path = "../tests/common/mod.rs"]
mod common;

use common::{Collector, Gateway, Mosquitto, proc_status_kib, wait_for};
use rumqttc::{AsyncClient, Event, MqttOptions, NetworkOptions, Outgoing, Packet, QoS};
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const FILTER: &str = "bench/#";
const LIVE_RATE: usize = 10_000;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// ~50-byte payload: `{"value":20.xxxxxx,"ts":<publish epoch ms>}`: a realistic sensor value
/// (a narrow range, like a temperature) that still identifies reading `i` (see [`index_of`]),
/// so every reading can be counted exactly once at the end.
fn payload(i: usize) -> String {
    format!(r#"{{"value":{},"ts":{}}}"#, value_of(i), now_ms())
}

/// The value published for reading `i`: 20 + i·10⁻⁶, printed with 6 decimals.
fn value_of(i: usize) -> String {
    format!("{}.{:06}", 20 + i / 1_000_000, i % 1_000_000)
}

/// The reading number a journaled value stands for.
fn index_of(v: f64) -> Option<usize> {
    let x = ((v - 20.0) * 1e6).round();
    (x >= 0.0 && ((20.0 + x / 1e6) - v).abs() < 1e-7).then_some(x as usize)
}

/// 100 series: 10 sites × 100 devices, one metric.
fn topic(i: usize) -> String {
    format!("bench/s{}/d{}/temp", i % 10, i % 100)
}

/// 10,000 distinct series: (site, device) = (i mod 100, (i / 100) mod 100).
fn series_topic(i: usize) -> String {
    format!("bench/s{}/d{}/temp", i % 100, (i / 100) % 100)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn options(port: u16, id: &str, clean: bool) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30))
        .set_clean_session(clean)
        .set_max_packet_size(16 << 20, 16 << 20)
        .set_inflight(200);
    o
}

fn nodelay() -> NetworkOptions {
    let mut n = NetworkOptions::new();
    n.set_tcp_nodelay(true);
    n
}

/// Connects, optionally subscribes to `bench/#` (QoS 1), and disconnects cleanly.
/// With `clean = true` and no subscription this deletes a persistent session of that id.
fn session_op(port: u16, id: &str, clean: bool, subscribe: bool) {
    let rt = runtime();
    rt.block_on(async {
        let (client, mut el) = AsyncClient::new(options(port, id, clean), 100);
        el.set_network_options(nodelay());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let Ok(ev) = tokio::time::timeout_at(deadline, el.poll()).await else {
                panic!("session setup for {id} timed out");
            };
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) if subscribe => {
                    client.subscribe(FILTER, QoS::AtLeastOnce).await.unwrap();
                }
                Ok(Event::Incoming(Packet::ConnAck(_)))
                | Ok(Event::Incoming(Packet::SubAck(_))) => {
                    client.disconnect().await.unwrap();
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                Ok(_) => {}
                Err(e) => panic!("session setup for {id}: {e}"),
            }
        }
    });
}

/// A QoS 1 publisher (TCP_NODELAY) that counts PUBACKs.
struct Publisher {
    rt: tokio::runtime::Runtime,
    client: AsyncClient,
    acked: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    fn connect(port: u16, id: &str) -> Publisher {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (client, mut el) = AsyncClient::new(options(port, id, true), 10_000);
        el.set_network_options(nodelay());
        let acked = Arc::new(AtomicUsize::new(0));
        let a = acked.clone();
        let task = rt.spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        a.fetch_add(1, Ordering::SeqCst);
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

    fn publish(&self, topic: String, payload: String) {
        let c = self.client.clone();
        self.rt.block_on(async move {
            c.publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
        });
    }

    fn wait_acked(&self, n: usize, timeout: Duration) {
        wait_for(&format!("{n} PUBACKs"), timeout, || {
            self.acked.load(Ordering::SeqCst) >= n
        });
    }

    /// Publishes `n` messages as fast as the broker acknowledges them.
    fn queue(port: u16, n: usize, id: &str) {
        let p = Publisher::connect(port, id);
        for i in 0..n {
            p.publish(topic(i), payload(i));
        }
        p.wait_acked(n, Duration::from_secs(300));
    }

    /// Publishes at `rate` msg/s for `secs` seconds; returns (messages, achieved rate).
    fn paced(
        port: u16,
        id: &str,
        rate: usize,
        secs: f64,
        topic: fn(usize) -> String,
    ) -> (usize, f64) {
        let p = Publisher::connect(port, id);
        let total = (rate as f64 * secs) as usize;
        let period = Duration::from_secs_f64(1.0 / rate as f64);
        let start = Instant::now();
        for i in 0..total {
            let due = start + period * i as u32;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            p.publish(topic(i), payload(i));
        }
        let elapsed = start.elapsed().as_secs_f64();
        p.wait_acked(total, Duration::from_secs(120));
        (total, total as f64 / elapsed)
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reconnects the persistent session `id` and receives `n` messages (auto-ack); returns the
/// time from the start of the connection to the n-th message.
fn bare_drain(port: u16, id: &str, n: usize) -> Duration {
    let rt = runtime();
    rt.block_on(async {
        let (client, mut el) = AsyncClient::new(options(port, id, false), 1000);
        el.set_network_options(nodelay());
        let start = Instant::now();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
        let mut got = 0usize;
        while got < n {
            match tokio::time::timeout_at(deadline, el.poll()).await {
                Err(_) => panic!("bare drain: {got} of {n} after 300 s"),
                Ok(Ok(Event::Incoming(Packet::Publish(_)))) => got += 1,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("bare drain: {e}"),
            }
        }
        let t = start.elapsed();
        // Let the last acks go out, then leave.
        let _ = client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match el.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    _ => {}
                }
            }
        })
        .await;
        t
    })
}

/// A bare rumqttc subscriber (clean session, QoS 1, auto-ack, TCP_NODELAY) on `bench/#`,
/// recording for each message the reading it stands for and its publish → receive latency
/// (ms). Alone it is the baseline of the live phases; next to a gateway, on the same
/// messages, it is the witness that tells a delay of the broker or the host (both see it)
/// from one of edgeferry's (only the gateway sees it).
struct Witness {
    received: Arc<AtomicUsize>,
    done: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Vec<(usize, i64)>>,
}

impl Witness {
    /// Connects and returns once subscribed.
    fn start(port: u16, id: &str, expect: usize) -> Witness {
        let ready = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicUsize::new(0));
        let handle = {
            let (ready, done, received, id) = (
                ready.clone(),
                done.clone(),
                received.clone(),
                id.to_string(),
            );
            std::thread::spawn(move || {
                let rt = runtime();
                rt.block_on(async move {
                    let (client, mut el) = AsyncClient::new(options(port, &id, true), 1000);
                    el.set_network_options(nodelay());
                    let mut got = Vec::with_capacity(expect);
                    while !done.load(Ordering::SeqCst) {
                        match tokio::time::timeout(Duration::from_millis(200), el.poll()).await {
                            Err(_) => {}
                            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                                client.subscribe(FILTER, QoS::AtLeastOnce).await.unwrap();
                            }
                            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                                ready.store(true, Ordering::SeqCst)
                            }
                            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                                let recv = now_ms();
                                let v: serde_json::Value =
                                    serde_json::from_slice(&p.payload).unwrap();
                                let i = v["value"].as_f64().and_then(index_of).unwrap();
                                got.push((i, recv - v["ts"].as_i64().unwrap()));
                                received.store(got.len(), Ordering::SeqCst);
                            }
                            Ok(Ok(_)) => {}
                            Ok(Err(e)) => panic!("bare subscriber {id}: {e}"),
                        }
                    }
                    let _ = client.disconnect().await;
                    let _ = tokio::time::timeout(Duration::from_secs(1), el.poll()).await;
                    got
                })
            })
        };
        wait_for("bare subscriber", Duration::from_secs(10), || {
            ready.load(Ordering::SeqCst)
        });
        Witness {
            received,
            done,
            handle,
        }
    }

    /// Waits (at most 10 s) until `sent` messages arrived, then disconnects.
    fn finish(self, sent: usize) -> Vec<(usize, i64)> {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) && self.received.load(Ordering::SeqCst) < sent {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.done.store(true, Ordering::SeqCst);
        self.handle.join().unwrap()
    }
}

/// A live bare subscriber alone: publish → receive latency (ms) of each message.
fn bare_live(port: u16, rate: usize, secs: f64) -> (Vec<i64>, usize) {
    let w = Witness::start(port, "bench-bare-live", (rate as f64 * secs) as usize);
    let (sent, _) = Publisher::paced(port, "bench-pub-bare-live", rate, secs, topic);
    let lat = w.finish(sent).into_iter().map(|(_, l)| l).collect();
    (lat, sent)
}

/// The host's CPU time since boot from the `cpu` line of `/proc/stat`: (total, steal,
/// iowait) in clock ticks. Steal is time the hypervisor gave this VM's vCPUs to others.
fn host_cpu() -> (u64, u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal (guest time is inside user already).
    (f.iter().take(8).sum(), at(7), at(4))
}

/// Readings later than this from publish to receive count as stalled.
const STALL_MS: i64 = 100;

/// The stall witness: edgeferry's and the witness's latencies of the same readings.
struct StallReport {
    /// Sorted publish → receive latencies (ms): edgeferry, the witness.
    gateway: Vec<i64>,
    witness: Vec<i64>,
    /// Readings later than [`STALL_MS`] at edgeferry, at the witness, at both.
    late_gateway: usize,
    late_witness: usize,
    late_both: usize,
    /// Share of the host's CPU time that was steal and iowait during the phase (%).
    steal_pct: f64,
    iowait_pct: f64,
    /// CPU seconds Mosquitto used in the phase.
    broker_cpu_s: f64,
}

fn stall_report(
    gateway: &[(usize, i64)],
    witness: &[(usize, i64)],
    host: [(u64, u64, u64); 2],
    broker_cpu_s: f64,
) -> StallReport {
    let at_witness: std::collections::HashMap<usize, i64> = witness.iter().copied().collect();
    let late_gateway = gateway.iter().filter(|(_, l)| *l > STALL_MS).count();
    let late_both = gateway
        .iter()
        .filter(|(i, l)| *l > STALL_MS && at_witness.get(i).is_some_and(|w| *w > STALL_MS))
        .count();
    let sorted = |v: &[(usize, i64)]| {
        let mut l: Vec<i64> = v.iter().map(|(_, l)| *l).collect();
        l.sort_unstable();
        l
    };
    let [(t0, s0, w0), (t1, s1, w1)] = host;
    let pct =
        |a: u64, b: u64| 100.0 * b.saturating_sub(a) as f64 / (t1.saturating_sub(t0)).max(1) as f64;
    StallReport {
        gateway: sorted(gateway),
        witness: sorted(witness),
        late_gateway,
        late_witness: witness.iter().filter(|(_, l)| *l > STALL_MS).count(),
        late_both,
        steal_pct: pct(s0, s1),
        iowait_pct: pct(w0, w1),
        broker_cpu_s,
    }
}

// ---------------------------------------------------------------------------------------------
// edgeferry side

/// The bench's gateway has the example config's shape (windows 10 s and 1 min, lateness 5 s,
/// correction horizon 2 min, one rule evaluated on every reading, an upstream collector
/// connected) so that its latency and memory are those of a gateway in the field, not of a bare
/// journal.
fn bench_gateway(broker: &Mosquitto, upstream: &str, id: &str, max_series: usize) -> Gateway {
    let gw = Gateway::with_config(&broker.url(), "", "");
    let cfg = format!(
        r#"
[gateway]
id = "{id}"
data_dir = "{data}"

[mqtt]
url = "{url}"

[[mqtt.subscribe]]
filter = "bench/#"
template = "bench/{{site}}/{{device}}/{{metric}}"
format = "json"
value = "value"
timestamp = "ts"

[process]
windows = ["10s", "1m"]
allowed_lateness = "5s"
correction_horizon = "2m"
max_series = {max_series}

[[rules]]
name = "overheat"
metric = "temp"
above = 80.0
clear_below = 75.0
publish = "alerts/{{site}}/{{device}}/{{rule}}"

[upstream]
url = "{upstream}"

[store]
# Large segments: nothing is trimmed, so the whole run can be read back from the journal.
segment_size = "256MiB"
max_disk = "4GiB"

[admin]
listen = "127.0.0.1:0"

[log]
level = "info"
"#,
        data = gw.dir.path().join("data").display(),
        url = broker.url(),
    );
    std::fs::write(&gw.config, cfg).unwrap();
    gw
}

/// Waits until the gateway's upstream link is up, so that a phase measures a connected gateway.
fn wait_upstream(gw: &Gateway) {
    wait_for("the upstream link", Duration::from_secs(30), || {
        gw.metric("edgeferry_upstream_connected") == Some(1.0)
    });
}

fn client_id(gw_id: &str) -> String {
    format!("edgeferry-{gw_id}")
}

/// The admin address from the log line `admin listening on ADDR`, if the daemon has one.
fn admin_addr(gw: &Gateway) -> Option<String> {
    let log = gw.current_log();
    let rest = &log[log.find("admin listening on ")? + "admin listening on ".len()..];
    let addr = rest.split_whitespace().next()?.trim_end_matches(',');
    Some(
        addr.trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string(),
    )
}

fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.")
        .then_some(())
        .filter(|_| head.split_whitespace().nth(1) == Some("200"))?;
    Some(body.to_string())
}

/// Value of a Prometheus sample line `name{labels} value` or `name value`.
fn sample_value(line: &str) -> Option<f64> {
    line.rsplit_once(' ')?.1.parse().ok()
}

/// Sum of every series of a counter.
fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for l in text.lines() {
        let is = l
            .strip_prefix(name)
            .is_some_and(|r| r.starts_with('{') || r.starts_with(' '));
        if is && let Some(v) = sample_value(l) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

fn quantile(text: &str, name: &str, q: &str) -> Option<f64> {
    let want = format!("quantile=\"{q}\"");
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(&want))
        .find_map(sample_value)
}

struct Metrics {
    addr: Option<String>,
}

impl Metrics {
    fn of(gw: &Gateway) -> Metrics {
        // The admin line comes before "ready"; allow a moment in case it is logged after.
        let mut addr = admin_addr(gw);
        let t = Instant::now();
        while addr.is_none() && t.elapsed() < Duration::from_millis(300) {
            std::thread::sleep(Duration::from_millis(20));
            addr = admin_addr(gw);
        }
        // Empty until the first metric is recorded; a 200 is enough.
        let addr = addr.filter(|a| http_get(a, "/metrics").is_some());
        Metrics { addr }
    }

    fn scrape(&self) -> Option<String> {
        http_get(self.addr.as_ref()?, "/metrics")
    }

    fn readings(&self) -> Option<f64> {
        metric_sum(&self.scrape()?, "edgeferry_ingest_readings_total")
    }
}

/// Peak VmRSS seen by a sampler thread, and the final VmHWM.
struct RssSampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<u64>,
    pid: u32,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut peak = 0;
            while !s.load(Ordering::SeqCst) {
                if let Some(v) = proc_status_kib(pid, "VmRSS:") {
                    peak = peak.max(v);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        });
        RssSampler { stop, handle, pid }
    }

    /// (peak sampled VmRSS, VmHWM) in KiB.
    fn finish(self) -> (u64, u64) {
        let hwm = proc_status_kib(self.pid, "VmHWM:").unwrap_or(0);
        self.stop.store(true, Ordering::SeqCst);
        (self.handle.join().unwrap(), hwm)
    }
}

/// One journaled reading, as much as the benchmark needs.
struct Rec {
    received_ms: i64,
    value: f64,
    time_ms: i64,
    series: (String, String),
}

fn journal(gw: &Gateway) -> Vec<Rec> {
    let (st, out, err) = gw.command(&["dump-journal"]);
    assert!(st.success(), "dump-journal failed: {err}");
    let mut v = Vec::new();
    for line in out.lines() {
        let rec: serde_json::Value = serde_json::from_str(line).unwrap();
        let received_ms = rec["received_ms"].as_i64().unwrap();
        for r in rec["readings"].as_array().unwrap() {
            v.push(Rec {
                received_ms,
                value: r["value"].as_f64().unwrap(),
                time_ms: r["time_ms"].as_i64().unwrap(),
                series: (
                    r["tags"]["site"].as_str().unwrap_or("").to_string(),
                    r["tags"]["device"].as_str().unwrap_or("").to_string(),
                ),
            });
        }
    }
    v
}

/// Missing and duplicated values among 0..n.
fn check_once(values: impl Iterator<Item = f64>, n: usize) -> (usize, usize) {
    let mut seen = vec![0u32; n];
    let mut extra = 0;
    for v in values {
        match index_of(v).and_then(|i| seen.get_mut(i)) {
            Some(c) => *c += 1,
            None => extra += 1,
        }
    }
    let missing = seen.iter().filter(|&&c| c == 0).count();
    let dups = seen.iter().filter(|&&c| c > 1).count() + extra;
    (missing, dups)
}

/// Epoch ms of an RFC 3339 timestamp at the start of a log line.
fn log_line_ms(line: &str) -> Option<i64> {
    let tok = line.split_whitespace().next()?;
    let t =
        time::OffsetDateTime::parse(tok, &time::format_description::well_known::Rfc3339).ok()?;
    Some((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

/// Latest modification time (epoch ms) of any file under `dir`.
fn newest_mtime_ms(dir: &Path) -> Option<i64> {
    let mut best = None;
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let m = e.metadata().ok()?;
        let t = if m.is_dir() {
            newest_mtime_ms(&e.path())
        } else {
            m.modified()
                .ok()
                .map(|t| t.duration_since(UNIX_EPOCH).unwrap().as_millis() as i64)
        };
        best = best.max(t);
    }
    best
}

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn pct(sorted: &[i64], p: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    Some(sorted[i])
}

fn fmt_ms(v: Option<i64>) -> String {
    v.map(|v| format!("{v} ms")).unwrap_or_else(|| "n/a".into())
}

fn fmt_mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

// ---------------------------------------------------------------------------------------------

struct DrainResult {
    rate_from_connect: f64,
    rate_from_spawn: f64,
    completion: &'static str,
    missing: usize,
    dups: usize,
    peak_rss_kib: u64,
}

fn edgeferry_drain(broker: &Mosquitto, upstream: &str, n: usize) -> DrainResult {
    let id = "bench-drain";
    let mut gw = bench_gateway(broker, upstream, id, 20_000);
    // First run: creates the persistent session and its subscription.
    gw.start();
    assert!(gw.stop().success(), "{}", gw.current_log());
    Publisher::queue(broker.port, n, "bench-pub-drain-ef");

    let spawn_ms = now_ms();
    let spawned = Instant::now();
    gw.spawn();
    let rss = RssSampler::start(gw.pid().unwrap());
    gw.wait_ready();
    let metrics = Metrics::of(&gw);
    let journal_dir = gw.dir.path().join("data").join("journal");
    // Completion: the readings counter of /metrics when the daemon serves it; otherwise the
    // journal not growing for 1 s (checked by stopping and reading the journal below).
    // Either way the drain ended at the journal's last write (its mtime).
    let completion = if metrics.addr.is_some() {
        while !metrics.readings().is_some_and(|r| r >= n as f64) {
            if spawned.elapsed() > Duration::from_secs(60) {
                let text = metrics.scrape().unwrap_or_default();
                let status = metrics
                    .addr
                    .as_deref()
                    .and_then(|a| http_get(a, "/status"))
                    .unwrap_or_default();
                let ss = std::process::Command::new("ss")
                    .args([
                        "-tn",
                        format!("( sport = :{} or dport = :{} )", broker.port, broker.port)
                            .as_str(),
                    ])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                eprintln!("--- /status:\n{status}\n--- sockets:\n{ss}");
                let ours: Vec<&str> = text
                    .lines()
                    .filter(|l| l.starts_with("edgeferry_"))
                    .collect();
                panic!(
                    "edgeferry drain stalled: {:?} of {n} readings after 60 s\n{}\n--- log:\n{}",
                    metrics.readings(),
                    ours.join("\n"),
                    gw.current_log()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        "/metrics edgeferry_ingest_readings_total = N; end = journal's last write"
    } else {
        let (mut last, mut since) = (0, Instant::now());
        loop {
            std::thread::sleep(Duration::from_millis(20));
            let b = dir_bytes(&journal_dir);
            if b != last {
                (last, since) = (b, Instant::now());
            } else if b > 0 && since.elapsed() > Duration::from_secs(1) {
                break;
            }
            assert!(
                spawned.elapsed() < Duration::from_secs(300),
                "drain stalled"
            );
        }
        "no /metrics: journal stopped growing, then stop + dump-journal; end = journal's last write"
    };
    let done_ms = newest_mtime_ms(&journal_dir).unwrap_or_else(now_ms);
    let (peak, hwm) = rss.finish();
    let log = gw.current_log();
    let connected_ms = log
        .lines()
        .find(|l| l.contains("connected to MQTT broker"))
        .and_then(log_line_ms)
        .unwrap_or(spawn_ms);
    assert!(gw.stop().success(), "{}", gw.current_log());
    let j = journal(&gw);
    let (missing, dups) = check_once(j.iter().map(|r| r.value), n);
    drop(gw);
    session_op(broker.port, &client_id(id), true, false);
    DrainResult {
        rate_from_connect: n as f64 / ((done_ms - connected_ms).max(1) as f64 / 1000.0),
        rate_from_spawn: n as f64 / ((done_ms - spawn_ms).max(1) as f64 / 1000.0),
        completion,
        missing,
        dups,
        peak_rss_kib: peak.max(hwm),
    }
}

struct LiveResult {
    sent: usize,
    rate: f64,
    journaled: usize,
    distinct_series: usize,
    lat: Vec<i64>,
    commit_p50: Option<f64>,
    commit_p99: Option<f64>,
    /// Poll-loop waits over 250 ms (`edgeferry_ingest_poll_stalls_total`).
    poll_stalls: Option<f64>,
    peak_rss_kib: u64,
    hwm_kib: u64,
    /// With a witness: its latencies against edgeferry's, for the same readings.
    stalls: Option<StallReport>,
}

fn edgeferry_live(
    broker: &Mosquitto,
    upstream: &str,
    id: &str,
    secs: f64,
    max_series: usize,
    topic: fn(usize) -> String,
    witness: bool,
) -> LiveResult {
    let mut gw = bench_gateway(broker, upstream, id, max_series);
    gw.start();
    wait_upstream(&gw);
    let metrics = Metrics::of(&gw);
    let rss = RssSampler::start(gw.pid().unwrap());
    let expect = (LIVE_RATE as f64 * secs) as usize;
    let witness =
        witness.then(|| Witness::start(broker.port, &format!("bench-witness-{id}"), expect));
    let host_before = host_cpu();
    let broker_before = broker.pid().map_or(0.0, common::cpu_secs);
    let (sent, rate) = Publisher::paced(
        broker.port,
        &format!("bench-pub-{id}"),
        LIVE_RATE,
        secs,
        topic,
    );
    if metrics.addr.is_some() {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30)
            && !metrics.readings().is_some_and(|r| r >= sent as f64)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    } else {
        std::thread::sleep(Duration::from_millis(1000));
    }
    let host_after = host_cpu();
    let broker_cpu_s = broker.pid().map_or(0.0, common::cpu_secs) - broker_before;
    let witnessed = witness.map(|w| w.finish(sent));
    let text = metrics.scrape().unwrap_or_default();
    let commit_p50 = quantile(&text, "edgeferry_ingest_commit_seconds", "0.5");
    let commit_p99 = quantile(&text, "edgeferry_ingest_commit_seconds", "0.99");
    let (peak, hwm) = rss.finish();
    assert!(gw.stop().success(), "{}", gw.current_log());
    let j = journal(&gw);
    drop(gw);
    session_op(broker.port, &client_id(id), true, false);
    let mut lat: Vec<i64> = j.iter().map(|r| r.received_ms - r.time_ms).collect();
    lat.sort_unstable();
    let stalls = witnessed.map(|w| {
        let by_reading: Vec<(usize, i64)> = j
            .iter()
            .filter_map(|r| Some((index_of(r.value)?, r.received_ms - r.time_ms)))
            .collect();
        stall_report(&by_reading, &w, [host_before, host_after], broker_cpu_s)
    });
    let series: HashSet<&(String, String)> = j.iter().map(|r| &r.series).collect();
    LiveResult {
        sent,
        rate,
        journaled: j.len(),
        distinct_series: series.len(),
        lat,
        commit_p50,
        commit_p99,
        poll_stalls: metric_sum(&text, "edgeferry_ingest_poll_stalls_total"),
        peak_rss_kib: peak,
        hwm_kib: hwm,
        stalls,
    }
}

/// What edgeferry itself measured in the alert phase (from `/metrics`), to tell its own
/// delays from the broker's and the watching client's.
#[derive(Default)]
struct AlertInside {
    /// receive → alert handed to the MQTT client, p50 / p99 (s).
    handed: (Option<f64>, Option<f64>),
    /// Local alert publications dropped because the queue was full.
    dropped: Option<f64>,
    /// Checkpoint write (fdatasync, rename, directory fsync), p99 and max (s).
    checkpoint: (Option<f64>, Option<f64>),
    /// receive → durable commit, p99 (s).
    commit_p99: Option<f64>,
    /// Poll-loop waits over 250 ms (`edgeferry_ingest_poll_stalls_total`).
    poll_stalls: Option<f64>,
}

/// Publish → alert latency: readings at `rate`/s whose values cross the bench gateway's
/// `overheat` rule (`above = 80, clear_below = 75`) on every reading of a series (90, 70, 90, ...), so each reading raises
/// or clears an alert; a separate subscriber receives the alerts from the broker and measures
/// arrival − the triggering reading's publish time (the alert's `time`). Returns the sorted
/// latencies (ms) and how many alerts were expected.
fn alert_latency(
    broker: &Mosquitto,
    upstream: &str,
    rate: usize,
    secs: f64,
) -> (Vec<i64>, usize, AlertInside) {
    let mut gw = bench_gateway(broker, upstream, "bench-alerts", 20_000);
    gw.start();
    wait_upstream(&gw);
    let metrics = Metrics::of(&gw);
    let lat = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let l2 = lat.clone();
    let port = broker.port;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let watcher = std::thread::spawn(move || {
        let rt = runtime();
        rt.block_on(async move {
            let (client, mut el) = AsyncClient::new(options(port, "bench-alert-watch", true), 1000);
            el.set_network_options(nodelay());
            client.subscribe("alerts/#", QoS::AtMostOnce).await.unwrap();
            let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(secs + 20.0);
            while let Ok(ev) = tokio::time::timeout_at(deadline, el.poll()).await {
                match ev {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let now = now_ms();
                        let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                        if let Some(t) = v["time"].as_str().and_then(|t| {
                            time::OffsetDateTime::parse(
                                t,
                                &time::format_description::well_known::Rfc3339,
                            )
                            .ok()
                        }) {
                            let t = (t.unix_timestamp_nanos() / 1_000_000) as i64;
                            l2.lock().unwrap().push(now - t);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let total = (rate as f64 * secs) as usize;
    let p = Publisher::connect(broker.port, "bench-pub-alerts");
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let start = Instant::now();
    for i in 0..total {
        let due = start + period * i as u32;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        // topic(i) has 100 series (i % 100): consecutive readings of a series alternate.
        let value = if (i / 100) % 2 == 0 { 90 } else { 70 };
        p.publish(
            topic(i),
            format!(r#"{{"value":{value},"ts":{}}}"#, now_ms()),
        );
    }
    p.wait_acked(total, Duration::from_secs(120));
    let want = total;
    let t0 = Instant::now();
    while lat.lock().unwrap().len() < want && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(p);
    let text = metrics.scrape().unwrap_or_default();
    let inside = AlertInside {
        handed: (
            quantile(&text, "edgeferry_alert_latency_seconds", "0.5"),
            quantile(&text, "edgeferry_alert_latency_seconds", "0.99"),
        ),
        dropped: metric_sum(&text, "edgeferry_alerts_publish_dropped_total"),
        checkpoint: (
            quantile(&text, "edgeferry_checkpoint_seconds", "0.99"),
            quantile(&text, "edgeferry_checkpoint_seconds", "1"),
        ),
        commit_p99: quantile(&text, "edgeferry_ingest_commit_seconds", "0.99"),
        poll_stalls: metric_sum(&text, "edgeferry_ingest_poll_stalls_total"),
    };
    let _ = gw.stop();
    let _ = watcher.join();
    let mut v = lat.lock().unwrap().clone();
    v.sort_unstable();
    (v, want, inside)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n: usize = if full {
        std::env::var("EDGEFERRY_BENCH_N")
            .ok()
            .and_then(|v| v.replace('_', "").parse().ok())
            .unwrap_or(200_000)
    } else {
        2_000
    };
    let secs = if full { 10.0 } else { 1.0 };
    let bin = env!("CARGO_BIN_EXE_edgeferry");
    println!(
        "edgeferry ingest benchmark ({}): N = {n}, live {secs} s at {LIVE_RATE} msg/s\n  daemon binary: {bin}",
        if full {
            "full"
        } else {
            "smoke run; pass --bench for the real one"
        }
    );

    // Mosquitto as README tells operators to configure it (the bare subscriber gets the same
    // window); `EDGEFERRY_BENCH_BROKER` replaces the extra lines (empty: the stock window of
    // 20, with which edgeferry's commit groups wait for `commit_interval`).
    let broker = Mosquitto::start_with(
        &std::env::var("EDGEFERRY_BENCH_BROKER").unwrap_or_else(|_| common::README_BROKER.into()),
    );
    let port = broker.port;
    // The upstream every edgeferry phase forwards to (the example config's shape).
    let mut collector = Collector::new(&[]);
    collector.start();
    let upstream = collector.url();

    // 1. bare subscriber drain
    println!("[1/7] bare subscriber drain of {n} queued messages");
    session_op(port, "bench-bare-drain", false, true);
    Publisher::queue(port, n, "bench-pub-drain-bare");
    let bare_t = bare_drain(port, "bench-bare-drain", n);
    session_op(port, "bench-bare-drain", true, false);
    let bare_rate = n as f64 / bare_t.as_secs_f64();

    // 2. edgeferry drain
    println!("[2/7] edgeferry drain of {n} queued messages");
    let ef = edgeferry_drain(&broker, &upstream, n);
    let ratio = ef.rate_from_connect / bare_rate;

    // 3. live latency through edgeferry, 100 series
    println!("[3/7] edgeferry live, {LIVE_RATE} msg/s for {secs} s");
    let live = edgeferry_live(&broker, &upstream, "bench-live", secs, 20_000, topic, false);

    // 3b. the same rate to a bare subscriber
    println!("[4/7] bare subscriber live, {LIVE_RATE} msg/s for {secs} s");
    let (mut bare_lat, bare_sent) = bare_live(port, LIVE_RATE, secs);
    bare_lat.sort_unstable();

    // 4. 10,000 series
    println!("[5/7] edgeferry live over 10,000 series, {LIVE_RATE} msg/s for {secs} s");
    let many = edgeferry_live(
        &broker,
        &upstream,
        "bench-series",
        secs,
        20_000,
        series_topic,
        false,
    );

    // 5. publish → alert
    let alert_rate = 5_000;
    println!(
        "[6/7] publish → alert at {alert_rate} readings/s (every reading raises or clears) for {secs} s"
    );
    let (alert_lat, alerts_expected, inside) = alert_latency(&broker, &upstream, alert_rate, secs);

    // 6. the stall witness: phase 3 again, with a bare subscriber on the same messages
    println!(
        "[7/7] stall witness: edgeferry live at {LIVE_RATE} msg/s for {secs} s with a bare subscriber on the same messages"
    );
    let witnessed = edgeferry_live(
        &broker,
        &upstream,
        "bench-witnessed",
        secs,
        20_000,
        topic,
        true,
    );
    let stalls = witnessed.stalls.as_ref().expect("a witness ran");

    // ---- report
    let ms = |s: Option<f64>| {
        s.map(|v| format!("{:.2} ms", v * 1000.0))
            .unwrap_or_else(|| "n/a".into())
    };
    let sum = |a: Option<i64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => format!("{:.1} ms", a as f64 + b * 1000.0),
        _ => "n/a (no /metrics)".into(),
    };
    let p50 = pct(&live.lat, 0.50);
    let p99 = pct(&live.lat, 0.99);
    let max = live.lat.last().copied();
    println!();
    println!("| measurement | result |");
    println!("|---|---|");
    println!("| N (queued messages per drain) | {n} |");
    println!(
        "| bare rumqttc drain | {bare_rate:.0} msg/s ({:.3} s) |",
        bare_t.as_secs_f64()
    );
    println!(
        "| edgeferry drain, from MQTT connect | {:.0} msg/s |",
        ef.rate_from_connect
    );
    println!(
        "| edgeferry drain, from process start | {:.0} msg/s |",
        ef.rate_from_spawn
    );
    println!("| **ratio edgeferry ÷ bare** (from connect) | **{ratio:.2}** |");
    println!("| drain completion signal | {} |", ef.completion);
    println!(
        "| drain exactly-once check | {} missing, {} duplicated |",
        ef.missing, ef.dups
    );
    println!(
        "| edgeferry peak RSS while draining | {} |",
        fmt_mib(ef.peak_rss_kib)
    );
    println!(
        "| live publish rate achieved | {:.0} msg/s ({} messages, {} journaled) |",
        live.rate, live.sent, live.journaled
    );
    println!(
        "| edgeferry publish → receive (journal) p50 / p99 / max | {} / {} / {} |",
        fmt_ms(p50),
        fmt_ms(p99),
        fmt_ms(max)
    );
    println!(
        "| edgeferry receive → commit (/metrics) p50 / p99 | {} / {} |",
        ms(live.commit_p50),
        ms(live.commit_p99)
    );
    println!(
        "| **publish → durable commit, p99 estimate** (p99 + p99) | **{}** |",
        sum(p99, live.commit_p99)
    );
    println!(
        "| bare subscriber publish → receive p50 / p99 / max | {} / {} / {} ({} of {bare_sent}) |",
        fmt_ms(pct(&bare_lat, 0.5)),
        fmt_ms(pct(&bare_lat, 0.99)),
        fmt_ms(bare_lat.last().copied()),
        bare_lat.len()
    );
    println!(
        "| edgeferry RSS, live 100 series: peak VmRSS / VmHWM | {} / {} |",
        fmt_mib(live.peak_rss_kib),
        fmt_mib(live.hwm_kib)
    );
    println!(
        "| 10k-series phase: rate, journaled, distinct series | {:.0} msg/s, {} of {}, {} series |",
        many.rate, many.journaled, many.sent, many.distinct_series
    );
    println!(
        "| 10k-series phase publish → receive p50 / p99 / max | {} / {} / {} |",
        fmt_ms(pct(&many.lat, 0.5)),
        fmt_ms(pct(&many.lat, 0.99)),
        fmt_ms(many.lat.last().copied())
    );
    println!(
        "| 10k-series phase receive → commit p50 / p99 | {} / {} |",
        ms(many.commit_p50),
        ms(many.commit_p99)
    );
    println!(
        "| poll-loop stalls > 250 ms (live phase / 10k-series phase) | {} / {} |",
        live.poll_stalls.unwrap_or(0.0),
        many.poll_stalls.unwrap_or(0.0)
    );
    println!(
        "| **edgeferry RSS, 10k series: peak VmRSS / VmHWM** | **{} / {}** |",
        fmt_mib(many.peak_rss_kib),
        fmt_mib(many.hwm_kib)
    );
    println!(
        "| **publish → alert** at {alert_rate}/s (alert on every reading): p50 / p99 / max | **{} / {} / {}** ({} of {} alerts received) |",
        fmt_ms(pct(&alert_lat, 0.5)),
        fmt_ms(pct(&alert_lat, 0.99)),
        fmt_ms(alert_lat.last().copied()),
        alert_lat.len(),
        alerts_expected
    );
    println!(
        "| alert phase inside edgeferry (/metrics): receive → alert handed to the MQTT client p50 / p99; receive → commit p99; local alerts dropped (queue full); checkpoint write p99 / max; poll-loop stalls > 250 ms | {} / {}; {}; {}; {} / {}; {} |",
        ms(inside.handed.0),
        ms(inside.handed.1),
        ms(inside.commit_p99),
        inside.dropped.map_or("0".into(), |d| format!("{d:.0}")),
        ms(inside.checkpoint.0),
        ms(inside.checkpoint.1),
        inside.poll_stalls.unwrap_or(0.0),
    );
    println!(
        "| stall witness: publish → receive p99 / max, edgeferry vs the bare subscriber on the same messages | {} / {} vs {} / {} |",
        fmt_ms(pct(&stalls.gateway, 0.99)),
        fmt_ms(stalls.gateway.last().copied()),
        fmt_ms(pct(&stalls.witness, 0.99)),
        fmt_ms(stalls.witness.last().copied()),
    );
    println!(
        "| stall witness: readings later than {STALL_MS} ms at edgeferry / at the bare subscriber / at both | {} / {} / {} |",
        stalls.late_gateway, stalls.late_witness, stalls.late_both
    );
    println!(
        "| stall witness: host CPU steal / iowait; Mosquitto CPU | {:.1} % / {:.1} %; {:.2} s |",
        stalls.steal_pct, stalls.iowait_pct, stalls.broker_cpu_s
    );
    println!();
    if stalls.late_gateway > 0 {
        println!(
            "  stalls: {} of edgeferry's {} late readings were late at the bare subscriber too ({})",
            stalls.late_both,
            stalls.late_gateway,
            if stalls.late_both * 2 >= stalls.late_gateway {
                "mostly before the broker's delivery or on the host, not in edgeferry"
            } else {
                "mostly edgeferry's own: its connection, rumqttc or its poll task"
            }
        );
    } else {
        println!("  stalls: none at edgeferry in the witness phase");
    }
    let goal = |ok: bool| if ok { "met" } else { "NOT met" };
    if let Some(a) = pct(&alert_lat, 0.99) {
        println!(
            "  p99 publish -> alert well under 100 ms: {a} ms -> {}",
            goal(a < 100)
        );
    }
    println!("goals (full run only are meaningful):");
    println!("  drain ratio >= 0.9: {ratio:.2} -> {}", goal(ratio >= 0.9));
    match (p99, live.commit_p99) {
        (Some(a), Some(b)) => {
            let e = a as f64 + b * 1000.0;
            println!(
                "  p99 publish -> commit <= 50 ms (issue 3) / <= 5 ms (issue 11): {e:.1} ms -> {} / {}",
                goal(e <= 50.0),
                goal(e <= 5.0)
            )
        }
        _ => println!(
            "  p99 publish -> commit <= 50 ms: n/a (no /metrics); publish -> receive p99 {}",
            fmt_ms(p99)
        ),
    }
    let rss = many.peak_rss_kib.max(many.hwm_kib);
    println!(
        "  RSS with 10k series < 64 MiB (issue 3) / <= 32 MiB (issue 11): {} -> {} / {}",
        fmt_mib(rss),
        goal(rss < 64 * 1024),
        goal(rss <= 32 * 1024)
    );

    // Correctness is checked in both modes (never speed).
    assert_eq!(
        (ef.missing, ef.dups),
        (0, 0),
        "drain lost or duplicated readings"
    );
    assert_eq!(
        live.journaled, live.sent,
        "live phase: every reading journaled once"
    );
    assert_eq!(
        many.journaled, many.sent,
        "10k-series phase: every reading journaled once"
    );
    assert_eq!(
        witnessed.journaled, witnessed.sent,
        "witness phase: every reading journaled once"
    );
    assert_eq!(
        stalls.witness.len(),
        witnessed.sent,
        "the witness received everything"
    );
    let want_series = many.sent.min(10_000);
    assert_eq!(
        many.distinct_series, want_series,
        "10k-series phase: distinct series"
    );
    assert_eq!(
        bare_lat.len(),
        bare_sent,
        "bare live subscriber received everything"
    );
    println!("\nbench ingest: all readings accounted for");
}
