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
pub mod wear;

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
    /// A compact journal record could not be decoded.
    #[error("journal record at lsn {lsn} cannot be decoded: {source}")]
    DecodeCompact {
        /// Journal position (lsn) of the record that would not decode.
        lsn: u64,
        /// What in its bytes is inconsistent with its segment's series dictionary.
        source: crate::store::journal::compact::CompactError,
    },
    /// A record could not be encoded.
    #[error("cannot encode record: {0}")]
    Encode(postcard::Error),
}

/// Whether `e`, or what caused it, is the disk being full (ENOSPC, or EDQUOT for a disk
/// quota): the one disk error that giving back space can cure, unlike a failing (EIO) or
/// read-only (EROFS) disk, which `when_full = "drop_oldest"` must not answer by dropping data.
pub fn is_disk_full(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return matches!(io.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT));
        }
        cause = c.source();
    }
    false
}

/// Whether `e`, or what caused it, is the disk refusing a write: full (ENOSPC, EDQUOT),
/// failing (EIO) or read-only (EROFS). These are waited out; other errors are not.
pub fn is_disk_fault(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return matches!(
                io.raw_os_error(),
                Some(libc::ENOSPC | libc::EDQUOT | libc::EIO | libc::EROFS)
            );
        }
        cause = c.source();
    }
    false
}

#[cfg(test)]
mod disk_full_tests {
    use super::*;

    #[test]
    fn only_a_full_disk_counts_as_full() {
        let log_err = |code| {
            StoreError::Log(seglog::LogError::Io {
                op: "write",
                path: "/x".into(),
                source: std::io::Error::from_raw_os_error(code),
            })
        };
        assert!(is_disk_full(&log_err(libc::ENOSPC)));
        assert!(is_disk_full(&log_err(libc::EDQUOT)));
        assert!(!is_disk_full(&log_err(libc::EIO)));
        assert!(!is_disk_full(&log_err(libc::EROFS)));
        assert!(!is_disk_full(&StoreError::Encode(
            postcard::Error::SerializeBufferFull
        )));
    }
}
