//! `edgeferry collect --mqtt URL --topic FILTER`: the receiver for gateways whose upstream is
//! an MQTT broker (`[upstream] url = "mqtts://…"`, docs/PROTOCOL.md §10).
//!
//! The collector subscribes with QoS 1 in a persistent session (`clean_session = false`,
//! a client id of its own that stays the same across restarts) and acknowledges each message
//! only after every sink made its batch durable, exactly as it acknowledges a WebSocket batch:
//! a collector killed at any moment leaves what it had not acknowledged in its session on the
//! broker, which redelivers it when the collector is back. Several collectors split the load
//! with a shared subscription (`$share/GROUP/edgeferry/+/batches`); what one of them stored
//! and another receives again (a redelivery, a gateway's resend after a lost PUBACK) is
//! recognised by its batch id, as over WebSocket, so duplicates cost a lookup, not a count.
//!
//! Messages are stored concurrently (up to `max_in_flight`) and acknowledged in the order
//! they arrived, on the connection they arrived on ([`crate::puback`]): an ack never outlives
//! its connection, so it can never acknowledge another message that reuses the packet id.
//! A payload that is not an upstream message is counted by reason, logged (rate-limited)
//! and acknowledged: redelivering it could never make it valid, and it must not block the
//! messages behind it. A batch a sink failed to store drops the connection instead, so the
//! broker redelivers it once the sinks are back.

use super::buffer::Buffer;
use super::config::MqttSourceConfig;
use super::sink::Sinks;
use super::store::Stored;
use crate::backoff::Backoff;
use crate::broker::BrokerUrl;
use crate::protocol::message::decode_message;
use crate::telemetry::RateLimit;
use anyhow::{Context, Result, bail};
use futures_util::FutureExt;
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS,
    SubscribeFilter, SubscribeReasonCode,
};
use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::{JoinError, JoinHandle};
use tokio_util::sync::CancellationToken;

/// The file (in the data directory) keeping the made-up client id across restarts.
pub const CLIENT_ID_FILE: &str = "mqtt-client-id";

/// How long shutdown waits for the batches being stored, to acknowledge them.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);

/// What storing a batch came to: joined from its task.
type Joined = Result<Result<Stored>, JoinError>;

/// A received message, in arrival order, until it is acknowledged.
struct InFlight {
    /// Its packet id; `None` for QoS 0 (nothing to acknowledge).
    pkid: Option<u16>,
    /// Storing its batch; `None` when it needs no storing (rejected, a state message).
    store: Option<JoinHandle<Result<Stored>>>,
    /// The task's result once awaited (a finished task must not be polled again).
    done: Option<Joined>,
}

impl InFlight {
    fn nothing_to_store(pkid: Option<u16>) -> InFlight {
        InFlight {
            pkid,
            store: None,
            done: None,
        }
    }
}

/// What woke the receive loop.
enum Step {
    Stored(Joined),
    Event(Result<Event, rumqttc::ConnectionError>),
}

/// Whether the subscription can receive now, for `/healthz`: why not, while it cannot.
#[derive(Debug)]
pub struct SourceState(std::sync::Mutex<Option<String>>);

impl Default for SourceState {
    fn default() -> Self {
        SourceState(std::sync::Mutex::new(Some(
            "connecting to the MQTT broker".into(),
        )))
    }
}

impl SourceState {
    fn set(&self, down: Option<String>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = down;
    }

    /// Why the collector cannot receive over MQTT now, if it cannot.
    pub fn down(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The subscription: broker, topics, what it hands the sinks.
pub struct MqttSource {
    cfg: MqttSourceConfig,
    client_id: String,
    options: MqttOptions,
    max_frame: u32,
    log: RateLimit,
}

/// Where a running source hands its batches.
struct Ctx<'a> {
    sinks: &'a Arc<Sinks>,
    buffer: &'a Buffer,
    shutdown: &'a CancellationToken,
}

/// Client options for `cfg` (client id `client_id`), checking everything that can be checked
/// before connecting: URL, TLS files, password file.
fn options(cfg: &MqttSourceConfig, client_id: &str, max_frame: u32) -> Result<MqttOptions> {
    let broker = BrokerUrl::parse(&cfg.url).with_context(|| format!("--mqtt {:?}", cfg.url))?;
    if cfg.topics.is_empty() {
        bail!("--mqtt needs at least one --topic");
    }
    let tls = if broker.tls {
        Some(
            crate::tls::client_config(
                cfg.ca_file.as_deref(),
                cfg.cert_file.as_deref(),
                cfg.key_file.as_deref(),
            )
            .context("--mqtt TLS settings")?,
        )
    } else if cfg.ca_file.is_some() || cfg.cert_file.is_some() {
        bail!("--mqtt-ca/--mqtt-cert given for a plain mqtt:// URL; use mqtts://");
    } else {
        None
    };
    let mut o = broker.options(client_id, tls);
    // A message is three envelopes of at most max_frame each; a packet over the client's
    // limit would drop the connection and come back forever (FIELD-NOTES).
    let limit = (3 * (max_frame as usize + crate::protocol::HEADER_LEN)).max(1 << 16) + 1024;
    o.set_clean_session(false)
        .set_manual_acks(true)
        .set_keep_alive(cfg.keep_alive)
        .set_max_packet_size(limit, limit);
    if !broker.username.is_empty() {
        let password = match &cfg.password_file {
            Some(p) => std::fs::read_to_string(p)
                .with_context(|| format!("--mqtt-password-file {}", p.display()))?
                .trim_end_matches(['\r', '\n'])
                .to_string(),
            None => broker.password.clone().unwrap_or_default(),
        };
        o.set_credentials(broker.username.clone(), password);
    }
    Ok(o)
}

/// The client id: the configured one, or one made up once and kept in `dir`.
fn client_id(cfg: &MqttSourceConfig, dir: &Path) -> Result<String> {
    if let Some(id) = &cfg.client_id {
        if id.is_empty() || id.len() > 128 {
            bail!("--mqtt-client-id must be 1..=128 bytes");
        }
        return Ok(id.clone());
    }
    let path = dir.join(CLIENT_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    let id = format!("edgeferry-collect-{:016x}", rand::random::<u64>());
    crate::util::write_atomic(&path, format!("{id}\n").as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(id)
}

impl MqttSource {
    /// Checks the settings (everything but the broker's answer) and makes the client id.
    pub fn new(cfg: MqttSourceConfig, data_dir: &Path, max_frame: u32) -> Result<MqttSource> {
        let id = client_id(&cfg, data_dir)?;
        let options = options(&cfg, &id, max_frame)?;
        Ok(MqttSource {
            cfg,
            client_id: id,
            options,
            max_frame,
            log: RateLimit::new(Duration::from_secs(5)),
        })
    }

    /// The MQTT client id of the session.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    fn warn(&self, key: &'static str, msg: &str) {
        self.log.warn(key, msg);
    }

    /// Receives, stores and acknowledges until `shutdown`; then acknowledges what the sinks
    /// finish within a moment, and disconnects (the session stays on the broker).
    pub async fn run(
        self,
        sinks: Arc<Sinks>,
        buffer: Buffer,
        state: Arc<SourceState>,
        shutdown: CancellationToken,
    ) {
        let ctx = Ctx {
            sinks: &sinks,
            buffer: &buffer,
            shutdown: &shutdown,
        };
        let (client, mut el) = AsyncClient::new(self.options.clone(), 64);
        let mut backoff = Backoff::new(Duration::from_millis(200), self.cfg.reconnect_max);
        let mut in_flight: VecDeque<InFlight> = VecDeque::new();
        let mut down: Option<String> = None;
        let mut ever_connected = false;
        let mut full = false;
        let max = self.cfg.max_in_flight.max(1);
        tracing::info!(
            url = %self.cfg.url,
            client_id = self.client_id(),
            topics = ?self.cfg.topics,
            "subscribing to gateway batches over MQTT"
        );
        loop {
            if let Err(e) = self.acknowledge_finished(&mut el, &mut in_flight).await {
                tracing::error!("{e:#}");
                metrics::counter!("edgeferry_collect_mqtt_store_failures_total").increment(1);
                // Not acknowledged: drop the connection so the broker redelivers it (and
                // everything after it) to the session once the sinks are back.
                in_flight.clear();
                el.clean();
                el.network = None;
                state.set(Some(format!(
                    "a batch received over MQTT was not stored: {e:#}"
                )));
                metrics::gauge!("edgeferry_collect_mqtt_connected").set(0.0);
                let pause = backoff.next_delay();
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(pause) => {}
                }
                continue;
            }
            metrics::gauge!("edgeferry_collect_mqtt_in_flight").set(in_flight.len() as f64);
            let reading = in_flight.len() < max;
            if !reading && !full {
                // The limit bites: the broker holds the rest until one is acknowledged.
                metrics::counter!("edgeferry_collect_mqtt_in_flight_full_total").increment(1);
            }
            full = !reading;
            // The oldest message's batch: when it is durable (or failed), acknowledge above.
            let front = in_flight
                .front_mut()
                .filter(|f| f.done.is_none())
                .and_then(|f| f.store.as_mut());
            let waiting = front.is_some();
            let step = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                r = async { front.expect("checked").await }, if waiting => Step::Stored(r),
                ev = el.poll(), if reading => Step::Event(ev),
            };
            let ev = match step {
                Step::Stored(r) => {
                    if let Some(f) = in_flight.front_mut() {
                        f.done = Some(r);
                    }
                    continue;
                }
                Step::Event(ev) => ev,
            };
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    if ack.code != ConnectReturnCode::Success {
                        continue;
                    }
                    backoff.reset();
                    in_flight.clear();
                    if !ack.session_present && ever_connected {
                        metrics::counter!("edgeferry_collect_mqtt_sessions_lost_total")
                            .increment(1);
                        tracing::warn!(
                            "the broker {} did not keep this collector's session \
                             (session_present = false): batches it held for it are gone unless \
                             the gateways resend them; check the broker's persistence",
                            self.cfg.url
                        );
                    }
                    ever_connected = true;
                    down = None;
                    state.set(None);
                    metrics::gauge!("edgeferry_collect_mqtt_connected").set(1.0);
                    tracing::info!(
                        session_present = ack.session_present,
                        "connected to MQTT broker {}",
                        self.cfg.url
                    );
                    // Every connect: a broker that lost the session forgot the subscription.
                    let subs = self
                        .cfg
                        .topics
                        .iter()
                        .map(|t| SubscribeFilter::new(t.clone(), QoS::AtLeastOnce));
                    if let Err(e) = client.try_subscribe_many(subs) {
                        tracing::error!("cannot queue the subscription: {e}");
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let refused: Vec<&str> = ack
                        .return_codes
                        .iter()
                        .zip(&self.cfg.topics)
                        .filter(|(c, _)| matches!(c, SubscribeReasonCode::Failure))
                        .map(|(_, t)| t.as_str())
                        .collect();
                    if refused.is_empty() {
                        tracing::info!(topics = ?self.cfg.topics, "subscribed with QoS 1");
                    } else {
                        metrics::counter!("edgeferry_collect_mqtt_subscriptions_refused_total")
                            .increment(refused.len() as u64);
                        tracing::error!(
                            ?refused,
                            "the broker refused these subscriptions: check its ACLs for this \
                             user, and that it supports shared subscriptions ($share/…)"
                        );
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let entry = self.take(p, &ctx).await;
                    in_flight.push_back(entry);
                }
                Ok(_) => {}
                Err(e) => {
                    // The connection is gone, and with it the right to acknowledge what it
                    // delivered: the broker redelivers those (DUP) to the next connection.
                    in_flight.clear();
                    metrics::gauge!("edgeferry_collect_mqtt_connected").set(0.0);
                    let msg = e.to_string();
                    state.set(Some(format!(
                        "MQTT broker {} unreachable: {msg}",
                        self.cfg.url
                    )));
                    let key = crate::telemetry::failure_key(&msg);
                    if down.as_deref() != Some(key.as_str()) {
                        tracing::warn!(
                            "MQTT broker {} unreachable: {msg}; retrying with backoff",
                            self.cfg.url
                        );
                        down = Some(key);
                    }
                    let pause = backoff.next_delay();
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
        self.finish(client, el, in_flight).await;
    }

    /// What to do with one received message: its batch handed to the sinks, or nothing to
    /// store (acknowledged in its turn).
    async fn take(&self, p: rumqttc::Publish, ctx: &Ctx<'_>) -> InFlight {
        let pkid = (p.qos != QoS::AtMostOnce).then_some(p.pkid);
        let skip = |result: &'static str| {
            metrics::counter!("edgeferry_collect_mqtt_messages_total", "result" => result)
                .increment(1);
            InFlight::nothing_to_store(pkid)
        };
        // The gateways' retained state messages (§10.1), for filters such as `edgeferry/#`.
        if p.topic.ends_with("/state") && p.payload.first() == Some(&b'{') {
            return skip("state");
        }
        let m = match decode_message(&p.payload, self.max_frame) {
            Ok(m) => m,
            Err(e) => {
                metrics::counter!("edgeferry_collect_mqtt_rejected_total", "reason" => e.reason())
                    .increment(1);
                self.warn(
                    e.reason(),
                    &format!(
                        "message on {:?} ({} bytes) is not an edgeferry batch and is dropped: {e}",
                        p.topic,
                        p.payload.len()
                    ),
                );
                return skip("rejected");
            }
        };
        let (gateway, epoch, seq, n) = (m.hello.gateway, m.hello.epoch, m.seq, m.items.len());
        let lines = match Sinks::lines(&gateway, epoch, seq, &m.items) {
            Ok(l) => l,
            Err(e) => {
                metrics::counter!("edgeferry_collect_mqtt_rejected_total", "reason" => "lines")
                    .increment(1);
                self.warn("lines", &format!("batch {seq} of {gateway}: {e:#}"));
                return skip("rejected");
            }
        };
        drop(m.items);
        let Some(room) = ctx.buffer.reserve(lines.len(), ctx.shutdown).await else {
            // Shutting down: not acknowledged, redelivered to the next session.
            return InFlight::nothing_to_store(None);
        };
        let sinks = ctx.sinks.clone();
        InFlight {
            pkid,
            store: Some(tokio::spawn(async move {
                let stored = sinks.store_batch(&gateway, epoch, seq, lines, n).await;
                drop(room);
                stored
            })),
            done: None,
        }
    }

    /// Acknowledges, in arrival order, every message at the front whose batch is durable;
    /// the error of the first one a sink failed to store.
    async fn acknowledge_finished(
        &self,
        el: &mut EventLoop,
        in_flight: &mut VecDeque<InFlight>,
    ) -> Result<()> {
        let mut acks = Vec::new();
        let mut failed = None;
        while let Some(front) = in_flight.front_mut() {
            let joined = match (front.done.take(), front.store.as_mut()) {
                (Some(r), _) => Some(r),
                (None, Some(h)) => match h.is_finished().then(|| h.now_or_never()).flatten() {
                    Some(r) => Some(r),
                    None => break,
                },
                (None, None) => None,
            };
            if let Some(joined) = joined {
                match joined {
                    Ok(Ok(stored)) => {
                        let result = match stored {
                            Stored::Written(_) => "stored",
                            _ => "duplicate",
                        };
                        metrics::counter!("edgeferry_collect_mqtt_messages_total", "result" => result)
                            .increment(1);
                    }
                    Ok(Err(e)) => {
                        failed = Some(e);
                        break;
                    }
                    Err(e) => {
                        failed = Some(anyhow::anyhow!("storing a batch panicked: {e}"));
                        break;
                    }
                }
            }
            acks.extend(in_flight.pop_front().and_then(|f| f.pkid));
        }
        if !acks.is_empty() {
            crate::puback::write_pubacks(el, acks).await;
        }
        match failed {
            None => Ok(()),
            Some(e) => Err(e.context("a batch received over MQTT was not stored")),
        }
    }

    /// Shutdown: acknowledge what the sinks finish in [`SHUTDOWN_WAIT`], then disconnect.
    async fn finish(
        &self,
        client: AsyncClient,
        mut el: EventLoop,
        mut in_flight: VecDeque<InFlight>,
    ) {
        let deadline = tokio::time::Instant::now() + SHUTDOWN_WAIT;
        while !in_flight.is_empty() && tokio::time::Instant::now() < deadline {
            if self
                .acknowledge_finished(&mut el, &mut in_flight)
                .await
                .is_err()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if !in_flight.is_empty() {
            tracing::info!(
                messages = in_flight.len(),
                "stopping with MQTT messages not acknowledged: the broker redelivers them"
            );
        }
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            loop {
                match el.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        metrics::gauge!("edgeferry_collect_mqtt_connected").set(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_id_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = MqttSourceConfig::new("mqtt://127.0.0.1", vec!["t".into()]);
        let a = client_id(&cfg, dir.path()).unwrap();
        assert!(a.starts_with("edgeferry-collect-"), "{a}");
        assert_eq!(client_id(&cfg, dir.path()).unwrap(), a);
        let mut named = cfg.clone();
        named.client_id = Some("collector-1".into());
        assert_eq!(client_id(&named, dir.path()).unwrap(), "collector-1");
    }

    #[test]
    fn bad_settings_are_refused_before_connecting_with_what_to_fix() {
        let err = |url: &str, topics: &[&str]| {
            let cfg = MqttSourceConfig::new(url, topics.iter().map(|t| t.to_string()).collect());
            format!("{:#}", options(&cfg, "c", 1 << 20).unwrap_err())
        };
        assert!(err("ws://host", &["t"]).contains("use mqtt:// or mqtts://"));
        assert!(err("mqtt://host", &[]).contains("at least one --topic"));
        let mut cfg = MqttSourceConfig::new("mqtt://host", vec!["t".into()]);
        cfg.ca_file = Some("/ca.pem".into());
        let e = format!("{:#}", options(&cfg, "c", 1 << 20).unwrap_err());
        assert!(e.contains("use mqtts://"), "{e}");
        let mut cfg = MqttSourceConfig::new("mqtts://host", vec!["t".into()]);
        cfg.ca_file = Some("/nonexistent/ca.pem".into());
        let e = format!("{:#}", options(&cfg, "c", 1 << 20).unwrap_err());
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    }
}
