//! Store-and-forward end to end: real Mosquitto, real edgeferry, real `edgeferry collect`.
//! The central side's view (sum of `count` over the highest version of every window) must
//! equal the number of readings published, whatever was down or killed in between.

mod common;

use common::*;
use rand::RngExt;
use std::time::{Duration, Instant};

const PROCESS: &str = r#"
[process]
windows = ["1s", "2s"]
allowed_lateness = "300ms"
checkpoint_interval = "500ms"
"#;

fn upstream(url: &str, batch_max: usize) -> String {
    format!("[upstream]\nurl = \"{url}\"\nbatch_max = {batch_max}\nlinger = \"200ms\"\n")
}

fn topic(i: usize) -> String {
    format!("sensors/site{}/dev{}/temperature", i % 2, i % 8)
}

/// 400 series: enough one-window batches (thousands) that the backlog takes the collector
/// several seconds to store, longer than the first live window takes to close.
fn wide_topic(i: usize) -> String {
    format!("sensors/site{}/dev{}/temperature", i % 2, i % 400)
}

/// Waits until the collector's view counts `n` readings in every window length.
fn wait_for_central(
    c: &Collector,
    n: u64,
    timeout: Duration,
) -> std::collections::BTreeMap<u64, u64> {
    let start = Instant::now();
    loop {
        let counts = central_counts(&c.lines());
        if counts.len() == 2 && counts.values().all(|&v| v >= n) {
            return counts;
        }
        if start.elapsed() > timeout {
            return counts;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn upstream_outage_then_recovery_delivers_every_window_exactly_once_live_first() {
    let broker = Mosquitto::start();
    let mut collector = Collector::new(&[]);
    let mut gw = Gateway::with_config(
        &broker.url(),
        "",
        &format!("{PROCESS}{}", upstream(&collector.url(), 1)),
    );
    gw.start();
    let p = Publisher::connect(broker.port, "pub-outage");
    // Phase 1, upstream down: about 8 s of readings become a backlog of one-window batches.
    let mut i = 0;
    loop {
        for _ in 0..20 {
            p.publish(&wide_topic(i), live_payload(i));
            i += 1;
        }
        std::thread::sleep(Duration::from_millis(50));
        if i >= 3200 {
            break;
        }
    }
    let (_, out, _) = gw.command(&["status"]);
    assert!(out.contains("upstream") && out.contains("DOWN"), "{out}");
    let addr = std::fs::read_to_string(gw.dir.path().join("data/admin.addr")).unwrap();
    let (_, metrics) =
        edgeferry::admin::http_get(&addr, "/metrics", Duration::from_secs(3)).unwrap();
    assert!(
        metrics.contains("edgeferry_upstream_connected 0"),
        "{metrics}"
    );
    let backlog_items = metrics
        .lines()
        .find_map(|l| l.strip_prefix("edgeferry_outbox_items "))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(
        backlog_items > 0.0,
        "the backlog shows in /metrics during the outage"
    );
    collector.start();
    // Phase 2, upstream back: live readings keep flowing while the backlog drains, from the
    // moment the gateway has reconnected (its backoff decides when) for another 4 s.
    let mut connected_at: Option<Instant> = None;
    let phase2 = Instant::now();
    while connected_at.is_none_or(|t| t.elapsed() < Duration::from_secs(4)) {
        assert!(
            phase2.elapsed() < Duration::from_secs(40),
            "gateway never reconnected"
        );
        for _ in 0..10 {
            p.publish(&wide_topic(i), live_payload(i));
            i += 1;
        }
        std::thread::sleep(Duration::from_millis(50));
        if connected_at.is_none() && i % 100 == 0 {
            let (_, out, _) = gw.command(&["status"]);
            if out
                .lines()
                .any(|l| l.starts_with("upstream") && l.contains("connected"))
            {
                connected_at = Some(Instant::now());
            }
        }
    }
    let n = i as u64;
    p.wait_acked(i, Duration::from_secs(30));
    let counts = wait_for_central(&collector, n, Duration::from_secs(30));
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        vec![n, n],
        "every reading counted exactly once per window length: {counts:?}\n{}",
        gw.current_log()
    );
    // Live first: batches are appended in seq order, so a batch written at the collector
    // before an older (lower-seq) one overtook the backlog. The backlog here is over a
    // thousand one-window batches, which takes the collector a while to store.
    let seqs: Vec<u64> = collector
        .lines()
        .iter()
        .filter(|l| l["kind"] == "aggregate")
        .map(|l| l["batch"].as_u64().unwrap())
        .collect();
    let backlog_end = seqs.iter().position(|&s| s > seqs[0] + 1000).unwrap_or(0);
    let overtaken = seqs
        .iter()
        .enumerate()
        .any(|(i, &s)| seqs[i..].iter().any(|&later| later < s));
    assert!(
        overtaken,
        "live batches must overtake the backlog (seqs in arrival order, first {backlog_end}: {:?})",
        &seqs[..seqs.len().min(50)]
    );
    let (_, out, _) = gw.command(&["status"]);
    assert!(out.contains("connected") && !out.contains("DOWN"), "{out}");
    assert!(gw.stop().success());
}

#[test]
fn sigkill_of_gateway_and_collector_while_the_upstream_flaps_loses_nothing_and_counts_nothing_twice()
 {
    chain_under_kills(PROCESS, 0..300);
}

/// The same with gateway outages longer than `allowed_lateness + correction_horizon`: what
/// the broker kept meanwhile lands in its own windows, and the windows still equal an
/// uninterrupted run's.
#[test]
fn crashes_with_backlogs_beyond_the_horizon_give_the_windows_of_an_uninterrupted_run() {
    let process = format!("{PROCESS}correction_horizon = \"400ms\"\n");
    chain_under_kills(&process, 900..1500);
}

/// Publishes timestamped readings while SIGKILLing the gateway (down for `down_ms` each
/// time) and the collector at random, then checks every window against a direct computation.
fn chain_under_kills(process: &str, down_ms: std::ops::Range<u64>) {
    let broker = Mosquitto::start();
    let mut collector = Collector::new(&[]);
    let mut gw = Gateway::with_config(
        &broker.url(),
        "",
        &format!("{process}{}", upstream(&collector.url(), 5)),
    );
    gw.start();
    collector.start();
    let n = 4_000usize;
    let port = broker.port;
    let publisher = std::thread::spawn(move || {
        let p = Publisher::connect(port, "pub-chain");
        let mut sent = Vec::with_capacity(n);
        for i in 0..n {
            let ts = now_ms();
            // Values with a fractional part, so sums and deviations are not trivially exact.
            let value = (i % 97) as f64 * 0.25 + 10.0;
            p.publish(&topic(i), format!(r#"{{"value":{value},"ts":{ts}}}"#));
            sent.push((i, ts, value));
            if i % 20 == 19 {
                std::thread::sleep(Duration::from_millis(25)); // ~800 readings/s for 5 s
            }
        }
        p.wait_acked(n, Duration::from_secs(60));
        sent
    });
    let mut rng = rand::rng();
    let mut kills = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(6);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(rng.random_range(200..700)));
        if rng.random_bool(0.5) {
            gw.kill9();
            kills.0 += 1;
            std::thread::sleep(Duration::from_millis(rng.random_range(down_ms.clone())));
            gw.spawn();
        } else if collector.is_running() {
            collector.kill9();
            kills.1 += 1;
        } else {
            collector.start();
        }
    }
    let sent = publisher.join().unwrap();
    if !collector.is_running() {
        collector.start();
    }
    gw.kill9();
    gw.start();
    let counts = wait_for_central(&collector, n as u64, Duration::from_secs(40));
    let renewals = gw.logs().matches("restored from an older copy").count();
    let too_late = gw.metric("edgeferry_process_too_late_total").unwrap_or(0.0);
    eprintln!(
        "chain: {n} readings, {} gateway SIGKILLs (down {down_ms:?} ms) and {} collector \
         SIGKILLs: {counts:?}, {renewals} epoch renewals, {too_late} too late in the last run",
        kills.0, kills.1
    );
    assert_eq!(too_late, 0.0);
    // A stored batch whose Ack was lost is not a restored data directory (issue 14).
    assert_eq!(renewals, 0, "spurious epoch renewals:\n{}", gw.logs());
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        vec![n as u64, n as u64],
        "{counts:?}\n{}",
        gw.logs()
    );
    // Crash equivalence: the highest version of every window equals what an uninterrupted
    // run computes from the same readings (here: a direct computation over what was sent).
    let mut expected: std::collections::BTreeMap<(String, u64, u64), Vec<f64>> = Default::default();
    for &(i, ts, value) in &sent {
        let series = format!("temperature{{device=dev{},site=site{}}}", i % 8, i % 2);
        for secs in [1u64, 2] {
            let start = ts - ts % (secs * 1000);
            expected
                .entry((series.clone(), start, secs))
                .or_default()
                .push(value);
        }
    }
    let mut got: std::collections::BTreeMap<(String, u64, u64), (u64, serde_json::Value)> =
        Default::default();
    for l in collector
        .lines()
        .into_iter()
        .filter(|l| l["kind"] == "aggregate")
    {
        let start = time::OffsetDateTime::parse(
            l["window_start"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
        let start = (start.unix_timestamp_nanos() / 1_000_000) as u64;
        let key = (
            l["series"].as_str().unwrap().to_string(),
            start,
            l["window_secs"].as_u64().unwrap(),
        );
        let v = l["version"].as_u64().unwrap();
        if got.get(&key).is_none_or(|(have, _)| v > *have) {
            got.insert(key, (v, l));
        }
    }
    assert_eq!(got.len(), expected.len(), "same set of windows");
    for (key, values) in &expected {
        let (_, l) = &got[key];
        let count = values.len() as f64;
        let sum: f64 = values.iter().sum();
        let mean = sum / count;
        let min = values.iter().cloned().fold(f64::INFINITY, f64::min);
        let max = values.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sd = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / count).sqrt();
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * (1.0 + a.abs().max(b.abs()));
        assert_eq!(l["count"].as_u64().unwrap(), values.len() as u64, "{key:?}");
        assert!(close(l["sum"].as_f64().unwrap(), sum), "sum {key:?}: {l}");
        assert!(
            close(l["min"].as_f64().unwrap(), min) && close(l["max"].as_f64().unwrap(), max),
            "{key:?}: {l}"
        );
        assert!(
            close(l["mean"].as_f64().unwrap(), mean),
            "mean {key:?}: {l}"
        );
        assert!(
            (l["stddev"].as_f64().unwrap() - sd).abs() <= 1e-6 * (1.0 + sd),
            "stddev {key:?}: {l} vs {sd}"
        );
    }
    assert!(gw.stop().success());
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    let m = e.metadata().unwrap();
                    if m.is_dir() {
                        dir_bytes(&e.path())
                    } else {
                        m.len()
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn the_journal_is_trimmed_below_the_checkpoint_so_its_disk_use_stays_bounded() {
    let broker = Mosquitto::start();
    let mut gw = Gateway::with_config(
        &broker.url(),
        "max_unacked = 1000\ncommit_max = 100",
        PROCESS,
    );
    let cfg = std::fs::read_to_string(&gw.config)
        .unwrap()
        .replace("segment_size = \"256MiB\"", "segment_size = \"64KiB\"");
    std::fs::write(&gw.config, cfg).unwrap();
    gw.start();
    let p = Publisher::connect(broker.port, "pub-trim");
    let n = 20_000;
    let journal = gw.dir.path().join("data/journal");
    let mut peak = 0;
    for i in 0..n {
        p.publish(&topic(i), live_payload(i));
        if i % 1000 == 999 {
            std::thread::sleep(Duration::from_millis(100));
            peak = peak.max(dir_bytes(&journal));
        }
    }
    p.wait_acked(n, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(1500));
    peak = peak.max(dir_bytes(&journal));
    // The gauge (which the quota also reads) says what is on disk, after the last trim too.
    let on_disk = dir_bytes(&journal);
    let gauge = gw.metric("edgeferry_journal_bytes").unwrap() as u64;
    eprintln!("journal: {on_disk} bytes on disk, edgeferry_journal_bytes {gauge}");
    assert!(
        on_disk.abs_diff(gauge) <= 4096,
        "{on_disk} on disk, gauge {gauge}"
    );
    assert!(gw.stop().success());
    let (_, out, _) = gw.command(&["dump-journal"]);
    let last_lsn: u64 = out
        .lines()
        .last()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["lsn"]
                .as_u64()
                .unwrap()
        })
        .unwrap_or(0);
    assert_eq!(last_lsn, n as u64 - 1, "every reading was journaled");
    let first_lsn: u64 = out
        .lines()
        .next()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["lsn"]
                .as_u64()
                .unwrap()
        })
        .unwrap_or(0);
    let kept = out.lines().count();
    eprintln!("journal: peak {peak} bytes, {kept} records kept from lsn {first_lsn} of {n}");
    assert!(
        first_lsn > 10_000,
        "old segments were deleted (first lsn {first_lsn})"
    );
    // What is kept: the dedup tail (4 commit groups, at least 1,000 records), what the last
    // checkpoint before the last commit did not cover yet, and the partly used segments.
    assert!(kept < n / 2, "{kept} records kept");
    assert!(
        peak < 1024 * 1024,
        "journal peaked at {peak} bytes for {n} readings"
    );
}

#[test]
fn a_data_directory_restored_from_an_older_copy_is_detected_and_continues_under_a_new_epoch() {
    let broker = Mosquitto::start();
    let mut collector = Collector::new(&[]);
    let mut gw = Gateway::with_config(
        &broker.url(),
        "",
        &format!("{PROCESS}{}", upstream(&collector.url(), 5)),
    );
    collector.start();
    gw.start();
    let p = Publisher::connect(broker.port, "pub-restore");
    let publish_for = |from: usize, secs: u64| {
        let until = Instant::now() + Duration::from_secs(secs);
        let mut i = from;
        while Instant::now() < until {
            p.publish(&topic(i), live_payload(i));
            i += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        i
    };
    let i = publish_for(0, 3);
    std::thread::sleep(Duration::from_secs(3));
    assert!(gw.stop().success());
    let data = gw.dir.path().join("data");
    let backup = gw.dir.path().join("backup");
    copy_dir(&data, &backup);
    let epoch_before = std::fs::read_to_string(data.join("epoch")).unwrap();
    // Life goes on: more batches reach the central side...
    gw.start();
    let i = publish_for(i, 3);
    std::thread::sleep(Duration::from_secs(3));
    assert!(gw.stop().success());
    // ... then the box is restored from the older copy.
    std::fs::remove_dir_all(&data).unwrap();
    copy_dir(&backup, &data);
    gw.start();
    let lines_before = collector.lines().len();
    publish_for(i, 3);
    wait_for(
        "the restore to be detected",
        Duration::from_secs(20),
        || gw.current_log().contains("restored from an older copy"),
    );
    let epoch_after = std::fs::read_to_string(data.join("epoch")).unwrap();
    assert_ne!(epoch_before, epoch_after, "a new store epoch");
    let new_epoch = u64::from_str_radix(epoch_after.trim(), 16).unwrap();
    wait_for(
        "batches under the new epoch",
        Duration::from_secs(20),
        || {
            collector.lines().iter().skip(lines_before).any(|l| {
                l["epoch"].as_u64() == Some(new_epoch)
                    || l["epoch"]
                        .as_str()
                        .map(|s| u64::from_str_radix(s, 16).ok() == Some(new_epoch))
                        .unwrap_or(false)
            })
        },
    );
    assert!(gw.stop().success());
}
