//! The handles the processor shares with the other stages, and the limits it takes from
//! other configuration sections.

use crate::store::StoreConfig;
use crate::store::outbox::Outbox;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// Counters of the processing stage, shared with status.
#[derive(Debug, Default)]
pub struct ProcessStatus {
    /// Distinct series (metric + tags) processing tracks, bounded by `process.max_series`.
    pub series: AtomicU64,
    /// Alerts currently raised.
    pub alerts_active: AtomicU64,
    /// Alerts raised or cleared since start.
    pub alerts: AtomicU64,
    /// Windows emitted (including corrections).
    pub windows_emitted: AtomicU64,
    /// Times the processing backlog was older than the budget.
    pub budget_violations: AtomicU64,
    /// Items dropped at the disk quota.
    pub dropped_items: AtomicU64,
    /// Readings dropped as too late (older than `correction_horizon` behind the watermark).
    pub too_late: AtomicU64,
    /// Wall-clock ms of the last reading dropped as too late (0: never).
    pub last_too_late_ms: std::sync::atomic::AtomicI64,
    /// Wall-clock ms of the last drop at the disk quota (0: never).
    pub last_dropped_ms: std::sync::atomic::AtomicI64,
    /// Why processing cannot write (the outbox or the checkpoint), while it cannot: a full
    /// or failing disk. Shown in `/status`; cleared by the next checkpoint that is written.
    pub write_error: std::sync::Mutex<Option<String>>,
    /// Ingest is held back because the disk quota is reached and `when_full = "block"`
    /// (shared with the committer, which stops taking messages while it is set).
    pub blocked: Arc<AtomicBool>,
    /// Monotonic ms ([`crate::clock::mono_ms`]) when the quota last held ingest back (0:
    /// never), so a budget miss just after the block ended can name it as the cause.
    pub last_held_mono: std::sync::atomic::AtomicI64,
}

/// Handles the processor shares with other stages.
#[derive(Clone)]
pub struct ProcessShared {
    /// The outbox (the forwarder reads and acknowledges through it).
    pub outbox: Arc<Mutex<Outbox>>,
    /// Outbox lsns (aggregates, alerts) covered by the last checkpoint: the forwarder sends
    /// only below them.
    pub watermark: watch::Sender<[u64; 2]>,
    /// Lowest journal position still needed: the committer trims below it.
    pub trim_to: Arc<AtomicU64>,
    /// Journal bytes on disk (kept up to date by the committer) for the quota.
    pub journal_bytes: Arc<AtomicU64>,
    /// Counters the processor updates as it goes; `/status` and `/metrics` read them.
    pub status: Arc<ProcessStatus>,
    /// Whether ingest is taking input right now (connected, subscribed, able to write the
    /// journal); `None`: always. Only then may idle input move the watermark on.
    pub input_live: Option<Arc<dyn Fn() -> bool + Send + Sync>>,
    /// Whether ingest's journal cannot write because the disk is full; `None`: never. With
    /// `store.when_full = "drop_oldest"` processing then drops the oldest aggregate batches
    /// to give the readings room, as at the quota.
    pub input_disk_full: Option<Arc<dyn Fn() -> bool + Send + Sync>>,
    /// The live feed: emitted windows and alerts are sent to it (never blocks).
    pub live: Option<crate::live::LiveFeed>,
    /// The gateway's clock: "now" for silence rules and the idle watermark, and the wall
    /// clock's steps (which silence rules must not mistake for silence).
    pub clock: Arc<crate::clock::GatewayClock>,
}

/// Limits and policies the processor applies that live in other sections.
#[derive(Debug, Clone)]
pub struct ProcessLimits {
    /// `[upstream] batch_max`: most items per outbox batch (500 without `[upstream]`).
    pub batch_max: usize,
    /// `[upstream] linger`: longest an aggregate waits for its batch to fill (1 s without
    /// `[upstream]`); alerts never wait.
    pub linger: Duration,
    /// `[store]`: the disk quota over journal + outbox and the policy when it is reached.
    pub store: StoreConfig,
}
