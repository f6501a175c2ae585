//! The durable outbox: batches waiting for the central side's acknowledgement.
//!
//! Two lanes, each its own [`SegmentLog`]: alerts and aggregates. Separate logs are what make
//! the disk-quota policy honest: dropping the oldest aggregate data deletes whole segments of
//! the aggregates lane and can never take alerts with it. The forwarder sends the alerts lane
//! first.
//!
//! A batch's sequence number is `lsn << 1 | lane`: unique within the store epoch (a random id
//! made with the data directory), monotonically increasing per lane, never reused.
//!
//! Acknowledgements arrive per batch and out of order (live batches are sent before the
//! backlog). They are kept as ranges and persisted now and then; segments are deleted once
//! everything below a lane's low watermark is acknowledged. Losing the latest acknowledgement
//! state in a crash only causes batches to be resent, which the central side deduplicates by
//! (gateway, epoch, seq).
//!
//! Record layout inside the log: `items: u32 LE | created_ms: i64 LE | payload`; the payload is
//! an encoded batch the outbox does not interpret.

use super::seglog::{LogConfig, LogError, Lsn, Recovery, SegmentLog};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Which queue a batch waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Lane {
    /// Closed windows and corrections.
    Aggregates = 0,
    /// Raised and cleared alerts; sent first, dropped last.
    Alerts = 1,
}

impl Lane {
    /// Both lanes, in sending priority order.
    pub const PRIORITY: [Lane; 2] = [Lane::Alerts, Lane::Aggregates];

    fn index(self) -> usize {
        self as usize
    }

    /// The lane's name (metric label, directory name).
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Aggregates => "aggregates",
            Lane::Alerts => "alerts",
        }
    }
}

/// The batch id sent upstream for `lsn` in `lane`.
pub fn seq_of(lane: Lane, lsn: Lsn) -> u64 {
    (lsn << 1) | lane as u64
}

/// The inverse of [`seq_of`].
pub fn lane_lsn(seq: u64) -> (Lane, Lsn) {
    let lane = if seq & 1 == 1 {
        Lane::Alerts
    } else {
        Lane::Aggregates
    };
    (lane, seq >> 1)
}

/// One unacknowledged batch as read back from an outbox lane, ready to be sent.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredBatch {
    /// Batch id (see [`seq_of`]).
    pub seq: u64,
    /// Aggregates or alerts it holds, from the record header (the payload is not decoded).
    pub items: u32,
    /// When it was made (ms since epoch).
    pub created_ms: i64,
    /// The encoded batch, opaque to the outbox.
    pub payload: Vec<u8>,
}

/// A set of disjoint half-open ranges `[start, end)`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RangeSet {
    ranges: BTreeMap<u64, u64>,
}

impl RangeSet {
    /// Adds `[start, end)`, merging with neighbours.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut s, mut e) = (start, end);
        // Merge with a range that starts at or before `s` and reaches it.
        if let Some((&ps, &pe)) = self.ranges.range(..=s).next_back()
            && pe >= s
        {
            s = ps;
            e = e.max(pe);
        }
        // Swallow every range starting inside [s, e].
        let inside: Vec<u64> = self.ranges.range(s..=e).map(|(&k, _)| k).collect();
        for k in inside {
            if let Some(v) = self.ranges.remove(&k) {
                e = e.max(v);
            }
        }
        self.ranges.insert(s, e);
    }

    /// Is `x` in the set?
    pub fn contains(&self, x: u64) -> bool {
        self.ranges
            .range(..=x)
            .next_back()
            .is_some_and(|(_, &e)| x < e)
    }

    /// The first value `>= from` that is not in the set.
    pub fn first_gap_from(&self, from: u64) -> u64 {
        match self.ranges.range(..=from).next_back() {
            Some((_, &e)) if from < e => e,
            _ => from,
        }
    }

    /// Forgets everything below `floor`.
    pub fn prune_below(&mut self, floor: u64) {
        let below: Vec<u64> = self.ranges.range(..floor).map(|(&k, _)| k).collect();
        for k in below {
            if let Some(e) = self.ranges.remove(&k)
                && e > floor
            {
                self.ranges.insert(floor, e);
            }
        }
    }

    /// Number of values in the set (for metrics).
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The ranges, in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|(&s, &e)| (s, e))
    }
}

const ACKS_MAGIC: &[u8; 4] = b"EFAK";
const ACKS_VERSION: u16 = 1;
const RECORD_HEADER: usize = 12;

/// Decodes the bytes of `acked.bin` (acknowledged lsn ranges of the aggregates and alerts
/// lanes); the error says why the file is unusable.
pub fn decode_acks(bytes: &[u8]) -> Result<[RangeSet; 2], crate::util::StateFileError> {
    crate::util::decode_framed(bytes, ACKS_MAGIC, ACKS_VERSION)
}

/// What was dropped at the disk quota.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Unacknowledged batches lost (acknowledged ones in the segment are not counted).
    pub batches: u64,
    /// Aggregates or alerts in those batches, lost for good.
    pub items: u64,
    /// Disk space freed by deleting the segment, acknowledged batches included.
    pub bytes: u64,
}

/// The durable outbox: one segment log per lane plus the acknowledged ranges (see the
/// module docs).
pub struct Outbox {
    dir: PathBuf,
    lanes: [SegmentLog; 2],
    acked: [RangeSet; 2],
    acks_dirty: bool,
    /// Copies of the records appended since each lane's last successful sync. A write or sync
    /// that fails (a full disk) rolls the lane back to its last sync and appends these again
    /// (same lsns), so a batch the processor handed over is never lost to a disk error and
    /// its seq never changes. Bounded by what one checkpoint interval appends.
    unsynced: [Vec<(Lsn, Vec<u8>)>; 2],
    /// The lane's log was rolled back but not yet refilled from `unsynced`.
    needs_refill: [bool; 2],
}

impl Outbox {
    /// Opens the outbox in `dir` (lanes in `dir/alerts`, `dir/aggregates`; acknowledgement
    /// state in `dir/acked.bin`).
    pub fn open(dir: &Path, segment_bytes: u64) -> Result<(Outbox, [Recovery; 2]), LogError> {
        let cfg = LogConfig {
            segment_bytes,
            max_record: 64 * 1024 * 1024,
            payload_tag: 0,
            // Synced once per checkpoint: too rarely for a rewritten page to matter.
            pad_syncs: false,
        };
        let (agg, r0) = SegmentLog::open(&dir.join(Lane::Aggregates.as_str()), cfg.clone())?;
        let (alr, r1) = SegmentLog::open(&dir.join(Lane::Alerts.as_str()), cfg)?;
        let acked = match std::fs::read(dir.join("acked.bin")) {
            Ok(bytes) => match decode_acks(&bytes) {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(
                        "outbox acknowledgement state unreadable ({e}); unacknowledged batches will be resent"
                    );
                    Default::default()
                }
            },
            Err(_) => Default::default(),
        };
        let mut o = Outbox {
            dir: dir.to_path_buf(),
            lanes: [agg, alr],
            acked,
            acks_dirty: false,
            unsynced: [Vec::new(), Vec::new()],
            needs_refill: [false, false],
        };
        for lane in Lane::PRIORITY {
            o.advance(lane)?;
        }
        Ok((o, [r0, r1]))
    }

    fn log(&mut self, lane: Lane) -> &mut SegmentLog {
        &mut self.lanes[lane.index()]
    }

    /// Appends a batch (durable after [`Outbox::sync`]); returns its seq.
    pub fn append(
        &mut self,
        lane: Lane,
        items: u32,
        created_ms: i64,
        payload: &[u8],
    ) -> Result<u64, LogError> {
        let mut rec = Vec::with_capacity(RECORD_HEADER + payload.len());
        rec.extend_from_slice(&items.to_le_bytes());
        rec.extend_from_slice(&created_ms.to_le_bytes());
        rec.extend_from_slice(payload);
        self.refill(lane)?;
        match self.log(lane).append(&rec) {
            Ok(lsn) => {
                self.unsynced[lane.index()].push((lsn, rec));
                Ok(seq_of(lane, lsn))
            }
            Err(e) => {
                self.roll_back(lane);
                Err(e)
            }
        }
    }

    /// Makes every appended batch durable. On failure nothing appended is lost: the lanes
    /// are rolled back to their last sync and refilled from memory before the next write.
    pub fn sync(&mut self) -> Result<(), LogError> {
        for lane in Lane::PRIORITY {
            self.refill(lane)?;
            if let Err(e) = self.log(lane).sync() {
                self.roll_back(lane);
                return Err(e);
            }
            self.unsynced[lane.index()].clear();
        }
        Ok(())
    }

    /// After a failed write: takes the lane's unsynced bytes back (see
    /// [`SegmentLog::rollback_unsynced`]); [`Outbox::refill`] appends them again.
    fn roll_back(&mut self, lane: Lane) {
        self.needs_refill[lane.index()] = true;
        if let Err(e) = self.log(lane).rollback_unsynced() {
            tracing::debug!(
                lane = lane.as_str(),
                "outbox rollback failed, retried later: {e}"
            );
        }
    }

    /// Appends again what a rollback took back, at the same lsns.
    fn refill(&mut self, lane: Lane) -> Result<(), LogError> {
        let i = lane.index();
        if !self.needs_refill[i] {
            return Ok(());
        }
        self.lanes[i].rollback_unsynced()?;
        // A roll to a new segment syncs the one it closes: what went there is durable and
        // stays, and appending it again would store it twice.
        let durable = self.lanes[i].next_lsn();
        self.unsynced[i].retain(|(lsn, _)| *lsn >= durable);
        for (lsn, rec) in &self.unsynced[i] {
            let again = self.lanes[i].append(rec);
            debug_assert!(again.as_ref().map_or(true, |l| l == lsn), "same lsns");
            if let Err(e) = again {
                let _ = self.lanes[i].rollback_unsynced();
                return Err(e);
            }
        }
        self.needs_refill[i] = false;
        Ok(())
    }

    /// Next lsn of a lane (the processor's checkpoint records it).
    pub fn next_lsn(&self, lane: Lane) -> Lsn {
        self.lanes[lane.index()].next_lsn()
    }

    /// Oldest lsn still stored in a lane.
    pub fn first_lsn(&self, lane: Lane) -> Lsn {
        self.lanes[lane.index()].first_lsn()
    }

    /// The oldest seq still in the outbox over both lanes (everything older was acknowledged
    /// or dropped): what the handshake tells the central side.
    pub fn first_seq(&self) -> u64 {
        Lane::PRIORITY
            .iter()
            .map(|&l| seq_of(l, self.low_watermark(l)))
            .min()
            .unwrap_or(0)
    }

    /// Marks lsns `[start, end)` of a lane as done without sending them (orphans of a crash:
    /// appended but never covered by a checkpoint, so never sent, and re-emitted by replay).
    pub fn forget(&mut self, lane: Lane, start: Lsn, end: Lsn) -> Result<(), LogError> {
        self.acked[lane.index()].insert(start, end);
        self.acks_dirty = true;
        self.advance(lane)
    }

    /// Whether nothing more can be freed: every lane holds only its active segment.
    pub fn at_its_smallest(&self) -> bool {
        self.lanes.iter().all(|l| l.segment_count() == 1)
    }

    /// Records the central side's acknowledgement of `seq`.
    pub fn ack(&mut self, seq: u64) -> Result<(), LogError> {
        let (lane, lsn) = lane_lsn(seq);
        self.acked[lane.index()].insert(lsn, lsn + 1);
        self.acks_dirty = true;
        self.advance(lane)
    }

    /// Is `seq` acknowledged? Also true once its batch is no longer stored (deleted after
    /// acknowledgement or dropped at the disk quota).
    pub fn is_acked(&self, seq: u64) -> bool {
        let (lane, lsn) = lane_lsn(seq);
        lsn < self.first_lsn(lane) || self.acked[lane.index()].contains(lsn)
    }

    fn low_watermark(&self, lane: Lane) -> Lsn {
        let first = self.first_lsn(lane);
        self.acked[lane.index()].first_gap_from(first)
    }

    /// Deletes segments below the lane's low watermark.
    fn advance(&mut self, lane: Lane) -> Result<(), LogError> {
        let low = self.low_watermark(lane);
        let next = self.next_lsn(lane);
        self.log(lane).trim_before(low.min(next))?;
        let first = self.first_lsn(lane);
        self.acked[lane.index()].prune_below(first);
        Ok(())
    }

    /// The file the acknowledgement state is persisted in.
    pub fn acks_path(&self) -> PathBuf {
        self.dir.join("acked.bin")
    }

    /// Persists acknowledgement state if it changed (cheap to lose: see module docs).
    pub fn persist_acks(&mut self) -> std::io::Result<()> {
        if !self.acks_dirty {
            return Ok(());
        }
        let body = postcard::to_stdvec(&self.acked).expect("range sets encode");
        crate::util::write_framed(&self.acks_path(), ACKS_MAGIC, ACKS_VERSION, &body)?;
        self.acks_dirty = false;
        Ok(())
    }

    /// Up to `max` unacknowledged batches of `lane` with lsn in `[from, below)`, oldest first.
    pub fn unacked(
        &self,
        lane: Lane,
        from: Lsn,
        below: Lsn,
        max: usize,
    ) -> Result<Vec<StoredBatch>, LogError> {
        let mut out = Vec::new();
        let log = &self.lanes[lane.index()];
        let start = from.max(log.first_lsn());
        if start >= below || max == 0 {
            return Ok(out);
        }
        for r in log.read_from(start)? {
            let (lsn, rec) = r?;
            if lsn >= below || out.len() >= max {
                break;
            }
            if self.acked[lane.index()].contains(lsn) || rec.len() < RECORD_HEADER {
                continue;
            }
            out.push(StoredBatch {
                seq: seq_of(lane, lsn),
                items: u32::from_le_bytes(rec[0..4].try_into().expect("4 bytes")),
                created_ms: i64::from_le_bytes(rec[4..12].try_into().expect("8 bytes")),
                payload: rec[RECORD_HEADER..].to_vec(),
            });
        }
        Ok(out)
    }

    /// What waits, cheaply (no scan of the lanes, one record read per lane): unacknowledged
    /// batches over both lanes, bytes on disk, and when the oldest unacknowledged batch was
    /// made (ms). For the link's periodic health report; `backlog` counts items exactly.
    pub fn summary(&self) -> Result<(u64, u64, Option<i64>), LogError> {
        let (mut batches, mut oldest) = (0, None::<i64>);
        for lane in Lane::PRIORITY {
            let i = lane.index();
            let (first, next) = (self.first_lsn(lane), self.next_lsn(lane));
            batches += next
                .saturating_sub(first)
                .saturating_sub(self.acked[i].len());
            let low = self.low_watermark(lane);
            if let Some(b) = self.unacked(lane, low, next, 1)?.first() {
                oldest = Some(oldest.map_or(b.created_ms, |o| o.min(b.created_ms)));
            }
        }
        Ok((batches, self.disk_bytes(), oldest))
    }

    /// Backlog of a lane: (batches, items, bytes, oldest created_ms) not yet acknowledged.
    pub fn backlog(&self, lane: Lane) -> Result<(u64, u64, u64, Option<i64>), LogError> {
        let log = &self.lanes[lane.index()];
        let (mut batches, mut items, mut bytes, mut oldest) = (0, 0, 0, None);
        for r in log.read_from(log.first_lsn())? {
            let (lsn, rec) = r?;
            if self.acked[lane.index()].contains(lsn) || rec.len() < RECORD_HEADER {
                continue;
            }
            batches += 1;
            items += u32::from_le_bytes(rec[0..4].try_into().expect("4 bytes")) as u64;
            bytes += rec.len() as u64;
            oldest.get_or_insert(i64::from_le_bytes(rec[4..12].try_into().expect("8 bytes")));
        }
        Ok((batches, items, bytes, oldest))
    }

    /// Bytes on disk over both lanes and the acknowledgement state (with its temporary copy).
    pub fn disk_bytes(&self) -> u64 {
        self.lanes.iter().map(SegmentLog::disk_bytes).sum::<u64>()
            + crate::util::staged_bytes(&self.dir.join("acked.bin"))
    }

    /// Drops the oldest closed segment of `lane`, acknowledged or not, counting what was lost.
    /// Returns `None` when the lane has nothing but its active segment.
    pub fn drop_oldest(&mut self, lane: Lane) -> Result<Option<Dropped>, LogError> {
        let Some(end) = self.lanes[lane.index()].oldest_segment_end() else {
            return Ok(None);
        };
        let first = self.first_lsn(lane);
        let mut d = Dropped::default();
        for r in self.lanes[lane.index()].read_from(first)? {
            let (lsn, rec) = r?;
            if lsn >= end {
                break;
            }
            if !self.acked[lane.index()].contains(lsn) && rec.len() >= RECORD_HEADER {
                d.batches += 1;
                d.items += u32::from_le_bytes(rec[0..4].try_into().expect("4 bytes")) as u64;
            }
        }
        d.bytes = self.log(lane).trim_before(end)?;
        self.acked[lane.index()].prune_below(end);
        self.acks_dirty = true;
        Ok(Some(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[test]
    fn seq_numbers_interleave_lanes_without_collisions() {
        for lsn in [0u64, 1, 7, 1 << 40] {
            for lane in Lane::PRIORITY {
                assert_eq!(lane_lsn(seq_of(lane, lsn)), (lane, lsn));
            }
        }
        assert_ne!(seq_of(Lane::Alerts, 3), seq_of(Lane::Aggregates, 3));
    }

    proptest! {
        #[test]
        fn range_set_behaves_like_a_set(ops in proptest::collection::vec((0u64..200, 1u64..20), 0..60), probe in 0u64..260) {
            let mut rs = RangeSet::default();
            let mut model = std::collections::BTreeSet::new();
            for (s, len) in ops {
                rs.insert(s, s + len);
                model.extend(s..s + len);
            }
            for x in 0..260 {
                prop_assert_eq!(rs.contains(x), model.contains(&x), "x = {}", x);
            }
            let gap = (probe..).find(|x| !model.contains(x)).unwrap();
            prop_assert_eq!(rs.first_gap_from(probe), gap);
            prop_assert_eq!(rs.len(), model.len() as u64);
            let ranges: Vec<_> = rs.iter().collect();
            for w in ranges.windows(2) {
                prop_assert!(w[0].1 < w[1].0, "disjoint and not adjacent: {:?}", ranges);
            }
        }
    }

    #[test]
    fn out_of_order_acks_free_segments_only_below_the_low_watermark() {
        let dir = tempfile::tempdir().unwrap();
        let (mut o, _) = Outbox::open(dir.path(), 4096).unwrap();
        let payload = vec![7u8; 1000];
        let seqs: Vec<u64> = (0..20)
            .map(|i| o.append(Lane::Aggregates, 3, i, &payload).unwrap())
            .collect();
        o.sync().unwrap();
        let before = o.disk_bytes();
        // Live-first: the newest half is acknowledged first; nothing can be deleted yet.
        for &s in &seqs[10..] {
            o.ack(s).unwrap();
        }
        assert_eq!(o.first_lsn(Lane::Aggregates), 0);
        assert_eq!(o.unacked(Lane::Aggregates, 0, 100, 100).unwrap().len(), 10);
        // Then the backlog drains, oldest first.
        for &s in &seqs[..10] {
            o.ack(s).unwrap();
        }
        assert!(o.disk_bytes() < before, "acknowledged segments are deleted");
        assert!(o.unacked(Lane::Aggregates, 0, 100, 100).unwrap().is_empty());
        assert_eq!(o.backlog(Lane::Aggregates).unwrap().0, 0);
    }

    #[test]
    fn the_cheap_summary_agrees_with_the_full_backlog_count() {
        let dir = tempfile::tempdir().unwrap();
        let (mut o, _) = Outbox::open(dir.path(), 4096).unwrap();
        assert_eq!(o.summary().unwrap().0, 0);
        assert_eq!(o.summary().unwrap().2, None);
        let aggs: Vec<u64> = (0..12)
            .map(|i| {
                o.append(Lane::Aggregates, 3, 1000 + i, &[7u8; 700])
                    .unwrap()
            })
            .collect();
        let alerts: Vec<u64> = (0..3)
            .map(|i| o.append(Lane::Alerts, 1, 500 + i, b"a").unwrap())
            .collect();
        o.sync().unwrap();
        // Out of order, both lanes: the oldest unacknowledged is what is left.
        for &s in [aggs[0], aggs[5], aggs[11], alerts[0]].iter() {
            o.ack(s).unwrap();
        }
        let full: u64 = Lane::PRIORITY
            .iter()
            .map(|&l| o.backlog(l).unwrap().0)
            .sum();
        let (batches, bytes, oldest) = o.summary().unwrap();
        assert_eq!((batches, full), (11, 11));
        assert_eq!(bytes, o.disk_bytes());
        assert_eq!(
            oldest,
            Some(501),
            "alert 1 is the oldest unacknowledged batch"
        );
    }

    #[test]
    fn a_failed_write_after_a_segment_roll_stores_each_batch_once_at_its_seq() {
        let dir = tempfile::tempdir().unwrap();
        let (mut o, _) = Outbox::open(dir.path(), 4096).unwrap();
        // Unsynced batches spanning a roll: the roll synced the closed segment's batches.
        let seqs: Vec<u64> = (0..6)
            .map(|i| o.append(Lane::Aggregates, 1, i, &[i as u8; 1000]).unwrap())
            .collect();
        assert!(o.lanes[Lane::Aggregates.index()].segment_count() > 1);
        // The disk then refuses a write: the lane goes back to its last sync.
        o.roll_back(Lane::Aggregates);
        o.sync().unwrap();
        drop(o);
        let (o, _) = Outbox::open(dir.path(), 4096).unwrap();
        let stored = o.unacked(Lane::Aggregates, 0, 100, 100).unwrap();
        let got: Vec<(u64, i64)> = stored.iter().map(|b| (b.seq, b.created_ms)).collect();
        let want: Vec<(u64, i64)> = seqs.iter().copied().zip(0..).collect();
        assert_eq!(got, want, "every batch once, at the seq append gave it");
        assert!(
            stored
                .iter()
                .all(|b| b.payload == [b.created_ms as u8; 1000])
        );
    }

    #[test]
    fn acknowledgement_state_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let seqs: Vec<u64>;
        {
            let (mut o, _) = Outbox::open(dir.path(), 1 << 20).unwrap();
            seqs = (0..5)
                .map(|i| o.append(Lane::Alerts, 1, i, b"x").unwrap())
                .collect();
            o.sync().unwrap();
            o.ack(seqs[1]).unwrap();
            o.ack(seqs[3]).unwrap();
            o.persist_acks().unwrap();
        }
        let (o, _) = Outbox::open(dir.path(), 1 << 20).unwrap();
        let left: Vec<u64> = o
            .unacked(Lane::Alerts, 0, 100, 100)
            .unwrap()
            .iter()
            .map(|b| b.seq)
            .collect();
        assert_eq!(left, vec![seqs[0], seqs[2], seqs[4]]);
        assert_eq!(o.first_seq(), seqs[0].min(seq_of(Lane::Aggregates, 0)));
    }

    #[test]
    fn dropping_the_oldest_aggregates_never_touches_alerts_and_counts_items() {
        let dir = tempfile::tempdir().unwrap();
        let (mut o, _) = Outbox::open(dir.path(), 4096).unwrap();
        for i in 0..20 {
            o.append(Lane::Aggregates, 5, i, &[1u8; 1000]).unwrap();
            o.append(Lane::Alerts, 1, i, &[2u8; 1000]).unwrap();
        }
        o.sync().unwrap();
        let alerts_before = o.backlog(Lane::Alerts).unwrap();
        let d = o.drop_oldest(Lane::Aggregates).unwrap().unwrap();
        assert!(
            d.batches >= 1 && d.items == d.batches * 5 && d.bytes > 0,
            "{d:?}"
        );
        assert_eq!(o.backlog(Lane::Alerts).unwrap(), alerts_before);
        assert_eq!(
            o.backlog(Lane::Aggregates).unwrap().1,
            20 * 5 - d.items,
            "what is left is exactly what was not dropped"
        );
    }

    /// A tmpfs of `size` mounted at a fresh directory (root only; `None` elsewhere), unmounted
    /// on drop.
    struct SmallDisk(tempfile::TempDir);

    impl SmallDisk {
        fn mount(size: &str) -> Option<SmallDisk> {
            let dir = tempfile::tempdir().ok()?;
            let ok = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir.path())
                .output()
                .is_ok_and(|o| o.status.success());
            if !ok {
                eprintln!("NOTICE: cannot mount a tmpfs here; skipping the full-disk outbox test");
                return None;
            }
            Some(SmallDisk(dir))
        }
    }

    impl Drop for SmallDisk {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.0.path())
                .status();
        }
    }

    #[test]
    fn a_full_disk_loses_no_batch_the_outbox_accepted_and_it_writes_again_when_space_returns() {
        use std::io::Write;
        let Some(disk) = SmallDisk::mount("1m") else {
            return;
        };
        let dir = disk.0.path().join("outbox");
        let (mut o, _) = Outbox::open(&dir, 64 * 1024).unwrap();
        // Another file takes all the space but about one and a half segments.
        let filler = disk.0.path().join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let mut total = 0u64;
        while f.write_all(&[0u8; 4096]).is_ok() {
            total += 4096;
        }
        f.set_len(total.saturating_sub(96 * 1024)).unwrap();
        drop(f);
        // Append and sync until the disk refuses.
        let mut accepted = Vec::new();
        let mut failed = false;
        for i in 0..400u32 {
            let payload = vec![(i % 251) as u8; 1000];
            match o.append(Lane::Aggregates, i, i as i64, &payload) {
                Ok(seq) => accepted.push((seq, payload)),
                Err(_) => {
                    failed = true;
                    break;
                }
            }
            if i % 10 == 9 && o.sync().is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "the small disk filled up");
        assert!(!accepted.is_empty());
        // While full, a sync keeps failing, and loses nothing.
        assert!(o.sync().is_err(), "still full");
        // Space comes back: the same batches, same seqs, become durable.
        std::fs::remove_file(&filler).unwrap();
        o.sync().unwrap();
        let got = o
            .unacked(Lane::Aggregates, 0, u64::MAX, usize::MAX)
            .unwrap();
        assert_eq!(got.len(), accepted.len(), "every accepted batch is there");
        for (b, (seq, payload)) in got.iter().zip(&accepted) {
            assert_eq!(b.seq, *seq);
            assert_eq!(&b.payload, payload);
        }
        let next = o.append(Lane::Aggregates, 1, 0, b"after").unwrap();
        assert_eq!(
            lane_lsn(next).1,
            accepted.len() as u64,
            "lsns continue, none skipped"
        );
        o.sync().unwrap();
        drop(o);
        let (o, rec) = Outbox::open(&dir, 64 * 1024).unwrap();
        assert!(
            rec.iter()
                .all(|r| r.truncated_bytes == 0 && r.quarantined.is_empty()),
            "{rec:?}"
        );
        assert_eq!(
            o.unacked(Lane::Aggregates, 0, u64::MAX, usize::MAX)
                .unwrap()
                .len(),
            accepted.len() + 1
        );
    }

    /// One step against the outbox and its model.
    #[derive(Debug, Clone)]
    enum Op {
        /// Append a batch of `items` items with a payload of `len` bytes.
        Append(Lane, u32, usize),
        Sync,
        /// Acknowledge the n-th (modulo) batch still unacknowledged in the model, in any order.
        Ack(usize),
        /// The central side acknowledges something it already acknowledged, or that was dropped.
        AckAgain(usize),
        DropOldest(Lane),
        PersistAcks,
        /// Sync, then close and reopen (a restart; unsynced batches are never in play here
        /// because the segment log's own model test covers power loss).
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        let lane = prop_oneof![Just(Lane::Aggregates), Just(Lane::Alerts)];
        prop_oneof![
            6 => (lane.clone(), 1u32..50, 0usize..300).prop_map(|(l, i, n)| Op::Append(l, i, n)),
            2 => Just(Op::Sync),
            4 => any::<usize>().prop_map(Op::Ack),
            1 => any::<usize>().prop_map(Op::AckAgain),
            1 => lane.prop_map(Op::DropOldest),
            1 => Just(Op::PersistAcks),
            1 => Just(Op::Reopen),
        ]
    }

    /// What a batch is: its items count, creation time and payload.
    type Content = (u32, i64, Vec<u8>);

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// The outbox against a trivially correct model: per seq, the batch content, and
        /// whether it is unacknowledged, acknowledged durably (persisted) or acknowledged in
        /// memory only. Nothing unacknowledged is ever lost except by `drop_oldest` (and then
        /// counted exactly); nothing acknowledged durably comes back; an acknowledgement not
        /// yet persisted may come back after a restart (a resend, which ids make harmless), but
        /// only for a batch that was appended; contents never change.
        #[test]
        fn outbox_behaves_like_an_in_memory_model(ops in proptest::collection::vec(op(), 1..150)) {
            let dir = tempfile::tempdir().unwrap();
            let (mut o, _) = Outbox::open(dir.path(), 1024).unwrap();
            let mut unacked: BTreeMap<u64, Content> = BTreeMap::new();
            let mut volatile: BTreeMap<u64, Content> = BTreeMap::new();
            let mut gone: std::collections::BTreeSet<u64> = Default::default();
            // Appended but not synced: readers (and so the link) do not see them yet.
            let mut unsynced: std::collections::BTreeSet<u64> = Default::default();
            let mut clock = 0i64;
            for op in ops {
                match op {
                    Op::Append(lane, items, len) => {
                        clock += 1;
                        let payload: Vec<u8> = (0..len).map(|i| (i as u8) ^ (clock as u8)).collect();
                        let seq = o.append(lane, items, clock, &payload).unwrap();
                        prop_assert!(!unacked.contains_key(&seq) && !gone.contains(&seq), "seq {} reused", seq);
                        unacked.insert(seq, (items, clock, payload));
                        unsynced.insert(seq);
                    }
                    Op::Sync => {
                        o.sync().unwrap();
                        unsynced.clear();
                    }
                    Op::Ack(n) if unacked.len() > unsynced.len() => {
                        // Only what was sent can be acknowledged, and only synced batches are.
                        let sent: Vec<u64> =
                            unacked.keys().filter(|s| !unsynced.contains(s)).copied().collect();
                        let seq = sent[n % sent.len()];
                        o.ack(seq).unwrap();
                        volatile.insert(seq, unacked.remove(&seq).unwrap());
                        prop_assert!(o.is_acked(seq));
                    }
                    Op::Ack(_) => {}
                    Op::AckAgain(n) if !gone.is_empty() || !volatile.is_empty() => {
                        let all: Vec<u64> = gone.iter().chain(volatile.keys()).copied().collect();
                        let seq = all[n % all.len()];
                        o.ack(seq).unwrap();
                        prop_assert!(o.is_acked(seq));
                    }
                    Op::AckAgain(_) => {}
                    Op::DropOldest(lane) => {
                        o.sync().unwrap();
                        unsynced.clear();
                        let before = o.first_lsn(lane);
                        if let Some(d) = o.drop_oldest(lane).unwrap() {
                            let end = o.first_lsn(lane);
                            prop_assert!(end > before);
                            let in_lane = |seq: &u64| {
                                let (l, lsn) = lane_lsn(*seq);
                                l == lane && lsn < end
                            };
                            let lost: Vec<u64> = unacked.keys().copied().filter(in_lane).collect();
                            prop_assert_eq!(d.batches, lost.len() as u64, "dropped batches counted exactly");
                            let items: u64 = lost.iter().map(|s| unacked[s].0 as u64).sum();
                            prop_assert_eq!(d.items, items);
                            for s in lost {
                                unacked.remove(&s);
                                gone.insert(s);
                            }
                            let dropped_acked: Vec<u64> = volatile.keys().copied().filter(in_lane).collect();
                            for s in dropped_acked {
                                volatile.remove(&s);
                                gone.insert(s);
                            }
                        }
                    }
                    Op::PersistAcks => {
                        o.persist_acks().unwrap();
                        gone.extend(volatile.keys().copied());
                        volatile.clear();
                    }
                    Op::Reopen => {
                        o.sync().unwrap();
                        unsynced.clear();
                        drop(o);
                        o = Outbox::open(dir.path(), 1024).unwrap().0;
                        // Acknowledgements not persisted may be forgotten: those batches are
                        // unacknowledged again (if their segment still exists) or gone.
                        for lane in Lane::PRIORITY {
                            let present: Vec<u64> = o
                                .unacked(lane, 0, u64::MAX, usize::MAX)
                                .unwrap()
                                .iter()
                                .map(|b| b.seq)
                                .collect();
                            for seq in present {
                                if let Some(c) = volatile.remove(&seq) {
                                    unacked.insert(seq, c);
                                }
                            }
                        }
                        gone.extend(volatile.keys().copied());
                        volatile.clear();
                    }
                }
                // After every step: the outbox's unacknowledged batches are exactly the model's
                // (plus, between a restart and the next persisted ack, nothing else), in order,
                // with their content.
                for lane in Lane::PRIORITY {
                    let got: Vec<StoredBatch> = o.unacked(lane, 0, u64::MAX, usize::MAX).unwrap();
                    // Synced batches are always visible; unsynced ones may be too (rolling to
                    // a new segment syncs the old one), but nothing else.
                    let must: Vec<u64> = unacked
                        .keys()
                        .filter(|s| lane_lsn(**s).0 == lane && !unsynced.contains(*s))
                        .copied()
                        .collect();
                    let seen: Vec<u64> = got.iter().map(|b| b.seq).collect();
                    for seq in &must {
                        prop_assert!(seen.contains(seq), "synced unacked seq {} missing in {:?}", seq, lane);
                    }
                    prop_assert!(seen.windows(2).all(|w| w[0] < w[1]), "in order: {:?}", seen);
                    for b in &got {
                        let Some((items, created, payload)) = unacked.get(&b.seq) else {
                            return Err(TestCaseError::fail(format!("seq {} is not an unacked batch", b.seq)));
                        };
                        prop_assert_eq!(b.items, *items);
                        prop_assert_eq!(b.created_ms, *created);
                        prop_assert_eq!(&b.payload, payload);
                    }
                    let (batches, items, _, _) = o.backlog(lane).unwrap();
                    prop_assert_eq!(batches, got.len() as u64, "backlog of {:?}", lane);
                    prop_assert_eq!(items, got.iter().map(|b| b.items as u64).sum::<u64>());
                }
                for seq in &gone {
                    prop_assert!(o.is_acked(*seq), "seq {} acknowledged or dropped came back", seq);
                }
                let lowest_unacked = unacked.keys().next().copied();
                if let Some(low) = lowest_unacked {
                    prop_assert!(o.first_seq() <= low, "first_seq {} beyond unacked {}", o.first_seq(), low);
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// The same property as `fuzz/fuzz_targets/outbox_recovery.rs`: a real outbox with
        /// any bytes of its lane segments and acknowledgement state changed or cut opens (or
        /// says why not), lists its backlog, hands out no more batches than it holds and takes
        /// new ones readably; never a panic.
        #[test]
        fn an_outbox_damaged_anywhere_recovers_without_panic(
            batches in 1usize..20,
            flips in proptest::collection::vec((0usize..3, any::<prop::sample::Index>(), any::<u8>()), 0..8),
            cut in proptest::option::of((0usize..3, any::<prop::sample::Index>())),
        ) {
            let dir = tempfile::tempdir().unwrap();
            {
                let (mut o, _) = Outbox::open(dir.path(), 1024).unwrap();
                for i in 0..batches {
                    let lane = if i % 3 == 0 { Lane::Alerts } else { Lane::Aggregates };
                    let seq = o.append(lane, i as u32, i as i64, &[i as u8; 40]).unwrap();
                    o.sync().unwrap();
                    if i % 2 == 0 {
                        o.ack(seq).unwrap();
                    }
                }
                o.persist_acks().unwrap();
            }
            let mut files: Vec<PathBuf> = vec![dir.path().join("acked.bin")];
            for lane in [Lane::Aggregates, Lane::Alerts] {
                let mut segs: Vec<PathBuf> = std::fs::read_dir(dir.path().join(lane.as_str()))
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .collect();
                segs.sort();
                files.push(segs.pop().unwrap());
            }
            for (f, at, byte) in flips {
                let mut bytes = std::fs::read(&files[f]).unwrap();
                if !bytes.is_empty() {
                    let i = at.index(bytes.len());
                    bytes[i] ^= byte | 1;
                    std::fs::write(&files[f], bytes).unwrap();
                }
            }
            if let Some((f, at)) = cut {
                let bytes = std::fs::read(&files[f]).unwrap();
                std::fs::write(&files[f], &bytes[..at.index(bytes.len() + 1)]).unwrap();
            }
            let Ok((mut o, _)) = Outbox::open(dir.path(), 1024) else {
                return Ok(());
            };
            for lane in Lane::PRIORITY {
                let _ = o.backlog(lane);
                let next = o.next_lsn(lane);
                if let Ok(held) = o.unacked(lane, 0, next, usize::MAX) {
                    prop_assert!(held.len() as u64 <= next - o.first_lsn(lane));
                }
                let seq = o.append(lane, 1, 0, b"after").unwrap();
                o.sync().unwrap();
                let (_, lsn) = lane_lsn(seq);
                let got = o.unacked(lane, lsn, lsn + 1, 1).unwrap();
                prop_assert_eq!(got.len(), 1);
                prop_assert_eq!(&got[0].payload[..], b"after");
            }
        }
    }
}
