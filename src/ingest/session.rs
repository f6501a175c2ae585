//! The MQTT session and the commit pipeline (see the module docs of [`crate::ingest`]).

use super::config::MqttConfig;
use super::decode::{Decoder, Reject, TemplateError};
use super::dedup::RecentCommits;
use super::status::IngestStatus;
use crate::backoff::Backoff;
use crate::clock::now_ms;
use crate::model::Reading;
use crate::model::{Committed, RejectedMessage};
use crate::model::{DedupKey, JournalEntry};
use crate::store::StoreError;
use crate::store::journal::Journal;
use crate::telemetry::RateLimit;
use bytes::Bytes;
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, EventLoop, MqttOptions, NetworkOptions, Packet, QoS,
    SubscribeFilter, SubscribeReasonCode, TlsConfiguration, Transport,
};
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Why ingest could not run.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// `[mqtt] url` is not usable.
    #[error("mqtt.url {url:?}: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// A template did not parse (validated earlier; kept for completeness).
    #[error("mqtt.subscribe template: {0}")]
    Template(#[from] TemplateError),
    /// TLS files could not be loaded.
    #[error("mqtt TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The password file could not be read.
    #[error("mqtt.password_file {path}: {source}")]
    Password {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The journal failed: nothing more can be made durable, so ingest stops (and with it
    /// the acknowledgements), leaving everything unacknowledged with the broker.
    #[error("journal: {0}")]
    Journal(#[from] StoreError),
}

/// Tuning that is not part of the configuration file.
#[derive(Debug, Clone)]
pub struct IngestParams {
    /// Readings of new series beyond this are rejected (`[process] max_series`).
    pub max_series: usize,
    /// Series already known (from recovered state), admitted without counting again.
    pub known_series: Vec<String>,
    /// Processing publishes here the lowest journal position it still needs (its checkpoint);
    /// the committer deletes whole segments below it, keeping the dedup tail.
    pub trim_to: Arc<AtomicU64>,
    /// The committer publishes the journal's size here (for the disk quota).
    pub journal_bytes: Arc<AtomicU64>,
    /// While set (disk quota reached with `when_full = "block"`), nothing more is committed
    /// or acknowledged: the broker keeps the messages.
    pub blocked: Arc<std::sync::atomic::AtomicBool>,
    /// The live feed: committed readings are offered to it (sampled; never blocks).
    pub live: Option<crate::live::LiveFeed>,
}

/// One message received from the broker, on its way to the journal.
struct Incoming {
    generation: u64,
    pkid: u16,
    qos: QoS,
    dup: bool,
    topic: String,
    payload: Bytes,
    received_ms: i64,
    received_at: Instant,
    subscription: Option<usize>,
    permit: OwnedSemaphorePermit,
}

/// An acknowledgement to send once everything before it is durable.
///
/// It carries no permit: the permit (the memory bound on undecided messages) is returned as
/// soon as the message is durable. Tying it to the acknowledgement instead would deadlock:
/// acks leave only while the event loop is polled, and the poll task waits for permits.
struct AckRequest {
    generation: u64,
    pkid: u16,
    qos: QoS,
}

/// Runs ingest until `shutdown` is cancelled (then drains and commits what was received)
/// or the journal fails. `ready` becomes true once every subscription is acknowledged.
/// `progress` is bumped by the commit loop at least once a second: it feeds the watchdog.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    cfg: MqttConfig,
    client_id: String,
    params: IngestParams,
    journal: Journal,
    out: mpsc::Sender<Vec<Committed>>,
    publications: mpsc::Receiver<crate::model::Publication>,
    status: Arc<IngestStatus>,
    ready: watch::Sender<bool>,
    progress: Arc<AtomicU64>,
    shutdown: CancellationToken,
) -> Result<Journal, IngestError> {
    let decoders = cfg
        .subscribe
        .iter()
        .map(|s| {
            Decoder::new(
                s.template.as_deref(),
                s.format,
                s.value.as_deref(),
                s.timestamp.as_deref(),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let options = mqtt_options(&cfg, &client_id)?;
    let (client, mut eventloop) = AsyncClient::new(options, cfg.max_unacked + 1024);
    let mut net = NetworkOptions::new();
    // Nagle adds tens of milliseconds to every acknowledgement round trip (measured: receive
    // p99 18–31 ms with it, 5.6 ms without at 5k msg/s).
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(10);
    eventloop.set_network_options(net);

    let permits = Arc::new(Semaphore::new(cfg.max_unacked));
    let (in_tx, in_rx) = mpsc::channel::<Incoming>(cfg.max_unacked);
    // One message per commit group: the poll task writes the whole group's PUBACKs into the
    // socket buffer and flushes once (rumqttc's own ack path flushes after every single ack).
    // Unbounded by type, bounded in practice: at most one entry per commit group not yet
    // written, each a few bytes per message.
    let (ack_tx, ack_rx) = mpsc::unbounded_channel::<Vec<AckRequest>>();
    let generation = Arc::new(AtomicU64::new(0));

    let recent_cap = cfg.max_unacked * 2 + cfg.commit_max;
    let mut recent = RecentCommits::new(recent_cap);
    recent.seed(journal.tail_keys(recent_cap as u64)?);

    let publish_task = tokio::spawn(publish_loop(client.clone(), publications));
    // The poll loop stops on shutdown, or when the committer dies (a journal error): then
    // nothing more can be made durable, so nothing more may be read or acknowledged.
    let stop = shutdown.child_token();
    let committer = tokio::spawn({
        let stop = stop.clone();
        let status = status.clone();
        let cfg = cfg.clone();
        async move {
            let mut c = Committer {
                journal,
                decoders,
                recent,
                series: SeriesGuard::new(params.max_series, params.known_series),
                status,
                future_skew_ms: cfg.future_skew.as_millis() as i64,
                max_payload: cfg.max_payload.as_u64() as usize,
                readings_counters: cfg
                    .subscribe
                    .iter()
                    .map(|s| {
                        metrics::counter!("edgeferry_ingest_readings_total", "subscription" => s.filter.clone())
                    })
                    .collect(),
                log_limit: RateLimit::new(Duration::from_secs(5)),
                trim_to: params.trim_to,
                journal_bytes: params.journal_bytes,
                blocked: params.blocked,
                // On disk only the last few commit groups can be committed-but-unacknowledged
                // when the process dies (acks are written right after each group's sync), so
                // that is the tail kept for seeding after a restart; the in-memory set is
                // larger. Keeping more would count against store.max_disk for nothing.
                keep_tail: (cfg.commit_max as u64 * 4).max(1000),
                live: params.live.map(crate::live::ReadingSampler::new),
                commits: 0,
                dups_in_group: 0,
                key_buf: String::new(),
                crash_after_commits: std::env::var(FAILPOINT_ENV)
                    .ok()
                    .and_then(|v| v.parse().ok()),
            };
            let r = c.run(in_rx, ack_tx, out, &cfg, &progress).await.map(|_| ());
            stop.cancel();
            (c.journal, r)
        }
    });

    poll_loop(
        &cfg,
        client,
        &mut eventloop,
        in_tx,
        permits,
        generation,
        status.clone(),
        ready,
        stop,
        ack_rx,
    )
    .await;
    drop(eventloop);
    let (journal, result) = committer.await.expect("committer task panicked");
    publish_task.abort();
    result?;
    Ok(journal)
}

fn mqtt_options(cfg: &MqttConfig, client_id: &str) -> Result<MqttOptions, IngestError> {
    let bad = |reason: &str| IngestError::Url {
        url: cfg.url.clone(),
        reason: reason.to_string(),
    };
    let url = url::Url::parse(&cfg.url).map_err(|e| bad(&e.to_string()))?;
    let tls = match url.scheme() {
        "mqtt" => false,
        "mqtts" => true,
        other => return Err(bad(&format!("unsupported scheme {other}"))),
    };
    let host = url.host_str().ok_or_else(|| bad("no host"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = url.port().unwrap_or(if tls { 8883 } else { 1883 });
    let mut o = MqttOptions::new(client_id, host, port);
    o.set_clean_session(false)
        .set_manual_acks(true)
        .set_keep_alive(cfg.keep_alive)
        .set_inflight(100)
        .set_request_channel_capacity(cfg.max_unacked + 1024);
    // A packet over rumqttc's limit is a protocol error: the connection drops and the broker
    // redelivers the same message forever (rumqttc's default 10 KiB makes that easy). So the
    // packet limit is far above max_payload, and oversized payloads are rejected by us, with
    // an acknowledgement. Brokers should cap messages below it (`message_size_limit`).
    o.set_max_packet_size(packet_limit(cfg), packet_limit(cfg));
    if let Some(user) = &cfg.username {
        let password = match &cfg.password_file {
            Some(p) => std::fs::read_to_string(p)
                .map_err(|source| IngestError::Password {
                    path: p.display().to_string(),
                    source,
                })?
                .trim_end_matches(['\r', '\n'])
                .to_string(),
            None => String::new(),
        };
        o.set_credentials(user, password);
    }
    if tls {
        let c = crate::tls::client_config(
            cfg.ca_file.as_deref(),
            cfg.cert_file.as_deref(),
            cfg.key_file.as_deref(),
        )?;
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(c),
        )));
    }
    Ok(o)
}

/// The largest MQTT packet accepted: 16 MiB or four times `max_payload`, whichever is larger.
pub fn packet_limit(cfg: &MqttConfig) -> usize {
    (cfg.max_payload.as_u64() as usize)
        .saturating_mul(4)
        .max(16 * 1024 * 1024)
}

/// Connection state, logged once per change rather than once per attempt.
#[derive(Debug, Clone, PartialEq)]
enum LinkState {
    Connecting,
    Up,
    Down(String),
}

#[allow(clippy::too_many_arguments)]
async fn poll_loop(
    cfg: &MqttConfig,
    client: AsyncClient,
    eventloop: &mut EventLoop,
    in_tx: mpsc::Sender<Incoming>,
    permits: Arc<Semaphore>,
    generation: Arc<AtomicU64>,
    status: Arc<IngestStatus>,
    ready: watch::Sender<bool>,
    shutdown: CancellationToken,
    mut acks: mpsc::UnboundedReceiver<Vec<AckRequest>>,
) {
    let filters: Vec<String> = cfg.subscribe.iter().map(|s| s.filter.clone()).collect();
    let mut backoff = Backoff::new(Duration::from_millis(200), cfg.reconnect_max);
    let mut state = LinkState::Connecting;
    let mut in_tx = Some(in_tx);
    let mut pending_sub: Option<u16> = None;
    let mut ever_connected = false;
    let stalls = RateLimit::new(Duration::from_secs(10));
    loop {
        if in_tx.is_none() {
            break;
        }
        let ev = tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                in_tx = None;
                continue;
            }
            Some(group) = acks.recv() => {
                let since = Instant::now();
                write_acks(eventloop, group, &generation).await;
                slow_wait(&stalls, Wait::AckWrite, since);
                continue;
            }
            ev = eventloop.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                if ack.code != ConnectReturnCode::Success {
                    continue;
                }
                backoff.reset();
                if ever_connected {
                    status.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                ever_connected = true;
                if !ack.session_present {
                    // Acks still queued for the previous connection would now acknowledge
                    // *new* messages that reuse those packet ids; a new generation makes the
                    // ack task drop them (their messages are durable already).
                    generation.fetch_add(1, Ordering::SeqCst);
                }
                status.connected.store(true, Ordering::Relaxed);
                status.set_error(None);
                if state != LinkState::Up {
                    tracing::info!(
                        session_present = ack.session_present,
                        "connected to MQTT broker {}",
                        cfg.url
                    );
                    state = LinkState::Up;
                }
                // Subscribe on every connect: rumqttc does not resubscribe when the broker
                // lost the session, and re-subscribing a live session is harmless.
                let subs = filters
                    .iter()
                    .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
                match client.try_subscribe_many(subs) {
                    Ok(()) => pending_sub = Some(0),
                    Err(e) => tracing::error!("cannot queue subscription: {e}"),
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let refused: Vec<_> = ack
                    .return_codes
                    .iter()
                    .zip(&filters)
                    .filter(|(c, _)| matches!(c, SubscribeReasonCode::Failure))
                    .map(|(_, f)| f.as_str())
                    .collect();
                if refused.is_empty() {
                    status.subscribed.store(true, Ordering::Relaxed);
                    if pending_sub.take().is_some() {
                        tracing::info!(filters = ?filters, "subscribed with QoS 1");
                    }
                    let _ = ready.send(true);
                } else {
                    tracing::error!(
                        ?refused,
                        "the broker refused these subscriptions; check its ACLs for this user"
                    );
                    status.set_error(Some(format!("subscription refused: {refused:?}")));
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                status.messages.fetch_add(1, Ordering::Relaxed);
                if p.retain {
                    // A retained copy is resent on every (re)subscribe; it is a reading we
                    // saw live already (or a stale one from before edgeferry ran).
                    metrics::counter!("edgeferry_ingest_retained_ignored_total").increment(1);
                    // Acknowledge through the same ordered path as everything else.
                    let since = Instant::now();
                    let permit = acquire(&permits, &shutdown).await;
                    slow_wait(&stalls, Wait::Permits, since);
                    let Some(permit) = permit else {
                        in_tx = None;
                        continue;
                    };
                    forward(
                        &mut in_tx,
                        &shutdown,
                        retained_marker(&p, &generation, permit),
                    )
                    .await;
                    continue;
                }
                let subscription = filters.iter().position(|f| topic_matches(f, &p.topic));
                let since = Instant::now();
                let permit = acquire(&permits, &shutdown).await;
                slow_wait(&stalls, Wait::Permits, since);
                let Some(permit) = permit else {
                    in_tx = None;
                    continue;
                };
                let incoming = Incoming {
                    generation: generation.load(Ordering::SeqCst),
                    pkid: p.pkid,
                    qos: p.qos,
                    dup: p.dup,
                    topic: p.topic,
                    payload: p.payload,
                    received_ms: now_ms(),
                    received_at: Instant::now(),
                    subscription,
                    permit,
                };
                let since = Instant::now();
                forward(&mut in_tx, &shutdown, incoming).await;
                slow_wait(&stalls, Wait::Committer, since);
            }
            Ok(_) => {}
            Err(e) => {
                status.connected.store(false, Ordering::Relaxed);
                status.subscribed.store(false, Ordering::Relaxed);
                let mut msg = e.to_string();
                if matches!(
                    e,
                    rumqttc::ConnectionError::MqttState(rumqttc::StateError::Deserialization(
                        rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(_)
                    ))
                ) {
                    msg = format!(
                        "{msg}: a message larger than {} bytes is stuck in the broker's queue; \
                         set `message_size_limit` in mosquitto.conf below that",
                        packet_limit(cfg)
                    );
                }
                status.set_error(Some(msg.clone()));
                // Compare without digits: the same failure often carries a changing time
                // or counter, and must still be logged once, not once per attempt.
                let next = LinkState::Down(crate::telemetry::failure_key(&msg));
                if state != next {
                    tracing::warn!(
                        "MQTT broker {} unreachable: {msg}; retrying with backoff",
                        cfg.url
                    );
                    state = next;
                }
                let pause = backoff.next_delay();
                tokio::select! {
                    _ = shutdown.cancelled() => { in_tx = None; }
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
    // Flush: the committer commits what it already has and then drops its sender; write
    // every acknowledgement it sends until then (bounded by a deadline), then say goodbye.
    // Anything received but not committed stays unacknowledged and the broker redelivers it
    // to the next session.
    drop(in_tx);
    let deadline = tokio::time::sleep(Duration::from_secs(5));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            biased;
            _ = &mut deadline => break,
            g = acks.recv() => match g {
                Some(group) => write_acks(eventloop, group, &generation).await,
                None => break,
            },
            ev = eventloop.poll() => if ev.is_err() { break },
        }
    }
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
}

/// A retained delivery only needs its acknowledgement, in order with the rest.
fn retained_marker(
    p: &rumqttc::Publish,
    generation: &AtomicU64,
    permit: OwnedSemaphorePermit,
) -> Incoming {
    Incoming {
        generation: generation.load(Ordering::SeqCst),
        pkid: p.pkid,
        qos: p.qos,
        dup: p.dup,
        topic: String::new(),
        payload: Bytes::new(),
        received_ms: now_ms(),
        received_at: Instant::now(),
        subscription: None,
        permit,
    }
}

/// Waits of the poll loop longer than this are logged and counted: meanwhile edgeferry reads
/// nothing from the broker and acknowledges nothing, so a stall of the whole chain shows up
/// here if edgeferry is its cause (and not here if the broker is).
const SLOW_WAIT: Duration = Duration::from_millis(250);

/// What the poll loop waited for.
#[derive(Debug, Clone, Copy)]
enum Wait {
    /// Writing a commit group's PUBACKs into the socket (the broker is not reading).
    AckWrite,
    /// A memory permit (`max_unacked` messages received and not yet committed).
    Permits,
    /// Room in the committer's queue.
    Committer,
}

impl Wait {
    fn label(self) -> &'static str {
        match self {
            Wait::AckWrite => "ack_write",
            Wait::Permits => "permits",
            Wait::Committer => "committer_queue",
        }
    }
}

fn slow_wait(limit: &RateLimit, what: Wait, since: Instant) {
    let waited = since.elapsed();
    if waited < SLOW_WAIT {
        return;
    }
    metrics::counter!("edgeferry_ingest_poll_stalls_total", "cause" => what.label()).increment(1);
    if let Some(hidden) = limit.check(what.label()) {
        tracing::warn!(
            waited_ms = waited.as_millis() as u64,
            similar_hidden = hidden,
            "MQTT poll loop stalled waiting for {what:?}: nothing read from or acknowledged to the broker meanwhile"
        );
    }
}

async fn acquire(
    permits: &Arc<Semaphore>,
    shutdown: &CancellationToken,
) -> Option<OwnedSemaphorePermit> {
    if let Ok(p) = permits.clone().try_acquire_owned() {
        return Some(p);
    }
    metrics::counter!("edgeferry_ingest_backpressure_total").increment(1);
    tokio::select! {
        p = permits.clone().acquire_owned() => p.ok(),
        _ = shutdown.cancelled() => None,
    }
}

async fn forward(
    in_tx: &mut Option<mpsc::Sender<Incoming>>,
    shutdown: &CancellationToken,
    incoming: Incoming,
) {
    let Some(tx) = in_tx.as_ref() else { return };
    // Almost always there is room: skip the select! (and its cancellation waiter).
    let incoming = match tx.try_send(incoming) {
        Ok(()) => return,
        Err(mpsc::error::TrySendError::Closed(_)) => {
            *in_tx = None;
            return;
        }
        Err(mpsc::error::TrySendError::Full(m)) => m,
    };
    tokio::select! {
        r = tx.send(incoming) => if r.is_err() { *in_tx = None; },
        _ = shutdown.cancelled() => { *in_tx = None; }
    }
}

/// MQTT topic filter matching (`+` one level, `#` the rest).
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Publishes alerts on the local broker (QoS 1). A separate task because `publish` can wait
/// for room in rumqttc's request queue, which must never stall the poll loop.
async fn publish_loop(client: AsyncClient, mut rx: mpsc::Receiver<crate::model::Publication>) {
    while let Some(p) = rx.recv().await {
        match client
            .publish(p.topic.clone(), QoS::AtLeastOnce, false, p.payload)
            .await
        {
            Ok(()) => {
                metrics::counter!("edgeferry_alerts_published_total").increment(1);
                if let Some(t) = p.received_at {
                    metrics::histogram!("edgeferry_alert_latency_seconds")
                        .record(t.elapsed().as_secs_f64());
                }
            }
            Err(e) => tracing::warn!(topic = %p.topic, "alert not published: {e}"),
        }
    }
}

/// Writes a commit group's PUBACKs straight into the connection's write buffer and flushes
/// once. Acks of an older connection generation (the broker lost the session) are dropped:
/// their messages are durable, and the packet ids now belong to new messages. Without a
/// connection they are dropped too: the broker redelivers those messages (DUP) and the
/// committer recognises them.
async fn write_acks(eventloop: &mut EventLoop, group: Vec<AckRequest>, generation: &AtomicU64) {
    let current = generation.load(Ordering::SeqCst);
    let Some(net) = eventloop.network.as_mut() else {
        metrics::counter!("edgeferry_ingest_acks_unsent_total").increment(group.len() as u64);
        return;
    };
    let mut written = 0usize;
    for a in group {
        if a.qos == QoS::AtMostOnce {
            continue;
        }
        if a.generation != current {
            metrics::counter!("edgeferry_ingest_stale_acks_dropped_total").increment(1);
            continue;
        }
        let req = rumqttc::Request::PubAck(rumqttc::PubAck::new(a.pkid));
        match eventloop.state.handle_outgoing_packet(req) {
            Ok(Some(packet)) => {
                if let Err(e) = net.write(packet).await {
                    tracing::debug!("ack not written: {e}");
                    return;
                }
                written += 1;
            }
            Ok(None) => {}
            Err(e) => tracing::debug!("ack refused by client state: {e}"),
        }
    }
    // handle_outgoing_packet queues an "outgoing PubAck" event per ack; nobody needs them.
    eventloop
        .state
        .events
        .retain(|e| !matches!(e, Event::Outgoing(rumqttc::Outgoing::PubAck(_))));
    if written > 0
        && let Err(e) = net.flush().await
    {
        tracing::debug!("acks not flushed: {e}");
    }
}

/// Admits at most `max` distinct series; readings of new series beyond it are rejected.
struct SeriesGuard {
    max: usize,
    known: HashSet<String>,
}

impl SeriesGuard {
    fn new(max: usize, known: Vec<String>) -> Self {
        let mut k = HashSet::with_capacity(known.len().min(max));
        for s in known.into_iter().take(max) {
            k.insert(s);
        }
        Self { max, known: k }
    }

    fn admit(&mut self, key: &str) -> bool {
        if self.known.contains(key) {
            return true;
        }
        if self.known.len() >= self.max {
            return false;
        }
        self.known.insert(key.to_owned());
        true
    }
}

struct Committer {
    journal: Journal,
    decoders: Vec<Decoder>,
    recent: RecentCommits,
    series: SeriesGuard,
    status: Arc<IngestStatus>,
    future_skew_ms: i64,
    max_payload: usize,
    /// Per-subscription counters, registered once (a registry lookup per message is not free
    /// at 100k+ messages/s).
    readings_counters: Vec<metrics::Counter>,
    log_limit: RateLimit,
    trim_to: Arc<AtomicU64>,
    journal_bytes: Arc<AtomicU64>,
    blocked: Arc<std::sync::atomic::AtomicBool>,
    live: Option<crate::live::ReadingSampler>,
    keep_tail: u64,
    commits: u64,
    dups_in_group: u64,
    crash_after_commits: Option<u64>,
    /// Scratch buffer for series keys.
    key_buf: String,
}

/// Test failpoint: `EDGEFERRY_FAILPOINT_CRASH_AFTER_COMMITS=N` aborts the process right after
/// the N-th journal sync, before its acknowledgements are sent. The crash-torture test uses it
/// to hit the narrowest window of the durability chain on purpose rather than by luck.
pub const FAILPOINT_ENV: &str = "EDGEFERRY_FAILPOINT_CRASH_AFTER_COMMITS";

/// The reason labels ingest adds to the decoders' own.
pub const INGEST_REASONS: &[&str] = &[
    "too_large",
    "too_many_series",
    "future_timestamp",
    "no_subscription",
];

impl Committer {
    async fn run(
        &mut self,
        mut rx: mpsc::Receiver<Incoming>,
        ack_tx: mpsc::UnboundedSender<Vec<AckRequest>>,
        out: mpsc::Sender<Vec<Committed>>,
        cfg: &MqttConfig,
        progress: &AtomicU64,
    ) -> Result<(), IngestError> {
        let mut group: Vec<Incoming> = Vec::with_capacity(cfg.commit_max);
        let mut acks: Vec<AckRequest> = Vec::with_capacity(cfg.commit_max);
        let mut committed: Vec<Committed> = Vec::with_capacity(cfg.commit_max);
        let mut readings: Vec<Reading> = Vec::new();
        let mut permits: Vec<OwnedSemaphorePermit> = Vec::with_capacity(cfg.commit_max);
        let mut closed = false;
        while !closed {
            progress.store(now_ms() as u64, Ordering::Relaxed);
            if self.blocked.load(Ordering::Relaxed) {
                // Processing keeps checkpointing while ingest is held: keep trimming so the
                // journal gives its share of the quota back.
                self.trim()?;
                self.journal_bytes
                    .store(self.journal.disk_bytes(), Ordering::Relaxed);
                // Backpressure: stop taking messages; the channel fills, the poll task stops
                // reading and the broker queues for us.
                tokio::time::sleep(Duration::from_millis(100)).await;
                if rx.is_closed() {
                    // Shutting down: what is still queued was never acknowledged and the
                    // broker redelivers it to the next session.
                    break;
                }
                continue;
            }
            let first = tokio::select! {
                m = rx.recv() => m,
                _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
            };
            let Some(first) = first else { break };
            group.push(first);
            // Gather the group: take whatever is queued at once (`recv_many`), one timer for
            // the whole group rather than one per message.
            let deadline = tokio::time::sleep(cfg.commit_interval);
            tokio::pin!(deadline);
            while group.len() < cfg.commit_max {
                let room = cfg.commit_max - group.len();
                tokio::select! {
                    n = rx.recv_many(&mut group, room) => if n == 0 { closed = true; break; },
                    _ = &mut deadline => break,
                }
            }
            // Decode, append and sync the whole group in one `block_in_place`: each call
            // hands this worker's core to another thread, which is far too dear per message.
            let oldest = group.first().map(|m| m.received_at);
            tokio::task::block_in_place(|| {
                self.commit_group(
                    &mut group,
                    &mut readings,
                    &mut committed,
                    &mut acks,
                    &mut permits,
                )
            })?;
            if self.dups_in_group > 0 {
                tracing::info!(
                    "dropped {} redelivered message(s) already in the journal (duplicates dropped)",
                    self.dups_in_group
                );
                self.dups_in_group = 0;
            }
            self.trim()?;
            let commit_latency = oldest.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
            metrics::histogram!("edgeferry_ingest_commit_seconds").record(commit_latency);
            let jb = self.journal.disk_bytes();
            self.journal_bytes.store(jb, Ordering::Relaxed);
            metrics::gauge!("edgeferry_journal_bytes").set(jb as f64);
            // Durable now: the memory they held is free, acknowledge in order, then hand on
            // to processing.
            permits.clear();
            if !acks.is_empty() {
                let group = std::mem::replace(&mut acks, Vec::with_capacity(cfg.commit_max));
                let _ = ack_tx.send(group);
            }
            if let Some(live) = self.live.as_mut().filter(|l| l.active()) {
                let now = now_ms();
                live.offer(now, committed.iter().flat_map(|c| &c.entry.readings));
            }
            if !committed.is_empty() {
                // One hand-off per group, not per record.
                let n: u64 = committed
                    .iter()
                    .map(|c| c.entry.readings.len() as u64)
                    .sum();
                let batch = std::mem::replace(&mut committed, Vec::with_capacity(cfg.commit_max));
                if out.send(batch).await.is_err() {
                    // Processing stopped (shutdown); the journal has it, replay will see it.
                } else {
                    self.status.readings.fetch_add(n, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    /// Journals a gathered group and makes it durable: decode and append every message
    /// (acknowledgements and permits are collected for all of them, rejected ones included),
    /// then one `fdatasync`. Blocking: called inside `block_in_place`.
    fn commit_group(
        &mut self,
        group: &mut Vec<Incoming>,
        readings: &mut Vec<Reading>,
        committed: &mut Vec<Committed>,
        acks: &mut Vec<AckRequest>,
        permits: &mut Vec<OwnedSemaphorePermit>,
    ) -> Result<(), IngestError> {
        let mut appended = 0usize;
        for m in group.drain(..) {
            if let Some(entry) = self.accept(&m, readings) {
                let lsn = self.journal.append(&entry)?;
                self.recent.insert(entry.dedup);
                committed.push(Committed {
                    lsn,
                    entry,
                    received_at: Some(m.received_at),
                });
                appended += 1;
            }
            acks.push(AckRequest {
                generation: m.generation,
                pkid: m.pkid,
                qos: m.qos,
            });
            permits.push(m.permit);
        }
        if appended > 0 {
            self.journal.sync()?;
            self.commits += 1;
            if self.crash_after_commits == Some(self.commits) {
                // Failpoint (tests only): die in the narrowest window of the chain, after
                // the journal is durable and before any acknowledgement left.
                std::process::abort();
            }
        }
        Ok(())
    }

    /// Decides what to do with one message: `Some(entry)` to journal, `None` when it is a
    /// recognised duplicate, a retained copy or rejected (all of which are still acknowledged).
    fn accept(&mut self, m: &Incoming, readings: &mut Vec<Reading>) -> Option<JournalEntry> {
        if m.topic.is_empty() {
            return None; // retained-copy marker
        }
        let dedup = DedupKey::new(m.pkid, &m.topic, &m.payload);
        if m.dup && m.qos != QoS::AtMostOnce && self.recent.contains(&dedup) {
            self.status.duplicates.fetch_add(1, Ordering::Relaxed);
            self.dups_in_group += 1;
            metrics::counter!("edgeferry_ingest_duplicates_dropped_total").increment(1);
            return None;
        }
        let Some(sub) = m.subscription else {
            self.reject(
                m,
                "no_subscription",
                "topic matches no [[mqtt.subscribe]] filter".into(),
            );
            return None;
        };
        if m.payload.len() > self.max_payload {
            self.reject(
                m,
                "too_large",
                format!(
                    "payload of {} bytes exceeds mqtt.max_payload ({} bytes)",
                    m.payload.len(),
                    self.max_payload
                ),
            );
            return None;
        }
        readings.clear();
        if let Err(r) = self.decoders[sub].decode(&m.topic, &m.payload, m.received_ms, readings) {
            self.reject_decode(m, &r);
            return None;
        }
        let limit = m.received_ms + self.future_skew_ms;
        if let Some(r) = readings.iter().find(|r| r.time_ms > limit) {
            let detail = format!(
                "event time {} ms is {} s ahead of this gateway's clock (mqtt.future_skew allows {} s)",
                r.time_ms,
                (r.time_ms - m.received_ms) / 1000,
                self.future_skew_ms / 1000
            );
            self.reject(m, "future_timestamp", detail);
            return None;
        }
        let mut kept = Vec::with_capacity(readings.len());
        for r in readings.drain(..) {
            // The key is built in a reused buffer: only a new series allocates.
            self.key_buf.clear();
            crate::model::write_series_key(&mut self.key_buf, &r.metric, &r.tags);
            if self.series.admit(&self.key_buf) {
                kept.push(r);
            } else {
                metrics::counter!("edgeferry_ingest_rejected_total", "reason" => "too_many_series")
                    .increment(1);
                self.status.rejected.fetch_add(1, Ordering::Relaxed);
                if let Some(n) = self.log_limit.check("too_many_series") {
                    tracing::warn!(
                        topic = %m.topic,
                        suppressed = n,
                        "reading of a new series {} rejected: process.max_series ({}) reached",
                        r.series_key(),
                        self.series.max
                    );
                }
            }
        }
        if kept.is_empty() {
            return None;
        }
        self.readings_counters[sub].increment(kept.len() as u64);
        Some(JournalEntry {
            dedup,
            received_ms: m.received_ms,
            subscription: sub as u16,
            readings: kept,
        })
    }

    /// Deletes journal segments that processing no longer needs, always keeping the last
    /// `keep_tail` records so redeliveries after a crash can still be recognised.
    fn trim(&mut self) -> Result<(), IngestError> {
        let safe = self.trim_to.load(Ordering::Acquire);
        let keep = self.journal.next_lsn().saturating_sub(self.keep_tail);
        let to = safe.min(keep);
        if to > self.journal.first_lsn() {
            let freed = tokio::task::block_in_place(|| self.journal.trim_before(to))?;
            if freed > 0 {
                tracing::debug!(freed, to, "journal trimmed");
            }
        }
        Ok(())
    }

    fn reject_decode(&self, m: &Incoming, r: &Reject) {
        self.reject(m, r.reason(), r.to_string());
    }

    fn reject(&self, m: &Incoming, reason: &'static str, detail: String) {
        self.status.rejected.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("edgeferry_ingest_rejected_total", "reason" => reason).increment(1);
        if let Some(n) = self.log_limit.check(reason) {
            tracing::warn!(topic = %m.topic, reason, suppressed = n, "payload rejected: {detail}");
        }
        let preview: String =
            String::from_utf8_lossy(&m.payload[..m.payload.len().min(120)]).into_owned();
        self.status.remember_reject(RejectedMessage {
            time: crate::util::rfc3339_ms(m.received_ms),
            topic: m.topic.clone(),
            reason: reason.to_string(),
            detail,
            payload: preview,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_filter_matching_follows_mqtt_rules() {
        assert!(topic_matches("sensors/#", "sensors/a/b"));
        assert!(topic_matches("sensors/#", "sensors"));
        assert!(topic_matches("sensors/+/t", "sensors/a/t"));
        assert!(!topic_matches("sensors/+/t", "sensors/a/b/t"));
        assert!(!topic_matches("sensors/a", "sensors/b"));
        assert!(topic_matches("#", "x/y"));
    }

    #[test]
    fn only_poll_loop_waits_over_the_threshold_are_reported() {
        let limit = RateLimit::new(Duration::from_secs(10));
        slow_wait(&limit, Wait::Permits, Instant::now());
        assert_eq!(
            limit.check("permits"),
            Some(0),
            "a short wait reports nothing"
        );
        let long_ago = Instant::now() - SLOW_WAIT - Duration::from_millis(10);
        slow_wait(&limit, Wait::AckWrite, long_ago);
        assert_eq!(
            limit.check("ack_write"),
            None,
            "a long wait was just logged"
        );
    }

    #[test]
    fn series_guard_admits_known_series_beyond_the_limit_but_no_new_ones() {
        let mut g = SeriesGuard::new(2, vec!["a".into()]);
        assert!(g.admit("b"));
        assert!(!g.admit("c"));
        assert!(g.admit("a"));
        assert!(g.admit("b"));
    }
}
