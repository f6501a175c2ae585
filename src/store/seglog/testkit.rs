//! Helpers shared by the segment log's tests.

use super::files::list_segments;
pub(crate) use super::*;
pub(crate) use proptest::prelude::*;
pub(crate) use std::collections::BTreeMap;
pub(crate) use std::fs;
pub(crate) use std::path::{Path, PathBuf};

pub(crate) fn cfg(segment_bytes: u64) -> LogConfig {
    LogConfig {
        segment_bytes,
        max_record: 4096,
        payload_tag: 0,
        pad_syncs: false,
    }
}

/// Deterministic payload for an lsn, 0..=90 bytes long.
pub(crate) fn payload(lsn: Lsn) -> Vec<u8> {
    let len = (lsn.wrapping_mul(7919) % 91) as usize;
    (0..len)
        .map(|i| (lsn as u8).wrapping_add(i as u8))
        .collect()
}

pub(crate) fn read_all(log: &SegmentLog, from: Lsn) -> Vec<(Lsn, Vec<u8>)> {
    log.read_from(from)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

pub(crate) fn segment_files(dir: &Path) -> Vec<PathBuf> {
    list_segments(dir)
        .unwrap()
        .0
        .into_iter()
        .map(|s| s.1)
        .collect()
}

pub(crate) fn write_records(dir: &Path, segment_bytes: u64, n: u64) {
    let (mut log, _) = SegmentLog::open(dir, cfg(segment_bytes)).unwrap();
    for lsn in 0..n {
        assert_eq!(log.append(&payload(lsn)).unwrap(), lsn);
    }
    log.sync().unwrap();
}

/// Apparent size and allocated size of every file directly in `dir`.
pub(crate) fn dir_usage(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut apparent = 0;
    let mut allocated = 0;
    for e in fs::read_dir(dir).unwrap() {
        let m = e.unwrap().metadata().unwrap();
        if m.is_file() {
            apparent += m.len();
            allocated += m.blocks() * 512;
        }
    }
    (apparent, allocated)
}

/// Sum of the sizes of the segment files in `dir`.
pub(crate) fn segment_bytes_on_disk(dir: &Path) -> u64 {
    segment_files(dir)
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .sum()
}
