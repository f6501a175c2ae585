//! The committer: decodes, deduplicates and journals each message, syncs a group, then
//! releases its acknowledgements and hands the committed readings to processing.

use super::config::MqttConfig;
use super::decode::{Decoder, Reject};
use super::dedup::RecentCommits;
use super::error::IngestError;
use super::poll::{AckRequest, Incoming};
use super::status::IngestStatus;
use crate::clock::now_ms;
use crate::model::Reading;
use crate::model::{Committed, RejectedMessage};
use crate::model::{DedupKey, JournalEntry};
use crate::store::StoreError;
use crate::store::journal::Journal;
use crate::store::seglog::LogError;
use crate::telemetry::RateLimit;
use rumqttc::QoS;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, mpsc};

/// Admits at most `max` distinct series; readings of new series beyond it are rejected.
pub(super) struct SeriesGuard {
    pub(super) max: usize,
    pub(super) known: HashSet<String>,
}

impl SeriesGuard {
    pub(super) fn new(max: usize, known: Vec<String>) -> Self {
        let mut k = HashSet::with_capacity(known.len().min(max));
        for s in known.into_iter().take(max) {
            k.insert(s);
        }
        Self { max, known: k }
    }

    pub(super) fn admit(&mut self, key: &str) -> bool {
        if self.known.contains(key) {
            return true;
        }
        if self.known.len() >= self.max {
            return false;
        }
        self.known.insert(key.to_owned());
        true
    }
}

pub(super) struct Committer {
    pub(super) journal: Journal,
    pub(super) decoders: Vec<Decoder>,
    pub(super) recent: RecentCommits,
    /// Identities of the readings of the most recent commits (see [`super::dedup`]); `None`
    /// when `mqtt.dedup_by_identity` is off.
    pub(super) identities: Option<RecentCommits<u64>>,
    /// The connection the redelivery window belongs to (every connection, also one that
    /// kept its session, opens a new window), and how many of its messages are still looked
    /// up by identity.
    pub(super) identity_window: (u64, usize),
    /// Identities accepted into the group being gathered (not yet in `identities`).
    pub(super) group_identities: std::collections::HashSet<u64>,
    pub(super) series: SeriesGuard,
    pub(super) status: Arc<IngestStatus>,
    pub(super) future_skew_ms: i64,
    /// Whether a timestamp from the future may be rejected (only by a synchronised clock).
    pub(super) clock: Arc<crate::clock::GatewayClock>,
    pub(super) max_payload: usize,
    /// Per-subscription counters, registered once (a registry lookup per message is not free
    /// at 100k+ messages/s).
    pub(super) readings_counters: Vec<metrics::Counter>,
    pub(super) log_limit: RateLimit,
    pub(super) trim_to: Arc<AtomicU64>,
    pub(super) journal_bytes: Arc<AtomicU64>,
    pub(super) blocked: Arc<std::sync::atomic::AtomicBool>,
    pub(super) live: Option<crate::live::ReadingSampler>,
    pub(super) keep_tail: u64,
    pub(super) commits: u64,
    pub(super) dups_in_group: u64,
    pub(super) crash_after_commits: Option<u64>,
    /// Scratch buffer for series keys.
    pub(super) key_buf: String,
}

/// Test failpoint: `EDGEFERRY_FAILPOINT_CRASH_AFTER_COMMITS=N` aborts the process right after
/// the N-th journal sync, before its acknowledgements are sent. The crash-torture test uses it
/// to hit the narrowest window of the durability chain on purpose rather than by luck.
pub const FAILPOINT_ENV: &str = "EDGEFERRY_FAILPOINT_CRASH_AFTER_COMMITS";

/// The reason labels ingest adds to the decoders' own.
pub const INGEST_REASONS: &[&str] = &[
    "too_large",
    "too_many_series",
    "future_timestamp",
    "no_subscription",
];

/// A commit group closes once it holds about this many bytes of journal records, whatever
/// `commit_interval` says: two pages. Every `fdatasync` makes the disk write the journal's
/// last, partly filled page again, so a sync costs its records' bytes plus up to a page; with
/// two pages of records in a group, that is at most 1.5 times what the records take, where
/// a sync every few records at a high rate would write a page for each few dozen bytes (the
/// flash wear issue 11 measured: 16 bytes written per payload byte). At 10,000 readings/s a
/// group fills in about 10 ms, so the interval is the bound only at lower rates.
pub const GROUP_BYTES: usize = 8 << 10;

/// Messages already queued when a group starts that make it a backlog drain (see
/// [`GROUP_BYTES`]): more than a group of two pages holds.
const BACKLOG_MESSAGES: usize = 128;

/// What the journal record of a message will take, estimated before decoding it: its series
/// key comes from the topic and its value and time from the payload, and a record of a
/// 52-byte JSON reading on a 30-byte topic measured 88 bytes.
fn estimated_record_bytes(m: &Incoming) -> usize {
    m.topic.len() + m.payload.len()
}

impl Committer {
    pub(super) async fn run(
        &mut self,
        mut rx: mpsc::Receiver<Incoming>,
        ack_tx: mpsc::UnboundedSender<Vec<AckRequest>>,
        out: mpsc::Sender<Vec<Committed>>,
        cfg: &MqttConfig,
        progress: &AtomicU64,
    ) -> Result<(), IngestError> {
        let mut group: Vec<Incoming> = Vec::with_capacity(cfg.commit_max);
        let mut acks: Vec<AckRequest> = Vec::with_capacity(cfg.commit_max);
        let mut committed: Vec<Committed> = Vec::with_capacity(cfg.commit_max);
        let mut readings: Vec<Reading> = Vec::new();
        let mut permits: Vec<OwnedSemaphorePermit> = Vec::with_capacity(cfg.commit_max);
        let mut closed = false;
        while !closed {
            progress.store(crate::clock::mono_ms() as u64, Ordering::Relaxed);
            if self.blocked.load(Ordering::Relaxed) {
                // Processing keeps checkpointing while ingest is held: keep trimming so the
                // journal gives its share of the quota back.
                self.trim()?;
                self.journal_bytes
                    .store(self.journal.disk_bytes(), Ordering::Relaxed);
                // Backpressure: stop taking messages; the channel fills, the poll task stops
                // reading and the broker queues for us.
                tokio::time::sleep(Duration::from_millis(100)).await;
                if rx.is_closed() {
                    // Shutting down: what is still queued was never acknowledged and the
                    // broker redelivers it to the next session.
                    break;
                }
                continue;
            }
            let first = tokio::select! {
                m = rx.recv() => m,
                _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
            };
            let Some(first) = first else { break };
            group.push(first);
            // Gather the group: take whatever is queued at once (`recv_many`), one timer for
            // the whole group rather than one per message. It closes when `commit_interval`
            // has passed since its first message (the latency bound at low rates), or when
            // it holds `GROUP_BYTES` of records (at high rates: the wear bound), or
            // `commit_max` messages (the memory bound). Draining a backlog (messages already
            // queued when the group starts) it fills to `commit_max`: they have waited anyway,
            // and fewer, larger syncs drain faster.
            let deadline = tokio::time::sleep(cfg.commit_interval);
            tokio::pin!(deadline);
            let group_bytes = if rx.len() >= BACKLOG_MESSAGES {
                usize::MAX
            } else {
                GROUP_BYTES
            };
            let mut pending = estimated_record_bytes(&group[0]);
            // A quota block closes the group too: what it holds is committed, nothing more
            // is taken until the block lifts.
            while group.len() < cfg.commit_max
                && pending < group_bytes
                && !self.blocked.load(Ordering::Relaxed)
            {
                let room = cfg.commit_max - group.len();
                let had = group.len();
                tokio::select! {
                    n = rx.recv_many(&mut group, room) => if n == 0 { closed = true; break; },
                    _ = &mut deadline => break,
                }
                pending += group[had..]
                    .iter()
                    .map(estimated_record_bytes)
                    .sum::<usize>();
            }
            // Decode, append and sync the whole group in one `block_in_place`: each call
            // hands this worker's core to another thread, which is far too dear per message.
            let oldest = group.first().map(|m| m.received_at);
            let failed = tokio::task::block_in_place(|| {
                self.commit_group(
                    &mut group,
                    &mut readings,
                    &mut committed,
                    &mut acks,
                    &mut permits,
                )
            })?;
            if let Some(e) = failed
                && !self
                    .retry_until_written(e, &mut committed, &rx, progress)
                    .await?
            {
                // Shutting down while the disk is still failing: nothing of this group was
                // acknowledged, so the broker redelivers it to the next session.
                break;
            }
            if self.dups_in_group > 0 {
                tracing::info!(
                    "dropped {} redelivered message(s) already in the journal (duplicates dropped)",
                    self.dups_in_group
                );
                self.dups_in_group = 0;
            }
            self.trim()?;
            let commit_latency = oldest.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
            metrics::histogram!("edgeferry_ingest_commit_seconds").record(commit_latency);
            let jb = self.journal.disk_bytes();
            self.journal_bytes.store(jb, Ordering::Relaxed);
            metrics::gauge!("edgeferry_journal_bytes").set(jb as f64);
            // Durable now: the memory they held is free, acknowledge in order, then hand on
            // to processing.
            permits.clear();
            if !acks.is_empty() {
                let group = std::mem::replace(&mut acks, Vec::with_capacity(cfg.commit_max));
                let _ = ack_tx.send(group);
            }
            if let Some(live) = self.live.as_mut().filter(|l| l.active()) {
                let now = now_ms();
                live.offer(now, committed.iter().flat_map(|c| &c.entry.readings));
            }
            if !committed.is_empty() {
                // One hand-off per group, not per record.
                let n: u64 = committed
                    .iter()
                    .map(|c| c.entry.readings.len() as u64)
                    .sum();
                let batch = std::mem::replace(&mut committed, Vec::with_capacity(cfg.commit_max));
                if out.send(batch).await.is_err() {
                    // Processing stopped (shutdown); the journal has it, replay will see it.
                } else {
                    self.status.readings.fetch_add(n, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    /// Journals a gathered group and makes it durable: decide on every message (its
    /// acknowledgement and permit are collected, rejected ones included), append what is
    /// kept, then one `fdatasync`. Blocking: called inside `block_in_place`.
    ///
    /// A failed write or sync (a full disk, an I/O error) is not the end: it comes back as
    /// `Ok(Some(error))` with the group's records still in `committed` (their lsns are the
    /// ones they will get once written), for [`Committer::retry_until_written`].
    pub(super) fn commit_group(
        &mut self,
        group: &mut Vec<Incoming>,
        readings: &mut Vec<Reading>,
        committed: &mut Vec<Committed>,
        acks: &mut Vec<AckRequest>,
        permits: &mut Vec<OwnedSemaphorePermit>,
    ) -> Result<Option<StoreError>, IngestError> {
        let first = self.journal.next_lsn();
        self.group_identities.clear();
        for m in group.drain(..) {
            if let Some(entry) = self.accept(&m, readings) {
                committed.push(Committed {
                    lsn: first + committed.len() as u64,
                    entry,
                    received_at: Some(m.received_at),
                });
            }
            acks.push(AckRequest {
                generation: m.generation,
                pkid: m.pkid,
                qos: m.qos,
            });
            permits.push(m.permit);
        }
        match self.write(committed) {
            Ok(()) => Ok(None),
            Err(e @ StoreError::Log(LogError::RecordTooLarge { .. })) => Err(e.into()),
            Err(e @ StoreError::Encode(_)) => Err(e.into()),
            Err(e) => Ok(Some(e)),
        }
    }

    /// Appends `committed` (in order, at the lsns they carry) and syncs. Blocking.
    fn write(&mut self, committed: &[Committed]) -> Result<(), StoreError> {
        if committed.is_empty() {
            return Ok(());
        }
        // Retried after a rollback, the journal may hold the first of them already.
        self.journal
            .append_group(committed.iter().map(|c| (c.lsn, &c.entry)))?;
        self.journal.sync()?;
        for c in committed {
            self.recent.insert(c.entry.dedup);
        }
        if let Some(ids) = self.identities.as_mut() {
            for c in committed {
                let timed = self
                    .decoders
                    .get(c.entry.subscription as usize)
                    .is_some_and(|d| d.reads_timestamps());
                if let Some(id) = c.entry.identity(timed, &mut self.key_buf) {
                    ids.insert(id);
                }
            }
        }
        self.commits += 1;
        if self.crash_after_commits == Some(self.commits) {
            // Failpoint (tests only): die in the narrowest window of the chain, after
            // the journal is durable and before any acknowledgement left.
            std::process::abort();
        }
        Ok(())
    }

    /// The journal could not write the group in `committed` (`first_error`): take the failed
    /// bytes back, then try again with backoff (1 s doubling to 5 s: an attempt costs one
    /// group's write, and space should be used as soon as it returns) until it is written.
    /// Meanwhile nothing is acknowledged, so the broker keeps everything and the poll task
    /// stops reading once `max_unacked` messages wait: a full disk holds ingest back exactly
    /// as `when_full = "block"` does, and it resumes by itself once space returns. The state
    /// is logged once, counted, and shown in `/status`; the watchdog keeps being fed (the
    /// daemon is waiting on purpose, a restart would not help). Returns `false` when
    /// shutdown came first (nothing of the group was acknowledged).
    async fn retry_until_written(
        &mut self,
        first_error: StoreError,
        committed: &mut Vec<Committed>,
        rx: &mpsc::Receiver<Incoming>,
        progress: &AtomicU64,
    ) -> Result<bool, IngestError> {
        let mut error = first_error;
        let mut backoff =
            crate::backoff::Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
        let since = std::time::Instant::now();
        tracing::error!(
            "journal write failed: {error}; not acknowledging the broker (it keeps the messages) \
             and retrying until the disk takes writes again"
        );
        metrics::gauge!("edgeferry_journal_write_blocked").set(1.0);
        loop {
            metrics::counter!("edgeferry_journal_write_errors_total").increment(1);
            self.status.set_journal_error(Some(error.to_string()));
            self.status
                .journal_full
                .store(crate::store::is_disk_full(&error), Ordering::Relaxed);
            // Feed the watchdog every second while waiting.
            let pause = tokio::time::sleep(backoff.next_delay());
            tokio::pin!(pause);
            loop {
                progress.store(crate::clock::mono_ms() as u64, Ordering::Relaxed);
                tokio::select! {
                    _ = &mut pause => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                if rx.is_closed() {
                    let _ = tokio::task::block_in_place(|| self.journal.rollback_unsynced());
                    committed.clear();
                    return Ok(false);
                }
            }
            // Take the failed bytes back; then what processing no longer needs (it may have
            // checkpointed meanwhile) is space; then the same records again.
            let attempt = tokio::task::block_in_place(|| {
                self.journal.rollback_unsynced()?;
                let _ = self.trim();
                self.write(committed)
            });
            match attempt {
                Ok(()) => {
                    self.status.set_journal_error(None);
                    self.status.journal_full.store(false, Ordering::Relaxed);
                    metrics::gauge!("edgeferry_journal_write_blocked").set(0.0);
                    tracing::info!(
                        "journal writes again after {:?}; acknowledging the broker again",
                        since.elapsed()
                    );
                    return Ok(true);
                }
                Err(e @ StoreError::Log(LogError::RecordTooLarge { .. })) => return Err(e.into()),
                Err(e) => error = e,
            }
        }
    }

    /// Decides what to do with one message: `Some(entry)` to journal, `None` when it is a
    /// recognised duplicate, a retained copy or rejected (all of which are still acknowledged).
    pub(super) fn accept(
        &mut self,
        m: &Incoming,
        readings: &mut Vec<Reading>,
    ) -> Option<JournalEntry> {
        if m.topic.is_empty() {
            return None; // retained-copy marker
        }
        let dedup = DedupKey::new(m.pkid, &m.topic, &m.payload);
        if m.dup && m.qos != QoS::AtMostOnce && self.recent.contains(&dedup) {
            self.duplicate("dup_flag");
            return None;
        }
        let Some(sub) = m.subscription else {
            self.reject(
                m,
                "no_subscription",
                "topic matches no [[mqtt.subscribe]] filter".into(),
            );
            return None;
        };
        if m.payload.len() > self.max_payload {
            self.reject(
                m,
                "too_large",
                format!(
                    "payload of {} bytes exceeds mqtt.max_payload ({} bytes)",
                    m.payload.len(),
                    self.max_payload
                ),
            );
            return None;
        }
        readings.clear();
        if let Err(r) = self.decoders[sub].decode(&m.topic, &m.payload, m.received_ms, readings) {
            self.reject_decode(m, &r);
            return None;
        }
        if !self.check_clock(m, readings) {
            return None;
        }
        let mut kept = Vec::with_capacity(readings.len());
        for r in readings.drain(..) {
            // The key is built in a reused buffer: only a new series allocates.
            self.key_buf.clear();
            crate::model::write_series_key(&mut self.key_buf, &r.metric, &r.tags);
            if self.series.admit(&self.key_buf) {
                kept.push(r);
            } else {
                metrics::counter!("edgeferry_ingest_rejected_total", "reason" => "too_many_series")
                    .increment(1);
                self.status.rejected.fetch_add(1, Ordering::Relaxed);
                if let Some(n) = self.log_limit.check("too_many_series") {
                    tracing::warn!(
                        topic = %m.topic,
                        suppressed = n,
                        "reading of a new series {} rejected: process.max_series ({}) reached",
                        r.series_key(),
                        self.series.max
                    );
                }
            }
        }
        if kept.is_empty() {
            return None;
        }
        let entry = JournalEntry {
            dedup,
            received_ms: m.received_ms,
            subscription: sub as u16,
            readings: kept,
        };
        if self.is_redelivered_reading(m, &entry) {
            self.duplicate("identity");
            return None;
        }
        self.readings_counters[sub].increment(entry.readings.len() as u64);
        Some(entry)
    }

    /// A redelivery the broker did not flag (new packet id, DUP=0): within the first
    /// messages of a connection, the same readings (series, event time, value) as a message
    /// committed just before.
    fn is_redelivered_reading(&mut self, m: &Incoming, entry: &JournalEntry) -> bool {
        let Some(ids) = self.identities.as_mut() else {
            return false;
        };
        if m.qos == QoS::AtMostOnce {
            return false;
        }
        let (connection, left) = &mut self.identity_window;
        if *connection != m.connection {
            *connection = m.connection;
            *left = ids.capacity();
        }
        if *left == 0 {
            return false;
        }
        *left -= 1;
        let timed = self
            .decoders
            .get(entry.subscription as usize)
            .is_some_and(|d| d.reads_timestamps());
        let Some(id) = entry.identity(timed, &mut self.key_buf) else {
            return false;
        };
        // Committed before, or delivered twice into this very group (some brokers resend
        // their in-flight messages and then deliver them again from the session's queue).
        ids.contains(&id) || !self.group_identities.insert(id)
    }

    fn duplicate(&mut self, by: &'static str) {
        self.status.duplicates.fetch_add(1, Ordering::Relaxed);
        self.dups_in_group += 1;
        metrics::counter!("edgeferry_ingest_duplicates_dropped_total", "by" => by).increment(1);
    }

    /// Deletes journal segments that processing no longer needs, always keeping the last
    /// `keep_tail` records so redeliveries after a crash can still be recognised.
    pub(super) fn trim(&mut self) -> Result<(), IngestError> {
        let safe = self.trim_to.load(Ordering::Acquire);
        let keep = self.journal.next_lsn().saturating_sub(self.keep_tail);
        let to = safe.min(keep);
        if to > self.journal.first_lsn() {
            let freed = tokio::task::block_in_place(|| self.journal.trim_before(to))?;
            if freed > 0 {
                tracing::debug!(freed, to, "journal trimmed");
                // Also while nothing is committed (a quota block): the quota and the gauge
                // must see the space given back, not the size before the trim.
                let jb = self.journal.disk_bytes();
                self.journal_bytes.store(jb, Ordering::Relaxed);
                metrics::gauge!("edgeferry_journal_bytes").set(jb as f64);
            }
        }
        Ok(())
    }

    /// Compares the readings' event times with the gateway's clock. A synchronised clock
    /// rejects a message with a reading further than `mqtt.future_skew` ahead of it (a sensor
    /// clock that would otherwise hold windows open). An unsynchronised one cannot tell which
    /// side is wrong: it accepts, counts the disagreement (either way: sensors far ahead of
    /// it or far behind it) and reports itself suspect in `/status`.
    fn check_clock(&self, m: &Incoming, readings: &[Reading]) -> bool {
        let skew = self.future_skew_ms;
        let Some(newest) = readings.iter().map(|r| r.time_ms).max() else {
            return true;
        };
        let ahead = newest - m.received_ms;
        if ahead <= skew && ahead >= -skew {
            return true;
        }
        if ahead > skew && self.clock.trusted() {
            let detail = format!(
                "event time {newest} ms is {} s ahead of this gateway's synchronised clock \
                 (mqtt.future_skew allows {} s)",
                ahead / 1000,
                skew / 1000
            );
            self.reject(m, "future_timestamp", detail);
            return false;
        }
        if ahead < -skew && self.clock.trusted() {
            return true; // old data by a clock that knows: the watermark judges it
        }
        let direction = if ahead > 0 { "ahead" } else { "behind" };
        metrics::counter!("edgeferry_clock_disagreements_total", "sensors" => direction)
            .increment(readings.len() as u64);
        self.status.note_clock_disagreement(ahead);
        if let Some(n) = self.log_limit.check("clock_disagreement") {
            tracing::warn!(
                topic = %m.topic,
                suppressed = n,
                "event time {} ahead of this gateway's clock, which is not synchronised: \
                 accepted (one of the two clocks is wrong; see `edgeferry status`)",
                crate::clock::signed_human(ahead)
            );
        }
        true
    }

    pub(super) fn reject_decode(&self, m: &Incoming, r: &Reject) {
        self.reject(m, r.reason(), r.to_string());
    }

    pub(super) fn reject(&self, m: &Incoming, reason: &'static str, detail: String) {
        self.status.rejected.fetch_add(1, Ordering::Relaxed);
        if reason == "future_timestamp" {
            self.status.future_rejected.fetch_add(1, Ordering::Relaxed);
            self.status
                .last_future_ms
                .store(now_ms(), Ordering::Relaxed);
        }
        metrics::counter!("edgeferry_ingest_rejected_total", "reason" => reason).increment(1);
        if let Some(n) = self.log_limit.check(reason) {
            tracing::warn!(topic = %m.topic, reason, suppressed = n, "payload rejected: {detail}");
        }
        let preview: String =
            String::from_utf8_lossy(&m.payload[..m.payload.len().min(120)]).into_owned();
        self.status.remember_reject(RejectedMessage {
            time: crate::util::rfc3339_ms(m.received_ms),
            topic: m.topic.clone(),
            reason: reason.to_string(),
            detail,
            payload: preview,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_guard_admits_known_series_beyond_the_limit_but_no_new_ones() {
        let mut g = SeriesGuard::new(2, vec!["a".into()]);
        assert!(g.admit("b"));
        assert!(!g.admit("c"));
        assert!(g.admit("a"));
        assert!(g.admit("b"));
    }
}
