//! The open log and its writer: append, group sync, roll, trim.

use super::error::{LogError, io_err};
use super::files::*;
use super::format::*;
use std::collections::VecDeque;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Tuning of a [`SegmentLog`].
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Roll to a new segment file once the active one would grow past this size. Trimming
    /// frees whole segments, so this is also the granularity of giving disk back. A record
    /// larger than this gets a segment of its own.
    pub segment_bytes: u64,
    /// Appends with a larger payload are rejected with [`LogError::RecordTooLarge`]
    /// (capped at `u32::MAX`, the largest length a frame can express).
    pub max_record: usize,
    /// How the user encodes payloads, written into every new segment's header and reported
    /// per segment by [`SegmentLog::segments`] (0: the default; see the module docs).
    pub payload_tag: u8,
    /// Every sync first fills the rest of the page the segment ends in with a padding frame,
    /// so the next group starts on a fresh page. Why: the kernel writes whole pages, and a
    /// sync that ends inside a page makes the next sync write that page again; a log synced
    /// every few kilobytes (the journal) wrote each of its pages about twice, which on an SD
    /// card is wear (issue 11). A group that ends near a boundary costs almost nothing; a
    /// small one costs the rest of its page in disk space (not in bytes written: the page
    /// is written once either way). Segments written this way carry frame format 2.
    pub pad_syncs: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes: 8 * 1024 * 1024,
            max_record: 1024 * 1024,
            payload_tag: 0,
            pad_syncs: false,
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct SegMeta {
    pub(super) path: PathBuf,
    pub(super) first_lsn: Lsn,
    /// One past the last record's lsn (== first_lsn when empty).
    pub(super) end_lsn: Lsn,
    /// File size, including bytes still in the write buffer for the active segment.
    pub(super) bytes: u64,
    /// The header's payload tag.
    pub(super) tag: u8,
    /// Frame format 2: may hold padding frames.
    pub(super) padded: bool,
}

/// One segment as [`SegmentLog::segments`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentInfo {
    /// Lsn of its first record (also of a gap's end: lsns below it are in earlier segments).
    pub first_lsn: Lsn,
    /// One past its last record.
    pub end_lsn: Lsn,
    /// Its header's payload tag.
    pub payload_tag: u8,
}

/// An open, exclusively locked segment log. See the module docs for format and rules.
pub struct SegmentLog {
    pub(super) dir: PathBuf,
    pub(super) cfg: LogConfig,
    pub(super) _lock: File,
    pub(super) closed: VecDeque<SegMeta>,
    pub(super) active: SegMeta,
    pub(super) writer: BufWriter<File>,
    pub(super) next_lsn: Lsn,
    pub(super) synced_lsn: Lsn,
    pub(super) active_synced_bytes: u64,
    pub(super) dir_dirty: bool,
    pub(super) poisoned: bool,
    /// Frame bytes of every record appended since open (padding excluded): how users learn
    /// what their records really take.
    pub(super) appended_bytes: u64,
}

impl fmt::Debug for SegmentLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SegmentLog")
            .field("dir", &self.dir)
            .field("segments", &(self.closed.len() + 1))
            .field("first_lsn", &self.first_lsn())
            .field("next_lsn", &self.next_lsn)
            .field("synced_lsn", &self.synced_lsn)
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

impl SegmentLog {
    /// Buffers one record and returns its lsn. Not durable until [`SegmentLog::sync`]
    /// returns Ok (or a roll to a new segment, which syncs). Rejects payloads larger than
    /// [`LogConfig::max_record`] without otherwise affecting the log.
    pub fn append(&mut self, payload: &[u8]) -> Result<Lsn, LogError> {
        if payload.len() > self.cfg.max_record {
            return Err(LogError::RecordTooLarge {
                len: payload.len(),
                max: self.cfg.max_record,
            });
        }
        self.check_poisoned()?;
        let r = self.append_inner(payload);
        self.poison_on_err(r)
    }

    /// Whether appending a payload of `len` bytes now would start a new segment: for users
    /// whose payloads depend on what the segment already holds (the journal's series
    /// dictionary), asked before encoding.
    pub fn would_roll(&self, len: usize) -> bool {
        self.active.bytes + FRAME_OVERHEAD + len as u64 > self.cfg.segment_bytes
            && self.active.end_lsn > self.active.first_lsn
    }

    pub(super) fn append_inner(&mut self, payload: &[u8]) -> Result<Lsn, LogError> {
        let frame = FRAME_OVERHEAD + payload.len() as u64;
        if self.would_roll(payload.len()) {
            self.roll()?;
        }
        let lsn = self.next_lsn;
        let mut h = [0u8; FRAME_OVERHEAD as usize];
        h[0..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        h[4..8].copy_from_slice(&frame_crc(lsn, payload).to_le_bytes());
        h[8..16].copy_from_slice(&lsn.to_le_bytes());
        self.writer
            .write_all(&h)
            .and_then(|_| self.writer.write_all(payload))
            .map_err(io_err("append to", &self.active.path))?;
        self.next_lsn += 1;
        self.active.end_lsn = self.next_lsn;
        self.active.bytes += frame;
        self.appended_bytes += frame;
        Ok(lsn)
    }

    /// Makes every appended record durable: flush, `fdatasync` of the active segment, and
    /// `fsync` of the directory if segments were created or deleted since the last sync.
    /// Does nothing (no fsync) when there is nothing new. After a failure the log is
    /// poisoned (see module docs).
    pub fn sync(&mut self) -> Result<(), LogError> {
        self.check_poisoned()?;
        let r = self.sync_inner();
        self.poison_on_err(r)
    }

    pub(super) fn sync_inner(&mut self) -> Result<(), LogError> {
        if self.synced_lsn == self.next_lsn
            && !self.dir_dirty
            && self.active_synced_bytes == self.active.bytes
        {
            return Ok(());
        }
        // The segment's frame format decides (recovery and `roll` give the active segment
        // the format `cfg.pad_syncs` asks for).
        if self.active.padded
            && self.active_synced_bytes != self.active.bytes
            && let Some(pad) = padding_for(self.active.bytes)
        {
            self.writer
                .write_all(&pad)
                .map_err(io_err("pad", &self.active.path))?;
            self.active.bytes += pad.len() as u64;
            metrics::counter!("edgeferry_disk_padding_bytes_total").increment(pad.len() as u64);
        }
        self.writer
            .flush()
            .map_err(io_err("write", &self.active.path))?;
        crate::util::sync_data(self.writer.get_ref())
            .map_err(io_err("fdatasync", &self.active.path))?;
        if self.dir_dirty {
            sync_dir(&self.dir)?;
            self.dir_dirty = false;
        }
        self.synced_lsn = self.next_lsn;
        self.active_synced_bytes = self.active.bytes;
        Ok(())
    }

    /// Syncs the active segment, then starts a new one at `next_lsn`.
    pub(super) fn roll(&mut self) -> Result<(), LogError> {
        self.sync_inner()?;
        let first = self.next_lsn;
        let path = self.dir.join(segment_file_name(first));
        let file = create_segment(&path, first, self.cfg.payload_tag, self.cfg.pad_syncs)?;
        sync_dir(&self.dir)?;
        self.dir_dirty = false;
        let old_writer = std::mem::replace(
            &mut self.writer,
            BufWriter::with_capacity(WRITE_BUFFER, file),
        );
        drop(old_writer); // already flushed by sync_inner
        let old = std::mem::replace(
            &mut self.active,
            SegMeta {
                path,
                first_lsn: first,
                end_lsn: first,
                bytes: HEADER_LEN,
                tag: self.cfg.payload_tag,
                padded: self.cfg.pad_syncs,
            },
        );
        self.closed.push_back(old);
        self.active_synced_bytes = HEADER_LEN;
        Ok(())
    }

    /// Takes back every record appended since the last successful sync and lifts the
    /// poisoning of a failed write or sync, so that a full (or failing) disk stalls the log
    /// instead of ending it. The active segment is cut back to its synced length: a record
    /// torn by a write that failed half-way goes with it, and so do dirty pages a failed
    /// `fdatasync` may have dropped, which is why re-syncing them is never tried. `next_lsn`
    /// returns to `synced_lsn`; the caller still holds the records taken back and appends
    /// them again (the same lsns) once the cause is gone. A segment file left half-created by
    /// a roll that failed is removed. Records synced before are untouched.
    pub fn rollback_unsynced(&mut self) -> Result<(), LogError> {
        let path = self.active.path.clone();
        let file = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io_err("reopen", &path))?;
        // Swap the writer first and discard the old one's buffer without writing it: a
        // `BufWriter` flushes on drop, which would put the failed bytes back.
        let old = std::mem::replace(
            &mut self.writer,
            BufWriter::with_capacity(WRITE_BUFFER, file),
        );
        let _ = old.into_parts();
        let file = self.writer.get_mut();
        file.set_len(self.active_synced_bytes)
            .map_err(io_err("truncate", &path))?;
        file.seek(SeekFrom::Start(self.active_synced_bytes))
            .map_err(io_err("seek in", &path))?;
        self.next_lsn = self.synced_lsn;
        self.active.end_lsn = self.synced_lsn.max(self.active.first_lsn);
        self.active.bytes = self.active_synced_bytes;
        let stray = self.dir.join(segment_file_name(self.next_lsn));
        if stray != self.active.path && stray.exists() {
            std::fs::remove_file(&stray).map_err(io_err("remove half-created", &stray))?;
            self.dir_dirty = true;
        }
        if self.poisoned {
            tracing::info!(dir = %self.dir.display(), lsn = self.next_lsn, "segment log rolled back to its last sync; writes resume");
        }
        self.poisoned = false;
        Ok(())
    }

    pub(super) fn check_poisoned(&self) -> Result<(), LogError> {
        if self.poisoned {
            Err(LogError::Poisoned {
                dir: self.dir.clone(),
            })
        } else {
            Ok(())
        }
    }

    pub(super) fn poison_on_err<T>(&mut self, r: Result<T, LogError>) -> Result<T, LogError> {
        if let Err(e) = &r {
            tracing::debug!(dir = %self.dir.display(), error = %e, "segment log write failed; refusing further writes until rolled back to the last sync");
            self.poisoned = true;
        }
        r
    }

    /// Lowest lsn that may still be in the log (the first segment's first lsn). Records
    /// below it were trimmed; above it there may be gaps left by quarantined damage.
    pub fn first_lsn(&self) -> Lsn {
        self.closed
            .front()
            .map(|s| s.first_lsn)
            .unwrap_or(self.active.first_lsn)
    }

    /// Lsn the next append gets.
    pub fn next_lsn(&self) -> Lsn {
        self.next_lsn
    }

    /// `next_lsn` as of the last successful sync (explicit or by a segment roll): every
    /// record below it is durable.
    pub fn synced_lsn(&self) -> Lsn {
        self.synced_lsn
    }

    /// Directory the log lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The segments in lsn order, the active one last, as far as records are synced or
    /// appended.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        self.closed
            .iter()
            .chain(std::iter::once(&self.active))
            .map(|s| SegmentInfo {
                first_lsn: s.first_lsn,
                end_lsn: s.end_lsn,
                payload_tag: s.tag,
            })
            .collect()
    }

    /// Number of segment files, including the active one.
    pub fn segment_count(&self) -> usize {
        self.closed.len() + 1
    }

    /// Deletes every closed segment whose records all have lsn < `lsn`, oldest first, and
    /// returns the bytes freed. Cheap: no rewriting, and the deletions become durable with
    /// the next sync (a deletion lost in a crash only brings back records below `lsn`).
    ///
    /// The active segment is never deleted, with one exception that lets a drained log give
    /// its disk back: when `lsn >= next_lsn` (everything is trimmed) and the active segment
    /// holds at least a quarter of `segment_bytes`, the log first rolls to a fresh segment
    /// (one sync) and then deletes the old one.
    pub fn trim_before(&mut self, lsn: Lsn) -> Result<u64, LogError> {
        self.check_poisoned()?;
        if lsn >= self.next_lsn
            && self.active.end_lsn > self.active.first_lsn
            && self.active.bytes - HEADER_LEN >= self.cfg.segment_bytes / 4
        {
            let r = self.roll();
            self.poison_on_err(r)?;
        }
        let mut freed = 0;
        while let Some(front) = self.closed.front() {
            if front.end_lsn > lsn {
                break;
            }
            match fs::remove_file(&front.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("delete trimmed segment", &front.path)(e)),
            }
            freed += front.bytes;
            self.dir_dirty = true;
            self.closed.pop_front();
        }
        Ok(freed)
    }

    /// The lsn just past the oldest closed segment, if there is one: `trim_before` of it drops
    /// exactly that segment (how the outbox drops its oldest data at the disk quota).
    pub fn oldest_segment_end(&self) -> Option<Lsn> {
        self.closed.front().map(|s| s.end_lsn)
    }

    /// Frame bytes of the records appended since the log was opened (padding excluded).
    pub fn appended_bytes(&self) -> u64 {
        self.appended_bytes
    }

    /// Bytes left before the next append would cross a page boundary of the active segment
    /// (a whole page when it ends on one): with [`LogConfig::pad_syncs`], what a group of
    /// records may take to be written in one page write.
    pub fn page_room(&self) -> u64 {
        PAGE - self.active.bytes % PAGE
    }

    /// Sum of the segment files' sizes (the active one's including still-buffered bytes):
    /// what the log costs against the disk quota.
    pub fn disk_bytes(&self) -> u64 {
        self.closed.iter().map(|s| s.bytes).sum::<u64>() + self.active.bytes
    }

    /// Test aid: drops the log as a power cut would, losing everything after the last
    /// sync (buffered bytes are discarded and the active file is cut back to its synced
    /// length).
    #[doc(hidden)]
    pub fn simulate_power_loss(self) -> Result<(), LogError> {
        let SegmentLog {
            writer,
            active,
            active_synced_bytes,
            ..
        } = self;
        let (file, _discarded) = writer.into_parts();
        file.set_len(active_synced_bytes)
            .map_err(io_err("truncate", &active.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::seglog::testkit::*;

    #[test]
    fn records_survive_reopen_across_many_segments() {
        let tmp = tempfile::tempdir().unwrap();
        write_records(tmp.path(), 512, 1000);
        assert!(
            segment_files(tmp.path()).len() > 20,
            "small segments must roll"
        );

        let (mut log, rec) = SegmentLog::open(tmp.path(), cfg(512)).unwrap();
        assert!(!rec.repaired());
        assert_eq!((rec.records, rec.first_lsn, rec.next_lsn), (1000, 0, 1000));
        let all = read_all(&log, 0);
        assert_eq!(all.len(), 1000);
        for (lsn, data) in &all {
            assert_eq!(data, &payload(*lsn));
        }
        assert_eq!(read_all(&log, 777), all[777..].to_vec());
        assert!(read_all(&log, 1000).is_empty());

        assert_eq!(log.append(b"more").unwrap(), 1000);
        log.sync().unwrap();
        assert_eq!(read_all(&log, 1000), vec![(1000, b"more".to_vec())]);
        assert!(verify(tmp.path()).unwrap().is_clean());
    }

    #[test]
    fn trim_before_deletes_only_whole_segments_below_the_lsn() {
        let tmp = tempfile::tempdir().unwrap();
        write_records(tmp.path(), 1024, 500);
        let (mut log, _) = SegmentLog::open(tmp.path(), cfg(1024)).unwrap();
        let files = segment_files(tmp.path());
        let firsts: Vec<Lsn> = files
            .iter()
            .map(|p| parse_segment_name(&p.file_name().unwrap().to_string_lossy()).unwrap())
            .collect();
        let before = log.disk_bytes();
        assert_eq!(before, segment_bytes_on_disk(tmp.path()));

        // An lsn inside segment 3 frees segments 0..3 and nothing else.
        let cut = firsts[3] + 1;
        let freed = log.trim_before(cut).unwrap();
        assert!(freed > 0);
        assert_eq!(log.disk_bytes(), before - freed);
        assert_eq!(log.disk_bytes(), segment_bytes_on_disk(tmp.path()));
        assert_eq!(log.first_lsn(), firsts[3]);
        assert_eq!(segment_files(tmp.path()), files[3..].to_vec());
        let rest = read_all(&log, cut);
        assert_eq!(rest.first().unwrap().0, cut);
        assert_eq!(rest.len() as u64, 500 - cut);
        // Reading from below the first lsn starts at the first retained record.
        assert_eq!(read_all(&log, 0)[0].0, firsts[3]);
        // Trimming at a segment boundary frees exactly the segments below it.
        assert_eq!(log.trim_before(firsts[3]).unwrap(), 0);
        log.trim_before(firsts[5]).unwrap();
        assert_eq!(log.first_lsn(), firsts[5]);
        // Trimming everything leaves only the active segment (here rolled to a fresh one,
        // as the old active segment held over a quarter of segment_bytes).
        log.trim_before(u64::MAX).unwrap();
        assert_eq!(log.segment_count(), 1);
        assert_eq!(
            segment_files(tmp.path()),
            vec![tmp.path().join(segment_file_name(500))]
        );
        log.sync().unwrap();
        drop(log);
        let (log, rec) = SegmentLog::open(tmp.path(), cfg(1024)).unwrap();
        assert_eq!(rec.next_lsn, 500);
        assert_eq!(log.first_lsn(), 500);
    }

    #[test]
    fn trimming_everything_gives_back_a_large_active_segment() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut log, _) = SegmentLog::open(tmp.path(), cfg(64 * 1024)).unwrap();
        for lsn in 0..500 {
            log.append(&payload(lsn)).unwrap();
        }
        log.sync().unwrap();
        assert_eq!(log.segment_count(), 1);
        let big = log.disk_bytes();
        assert!(big > 16 * 1024);
        let freed = log.trim_before(log.next_lsn()).unwrap();
        assert_eq!(freed, big);
        assert_eq!(log.disk_bytes(), HEADER_LEN);
        assert_eq!(log.append(b"next").unwrap(), 500);
    }

    #[test]
    fn churn_of_two_million_records_keeps_disk_bounded() {
        const SEGMENT: u64 = 1 << 20;
        const BOUND: u64 = 2 * SEGMENT + 512 * 1024;
        let tmp = tempfile::tempdir().unwrap();
        let (mut log, _) = SegmentLog::open(tmp.path(), cfg(SEGMENT)).unwrap();
        let record = [0xA5u8; 64];
        let mut peak = (0, 0, 0);
        for i in 1..=2_000_000u64 {
            log.append(&record).unwrap();
            if i.is_multiple_of(1_000) {
                log.sync().unwrap();
                log.trim_before(log.next_lsn().saturating_sub(10_000))
                    .unwrap();
                let (apparent, allocated) = dir_usage(tmp.path());
                peak = (
                    peak.0.max(log.disk_bytes()),
                    peak.1.max(apparent),
                    peak.2.max(allocated),
                );
                assert!(
                    log.disk_bytes() < BOUND && apparent < BOUND && allocated < BOUND + 64 * 1024,
                    "after {i} records: disk_bytes {} apparent {apparent} allocated {allocated}",
                    log.disk_bytes()
                );
            }
        }
        assert_eq!(log.next_lsn(), 2_000_000);
        assert!(log.segment_count() <= 3, "{} segments", log.segment_count());
        assert_eq!(read_all(&log, 1_990_000).len(), 10_000);
        eprintln!("peak disk_bytes/apparent/allocated: {peak:?}");
    }

    #[test]
    fn second_open_of_the_same_dir_is_locked() {
        let tmp = tempfile::tempdir().unwrap();
        let (log, _) = SegmentLog::open(tmp.path(), cfg(1024)).unwrap();
        let err = SegmentLog::open(tmp.path(), cfg(1024)).unwrap_err();
        assert!(matches!(err, LogError::Locked { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("another edgeferry process"), "{msg}");
        assert!(msg.contains(&tmp.path().display().to_string()), "{msg}");
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        drop(log);
        SegmentLog::open(tmp.path(), cfg(1024)).expect("lock is released on drop");
    }

    #[test]
    fn oversized_record_is_rejected_without_poisoning() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut log, _) = SegmentLog::open(tmp.path(), cfg(1024)).unwrap();
        let err = log.append(&[0u8; 4097]).unwrap_err();
        assert!(matches!(
            err,
            LogError::RecordTooLarge {
                len: 4097,
                max: 4096
            }
        ));
        assert_eq!(
            log.append(&[1u8; 4096]).unwrap(),
            0,
            "a max-size record fits, in a segment of its own"
        );
        assert_eq!(log.append(b"y").unwrap(), 1);
        log.sync().unwrap();
        assert_eq!(read_all(&log, 0)[0].1.len(), 4096);
    }

    #[test]
    fn io_errors_name_the_operation_and_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("plain-file");
        fs::write(&file, b"").unwrap();
        let err = SegmentLog::open(&file.join("log"), cfg(1024)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("cannot create directory"), "{msg}");
        assert!(msg.contains("plain-file"), "{msg}");
    }

    #[test]
    fn a_failed_write_is_rolled_back_to_the_last_sync_and_the_log_writes_again() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut log, _) = SegmentLog::open(tmp.path(), cfg(600)).unwrap();
        for i in 0..12 {
            log.append(&payload(i)).unwrap();
        }
        log.sync().unwrap();
        let synced = log.next_lsn();
        // A group that fails: appended (one roll to a new segment included), then the disk
        // "fills": a torn half record lands in the file and the log is poisoned.
        for i in 12..30 {
            log.append(&payload(i)).unwrap();
        }
        log.writer.flush().unwrap();
        log.writer.get_ref().write_all(&[0xAB; 7]).unwrap();
        log.poisoned = true;
        assert!(matches!(log.append(b"x"), Err(LogError::Poisoned { .. })));
        log.rollback_unsynced().unwrap();
        // The log is back at its last sync: the failed group is gone, nothing before it.
        let roll_synced = log.next_lsn();
        assert!(roll_synced >= synced, "a roll syncs what precedes it");
        assert_eq!(
            read_all(&log, 0)
                .iter()
                .map(|(l, _)| *l)
                .collect::<Vec<_>>(),
            (0..roll_synced).collect::<Vec<_>>()
        );
        // The same records are appended again, get the same lsns, and survive a reopen.
        for i in roll_synced..30 {
            assert_eq!(log.append(&payload(i)).unwrap(), i);
        }
        log.sync().unwrap();
        drop(log);
        let (log, rec) = SegmentLog::open(tmp.path(), cfg(600)).unwrap();
        assert!(!rec.repaired(), "nothing torn is left behind: {rec:?}");
        assert_eq!(
            read_all(&log, 0),
            (0..30).map(|i| (i, payload(i))).collect::<Vec<_>>()
        );
        assert!(verify(tmp.path()).unwrap().is_clean());
    }

    #[test]
    fn a_segment_left_half_created_by_a_failed_roll_is_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut log, _) = SegmentLog::open(tmp.path(), cfg(1 << 20)).unwrap();
        log.append(b"one").unwrap();
        log.sync().unwrap();
        // A roll that created the next segment's file and then failed.
        let stray = tmp.path().join(segment_file_name(log.next_lsn()));
        fs::write(&stray, b"EFL").unwrap();
        log.poisoned = true;
        log.rollback_unsynced().unwrap();
        assert!(!stray.exists());
        log.append(b"two").unwrap();
        log.sync().unwrap();
        drop(log);
        let (log, rec) = SegmentLog::open(tmp.path(), cfg(1 << 20)).unwrap();
        assert!(!rec.repaired(), "{rec:?}");
        assert_eq!(read_all(&log, 0).len(), 2);
    }

    #[test]
    fn simulated_power_loss_keeps_exactly_the_synced_records() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut log, _) = SegmentLog::open(tmp.path(), cfg(1 << 20)).unwrap();
        for lsn in 0..10 {
            log.append(&payload(lsn)).unwrap();
        }
        log.sync().unwrap();
        for lsn in 10..20 {
            log.append(&payload(lsn)).unwrap();
        }
        log.simulate_power_loss().unwrap();
        let (log, rec) = SegmentLog::open(tmp.path(), cfg(1 << 20)).unwrap();
        assert_eq!(rec.next_lsn, 10);
        assert_eq!(read_all(&log, 0).len(), 10);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append(Vec<u8>),
        Sync,
        Trim(u16),
        Crash,
        Read(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => proptest::collection::vec(any::<u8>(), 0..48).prop_map(Op::Append),
            2 => Just(Op::Sync),
            1 => any::<u16>().prop_map(Op::Trim),
            1 => Just(Op::Crash),
            2 => any::<u16>().prop_map(Op::Read),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// The log against a trivially correct model: a queue of (lsn, bytes) and a synced
        /// watermark. A crash (power loss) keeps exactly the synced records.
        #[test]
        fn log_behaves_like_an_in_memory_model(
            ops in proptest::collection::vec(op(), 1..120),
            pad_syncs in any::<bool>(),
        ) {
            let tmp = tempfile::tempdir().unwrap();
            // With padding every sync ends a page, past the segment size: each sync after
            // an append also rolls, which the model must not notice either.
            let c = LogConfig { pad_syncs, ..cfg(160) };
            let (mut log, _) = SegmentLog::open(tmp.path(), c.clone()).unwrap();
            let mut model: VecDeque<(Lsn, Vec<u8>)> = VecDeque::new();
            let mut next: Lsn = 0;
            let mut synced: Lsn = 0;
            for op in ops {
                match op {
                    Op::Append(data) => {
                        prop_assert_eq!(log.append(&data).unwrap(), next);
                        model.push_back((next, data));
                        next += 1;
                    }
                    Op::Sync => {
                        log.sync().unwrap();
                        synced = next;
                        prop_assert_eq!(log.synced_lsn(), next);
                    }
                    Op::Trim(x) => {
                        let lsn = u64::from(x) % (next + 2);
                        let first_before = log.first_lsn();
                        log.trim_before(lsn).unwrap();
                        let first = log.first_lsn();
                        prop_assert!(first >= first_before);
                        prop_assert!(first == first_before || first <= lsn.max(log.next_lsn()),
                            "trim_before({}) moved first_lsn to {}", lsn, first);
                        while model.front().is_some_and(|r| r.0 < first) {
                            model.pop_front();
                        }
                    }
                    Op::Crash => {
                        // Rolling a segment syncs, so the log may be ahead of the model's
                        // explicit syncs, never behind.
                        let durable = log.synced_lsn();
                        prop_assert!(durable >= synced && durable <= next);
                        let first = log.first_lsn();
                        log.simulate_power_loss().unwrap();
                        let (l, rec) = SegmentLog::open(tmp.path(), c.clone()).unwrap();
                        log = l;
                        prop_assert!(!rec.repaired(), "{:?}", rec);
                        prop_assert_eq!(rec.next_lsn, durable);
                        prop_assert_eq!(log.first_lsn(), first);
                        while model.back().is_some_and(|r| r.0 >= durable) {
                            model.pop_back();
                        }
                        next = durable;
                        synced = durable;
                    }
                    Op::Read(x) => {
                        let from = u64::from(x) % (next + 2);
                        let limit = log.synced_lsn();
                        prop_assert!(limit >= synced && limit <= next);
                        let got = read_all(&log, from);
                        let want: Vec<_> = model
                            .iter()
                            .filter(|r| r.0 >= from && r.0 < limit)
                            .cloned()
                            .collect();
                        prop_assert_eq!(got, want);
                    }
                }
                prop_assert_eq!(log.next_lsn(), next);
            }
            log.sync().unwrap();
            prop_assert_eq!(read_all(&log, 0), model.iter().cloned().collect::<Vec<_>>());
            prop_assert_eq!(log.disk_bytes(), segment_bytes_on_disk(tmp.path()));
            drop(log);
            prop_assert!(verify(tmp.path()).unwrap().is_clean());
        }
    }
}
