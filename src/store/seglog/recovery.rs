//! Recovery at open: scanning every segment, truncating a torn tail, moving damage into
//! quarantine, and keeping lsns monotonic.

use super::error::{LogError, io_err};
use super::files::*;
use super::format::*;
use super::log::{LogConfig, SegMeta, SegmentLog};
use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// What [`SegmentLog::open`] found and repaired.
#[derive(Debug, Default, Clone)]
pub struct Recovery {
    /// Segment files in use after recovery (including the active one).
    pub segments: usize,
    /// Valid records kept over all segments (in a damaged segment, only those before the
    /// damage).
    pub records: u64,
    /// Bytes cut from the end of the last segment (a torn, never-synced tail).
    pub truncated_bytes: u64,
    /// Files written or moved into `quarantine/`.
    pub quarantined: Vec<PathBuf>,
    /// Bytes moved or copied into `quarantine/`.
    pub quarantined_bytes: u64,
    /// Lowest lsn that may still be present.
    pub first_lsn: Lsn,
    /// Lsn the next append gets.
    pub next_lsn: Lsn,
}

impl Recovery {
    /// True when recovery had to discard or quarantine anything.
    pub fn repaired(&self) -> bool {
        self.truncated_bytes > 0 || !self.quarantined.is_empty()
    }
}

/// Result of checking one segment file completely.
pub(super) struct Scan {
    /// Header is valid (if not, `damage` is at offset 0 and nothing else is valid).
    pub(super) header_ok: bool,
    /// The header's payload tag (0 when the header is bad).
    pub(super) tag: u8,
    /// The header's frame format is 2 (padding frames).
    pub(super) padded: bool,
    pub(super) records: u64,
    /// Offset just past the last valid frame (or the header).
    pub(super) valid_end: u64,
    pub(super) damage: Option<(u64, Damage)>,
}

pub(super) fn scan_segment(file: &File, file_len: u64, name_lsn: Lsn) -> Scan {
    let bad_header = |d| Scan {
        header_ok: false,
        tag: 0,
        padded: false,
        records: 0,
        valid_end: 0,
        damage: Some((0, d)),
    };
    if file_len < HEADER_LEN {
        return bad_header(Damage::ShortHeader { len: file_len });
    }
    let mut f = file;
    if let Err(e) = f.seek(SeekFrom::Start(0)) {
        return bad_header(Damage::ReadError(e.to_string()));
    }
    let mut r = BufReader::with_capacity(READ_BUFFER, f);
    let mut h = [0u8; HEADER_LEN as usize];
    if let Err(e) = r.read_exact(&mut h) {
        return bad_header(read_damage(e));
    }
    let header = match decode_header(&h, name_lsn) {
        Ok(header) => header,
        Err(d) => return bad_header(d),
    };
    let first = header.first_lsn;
    let mut pos = HEADER_LEN;
    let mut expected = first;
    let mut buf = Vec::new();
    let mut damage = None;
    loop {
        match read_frame(&mut r, file_len - pos, expected, &mut buf, true) {
            Ok(None) => break,
            Ok(Some(Frame::Record(n))) => {
                pos += n;
                expected += 1;
            }
            Ok(Some(Frame::Pad(n))) => pos += n,
            Err(d) => {
                damage = Some((pos, d));
                break;
            }
        }
    }
    Scan {
        header_ok: true,
        tag: header.tag,
        padded: header.padded,
        records: expected - first,
        valid_end: pos,
        damage,
    }
}

/// Whether a complete frame with a valid checksum and an lsn in `expected..` starts anywhere
/// in `file[from + 1..file_len)`. Tells damage inside written data (records follow it) from a
/// torn tail (nothing valid does: writes are sequential). Reads sequentially in chunks and
/// checksums only candidates whose lsn field is plausible, so garbage costs one pass.
pub(super) fn valid_frame_after(file: &File, from: u64, file_len: u64, expected: Lsn) -> bool {
    use std::os::unix::fs::FileExt;
    const CHUNK: u64 = 1 << 20;
    let max_lsn = expected.saturating_add(file_len.saturating_sub(from) / FRAME_OVERHEAD);
    let mut buf = vec![0u8; (CHUNK + FRAME_OVERHEAD) as usize];
    let mut scratch = vec![0u8; READ_BUFFER];
    let mut base = from + 1;
    while base + FRAME_OVERHEAD <= file_len {
        let want = (file_len - base).min(CHUNK + FRAME_OVERHEAD) as usize;
        if file.read_exact_at(&mut buf[..want], base).is_err() {
            return false;
        }
        let starts = (want as u64 - FRAME_OVERHEAD + 1).min(CHUNK) as usize;
        for i in 0..starts {
            let h = &buf[i..i + FRAME_OVERHEAD as usize];
            let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as u64;
            let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
            let lsn = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
            let at = base + i as u64;
            if lsn < expected || lsn > max_lsn || len > file_len - at - FRAME_OVERHEAD {
                continue;
            }
            let mut hasher = crc32fast::Hasher::new();
            hasher.update(&lsn.to_le_bytes());
            let mut pos = at + FRAME_OVERHEAD;
            let end = pos + len;
            let mut ok = true;
            while pos < end {
                let n = (end - pos).min(scratch.len() as u64) as usize;
                if file.read_exact_at(&mut scratch[..n], pos).is_err() {
                    ok = false;
                    break;
                }
                hasher.update(&scratch[..n]);
                pos += n as u64;
            }
            if ok && hasher.finalize() == crc {
                return true;
            }
        }
        base += CHUNK;
    }
    false
}

/// Picks a free name `quarantine/<file name>-<stamp>[.n].bad`.
pub(super) fn quarantine_target(dir: &Path, seg: &Path, stamp: u64) -> Result<PathBuf, LogError> {
    let qdir = dir.join(QUARANTINE_DIR);
    fs::create_dir_all(&qdir).map_err(io_err("create directory", &qdir))?;
    let name = seg
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut n = 0u32;
    loop {
        let candidate = if n == 0 {
            qdir.join(format!("{name}-{stamp}.bad"))
        } else {
            qdir.join(format!("{name}-{stamp}.{n}.bad"))
        };
        if !candidate.exists() {
            return Ok(candidate);
        }
        n += 1;
    }
}

/// Moves a whole segment file into quarantine (a rename: same file system, atomic).
pub(super) fn quarantine_whole(dir: &Path, seg: &Path, stamp: u64) -> Result<PathBuf, LogError> {
    let target = quarantine_target(dir, seg, stamp)?;
    fs::rename(seg, &target).map_err(io_err("move into quarantine", seg))?;
    sync_dir(&dir.join(QUARANTINE_DIR))?;
    Ok(target)
}

/// Copies `file[from..to]` into a new quarantine file and syncs it. Returns None (after
/// logging) when that is impossible: recovery goes on without the copy.
pub(super) fn quarantine_tail(
    dir: &Path,
    seg: &Path,
    file: &File,
    from: u64,
    to: u64,
    stamp: u64,
) -> Option<PathBuf> {
    let attempt = || -> Result<PathBuf, LogError> {
        let target = quarantine_target(dir, seg, stamp)?;
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&target)
            .map_err(io_err("create quarantine file", &target))?;
        let mut src = file;
        src.seek(SeekFrom::Start(from))
            .map_err(io_err("seek in", seg))?;
        let copied = io::copy(&mut src.take(to - from), &mut out)
            .map_err(io_err("copy damaged bytes to quarantine from", seg))?;
        if copied != to - from {
            tracing::warn!(segment = %seg.display(), copied, expected = to - from, "segment shrank while quarantining its damaged tail");
        }
        out.sync_all().map_err(io_err("fsync", &target))?;
        sync_dir(&dir.join(QUARANTINE_DIR))?;
        Ok(target)
    };
    match attempt() {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::error!(segment = %seg.display(), error = %e, "could not save damaged segment bytes to quarantine; discarding them");
            None
        }
    }
}

impl SegmentLog {
    /// Opens (creating if needed) the log in `dir`, takes its lock and runs recovery
    /// (module docs). Damage is repaired and reported in [`Recovery`], never returned as an
    /// error; errors are I/O failures that prevent using the directory at all, and
    /// [`LogError::Locked`].
    pub fn open(dir: &Path, cfg: LogConfig) -> Result<(SegmentLog, Recovery), LogError> {
        let mut cfg = cfg;
        cfg.max_record = cfg.max_record.min(u32::MAX as usize);
        fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        let lock = acquire_lock(dir)?;
        let (names, _ignored) = list_segments(dir)?;
        let stamp = crate::clock::now_secs();
        let mut rec = Recovery::default();
        let mut kept: VecDeque<SegMeta> = VecDeque::new();
        // Lsns below `floor` may have been issued by a file that went into quarantine whole.
        let mut floor: Lsn = 0;
        let mut dir_changed = false;
        // A last segment shorter than a header gets a fresh header instead of a scan.
        let mut rewrite_header: Option<Lsn> = None;

        for (i, (name_lsn, path)) in names.iter().enumerate() {
            let name_lsn = *name_lsn;
            let is_last = i + 1 == names.len();
            let next_name = names.get(i + 1).map(|n| n.0);
            let prev_end = kept.back().map(|s| s.end_lsn).unwrap_or(0);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(io_err("open segment", path))?;
            let file_len = file.metadata().map_err(io_err("stat segment", path))?.len();

            if file_len < HEADER_LEN && is_last && name_lsn >= prev_end {
                // Crash while rolling: the file was created but its header never made it.
                if file_len > 0 {
                    tracing::warn!(segment = %path.display(), bytes = file_len, "segment header torn by a crash; rewriting it");
                }
                rec.truncated_bytes += file_len;
                rewrite_header = Some(name_lsn);
                kept.push_back(SegMeta {
                    path: path.clone(),
                    first_lsn: name_lsn,
                    end_lsn: name_lsn,
                    bytes: HEADER_LEN,
                    tag: cfg.payload_tag,
                    padded: cfg.pad_syncs,
                });
                continue;
            }
            if file_len == 0 {
                tracing::info!(segment = %path.display(), "removing empty segment file");
                drop(file);
                fs::remove_file(path).map_err(io_err("remove empty segment", path))?;
                dir_changed = true;
                continue;
            }

            let scan = scan_segment(&file, file_len, name_lsn);
            let header_damage = if !scan.header_ok {
                scan.damage.clone().map(|d| d.1)
            } else if name_lsn < prev_end {
                Some(Damage::Overlap {
                    first: name_lsn,
                    previous_end: prev_end,
                })
            } else {
                None
            };
            if let Some(damage) = header_damage {
                drop(file);
                let target = quarantine_whole(dir, path, stamp)?;
                dir_changed = true;
                // Every lsn this file could have held, capped by the next segment's start
                // (which the writer only ever creates past its predecessor's records).
                let mut ceiling = name_lsn + file_len.saturating_sub(HEADER_LEN) / FRAME_OVERHEAD;
                if let Some(n) = next_name {
                    ceiling = ceiling.min(n);
                }
                floor = floor.max(ceiling);
                tracing::error!(
                    segment = %path.display(),
                    quarantined = %target.display(),
                    bytes = file_len,
                    %damage,
                    "segment header is unusable; moved the whole file to quarantine and continuing without it"
                );
                rec.quarantined_bytes += file_len;
                rec.quarantined.push(target);
                continue;
            }

            if let Some((offset, damage)) = scan.damage {
                let bad = file_len - scan.valid_end;
                let end_lsn = name_lsn + scan.records;
                let torn_tail =
                    is_last && !valid_frame_after(&file, scan.valid_end, file_len, end_lsn);
                if torn_tail {
                    tracing::warn!(
                        segment = %path.display(),
                        offset,
                        bytes = bad,
                        %damage,
                        "truncating the unsynced tail of the last segment (torn by a crash)"
                    );
                    rec.truncated_bytes += bad;
                } else {
                    let target = quarantine_tail(dir, path, &file, scan.valid_end, file_len, stamp);
                    tracing::error!(
                        segment = %path.display(),
                        offset,
                        bytes = bad,
                        kept_records = scan.records,
                        quarantined = ?target,
                        %damage,
                        "damaged segment: kept its valid prefix, moved the rest to quarantine; records after the damage in this segment are lost"
                    );
                    rec.quarantined_bytes += bad;
                    rec.quarantined.extend(target);
                    if is_last {
                        // Records after the damage were written (and maybe seen): never
                        // reissue their lsns.
                        floor = floor.max(end_lsn + bad / FRAME_OVERHEAD);
                    }
                }
                file.set_len(scan.valid_end)
                    .map_err(io_err("truncate damaged segment", path))?;
                file.sync_all().map_err(io_err("fsync", path))?;
            }
            rec.records += scan.records;
            kept.push_back(SegMeta {
                path: path.clone(),
                first_lsn: name_lsn,
                end_lsn: name_lsn + scan.records,
                bytes: scan.valid_end,
                tag: scan.tag,
                padded: scan.padded,
            });
        }

        let last_end = kept.back().map(|s| s.end_lsn).unwrap_or(0);
        let next_lsn = last_end.max(floor);
        let (active, file) = match kept.pop_back() {
            // The last segment goes on being appended to, unless its payloads are encoded
            // otherwise than this log's user now writes them, or its frame format is not
            // the one this log writes (an upgrade): then it is closed as it is and a new
            // segment starts, so no segment mixes two encodings or two frame formats.
            Some(last)
                if last.end_lsn == next_lsn
                    && ((last.tag == cfg.payload_tag && last.padded == cfg.pad_syncs)
                        || last.end_lsn == last.first_lsn) =>
            {
                let mut last = last;
                let mut file = OpenOptions::new()
                    .write(true)
                    .open(&last.path)
                    .map_err(io_err("open segment", &last.path))?;
                if rewrite_header == Some(last.first_lsn)
                    || last.tag != cfg.payload_tag
                    || last.padded != cfg.pad_syncs
                {
                    file.set_len(0)
                        .map_err(io_err("truncate torn segment", &last.path))?;
                    file.write_all(&encode_header(
                        last.first_lsn,
                        cfg.payload_tag,
                        cfg.pad_syncs,
                    ))
                    .map_err(io_err("write header of", &last.path))?;
                    file.sync_data().map_err(io_err("fdatasync", &last.path))?;
                    last.tag = cfg.payload_tag;
                    last.padded = cfg.pad_syncs;
                    last.bytes = HEADER_LEN;
                }
                file.seek(SeekFrom::Start(last.bytes))
                    .map_err(io_err("seek in", &last.path))?;
                (last, file)
            }
            other => {
                if let Some(last) = other {
                    if rewrite_header == Some(last.first_lsn) {
                        // A header-less file below the next lsn carries nothing: drop it.
                        fs::remove_file(&last.path)
                            .map_err(io_err("remove empty segment", &last.path))?;
                    } else {
                        kept.push_back(last);
                    }
                }
                let path = dir.join(segment_file_name(next_lsn));
                let file = create_segment(&path, next_lsn, cfg.payload_tag, cfg.pad_syncs)?;
                dir_changed = true;
                (
                    SegMeta {
                        path,
                        first_lsn: next_lsn,
                        end_lsn: next_lsn,
                        bytes: HEADER_LEN,
                        tag: cfg.payload_tag,
                        padded: cfg.pad_syncs,
                    },
                    file,
                )
            }
        };
        if dir_changed {
            sync_dir(dir)?;
        }

        let log = SegmentLog {
            dir: dir.to_path_buf(),
            cfg,
            _lock: lock,
            active_synced_bytes: active.bytes,
            closed: kept,
            active,
            writer: BufWriter::with_capacity(WRITE_BUFFER, file),
            next_lsn,
            synced_lsn: next_lsn,
            dir_dirty: false,
            poisoned: false,
            appended_bytes: 0,
        };
        rec.segments = log.closed.len() + 1;
        rec.first_lsn = log.first_lsn();
        rec.next_lsn = next_lsn;
        if rec.repaired() {
            tracing::warn!(dir = %dir.display(), ?rec, "segment log recovered with repairs");
        } else {
            tracing::debug!(dir = %dir.display(), ?rec, "segment log opened");
        }
        Ok((log, rec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::seglog::testkit::*;

    #[test]
    fn a_log_opened_with_another_payload_tag_starts_a_segment_of_its_own() {
        let tmp = tempfile::tempdir().unwrap();
        let old = cfg(1 << 20);
        let new = LogConfig {
            payload_tag: 1,
            ..old.clone()
        };
        {
            let (mut log, _) = SegmentLog::open(tmp.path(), old.clone()).unwrap();
            log.append(b"old").unwrap();
            log.sync().unwrap();
        }
        let (mut log, rec) = SegmentLog::open(tmp.path(), new.clone()).unwrap();
        assert!(!rec.repaired());
        assert_eq!(
            log.segments()
                .iter()
                .map(|s| (s.first_lsn, s.end_lsn, s.payload_tag))
                .collect::<Vec<_>>(),
            [(0, 1, 0), (1, 1, 1)],
            "the old segment is closed as it is, new records go to a segment with the new tag"
        );
        log.append(b"new").unwrap();
        log.sync().unwrap();
        drop(log);
        // Reopened with the same tag: appends continue in the tagged segment.
        let (log, _) = SegmentLog::open(tmp.path(), new).unwrap();
        assert_eq!(log.segments().len(), 2);
        assert_eq!(read_all(&log, 0).len(), 2);
        drop(log);
        // An empty active segment is simply re-tagged (no segment per restart).
        let tmp2 = tempfile::tempdir().unwrap();
        drop(SegmentLog::open(tmp2.path(), old.clone()).unwrap());
        let (log, _) = SegmentLog::open(
            tmp2.path(),
            LogConfig {
                payload_tag: 1,
                ..old
            },
        )
        .unwrap();
        assert_eq!(
            log.segments()
                .iter()
                .map(|s| s.payload_tag)
                .collect::<Vec<_>>(),
            [1]
        );
    }

    #[test]
    fn a_segment_with_a_payload_tag_this_build_does_not_know_is_quarantined_not_misread() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let (mut log, _) = SegmentLog::open(tmp.path(), cfg(1 << 20)).unwrap();
            log.append(b"x").unwrap();
            log.sync().unwrap();
        }
        let seg = segment_files(tmp.path()).remove(0);
        let mut bytes = fs::read(&seg).unwrap();
        bytes[7] = MAX_PAYLOAD_TAG + 1;
        let crc = crc32fast::hash(&bytes[0..16]);
        bytes[16..20].copy_from_slice(&crc.to_le_bytes());
        fs::write(&seg, &bytes).unwrap();
        let (log, rec) = SegmentLog::open(tmp.path(), cfg(1 << 20)).unwrap();
        assert_eq!(rec.quarantined.len(), 1);
        assert!(read_all(&log, 0).is_empty());
        assert!(log.next_lsn() >= 1, "its lsns are never issued again");
    }

    fn padded() -> LogConfig {
        LogConfig {
            pad_syncs: true,
            ..cfg(1 << 20)
        }
    }

    fn frame_format(seg: &Path) -> u8 {
        fs::read(seg).unwrap()[6]
    }

    #[test]
    fn padded_syncs_end_every_group_on_a_page_and_the_records_read_back_exactly() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut log, _) = SegmentLog::open(tmp.path(), padded()).unwrap();
        let seg = segment_files(tmp.path()).pop().unwrap();
        let mut want = Vec::new();
        let mut frames = 0;
        // Groups of 1 to 120 records of 0 to 90 bytes: some end inside their page, some
        // cross one or two page boundaries.
        for group in [1u64, 3, 40, 120, 7, 64, 1] {
            for _ in 0..group {
                let lsn = want.len() as u64;
                assert_eq!(log.append(&payload(lsn)).unwrap(), lsn);
                frames += FRAME_OVERHEAD + payload(lsn).len() as u64;
                want.push((lsn, payload(lsn)));
            }
            log.sync().unwrap();
            let len = fs::metadata(&seg).unwrap().len();
            assert!(
                len.is_multiple_of(PAGE) || PAGE - len % PAGE < FRAME_OVERHEAD,
                "a sync leaves the segment at a page boundary (or too close to one for a frame): {len} bytes"
            );
            assert_eq!(log.disk_bytes(), len, "padding counts as disk use");
            assert_eq!(log.page_room(), PAGE - len % PAGE);
        }
        assert_eq!(
            log.appended_bytes(),
            frames,
            "padding is not a record's bytes"
        );
        let len = fs::metadata(&seg).unwrap().len();
        log.sync().unwrap();
        assert_eq!(
            fs::metadata(&seg).unwrap().len(),
            len,
            "nothing new: no padding either"
        );
        assert_eq!(
            read_all(&log, 0),
            want,
            "padding is skipped, lsns stay contiguous"
        );
        assert_eq!(read_all(&log, 50), want[50..].to_vec());
        assert_eq!(frame_format(&seg), 2);
        drop(log);
        assert!(verify(tmp.path()).unwrap().is_clean());
        let (mut log, rec) = SegmentLog::open(tmp.path(), padded()).unwrap();
        assert!(!rec.repaired(), "{rec:?}");
        assert_eq!(rec.next_lsn, want.len() as u64);
        assert_eq!(log.append(b"after").unwrap(), want.len() as u64);
        log.sync().unwrap();
        assert_eq!(read_all(&log, 0).len(), want.len() + 1);
        assert_eq!(
            segment_files(tmp.path()).len(),
            1,
            "appends continue in the same segment"
        );
    }

    #[test]
    fn a_torn_or_damaged_padding_frame_is_treated_like_any_other_frame() {
        let tmp = tempfile::tempdir().unwrap();
        let seg;
        let records_end;
        {
            let (mut log, _) = SegmentLog::open(tmp.path(), padded()).unwrap();
            seg = segment_files(tmp.path()).pop().unwrap();
            for lsn in 0..10 {
                log.append(&payload(lsn)).unwrap();
            }
            log.sync().unwrap();
            for lsn in 10..20 {
                log.append(&payload(lsn)).unwrap();
            }
            records_end = log.disk_bytes();
            log.sync().unwrap();
        }
        // A crash while the second group's padding was being written: cut inside it.
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        f.set_len(records_end + 10).unwrap();
        drop(f);
        let (log, rec) = SegmentLog::open(tmp.path(), padded()).unwrap();
        assert_eq!(
            rec.truncated_bytes, 10,
            "the torn padding goes, like a torn record"
        );
        assert!(rec.quarantined.is_empty());
        assert_eq!(rec.next_lsn, 20);
        assert_eq!(read_all(&log, 0).len(), 20);
        drop(log);
        // A flipped byte inside the first group's padding, with records after it: damage
        // to synced data (the padding is checksummed like a record), not a torn tail.
        let mut bytes = fs::read(&seg).unwrap();
        bytes[PAGE as usize - 100] ^= 0x40;
        fs::write(&seg, &bytes).unwrap();
        let report = verify(tmp.path()).unwrap();
        let damage = report.segments[0].damage.as_ref().unwrap();
        assert!(!damage.torn_tail, "{report}");
        assert_eq!(report.segments[0].records, 10);
    }

    #[test]
    fn a_log_opened_with_the_other_frame_format_starts_a_segment_of_its_own() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let (mut log, _) = SegmentLog::open(tmp.path(), cfg(1 << 20)).unwrap();
            log.append(b"plain").unwrap();
            log.sync().unwrap();
        }
        {
            // An upgrade: the old segment is closed as it is.
            let (mut log, rec) = SegmentLog::open(tmp.path(), padded()).unwrap();
            assert!(!rec.repaired());
            log.append(b"padded").unwrap();
            log.sync().unwrap();
        }
        let segs = segment_files(tmp.path());
        assert_eq!(
            segs.iter().map(|s| frame_format(s)).collect::<Vec<_>>(),
            [1, 2]
        );
        // And back (a log user that stops padding): a third segment, format 1 again.
        let (log, _) = SegmentLog::open(tmp.path(), cfg(1 << 20)).unwrap();
        let segs = segment_files(tmp.path());
        assert_eq!(
            segs.iter().map(|s| frame_format(s)).collect::<Vec<_>>(),
            [1, 2, 1]
        );
        assert_eq!(
            read_all(&log, 0),
            vec![(0, b"plain".to_vec()), (1, b"padded".to_vec())]
        );
    }

    #[test]
    fn torn_tail_is_truncated_and_appends_continue() {
        let tmp = tempfile::tempdir().unwrap();
        write_records(tmp.path(), 1024, 100);
        let last = segment_files(tmp.path()).pop().unwrap();
        let len_before = fs::metadata(&last).unwrap().len();
        // A crash mid-write: half a frame header, then a frame whose payload is cut short.
        let mut f = OpenOptions::new().append(true).open(&last).unwrap();
        f.write_all(&[7, 0, 0]).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, 100, 0, 0, 0, 0, 0, 0, 0, 9, 9])
            .unwrap();
        drop(f);

        let torn = verify(tmp.path()).unwrap();
        assert!(
            torn.segments
                .last()
                .unwrap()
                .damage
                .as_ref()
                .unwrap()
                .torn_tail
        );
        let (mut log, rec) = SegmentLog::open(tmp.path(), cfg(1024)).unwrap();
        assert_eq!(rec.truncated_bytes, 21);
        assert!(rec.quarantined.is_empty());
        assert_eq!(rec.next_lsn, 100);
        assert_eq!(fs::metadata(&last).unwrap().len(), len_before);
        let all = read_all(&log, 0);
        assert_eq!(all.len(), 100);
        assert!(all.iter().all(|(lsn, d)| d == &payload(*lsn)));
        assert_eq!(log.append(b"after").unwrap(), 100);
        log.sync().unwrap();
        drop(log);
        let (log, rec) = SegmentLog::open(tmp.path(), cfg(1024)).unwrap();
        assert!(!rec.repaired());
        assert_eq!(read_all(&log, 100), vec![(100, b"after".to_vec())]);
    }

    #[test]
    fn zero_filled_tail_after_power_cut_is_truncated() {
        let tmp = tempfile::tempdir().unwrap();
        write_records(tmp.path(), 1 << 20, 50);
        let last = segment_files(tmp.path()).pop().unwrap();
        let mut f = OpenOptions::new().append(true).open(&last).unwrap();
        f.write_all(&[0u8; 4096]).unwrap();
        drop(f);
        let (log, rec) = SegmentLog::open(tmp.path(), cfg(1 << 20)).unwrap();
        assert_eq!(rec.truncated_bytes, 4096);
        assert_eq!(log.next_lsn(), 50);
    }

    #[test]
    fn flipped_byte_inside_the_last_segment_is_quarantined_and_lsns_are_never_reissued() {
        let tmp = tempfile::tempdir().unwrap();
        write_records(tmp.path(), 1 << 20, 200);
        let seg = segment_files(tmp.path()).pop().unwrap();
        let mut bytes = fs::read(&seg).unwrap();
        let len = bytes.len() as u64;
        let at = bytes.len() * 2 / 5;
        bytes[at] ^= 0x5A;
        fs::write(&seg, &bytes).unwrap();

        let report = verify(tmp.path()).unwrap();
        let d = report.segments[0].damage.clone().unwrap();
        assert!(!d.torn_tail, "valid records follow the damage: {d:?}");
        assert!(d.offset <= at as u64);

        let (mut log, rec) = SegmentLog::open(tmp.path(), cfg(1 << 20)).unwrap();
        assert_eq!(rec.truncated_bytes, 0);
        assert_eq!(rec.quarantined.len(), 1, "{rec:?}");
        assert_eq!(rec.quarantined_bytes, len - d.offset);
        assert_eq!(
            fs::read(&rec.quarantined[0]).unwrap(),
            &bytes[d.offset as usize..]
        );
        let kept = read_all(&log, 0);
        assert!(!kept.is_empty() && kept.len() < 200);
        assert!(kept.iter().all(|(lsn, p)| p == &payload(*lsn)));
        assert!(
            rec.next_lsn >= 200,
            "lsns of the lost records are not reused: {rec:?}"
        );
        assert!(log.append(b"after").unwrap() >= 200);
        log.sync().unwrap();
        drop(log);
        let (_, rec) = SegmentLog::open(tmp.path(), cfg(1 << 20)).unwrap();
        assert!(!rec.repaired());
        assert!(verify(tmp.path()).unwrap().is_clean());
    }

    #[test]
    fn flipped_byte_in_a_middle_segment_is_quarantined_and_later_segments_stay_readable() {
        let tmp = tempfile::tempdir().unwrap();
        write_records(tmp.path(), 1024, 300);
        let files = segment_files(tmp.path());
        assert!(files.len() >= 4);
        let victim = &files[1];
        let victim_first =
            parse_segment_name(&victim.file_name().unwrap().to_string_lossy()).unwrap();
        let next_first =
            parse_segment_name(&files[2].file_name().unwrap().to_string_lossy()).unwrap();
        let mut bytes = fs::read(victim).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        fs::write(victim, &bytes).unwrap();

        let (mut log, rec) = SegmentLog::open(tmp.path(), cfg(1024)).unwrap();
        assert_eq!(rec.quarantined.len(), 1);
        let q = &rec.quarantined[0];
        assert!(q.starts_with(tmp.path().join(QUARANTINE_DIR)));
        let kept = fs::metadata(victim).unwrap().len() as usize;
        assert!(kept <= mid, "the valid prefix ends before the flipped byte");
        assert_eq!(
            fs::read(q).unwrap(),
            bytes[kept..].to_vec(),
            "quarantine holds the damaged rest"
        );
        assert_eq!(rec.truncated_bytes, 0);

        let all = read_all(&log, 0);
        let lsns: Vec<Lsn> = all.iter().map(|r| r.0).collect();
        assert!(all.iter().all(|(lsn, d)| d == &payload(*lsn)));
        // Everything outside the victim is there; the victim keeps a prefix; then a gap.
        let lost: Vec<Lsn> = (0..300).filter(|l| !lsns.contains(l)).collect();
        assert!(!lost.is_empty());
        assert!(lost.iter().all(|l| (victim_first..next_first).contains(l)));
        assert_eq!(
            *lost.last().unwrap(),
            next_first - 1,
            "lost lsns are the victim's tail"
        );
        assert_eq!(log.append(b"x").unwrap(), 300);
        // Reading from inside the gap skips to the next segment.
        assert_eq!(read_all(&log, lost[0])[0].0, next_first);
        drop(log);
        let (_, rec) = SegmentLog::open(tmp.path(), cfg(1024)).unwrap();
        assert!(!rec.repaired(), "recovery is idempotent");
    }

    #[test]
    fn garbage_header_moves_whole_segment_to_quarantine() {
        let tmp = tempfile::tempdir().unwrap();
        write_records(tmp.path(), 1024, 300);
        let files = segment_files(tmp.path());
        let mut bytes = fs::read(&files[2]).unwrap();
        bytes[0..6].copy_from_slice(b"NOTLOG");
        fs::write(&files[2], &bytes).unwrap();

        let (log, rec) = SegmentLog::open(tmp.path(), cfg(1024)).unwrap();
        assert_eq!(rec.quarantined.len(), 1);
        assert!(!files[2].exists());
        assert_eq!(fs::read(&rec.quarantined[0]).unwrap(), bytes);
        assert_eq!(rec.next_lsn, 300);
        let all = read_all(&log, 0);
        assert!(all.iter().all(|(lsn, d)| d == &payload(*lsn)));
        assert_eq!(all.len() as u64, 300 - all_in(&files, 2));
    }

    /// Number of records in segment `i` of a clean log with 300 records (from file names).
    fn all_in(files: &[PathBuf], i: usize) -> u64 {
        let first =
            |p: &PathBuf| parse_segment_name(&p.file_name().unwrap().to_string_lossy()).unwrap();
        let end = files.get(i + 1).map(first).unwrap_or(300);
        end - first(&files[i])
    }

    #[test]
    fn lsn_stays_monotonic_when_the_last_segment_header_is_garbage() {
        let tmp = tempfile::tempdir().unwrap();
        write_records(tmp.path(), 1 << 20, 100);
        let last = segment_files(tmp.path()).pop().unwrap();
        let mut bytes = fs::read(&last).unwrap();
        bytes[3] ^= 1;
        fs::write(&last, &bytes).unwrap();
        let (mut log, rec) = SegmentLog::open(tmp.path(), cfg(1 << 20)).unwrap();
        assert_eq!(rec.quarantined.len(), 1);
        // Records 0..100 may have been seen by consumers: never hand out those lsns again.
        assert!(rec.next_lsn >= 100, "next lsn {} reuses lsns", rec.next_lsn);
        assert!(log.append(b"new").unwrap() >= 100);
    }

    #[test]
    fn empty_and_header_only_segments_are_fine() {
        let tmp = tempfile::tempdir().unwrap();
        write_records(tmp.path(), 1 << 20, 10);
        // A crash while rolling leaves a zero-length next segment.
        fs::write(tmp.path().join(segment_file_name(10)), b"").unwrap();
        let (mut log, rec) = SegmentLog::open(tmp.path(), cfg(1 << 20)).unwrap();
        assert!(!rec.repaired());
        assert_eq!(rec.next_lsn, 10);
        assert_eq!(
            fs::metadata(tmp.path().join(segment_file_name(10)))
                .unwrap()
                .len(),
            HEADER_LEN
        );
        log.append(b"ten").unwrap();
        log.sync().unwrap();
        drop(log);
        // A header torn half way is rewritten too.
        fs::write(
            tmp.path().join(segment_file_name(11)),
            &encode_header(11, 0, false)[..7],
        )
        .unwrap();
        let (log, rec) = SegmentLog::open(tmp.path(), cfg(1 << 20)).unwrap();
        assert_eq!(rec.truncated_bytes, 7);
        assert_eq!(rec.next_lsn, 11);
        assert_eq!(read_all(&log, 9).len(), 2);
        drop(log);
        // A fresh directory is a header-only segment.
        let fresh = tmp.path().join("fresh");
        let (log, rec) = SegmentLog::open(&fresh, cfg(1 << 20)).unwrap();
        assert_eq!((rec.first_lsn, rec.next_lsn, rec.segments), (0, 0, 1));
        assert_eq!(log.disk_bytes(), HEADER_LEN);
        assert!(read_all(&log, 0).is_empty());
    }

    #[test]
    fn non_segment_files_are_ignored() {
        let tmp = tempfile::tempdir().unwrap();
        write_records(tmp.path(), 1024, 50);
        fs::write(tmp.path().join("notes.txt"), b"hello").unwrap();
        fs::write(tmp.path().join("123.seg"), b"not a segment name").unwrap();
        fs::create_dir(tmp.path().join("00000000000000000099.seg")).unwrap();
        let (log, rec) = SegmentLog::open(tmp.path(), cfg(1024)).unwrap();
        assert!(!rec.repaired());
        assert_eq!(read_all(&log, 0).len(), 50);
        assert_eq!(verify(tmp.path()).unwrap().ignored.len(), 3);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Cutting and flipping bytes of any segment never makes open fail or panic; what
        /// comes back is the original data: all of every untouched segment, and a prefix of
        /// the damaged one. A second open finds nothing left to repair.
        #[test]
        fn damaged_segment_never_panics_and_yields_only_original_records(
            n in 1u64..120,
            victim in any::<proptest::sample::Index>(),
            cut in proptest::option::of(any::<proptest::sample::Index>()),
            flips in proptest::collection::vec((any::<proptest::sample::Index>(), 1u8..=255), 0..4),
        ) {
            let tmp = tempfile::tempdir().unwrap();
            let c = cfg(400);
            write_records(tmp.path(), 400, n);
            let files = segment_files(tmp.path());
            let firsts: Vec<Lsn> = files
                .iter()
                .map(|p| parse_segment_name(&p.file_name().unwrap().to_string_lossy()).unwrap())
                .collect();
            let v = victim.index(files.len());
            let mut bytes = fs::read(&files[v]).unwrap();
            if let Some(cut) = cut {
                bytes.truncate(cut.index(bytes.len() + 1));
            }
            for (at, x) in &flips {
                if !bytes.is_empty() {
                    let i = at.index(bytes.len());
                    bytes[i] ^= x;
                }
            }
            fs::write(&files[v], &bytes).unwrap();

            let (mut log, _rec) = SegmentLog::open(tmp.path(), c.clone()).unwrap();
            let got: BTreeMap<Lsn, Vec<u8>> = read_all(&log, 0).into_iter().collect();
            for (lsn, data) in &got {
                prop_assert!(*lsn < n);
                prop_assert_eq!(data, &payload(*lsn));
            }
            let victim_range = firsts[v]..firsts.get(v + 1).copied().unwrap_or(n);
            for lsn in 0..n {
                if !victim_range.contains(&lsn) {
                    prop_assert!(got.contains_key(&lsn), "lsn {} of an untouched segment lost", lsn);
                }
            }
            let kept = got.keys().filter(|l| victim_range.contains(l)).count() as u64;
            for lsn in victim_range.clone().take(kept as usize) {
                prop_assert!(got.contains_key(&lsn), "damaged segment kept no prefix");
            }
            let max_seen = got.keys().next_back().copied();
            let lsn = log.append(b"after").unwrap();
            prop_assert!(max_seen.is_none_or(|m| lsn > m));
            log.sync().unwrap();
            drop(log);
            let (log, rec) = SegmentLog::open(tmp.path(), c).unwrap();
            prop_assert!(!rec.repaired(), "{:?}", rec);
            prop_assert_eq!(read_all(&log, 0).len() as u64, got.len() as u64 + 1);
        }
    }
}
