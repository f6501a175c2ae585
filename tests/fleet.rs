//! The collector's view of its fleet: a real gateway reports its health in the protocol
//! (version 3's Health frame: backlog and its age, software, uptime, local broker) and the
//! collector serves every gateway it knows on `/fleet`, with fleet-wide sums in Prometheus.
//! A gateway speaking only version 2 is still served, without health.

mod common;

use common::wsclient::*;
use common::*;
use edgeferry::protocol::{self, Frame, Hello};
use std::time::{Duration, Instant};

/// `GET path` on the collector's metrics listener, which must answer 200: the body.
fn get(c: &Collector, path: &str) -> String {
    let (code, body) = c.get(path).unwrap();
    assert_eq!(code, 200, "{path}: {body}");
    body
}

fn fleet(c: &Collector) -> serde_json::Value {
    serde_json::from_str(&get(c, "/fleet")).unwrap()
}

fn gateway_entry(c: &Collector, id: &str) -> Option<serde_json::Value> {
    fleet(c)["gateways"]
        .as_array()?
        .iter()
        .find(|g| g["gateway"] == id)
        .cloned()
}

fn metric(c: &Collector, line_start: &str) -> Option<f64> {
    get(c, "/metrics")
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn until<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_collector_lists_its_gateways_with_the_health_they_report() {
    let broker = Mosquitto::start();
    let mut collector = Collector::new(&["--metrics-listen", "127.0.0.1:0"]);
    let mut gw = Gateway::with_config(
        &broker.url(),
        "",
        &format!(
            "[process]\nwindows = [\"1s\"]\nallowed_lateness = \"200ms\"\n\
             checkpoint_interval = \"300ms\"\n\
             [upstream]\nurl = \"{}\"\nbatch_max = 2\nlinger = \"100ms\"\n\
             reconnect_max = \"500ms\"\n",
            collector.url()
        ),
    );
    gw.start();
    // The collector is not there yet: batches wait in the outbox.
    let p = Publisher::connect(broker.port, "pub-fleet");
    let mut i = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        p.publish(
            &format!("sensors/site0/dev{}/temperature", i % 4),
            live_payload(i),
        );
        i += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    until("batches in the outbox", 20, || {
        let s: serde_json::Value = serde_json::from_str(&gw.admin_get("/status")?).ok()?;
        (s["backlog"]["batches"].as_u64()? >= 3).then_some(())
    });

    collector.start();
    // The first Health right after Welcome carries the backlog as it was then.
    let entry = until("the gateway's health on /fleet", 20, || {
        gateway_entry(&collector, "gw-test").filter(|g| !g["health"].is_null())
    });
    eprintln!("fleet entry: {entry:#}");
    assert_eq!(entry["connected"], true);
    assert_eq!(
        entry["software"],
        format!("edgeferry/{}", env!("CARGO_PKG_VERSION"))
    );
    let h = &entry["health"];
    assert_eq!(h["broker_connected"], true);
    assert!(h["backlog_batches"].as_u64().unwrap() >= 3, "{h}");
    assert!(h["backlog_bytes"].as_u64().unwrap() > 0, "{h}");
    assert!(h["oldest_secs"].as_u64().unwrap() >= 1, "{h}");
    assert!(h["uptime_secs"].as_u64().unwrap() >= 3, "{h}");
    assert_eq!(
        h["software"],
        format!("edgeferry/{}", env!("CARGO_PKG_VERSION"))
    );
    // Acks are counted per gateway.
    until("acknowledged batches counted", 20, || {
        (gateway_entry(&collector, "gw-test")?["batches_acked"].as_u64()? >= 3).then_some(())
    });
    // Fleet-wide figures in Prometheus (refreshed every 5 s), no per-gateway labels.
    until("the fleet gauges", 15, || {
        (metric(
            &collector,
            "edgeferry_collect_fleet_gateways{state=\"connected\"}",
        )? == 1.0)
            .then_some(())
    });
    assert!(!get(&collector, "/metrics").contains("gw-test"));

    // A gateway speaking only protocol version 2 is served, and listed without health.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ws = rt.block_on(async {
        let mut ws = connect_plain(&format!("127.0.0.1:{}", collector.port)).await;
        send(
            &mut ws,
            &Frame::Hello(Hello {
                gateway: "gw-old".into(),
                epoch: 9,
                versions: vec![2],
                first_seq: 0,
                software: "edgeferry/0.0.9".into(),
            }),
        )
        .await
        .unwrap();
        let Some(Frame::Welcome(w)) = recv(&mut ws).await else {
            panic!("expected Welcome");
        };
        assert_eq!(w.version, 2);
        let mut enc = protocol::DictEncoder::new();
        send_batch(&mut ws, &mut enc, 1, &aggregate_batch(1, 2))
            .await
            .unwrap();
        assert_eq!(expect_ack(&mut ws).await, [1]);
        ws
    });
    let old = gateway_entry(&collector, "gw-old").unwrap();
    assert_eq!(old["connected"], true);
    assert!(old["health"].is_null());
    assert_eq!(old["epoch"], "0000000000000009");
    rt.block_on(async move { drop(ws) });

    // Gone gateways stay listed, not connected, with when they were last seen.
    assert!(gw.stop().success());
    let gone = until("the gateway listed as disconnected", 20, || {
        gateway_entry(&collector, "gw-test").filter(|g| g["connected"] == false)
    });
    assert!(gone["last_seen_ms"].as_i64().unwrap() > 0);
    until("gw-old disconnected", 20, || {
        (fleet(&collector)["connected"] == 0).then_some(())
    });
    assert_eq!(fleet(&collector)["disconnected"], 2);
}
