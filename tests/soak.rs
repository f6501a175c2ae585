//! Soak: real Mosquitto, a real gateway (local alert rules, upstream to a real
//! `edgeferry collect`), hundreds of series published steadily, and outages over and over:
//! the collector SIGKILLed, then answering every handshake with HTTP 503, then back; Mosquitto
//! stopped and restarted. The gateway process is sampled every few seconds (VmRSS, open file
//! descriptors, bytes in its data directory); after the warm-up (the first third) the test
//! fails when any of them keeps growing ([`keeps_growing`]), or when a reading did not reach
//! the central side exactly once.
//!
//! `EDGEFERRY_SOAK_SECS` sets the duration (default 150 s, the suite's version);
//! `scripts/soak.sh [MINUTES]` runs the documented 30-minute soak on the release build.

mod common;

use common::*;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Distinct series, each publishing once a second.
const SERIES: usize = 400;
/// Series 0..HOT overheat for 3 readings out of every 20 (the `overheat` rule raises, clears).
const HOT: usize = 4;
/// This series falls silent for 12 s out of every 45 s (the `sensor-silent` rule, 10 s).
const SILENT: usize = SERIES - 1;
/// One round of outages, repeated for the whole run (seconds from the start of the round).
const CYCLE: f64 = 15.0;
const COLLECTOR_KILL_AT: f64 = 0.0;
const REFUSE_FROM: f64 = 2.0;
const COLLECTOR_BACK_AT: f64 = 5.0;
const BROKER_STOP_AT: f64 = 9.0;
const BROKER_BACK_AT: f64 = 10.5;
const SEGMENT: &str = "256KiB";

/// Mosquitto never has more than 20 messages in flight to the gateway (its default
/// `max_inflight_messages`), so 2,000 unacknowledged messages are plenty; the smaller bound
/// also makes the keys of recent commits (`2 × max_unacked + commit_max` of them, a ring
/// that is full after ~100 s at 400 messages/s with the defaults) full within seconds, so a
/// structure that is filling up to its bound is not mistaken for a leak after the warm-up.
const MQTT: &str = "max_unacked = 2000\ncommit_max = 100";

const CONFIG: &str = r#"
[process]
windows = ["2s", "10s"]
allowed_lateness = "1s"
correction_horizon = "30s"
checkpoint_interval = "2s"

[[rules]]
name = "overheat"
metric = "temperature"
above = 80.0
clear_below = 75.0
publish = "alerts/{site}/{device}/{rule}"

[[rules]]
name = "sensor-silent"
metric = "temperature"
silent_for = "10s"
publish = "alerts/{site}/{device}/{rule}"
"#;

// ---------------------------------------------------------------------------------------
// The growth criterion.

/// The verdict on one sampled series (time in seconds, value).
#[derive(Debug, Clone)]
struct Growth {
    /// The tolerance: `max(tol_abs, tol_rel × median of the middle third)`.
    tol: f64,
    max_mid: f64,
    max_last: f64,
    median_mid: f64,
    median_last: f64,
    /// Least-squares slope over every post-warm-up sample × their time span: the rise the
    /// trend line predicts from the end of the warm-up to the end.
    trend_rise: f64,
    growing: bool,
}

/// Does `samples` keep growing after `warmup_end`? The post-warm-up span (up to `end`) is cut
/// into a middle and a last part of equal length. It grows when all three hold:
/// the last part reaches higher than the middle one (`max`), its typical level is higher
/// (`median`), and the least-squares trend over both rises — each by more than the tolerance.
/// A leak of rate r over a post-warm-up span T moves the first two by about rT/2 and the
/// trend by rT, so it is caught once rT/2 exceeds the tolerance; a transient spike moves only
/// the maximum (and the trend a little), a saw-tooth or periodic outage peaks move none of them.
fn keeps_growing(
    samples: &[(f64, f64)],
    warmup_end: f64,
    end: f64,
    tol_abs: f64,
    tol_rel: f64,
) -> Growth {
    let split = (warmup_end + end) / 2.0;
    let mid: Vec<f64> = samples
        .iter()
        .filter(|(t, _)| *t >= warmup_end && *t < split)
        .map(|s| s.1)
        .collect();
    let last: Vec<f64> = samples
        .iter()
        .filter(|(t, _)| *t >= split && *t <= end)
        .map(|s| s.1)
        .collect();
    assert!(
        mid.len() >= 3 && last.len() >= 3,
        "too few samples to judge growth ({} and {} after the warm-up)",
        mid.len(),
        last.len()
    );
    let max = |v: &[f64]| v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let median = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        let n = s.len();
        if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        }
    };
    let post: Vec<(f64, f64)> = samples
        .iter()
        .copied()
        .filter(|(t, _)| *t >= warmup_end && *t <= end)
        .collect();
    let n = post.len() as f64;
    let mt = post.iter().map(|s| s.0).sum::<f64>() / n;
    let mv = post.iter().map(|s| s.1).sum::<f64>() / n;
    let sxx: f64 = post.iter().map(|s| (s.0 - mt).powi(2)).sum();
    let sxy: f64 = post.iter().map(|s| (s.0 - mt) * (s.1 - mv)).sum();
    let span = post.last().unwrap().0 - post[0].0;
    let trend_rise = if sxx > 0.0 { sxy / sxx * span } else { 0.0 };
    let (max_mid, max_last) = (max(&mid), max(&last));
    let (median_mid, median_last) = (median(&mid), median(&last));
    let tol = tol_abs.max(tol_rel * median_mid);
    let growing = max_last > max_mid + tol && median_last > median_mid + tol && trend_rise > tol;
    Growth {
        tol,
        max_mid,
        max_last,
        median_mid,
        median_last,
        trend_rise,
        growing,
    }
}

#[cfg(test)]
mod criterion {
    use super::*;

    /// A deterministic jitter in [-1, 1].
    fn jitter(i: usize) -> f64 {
        (((i * 7919 + 13) % 101) as f64 / 50.0) - 1.0
    }

    fn series(n: usize, f: impl Fn(usize, f64) -> f64) -> Vec<(f64, f64)> {
        (0..n)
            .map(|i| {
                let t = i as f64 * 2.0;
                (t, f(i, t))
            })
            .collect()
    }

    const MIB: f64 = 1024.0 * 1024.0;

    #[test]
    fn a_steady_leak_is_growing() {
        // 30 MiB growing by 6 MiB per 100 s, ±1 MiB of noise, sampled every 2 s for 150 s.
        let s = series(75, |i, t| 30.0 * MIB + t * 0.06 * MIB + jitter(i) * MIB);
        let g = keeps_growing(&s, 50.0, 150.0, 2.0 * MIB, 0.05);
        assert!(g.growing, "{g:?}");
        // An fd leak of one descriptor per 15 s outage cycle.
        let s = series(75, |i, t| {
            20.0 + (t / 15.0).floor() + (i % 3 == 0) as u8 as f64
        });
        let g = keeps_growing(&s, 50.0, 150.0, 2.0, 0.0);
        assert!(g.growing, "{g:?}");
    }

    #[test]
    fn flat_noisy_spiky_and_periodic_series_are_not_growing() {
        let flat = series(75, |i, _| 30.0 * MIB + jitter(i) * MIB);
        // Spikes anywhere, including the very last sample.
        let spiky = series(75, |i, _| {
            30.0 * MIB
                + if i % 17 == 0 || i == 74 {
                    20.0 * MIB
                } else {
                    0.0
                }
        });
        // A saw-tooth (segments filled, then trimmed) and periodic outage peaks (a backlog
        // that grows while the upstream is away and drains after).
        let saw = series(75, |i, _| (1 + i % 5) as f64 * 256.0 * 1024.0);
        let peaks = series(75, |_, t| {
            let phase = t % 15.0;
            MIB + if phase < 6.0 { phase * 0.5 * MIB } else { 0.0 }
        });
        for (name, s) in [
            ("flat", &flat),
            ("spiky", &spiky),
            ("saw", &saw),
            ("peaks", &peaks),
        ] {
            let g = keeps_growing(s, 50.0, 150.0, 2.0 * MIB, 0.05);
            assert!(!g.growing, "{name}: {g:?}");
        }
        // A late step smaller than the tolerance (an allocator arena grown once).
        let step = series(75, |i, _| 30.0 * MIB + if i > 60 { 1.5 * MIB } else { 0.0 });
        assert!(!keeps_growing(&step, 50.0, 150.0, 2.0 * MIB, 0.05).growing);
        // Growth during the warm-up only.
        let warm = series(75, |i, t| 10.0 * MIB + t.min(50.0) * 0.4 * MIB + jitter(i));
        assert!(!keeps_growing(&warm, 50.0, 150.0, 2.0 * MIB, 0.05).growing);
    }
}

// ---------------------------------------------------------------------------------------
// Sampling the gateway process.

#[derive(Debug, Clone)]
struct Sample {
    t: f64,
    phase: &'static str,
    rss_kib: u64,
    fds: u64,
    threads: u64,
    disk: u64,
    backlog: Option<f64>,
}

fn status_field(status: &str, name: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Bytes of every file under `dir` (files that vanish meanwhile count as 0).
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

const PHASES: [&str; 4] = ["ok", "collector down", "upstream 503", "broker down"];

// ---------------------------------------------------------------------------------------
// A sensor fleet: one MQTT client with a persistent session (so what it had not handed to
// Mosquitto survives a broker restart, as with a real sensor's QoS 1 session).

struct Fleet {
    rt: tokio::runtime::Runtime,
    client: rumqttc::AsyncClient,
    acked: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Fleet {
    fn connect(port: u16) -> Fleet {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let mut o = rumqttc::MqttOptions::new("soak-fleet", "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_clean_session(false);
        o.set_inflight(100);
        let (client, mut el) = rumqttc::AsyncClient::new(o, 1000);
        let acked = Arc::new(AtomicUsize::new(0));
        let a = acked.clone();
        let task = rt.spawn(async move {
            loop {
                match el.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                        a.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Fleet {
            rt,
            client,
            acked,
            task,
        }
    }

    fn publish(&self, topic: String, payload: String) {
        let c = self.client.clone();
        self.rt.block_on(async move {
            c.publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
        });
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One reading as sent: series, event time, value in thousandths.
#[derive(Clone, Copy)]
struct Sent {
    series: u16,
    ts: i64,
    milli: i64,
}

fn series_key(s: usize) -> String {
    format!("temperature{{device=dev{s},site=site{}}}", s % 10)
}

/// Reading `n` of series `s`: a temperature (hot for the HOT series 3 readings in 20) plus
/// n mod 1000 thousandths, so every reading of a window has its own value.
fn value_milli(s: usize, n: u32) -> i64 {
    let base = if s < HOT && (n as usize + s * 5) % 20 < 3 {
        85
    } else {
        20 + (s % 10) as i64
    };
    base * 1000 + (n % 1000) as i64
}

/// Publishes every series once a second (in 10 slices of SERIES/10 every 100 ms) until `stop`.
fn run_fleet(fleet: &Fleet, start: Instant, stop: &AtomicBool) -> Vec<Sent> {
    let mut sent = Vec::new();
    let mut next_n = vec![0u32; SERIES];
    let slice = SERIES / 10;
    let mut tick = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let due = start + Duration::from_millis(100 * tick);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let secs = start.elapsed().as_secs_f64();
        let from = (tick as usize % 10) * slice;
        for (s, next) in next_n.iter_mut().enumerate().skip(from).take(slice) {
            if s == SILENT && secs % 45.0 >= 30.0 && secs % 45.0 < 42.0 {
                continue;
            }
            let n = *next;
            *next += 1;
            let milli = value_milli(s, n);
            let ts = now_ms() as i64;
            fleet.publish(
                format!("sensors/site{}/dev{s}/temperature", s % 10),
                format!(
                    r#"{{"value":{}.{:03},"ts":{ts}}}"#,
                    milli / 1000,
                    milli % 1000
                ),
            );
            sent.push(Sent {
                series: s as u16,
                ts,
                milli,
            });
        }
        tick += 1;
    }
    sent
}

// ---------------------------------------------------------------------------------------
// An upstream that refuses: while the collector is down, its port answers every WebSocket
// handshake with 503 (what a collector at its session limit, or a proxy without a backend,
// sends).

struct Refuser {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Refuser {
    fn start(port: u16, refused: Arc<AtomicU64>) -> Option<Refuser> {
        let listener = (0..20).find_map(|_| {
            std::net::TcpListener::bind(("127.0.0.1", port))
                .inspect_err(|_| std::thread::sleep(Duration::from_millis(50)))
                .ok()
        })?;
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                        let mut buf = [0u8; 4096];
                        let mut got = Vec::new();
                        while !got.windows(4).any(|w| w == b"\r\n\r\n") && got.len() < 16384 {
                            match s.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(k) => got.extend_from_slice(&buf[..k]),
                            }
                        }
                        let _ = s.write_all(
                            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\
                              Connection: close\r\n\r\n",
                        );
                        refused.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Some(Refuser {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Refuser {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------
// The central side's view.

#[derive(serde::Deserialize)]
struct Line {
    kind: String,
    #[serde(default)]
    series: String,
    #[serde(default)]
    window_start: Option<String>,
    #[serde(default)]
    window_secs: u32,
    #[serde(default)]
    version: u32,
    #[serde(default)]
    count: u64,
    #[serde(default)]
    sum: Option<f64>,
    #[serde(default)]
    rule: String,
    #[serde(default)]
    state: String,
}

#[derive(Default)]
struct Central {
    /// (series, window start ms, window secs) → (highest version, count, sum).
    windows: HashMap<(u16, i64, u32), (u32, u64, f64)>,
    /// The same (window, version) with two different contents.
    conflicts: usize,
    /// Aggregates of a series this test never published.
    foreign: usize,
    /// (rule, state) → alert lines.
    alerts: HashMap<(String, String), u64>,
}

fn read_central(c: &Collector, ids: &HashMap<String, u16>) -> Central {
    let mut out = Central::default();
    let Ok(rd) = std::fs::read_dir(c.dir.path().join("out")) else {
        return out;
    };
    for f in rd.flatten() {
        for line in read_all(&f.path()).lines() {
            let Ok(l) = serde_json::from_str::<Line>(line) else {
                continue;
            };
            if l.kind == "alert" {
                *out.alerts.entry((l.rule, l.state)).or_insert(0) += 1;
                continue;
            }
            let Some(&id) = ids.get(&l.series) else {
                out.foreign += 1;
                continue;
            };
            let start = time::OffsetDateTime::parse(
                l.window_start.as_deref().unwrap_or(""),
                &time::format_description::well_known::Rfc3339,
            )
            .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
            .unwrap_or(i64::MIN);
            let sum = l.sum.unwrap_or(f64::NAN);
            let e = out
                .windows
                .entry((id, start, l.window_secs))
                .or_insert((0, 0, 0.0));
            if l.version == e.0 && e.1 != 0 && (e.1 != l.count || e.2.to_bits() != sum.to_bits()) {
                out.conflicts += 1;
            }
            if l.version >= e.0 {
                *e = (l.version, l.count, sum);
            }
        }
    }
    out
}

fn counted(c: &Central, secs: u32) -> u64 {
    c.windows
        .iter()
        .filter(|(k, _)| k.2 == secs)
        .map(|(_, v)| v.1)
        .sum()
}

/// Expected alert transitions of the overheat rule: (raised, cleared), from each hot
/// series' readings in order.
fn expected_overheat(sent: &[Sent]) -> (u64, u64) {
    let mut raised = [false; HOT];
    let (mut r, mut c) = (0, 0);
    for s in sent.iter().filter(|s| (s.series as usize) < HOT) {
        let hot = s.milli > 80_000;
        let i = s.series as usize;
        if hot && !raised[i] {
            raised[i] = true;
            r += 1;
        } else if !hot && raised[i] && s.milli <= 75_000 {
            raised[i] = false;
            c += 1;
        }
    }
    (r, c)
}

fn soak_secs() -> u64 {
    match std::env::var("EDGEFERRY_SOAK_SECS") {
        Ok(v) => {
            let s: u64 = v
                .parse()
                .unwrap_or_else(|_| panic!("EDGEFERRY_SOAK_SECS={v}: not a number of seconds"));
            assert!(s >= 60, "EDGEFERRY_SOAK_SECS={s}: at least 60 s");
            s
        }
        Err(_) => 150,
    }
}

#[test]
fn soak_with_outages_rss_fds_and_disk_stay_flat_and_every_reading_arrives_once() {
    let secs = soak_secs();
    let duration = secs as f64;
    let warmup_end = duration / 3.0;
    let interval = (duration / 100.0).clamp(2.0, 10.0);
    let mut broker = Mosquitto::start();
    let mut collector = Collector::new(&[]);
    let upstream = format!(
        "[upstream]\nurl = \"{}\"\nlinger = \"500ms\"\nreconnect_max = \"2s\"\n",
        collector.url()
    );
    let mut gw = Gateway::with_config(&broker.url(), MQTT, &format!("{CONFIG}{upstream}"));
    // Small segments, so the journal and the outbox are trimmed within the warm-up.
    let cfg = std::fs::read_to_string(&gw.config).unwrap().replace(
        "segment_size = \"256MiB\"",
        &format!("segment_size = \"{SEGMENT}\""),
    );
    std::fs::write(&gw.config, cfg).unwrap();
    collector.start();
    gw.start();
    let pid = gw.pid().unwrap();
    let data = gw.dir.path().join("data");
    let ids: HashMap<String, u16> = (0..SERIES).map(|s| (series_key(s), s as u16)).collect();

    let fleet = Fleet::connect(broker.port);
    let phase = AtomicU8::new(0);
    let stop_fleet = AtomicBool::new(false);
    let stop_sampler = AtomicBool::new(false);
    let samples: Mutex<Vec<Sample>> = Mutex::new(Vec::new());
    let refused = Arc::new(AtomicU64::new(0));
    let (mut collector_kills, mut broker_restarts, mut refusals) = (0u32, 0u32, 0u32);
    let start = Instant::now();
    let t0 = now_ms() as i64;
    let mut events: Vec<(String, &str)> = Vec::new();
    eprintln!(
        "soak: {secs} s, {SERIES} series at 1 Hz, outages every {CYCLE} s, samples every \
         {interval} s, warm-up {warmup_end:.0} s; gateway pid {pid}, data {}",
        data.display()
    );

    let sent = std::thread::scope(|scope| {
        let publisher = scope.spawn(|| run_fleet(&fleet, start, &stop_fleet));
        let sampler = scope.spawn(|| {
            let mut k = 0u64;
            while !stop_sampler.load(Ordering::SeqCst) {
                let due = start + Duration::from_secs_f64(interval * k as f64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                if stop_sampler.load(Ordering::SeqCst) {
                    break;
                }
                let t = start.elapsed().as_secs_f64();
                let status =
                    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
                    .map(|d| d.count() as u64)
                    .unwrap_or(0);
                let s = Sample {
                    t,
                    phase: PHASES[phase.load(Ordering::SeqCst) as usize],
                    rss_kib: status_field(&status, "VmRSS:").unwrap_or(0),
                    threads: status_field(&status, "Threads:").unwrap_or(0),
                    fds,
                    disk: dir_bytes(&data),
                    backlog: gw.metric("edgeferry_outbox_items"),
                };
                samples.lock().unwrap().push(s);
                k += 1;
            }
        });

        // The outages, round after round.
        let at = |cycle: u64, offset: f64| {
            let when = start + Duration::from_secs_f64(cycle as f64 * CYCLE + offset);
            if let Some(wait) = when.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        };
        let mut cycle = 0u64;
        while (cycle as f64) * CYCLE + BROKER_BACK_AT < duration {
            at(cycle, COLLECTOR_KILL_AT);
            collector.kill9();
            events.push((
                format!("{:.1}", start.elapsed().as_secs_f64()),
                "collector SIGKILL",
            ));
            collector_kills += 1;
            phase.store(1, Ordering::SeqCst);
            at(cycle, REFUSE_FROM);
            let refuser = Refuser::start(collector.port, refused.clone());
            if refuser.is_some() {
                refusals += 1;
                phase.store(2, Ordering::SeqCst);
            }
            at(cycle, COLLECTOR_BACK_AT);
            drop(refuser);
            collector.start();
            events.push((
                format!("{:.1}", start.elapsed().as_secs_f64()),
                "collector up",
            ));
            phase.store(0, Ordering::SeqCst);
            at(cycle, BROKER_STOP_AT);
            broker.stop();
            events.push((
                format!("{:.1}", start.elapsed().as_secs_f64()),
                "broker stopped",
            ));
            broker_restarts += 1;
            phase.store(3, Ordering::SeqCst);
            at(cycle, BROKER_BACK_AT);
            broker.restart();
            events.push((format!("{:.1}", start.elapsed().as_secs_f64()), "broker up"));
            phase.store(0, Ordering::SeqCst);
            cycle += 1;
        }
        let end = start + Duration::from_secs_f64(duration);
        if let Some(wait) = end.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        stop_sampler.store(true, Ordering::SeqCst);
        stop_fleet.store(true, Ordering::SeqCst);
        sampler.join().unwrap();
        publisher.join().unwrap()
    });
    let published = sent.len();
    let run_secs = start.elapsed().as_secs_f64();

    // Every reading acknowledged by Mosquitto, then counted at the collector.
    wait_for(
        &format!("{published} PUBACKs"),
        Duration::from_secs(120),
        || fleet.acked.load(Ordering::SeqCst) >= published,
    );
    let drain_from = Instant::now();
    let mut central = read_central(&collector, &ids);
    while (counted(&central, 2) as usize) < published
        || (counted(&central, 10) as usize) < published
    {
        if drain_from.elapsed() > Duration::from_secs(120) {
            break;
        }
        std::thread::sleep(Duration::from_secs(2));
        central = read_central(&collector, &ids);
    }
    let drain_secs = drain_from.elapsed().as_secs_f64();

    // Per window: the highest version's count and sum against what was published.
    let mut expected: HashMap<(u16, i64, u32), (u64, i64)> = HashMap::new();
    for s in &sent {
        for w in [2u32, 10] {
            let len = w as i64 * 1000;
            let e = expected
                .entry((s.series, s.ts - s.ts.rem_euclid(len), w))
                .or_insert((0, 0));
            e.0 += 1;
            e.1 += s.milli;
        }
    }
    // Readings lost and doubled, per window length (index 0: 2 s, 1: 10 s).
    let li = |w: u32| usize::from(w == 10);
    let (mut lost, mut doubled) = ([0u64; 2], [0u64; 2]);
    let (mut wrong_sums, mut unexpected_windows) = (0u64, 0u64);
    let mut bad: Vec<String> = Vec::new();
    for (k, &(n, milli)) in &expected {
        match central.windows.get(k) {
            None => lost[li(k.2)] += n,
            Some(&(_, got, sum)) => {
                lost[li(k.2)] += n.saturating_sub(got);
                doubled[li(k.2)] += got.saturating_sub(n);
                if got != n && bad.len() < 20 {
                    // The difference of the sums names the reading (its value is unique in
                    // the window).
                    let extra = (sum * 1000.0).round() as i64 - milli;
                    let who: Vec<String> = sent
                        .iter()
                        .filter(|s| {
                            s.series == k.0
                                && s.ts - s.ts.rem_euclid(k.2 as i64 * 1000) == k.1
                                && (got < n || s.milli == extra)
                        })
                        .map(|s| format!("ts {} ({:+.3} s)", s.ts, (s.ts - t0) as f64 / 1e3))
                        .collect();
                    bad.push(format!(
                        "{} window {} ({:+.1} s) {} s: published {n}, counted {got}, sum off by \
                         {:+} thousandths: {who:?}",
                        series_key(k.0 as usize),
                        k.1,
                        (k.1 - t0) as f64 / 1e3,
                        k.2,
                        extra,
                    ));
                }
                if got == n && (sum * 1000.0 - milli as f64).abs() > 0.5 {
                    wrong_sums += 1;
                }
            }
        }
    }
    for (k, v) in &central.windows {
        if !expected.contains_key(k) {
            unexpected_windows += 1;
            doubled[li(k.2)] += v.1;
        }
    }
    let alert = |rule: &str, state: &str| {
        central
            .alerts
            .get(&(rule.to_string(), state.to_string()))
            .copied()
            .unwrap_or(0)
    };
    let (hot_raised, hot_cleared) = expected_overheat(&sent);
    // A counter never incremented is not exported.
    let too_late = gw.metric("edgeferry_process_too_late_total").unwrap_or(0.0);
    let dups_dropped = gw
        .metric("edgeferry_ingest_duplicates_dropped_total")
        .unwrap_or(0.0);
    let corrections = gw
        .metric("edgeferry_process_late_corrections_total")
        .unwrap_or(0.0);
    let renewals = gw.logs().matches("restored from an older copy").count();

    // The samples, and the verdict on each series.
    let samples = samples.into_inner().unwrap();
    eprintln!(
        "{:>7}  {:<15} {:>9} {:>5} {:>7} {:>10} {:>8}",
        "t (s)", "phase", "RSS MiB", "fds", "threads", "disk KiB", "backlog"
    );
    for s in &samples {
        eprintln!(
            "{:>7.1}  {:<15} {:>9.1} {:>5} {:>7} {:>10.1} {:>8}",
            s.t,
            s.phase,
            s.rss_kib as f64 / 1024.0,
            s.fds,
            s.threads,
            s.disk as f64 / 1024.0,
            s.backlog.map(|b| format!("{b:.0}")).unwrap_or("-".into()),
        );
    }
    let pick = |f: fn(&Sample) -> f64| -> Vec<(f64, f64)> {
        samples.iter().map(|s| (s.t, f(s))).collect()
    };
    // Tolerances: RSS 4 MiB or 10 %, descriptors 2, disk four segments or 25 %.
    let segment = 256.0 * 1024.0;
    let verdicts = [
        (
            "RSS (MiB)",
            1024.0 * 1024.0,
            keeps_growing(
                &pick(|s| s.rss_kib as f64 * 1024.0),
                warmup_end,
                duration,
                4.0 * 1024.0 * 1024.0,
                0.10,
            ),
        ),
        (
            "open fds",
            1.0,
            keeps_growing(&pick(|s| s.fds as f64), warmup_end, duration, 2.0, 0.0),
        ),
        (
            "disk (KiB)",
            1024.0,
            keeps_growing(
                &pick(|s| s.disk as f64),
                warmup_end,
                duration,
                4.0 * segment,
                0.25,
            ),
        ),
    ];
    for (name, unit, g) in &verdicts {
        eprintln!(
            "{name:<11} middle third max {:.1} median {:.1} | last third max {:.1} median \
             {:.1} | trend {:+.1} | tolerance {:.1} => {}",
            g.max_mid / unit,
            g.median_mid / unit,
            g.max_last / unit,
            g.median_last / unit,
            g.trend_rise / unit,
            g.tol / unit,
            if g.growing { "GROWING" } else { "flat" }
        );
    }
    let at_warmup = samples
        .iter()
        .find(|s| s.t >= warmup_end)
        .or(samples.last())
        .unwrap();
    let last = samples.last().unwrap();
    eprintln!(
        "soak summary: {secs} s (run {run_secs:.0} s + drain {drain_secs:.0} s): \
         {collector_kills} collector SIGKILLs, {refusals} refusing periods ({} handshakes \
         answered 503), {broker_restarts} Mosquitto restarts; published {published}, counted \
         {} (2 s windows) / {} (10 s windows), lost {lost:?}, doubled {doubled:?}, wrong sums \
         {wrong_sums}, conflicting versions {}, too late {too_late}; redeliveries dropped by \
         the gateway {dups_dropped}, late corrections {corrections}; overheat alerts raised \
         {}/{hot_raised} cleared {}/{hot_cleared}, sensor-silent raised {} cleared {}; \
         RSS {:.1} -> {:.1} MiB, fds {} -> {}, disk {:.0} -> {:.0} KiB (warm-up end at \
         {:.0} s -> end at {:.0} s)",
        refused.load(Ordering::SeqCst),
        counted(&central, 2),
        counted(&central, 10),
        central.conflicts,
        alert("overheat", "raised"),
        alert("overheat", "cleared"),
        alert("sensor-silent", "raised"),
        alert("sensor-silent", "cleared"),
        at_warmup.rss_kib as f64 / 1024.0,
        last.rss_kib as f64 / 1024.0,
        at_warmup.fds,
        last.fds,
        at_warmup.disk as f64 / 1024.0,
        last.disk as f64 / 1024.0,
        at_warmup.t,
        last.t,
    );

    let growing: Vec<&str> = verdicts
        .iter()
        .filter(|(_, _, g)| g.growing)
        .map(|(n, _, _)| *n)
        .collect();
    assert!(
        growing.is_empty(),
        "keeps growing after the warm-up: {growing:?}"
    );
    assert!(
        lost == [0, 0]
            && doubled == [0, 0]
            && wrong_sums == 0
            && unexpected_windows == 0
            && central.conflicts == 0
            && central.foreign == 0,
        "not exactly once at the central side: lost {lost:?}, doubled {doubled:?} (2 s, 10 s \
         windows), wrong sums {wrong_sums}, unexpected windows {unexpected_windows}, conflicts \
         {}, foreign {}\n{}\nfaults (s from the start): {events:?}\n{}",
        central.conflicts,
        central.foreign,
        bad.join("\n"),
        gw.logs()
    );
    assert_eq!(
        (alert("overheat", "raised"), alert("overheat", "cleared")),
        (hot_raised, hot_cleared),
        "every overheat transition reaches the central side once"
    );
    assert_eq!(too_late, 0.0, "nothing too late");
    assert_eq!(renewals, 0, "no spurious epoch renewals");
    assert!(collector_kills >= 3 && broker_restarts >= 3 && refused.load(Ordering::SeqCst) > 0);
    assert!(gw.stop().success());
}
