//! The reading journal: every accepted MQTT message, decoded, in arrival order.
//!
//! One record per MQTT message. A record carries the message's [`DedupKey`] so that after a
//! crash between "journal synced" and "PUBACK reached the broker" the broker's redelivery
//! (DUP=1, same packet id, same bytes) can be recognised against the journal's tail and
//! dropped instead of being counted twice.

use super::StoreError;
use super::seglog::{LogConfig, Lsn, Recovery, SegmentLog};
#[cfg(test)]
use crate::model::Reading;
use crate::model::record::{DedupKey, JournalEntry};

use std::path::Path;

/// The journal: a typed segment log.
pub struct Journal {
    log: SegmentLog,
    scratch: Vec<u8>,
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
            },
        )?;
        Ok((
            Journal {
                log,
                scratch: Vec::with_capacity(4096),
            },
            rec,
        ))
    }

    /// Appends a record (buffered; durable only after [`Journal::sync`]).
    pub fn append(&mut self, entry: &JournalEntry) -> Result<Lsn, StoreError> {
        self.scratch.clear();
        let bytes = postcard::to_extend(entry, std::mem::take(&mut self.scratch))
            .map_err(StoreError::Encode)?;
        let lsn = self.log.append(&bytes);
        self.scratch = bytes;
        Ok(lsn?)
    }

    /// Makes every appended record durable (group commit: one `fdatasync` for many records).
    pub fn sync(&mut self) -> Result<(), StoreError> {
        Ok(self.log.sync()?)
    }

    /// Takes back the records appended since the last successful sync after a failed write
    /// or sync (a full disk): see [`SegmentLog::rollback_unsynced`]. The caller appends them
    /// again; nothing synced before is touched.
    pub fn rollback_unsynced(&mut self) -> Result<(), StoreError> {
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
    /// as errors so the caller can count and skip them.
    pub fn read_from(
        &self,
        from: Lsn,
    ) -> Result<impl Iterator<Item = Result<(Lsn, JournalEntry), StoreError>> + use<>, StoreError>
    {
        let reader = self.log.read_from(from)?;
        Ok(reader.map(|r| {
            let (lsn, bytes) = r?;
            postcard::from_bytes(&bytes)
                .map(|e| (lsn, e))
                .map_err(|source| StoreError::Decode { lsn, source })
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

    #[test]
    fn dedup_key_distinguishes_same_packet_id_with_other_payload() {
        assert_ne!(DedupKey::new(7, "a", b"1"), DedupKey::new(7, "a", b"2"));
        assert_ne!(DedupKey::new(7, "a", b"1"), DedupKey::new(7, "b", b"1"));
        assert_eq!(DedupKey::new(7, "a", b"1"), DedupKey::new(7, "a", b"1"));
    }
}
