//! Configuration reload on SIGHUP (`systemctl reload edgeferry`): the file is read again and
//! what may change while the daemon runs is put into effect without a restart.
//!
//! ```text
//!  SIGHUP ─▶ load + validate the file (as check-config) ── problems ─▶ logged, "invalid"
//!            compare with the configuration in effect, key by key
//!              a key outside LIVE_KEYS changed ─▶ named in the log, "refused"
//!              nothing changed ─▶ "unchanged"
//!            admin.listen changed: bind the new address first ── fails ─▶ "failed"
//!            rules, upstream batching ─▶ processing (answered once in effect)
//!            mqtt.subscribe ─▶ the live session (answered once the broker acknowledged)
//!            log.level ─▶ the log filter;  admin ─▶ serve on the new address
//!            upstream ─▶ stop the link, start one with the new settings ─▶ "applied"
//! ```
//!
//! Each outcome is counted in `edgeferry_config_reloads_total{result}`. Whatever the outcome
//! but "applied", the daemon runs on exactly as before: the steps that can fail (binding the
//! new admin address, reading the store epoch for a new link) come before anything changes.
//!
//! Why these keys and no others: the journal, the checkpoint and the outbox are laid out by
//! `gateway`, `process` and `store` (a different data directory or window set would be a
//! different state), the session's identity and commit pipeline by the rest of `[mqtt]`, and
//! the clock and log format are fixed at start. A restart applies those in the ordinary,
//! crash-safe way. The environment overrides are those of the running process (another
//! process cannot change them), so they apply on reload as they did at start.

use crate::admin::Admin;
use crate::config::Config;
use crate::forward::link::{HealthSource, Link, LinkParts};
use crate::forward::mqtt::MqttTransport;
use crate::forward::ws::WsTransport;
use crate::forward::{ForwardStatus, UpstreamConfig};
use crate::ingest::subscriptions::{Resubscribed, SubscriptionChange};
use crate::process::ProcessChange;
use crate::store::outbox::Outbox;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The keys (and everything below them) that a reload changes in place.
pub const LIVE_KEYS: &[&str] = &["rules", "mqtt.subscribe", "log.level", "admin", "upstream"];

/// How long a reload waits for each part to answer (processing, the broker's SUBACK, the old
/// upstream link to stop). A part that does not answer in time is logged; the reload is
/// counted as applied, since the change is in effect on that part's side once it gets to it.
const PART_TIMEOUT: Duration = Duration::from_secs(10);

/// The outcome of one reload, as counted in `edgeferry_config_reloads_total{result}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The changed keys are in effect.
    Applied(Vec<String>),
    /// The file says what is in effect already.
    Unchanged,
    /// The file could not be read or has problems (every one listed): nothing changed.
    Invalid(Vec<String>),
    /// Keys that cannot change while the daemon runs were changed (named): nothing changed.
    Refused(Vec<String>),
    /// A change could not be made (named): nothing changed.
    Failed(String),
}

impl Outcome {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Applied(_) => "applied",
            Outcome::Unchanged => "unchanged",
            Outcome::Invalid(_) => "invalid",
            Outcome::Refused(_) => "refused",
            Outcome::Failed(_) => "failed",
        }
    }

    /// Logs what happened, in the words an operator acts on.
    fn log(&self, path: &Path) {
        let file = path.display();
        match self {
            Outcome::Applied(keys) => {
                tracing::info!(
                    "configuration reloaded from {file}: {} changed",
                    keys.join(", ")
                )
            }
            Outcome::Unchanged => {
                tracing::info!("configuration reloaded from {file}: nothing changed")
            }
            Outcome::Invalid(problems) => {
                tracing::error!(
                    "configuration reload refused: {file} has {} problem(s); the daemon keeps \
                     running with the configuration it had",
                    problems.len()
                );
                for p in problems {
                    tracing::error!("  - {p}");
                }
            }
            Outcome::Refused(keys) => tracing::error!(
                "configuration reload refused: {} cannot change while edgeferry runs (restart \
                 it to apply them); nothing changed, the daemon keeps running with the \
                 configuration it had",
                keys.join(", ")
            ),
            Outcome::Failed(why) => tracing::error!(
                "configuration reload failed: {why}; nothing changed, the daemon keeps running \
                 with the configuration it had"
            ),
        }
    }
}

/// The dotted keys whose values differ between `old` and `new` (a table is compared key by
/// key, anything else, lists included, as one value).
pub fn changed_keys(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    match (serde_json::to_value(old), serde_json::to_value(new)) {
        (Ok(old), Ok(new)) => diff("", &old, &new, &mut out),
        // Not seen (every map key of a configuration is a string); if it happened, refuse
        // rather than guess.
        _ => out.push("(the configuration as a whole)".into()),
    }
    out
}

fn diff(at: &str, old: &Value, new: &Value, out: &mut Vec<String>) {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let path = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => diff(&path, x, y, out),
                    (x, y) => {
                        if x.unwrap_or(&Value::Null) != y.unwrap_or(&Value::Null) {
                            out.push(path);
                        }
                    }
                }
            }
        }
        (a, b) if a != b => out.push(at.to_string()),
        _ => {}
    }
}

/// Whether `key` changes in place ([`LIVE_KEYS`]).
pub fn is_live(key: &str) -> bool {
    LIVE_KEYS
        .iter()
        .any(|k| key == *k || key.strip_prefix(k).is_some_and(|r| r.starts_with('.')))
}

/// `[upstream]`'s batching limits, or the defaults without one (as at start).
pub fn batching(upstream: Option<&UpstreamConfig>) -> (usize, Duration) {
    upstream.map_or((500, Duration::from_secs(1)), |u| (u.batch_max, u.linger))
}

/// The admin endpoint: serves until replaced by one on a new address (or shutdown).
pub struct AdminSlot {
    /// What the endpoint reports (shared state; cloned into each server).
    pub admin: Admin,
    /// Where the bound address is recorded for `edgeferry status`.
    pub data_dir: PathBuf,
    /// The daemon's shutdown token (each server runs under a child of it).
    pub shutdown: CancellationToken,
    /// The daemon's tasks.
    pub tasks: TaskTracker,
    /// Stops the current server and its address recorder.
    pub stop: CancellationToken,
}

impl AdminSlot {
    /// Binds `listen` (nothing else changes if that fails).
    pub async fn bind(listen: &str) -> Result<tokio::net::TcpListener, String> {
        tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| format!("admin.listen {listen}: {e}"))
    }

    /// Serves on `listener` from now on; the server before it stops (its `/live` clients are
    /// told the endpoint closed, as at shutdown).
    pub fn replace(&mut self, listener: tokio::net::TcpListener) {
        let stop = self.shutdown.child_token();
        if let Ok(bound) = listener.local_addr() {
            tracing::info!("admin now listening on {bound}");
            self.tasks.spawn(crate::admin::record_addr_until_done(
                self.data_dir.clone(),
                bound,
                stop.clone(),
            ));
        }
        self.tasks.spawn(crate::admin::serve(
            listener,
            self.admin.clone(),
            stop.clone(),
        ));
        std::mem::replace(&mut self.stop, stop).cancel();
    }
}

/// The upstream link: replaced by one with the new settings when `[upstream]` changes.
pub struct UpstreamSlot {
    /// `[gateway] id`.
    pub gateway: String,
    /// The data directory (its `epoch` file is read again for each new link: a link may have
    /// renewed it).
    pub data_dir: PathBuf,
    /// Shared with processing.
    pub outbox: Arc<Mutex<Outbox>>,
    /// Processing's checkpointed positions (each link gets a receiver).
    pub watermark: watch::Receiver<[u64; 2]>,
    /// The link's state, kept across links (its counters go on).
    pub status: Arc<ForwardStatus>,
    /// The daemon's part of the health reports.
    pub health: HealthSource,
    /// What `/status` shows as the upstream.
    pub shown: watch::Sender<Option<(String, Arc<ForwardStatus>)>>,
    /// The daemon's tasks.
    pub tasks: TaskTracker,
    /// The link running now: its stop token and task.
    pub running: Option<(CancellationToken, JoinHandle<()>)>,
}

impl UpstreamSlot {
    /// Starts a link for `cfg` under `epoch` (none for `None`: batches stay in the outbox).
    pub fn start(&mut self, cfg: Option<UpstreamConfig>, epoch: u64) {
        let Some(up) = cfg else {
            self.shown.send_replace(None);
            tracing::warn!(
                "no [upstream] configured: batches stay in the outbox (bounded by store.max_disk)"
            );
            return;
        };
        self.shown
            .send_replace(Some((up.url.to_string(), self.status.clone())));
        let stop = CancellationToken::new();
        let parts = LinkParts {
            cfg: up.clone(),
            gateway: self.gateway.clone(),
            epoch,
            data_dir: self.data_dir.clone(),
            outbox: self.outbox.clone(),
            watermark: self.watermark.clone(),
            status: self.status.clone(),
            health: self.health.clone(),
            stop: stop.clone(),
        };
        let task = if up.url.is_mqtt() {
            let transport = MqttTransport::new(up, &self.gateway);
            self.tasks.spawn(Link::new(parts, transport).run())
        } else {
            self.tasks
                .spawn(Link::new(parts, WsTransport::new(up)).run())
        };
        self.running = Some((stop, task));
    }

    /// The store epoch a new link starts under (a link may have renewed it).
    pub fn epoch(&self) -> Result<u64, String> {
        crate::store::epoch::load_or_create(&self.data_dir)
            .map_err(|e| format!("cannot read the store epoch: {e}"))
    }

    /// Stops the running link (waiting for it, at most [`PART_TIMEOUT`]) and starts one for
    /// `cfg` under `epoch`. What the old one had in flight is sent again by the new one,
    /// under the same batch ids (the central side stores them once).
    pub async fn replace(&mut self, cfg: Option<UpstreamConfig>, epoch: u64) {
        if let Some((stop, task)) = self.running.take() {
            stop.cancel();
            if tokio::time::timeout(PART_TIMEOUT, task).await.is_err() {
                // Cancelled, it ends at its next await; meanwhile both may send a batch,
                // which the central side deduplicates.
                tracing::warn!("the upstream link did not stop within {PART_TIMEOUT:?}");
            }
        }
        self.start(cfg, epoch);
    }
}

/// The running daemon's reloadable parts.
pub struct Reloader {
    /// The configuration file, read again at each reload.
    pub path: PathBuf,
    /// The configuration in effect.
    pub current: Config,
    /// Processing's side: rules and batching limits.
    pub process: mpsc::Sender<ProcessChange>,
    /// Ingest's side: the subscriptions of the live session.
    pub subscriptions: mpsc::Sender<SubscriptionChange>,
    /// The admin endpoint.
    pub admin: AdminSlot,
    /// The upstream link.
    pub upstream: UpstreamSlot,
}

impl Reloader {
    /// Reloads at every SIGHUP until `shutdown`. Once the daemon is `ready`, systemd is told
    /// `RELOADING=1` before and `READY=1` after (with the outcome as `STATUS=`), so
    /// `systemctl status` shows the unit reloading meanwhile.
    pub async fn run(
        mut self,
        mut hangups: tokio::signal::unix::Signal,
        ready: watch::Receiver<bool>,
        shutdown: CancellationToken,
    ) {
        use sd_notify::NotifyState;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                got = hangups.recv() => if got.is_none() { return },
            }
            tracing::info!("SIGHUP: reloading {}", self.path.display());
            let notify = *ready.borrow();
            if notify {
                let mut states = vec![NotifyState::Reloading];
                states.extend(NotifyState::monotonic_usec_now().ok());
                let _ = sd_notify::notify(&states);
            }
            let outcome = self.reload().await;
            metrics::counter!("edgeferry_config_reloads_total", "result" => outcome.label())
                .increment(1);
            outcome.log(&self.path);
            if notify {
                let status = format!("configuration reload: {}", outcome.label());
                let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
            }
        }
    }

    /// Reads the file again and applies what changed (see the module docs).
    pub async fn reload(&mut self) -> Outcome {
        let new = match Config::load(&self.path) {
            Ok(c) => c,
            Err(e) => return Outcome::Invalid(e.problems),
        };
        let changed = changed_keys(&self.current, &new);
        if changed.is_empty() {
            return Outcome::Unchanged;
        }
        let refused: Vec<String> = changed.iter().filter(|k| !is_live(k)).cloned().collect();
        if !refused.is_empty() {
            return Outcome::Refused(refused);
        }
        for w in new.warnings() {
            tracing::warn!("{w}");
        }
        let touched = |section: &str| changed.iter().any(|k| k.starts_with(section));
        // The steps that can fail come first, before anything has changed.
        let epoch = if touched("upstream") {
            match self.upstream.epoch() {
                Ok(e) => Some(e),
                Err(e) => return Outcome::Failed(e),
            }
        } else {
            None
        };
        let listener = if new.admin.listen != self.current.admin.listen {
            match AdminSlot::bind(&new.admin.listen).await {
                Ok(l) => Some(l),
                Err(e) => return Outcome::Failed(e),
            }
        } else {
            None
        };
        if touched("rules") || touched("upstream") {
            let (batch_max, linger) = batching(new.upstream.as_ref());
            let (done, answered) = oneshot::channel();
            let change = ProcessChange {
                rules: new.rules.clone(),
                batch_max,
                linger,
                done,
            };
            if self.process.send(change).await.is_err() {
                return Outcome::Failed("processing has stopped".into());
            }
            wait_for("processing", answered).await;
        }
        if touched("mqtt.subscribe") {
            let (done, answered) = oneshot::channel();
            let change = SubscriptionChange {
                subscribe: new.mqtt.subscribe.clone(),
                done,
            };
            if self.subscriptions.send(change).await.is_err() {
                return Outcome::Failed("ingest has stopped".into());
            }
            match tokio::time::timeout(PART_TIMEOUT, answered).await {
                Ok(Ok(Ok(Resubscribed::Acknowledged))) => {}
                Ok(Ok(Ok(Resubscribed::AtReconnect))) => tracing::warn!(
                    "the broker is not connected: the new subscriptions are made when it is back"
                ),
                Ok(Ok(Err(e))) => tracing::error!("subscribing the new filters: {e}"),
                Ok(Err(_)) => tracing::warn!(
                    "the broker connection dropped while subscribing: the new subscriptions \
                     are made at the reconnect"
                ),
                Err(_) => tracing::warn!(
                    "the broker did not acknowledge the new subscriptions within \
                     {PART_TIMEOUT:?}; they stay requested"
                ),
            }
        }
        if touched("log") {
            match crate::telemetry::set_level(&new.log) {
                crate::telemetry::LevelChange::Applied => {}
                crate::telemetry::LevelChange::EnvironmentWins => {
                    tracing::warn!("RUST_LOG is set and wins over log.level, as at start")
                }
                crate::telemetry::LevelChange::NotInstalled => {}
            }
        }
        if let Some(listener) = listener {
            self.admin.replace(listener);
        }
        if let Some(epoch) = epoch {
            self.upstream.replace(new.upstream.clone(), epoch).await;
        }
        self.current = new;
        Outcome::Applied(changed)
    }
}

/// Waits for a part's answer, logging one that does not come within [`PART_TIMEOUT`].
async fn wait_for(part: &str, answered: oneshot::Receiver<()>) {
    if tokio::time::timeout(PART_TIMEOUT, answered).await.is_err() {
        tracing::warn!("{part} did not take the new configuration within {PART_TIMEOUT:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
        [gateway]
        id = "gw-1"
        data_dir = "/var/lib/edgeferry"
        [mqtt]
        url = "mqtt://127.0.0.1:1883"
        [[mqtt.subscribe]]
        filter = "sensors/+/temperature"
        template = "sensors/{device}/{metric}"
        format = "number"
    "#;

    fn cfg(extra: &str) -> Config {
        Config::from_toml_with_env(&format!("{BASE}\n{extra}"), std::iter::empty())
            .unwrap_or_else(|p| panic!("{p:?}"))
    }

    #[test]
    fn the_same_file_changes_nothing() {
        assert!(changed_keys(&cfg(""), &cfg("")).is_empty());
    }

    #[test]
    fn rules_subscriptions_log_level_admin_and_upstream_change_in_place() {
        let old = cfg("");
        let new = cfg(r#"
            [[rules]]
            name = "hot"
            metric = "temperature"
            above = 30.0
            [log]
            level = "debug"
            [admin]
            listen = "127.0.0.1:9871"
            [upstream]
            url = "ws://127.0.0.1:9443"
        "#);
        let keys = changed_keys(&old, &new);
        assert!(keys.iter().all(|k| is_live(k)), "{keys:?}");
        for k in ["rules", "log.level", "admin.listen", "upstream"] {
            assert!(keys.iter().any(|c| c == k), "{k} missing from {keys:?}");
        }
    }

    #[test]
    fn the_data_directory_the_gateway_id_and_the_windows_are_refused_by_name() {
        let old = cfg("");
        let mut new = cfg("[process]\nwindows = [\"30s\"]");
        new.gateway.id = "gw-2".into();
        new.gateway.data_dir = "/tmp/elsewhere".into();
        let refused: Vec<String> = changed_keys(&old, &new)
            .into_iter()
            .filter(|k| !is_live(k))
            .collect();
        assert_eq!(
            refused,
            ["gateway.data_dir", "gateway.id", "process.windows"],
            "named one by one, in a stable order"
        );
    }

    #[test]
    fn a_key_beside_a_live_one_is_not_live() {
        assert!(is_live("mqtt.subscribe"));
        assert!(is_live("upstream.url"));
        assert!(
            !is_live("mqtt.url"),
            "the broker itself is the session's identity"
        );
        assert!(!is_live("mqtt.subscribers"), "a prefix must end at a dot");
        assert!(!is_live("log.format"), "the format is the log layer's type");
    }

    #[test]
    fn every_outcome_has_its_own_label() {
        let labels = [
            Outcome::Applied(vec![]),
            Outcome::Unchanged,
            Outcome::Invalid(vec![]),
            Outcome::Refused(vec![]),
            Outcome::Failed(String::new()),
        ]
        .map(|o| o.label());
        let mut unique = labels.to_vec();
        unique.dedup();
        assert_eq!(unique.len(), labels.len());
    }
}
