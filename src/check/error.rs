//! Errors that stop a check or a repair.

use crate::store::seglog::LogError;
use std::path::{Path, PathBuf};

/// Errors that stop a check or a repair (damage is never one: it is reported).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// There is no data directory.
    #[error("no store at {}: the directory does not exist", .0.display())]
    NoStore(PathBuf),
    /// A daemon holds the store (repair only).
    #[error(
        "refusing to repair: {} holds the lock {}; stop it first (systemctl stop edgeferry)",
        holder_note(.pid),
        .lock.display()
    )]
    Locked {
        /// The daemon's pid, when the lock file names one.
        pid: Option<u32>,
        /// The held `LOCK` file of one of the store's logs.
        lock: PathBuf,
    },
    /// A segment log could not be read or opened.
    #[error(transparent)]
    Log(#[from] LogError),
    /// A file operation failed.
    #[error("cannot {op} {}: {source}", .path.display())]
    Io {
        /// What was attempted, worded for the message: `open`, `fsync`, `copy into quarantine`, ...
        op: &'static str,
        /// The file or directory it was attempted on.
        path: PathBuf,
        /// The operating system's reason (permission denied, disk full, ...).
        source: std::io::Error,
    },
}

pub(super) fn holder_note(pid: &Option<u32>) -> String {
    match pid {
        Some(p) => format!("daemon pid {p} is running and"),
        None => "a running daemon (pid unknown)".to_string(),
    }
}

pub(super) fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> CheckError + 'a {
    move |source| CheckError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}
