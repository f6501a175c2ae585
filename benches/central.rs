//! Central-side benchmark (issue 12): how fast the fleet's batches go through collector →
//! NATS JetStream and loader → PostgreSQL, each against a bare baseline doing only the
//! engine's part in the same run, on the same engines.
//!
//! `cargo bench --bench central` starts a real `nats-server -js` and a real PostgreSQL (fsync
//! on, as deployed) on loopback ports, then:
//!
//! 1. **Collector → JetStream.** `EDGEFERRY_CENTRAL_GATEWAYS` (default 20) gateways connect
//!    to one `edgeferry collect --sink nats://…` at once and each sends
//!    `EDGEFERRY_CENTRAL_BATCHES` (default 50) batches of 100 aggregates (100 series, one
//!    10 s window each, with their sketches; real packed encoding), up to 16 in flight per
//!    gateway as the gateway's upstream link allows. Aggregates/s from the first send to the
//!    last ack, p50/p99 send → ack, the collector's CPU seconds per million aggregates.
//!    **Bare:** the very messages the collector published (read back from the stream: same
//!    payload bytes, same headers) published again by a plain `async-nats` JetStream client
//!    to the same stream, one task per gateway with 16 publish acks outstanding each. The
//!    ratio collector / bare is the figure (goal ≥ 0.5). `EDGEFERRY_CENTRAL_ROUNDS`
//!    (default 3) alternating rounds; the median ratio is reported.
//! 2. **Loader → PostgreSQL.** With the last round's batches in the stream, `edgeferry load`
//!    (default `--batch 256`) starts on a fresh consumer with the schema in place and an
//!    empty table; rows/s until every aggregate is in the table. **Bare:** the same rows
//!    (`COPY aggregates TO STDOUT` right after) `COPY`ed back into the same, emptied table,
//!    indexes and all. The ratio loader / COPY is the figure (goal ≥ 0.3). As many rounds.
//! 3. **Unloaded latency.** One gateway, one batch in flight, 200 batches: send → ack
//!    p50/p99 when nothing queues.
//! 4. **Fairness.** 20 small gateways each send a batch every 100 ms (one in flight) for 5 s;
//!    the small gateways' p99 send → ack alone, then with a hot gateway sending 100× as much
//!    (a batch every millisecond, 16 in flight) at the same time. The ratio with ÷ without
//!    is the figure (goal ≤ 2), median over the rounds.
//!
//! Without `--bench` (as `cargo test --all-targets` runs it) it is a smoke run with 2
//! gateways × 3 batches and one round that checks every aggregate arrived in the stream and
//! in PostgreSQL exactly once, never how fast.

#[path = "../tests/common/mod.rs"]
mod common;

use async_nats::jetstream::{self, context::PublishAckFuture};
use bytes::Bytes;
use common::loader::Loader;
use common::nats::NatsServer;
use common::postgres::Postgres;
use common::wsclient::{aggregate_batch, connect_plain, handshake, recv, send_raw};
use common::{Collector, cpu_secs};
use edgeferry::collect::nats::gateway_token;
use edgeferry::protocol::{self, DictEncoder, Frame};
use futures_util::{SinkExt, StreamExt};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Barrier;
use tokio::task::JoinHandle;

/// Aggregates per batch: a gateway with 100 series closing one window.
const SERIES: usize = 100;
/// Batches in flight per gateway (the gateway's upstream window).
const WINDOW: usize = 16;

struct Setup {
    gateways: usize,
    batches: usize,
    rounds: usize,
    unloaded: usize,
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One gateway's batches, encoded once before the clock starts: (seq, frames to send).
type Encoded = Vec<(u64, Vec<Vec<u8>>)>;

fn encode(batches: usize) -> Encoded {
    let mut enc = DictEncoder::new();
    (0..batches as u64)
        .map(|seq| {
            let (dict, frame) = enc.encode_batch(seq, &aggregate_batch(seq, SERIES));
            let frames = dict
                .iter()
                .chain(std::iter::once(&frame))
                .map(protocol::encode)
                .collect();
            (seq, frames)
        })
        .collect()
}

/// A gateway's session: handshake, wait for the others, send with `window` batches in
/// flight; the send → ack latency of every batch (ms).
async fn gateway(
    addr: String,
    id: String,
    batches: Arc<Encoded>,
    window: usize,
    start: Arc<Barrier>,
) -> Vec<f64> {
    paced_gateway(addr, id, batches, window, Duration::ZERO, start).await
}

/// Releases tasks waiting on `start` together: (seconds until the last one finished, every
/// latency they report).
async fn race(start: &Barrier, tasks: Vec<JoinHandle<Vec<f64>>>) -> (f64, Vec<f64>) {
    start.wait().await;
    let t0 = Instant::now();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    (t0.elapsed().as_secs_f64(), lat)
}

/// A gateway sending batch `k` at `k × every` after the common start (or as soon as its
/// window allows): the send → ack latency of every batch (ms).
async fn paced_gateway(
    addr: String,
    id: String,
    batches: Arc<Encoded>,
    window: usize,
    every: Duration,
    start: Arc<Barrier>,
) -> Vec<f64> {
    let mut ws = connect_plain(&addr).await;
    handshake(&mut ws, &id, 1, 0).await;
    start.wait().await;
    let t0 = tokio::time::Instant::now();
    let mut in_flight: HashMap<u64, Instant> = HashMap::new();
    let mut latencies = Vec::with_capacity(batches.len());
    let mut next = 0;
    loop {
        while in_flight.len() < window
            && next < batches.len()
            && t0 + every * next as u32 <= tokio::time::Instant::now()
        {
            let (seq, frames) = &batches[next];
            in_flight.insert(*seq, Instant::now());
            for f in frames {
                send_raw(&mut ws, f.clone()).await.unwrap();
            }
            next += 1;
        }
        if next == batches.len() && in_flight.is_empty() {
            return latencies;
        }
        let due = t0 + every * next as u32;
        let may_send = next < batches.len() && in_flight.len() < window;
        tokio::select! {
            f = recv(&mut ws), if !in_flight.is_empty() => match f {
                Some(Frame::Ack(a)) => {
                    for s in a.seqs {
                        if let Some(t) = in_flight.remove(&s) {
                            latencies.push(t.elapsed().as_secs_f64() * 1e3);
                        }
                    }
                }
                other => panic!("{id}: expected an Ack, got {other:?}"),
            },
            () = tokio::time::sleep_until(due), if may_send => {}
        }
    }
}

/// The small gateways' latencies (ms), with or without a hot one beside them.
async fn fairness_round(
    addr: &str,
    prefix: &str,
    small: usize,
    small_batches: &Arc<Encoded>,
    hot: Option<&Arc<Encoded>>,
) -> Vec<f64> {
    let start = Arc::new(Barrier::new(small + 1 + usize::from(hot.is_some())));
    let tasks: Vec<_> = (0..small)
        .map(|g| {
            tokio::spawn(paced_gateway(
                addr.to_string(),
                format!("{prefix}-s{g:03}"),
                small_batches.clone(),
                1,
                Duration::from_millis(100),
                start.clone(),
            ))
        })
        .collect();
    let hot = hot.map(|b| {
        tokio::spawn(paced_gateway(
            addr.to_string(),
            format!("{prefix}-hot"),
            b.clone(),
            WINDOW,
            Duration::from_millis(1),
            start.clone(),
        ))
    });
    let (_, lat) = race(&start, tasks).await;
    if let Some(h) = hot {
        h.await.unwrap();
    }
    lat
}

/// `gateways` sessions at once against the collector: (seconds from the common start to
/// the last ack, every latency).
async fn collector_round(
    addr: &str,
    prefix: &str,
    gateways: usize,
    batches: &Arc<Encoded>,
    window: usize,
) -> (f64, Vec<f64>) {
    let start = Arc::new(Barrier::new(gateways + 1));
    let tasks: Vec<_> = (0..gateways)
        .map(|g| {
            tokio::spawn(gateway(
                addr.to_string(),
                format!("{prefix}-g{g:03}"),
                batches.clone(),
                window,
                start.clone(),
            ))
        })
        .collect();
    race(&start, tasks).await
}

/// A message as the collector published it.
struct Published {
    subject: String,
    headers: async_nats::HeaderMap,
    payload: Bytes,
}

/// Every message in the stream now, grouped by the gateway header.
async fn read_back(js: &jetstream::Context) -> HashMap<String, Vec<Published>> {
    let stream = js.get_stream("EDGEFERRY").await.unwrap();
    let state = stream.get_info().await.unwrap().state;
    let mut out: HashMap<String, Vec<Published>> = HashMap::new();
    for seq in state.first_sequence..=state.last_sequence {
        let Ok(m) = stream.get_raw_message(seq).await else {
            continue;
        };
        let gw = m.headers.get("Edgeferry-Gateway").unwrap().to_string();
        out.entry(gw).or_default().push(Published {
            subject: m.subject.to_string(),
            headers: m.headers,
            payload: m.payload,
        });
    }
    out
}

/// The bare baseline: the same messages published by a plain JetStream client under
/// `<gateway>-bare` subjects and message ids (the originals' ids are still inside the
/// stream's duplicate window), one task per gateway with `window` acks outstanding.
async fn bare_round(
    js: &jetstream::Context,
    by_gateway: &HashMap<String, Vec<Published>>,
    window: usize,
) -> (f64, Vec<f64>) {
    let start = Arc::new(Barrier::new(by_gateway.len() + 1));
    let tasks: Vec<_> = by_gateway
        .iter()
        .map(|(gw, msgs)| {
            let token = gateway_token(gw);
            let msgs: Vec<(String, async_nats::HeaderMap, Bytes)> = msgs
                .iter()
                .map(|m| {
                    let mut headers = m.headers.clone();
                    let id = format!("{}-bare", m.headers.get("Nats-Msg-Id").unwrap());
                    headers.insert("Nats-Msg-Id", id.as_str());
                    let subject =
                        m.subject
                            .replacen(&format!(".{token}."), &format!(".{token}-bare."), 1);
                    (subject, headers, m.payload.clone())
                })
                .collect();
            let (js, start) = (js.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                let mut pending: VecDeque<(Instant, PublishAckFuture)> = VecDeque::new();
                let mut lat = Vec::new();
                let settle = |(t, ack): (Instant, PublishAckFuture)| async move {
                    let ack = ack.await.expect("bare publish");
                    assert!(!ack.duplicate, "the bare copies must be new messages");
                    t.elapsed().as_secs_f64() * 1e3
                };
                for (subject, headers, payload) in msgs {
                    if pending.len() == window {
                        lat.push(settle(pending.pop_front().unwrap()).await);
                    }
                    let t = Instant::now();
                    let ack = js
                        .publish_with_headers(subject, headers, payload)
                        .await
                        .unwrap();
                    pending.push_back((t, ack));
                }
                while let Some(p) = pending.pop_front() {
                    lat.push(settle(p).await);
                }
                lat
            })
        })
        .collect();
    race(&start, tasks).await
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1]
}

fn median(mut v: Vec<f64>) -> f64 {
    quantile(&mut v, 0.5)
}

async fn count(db: &tokio_postgres::Client, table: &str) -> i64 {
    db.query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0)
}

struct LoadRound {
    loader_secs: f64,
    loader_cpu: f64,
    copy_secs: f64,
}

/// The loader on a fresh consumer into an empty table until `rows` are there, then the bare
/// COPY of those very rows into the same table, emptied again.
async fn load_round(
    nats: &NatsServer,
    pg: &Postgres,
    db: &tokio_postgres::Client,
    round: usize,
    rows: i64,
) -> LoadRound {
    db.batch_execute("TRUNCATE aggregates, alerts")
        .await
        .unwrap();
    let consumer = format!("bench-{round}");
    let t0 = Instant::now();
    let mut loader = Loader::start(nats, pg, &["--consumer", &consumer]);
    let pid = loader.pid().unwrap();
    // Done when the consumer has every message of the stream acknowledged: the loader acks
    // after its commit. (Asking NATS, not PostgreSQL: a count(*) every few ms would be a
    // sequential scan competing with the loader.)
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let stream = js.get_stream("EDGEFERRY").await.unwrap();
    let last = stream.get_info().await.unwrap().state.last_sequence;
    loop {
        if let Ok(mut c) = stream
            .get_consumer::<jetstream::consumer::pull::Config>(&consumer)
            .await
        {
            let i = c.info().await.unwrap();
            if i.ack_floor.stream_sequence >= last {
                break;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(600),
            "the loader stalled:\n{}",
            loader.log()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let loader_secs = t0.elapsed().as_secs_f64();
    let loader_cpu = cpu_secs(pid);
    loader.kill9();
    stream.delete_consumer(&consumer).await.unwrap();
    assert_eq!(count(db, "aggregates").await, rows, "every aggregate once");

    // The same rows, as PostgreSQL holds them (every column but the load time).
    let columns: String = db
        .query_one(
            "SELECT string_agg(column_name, ', ' ORDER BY ordinal_position)
             FROM information_schema.columns
             WHERE table_name = 'aggregates' AND column_name <> 'loaded_at'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let out = db
        .copy_out(&format!("COPY aggregates ({columns}) TO STDOUT"))
        .await
        .unwrap();
    let chunks: Vec<Bytes> = out.map(|c| c.unwrap()).collect().await;
    db.batch_execute("TRUNCATE aggregates").await.unwrap();
    let t0 = Instant::now();
    let sink = db
        .copy_in(&format!("COPY aggregates ({columns}) FROM STDIN"))
        .await
        .unwrap();
    futures_util::pin_mut!(sink);
    for c in chunks {
        sink.feed(c).await.unwrap();
    }
    let copied = sink.finish().await.unwrap();
    let copy_secs = t0.elapsed().as_secs_f64();
    assert_eq!(copied as i64, rows);
    LoadRound {
        loader_secs,
        loader_cpu,
        copy_secs,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let s = if bench {
        Setup {
            gateways: env_or("EDGEFERRY_CENTRAL_GATEWAYS", 20),
            batches: env_or("EDGEFERRY_CENTRAL_BATCHES", 50),
            rounds: env_or("EDGEFERRY_CENTRAL_ROUNDS", 3).max(1),
            unloaded: 200,
        }
    } else {
        Setup {
            gateways: 2,
            batches: 3,
            rounds: 1,
            unloaded: 5,
        }
    };
    if !bench {
        println!(
            "central: smoke run (checks that every aggregate arrives once; the figures mean nothing)"
        );
    }
    let nats = NatsServer::start_granting(common::nats::BENCH_GRANT);
    let pg = Postgres::start();
    // All the bench's gateways come from 127.0.0.1; a fleet comes from as many addresses.
    let mut collector =
        Collector::new(&["--sink", &nats.url(), "--max-pending-per-address", "1024"]);
    collector.start();
    let addr = format!("127.0.0.1:{}", collector.port);
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let stream = js.get_stream("EDGEFERRY").await.unwrap();
    let batches = Arc::new(encode(s.batches));
    let per_round = s.gateways * s.batches * SERIES;

    println!(
        "central: {} gateways × {} batches × {SERIES} aggregates = {per_round} aggregates \
         per round, {WINDOW} batches in flight per gateway, {} rounds",
        s.gateways, s.batches, s.rounds
    );
    println!(
        "{:>5} {:>14} {:>10} {:>10} {:>12} {:>14} {:>10} {:>10} {:>7}",
        "round",
        "collector/s",
        "p50 ms",
        "p99 ms",
        "cpu s/M",
        "bare/s",
        "p50 ms",
        "p99 ms",
        "ratio"
    );
    let (mut ratios, mut lat_all, mut cpu_per_m, mut nats_cpu_per_m) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut best_rate: f64 = 0.0;
    for round in 0..s.rounds {
        let (c_pid, n_pid) = (collector.pid().unwrap(), nats.pid().unwrap());
        let (c_cpu0, n_cpu0) = (cpu_secs(c_pid), cpu_secs(n_pid));
        let (secs, mut lat) =
            collector_round(&addr, &format!("r{round}"), s.gateways, &batches, WINDOW).await;
        let c_cpu = cpu_secs(c_pid) - c_cpu0;
        let n_cpu = cpu_secs(n_pid) - n_cpu0;
        let by_gateway = read_back(&js).await;
        let stored: usize = by_gateway.values().map(Vec::len).sum();
        assert_eq!(
            stored,
            s.gateways * s.batches,
            "every batch once in the stream"
        );
        let (bare_secs, mut bare_lat) = bare_round(&js, &by_gateway, WINDOW).await;
        let rate = per_round as f64 / secs;
        let bare_rate = per_round as f64 / bare_secs;
        best_rate = best_rate.max(rate);
        ratios.push(rate / bare_rate);
        cpu_per_m.push(c_cpu / per_round as f64 * 1e6);
        nats_cpu_per_m.push(n_cpu / per_round as f64 * 1e6);
        println!(
            "{:>5} {:>14.0} {:>10.1} {:>10.1} {:>12.2} {:>14.0} {:>10.1} {:>10.1} {:>7.2}",
            round,
            rate,
            quantile(&mut lat, 0.5),
            quantile(&mut lat, 0.99),
            c_cpu / per_round as f64 * 1e6,
            bare_rate,
            quantile(&mut bare_lat, 0.5),
            quantile(&mut bare_lat, 0.99),
            rate / bare_rate
        );
        lat_all.extend(lat);
        // Keep only the collector's messages of the last round (the loader's input); the
        // others go, so every round starts from the same stream size.
        if round + 1 < s.rounds {
            stream.purge().await.unwrap();
        } else {
            for gw in by_gateway.keys() {
                stream
                    .purge()
                    .filter(format!("edgeferry.{}-bare.>", gateway_token(gw)))
                    .await
                    .unwrap();
            }
        }
    }
    let p99 = quantile(&mut lat_all, 0.99);
    println!(
        "collector → JetStream: median ratio {:.2} (goal ≥ 0.5), best {:.0} aggregates/s, \
         p99 send → ack {:.1} ms at saturation, collector {:.2} / nats-server {:.2} CPU s \
         per million aggregates",
        median(ratios.clone()),
        best_rate,
        p99,
        median(cpu_per_m),
        median(nats_cpu_per_m)
    );

    // 2. The loader.
    let mut db = pg.client().await;
    edgeferry::collect::load::migrate(&mut db).await.unwrap();
    let rows = per_round as i64;
    let mut load_ratios = Vec::new();
    println!(
        "{:>5} {:>12} {:>12} {:>12} {:>7}",
        "round", "loader/s", "cpu s/M", "COPY/s", "ratio"
    );
    let mut best_load: f64 = 0.0;
    for round in 0..s.rounds {
        let r = load_round(&nats, &pg, &db, round, rows).await;
        let (lr, cr) = (rows as f64 / r.loader_secs, rows as f64 / r.copy_secs);
        best_load = best_load.max(lr);
        load_ratios.push(lr / cr);
        println!(
            "{:>5} {:>12.0} {:>12.2} {:>12.0} {:>7.2}",
            round,
            lr,
            r.loader_cpu / rows as f64 * 1e6,
            cr,
            lr / cr
        );
    }
    println!(
        "loader → PostgreSQL: median ratio {:.2} (goal ≥ 0.3), best {:.0} rows/s",
        median(load_ratios),
        best_load
    );

    // 3. Latency when nothing queues: one gateway, one batch at a time.
    let one = Arc::new(encode(s.unloaded));
    let (_, mut lat) = collector_round(&addr, "unloaded", 1, &one, 1).await;
    println!(
        "unloaded send → ack (1 gateway, 1 batch in flight, {} batches): p50 {:.2} ms, \
         p99 {:.2} ms",
        s.unloaded,
        quantile(&mut lat, 0.5),
        quantile(&mut lat, 0.99)
    );
    assert_eq!(count(&db, "aggregates").await, rows);

    // 4. Fairness: the small gateways' p99 with and without a hot one.
    let (small, small_n, hot_n) = if bench { (20, 50, 5000) } else { (2, 3, 30) };
    let small_batches = Arc::new(encode(small_n));
    let hot_batches = Arc::new(encode(hot_n));
    println!(
        "fairness: {small} gateways × 1 batch / 100 ms (1 in flight), with and without one \
         sending 1 batch / ms ({WINDOW} in flight)"
    );
    println!(
        "{:>5} {:>14} {:>14} {:>7}",
        "round", "alone p99 ms", "with hot p99", "ratio"
    );
    let mut fair = Vec::new();
    for round in 0..s.rounds {
        let mut alone =
            fairness_round(&addr, &format!("f{round}a"), small, &small_batches, None).await;
        let mut beside = fairness_round(
            &addr,
            &format!("f{round}h"),
            small,
            &small_batches,
            Some(&hot_batches),
        )
        .await;
        assert_eq!(
            alone.len(),
            small * small_n,
            "every small batch acknowledged"
        );
        assert_eq!(beside.len(), small * small_n);
        let (a, h) = (quantile(&mut alone, 0.99), quantile(&mut beside, 0.99));
        fair.push(h / a);
        println!("{round:>5} {a:>14.2} {h:>14.2} {:>7.2}", h / a);
    }
    println!(
        "fairness: median ratio {:.2} (goal ≤ 2) of the small gateways' p99 send → ack with \
         a gateway sending 100× as much beside them",
        median(fair)
    );
}
