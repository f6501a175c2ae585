//! `edgeferry store repair`: each log salvaged as the daemon would, every damaged piece moved
//! into one dated quarantine folder, nothing deleted.

use crate::store::epoch::EPOCH_FILE as EPOCH;
use crate::store::seglog::{LOCK_FILE, LogConfig, LogError, QUARANTINE_DIR, SegmentLog};
use serde::Serialize;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use super::error::{CheckError, io_err};
use super::layout::*;
use super::verify::*;

/// What repair did to one segment log.
#[derive(Debug, Clone, Serialize)]
pub struct LogRepair {
    /// `journal`, `outbox/aggregates`, `outbox/alerts`.
    pub part: &'static str,
    /// The log's directory, e.g. `<data_dir>/outbox/alerts`.
    pub path: PathBuf,
    /// Valid records kept after salvaging (records after damage in a segment are lost).
    pub records_kept: u64,
    /// Bytes cut from the end of the last segment (a torn tail; a copy is in quarantine).
    pub truncated_bytes: u64,
    /// Damaged bytes moved to quarantine.
    pub quarantined_bytes: u64,
    /// Lowest lsn still present.
    pub first_lsn: u64,
    /// Lsn of the next record.
    pub next_lsn: u64,
}

/// A file moved (or, for a torn tail, copied) into the dated quarantine folder.
#[derive(Debug, Clone, Serialize)]
pub struct Moved {
    /// A short description for the report, e.g. `torn tail (copy of the bytes cut)`.
    pub what: String,
    /// Its original path in the data directory (for a torn tail: the segment it was copied from).
    pub from: PathBuf,
    /// Where it is now.
    pub to: PathBuf,
    /// Its size in bytes (for a torn tail: the bytes copied).
    pub bytes: u64,
}

/// Result of [`repair`]: what was salvaged and set aside, and the store as found before and
/// after.
#[derive(Debug, Clone, Serialize)]
pub struct RepairReport {
    /// The data directory repaired (`[gateway] data_dir`).
    pub data_dir: PathBuf,
    /// The dated folder that received everything set aside (None: nothing needed moving).
    pub quarantine_dir: Option<PathBuf>,
    /// What was done to each segment log: the journal and both outbox lanes.
    pub logs: Vec<LogRepair>,
    /// Every file moved or copied into quarantine.
    pub moved: Vec<Moved>,
    /// The store as found before repairing.
    pub before: StoreReport,
    /// The store after repairing.
    pub after: StoreReport,
}

/// The dated folder, created on first use.
struct Quarantine {
    data_dir: PathBuf,
    dir: PathBuf,
    created: bool,
}

impl Quarantine {
    fn new(data_dir: &Path) -> Quarantine {
        let now = time::OffsetDateTime::now_utc();
        let stamp = now
            .format(time::macros::format_description!(
                "[year]-[month]-[day]T[hour]-[minute]-[second]Z"
            ))
            .unwrap_or_else(|_| now.unix_timestamp().to_string());
        let base = data_dir.join(STORE_QUARANTINE);
        let mut dir = base.join(&stamp);
        let mut n = 1;
        while dir.exists() {
            dir = base.join(format!("{stamp}.{n}"));
            n += 1;
        }
        Quarantine {
            data_dir: data_dir.to_path_buf(),
            dir,
            created: false,
        }
    }

    /// A free target path for `from`, mirroring its path under the data directory.
    fn target(&mut self, from: &Path, suffix: &str) -> Result<PathBuf, CheckError> {
        let rel = from
            .strip_prefix(&self.data_dir)
            .map(Path::to_path_buf)
            .unwrap_or_else(|_| PathBuf::from(from.file_name().unwrap_or_default()));
        let mut to = self.dir.join(&rel);
        to.as_mut_os_string().push(suffix);
        let parent = to.parent().unwrap_or(&self.dir).to_path_buf();
        fs::create_dir_all(&parent).map_err(io_err("create directory", &parent))?;
        self.created = true;
        let mut n = 1;
        let base = to.clone();
        while to.exists() {
            to = base.clone();
            to.as_mut_os_string().push(format!(".{n}"));
            n += 1;
        }
        Ok(to)
    }

    /// Moves `from` into quarantine (rename; copy then remove across file systems).
    fn take(&mut self, what: &str, from: &Path) -> Result<Moved, CheckError> {
        let bytes = fs::metadata(from).map(|m| m.len()).unwrap_or(0);
        let to = self.target(from, "")?;
        if fs::rename(from, &to).is_err() {
            fs::copy(from, &to).map_err(io_err("copy into quarantine", from))?;
            File::open(&to)
                .and_then(|f| f.sync_all())
                .map_err(io_err("fsync", &to))?;
            fs::remove_file(from).map_err(io_err("remove after copying", from))?;
        }
        Ok(Moved {
            what: what.to_string(),
            from: from.to_path_buf(),
            to,
            bytes,
        })
    }

    /// Copies `file[offset..]` into quarantine.
    fn copy_tail(&mut self, what: &str, file: &Path, offset: u64) -> Result<Moved, CheckError> {
        use std::io::{Seek, SeekFrom};
        let to = self.target(file, &format!(".tail-at-{offset}.bad"))?;
        let mut src = File::open(file).map_err(io_err("open", file))?;
        src.seek(SeekFrom::Start(offset))
            .map_err(io_err("seek in", file))?;
        let mut out = File::create_new(&to).map_err(io_err("create", &to))?;
        let bytes = std::io::copy(&mut src, &mut out).map_err(io_err("copy from", file))?;
        out.sync_all().map_err(io_err("fsync", &to))?;
        Ok(Moved {
            what: what.to_string(),
            from: file.to_path_buf(),
            to,
            bytes,
        })
    }

    fn sync(&self) {
        fn sync_tree(dir: &Path) {
            if let Ok(rd) = fs::read_dir(dir) {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        sync_tree(&e.path());
                    }
                }
            }
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
        if self.created {
            sync_tree(&self.dir);
            let _ = File::open(self.dir.parent().unwrap_or(&self.dir)).and_then(|d| d.sync_all());
        }
    }
}

/// Salvages the store in `data_dir` (see the module docs). Refuses with
/// [`CheckError::Locked`] while a daemon runs. `segment_bytes` is `store.segment_size`.
pub fn repair(data_dir: &Path, segment_bytes: u64) -> Result<RepairReport, CheckError> {
    if !data_dir.is_dir() {
        return Err(CheckError::NoStore(data_dir.to_path_buf()));
    }
    if let Some(h) = lock_holder(data_dir) {
        return Err(CheckError::Locked {
            pid: h.pid,
            lock: h.lock,
        });
    }
    let before = verify(data_dir)?;
    let mut q = Quarantine::new(data_dir);
    let mut moved = Vec::new();
    let mut logs = Vec::new();
    // Held until the end: the locks keep a daemon from starting half way through.
    let mut open_logs = Vec::new();
    for ((part, rel), found) in LOGS.iter().zip(&before.parts) {
        let dir = data_dir.join(rel);
        if !dir.is_dir() {
            continue;
        }
        // A torn tail is cut by the log, not quarantined: keep a copy first.
        let mut tail_copies = Vec::new();
        for d in found.damage.iter().filter(|d| d.torn_tail) {
            tail_copies.push(q.copy_tail(
                "torn tail (copy of the bytes cut)",
                &d.file,
                d.offset,
            )?);
        }
        let opened = SegmentLog::open(
            &dir,
            LogConfig {
                segment_bytes,
                max_record: 64 * 1024 * 1024,
                // The tag its owner writes, so that repairing does not start a segment of
                // another encoding.
                payload_tag: if *part == "journal" {
                    crate::store::journal::PAYLOAD_TAG
                } else {
                    0
                },
                pad_syncs: *part == "journal",
            },
        );
        let (log, rec) = match opened {
            Ok(x) => x,
            Err(LogError::Locked { pid, .. }) => {
                for c in &tail_copies {
                    let _ = fs::remove_file(&c.to);
                }
                return Err(CheckError::Locked {
                    pid,
                    lock: dir.join(LOCK_FILE),
                });
            }
            Err(e) => return Err(e.into()),
        };
        if rec.truncated_bytes > 0 {
            moved.extend(tail_copies);
        } else {
            // The log quarantined those bytes itself; its copy is collected below.
            for c in &tail_copies {
                let _ = fs::remove_file(&c.to);
            }
        }
        // Everything in the log's own quarantine folder, from now and from earlier starts.
        let lq = dir.join(QUARANTINE_DIR);
        let mut pieces: Vec<PathBuf> = fs::read_dir(&lq)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default();
        pieces.sort();
        for p in pieces {
            let what = if rec.quarantined.contains(&p) {
                "damaged segment bytes (quarantined now)"
            } else {
                "damaged segment bytes (quarantined at an earlier start)"
            };
            moved.push(q.take(what, &p)?);
        }
        logs.push(LogRepair {
            part,
            path: dir,
            records_kept: rec.records,
            truncated_bytes: rec.truncated_bytes,
            quarantined_bytes: rec.quarantined_bytes,
            first_lsn: rec.first_lsn,
            next_lsn: rec.next_lsn,
        });
        open_logs.push(log);
    }

    // Damaged small files: the daemon copes without them (fresh checkpoint and replay, acks
    // resent, new epoch, Sparkplug B nodes asked for a rebirth); moving them aside keeps the bytes and lets verify come back clean.
    for (part, rel, what) in [
        ("checkpoint", CHECKPOINT, "damaged checkpoint"),
        ("acked", ACKS, "damaged acknowledgement state"),
        ("epoch", EPOCH, "damaged store epoch"),
    ] {
        let found = before.parts.iter().find(|p| p.part == part);
        if found.is_some_and(|p| p.state == PartState::Damaged) {
            moved.push(q.take(what, &data_dir.join(rel))?);
        }
    }
    // The Sparkplug B state is one file per edge node: only the damaged ones go.
    if let Some(p) = before
        .parts
        .iter()
        .find(|p| p.part == "sparkplug" && p.state == PartState::Damaged)
    {
        for d in &p.damage {
            moved.push(q.take("damaged Sparkplug B node state", &d.file)?);
        }
    }
    for dir in [
        data_dir.to_path_buf(),
        data_dir.join("state"),
        data_dir.join("outbox"),
    ] {
        for p in set_aside_beside(&dir) {
            moved.push(q.take("file the daemon set aside at an earlier start", &p)?);
        }
    }

    let quarantine_dir = q.created.then(|| q.dir.clone());
    if let Some(dir) = &quarantine_dir {
        let mut note = String::from("edgeferry store repair moved these files here:\n");
        for m in &moved {
            let _ = writeln!(
                note,
                "{}\n  from {}\n  to   {}\n  {} bytes",
                m.what,
                m.from.display(),
                m.to.display(),
                m.bytes
            );
        }
        let readme = dir.join("REPAIR.txt");
        crate::util::write_atomic(&readme, note.as_bytes()).map_err(io_err("write", &readme))?;
    }
    q.sync();
    drop(open_logs);
    let after = verify(data_dir)?;
    Ok(RepairReport {
        data_dir: data_dir.to_path_buf(),
        quarantine_dir,
        logs,
        moved,
        before,
        after,
    })
}
