//! What a field engineer sees: `edgeferry status`, `/metrics`, health and readiness.

mod common;

use common::*;
use std::time::Duration;

#[test]
fn status_and_metrics_show_rejected_payloads_and_a_broker_outage() {
    let mut broker = Mosquitto::start();
    let mut gw = Gateway::new(&broker.url());
    gw.start();
    let p = Publisher::connect(broker.port, "pub-ops");
    p.publish("sensors/a/d1/temperature", reading_payload(1));
    p.publish("sensors/a/d1/temperature", "{\"value\": 21.5");
    p.wait_acked(2, Duration::from_secs(10));

    wait_for(
        "the rejected payload to be counted",
        Duration::from_secs(10),
        || {
            let (_, out, _) = gw.command(&["status"]);
            out.contains("1 rejected")
        },
    );
    let (st, out, err) = gw.command(&["status"]);
    assert!(st.success(), "healthy → exit 0; {out}{err}");
    assert!(out.contains("HEALTHY"), "{out}");
    assert!(out.contains("[malformed_json]"), "{out}");
    assert!(out.contains("sensors/a/d1/temperature"), "{out}");
    assert!(
        out.contains("{\\\"value\\\": 21.5"),
        "the payload is shown: {out}"
    );

    let addr = std::fs::read_to_string(gw.dir.path().join("data/admin.addr")).unwrap();
    let (code, metrics) =
        edgeferry::admin::http_get(&addr, "/metrics", Duration::from_secs(3)).unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("edgeferry_ingest_rejected_total{reason=\"malformed_json\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("edgeferry_ingest_readings_total"),
        "{metrics}"
    );
    let (code, _) = edgeferry::admin::http_get(&addr, "/readyz", Duration::from_secs(3)).unwrap();
    assert_eq!(code, 200);
    let (code, _) = edgeferry::admin::http_get(&addr, "/healthz", Duration::from_secs(3)).unwrap();
    assert_eq!(code, 200);

    broker.stop();
    wait_for(
        "status to report the outage",
        Duration::from_secs(10),
        || {
            let (st, _, _) = gw.command(&["status"]);
            st.code() == Some(3)
        },
    );
    let (_, out, _) = gw.command(&["status"]);
    assert!(out.contains("UNHEALTHY") && out.contains("DOWN"), "{out}");
    assert!(out.contains("PROBLEM  MQTT broker"), "{out}");
    assert!(gw.stop().success());

    let (st, _, err) = gw.command(&["status"]);
    assert_eq!(st.code(), Some(2), "daemon gone → exit 2");
    assert!(err.contains("cannot reach the daemon"), "{err}");
}

#[test]
fn processing_beyond_the_budget_is_counted_and_shown_in_status() {
    let broker = Mosquitto::start();
    // A budget no real pipeline meets: every record is "late", deterministically.
    let mut gw = Gateway::with_config(&broker.url(), "", "[process]\nbudget = \"1ms\"\n");
    gw.start();
    let p = Publisher::connect(broker.port, "pub-budget");
    for i in 0..50 {
        p.publish("sensors/a/d1/temperature", reading_payload(i));
    }
    p.wait_acked(50, Duration::from_secs(10));
    wait_for(
        "budget violations in status",
        Duration::from_secs(10),
        || {
            let (_, out, _) = gw.command(&["status", "--json"]);
            serde_json::from_str::<serde_json::Value>(&out)
                .map(|v| v["process"]["budget_violations"].as_u64().unwrap_or(0) > 0)
                .unwrap_or(false)
        },
    );
    let addr = std::fs::read_to_string(gw.dir.path().join("data/admin.addr")).unwrap();
    let (_, metrics) =
        edgeferry::admin::http_get(&addr, "/metrics", Duration::from_secs(3)).unwrap();
    assert!(
        metrics.contains("edgeferry_budget_violations_total"),
        "{metrics}"
    );
    assert!(
        metrics.contains("edgeferry_process_lag_seconds"),
        "{metrics}"
    );
    assert!(gw.stop().success());
    assert!(
        gw.logs().contains("beyond process.budget"),
        "a violation is logged (rate-limited): {}",
        gw.logs()
    );
}
