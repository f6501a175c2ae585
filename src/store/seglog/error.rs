//! Errors of the segment log.

use super::format::{Damage, LOCK_FILE, Lsn};
use std::io;
use std::path::{Path, PathBuf};

/// Errors of the segment log. Every I/O error names the operation and the file.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// An I/O operation failed.
    #[error("segment log: cannot {op} {}: {source}", .path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The payload is larger than [`super::LogConfig::max_record`].
    #[error("record of {len} bytes exceeds the maximum of {max} bytes")]
    RecordTooLarge { len: usize, max: usize },
    /// Another process (or another handle in this one) holds the log's lock file.
    #[error(
        "another edgeferry process{} is using {} (lock file {} is held); stop it or use another data directory",
        pid_note(.pid),
        .dir.display(),
        .dir.join(LOCK_FILE).display()
    )]
    Locked { dir: PathBuf, pid: Option<u32> },
    /// A reader met damaged data (damage that appeared after the log was opened).
    #[error("segment {} is damaged at byte {offset}: {damage}", .path.display())]
    Corrupt {
        path: PathBuf,
        offset: u64,
        damage: Damage,
    },
    /// A reader wanted records whose segment was trimmed before the reader reached it.
    #[error("records from lsn {lsn} were trimmed while being read")]
    Trimmed { lsn: Lsn },
    /// An earlier write or sync failed; the log must be reopened (which runs recovery).
    #[error(
        "segment log in {} is unusable after an earlier write or sync failure; reopen it to recover",
        .dir.display()
    )]
    Poisoned { dir: PathBuf },
}

pub(super) fn pid_note(pid: &Option<u32>) -> String {
    match pid {
        Some(p) => format!(" (pid {p})"),
        None => String::new(),
    }
}

pub(super) fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> LogError + 'a {
    move |source| LogError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}
