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
    /// Appending to, syncing or trimming the outbox's segment logs failed.
    #[error("outbox: {0}")]
    Outbox(#[from] crate::store::seglog::LogError),
}

impl ProcessError {
    /// A write the disk refused (full, failing, read-only). Processing keeps its state in
    /// memory and tries again: nothing it has not made durable is acknowledged downstream
    /// (the forwarder only sends below the last checkpoint), so waiting loses nothing.
    pub fn is_disk(&self) -> bool {
        use crate::store::seglog::LogError;
        matches!(
            self,
            ProcessError::Io { .. }
                | ProcessError::Outbox(LogError::Io { .. } | LogError::Poisoned { .. })
        )
    }
}
