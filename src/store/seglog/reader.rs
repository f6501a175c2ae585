//! Reading the synced records in order, beside the writer.

use super::error::{LogError, io_err};
use super::format::*;
use super::log::SegmentLog;
use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::PathBuf;

impl SegmentLog {
    /// Iterates the records with lsn >= `from` that were synced when this was called, in
    /// order, across segments, skipping gaps. Uses its own file handles, so the writer can
    /// keep appending (and syncing) meanwhile; if a segment is trimmed before the reader
    /// opens it, the reader yields [`LogError::Trimmed`].
    pub fn read_from(&self, from: Lsn) -> Result<LogReader, LogError> {
        let limit = self.synced_lsn;
        let segments = self
            .closed
            .iter()
            .chain(std::iter::once(&self.active))
            .filter_map(|s| {
                let end = s.end_lsn.min(limit);
                (end > from.max(s.first_lsn)).then(|| SegSnap {
                    path: s.path.clone(),
                    first_lsn: s.first_lsn,
                    end_lsn: end,
                })
            })
            .collect();
        Ok(LogReader {
            segments,
            from,
            cur: None,
            buf: Vec::new(),
            done: false,
        })
    }
}

#[derive(Debug)]
pub(super) struct SegSnap {
    pub(super) path: PathBuf,
    pub(super) first_lsn: Lsn,
    pub(super) end_lsn: Lsn,
}

pub(super) struct Cursor {
    pub(super) r: BufReader<File>,
    pub(super) path: PathBuf,
    pub(super) pos: u64,
    pub(super) file_len: u64,
    pub(super) next: Lsn,
    pub(super) end: Lsn,
}

/// Iterator over synced records, created by [`SegmentLog::read_from`]. Stops after the
/// first error.
pub struct LogReader {
    segments: VecDeque<SegSnap>,
    from: Lsn,
    cur: Option<Cursor>,
    buf: Vec<u8>,
    done: bool,
}

impl fmt::Debug for LogReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogReader")
            .field("from", &self.from)
            .field("segments_left", &self.segments.len())
            .finish()
    }
}

impl LogReader {
    pub(super) fn open_segment(&mut self, seg: SegSnap) -> Result<Cursor, LogError> {
        let file = match File::open(&seg.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(LogError::Trimmed {
                    lsn: seg.first_lsn.max(self.from),
                });
            }
            Err(e) => return Err(io_err("open segment", &seg.path)(e)),
        };
        let file_len = file
            .metadata()
            .map_err(io_err("stat segment", &seg.path))?
            .len();
        let mut r = BufReader::with_capacity(READ_BUFFER, file);
        let mut h = [0u8; HEADER_LEN as usize];
        let corrupt = |damage| LogError::Corrupt {
            path: seg.path.clone(),
            offset: 0,
            damage,
        };
        r.read_exact(&mut h).map_err(|e| corrupt(read_damage(e)))?;
        decode_header(&h, seg.first_lsn).map_err(corrupt)?;
        Ok(Cursor {
            r,
            path: seg.path,
            pos: HEADER_LEN,
            file_len,
            next: seg.first_lsn,
            end: seg.end_lsn,
        })
    }

    pub(super) fn step(&mut self) -> Option<Result<(Lsn, Vec<u8>), LogError>> {
        loop {
            let cur = match &mut self.cur {
                Some(c) if c.next < c.end => c,
                _ => {
                    let seg = self.segments.pop_front()?;
                    match self.open_segment(seg) {
                        Ok(c) => self.cur = Some(c),
                        Err(e) => return Some(Err(e)),
                    }
                    continue;
                }
            };
            let want = cur.next >= self.from;
            let remaining = cur.file_len.saturating_sub(cur.pos);
            match read_frame(&mut cur.r, remaining, cur.next, &mut self.buf, want) {
                Ok(Some(Frame::Pad(n))) => cur.pos += n,
                Ok(Some(Frame::Record(n))) => {
                    let lsn = cur.next;
                    cur.pos += n;
                    cur.next += 1;
                    if want {
                        return Some(Ok((lsn, std::mem::take(&mut self.buf))));
                    }
                }
                Ok(None) => {
                    return Some(Err(LogError::Corrupt {
                        path: cur.path.clone(),
                        offset: cur.pos,
                        damage: Damage::TornFrame,
                    }));
                }
                Err(damage) => {
                    return Some(Err(LogError::Corrupt {
                        path: cur.path.clone(),
                        offset: cur.pos,
                        damage,
                    }));
                }
            }
        }
    }
}

impl Iterator for LogReader {
    type Item = Result<(Lsn, Vec<u8>), LogError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let item = self.step();
        if !matches!(item, Some(Ok(_))) {
            self.done = true;
            self.cur = None;
        }
        item
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::seglog::testkit::*;

    #[test]
    fn reader_sees_only_synced_records_and_does_not_disturb_the_writer() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut log, _) = SegmentLog::open(tmp.path(), cfg(256)).unwrap();
        for lsn in 0..10 {
            log.append(&payload(lsn)).unwrap();
        }
        log.sync().unwrap();
        log.append(b"unsynced").unwrap();
        let mut reader = log.read_from(0).unwrap();
        let first = reader.next().unwrap().unwrap();
        assert_eq!(first, (0, payload(0)));
        // The writer keeps going, rolling segments, while the reader is half way.
        for lsn in 11..100 {
            log.append(&payload(lsn)).unwrap();
        }
        log.sync().unwrap();
        let rest: Vec<_> = reader.map(|r| r.unwrap().0).collect();
        assert_eq!(rest, (1..10).collect::<Vec<_>>());
        assert_eq!(read_all(&log, 95).len(), 5);
    }
}
