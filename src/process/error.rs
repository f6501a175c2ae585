//! Errors of the processing stage.

use std::path::PathBuf;

/// Errors of the processing stage.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The state directory or checkpoint file could not be written.
    #[error("checkpoint {path}: {source}")]
    Io {
        /// The state directory or checkpoint file concerned (just `checkpoint` when the writer
        /// task itself failed), so the operator knows where to look.
        path: PathBuf,
        /// The operating system's reason (disk full, permission denied, read-only file system...).
        source: std::io::Error,
    },
    /// The journal could not be replayed.
    #[error("replaying the journal: {0}")]
    Replay(#[from] crate::store::StoreError),
    /// Appending to, syncing or trimming the outbox's segment logs failed: batches can no longer
    /// be made durable, so processing stops.
    #[error("outbox: {0}")]
    Outbox(#[from] crate::store::seglog::LogError),
}
