//! `[upstream] url` as a list: a real gateway fails over between real collectors that share
//! a NATS JetStream engine, while readings flow and the collector it uses is SIGKILLed again
//! and again. Every reading reaches the stream exactly once, and each switch is counted.

mod common;

use common::nats::{NatsServer, wait_for_readings};
use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const SERIES: usize = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_with_several_collectors_fails_over_and_every_reading_lands_once() {
    let broker = Mosquitto::start();
    let nats = NatsServer::start();
    let sink = ["--sink".to_string(), nats.sink()];
    let sink: Vec<&str> = sink.iter().map(String::as_str).collect();
    let mut collectors = [Collector::new(&sink), Collector::new(&sink)];
    for c in &mut collectors {
        c.start();
    }
    // A third URL where nothing listens: a collector that is gone for good.
    let dead = format!("ws://127.0.0.1:{}/", free_port());
    let urls = [collectors[0].url(), dead.clone(), collectors[1].url()];
    let mut gw = Gateway::with_config(
        &broker.url(),
        "",
        &format!(
            "[process]\nwindows = [\"1s\", \"2s\"]\nallowed_lateness = \"500ms\"\n\
             checkpoint_interval = \"500ms\"\n\
             [upstream]\nurl = {urls:?}\nbatch_max = 5\nlinger = \"200ms\"\n\
             reconnect_max = \"1s\"\n"
        ),
    );
    gw.start();

    let stop = Arc::new(AtomicBool::new(false));
    let publisher = publish_until_stopped(broker.port, "pub-failover", SERIES, stop.clone());

    // Kill the collector the gateway is connected to, as soon as it is connected to one,
    // five times; bring it back a moment later on the same port.
    let in_use = |gw: &Gateway| -> Option<String> {
        let status: serde_json::Value = serde_json::from_str(&gw.admin_get("/status")?).ok()?;
        let up = &status["upstream"];
        (up["connected"] == true).then(|| up["url"].as_str().unwrap_or_default().to_string())
    };
    let mut kills = 0;
    let mut used = BTreeSet::new();
    let started = Instant::now();
    while kills < 5 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the gateway did not reconnect to a live collector; log:\n{}",
            gw.logs()
        );
        let Some(url) = in_use(&gw) else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        assert_ne!(url, dead, "connected to a URL where nothing listens");
        used.insert(url.clone());
        tokio::time::sleep(Duration::from_millis(700)).await;
        let c = collectors.iter_mut().find(|c| c.url() == url).unwrap();
        c.kill9();
        kills += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.start();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    let n = tokio::task::spawn_blocking(move || publisher.join().unwrap())
        .await
        .unwrap() as u64;

    // Everything published reaches the stream (windows close, batches go), once.
    let (lines, ids) = wait_for_readings(&nats, n).await;
    let counts = central_counts(&lines);
    let switches = gw
        .metric("edgeferry_upstream_switches_total")
        .unwrap_or(0.0);
    let logs = gw.logs();
    let switch_lines = logs.matches("switching to").count();
    eprintln!(
        "failover: {kills} collector SIGKILLs, {n} readings, windows per length {counts:?}, \
         {} batch ids, {switches} switches, {switch_lines} switch log lines, used {used:?}",
        ids.len()
    );
    assert_eq!(
        counts,
        BTreeMap::from([(1, n), (2, n)]),
        "every reading once"
    );
    assert!(
        ids.values().all(|&m| m == 1),
        "a batch id twice in the stream"
    );
    assert_eq!(
        used.len(),
        2,
        "the gateway used both live collectors: {used:?}"
    );
    assert!(
        switches >= kills as f64,
        "{switches} switches for {kills} kills"
    );
    assert!(
        (1..=switches as usize).contains(&switch_lines),
        "{switch_lines} switch log lines for {switches} switches:\n{logs}"
    );
    let status: serde_json::Value =
        serde_json::from_str(&gw.admin_get("/status").unwrap()).unwrap();
    assert_eq!(status["upstream"]["switches"].as_f64(), Some(switches));
    assert!(gw.stop().success());
}
