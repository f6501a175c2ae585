//! The central side on NATS JetStream (`edgeferry collect --sink nats://…`), against a real
//! `nats-server -js` and real collector processes: collectors share nothing but the engine,
//! a batch id is in the stream once whatever collector it reaches and however late, and a
//! collector that loses the engine stops acknowledging, says so on `/healthz`, and recovers.

mod common;

use common::nats::NatsServer;
use common::wsclient::*;
use common::{Collector, wait_for};
use edgeferry::protocol::{DictEncoder, Frame};
use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::time::Duration;

async fn jetstream(nats: &NatsServer) -> async_nats::jetstream::Context {
    let client = async_nats::connect(nats.url()).await.unwrap();
    async_nats::jetstream::new(client)
}

/// Every message of the stream, in order: (subject, headers' batch id, JSON lines).
async fn stream_messages(nats: &NatsServer) -> Vec<(String, String, Vec<serde_json::Value>)> {
    let js = jetstream(nats).await;
    let mut stream = js.get_stream("EDGEFERRY").await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        let Ok(m) = stream.get_raw_message(seq).await else {
            continue;
        };
        let batch = m
            .headers
            .get("Edgeferry-Batch")
            .map(|v| v.as_str().to_string())
            .unwrap_or_default();
        let lines = std::str::from_utf8(&m.payload)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        out.push((m.subject.to_string(), batch, lines));
    }
    out
}

fn nats_collector(nats: &NatsServer) -> Collector {
    let mut c = Collector::new(&["--sink", &nats.sink(), "--metrics-listen", "127.0.0.1:0"]);
    c.start();
    c
}

fn addr(c: &Collector) -> String {
    format!("127.0.0.1:{}", c.port)
}

#[tokio::test]
async fn any_collector_serves_any_gateway_and_a_batch_is_in_the_stream_once() {
    let nats = NatsServer::start();
    let a = nats_collector(&nats);
    let b = nats_collector(&nats);

    let mut ws = connect_plain(&addr(&a)).await;
    assert!(handshake(&mut ws, "site.1", 7, 1).await.stored.is_empty());
    let mut enc = DictEncoder::new();
    for seq in 1..=3 {
        send_batch(&mut ws, &mut enc, seq, &aggregate_batch(seq, 3))
            .await
            .unwrap();
        assert_eq!(expect_ack(&mut ws).await, [seq]);
    }
    send_batch(&mut ws, &mut enc, 4, &alert_batch())
        .await
        .unwrap();
    assert_eq!(expect_ack(&mut ws).await, [4]);
    drop(ws);

    // The other collector knows what the first stored: the marks are in the engine, written
    // by the first collector right after its acks (they save resends; the stream decides).
    let js = jetstream(&nats).await;
    let kv = js.get_key_value("EDGEFERRY_MARKS").await.unwrap();
    let mut marked = false;
    for _ in 0..250 {
        if let Ok(Some(v)) = kv.get("site=1.7").await
            && serde_json::from_slice::<serde_json::Value>(&v).unwrap()["stored"]
                == serde_json::json!([[1, 4]])
        {
            marked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        marked,
        "the marks of batches 1–4 reach the bucket within 5 s"
    );
    let mut ws = connect_plain(&addr(&b)).await;
    assert_eq!(handshake(&mut ws, "site.1", 7, 1).await.stored, [(1, 4)]);
    // A redelivery through it is acknowledged and not stored again.
    let mut enc = DictEncoder::new();
    send_batch(&mut ws, &mut enc, 2, &aggregate_batch(2, 3))
        .await
        .unwrap();
    assert_eq!(expect_ack(&mut ws).await, [2]);
    drop(ws);

    let msgs = stream_messages(&nats).await;
    let subjects: Vec<&str> = msgs.iter().map(|m| m.0.as_str()).collect();
    assert_eq!(
        subjects,
        [
            "edgeferry.site=1.batch.7.1",
            "edgeferry.site=1.batch.7.2",
            "edgeferry.site=1.batch.7.3",
            "edgeferry.site=1.batch.7.4"
        ]
    );
    assert_eq!(msgs[1].1, "2", "the batch id is in the headers");
    // The payload is the batch's JSON lines, field names as in the JSONL files.
    let agg = &msgs[0].2[0];
    assert_eq!(agg["kind"], "aggregate");
    assert_eq!(agg["gateway"], "site.1");
    assert_eq!(
        (agg["epoch"].as_u64(), agg["batch"].as_u64()),
        (Some(7), Some(1))
    );
    for field in [
        "series",
        "metric",
        "tags",
        "window_start",
        "window_secs",
        "version",
        "count",
        "sum",
        "p99",
    ] {
        assert!(agg.get(field).is_some(), "{field} missing in {agg}");
    }
    assert_eq!(msgs[0].2.len(), 3);
    let alerts = &msgs[3].2;
    assert_eq!(
        alerts
            .iter()
            .map(|l| l["state"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["raised", "cleared"]
    );

    // A Hello moves the gateway's floor up (never down); below it nothing is stored again.
    let mut ws = connect_plain(&addr(&a)).await;
    assert_eq!(handshake(&mut ws, "site.1", 7, 3).await.stored, [(3, 4)]);
    drop(ws);
    let mut ws = connect_plain(&addr(&b)).await;
    assert_eq!(handshake(&mut ws, "site.1", 7, 1).await.stored, [(3, 4)]);
    let mut enc = DictEncoder::new();
    send_batch(&mut ws, &mut enc, 1, &aggregate_batch(1, 3))
        .await
        .unwrap();
    assert_eq!(expect_ack(&mut ws).await, [1]);
    // Another epoch is another identity.
    drop(ws);
    let mut ws = connect_plain(&addr(&b)).await;
    assert!(handshake(&mut ws, "site.1", 8, 1).await.stored.is_empty());
    assert_eq!(stream_messages(&nats).await.len(), 4);
}

#[tokio::test]
async fn collectors_killed_mid_stream_with_failover_store_every_item_once() {
    let nats = NatsServer::start();
    let mut cs = [nats_collector(&nats), nats_collector(&nats)];
    let mut r = Resender {
        gateway: "gw-crash".into(),
        total: 240,
        next: 0,
        unacked: BTreeSet::new(),
        acked: 0,
    };
    // The gateway fails over to the other collector each time the one it uses dies with
    // batches in flight; the dead one comes back later.
    let mut using = 0;
    for kill_at in [30usize, 80, 150, 200] {
        while !r.session(&addr(&cs[using]), Some(kill_at)).await {
            if r.acked >= kill_at {
                break;
            }
        }
        cs[using].kill9();
        let other = 1 - using;
        if !cs[other].is_running() {
            cs[other].start();
        }
        using = other;
    }
    let mut rounds = 0;
    while !r.session(&addr(&cs[using]), None).await {
        rounds += 1;
        assert!(rounds < 20, "cannot finish; log:\n{}", cs[using].log());
    }
    assert!(r.unacked.is_empty() && r.next == r.total);

    let msgs = stream_messages(&nats).await;
    let batches: BTreeSet<&str> = msgs.iter().map(|m| m.1.as_str()).collect();
    assert_eq!(msgs.len(), 240, "one stream message per batch");
    assert_eq!(batches.len(), 240, "no batch id twice");
    let mut seen: HashMap<(String, String, u64), usize> = HashMap::new();
    for l in msgs.iter().flat_map(|m| &m.2) {
        let k = (
            l["series"].as_str().unwrap().to_string(),
            l["window_start"].as_str().unwrap().to_string(),
            l["version"].as_u64().unwrap(),
        );
        *seen.entry(k).or_default() += 1;
    }
    assert!(seen.values().all(|&n| n == 1), "an item stored twice");
    assert_eq!(seen.len(), 240 * 5, "every item exactly once");
}

#[tokio::test]
async fn losing_the_engine_stops_acks_reports_unhealthy_and_recovers() {
    let mut nats = NatsServer::start();
    let c = nats_collector(&nats);
    wait_for("healthz 200", Duration::from_secs(10), || {
        c.get("/healthz").is_some_and(|(code, _)| code == 200)
    });

    nats.kill9();
    wait_for("healthz 503", Duration::from_secs(15), || {
        c.get("/healthz")
            .is_some_and(|(code, body)| code == 503 && body.contains("NATS"))
    });
    let metrics = c.get("/metrics").unwrap().1;
    assert!(
        metrics.contains("edgeferry_collect_sink_up{sink=\"nats\"} 0"),
        "{metrics}"
    );
    // No acknowledgement while the engine is away: the Hello already fails (the resume
    // point is in the engine), and so would a batch.
    let mut ws = connect_plain(&addr(&c)).await;
    send(&mut ws, &hello("gw-x", 1, 1)).await.unwrap();
    match recv(&mut ws).await {
        Some(Frame::Error(e)) => assert!(e.message.contains("storage"), "{e:?}"),
        None => {}
        other => panic!("expected an error or a close, got {other:?}"),
    }

    nats.start_again();
    wait_for("healthz 200 again", Duration::from_secs(30), || {
        c.get("/healthz").is_some_and(|(code, _)| code == 200)
    });
    let mut ws = connect_plain(&addr(&c)).await;
    assert!(handshake(&mut ws, "gw-x", 1, 1).await.stored.is_empty());
    let mut enc = DictEncoder::new();
    send_batch(&mut ws, &mut enc, 1, &aggregate_batch(1, 2))
        .await
        .unwrap();
    assert_eq!(expect_ack(&mut ws).await, [1]);
    assert_eq!(stream_messages(&nats).await.len(), 1);
    let metrics = c.get("/metrics").unwrap().1;
    assert!(
        metrics.contains("edgeferry_collect_sink_up{sink=\"nats\"} 1"),
        "{metrics}"
    );
    assert!(
        c.log().contains("NATS JetStream sink failing"),
        "{}",
        c.log()
    );
}

/// Runs `edgeferry collect --sink sink`, which must exit with an error; returns its stderr.
fn collect_refused(sink: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edgeferry"))
        .args(["collect", "--listen", "127.0.0.1:0", "--sink", sink])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "collect --sink {sink} started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn a_stream_of_the_same_name_with_other_settings_is_refused_clearly() {
    let nats = NatsServer::start();
    let js = jetstream(&nats).await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "EDGEFERRY".into(),
        subjects: vec!["edgeferry.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let err = collect_refused(&nats.sink());
    assert!(
        err.contains("stream EDGEFERRY exists but is not edgeferry's")
            && err.contains("max_msgs_per_subject 1"),
        "{err}"
    );
}

#[test]
fn a_stream_larger_than_the_engine_grants_is_refused_with_the_option_to_lower() {
    // The test servers grant 1 GiB of file storage; the default stream is 10 GiB, which
    // JetStream reserves at creation. The collector must say what to change, not wait.
    let nats = NatsServer::start();
    let err = collect_refused(&nats.url());
    assert!(
        err.contains("cannot reserve its max_bytes (10.0 GiB")
            && err.contains("give a smaller ?max_bytes= in the sink URL")
            && err.contains("max_file_store"),
        "{err}"
    );
}

#[test]
fn bad_sink_arguments_are_refused_with_what_to_write() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edgeferry"))
        .args([
            "collect",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            "/nonexistent",
            "--sink",
            "nats://127.0.0.1:4222?replica=3",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("unknown option \"replica\""), "{err}");
}

#[tokio::test]
async fn a_resend_after_the_duplicate_window_is_still_stored_once_mark_or_no_mark() {
    let nats = NatsServer::start();
    let c = nats_collector(&nats);
    let mut ws = connect_plain(&addr(&c)).await;
    handshake(&mut ws, "gw-late", 3, 1).await;
    let mut enc = DictEncoder::new();
    for seq in 1..=3 {
        send_batch(&mut ws, &mut enc, seq, &aggregate_batch(seq, 2))
            .await
            .unwrap();
        assert_eq!(expect_ack(&mut ws).await, [seq]);
    }
    drop(ws);
    // Shrink JetStream's own deduplication (Nats-Msg-Id) to one second and let it pass.
    let js = jetstream(&nats).await;
    let mut stream = js.get_stream("EDGEFERRY").await.unwrap();
    let mut config = stream.info().await.unwrap().config.clone();
    config.duplicate_window = Duration::from_secs(1);
    js.update_stream(config).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // A late resend with its mark in place: the mark says stored.
    let mut ws = connect_plain(&addr(&c)).await;
    handshake(&mut ws, "gw-late", 3, 1).await;
    let mut enc = DictEncoder::new();
    send_batch(&mut ws, &mut enc, 2, &aggregate_batch(2, 2))
        .await
        .unwrap();
    assert_eq!(expect_ack(&mut ws).await, [2]);
    drop(ws);
    // The resend's mark is written after its ack, by the collector's writer task; a Hello
    // first writes what is still pending for its entry. Without this one, a slow writer (a
    // loaded machine) put the mark back after the delete below, and the entry was not lost.
    let mut ws = connect_plain(&addr(&c)).await;
    handshake(&mut ws, "gw-late", 3, 1).await;
    drop(ws);
    // The marks lost (a collector that died between the stream's ack and the mark): the
    // stream itself refuses the batch's subject a second message.
    let kv = js.get_key_value("EDGEFERRY_MARKS").await.unwrap();
    kv.delete("gw-late.3").await.unwrap();
    let mut ws = connect_plain(&addr(&c)).await;
    assert!(handshake(&mut ws, "gw-late", 3, 1).await.stored.is_empty());
    let mut enc = DictEncoder::new();
    for seq in [3, 1] {
        send_batch(&mut ws, &mut enc, seq, &aggregate_batch(seq, 2))
            .await
            .unwrap();
        assert_eq!(expect_ack(&mut ws).await, [seq]);
    }
    drop(ws);
    let msgs = stream_messages(&nats).await;
    assert_eq!(
        msgs.len(),
        3,
        "{:?}",
        msgs.iter().map(|m| &m.0).collect::<Vec<_>>()
    );
    // And the marks are back for what was resent.
    let mut ws = connect_plain(&addr(&c)).await;
    assert_eq!(
        handshake(&mut ws, "gw-late", 3, 1).await.stored,
        [(1, 1), (3, 3)]
    );
}

#[tokio::test]
async fn a_collector_started_before_the_engine_waits_says_so_and_then_serves() {
    let port = common::free_port();
    let dir = tempfile::tempdir().unwrap();
    let listen = common::free_port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_edgeferry"))
        .args([
            "collect",
            "--listen",
            &format!("127.0.0.1:{listen}"),
            "--metrics-listen",
            "127.0.0.1:0",
            "--sink",
            &common::nats::sink_url(&format!("nats://127.0.0.1:{port}")),
            "--data-dir",
        ])
        .arg(dir.path())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let metrics_addr = dir.path().join("metrics.addr");
    let health = || -> Option<(u16, String)> {
        let a = std::fs::read_to_string(&metrics_addr).ok()?;
        let mut s = std::net::TcpStream::connect(a.trim()).ok()?;
        write!(
            s,
            "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut r = String::new();
        s.read_to_string(&mut r).ok()?;
        Some((r.split(' ').nth(1)?.parse().ok()?, r))
    };
    wait_for(
        "healthz: opening the sinks",
        Duration::from_secs(10),
        || health().is_some_and(|(code, body)| code == 503 && body.contains("opening the sinks")),
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", listen)).is_err(),
        "gateways are not taken before the engine is there"
    );
    let nats = NatsServer::start_on(port);
    wait_for("the collector to listen", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", listen)).is_ok()
    });
    assert_eq!(health().unwrap().0, 200);
    let mut ws = connect_plain(&format!("127.0.0.1:{listen}")).await;
    handshake(&mut ws, "gw-early", 1, 1).await;
    let mut enc = DictEncoder::new();
    send_batch(&mut ws, &mut enc, 1, &aggregate_batch(1, 2))
        .await
        .unwrap();
    assert_eq!(expect_ack(&mut ws).await, [1]);
    assert_eq!(stream_messages(&nats).await.len(), 1);
    common::signal(child.id(), "KILL");
    let _ = child.wait();
}

#[tokio::test]
async fn a_gateways_whole_window_is_stored_at_once_and_a_full_buffer_makes_it_wait_without_loss() {
    // With the engine frozen (SIGSTOP), nothing a collector hands over gets stored: what it
    // holds shows how many batches of one connection it stores at once. The default buffer
    // takes the gateway's whole window; one smaller than a batch takes one batch, and the
    // next waits (counted). Thawed, every batch is acknowledged and in the stream once.
    for (max_buffered, whole_window) in [("256MiB", true), ("1KiB", false)] {
        let nats = NatsServer::start();
        let mut c = Collector::new(&[
            "--sink",
            &nats.sink(),
            "--metrics-listen",
            "127.0.0.1:0",
            "--max-buffered",
            max_buffered,
        ]);
        c.start();
        let mut ws = connect_plain(&addr(&c)).await;
        let window = u64::from(handshake(&mut ws, "gw-w", 3, 1).await.max_in_flight) - 1;
        let one_batch =
            edgeferry::collect::Sinks::lines("gw-w", 3, 1, &aggregate_batch(1, 10).items)
                .unwrap()
                .len() as f64;
        common::freeze(nats.pid().unwrap());
        let mut enc = DictEncoder::new();
        // Batch 5 twice: the copy is in flight with (or right after) the first.
        for seq in (1..=window).chain([5]) {
            send_batch(&mut ws, &mut enc, seq, &aggregate_batch(seq, 10))
                .await
                .unwrap();
        }
        let held = |c: &Collector| c.metric("edgeferry_collect_buffered_bytes");
        if whole_window {
            let all = (window + 1) as f64 * one_batch;
            wait_for(
                "the whole window in flight",
                Duration::from_secs(10),
                || held(&c) >= all,
            );
            // Counted at the collector's next turn of its loop, just after the last batch's
            // bytes: on a loaded machine a read in between sees 0.
            wait_for("the window counted full", Duration::from_secs(10), || {
                c.metric("edgeferry_collect_window_full_total") >= 1.0
            });
            assert_eq!(
                c.metric("edgeferry_collect_window_full_total"),
                1.0,
                "the gateway's window filled once, and the collector stopped reading it"
            );
        } else {
            wait_for("a batch waiting for room", Duration::from_secs(10), || {
                c.metric("edgeferry_collect_buffer_full_total") >= 1.0
            });
            assert!(held(&c) <= 1024.0, "{max_buffered}: holds {}", held(&c));
        }
        common::signal(nats.pid().unwrap(), "CONT");
        let mut acked: HashMap<u64, usize> = HashMap::new();
        while acked.values().sum::<usize>() < window as usize + 1 {
            for seq in expect_ack(&mut ws).await {
                *acked.entry(seq).or_default() += 1;
            }
        }
        for seq in 1..=window {
            let expected = if seq == 5 { 2 } else { 1 };
            assert_eq!(
                acked.get(&seq),
                Some(&expected),
                "{max_buffered}: batch {seq}"
            );
        }
        assert_eq!(acked.len() as u64, window, "{max_buffered}: {acked:?}");
        let stored = stream_messages(&nats).await;
        let batches: BTreeSet<String> = stored.iter().map(|(_, b, _)| b.clone()).collect();
        assert_eq!(
            stored.len() as u64,
            window,
            "{max_buffered}: one message per batch"
        );
        assert_eq!(batches.len() as u64, window, "{max_buffered}");
        assert!(stored.iter().all(|(_, _, lines)| lines.len() == 10));
        wait_for("the room given back", Duration::from_secs(3), || {
            held(&c) == 0.0
        });
    }
}
