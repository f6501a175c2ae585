//! The checkpoint: all processing state with the journal and outbox positions it reflects,
//! written atomically (temporary file, `fdatasync`, rename, directory `fsync`) in two halves so
//! that the slow write happens off the processing task.

use super::error::ProcessError;
use super::rules;
use super::window::Windows;
use crate::model::SeriesInfo;
use crate::model::batch::OutboxItem;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
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
    pub(super) series: BTreeMap<String, SeriesInfo>,
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
    series: BTreeMap<String, SeriesInfo>,
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
const CHECKPOINT_VERSION: u16 = 4;

/// Why a checkpoint file is unusable.
pub type CheckpointError = crate::util::StateFileError;

impl Checkpoint {
    /// Serializes the state straight into `path`'s temporary file (page cache, not yet
    /// durable): the state can be megabytes, and a copy in memory would double the process's
    /// peak. The caller makes it durable with [`PendingCheckpoint::write`].
    pub(super) fn stage(&self, path: &Path) -> Result<PendingCheckpoint, ProcessError> {
        let io = |source| ProcessError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut out = crate::util::FramedWriter::create(path, CHECKPOINT_MAGIC, CHECKPOINT_VERSION)
            .map_err(io)?;
        postcard::to_io(self, &mut out).map_err(|e| io(std::io::Error::other(e)))?;
        let (staged, bytes) = out.finish().map_err(io)?;
        Ok(PendingCheckpoint {
            staged,
            path: path.to_path_buf(),
            bytes,
            applied_lsn: self.applied_lsn,
        })
    }
}

/// A checkpoint written to its temporary file, on its way to being durable and in place
/// (see [`Processor::begin_checkpoint`]).
pub(super) struct PendingCheckpoint {
    pub(super) staged: crate::util::StagingFile,
    pub(super) path: std::path::PathBuf,
    pub(super) bytes: u64,
    pub(super) applied_lsn: u64,
}

/// A checkpoint that is durable.
pub(super) struct WrittenCheckpoint {
    pub(super) bytes: u64,
    pub(super) applied_lsn: u64,
    pub(super) seconds: f64,
}

impl PendingCheckpoint {
    /// Makes it durable and puts it in place (fdatasync, rename, directory fsync). Blocking.
    pub(super) fn write(self) -> Result<WrittenCheckpoint, ProcessError> {
        let started = Instant::now();
        self.staged.commit().map_err(|source| ProcessError::Io {
            path: self.path.clone(),
            source,
        })?;
        Ok(WrittenCheckpoint {
            bytes: self.bytes,
            applied_lsn: self.applied_lsn,
            seconds: started.elapsed().as_secs_f64(),
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
}

/// Decodes the bytes of a checkpoint file (offline checks); the error says why it is unusable.
pub fn inspect_checkpoint(bytes: &[u8]) -> Result<CheckpointSummary, CheckpointError> {
    let c = decode_checkpoint(bytes)?;
    Ok(CheckpointSummary {
        applied_lsn: c.applied_lsn,
        clock_ms: c.clock_ms,
        series: c.series.len(),
        pending_items: c.pending.len(),
        outbox_next: c.outbox_next,
    })
}

/// Decodes the bytes of a checkpoint file.
pub(super) fn decode_checkpoint(bytes: &[u8]) -> Result<Checkpoint, CheckpointError> {
    match crate::util::decode_framed(bytes, CHECKPOINT_MAGIC, CHECKPOINT_VERSION) {
        Err(CheckpointError::Frame(crate::util::FrameError::Version { found: 3, .. })) => {
            crate::util::decode_framed::<CheckpointV3>(bytes, CHECKPOINT_MAGIC, 3).map(Into::into)
        }
        other => other,
    }
}

/// Removes the temporary copy a crash mid-write left beside the checkpoint at `path`. It is
/// never valid (the rename is the commit point), and without this it would sit there, as big
/// as the checkpoint, for good.
pub(super) fn remove_stale_temp(path: &Path) {
    let stale = path.with_extension("tmp");
    if stale.exists() {
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
        let pending = state(41).stage(&path).unwrap();
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
        let back = decode_checkpoint(&bytes).unwrap();
        assert_eq!((back.applied_lsn, back.outbox_next), (41, [7, 2]));
        assert_eq!(back.pending_since_ms, Some(3));
        let summary = inspect_checkpoint(&bytes).unwrap();
        assert_eq!(summary.applied_lsn, 41);
        assert_eq!(summary.series, 0);

        state(42).stage(&path).unwrap().write().unwrap();
        let again = decode_checkpoint(&std::fs::read(&path).unwrap()).unwrap();
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
        let back = decode_checkpoint(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back.applied_lsn, 9);
        assert_eq!(back.watermark_ms, back.clock_ms);
        // Other versions are still refused, with the version named.
        crate::util::write_framed(&path, CHECKPOINT_MAGIC, 2, &body).unwrap();
        let err = decode_checkpoint(&std::fs::read(&path).unwrap()).unwrap_err();
        assert_eq!(err.to_string(), "unknown format version 2 (expected 4)");
    }

    #[test]
    fn a_temporary_copy_left_by_a_crash_is_removed_and_the_checkpoint_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.bin");
        state(5).stage(&path).unwrap().write().unwrap();
        // A crash after staging the next one, before its rename.
        let _staged = state(6).stage(&path).unwrap();
        assert!(path.with_extension("tmp").exists());
        remove_stale_temp(&path);
        assert!(!path.with_extension("tmp").exists());
        let kept = decode_checkpoint(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(kept.applied_lsn, 5);
        remove_stale_temp(&path); // nothing to do is fine
    }

    #[test]
    fn a_damaged_checkpoint_says_why_it_is_unusable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.bin");
        state(1).stage(&path).unwrap().write().unwrap();
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
            state(7).stage(&path).unwrap().write().unwrap();
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
