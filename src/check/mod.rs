//! `edgeferry store verify` and `edgeferry store repair`: offline checks and salvage of a
//! whole data directory.
//!
//! The parts of a store (`<data_dir>/`): the journal (`journal/`, a segment log), the two
//! outbox lanes (`outbox/aggregates/`, `outbox/alerts/`, segment logs), the processing
//! checkpoint (`state/checkpoint.bin`, envelope `EFCK` v2), the outbox acknowledgement state
//! (`outbox/acked.bin`, envelope `EFAK` v1) and the store epoch (`epoch`, 16 hex digits).
//!
//! * [`verify`] reads everything and changes nothing. It takes no lock, but says when a
//!   daemon holds one (its results may then be stale: the daemon keeps writing).
//! * [`repair`] takes the logs' locks (so it refuses while the daemon runs), lets each segment
//!   log salvage itself the way the daemon's start-up does (torn tails cut, damaged bytes moved
//!   to `<log>/quarantine/`), moves a damaged checkpoint, acknowledgement state or epoch aside,
//!   and collects every quarantined piece, including ones the daemon set aside earlier, into
//!   one dated folder `<data_dir>/quarantine/<UTC date-time>/`, mirroring the paths they came
//!   from. Nothing is ever deleted: a torn tail that the log cuts is copied there first.
//!
//! The daemon itself never needs `repair` to start: it salvages the same way on its own.

use crate::process::CheckpointSummary;
use crate::store::epoch::EPOCH_FILE as EPOCH;
use crate::store::outbox::RangeSet;
use crate::store::seglog::{self, LOCK_FILE, LogConfig, LogError, QUARANTINE_DIR, SegmentLog};
use serde::Serialize;
use std::fmt::{self, Write as _};
use std::fs::{self, File};
use std::path::{Path, PathBuf};

/// The segment logs of a store: (part name, directory relative to the data dir).
const LOGS: [(&str, &str); 3] = [
    ("journal", "journal"),
    ("outbox/aggregates", "outbox/aggregates"),
    ("outbox/alerts", "outbox/alerts"),
];
const CHECKPOINT: &str = "state/checkpoint.bin";
const ACKS: &str = "outbox/acked.bin";
/// Where repair collects quarantined pieces (one dated folder per run).
pub const STORE_QUARANTINE: &str = "quarantine";

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
        /// The lock file.
        lock: PathBuf,
    },
    /// A segment log could not be read or opened.
    #[error(transparent)]
    Log(#[from] LogError),
    /// A file operation failed.
    #[error("cannot {op} {}: {source}", .path.display())]
    Io {
        /// What was attempted.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

fn holder_note(pid: &Option<u32>) -> String {
    match pid {
        Some(p) => format!("daemon pid {p} is running and"),
        None => "a running daemon (pid unknown)".to_string(),
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CheckError + 'a {
    move |source| CheckError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Health of one part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PartState {
    /// Present and intact.
    Ok,
    /// Not there (fine: the daemon creates it).
    Missing,
    /// Damaged: see the part's damage list.
    Damaged,
}

/// One damaged stretch of one file.
#[derive(Debug, Clone, Serialize)]
pub struct DamageItem {
    /// The file.
    pub file: PathBuf,
    /// Byte offset where the damage starts (where valid data ends).
    pub offset: u64,
    /// Bytes from there to the end of the file.
    pub bytes: u64,
    /// What is wrong.
    pub what: String,
    /// A torn tail of the last segment (what a crash leaves; cut, not quarantined, by the log).
    pub torn_tail: bool,
}

/// Findings for one part of the store.
#[derive(Debug, Clone, Serialize)]
pub struct PartReport {
    /// `journal`, `outbox/aggregates`, `outbox/alerts`, `checkpoint`, `acked`, `epoch`.
    pub part: &'static str,
    /// Its file or directory.
    pub path: PathBuf,
    /// Verdict.
    pub state: PartState,
    /// Bytes on disk (segment files, or the file).
    pub bytes: u64,
    /// Segment files (logs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segments: Option<usize>,
    /// Valid records (logs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub records: Option<u64>,
    /// Lowest lsn present (logs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_lsn: Option<u64>,
    /// Highest valid lsn (logs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_lsn: Option<u64>,
    /// The lsn the log's next record gets, as far as the files tell (logs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_lsn: Option<u64>,
    /// The decoded checkpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<CheckpointSummary>,
    /// One line about the contents.
    pub summary: String,
    /// What is damaged, where.
    pub damage: Vec<DamageItem>,
}

/// A file set aside earlier (by the daemon's recovery or an earlier repair).
#[derive(Debug, Clone, Serialize)]
pub struct QuarantinedFile {
    /// Where it is.
    pub path: PathBuf,
    /// Its size.
    pub bytes: u64,
}

/// Result of [`verify`].
#[derive(Debug, Clone, Serialize)]
pub struct StoreReport {
    /// The data directory.
    pub data_dir: PathBuf,
    /// True when a daemon holds a lock of the store (the report may be stale).
    pub daemon_running: bool,
    /// Its pid, as written in the lock file.
    pub daemon_pid: Option<u32>,
    /// Every part, in a fixed order.
    pub parts: Vec<PartReport>,
    /// Pieces quarantined earlier (kept for inspection; not damage).
    pub quarantined: Vec<QuarantinedFile>,
    /// Observations that are not damage (inconsistencies the daemon copes with).
    pub notes: Vec<String>,
    /// True when no part is damaged.
    pub clean: bool,
}

/// A daemon holding the store's lock.
#[derive(Debug, Clone)]
struct Holder {
    pid: Option<u32>,
    lock: PathBuf,
}

/// Is any log's lock held? Probes with a shared `flock` (released at once), which fails
/// exactly when a daemon holds its exclusive lock; a missing LOCK file means no daemon.
fn lock_holder(data_dir: &Path) -> Option<Holder> {
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

/// Checks every part of the store in `data_dir` without changing anything.
pub fn verify(data_dir: &Path) -> Result<StoreReport, CheckError> {
    if !data_dir.is_dir() {
        return Err(CheckError::NoStore(data_dir.to_path_buf()));
    }
    let holder = lock_holder(data_dir);
    let mut parts = Vec::new();
    for (part, rel) in LOGS {
        parts.push(verify_log(part, &data_dir.join(rel))?);
    }
    parts.push(verify_checkpoint(&data_dir.join(CHECKPOINT)));
    parts.push(verify_acks(&data_dir.join(ACKS)));
    parts.push(verify_epoch(&data_dir.join(EPOCH)));

    let mut notes = Vec::new();
    if let (Some(cp), Some(next)) = (&parts[3].checkpoint, parts[0].next_lsn)
        && cp.applied_lsn > next
    {
        notes.push(format!(
            "the checkpoint reflects journal records up to lsn {} but the journal ends before \
             lsn {next}; records the daemon appends below lsn {} would not be processed",
            cp.applied_lsn.saturating_sub(1),
            cp.applied_lsn
        ));
    }
    let clean = parts.iter().all(|p| p.state != PartState::Damaged);
    Ok(StoreReport {
        data_dir: data_dir.to_path_buf(),
        daemon_running: holder.is_some(),
        daemon_pid: holder.and_then(|h| h.pid),
        parts,
        quarantined: quarantined_files(data_dir),
        notes,
        clean,
    })
}

fn missing(part: &'static str, path: &Path, summary: &str) -> PartReport {
    PartReport {
        part,
        path: path.to_path_buf(),
        state: PartState::Missing,
        bytes: 0,
        segments: None,
        records: None,
        first_lsn: None,
        last_lsn: None,
        next_lsn: None,
        checkpoint: None,
        summary: summary.to_string(),
        damage: Vec::new(),
    }
}

fn verify_log(part: &'static str, dir: &Path) -> Result<PartReport, CheckError> {
    if !dir.is_dir() {
        return Ok(missing(
            part,
            dir,
            "not created yet (the daemon creates it)",
        ));
    }
    let v = seglog::verify(dir)?;
    let damage: Vec<DamageItem> = v
        .segments
        .iter()
        .filter_map(|s| {
            s.damage.as_ref().map(|d| DamageItem {
                file: s.path.clone(),
                offset: d.offset,
                bytes: d.bytes,
                what: d.damage.to_string(),
                torn_tail: d.torn_tail,
            })
        })
        .collect();
    let first_lsn = v
        .segments
        .iter()
        .find(|s| s.records > 0)
        .map(|s| s.first_lsn);
    let last_lsn = v.segments.iter().filter_map(|s| s.last_lsn).max();
    let next_lsn = v
        .segments
        .iter()
        .filter(|s| s.damage.as_ref().is_none_or(|d| d.offset > 0))
        .map(|s| s.first_lsn + s.records)
        .max();
    let records = v.records();
    let mut summary = format!(
        "{} segment(s), {} record(s){}",
        v.segments.len(),
        records,
        match (first_lsn, last_lsn) {
            (Some(f), Some(l)) => format!(", lsn {f}..={l}"),
            _ => String::new(),
        }
    );
    if !v.ignored.is_empty() {
        let _ = write!(summary, ", {} unrelated file(s) ignored", v.ignored.len());
    }
    Ok(PartReport {
        part,
        path: dir.to_path_buf(),
        state: if damage.is_empty() {
            PartState::Ok
        } else {
            PartState::Damaged
        },
        bytes: v.segments.iter().map(|s| s.file_bytes).sum(),
        segments: Some(v.segments.len()),
        records: Some(records),
        first_lsn,
        last_lsn,
        next_lsn,
        checkpoint: None,
        summary,
        damage,
    })
}

/// Reads a small state file: `Ok(None)` when it does not exist, `Err(report)` when unreadable.
fn read_part(part: &'static str, path: &Path) -> Result<Option<Vec<u8>>, Box<PartReport>> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => {
            let bytes = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            Err(Box::new(damaged(
                part,
                path,
                bytes,
                format!("cannot read: {e}"),
            )))
        }
    }
}

fn damaged(part: &'static str, path: &Path, bytes: u64, what: String) -> PartReport {
    PartReport {
        state: PartState::Damaged,
        bytes,
        summary: "unusable (see below)".to_string(),
        damage: vec![DamageItem {
            file: path.to_path_buf(),
            offset: 0,
            bytes,
            what,
            torn_tail: false,
        }],
        ..missing(part, path, "")
    }
}

fn intact(part: &'static str, path: &Path, bytes: u64, summary: String) -> PartReport {
    PartReport {
        state: PartState::Ok,
        bytes,
        summary,
        ..missing(part, path, "")
    }
}

fn verify_checkpoint(path: &Path) -> PartReport {
    const PART: &str = "checkpoint";
    let bytes = match read_part(PART, path) {
        Ok(Some(b)) => b,
        Ok(None) => {
            return missing(
                PART,
                path,
                "none yet (the daemon replays the journal from its start)",
            );
        }
        Err(r) => return *r,
    };
    match crate::process::inspect_checkpoint(&bytes) {
        Ok(c) => {
            let summary = format!(
                "reflects journal records below lsn {}, clock {}, {} series, {} pending item(s), \
                 outbox next lsn aggregates {} alerts {}",
                c.applied_lsn,
                crate::util::rfc3339_ms(c.clock_ms),
                c.series,
                c.pending_items,
                c.outbox_next[0],
                c.outbox_next[1]
            );
            PartReport {
                checkpoint: Some(c),
                ..intact(PART, path, bytes.len() as u64, summary)
            }
        }
        Err(why) => damaged(
            PART,
            path,
            bytes.len() as u64,
            format!(
                "{why} (the daemon moves it aside and rebuilds from the journal; \
                 repair moves it to quarantine)"
            ),
        ),
    }
}

fn verify_acks(path: &Path) -> PartReport {
    const PART: &str = "acked";
    let bytes = match read_part(PART, path) {
        Ok(Some(b)) => b,
        Ok(None) => return missing(PART, path, "none yet (nothing acknowledged)"),
        Err(r) => return *r,
    };
    match crate::store::outbox::decode_acks(&bytes) {
        Ok(acks) => {
            let count = |r: &RangeSet| r.len();
            intact(
                PART,
                path,
                bytes.len() as u64,
                format!(
                    "acknowledged out of order: aggregates {} batch(es), alerts {} batch(es)",
                    count(&acks[0]),
                    count(&acks[1])
                ),
            )
        }
        Err(why) => damaged(
            PART,
            path,
            bytes.len() as u64,
            format!("{why} (unacknowledged batches would be sent again)"),
        ),
    }
}

fn verify_epoch(path: &Path) -> PartReport {
    const PART: &str = "epoch";
    let bytes = match read_part(PART, path) {
        Ok(Some(b)) => b,
        Ok(None) => return missing(PART, path, "none yet (the daemon makes one)"),
        Err(r) => return *r,
    };
    match crate::store::epoch::parse_epoch(&bytes) {
        Ok(e) => intact(PART, path, bytes.len() as u64, format!("{e:016x}")),
        Err(why) => damaged(
            PART,
            path,
            bytes.len() as u64,
            format!("{why} (the daemon starts a new epoch)"),
        ),
    }
}

/// Every file set aside so far: the logs' `quarantine/` folders, `*.bad-*` files next to the
/// checkpoint and the epoch, and `<data_dir>/quarantine/` (earlier repairs).
fn quarantined_files(data_dir: &Path) -> Vec<QuarantinedFile> {
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

fn walk(dir: &Path, out: &mut Vec<QuarantinedFile>) {
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
fn set_aside_beside(dir: &Path) -> Vec<PathBuf> {
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

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{n} B ({v:.1} {})", UNITS[u])
}

impl fmt::Display for StoreReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "store {}", self.data_dir.display())?;
        if self.daemon_running {
            match self.daemon_pid {
                Some(pid) => writeln!(f, "daemon pid {pid} is running; results may be stale")?,
                None => writeln!(f, "a daemon (pid unknown) is running; results may be stale")?,
            }
        }
        for p in &self.parts {
            let state = match p.state {
                PartState::Ok => "OK",
                PartState::Missing => "MISSING",
                PartState::Damaged => "DAMAGED",
            };
            write!(f, "{:<18} {:<8} {}", p.part, state, p.summary)?;
            if p.state != PartState::Missing {
                write!(f, "; {} on disk", human_bytes(p.bytes))?;
            }
            writeln!(f)?;
            writeln!(f, "{:<27} {}", "", p.path.display())?;
            for d in &p.damage {
                writeln!(
                    f,
                    "{:<27} {} byte(s) bad in {} from offset {}: {}{}",
                    "",
                    d.bytes,
                    d.file.display(),
                    d.offset,
                    d.what,
                    if d.torn_tail {
                        " [torn tail of the last segment: a crash leaves this; it is cut]"
                    } else if p.segments.is_some() {
                        " [records before it are kept; the rest goes to quarantine]"
                    } else {
                        ""
                    }
                )?;
            }
        }
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        if !self.quarantined.is_empty() {
            let total: u64 = self.quarantined.iter().map(|q| q.bytes).sum();
            writeln!(
                f,
                "quarantine: {} file(s), {} set aside earlier (kept for inspection):",
                self.quarantined.len(),
                human_bytes(total)
            )?;
            for q in &self.quarantined {
                writeln!(f, "  {} ({} B)", q.path.display(), q.bytes)?;
            }
        }
        let damaged: Vec<&str> = self
            .parts
            .iter()
            .filter(|p| p.state == PartState::Damaged)
            .map(|p| p.part)
            .collect();
        if damaged.is_empty() {
            writeln!(f, "verdict: OK: no damage found")
        } else {
            writeln!(
                f,
                "verdict: DAMAGED: {} (run `edgeferry store repair` with the daemon stopped; \
                 the daemon also salvages on start)",
                damaged.join(", ")
            )
        }
    }
}

/// What repair did to one segment log.
#[derive(Debug, Clone, Serialize)]
pub struct LogRepair {
    /// `journal`, `outbox/aggregates`, `outbox/alerts`.
    pub part: &'static str,
    /// The log directory.
    pub path: PathBuf,
    /// Valid records kept.
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
    /// What it is.
    pub what: String,
    /// Where it was.
    pub from: PathBuf,
    /// Where it is now.
    pub to: PathBuf,
    /// Its size.
    pub bytes: u64,
}

/// Result of [`repair`].
#[derive(Debug, Clone, Serialize)]
pub struct RepairReport {
    /// The data directory.
    pub data_dir: PathBuf,
    /// The dated folder that received everything set aside (None: nothing needed moving).
    pub quarantine_dir: Option<PathBuf>,
    /// Per segment log.
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
    // resent, new epoch); moving them aside keeps the bytes and lets verify come back clean.
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

impl fmt::Display for RepairReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "repaired store {}", self.data_dir.display())?;
        for l in &self.logs {
            write!(
                f,
                "{:<18} kept {} record(s) (lsn {}.., next {})",
                l.part, l.records_kept, l.first_lsn, l.next_lsn
            )?;
            if l.truncated_bytes > 0 {
                write!(f, "; cut a torn tail of {} B", l.truncated_bytes)?;
            }
            if l.quarantined_bytes > 0 {
                write!(f, "; quarantined {} damaged B", l.quarantined_bytes)?;
            }
            writeln!(f)?;
        }
        if self.moved.is_empty() {
            writeln!(f, "nothing needed moving to quarantine")?;
        } else {
            writeln!(f, "moved to quarantine (nothing was deleted):")?;
            for m in &self.moved {
                writeln!(
                    f,
                    "  {}: {} ({} B)\n    -> {}",
                    m.what,
                    m.from.display(),
                    m.bytes,
                    m.to.display()
                )?;
            }
        }
        if let Some(d) = &self.quarantine_dir {
            writeln!(f, "quarantine folder: {} (see REPAIR.txt)", d.display())?;
        }
        writeln!(f, "\nafter repair:")?;
        write!(f, "{}", self.after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_log(dir: &Path, n: u64) {
        let (mut log, _) = SegmentLog::open(dir, LogConfig::default()).unwrap();
        for i in 0..n {
            log.append(format!("record {i}").as_bytes()).unwrap();
        }
        log.sync().unwrap();
    }

    fn store(n: u64) -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        write_log(&tmp.path().join("journal"), n);
        write_log(&tmp.path().join("outbox/aggregates"), 3);
        write_log(&tmp.path().join("outbox/alerts"), 0);
        fs::write(tmp.path().join("epoch"), "00112233aabbccdd\n").unwrap();
        tmp
    }

    fn segment(dir: &Path) -> PathBuf {
        let mut v: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        v.sort();
        v.pop().unwrap()
    }

    #[test]
    fn a_clean_store_verifies_clean_and_repair_moves_nothing() {
        let tmp = store(50);
        let r = verify(tmp.path()).unwrap();
        assert!(r.clean, "{r}");
        assert_eq!(r.parts[0].records, Some(50));
        assert_eq!(
            (r.parts[0].first_lsn, r.parts[0].last_lsn),
            (Some(0), Some(49))
        );
        assert_eq!(r.parts[3].state, PartState::Missing);
        assert!(!r.daemon_running);
        let text = r.to_string();
        assert!(text.contains("verdict: OK"), "{text}");
        let rep = repair(tmp.path(), 1 << 20).unwrap();
        assert!(
            rep.moved.is_empty() && rep.quarantine_dir.is_none(),
            "{rep}"
        );
        assert!(rep.after.clean);
        assert!(!tmp.path().join(STORE_QUARANTINE).exists());
    }

    #[test]
    fn damage_everywhere_is_reported_and_repair_moves_it_all_to_one_dated_folder() {
        let tmp = store(200);
        let seg = segment(&tmp.path().join("journal"));
        let mut bytes = fs::read(&seg).unwrap();
        let at = bytes.len() * 2 / 5;
        bytes[at] ^= 0xFF;
        bytes[at + 1] ^= 0xFF;
        fs::write(&seg, &bytes).unwrap();
        let agg = segment(&tmp.path().join("outbox/aggregates"));
        let len = fs::metadata(&agg).unwrap().len();
        File::options()
            .write(true)
            .open(&agg)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        fs::create_dir_all(tmp.path().join("state")).unwrap();
        fs::write(tmp.path().join(CHECKPOINT), b"garbage").unwrap();
        fs::write(tmp.path().join(ACKS), b"EFAK junk").unwrap();
        fs::write(tmp.path().join(EPOCH), b"xyz").unwrap();

        let r = verify(tmp.path()).unwrap();
        assert!(!r.clean);
        let damaged: Vec<_> = r
            .parts
            .iter()
            .filter(|p| p.state == PartState::Damaged)
            .map(|p| p.part)
            .collect();
        assert_eq!(
            damaged,
            [
                "journal",
                "outbox/aggregates",
                "checkpoint",
                "acked",
                "epoch"
            ]
        );
        let d = &r.parts[0].damage[0];
        assert_eq!(d.file, seg);
        assert!(d.offset <= at as u64 && !d.torn_tail, "{d:?}");
        assert!(r.parts[1].damage[0].torn_tail);
        assert_eq!(fs::read(&seg).unwrap(), bytes, "verify changes nothing");
        let text = r.to_string();
        assert!(text.contains(&seg.display().to_string()), "{text}");
        assert!(
            text.contains(&format!("from offset {}", d.offset)),
            "{text}"
        );

        let rep = repair(tmp.path(), 1 << 20).unwrap();
        assert!(rep.after.clean, "{rep}");
        let qdir = rep.quarantine_dir.clone().unwrap();
        assert!(qdir.starts_with(tmp.path().join(STORE_QUARANTINE)));
        for m in &rep.moved {
            assert!(m.to.starts_with(&qdir), "{m:?}");
            assert!(m.to.exists(), "{m:?}");
        }
        // The journal's damaged tail, byte for byte.
        let tail = rep
            .moved
            .iter()
            .find(|m| m.from.starts_with(tmp.path().join("journal")))
            .unwrap();
        assert_eq!(fs::read(&tail.to).unwrap(), &bytes[d.offset as usize..]);
        assert_eq!(fs::read(qdir.join(CHECKPOINT)).unwrap(), b"garbage");
        assert_eq!(fs::read(qdir.join(EPOCH)).unwrap(), b"xyz");
        assert!(qdir.join(ACKS).exists());
        // The torn outbox tail was cut, and a copy kept.
        assert!(rep.moved.iter().any(|m| m.what.starts_with("torn tail")));
        assert!(qdir.join("REPAIR.txt").exists());
        assert!(!tmp.path().join(CHECKPOINT).exists());
        let kept = rep.logs[0].records_kept;
        assert!(kept > 0 && kept < 200);
        assert!(rep.logs[0].next_lsn >= 200, "lsns are not reused: {rep}");
        // Nothing is left in the logs' own quarantine folders.
        assert!(
            rep.after
                .quarantined
                .iter()
                .all(|f| f.path.starts_with(&qdir)),
            "{rep}"
        );
    }

    #[test]
    fn repair_refuses_while_the_log_is_held_and_verify_names_the_pid() {
        let tmp = store(5);
        let (_log, _) =
            SegmentLog::open(&tmp.path().join("journal"), LogConfig::default()).unwrap();
        let r = verify(tmp.path()).unwrap();
        assert!(r.daemon_running);
        assert_eq!(r.daemon_pid, Some(std::process::id()));
        assert!(r.to_string().contains(&format!(
            "daemon pid {} is running; results may be stale",
            std::process::id()
        )));
        let err = repair(tmp.path(), 1 << 20).unwrap_err();
        assert!(matches!(err, CheckError::Locked { .. }), "{err}");
        assert!(
            err.to_string()
                .contains(&format!("daemon pid {} is running", std::process::id())),
            "{err}"
        );
    }
}
