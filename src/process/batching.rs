//! Batching: closed windows and alerts gathered into outbox batches of at most `batch_max`
//! items; alerts at once, aggregates when a batch is full or has lingered long enough.

use super::error::ProcessError;
use crate::model::batch::{BatchKind, OutboxBatch, OutboxItem};
use crate::store::outbox::{Lane, Outbox};
use std::time::Duration;

/// Items waiting for a batch, and since when (processing time).
pub(super) struct Pending<'a> {
    /// Items not yet in a batch, in emission order.
    pub(super) items: &'a mut Vec<OutboxItem>,
    /// Processing time of the oldest of them.
    pub(super) since_ms: &'a mut Option<i64>,
}

/// Moves what is due from `pending` into outbox batches: every alert, and aggregates in full
/// batches of `batch_max`, or all of them once the oldest has waited `linger` (or `force`).
/// Returns whether anything was appended. An item leaves `pending` only once its batch is in
/// the outbox: after a failed append (a full disk) the rest stays for the next attempt.
pub(super) fn flush(
    pending: Pending<'_>,
    ob: &mut Outbox,
    now: i64,
    batch_max: usize,
    linger: Duration,
    force: bool,
) -> Result<bool, ProcessError> {
    if pending.items.is_empty() {
        return Ok(false);
    }
    let batch_max = batch_max.max(1);
    // Alerts (rare) are taken out; the aggregates stay where they are and are encoded from
    // there: a window close over 10,000 series pends 10,000 of them, and copying them into new
    // vectors was the largest part of the gateway's peak heap (heaptrack, benches/flash.rs).
    let mut alerts: Vec<OutboxItem> = pending
        .items
        .extract_if(.., |i| matches!(i, OutboxItem::Alert(_)))
        .collect();
    let linger_over = pending
        .since_ms
        .is_some_and(|t| now - t >= linger.as_millis() as i64);
    let mut appended = false;
    let mut result = Ok(());
    let mut sent = 0;
    while sent < alerts.len() {
        let take = (alerts.len() - sent).min(batch_max);
        let items = &alerts[sent..sent + take];
        if let Err(e) = append(ob, Lane::Alerts, BatchKind::Alerts, now, items) {
            result = Err(e);
            break;
        }
        sent += take;
        appended = true;
    }
    alerts.drain(..sent);
    let aggregates = &pending.items;
    let mut sent = 0;
    while result.is_ok() {
        let left = aggregates.len() - sent;
        if !(left >= batch_max || (left > 0 && (linger_over || force))) {
            break;
        }
        let take = left.min(batch_max);
        let items = &aggregates[sent..sent + take];
        if let Err(e) = append(ob, Lane::Aggregates, BatchKind::Aggregates, now, items) {
            result = Err(e);
            break;
        }
        sent += take;
        appended = true;
    }
    pending.items.drain(..sent);
    // What is left waits in emission order, alerts first (they jump the queue).
    pending.items.splice(0..0, alerts);
    // Room beyond a batch is given back: kept, it would stay the size of the largest
    // backlog (a window close while the disk refused writes) for good.
    pending.items.shrink_to(pending.items.len().max(batch_max));
    if pending.items.is_empty() {
        *pending.since_ms = None;
    }
    result.map(|()| appended)
}

fn append(
    ob: &mut Outbox,
    lane: Lane,
    kind: BatchKind,
    now: i64,
    items: &[OutboxItem],
) -> Result<u64, ProcessError> {
    let bytes = OutboxBatch::encode(kind, now, items);
    metrics::counter!("edgeferry_outbox_batches_total", "lane" => lane.as_str()).increment(1);
    Ok(ob.append(lane, items.len() as u32, now, &bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::aggregate::Aggregate;
    use crate::model::{Alert, AlertState, SeriesInfo};

    fn aggregate(i: i64) -> OutboxItem {
        OutboxItem::Aggregate {
            series: std::sync::Arc::new(SeriesInfo {
                key: "t".into(),
                metric: "t".into(),
                tags: Default::default(),
            }),
            window_start_ms: i * 10_000,
            window_secs: 10,
            version: 1,
            agg: Aggregate::new(),
        }
    }

    fn alert() -> OutboxItem {
        OutboxItem::Alert(Alert {
            rule: "hot".into(),
            series: "t".into(),
            metric: "t".into(),
            tags: Default::default(),
            state: AlertState::Raised,
            value: Some(1.0),
            time_ms: 0,
        })
    }

    fn outbox() -> (tempfile::TempDir, Outbox) {
        let dir = tempfile::tempdir().unwrap();
        let (ob, _) = Outbox::open(dir.path(), 1 << 20).unwrap();
        (dir, ob)
    }

    /// Runs one flush and returns (appended, items left, since left, batches per lane).
    fn flush_once(
        items: &mut Vec<OutboxItem>,
        since: &mut Option<i64>,
        ob: &mut Outbox,
        now: i64,
        force: bool,
    ) -> bool {
        let pending = Pending {
            items,
            since_ms: since,
        };
        flush(pending, ob, now, 3, Duration::from_secs(5), force).unwrap()
    }

    #[test]
    fn alerts_leave_at_once_and_aggregates_only_in_full_batches() {
        let (_d, mut ob) = outbox();
        let mut items = vec![aggregate(0), alert(), aggregate(1)];
        let mut since = Some(1_000);
        assert!(flush_once(&mut items, &mut since, &mut ob, 2_000, false));
        assert_eq!(
            ob.next_lsn(Lane::Alerts),
            1,
            "the alert is in a batch of its own lane"
        );
        assert_eq!(
            ob.next_lsn(Lane::Aggregates),
            0,
            "two aggregates wait for a third"
        );
        assert_eq!(items.len(), 2);
        assert_eq!(since, Some(1_000), "the oldest waiting item keeps its time");

        items.extend([aggregate(2), aggregate(3), aggregate(4), aggregate(5)]);
        assert!(flush_once(&mut items, &mut since, &mut ob, 2_000, false));
        assert_eq!(
            ob.next_lsn(Lane::Aggregates),
            2,
            "six aggregates: two full batches"
        );
        assert!(items.is_empty());
        assert_eq!(since, None);
    }

    #[test]
    fn a_partial_batch_leaves_after_linger_or_when_forced() {
        let (_d, mut ob) = outbox();
        let mut items = vec![aggregate(0)];
        let mut since = Some(1_000);
        assert!(!flush_once(&mut items, &mut since, &mut ob, 5_999, false));
        assert_eq!(items.len(), 1, "not lingered long enough");
        assert!(flush_once(&mut items, &mut since, &mut ob, 6_000, false));
        assert_eq!(ob.next_lsn(Lane::Aggregates), 1);

        let mut items = vec![aggregate(1)];
        let mut since = Some(10_000);
        assert!(flush_once(&mut items, &mut since, &mut ob, 10_001, true));
        assert_eq!(ob.next_lsn(Lane::Aggregates), 2, "forced (shutdown)");
        assert!(!flush_once(&mut items, &mut since, &mut ob, 10_001, true));
    }

    #[test]
    fn a_batch_encoded_from_borrowed_items_is_the_stored_batch() {
        let items = vec![aggregate(0), aggregate(1)];
        let bytes = OutboxBatch::encode(BatchKind::Aggregates, 42, &items);
        let owned = OutboxBatch {
            kind: BatchKind::Aggregates,
            created_ms: 42,
            items,
        };
        assert_eq!(bytes, postcard::to_stdvec(&owned).unwrap());
        assert_eq!(postcard::from_bytes::<OutboxBatch>(&bytes).unwrap(), owned);
    }
}
