//! The WebSocket(+TLS) upstream link: handshake, live-first sending, per-batch acks.
//!
//! ```text
//!  connect (TLS files and token re-read every time: rotation needs no restart)
//!    └─ Hello{gateway, epoch, first_seq} ─▶  ◀─ Welcome{stored ranges, max_in_flight, ...}
//!         mark `stored` as acknowledged (nothing is resent needlessly)
//!    └─ loop, at most max_in_flight unacknowledged batches:
//!         1. alerts lane (always first)
//!         2. aggregates appended since this connection started ("live")
//!         3. the backlog, oldest first, with whatever capacity is left
//!       Ack{seqs} ─▶ outbox.ack (segments freed below the low watermark)
//!       Heartbeat both ways; a silent peer is dropped after 3 intervals
//!  on any error: close, back off with full jitter, reconnect
//! ```
//!
//! Only batches below the processor's checkpointed watermark are ever read, so nothing that a
//! crash could make the processor emit differently is ever sent.

use super::{Cursors, ForwardStatus, UpstreamConfig, next_batch};
use crate::backoff::Backoff;
use crate::model::batch::OutboxBatch;
use crate::protocol::{self, DictEncoder, Frame, Hello};
use crate::store::outbox::{Lane, Outbox, lane_lsn};
use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;

/// Why one connection ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Connecting or the handshake failed.
    #[error("{0}")]
    Connect(String),
    /// The server sent an error frame.
    #[error("central side refused: {0:?} {1}")]
    Refused(protocol::ErrorCode, String),
    /// The connection broke or a frame was bad.
    #[error("{0}")]
    Broken(String),
    /// The outbox failed.
    #[error("outbox: {0}")]
    Outbox(#[from] crate::store::seglog::LogError),
    /// A TLS or token file changed: reconnect to use it.
    #[error("credentials changed on disk; reconnecting")]
    Rotated,
}

/// Everything the link needs.
pub struct Link {
    /// `[upstream]`.
    pub cfg: UpstreamConfig,
    /// Gateway id.
    pub gateway: String,
    /// Store epoch (replaced when the data directory turns out to be an older copy).
    pub epoch: u64,
    /// Data directory (holds the `epoch` file).
    pub data_dir: PathBuf,
    /// The outbox.
    pub outbox: Arc<Mutex<Outbox>>,
    /// Checkpointed outbox positions (aggregates, alerts).
    pub watermark: watch::Receiver<[u64; 2]>,
    /// Shared state for status.
    pub status: Arc<ForwardStatus>,
}

impl Link {
    /// Runs until `shutdown`: connect, forward, reconnect with backoff.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(500), self.cfg.reconnect_max);
        let mut last_logged: Option<String> = None;
        loop {
            let started = Instant::now();
            let r = tokio::select! {
                r = self.session() => r,
                _ = shutdown.cancelled() => break,
            };
            self.persist_acks();
            let msg = match r {
                Ok(()) => "closed by the central side".to_string(),
                Err(e) => e.to_string(),
            };
            self.status.link_down(&self.cfg.url, msg, &mut last_logged);
            if started.elapsed() > Duration::from_secs(30) {
                backoff.reset();
            }
            let pause = backoff.next_delay();
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.cancelled() => break,
            }
        }
        self.persist_acks();
    }

    fn persist_acks(&self) {
        let mut ob = self.outbox.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = ob.persist_acks() {
            tracing::warn!("cannot persist outbox acknowledgements: {e}");
        }
    }

    fn credential_files(&self) -> Vec<PathBuf> {
        [
            &self.cfg.ca_file,
            &self.cfg.cert_file,
            &self.cfg.key_file,
            &self.cfg.token_file,
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect()
    }

    async fn session(&mut self) -> Result<(), LinkError> {
        let files = self.credential_files();
        let stamp = mtimes(&files);
        let mut request = self
            .cfg
            .url
            .as_str()
            .into_client_request()
            .map_err(|e| LinkError::Connect(format!("bad upstream.url: {e}")))?;
        if let Some(tf) = &self.cfg.token_file {
            let token = std::fs::read_to_string(tf).map_err(|e| {
                LinkError::Connect(format!("upstream.token_file {}: {e}", tf.display()))
            })?;
            let value = format!("Bearer {}", token.trim()).parse().map_err(|e| {
                LinkError::Connect(format!("token is not a valid header value: {e}"))
            })?;
            request.headers_mut().insert("authorization", value);
        }
        let connector = if self.cfg.url.starts_with("wss://") {
            let tls = crate::tls::client_config(
                self.cfg.ca_file.as_deref(),
                self.cfg.cert_file.as_deref(),
                self.cfg.key_file.as_deref(),
            )
            .map_err(|e| LinkError::Connect(e.to_string()))?;
            Some(tokio_tungstenite::Connector::Rustls(Arc::new(tls)))
        } else {
            None
        };
        let (mut ws, _) = tokio::time::timeout(
            Duration::from_secs(15),
            tokio_tungstenite::connect_async_tls_with_config(request, None, true, connector),
        )
        .await
        .map_err(|_| LinkError::Connect("connect timed out".into()))?
        .map_err(|e| LinkError::Connect(e.to_string()))?;

        let first_seq = self
            .outbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .first_seq();
        let hello = Frame::Hello(Hello {
            gateway: self.gateway.clone(),
            epoch: self.epoch,
            versions: vec![protocol::PROTOCOL_VERSION],
            first_seq,
            software: format!("edgeferry/{}", env!("CARGO_PKG_VERSION")),
        });
        ws.send(Message::binary(protocol::encode(&hello)))
            .await
            .map_err(|e| LinkError::Broken(e.to_string()))?;
        let welcome = loop {
            let m = tokio::time::timeout(Duration::from_secs(15), ws.next())
                .await
                .map_err(|_| LinkError::Connect("no Welcome within 15 s".into()))?
                .ok_or_else(|| LinkError::Connect("closed during handshake".into()))?
                .map_err(|e| LinkError::Connect(e.to_string()))?;
            match m {
                Message::Binary(b) => match protocol::decode(&b, protocol::DEFAULT_MAX_FRAME)
                    .map_err(|e| LinkError::Broken(e.to_string()))?
                {
                    Frame::Welcome(w) => break w,
                    Frame::Error(e) => return Err(LinkError::Refused(e.code, e.message)),
                    other => {
                        return Err(LinkError::Broken(format!(
                            "expected Welcome, got {:?}",
                            other.kind()
                        )));
                    }
                },
                Message::Close(c) => {
                    return Err(LinkError::Connect(format!(
                        "closed during handshake: {c:?}"
                    )));
                }
                _ => {}
            }
        };
        // A data directory restored from an older copy reuses sequence numbers the central
        // side already stored: it would acknowledge new batches as duplicates and drop them.
        // The resume point gives it away (stored seqs this outbox has not written yet); the
        // cure is a new epoch, which makes every batch id new.
        let ahead = {
            let ob = self.outbox.lock().unwrap_or_else(|e| e.into_inner());
            stored_beyond_written(&welcome.stored, |lane| ob.next_lsn(lane))
        };
        if let Some(highest) = ahead {
            let old = self.epoch;
            self.epoch = crate::store::epoch::renew(&self.data_dir)
                .map_err(|e| LinkError::Connect(format!("cannot write a new epoch: {e}")))?;
            metrics::counter!("edgeferry_upstream_epoch_rotations_total").increment(1);
            tracing::error!(
                old = %format!("{old:016x}"),
                new = %format!("{:016x}", self.epoch),
                "the central side already stored batches this gateway has not written yet \
                 (seq {highest}): this data directory was restored from an older copy; \
                 continuing under a new store epoch"
            );
            let _ = ws.close(None).await;
            return Err(LinkError::Connect(
                "store epoch renewed; reconnecting".into(),
            ));
        }
        {
            let mut ob = self.outbox.lock().unwrap_or_else(|e| e.into_inner());
            for &(a, b) in &welcome.stored {
                for seq in a..=b.min(a + 1_000_000) {
                    let (lane, lsn) = lane_lsn(seq);
                    if lsn < ob.next_lsn(lane) && !ob.is_acked(seq) {
                        ob.ack(seq)?;
                    }
                }
            }
        }
        self.status.connected.store(true, Ordering::Relaxed);
        self.status.set_error(None);
        tracing::info!(
            url = %self.cfg.url,
            version = welcome.version,
            stored_ranges = welcome.stored.len(),
            "upstream connected"
        );

        let max_in_flight = welcome.max_in_flight.max(1) as usize;
        let heartbeat = Duration::from_secs(welcome.heartbeat_secs.max(1) as u64);
        let max_frame = welcome.max_frame;
        let mut dict = DictEncoder::new();
        let mut in_flight: HashMap<u64, Instant> = HashMap::new();
        // Live-first: what is appended from now on goes before the backlog.
        let live_start = *self.watermark.borrow();
        let mut cursors = Cursors::new(live_start);
        let mut heartbeat_tick = tokio::time::interval(heartbeat);
        let mut last_heard = Instant::now();
        let mut rotation_check = tokio::time::interval(Duration::from_secs(5));
        let mut persist = tokio::time::interval(Duration::from_secs(2));
        loop {
            // Fill the window.
            while in_flight.len() < max_in_flight {
                let wm = *self.watermark.borrow();
                let Some(b) = next_batch(&self.outbox, &mut cursors, wm)? else {
                    break;
                };
                if in_flight.contains_key(&b.seq) {
                    continue;
                }
                let batch: OutboxBatch = match postcard::from_bytes(&b.payload) {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::error!(seq = b.seq, "undecodable outbox batch skipped: {e}");
                        self.outbox
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .ack(b.seq)?;
                        continue;
                    }
                };
                let (d, frame) = dict.encode_batch(b.seq, &batch);
                if let Some(d) = d {
                    send(&mut ws, &d, max_frame).await?;
                }
                send(&mut ws, &frame, max_frame).await?;
                self.status.batches_sent.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("edgeferry_upstream_batches_sent_total").increment(1);
                in_flight.insert(b.seq, Instant::now());
            }
            tokio::select! {
                m = ws.next() => {
                    let m = m.ok_or_else(|| LinkError::Broken("connection closed".into()))?
                        .map_err(|e| LinkError::Broken(e.to_string()))?;
                    last_heard = Instant::now();
                    match m {
                        Message::Binary(b) => match protocol::decode(&b, protocol::DEFAULT_MAX_FRAME)
                            .map_err(|e| LinkError::Broken(e.to_string()))?
                        {
                            Frame::Ack(a) => {
                                let mut ob = self.outbox.lock().unwrap_or_else(|e| e.into_inner());
                                for seq in a.seqs {
                                    if let Some(sent) = in_flight.remove(&seq) {
                                        metrics::histogram!("edgeferry_upstream_ack_seconds").record(sent.elapsed().as_secs_f64());
                                    }
                                    ob.ack(seq)?;
                                    self.status.batches_acked.fetch_add(1, Ordering::Relaxed);
                                    metrics::counter!("edgeferry_upstream_batches_acked_total").increment(1);
                                }
                            }
                            Frame::Heartbeat(_) => {}
                            Frame::Error(e) => return Err(LinkError::Refused(e.code, e.message)),
                            other => return Err(LinkError::Broken(format!("unexpected {:?} frame", other.kind()))),
                        },
                        Message::Close(c) => return Err(LinkError::Broken(format!("closed by the central side: {c:?}"))),
                        _ => {}
                    }
                }
                r = self.watermark.changed() => {
                    if r.is_err() {
                        return Ok(()); // processing stopped: we are shutting down
                    }
                }
                _ = heartbeat_tick.tick() => {
                    if last_heard.elapsed() > heartbeat * 3 {
                        return Err(LinkError::Broken(format!("no frame from the central side for {:?}", last_heard.elapsed())));
                    }
                    let hb = Frame::Heartbeat(protocol::Heartbeat { time_ms: crate::clock::now_ms() });
                    send(&mut ws, &hb, max_frame).await?;
                }
                _ = rotation_check.tick() => {
                    if mtimes(&files) != stamp {
                        let _ = ws.close(None).await;
                        return Err(LinkError::Rotated);
                    }
                }
                _ = persist.tick() => self.persist_acks(),
            }
        }
    }
}

/// The first stored seq (per lane, the highest one of that lane) that this outbox has not
/// written yet, if any: proof that the data directory is an older copy than what the central
/// side saw.
///
/// Seqs interleave the lanes (`lsn << 1 | lane`), so each lane is judged by its own highest
/// stored seq. (Judging `highest` and `highest - 1` together took an aggregates seq `2N` for
/// alerts lsn `N - 1`, which a gateway that never raised an alert has not written: every
/// reconnect after the first stored batch renewed the epoch.)
fn stored_beyond_written(stored: &[(u64, u64)], next_lsn: impl Fn(Lane) -> u64) -> Option<u64> {
    Lane::PRIORITY.into_iter().find_map(|lane| {
        let of_lane = |seq: u64| lane_lsn(seq).0 == lane;
        let highest = stored.iter().rev().find_map(|&(a, b)| {
            if of_lane(b) {
                Some(b)
            } else if b > a {
                Some(b - 1)
            } else {
                None
            }
        })?;
        (lane_lsn(highest).1 >= next_lsn(lane)).then_some(highest)
    })
}

/// Bytes of the frame envelope around a body (magic, version, kind, length, CRC).
const ENVELOPE_LEN: usize = 12;

async fn send<S>(ws: &mut S, f: &Frame, max_frame: u32) -> Result<(), LinkError>
where
    S: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    let bytes = protocol::encode(f);
    if bytes.len() > max_frame as usize + ENVELOPE_LEN {
        return Err(LinkError::Broken(format!(
            "a {:?} frame of {} bytes exceeds the server's max_frame {max_frame}; lower upstream.batch_max",
            f.kind(),
            bytes.len()
        )));
    }
    ws.send(Message::binary(bytes))
        .await
        .map_err(|e| LinkError::Broken(e.to_string()))
}

fn mtimes(files: &[PathBuf]) -> Vec<Option<SystemTime>> {
    files
        .iter()
        .map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::outbox::seq_of;

    fn next(aggs: u64, alerts: u64) -> impl Fn(Lane) -> u64 {
        move |l| match l {
            Lane::Aggregates => aggs,
            Lane::Alerts => alerts,
        }
    }

    #[test]
    fn a_gateway_without_alerts_is_not_taken_for_a_restored_copy() {
        // Aggregates lsn 0..=5 stored, no alert ever written: seqs 0, 2, .., 10.
        let stored: Vec<(u64, u64)> = (0..6)
            .map(|l| (seq_of(Lane::Aggregates, l), seq_of(Lane::Aggregates, l)))
            .collect();
        assert_eq!(stored_beyond_written(&stored, next(6, 0)), None);
        // Nothing stored at all.
        assert_eq!(stored_beyond_written(&[], next(0, 0)), None);
    }

    #[test]
    fn both_lanes_stored_up_to_what_was_written_is_not_a_restored_copy() {
        // Both lanes lsn 0..=4 stored: one contiguous range 0..=9.
        assert_eq!(stored_beyond_written(&[(0, 9)], next(5, 5)), None);
    }

    #[test]
    fn a_restored_copy_is_caught_in_either_lane() {
        // The central side stored aggregates up to lsn 7, this outbox has written only 0..=4.
        let agg7 = seq_of(Lane::Aggregates, 7);
        assert_eq!(
            stored_beyond_written(&[(0, 0), (agg7, agg7)], next(5, 0)),
            Some(agg7)
        );
        // Alerts lsn 3 stored, this outbox's alerts lane has written 0..=1.
        let al3 = seq_of(Lane::Alerts, 3);
        assert_eq!(stored_beyond_written(&[(al3, al3)], next(0, 2)), Some(al3));
        // In a range ending on the other lane's seq.
        assert_eq!(stored_beyond_written(&[(0, 9)], next(5, 4)), Some(9));
    }
}
