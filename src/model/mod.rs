//! The owned values every stage shares, below all of them: readings and their series, the
//! journal record, aggregates with their exact moments and quantile sketches, outbox batches,
//! alerts, the messages on the channels between stages, and the status report.
//!
//! Stages never import one another; they meet here. This module only declares and re-exports.

pub mod aggregate;
pub mod alert;
pub mod batch;
pub mod messages;
pub mod reading;
pub mod record;
pub mod sketch;
pub mod status;

pub use aggregate::Aggregate;
pub use alert::{Alert, AlertState};
pub use batch::{BatchKind, OutboxBatch, OutboxItem};
pub use messages::{CommitGroup, Committed, Offline, Publication};
pub use reading::{Reading, SeriesInfo, Tags, series_key, write_series_key};
pub use record::{DedupKey, JournalEntry};
pub use sketch::Sketch;
pub use status::{
    Backlog, BrokerStatus, ClockStatus, IngestCounters, ProcessCounters, RejectedMessage,
    StatusReport, UpstreamStatus,
};
