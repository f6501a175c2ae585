//! A small gateway-side client of the upstream protocol (edgeferry::protocol over
//! tokio-tungstenite) and test batches whose items are identified by (series key, window
//! start, version), for tests of `edgeferry collect`.

use edgeferry::model::aggregate::Aggregate;
use edgeferry::model::{Alert, AlertState, SeriesInfo};
use edgeferry::protocol::{
    self, BatchKind, DictEncoder, ErrorFrame, Frame, Hello, OutboxBatch, OutboxItem, Welcome,
};
use futures_util::{SinkExt, StreamExt};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

// ---------------------------------------------------------------------------------------------
// The test client
// ---------------------------------------------------------------------------------------------

pub async fn connect(
    scheme: &str,
    addr: &str,
    token: Option<&str>,
    connector: Option<Connector>,
) -> Result<Ws, tungstenite::Error> {
    let mut req = format!("{scheme}://{addr}/").into_client_request()?;
    if let Some(t) = token {
        req.headers_mut()
            .insert("Authorization", format!("Bearer {t}").parse().unwrap());
    }
    let (ws, _resp) =
        tokio_tungstenite::connect_async_tls_with_config(req, None, true, connector).await?;
    Ok(ws)
}

pub async fn connect_plain(addr: &str) -> Ws {
    connect("ws", addr, None, None).await.unwrap()
}

pub async fn send(ws: &mut Ws, frame: &Frame) -> Result<(), tungstenite::Error> {
    send_raw(ws, protocol::encode(frame)).await
}

pub async fn send_raw(ws: &mut Ws, bytes: Vec<u8>) -> Result<(), tungstenite::Error> {
    ws.send(Message::Binary(bytes.into())).await
}

/// The next protocol frame other than a heartbeat; `None` when the connection ends or
/// nothing arrives within 10 s.
pub async fn recv(ws: &mut Ws) -> Option<Frame> {
    loop {
        match timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => match protocol::decode(&b, u32::MAX).unwrap() {
                Frame::Heartbeat(_) => continue,
                f => return Some(f),
            },
            Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) | Err(_) => {
                return None;
            }
            Ok(Some(Ok(_))) => continue,
        }
    }
}

pub fn hello(gateway: &str, epoch: u64, first_seq: u64) -> Frame {
    Frame::Hello(Hello {
        gateway: gateway.into(),
        epoch,
        versions: protocol::SUPPORTED_VERSIONS.to_vec(),
        first_seq,
        software: "collector-test".into(),
    })
}

pub async fn handshake(ws: &mut Ws, gateway: &str, epoch: u64, first_seq: u64) -> Welcome {
    send(ws, &hello(gateway, epoch, first_seq)).await.unwrap();
    match recv(ws).await {
        Some(Frame::Welcome(w)) => w,
        other => panic!("expected Welcome, got {other:?}"),
    }
}

pub async fn send_batch(
    ws: &mut Ws,
    enc: &mut DictEncoder,
    seq: u64,
    batch: &OutboxBatch,
) -> Result<(), tungstenite::Error> {
    let (dict, frame) = enc.encode_batch(seq, batch);
    if let Some(d) = dict {
        send(ws, &d).await?;
    }
    send(ws, &frame).await
}

pub async fn expect_ack(ws: &mut Ws) -> Vec<u64> {
    match recv(ws).await {
        Some(Frame::Ack(a)) => a.seqs,
        other => panic!("expected Ack, got {other:?}"),
    }
}

/// Reads the Error frame and checks that the connection is closed after it.
pub async fn expect_error(ws: &mut Ws) -> ErrorFrame {
    let e = match recv(ws).await {
        Some(Frame::Error(e)) => e,
        other => panic!("expected Error, got {other:?}"),
    };
    assert_eq!(recv(ws).await, None, "connection must close after an Error");
    e
}

// ---------------------------------------------------------------------------------------------
// Test data: every item is identified by (series key, window start, version)
// ---------------------------------------------------------------------------------------------

pub const T0: i64 = 1_764_000_000_000;

pub fn series(i: usize) -> SeriesInfo {
    let mut tags = BTreeMap::new();
    tags.insert("device".to_string(), format!("d{i}"));
    SeriesInfo {
        key: edgeferry::model::series_key("temp", &tags),
        metric: "temp".into(),
        tags: tags.into(),
    }
}

pub fn aggregate_batch(seq: u64, items: usize) -> OutboxBatch {
    let items = (0..items)
        .map(|i| {
            let mut agg = Aggregate::new();
            for k in 0..10 {
                agg.add(20.0 + k as f64 / 10.0 + i as f64, T0 + k * 1000 + 5);
            }
            OutboxItem::Aggregate {
                series: series(i).into(),
                window_start_ms: T0 + seq as i64 * 10_000,
                window_secs: 10,
                version: 1,
                agg,
            }
        })
        .collect();
    OutboxBatch {
        kind: BatchKind::Aggregates,
        created_ms: T0 + seq as i64 * 10_000 + 12_000,
        items,
    }
}

pub fn alert_batch() -> OutboxBatch {
    let s = series(0);
    let alert = |state, value, t| {
        OutboxItem::Alert(Alert {
            rule: "too-hot".into(),
            series: s.key.clone(),
            metric: s.metric.clone(),
            tags: s.tags.to_map(),
            state,
            value,
            time_ms: t,
        })
    };
    OutboxBatch {
        kind: BatchKind::Alerts,
        created_ms: T0 + 5_000,
        items: vec![
            alert(AlertState::Raised, Some(31.5), T0 + 1_250),
            alert(AlertState::Cleared, None, T0 + 4_000),
        ],
    }
}

pub fn keys(v: &serde_json::Value) -> BTreeSet<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

pub fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// The gateway side of the crash test: resends everything unacknowledged after reconnecting
/// (minus what Welcome says is stored), keeping up to 16 batches in flight.
pub struct Resender {
    pub gateway: String,
    pub total: u64,
    pub next: u64,
    pub unacked: BTreeSet<u64>,
    pub acked: usize,
}

impl Resender {
    pub async fn session(&mut self, addr: &str, kill_after_acks: Option<usize>) -> bool {
        let Ok(mut ws) = connect("ws", addr, None, None).await else {
            return false;
        };
        let first = self.unacked.first().copied().unwrap_or(self.next);
        if send(&mut ws, &hello(&self.gateway, 99, first))
            .await
            .is_err()
        {
            return false;
        }
        let Some(Frame::Welcome(w)) = recv(&mut ws).await else {
            return false;
        };
        for (lo, hi) in w.stored {
            self.unacked.retain(|s| !(lo..=hi).contains(s));
        }
        let mut enc = DictEncoder::new();
        for seq in self.unacked.clone() {
            if send_batch(&mut ws, &mut enc, seq, &aggregate_batch(seq, 5))
                .await
                .is_err()
            {
                return false;
            }
        }
        loop {
            while self.unacked.len() < 16 && self.next < self.total {
                let seq = self.next;
                self.unacked.insert(seq);
                self.next += 1;
                if send_batch(&mut ws, &mut enc, seq, &aggregate_batch(seq, 5))
                    .await
                    .is_err()
                {
                    return false;
                }
            }
            if self.unacked.is_empty() {
                return true;
            }
            match recv(&mut ws).await {
                Some(Frame::Ack(a)) => {
                    for s in a.seqs {
                        if self.unacked.remove(&s) {
                            self.acked += 1;
                        }
                    }
                }
                _ => return false,
            }
            if kill_after_acks.is_some_and(|k| self.acked >= k) {
                // Leave with batches in flight; the caller kills the collector now.
                return false;
            }
        }
    }
}
