//! The checkpoint: all processing state with the journal and outbox positions it reflects,
//! written atomically (temporary file, `fdatasync`, rename, directory `fsync`) in two halves so
//! that the slow write happens off the processing task.
//!
//! # Whole checkpoints and deltas
//! Rewriting the whole state for every checkpoint was most of what a gateway wrote to its
//! flash card (1 MB every 10 s with 1,000 series, issue 11), while most of the state (closed
//! windows kept for corrections) does not change between two checkpoints. So a checkpoint is
//! either *whole* (`checkpoint.bin`: the state and a random id) or a *delta*
//! (`checkpoint-delta-NNNNNN.bin`: the id of the whole checkpoint it follows, its place in
//! the chain, every scalar and small map of the state, and only the window slots that changed
//! since the checkpoint before it). Loading reads the whole one and applies the deltas that
//! follow it in order, stopping at the first that is missing, of another chain, or damaged.
//!
//! Each file is written atomically and a delta only after the checkpoint before it is
//! durable (one checkpoint is in flight at a time), so a crash at any point leaves a chain
//! whose last member is the newest checkpoint that counts. A new whole checkpoint is written
//! once the deltas of the chain add up to a few times the whole one's size ([`delta_share`]), after a
//! checkpoint could not be written, and as the first of every process (so that no delta ever
//! follows a chain that loading cut short); after it, the old deltas are removed (any left by
//! a crash belong to another id and are ignored).
//!
//! # Compressed
//! Both kinds are postcard compressed with DEFLATE ([`crate::util::to_deflated`]; whole
//! version 6, delta version 2). Series names, tags and aggregates of similar values compress
//! about five-fold: with 1,000 series in the example config's windows a whole checkpoint is
//! 0.35 MB instead of 1.58 MB and a delta 10 s after it 0.09 MB instead of 0.40 MB (unit test
//! `in_the_example_shape_a_delta_of_ten_seconds_is_a_fraction_of_the_whole`). The versions
//! before (whole 3 to 5, delta 1) are still read, so an upgrade keeps its chain.

use super::error::ProcessError;
use super::rules;
use super::window::Windows;
use crate::model::SeriesInfo;
use crate::model::batch::OutboxItem;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// What is checkpointed: all processing state and the positions it reflects.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Checkpoint {
    /// Every journal record below this lsn is reflected here.
    pub(super) applied_lsn: u64,
    /// The processing clock (ms since epoch).
    pub(super) clock_ms: i64,
    /// The event-time windows of every series, open ones and closed ones kept for corrections.
    pub(super) windows: Windows,
    /// The rule definitions and each (rule, series) alert state, so raised alerts survive a
    /// restart.
    pub(super) rules: rules::Rules,
    /// Metric and tags of every series with state (bounded by `max_series`).
    pub(super) series: BTreeMap<String, Arc<SeriesInfo>>,
    /// Closed windows not yet in an outbox batch.
    pub(super) pending: Vec<OutboxItem>,
    /// Processing time of the oldest pending item (for `linger`).
    pub(super) pending_since_ms: Option<i64>,
    /// Outbox next lsn per lane (aggregates, alerts) when this checkpoint was taken: batches
    /// at or beyond it after a crash were never sent and are forgotten.
    pub(super) outbox_next: [u64; 2],
    /// The event-time watermark (ms since epoch) that closes windows: the highest event time
    /// received (never beyond its arrival time), moved on by the wall clock only while input
    /// is idle. See [`super::Processor::apply`].
    pub(super) watermark_ms: i64,
}

/// A version 3 checkpoint: the same state without the watermark (windows then closed on the
/// processing clock, which is where the watermark starts after an upgrade).
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct CheckpointV3 {
    applied_lsn: u64,
    clock_ms: i64,
    windows: Windows,
    rules: rules::Rules,
    series: BTreeMap<String, Arc<SeriesInfo>>,
    pending: Vec<OutboxItem>,
    pending_since_ms: Option<i64>,
    outbox_next: [u64; 2],
}

impl From<CheckpointV3> for Checkpoint {
    fn from(c: CheckpointV3) -> Checkpoint {
        Checkpoint {
            applied_lsn: c.applied_lsn,
            clock_ms: c.clock_ms,
            windows: c.windows,
            rules: c.rules,
            series: c.series,
            pending: c.pending,
            pending_since_ms: c.pending_since_ms,
            outbox_next: c.outbox_next,
            watermark_ms: c.clock_ms,
        }
    }
}

const CHECKPOINT_MAGIC: &[u8; 4] = b"EFCK";
/// Version 6: version 5 compressed ([`crate::util::to_deflated`]). Version 5: the whole
/// checkpoint's id, then the state (version 4: the state alone).
const CHECKPOINT_VERSION: u16 = 6;
const DELTA_MAGIC: &[u8; 4] = b"EFCD";
/// Version 2: version 1 compressed, as whole checkpoints from version 6 on.
const DELTA_VERSION: u16 = 2;

/// A chain of deltas is ended by a new whole checkpoint once the deltas written since the
/// last whole one add up to this many times its size. Each delta costs its changed slots plus
/// the whole of the small maps (series, rules, pending items); with the example config's
/// windows a delta taken 10 s after the previous checkpoint is about a quarter of the whole
/// (unit test `in_the_example_shape_a_delta_of_ten_seconds_is_a_fraction_of_the_whole`), so a
/// chain of three wholes' worth holds about a dozen deltas. While the state grows (the first
/// correction horizon after a start) the deltas are larger, which a longer chain absorbs.
pub(super) const MAX_DELTA_SHARE: u64 = 3;

/// The share of deltas a chain may take before a new whole checkpoint, for a whole
/// checkpoint of `whole` bytes and a quota of `max_disk`: the chain and the room for a whole
/// rewrite (`(2 + share) × whole`) stay within a third of `max_disk`, so a small quota keeps
/// its room for the journal and the outbox and simply gets whole checkpoints, as before
/// deltas existed.
pub(super) fn delta_share(whole: u64, max_disk: u64) -> u64 {
    (max_disk / 3)
        .checked_div(whole)
        .unwrap_or(MAX_DELTA_SHARE + 2)
        .saturating_sub(2)
        .min(MAX_DELTA_SHARE)
}

/// Why a checkpoint file is unusable.
pub type CheckpointError = crate::util::StateFileError;

/// A version 5 whole checkpoint as written.
#[derive(Serialize)]
struct WholeRef<'a> {
    id: u64,
    state: &'a Checkpoint,
}

/// A version 5 whole checkpoint as read.
#[derive(Deserialize)]
struct Whole {
    id: u64,
    state: Checkpoint,
}

/// A delta as written: see the module docs.
#[derive(Serialize)]
struct DeltaRef<'a> {
    base_id: u64,
    seq: u32,
    applied_lsn: u64,
    clock_ms: i64,
    rules: &'a rules::Rules,
    series: &'a BTreeMap<String, Arc<SeriesInfo>>,
    pending: &'a Vec<OutboxItem>,
    pending_since_ms: Option<i64>,
    outbox_next: [u64; 2],
    watermark_ms: i64,
    windows: super::window::WindowsDeltaRef<'a>,
}

/// A delta as read.
#[derive(Deserialize)]
struct Delta {
    base_id: u64,
    seq: u32,
    applied_lsn: u64,
    clock_ms: i64,
    rules: rules::Rules,
    series: BTreeMap<String, Arc<SeriesInfo>>,
    pending: Vec<OutboxItem>,
    pending_since_ms: Option<i64>,
    outbox_next: [u64; 2],
    watermark_ms: i64,
    windows: super::window::WindowsDelta,
}

/// Which kind of checkpoint to write next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// A whole checkpoint with this (new) id.
    Whole { id: u64 },
    /// Delta number `seq` of the chain of whole checkpoint `base_id`.
    Delta { base_id: u64, seq: u32 },
}

/// The delta file number `seq` in `state_dir`.
pub(super) fn delta_path(state_dir: &Path, seq: u32) -> std::path::PathBuf {
    state_dir.join(format!("checkpoint-delta-{seq:06}.bin"))
}

/// The delta files (and their temporary files) in `state_dir`, any chain.
fn delta_files(state_dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(dir) = std::fs::read_dir(state_dir) else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("checkpoint-delta-") && !n.contains(".bad-"))
        })
        .collect()
}

/// Removes the delta files of earlier chains, after a whole checkpoint is durable (a
/// removal lost in a crash is harmless: they belong to another id).
pub(super) fn remove_deltas(state_dir: &Path) {
    for f in delta_files(state_dir) {
        if let Err(e) = std::fs::remove_file(&f) {
            tracing::warn!("cannot remove {}: {e}", f.display());
        }
    }
}

/// Bytes the checkpoint files in `state_dir` take (the whole one and every delta).
pub(super) fn files_bytes(state_dir: &Path, whole: &Path) -> u64 {
    std::iter::once(whole.to_path_buf())
        .chain(delta_files(state_dir))
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// A new id for a whole checkpoint: random (the process's hasher keys), never 0, so a delta
/// of an earlier chain never matches it.
pub(super) fn new_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::hash::RandomState::new().build_hasher();
    h.write_u64(crate::clock::now_ms() as u64);
    h.finish().max(1)
}

impl Checkpoint {
    /// Serializes the state (whole, or what changed since the previous checkpoint) straight
    /// into its file's temporary copy (page cache, not yet durable): the state can be
    /// megabytes, and a copy in memory would double the process's peak. The caller makes it
    /// durable with [`PendingCheckpoint::write`]. Either way the windows' record of what
    /// changed is reset: the next delta follows this checkpoint (a delta's slots travel in
    /// [`PendingCheckpoint::taken`], to be put back if it is not written).
    pub(super) fn stage(
        &mut self,
        whole_path: &Path,
        kind: Kind,
    ) -> Result<PendingCheckpoint, ProcessError> {
        let path = match kind {
            Kind::Whole { .. } => whole_path.to_path_buf(),
            Kind::Delta { seq, .. } => {
                delta_path(whole_path.parent().unwrap_or(Path::new(".")), seq)
            }
        };
        let io = |source| ProcessError::Io {
            path: path.clone(),
            source,
        };
        let (magic, version) = match kind {
            Kind::Whole { .. } => (CHECKPOINT_MAGIC, CHECKPOINT_VERSION),
            Kind::Delta { .. } => (DELTA_MAGIC, DELTA_VERSION),
        };
        let mut out = crate::util::FramedWriter::create(&path, magic, version).map_err(io)?;
        let mut taken = None;
        let encoded = match kind {
            Kind::Whole { id } => {
                let r = crate::util::to_deflated(&WholeRef { id, state: self }, &mut out);
                self.windows.mark_written();
                r
            }
            Kind::Delta { base_id, seq } => {
                let t = self.windows.take_changed();
                let d = DeltaRef {
                    base_id,
                    seq,
                    applied_lsn: self.applied_lsn,
                    clock_ms: self.clock_ms,
                    rules: &self.rules,
                    series: &self.series,
                    pending: &self.pending,
                    pending_since_ms: self.pending_since_ms,
                    outbox_next: self.outbox_next,
                    watermark_ms: self.watermark_ms,
                    windows: self.windows.delta(&t),
                };
                let r = crate::util::to_deflated(&d, &mut out);
                taken = Some(t);
                r
            }
        };
        let staged = encoded.and_then(|()| out.finish()).map_err(io);
        let (staged, bytes) = match staged {
            Ok(s) => s,
            Err(e) => {
                if let Some(t) = taken {
                    self.windows.restore_changed(t);
                }
                return Err(e);
            }
        };
        Ok(PendingCheckpoint {
            staged,
            path,
            bytes,
            applied_lsn: self.applied_lsn,
            kind,
            taken,
        })
    }

    /// This state with `d` applied (`d` follows it in the chain).
    fn apply(self, d: Delta) -> Result<Checkpoint, super::window::WindowError> {
        Ok(Checkpoint {
            applied_lsn: d.applied_lsn,
            clock_ms: d.clock_ms,
            windows: self.windows.apply_delta(d.windows)?,
            rules: d.rules,
            series: d.series,
            pending: d.pending,
            pending_since_ms: d.pending_since_ms,
            outbox_next: d.outbox_next,
            watermark_ms: d.watermark_ms,
        })
    }
}

/// A loaded chain: the state of its newest member.
pub(super) struct Loaded {
    pub(super) state: Checkpoint,
    /// Deltas applied on top of it.
    pub(super) deltas: u32,
}

/// Reads the chain whose whole checkpoint is `whole` (the bytes of `checkpoint.bin` in
/// `state_dir`): the whole state, with the deltas that follow it applied in order up to the
/// first that is missing, of another chain, or unusable. A damaged delta is moved aside with
/// an error log; either way the journal is replayed from the last good member on (records it
/// no longer has are reported by the replay).
pub(super) fn load_chain(state_dir: &Path, whole: &[u8]) -> Result<Loaded, CheckpointError> {
    read_chain(state_dir, whole, true)
}

/// [`load_chain`]; `set_aside` false changes nothing on disk (for `store verify`).
fn read_chain(state_dir: &Path, whole: &[u8], set_aside: bool) -> Result<Loaded, CheckpointError> {
    let mut limit = u32::MAX;
    loop {
        let (id, state) = decode_checkpoint(whole)?;
        match apply_deltas(state_dir, id, state, limit, set_aside) {
            Ok(loaded) => return Ok(loaded),
            // Applying consumed the state: read it again, stopping before that delta.
            Err(unfit) => limit = unfit - 1,
        }
    }
}

/// Applies deltas 1..=`limit` of chain `id` to `state`; `Err(seq)` when delta `seq` does not
/// fit the state before it (then `state` is gone).
fn apply_deltas(
    state_dir: &Path,
    id: u64,
    state: Checkpoint,
    limit: u32,
    set_aside: bool,
) -> Result<Loaded, u32> {
    let mut loaded = Loaded { state, deltas: 0 };
    if id == 0 {
        return Ok(loaded); // written before deltas existed: nothing follows it
    }
    while loaded.deltas < limit {
        let seq = loaded.deltas + 1;
        let path = delta_path(state_dir, seq);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
            Err(e) => {
                tracing::error!(
                    "cannot read {}: {e}; using the checkpoint before it",
                    path.display()
                );
                break;
            }
        };
        let d = match decode_delta(&bytes) {
            Ok(d) => d,
            Err(why) if !set_aside => {
                tracing::warn!("checkpoint delta {} is damaged ({why})", path.display());
                break;
            }
            Err(why) => {
                let aside = path.with_extension(format!("bin.bad-{}", crate::clock::now_ms()));
                let _ = std::fs::rename(&path, &aside);
                tracing::error!(
                    "checkpoint delta {} is damaged ({why}); moved to {}, using the checkpoint before it",
                    path.display(),
                    aside.display()
                );
                break;
            }
        };
        if d.base_id != id || d.seq != seq {
            break; // left over from an earlier chain
        }
        match loaded.state.apply(d) {
            Ok(next) => {
                loaded.state = next;
                loaded.deltas = seq;
            }
            Err(why) => {
                tracing::error!(
                    "checkpoint delta {} does not fit the checkpoint before it ({why}); using the checkpoint before it",
                    path.display()
                );
                return Err(seq);
            }
        }
    }
    Ok(loaded)
}

/// A checkpoint written to its temporary file, on its way to being durable and in place
/// (see [`Processor::begin_checkpoint`]).
pub(super) struct PendingCheckpoint {
    pub(super) staged: crate::util::StagingFile,
    pub(super) path: std::path::PathBuf,
    pub(super) bytes: u64,
    pub(super) applied_lsn: u64,
    pub(super) kind: Kind,
    /// For a delta: the slots it covers, to be put back if it is not written after all.
    pub(super) taken: Option<super::window::TakenSlots>,
}

/// A checkpoint that is durable.
pub(super) struct WrittenCheckpoint {
    pub(super) bytes: u64,
    pub(super) applied_lsn: u64,
    pub(super) seconds: f64,
    pub(super) kind: Kind,
}

/// Test failpoint: `EDGEFERRY_FAILPOINT_CRASH_IN_DELTA=N` aborts the process while it writes
/// its N-th checkpoint delta: for odd N when the delta's temporary file is complete but not in
/// place, for even N right after it is durable and in place, before processing learns so (the
/// journal is not trimmed, the forwarder not told). `tests/checkpoint_crash.rs` uses it to
/// crash inside the chain's narrowest windows on purpose.
pub const DELTA_FAILPOINT_ENV: &str = "EDGEFERRY_FAILPOINT_CRASH_IN_DELTA";

/// Whether this write is the one the failpoint names, and in which half.
fn delta_failpoint(kind: Kind) -> Option<bool> {
    static AT: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    static WRITTEN: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let at = (*AT.get_or_init(|| std::env::var(DELTA_FAILPOINT_ENV).ok()?.parse().ok()))?;
    if !matches!(kind, Kind::Delta { .. }) {
        return None;
    }
    let n = WRITTEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    (n == at).then_some(n % 2 == 1)
}

impl PendingCheckpoint {
    /// Makes it durable and puts it in place (fdatasync, rename, directory fsync). Blocking.
    pub(super) fn write(self) -> Result<WrittenCheckpoint, ProcessError> {
        let started = Instant::now();
        let failpoint = delta_failpoint(self.kind);
        if failpoint == Some(true) {
            std::process::abort();
        }
        self.staged.commit().map_err(|source| ProcessError::Io {
            path: self.path.clone(),
            source,
        })?;
        if failpoint == Some(false) {
            std::process::abort();
        }
        Ok(WrittenCheckpoint {
            bytes: self.bytes,
            applied_lsn: self.applied_lsn,
            seconds: started.elapsed().as_secs_f64(),
            kind: self.kind,
        })
    }
}

/// The result of a checkpoint write task (it cannot panic: release builds abort on panic,
/// and a test build's panic is re-raised here).
pub(super) fn joined(
    r: Result<Result<WrittenCheckpoint, ProcessError>, tokio::task::JoinError>,
) -> Result<WrittenCheckpoint, ProcessError> {
    match r {
        Ok(written) => written,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(ProcessError::Io {
            path: "checkpoint".into(),
            source: std::io::Error::other(e.to_string()),
        }),
    }
}

/// What `edgeferry store verify` shows of a checkpoint file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckpointSummary {
    /// Every journal record below this lsn is reflected in the checkpoint.
    pub applied_lsn: u64,
    /// The processing clock (ms since epoch).
    pub clock_ms: i64,
    /// Distinct series (metric + tags) the checkpoint tracks, at most `process.max_series`.
    pub series: usize,
    /// Closed windows not yet in an outbox batch.
    pub pending_items: usize,
    /// Outbox next lsn per lane (aggregates, alerts) when the checkpoint was taken.
    pub outbox_next: [u64; 2],
    /// Deltas applied on top of the whole checkpoint to get this state.
    pub deltas: u32,
}

/// Decodes the bytes of a checkpoint file (offline checks); the error says why it is unusable.
pub fn inspect_checkpoint(bytes: &[u8]) -> Result<CheckpointSummary, CheckpointError> {
    let (_, c) = decode_checkpoint(bytes)?;
    Ok(summary(&c, 0))
}

/// [`inspect_checkpoint`] of the whole checkpoint `bytes` read from `state_dir`, with the
/// deltas there that follow it applied (read only: nothing is moved or removed).
pub fn inspect_checkpoint_chain(
    state_dir: &Path,
    bytes: &[u8],
) -> Result<CheckpointSummary, CheckpointError> {
    let loaded = read_chain(state_dir, bytes, false)?;
    Ok(summary(&loaded.state, loaded.deltas))
}

fn summary(c: &Checkpoint, deltas: u32) -> CheckpointSummary {
    CheckpointSummary {
        applied_lsn: c.applied_lsn,
        clock_ms: c.clock_ms,
        series: c.series.len(),
        pending_items: c.pending.len(),
        outbox_next: c.outbox_next,
        deltas,
    }
}

/// Decodes the bytes of a whole checkpoint file: its id (0 for versions before deltas) and
/// state.
pub(super) fn decode_checkpoint(bytes: &[u8]) -> Result<(u64, Checkpoint), CheckpointError> {
    use crate::util::FrameError::Version;
    let current =
        crate::util::decode_framed_deflated::<Whole>(bytes, CHECKPOINT_MAGIC, CHECKPOINT_VERSION);
    match current {
        Ok(w) => Ok((w.id, w.state)),
        Err(CheckpointError::Frame(Version { found: 5, .. })) => {
            crate::util::decode_framed::<Whole>(bytes, CHECKPOINT_MAGIC, 5).map(|w| (w.id, w.state))
        }
        Err(CheckpointError::Frame(Version { found: 4, .. })) => {
            crate::util::decode_framed::<Checkpoint>(bytes, CHECKPOINT_MAGIC, 4).map(|c| (0, c))
        }
        Err(CheckpointError::Frame(Version { found: 3, .. })) => {
            crate::util::decode_framed::<CheckpointV3>(bytes, CHECKPOINT_MAGIC, 3)
                .map(|c| (0, c.into()))
        }
        Err(e) => Err(e),
    }
}

/// Decodes the bytes of a delta file (this version's, or version 1's: the same contents
/// uncompressed, as the build before compression wrote them).
fn decode_delta(bytes: &[u8]) -> Result<Delta, CheckpointError> {
    use crate::util::FrameError::Version;
    match crate::util::decode_framed_deflated(bytes, DELTA_MAGIC, DELTA_VERSION) {
        Err(CheckpointError::Frame(Version { found: 1, .. })) => {
            crate::util::decode_framed(bytes, DELTA_MAGIC, 1)
        }
        other => other,
    }
}

/// Removes the temporary copy a crash mid-write left beside the checkpoint at `path`. It is
/// never valid (the rename is the commit point), and without this it would sit there, as big
/// as the checkpoint, for good.
pub(super) fn remove_stale_temp(path: &Path) {
    let dir = path.parent().unwrap_or(Path::new("."));
    let temps = delta_files(dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "tmp"));
    for stale in std::iter::once(path.with_extension("tmp")).chain(temps) {
        if !stale.exists() {
            continue;
        }
        match std::fs::remove_file(&stale) {
            Ok(()) => tracing::info!(
                "removed {} left by an interrupted checkpoint",
                stale.display()
            ),
            Err(e) => tracing::warn!("cannot remove {}: {e}", stale.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::window::WindowSpec;
    use crate::util::{FrameError, StateFileError};

    fn state(applied_lsn: u64) -> Checkpoint {
        Checkpoint {
            applied_lsn,
            clock_ms: 1_700_000_000_000,
            windows: Windows::new(WindowSpec {
                lengths_secs: vec![10, 60],
                allowed_lateness_ms: 5_000,
                retention_ms: 120_000,
            }),
            rules: rules::Rules::new(&[]),
            series: BTreeMap::new(),
            pending: Vec::new(),
            pending_since_ms: Some(3),
            outbox_next: [7, 2],
            watermark_ms: 1_699_999_999_000,
        }
    }

    #[test]
    fn a_staged_checkpoint_is_invisible_until_written_then_reads_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.bin");
        let pending = state(41).stage(&path, Kind::Whole { id: 1 }).unwrap();
        assert!(
            !path.exists(),
            "staged only: a crash here keeps the previous checkpoint"
        );
        let written = pending.write().unwrap();
        assert_eq!(written.applied_lsn, 41);
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            written.bytes > 0 && written.bytes <= bytes.len() as u64,
            "the body's size"
        );
        let (id, back) = decode_checkpoint(&bytes).unwrap();
        assert_eq!(id, 1);
        assert_eq!((back.applied_lsn, back.outbox_next), (41, [7, 2]));
        assert_eq!(back.pending_since_ms, Some(3));
        let summary = inspect_checkpoint(&bytes).unwrap();
        assert_eq!(summary.applied_lsn, 41);
        assert_eq!(summary.series, 0);

        state(42)
            .stage(&path, Kind::Whole { id: 1 })
            .unwrap()
            .write()
            .unwrap();
        let (_, again) = decode_checkpoint(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(again.applied_lsn, 42, "replaced atomically");
    }

    #[test]
    fn a_version_3_checkpoint_is_read_and_its_watermark_starts_at_the_processing_clock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.bin");
        let c = state(9);
        let v3 = CheckpointV3 {
            applied_lsn: c.applied_lsn,
            clock_ms: c.clock_ms,
            windows: c.windows,
            rules: c.rules,
            series: c.series,
            pending: c.pending,
            pending_since_ms: c.pending_since_ms,
            outbox_next: c.outbox_next,
        };
        let body = postcard::to_stdvec(&v3).unwrap();
        crate::util::write_framed(&path, CHECKPOINT_MAGIC, 3, &body).unwrap();
        let (id, back) = decode_checkpoint(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(id, 0, "no chain follows a checkpoint from before deltas");
        assert_eq!(back.applied_lsn, 9);
        assert_eq!(back.watermark_ms, back.clock_ms);
        // Other versions are still refused, with the version named.
        crate::util::write_framed(&path, CHECKPOINT_MAGIC, 2, &body).unwrap();
        let err = decode_checkpoint(&std::fs::read(&path).unwrap()).unwrap_err();
        assert_eq!(err.to_string(), "unknown format version 2 (expected 6)");
    }

    #[test]
    fn a_chain_written_before_compression_loads_and_the_next_checkpoint_is_compressed() {
        // What the build before compression wrote: a version 5 whole checkpoint and version 1
        // deltas, plain postcard, and the state they describe after an upgrade.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.bin");
        let mut c = busy(0, 100);
        let whole = postcard::to_stdvec(&WholeRef { id: 4, state: &c }).unwrap();
        crate::util::write_framed(&path, CHECKPOINT_MAGIC, 5, &whole).unwrap();
        c.windows.mark_written();
        more(&mut c, 100, 110);
        let taken = c.windows.take_changed();
        let delta = DeltaRef {
            base_id: 4,
            seq: 1,
            applied_lsn: c.applied_lsn,
            clock_ms: c.clock_ms,
            rules: &c.rules,
            series: &c.series,
            pending: &c.pending,
            pending_since_ms: c.pending_since_ms,
            outbox_next: c.outbox_next,
            watermark_ms: c.watermark_ms,
            windows: c.windows.delta(&taken),
        };
        let delta = postcard::to_stdvec(&delta).unwrap();
        crate::util::write_framed(&delta_path(dir.path(), 1), DELTA_MAGIC, 1, &delta).unwrap();
        let loaded = load_chain(dir.path(), &std::fs::read(&path).unwrap()).unwrap();
        assert_eq!((loaded.deltas, loaded.state.applied_lsn), (1, 110));
        assert_eq!(loaded.state.windows, c.windows);

        // The first checkpoint of the new build is whole, compressed, and far smaller.
        let mut state = loaded.state;
        let written = state
            .stage(&path, Kind::Whole { id: 5 })
            .unwrap()
            .write()
            .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(u16::from_le_bytes([bytes[4], bytes[5]]), CHECKPOINT_VERSION);
        assert!(
            written.bytes * 3 < whole.len() as u64,
            "compressed {} bytes, plain {}",
            written.bytes,
            whole.len()
        );
        let (id, back) = decode_checkpoint(&bytes).unwrap();
        assert_eq!((id, back.windows), (5, c.windows));
    }

    #[test]
    fn a_body_that_passes_its_checksum_but_does_not_inflate_is_refused_as_such() {
        // Only a bug or a crafted file gets here (damage fails the checksum first).
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.bin");
        crate::util::write_framed(&path, CHECKPOINT_MAGIC, CHECKPOINT_VERSION, &[0xff; 64])
            .unwrap();
        let err = decode_checkpoint(&std::fs::read(&path).unwrap()).unwrap_err();
        assert!(matches!(err, StateFileError::Inflate(_)), "{err}");
        assert!(err.to_string().contains("do not inflate"), "{err}");
        // Plain postcard under the compressed version is refused too, not misread.
        let plain = postcard::to_stdvec(&WholeRef {
            id: 1,
            state: &state(3),
        })
        .unwrap();
        crate::util::write_framed(&path, CHECKPOINT_MAGIC, CHECKPOINT_VERSION, &plain).unwrap();
        assert!(decode_checkpoint(&std::fs::read(&path).unwrap()).is_err());
    }

    /// A state whose windows hold `n` readings of 50 series, one per second from t = 0.
    fn busy(applied_lsn: u64, n: i64) -> Checkpoint {
        let mut c = state(applied_lsn);
        for i in 0..n {
            for s in 0..50 {
                c.windows
                    .apply(&format!("s{s}"), i as f64, i * 1000, i * 1000);
            }
            let mut out = Vec::new();
            c.windows.close_due(i * 1000, &mut out);
        }
        c
    }

    fn more(c: &mut Checkpoint, from: i64, to: i64) {
        for i in from..to {
            for s in 0..50 {
                c.windows
                    .apply(&format!("s{s}"), i as f64, i * 1000, i * 1000);
            }
            let mut out = Vec::new();
            c.windows.close_due(i * 1000, &mut out);
        }
        c.applied_lsn = to as u64;
    }

    #[test]
    fn a_whole_checkpoint_and_its_deltas_load_as_the_newest_state_and_deltas_are_small() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.bin");
        let mut c = busy(0, 100);
        let whole = c
            .stage(&path, Kind::Whole { id: 9 })
            .unwrap()
            .write()
            .unwrap();
        let mut sizes = Vec::new();
        for seq in 1..=3u32 {
            more(&mut c, 100 + 10 * (seq as i64 - 1), 100 + 10 * seq as i64);
            let w = c
                .stage(&path, Kind::Delta { base_id: 9, seq })
                .unwrap()
                .write()
                .unwrap();
            sizes.push(w.bytes);
        }
        println!("whole {} bytes, deltas of 10 s {sizes:?}", whole.bytes);
        assert!(
            sizes.iter().all(|d| d * 3 < whole.bytes),
            "a delta of 10 s is a fraction of the whole: {sizes:?} vs {}",
            whole.bytes
        );
        let loaded = load_chain(dir.path(), &std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(loaded.deltas, 3);
        assert_eq!(loaded.state.applied_lsn, 130);
        assert_eq!(loaded.state.windows, c.windows);

        // A delta of another chain (left by a crash before a new whole one's deltas were
        // removed) ends the chain; so does a damaged one, which is moved aside.
        let d2 = delta_path(dir.path(), 2);
        let good = std::fs::read(&d2).unwrap();
        let mut bad = good.clone();
        *bad.last_mut().unwrap() ^= 1;
        std::fs::write(&d2, &bad).unwrap();
        let loaded = load_chain(dir.path(), &std::fs::read(&path).unwrap()).unwrap();
        assert_eq!((loaded.deltas, loaded.state.applied_lsn), (1, 110));
        assert!(!d2.exists(), "the damaged delta was moved aside");
        assert!(
            delta_files(dir.path()).len() == 2,
            "the copy set aside is not a delta"
        );

        // A new whole checkpoint with another id: the old deltas no longer apply.
        c.stage(&path, Kind::Whole { id: 10 })
            .unwrap()
            .write()
            .unwrap();
        let loaded = load_chain(dir.path(), &std::fs::read(&path).unwrap()).unwrap();
        assert_eq!((loaded.deltas, loaded.state.applied_lsn), (0, 130));
        remove_deltas(dir.path());
        assert!(delta_files(dir.path()).is_empty());
    }

    /// The example config's windows (10 s and 1 min, lateness 5 s, correction horizon 2 min)
    /// with 1,000 series at 1 Hz: what a delta 10 s after a whole checkpoint takes.
    #[test]
    fn in_the_example_shape_a_delta_of_ten_seconds_is_a_fraction_of_the_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.bin");
        let mut c = state(0);
        let feed = |c: &mut Checkpoint, from: i64, to: i64| {
            for t in from..to {
                for s in 0..1000 {
                    let v = 20.0 + ((t * 7 + s * 13) % 150) as f64 / 10.0;
                    c.windows.apply(
                        &format!("temperature{{sensor=s{s}}}"),
                        v,
                        t * 1000,
                        t * 1000,
                    );
                }
                let mut out = Vec::new();
                c.windows.close_due(t * 1000, &mut out);
            }
        };
        feed(&mut c, 0, 300);
        let whole = c
            .stage(&path, Kind::Whole { id: 1 })
            .unwrap()
            .write()
            .unwrap()
            .bytes;
        feed(&mut c, 300, 310);
        let delta = c
            .stage(&path, Kind::Delta { base_id: 1, seq: 1 })
            .unwrap()
            .write()
            .unwrap()
            .bytes;
        println!("1,000 series: whole {whole} bytes, delta after 10 s {delta} bytes");
        assert!(delta * 3 < whole, "{delta} vs {whole}");
    }

    #[test]
    fn a_delta_that_does_not_fit_its_whole_checkpoint_is_not_applied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.bin");
        let mut c = busy(0, 50);
        c.stage(&path, Kind::Whole { id: 3 })
            .unwrap()
            .write()
            .unwrap();
        more(&mut c, 50, 60);
        c.stage(&path, Kind::Delta { base_id: 3, seq: 1 })
            .unwrap()
            .write()
            .unwrap();
        // The whole checkpoint is replaced behind the chain's back by another state with
        // the same id (only a bug could do that): the delta refers to slots it lacks.
        state(0)
            .stage(&path, Kind::Whole { id: 3 })
            .unwrap()
            .write()
            .unwrap();
        let loaded = load_chain(dir.path(), &std::fs::read(&path).unwrap()).unwrap();
        assert_eq!((loaded.deltas, loaded.state.applied_lsn), (0, 0));
    }

    #[test]
    fn a_temporary_copy_left_by_a_crash_is_removed_and_the_checkpoint_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.bin");
        state(5)
            .stage(&path, Kind::Whole { id: 1 })
            .unwrap()
            .write()
            .unwrap();
        // A crash after staging the next one, before its rename.
        let _staged = state(6).stage(&path, Kind::Whole { id: 1 }).unwrap();
        assert!(path.with_extension("tmp").exists());
        remove_stale_temp(&path);
        assert!(!path.with_extension("tmp").exists());
        let (_, kept) = decode_checkpoint(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(kept.applied_lsn, 5);
        remove_stale_temp(&path); // nothing to do is fine
    }

    #[test]
    fn a_damaged_checkpoint_says_why_it_is_unusable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.bin");
        state(1)
            .stage(&path, Kind::Whole { id: 1 })
            .unwrap()
            .write()
            .unwrap();
        let good = std::fs::read(&path).unwrap();

        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 0x40;
        assert!(matches!(
            decode_checkpoint(&flipped),
            Err(StateFileError::Frame(FrameError::Checksum))
        ));
        assert!(matches!(
            decode_checkpoint(&good[..good.len() - 3]),
            Err(StateFileError::Frame(FrameError::Truncated))
        ));
        assert!(matches!(
            decode_checkpoint(b"EFAK\x01\x00 something else entirely"),
            Err(StateFileError::Frame(FrameError::BadMagic))
        ));
        let err = inspect_checkpoint(&flipped).unwrap_err().to_string();
        assert_eq!(err, "checksum mismatch");
    }

    /// The bytes of a checkpoint as written to disk (once per test run).
    fn real_checkpoint_bytes() -> &'static Vec<u8> {
        static BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        BYTES.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("checkpoint.bin");
            state(7)
                .stage(&path, Kind::Whole { id: 1 })
                .unwrap()
                .write()
                .unwrap();
            std::fs::read(&path).unwrap()
        })
    }

    proptest::proptest! {
        /// The same property as `fuzz/fuzz_targets/checkpoint.rs`: any bytes give a summary or
        /// a reason, never a panic; so does a real checkpoint with any byte changed.
        #[test]
        fn arbitrary_or_damaged_checkpoint_bytes_never_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
            at in 0usize..4096,
            flip in 1u8..=255,
        ) {
            let _ = inspect_checkpoint(&bytes);
            let mut real = real_checkpoint_bytes().clone();
            let i = at % real.len();
            real[i] ^= flip;
            let _ = inspect_checkpoint(&real);
        }
    }
}
