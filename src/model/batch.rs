//! What the outbox stores: batches of aggregates or alerts, self-contained (series travel with
//! their names here; the wire protocol replaces them by per-connection dictionary ids).

use super::aggregate::Aggregate;
use super::alert::Alert;
use super::reading::SeriesInfo;
use serde::{Deserialize, Serialize};

/// One item of a batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OutboxItem {
    /// A closed window (or a correction of one: a higher `version`, the complete aggregate).
    Aggregate {
        /// Which series the window belongs to, with its metric and tags spelled out.
        series: SeriesInfo,
        /// Window start, ms since epoch (aligned to the window length).
        window_start_ms: i64,
        /// Window length in seconds.
        window_secs: u32,
        /// 1 for the first emission, +1 per correction.
        version: u32,
        /// The window's complete statistics; a correction carries the whole aggregate again, not
        /// a delta.
        agg: Aggregate,
    },
    /// A raised or cleared alert.
    Alert(Alert),
}

/// Which lane a batch belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BatchKind {
    /// Closed windows and their corrections (the outbox's aggregates lane).
    Aggregates,
    /// Raised and cleared alerts (the alerts lane: sent first, dropped last).
    Alerts,
}

/// A batch as stored in the outbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxBatch {
    /// Which lane the batch is stored in; a batch never mixes aggregates and alerts.
    pub kind: BatchKind,
    /// When the batch was made (processing clock, ms since epoch).
    pub created_ms: i64,
    /// The items, all of the batch's kind, at most `[upstream] batch_max` of them.
    pub items: Vec<OutboxItem>,
}
