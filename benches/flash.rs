//! Flash-wear benchmark (issue 11): bytes the gateway makes the disk write for what its
//! sensors send, in the example config's shape (windows 10 s and 1 min, lateness 5 s, the
//! `overheat` rule, an upstream collector connected) with its commit and checkpoint defaults.
//!
//! `cargo bench --bench flash` runs three fleets of sensors publishing a 52-byte JSON reading
//! once a second each, spread evenly as from independent sensors, through a real Mosquitto:
//! 1,000 and 10,000 sensors, and a small gateway of 100, each for `EDGEFERRY_FLASH_SECS`
//! (default 60) s. For each it prints bytes written (the daemon's `write_bytes` in
//! `/proc/PID/io`) per reading and per payload byte, syncs per second, checkpoint bytes per
//! second, the projected GB per day, and publish → local alert p99 (one sensor's readings
//! cross the rule every 10 s). `EDGEFERRY_FLASH_MQTT` adds keys to `[mqtt]` (e.g.
//! `commit_interval = "5ms"` for the old default) and `EDGEFERRY_FLASH_PROCESS` to
//! `[process]` and `EDGEFERRY_FLASH_STORE` to a `[store]` table (e.g. `max_disk = "12MiB"`,
//! which leaves no room for checkpoint deltas); `EDGEFERRY_FLASH_FLEETS=10000,100` picks the fleets, `EDGEFERRY_FLASH_HOT=0`
//! turns the hot sensor off, `EDGEFERRY_FLASH_VERBOSE=1` prints processing p99s. Without `--bench` (as `cargo test --all-targets` runs it) it is a smoke run of
//! 3 s that checks every reading arrived, never how fast.

#[path = "../tests/common/mod.rs"]
mod common;

use common::flash::{example_shaped, proc_write_bytes, publish_evenly};
use common::{Collector, Gateway, Mosquitto, Publisher, now_ms, wait_for};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Outcome {
    readings: usize,
    payload: usize,
    written: u64,
    secs: f64,
    syncs: f64,
    checkpoint: f64,
    alerts: Vec<i64>,
    hwm_kib: u64,
    checkpoint_size: f64,
    checkpoints: f64,
    commit_p99: Option<f64>,
    /// After a SIGKILL at the end of the run: seconds from restart to ready, and the journal
    /// records replayed.
    restart_secs: f64,
    replayed: u64,
}

fn vm_hwm_kib(pid: u32) -> u64 {
    common::proc_status_kib(pid, "VmHWM:").unwrap()
}

/// Subscribes to the local alerts and records arrival − the triggering reading's time (ms).
fn watch_alerts(port: u16, into: Arc<Mutex<Vec<i64>>>, stop: Arc<std::sync::atomic::AtomicBool>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let o = MqttOptions::new("flash-alert-watch", "127.0.0.1", port);
        let (client, mut el) = AsyncClient::new(o, 100);
        client.subscribe("alerts/#", QoS::AtMostOnce).await.unwrap();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            match tokio::time::timeout(Duration::from_millis(200), el.poll()).await {
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    let now = now_ms() as i64;
                    let v: serde_json::Value = match serde_json::from_slice(&p.payload) {
                        Ok(v) => v,
                        Err(_) => continue,
                    };
                    if let Some(t) = v["time"].as_str().and_then(|t| {
                        time::OffsetDateTime::parse(
                            t,
                            &time::format_description::well_known::Rfc3339,
                        )
                        .ok()
                    }) {
                        into.lock()
                            .unwrap()
                            .push(now - (t.unix_timestamp_nanos() / 1_000_000) as i64);
                    }
                }
                Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
                _ => {}
            }
        }
    });
}

fn run(sensors: usize, secs: u64) -> Outcome {
    // Mosquitto as README tells operators to configure it; `EDGEFERRY_FLASH_BROKER` replaces
    // the extra lines (`EDGEFERRY_FLASH_BROKER=` for Mosquitto's stock inflight window of 20).
    let broker = Mosquitto::start_with(
        &std::env::var("EDGEFERRY_FLASH_BROKER").unwrap_or_else(|_| common::README_BROKER.into()),
    );
    let mut collector = Collector::new(&[]);
    collector.start();
    let mut gw = Gateway::new(&broker.url());
    let mut cfg = example_shaped(&gw, "gw-flash", &broker.url(), &collector.url());
    if let Ok(extra) = std::env::var("EDGEFERRY_FLASH_MQTT") {
        cfg = cfg.replacen("[mqtt]\n", &format!("[mqtt]\n{extra}\n"), 1);
    }
    if let Ok(extra) = std::env::var("EDGEFERRY_FLASH_PROCESS") {
        cfg = cfg.replacen("[process]\n", &format!("[process]\n{extra}\n"), 1);
    }
    if let Ok(extra) = std::env::var("EDGEFERRY_FLASH_STORE") {
        cfg.push_str(&format!("\n[store]\n{extra}\n"));
    }
    std::fs::write(&gw.config, cfg).unwrap();
    gw.start();
    wait_for("the upstream link", Duration::from_secs(30), || {
        gw.metric("edgeferry_upstream_connected") == Some(1.0)
    });
    let pid = gw.pid().unwrap();
    let alerts = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (a, s, port) = (alerts.clone(), stop.clone(), broker.port);
        std::thread::spawn(move || watch_alerts(port, a, s))
    };
    std::thread::sleep(Duration::from_millis(500));
    let publisher = Publisher::connect(broker.port, "flash-sensors");
    let syncs0 = gw.metric("edgeferry_disk_syncs_total").unwrap_or(0.0);
    let ckpt0 = gw
        .metric("edgeferry_checkpoint_written_bytes_total")
        .unwrap_or(0.0);
    let ckpts0 = gw
        .metric("edgeferry_checkpoint_seconds_count")
        .unwrap_or(0.0);
    let w0 = proc_write_bytes(pid);
    let t0 = Instant::now();
    // Sensor 0 runs hot for 10 s and cool for 10 s by turns: its first reading of each turn
    // raises or clears `overheat` (an alert every 10 s, each one upstream within 5 s).
    let hot = std::env::var("EDGEFERRY_FLASH_HOT").map_or(true, |v| v != "0");
    let (readings, payload) = publish_evenly(&publisher, sensors, 1, secs, |n| {
        (hot && n % sensors as u64 == 0).then(|| {
            if (n / sensors as u64 / 10).is_multiple_of(2) {
                90.0
            } else {
                70.0
            }
        })
    });
    publisher.wait_acked(readings, Duration::from_secs(120));
    wait_for("every reading journaled", Duration::from_secs(60), || {
        gw.metric("edgeferry_ingest_readings_total") == Some(readings as f64)
    });
    let elapsed = t0.elapsed().as_secs_f64();
    let written = proc_write_bytes(pid) - w0;
    let syncs = gw.metric("edgeferry_disk_syncs_total").unwrap_or(0.0) - syncs0;
    let checkpoint = gw
        .metric("edgeferry_checkpoint_written_bytes_total")
        .unwrap_or(0.0)
        - ckpt0;
    let hwm_kib = vm_hwm_kib(pid);
    let checkpoint_size = gw.metric("edgeferry_checkpoint_bytes").unwrap_or(0.0);
    let checkpoints = gw
        .metric("edgeferry_checkpoint_seconds_count")
        .unwrap_or(0.0)
        - ckpts0;
    let text = gw.admin_get("/metrics").unwrap_or_default();
    let quantile = |name: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{quantile=\"0.99\"}}")))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    };
    let commit_p99 = quantile("edgeferry_ingest_commit_seconds");
    if std::env::var("EDGEFERRY_FLASH_VERBOSE").is_ok() {
        for name in [
            "edgeferry_process_lag_seconds",
            "edgeferry_process_seconds",
            "edgeferry_checkpoint_seconds",
            "edgeferry_alert_latency_seconds",
        ] {
            eprintln!("{sensors} sensors: {name} p99 {:?}", quantile(name));
        }
        for l in text.lines().filter(|l| {
            l.starts_with("edgeferry_checkpoints_total")
                || l.starts_with("edgeferry_ingest_commit_groups_total")
                || l.starts_with("edgeferry_disk_padding_bytes_total")
                || l.starts_with("edgeferry_disk_syncs_total")
        }) {
            eprintln!("{sensors} sensors: {l}");
        }
        let state = gw.dir.path().join("data").join("state");
        for e in std::fs::read_dir(state).into_iter().flatten().flatten() {
            let len = e.metadata().map(|m| m.len()).unwrap_or(0);
            eprintln!(
                "{sensors} sensors: {} {len} B",
                e.file_name().to_string_lossy()
            );
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = watcher.join();
    // A crash now (the journal since the newest checkpoint to replay), then the time until
    // the daemon is ready again.
    gw.kill9();
    let restarted = Instant::now();
    gw.start();
    let restart_secs = restarted.elapsed().as_secs_f64();
    let replayed = gw
        .current_log()
        .split("replayed=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let _ = gw.stop();
    let mut alerts = alerts.lock().unwrap().clone();
    alerts.sort_unstable();
    Outcome {
        readings,
        payload,
        written,
        secs: elapsed,
        syncs,
        checkpoint,
        alerts,
        hwm_kib,
        checkpoint_size,
        checkpoints,
        commit_p99,
        restart_secs,
        replayed,
    }
}

fn p99(v: &[i64]) -> Option<i64> {
    (!v.is_empty()).then(|| v[((v.len() - 1) as f64 * 0.99).round() as usize])
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let secs: u64 = if full {
        std::env::var("EDGEFERRY_FLASH_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60)
    } else {
        3
    };
    let fleets: Vec<usize> = match std::env::var("EDGEFERRY_FLASH_FLEETS") {
        Ok(list) => list
            .split(',')
            .map(|n| {
                n.trim()
                    .parse()
                    .expect("EDGEFERRY_FLASH_FLEETS: sensor counts, e.g. 1000,100")
            })
            .collect(),
        Err(_) if full => vec![1_000, 10_000, 100],
        Err(_) => vec![100],
    };
    println!(
        "| sensors × 1 Hz | readings | bytes written / reading | / payload byte | GB/day | syncs/s | checkpoints (size) | checkpoint bytes/s | commit p99 | alert p99 (alerts) | VmHWM | kill → ready (replayed) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for sensors in fleets {
        let o = run(sensors, secs);
        let per_reading = o.written as f64 / o.readings as f64;
        let per_payload = o.written as f64 / o.payload as f64;
        println!(
            "| {sensors} | {} | {per_reading:.0} | **{per_payload:.2}** | {:.2} | {:.0} | {} ({:.2} MB) | {:.0} | {} | {} ({}) | {:.1} MiB | {:.2} s ({}) |",
            o.readings,
            o.written as f64 / o.secs * 86_400.0 / 1e9,
            o.syncs / o.secs,
            o.checkpoints,
            o.checkpoint_size / 1e6,
            o.checkpoint / o.secs,
            o.commit_p99
                .map_or("-".into(), |v| format!("{:.1} ms", v * 1e3)),
            p99(&o.alerts).map_or("-".into(), |v| format!("{v} ms")),
            o.alerts.len(),
            o.hwm_kib as f64 / 1024.0,
            o.restart_secs,
            o.replayed,
        );
        if !full {
            assert!(
                o.readings > 0 && o.written > 0,
                "smoke run measured nothing"
            );
        }
    }
}
