//! `edgeferry collect` as a real process on an ephemeral loopback port, driven by a small
//! test client built on `edgeferry::protocol` and tokio-tungstenite.

mod common;

use common::certs::{Ca, ca, leaf, write};
use common::wsclient::*;

use edgeferry::protocol::{self, DictEncoder, ErrorCode, Frame, HEADER_LEN, Hello};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_tungstenite::Connector;
use tokio_tungstenite::tungstenite;

// ---------------------------------------------------------------------------------------------
// The collector process
// ---------------------------------------------------------------------------------------------

struct Collector {
    child: Option<Child>,
    dir: PathBuf,
    args: Vec<String>,
    addr: String,
}

impl Collector {
    fn start(dir: &Path, extra: &[&str]) -> Collector {
        let mut c = Collector {
            child: None,
            dir: dir.to_path_buf(),
            args: extra.iter().map(|s| s.to_string()).collect(),
            addr: String::new(),
        };
        c.spawn();
        c
    }

    fn spawn(&mut self) {
        let addr_file = self.dir.join("collect.addr");
        let _ = std::fs::remove_file(&addr_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("collect.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_edgeferry"))
            .arg("collect")
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&self.dir)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        common::wait_for("the collector to listen", Duration::from_secs(20), || {
            std::fs::read_to_string(&addr_file)
                .map(|s| s.ends_with('\n'))
                .unwrap_or(false)
        });
        self.addr = std::fs::read_to_string(&addr_file)
            .unwrap()
            .trim()
            .to_string();
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            common::signal(c.id(), "KILL");
            let _ = c.wait();
        }
    }

    fn restart_after_kill9(&mut self) {
        self.kill9();
        self.spawn();
    }

    fn term(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        common::signal(c.id(), "TERM");
        let start = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            if start.elapsed() > Duration::from_secs(20) {
                common::signal(c.id(), "KILL");
                panic!("collector did not stop on SIGTERM; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("collect.log")).unwrap_or_default()
    }

    fn out(&self, gateway: &str) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.dir.join("out").join(format!("{gateway}.jsonl")))
            .unwrap_or_default();
        assert!(text.is_empty() || text.ends_with('\n'), "torn last line");
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.kill9();
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn batches_are_written_as_jsonl_acked_deduplicated_and_listed_in_welcome() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Collector::start(dir.path(), &[]);
    let mut ws = connect_plain(&c.addr).await;
    let w = handshake(&mut ws, "gw-a", 7, 1).await;
    assert_eq!(w.version, protocol::PROTOCOL_VERSION);
    assert!(w.stored.is_empty());
    assert_eq!(w.max_frame, protocol::DEFAULT_MAX_FRAME);
    let mut enc = DictEncoder::new();
    send_batch(&mut ws, &mut enc, 1, &aggregate_batch(1, 3))
        .await
        .unwrap();
    assert_eq!(expect_ack(&mut ws).await, vec![1]);
    send_batch(&mut ws, &mut enc, 2, &alert_batch())
        .await
        .unwrap();
    assert_eq!(expect_ack(&mut ws).await, vec![2]);
    // Redelivery: acknowledged again, not written again.
    send_batch(&mut ws, &mut enc, 1, &aggregate_batch(1, 3))
        .await
        .unwrap();
    assert_eq!(expect_ack(&mut ws).await, vec![1]);
    send_batch(&mut ws, &mut enc, 4, &aggregate_batch(4, 1))
        .await
        .unwrap();
    assert_eq!(expect_ack(&mut ws).await, vec![4]);

    let lines = c.out("gw-a");
    assert_eq!(lines.len(), 6, "{lines:#?}");
    let agg = &lines[0];
    assert_eq!(
        keys(agg),
        set(&[
            "kind",
            "gateway",
            "epoch",
            "batch",
            "series",
            "metric",
            "tags",
            "window_start",
            "window_secs",
            "version",
            "count",
            "sum",
            "min",
            "max",
            "mean",
            "first",
            "last",
            "stddev",
            "p50",
            "p90",
            "p99",
            "sketch_keys",
            "sketch_counts"
        ])
    );
    assert_eq!(agg["kind"], "aggregate");
    assert_eq!(agg["gateway"], "gw-a");
    assert_eq!(agg["epoch"], 7);
    assert_eq!(agg["batch"], 1);
    assert_eq!(agg["series"], "temp{device=d0}");
    assert_eq!(agg["metric"], "temp");
    assert_eq!(agg["tags"], serde_json::json!({"device": "d0"}));
    assert_eq!(agg["window_start"], "2025-11-24T16:00:10Z");
    assert_eq!(agg["window_secs"], 10);
    assert_eq!(agg["version"], 1);
    assert_eq!(agg["count"], 10);
    assert_eq!(agg["min"], 20.0);
    assert_eq!(agg["max"], 20.9);
    assert_eq!(agg["first"], 20.0);
    assert_eq!(agg["last"], 20.9);
    let p50 = agg["p50"].as_f64().unwrap();
    assert!((p50 - 20.4).abs() / 20.4 < 0.011, "{p50}");
    let alert = &lines[3];
    assert_eq!(
        keys(alert),
        set(&[
            "kind", "gateway", "epoch", "batch", "rule", "series", "state", "value", "time"
        ])
    );
    assert_eq!(alert["kind"], "alert");
    assert_eq!(alert["rule"], "too-hot");
    assert_eq!(alert["series"], "temp{device=d0}");
    assert_eq!(alert["state"], "raised");
    assert_eq!(alert["value"], 31.5);
    assert_eq!(alert["time"], "2025-11-24T16:00:01.25Z");
    assert_eq!(lines[4]["state"], "cleared");
    assert!(lines[4]["value"].is_null());
    assert_eq!(lines[5]["batch"], 4);
    drop(ws);

    // After a reconnect, Welcome lists what is stored at or above first_seq.
    let mut ws = connect_plain(&c.addr).await;
    assert_eq!(
        handshake(&mut ws, "gw-a", 7, 1).await.stored,
        vec![(1, 2), (4, 4)]
    );
    drop(ws);
    let mut ws = connect_plain(&c.addr).await;
    assert_eq!(
        handshake(&mut ws, "gw-a", 7, 2).await.stored,
        vec![(2, 2), (4, 4)]
    );
    drop(ws);
    // Another epoch of the same gateway is another identity.
    let mut ws = connect_plain(&c.addr).await;
    assert!(handshake(&mut ws, "gw-a", 8, 1).await.stored.is_empty());
    drop(ws);

    assert!(c.term().success(), "SIGTERM must exit 0");
    // Restarted, the marks are still there.
    c.spawn();
    let mut ws = connect_plain(&c.addr).await;
    assert_eq!(
        handshake(&mut ws, "gw-a", 7, 2).await.stored,
        vec![(2, 2), (4, 4)]
    );
}

#[tokio::test]
async fn sigkill_mid_stream_and_resending_unacked_batches_stores_every_item_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Collector::start(dir.path(), &[]);
    let mut r = Resender {
        gateway: "gw-crash".into(),
        total: 240,
        next: 0,
        unacked: BTreeSet::new(),
        acked: 0,
    };
    for kill_at in [30usize, 80, 150, 200] {
        while !r.session(&c.addr.clone(), Some(kill_at)).await {
            if r.acked >= kill_at {
                break;
            }
        }
        // Batches are in flight (being written) right now.
        c.restart_after_kill9();
    }
    let mut rounds = 0;
    while !r.session(&c.addr.clone(), None).await {
        rounds += 1;
        assert!(rounds < 20, "cannot finish; log:\n{}", c.log());
    }
    assert!(r.unacked.is_empty() && r.next == r.total);

    let lines = c.out("gw-crash");
    let mut seen: HashMap<(String, String, u64), usize> = HashMap::new();
    for l in &lines {
        let k = (
            l["series"].as_str().unwrap().to_string(),
            l["window_start"].as_str().unwrap().to_string(),
            l["version"].as_u64().unwrap(),
        );
        *seen.entry(k).or_default() += 1;
    }
    let dups: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dups.is_empty(), "written twice: {dups:?}");
    assert_eq!(lines.len(), 240 * 5, "every item exactly once");
    assert_eq!(seen.len(), 240 * 5);
    println!(
        "{} output-file recoveries after 4 SIGKILLs",
        c.log().matches("recovery removed").count()
    );
}

#[tokio::test]
async fn wrong_or_missing_bearer_token_gets_http_401_and_the_right_one_works() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        "# gateways of site A\n\n  s3cret-a  \nother-token\n",
    )
    .unwrap();
    let c = Collector::start(dir.path(), &["--token-file", tokens.to_str().unwrap()]);
    for token in [None, Some("wrong"), Some("s3cret")] {
        match connect("ws", &c.addr, token, None).await {
            Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
            Err(e) => panic!("token {token:?}: expected HTTP 401, got {e}"),
            Ok(_) => panic!("token {token:?} was accepted"),
        }
    }
    for token in ["s3cret-a", "other-token"] {
        let mut ws = connect("ws", &c.addr, Some(token), None).await.unwrap();
        handshake(&mut ws, "gw-auth", 1, 0).await;
    }
}

fn client_tls(trust: &Ca, client: Option<&(String, String)>, dir: &Path) -> Connector {
    let ca = write(dir, "trust.pem", &trust.pem);
    let (cert, key) = match client {
        Some((c, k)) => (
            Some(write(dir, "client.pem", c)),
            Some(write(dir, "client.key", k)),
        ),
        None => (None, None),
    };
    let config = edgeferry::tls::client_config(Some(&ca), cert.as_deref(), key.as_deref()).unwrap();
    Connector::Rustls(Arc::new(config))
}

#[tokio::test]
async fn tls_with_client_certificates_accepts_only_trusted_peers_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let certs = tempfile::tempdir().unwrap();
    let server_ca = ca("server CA");
    let client_ca = ca("client CA");
    let other_ca = ca("someone else");
    let (cert, key) = leaf(&server_ca, &["localhost", "127.0.0.1"], false);
    let server_cert = write(certs.path(), "server.pem", &cert);
    let server_key = write(certs.path(), "server.key", &key);
    let client_ca_file = write(certs.path(), "client-ca.pem", &client_ca.pem);
    let c = Collector::start(
        dir.path(),
        &[
            "--tls-cert",
            server_cert.to_str().unwrap(),
            "--tls-key",
            server_key.to_str().unwrap(),
            "--client-ca",
            client_ca_file.to_str().unwrap(),
        ],
    );
    let client = leaf(&client_ca, &["localhost", "127.0.0.1"], false);
    let rogue_client = leaf(&other_ca, &["localhost", "127.0.0.1"], false);

    // Trusted both ways.
    let tmp = tempfile::tempdir().unwrap();
    let mut ws = connect(
        "wss",
        &c.addr,
        None,
        Some(client_tls(&server_ca, Some(&client), tmp.path())),
    )
    .await
    .unwrap();
    handshake(&mut ws, "gw-tls", 1, 0).await;
    let mut enc = DictEncoder::new();
    send_batch(&mut ws, &mut enc, 0, &aggregate_batch(0, 2))
        .await
        .unwrap();
    assert_eq!(expect_ack(&mut ws).await, vec![0]);

    // No client certificate, or one from an untrusted CA: refused by the collector.
    for (what, cert) in [
        ("no client cert", None),
        ("untrusted client cert", Some(&rogue_client)),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let r = connect(
            "wss",
            &c.addr,
            None,
            Some(client_tls(&server_ca, cert, tmp.path())),
        )
        .await;
        assert!(r.is_err(), "{what}: the connection was accepted");
    }

    // A client that does not trust the server's CA refuses the server.
    let tmp = tempfile::tempdir().unwrap();
    match connect(
        "wss",
        &c.addr,
        None,
        Some(client_tls(&other_ca, Some(&client), tmp.path())),
    )
    .await
    {
        Err(e) => assert!(
            e.to_string().to_lowercase().contains("certificate"),
            "unexpected error: {e}"
        ),
        Ok(_) => panic!("an untrusted server certificate was accepted"),
    }
    assert_eq!(c.out("gw-tls").len(), 2);
}

fn envelope(version: u8, kind: u8, body: &[u8]) -> Vec<u8> {
    let mut m = b"EF".to_vec();
    m.push(version);
    m.push(kind);
    m.extend_from_slice(&(body.len() as u32).to_le_bytes());
    m.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    m.extend_from_slice(body);
    m
}

#[tokio::test]
async fn protocol_violations_get_an_error_frame_and_close_without_affecting_others() {
    let dir = tempfile::tempdir().unwrap();
    let c = Collector::start(
        dir.path(),
        &["--max-frame", "65536", "--handshake-timeout", "1s"],
    );

    // A healthy client stays connected through all of this.
    let mut healthy = connect_plain(&c.addr).await;
    handshake(&mut healthy, "gw-ok", 1, 0).await;
    let mut healthy_enc = DictEncoder::new();

    // A client that never says Hello is dropped after the handshake timeout.
    let mut silent = connect_plain(&c.addr).await;
    let started = Instant::now();

    let cases: Vec<(&str, bool, Vec<u8>, ErrorCode)> = vec![
        (
            "garbage",
            false,
            b"this is not a frame".to_vec(),
            ErrorCode::Malformed,
        ),
        (
            "bad CRC",
            false,
            {
                let mut m = protocol::encode(&hello("gw-x", 1, 0));
                m[8] ^= 0xff;
                m
            },
            ErrorCode::Malformed,
        ),
        (
            "unknown kind",
            false,
            envelope(1, 99, &[1, 2, 3]),
            ErrorCode::Malformed,
        ),
        (
            "unknown envelope version",
            false,
            envelope(7, 1, &[]),
            ErrorCode::UnsupportedVersion,
        ),
        (
            "batch before hello",
            false,
            {
                let (_, b) = DictEncoder::new().encode_batch(1, &aggregate_batch(1, 1));
                protocol::encode(&b)
            },
            ErrorCode::Malformed,
        ),
        (
            "no common version",
            false,
            protocol::encode(&Frame::Hello(Hello {
                gateway: "gw-x".into(),
                epoch: 1,
                versions: vec![9],
                first_seq: 0,
                software: "t".into(),
            })),
            ErrorCode::UnsupportedVersion,
        ),
        (
            "a gateway that speaks only version 1 (row-encoded batches)",
            false,
            protocol::encode(&Frame::Hello(Hello {
                gateway: "gw-old".into(),
                epoch: 1,
                versions: vec![1],
                first_seq: 0,
                software: "edgeferry/0.0".into(),
            })),
            ErrorCode::UnsupportedVersion,
        ),
        (
            "a batch in a version 1 envelope",
            false,
            {
                let (_, b) = DictEncoder::new().encode_batch(1, &aggregate_batch(1, 1));
                let mut m = protocol::encode(&b);
                m[2] = 1;
                m
            },
            ErrorCode::UnsupportedVersion,
        ),
        (
            "bad gateway id",
            false,
            protocol::encode(&hello("../etc", 1, 0)),
            ErrorCode::Malformed,
        ),
        (
            "oversized frame",
            true,
            envelope(1, 4, &vec![0u8; 65536 + 1000]),
            ErrorCode::TooLarge,
        ),
        (
            "far oversized message",
            true,
            envelope(2, 4, &vec![0u8; 300_000]),
            ErrorCode::TooLarge,
        ),
        (
            "unknown dict id",
            true,
            {
                // A batch encoded with a dictionary the server never received.
                let (_dict, b) = DictEncoder::new().encode_batch(1, &aggregate_batch(1, 1));
                protocol::encode(&b)
            },
            ErrorCode::UnknownSeries,
        ),
        (
            "body not a Batch",
            true,
            envelope(2, 4, &[0xff; 40]),
            ErrorCode::Malformed,
        ),
    ];
    for (what, after_hello, msg, code) in cases {
        let mut ws = connect_plain(&c.addr).await;
        if after_hello {
            handshake(&mut ws, "gw-bad", 1, 0).await;
        }
        let _ = send_raw(&mut ws, msg).await;
        let e = expect_error(&mut ws).await;
        assert_eq!(e.code, code, "{what}: {}", e.message);
        // The healthy client is unaffected.
        let seq = healthy_enc.len() as u64 + 100 * (code as u64 + 1) + what.len() as u64;
        send_batch(
            &mut healthy,
            &mut healthy_enc,
            seq,
            &aggregate_batch(seq, 1),
        )
        .await
        .unwrap();
        assert_eq!(expect_ack(&mut healthy).await, vec![seq], "after {what}");
    }

    // By now the silent client has been dropped (1 s timeout), without a frame.
    assert_eq!(recv(&mut silent).await, None);
    assert!(started.elapsed() < Duration::from_secs(10));
    // And a new client is still served.
    let mut ws = connect_plain(&c.addr).await;
    handshake(&mut ws, "gw-after", 1, 0).await;
    let log = c.log();
    assert!(
        log.contains("no Hello within the handshake timeout"),
        "{log}"
    );
    assert!(log.contains("TooLarge"), "{log}");
    assert_eq!(HEADER_LEN, 12);
}
