//! The NATS JetStream sink (`edgeferry collect --sink nats://…`): every batch becomes one
//! stream message, and the dedup marks and resume points live in a JetStream key-value
//! bucket, so collectors share nothing but the engine (docs/CENTRAL.md).
//!
//! # Exactly once in the stream, whatever the delay
//!
//! A batch `(gateway, epoch, seq)` is published to its own subject
//! `edgeferry.<gateway>.batch.<epoch>.<seq>` with `Nats-Expected-Last-Subject-Sequence: 0`,
//! into a stream that keeps one message per subject and refuses new ones
//! (`max_msgs_per_subject = 1`, `discard = new`, `discard_new_per_subject`). The server itself
//! decides: the first publish of a batch id is stored, every later one is refused with
//! "wrong last sequence", however much later it comes (while the stream retains the first,
//! `max_age`) and whichever collector sends it — no time window as with `Nats-Msg-Id`. A
//! refusal means "already stored" and is acknowledged like a success.
//!
//! Then the batch's mark is added to the gateway's entry in the key-value bucket
//! (`<stream>_MARKS`, key `<gateway>.<epoch>` with `.` in the gateway id written as `=`),
//! by compare-and-set on the entry's revision, so concurrent collectors serving the same
//! gateway merge their marks instead of overwriting them. Only then is the batch
//! acknowledged. The entry holds the gateway's floor (`Hello.first_seq`: everything below it
//! the gateway no longer holds) and the ranges stored at or above it: that is what `Welcome`
//! reports, and it stays as small as the gateway's backlog.
//!
//! A collector that dies between the stream's ack and the mark leaves a stored batch
//! without a mark; the gateway was not acknowledged and resends it, the stream refuses the
//! copy, the mark is written then. The one case that is not exact: that resend arriving
//! after the stream dropped the first copy by age (`max_age`, 7 days by default), when it is
//! stored a second time. PostgreSQL loaders upsert by version, so even that converges.

use super::store::Stored;
use anyhow::{Context, Result, bail};
use async_nats::jetstream::{self, context::PublishErrorKind, kv, stream};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Where and how to publish: parsed from `nats://[user:pass@]host:port[,host:port…][?…]`.
#[derive(Debug, Clone, PartialEq)]
pub struct NatsSpec {
    /// `host:port` of each server; the client picks one and fails over to the others.
    pub servers: Vec<String>,
    /// User and password, when the URL carries them.
    pub auth: Option<(String, String)>,
    /// Stream name (`?stream=`, default `EDGEFERRY`); the bucket is `<stream>_MARKS`.
    pub stream: String,
    /// Replicas of the stream and the bucket (`?replicas=`, default 1; 3 on a cluster).
    pub replicas: usize,
    /// How long the stream keeps a batch (`?max_age=`, default 7 days): loaders must have
    /// read it by then, and it is how long a resend is refused by the stream itself.
    pub max_age: Duration,
    /// Largest size of the stream (`?max_bytes=`, default 10 GiB). At the limit new batches
    /// are refused, so the collector stops acknowledging and the gateways keep them.
    pub max_bytes: u64,
}

/// The subject prefix of every message (and the stream's subjects: `edgeferry.>`).
pub const SUBJECT_PREFIX: &str = "edgeferry";

impl std::str::FromStr for NatsSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<NatsSpec> {
        let rest = s
            .strip_prefix("nats://")
            .with_context(|| format!("{s:?}: a NATS sink is nats://host:port[,host:port…]"))?;
        let (hosts, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (auth, hosts) = match hosts.rsplit_once('@') {
            Some((cred, hosts)) => {
                let (user, pass) = cred.split_once(':').with_context(|| {
                    format!("{s:?}: credentials are user:password@ (a bare token is not supported)")
                })?;
                (Some((user.to_string(), pass.to_string())), hosts)
            }
            None => (None, hosts),
        };
        let servers: Vec<String> = hosts
            .trim_end_matches('/')
            .split(',')
            .map(|h| {
                let h = h.trim();
                if h.is_empty() {
                    bail!("{s:?}: empty server address");
                }
                Ok(if h.contains(':') {
                    h.to_string()
                } else {
                    format!("{h}:4222")
                })
            })
            .collect::<Result<_>>()?;
        let mut spec = NatsSpec {
            servers,
            auth,
            stream: "EDGEFERRY".into(),
            replicas: 1,
            max_age: Duration::from_secs(7 * 86_400),
            max_bytes: 10 << 30,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .with_context(|| format!("{s:?}: {pair:?} is not key=value"))?;
            match k {
                "stream" => {
                    if v.is_empty()
                        || !v
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                    {
                        bail!("{s:?}: stream name {v:?} must be [A-Za-z0-9_-]+");
                    }
                    spec.stream = v.to_string();
                }
                "replicas" => {
                    spec.replicas = v
                        .parse()
                        .ok()
                        .filter(|r| (1..=5).contains(r))
                        .with_context(|| format!("{s:?}: replicas must be 1 to 5, not {v:?}"))?;
                }
                "max_age" => {
                    spec.max_age = humantime::parse_duration(v)
                        .with_context(|| format!("{s:?}: max_age {v:?} is not a duration"))?;
                }
                "max_bytes" => {
                    spec.max_bytes = v
                        .parse::<bytesize::ByteSize>()
                        .map_err(|e| anyhow::anyhow!("{s:?}: max_bytes {v:?}: {e}"))?
                        .as_u64();
                }
                other => bail!(
                    "{s:?}: unknown option {other:?} (known: stream, replicas, max_age, max_bytes)"
                ),
            }
        }
        Ok(spec)
    }
}

/// A gateway id as one subject token and key-value key token: gateway ids are
/// `[A-Za-z0-9._-]`, `.` separates tokens in NATS, and `=` is neither, so `.` → `=` is
/// reversible.
pub fn gateway_token(gateway: &str) -> String {
    gateway.replace('.', "=")
}

/// The subject of one batch.
pub fn batch_subject(gateway: &str, epoch: u64, seq: u64) -> String {
    format!(
        "{SUBJECT_PREFIX}.{}.batch.{epoch}.{seq}",
        gateway_token(gateway)
    )
}

/// A gateway's entry in the marks bucket, per epoch.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct Marks {
    /// Every seq below it is acknowledged or dropped by the gateway (its last `Hello`).
    floor: u64,
    /// Stored batches at or above the floor, as inclusive ascending ranges.
    stored: Vec<(u64, u64)>,
}

impl Marks {
    fn contains(&self, seq: u64) -> bool {
        self.stored.iter().any(|&(lo, hi)| lo <= seq && seq <= hi)
    }

    fn insert(&mut self, seq: u64) {
        // Ranges stay few (consecutive seqs merge); rebuild them with `seq` added.
        let mut rs = self.stored.clone();
        rs.push((seq, seq));
        rs.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(rs.len());
        for (lo, hi) in rs {
            match out.last_mut() {
                Some((_, h)) if lo <= h.saturating_add(1) => *h = (*h).max(hi),
                _ => out.push((lo, hi)),
            }
        }
        self.stored = out;
    }

    fn raise_floor(&mut self, floor: u64) {
        if floor <= self.floor {
            return;
        }
        self.floor = floor;
        self.stored.retain_mut(|(lo, hi)| {
            *lo = (*lo).max(floor);
            *hi >= floor
        });
    }
}

/// The NATS sink of one collector.
pub struct NatsSink {
    spec: NatsSpec,
    client: async_nats::Client,
    js: jetstream::Context,
    marks: kv::Store,
    /// The last operation against the engine failed (cleared by the next success, or by
    /// the monitor once the stream answers again).
    failing: Arc<AtomicBool>,
}

/// Connects to the servers of `spec` (waiting for them if none is up yet), with a
/// JetStream context whose requests time out after 5 s. The gauge `gauge{sink="nats"}`
/// follows the connection at once; `failing` (the last operation failed) holds it at 0
/// after a reconnect until the caller's next operation succeeds.
pub(super) async fn connect(
    spec: &NatsSpec,
    name: &'static str,
    gauge: &'static str,
    failing: Arc<AtomicBool>,
) -> Result<(async_nats::Client, jetstream::Context)> {
    let mut opts = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .retry_on_initial_connect()
        .event_callback(move |event| {
            let failing = failing.clone();
            async move {
                let up = match event {
                    async_nats::Event::Disconnected => {
                        tracing::warn!("NATS connection lost; reconnecting");
                        0.0
                    }
                    async_nats::Event::Connected if failing.load(Ordering::Relaxed) => 0.0,
                    async_nats::Event::Connected => 1.0,
                    _ => return,
                };
                metrics::gauge!(gauge, "sink" => "nats").set(up);
            }
        });
    if let Some((u, p)) = &spec.auth {
        opts = opts.user_and_password(u.clone(), p.clone());
    }
    let client = opts
        .connect(spec.servers.as_slice())
        .await
        .with_context(|| format!("cannot connect to NATS at {}", spec.servers.join(",")))?;
    let mut js = jetstream::new(client.clone());
    js.set_timeout(Duration::from_secs(5));
    Ok((client, js))
}

/// Settings every stream of ours must have; anything else (replicas, age, size) is the
/// operator's to change.
fn check_stream(name: &str, c: &stream::Config) -> Result<()> {
    let subjects = format!("{SUBJECT_PREFIX}.>");
    if !c.subjects.iter().any(|s| s == &subjects)
        || c.max_messages_per_subject != 1
        || c.discard != stream::DiscardPolicy::New
        || !c.discard_new_per_subject
    {
        bail!(
            "stream {name} exists but is not edgeferry's: it needs subjects [{subjects:?}], \
             max_msgs_per_subject 1, discard new, discard_new_per_subject (found subjects \
             {:?}, max_msgs_per_subject {}, discard {:?}, discard_new_per_subject {}); \
             delete it or choose another with ?stream=",
            c.subjects,
            c.max_messages_per_subject,
            c.discard,
            c.discard_new_per_subject
        );
    }
    Ok(())
}

impl NatsSink {
    /// Connects (waiting for the engine if it is not up yet), then creates or checks the
    /// stream and the marks bucket.
    pub async fn open(spec: NatsSpec) -> Result<NatsSink> {
        let failing = Arc::new(AtomicBool::new(false));
        let (client, js) = connect(
            &spec,
            "edgeferry collect",
            "edgeferry_collect_sink_up",
            failing.clone(),
        )
        .await?;
        let servers = spec.servers.join(",");
        let config = stream::Config {
            name: spec.stream.clone(),
            description: Some("edgeferry gateway batches (docs/CENTRAL.md)".into()),
            subjects: vec![format!("{SUBJECT_PREFIX}.>")],
            retention: stream::RetentionPolicy::Limits,
            max_messages_per_subject: 1,
            discard: stream::DiscardPolicy::New,
            discard_new_per_subject: true,
            max_age: spec.max_age,
            max_bytes: i64::try_from(spec.max_bytes).unwrap_or(i64::MAX),
            num_replicas: spec.replicas,
            storage: stream::StorageType::File,
            ..Default::default()
        };
        let mut stream = js.get_or_create_stream(config).await.with_context(|| {
            format!("cannot create or open stream {} on {servers}", spec.stream)
        })?;
        let info = stream
            .info()
            .await
            .with_context(|| format!("cannot read stream {}", spec.stream))?;
        check_stream(&spec.stream, &info.config)?;
        let bucket = format!("{}_MARKS", spec.stream);
        let marks = match js.get_key_value(&bucket).await {
            Ok(kv) => kv,
            Err(_) => {
                // The bucket's stream, as `create_key_value` would make it: that call first
                // queries the account, whose answer from a NATS 2.9 server (Debian 12's)
                // this client cannot parse.
                js.get_or_create_stream(stream::Config {
                    name: format!("KV_{bucket}"),
                    description: Some(
                        "edgeferry dedup marks and resume points per gateway epoch".into(),
                    ),
                    subjects: vec![format!("$KV.{bucket}.>")],
                    max_messages_per_subject: 1,
                    storage: stream::StorageType::File,
                    num_replicas: spec.replicas,
                    allow_rollup: true,
                    deny_delete: true,
                    allow_direct: true,
                    discard: stream::DiscardPolicy::New,
                    ..Default::default()
                })
                .await
                .with_context(|| format!("cannot create key-value bucket {bucket}"))?;
                js.get_key_value(&bucket)
                    .await
                    .with_context(|| format!("cannot open key-value bucket {bucket}"))?
            }
        };
        tracing::info!(
            servers = %servers,
            stream = %spec.stream,
            replicas = spec.replicas,
            "NATS JetStream sink ready"
        );
        metrics::gauge!("edgeferry_collect_sink_up", "sink" => "nats").set(1.0);
        Ok(NatsSink {
            spec,
            client,
            js,
            marks,
            failing,
        })
    }

    fn key(gateway: &str, epoch: u64) -> String {
        format!("{}.{epoch}", gateway_token(gateway))
    }

    async fn read(&self, key: &str) -> Result<(Marks, Option<u64>)> {
        match self.marks.entry(key).await? {
            Some(e) if e.operation == kv::Operation::Put => Ok((
                serde_json::from_slice(&e.value)
                    .with_context(|| format!("marks entry {key} is not edgeferry's"))?,
                Some(e.revision),
            )),
            // Deleted or purged by an operator: a new entry replaces it.
            Some(e) => Ok((Marks::default(), Some(e.revision))),
            None => Ok((Marks::default(), None)),
        }
    }

    /// Applies `change` to the entry of (gateway, epoch) by compare-and-set, retrying when
    /// another collector changed it meanwhile. Returns the entry as written (or as found,
    /// when `change` said there is nothing to write).
    async fn modify(&self, key: &str, change: impl Fn(&mut Marks) -> bool) -> Result<Marks> {
        for _ in 0..64 {
            let (mut m, revision) = self.read(key).await?;
            if !change(&mut m) {
                return Ok(m);
            }
            let value = Bytes::from(serde_json::to_vec(&m)?);
            let written =
                match revision {
                    Some(r) => self.marks.update(key, value, r).await.map_err(|e| {
                        (e.kind() == kv::UpdateErrorKind::WrongLastRevision, e.into())
                    }),
                    None => self
                        .marks
                        .create(key, value)
                        .await
                        .map(|_| 0)
                        .map_err(|e| (e.kind() == kv::CreateErrorKind::AlreadyExists, e.into())),
                };
            match written {
                Ok(_) => return Ok(m),
                Err((true, _)) => continue,
                Err((false, e)) => {
                    let e: anyhow::Error = e;
                    return Err(e.context(format!("cannot write marks entry {key}")));
                }
            }
        }
        bail!("marks entry {key} kept changing under 64 attempts");
    }

    fn outcome<T>(&self, r: Result<T>) -> Result<T> {
        match &r {
            Ok(_) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("NATS JetStream sink recovered");
                    metrics::gauge!("edgeferry_collect_sink_up", "sink" => "nats").set(1.0);
                }
            }
            Err(e) => {
                metrics::counter!("edgeferry_collect_sink_errors_total", "sink" => "nats")
                    .increment(1);
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::error!(
                        "NATS JetStream sink failing, batches are not acknowledged: {e:#}"
                    );
                    metrics::gauge!("edgeferry_collect_sink_up", "sink" => "nats").set(0.0);
                }
            }
        }
        r
    }

    /// Records the gateway's floor and returns the ranges stored at or above `first_seq`.
    pub async fn hello(
        &self,
        gateway: &str,
        epoch: u64,
        first_seq: u64,
        cap: usize,
    ) -> Result<Vec<(u64, u64)>> {
        let key = Self::key(gateway, epoch);
        let r = self
            .modify(&key, |m| {
                if first_seq > m.floor {
                    m.raise_floor(first_seq);
                    true
                } else {
                    false
                }
            })
            .await
            .with_context(|| format!("reading the marks of {gateway} epoch {epoch} from NATS"));
        let m = self.outcome(r)?;
        let from = first_seq.max(m.floor);
        let seqs = m
            .stored
            .iter()
            .filter(|&&(_, hi)| hi >= from)
            .map(|&(lo, hi)| (lo.max(from), hi));
        Ok(seqs.take(cap).collect())
    }

    /// Publishes a batch (its JSON lines) and marks it; returns once both are durable in the
    /// engine (with replicas: replicated).
    pub async fn store_batch(
        &self,
        gateway: &str,
        epoch: u64,
        seq: u64,
        lines: Bytes,
        items: usize,
    ) -> Result<Stored> {
        let r = self.store(gateway, epoch, seq, lines, items).await;
        self.outcome(
            r.with_context(|| format!("storing batch {seq} of {gateway} epoch {epoch} in NATS")),
        )
    }

    async fn store(
        &self,
        gateway: &str,
        epoch: u64,
        seq: u64,
        lines: Bytes,
        items: usize,
    ) -> Result<Stored> {
        let key = Self::key(gateway, epoch);
        let (m, _) = self.read(&key).await?;
        if m.contains(seq) {
            return Ok(Stored::Duplicate);
        }
        if seq < m.floor {
            return Ok(Stored::BelowFloor);
        }
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("{gateway}/{epoch}/{seq}").as_str());
        headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
        headers.insert("Edgeferry-Gateway", gateway);
        headers.insert("Edgeferry-Epoch", epoch.to_string().as_str());
        headers.insert("Edgeferry-Batch", seq.to_string().as_str());
        headers.insert("Edgeferry-Items", items.to_string().as_str());
        headers.insert("Content-Type", "application/x-ndjson");
        let subject = batch_subject(gateway, epoch, seq);
        let acked = self
            .js
            .publish_with_headers(subject.clone(), headers, lines)
            .await
            .context("publish")?
            .await;
        let outcome = match acked {
            Ok(ack) if ack.duplicate => Stored::Duplicate,
            Ok(_) => Stored::Written(items),
            // The subject already holds this batch: stored before, by us or another
            // collector, however long ago.
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Stored::Duplicate,
            Err(e) => return Err(anyhow::Error::new(e).context(format!("publish to {subject}"))),
        };
        self.modify(&key, |m| {
            if m.contains(seq) || seq < m.floor {
                false
            } else {
                m.insert(seq);
                true
            }
        })
        .await?;
        match outcome {
            Stored::Written(n) => {
                metrics::counter!("edgeferry_collect_nats_batches_total", "result" => "stored")
                    .increment(1);
                metrics::counter!("edgeferry_collect_nats_items_total").increment(n as u64);
            }
            _ => metrics::counter!("edgeferry_collect_nats_batches_total", "result" => "duplicate")
                .increment(1),
        }
        Ok(outcome)
    }

    /// Why the sink is unhealthy, if it is: disconnected from every server, or the last
    /// operation failed and the stream has not answered since.
    pub fn unhealthy(&self) -> Option<String> {
        use async_nats::connection::State;
        if self.client.connection_state() != State::Connected {
            return Some(format!(
                "NATS sink: not connected to {}",
                self.spec.servers.join(",")
            ));
        }
        self.failing
            .load(Ordering::Relaxed)
            .then(|| format!("NATS sink: stream {} is not answering", self.spec.stream))
    }

    /// Asks the stream for its info every `every` while the sink is failing, so health
    /// recovers without waiting for a gateway's next batch.
    pub async fn monitor(&self, every: Duration, shutdown: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            let connected =
                self.client.connection_state() == async_nats::connection::State::Connected;
            metrics::gauge!("edgeferry_collect_sink_up", "sink" => "nats").set(
                if connected && !self.failing.load(Ordering::Relaxed) {
                    1.0
                } else {
                    0.0
                },
            );
            if self.failing.load(Ordering::Relaxed) && connected {
                let r = self
                    .js
                    .get_stream(&self.spec.stream)
                    .await
                    .map(|_| ())
                    .map_err(anyhow::Error::new);
                let _ = self.outcome(r);
            }
        }
    }

    /// Waits until everything published has reached the server (at shutdown).
    pub async fn flush(&self) -> Result<()> {
        self.client
            .flush()
            .await
            .context("flushing the NATS connection")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_servers_credentials_and_stream_options() {
        let s: NatsSpec = "nats://u:p@a:4222,b?stream=X_1&replicas=3&max_age=2d&max_bytes=1GiB"
            .parse()
            .unwrap();
        assert_eq!(s.servers, ["a:4222", "b:4222"]);
        assert_eq!(s.auth, Some(("u".into(), "p".into())));
        assert_eq!(s.stream, "X_1");
        assert_eq!(s.replicas, 3);
        assert_eq!(s.max_age, Duration::from_secs(2 * 86_400));
        assert_eq!(s.max_bytes, 1 << 30);
        let d: NatsSpec = "nats://127.0.0.1:4222".parse().unwrap();
        assert_eq!((d.stream.as_str(), d.replicas), ("EDGEFERRY", 1));
        for bad in [
            "nats://",
            "nats://a,,b",
            "nats://a?replicas=0",
            "nats://a?stream=a.b",
            "nats://a?colour=red",
            "nats://token@a",
            "http://a",
        ] {
            assert!(bad.parse::<NatsSpec>().is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn gateway_ids_become_one_token() {
        assert_eq!(
            batch_subject("site.1-a_b", 7, 42),
            "edgeferry.site=1-a_b.batch.7.42"
        );
    }

    #[test]
    fn marks_merge_ranges_and_forget_below_the_floor() {
        let mut m = Marks::default();
        for s in [5, 3, 4, 9, 10, 7] {
            m.insert(s);
        }
        assert_eq!(m.stored, [(3, 5), (7, 7), (9, 10)]);
        assert!(m.contains(4) && !m.contains(6) && m.contains(10));
        m.raise_floor(4);
        assert_eq!(
            (m.floor, m.stored.clone()),
            (4, vec![(4, 5), (7, 7), (9, 10)])
        );
        m.raise_floor(8);
        assert_eq!(m.stored, [(9, 10)]);
        m.raise_floor(2);
        assert_eq!(m.floor, 8, "a floor never goes down");
    }
}
