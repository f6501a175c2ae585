//! The disk quota: journal, outbox and checkpoint together stay within `[store] max_disk`; at the limit
//! either ingest is held back (`when_full = "block"`, the broker keeps the messages) or the
//! oldest unsent batches are dropped and counted (`when_full = "drop_oldest"`).

use super::error::ProcessError;
use super::shared::ProcessStatus;
use crate::store::outbox::{Dropped, Lane, Outbox};
use crate::store::{StoreConfig, WhenFull};
use std::sync::atomic::Ordering;

/// Applies the quota of `store` to `ob` (its lanes and acknowledgement state) plus
/// `other_bytes` (the journal and the checkpoint files). Not counted: the epoch, lock and
/// address files (a few dozen bytes each) and `quarantine/` (damage that `store repair` set
/// aside for inspection, which only an operator removes).
///
/// `held` is the outbox's size when ingest was blocked (`None` while it is not): a block lifts
/// once the store is below `max_disk` *and* the upstream has taken some of the outbox (or it
/// is down to its active segments, or an eighth of `max_disk` is free). Without that, every journal trim after a
/// checkpoint, and the checkpoint shrinking as windows age out, freed a little room that the
/// next readings took back at once: the block fell and rose every few hundred milliseconds,
/// each time with a log line, while the outbox — what filled the disk — stayed as it was.
pub(super) fn enforce(
    store: &StoreConfig,
    ob: &mut Outbox,
    other_bytes: u64,
    status: &ProcessStatus,
    held: &mut Option<u64>,
) -> Result<(), ProcessError> {
    let max = store.max_disk.as_u64();
    let used = |ob: &Outbox| ob.disk_bytes() + other_bytes;
    let over = used(ob) > max;
    metrics::gauge!("edgeferry_store_bytes").set(used(ob) as f64);
    match store.when_full {
        WhenFull::Block => {
            let outbox = ob.disk_bytes();
            let full = match *held {
                None => over,
                Some(at_block) => {
                    over || !(outbox < at_block
                        || ob.at_its_smallest()
                        || used(ob).saturating_add(max / 8) <= max)
                }
            };
            *held = match (full, *held) {
                (true, None) => Some(outbox),
                (true, Some(at)) => Some(at),
                (false, _) => None,
            };
            let was = status.blocked.swap(full, Ordering::Relaxed);
            if full || was {
                status
                    .last_held_mono
                    .store(crate::clock::mono_ms().max(1), Ordering::Relaxed);
            }
            if full && !was {
                tracing::warn!(
                    "store.max_disk ({}) reached: no longer acknowledging the broker until the upstream drains the outbox",
                    store.max_disk
                );
            } else if !full && was {
                tracing::info!("below store.max_disk again: ingest resumes");
            }
        }
        WhenFull::DropOldest => {
            while used(ob) > max {
                // Oldest aggregates first; alerts only when no aggregate segment is left.
                let d = match ob.drop_oldest(Lane::Aggregates)? {
                    Some(d) => d,
                    None => match ob.drop_oldest(Lane::Alerts)? {
                        Some(d) => d,
                        None => break,
                    },
                };
                record_drop(
                    status,
                    &d,
                    format_args!("store.max_disk ({}) reached", store.max_disk),
                );
            }
        }
    }
    Ok(())
}

/// Counts the batches `d` lost for good (metrics and `/status`) and logs why they were dropped.
pub(super) fn record_drop(status: &ProcessStatus, d: &Dropped, why: std::fmt::Arguments<'_>) {
    metrics::counter!("edgeferry_outbox_dropped_items_total").increment(d.items);
    metrics::counter!("edgeferry_outbox_dropped_batches_total").increment(d.batches);
    status.dropped_items.fetch_add(d.items, Ordering::Relaxed);
    status
        .last_dropped_ms
        .store(crate::clock::now_ms(), Ordering::Relaxed);
    tracing::warn!(
        batches = d.batches,
        items = d.items,
        "{why}: dropped the oldest unsent batches"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytesize::ByteSize;

    fn status() -> ProcessStatus {
        ProcessStatus::default()
    }

    fn store(max: u64, when_full: WhenFull) -> StoreConfig {
        StoreConfig {
            max_disk: ByteSize::b(max),
            when_full,
            ..StoreConfig::default()
        }
    }

    #[test]
    fn block_holds_ingest_back_while_over_the_quota_and_releases_it_below() {
        let dir = tempfile::tempdir().unwrap();
        let (mut ob, _) = Outbox::open(dir.path(), 4096).unwrap();
        let s = status();
        let base = ob.disk_bytes();
        let mut held = None;
        enforce(
            &store(base + 1000, WhenFull::Block),
            &mut ob,
            2000,
            &s,
            &mut held,
        )
        .unwrap();
        assert!(s.blocked.load(Ordering::Relaxed), "journal bytes count too");
        enforce(
            &store(base + 1000, WhenFull::Block),
            &mut ob,
            500,
            &s,
            &mut held,
        )
        .unwrap();
        assert!(!s.blocked.load(Ordering::Relaxed));
    }

    #[test]
    fn a_block_lifts_when_the_upstream_takes_from_the_outbox_not_when_a_trim_frees_a_little() {
        let dir = tempfile::tempdir().unwrap();
        let (mut ob, _) = Outbox::open(dir.path(), 1024).unwrap();
        for i in 0..40 {
            ob.append(Lane::Aggregates, 1, i, &[7; 200]).unwrap();
        }
        ob.sync().unwrap();
        let s = status();
        let max = ob.disk_bytes() + 1000;
        let mut held = None;
        enforce(&store(max, WhenFull::Block), &mut ob, 1100, &s, &mut held).unwrap();
        assert!(s.blocked.load(Ordering::Relaxed));
        // The journal was trimmed by a little: below the quota, but the outbox is as it was.
        enforce(&store(max, WhenFull::Block), &mut ob, 900, &s, &mut held).unwrap();
        assert!(s.blocked.load(Ordering::Relaxed), "still held");
        // The upstream acknowledged the oldest batches and their segment went.
        for lsn in 0..10 {
            ob.ack(crate::store::outbox::seq_of(Lane::Aggregates, lsn))
                .unwrap();
        }
        enforce(&store(max, WhenFull::Block), &mut ob, 900, &s, &mut held).unwrap();
        assert!(!s.blocked.load(Ordering::Relaxed), "released");
        assert_eq!(held, None);
    }

    #[test]
    fn drop_oldest_drops_whole_aggregate_segments_first_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let (mut ob, _) = Outbox::open(dir.path(), 1024).unwrap();
        for i in 0..40 {
            ob.append(Lane::Aggregates, 2, i, &[7; 200]).unwrap();
        }
        ob.append(Lane::Alerts, 1, 0, &[1; 50]).unwrap();
        ob.sync().unwrap();
        let before = ob.disk_bytes();
        let s = status();
        enforce(
            &store(before / 2, WhenFull::DropOldest),
            &mut ob,
            0,
            &s,
            &mut None,
        )
        .unwrap();
        assert!(
            ob.disk_bytes() <= before / 2,
            "{} > {}",
            ob.disk_bytes(),
            before / 2
        );
        let dropped = s.dropped_items.load(Ordering::Relaxed);
        assert!(
            dropped > 0 && dropped.is_multiple_of(2),
            "whole batches of 2 items: {dropped}"
        );
        assert_eq!(ob.next_lsn(Lane::Alerts), 1);
        assert_eq!(
            ob.first_lsn(Lane::Alerts),
            0,
            "alerts kept while aggregates remain"
        );
        assert!(
            !s.blocked.load(Ordering::Relaxed),
            "drop_oldest never blocks"
        );
    }
}
