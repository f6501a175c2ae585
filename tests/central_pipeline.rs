//! The whole chain with real processes: sensors → Mosquitto → two edgeferry gateways → two
//! collectors (one each) → NATS JetStream → a loader → PostgreSQL, with a gateway, a
//! collector and the loader SIGKILLed at random moments and the NATS server SIGKILLed and
//! restarted once while readings flow. In PostgreSQL, every window of every gateway holds
//! exactly the count and sum of the readings published into it, and the stream holds no
//! batch id twice.

mod common;

use common::loader::Loader;
use common::nats::NatsServer;
use common::postgres::Postgres;
use common::*;
use rand::RngExt;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const SERIES: usize = 12;

fn topic(i: usize) -> String {
    format!("sensors/site{}/dev{}/temperature", i % 2, i % SERIES)
}

fn series(i: usize) -> String {
    format!("temperature{{device=dev{},site=site{}}}", i % SERIES, i % 2)
}

/// Per (series, window start in ms, window length in s): count and sum of the readings.
type Windows = BTreeMap<(String, i64, i64), (i64, f64)>;

fn gateway(id: &str, broker: &Mosquitto, collector: &Collector) -> Gateway {
    let gw = Gateway::with_config(
        &broker.url(),
        "",
        &format!(
            "[process]\nwindows = [\"1s\", \"2s\"]\nallowed_lateness = \"500ms\"\n\
             checkpoint_interval = \"500ms\"\n\
             [upstream]\nurl = \"{}\"\nbatch_max = 5\nlinger = \"200ms\"\n",
            collector.url()
        ),
    );
    let text = std::fs::read_to_string(&gw.config)
        .unwrap()
        .replace("id = \"gw-test\"", &format!("id = \"{id}\""));
    std::fs::write(&gw.config, text).unwrap();
    gw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_collectors_engine_and_loader_killed_every_reading_lands_once_in_postgres() {
    let broker = Mosquitto::start();
    let mut nats = NatsServer::start();
    let pg = Postgres::start();
    let sink = ["--sink".to_string(), nats.sink()];
    let sink: Vec<&str> = sink.iter().map(String::as_str).collect();
    let mut collectors = [Collector::new(&sink), Collector::new(&sink)];
    for c in &mut collectors {
        c.start();
    }
    let mut gws = [
        gateway("gw-1", &broker, &collectors[0]),
        gateway("gw-2", &broker, &collectors[1]),
    ];
    for g in &mut gws {
        g.start();
    }
    let mut loader = Loader::start(&nats, &pg, &["--batch", "8", "--ack-wait", "2s"]);

    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (port, stop) = (broker.port, stop.clone());
        std::thread::spawn(move || {
            let p = Publisher::connect(port, "pub-central");
            let mut sent = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                for _ in 0..5 {
                    let ts = now_ms();
                    p.publish(&topic(i), format!(r#"{{"value":{i},"ts":{ts}}}"#));
                    sent.push((i, ts));
                    i += 1;
                }
                std::thread::sleep(Duration::from_millis(25)); // ~200 readings/s
            }
            p.wait_acked(i, Duration::from_secs(120));
            sent
        })
    };

    // The storm: kill something every 0.3–1 s for 20 s; NATS once, halfway.
    let mut rng = rand::rng();
    let started = Instant::now();
    let (mut gw_kills, mut collector_kills, mut loader_kills, mut nats_restarts) = (0, 0, 0, 0);
    while started.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1000))).await;
        if nats_restarts == 0 && started.elapsed() > Duration::from_secs(10) {
            nats.kill9();
            tokio::time::sleep(Duration::from_millis(rng.random_range(200..1500))).await;
            nats.start_again();
            nats_restarts += 1;
            continue;
        }
        match rng.random_range(0..4) {
            0 | 1 => {
                let g = &mut gws[0];
                g.kill9();
                gw_kills += 1;
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..300))).await;
                g.spawn();
            }
            2 => {
                let c = &mut collectors[rng.random_range(0..2)];
                if c.is_running() {
                    c.kill9();
                    collector_kills += 1;
                } else {
                    c.start();
                }
            }
            _ => {
                loader.kill9();
                loader_kills += 1;
                loader.spawn();
            }
        }
    }
    stop.store(true, Ordering::SeqCst);
    let sent = tokio::task::spawn_blocking(move || publisher.join().unwrap())
        .await
        .unwrap();
    for c in &mut collectors {
        if !c.is_running() {
            c.start();
        }
    }

    // What an uninterrupted run computes, for each gateway (both take every reading).
    let mut expected: Windows = BTreeMap::new();
    for &(i, ts) in &sent {
        for secs in [1u64, 2] {
            let start = (ts - ts % (secs * 1000)) as i64;
            let e = expected.entry((series(i), start, secs as i64)).or_default();
            e.0 += 1;
            e.1 += i as f64;
        }
    }
    let n = sent.len() as i64;
    let db = pg.client().await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let rows = db
            .query(
                "SELECT gateway, window_secs, sum(count)::bigint FROM aggregates GROUP BY 1, 2",
                &[],
            )
            .await
            .unwrap();
        let done = rows.len() == 4 && rows.iter().all(|r| r.get::<_, i64>(2) >= n);
        if done || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let rows = db
        .query(
            "SELECT gateway, series, (extract(epoch from window_start) * 1000)::bigint,
                    window_secs::bigint, count, sum
             FROM aggregates",
            &[],
        )
        .await
        .unwrap();
    let mut got: BTreeMap<String, Windows> = BTreeMap::new();
    for r in &rows {
        got.entry(r.get(0))
            .or_default()
            .insert((r.get(1), r.get(2), r.get(3)), (r.get(4), r.get(5)));
    }
    let (mut lost, mut doubled, mut wrong_sums) = (0i64, 0i64, 0);
    for gw in ["gw-1", "gw-2"] {
        let mine = got.get(gw).cloned().unwrap_or_default();
        for (key, &(count, sum)) in &expected {
            let (c, s) = mine.get(key).copied().unwrap_or((0, 0.0));
            lost += (count - c).max(0);
            doubled += (c - count).max(0);
            if c == count && s != sum {
                wrong_sums += 1;
            }
        }
        assert!(
            mine.keys().all(|k| expected.contains_key(k)),
            "{gw}: windows nobody published into"
        );
    }

    // The stream: one message per batch id, whatever was resent where.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("EDGEFERRY").await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    let mut ids = BTreeSet::new();
    let mut messages = 0;
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(m) = stream.get_raw_message(seq).await {
            messages += 1;
            let h = |k: &str| m.headers.get(k).map(|v| v.to_string()).unwrap_or_default();
            ids.insert((
                h("Edgeferry-Gateway"),
                h("Edgeferry-Epoch"),
                h("Edgeferry-Batch"),
            ));
        }
    }
    eprintln!(
        "central pipeline: {gw_kills} gateway SIGKILLs, {collector_kills} collector SIGKILLs, \
         {loader_kills} loader SIGKILLs, {nats_restarts} NATS restart; published {n} (to 2 \
         gateways), windows in PostgreSQL {}, lost {lost}, doubled {doubled}, wrong sums \
         {wrong_sums}; stream {messages} messages, {} batch ids",
        rows.len(),
        ids.len()
    );
    assert!(
        lost == 0 && doubled == 0 && wrong_sums == 0,
        "lost {lost}, doubled {doubled}, wrong sums {wrong_sums}\nloader:\n{}\ngw-1:\n{}",
        loader.log(),
        gws[0].logs()
    );
    assert_eq!(messages, ids.len(), "a batch id twice in the stream");
    for g in &mut gws {
        assert!(g.stop().success());
    }
}
