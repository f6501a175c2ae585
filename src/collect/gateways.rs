//! The loader's `gateways` table: one row per gateway, kept current from the fleet bucket
//! the collectors write (`<stream>_FLEET`, a record per gateway and collector on each Hello,
//! Health and disconnect; [`super::fleet`]), so that "which gateways are behind or silent"
//! is one query over the whole fleet (docs/sql/silent_gateways.sql).
//!
//! Several collectors may have seen one gateway (it failed over; the old collector notices
//! the dead connection only after its idle timeout). A row takes a record only if the
//! record's session started later, or is the same session and newer:
//! `(connected_at, updated_at)` compared as a pair. So the old collector's late
//! "disconnected" never hides the new session, whatever order the records arrive in, and
//! replaying the bucket (every loader start watches it from the beginning) changes nothing.

use super::fleet::FleetRecord;
use super::nats::fleet_bucket;
use super::schema::{connect_db, migrate};
use anyhow::{Context, Result, bail};
use async_nats::jetstream::{self, kv};
use futures_util::StreamExt;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const UPSERT: &str = "
INSERT INTO gateways AS g (gateway, connected, collector, connected_at, last_seen, epoch,
    software, peer, batches_acked, uptime_secs, backlog_batches, backlog_bytes,
    oldest_backlog_secs, broker_connected, health_at, updated_at)
VALUES ($1, $2, $3, to_timestamp($4::bigint / 1000.0::float8),
    to_timestamp($5::bigint / 1000.0::float8), $6, $7, $8, $9, $10, $11, $12, $13, $14,
    to_timestamp($15::bigint / 1000.0::float8), to_timestamp($16::bigint / 1000.0::float8))
ON CONFLICT (gateway) DO UPDATE SET
    connected = excluded.connected, collector = excluded.collector,
    connected_at = excluded.connected_at, last_seen = excluded.last_seen,
    epoch = excluded.epoch, software = excluded.software, peer = excluded.peer,
    batches_acked = excluded.batches_acked, uptime_secs = excluded.uptime_secs,
    backlog_batches = excluded.backlog_batches, backlog_bytes = excluded.backlog_bytes,
    oldest_backlog_secs = excluded.oldest_backlog_secs,
    broker_connected = excluded.broker_connected, health_at = excluded.health_at,
    updated_at = excluded.updated_at
WHERE (excluded.connected_at, excluded.updated_at) >= (g.connected_at, g.updated_at)";

/// Keeps the `gateways` table until `shutdown`, reconnecting with backoff after failures of
/// the database or the engine (logged once per distinct failure).
/// `db` is the loader's `--to`, `stream` its stream (the bucket is `<stream>_FLEET`).
pub async fn run(db: String, stream: String, js: jetstream::Context, shutdown: CancellationToken) {
    let mut backoff =
        crate::backoff::Backoff::new(Duration::from_millis(500), Duration::from_secs(15));
    let mut last_logged: Option<String> = None;
    loop {
        let r = tokio::select! {
            () = shutdown.cancelled() => return,
            r = session(&db, &stream, &js) => r,
        };
        if let Err(e) = r {
            let msg = format!("{e:#}");
            let key = crate::telemetry::failure_key(&msg);
            if last_logged.as_deref() != Some(&key) {
                tracing::warn!("gateways table: {msg}; retrying");
                last_logged = Some(key);
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

/// One watch of the fleet bucket into one database connection, until either fails.
async fn session(db_url: &str, stream: &str, js: &jetstream::Context) -> Result<()> {
    let mut db = connect_db(db_url).await?;
    migrate(&mut db).await?;
    let bucket = fleet_bucket(stream);
    let kv = js.get_key_value(&bucket).await.with_context(|| {
        format!("bucket {bucket} not found (an `edgeferry collect --sink nats://…` creates it)")
    })?;
    let upsert = db.prepare(UPSERT).await.context("prepare")?;
    let mut watch = kv
        .watch_with_history(">")
        .await
        .with_context(|| format!("cannot watch {bucket}"))?;
    tracing::info!(bucket = %bucket, "keeping the gateways table");
    while let Some(entry) = watch.next().await {
        let entry = entry.with_context(|| format!("watching {bucket}"))?;
        if entry.operation != kv::Operation::Put {
            continue;
        }
        let Ok(r) = serde_json::from_slice::<FleetRecord>(&entry.value) else {
            metrics::counter!("edgeferry_load_rejected_total", "reason" => "fleet_record")
                .increment(1);
            continue;
        };
        let s = &r.state;
        let h = s.health.as_ref();
        let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        db.execute(
            &upsert,
            &[
                &s.gateway,
                &s.connected,
                &r.collector,
                &s.connected_at_ms,
                &s.last_seen_ms,
                &s.epoch,
                &s.software,
                &s.peer,
                &int(s.batches_acked),
                &h.map(|h| int(h.uptime_secs)),
                &h.map(|h| int(h.backlog_batches)),
                &h.map(|h| int(h.backlog_bytes)),
                &h.and_then(|h| h.oldest_secs.map(int)),
                &h.map(|h| h.broker_connected),
                &s.health_at_ms,
                &r.updated_ms,
            ],
        )
        .await
        .context("upserting a gateway")?;
        metrics::counter!("edgeferry_load_fleet_records_total").increment(1);
    }
    bail!("the watch of {bucket} ended")
}
