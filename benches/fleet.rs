//! The fleet simulator and its load and fault test (issue 15): N lightweight gateways in this
//! process against the whole central side on this machine, with machines failing mid-run.
//!
//! `EDGEFERRY_FLEET_GATEWAYS=1000,5000,10000 cargo bench --bench fleet` starts, for each N:
//!
//! * a 3-node NATS JetStream cluster (`nats-server`, R3 stream and buckets), 3 collectors
//!   (`edgeferry collect --sink nats://n1,n2,n3?replicas=3`), 2 loaders (`edgeferry load`) and
//!   PostgreSQL (fsync on), all real processes on loopback ports;
//! * N simulated gateways, each with its own id, store epoch and sequence numbers and an
//!   in-memory outbox with the real semantics: a batch is deleted only when acknowledged,
//!   everything unacknowledged is sent again after a reconnect (minus what `Welcome` says is
//!   stored), at most 16 in flight. Each closes one 10 s window of 100 series per window
//!   (100 aggregates with their sketches, 10 readings each; real packed encoding; from the
//!   second window on, also a late-data correction: version 2 of the previous window of 10
//!   series, one reading more), at its own phase within the window, for `EDGEFERRY_FLEET_WINDOWS` (default 6) windows, over a real
//!   WebSocket to the collector list (random start, the next one after a failure,
//!   full-jitter backoff 100 ms … 2 s). The frames are encoded once and shared by every
//!   gateway (their series names and values are the same; the gateway id and epoch that
//!   make every batch unique travel in `Hello`), so the simulator spends the machine's two
//!   cores on sockets, not on encoding;
//! * faults: after window 2 one collector is SIGKILLed (and stays down), after window 3 one
//!   NATS node is SIGKILLed and after window 4 started again, after window 4.5 a loader is
//!   SIGKILLed and started again.
//!
//! It reports accepted batches/s and aggregates/s, p50/p99 send → ack, each collector's CPU
//! seconds per million aggregates it acknowledged, collector RSS per connected gateway, the
//! reconnect time (p50/p99) of the gateways whose collector was killed, and what reached
//! PostgreSQL and when. Then it checks, and fails if not: every gateway's outbox emptied;
//! the stream holds exactly one message per batch produced (one subject per batch id, so no
//! batch id twice); by SQL, every aggregate produced is in `aggregates` once, at its highest
//! version (row count, and sum of `count` equal to what the simulator produced with the
//! corrections counted); every gateway of the killed
//! collector reconnected to another one.
//!
//! Without `--bench` (as `cargo test --all-targets` runs it) it is the short version in the
//! test suite: 20 gateways, 4 windows of 2 s, the same faults and the same checks; the figures
//! mean nothing there.

#[path = "../tests/common/mod.rs"]
mod common;

use bytes::Bytes;
use common::Collector;
use common::cpu_secs;
use common::loader::Loader;
use common::nats::NatsCluster;
use common::postgres::Postgres;
use common::wsclient::aggregate_batch;
use edgeferry::backoff::Backoff;
use edgeferry::protocol::{self, DictEncoder, Frame, Heartbeat, Hello, OutboxBatch, OutboxItem};
use futures_util::{SinkExt, StreamExt};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// Aggregates per batch: one window of a gateway with 100 series.
const SERIES: usize = 100;
/// Readings per aggregate (`aggregate_batch`).
const READINGS: u64 = 10;
/// Batches in flight per gateway (the gateway's upstream window).
const WINDOW: usize = 16;

/// The frames every simulated gateway sends, encoded once.
struct Frames {
    /// The dictionary of the 100 series, sent first on every connection.
    dict: Bytes,
    /// Batch `seq` (1-based) at index `seq - 1`.
    batches: Vec<Bytes>,
}

/// Series whose previous window each batch corrects (a late reading: version 2, one
/// reading more), so the central side's "highest version wins" is part of what is checked.
const CORRECTED: usize = 10;

/// Batch `seq`: window `seq` of every series (version 1, [`READINGS`] readings each) and,
/// from the second on, version 2 of window `seq - 1` of the first [`CORRECTED`] series.
fn batch(seq: u64) -> OutboxBatch {
    let mut b = aggregate_batch(seq, SERIES);
    if seq > 1 {
        let previous = aggregate_batch(seq - 1, CORRECTED);
        let start = b.created_ms;
        b.items
            .extend(previous.items.into_iter().map(|item| match item {
                OutboxItem::Aggregate {
                    series,
                    window_start_ms,
                    window_secs,
                    mut agg,
                    ..
                } => {
                    agg.add(25.0, window_start_ms + 9_999);
                    OutboxItem::Aggregate {
                        series,
                        window_start_ms,
                        window_secs,
                        version: 2,
                        agg,
                    }
                }
                other => other,
            }));
        b.created_ms = start;
    }
    b
}

/// Aggregates in batch `seq`.
fn items(seq: u64) -> u64 {
    SERIES as u64 + if seq > 1 { CORRECTED as u64 } else { 0 }
}

fn frames(windows: u64) -> Frames {
    let mut enc = DictEncoder::new();
    let mut dict = None;
    let mut batches = Vec::new();
    for seq in 1..=windows {
        let (d, b) = enc.encode_batch(seq, &batch(seq));
        match (seq, d) {
            (1, Some(d)) => dict = Some(Bytes::from(protocol::encode(&d))),
            (1, None) => panic!("the first batch defines the series"),
            (_, d) => assert!(d.is_none(), "later batches use the same series"),
        }
        batches.push(Bytes::from(protocol::encode(&b)));
    }
    Frames {
        dict: dict.unwrap(),
        batches,
    }
}

/// A gateway that lost its link: to which collector, when, and where it went.
struct Reconnect {
    from: usize,
    lost_at: Instant,
    secs: f64,
    to: usize,
}

/// What the simulated gateways share: the plan, and what they measured.
struct Sim {
    urls: Vec<String>,
    frames: Frames,
    window: Duration,
    windows: u64,
    start: Instant,
    /// Aggregates acknowledged by each collector.
    acked_by: Vec<AtomicU64>,
    /// Gateways connected to each collector now.
    connected_to: Vec<AtomicUsize>,
    /// Gateways whose every batch is acknowledged.
    finished: AtomicUsize,
    /// Error frames received (each ends a session).
    errors: AtomicUsize,
    /// Send → ack of every batch, ms.
    latencies: Mutex<Vec<f32>>,
    reconnects: Mutex<Vec<Reconnect>>,
    first_send: Mutex<Option<Instant>>,
    last_ack: Mutex<Option<Instant>>,
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Why a session ended.
enum End {
    /// Every batch produced and acknowledged.
    Finished,
    /// The link failed (the collector died, closed, or sent an Error).
    Lost,
}

/// One simulated gateway, from its first connect until its last batch is acknowledged.
async fn gateway(index: usize, sim: Arc<Sim>) {
    let id = format!("sim-{index:05}");
    let epoch = rand::random::<u64>() >> 1;
    let phase = sim
        .window
        .mul_f64(rand::random_range(0.0..1.0))
        .max(Duration::from_millis(1));
    // seq → when it was sent on this connection (None: waiting to be sent).
    let mut outbox: BTreeMap<u64, Option<Instant>> = BTreeMap::new();
    let mut next_seq = 1u64;
    let mut url = rand::random_range(0..sim.urls.len());
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let mut lost: Option<(usize, Instant)> = None;
    loop {
        let connected = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async(sim.urls[url].as_str()),
        )
        .await;
        let mut ws = match connected {
            Ok(Ok((ws, _))) => ws,
            _ => {
                url = (url + 1) % sim.urls.len();
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        let first_seq = outbox.keys().next().copied().unwrap_or(next_seq);
        let Some(max_in_flight) = hello(&mut ws, &id, epoch, first_seq, &mut outbox).await else {
            url = (url + 1) % sim.urls.len();
            tokio::time::sleep(backoff.next_delay()).await;
            continue;
        };
        if let Some((from, lost_at)) = lost.take() {
            sim.reconnects.lock().unwrap().push(Reconnect {
                from,
                lost_at,
                secs: lost_at.elapsed().as_secs_f64(),
                to: url,
            });
        }
        sim.connected_to[url].fetch_add(1, Ordering::SeqCst);
        let began = Instant::now();
        let end = session(
            &sim,
            &mut ws,
            url,
            (max_in_flight as usize).clamp(1, WINDOW),
            phase,
            &mut outbox,
            &mut next_seq,
        )
        .await;
        sim.connected_to[url].fetch_sub(1, Ordering::SeqCst);
        match end {
            End::Finished => {
                let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
                sim.finished.fetch_add(1, Ordering::SeqCst);
                return;
            }
            End::Lost => {
                // As the gateway's link: the backoff starts over only after a link that
                // lived a while, so a collector that fails every session is not hammered.
                if began.elapsed() >= Duration::from_secs(30) {
                    backoff.reset();
                }
                lost = Some((url, Instant::now()));
                url = (url + 1) % sim.urls.len();
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

/// Hello → Welcome; drops what the collector says is stored; its `max_in_flight`.
async fn hello(
    ws: &mut Ws,
    id: &str,
    epoch: u64,
    first_seq: u64,
    outbox: &mut BTreeMap<u64, Option<Instant>>,
) -> Option<u32> {
    let frame = Frame::Hello(Hello {
        gateway: id.to_string(),
        epoch,
        versions: vec![2],
        first_seq,
        software: "edgeferry fleet-sim".into(),
    });
    ws.send(Message::Binary(protocol::encode(&frame).into()))
        .await
        .ok()?;
    let welcome = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Binary(b) = m {
                return protocol::decode(&b, u32::MAX).ok();
            }
        }
        None
    })
    .await
    .ok()??;
    let Frame::Welcome(w) = welcome else {
        return None;
    };
    for (lo, hi) in &w.stored {
        let stored: Vec<u64> = outbox.range(lo..=hi).map(|(s, _)| *s).collect();
        for s in stored {
            outbox.remove(&s);
        }
    }
    for sent in outbox.values_mut() {
        *sent = None; // everything unacknowledged goes again
    }
    Some(w.max_in_flight)
}

/// One connection: the dictionary, then batches as they are produced and the window allows,
/// until every batch is produced and acknowledged, or the link fails.
#[allow(clippy::too_many_arguments)]
async fn session(
    sim: &Sim,
    ws: &mut Ws,
    collector: usize,
    window: usize,
    phase: Duration,
    outbox: &mut BTreeMap<u64, Option<Instant>>,
    next_seq: &mut u64,
) -> End {
    if ws
        .send(Message::Binary(sim.frames.dict.clone()))
        .await
        .is_err()
    {
        return End::Lost;
    }
    let start = tokio::time::Instant::from_std(sim.start);
    let mut heartbeat = tokio::time::interval(Duration::from_secs(15));
    loop {
        // Fill the window, oldest first.
        let in_flight = outbox.values().filter(|s| s.is_some()).count();
        let unsent: Vec<u64> = outbox
            .iter()
            .filter(|(_, s)| s.is_none())
            .map(|(k, _)| *k)
            .take(window.saturating_sub(in_flight))
            .collect();
        for seq in unsent {
            let frame = sim.frames.batches[(seq - 1) as usize].clone();
            if ws.send(Message::Binary(frame)).await.is_err() {
                return End::Lost;
            }
            let now = Instant::now();
            outbox.insert(seq, Some(now));
            sim.first_send.lock().unwrap().get_or_insert(now);
        }
        if *next_seq > sim.windows && outbox.is_empty() {
            return End::Finished;
        }
        let produce_at = start + phase + sim.window * (*next_seq - 1) as u32;
        tokio::select! {
            () = tokio::time::sleep_until(produce_at), if *next_seq <= sim.windows => {
                outbox.insert(*next_seq, None);
                *next_seq += 1;
            }
            _ = heartbeat.tick() => {
                let hb = Frame::Heartbeat(Heartbeat { time_ms: common::now_ms() as i64 });
                if ws.send(Message::Binary(protocol::encode(&hb).into())).await.is_err() {
                    return End::Lost;
                }
            }
            m = ws.next() => match m {
                Some(Ok(Message::Binary(b))) => match protocol::decode(&b, u32::MAX) {
                    Ok(Frame::Ack(a)) => {
                        let now = Instant::now();
                        let mut lat = Vec::with_capacity(a.seqs.len());
                        for seq in a.seqs {
                            if let Some(Some(sent)) = outbox.remove(&seq) {
                                lat.push((now - sent).as_secs_f32() * 1000.0);
                                sim.acked_by[collector].fetch_add(items(seq), Ordering::Relaxed);
                            }
                        }
                        sim.latencies.lock().unwrap().extend(lat);
                        *sim.last_ack.lock().unwrap() = Some(now);
                    }
                    Ok(Frame::Heartbeat(_)) => {}
                    _ => {
                        // An Error frame (a sink failed: the engine is electing a leader):
                        // reconnect, as a gateway does.
                        sim.errors.fetch_add(1, Ordering::Relaxed);
                        return End::Lost;
                    }
                },
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return End::Lost,
            },
        }
    }
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn vm_rss_kib(pid: u32) -> f64 {
    common::proc_status_kib(pid, "VmRSS:").map_or(f64::NAN, |k| k as f64)
}

/// Room for N gateway sockets in this process (and in the collectors, which inherit it):
/// the soft limit raised to the hard one, which is all an unprivileged container allows.
fn raise_fd_limit(gateways: usize) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct they are given.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    let need = gateways as u64 + 1024;
    assert!(
        lim.rlim_cur >= need,
        "{gateways} gateways need {need} file descriptors; the hard limit is {} (ulimit -Hn)",
        lim.rlim_max
    );
}

async fn pg_totals(db: &tokio_postgres::Client) -> (i64, i64) {
    match db
        .query_one(
            "SELECT count(*), coalesce(sum(count), 0)::bigint FROM aggregates",
            &[],
        )
        .await
    {
        Ok(row) => (row.get(0), row.get(1)),
        Err(_) => (0, 0), // the table is not there until a loader migrated
    }
}

/// One run with `n` gateways; panics if a check fails.
async fn run(n: usize, windows: u64, window: Duration, bench: bool) {
    raise_fd_limit(n);
    let mut cluster = NatsCluster::start_granting(3, common::nats::BENCH_GRANT);
    cluster.wait_ready().await;
    let pg = Postgres::start();
    let sink = format!("{}?replicas=3", cluster.url());
    let limits = (n * 2).max(1024).to_string();
    let mut collectors: Vec<Collector> = (0..3)
        .map(|_| {
            Collector::new(&[
                "--sink",
                &sink,
                "--metrics-listen",
                "127.0.0.1:0",
                // Every simulated gateway comes from 127.0.0.1; a fleet from as many addresses.
                "--max-pending-per-address",
                &limits,
                "--max-pending",
                &limits,
                "--max-connections",
                &limits,
            ])
        })
        .collect();
    for c in &mut collectors {
        c.start();
    }
    let mut loaders = vec![Loader::start_urls(&cluster.url(), &pg.url(), &[])];
    tokio::time::sleep(Duration::from_secs(1)).await; // the first one migrates
    loaders.push(Loader::start_urls(&cluster.url(), &pg.url(), &[]));
    let pids: Vec<u32> = collectors.iter().map(|c| c.pid().unwrap()).collect();
    let rss0: Vec<f64> = pids.iter().map(|&p| vm_rss_kib(p)).collect();
    let cpu0: Vec<f64> = pids.iter().map(|&p| cpu_secs(p)).collect();

    let sim = Arc::new(Sim {
        urls: collectors.iter().map(Collector::url).collect(),
        frames: frames(windows),
        window,
        windows,
        start: Instant::now(),
        acked_by: (0..3).map(|_| AtomicU64::new(0)).collect(),
        connected_to: (0..3).map(|_| AtomicUsize::new(0)).collect(),
        finished: AtomicUsize::new(0),
        errors: AtomicUsize::new(0),
        latencies: Mutex::new(Vec::new()),
        reconnects: Mutex::new(Vec::new()),
        first_send: Mutex::new(None),
        last_ack: Mutex::new(None),
    });
    println!(
        "fleet: {n} gateways × {windows} windows of {window:?} × {SERIES} aggregates \
         (offered {:.0} aggregates/s), 3 collectors, 3-node NATS (R3), 2 loaders, PostgreSQL",
        n as f64 * SERIES as f64 / window.as_secs_f64()
    );
    let tasks: Vec<_> = (0..n)
        .map(|i| tokio::spawn(gateway(i, sim.clone())))
        .collect();

    // Connected: memory per gateway, before the faults.
    let at = |w: f64| sim.start + window.mul_f64(w);
    tokio::time::sleep_until(at(1.5).into()).await;
    let connected: Vec<usize> = sim
        .connected_to
        .iter()
        .map(|c| c.load(Ordering::SeqCst))
        .collect();
    let rss_per_gw: Vec<f64> = (0..3)
        .map(|i| (vm_rss_kib(pids[i]) - rss0[i]) / connected[i].max(1) as f64)
        .collect();

    // Faults.
    tokio::time::sleep_until(at(2.0).into()).await;
    let on_killed = sim.connected_to[0].load(Ordering::SeqCst);
    let cpu_killed = cpu_secs(pids[0]) - cpu0[0];
    let killed_at = Instant::now();
    collectors[0].kill9();
    println!("fleet: SIGKILL collector 0 ({on_killed} gateways connected)");
    tokio::time::sleep_until(at(3.0).into()).await;
    cluster.nodes[2].kill9();
    println!("fleet: SIGKILL NATS node 2");
    tokio::time::sleep_until(at(4.0).into()).await;
    cluster.nodes[2].start_again();
    println!("fleet: NATS node 2 started again");
    tokio::time::sleep_until(at(4.5).into()).await;
    loaders[1].kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    loaders[1].spawn();
    println!("fleet: loader 1 SIGKILLed and started again");

    // Everything produced and acknowledged.
    let drain_deadline = Instant::now() + window * windows as u32 + Duration::from_secs(600);
    while sim.finished.load(Ordering::SeqCst) < n {
        assert!(
            Instant::now() < drain_deadline,
            "{} of {n} gateways still hold unacknowledged batches; collector 1 log:\n{}",
            n - sim.finished.load(Ordering::SeqCst),
            collectors[1].log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    let acked_at = Instant::now();
    let cpu: Vec<f64> = (0..3)
        .map(|i| {
            if i == 0 {
                cpu_killed
            } else {
                cpu_secs(pids[i]) - cpu0[i]
            }
        })
        .collect();

    // What reached PostgreSQL, by SQL.
    // One row per (gateway, series, window); the corrected windows count one reading more.
    let expected_rows = (n as u64 * windows * SERIES as u64) as i64;
    let expected_count =
        expected_rows * READINGS as i64 + (n as u64 * (windows - 1) * CORRECTED as u64) as i64;
    let db = pg.client().await;
    let pg_deadline = Instant::now() + Duration::from_secs(900);
    let (rows, count) = loop {
        let t = pg_totals(&db).await;
        if t.0 >= expected_rows || Instant::now() > pg_deadline {
            break t;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let pg_secs = acked_at.elapsed().as_secs_f64();

    // The stream: one message per batch, each on its own subject.
    let js = async_nats::jetstream::new(async_nats::connect(cluster.nodes[0].url()).await.unwrap());
    let state = js
        .get_stream("EDGEFERRY")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .clone();

    let (first, last) = (
        sim.first_send.lock().unwrap().unwrap(),
        sim.last_ack.lock().unwrap().unwrap(),
    );
    let secs = (last - first).as_secs_f64();
    let acked: u64 = sim.acked_by.iter().map(|a| a.load(Ordering::SeqCst)).sum();
    let mut lat: Vec<f64> = sim
        .latencies
        .lock()
        .unwrap()
        .iter()
        .map(|&l| f64::from(l))
        .collect();
    let reconnects = std::mem::take(&mut *sim.reconnects.lock().unwrap());
    let mut failover: Vec<f64> = reconnects
        .iter()
        .filter(|r| r.from == 0 && r.lost_at >= killed_at - Duration::from_millis(100))
        .map(|r| r.secs)
        .collect();
    let moved_back = reconnects
        .iter()
        .filter(|r| r.to == 0 && r.lost_at >= killed_at)
        .count();
    let cpu_per_m: Vec<String> = (0..3)
        .map(|i| {
            let a = sim.acked_by[i].load(Ordering::SeqCst) as f64;
            format!("{:.2}", cpu[i] / a.max(1.0) * 1e6)
        })
        .collect();
    println!(
        "fleet: N={n}: accepted {:.0} batches/s, {:.0} aggregates/s over {secs:.1} s; send → ack \
         p50 {:.1} ms, p99 {:.1} ms; collector CPU s per M aggregates {cpu_per_m:?} \
         (collector 0 until its kill); collector RSS per connected gateway {:?} KiB \
         (connected {connected:?}); reconnect of the killed collector's {on_killed} gateways \
         p50 {:.2} s, p99 {:.2} s ({} reconnects, {} links lost in all, {} Error frames); PostgreSQL: {rows} rows, \
         sum(count) {count}, complete {pg_secs:.1} s after the last ack; stream: {} messages, \
         {} subjects",
        sim.latencies.lock().unwrap().len() as f64 / secs,
        acked as f64 / secs,
        quantile(&mut lat, 0.5),
        quantile(&mut lat, 0.99),
        rss_per_gw.iter().map(|r| r.round()).collect::<Vec<_>>(),
        quantile(&mut failover, 0.5),
        quantile(&mut failover, 0.99),
        failover.len(),
        reconnects.len(),
        sim.errors.load(Ordering::SeqCst),
        state.messages,
        state.subjects_count,
    );
    // Why sessions ended badly, as the surviving collectors logged it (first of each kind).
    let mut seen = std::collections::BTreeSet::new();
    for c in &collectors[1..] {
        for l in c
            .log()
            .lines()
            .filter(|l| l.contains("ERROR") || l.contains("WARN"))
        {
            let kind: String = l
                .split_whitespace()
                .skip(2)
                .take(8)
                .collect::<Vec<_>>()
                .join(" ")
                .chars()
                .filter(|ch| !ch.is_ascii_digit())
                .collect();
            if seen.insert(kind) && seen.len() <= 8 {
                println!("fleet: collector log: {l}");
            }
        }
    }
    assert_eq!(
        (rows, count),
        (expected_rows, expected_count),
        "every aggregate in PostgreSQL once, with every reading counted"
    );
    let batches = n as u64 * windows;
    assert_eq!(
        (state.messages, state.subjects_count),
        (batches, batches),
        "one message per batch in the stream, each batch id once"
    );
    assert!(
        failover.len() >= on_killed,
        "every gateway of the killed collector reconnected: {} of {on_killed}",
        failover.len()
    );
    assert_eq!(moved_back, 0, "nobody reconnected to the dead collector");
    if !bench {
        println!("fleet: smoke run passed (the figures mean nothing here)");
    }
    drop(loaders);
    drop(collectors);
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    if bench {
        let windows: u64 = env_or("EDGEFERRY_FLEET_WINDOWS", "6").parse().unwrap();
        for n in env_or("EDGEFERRY_FLEET_GATEWAYS", "1000,5000,10000").split(',') {
            run(
                n.trim().parse().unwrap(),
                windows,
                Duration::from_secs(10),
                true,
            )
            .await;
        }
    } else {
        run(20, 4, Duration::from_secs(2), false).await;
    }
}
