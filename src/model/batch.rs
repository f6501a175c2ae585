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
        /// The series.
        series: SeriesInfo,
        /// Window start, ms since epoch (aligned to the window length).
        window_start_ms: i64,
        /// Window length in seconds.
        window_secs: u32,
        /// 1 for the first emission, +1 per correction.
        version: u32,
        /// The statistics.
        agg: Aggregate,
    },
    /// A raised or cleared alert.
    Alert(Alert),
}

/// Which lane a batch belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BatchKind {
    /// Aggregates.
    Aggregates,
    /// Alerts.
    Alerts,
}

/// A batch as stored in the outbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxBatch {
    /// Aggregates or alerts.
    pub kind: BatchKind,
    /// When the batch was made (processing clock, ms since epoch).
    pub created_ms: i64,
    /// The items.
    pub items: Vec<OutboxItem>,
}
