//! The log directory: listing segments, the lock, creating a segment, syncing the directory.

use super::error::{LogError, io_err};
use super::format::*;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Segment files (first lsn from the name, path) sorted by lsn.
pub(super) type SegmentNames = Vec<(Lsn, PathBuf)>;

/// Segment files in `dir` sorted by first lsn, plus the paths of files that were ignored.
pub(super) fn list_segments(dir: &Path) -> Result<(SegmentNames, Vec<PathBuf>), LogError> {
    let mut segs = Vec::new();
    let mut ignored = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("list directory", dir))? {
        let entry = entry.map_err(io_err("list directory", dir))?;
        let path = entry.path();
        let is_file = entry.file_type().map(|t| t.is_file()).unwrap_or(false);
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name == LOCK_FILE || name == QUARANTINE_DIR {
            continue;
        }
        match parse_segment_name(&name) {
            Some(lsn) if is_file => segs.push((lsn, path)),
            _ => ignored.push(path),
        }
    }
    segs.sort();
    Ok((segs, ignored))
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), LogError> {
    crate::util::sync_dir(dir).map_err(io_err("fsync directory", dir))
}

pub(super) fn acquire_lock(dir: &Path) -> Result<File, LogError> {
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err("open lock file", &path))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let mut s = String::new();
            let pid = file
                .read_to_string(&mut s)
                .ok()
                .and_then(|_| s.trim().parse().ok());
            return Err(LogError::Locked {
                dir: dir.to_path_buf(),
                pid,
            });
        }
        Err(fs::TryLockError::Error(e)) => return Err(io_err("lock", &path)(e)),
    }
    // The pid is only a diagnostic for the Locked message; failing to write it is harmless.
    let _ = file
        .set_len(0)
        .and_then(|_| file.write_all(std::process::id().to_string().as_bytes()));
    Ok(file)
}

/// Creates a new segment file holding only its header, durably (the directory entry is the
/// caller's to sync).
pub(super) fn create_segment(
    path: &Path,
    first_lsn: Lsn,
    payload_tag: u8,
    padded: bool,
) -> Result<File, LogError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err("create segment", path))?;
    file.write_all(&encode_header(first_lsn, payload_tag, padded))
        .map_err(io_err("write header of", path))?;
    crate::util::sync_data(&file).map_err(io_err("fdatasync", path))?;
    Ok(file)
}
