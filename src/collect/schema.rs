//! The loader's database side: the connection, and the schema as numbered migrations applied
//! at start (table `edgeferry_schema` holds the version; docs/CENTRAL.md shows the tables).

use anyhow::{Context, Result, bail};

/// The schema, one migration per version; applied in order under an advisory lock, each in
/// its own transaction with its version recorded in `edgeferry_schema`. Never edit one that
/// shipped: append.
pub const MIGRATIONS: &[(i32, &str)] = &[
    (
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
    ),
    (
        2,
        "CREATE TABLE gateways (
        gateway text PRIMARY KEY,
        connected boolean NOT NULL,
        collector text NOT NULL,
        connected_at timestamptz NOT NULL,
        last_seen timestamptz NOT NULL,
        epoch text NOT NULL,
        software text NOT NULL,
        peer text NOT NULL,
        batches_acked bigint NOT NULL,
        uptime_secs bigint,
        backlog_batches bigint,
        backlog_bytes bigint,
        oldest_backlog_secs bigint,
        broker_connected boolean,
        health_at timestamptz,
        updated_at timestamptz NOT NULL
    );",
    ),
];

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

pub(super) async fn connect_db(url: &str) -> Result<tokio_postgres::Client> {
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
pub(super) fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "(connection string)".into(),
    }
}
