//! The reading journal: every accepted MQTT message, decoded, in arrival order.
//!
//! One record per MQTT message. A record carries the message's [`DedupKey`] so that after a
//! crash between "journal synced" and "PUBACK reached the broker" the broker's redelivery
//! (DUP=1, same packet id, same bytes) can be recognised against the journal's tail and
//! dropped instead of being counted twice.
//!
//! Records are written in the compact encoding of [`compact`] (segments tagged
//! [`PAYLOAD_TAG`]); segments written before it (tag 0) hold the postcard form of
//! [`JournalEntry`] and are still read, so an upgraded gateway replays its old journal.

pub mod compact;

use super::StoreError;
use super::seglog::{LogConfig, Lsn, Recovery, SegmentInfo, SegmentLog};
#[cfg(test)]
use crate::model::Reading;
use crate::model::record::{DedupKey, JournalEntry};

use std::path::Path;

/// The payload tag of the segments this build writes (see [`compact`]).
pub const PAYLOAD_TAG: u8 = compact::TAG;

/// The journal: a typed segment log.
pub struct Journal {
    log: SegmentLog,
    scratch: Vec<u8>,
    encoder: compact::Encoder,
}

impl Journal {
    /// Opens (creating if needed) the journal in `dir`, recovering from a crash: a torn tail
    /// is cut, damaged segments are salvaged and quarantined (see [`super::seglog`]).
    pub fn open(dir: &Path, segment_bytes: u64) -> Result<(Journal, Recovery), StoreError> {
        let (log, rec) = SegmentLog::open(
            dir,
            LogConfig {
                segment_bytes,
                max_record: 16 * 1024 * 1024,
                payload_tag: PAYLOAD_TAG,
                // Synced every commit group, a few kilobytes each: padded so that no page
                // is written twice (see `LogConfig::pad_syncs`).
                pad_syncs: true,
            },
        )?;
        Ok((
            Journal {
                log,
                scratch: Vec::with_capacity(4096),
                encoder: compact::Encoder::default(),
            },
            rec,
        ))
    }

    /// Appends a record (buffered; durable only after [`Journal::sync`]).
    pub fn append(&mut self, entry: &JournalEntry) -> Result<Lsn, StoreError> {
        self.encoder
            .encode(entry, &mut self.scratch)
            .map_err(StoreError::Encode)?;
        if self.log.would_roll(self.scratch.len()) {
            // The record opens a new segment, whose dictionary starts empty.
            self.encoder.reset();
            self.encoder
                .encode(entry, &mut self.scratch)
                .map_err(StoreError::Encode)?;
        }
        match self.log.append(&self.scratch) {
            Ok(lsn) => Ok(lsn),
            Err(e) => {
                // What this record defined may not be on disk.
                self.encoder.reset();
                Err(e.into())
            }
        }
    }

    /// Appends a group whose records already carry the lsns they are to get, skipping the
    /// ones the journal holds: retried after [`Journal::rollback_unsynced`], the first of
    /// them may be durable already, because a roll to a new segment syncs the segment it
    /// closes. Appending those again would journal them twice.
    pub fn append_group<'a>(
        &mut self,
        group: impl IntoIterator<Item = (Lsn, &'a JournalEntry)>,
    ) -> Result<(), StoreError> {
        let durable = self.next_lsn();
        for (lsn, entry) in group {
            if lsn < durable {
                continue;
            }
            let got = self.append(entry)?;
            debug_assert_eq!(got, lsn, "journal lsns are contiguous");
        }
        Ok(())
    }

    /// Makes every appended record durable (group commit: one `fdatasync` for many records).
    pub fn sync(&mut self) -> Result<(), StoreError> {
        Ok(self.log.sync()?)
    }

    /// Takes back the records appended since the last successful sync after a failed write
    /// or sync (a full disk): see [`SegmentLog::rollback_unsynced`]. The caller appends them
    /// again; nothing synced before is touched.
    pub fn rollback_unsynced(&mut self) -> Result<(), StoreError> {
        // The definitions in the records taken back are gone with them.
        self.encoder.reset();
        Ok(self.log.rollback_unsynced()?)
    }

    /// Next lsn to be assigned.
    pub fn next_lsn(&self) -> Lsn {
        self.log.next_lsn()
    }

    /// Oldest lsn still stored.
    pub fn first_lsn(&self) -> Lsn {
        self.log.first_lsn()
    }

    /// Bytes the records appended since open took (frames included, padding not): the
    /// committer's measure of what a message costs in the journal.
    pub fn appended_bytes(&self) -> u64 {
        self.log.appended_bytes()
    }

    /// Bytes a group may take and still be written in one page write (every sync pads the
    /// journal to a page boundary; see [`LogConfig::pad_syncs`]).
    pub fn page_room(&self) -> u64 {
        self.log.page_room()
    }

    /// Bytes the journal's segment files take on disk; counted against `store.max_disk`.
    pub fn disk_bytes(&self) -> u64 {
        self.log.disk_bytes()
    }

    /// Deletes whole segments holding only records below `lsn`.
    pub fn trim_before(&mut self, lsn: Lsn) -> Result<u64, StoreError> {
        Ok(self.log.trim_before(lsn)?)
    }

    /// Reads synced records from `from` on, in order. Undecodable records (which can only
    /// come from a bug or an incompatible downgrade, since the log checks CRCs) are reported
    /// as errors so the caller can count and skip them. A compact segment is decoded from its
    /// start (its series dictionary is in the records before `from`); those records are
    /// read but not returned.
    pub fn read_from(
        &self,
        from: Lsn,
    ) -> Result<impl Iterator<Item = Result<(Lsn, JournalEntry), StoreError>> + use<>, StoreError>
    {
        let segments = self.log.segments();
        let start = segments
            .iter()
            .find(|s| s.end_lsn > from && s.payload_tag == compact::TAG)
            .filter(|s| s.first_lsn <= from)
            .map_or(from, |s| s.first_lsn);
        let reader = self.log.read_from(start)?;
        let mut records = Records {
            segments,
            at: 0,
            decoder: compact::Decoder::default(),
        };
        Ok(reader.filter_map(move |r| {
            let (lsn, bytes) = match r {
                Ok(x) => x,
                Err(e) => return Some(Err(e.into())),
            };
            let decoded = records.decode(lsn, &bytes);
            (lsn >= from).then(|| decoded.map(|e| (lsn, e)))
        }))
    }
    /// The dedup keys and reading identities of the last `n` records, oldest first: what the
    /// broker may resend.
    /// `timed[i]`: subscription `i` decodes timestamps from its payloads (see
    /// [`JournalEntry::identity`]).
    pub fn tail_keys(
        &self,
        n: u64,
        timed: &[bool],
    ) -> Result<Vec<(DedupKey, Option<u64>)>, StoreError> {
        let from = self.next_lsn().saturating_sub(n).max(self.first_lsn());
        let mut keys = Vec::new();
        let mut buf = String::new();
        for r in self.read_from(from)? {
            match r {
                Ok((_, e)) => {
                    let t = timed.get(e.subscription as usize).copied().unwrap_or(false);
                    keys.push((e.dedup, e.identity(t, &mut buf)))
                }
                Err(e) => tracing::warn!("journal tail: {e}"),
            }
        }
        Ok(keys)
    }
}

/// Decodes a reader's records in order, following the segments' encodings.
struct Records {
    segments: Vec<SegmentInfo>,
    /// The segment the last record came from.
    at: usize,
    decoder: compact::Decoder,
}

impl Records {
    fn decode(&mut self, lsn: Lsn, bytes: &[u8]) -> Result<JournalEntry, StoreError> {
        let mut moved = false;
        while self.at + 1 < self.segments.len() && self.segments[self.at + 1].first_lsn <= lsn {
            self.at += 1;
            moved = true;
        }
        if moved {
            self.decoder.reset();
        }
        let tag = self.segments.get(self.at).map_or(0, |s| s.payload_tag);
        if tag == compact::TAG {
            self.decoder
                .decode(bytes)
                .map_err(|source| StoreError::DecodeCompact { lsn, source })
        } else {
            postcard::from_bytes(bytes).map_err(|source| StoreError::Decode { lsn, source })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn entry(i: u16) -> JournalEntry {
        JournalEntry {
            dedup: DedupKey::new(i, "t", &i.to_le_bytes()),
            received_ms: 1_700_000_000_000 + i as i64,
            subscription: 0,
            readings: vec![Reading {
                metric: "temp".into(),
                tags: BTreeMap::from([("site".into(), "a".into())]),
                value: i as f64,
                time_ms: 1_700_000_000_000,
            }],
        }
    }

    #[test]
    fn synced_entries_are_read_back_in_order_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut j, _) = Journal::open(dir.path(), 4096).unwrap();
            for i in 0..500 {
                assert_eq!(j.append(&entry(i)).unwrap(), i as u64);
            }
            j.sync().unwrap();
        }
        let (j, rec) = Journal::open(dir.path(), 4096).unwrap();
        assert_eq!(rec.next_lsn, 500);
        let all: Vec<_> = j.read_from(0).unwrap().map(|r| r.unwrap()).collect();
        assert_eq!(all.len(), 500);
        for (i, (lsn, e)) in all.iter().enumerate() {
            assert_eq!(*lsn, i as u64);
            assert_eq!(*e, entry(i as u16));
        }
        let tail = j.tail_keys(3, &[]).unwrap();
        let mut buf = String::new();
        let want: Vec<_> = (497..500)
            .map(|i| (entry(i).dedup, entry(i).identity(false, &mut buf)))
            .collect();
        assert_eq!(tail, want);
        assert!(
            want.iter().all(|(_, id)| id.is_some()),
            "timestamped readings"
        );
    }

    fn many_series(i: u64) -> JournalEntry {
        JournalEntry {
            dedup: DedupKey::new(i as u16, "t", &i.to_le_bytes()),
            received_ms: 1_700_000_000_000 + i as i64,
            subscription: 0,
            readings: vec![Reading {
                metric: "temp".into(),
                tags: BTreeMap::from([("sensor".into(), format!("s{}", i % 37))]),
                value: (i % 1000) as f64 / 10.0,
                time_ms: 1_700_000_000_000 + i as i64 - (i % 3) as i64,
            }],
        }
    }

    #[test]
    fn every_segment_defines_its_own_series_so_reads_from_any_lsn_and_after_trims_decode() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path(), 2048).unwrap();
        for i in 0..2000 {
            assert_eq!(j.append(&many_series(i)).unwrap(), i);
            if i % 50 == 0 {
                j.sync().unwrap();
            }
        }
        j.sync().unwrap();
        assert!(j.log.segment_count() > 10);
        for from in [0, 1, 17, 999, 1000, 1999] {
            let got: Vec<_> = j.read_from(from).unwrap().map(|r| r.unwrap()).collect();
            assert_eq!(got.len() as u64, 2000 - from, "from {from}");
            for (lsn, e) in got {
                assert_eq!(e, many_series(lsn));
            }
        }
        j.trim_before(1200).unwrap();
        drop(j);
        // Reopened (the writer forgets its numbers mid-segment), more records, read all.
        let (mut j, _) = Journal::open(dir.path(), 2048).unwrap();
        let first = j.first_lsn();
        assert!(first > 0 && first <= 1200);
        for i in 2000..2100 {
            j.append(&many_series(i)).unwrap();
        }
        j.sync().unwrap();
        let got: Vec<_> = j.read_from(first).unwrap().map(|r| r.unwrap()).collect();
        assert_eq!(got.len() as u64, 2100 - first);
        for (lsn, e) in got {
            assert_eq!(e, many_series(lsn));
        }
    }

    #[test]
    fn records_taken_back_after_a_failed_write_take_their_definitions_with_them() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path(), 1 << 20).unwrap();
        j.append(&many_series(0)).unwrap();
        j.sync().unwrap();
        // Series s1..s5 are defined by records that are then taken back.
        for i in 1..6 {
            j.append(&many_series(i)).unwrap();
        }
        j.rollback_unsynced().unwrap();
        for i in 1..6 {
            assert_eq!(j.append(&many_series(i)).unwrap(), i);
        }
        j.sync().unwrap();
        drop(j);
        let (j, _) = Journal::open(dir.path(), 1 << 20).unwrap();
        let got: Vec<_> = j.read_from(0).unwrap().map(|r| r.unwrap()).collect();
        assert_eq!(got.len(), 6);
        for (lsn, e) in got {
            assert_eq!(e, many_series(lsn));
        }
    }

    #[test]
    fn a_group_retried_after_a_failed_write_past_a_segment_roll_is_journaled_once() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path(), 2048).unwrap();
        let group: Vec<(Lsn, JournalEntry)> = (0..40).map(|i| (i, many_series(i))).collect();
        j.append_group(group.iter().map(|(l, e)| (*l, e))).unwrap();
        // The group rolled into new segments (each roll synced the one it closed); then the
        // disk refused the final sync: the log goes back to its last sync and the whole
        // group is retried.
        assert!(j.next_lsn() == 40 && j.log.segment_count() > 1);
        j.rollback_unsynced().unwrap();
        assert!(j.next_lsn() > 0, "the rolls made part of the group durable");
        j.append_group(group.iter().map(|(l, e)| (*l, e))).unwrap();
        j.sync().unwrap();
        drop(j);
        let (j, _) = Journal::open(dir.path(), 2048).unwrap();
        let got: Vec<_> = j.read_from(0).unwrap().map(|r| r.unwrap()).collect();
        assert_eq!(got, group, "each record once, at its lsn");
    }

    #[test]
    fn a_journal_written_before_compact_records_is_replayed_after_the_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        {
            // What an older edgeferry wrote: postcard entries in untagged segments.
            let (mut log, _) = SegmentLog::open(
                dir.path(),
                LogConfig {
                    segment_bytes: 4096,
                    max_record: 1 << 20,
                    payload_tag: 0,
                    pad_syncs: false,
                },
            )
            .unwrap();
            for i in 0..100 {
                log.append(&postcard::to_stdvec(&many_series(i)).unwrap())
                    .unwrap();
            }
            log.sync().unwrap();
        }
        let (mut j, rec) = Journal::open(dir.path(), 4096).unwrap();
        assert!(!rec.repaired());
        for i in 100..200 {
            assert_eq!(j.append(&many_series(i)).unwrap(), i);
        }
        j.sync().unwrap();
        let tags: Vec<u8> = j.log.segments().iter().map(|s| s.payload_tag).collect();
        assert!(
            tags.contains(&0) && tags.last() == Some(&PAYLOAD_TAG),
            "{tags:?}"
        );
        for from in [0, 50, 99, 100, 150] {
            let got: Vec<_> = j.read_from(from).unwrap().map(|r| r.unwrap()).collect();
            assert_eq!(got.len() as u64, 200 - from);
            for (lsn, e) in got {
                assert_eq!(e, many_series(lsn));
            }
        }
    }

    #[test]
    fn dedup_key_distinguishes_same_packet_id_with_other_payload() {
        assert_ne!(DedupKey::new(7, "a", b"1"), DedupKey::new(7, "a", b"2"));
        assert_ne!(DedupKey::new(7, "a", b"1"), DedupKey::new(7, "b", b"1"));
        assert_eq!(DedupKey::new(7, "a", b"1"), DedupKey::new(7, "a", b"1"));
    }
}
