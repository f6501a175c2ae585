//! `edgeferry load`: from the JetStream stream the collectors fill into PostgreSQL
//! (docs/CENTRAL.md).
//!
//! A durable pull consumer hands out stream messages (one per gateway batch, its JSON lines);
//! each fetch becomes **one transaction**, and the messages are acknowledged only after it
//! committed. A loader killed anywhere leaves either nothing of the fetch in the database
//! (the messages are redelivered) or all of it with some acks lost (redelivered and written
//! again, which changes nothing): aggregates are upserted by
//! `(gateway, series, window_start, window_secs)` keeping the highest `version`, alerts are
//! inserted once by `(gateway, rule, series, time, state)`. So any number of loaders may
//! share one consumer, and replays, redeliveries and corrections converge.
//!
//! Each fetch's rows are deduplicated (highest version per window) and sorted by key before
//! they are written, so one statement never touches a row twice and concurrent loaders lock
//! rows in the same order (no deadlocks between them).

use super::nats::{self, NatsSpec, SUBJECT_PREFIX};
pub use super::schema::{MIGRATIONS, migrate};
use super::schema::{connect_db, redact};
use anyhow::{Context, Result};
use async_nats::jetstream::{self, consumer::pull, stream::Stream};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use time::OffsetDateTime;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{Json, ToSql, Type};
use tokio_util::sync::CancellationToken;

/// Everything `edgeferry load` is configured with.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// The stream to read (`nats://…?stream=`), as the collectors were given it.
    pub from: NatsSpec,
    /// `postgres://user[:password]@host[:port]/database` (or key=value settings).
    pub to: String,
    /// Name of the durable consumer; loaders with the same name share the work.
    pub consumer: String,
    /// Most messages per fetch, i.e. per transaction.
    pub batch: usize,
    /// How long a message handed to a loader waits for its ack before it is handed out
    /// again (a loader that died).
    pub ack_wait: Duration,
    /// Where to serve `/metrics` and `/healthz`.
    pub metrics_listen: Option<String>,
}

impl LoadConfig {
    pub fn new(from: NatsSpec, to: impl Into<String>) -> Self {
        LoadConfig {
            from,
            to: to.into(),
            consumer: "edgeferry-loader".into(),
            batch: 256,
            ack_wait: Duration::from_secs(30),
            metrics_listen: None,
        }
    }
}

/// The staging table of one connection: each fetch's aggregates are `COPY`ed (binary) into
/// it and upserted from it in one statement. Measured (`cargo bench --bench central`), this
/// is ~2× the rows/s of a `jsonb_to_recordset` of the same rows: PostgreSQL parses no JSON
/// and the temporary table writes no WAL. `epoch` and `batch` travel as text (no binary
/// NUMERIC in the driver) and are cast where they land.
const STAGE_AGGREGATES: &str = "
CREATE TEMPORARY TABLE IF NOT EXISTS edgeferry_stage_aggregates (
    gateway text, series text, window_start timestamptz, window_secs integer, metric text,
    tags jsonb, version integer, count bigint, sum double precision, min double precision,
    max double precision, mean double precision, first double precision,
    last double precision, stddev double precision, p50 double precision,
    p90 double precision, p99 double precision, sketch_keys integer[], sketch_counts bigint[],
    epoch text, batch text
) ON COMMIT DELETE ROWS";

const COPY_STAGE: &str = "COPY edgeferry_stage_aggregates FROM STDIN (FORMAT binary)";

/// The column types of [`STAGE_AGGREGATES`], in order, for the binary COPY.
const STAGE_TYPES: &[Type] = &[
    Type::TEXT,
    Type::TEXT,
    Type::TIMESTAMPTZ,
    Type::INT4,
    Type::TEXT,
    Type::JSONB,
    Type::INT4,
    Type::INT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::INT4_ARRAY,
    Type::INT8_ARRAY,
    Type::TEXT,
    Type::TEXT,
];

/// From the staging table, in the order the rows were copied (key order: see the module
/// comment).
const UPSERT_AGGREGATES: &str = "
INSERT INTO aggregates AS t (gateway, series, window_start, window_secs, metric, tags, version,
    count, sum, min, max, mean, first, last, stddev, p50, p90, p99, sketch_keys, sketch_counts,
    epoch, batch)
SELECT gateway, series, window_start, window_secs, metric, tags, version, count, sum, min, max,
    mean, first, last, stddev, p50, p90, p99, sketch_keys, sketch_counts, epoch::numeric,
    batch::numeric
FROM edgeferry_stage_aggregates
ON CONFLICT (gateway, series, window_start, window_secs) DO UPDATE SET
    metric = excluded.metric, tags = excluded.tags, version = excluded.version,
    count = excluded.count, sum = excluded.sum, min = excluded.min, max = excluded.max,
    mean = excluded.mean, first = excluded.first, last = excluded.last,
    stddev = excluded.stddev, p50 = excluded.p50, p90 = excluded.p90, p99 = excluded.p99,
    sketch_keys = excluded.sketch_keys, sketch_counts = excluded.sketch_counts,
    epoch = excluded.epoch, batch = excluded.batch, loaded_at = now()
WHERE excluded.version > t.version";

const INSERT_ALERTS: &str = "
INSERT INTO alerts (gateway, rule, series, time, state, value, epoch, batch)
SELECT gateway, rule, series, time, state, value, epoch, batch
FROM jsonb_to_recordset($1::jsonb) AS r(gateway text, rule text, series text,
    time timestamptz, state text, value double precision, epoch numeric, batch numeric)
ON CONFLICT DO NOTHING";

/// One JSON line of a stream message, aggregate or alert (the collectors' output,
/// docs/PROTOCOL.md §7); fields another kind of line lacks are `None`.
#[derive(Deserialize)]
struct Line {
    kind: Option<String>,
    gateway: Option<String>,
    epoch: Option<u64>,
    batch: Option<u64>,
    series: Option<String>,
    metric: Option<String>,
    #[serde(default)]
    tags: Option<BTreeMap<String, String>>,
    window_start: Option<String>,
    window_secs: Option<i32>,
    version: Option<i32>,
    count: Option<i64>,
    sum: Option<f64>,
    min: Option<f64>,
    max: Option<f64>,
    mean: Option<f64>,
    first: Option<f64>,
    last: Option<f64>,
    stddev: Option<f64>,
    p50: Option<f64>,
    p90: Option<f64>,
    p99: Option<f64>,
    #[serde(default)]
    sketch_keys: Option<Vec<i32>>,
    #[serde(default)]
    sketch_counts: Option<Vec<i64>>,
    rule: Option<String>,
    state: Option<String>,
    value: Option<f64>,
    time: Option<String>,
}

/// An aggregate row, every column present.
struct AggregateRow {
    gateway: String,
    series: String,
    window_start: OffsetDateTime,
    window_secs: i32,
    metric: String,
    tags: BTreeMap<String, String>,
    version: i32,
    count: i64,
    values: [Option<f64>; 10],
    sketch_keys: Vec<i32>,
    sketch_counts: Vec<i64>,
    epoch: String,
    batch: String,
}

impl AggregateRow {
    fn from_line(l: Line) -> Option<AggregateRow> {
        Some(AggregateRow {
            window_start: parse_time(l.window_start.as_deref()?)?,
            gateway: l.gateway?,
            series: l.series?,
            window_secs: l.window_secs?,
            metric: l.metric?,
            tags: l.tags.unwrap_or_default(),
            version: l.version?,
            count: l.count?,
            values: [
                l.sum, l.min, l.max, l.mean, l.first, l.last, l.stddev, l.p50, l.p90, l.p99,
            ],
            sketch_keys: l.sketch_keys.unwrap_or_default(),
            sketch_counts: l.sketch_counts.unwrap_or_default(),
            epoch: l.epoch?.to_string(),
            batch: l.batch?.to_string(),
        })
    }
}

/// An alert row for `jsonb_to_recordset` (alerts are few; their path stays simple).
#[derive(Debug, Serialize)]
struct AlertRow {
    gateway: String,
    rule: String,
    series: String,
    time: String,
    state: String,
    value: Option<f64>,
    epoch: Option<u64>,
    batch: Option<u64>,
}

fn parse_time(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
}

/// A window's identity: (gateway, series, window start in ns, window length).
type WindowKey = (String, String, i128, i32);

/// The rows of one fetch, deduplicated: the highest version per window, each alert once.
/// Times are keyed by the instant they name, not their spelling, so two spellings of one
/// window cannot meet in one statement.
#[derive(Default)]
pub struct Rows {
    aggregates: BTreeMap<WindowKey, AggregateRow>,
    alerts: BTreeMap<(String, String, String, i128, String), AlertRow>,
    /// Lines that cannot be stored, by reason: `not_json` (not JSON, or a field of the
    /// wrong type), `kind` (neither aggregate nor alert), `aggregate_key` / `alert_key` (a
    /// key or required field missing or invalid).
    pub rejected: BTreeMap<&'static str, u64>,
}

impl Rows {
    /// Takes the JSON lines of one stream message.
    pub fn add_message(&mut self, payload: &[u8]) {
        for line in payload.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let Ok(l) = serde_json::from_slice::<Line>(line) else {
                *self.rejected.entry("not_json").or_default() += 1;
                continue;
            };
            self.add_line(l);
        }
    }

    fn add_line(&mut self, l: Line) {
        match l.kind.as_deref() {
            Some("aggregate") => {
                let Some(row) = AggregateRow::from_line(l) else {
                    *self.rejected.entry("aggregate_key").or_default() += 1;
                    return;
                };
                let key = (
                    row.gateway.clone(),
                    row.series.clone(),
                    row.window_start.unix_timestamp_nanos(),
                    row.window_secs,
                );
                match self.aggregates.get(&key) {
                    Some(have) if have.version >= row.version => {}
                    _ => {
                        self.aggregates.insert(key, row);
                    }
                }
            }
            Some("alert") => {
                let row = (|| {
                    let at = parse_time(l.time.as_deref()?)?.unix_timestamp_nanos();
                    Some((
                        at,
                        AlertRow {
                            gateway: l.gateway?,
                            rule: l.rule?,
                            series: l.series?,
                            time: l.time?,
                            state: l.state?,
                            value: l.value,
                            epoch: l.epoch,
                            batch: l.batch,
                        },
                    ))
                })();
                let Some((at, row)) = row else {
                    *self.rejected.entry("alert_key").or_default() += 1;
                    return;
                };
                let key = (
                    row.gateway.clone(),
                    row.rule.clone(),
                    row.series.clone(),
                    at,
                    row.state.clone(),
                );
                self.alerts.entry(key).or_insert(row);
            }
            _ => *self.rejected.entry("kind").or_default() += 1,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.aggregates.is_empty() && self.alerts.is_empty()
    }

    /// Writes every row in one transaction (in key order), committed on return.
    pub async fn write(self, db: &mut tokio_postgres::Client) -> Result<(u64, u64)> {
        let alerts: Vec<AlertRow> = self.alerts.into_values().collect();
        let tx = db.transaction().await?;
        let mut written = (0, 0);
        if !self.aggregates.is_empty() {
            tx.batch_execute(STAGE_AGGREGATES)
                .await
                .context("creating the staging table")?;
            let sink = tx.copy_in(COPY_STAGE).await.context("copying aggregates")?;
            let writer = BinaryCopyInWriter::new(sink, STAGE_TYPES);
            futures_util::pin_mut!(writer);
            for r in self.aggregates.values() {
                let tags = Json(&r.tags);
                let mut row: Vec<&(dyn ToSql + Sync)> = vec![
                    &r.gateway,
                    &r.series,
                    &r.window_start,
                    &r.window_secs,
                    &r.metric,
                    &tags,
                    &r.version,
                    &r.count,
                ];
                row.extend(r.values.iter().map(|v| v as &(dyn ToSql + Sync)));
                row.extend([
                    &r.sketch_keys as &(dyn ToSql + Sync),
                    &r.sketch_counts,
                    &r.epoch,
                    &r.batch,
                ]);
                writer
                    .as_mut()
                    .write(&row)
                    .await
                    .context("copying aggregates")?;
            }
            writer.finish().await.context("copying aggregates")?;
            written.0 = tx
                .execute(UPSERT_AGGREGATES, &[])
                .await
                .context("upserting aggregates")?;
        }
        if !alerts.is_empty() {
            written.1 = tx
                .execute(INSERT_ALERTS, &[&Json(&alerts)])
                .await
                .context("inserting alerts")?;
        }
        tx.commit().await.context("commit")?;
        Ok(written)
    }
}

/// The stream and the loaders' durable consumer (created by the first loader).
async fn open_consumer(
    cfg: &LoadConfig,
    js: &jetstream::Context,
) -> Result<(Stream, jetstream::consumer::Consumer<pull::Config>)> {
    let stream = open_stream(js, &cfg.from.stream).await?;
    let consumer = stream
        .get_or_create_consumer(
            &cfg.consumer,
            pull::Config {
                durable_name: Some(cfg.consumer.clone()),
                description: Some("edgeferry load: into PostgreSQL".into()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: cfg.ack_wait,
                filter_subject: format!("{SUBJECT_PREFIX}.>"),
                max_ack_pending: 20_000,
                ..Default::default()
            },
        )
        .await
        .with_context(|| format!("cannot create or open consumer {}", cfg.consumer))?;
    Ok((stream, consumer))
}

/// Reports the consumer's lag every [`LAG_EVERY`] until `shutdown`, whether or not the
/// database is reachable (that is when the lag matters).
async fn lag_reporter(cfg: LoadConfig, js: jetstream::Context, shutdown: CancellationToken) {
    let mut opened = None;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(LAG_EVERY) => {}
        }
        if opened.is_none() {
            opened = open_consumer(&cfg, &js).await.ok();
        }
        if let Some((stream, consumer)) = opened.as_mut()
            && let Err(e) = report_lag(consumer, stream).await
        {
            tracing::debug!("measuring the consumer's lag: {e:#}");
            opened = None;
        }
    }
}

async fn open_stream(js: &jetstream::Context, name: &str) -> Result<Stream> {
    js.get_stream(name).await.with_context(|| {
        format!("stream {name} not found (an `edgeferry collect --sink nats://…` creates it)")
    })
}

/// The loader is connected to both ends and loading (for `/healthz`).
static UP: AtomicBool = AtomicBool::new(false);

fn set_up(up: bool) {
    UP.store(up, Ordering::Relaxed);
    metrics::gauge!("edgeferry_load_up").set(if up { 1.0 } else { 0.0 });
}

/// `/healthz` of the loader: unhealthy while it cannot reach the database or the stream.
pub fn health() -> impl Fn() -> Option<String> + Clone + Send + Sync + 'static {
    || (!UP.load(Ordering::Relaxed)).then(|| "not loading (see the log)".to_string())
}

/// Runs the loader until `shutdown`: waits for the database and the stream, keeps going
/// through outages of either (nothing is acknowledged that is not committed).
pub async fn run(cfg: LoadConfig, shutdown: CancellationToken) -> Result<()> {
    let failing = Arc::new(AtomicBool::new(false));
    let (_client, js) = tokio::select! {
        () = shutdown.cancelled() => return Ok(()),
        c = nats::connect(&cfg.from, "edgeferry load", "edgeferry_load_source_up", failing) => c?,
    };
    tokio::spawn(lag_reporter(cfg.clone(), js.clone(), shutdown.clone()));
    tokio::spawn(super::gateways::run(
        cfg.to.clone(),
        cfg.from.stream.clone(),
        js.clone(),
        shutdown.clone(),
    ));
    let mut backoff =
        crate::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let r = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            r = session(&cfg, &js, &shutdown) => r,
        };
        match r {
            Ok(()) => return Ok(()),
            Err(e) => {
                if UP.load(Ordering::Relaxed) {
                    // It was loading: a new outage starts from the shortest wait.
                    backoff.reset();
                }
                set_up(false);
                let wait = backoff.next_delay();
                tracing::error!("loader: {e:#}; retrying in {wait:?}");
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// One connection to the database and one consumer: fetch, write, commit, ack, until an
/// error (returned, the caller retries) or shutdown (`Ok`).
async fn session(
    cfg: &LoadConfig,
    js: &jetstream::Context,
    shutdown: &CancellationToken,
) -> Result<()> {
    let mut db = connect_db(&cfg.to).await?;
    let schema = migrate(&mut db).await?;
    let (_stream, consumer) = open_consumer(cfg, js).await?;
    tracing::info!(
        stream = %cfg.from.stream,
        consumer = %cfg.consumer,
        schema,
        database = %redact(&cfg.to),
        "loader running"
    );
    set_up(true);
    while !shutdown.is_cancelled() {
        let mut batch = consumer
            .fetch()
            .max_messages(cfg.batch)
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .context("fetch")?;
        let mut msgs = Vec::new();
        while let Some(m) = batch.next().await {
            msgs.push(m.map_err(|e| anyhow::anyhow!("fetch: {e}"))?);
        }
        if msgs.is_empty() {
            continue;
        }
        let mut rows = Rows::default();
        for m in &msgs {
            rows.add_message(&m.payload);
        }
        for (reason, n) in &rows.rejected {
            tracing::warn!(
                reason,
                lines = n,
                "lines that are not edgeferry's were skipped"
            );
            metrics::counter!("edgeferry_load_rejected_total", "reason" => *reason).increment(*n);
        }
        let (aggs, alerts) = if rows.is_empty() {
            (0, 0)
        } else {
            rows.write(&mut db).await?
        };
        // Committed: now, and only now, the messages may go.
        for m in &msgs {
            m.ack().await.map_err(|e| anyhow::anyhow!("ack: {e}"))?;
        }
        metrics::counter!("edgeferry_load_messages_total").increment(msgs.len() as u64);
        metrics::counter!("edgeferry_load_rows_total", "table" => "aggregates").increment(aggs);
        metrics::counter!("edgeferry_load_rows_total", "table" => "alerts").increment(alerts);
        tracing::debug!(messages = msgs.len(), aggs, alerts, "fetch committed");
    }
    Ok(())
}

/// How often the consumer's lag is measured.
const LAG_EVERY: Duration = Duration::from_secs(2);

/// The consumer's lag, as Burrow reports it for Kafka: messages in the stream not yet
/// loaded (pending delivery or delivered and not acknowledged), and the age of the oldest of
/// them (by the time the stream stored it): `edgeferry_load_lag_messages`,
/// `edgeferry_load_lag_seconds`.
async fn report_lag(
    consumer: &mut jetstream::consumer::Consumer<pull::Config>,
    stream: &Stream,
) -> Result<()> {
    let info = consumer.info().await.context("consumer info")?;
    let behind = info.num_pending + info.num_ack_pending as u64;
    let oldest = info.ack_floor.stream_sequence + 1;
    let age = if behind == 0 {
        0.0
    } else {
        match stream.get_raw_message(oldest).await {
            Ok(m) => (time::OffsetDateTime::now_utc() - m.time)
                .as_seconds_f64()
                .max(0.0),
            // Removed meanwhile (by age or an operator): measured again next time.
            Err(_) => return Ok(()),
        }
    };
    metrics::gauge!("edgeferry_load_lag_messages").set(behind as f64);
    metrics::gauge!("edgeferry_load_lag_seconds").set(age);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn agg(version: u64, count: u64) -> serde_json::Value {
        json!({"kind": "aggregate", "gateway": "g", "epoch": 7, "batch": 1, "series": "s",
               "metric": "m", "tags": {"site": "a"}, "window_start": "2026-01-01T00:00:00Z",
               "window_secs": 10, "version": version, "count": count, "sum": null})
    }

    #[test]
    fn a_fetch_keeps_the_highest_version_of_each_window_and_each_alert_once() {
        let mut rows = Rows::default();
        let mut payload = Vec::new();
        for v in [agg(2, 20), agg(1, 10), agg(3, 30), agg(2, 21)] {
            payload.extend_from_slice(v.to_string().as_bytes());
            payload.push(b'\n');
        }
        let alert = json!({"kind": "alert", "gateway": "g", "rule": "r", "series": "s",
                           "time": "2026-01-01T00:00:01Z", "state": "raised"});
        payload.extend_from_slice(
            format!("{alert}\n{alert}\nnot json\n{{\"kind\":\"x\"}}\n").as_bytes(),
        );
        rows.add_message(&payload);
        assert_eq!(rows.aggregates.len(), 1);
        assert_eq!(rows.aggregates.values().next().unwrap().count, 30);
        assert_eq!(rows.alerts.len(), 1);
        assert_eq!(rows.rejected.get("not_json"), Some(&1));
        assert_eq!(rows.rejected.get("kind"), Some(&1));
    }

    #[test]
    fn one_window_spelled_two_ways_is_one_row_and_incomplete_lines_are_counted() {
        let mut rows = Rows::default();
        let mut other = agg(5, 50);
        other["window_start"] = json!("2026-01-01T01:00:00+01:00");
        let mut no_metric = agg(9, 90);
        no_metric.as_object_mut().unwrap().remove("metric");
        let mut bad_time = agg(9, 90);
        bad_time["window_start"] = json!("yesterday");
        let mut wrong_type = agg(9, 90);
        wrong_type["count"] = json!("many");
        let payload: String = [agg(1, 10), other, no_metric, bad_time, wrong_type]
            .iter()
            .map(|v| format!("{v}\n"))
            .collect();
        rows.add_message(payload.as_bytes());
        assert_eq!(
            rows.aggregates.len(),
            1,
            "the same instant is the same window"
        );
        assert_eq!(rows.aggregates.values().next().unwrap().count, 50);
        assert_eq!(rows.rejected.get("aggregate_key"), Some(&2));
        assert_eq!(rows.rejected.get("not_json"), Some(&1));
    }

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
    }
}
