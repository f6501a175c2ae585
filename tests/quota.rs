//! The disk quota (`[store] max_disk`) with the upstream down: `drop_oldest` drops whole
//! aggregate segments (counted, never alerts first) and keeps the data dir within the bound;
//! `block` stops taking messages from the broker (which queues them) and loses nothing once
//! the upstream drains the outbox.

mod common;

use common::*;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Room for the checkpoint of 1000 series (about 350 KB, reserved twice for its rewrite), the
/// journal the checkpoint does not cover yet and the outbox.
const MAX_DISK: u64 = 2 * 1024 * 1024;
const SEGMENT: u64 = 64 * 1024;
/// Devices, each publishing one reading per second: one 1 s window per device per second.
const DEVICES: usize = 1000;

/// A gateway with a 2 MiB quota, 64 KiB segments, 1 s windows, one threshold rule and the
/// upstream pointing at `upstream` (a collector that may not be running).
fn quota_gateway(broker: &Mosquitto, upstream: &str, when_full: &str) -> Gateway {
    quota_gateway_of(broker, upstream, when_full, "2MiB")
}

fn quota_gateway_of(
    broker: &Mosquitto,
    upstream: &str,
    when_full: &str,
    max_disk: &str,
) -> Gateway {
    let gw = Gateway::with_config(
        &broker.url(),
        "",
        &format!(
            r#"
[process]
windows = ["1s"]
allowed_lateness = "200ms"
# Shorter than the block the block test holds: what the broker keeps meanwhile must still
# land in its own windows (the watermark follows the data, not the wall clock).
correction_horizon = "2s"
checkpoint_interval = "500ms"

[[rules]]
name = "overheat"
metric = "temperature"
above = 80.0
clear_below = 75.0
publish = "alerts/{{site}}/{{device}}/{{rule}}"

[upstream]
url = "{upstream}"
linger = "200ms"
"#
        ),
    );
    // The harness config already has a [store] table (TOML forbids a second one): rewrite it.
    let text = std::fs::read_to_string(&gw.config).unwrap();
    let needle = "segment_size = \"256MiB\"";
    assert!(text.contains(needle), "gateway_config changed: {text}");
    let text = text.replace(
        needle,
        &format!(
            "max_disk = \"{max_disk}\"\nwhen_full = \"{when_full}\"\nsegment_size = \"64KiB\""
        ),
    );
    std::fs::write(&gw.config, text).unwrap();
    gw
}

fn admin_addr(gw: &Gateway) -> String {
    std::fs::read_to_string(gw.dir.path().join("data/admin.addr"))
        .unwrap()
        .trim()
        .to_string()
}

fn status(gw: &Gateway) -> serde_json::Value {
    let (code, body) =
        edgeferry::admin::http_get(&admin_addr(gw), "/status", Duration::from_secs(3)).unwrap();
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn metrics(gw: &Gateway) -> String {
    let (code, body) =
        edgeferry::admin::http_get(&admin_addr(gw), "/metrics", Duration::from_secs(3)).unwrap();
    assert_eq!(code, 200, "{body}");
    body
}

/// Value of an unlabelled counter in Prometheus text (0 when absent).
fn counter(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == name).then(|| v.trim().parse::<f64>().unwrap())
        })
        .unwrap_or(0.0)
}

/// Bytes of every file under `p` (recursively).
fn dir_bytes(p: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else {
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

/// What the quota covers: every file in the data directory (journal, outbox, the checkpoint
/// and, while it is rewritten, its temporary successor; issue 14).
fn store_bytes(gw: &Gateway) -> u64 {
    dir_bytes(&gw.dir.path().join("data"))
}

/// Publishes one reading per device per second (QoS 1, stamped now) until `stop` is set or
/// `max_secs` passed; device d0 reports 90° (raises the rule once and stays raised), the
/// others 20°. Returns the number published, after waiting for every PUBACK.
fn publish_load(
    port: u16,
    stop: Arc<AtomicBool>,
    published: Arc<AtomicUsize>,
    max_secs: u64,
) -> std::thread::JoinHandle<usize> {
    publish_load_of(port, stop, published, max_secs, DEVICES)
}

/// [`publish_load`] with `devices` sensors.
fn publish_load_of(
    port: u16,
    stop: Arc<AtomicBool>,
    published: Arc<AtomicUsize>,
    max_secs: u64,
    devices: usize,
) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let p = Publisher::connect(port, "pub-quota");
        let start = Instant::now();
        let mut n = 0;
        for sec in 0..max_secs {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            for d in 0..devices {
                let value = if d == 0 { 90 } else { 20 };
                p.publish(
                    &format!("sensors/s/d{d}/temperature"),
                    format!(r#"{{"value":{value},"ts":{}}}"#, now_ms()),
                );
                n += 1;
                published.store(n, Ordering::SeqCst);
            }
            let next = Duration::from_secs(sec + 1);
            if let Some(rest) = next.checked_sub(start.elapsed()) {
                std::thread::sleep(rest);
            }
        }
        p.wait_acked(n, Duration::from_secs(60));
        n
    })
}

/// Waits until the gateway's windows_emitted has not moved for `quiet`.
fn wait_windows_settled(gw: &Gateway, quiet: Duration, timeout: Duration) -> u64 {
    let start = Instant::now();
    let mut last = (u64::MAX, Instant::now());
    loop {
        let w = status(gw)["process"]["windows_emitted"].as_u64().unwrap();
        if w != last.0 {
            last = (w, Instant::now());
        } else if last.1.elapsed() >= quiet {
            return w;
        }
        assert!(
            start.elapsed() < timeout,
            "windows still being emitted after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until ingest is no longer blocked, reporting the store's make-up otherwise.
fn wait_unblocked(gw: &Gateway, timeout: Duration) {
    let start = Instant::now();
    loop {
        let s = status(gw);
        if s["process"]["blocked"].as_bool() == Some(false) {
            return;
        }
        if start.elapsed() > timeout {
            let data = gw.dir.path().join("data");
            panic!(
                "still blocked after {timeout:?}: journal {} B, outbox {} B (max_disk {MAX_DISK} B)\n\
                 status: {s:#}\nlog:\n{}",
                dir_bytes(&data.join("journal")),
                dir_bytes(&data.join("outbox")),
                gw.current_log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn drop_oldest_at_the_disk_quota_drops_aggregates_counts_them_and_keeps_alerts() {
    let broker = Mosquitto::start();
    let mut collector = Collector::new(&[]); // upstream down until the end
    let mut gw = quota_gateway(&broker, &collector.url(), "drop_oldest");
    gw.start();

    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicUsize::new(0));
    let load = publish_load(broker.port, stop.clone(), published.clone(), 18);
    // Sample what the whole data directory occupies while the outbox overflows.
    let mut peak = 0;
    let mut samples = 0;
    while !load.is_finished() {
        peak = peak.max(store_bytes(&gw));
        samples += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    let n = load.join().unwrap();
    assert_eq!(n, 18 * DEVICES);
    let emitted = wait_windows_settled(&gw, Duration::from_secs(2), Duration::from_secs(20));
    // Let one more quota tick (250 ms) and checkpoint pass after the last batch.
    std::thread::sleep(Duration::from_millis(1500));
    let settled = store_bytes(&gw);
    let journal = dir_bytes(&gw.dir.path().join("data/journal"));

    let st = status(&gw);
    let dropped = st["process"]["dropped_items"].as_u64().unwrap();
    let m = metrics(&gw);
    let dropped_metric = counter(&m, "edgeferry_outbox_dropped_items_total");
    let problem = format!(
        "status: {st:#}\nsamples {samples}, peak {peak} B, settled {settled} B (journal {journal} B)\nlog:\n{}",
        gw.current_log()
    );
    assert_eq!(
        st["ingest"]["readings"].as_u64().unwrap(),
        n as u64,
        "{problem}"
    );
    assert!(dropped > 0, "nothing dropped: {problem}");
    assert_eq!(dropped_metric, dropped as f64, "{problem}");
    assert!(counter(&m, "edgeferry_outbox_dropped_batches_total") > 0.0);
    assert!(
        gw.current_log()
            .contains("store.max_disk (2.0 MiB) reached")
            || gw
                .current_log()
                .contains("reached: dropped the oldest unsent batches"),
        "{problem}"
    );
    assert_eq!(st["process"]["alerts"].as_u64(), Some(1), "{problem}");
    // The quota is enforced every 250 ms by dropping whole closed segments; the active segment
    // of each outbox lane and of the journal cannot be dropped. After enforcement the store is
    // within the bound; at any instant it can exceed it by what was appended since the last
    // enforcement (one second's 1000 windows arrive at once) plus a partly filled segment.
    assert!(
        settled <= MAX_DISK + SEGMENT,
        "settled store {settled} B > max_disk + one segment: {problem}"
    );
    assert!(
        peak <= MAX_DISK + 4 * SEGMENT,
        "peak store {peak} B far beyond max_disk: {problem}"
    );

    // The upstream comes back: the alert and every aggregate that was not dropped arrive.
    collector.start();
    wait_for("the outbox to drain", Duration::from_secs(30), || {
        let s = status(&gw);
        s["backlog"]["batches"].as_u64() == Some(0)
            && s["upstream"]["connected"].as_bool() == Some(true)
    });
    let lines = collector.lines();
    let alerts: Vec<_> = lines.iter().filter(|l| l["kind"] == "alert").collect();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0]["rule"], "overheat");
    assert_eq!(alerts[0]["state"], "raised");
    assert!(alerts[0]["series"].as_str().unwrap().contains("d0"));
    let mut arrived = std::collections::BTreeSet::new();
    for l in lines.iter().filter(|l| l["kind"] == "aggregate") {
        arrived.insert((
            l["series"].as_str().unwrap().to_string(),
            l["window_start"].as_str().unwrap().to_string(),
            l["window_secs"].as_u64().unwrap(),
            l["version"].as_u64().unwrap(),
        ));
    }
    let st = status(&gw);
    assert_eq!(st["process"]["dropped_items"].as_u64(), Some(dropped));
    assert_eq!(
        st["process"]["windows_emitted"].as_u64(),
        Some(emitted),
        "no window emitted after settling"
    );
    // Every emitted window (each version counts) went into exactly one outbox batch; each batch
    // was either dropped (counted by item) or delivered. Nothing crashed, so nothing was
    // re-emitted: the books balance exactly.
    assert_eq!(
        arrived.len() as u64 + dropped,
        emitted,
        "arrived {} + dropped {dropped} != emitted {emitted}",
        arrived.len()
    );
    assert!(gw.stop().success());
}

#[test]
fn block_at_the_disk_quota_stops_acknowledging_and_loses_nothing() {
    let broker = Mosquitto::start();
    let mut collector = Collector::new(&[]);
    let mut gw = quota_gateway(&broker, &collector.url(), "block");
    gw.start();

    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicUsize::new(0));
    let load = publish_load(broker.port, stop.clone(), published.clone(), 16);
    wait_for("ingest to block", Duration::from_secs(25), || {
        status(&gw)["process"]["blocked"].as_bool() == Some(true)
    });
    let (st, out, err) = gw.command(&["status"]);
    assert_eq!(st.code(), Some(3), "{out}{err}");
    assert!(
        out.contains("PROBLEM  disk quota reached (store.max_disk)"),
        "{out}"
    );
    // While blocked, ingest takes nothing more: the broker keeps acknowledging the publisher
    // and queues for the gateway.
    let readings_blocked = status(&gw)["ingest"]["readings"].as_u64().unwrap();
    let published_blocked = published.load(Ordering::SeqCst);
    // Held for three times lateness + correction_horizon: by the wall clock, everything the
    // broker queues meanwhile would be too late.
    let held = Instant::now();
    std::thread::sleep(Duration::from_millis(3 * 2200));
    let s = status(&gw);
    assert_eq!(s["process"]["blocked"].as_bool(), Some(true), "{s:#}");
    assert!(
        s["ingest"]["readings"].as_u64().unwrap() <= readings_blocked + 1000,
        "ingest kept going while blocked (from {readings_blocked} readings): {s:#}\n{}",
        gw.logs()
    );
    assert!(published.load(Ordering::SeqCst) >= published_blocked + 1000);
    // The journal is trimmed while blocked, and its gauge (which the quota reads) follows.
    let on_disk = dir_bytes(&gw.dir.path().join("data/journal"));
    let gauge = gw.metric("edgeferry_journal_bytes").unwrap() as u64;
    eprintln!("while blocked: journal {on_disk} bytes on disk, edgeferry_journal_bytes {gauge}");
    assert!(
        on_disk.abs_diff(gauge) <= 4096,
        "{on_disk} on disk, gauge {gauge}"
    );

    // The upstream comes back: the outbox drains, ingest resumes and catches up. The load
    // goes on (16,000 readings in all, well over 1 MiB of journal records): a gateway with a
    // 1 MiB quota must keep working through more traffic than the quota holds.
    collector.start();
    wait_unblocked(&gw, Duration::from_secs(30));
    let held = held.elapsed();
    let n = load.join().unwrap() as u64;
    // Everything the broker queued is taken, processed and forwarded.
    let start = Instant::now();
    let mut counts;
    loop {
        counts = central_counts(&collector.lines());
        if counts.get(&1).copied().unwrap_or(0) >= n {
            break;
        }
        if start.elapsed() > Duration::from_secs(40) {
            let s = status(&gw);
            let data = gw.dir.path().join("data");
            panic!(
                "{counts:?} of {n} readings arrived after 40 s; blocked {}, {} readings \
                 journaled; journal {} B, outbox {} B (max_disk {MAX_DISK} B)\nstatus: {s:#}",
                s["process"]["blocked"],
                s["ingest"]["readings"],
                dir_bytes(&data.join("journal")),
                dir_bytes(&data.join("outbox")),
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    // A little longer: nothing more may arrive (no double counting).
    std::thread::sleep(Duration::from_secs(2));
    let counts_after = central_counts(&collector.lines());
    let s = status(&gw);
    let problem = format!("status: {s:#}\nlog:\n{}", gw.current_log());
    let too_late = gw.metric("edgeferry_process_too_late_total").unwrap_or(0.0);
    eprintln!(
        "fault: quota block held {:.1} s (lateness 0.2 s, horizon 2 s); published {n}, counted \
         {:?}, too late {too_late}",
        held.as_secs_f64(),
        counts.get(&1)
    );
    assert_eq!(
        too_late, 0.0,
        "nothing is late relative to the data: {problem}"
    );
    assert_eq!(s["ingest"]["readings"].as_u64(), Some(n), "{problem}");
    assert_eq!(s["process"]["dropped_items"].as_u64(), Some(0), "{problem}");
    assert_eq!(counts.get(&1).copied(), Some(n), "{counts:?} {problem}");
    assert_eq!(counts_after, counts, "{problem}");
    assert!(gw.stop().success());
}

#[test]
fn a_checkpoint_taking_over_a_third_of_max_disk_is_reported_with_what_to_change() {
    let broker = Mosquitto::start();
    let collector = Collector::new(&[]);
    let mut gw = quota_gateway_of(&broker, &collector.url(), "drop_oldest", "1MiB");
    // Checkpoints are compressed (about a fifth): 1,000 series with a 2 s correction horizon
    // no longer fill a third of 1 MiB; 4,000 with one of 30 s do within seconds.
    let text = std::fs::read_to_string(&gw.config).unwrap();
    let needle = "correction_horizon = \"2s\"";
    assert!(text.contains(needle), "quota_gateway_of changed: {text}");
    std::fs::write(
        &gw.config,
        text.replace(needle, "correction_horizon = \"30s\""),
    )
    .unwrap();
    gw.start();
    let stop = Arc::new(AtomicBool::new(false));
    let load = publish_load_of(
        broker.port,
        stop.clone(),
        Arc::new(AtomicUsize::new(0)),
        20,
        4000,
    );
    wait_for(
        "the warning about the checkpoint's share",
        Duration::from_secs(30),
        || {
            gw.current_log().contains(
                "takes more than a third of store.max_disk (1.0 MiB): raise store.max_disk or \
                 lower process.max_series",
            )
        },
    );
    stop.store(true, Ordering::SeqCst);
    load.join().unwrap();
    assert_eq!(
        gw.current_log().matches("takes more than a third").count(),
        1,
        "said once"
    );
    assert!(gw.stop().success());
}
