//! Local processing: windowed aggregates and alert rules, checkpointed with the journal position.
//!
//! Readings arrive as [`Committed`] journal records. For each
//! reading the alert rules ([`rules`]) are evaluated first (an alert is published on the local
//! broker right away: publish→alert is the latency that must stay inside the budget), then the
//! reading is folded into tumbling windows ([`window`]) whose statistics ([`crate::model::aggregate`]) include
//! a mergeable quantile sketch ([`crate::model::sketch`]).
//!
//! Closed windows and alerts are gathered into batches and appended to the outbox. The whole
//! state (windows, rules, pending items, outbox positions) is checkpointed atomically with the
//! journal position it reflects:
//!
//! ```text
//!  apply records ─▶ append batches to outbox ─▶ outbox.sync ─▶ write checkpoint ─▶ publish
//!                                                               {journal lsn,      watermark
//!                                                                outbox next lsns,  to forwarder,
//!                                                                state}             trim journal
//! ```
//!
//! The forwarder only sends outbox batches below the checkpointed watermark. After a crash,
//! batches appended beyond the checkpoint were therefore never sent; they are forgotten, and
//! replaying the journal from the checkpoint emits them again. So every window reaches the
//! outbox exactly once per version, with the content an uninterrupted run would give.
//!
//! The processing clock is the journal's: a record is applied with `now` = its arrival time,
//! which makes replay after a crash see the same lateness decisions as the live run did.
//! Idle periods advance the clock from the wall clock so windows still close without traffic.

mod batching;
mod checkpoint;
pub mod config;
mod error;
mod quota;
pub mod rules;
mod shared;
pub mod window;

pub use checkpoint::{
    CheckpointError, CheckpointSummary, DELTA_FAILPOINT_ENV, inspect_checkpoint,
    inspect_checkpoint_chain,
};
pub use config::{ProcessConfig, RuleConfig};
pub use error::ProcessError;
pub use shared::{ProcessLimits, ProcessShared, ProcessStatus};

use crate::model::batch::OutboxItem;
use crate::model::{Alert, AlertState, SeriesInfo};
use crate::model::{CommitGroup, Committed, Offline, Publication};
use crate::store::WhenFull;
use crate::store::journal::Journal;
use crate::store::outbox::Lane;
use checkpoint::{Checkpoint, Kind, PendingCheckpoint, WrittenCheckpoint, joined};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use window::{WindowAggregate, WindowSpec, Windows};

/// The chain of checkpoints on disk: a whole one and the deltas after it.
#[derive(Debug, Clone, Copy)]
struct Chain {
    /// The whole checkpoint's id (0: none the next delta could follow).
    id: u64,
    /// Its size.
    whole_bytes: u64,
    /// Deltas written after it, and their bytes.
    deltas: u32,
    delta_bytes: u64,
    /// The next checkpoint must be whole: the first of the process (loading may have cut
    /// the chain short), or a whole one failed to be written.
    whole_next: bool,
}

impl Chain {
    fn next_kind(&self, max_disk: u64) -> Kind {
        let share = checkpoint::delta_share(self.whole_bytes, max_disk);
        if self.whole_next
            || self.id == 0
            || self.delta_bytes >= self.whole_bytes.saturating_mul(share)
        {
            Kind::Whole {
                id: checkpoint::new_id(),
            }
        } else {
            Kind::Delta {
                base_id: self.id,
                seq: self.deltas + 1,
            }
        }
    }
}

/// The [`Flush`] of a processor's pending items, built from its fields one by one rather than
/// by a method borrowing the whole processor, so that a window close can flush while the
/// windows are borrowed too.
macro_rules! flush_of {
    ($p:expr) => {
        Flush {
            outbox: &$p.shared.outbox,
            pending: &mut $p.state.pending,
            since_ms: &mut $p.state.pending_since_ms,
            now: $p.state.clock_ms,
            limits: &$p.limits,
            appended: &mut $p.appended,
            alerts_appended: &mut $p.alerts_appended,
        }
    };
}

/// Closing windows at most this often (processing time) coalesces corrections.
const CLOSE_EVERY_MS: i64 = 250;

/// Alert batches reach the forwarder at most this long after they were appended: a checkpoint
/// (most often a delta of the windows changed since the last one, 0.1 MB compressed with
/// 1,000 series in the example config's windows) is taken for them this soon, and alerts raised meanwhile share it. Aggregates wait for
/// `checkpoint_interval`.
pub const ALERTS_CHECKPOINT_WITHIN: Duration = Duration::from_secs(5);

/// The processing stage: folds committed journal records into windows and alert rules,
/// appends the results to the outbox and checkpoints its state with the journal position.
pub struct Processor {
    cfg: ProcessConfig,
    limits: ProcessLimits,
    path: PathBuf,
    state: Checkpoint,
    shared: ProcessShared,
    rule_cfgs: Vec<RuleConfig>,
    dirty: bool,
    /// Batches were appended to the outbox since the last checkpoint (the forwarder sends
    /// them only once a checkpoint covers them).
    appended: bool,
    /// Of them, alert batches: these are checkpointed within [`ALERTS_CHECKPOINT_WITHIN`], so
    /// alerts reach the central side promptly; aggregates wait for `checkpoint_interval` (the
    /// flash-wear knob: each checkpoint rewrites the whole state).
    alerts_appended: bool,
    alerts: Vec<Alert>,
    publications: Option<mpsc::Sender<Publication>>,
    log_limit: crate::telemetry::RateLimit,
    /// When the last committed record arrived (for [`Processor::input_idle`]).
    last_input: Instant,
    /// The watermark right after that record: idle input moves it on from here by the
    /// monotonic time since, so the data's own time goes on, not the wall clock's (which may
    /// be an hour away from the sensors').
    watermark_at_input: i64,
    /// The last wall-clock step applied to the silence rules ([`crate::clock::ClockStep::seq`]).
    seen_clock_step: u64,
    /// How far the sensors' clocks agree to lead the arrival clock (used while it is not
    /// synchronised).
    lead: SensorLead,
    /// Processing time of the last `close_due` (see [`CLOSE_EVERY_MS`]).
    last_close_ms: i64,
    /// commit → processed latency (the age of a record when processing takes it).
    lag_histogram: metrics::Histogram,
    /// Time to apply one record (rules, windows).
    apply_histogram: metrics::Histogram,
    /// Scratch buffer for series keys.
    key_buf: String,
    /// Batches forgotten at start (orphans of a crash) are not yet recorded as done on disk:
    /// the next checkpoint must write the acknowledgement state first.
    acks_owed: bool,
    /// Bytes of the checkpoint on disk, and of the one being written next to it (0 when none):
    /// both count against `store.max_disk` while they exist.
    checkpoint_bytes: [u64; 2],
    /// Where the chain of checkpoints stands (see [`checkpoint`]).
    chain: Chain,
    /// The outbox's size when a quota block began (see [`quota::enforce`]).
    quota_held: Option<u64>,
    /// The checkpoint being written and, for a delta, the slots it covers.
    in_flight: Option<(Kind, Option<window::TakenSlots>)>,
    /// `max_disk`, or the filesystem's size where that is smaller: what the checkpoint
    /// chain's room is measured against (a chain sized for a 1 GiB quota on an 8 MiB disk
    /// would fill the disk with deltas).
    disk_bound: u64,
    /// The checkpoint's share of `max_disk` was reported as too large (once per process).
    checkpoint_share_warned: bool,
    /// Configuration reloads: new rules and batching limits, applied between records.
    changes: Option<mpsc::Receiver<ProcessChange>>,
}

/// What a configuration reload changes in processing while it runs: the rules and the
/// batching limits (`[upstream] batch_max` and `linger`). Windows cannot change in place
/// (their slots are the checkpoint's shape); the reload refuses that.
#[derive(Debug)]
pub struct ProcessChange {
    /// The `[[rules]]` now configured. Rules whose name stays keep their state (a raised
    /// alert stays raised); alerts of rules that are gone are cleared, as at a restart.
    pub rules: Vec<RuleConfig>,
    /// Aggregates per outbox batch.
    pub batch_max: usize,
    /// How long the oldest pending aggregate may wait for a batch.
    pub linger: Duration,
    /// Answered once the change is in effect: the next record applied sees the new rules.
    pub done: tokio::sync::oneshot::Sender<()>,
}

impl Processor {
    /// Loads the checkpoint from `state_dir` (a fresh state when there is none; a damaged one
    /// is moved aside with an error log, and the journal is replayed from its start), and
    /// forgets outbox batches appended after it (see the module docs).
    pub fn open(
        cfg: &ProcessConfig,
        rule_cfgs: &[RuleConfig],
        limits: ProcessLimits,
        state_dir: &Path,
        shared: ProcessShared,
    ) -> Result<Processor, ProcessError> {
        std::fs::create_dir_all(state_dir).map_err(|source| ProcessError::Io {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let path = state_dir.join("checkpoint.bin");
        checkpoint::remove_stale_temp(&path);
        let whole_on_disk = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let checkpoint_on_disk = checkpoint::files_bytes(state_dir, &path);
        let spec = WindowSpec {
            lengths_secs: cfg.windows.iter().map(|w| w.as_secs() as u32).collect(),
            allowed_lateness_ms: cfg.allowed_lateness.as_millis() as i64,
            retention_ms: cfg.correction_horizon.as_millis() as i64,
        };
        let fresh = || Checkpoint {
            applied_lsn: 0,
            clock_ms: 0,
            windows: Windows::new(spec.clone()),
            rules: rules::Rules::new(rule_cfgs),
            series: BTreeMap::new(),
            pending: Vec::new(),
            pending_since_ms: None,
            outbox_next: [0, 0],
            watermark_ms: 0,
        };
        let (state, found) = match std::fs::read(&path) {
            Ok(bytes) => match checkpoint::load_chain(state_dir, &bytes) {
                Ok(loaded) if loaded.state.windows.spec() == &spec => {
                    if loaded.deltas > 0 {
                        tracing::info!("checkpoint loaded with {} delta(s)", loaded.deltas);
                    }
                    (loaded.state, true)
                }
                Ok(loaded) => {
                    let mut c = loaded.state;
                    tracing::warn!(
                        "window configuration changed since the last checkpoint; \
                         windows start afresh from the current position"
                    );
                    c.windows = Windows::new(spec.clone());
                    (c, true)
                }
                Err(why) => {
                    let aside =
                        state_dir.join(format!("checkpoint.bin.bad-{}", crate::clock::now_ms()));
                    let _ = std::fs::rename(&path, &aside);
                    tracing::error!(
                        "checkpoint {} is damaged ({why}); moved to {} and rebuilding from the journal",
                        path.display(),
                        aside.display()
                    );
                    (fresh(), false)
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (fresh(), false),
            Err(source) => return Err(ProcessError::Io { path, source }),
        };
        let mut state = state;
        state.rules.share_series(&state.series);
        let state_watermark = state.watermark_ms;
        let max_disk = limits.store.max_disk.as_u64();
        let disk_bound =
            crate::util::filesystem_bytes(state_dir).map_or(max_disk, |fs| fs.min(max_disk));
        let mut p = Processor {
            cfg: cfg.clone(),
            limits,
            path,
            state,
            shared,
            rule_cfgs: rule_cfgs.to_vec(),
            dirty: false,
            appended: false,
            alerts_appended: false,
            alerts: Vec::new(),
            publications: None,
            log_limit: crate::telemetry::RateLimit::new(Duration::from_secs(10)),
            last_close_ms: i64::MIN / 2,
            last_input: Instant::now(),
            watermark_at_input: state_watermark,
            seen_clock_step: 0,
            lead: SensorLead::default(),
            lag_histogram: metrics::histogram!("edgeferry_process_lag_seconds"),
            apply_histogram: metrics::histogram!("edgeferry_process_seconds"),
            key_buf: String::new(),
            acks_owed: false,
            checkpoint_bytes: [checkpoint_on_disk, 0],
            checkpoint_share_warned: false,
            changes: None,
            quota_held: None,
            in_flight: None,
            disk_bound,
            chain: Chain {
                id: 0,
                whole_bytes: whole_on_disk,
                deltas: 0,
                delta_bytes: 0,
                whole_next: true,
            },
        };
        // Rule configuration may have changed: keep state of rules that still exist (alerts of
        // removed rules are cleared, and those clears forwarded like any alert).
        let clock = p.state.clock_ms;
        p.state
            .rules
            .reconfigure(&p.rule_cfgs, clock, &mut p.alerts);
        p.shared
            .status
            .alerts_active
            .store(p.state.rules.active() as u64, Ordering::Relaxed);
        if found {
            let mut ob = p.shared.outbox.lock().unwrap_or_else(|e| e.into_inner());
            for lane in Lane::PRIORITY {
                let at_checkpoint = p.state.outbox_next[lane as usize];
                let now = ob.next_lsn(lane);
                if now > at_checkpoint {
                    tracing::info!(
                        lane = lane.as_str(),
                        from = at_checkpoint,
                        to = now,
                        "forgetting outbox batches written after the last checkpoint (never sent; replay re-emits them)"
                    );
                    ob.forget(lane, at_checkpoint, now)?;
                }
            }
            // The forgotten batches must be recorded as done before a checkpoint covers
            // outbox positions beyond them (else they would be sent). On a disk that refuses
            // writes now, the daemon still starts and waits: the next checkpoint writes them
            // first (`acks_owed`).
            if let Err(e) = ob.persist_acks() {
                tracing::warn!(
                    "cannot write the outbox acknowledgement state at start ({e}); writing it \
                     before the next checkpoint"
                );
                p.acks_owed = true;
            }
        }
        p.publish_watermark();
        p.shared
            .trim_to
            .store(p.state.applied_lsn, Ordering::Release);
        Ok(p)
    }

    /// Where alerts are published on the local broker (none in replay-only uses).
    pub fn set_publications(&mut self, tx: mpsc::Sender<Publication>) {
        self.publications = Some(tx);
    }

    /// A source reported itself gone: its series' silence rules raise at once (see
    /// [`Offline`]). Also called by the daemon after replay for the sources its decoders'
    /// state still holds as gone.
    pub fn mark_offline(&mut self, gone: &Offline) {
        let now = self.state.clock_ms.max(self.shared.clock.arrival_ms());
        self.state.rules.mark_offline(gone, now, &mut self.alerts);
        if !self.alerts.is_empty() {
            self.dirty = true;
        }
        self.emit_alerts(None);
    }

    /// Where configuration reloads send their changes (none: the configuration is fixed).
    pub fn set_changes(&mut self, rx: mpsc::Receiver<ProcessChange>) {
        self.changes = Some(rx);
    }

    /// Puts a reloaded configuration's rules and batching limits into effect. The rules'
    /// states are carried over by name ([`rules::Rules::reconfigure`]); alerts this clears
    /// are published and forwarded like any alert, and the state is checkpointed as changed.
    fn reconfigure(&mut self, change: ProcessChange) {
        let ProcessChange {
            rules,
            batch_max,
            linger,
            done,
        } = change;
        self.rule_cfgs = rules;
        let clock = self.state.clock_ms;
        self.state
            .rules
            .reconfigure(&self.rule_cfgs, clock, &mut self.alerts);
        self.emit_alerts(None);
        self.limits.batch_max = batch_max;
        self.limits.linger = linger;
        self.dirty = true;
        tracing::info!(rules = self.rule_cfgs.len(), "rules reconfigured");
        let _ = done.send(());
    }

    /// The journal position the checkpoint reflects.
    /// The latest arrival time the state has seen (the journal's, after replay): the gateway
    /// clock's floor, so arrival times never go back across a restart.
    pub fn arrival_clock_ms(&self) -> i64 {
        self.state.clock_ms
    }

    pub fn checkpoint_lsn(&self) -> u64 {
        self.state.applied_lsn
    }

    /// Series with state (ingest's series guard starts from them).
    pub fn known_series(&self) -> Vec<String> {
        self.state.series.keys().cloned().collect()
    }

    /// Applies every journal record from the checkpoint on. Returns how many were applied.
    /// Alerts re-derived here are published again (local alert delivery is at-least-once).
    pub fn replay(&mut self, journal: &Journal) -> Result<u64, ProcessError> {
        let mut n = 0;
        let mut rewound = false;
        if journal.next_lsn() < self.state.applied_lsn {
            // Damage cut records off the journal's end after they were applied. Their effect
            // is in the state; the lsns from the journal's end on will carry new records,
            // which must not be mistaken for ones already applied.
            tracing::error!(
                checkpoint = self.state.applied_lsn,
                journal_next = journal.next_lsn(),
                "the journal ends before the checkpoint position (records lost to damage); \
                 continuing from the journal's end"
            );
            self.state.applied_lsn = journal.next_lsn();
            rewound = true;
        }
        let from = self.state.applied_lsn.max(journal.first_lsn());
        if from > self.state.applied_lsn {
            tracing::warn!(
                checkpoint = self.state.applied_lsn,
                first = journal.first_lsn(),
                "journal starts after the checkpoint position; the records in between are gone"
            );
            self.state.applied_lsn = from;
        }
        for r in journal.read_from(from)? {
            match r {
                Ok((lsn, entry)) => {
                    self.apply(&Committed {
                        lsn,
                        entry,
                        received_at: None,
                    });
                    self.flush_batches(false)?;
                    n += 1;
                }
                Err(e) => {
                    metrics::counter!("edgeferry_journal_undecodable_total").increment(1);
                    tracing::error!("skipping journal record: {e}");
                }
            }
        }
        // On a disk that refuses writes (full, failing), the daemon still starts: what replay
        // derived stays in memory and is written by the run loop's next attempts, as after a
        // failed write while running (under systemd an exit here would be a crash loop).
        if n > 0 {
            let now = self.state.clock_ms;
            self.close_due(now);
            if let Err(e) = self.flush_batches(false) {
                self.write_failed(e)?;
                self.dirty = true;
            }
        }
        if (n > 0 || rewound)
            && let Err(e) = self.checkpoint()
        {
            self.write_failed(e)?;
            self.dirty = true;
        }
        self.watermark_at_input = self.state.watermark_ms;
        Ok(n)
    }

    /// Folds one committed record in: rules first, then windows.
    pub fn apply(&mut self, c: &Committed) {
        if c.lsn < self.state.applied_lsn {
            return; // already reflected (replay overlap)
        }
        self.state.clock_ms = self.state.clock_ms.max(c.entry.received_ms);
        let now = self.state.clock_ms;
        self.last_input = Instant::now();
        // How far the sensors may lead the arrival clock: not at all by a trusted clock; by
        // what every recent message agrees on when the clock is not synchronised (a gateway
        // an hour behind all of its sensors must not hold their windows open for an hour).
        let newest = c.entry.readings.iter().map(|r| r.time_ms).max();
        if let Some(newest) = newest {
            self.lead
                .observe(c.entry.received_ms, newest - c.entry.received_ms);
        }
        let cap = if self.shared.clock.trusted() {
            c.entry.received_ms
        } else {
            c.entry.received_ms.saturating_add(self.lead.lead_ms())
        };
        for r in &c.entry.readings {
            // The watermark follows the data: a backlog the broker kept while edgeferry was
            // stopped or held back moves it through its own event times, in order, so it lands
            // in its original windows. Never beyond the arrival time (plus the agreed lead): a
            // sensor clock running ahead must not make everyone else's readings late.
            self.state.watermark_ms = self.state.watermark_ms.max(r.time_ms.min(cap));
            // The key is built in a reused buffer: only a new series allocates.
            self.key_buf.clear();
            crate::model::write_series_key(&mut self.key_buf, &r.metric, &r.tags);
            let key = self.key_buf.as_str();
            if !self.state.series.contains_key(key) {
                self.shared
                    .status
                    .series
                    .store(self.state.series.len() as u64 + 1, Ordering::Relaxed);
                self.state.series.insert(
                    key.to_owned(),
                    Arc::new(SeriesInfo {
                        key: key.to_owned(),
                        metric: r.metric.clone(),
                        tags: (&r.tags).into(),
                    }),
                );
            }
            let info = &self.state.series[key];
            self.state
                .rules
                .on_reading(info, r.value, r.time_ms, now, &mut self.alerts);
            match self
                .state
                .windows
                .apply(key, r.value, r.time_ms, self.state.watermark_ms)
            {
                window::Applied::TooLate => {
                    metrics::counter!("edgeferry_process_too_late_total").increment(1);
                    self.shared.status.too_late.fetch_add(1, Ordering::Relaxed);
                    self.shared
                        .status
                        .last_too_late_ms
                        .store(crate::clock::now_ms(), Ordering::Relaxed);
                    if let Some(n) = self.log_limit.check("too_late") {
                        tracing::warn!(
                            series = %key,
                            suppressed = n,
                            "reading at {} is older than every window still kept (correction_horizon behind the data's watermark); dropped",
                            crate::util::rfc3339_ms(r.time_ms)
                        );
                    }
                }
                window::Applied::Correction => {
                    metrics::counter!("edgeferry_process_late_corrections_total").increment(1)
                }
                window::Applied::Rejected => {
                    metrics::counter!("edgeferry_process_rejected_total").increment(1)
                }
                window::Applied::Open => {}
            }
        }
        self.state.applied_lsn = c.lsn + 1;
        self.dirty = true;
        self.emit_alerts(c.received_at);
        // Windows are closed (and corrections emitted) at most every CLOSE_EVERY_MS of
        // processing time, not per record: during a backlog drain every reading of a closed
        // window is late, and re-emitting the whole aggregate per reading would flood the
        // outbox. The processing clock makes this the same in live runs and in replay.
        if now - self.last_close_ms >= CLOSE_EVERY_MS {
            self.close_due(now);
        }
    }

    fn emit_alerts(&mut self, received_at: Option<Instant>) {
        // Called for every record: the count of active alerts (a walk over every series'
        // rule states) changes only when an alert is raised or cleared. Recounting per record
        // cost O(series) each and made 10,000 series at 10,000 readings/s fall seconds behind.
        if self.alerts.is_empty() {
            return;
        }
        for a in self.alerts.drain(..) {
            self.shared.status.alerts.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("edgeferry_alerts_total", "rule" => a.rule.clone(),
                "state" => match a.state { AlertState::Raised => "raised", AlertState::Cleared => "cleared" })
            .increment(1);
            tracing::info!(rule = %a.rule, series = %a.series, state = ?a.state, value = ?a.value, "alert");
            if let Some(live) = self.shared.live.as_ref().filter(|l| l.has_receivers()) {
                live.send(crate::live::LiveEvent::Alert {
                    rule: a.rule.clone(),
                    series: a.series.clone(),
                    state: a.state,
                    value: a.value,
                    time_ms: a.time_ms,
                });
            }
            if let Some(tx) = &self.publications {
                let payload = serde_json::to_vec(&serde_json::json!({
                    "rule": a.rule,
                    "series": a.series,
                    "metric": a.metric,
                    "tags": a.tags,
                    "state": a.state,
                    "value": a.value,
                    "time": crate::util::rfc3339_ms(a.time_ms),
                }))
                .expect("alert JSON");
                let p = Publication {
                    topic: self.state.rules.topic(&a),
                    payload,
                    received_at,
                };
                if tx.try_send(p).is_err() {
                    metrics::counter!("edgeferry_alerts_publish_dropped_total").increment(1);
                    if let Some(n) = self.log_limit.check("alert_queue_full") {
                        tracing::warn!(
                            suppressed = n,
                            "local alert publish queue full; alert only forwarded upstream"
                        );
                    }
                }
            }
            // Alerts jump the queue: their batch is made at once (see flush_batches).
            self.state.pending.push(OutboxItem::Alert(a));
        }
        self.shared
            .status
            .alerts_active
            .store(self.state.rules.active() as u64, Ordering::Relaxed);
    }

    fn close_due(&mut self, now: i64) {
        self.last_close_ms = now;
        let watermark = self.state.watermark_ms;
        // Each closed window goes straight into `pending` as it is emitted, and full batches
        // leave for the outbox as they fill: gathering a whole close first (10,000 series)
        // held ~15 MiB more at the peak. A failed append leaves the items pending; the run
        // loop's next flush meets the error again and handles it.
        let mut sink = Emitted {
            series: &self.state.series,
            flush: flush_of!(self),
            emitted_at: now,
            live: self.shared.live.as_ref().filter(|l| l.has_receivers()),
            n: 0,
            failed: false,
        };
        self.state.windows.close_due(watermark, &mut sink);
        let n = sink.n;
        if n == 0 {
            return;
        }
        metrics::counter!("edgeferry_process_windows_emitted_total").increment(n);
        self.shared
            .status
            .windows_emitted
            .fetch_add(n, Ordering::Relaxed);
        self.dirty = true;
    }

    /// Moves pending items into outbox batches: alerts at once, aggregates when `batch_max`
    /// are pending or the oldest waited `linger` (on the processing clock), or when `force`.
    fn flush_batches(&mut self, force: bool) -> Result<(), ProcessError> {
        flush_of!(self).run(force)
    }

    /// Syncs the outbox, writes the checkpoint atomically, then lets the forwarder send up to
    /// it and the journal be trimmed below it.
    pub fn checkpoint(&mut self) -> Result<(), ProcessError> {
        let pending = self.begin_checkpoint()?;
        let written = pending
            .write()
            .inspect_err(|_| self.checkpoint_not_written())?;
        self.finish_checkpoint(written);
        Ok(())
    }

    /// First half of a checkpoint, on the processing task: makes the outbox durable, records
    /// its positions and serializes the state into the checkpoint's temporary file. What the
    /// checkpoint covers is fixed here; the (slow) write can then happen elsewhere while
    /// records keep being applied.
    fn begin_checkpoint(&mut self) -> Result<PendingCheckpoint, ProcessError> {
        {
            let mut ob = self.shared.outbox.lock().unwrap_or_else(|e| e.into_inner());
            ob.sync()?;
            if self.acks_owed {
                ob.persist_acks().map_err(|source| ProcessError::Io {
                    path: ob.acks_path(),
                    source,
                })?;
                self.acks_owed = false;
            }
            self.state.outbox_next = [ob.next_lsn(Lane::Aggregates), ob.next_lsn(Lane::Alerts)];
        }
        // While the disk refuses writes (the journal's or ours), no deltas: a delta that fits
        // takes the room the oldest aggregates gave for the readings, and the chain then only
        // grows. A whole checkpoint is tried instead; once one fits it frees the deltas.
        let disk_trouble = self
            .shared
            .input_disk_full
            .as_ref()
            .is_some_and(|full| full())
            || self
                .shared
                .status
                .write_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some();
        let kind = match self.chain.next_kind(self.disk_bound) {
            Kind::Delta { .. } if disk_trouble => Kind::Whole {
                id: checkpoint::new_id(),
            },
            kind => kind,
        };
        // A delta that cannot be staged has put its slots back itself; a whole one is tried
        // again as a whole one.
        let mut pending = self.state.stage(&self.path, kind)?;
        self.in_flight = Some((kind, pending.taken.take()));
        self.checkpoint_bytes[1] = pending.bytes;
        self.dirty = false;
        self.appended = false;
        self.alerts_appended = false;
        Ok(pending)
    }

    /// The checkpoint in flight was not written (a full or failing disk): a delta's slots go
    /// back into the next delta, which takes its place in the chain (same number); after a
    /// whole one, the next is whole again. Deltas keep a full disk's writes small: the chain
    /// goes on with a few hundred kilobytes where a whole rewrite needs megabytes free.
    fn checkpoint_not_written(&mut self) {
        match self.in_flight.take() {
            Some((Kind::Delta { .. }, Some(taken))) => self.state.windows.restore_changed(taken),
            _ => self.chain.whole_next = true,
        }
    }

    /// Second half, once the checkpoint is durable: only now may the journal be trimmed below
    /// it and the forwarder see the outbox batches it covers. (`state.outbox_next` is not
    /// changed in between: one checkpoint is in flight at a time.)
    fn finish_checkpoint(&mut self, written: WrittenCheckpoint) {
        self.in_flight = None;
        let was = self
            .shared
            .status
            .write_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if was.is_some() {
            tracing::info!("outbox and checkpoint written again");
        }
        match written.kind {
            Kind::Whole { id } => {
                // Durable: the deltas of the chain before it are no longer needed.
                checkpoint::remove_deltas(self.path.parent().unwrap_or(Path::new(".")));
                self.chain = Chain {
                    id,
                    whole_bytes: written.bytes,
                    deltas: 0,
                    delta_bytes: 0,
                    whole_next: false,
                };
            }
            Kind::Delta { seq, .. } => {
                self.chain.deltas = seq;
                self.chain.delta_bytes += written.bytes;
            }
        }
        let kind = match written.kind {
            Kind::Whole { .. } => "whole",
            Kind::Delta { .. } => "delta",
        };
        metrics::counter!("edgeferry_checkpoints_total", "kind" => kind).increment(1);
        let on_disk = self.chain.whole_bytes + self.chain.delta_bytes;
        metrics::gauge!("edgeferry_checkpoint_bytes").set(on_disk as f64);
        metrics::counter!("edgeferry_checkpoint_written_bytes_total").increment(written.bytes);
        self.checkpoint_bytes = [on_disk, 0];
        metrics::histogram!("edgeferry_checkpoint_seconds").record(written.seconds);
        self.shared
            .trim_to
            .store(written.applied_lsn, Ordering::Release);
        self.publish_watermark();
        self.shared
            .status
            .series
            .store(self.state.series.len() as u64, Ordering::Relaxed);
    }

    fn publish_watermark(&self) {
        self.shared.watermark.send_replace(self.state.outbox_next);
    }

    /// Applies the disk quota to everything in the data directory: journal, outbox, the
    /// checkpoint files (the whole checkpoint and its deltas, which add up to at most
    /// [`checkpoint::delta_share`] times it before a new whole one is written) and room for a
    /// whole rewrite (while a new whole checkpoint replaces the old one both are on disk; a
    /// stale temporary one is removed at open): `2 + delta_share` times the whole checkpoint.
    ///
    /// The checkpoint's size follows the number of series and windows, not the data waiting,
    /// so blocking or dropping cannot shrink it: it leaves less room for journal and outbox.
    /// When it takes more than a third of `max_disk` (a rewrite then needs two thirds), that is
    /// said once, with what to change.
    fn enforce_quota(&mut self) -> Result<(), ProcessError> {
        let [on_disk, being_written] = self.checkpoint_bytes;
        let max = self.limits.store.max_disk.as_u64();
        if on_disk.max(being_written) > max / 3 && !self.checkpoint_share_warned {
            self.checkpoint_share_warned = true;
            tracing::warn!(
                "the checkpoint ({} B for {} series with its deltas; room for a rewrite is kept besides) takes \
                 more than a third of store.max_disk ({}): raise store.max_disk or lower \
                 process.max_series, else little room is left for the journal and the outbox",
                on_disk.max(being_written),
                self.state.series.len(),
                self.limits.store.max_disk
            );
        }
        // Room for the next rewrite is kept free, not only counted while it happens: the
        // successor appears between two quota ticks, all at once.
        // The whole chain's room is kept too, not what its deltas take at the moment: else
        // every new whole checkpoint (which removes the deltas) would free room that the next
        // deltas take back, and a quota block would lift and fall with it.
        let whole = self.chain.whole_bytes.max(being_written);
        let share = checkpoint::delta_share(self.chain.whole_bytes, self.disk_bound);
        let checkpoint = (on_disk + whole).max(whole * (2 + share));
        let mut ob = self.shared.outbox.lock().unwrap_or_else(|e| e.into_inner());
        quota::enforce(
            &self.limits.store,
            &mut ob,
            self.shared.journal_bytes.load(Ordering::Relaxed) + checkpoint,
            &self.shared.status,
            &mut self.quota_held,
        )
    }

    /// Runs until the channel closes (ingest drained and stopped: the one shutdown order),
    /// checkpointing every `checkpoint_interval` while something changed (within
    /// [`ALERTS_CHECKPOINT_WITHIN`] when alert batches wait for the forwarder),
    /// and once more at the end.
    pub async fn run(mut self, mut rx: mpsc::Receiver<CommitGroup>) -> Result<(), ProcessError> {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_checkpoint = Instant::now();
        // The checkpoint being written, if any. Writing (fdatasync of the whole state: a few
        // MB with 10,000 series) happens on a blocking thread so that applying records, and
        // with it the broker's acknowledgements, does not stall behind it.
        let mut writing: Option<tokio::task::JoinHandle<Result<WrittenCheckpoint, ProcessError>>> =
            None;
        loop {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(group) => self.on_committed(group, rx.len()),
                    None => break,
                },
                c = async { self.changes.as_mut().expect("guarded by the condition").recv().await },
                    if self.changes.is_some() =>
                {
                    match c {
                        Some(change) => self.reconfigure(change),
                        None => self.changes = None,
                    }
                }
                done = async { writing.as_mut().expect("guarded by the condition").await },
                    if writing.is_some() =>
                {
                    writing = None;
                    match joined(done) {
                        Ok(w) => self.finish_checkpoint(w),
                        Err(e) => {
                            // Not written: the state is still only in memory (and the
                            // temporary file is gone with the staging); what changed since
                            // the checkpoint before is only in a whole one now.
                            self.checkpoint_bytes[1] = 0;
                            self.checkpoint_not_written();
                            self.dirty = true;
                            self.write_failed(e)?;
                        }
                    }
                }
                _ = tick.tick() => {
                    // Let the gateway's clock fire silence rules (it never goes back; a step
                    // forward is not silence), and close windows once input is idle.
                    let now = self.shared.clock.arrival_ms();
                    self.follow_clock_steps();
                    if now > self.state.clock_ms {
                        self.state.clock_ms = now;
                        self.state.rules.on_tick(now, &mut self.alerts);
                        self.emit_alerts(None);
                    }
                    if self.input_idle() {
                        // The data's time goes on at the monotonic clock's pace from its last
                        // watermark; never past the arrival clock.
                        let idle_ms = self.last_input.elapsed().as_millis() as i64;
                        let cap = if self.shared.clock.trusted() {
                            now
                        } else {
                            now.saturating_add(self.lead.lead_ms())
                        };
                        let target = (self.watermark_at_input + idle_ms).min(cap);
                        if target > self.state.watermark_ms {
                            self.state.watermark_ms = target;
                            self.dirty = true;
                        }
                    }
                    self.close_due(self.state.clock_ms);
                    if let Err(e) = self.enforce_quota() {
                        self.write_failed(e)?;
                    }
                    // The readings come first: a journal that cannot write for a full disk
                    // gets the room of the oldest unsent aggregates (one segment a tick).
                    if self.shared.input_disk_full.as_ref().is_some_and(|full| full()) {
                        self.drop_oldest_for_room("disk full: the journal cannot write");
                    }
                }
            }
            if let Err(e) = self.flush_batches(false) {
                self.write_failed(e)?;
            }
            let since = last_checkpoint.elapsed();
            // While the journal cannot write for a full disk, no checkpoint is started: the
            // room the oldest aggregates give up is the readings' (a checkpoint's temporary
            // file would take it and fail anyway); checkpoints resume with the journal.
            let journal_starved = self
                .shared
                .input_disk_full
                .as_ref()
                .is_some_and(|full| full());
            if writing.is_none()
                && !journal_starved
                && (((self.dirty || self.appended) && since >= self.cfg.checkpoint_interval)
                    || (self.alerts_appended
                        && since >= ALERTS_CHECKPOINT_WITHIN.min(self.cfg.checkpoint_interval)))
            {
                last_checkpoint = Instant::now();
                match tokio::task::block_in_place(|| self.begin_checkpoint()) {
                    Ok(pending) => {
                        writing = Some(tokio::task::spawn_blocking(move || pending.write()));
                    }
                    Err(e) => self.write_failed(e)?,
                }
            }
        }
        if let Some(w) = writing.take() {
            self.finish_checkpoint(joined(w.await)?);
        }
        if self.dirty || self.appended {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Applies the wall clock's forward steps to the silence rules: a series heard a second
    /// before NTP moved the clock an hour on has been silent for a second, not an hour.
    fn follow_clock_steps(&mut self) {
        for step in self.shared.clock.steps_after(self.seen_clock_step) {
            self.seen_clock_step = step.seq;
            if step.delta_ms > 0 {
                self.state.rules.shift_silence(step.at_ms, step.delta_ms);
                self.dirty = true;
            }
        }
    }

    /// Whether input is idle, so processing time may move the watermark on (closing the last
    /// windows when sensors stop): nothing committed for `allowed_lateness` (at least a
    /// second) while ingest is live. Not while the broker is unreachable, the quota or a
    /// failing disk holds ingest back, or before ingest is subscribed: then the data is
    /// delayed by edgeferry or its link, not absent, and moving on would judge it late.
    fn input_idle(&self) -> bool {
        let idle_after = self.cfg.allowed_lateness.max(Duration::from_secs(1));
        self.last_input.elapsed() >= idle_after
            && !self.shared.status.blocked.load(Ordering::Relaxed)
            && self.shared.input_live.as_ref().is_none_or(|live| live())
    }

    /// A write of the outbox or the checkpoint failed. A disk error (full, failing,
    /// read-only) is waited out: everything stays in memory and is written at the next
    /// attempt, while the forwarder keeps sending what earlier checkpoints cover and the
    /// journal (which is not trimmed past the last checkpoint) keeps every reading. It is
    /// logged once per episode, counted and shown in `/status`. When the disk is full and
    /// `when_full = "drop_oldest"`, the oldest unsent aggregates are dropped to make room, as
    /// at the quota (a failing or read-only disk drops nothing: room would not cure it). Any
    /// other error ends processing.
    fn write_failed(&mut self, e: ProcessError) -> Result<(), ProcessError> {
        if !e.is_disk() {
            return Err(e);
        }
        metrics::counter!("edgeferry_process_write_errors_total").increment(1);
        let mut slot = self
            .shared
            .status
            .write_error
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            tracing::error!(
                "cannot write the outbox or checkpoint: {e}; keeping the state in memory and \
                 retrying (free space in gateway.data_dir)"
            );
        }
        *slot = Some(e.to_string());
        drop(slot);
        if crate::store::is_disk_full(&e) {
            self.drop_oldest_for_room("disk full: the outbox or checkpoint cannot write");
        }
        Ok(())
    }

    /// With `when_full = "drop_oldest"`, drops the oldest unsent aggregate segment to give
    /// back room on a full disk (`why` names whose write failed), counted as at the quota.
    fn drop_oldest_for_room(&mut self, why: &str) {
        if self.limits.store.when_full == WhenFull::DropOldest {
            let mut ob = self.shared.outbox.lock().unwrap_or_else(|e| e.into_inner());
            if let Ok(Some(d)) = ob.drop_oldest(Lane::Aggregates) {
                quota::record_drop(
                    &self.shared.status,
                    &d,
                    format_args!("{why} (store.when_full = \"drop_oldest\")"),
                );
            }
        }
    }
}
impl Processor {
    /// One commit group of live records: measured against the budget, then applied.
    ///
    /// The lag and apply-time histograms get one sample per group (the oldest record's lag,
    /// the mean apply time per record): a sample per record made every `/metrics` scrape fold
    /// hundreds of thousands of samples into the quantile summaries during a backlog drain.
    fn on_committed(&mut self, group: CommitGroup, queued: usize) {
        let CommitGroup {
            records: group,
            offline,
        } = group;
        let Some(first) = group.first() else {
            for gone in &offline {
                self.mark_offline(gone);
            }
            return;
        };
        // Ages on the monotonic clock: a wall-clock step is not a delay.
        let age_of = |c: &Committed| c.received_at.map(|t| t.elapsed());
        let age = age_of(first).unwrap_or_default();
        self.lag_histogram.record(age.as_secs_f64());
        let budget = self.cfg.budget;
        let late = group
            .iter()
            .filter(|c| age_of(c).is_some_and(|a| a > budget))
            .count() as u64;
        if late > 0 {
            self.shared
                .status
                .budget_violations
                .fetch_add(late, Ordering::Relaxed);
            metrics::counter!("edgeferry_budget_violations_total").increment(late);
            if let Some(n) = self.log_limit.check("budget") {
                let held = self.shared.status.blocked.load(Ordering::Relaxed) || {
                    let at = self.shared.status.last_held_mono.load(Ordering::Relaxed);
                    at > 0 && crate::clock::mono_ms() - at <= age.as_millis() as i64 + 1000
                };
                tracing::warn!(
                    suppressed = n,
                    "processing backlog is {} ms old, beyond process.budget ({:?}); {}",
                    age.as_millis(),
                    budget,
                    budget_cause(held, queued)
                );
            }
        }
        let started = Instant::now();
        let mut gone = offline.iter().peekable();
        for (i, c) in group.iter().enumerate() {
            while let Some(g) = gone.next_if(|g| g.after <= i) {
                self.mark_offline(g);
            }
            self.apply(c);
        }
        for g in gone {
            self.mark_offline(g);
        }
        self.apply_histogram
            .record(started.elapsed().as_secs_f64() / group.len() as f64);
        self.watermark_at_input = self.state.watermark_ms;
    }
}

/// What a flush of the pending items needs: the processor's fields, borrowed apart so that a
/// close can flush while the windows are borrowed too.
struct Flush<'a> {
    outbox: &'a std::sync::Mutex<crate::store::outbox::Outbox>,
    pending: &'a mut Vec<OutboxItem>,
    since_ms: &'a mut Option<i64>,
    /// Processing clock.
    now: i64,
    limits: &'a ProcessLimits,
    /// Set when batches were appended (a checkpoint makes them visible upstream).
    appended: &'a mut bool,
    /// Set when alert batches were appended (checkpointed promptly).
    alerts_appended: &'a mut bool,
}

impl Flush<'_> {
    fn run(&mut self, force: bool) -> Result<(), ProcessError> {
        let mut ob = self.outbox.lock().unwrap_or_else(|e| e.into_inner());
        let alerts_before = ob.next_lsn(Lane::Alerts);
        let pending = batching::Pending {
            items: self.pending,
            since_ms: self.since_ms,
        };
        match batching::flush(
            pending,
            &mut ob,
            self.now,
            self.limits.batch_max,
            self.limits.linger,
            force,
        ) {
            Ok(appended) => {
                *self.appended |= appended;
                *self.alerts_appended |= ob.next_lsn(Lane::Alerts) != alerts_before;
                Ok(())
            }
            Err(e) => {
                // Some batches may be in the outbox already: checkpoint soon.
                *self.appended = true;
                Err(e)
            }
        }
    }
}

/// Where [`Windows::close_due`] puts closed windows: each becomes a pending outbox item
/// (and a live event when someone watches) as it is emitted, and full batches are appended
/// to the outbox as soon as they fill.
struct Emitted<'a> {
    series: &'a BTreeMap<String, Arc<SeriesInfo>>,
    flush: Flush<'a>,
    /// Processing time of the close (the pending items' "since").
    emitted_at: i64,
    live: Option<&'a crate::live::LiveFeed>,
    /// Windows emitted.
    n: u64,
    /// An append failed during this close: the rest stays pending for the run loop.
    failed: bool,
}

impl Extend<WindowAggregate> for Emitted<'_> {
    fn extend<I: IntoIterator<Item = WindowAggregate>>(&mut self, windows: I) {
        for w in windows {
            self.n += 1;
            let Some(series) = self.series.get(&w.series).cloned() else {
                continue;
            };
            if let Some(live) = self.live {
                live.send(crate::live::LiveEvent::Window {
                    series: w.series.clone(),
                    window_start_ms: w.window_start_ms,
                    window_secs: w.window_secs,
                    version: w.version,
                    count: w.agg.count(),
                    mean: w.agg.mean(),
                    min: w.agg.min(),
                    max: w.agg.max(),
                });
            }
            self.flush.pending.push(OutboxItem::Aggregate {
                series,
                window_start_ms: w.window_start_ms,
                window_secs: w.window_secs,
                version: w.version,
                agg: w.agg,
            });
            self.flush.since_ms.get_or_insert(self.emitted_at);
            if !self.failed && self.flush.pending.len() >= self.flush.limits.batch_max.max(1) {
                self.failed = self.flush.run(false).is_err();
            }
        }
    }
}

/// The lead of the sensors' clocks over the arrival clock that every message of the last
/// [`SensorLead::SECONDS`] seconds of arrival time agrees on: the least (newest event time −
/// arrival time) per arrival second, the least of those, never below 0. Driven by the records'
/// own arrival times, so replay computes the same values.
#[derive(Debug, Default)]
struct SensorLead {
    /// (arrival second, least lead in it), newest last.
    seconds: std::collections::VecDeque<(i64, i64)>,
}

impl SensorLead {
    const SECONDS: i64 = 10;

    fn observe(&mut self, received_ms: i64, lead_ms: i64) {
        let sec = received_ms.div_euclid(1000);
        match self.seconds.back_mut() {
            Some((s, least)) if *s == sec => *least = (*least).min(lead_ms),
            Some((s, _)) if *s > sec => {} // arrival times never go back; ignore if they do
            _ => self.seconds.push_back((sec, lead_ms)),
        }
        while self
            .seconds
            .front()
            .is_some_and(|(s, _)| *s <= sec - Self::SECONDS)
        {
            self.seconds.pop_front();
        }
    }

    fn lead_ms(&self) -> i64 {
        self.seconds
            .iter()
            .map(|(_, l)| *l)
            .min()
            .unwrap_or(0)
            .max(0)
    }
}

/// Why records reached processing later than the budget allows, for the warning: the
/// quota's `block` policy held them, a backlog is being drained (commit groups queue up
/// behind this one), or processing itself is too slow for the input.
fn budget_cause(held: bool, queued: usize) -> String {
    if held {
        "cause: store.when_full = \"block\" held ingest back at store.max_disk; the messages \
         received meanwhile waited (unacknowledged) until the outbox drained"
            .into()
    } else if queued > 0 {
        format!(
            "cause: a backlog is being drained ({queued} more commit groups queued), as after a \
             restart or reconnect when the broker delivers what it kept; it catches up by itself"
        )
    } else {
        "cause: processing is slower than the input (rules, windows or series count too large \
         for this machine?)"
            .into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sensors_that_all_lead_the_clock_lead_it_and_one_that_does_not_cancels_it() {
        let mut lead = SensorLead::default();
        let t0 = 1_700_000_000_000;
        for i in 0..20 {
            lead.observe(t0 + i * 100, 3_600_000 + i);
        }
        assert_eq!(lead.lead_ms(), 3_600_000, "every message agrees");
        lead.observe(t0 + 2500, 200);
        assert_eq!(
            lead.lead_ms(),
            200,
            "one message close to the clock is enough"
        );
        // Ten seconds later that message is forgotten.
        lead.observe(t0 + 12_600, 3_600_000);
        assert_eq!(lead.lead_ms(), 3_600_000);
        lead.observe(t0 + 13_000, -60_000);
        assert_eq!(lead.lead_ms(), 0, "old data never moves the watermark back");
    }

    #[test]
    fn a_budget_miss_names_the_block_policy_or_the_backlog() {
        assert!(budget_cause(true, 3).contains("when_full = \"block\""));
        assert!(budget_cause(false, 3).contains("backlog is being drained (3 more"));
        assert!(budget_cause(false, 0).contains("processing is slower than the input"));
    }
}
