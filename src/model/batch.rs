//! What the outbox stores: batches of aggregates or alerts, self-contained (series travel with
//! their names here; the wire protocol replaces them by per-connection dictionary ids).

use super::aggregate::Aggregate;
use super::alert::Alert;
use super::reading::SeriesInfo;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// One item of a batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OutboxItem {
    /// A closed window (or a correction of one: a higher `version`, the complete aggregate).
    Aggregate {
        /// Which series the window belongs to, with its metric and tags spelled out; shared
        /// with the processor's series table (a tag map is ~0.5 KiB: 10,000 copies of them at a
        /// window close were a large part of the gateway's peak heap). Encoded as the
        /// `SeriesInfo` itself.
        series: Arc<SeriesInfo>,
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

impl OutboxBatch {
    /// The stored encoding (postcard) of a batch of `items`, without copying them into an
    /// [`OutboxBatch`] first: at a window close over 10,000 series those copies were a large
    /// part of the gateway's peak heap. Decodes as an [`OutboxBatch`].
    pub fn encode(kind: BatchKind, created_ms: i64, items: &[OutboxItem]) -> Vec<u8> {
        /// The same fields in the same order as [`OutboxBatch`]: postcard writes a slice and
        /// a `Vec` alike (a length, then the elements).
        #[derive(Serialize)]
        struct Borrowed<'a> {
            kind: BatchKind,
            created_ms: i64,
            items: &'a [OutboxItem],
        }
        postcard::to_stdvec(&Borrowed {
            kind,
            created_ms,
            items,
        })
        .expect("batches always encode")
    }
}
