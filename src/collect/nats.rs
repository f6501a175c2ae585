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
//! The stream's answer is the whole decision, so it is the only write a batch waits for
//! before it is acknowledged. Its mark is then added to the gateway's entry in the
//! key-value bucket (`<stream>_MARKS`, key `<gateway>.<epoch>` with `.` in the gateway id
//! written as `=`) by a writer task that merges every mark pending for an entry into one
//! compare-and-set on its revision, so concurrent collectors serving the same gateway merge
//! their marks instead of overwriting them. The entry holds the gateway's floor
//! (`Hello.first_seq`: everything below it the gateway no longer holds) and the ranges
//! stored at or above it: that is what `Welcome` reports (a `Hello` first writes what this
//! collector still has pending for its entry), and it stays as small as the gateway's
//! backlog. Marks save resends; they decide nothing: measured (`cargo bench --bench
//! central`), writing them before the ack, with the read before the publish they allowed,
//! cost 4 engine round trips per batch instead of 1 and half the throughput.
//!
//! A mark not written (the collector died first, or the queue of pending marks was full)
//! means at most one needless resend, which the stream refuses. The one case that is not
//! exact: a batch whose ack the gateway never received, resent after the stream dropped the
//! first copy by age (`max_age`, 7 days by default) and with its mark missing, is stored a
//! second time. PostgreSQL loaders upsert by version, so even that converges.

use super::fleet::FleetRecord;
use super::store::Stored;
use crate::backoff::Backoff;
use anyhow::{Context, Result, bail};
use async_nats::jetstream::{self, context::PublishErrorKind, kv, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The key-value bucket the collectors keep their gateways' state in (for the loader).
pub fn fleet_bucket(stream: &str) -> String {
    format!("{stream}_FLEET")
}

/// Creates (if missing) and opens key-value bucket `name`. The bucket's stream is made as
/// `create_key_value` would make it: that call first queries the account, whose answer from
/// a NATS 2.9 server (Debian 12's) this client cannot parse.
async fn open_bucket(
    js: &jetstream::Context,
    name: &str,
    description: &str,
    replicas: usize,
) -> Result<kv::Store> {
    if let Ok(kv) = js.get_key_value(name).await {
        return Ok(kv);
    }
    js.get_or_create_stream(stream::Config {
        name: format!("KV_{name}"),
        description: Some(description.into()),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: 1,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    })
    .await
    .with_context(|| format!("cannot create key-value bucket {name}"))?;
    js.get_key_value(name)
        .await
        .with_context(|| format!("cannot open key-value bucket {name}"))
}

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

    /// Adds every seq not yet marked and not below the floor; whether anything changed.
    fn insert_all(&mut self, seqs: &[u64]) -> bool {
        let mut changed = false;
        for &seq in seqs {
            if seq >= self.floor && !self.contains(seq) {
                self.insert(seq);
                changed = true;
            }
        }
        changed
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
    marks: Bucket,
    /// `<stream>_FLEET`: each gateway as each collector last saw it.
    fleet: kv::Store,
    pending: Arc<PendingMarks>,
    /// The last operation against the engine failed (cleared by the next success, or by
    /// the monitor once the stream answers again).
    failing: Arc<AtomicBool>,
    /// Room for publishes awaiting their ack ([`MAX_PUBLISHES_IN_FLIGHT`]).
    publishes: Arc<tokio::sync::Semaphore>,
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

/// Why a stream could not be created or opened, in words that say what to change. The common
/// case on a new installation is a `max_bytes` larger than the file storage nats-server
/// grants (its `max_file_store`, by default 75% of the disk that was free when it started):
/// the server reserves the whole `max_bytes` at creation and refuses the stream outright.
fn stream_error(
    spec: &NatsSpec,
    servers: &str,
    e: async_nats::jetstream::context::CreateStreamError,
) -> anyhow::Error {
    use async_nats::jetstream::ErrorCode;
    use async_nats::jetstream::context::CreateStreamErrorKind;
    let storage = matches!(e.kind(), CreateStreamErrorKind::JetStream(j)
        if j.error_code() == ErrorCode::STORAGE_RESOURCES_EXCEEDED
            || j.error_code() == ErrorCode::INSUFFICIENT_RESOURCES);
    if storage {
        anyhow::anyhow!(
            "cannot create stream {} on {servers}: nats-server cannot reserve its max_bytes \
             ({}, × {} replica(s)) in its JetStream file storage ({e}); give a smaller \
             ?max_bytes= in the sink URL (e.g. ?max_bytes=1GiB) or raise max_file_store in \
             nats-server's jetstream block (by default 75% of the free disk)",
            spec.stream,
            bytesize::ByteSize::b(spec.max_bytes),
            spec.replicas,
        )
    } else {
        anyhow::Error::new(e).context(format!(
            "cannot create or open stream {} on {servers}",
            spec.stream
        ))
    }
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

/// The marks bucket.
#[derive(Clone)]
struct Bucket(kv::Store);

impl Bucket {
    async fn read(&self, key: &str) -> Result<(Marks, Option<u64>)> {
        match self.0.entry(key).await? {
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
    /// another collector changed it meanwhile. `known` is the entry as this collector last
    /// wrote it (marks and revision), tried first instead of a read: when nobody else wrote
    /// since, one round trip instead of two. Returns the entry as written (or as found, when
    /// `change` said there is nothing to write) with its revision.
    async fn modify(
        &self,
        key: &str,
        mut known: Option<(Marks, u64)>,
        change: impl Fn(&mut Marks) -> bool,
    ) -> Result<Entry> {
        for _ in 0..64 {
            let (hinted, (mut m, revision)) = match known.take() {
                Some((m, r)) => (true, (m, Some(r))),
                None => (false, self.read(key).await?),
            };
            if !change(&mut m) {
                if hinted {
                    // "Nothing to add" from memory is not proof: the entry may have been
                    // changed or deleted since (an operator, another collector). Ask.
                    continue;
                }
                return Ok((m, revision));
            }
            let value = Bytes::from(serde_json::to_vec(&m)?);
            let written =
                match revision {
                    Some(r) => self.0.update(key, value, r).await.map_err(|e| {
                        (e.kind() == kv::UpdateErrorKind::WrongLastRevision, e.into())
                    }),
                    None => self
                        .0
                        .create(key, value)
                        .await
                        .map_err(|e| (e.kind() == kv::CreateErrorKind::AlreadyExists, e.into())),
                };
            match written {
                Ok(r) => return Ok((m, Some(r))),
                Err((true, _)) => continue,
                Err((false, e)) => {
                    let e: anyhow::Error = e;
                    return Err(e.context(format!("cannot write marks entry {key}")));
                }
            }
        }
        bail!("marks entry {key} kept changing under 64 attempts");
    }
}

/// An entry's marks and revision (`None`: the entry does not exist yet).
type Entry = (Marks, Option<u64>);

/// Entries the mark writer remembers (as it wrote them) to skip the read before its next
/// write; past it the memory starts over (each entry then costs one read again).
const KNOWN_ENTRIES: usize = 50_000;

/// Most publishes of one collector awaiting the stream's ack. An engine that is slower than
/// the fleet (benches/fleet.rs: 10,000 gateways on two cores) would otherwise get every
/// batch every gateway has in flight at once, answer each later than its 5 s ack timeout,
/// and every timeout would close a gateway's connection (a storm of reconnects and Hellos on
/// an engine that is already behind). Past the limit a batch waits here, counted, and its
/// gateway waits with its window full: backpressure instead of failures. The bare
/// publisher of `benches/central.rs` keeps 320 outstanding; 256 keep the collector's ratio.
const MAX_PUBLISHES_IN_FLIGHT: usize = 256;

/// How long a batch's publish is tried again before it counts as not stored (a replicated
/// stream elects a new leader within seconds of losing one).
const PUBLISH_RETRY: Duration = Duration::from_secs(10);

/// Most batch marks waiting to be written. Beyond it a mark is dropped and counted
/// (`edgeferry_collect_nats_marks_dropped_total`): it would only have saved a resend.
const MAX_PENDING_MARKS: usize = 100_000;

#[derive(Default)]
struct Queue {
    /// Marks not yet taken by the writer, per entry key.
    queued: HashMap<String, Vec<u64>>,
    /// Entries the writer is writing now.
    writing: HashSet<String>,
    len: usize,
}

/// Marks of stored batches on their way to the bucket.
#[derive(Default)]
struct PendingMarks {
    queue: Mutex<Queue>,
    /// Wakes the writer.
    wake: tokio::sync::Notify,
    /// The writer finished a round.
    done: tokio::sync::Notify,
}

impl PendingMarks {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, key: &str, seqs: &[u64]) {
        let mut q = self.lock();
        let room = MAX_PENDING_MARKS.saturating_sub(q.len).min(seqs.len());
        if room < seqs.len() {
            metrics::counter!("edgeferry_collect_nats_marks_dropped_total")
                .increment((seqs.len() - room) as u64);
        }
        if room > 0 {
            q.queued
                .entry(key.to_string())
                .or_default()
                .extend_from_slice(&seqs[..room]);
            q.len += room;
        }
        drop(q);
        self.wake.notify_one();
    }

    /// Waits until the writer is not writing `key`, then takes what is queued for it.
    async fn take(&self, key: &str) -> Vec<u64> {
        loop {
            let done = self.done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            {
                let mut q = self.lock();
                if !q.writing.contains(key) {
                    let seqs = q.queued.remove(key).unwrap_or_default();
                    q.len -= seqs.len();
                    return seqs;
                }
            }
            done.await;
        }
    }

    fn is_idle(&self) -> bool {
        let q = self.lock();
        q.queued.is_empty() && q.writing.is_empty()
    }
}

/// The writer task: takes every pending mark, writes each entry once (up to 32 entries at
/// a time), puts back what failed and tries it again half a second later. Ends with its
/// sink.
async fn write_marks(bucket: Bucket, pending: Arc<PendingMarks>) {
    let mut known: HashMap<String, (Marks, u64)> = HashMap::new();
    loop {
        let taken: Vec<(String, Vec<u64>)> = {
            let mut q = pending.lock();
            let taken: Vec<_> = q.queued.drain().collect();
            q.len = 0;
            q.writing.extend(taken.iter().map(|(k, _)| k.clone()));
            taken
        };
        if taken.is_empty() {
            if Arc::strong_count(&pending) == 1 {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), pending.wake.notified()).await;
            continue;
        }
        if known.len() > KNOWN_ENTRIES {
            known.clear();
        }
        let results: Vec<(String, Vec<u64>, Result<Entry>)> = futures_util::stream::iter(taken)
            .map(|(key, seqs)| {
                let bucket = &bucket;
                let hint = known.get(&key).cloned();
                async move {
                    let r = bucket.modify(&key, hint, |m| m.insert_all(&seqs)).await;
                    (key, seqs, r)
                }
            })
            .buffer_unordered(32)
            .collect()
            .await;
        let mut failed = Vec::new();
        for (key, seqs, r) in results {
            match r {
                Ok((m, Some(revision))) => {
                    known.insert(key, (m, revision));
                }
                Ok((_, None)) => {
                    known.remove(&key);
                }
                Err(e) => {
                    known.remove(&key);
                    failed.push((key, seqs, e));
                }
            }
        }
        let retry = !failed.is_empty();
        pending.lock().writing.clear();
        for (key, seqs, e) in failed {
            tracing::debug!("writing the marks of {key} (will retry): {e:#}");
            metrics::counter!("edgeferry_collect_sink_errors_total", "sink" => "nats").increment(1);
            pending.push(&key, &seqs);
        }
        pending.done.notify_waiters();
        if retry {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
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
        let mut stream = js
            .get_or_create_stream(config)
            .await
            .map_err(|e| stream_error(&spec, &servers, e))?;
        let info = stream
            .info()
            .await
            .with_context(|| format!("cannot read stream {}", spec.stream))?;
        check_stream(&spec.stream, &info.config)?;
        let marks = open_bucket(
            &js,
            &format!("{}_MARKS", spec.stream),
            "edgeferry dedup marks and resume points per gateway epoch",
            spec.replicas,
        )
        .await?;
        let fleet = open_bucket(
            &js,
            &fleet_bucket(&spec.stream),
            "edgeferry gateways as each collector last saw them",
            spec.replicas,
        )
        .await?;
        tracing::info!(
            servers = %servers,
            stream = %spec.stream,
            replicas = spec.replicas,
            "NATS JetStream sink ready"
        );
        metrics::gauge!("edgeferry_collect_sink_up", "sink" => "nats").set(1.0);
        let marks = Bucket(marks);
        let pending = Arc::new(PendingMarks::default());
        tokio::spawn(write_marks(marks.clone(), pending.clone()));
        Ok(NatsSink {
            publishes: Arc::new(tokio::sync::Semaphore::new(MAX_PUBLISHES_IN_FLIGHT)),
            spec,
            client,
            js,
            marks,
            fleet,
            pending,
            failing,
        })
    }

    /// Writes the gateways' state changes (`/fleet`'s records) into the fleet bucket, key
    /// `<gateway>.<collector>`, until `records` closes; the loader keeps PostgreSQL's
    /// `gateways` table from it. A failed write is counted and the next change of that
    /// gateway writes again (health comes every 15 s).
    pub fn spawn_fleet_writer(&self, mut records: tokio::sync::mpsc::Receiver<FleetRecord>) {
        let kv = self.fleet.clone();
        tokio::spawn(async move {
            while let Some(r) = records.recv().await {
                let key = format!("{}.{}", gateway_token(&r.state.gateway), r.collector);
                let value = serde_json::to_vec(&r).expect("fleet records serialise");
                if let Err(e) = kv.put(&key, value.into()).await {
                    metrics::counter!("edgeferry_collect_fleet_write_errors_total").increment(1);
                    tracing::debug!("fleet bucket: {e}");
                }
            }
        });
    }

    fn key(gateway: &str, epoch: u64) -> String {
        format!("{}.{epoch}", gateway_token(gateway))
    }

    fn outcome<T>(&self, r: Result<T>) -> Result<T> {
        match &r {
            Ok(_) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("NATS JetStream sink recovered");
                    metrics::gauge!("edgeferry_collect_sink_up", "sink" => "nats").set(1.0);
                }
            }
            Err(e) => self.failed(e),
        }
        r
    }

    /// Counts a failed operation and marks the sink failing (logged once until it recovers).
    fn failed(&self, e: &anyhow::Error) {
        metrics::counter!("edgeferry_collect_sink_errors_total", "sink" => "nats").increment(1);
        if !self.failing.swap(true, Ordering::Relaxed) {
            tracing::error!("NATS JetStream sink failing, batches are not acknowledged: {e:#}");
            metrics::gauge!("edgeferry_collect_sink_up", "sink" => "nats").set(0.0);
        }
    }

    /// Records the gateway's floor and returns the ranges stored at or above `first_seq`,
    /// with every mark this collector still had pending for the entry written first.
    pub async fn hello(
        &self,
        gateway: &str,
        epoch: u64,
        first_seq: u64,
        cap: usize,
    ) -> Result<Vec<(u64, u64)>> {
        let key = Self::key(gateway, epoch);
        let pending = self.pending.take(&key).await;
        let r = self
            .marks
            .modify(&key, None, |m| {
                let mut changed = m.insert_all(&pending);
                if first_seq > m.floor {
                    m.raise_floor(first_seq);
                    changed = true;
                }
                changed
            })
            .await
            .with_context(|| format!("reading the marks of {gateway} epoch {epoch} from NATS"));
        if r.is_err() {
            self.pending.push(&key, &pending);
        }
        let (m, _) = self.outcome(r)?;
        let from = first_seq.max(m.floor);
        let seqs = m
            .stored
            .iter()
            .filter(|&&(_, hi)| hi >= from)
            .map(|&(lo, hi)| (lo.max(from), hi));
        Ok(seqs.take(cap).collect())
    }

    /// Publishes a batch (its JSON lines); returns once the stream has it durably (with
    /// replicas: replicated), or refused it as stored before. Its mark follows (module
    /// comment).
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
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("{gateway}/{epoch}/{seq}").as_str());
        headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
        headers.insert("Edgeferry-Gateway", gateway);
        headers.insert("Edgeferry-Epoch", epoch.to_string().as_str());
        headers.insert("Edgeferry-Batch", seq.to_string().as_str());
        headers.insert("Edgeferry-Items", items.to_string().as_str());
        headers.insert("Content-Type", "application/x-ndjson");
        let subject = batch_subject(gateway, epoch, seq);
        let _room = match self.publishes.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                metrics::counter!("edgeferry_collect_nats_publish_waits_total").increment(1);
                self.publishes
                    .clone()
                    .acquire_owned()
                    .await
                    .context("the publish limit is closed")?
            }
        };
        // A failed publish is tried again for a while before the batch counts as not stored:
        // a replicated stream is without a leader for a few seconds when a node dies, and a
        // failure here closes the gateway's connection (with thousands of gateways, a storm of
        // reconnects and Hellos on an engine that is busy electing). Trying again is harmless:
        // the message id and the expected subject sequence make a second copy a duplicate.
        let deadline = tokio::time::Instant::now() + PUBLISH_RETRY;
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        let outcome = loop {
            let acked = match self
                .js
                .publish_with_headers(subject.clone(), headers.clone(), lines.clone())
                .await
            {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            match acked {
                Ok(ack) if ack.duplicate => break Stored::Duplicate,
                Ok(_) => break Stored::Written(items),
                // The subject already holds this batch: stored before, by us or another
                // collector, however long ago.
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    break Stored::Duplicate;
                }
                Err(e) => {
                    let e = anyhow::Error::new(e).context(format!("publish to {subject}"));
                    let pause = backoff.next_delay();
                    if tokio::time::Instant::now() + pause >= deadline {
                        return Err(e);
                    }
                    self.failed(&e);
                    metrics::counter!("edgeferry_collect_nats_publish_retries_total").increment(1);
                    tracing::debug!("trying again: {e:#}");
                    tokio::time::sleep(pause).await;
                }
            }
        };
        self.pending.push(&Self::key(gateway, epoch), &[seq]);
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

    /// Waits until the pending marks are written (at most 5 s) and everything published
    /// has reached the server (at shutdown).
    pub async fn flush(&self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !self.pending.is_idle() && tokio::time::Instant::now() < deadline {
            self.pending.wake.notify_one();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
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

    #[tokio::test]
    async fn pending_marks_are_bounded_and_a_hello_takes_those_of_its_entry() {
        let p = PendingMarks::default();
        let many: Vec<u64> = (0..MAX_PENDING_MARKS as u64 + 5).collect();
        p.push("a.1", &many[..10]);
        p.push("b.1", &many[10..]);
        assert_eq!(
            p.lock().len,
            MAX_PENDING_MARKS,
            "the rest is dropped, counted"
        );
        assert_eq!(p.take("a.1").await, (0..10).collect::<Vec<u64>>());
        assert_eq!(p.take("a.1").await, Vec::<u64>::new());
        assert_eq!(p.lock().len, MAX_PENDING_MARKS - 10);
        assert!(!p.is_idle());
    }

    #[test]
    fn marks_merge_ranges_and_ignore_what_is_below_the_floor() {
        let mut m = Marks::default();
        m.raise_floor(3);
        assert!(m.insert_all(&[5, 3, 4, 9, 1]));
        assert_eq!(m.stored, [(3, 5), (9, 9)]);
        assert!(!m.insert_all(&[4, 2]), "nothing new");
        m.raise_floor(5);
        assert_eq!(m.stored, [(5, 5), (9, 9)]);
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
