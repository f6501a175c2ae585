//! The one upstream link core both transports share: reconnect with backoff, the handshake's
//! resume point, the send window, acknowledgements, credential rotation, epoch renewal and the
//! bounded drain at shutdown. What differs between WebSocket and MQTT (how bytes travel, how an
//! acknowledgement arrives) is behind [`Transport`] and [`Connection`].
//!
//! ```text
//!  loop until the watermark channel closes:
//!    connect (TLS files and token re-read every time: rotation needs no restart)
//!      └─ Hello{gateway, epoch, first_seq} ─▶  ◀─ resume point (seqs already stored), window
//!           stored beyond what this outbox wrote?  ─▶ restored older copy: renew the epoch
//!           mark the stored seqs acknowledged (nothing is resent needlessly)
//!      └─ fill the window: alerts, then live aggregates, then the backlog (oldest first)
//!         acknowledgements ─▶ outbox.ack (segments freed below the low watermark)
//!         credential files changed ─▶ reconnect with them
//!    on error: back off with full jitter (reset after a link that lived 30 s), reconnect
//!  watermark channel closed (processing wrote its final checkpoint and stopped):
//!    connected: send what that checkpoint covers and wait for its acks, at most DRAIN_FOR
//!    not connected: stop now (the outbox keeps everything for the next start)
//! ```
//!
//! Only batches below the processor's checkpointed watermark are ever read, so nothing that a
//! crash could make the processor emit differently is ever sent.

use super::{Cursors, ForwardStatus, UpstreamConfig, next_batch};
use crate::backoff::Backoff;
use crate::model::batch::OutboxBatch;
use crate::protocol::{self, Hello};
use crate::store::outbox::{Lane, Outbox, lane_lsn};
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;

/// How long the link keeps sending after processing stopped: enough for the batches of the
/// final checkpoint on a working link, short enough that a dead link does not hold up a
/// systemd stop (what is not acknowledged stays in the outbox for the next start).
pub const DRAIN_FOR: Duration = Duration::from_secs(2);

/// A link that stayed up this long was healthy: the next failure starts the backoff afresh
/// instead of waiting as long as after a flapping one.
pub const STABLE_AFTER: Duration = Duration::from_secs(30);

/// How often the credential files' modification times are compared.
const ROTATION_CHECK: Duration = Duration::from_secs(5);

/// How often the gateway's [`protocol::Health`] is reported while the link runs (and once
/// right after the handshake).
pub const HEALTH_EVERY: Duration = Duration::from_secs(15);

/// What the link reports as the gateway's health: the daemon knows the broker connection
/// and the start time; the outbox part is filled in by the link.
pub type HealthSource = Arc<dyn Fn() -> protocol::Health + Send + Sync>;

/// How often acknowledgements are written to disk while the link runs.
const PERSIST_ACKS: Duration = Duration::from_secs(2);

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
    /// Reading from or acknowledging into the outbox failed; the connection ends and the link
    /// retries with backoff.
    #[error("outbox: {0}")]
    Outbox(#[from] crate::store::seglog::LogError),
    /// A TLS or token file changed: reconnect to use it.
    #[error("credentials changed on disk; reconnecting")]
    Rotated,
    /// The data directory is an older copy than what the central side stored; the link
    /// continues under a new store epoch.
    #[error("store epoch renewed; reconnecting")]
    EpochRenewed,
}

/// What the central side said at the handshake.
#[derive(Debug, Clone)]
pub struct Resume {
    /// Seq ranges (inclusive) already stored under this gateway's epoch, when the transport
    /// can tell.
    pub stored: Vec<(u64, u64)>,
    /// Most batches sent and not yet acknowledged.
    pub max_in_flight: usize,
    /// For the "connected" log line (protocol version, broker, ...).
    pub detail: String,
}

/// How to reach the central side. Every `connect` re-reads the credential files.
pub trait Transport: Send {
    /// One established connection, used until it fails; the next `connect` makes a new one.
    type Conn: Connection;

    /// Connects to `url` (one of `[upstream] url`) and performs the handshake with `hello`.
    fn connect(
        &mut self,
        url: &str,
        hello: &Hello,
    ) -> impl Future<Output = Result<(Self::Conn, Resume), LinkError>> + Send;
}

/// One established connection to the central side.
pub trait Connection: Send {
    /// Sends one batch; `hello` is current (its `first_seq` included).
    fn send(
        &mut self,
        seq: u64,
        batch: &OutboxBatch,
        hello: &Hello,
    ) -> impl Future<Output = Result<(), LinkError>> + Send;

    /// The next acknowledged seqs. Cancel-safe: the core waits for it beside its timers.
    fn acks(&mut self) -> impl Future<Output = Result<Vec<u64>, LinkError>> + Send;

    /// Reports the gateway's health, where the transport and the negotiated version carry it
    /// (WebSocket, protocol version 3); others ignore it.
    fn health(
        &mut self,
        _health: &protocol::Health,
    ) -> impl Future<Output = Result<(), LinkError>> + Send {
        async { Ok(()) }
    }

    /// The highest seq per lane the central side is known to have stored, for transports
    /// whose handshake cannot say (MQTT keeps it in a retained state message): written
    /// when acknowledgements were persisted, at most every 2 s.
    fn stored_state(&mut self, _acked: [Option<u64>; 2]) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Closes politely (best effort).
    fn close(&mut self) -> impl Future<Output = ()> + Send;
}

/// Everything the link needs besides its transport.
pub struct LinkParts {
    /// `[upstream]` as configured: the URLs (named in logs and status) and the reconnect backoff.
    pub cfg: UpstreamConfig,
    /// `[gateway] id`, sent in every Hello.
    pub gateway: String,
    /// Store epoch (replaced when the data directory turns out to be an older copy).
    pub epoch: u64,
    /// Data directory (holds the `epoch` file).
    pub data_dir: PathBuf,
    /// The outbox batches are read from and acknowledgements recorded in (shared with
    /// processing).
    pub outbox: Arc<Mutex<Outbox>>,
    /// Checkpointed outbox positions (aggregates, alerts); closes when processing stops.
    pub watermark: watch::Receiver<[u64; 2]>,
    /// Shared state for status.
    pub status: Arc<ForwardStatus>,
    /// The broker and uptime part of the health reports.
    pub health: HealthSource,
    /// Cancelled to end this link at once, without the drain (a configuration reload
    /// replaces it with one for the new `[upstream]`): batches in flight stay in the outbox
    /// and the next link sends them again under the same ids, which the central side
    /// deduplicates.
    pub stop: tokio_util::sync::CancellationToken,
}

/// The upstream link over transport `T`.
pub struct Link<T> {
    parts: LinkParts,
    transport: T,
    /// Processing has stopped: no new batches will come.
    closed: bool,
    /// The highest acknowledged seq per lane this process has seen.
    acked_high: [Option<u64>; 2],
    /// The acknowledgement state could not be written at the last attempt (a full, failing
    /// or read-only disk): logged once per episode, not at every attempt.
    acks_unwritable: bool,
    /// Which of `[upstream] url` the link uses: a random one at start, so that a fleet
    /// spreads over its collectors; the next one after each failure.
    current: usize,
    /// The URLs a switch away from was logged since the link was last up: when all of them
    /// are down the link goes round them without a log line per attempt.
    switch_logged: std::collections::HashSet<usize>,
}

/// How a connection ended without an error.
enum End {
    /// Everything the final checkpoint covers was acknowledged, or the drain time ran out.
    Drained,
}

impl<T: Transport> Link<T> {
    /// A link that has not connected yet.
    pub fn new(parts: LinkParts, transport: T) -> Link<T> {
        let link = Link {
            closed: false,
            acked_high: [None, None],
            acks_unwritable: false,
            current: rand::random_range(0..parts.cfg.url.list().len().max(1)),
            switch_logged: Default::default(),
            parts,
            transport,
        };
        link.parts.status.set_url(link.url());
        link
    }

    /// The URL the link uses now.
    fn url(&self) -> &str {
        self.parts
            .cfg
            .url
            .list()
            .get(self.current)
            .map_or("", String::as_str)
    }

    /// Moves to the next URL after `why` ended the link or its attempt on the current one
    /// (counted; logged once per URL until a link is up again).
    fn switch(&mut self, why: &str) {
        let n = self.parts.cfg.url.list().len();
        if n < 2 {
            return;
        }
        let from = self.url().to_string();
        let was = self.current;
        self.current = (self.current + 1) % n;
        metrics::counter!("edgeferry_upstream_switches_total").increment(1);
        self.parts.status.switches.fetch_add(1, Ordering::Relaxed);
        self.parts.status.set_url(self.url());
        if self.switch_logged.insert(was) {
            tracing::warn!(
                "upstream {from} failed ({why}); switching to {}",
                self.url()
            );
        }
    }

    /// Runs until the watermark channel closes (processing stopped), then drains for at most
    /// [`DRAIN_FOR`]; or until [`LinkParts::stop`] is cancelled, at once.
    pub async fn run(mut self) {
        let p = &self.parts;
        let mut backoff = Backoff::new(Duration::from_millis(500), p.cfg.reconnect_max);
        let mut last_logged: Option<String> = None;
        let stop = self.parts.stop.clone();
        while !self.closed {
            let started = Instant::now();
            let r = tokio::select! {
                r = self.session() => r,
                _ = stop.cancelled() => break,
            };
            self.persist_acks();
            let (msg, elsewhere) = match r {
                Ok(End::Drained) => break,
                // A failure of this central endpoint: another may work. New credentials
                // or a new epoch are retried where they came up; a local outbox error is
                // the gateway's.
                Err(
                    e @ (LinkError::Connect(_) | LinkError::Refused(..) | LinkError::Broken(_)),
                ) => (e.to_string(), true),
                Err(e) => (e.to_string(), false),
            };
            let p = &self.parts;
            p.status
                .link_down(self.url(), msg.clone(), &mut last_logged);
            if elsewhere {
                self.switch(&msg);
            }
            if self.closed {
                break;
            }
            if started.elapsed() >= STABLE_AFTER {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            // What the link waits now, for whoever wonders why it is not reconnecting yet.
            metrics::gauge!("edgeferry_upstream_reconnect_delay_seconds").set(delay.as_secs_f64());
            metrics::gauge!("edgeferry_upstream_reconnect_attempt").set(backoff.attempts() as f64);
            let pause = tokio::time::sleep(delay);
            tokio::pin!(pause);
            loop {
                tokio::select! {
                    _ = &mut pause => break,
                    r = self.parts.watermark.changed() => if r.is_err() {
                        self.closed = true;
                        break;
                    },
                    _ = stop.cancelled() => {
                        self.closed = true;
                        break;
                    }
                }
            }
        }
        self.parts.status.connected.store(false, Ordering::Relaxed);
        self.persist_acks();
    }

    /// Writes the acknowledgement state. A failure costs only resends after a crash (the
    /// central side deduplicates them), so the link goes on and tries again at the next
    /// interval; the episode is logged once and every failed attempt counted.
    fn persist_acks(&mut self) {
        let mut ob = self.parts.outbox.lock().unwrap_or_else(|e| e.into_inner());
        match ob.persist_acks() {
            Err(e) => {
                metrics::counter!("edgeferry_outbox_ack_write_errors_total").increment(1);
                if !self.acks_unwritable {
                    tracing::warn!(
                        "cannot persist outbox acknowledgements: {e}; retrying (after a crash \
                         meanwhile, acknowledged batches are sent again and deduplicated)"
                    );
                    self.acks_unwritable = true;
                }
            }
            Ok(()) if self.acks_unwritable => {
                tracing::info!("outbox acknowledgements written again");
                self.acks_unwritable = false;
            }
            Ok(()) => {}
        }
    }

    fn hello(&self) -> Hello {
        let first_seq = self
            .parts
            .outbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .first_seq();
        Hello {
            gateway: self.parts.gateway.clone(),
            epoch: self.parts.epoch,
            versions: protocol::SUPPORTED_VERSIONS.to_vec(),
            first_seq,
            software: format!("edgeferry/{}", env!("CARGO_PKG_VERSION")),
        }
    }

    /// The gateway's health now: the daemon's part, with the outbox's backlog.
    fn health(&self) -> protocol::Health {
        let mut h = (self.parts.health)();
        let summary = self
            .parts
            .outbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .summary();
        if let Ok((batches, bytes, oldest)) = summary {
            h.backlog_batches = batches;
            h.backlog_bytes = bytes;
            h.oldest_secs = oldest.map(|t| ((h.time_ms - t).max(0) / 1000) as u64);
        }
        h
    }

    fn credential_files(&self) -> Vec<PathBuf> {
        let c = &self.parts.cfg;
        [&c.ca_file, &c.cert_file, &c.key_file, &c.token_file]
            .into_iter()
            .flatten()
            .cloned()
            .collect()
    }

    /// Records acknowledged seqs in the outbox and the status.
    fn acknowledge(
        &mut self,
        seqs: &[u64],
        in_flight: &mut HashMap<u64, Instant>,
    ) -> Result<(), LinkError> {
        let mut ob = self.parts.outbox.lock().unwrap_or_else(|e| e.into_inner());
        for &seq in seqs {
            if let Some(sent) = in_flight.remove(&seq) {
                metrics::histogram!("edgeferry_upstream_ack_seconds")
                    .record(sent.elapsed().as_secs_f64());
            }
            ob.ack(seq)?;
            let lane = lane_lsn(seq).0 as usize;
            self.acked_high[lane] = self.acked_high[lane].max(Some(seq));
            self.parts
                .status
                .batches_acked
                .fetch_add(1, Ordering::Relaxed);
            metrics::counter!("edgeferry_upstream_batches_acked_total").increment(1);
        }
        Ok(())
    }

    /// One connection, from the handshake to an error or the end of the drain.
    async fn session(&mut self) -> Result<End, LinkError> {
        let files = self.credential_files();
        let stamp = mtimes(&files);
        let hello = self.hello();
        let url = self.url().to_string();
        let (mut conn, resume) = self.transport.connect(&url, &hello).await?;
        self.switch_logged.clear();

        // A data directory restored from an older copy reuses sequence numbers the central
        // side already stored: it would acknowledge new batches as duplicates and drop them.
        // The resume point gives it away (stored seqs this outbox has not written yet); the
        // cure is a new epoch, which makes every batch id new.
        let ahead = {
            let ob = self.parts.outbox.lock().unwrap_or_else(|e| e.into_inner());
            stored_beyond_written(&resume.stored, |lane| ob.next_lsn(lane))
        };
        if let Some(highest) = ahead {
            let old = self.parts.epoch;
            self.parts.epoch = crate::store::epoch::renew(&self.parts.data_dir)
                .map_err(|e| LinkError::Connect(format!("cannot write a new epoch: {e}")))?;
            metrics::counter!("edgeferry_upstream_epoch_rotations_total").increment(1);
            tracing::error!(
                old = %format!("{old:016x}"),
                new = %format!("{:016x}", self.parts.epoch),
                "the central side already stored batches this gateway has not written yet \
                 (seq {highest}): this data directory was restored from an older copy; \
                 continuing under a new store epoch"
            );
            conn.close().await;
            return Err(LinkError::EpochRenewed);
        }
        {
            let mut ob = self.parts.outbox.lock().unwrap_or_else(|e| e.into_inner());
            for &(a, b) in &resume.stored {
                for seq in a..=b.min(a + 1_000_000) {
                    let (lane, lsn) = lane_lsn(seq);
                    if lsn < ob.next_lsn(lane) && !ob.is_acked(seq) {
                        ob.ack(seq)?;
                    }
                }
            }
        }
        self.parts.status.connected.store(true, Ordering::Relaxed);
        self.parts.status.set_error(None);
        tracing::info!(
            url = %url,
            stored_ranges = resume.stored.len(),
            "upstream connected ({})",
            resume.detail
        );

        conn.health(&self.health()).await?;
        let mut health =
            tokio::time::interval_at(tokio::time::Instant::now() + HEALTH_EVERY, HEALTH_EVERY);
        let max_in_flight = resume.max_in_flight.max(1);
        let mut in_flight: HashMap<u64, Instant> = HashMap::new();
        // Live-first: what is appended from now on goes before the backlog.
        let mut cursors = Cursors::new(*self.parts.watermark.borrow());
        let mut rotation_check = tokio::time::interval(ROTATION_CHECK);
        let mut persist = tokio::time::interval(PERSIST_ACKS);
        let drain_deadline = tokio::time::sleep(Duration::MAX / 4);
        tokio::pin!(drain_deadline);
        if self.closed {
            drain_deadline
                .as_mut()
                .reset(tokio::time::Instant::now() + DRAIN_FOR);
        }
        loop {
            // Fill the window.
            let mut exhausted = false;
            while in_flight.len() < max_in_flight {
                let wm = *self.parts.watermark.borrow();
                let Some(b) = next_batch(&self.parts.outbox, &mut cursors, wm)? else {
                    exhausted = true;
                    break;
                };
                if in_flight.contains_key(&b.seq) {
                    continue;
                }
                let batch: OutboxBatch = match postcard::from_bytes(&b.payload) {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::error!(seq = b.seq, "undecodable outbox batch skipped: {e}");
                        self.parts
                            .outbox
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .ack(b.seq)?;
                        continue;
                    }
                };
                let mut hello = hello.clone();
                hello.first_seq = self
                    .parts
                    .outbox
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .first_seq();
                hello.epoch = self.parts.epoch;
                conn.send(b.seq, &batch, &hello).await?;
                self.parts
                    .status
                    .batches_sent
                    .fetch_add(1, Ordering::Relaxed);
                metrics::counter!("edgeferry_upstream_batches_sent_total").increment(1);
                in_flight.insert(b.seq, Instant::now());
            }
            if self.closed && exhausted && in_flight.is_empty() {
                conn.stored_state(self.acked_high).await;
                conn.close().await;
                return Ok(End::Drained);
            }
            tokio::select! {
                acks = conn.acks() => {
                    let acks = acks?;
                    self.acknowledge(&acks, &mut in_flight)?;
                }
                r = self.parts.watermark.changed(), if !self.closed => {
                    if r.is_err() {
                        // Processing wrote its final checkpoint and stopped.
                        self.closed = true;
                        drain_deadline.as_mut().reset(tokio::time::Instant::now() + DRAIN_FOR);
                    }
                }
                _ = &mut drain_deadline, if self.closed => {
                    tracing::info!(
                        in_flight = in_flight.len(),
                        "upstream drain time over; the rest stays in the outbox for the next start"
                    );
                    conn.stored_state(self.acked_high).await;
                    conn.close().await;
                    return Ok(End::Drained);
                }
                _ = health.tick() => conn.health(&self.health()).await?,
                _ = rotation_check.tick() => {
                    if mtimes(&files) != stamp {
                        conn.close().await;
                        return Err(LinkError::Rotated);
                    }
                }
                _ = persist.tick() => {
                    self.persist_acks();
                    conn.stored_state(self.acked_high).await;
                }
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
pub fn stored_beyond_written(stored: &[(u64, u64)], next_lsn: impl Fn(Lane) -> u64) -> Option<u64> {
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

/// Modification times of the credential files (a missing file is `None`, so deleting one
/// counts as a change too).
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

    #[test]
    fn a_deleted_or_touched_credential_file_counts_as_changed() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "a").unwrap();
        let files = vec![f.clone()];
        let before = mtimes(&files);
        assert_eq!(mtimes(&files), before);
        std::fs::remove_file(&f).unwrap();
        assert_ne!(mtimes(&files), before);
    }
}
