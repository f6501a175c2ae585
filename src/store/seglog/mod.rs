//! Append-only segment log: the durable FIFO journal (and outbox) of edgeferry.
//!
//! # Why not sled for this
//! Measured with sled 0.34.7 as a FIFO: 1 M × 64 B records took 216 MB on disk (3.4×),
//! 240 MB RSS, and the space was not given back after draining. A FIFO needs none of a
//! B-tree's features, so FIFO data lives here and sled keeps only small keyed state.
//!
//! # On-disk format
//! A log is a directory of *segment files* named `<first_lsn, 20 digits zero-padded>.seg`
//! (e.g. `00000000000000001000.seg`), plus `LOCK` (held with an exclusive `flock` while a
//! process has the log open) and `quarantine/` (damaged bytes moved aside by recovery).
//! Every other file in the directory is ignored.
//!
//! Each segment starts with a 20-byte header:
//!
//! ```text
//! magic b"EFLOG\0" (6) | frame format u8 = 1 or 2 | payload tag u8 | first_lsn u64 LE (8) | crc32 of the previous 16 bytes, u32 LE (4)
//! ```
//!
//! The payload tag says how the log's user encoded the segment's payloads
//! ([`LogConfig::payload_tag`]; 0 in segments written before it existed, whose two version
//! bytes read as the u16 1). The log itself never looks inside a payload. A log opened with
//! another tag than its active segment's starts a new segment, so one segment never mixes
//! encodings; a build that does not know a tag treats the segment as unsupported (moved to
//! quarantine, loudly) rather than misreading it.
//!
//! followed by records ("frames"), all little-endian:
//!
//! ```text
//! len u32 | crc32 over (lsn bytes ++ payload) u32 | lsn u64 | payload (len bytes)
//! ```
//!
//! A log opened with [`LogConfig::pad_syncs`] writes frame format 2: before each sync it
//! fills the rest of the 4 KiB page it ends in with a *padding frame* (lsn field all ones,
//! payload zeros, the usual checksum), so that the next group starts on a fresh page and no
//! page is written twice. Padding is no record and takes no lsn; readers and recovery skip
//! it, checksum included. A log opened with the other format than its active segment's
//! starts a new segment, as for a new payload tag; a build that knows only format 1 refuses
//! a format 2 segment (quarantine) rather than cutting it at the first padding frame.
//!
//! Record sequence numbers ([`Lsn`]) are contiguous inside a segment, starting at the
//! header's `first_lsn`, and continue across segments. The lsn is stored (and checksummed)
//! in every frame so that stale or misplaced bytes — a zero-filled block after a power cut,
//! a block from another file — can never pass for a record.
//!
//! # Durability
//! [`SegmentLog::append`] only buffers. [`SegmentLog::sync`] flushes the buffer, calls
//! `fdatasync` on the active segment and `fsync` on the directory if a segment was created or
//! deleted since the last sync; once it returns `Ok`, every appended record survives SIGKILL
//! and power loss. Rolling to a new segment syncs the old one first, then creates the new
//! file with its header, syncs it and the directory. After a failed write or sync the log is
//! *poisoned* (every further write returns [`LogError::Poisoned`]): after a failed `fsync`
//! the kernel may have dropped the dirty pages, so retrying could report success for data
//! that is gone. Reopening the log runs recovery and is the way out.
//!
//! # Recovery rules (run by [`SegmentLog::open`]; never panics, never refuses to start because of damage)
//! Segments are read in lsn order and every frame's length, checksum and lsn is checked.
//! * **Last segment, bad frame, nothing valid after it** (a torn tail after a crash): the file
//!   is truncated at the first bad frame ([`Recovery::truncated_bytes`]) and appends continue
//!   there, so the next lsn is the last valid lsn + 1. Those bytes were never synced, so
//!   nothing durable is lost.
//! * **Last segment, bad frame with valid frames after it** (damage to synced data, e.g. a
//!   flipped bit): treated like damage in a non-last segment (below), and the next lsn is
//!   pushed past every lsn the quarantined bytes could have held, so lsns that a consumer may
//!   already have seen are never issued again.
//! * **Last segment shorter than a header** (crash while rolling): the header is rewritten.
//! * **Non-last segment, bad frame** (damage to synced data): the valid prefix is kept, the
//!   damaged remainder is copied to `quarantine/<segment>-<unix time>.bad`, the segment is
//!   truncated and a `tracing::error!` says so. Later segments stay readable; the lost lsns
//!   become a gap that readers skip.
//! * **Garbage header** (bad magic/version/checksum, header lsn ≠ file name, or a segment
//!   whose lsns overlap the previous one): the whole file is moved into `quarantine/`.
//!   If it was the last segment, the next lsn is pushed past every lsn the file could have
//!   held (`first_lsn + (file_len - header) / 16`), so lsns stay monotonic even for records
//!   a consumer may already have seen.
//! * Zero-length segment files are fine: the last one gets a header, others are deleted.
//!
//! If copying damaged bytes into quarantine fails (disk full, unreadable sector) the error is
//! logged and recovery continues, because a gateway that cannot start loses more data than a
//! missing copy of unreadable bytes.

mod error;
mod files;
mod format;
mod log;
mod reader;
mod recovery;
#[cfg(test)]
mod testkit;
mod verify;

pub use error::LogError;
pub use format::{
    Damage, FRAME_OVERHEAD, HEADER_LEN, LOCK_FILE, Lsn, PAGE, QUARANTINE_DIR, SEGMENT_EXT,
};
pub use log::{LogConfig, SegmentInfo, SegmentLog};
pub use reader::LogReader;
pub use recovery::Recovery;
pub use verify::{DamageReport, SegmentReport, VerifyReport, verify};
