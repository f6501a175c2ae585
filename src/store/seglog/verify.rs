//! The read-only check behind `edgeferry store verify`.

use super::error::{LogError, io_err};
use super::files::*;
use super::format::*;
use super::recovery::*;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Damaged stretch of a segment file found by [`verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamageReport {
    /// Byte offset where valid data ends.
    pub offset: u64,
    /// Bytes from `offset` to the end of the file.
    pub bytes: u64,
    /// What is wrong at `offset`.
    pub damage: Damage,
    /// True for a torn tail: the last segment, and no valid record anywhere after the damage
    /// (what a crash leaves; the next open cuts it). False: damage to written data, which the
    /// next open moves to `quarantine/`.
    pub torn_tail: bool,
}

/// One segment's findings in a [`VerifyReport`].
#[derive(Debug, Clone)]
pub struct SegmentReport {
    /// The segment file examined (its name carries its first lsn).
    pub path: PathBuf,
    /// Its size on disk in bytes, any damaged part included.
    pub file_bytes: u64,
    /// First lsn per the file name.
    pub first_lsn: Lsn,
    /// Valid records before any damage.
    pub records: u64,
    /// Lsn of the last valid record, if any.
    pub last_lsn: Option<Lsn>,
    /// Where valid data ends, if it ends before the file does. On the last segment of a
    /// log that was not closed cleanly this is usually a harmless torn tail.
    pub damage: Option<DamageReport>,
}

/// Result of [`verify`]: the findings for every segment of one log directory; nothing on
/// disk is changed.
#[derive(Debug, Clone)]
pub struct VerifyReport {
    /// The log directory checked, e.g. `<data_dir>/journal` or `<data_dir>/outbox/alerts`.
    pub dir: PathBuf,
    /// Segments in lsn order.
    pub segments: Vec<SegmentReport>,
    /// Files in the directory that are not segments (ignored by the log).
    pub ignored: Vec<PathBuf>,
}

impl VerifyReport {
    /// True when no segment has damage.
    pub fn is_clean(&self) -> bool {
        self.segments.iter().all(|s| s.damage.is_none())
    }

    /// Valid records over all segments (in each, those before any damage).
    pub fn records(&self) -> u64 {
        self.segments.iter().map(|s| s.records).sum()
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: {} segment(s), {} valid record(s), {}",
            self.dir.display(),
            self.segments.len(),
            self.records(),
            if self.is_clean() { "clean" } else { "DAMAGED" }
        )?;
        for s in &self.segments {
            let name = s.path.file_name().unwrap_or_default().to_string_lossy();
            match s.last_lsn {
                Some(last) => write!(
                    f,
                    "  {name}: {} bytes, {} record(s), lsn {}..={last}",
                    s.file_bytes, s.records, s.first_lsn
                )?,
                None => write!(f, "  {name}: {} bytes, no records", s.file_bytes)?,
            }
            match &s.damage {
                Some(d) => writeln!(
                    f,
                    "; {} bad byte(s) from offset {}: {}",
                    d.bytes, d.offset, d.damage
                )?,
                None => writeln!(f, "; ok")?,
            }
        }
        for p in &self.ignored {
            writeln!(f, "  ignored: {}", p.display())?;
        }
        Ok(())
    }
}

/// Offline, read-only check of a log directory (for `edgeferry store verify`): checks every
/// header and frame and reports per segment what is valid and where damage starts. Takes
/// no lock and changes nothing; on a live log the active segment may show an unsynced tail.
pub fn verify(dir: &Path) -> Result<VerifyReport, LogError> {
    let (names, ignored) = list_segments(dir)?;
    let mut segments = Vec::with_capacity(names.len());
    let mut prev_end: Lsn = 0;
    let count = names.len();
    for (i, (name_lsn, path)) in names.into_iter().enumerate() {
        let file = File::open(&path).map_err(io_err("open segment", &path))?;
        let file_bytes = file
            .metadata()
            .map_err(io_err("stat segment", &path))?
            .len();
        let mut scan = scan_segment(&file, file_bytes, name_lsn);
        if scan.header_ok && name_lsn < prev_end {
            scan = Scan {
                header_ok: false,
                tag: 0,
                padded: false,
                records: 0,
                valid_end: 0,
                damage: Some((
                    0,
                    Damage::Overlap {
                        first: name_lsn,
                        previous_end: prev_end,
                    },
                )),
            };
        }
        if scan.header_ok {
            prev_end = name_lsn + scan.records;
        }
        segments.push(SegmentReport {
            path,
            file_bytes,
            first_lsn: name_lsn,
            records: scan.records,
            last_lsn: (scan.records > 0).then(|| name_lsn + scan.records - 1),
            damage: scan.damage.map(|(offset, damage)| DamageReport {
                offset,
                bytes: file_bytes - offset,
                torn_tail: scan.header_ok
                    && i + 1 == count
                    && !valid_frame_after(&file, offset, file_bytes, name_lsn + scan.records),
                damage,
            }),
        });
    }
    Ok(VerifyReport {
        dir: dir.to_path_buf(),
        segments,
        ignored,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::seglog::testkit::*;

    #[test]
    fn verify_reports_damage_without_modifying_files() {
        let tmp = tempfile::tempdir().unwrap();
        write_records(tmp.path(), 1024, 200);
        let files = segment_files(tmp.path());
        let mut bytes = fs::read(&files[1]).unwrap();
        let at = bytes.len() - 10;
        bytes[at] ^= 0xFF;
        fs::write(&files[1], &bytes).unwrap();
        let report = verify(tmp.path()).unwrap();
        assert!(!report.is_clean());
        let bad = report.segments[1].damage.as_ref().unwrap();
        assert!(bad.offset <= at as u64 && bad.offset + bad.bytes == bytes.len() as u64);
        assert!(
            report
                .segments
                .iter()
                .enumerate()
                .all(|(i, s)| i == 1 || s.damage.is_none())
        );
        assert_eq!(fs::read(&files[1]).unwrap(), bytes, "verify is read-only");
        assert!(!tmp.path().join(QUARANTINE_DIR).exists());
        assert!(report.to_string().contains("DAMAGED"));
    }
}
