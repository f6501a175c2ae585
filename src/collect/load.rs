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
use anyhow::{Context, Result, bail};
use async_nats::jetstream::{self, consumer::pull, stream::Stream};
use futures_util::StreamExt;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
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

/// The schema, one migration per version; applied in order under an advisory lock, each in
/// its own transaction with its version recorded in `edgeferry_schema`. Never edit one that
/// shipped: append.
pub const MIGRATIONS: &[(i32, &str)] = &[(
    1,
    "CREATE TABLE aggregates (
        gateway text NOT NULL,
        series text NOT NULL,
        window_start timestamptz NOT NULL,
        window_secs integer NOT NULL,
        metric text NOT NULL,
        tags jsonb NOT NULL,
        version integer NOT NULL,
        count bigint NOT NULL,
        sum double precision,
        min double precision,
        max double precision,
        mean double precision,
        first double precision,
        last double precision,
        stddev double precision,
        p50 double precision,
        p90 double precision,
        p99 double precision,
        sketch_keys integer[] NOT NULL,
        sketch_counts bigint[] NOT NULL,
        epoch numeric(20) NOT NULL,
        batch numeric(20) NOT NULL,
        loaded_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (gateway, series, window_start, window_secs)
    );
    CREATE INDEX aggregates_by_metric ON aggregates (metric, window_secs, window_start);
    CREATE TABLE alerts (
        gateway text NOT NULL,
        rule text NOT NULL,
        series text NOT NULL,
        time timestamptz NOT NULL,
        state text NOT NULL CHECK (state IN ('raised', 'cleared')),
        value double precision,
        epoch numeric(20) NOT NULL,
        batch numeric(20) NOT NULL,
        loaded_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (gateway, rule, series, time, state)
    );
    -- The value a sketch key stands for (edgeferry::model::sketch::bin_key_value):
    -- sign(k) * 2 * gamma^(|k| - 100000) / (gamma + 1), gamma = 1.01 / 0.99.
    CREATE FUNCTION edgeferry_bin_value(key integer) RETURNS double precision
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
        SELECT CASE WHEN key = 0 THEN 0::double precision
        ELSE sign(key) * exp((abs(key) - 100000) * ln(1.01::double precision / 0.99)
                             + ln(2 / (1.01::double precision / 0.99 + 1)))
        END
    $$;",
)];

/// An arbitrary constant naming the migration lock (`pg_advisory_lock`).
const MIGRATION_LOCK: i64 = 0x6564_6765_6665_7272; // "edgeferr"

/// Brings the schema to the newest version; several loaders starting at once take turns.
pub async fn migrate(db: &mut tokio_postgres::Client) -> Result<i32> {
    db.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .context("cannot take the migration lock")?;
    let r = async {
        db.batch_execute(
            "CREATE TABLE IF NOT EXISTS edgeferry_schema (
                version integer PRIMARY KEY,
                applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
        let row = db
            .query_one("SELECT coalesce(max(version), 0) FROM edgeferry_schema", &[])
            .await?;
        let from: i32 = row.get(0);
        let mut have = from;
        let newest = MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
        if have > newest {
            bail!(
                "the database schema is version {have}, newer than this edgeferry knows ({newest}): \
                 upgrade edgeferry"
            );
        }
        for (version, sql) in MIGRATIONS.iter().filter(|m| m.0 > from) {
            let tx = db.transaction().await?;
            tx.batch_execute(sql)
                .await
                .with_context(|| format!("schema migration {version}"))?;
            tx.execute("INSERT INTO edgeferry_schema (version) VALUES ($1)", &[version])
                .await?;
            tx.commit().await?;
            tracing::info!(version, "database schema migrated");
            have = *version;
        }
        Ok(have)
    }
    .await;
    let _ = db
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    r
}

const UPSERT_AGGREGATES: &str = "
INSERT INTO aggregates AS t (gateway, series, window_start, window_secs, metric, tags, version,
    count, sum, min, max, mean, first, last, stddev, p50, p90, p99, sketch_keys, sketch_counts,
    epoch, batch)
SELECT gateway, series, window_start, window_secs, metric, tags, version, count, sum, min, max,
    mean, first, last, stddev, p50, p90, p99, coalesce(sketch_keys, '{}'),
    coalesce(sketch_counts, '{}'), epoch, batch
FROM jsonb_to_recordset($1::jsonb) AS r(gateway text, series text, window_start timestamptz,
    window_secs integer, metric text, tags jsonb, version integer, count bigint,
    sum double precision, min double precision, max double precision, mean double precision,
    first double precision, last double precision, stddev double precision,
    p50 double precision, p90 double precision, p99 double precision, sketch_keys integer[],
    sketch_counts bigint[], epoch numeric, batch numeric)
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

/// The rows of one fetch, deduplicated: the highest version per window, each alert once.
#[derive(Default)]
pub struct Rows {
    aggregates: BTreeMap<(String, String, String, u64), (u64, serde_json::Value)>,
    alerts: BTreeMap<(String, String, String, String, String), serde_json::Value>,
    /// Lines that cannot be stored (not ours, or a key field missing), by reason.
    pub rejected: BTreeMap<&'static str, u64>,
}

fn text(v: &serde_json::Value, field: &str) -> Option<String> {
    v.get(field)?.as_str().map(str::to_string)
}

impl Rows {
    /// Takes the JSON lines of one stream message.
    pub fn add_message(&mut self, payload: &[u8]) {
        for line in payload.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
                *self.rejected.entry("not_json").or_default() += 1;
                continue;
            };
            self.add_line(v);
        }
    }

    fn add_line(&mut self, v: serde_json::Value) {
        match v.get("kind").and_then(|k| k.as_str()) {
            Some("aggregate") => {
                let key = (|| {
                    Some((
                        text(&v, "gateway")?,
                        text(&v, "series")?,
                        text(&v, "window_start")?,
                        v.get("window_secs")?.as_u64()?,
                    ))
                })();
                let (Some(key), Some(version)) = (key, v.get("version").and_then(|x| x.as_u64()))
                else {
                    *self.rejected.entry("aggregate_key").or_default() += 1;
                    return;
                };
                match self.aggregates.get(&key) {
                    Some((have, _)) if *have >= version => {}
                    _ => {
                        self.aggregates.insert(key, (version, v));
                    }
                }
            }
            Some("alert") => {
                let key = (|| {
                    Some((
                        text(&v, "gateway")?,
                        text(&v, "rule")?,
                        text(&v, "series")?,
                        text(&v, "time")?,
                        text(&v, "state")?,
                    ))
                })();
                let Some(key) = key else {
                    *self.rejected.entry("alert_key").or_default() += 1;
                    return;
                };
                self.alerts.entry(key).or_insert(v);
            }
            _ => *self.rejected.entry("kind").or_default() += 1,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.aggregates.is_empty() && self.alerts.is_empty()
    }

    /// Writes every row in one transaction (in key order), committed on return.
    pub async fn write(self, db: &mut tokio_postgres::Client) -> Result<(u64, u64)> {
        let aggs: Vec<serde_json::Value> = self.aggregates.into_values().map(|r| r.1).collect();
        let alerts: Vec<serde_json::Value> = self.alerts.into_values().collect();
        let tx = db.transaction().await?;
        let mut written = (0, 0);
        if !aggs.is_empty() {
            written.0 = tx
                .execute(UPSERT_AGGREGATES, &[&serde_json::Value::Array(aggs)])
                .await
                .context("upserting aggregates")?;
        }
        if !alerts.is_empty() {
            written.1 = tx
                .execute(INSERT_ALERTS, &[&serde_json::Value::Array(alerts)])
                .await
                .context("inserting alerts")?;
        }
        tx.commit().await.context("commit")?;
        Ok(written)
    }
}

async fn connect_db(url: &str) -> Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("cannot connect to PostgreSQL at {}", redact(url)))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!("PostgreSQL connection ended: {e}");
        }
    });
    Ok(client)
}

/// A connection string without its password, for messages.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "(connection string)".into(),
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
        json!({"kind": "aggregate", "gateway": "g", "series": "s", "window_start": "2026-01-01T00:00:00Z",
               "window_secs": 10, "version": version, "count": count})
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
        assert_eq!(rows.aggregates.values().next().unwrap().1["count"], 30);
        assert_eq!(rows.alerts.len(), 1);
        assert_eq!(rows.rejected.get("not_json"), Some(&1));
        assert_eq!(rows.rejected.get("kind"), Some(&1));
    }

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
    }
}
