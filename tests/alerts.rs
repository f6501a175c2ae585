//! Local alerts end to end: rules evaluated on the ingest path, published on the local broker
//! (received here by a separate subscriber), and forwarded upstream ahead of aggregates.

mod common;

use common::*;
use std::time::{Duration, Instant};

const RULES: &str = r#"
[[rules]]
name = "overheat"
metric = "temperature"
above = 80.0
clear_below = 75.0
publish = "alerts/{site}/{device}/{rule}"
"#;

#[test]
fn a_value_over_the_limit_raises_exactly_one_alert_and_hysteresis_clears_it_once() {
    let broker = Mosquitto::start();
    let mut gw = Gateway::with_config(&broker.url(), "", RULES);
    gw.start();
    let alerts = subscriber(broker.port, "alerts/#", "alert-watcher");
    let p = Publisher::connect(broker.port, "pub-alerts");
    // Hovering around the limit must not produce a storm of alerts.
    let values = [
        70.0, 79.0, 81.0, 80.5, 79.9, 80.2, 81.5, 76.0, 80.1, 74.0, 74.5, 76.0,
    ];
    for v in values {
        p.publish(
            "sensors/plant/boiler/temperature",
            format!(r#"{{"value":{v},"ts":{}}}"#, now_ms()),
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    p.wait_acked(values.len(), Duration::from_secs(10));
    wait_for("two alert messages", Duration::from_secs(10), || {
        alerts.lock().unwrap().len() >= 2
    });
    std::thread::sleep(Duration::from_millis(500));
    let got = alerts.lock().unwrap().clone();
    assert_eq!(got.len(), 2, "exactly one raise and one clear: {got:?}");
    assert_eq!(got[0].0, "alerts/plant/boiler/overheat");
    assert_eq!(got[0].1["state"], "raised");
    assert_eq!(got[0].1["value"], 81.0);
    assert_eq!(got[0].1["rule"], "overheat");
    assert_eq!(got[0].1["series"], "temperature{device=boiler,site=plant}");
    assert_eq!(got[1].1["state"], "cleared");
    assert_eq!(got[1].1["value"], 74.0);
    let (_, out, _) = gw.command(&["status"]);
    assert!(out.contains("0 alerts active (2 events)"), "{out}");
    assert!(gw.stop().success());
}

#[test]
fn alerts_reach_the_central_side_ahead_of_the_aggregate_backlog() {
    let broker = Mosquitto::start();
    let mut collector = Collector::new(&[]);
    let mut gw = Gateway::with_config(
        &broker.url(),
        "",
        &format!(
            "{RULES}\n[process]\nwindows = [\"1s\"]\nallowed_lateness = \"200ms\"\ncheckpoint_interval = \"500ms\"\n\
             [upstream]\nurl = \"{}\"\nbatch_max = 1\nlinger = \"100ms\"\n",
            collector.url()
        ),
    );
    gw.start();
    let p = Publisher::connect(broker.port, "pub-alert-up");
    // A backlog of aggregates while the upstream is down (200 series, 3 s) ...
    for i in 0..1200 {
        p.publish(
            &format!("sensors/s/dev{}/temperature", i % 200),
            live_payload(20),
        );
        if i % 100 == 99 {
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    // ... then an alert.
    p.publish(
        "sensors/plant/boiler/temperature",
        format!(r#"{{"value":95,"ts":{}}}"#, now_ms()),
    );
    p.wait_acked(1201, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(1500));
    collector.start();
    let start = Instant::now();
    wait_for(
        "the alert at the collector",
        Duration::from_secs(30),
        || collector.lines().iter().any(|l| l["kind"] == "alert"),
    );
    let lines = collector.lines();
    let alert_at = lines.iter().position(|l| l["kind"] == "alert").unwrap();
    let aggregates_before = lines[..alert_at]
        .iter()
        .filter(|l| l["kind"] == "aggregate")
        .count();
    let aggregates_total = lines.iter().filter(|l| l["kind"] == "aggregate").count();
    eprintln!(
        "alert arrived after {:?}, behind {aggregates_before} of {aggregates_total} aggregates so far",
        start.elapsed()
    );
    assert!(
        aggregates_before < 100,
        "the alert jumps the aggregate backlog ({aggregates_before} aggregates were stored before it)"
    );
    let a = &lines[alert_at];
    assert_eq!(a["rule"], "overheat");
    assert_eq!(a["state"], "raised");
    assert_eq!(a["value"], 95.0);
    assert_eq!(a["gateway"], "gw-test");
    assert!(gw.stop().success());
}

/// `/status` counts the alerts that are raised right now: one after it was raised, still one
/// while ordinary readings of other series arrive, still one after a restart (the alert state
/// is in the checkpoint), none once it cleared.
#[test]
fn the_active_alert_count_follows_raises_and_clears_and_survives_a_restart() {
    let broker = Mosquitto::start();
    let mut gw = Gateway::with_config(
        &broker.url(),
        "",
        &format!("{RULES}\n[process]\ncheckpoint_interval = \"500ms\"\n"),
    );
    gw.start();
    let active = |gw: &Gateway| -> Option<u64> {
        let s: serde_json::Value = serde_json::from_str(&gw.admin_get("/status")?).ok()?;
        s["process"]["alerts_active"].as_u64()
    };
    let p = Publisher::connect(broker.port, "pub-alert-count");
    let hot = |v: u32| format!(r#"{{"value":{v},"ts":{}}}"#, now_ms());
    p.publish("sensors/plant/boiler/temperature", hot(95));
    wait_for("one active alert", Duration::from_secs(10), || {
        active(&gw) == Some(1)
    });
    for i in 0..50 {
        p.publish(&format!("sensors/s/dev{i}/temperature"), live_payload(20));
    }
    p.wait_acked(51, Duration::from_secs(10));
    wait_for("every reading processed", Duration::from_secs(10), || {
        gw.metric("edgeferry_ingest_readings_total") == Some(51.0)
    });
    assert_eq!(active(&gw), Some(1), "ordinary readings leave it raised");
    std::thread::sleep(Duration::from_secs(1)); // a checkpoint holds the alert state
    assert!(gw.stop().success());
    gw.start();
    wait_for("the count after a restart", Duration::from_secs(10), || {
        active(&gw).is_some()
    });
    assert_eq!(
        active(&gw),
        Some(1),
        "the raised alert survives the restart"
    );
    p.publish("sensors/plant/boiler/temperature", hot(70));
    wait_for(
        "no active alert once it cleared",
        Duration::from_secs(10),
        || active(&gw) == Some(0),
    );
    assert!(gw.stop().success());
}
