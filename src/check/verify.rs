//! `edgeferry store verify`: every part of a store read and judged, nothing changed.

use crate::process::CheckpointSummary;
use crate::store::epoch::EPOCH_FILE as EPOCH;
use crate::store::outbox::RangeSet;
use crate::store::seglog;
use serde::Serialize;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use super::error::CheckError;
use super::layout::*;

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
    /// The damaged file: a segment file, or the checkpoint, acknowledgement or epoch file.
    pub file: PathBuf,
    /// Byte offset where the damage starts (where valid data ends).
    pub offset: u64,
    /// Bytes from there to the end of the file.
    pub bytes: u64,
    /// What is wrong there, e.g. a checksum mismatch, a torn frame or why the file does not
    /// decode.
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
    /// Verdict: intact, missing (the daemon creates it) or damaged.
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
    /// What the checkpoint file holds (positions and sizes); only for the `checkpoint` part.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<CheckpointSummary>,
    /// One line about the contents.
    pub summary: String,
    /// What is damaged, where.
    pub damage: Vec<DamageItem>,
}

/// Result of [`verify`]: every part of one data directory judged, nothing changed.
#[derive(Debug, Clone, Serialize)]
pub struct StoreReport {
    /// The data directory checked (`[gateway] data_dir`).
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
    parts.push(verify_sparkplug(&data_dir.join(SPARKPLUG)));

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

pub(super) fn missing(part: &'static str, path: &Path, summary: &str) -> PartReport {
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

pub(super) fn verify_log(part: &'static str, dir: &Path) -> Result<PartReport, CheckError> {
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
    // A torn tail is what every unclean stop (a crash, a power cut, a write refused by a full
    // disk) leaves at the end of the last segment: bytes that were never synced, so never
    // acknowledged. The log cuts it at the next open. It is shown, not judged as damage.
    let torn_only = !damage.is_empty() && damage.iter().all(|d| d.torn_tail);
    if torn_only {
        let _ = write!(
            summary,
            "; a torn tail (never synced, so never acknowledged) that the next start cuts"
        );
    }
    Ok(PartReport {
        part,
        path: dir.to_path_buf(),
        state: if damage.is_empty() || torn_only {
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
pub(super) fn read_part(
    part: &'static str,
    path: &Path,
) -> Result<Option<Vec<u8>>, Box<PartReport>> {
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

pub(super) fn damaged(part: &'static str, path: &Path, bytes: u64, what: String) -> PartReport {
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

pub(super) fn intact(part: &'static str, path: &Path, bytes: u64, summary: String) -> PartReport {
    PartReport {
        state: PartState::Ok,
        bytes,
        summary,
        ..missing(part, path, "")
    }
}

pub(super) fn verify_checkpoint(path: &Path) -> PartReport {
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
    let state_dir = path.parent().unwrap_or(Path::new("."));
    match crate::process::inspect_checkpoint_chain(state_dir, &bytes) {
        Ok(c) => {
            let summary = format!(
                "reflects journal records below lsn {}, clock {}, {} series, {} pending item(s), \
                 outbox next lsn aggregates {} alerts {}{}",
                c.applied_lsn,
                crate::util::rfc3339_ms(c.clock_ms),
                c.series,
                c.pending_items,
                c.outbox_next[0],
                c.outbox_next[1],
                match c.deltas {
                    0 => String::new(),
                    n => format!(" (a whole checkpoint and {n} delta(s) after it)"),
                }
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

pub(super) fn verify_acks(path: &Path) -> PartReport {
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

pub(super) fn verify_sparkplug(dir: &Path) -> PartReport {
    use crate::ingest::decode::sparkplug::{inspect_node_file, node_files};
    const PART: &str = "sparkplug";
    let files = match node_files(dir) {
        Ok(files) => files,
        Err(e) => return damaged(PART, dir, 0, format!("unreadable: {e}")),
    };
    if files.is_empty() {
        return missing(PART, dir, "none (no Sparkplug B birth seen)");
    }
    let (mut total, mut nodes, mut gone, mut bad) = (0u64, 0usize, 0usize, Vec::new());
    for f in &files {
        let bytes = fs::read(f).unwrap_or_default();
        total += bytes.len() as u64;
        match inspect_node_file(&bytes) {
            Ok((_, _, online, _)) => {
                nodes += 1;
                gone += usize::from(!online);
            }
            Err(why) => bad.push(DamageItem {
                file: f.clone(),
                offset: 0,
                bytes: bytes.len() as u64,
                what: format!("{why} (that node would be asked for a rebirth)"),
                torn_tail: false,
            }),
        }
    }
    if bad.is_empty() {
        intact(
            PART,
            dir,
            total,
            format!("{nodes} edge node(s), {gone} gone"),
        )
    } else {
        PartReport {
            damage: bad,
            ..damaged(PART, dir, total, String::new())
        }
    }
}

pub(super) fn verify_epoch(path: &Path) -> PartReport {
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
