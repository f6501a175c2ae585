//! Errors of the processing stage.

use std::path::PathBuf;

/// Errors of the processing stage.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The state directory or checkpoint file could not be written.
    #[error("checkpoint {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The journal could not be replayed.
    #[error("replaying the journal: {0}")]
    Replay(#[from] crate::store::StoreError),
    /// The outbox failed.
    #[error("outbox: {0}")]
    Outbox(#[from] crate::store::seglog::LogError),
}
