//! The MQTT session and the commit pipeline (see the module docs of [`crate::ingest`]).

use super::commit::{Committer, SeriesGuard};
pub use super::commit::{FAILPOINT_ENV, INGEST_REASONS};
use super::config::MqttConfig;
use super::decode::sparkplug::SparkplugState;
use super::dedup::RecentCommits;
pub use super::error::IngestError;
use super::poll::{AckRequest, Incoming, SubscriptionState, poll_loop, publish_loop};
use super::status::IngestStatus;
use super::subscriptions::{SubscriptionChange, Subscriptions};
use crate::broker::BrokerUrl;
use crate::model::CommitGroup;
use crate::store::journal::Journal;
use crate::telemetry::RateLimit;
use rumqttc::{AsyncClient, MqttOptions, NetworkOptions};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Tuning that is not part of the configuration file.
#[derive(Debug)]
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
    /// Arrival times, and whether the wall clock may judge a sensor's timestamp.
    pub clock: Arc<crate::clock::GatewayClock>,
    /// Where the Sparkplug B node files are kept, below (none: in memory only).
    pub state_dir: Option<std::path::PathBuf>,
    /// Configuration reloads send new `[[mqtt.subscribe]]` lists here (none: fixed).
    pub subscription_changes: Option<mpsc::Receiver<SubscriptionChange>>,
}

/// Runs ingest until `shutdown` is cancelled (then drains and commits what was received)
/// or the journal fails. `ready` becomes true once every subscription is acknowledged.
/// `progress` is bumped by the commit loop at least once a second: it feeds the watchdog.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    cfg: MqttConfig,
    client_id: String,
    mut params: IngestParams,
    journal: Journal,
    out: mpsc::Sender<CommitGroup>,
    publications: mpsc::Receiver<crate::model::Publication>,
    status: Arc<IngestStatus>,
    ready: watch::Sender<bool>,
    progress: Arc<AtomicU64>,
    shutdown: CancellationToken,
) -> Result<Journal, IngestError> {
    // A journal with records means an earlier run subscribed with a persistent session.
    status
        .expect_session
        .store(journal.next_lsn() > 0, std::sync::atomic::Ordering::Relaxed);
    let table = Arc::new(Subscriptions::new(&cfg.subscribe)?);
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
    let timed: Vec<bool> = (0..table.filters.len())
        .map(|i| table.reads_timestamps(i))
        .collect();
    let tail = journal.tail_keys(recent_cap as u64, &timed)?;
    let identities = cfg.dedup_by_identity.then(|| {
        let mut ids = RecentCommits::new(recent_cap);
        ids.seed(tail.iter().filter_map(|(_, id)| *id));
        ids
    });
    recent.seed(tail.into_iter().map(|(k, _)| k));

    let publish_task = tokio::spawn(publish_loop(client.clone(), publications));
    let params_clock = params.clock.clone();
    let subscription_changes = params.subscription_changes.take();
    let params_blocked = params.blocked.clone();
    // The poll loop stops on shutdown, or when the committer dies (a journal error): then
    // nothing more can be made durable, so nothing more may be read or acknowledged.
    let stop = shutdown.child_token();
    let committer_table = table.clone();
    let sparkplug_dir = params
        .state_dir
        .as_ref()
        .map(|d| d.join(super::decode::sparkplug::STATE_DIR));
    let sparkplug = match &sparkplug_dir {
        Some(dir) => SparkplugState::load(dir, params.max_series),
        None => SparkplugState::new(params.max_series),
    };
    if sparkplug.nodes() > 0 {
        tracing::info!(nodes = sparkplug.nodes(), "Sparkplug B state loaded");
    }
    let commands = client.clone();
    let committer = tokio::spawn({
        let stop = stop.clone();
        let status = status.clone();
        let cfg = cfg.clone();
        async move {
            let mut c = Committer {
                journal,
                subs: committer_table,
                recent,
                identities,
                identity_window: (u64::MAX, 0),
                group_identities: Default::default(),
                series: SeriesGuard::new(params.max_series, params.known_series),
                status,
                future_skew_ms: cfg.future_skew.as_millis() as i64,
                clock: params.clock.clone(),
                max_payload: cfg.max_payload.as_u64() as usize,
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
                sparkplug,
                sparkplug_dir,
                commands: Some(commands),
                group_offline: Vec::new(),
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
        &params_clock,
        &params_blocked,
        SubscriptionState::new(table, subscription_changes),
    )
    .await;
    drop(eventloop);
    let (journal, result) = committer.await.expect("committer task panicked");
    publish_task.abort();
    result?;
    Ok(journal)
}

fn mqtt_options(cfg: &MqttConfig, client_id: &str) -> Result<MqttOptions, IngestError> {
    let broker = BrokerUrl::parse(&cfg.url).map_err(|e| IngestError::Url {
        url: cfg.url.clone(),
        reason: e.to_string(),
    })?;
    let tls = if broker.tls {
        Some(crate::tls::client_config(
            cfg.ca_file.as_deref(),
            cfg.cert_file.as_deref(),
            cfg.key_file.as_deref(),
        )?)
    } else {
        None
    };
    let mut o = broker.options(client_id, tls);
    o.set_clean_session(false)
        .set_manual_acks(true)
        .set_keep_alive(cfg.keep_alive)
        .set_inflight(100)
        .set_request_channel_capacity(cfg.max_unacked + 1024);
    // A packet over rumqttc's limit is a protocol error: the connection drops and the broker
    // redelivers the same message forever (rumqttc's default 10 KiB makes that easy). So the
    // packet limit is far above max_payload, and oversized payloads are rejected by us, with
    // an acknowledgement. Brokers should cap messages below it (`message_size_limit`).
    o.set_max_packet_size(cfg.packet_limit(), cfg.packet_limit());
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
    Ok(o)
}
