//! The committer: decodes, deduplicates and journals each message, syncs a group, then
//! releases its acknowledgements and hands the committed readings to processing.

use super::config::MqttConfig;
use super::decode::sparkplug::SparkplugState;
use super::decode::{Format, Reject};
use super::dedup::RecentCommits;
use super::error::IngestError;
use super::poll::{AckRequest, Incoming};
use super::status::IngestStatus;
use super::subscriptions::Subscriptions;
use crate::clock::now_ms;
use crate::model::Reading;
use crate::model::{CommitGroup, Committed, Offline, RejectedMessage};
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
    /// The subscriptions the messages being committed were matched with (replaced, in the
    /// order of the messages, when a reload changes them: see [`super::subscriptions`]).
    pub(super) subs: Arc<Subscriptions>,
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
    /// Sparkplug B's per-node state (aliases, seq), shared by every `sparkplug_b`
    /// subscription, and the directory of its node files (none: in memory only).
    pub(super) sparkplug: SparkplugState,
    pub(super) sparkplug_dir: Option<std::path::PathBuf>,
    /// Where Sparkplug B rebirth requests are published.
    pub(super) commands: Option<rumqttc::AsyncClient>,
    /// Sources the group being committed reported gone (handed to processing with it).
    pub(super) group_offline: Vec<Offline>,
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

/// Messages already queued when a group starts that make it a backlog drain (see
/// [`GroupSize`]): more than a page of records holds.
const BACKLOG_MESSAGES: usize = 128;

/// When a commit group is full enough, in journal bytes, whatever `commit_interval` says: the
/// room left in the journal's current page. Why: the disk writes whole pages, every sync pads
/// the journal to a page boundary (`LogConfig::pad_syncs`), and a group that ends just before
/// the boundary is written in exactly one page write: every byte written once. A group a
/// little larger costs a second page that is mostly padding, so the estimate aims one message
/// short. Before (a group closed at 8 KiB estimated from topic and payload sizes, no padding)
/// every sync also rewrote the previous sync's last page. At 10,000 readings/s a page fills
/// in about 10 ms, at 1,000/s in about 100 ms; below that `commit_interval` is the bound.
struct GroupSize {
    /// Journal bytes per message, learnt from the groups written (rejected and duplicate
    /// messages included, which take none): a moving average, so a segment's first group
    /// (its series definitions) moves it only a little.
    per_message: f64,
}

impl GroupSize {
    fn new() -> Self {
        GroupSize { per_message: 0.0 }
    }

    /// Until the first group was measured: topic plus payload, more than a compact record
    /// takes (so the first group ends short of the page, never past it).
    fn estimate(&self, m: &Incoming) -> f64 {
        // Never below a byte: the group loop divides by it.
        if self.per_message > 0.0 {
            self.per_message.max(1.0)
        } else {
            (m.topic.len() + m.payload.len()).max(1) as f64
        }
    }

    /// The journal bytes a group may take: the rest of the current page, or that and the next
    /// page when less than a quarter of it is left (a group of a few messages would sync
    /// too often for the bytes it saves).
    fn room(page_room: u64) -> f64 {
        let page = crate::store::seglog::PAGE;
        (if page_room < page / 4 {
            page_room + page
        } else {
            page_room
        }) as f64
    }

    fn learn(&mut self, messages: usize, bytes: u64) {
        if messages == 0 {
            return;
        }
        let sample = bytes as f64 / messages as f64;
        self.per_message = if self.per_message > 0.0 {
            0.875 * self.per_message + 0.125 * sample
        } else {
            sample
        };
    }
}

impl Committer {
    pub(super) async fn run(
        &mut self,
        mut rx: mpsc::Receiver<Incoming>,
        ack_tx: mpsc::UnboundedSender<Vec<AckRequest>>,
        out: mpsc::Sender<CommitGroup>,
        cfg: &MqttConfig,
        progress: &AtomicU64,
    ) -> Result<(), IngestError> {
        let mut group: Vec<Incoming> = Vec::with_capacity(cfg.commit_max);
        let mut acks: Vec<AckRequest> = Vec::with_capacity(cfg.commit_max);
        let mut committed: Vec<Committed> = Vec::with_capacity(cfg.commit_max);
        let mut readings: Vec<Reading> = Vec::new();
        let mut permits: Vec<OwnedSemaphorePermit> = Vec::with_capacity(cfg.commit_max);
        let mut size = GroupSize::new();
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
            // its records would fill the journal's page (at high rates: the wear bound, see
            // `GroupSize`), or at `commit_max` messages (the memory bound). Draining a
            // backlog (messages already queued when the group starts) it fills to
            // `commit_max`: they have waited anyway, and fewer, larger syncs drain faster.
            let deadline = tokio::time::sleep(cfg.commit_interval);
            tokio::pin!(deadline);
            let per_message = size.estimate(&group[0]);
            // One message short of the room: better a little padding than a second page.
            let group_bytes = if rx.len() >= BACKLOG_MESSAGES {
                f64::INFINITY
            } else {
                GroupSize::room(self.journal.page_room()) - per_message
            };
            let mut pending = per_message;
            // A quota block closes the group too: what it holds is committed, nothing more
            // is taken until the block lifts.
            let closed_by = loop {
                if group.len() >= cfg.commit_max {
                    break "commit_max";
                }
                if pending >= group_bytes {
                    break "page";
                }
                if self.blocked.load(Ordering::Relaxed) {
                    break "quota";
                }
                // Take no more than the page holds: a burst taken whole would spill into
                // a second page of mostly padding.
                let fits = ((group_bytes - pending) / per_message).ceil();
                let room = (cfg.commit_max - group.len()).min(fits.clamp(1.0, 1e9) as usize);
                let had = group.len();
                tokio::select! {
                    n = rx.recv_many(&mut group, room) => if n == 0 {
                        closed = true;
                        break "shutdown";
                    },
                    _ = &mut deadline => break "interval",
                }
                pending += (group.len() - had) as f64 * per_message;
            };
            metrics::counter!("edgeferry_ingest_commit_groups_total", "closed_by" => closed_by)
                .increment(1);
            // Decode, append and sync the whole group in one `block_in_place`: each call
            // hands this worker's core to another thread, which is far too dear per message.
            let oldest = group.first().map(|m| m.received_at);
            let (messages, appended) = (group.len(), self.journal.appended_bytes());
            let failed = tokio::task::block_in_place(|| {
                self.commit_group(
                    &mut group,
                    &mut readings,
                    &mut committed,
                    &mut acks,
                    &mut permits,
                )
            })?;
            size.learn(messages, self.journal.appended_bytes() - appended);
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
            self.publish_rebirths();
            if let Some(live) = self.live.as_mut().filter(|l| l.active()) {
                let now = now_ms();
                live.offer(now, committed.iter().flat_map(|c| &c.entry.readings));
            }
            if !committed.is_empty() || !self.group_offline.is_empty() {
                // One hand-off per group, not per record.
                let n: u64 = committed
                    .iter()
                    .map(|c| c.entry.readings.len() as u64)
                    .sum();
                let batch = CommitGroup {
                    records: std::mem::replace(&mut committed, Vec::with_capacity(cfg.commit_max)),
                    offline: std::mem::take(&mut self.group_offline),
                };
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
        for mut m in group.drain(..) {
            if let Some(table) = m.table.take() {
                self.subs = table;
            }
            if let Some(entry) = self.accept(&m, readings) {
                committed.push(Committed {
                    lsn: first + committed.len() as u64,
                    entry,
                    received_at: Some(m.received_at),
                });
            }
            for tags in self.sparkplug.take_offline() {
                self.group_offline.push(Offline {
                    tags,
                    after: committed.len(),
                });
            }
            acks.push(AckRequest {
                generation: m.generation,
                pkid: m.pkid,
                qos: m.qos,
            });
            permits.push(m.permit);
        }
        self.save_sparkplug();
        match self.write(committed) {
            Ok(()) => Ok(None),
            Err(e @ StoreError::Log(LogError::RecordTooLarge { .. })) => Err(e.into()),
            Err(e @ StoreError::Encode(_)) => Err(e.into()),
            Err(e) => Ok(Some(e)),
        }
    }

    /// Writes the Sparkplug B node files a birth or death in this group changed: before the
    /// group's journal sync, so before that message is acknowledged (a crash before that
    /// makes the broker deliver it again). Each is a few hundred bytes to a few kilobytes
    /// (one node's aliases), written atomically. A failure is logged and counted, not fatal:
    /// the state is still in memory, and after a restart without it the node is asked for a
    /// rebirth.
    fn save_sparkplug(&mut self) {
        let dirty = self.sparkplug.take_dirty();
        let Some(dir) = self.sparkplug_dir.as_ref().filter(|_| !dirty.is_empty()) else {
            return;
        };
        use crate::ingest::decode::sparkplug::{STATE_MAGIC, STATE_VERSION};
        for (name, body) in dirty {
            let path = dir.join(name);
            let written = match body {
                Some(body) => std::fs::create_dir_all(dir).and_then(|()| {
                    crate::util::write_framed(&path, STATE_MAGIC, STATE_VERSION, &body)
                }),
                None => match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                    _ => Ok(()),
                },
            };
            if let Err(e) = written {
                metrics::counter!("edgeferry_sparkplug_state_write_errors_total").increment(1);
                if let Some(n) = self.log_limit.check("sparkplug_state") {
                    tracing::warn!(
                        suppressed = n,
                        "cannot write the Sparkplug B node state {}: {e} (kept in memory; \
                         after a restart the node is asked for a rebirth)",
                        path.display()
                    );
                }
            }
        }
    }

    /// Publishes the rebirth requests decided while decoding (QoS 0, as Sparkplug's
    /// commands: a lost one is asked again at the node's next unresolvable message).
    fn publish_rebirths(&mut self) {
        for (topic, payload) in self.sparkplug.take_rebirths() {
            let Some(client) = &self.commands else {
                continue;
            };
            if let Err(e) = client.try_publish(&topic, QoS::AtMostOnce, false, payload) {
                tracing::warn!(%topic, "cannot queue a Sparkplug B rebirth request: {e}");
            } else {
                tracing::info!(%topic, "asked a Sparkplug B edge node for a rebirth");
            }
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
                let timed = self.subs.reads_timestamps(c.entry.subscription as usize);
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
        let decoder = &self.subs.decoders[sub];
        let decoded = if decoder.format() == Format::SparkplugB {
            self.sparkplug.decode(
                &m.topic,
                &m.payload,
                m.received_ms,
                decoder.sparkplug(),
                readings,
            )
        } else {
            decoder.decode(&m.topic, &m.payload, m.received_ms, readings)
        };
        if let Err(r) = decoded {
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
        self.subs.readings[sub].increment(entry.readings.len() as u64);
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
        let timed = self.subs.reads_timestamps(entry.subscription as usize);
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

    #[test]
    fn a_group_may_take_the_rest_of_its_page_or_one_more_page_when_little_is_left() {
        assert_eq!(GroupSize::room(4096), 4096.0);
        assert_eq!(GroupSize::room(4076), 4076.0, "after a segment header");
        assert_eq!(GroupSize::room(1024), 1024.0);
        assert_eq!(GroupSize::room(1023), 1023.0 + 4096.0);
        assert_eq!(GroupSize::room(10), 10.0 + 4096.0);
    }

    #[test]
    fn bytes_per_message_are_learnt_from_what_the_journal_took() {
        let mut g = GroupSize::new();
        assert_eq!(g.per_message, 0.0);
        g.learn(0, 0);
        assert_eq!(g.per_message, 0.0, "an empty group teaches nothing");
        g.learn(100, 4000);
        assert_eq!(g.per_message, 40.0, "the first group is taken as it is");
        // A segment's first group (its series definitions) moves the average only a little.
        g.learn(100, 12_000);
        assert_eq!(g.per_message, 50.0);
        for _ in 0..60 {
            g.learn(100, 4000);
        }
        assert!((g.per_message - 40.0).abs() < 0.01, "{}", g.per_message);
    }
}
