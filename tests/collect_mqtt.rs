//! `edgeferry collect --mqtt`: collectors that subscribe to a real "cloud" Mosquitto over
//! mutual TLS with a shared subscription, receive the batches a real gateway publishes there
//! (`[upstream] url = "mqtts://…"`), and store them in a shared NATS JetStream engine. They
//! are SIGKILLed mid-stream again and again; every reading still reaches the stream exactly
//! once, and junk on the topic is counted and harms nothing.

mod common;

use common::cloud::Cloud;
use common::nats::{NatsServer, wait_for_readings};
use common::*;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const SERIES: usize = 40;

/// A collector with no WebSocket gateways, subscribed to the cloud with a client certificate
/// of its own, storing into `nats`.
fn mqtt_collector(cloud: &Cloud, nats: &NatsServer, name: &str) -> Collector {
    let (cert, key) = cloud.client_files(name);
    let args = [
        "--sink".to_string(),
        nats.sink(),
        "--mqtt".to_string(),
        format!("mqtts://localhost:{}", cloud.tls_port),
        "--topic".to_string(),
        "$share/collectors/edgeferry/+/batches".to_string(),
        "--mqtt-ca".to_string(),
        cloud.trust_file().display().to_string(),
        "--mqtt-cert".to_string(),
        cert.display().to_string(),
        "--mqtt-key".to_string(),
        key.display().to_string(),
        "--metrics-listen".to_string(),
        "127.0.0.1:0".to_string(),
    ];
    Collector::new(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn subscribed(c: &Collector) -> usize {
    c.log().matches("subscribed with QoS 1").count()
}

/// Starts `c` and waits until its subscription is acknowledged by the broker.
fn start_subscribed(c: &mut Collector) {
    let before = subscribed(c);
    c.start();
    wait_for(
        "the collector's subscription",
        Duration::from_secs(20),
        || subscribed(c) > before,
    );
    wait_for("healthz 200", Duration::from_secs(10), || {
        c.get("/healthz").is_some_and(|(code, _)| code == 200)
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collectors_sharing_an_mqtt_subscription_store_every_reading_once_across_sigkills() {
    let local = Mosquitto::start();
    let cloud = Cloud::start();
    let mut nats = NatsServer::start();
    let mut collectors = [
        mqtt_collector(&cloud, &nats, "collector-a"),
        mqtt_collector(&cloud, &nats, "collector-b"),
    ];
    for c in &mut collectors {
        start_subscribed(c);
    }
    let mut gw = Gateway::with_config(
        &local.url(),
        "",
        &format!(
            "[process]\nwindows = [\"1s\", \"2s\"]\nallowed_lateness = \"500ms\"\n\
             checkpoint_interval = \"500ms\"\n{}batch_max = 3\n",
            cloud.upstream_section()
        ),
    );
    gw.start();

    let stop = Arc::new(AtomicBool::new(false));
    let publisher = publish_until_stopped(local.port, "pub-collect-mqtt", SERIES, stop.clone());

    // Junk on a topic the collectors subscribe to: counted, acknowledged, nothing else.
    let cloud_port = cloud.broker.port;
    std::thread::spawn(move || {
        let junk = Publisher::connect(cloud_port, "junk");
        junk.publish(
            "edgeferry/intruder/batches",
            b"{\"not\": \"a batch\"}".to_vec(),
        );
        junk.publish("edgeferry/intruder/batches", vec![b'E', b'F', 2, 4, 0xff]);
        junk.wait_acked(2, Duration::from_secs(10));
    })
    .join()
    .unwrap();

    // SIGKILL each collector in turn, mid-stream, and bring it back a moment later: what it
    // received and had not acknowledged stays in its session and comes back to it. The
    // engine is killed first, so each collector dies holding messages it received and could
    // not store (acknowledging any of them early would lose them), and the other one fails
    // to store some and must get them again.
    for round in 0..4 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        nats.kill9();
        tokio::time::sleep(Duration::from_millis(600)).await;
        let c = &mut collectors[round % 2];
        c.kill9();
        nats.start_again();
        tokio::time::sleep(Duration::from_millis(300)).await;
        start_subscribed(c);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    let n = tokio::task::spawn_blocking(move || publisher.join().unwrap())
        .await
        .unwrap() as u64;

    let (lines, ids) = wait_for_readings(&nats, n).await;
    let counts = central_counts(&lines);
    let per_collector: Vec<f64> = collectors
        .iter()
        .map(|c| c.metric("edgeferry_collect_mqtt_messages_total"))
        .collect();
    eprintln!(
        "collect --mqtt: {n} readings, windows per length {counts:?}, {} batch ids, messages \
         per collector since their last start {per_collector:?}",
        ids.len()
    );
    assert_eq!(
        counts,
        BTreeMap::from([(1, n), (2, n)]),
        "every reading in every window length, once; gateway log:\n{}\ncollector logs:\n{}\n{}",
        gw.logs(),
        collectors[0].log(),
        collectors[1].log()
    );
    let twice: Vec<_> = ids.iter().filter(|(_, k)| **k > 1).collect();
    assert!(twice.is_empty(), "batch ids stored twice: {twice:?}");
    assert!(
        per_collector.iter().all(|&m| m > 0.0),
        "the shared subscription splits the messages between both collectors: {per_collector:?}"
    );
    // Junk is logged with its topic (and counted, though the counter of a collector
    // killed since is gone with it).
    let logs = collectors[0].log() + &collectors[1].log();
    assert!(
        logs.contains("message on \"edgeferry/intruder/batches\"")
            && logs.contains("is not an edgeferry batch"),
        "junk is logged with its topic:\n{logs}"
    );
}

#[test]
fn a_collector_without_a_source_or_with_bad_mqtt_settings_says_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_edgeferry"))
            .arg("collect")
            .arg("--data-dir")
            .arg(dir.path())
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, err) = run(&[]);
    assert_ne!(code, Some(0));
    assert!(err.contains("--listen"), "{err}");
    let (code, err) = run(&["--mqtt", "ws://127.0.0.1:1"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("use mqtt:// or mqtts://"), "{err}");
    let (code, err) = run(&[
        "--mqtt",
        "mqtts://127.0.0.1:1",
        "--mqtt-ca",
        "/nonexistent/ca.pem",
    ]);
    assert_ne!(code, Some(0));
    assert!(err.contains("/nonexistent/ca.pem"), "{err}");
}

#[test]
fn an_mqtt_collector_whose_broker_is_unreachable_is_unhealthy_and_says_why() {
    let port = free_port(); // nothing listens here
    let mut c = Collector::new(&[
        "--mqtt",
        &format!("mqtt://127.0.0.1:{port}"),
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    c.start();
    wait_for(
        "healthz 503 naming the broker",
        Duration::from_secs(10),
        || {
            c.get("/healthz").is_some_and(|(code, body)| {
                code == 503
                    && body.contains(&format!("MQTT broker mqtt://127.0.0.1:{port} unreachable"))
            })
        },
    );
    assert!(
        c.log().contains("unreachable") && c.log().contains("retrying with backoff"),
        "{}",
        c.log()
    );
}
