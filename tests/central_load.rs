//! `edgeferry load` between a real `nats-server -js` and a real PostgreSQL, fed by a real
//! collector: loaders SIGKILLed at random moments still leave every window once at its
//! highest version, and fleet-wide quantiles computed in SQL from the stored sketches are
//! the ones merging the same sketches in Rust gives.

mod common;

use common::Collector;
use common::loader::Loader;
use common::nats::NatsServer;
use common::postgres::Postgres;
use common::wsclient::*;
use edgeferry::model::aggregate::Aggregate;
use edgeferry::model::sketch::{Sketch, bin_key_value};
use edgeferry::protocol::{BatchKind, DictEncoder, OutboxBatch, OutboxItem};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

fn nats_collector(nats: &NatsServer) -> Collector {
    let mut c = Collector::new(&["--sink", &nats.sink()]);
    c.start();
    c
}

/// Sends `batches` in order over one session of `gateway` and waits for each ack.
async fn deliver(port: u16, gateway: &str, batches: &[OutboxBatch]) {
    let mut ws = connect_plain(&format!("127.0.0.1:{port}")).await;
    handshake(&mut ws, gateway, 1, 0).await;
    let mut enc = DictEncoder::new();
    for (seq, b) in batches.iter().enumerate() {
        send_batch(&mut ws, &mut enc, seq as u64, b).await.unwrap();
        assert_eq!(expect_ack(&mut ws).await, [seq as u64]);
    }
}

async fn scalar(db: &tokio_postgres::Client, sql: &str) -> i64 {
    db.query_one(sql, &[]).await.unwrap().get(0)
}

/// The correction of window `k` of `aggregate_batch`: version 2, one reading more.
fn corrections(k: u64) -> OutboxBatch {
    let mut b = aggregate_batch(k, 5);
    for item in &mut b.items {
        if let OutboxItem::Aggregate { version, agg, .. } = item {
            *version = 2;
            agg.add(99.0, 1_764_000_000_000 + 11_000);
        }
    }
    b
}

#[tokio::test]
async fn loaders_killed_at_random_leave_every_window_once_at_its_highest_version() {
    let nats = NatsServer::start();
    let pg = Postgres::start();
    let c = nats_collector(&nats);

    // 200 windows of 5 series, then corrections of the first 40 (out of order with the
    // originals of later ones: highest version wins, not last write), alerts twice.
    let mut batches: Vec<OutboxBatch> = (0..200).map(|k| aggregate_batch(k, 5)).collect();
    batches.extend((0..40).rev().map(corrections));
    batches.push(alert_batch());
    batches.push(alert_batch());
    deliver(c.port, "gw-load", &batches).await;

    // Two loaders on one consumer, two batches per transaction, one of them SIGKILLed at
    // a random moment again and again while rows are still arriving.
    let args = ["--batch", "2", "--ack-wait", "2s"];
    let mut loaders = [
        Loader::start(&nats, &pg, &args),
        Loader::start(&nats, &pg, &args),
    ];
    let db = pg.client().await;
    let progress = async |db: &tokio_postgres::Client| {
        db.query_one(
            "SELECT count(*) + count(*) FILTER (WHERE version = 2) FROM aggregates",
            &[],
        )
        .await
        .map(|r| r.get::<_, i64>(0))
        .unwrap_or(0)
    };
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut kills = 0;
    while Instant::now() < deadline && progress(&db).await < 1200 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        tokio::time::sleep(Duration::from_millis(20 + seed % 150)).await;
        let l = &mut loaders[(seed % 2) as usize];
        l.kill9();
        l.spawn();
        kills += 1;
    }
    assert!(kills >= 3, "only {kills} kills landed while loading");

    let expected_count: i64 = 160 * 5 * 10 + 40 * 5 * 11;
    let started = Instant::now();
    loop {
        let rows = db
            .query_one(
                "SELECT count(*), coalesce(sum(count), 0)::bigint, count(*) FILTER (WHERE version = 2) FROM aggregates",
                &[],
            )
            .await;
        if let Ok(r) = rows {
            let (n, sum, v2): (i64, i64, i64) = (r.get(0), r.get(1), r.get(2));
            if n == 1000 && sum == expected_count && v2 == 200 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "rows {n}, sum(count) {sum}, at version 2 {v2}; logs:\n{}\n{}",
                loaders[0].log(),
                loaders[1].log()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(scalar(&db, "SELECT count(*) FROM alerts").await, 2);
    assert_eq!(
        scalar(
            &db,
            "SELECT count(*) FROM aggregates WHERE version = 2 AND count <> 11"
        )
        .await,
        0
    );
    assert_eq!(
        scalar(&db, "SELECT max(version)::bigint FROM edgeferry_schema").await as i32,
        edgeferry::collect::load::MIGRATIONS.last().unwrap().0
    );
    println!("{kills} loader SIGKILLs");
}

/// Deterministic readings with a long tail: `base * (1 + u^8 * 50)`.
fn readings(seed: &mut u64, n: usize, base: f64) -> Vec<f64> {
    (0..n)
        .map(|_| {
            *seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let u = (*seed >> 11) as f64 / (1u64 << 53) as f64;
            base * (1.0 + u.powi(8) * 50.0)
        })
        .collect()
}

#[tokio::test]
async fn fleet_wide_p99_per_hour_in_sql_is_the_merge_of_the_sketches_in_rust() {
    let nats = NatsServer::start();
    let pg = Postgres::start();
    let c = nats_collector(&nats);
    let _loader = Loader::start(&nats, &pg, &[]);

    // Two gateways, three series each, a 1-minute window every 5 minutes for two hours.
    const HOUR0: i64 = 1_764_000_000_000 / 3_600_000 * 3_600_000;
    let mut seed = 7;
    let mut raw: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
    let mut merged: BTreeMap<i64, Sketch> = BTreeMap::new();
    let mut windows = 0;
    for gw in ["gw-north", "gw-south"] {
        let mut batches = Vec::new();
        for k in 0..24i64 {
            let start = HOUR0 + k * 300_000;
            let mut items = Vec::new();
            for s in 0..3 {
                let values = readings(&mut seed, 40 + s * 7, 20.0 + s as f64);
                let mut agg = Aggregate::new();
                for (i, v) in values.iter().enumerate() {
                    agg.add(*v, start + i as i64 * 1000);
                }
                let hour = start / 3_600_000 * 3_600_000;
                raw.entry(hour).or_default().extend(&values);
                merged.entry(hour).or_default().merge(agg.sketch());
                items.push(OutboxItem::Aggregate {
                    series: series(s).into(),
                    window_start_ms: start,
                    window_secs: 60,
                    version: 1,
                    agg,
                });
                windows += 1;
            }
            batches.push(OutboxBatch {
                kind: BatchKind::Aggregates,
                created_ms: start + 61_000,
                items,
            });
        }
        deliver(c.port, gw, &batches).await;
    }

    let db = pg.client().await;
    let started = Instant::now();
    // The loader creates the table: until then there is nothing to count.
    let loaded = async |db: &tokio_postgres::Client| {
        db.query_one("SELECT count(*) FROM aggregates", &[])
            .await
            .map_or(0, |r| r.get::<_, i64>(0))
    };
    while loaded(&db).await < windows {
        assert!(started.elapsed() < Duration::from_secs(30), "not loaded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let query = include_str!("../docs/sql/p99_per_hour.sql");
    let rows = db.query(query, &[&"temp", &60i32]).await.unwrap();
    assert_eq!(rows.len(), 2, "two hours");
    for row in rows {
        let hour: time::OffsetDateTime = row.get(0);
        let p99: f64 = row.get(1);
        let n: i64 = row.get(2);
        let hour_ms = (hour.unix_timestamp_nanos() / 1_000_000) as i64;
        let sketch = &merged[&hour_ms];
        // The same bins in SQL as merging in Rust.
        let bins: Vec<(i32, i64)> = db
            .query(
                "SELECT b.key, sum(b.n)::bigint FROM aggregates a, unnest(a.sketch_keys, a.sketch_counts) AS b(key, n)
                 WHERE a.metric = 'temp' AND a.window_secs = 60 AND date_trunc('hour', a.window_start) = $1
                 GROUP BY 1 ORDER BY 1",
                &[&hour],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let rust_bins: Vec<(i32, i64)> = sketch
            .keyed_bins()
            .into_iter()
            .map(|(k, c)| (k, c as i64))
            .collect();
        assert_eq!(bins, rust_bins, "hour {hour}");
        assert_eq!(n as u64, sketch.count());
        // The same quantile, and within the sketch's 1 % of the exact one.
        let want = sketch.quantile(0.99).unwrap();
        assert!((p99 - want).abs() <= want.abs() * 1e-12, "{p99} vs {want}");
        let mut exact = raw[&hour_ms].clone();
        exact.sort_by(f64::total_cmp);
        let e = exact[(0.99 * (exact.len() - 1) as f64).floor() as usize];
        assert!((p99 - e).abs() <= e * 0.01 + 1e-9, "p99 {p99}, exact {e}");
        assert!(bin_key_value(bins.last().unwrap().0) >= p99);
    }
}

fn gauge(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))?
        .rsplit(' ')
        .next()?
        .parse()
        .ok()
}

#[tokio::test]
async fn with_the_database_down_nothing_is_acked_the_lag_shows_and_it_loads_when_it_returns() {
    let nats = NatsServer::start();
    let c = nats_collector(&nats);
    let batches: Vec<OutboxBatch> = (0..30).map(|k| aggregate_batch(k, 4)).collect();
    deliver(c.port, "gw-lag", &batches).await;

    let db_port = common::free_port();
    let metrics_port = common::free_port();
    let metrics = format!("127.0.0.1:{metrics_port}");
    let loader = Loader::start_to(
        &nats,
        &common::postgres::url(db_port),
        &["--metrics-listen", &metrics],
    );
    common::wait_for("the lag on /metrics", Duration::from_secs(20), || {
        common::http_get(&metrics, "/metrics").is_some_and(|(_, m)| {
            gauge(&m, "edgeferry_load_lag_messages") == Some(30.0)
                && gauge(&m, "edgeferry_load_lag_seconds").is_some_and(|s| s > 0.0)
        })
    });
    let (code, body) = common::http_get(&metrics, "/healthz").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(
        loader.log().contains("cannot connect to PostgreSQL"),
        "{}",
        loader.log()
    );

    let pg = Postgres::start_on(db_port);
    let db = pg.client().await;
    let started = Instant::now();
    while db
        .query_one("SELECT count(*) FROM aggregates", &[])
        .await
        .map(|r| r.get::<_, i64>(0))
        .unwrap_or(0)
        < 120
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{}",
            loader.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    common::wait_for("lag 0 and healthy", Duration::from_secs(20), || {
        common::http_get(&metrics, "/metrics")
            .is_some_and(|(_, m)| gauge(&m, "edgeferry_load_lag_messages") == Some(0.0))
            && common::http_get(&metrics, "/healthz").is_some_and(|(code, _)| code == 200)
    });
    assert_eq!(
        scalar(&db, "SELECT sum(count)::bigint FROM aggregates").await,
        30 * 4 * 10
    );
}

/// The documented queries of docs/CENTRAL.md other than the p99 (tested above), run against
/// the loader's schema with rows written straight into the table.
#[tokio::test]
async fn the_documented_queries_find_silent_gateways_and_the_latest_value_per_series() {
    let pg = Postgres::start();
    let mut db = pg.client().await;
    edgeferry::collect::load::migrate(&mut db).await.unwrap();
    // gw-quiet's newest 10 s window ended 30 minutes ago, gw-live's a minute ago; gw-live's
    // series s1 has three windows, s2 one.
    for (gateway, series, ago_secs, last) in [
        ("gw-quiet", "s1", 1_810, 1.0),
        ("gw-quiet", "s1", 3_600, 0.5),
        ("gw-live", "s1", 70, 3.0),
        ("gw-live", "s1", 80, 2.0),
        ("gw-live", "s1", 90, 1.5),
        ("gw-live", "s2", 600, 7.0),
    ] {
        db.execute(
            "INSERT INTO aggregates (gateway, series, window_start, window_secs, metric, tags,
                 version, count, last, sketch_keys, sketch_counts, epoch, batch)
             VALUES ($1, $2, now() - make_interval(secs => $3), 10, 'temp', '{}', 1, 1, $4,
                 '{}', '{}', 1, 1)",
            &[&gateway, &series, &f64::from(ago_secs), &last],
        )
        .await
        .unwrap();
    }
    let silent = db
        .query(include_str!("../docs/sql/silent_gateways.sql"), &[&10i32])
        .await
        .unwrap();
    let names: Vec<String> = silent.iter().map(|r| r.get(0)).collect();
    assert_eq!(names, ["gw-quiet"], "silent for more than 10 minutes");

    let latest = db
        .query(include_str!("../docs/sql/latest_value.sql"), &[&10i32])
        .await
        .unwrap();
    let got: Vec<(String, String, f64)> = latest
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(5)))
        .collect();
    assert_eq!(
        got,
        [
            ("gw-live".to_string(), "s1".to_string(), 3.0),
            ("gw-live".into(), "s2".into(), 7.0),
            ("gw-quiet".into(), "s1".into(), 1.0),
        ]
    );
    assert!(
        db.query(include_str!("../docs/sql/latest_value.sql"), &[&60i32])
            .await
            .unwrap()
            .is_empty(),
        "no 1-minute windows"
    );
}

/// A Health frame as a gateway would send it.
fn health(backlog: u64, oldest: Option<u64>) -> edgeferry::protocol::Frame {
    edgeferry::protocol::Frame::Health(edgeferry::protocol::Health {
        time_ms: common::now_ms() as i64,
        uptime_secs: 100,
        backlog_batches: backlog,
        backlog_bytes: backlog * 1000,
        oldest_secs: oldest,
        broker_connected: true,
        software: "edgeferry/test".into(),
    })
}

/// `gateways` row of `gw` as (connected, collector, backlog_batches), once `ok` holds.
async fn gateway_row(
    db: &tokio_postgres::Client,
    gw: &str,
    what: &str,
    ok: impl Fn(bool, &str, Option<i64>) -> bool,
) -> (bool, String, Option<i64>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let row = db
            .query_opt(
                "SELECT connected, collector, backlog_batches FROM gateways WHERE gateway = $1",
                &[&gw],
            )
            .await
            .unwrap()
            .map(|r| (r.get(0), r.get::<_, String>(1), r.get(2)));
        if let Some((c, col, b)) = &row
            && ok(*c, col, *b)
        {
            return row.unwrap();
        }
        assert!(Instant::now() < deadline, "{gw}: {what}; row {row:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn collector_id(c: &Collector) -> String {
    let (_, body) = c.get("/fleet").unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["collector"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_table_follows_hello_health_failover_and_goodbyes_in_any_order() {
    let nats = NatsServer::start();
    let pg = Postgres::start();
    let args = ["--sink", &nats.sink(), "--metrics-listen", "127.0.0.1:0"];
    let (mut a, mut b) = (Collector::new(&args), Collector::new(&args));
    a.start();
    b.start();
    let (id_a, id_b) = (collector_id(&a), collector_id(&b));
    let mut db = pg.client().await;
    edgeferry::collect::load::migrate(&mut db).await.unwrap();
    let mut loader = Loader::start(&nats, &pg, &[]);

    // On collector A with a backlog of 7 batches, the oldest two hours old.
    let mut on_a = connect_plain(&format!("127.0.0.1:{}", a.port)).await;
    handshake(&mut on_a, "gw-1", 5, 0).await;
    send(&mut on_a, &health(7, Some(7200))).await.unwrap();
    gateway_row(
        &db,
        "gw-1",
        "connected on A with its backlog",
        |c, col, bl| c && col == id_a && bl == Some(7),
    )
    .await;

    // It fails over to B while A still holds the old session (A notices only later).
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut on_b = connect_plain(&format!("127.0.0.1:{}", b.port)).await;
    handshake(&mut on_b, "gw-1", 5, 0).await;
    send(&mut on_b, &health(0, None)).await.unwrap();
    gateway_row(&db, "gw-1", "connected on B, drained", |c, col, bl| {
        c && col == id_b && bl == Some(0)
    })
    .await;
    // A's late goodbye belongs to the older session: the row stays B's.
    drop(on_a);
    a.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let row = gateway_row(&db, "gw-1", "still B's", |_, _, _| true).await;
    assert_eq!(
        row,
        (true, id_b.clone(), Some(0)),
        "A's goodbye hid B's session"
    );

    // A loader starting over on an empty table replays the bucket to the same row, whatever
    // order A's and B's records come in.
    loader.kill9();
    db.execute("DELETE FROM gateways", &[]).await.unwrap();
    loader.spawn();
    let row = gateway_row(&db, "gw-1", "replayed", |_, _, _| true).await;
    assert_eq!(row, (true, id_b.clone(), Some(0)));

    // B's own goodbye counts.
    drop(on_b);
    gateway_row(&db, "gw-1", "disconnected", |c, col, _| !c && col == id_b).await;

    // The documented query: gw-2 holds batches two hours old, gw-silent was last heard
    // from half an hour ago; gw-1 just left and is neither.
    let mut on_b2 = connect_plain(&format!("127.0.0.1:{}", b.port)).await;
    handshake(&mut on_b2, "gw-2", 9, 0).await;
    send(&mut on_b2, &health(40, Some(7200))).await.unwrap();
    gateway_row(&db, "gw-2", "connected", |c, _, bl| c && bl == Some(40)).await;
    db.execute(
        "INSERT INTO gateways (gateway, connected, collector, connected_at, last_seen, epoch,
             software, peer, batches_acked, updated_at)
         VALUES ('gw-silent', true, 'gone', now() - interval '2 hours',
             now() - interval '30 minutes', '01', 'edgeferry/0.1.0', '', 0,
             now() - interval '30 minutes')",
        &[],
    )
    .await
    .unwrap();
    let behind = db
        .query(include_str!("../docs/sql/gateways_behind.sql"), &[&10i32])
        .await
        .unwrap();
    let names: Vec<String> = behind.iter().map(|r| r.get(0)).collect();
    assert_eq!(names, ["gw-silent", "gw-2"]);
    drop(on_b2);
}
