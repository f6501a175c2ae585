//! Local durable storage.
//!
//! - [`seglog`]: an append-only segment log (CRC per record, group-commit `fdatasync`, whole
//!   segments deleted once no longer needed). FIFO data lives here: the reading journal.
//! - [`journal`]: the reading journal, a typed layer over the segment log.
//! - [`crate::check`]: offline verification and repair of a whole data directory
//!   (`edgeferry store verify|repair`).
//!
//! Why not sled for FIFO data: see docs/DECISIONS.md (measured: space amplification and
//! resident memory far beyond what a 512 MB gateway can give).

pub mod config;
pub mod epoch;
pub mod journal;
pub mod outbox;
pub mod seglog;

pub use config::{StoreConfig, WhenFull};

/// Errors of the store as a whole.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The segment log failed.
    #[error(transparent)]
    Log(#[from] seglog::LogError),
    /// A record could not be encoded or decoded.
    #[error("record at lsn {lsn} cannot be decoded: {source}")]
    Decode {
        /// Journal position (lsn) of the record that would not decode.
        lsn: u64,
        /// postcard's reason the bytes are not a record of the expected type.
        source: postcard::Error,
    },
    /// A record could not be encoded.
    #[error("cannot encode record: {0}")]
    Encode(postcard::Error),
}
