//! Where the parts of a store live, who holds its lock, and what has been set aside.

use crate::store::seglog::{LOCK_FILE, QUARANTINE_DIR};
use serde::Serialize;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

/// The segment logs of a store: (part name, directory relative to the data dir).
pub(super) const LOGS: [(&str, &str); 3] = [
    ("journal", "journal"),
    ("outbox/aggregates", "outbox/aggregates"),
    ("outbox/alerts", "outbox/alerts"),
];
pub(super) const CHECKPOINT: &str = "state/checkpoint.bin";
pub(super) const ACKS: &str = "outbox/acked.bin";
pub(super) const SPARKPLUG: &str = "state/sparkplug";
/// Where repair collects quarantined pieces (one dated folder per run).
pub const STORE_QUARANTINE: &str = "quarantine";

/// A daemon holding the store's lock.
#[derive(Debug, Clone)]
pub(super) struct Holder {
    pub(super) pid: Option<u32>,
    pub(super) lock: PathBuf,
}

/// Is any log's lock held? Probes with a shared `flock` (released at once), which fails
/// exactly when a daemon holds its exclusive lock; a missing LOCK file means no daemon.
pub(super) fn lock_holder(data_dir: &Path) -> Option<Holder> {
    for (_, rel) in LOGS {
        let lock = data_dir.join(rel).join(LOCK_FILE);
        let Ok(file) = File::open(&lock) else {
            continue;
        };
        if let Err(fs::TryLockError::WouldBlock) = file.try_lock_shared() {
            let pid = fs::read_to_string(&lock)
                .ok()
                .and_then(|s| s.trim().parse().ok());
            return Some(Holder { pid, lock });
        }
    }
    None
}

/// Every file set aside so far: the logs' `quarantine/` folders, `*.bad-*` files next to the
/// checkpoint and the epoch, and `<data_dir>/quarantine/` (earlier repairs).
pub(super) fn quarantined_files(data_dir: &Path) -> Vec<QuarantinedFile> {
    let mut out = Vec::new();
    for (_, rel) in LOGS {
        walk(&data_dir.join(rel).join(QUARANTINE_DIR), &mut out);
    }
    walk(&data_dir.join(STORE_QUARANTINE), &mut out);
    for dir in [
        data_dir.to_path_buf(),
        data_dir.join("state"),
        data_dir.join("outbox"),
    ] {
        for path in set_aside_beside(&dir) {
            let bytes = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            out.push(QuarantinedFile { path, bytes });
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

pub(super) fn walk(dir: &Path, out: &mut Vec<QuarantinedFile>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let path = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => walk(&path, out),
            Ok(t) if t.is_file() && e.file_name() != "REPAIR.txt" => {
                let bytes = e.metadata().map(|m| m.len()).unwrap_or(0);
                out.push(QuarantinedFile { path, bytes });
            }
            _ => {}
        }
    }
}

/// Files the daemon moved aside in `dir`: `checkpoint.bin.bad-<ms>`, `epoch.bad-<ms>`.
pub(super) fn set_aside_beside(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().contains(".bad-"))
                .unwrap_or(false)
        })
        .collect();
    v.sort();
    v
}

/// A file set aside earlier (by the daemon's recovery or an earlier repair).
#[derive(Debug, Clone, Serialize)]
pub struct QuarantinedFile {
    /// Its path: inside a quarantine folder, or where the daemon set it aside (`*.bad-<ms>`).
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_piece_set_aside_anywhere_in_the_store_is_found_once() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let put = |rel: &str, len: usize| {
            let p = d.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, vec![0u8; len]).unwrap();
        };
        put("journal/quarantine/00000000000000000000.seg-1.bad", 10);
        put("state/checkpoint.bin.bad-1700000000000", 20);
        put("epoch.bad-1700000000001", 30);
        put("quarantine/2026-12-03T12-00-00Z/outbox/acked.bin", 40);
        put("quarantine/2026-12-03T12-00-00Z/REPAIR.txt", 50);
        put("state/checkpoint.bin", 60);
        let found = quarantined_files(d);
        let bytes: u64 = found.iter().map(|f| f.bytes).sum();
        assert_eq!(found.len(), 4, "{found:?}");
        assert_eq!(
            bytes, 100,
            "REPAIR.txt and live files are not set-aside pieces"
        );
    }

    #[test]
    fn an_unlocked_store_has_no_holder() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir_all(tmp.path().join("journal")).unwrap();
        fs::write(tmp.path().join("journal").join(LOCK_FILE), "12345").unwrap();
        assert!(
            lock_holder(tmp.path()).is_none(),
            "a LOCK file nobody holds"
        );
    }
}
