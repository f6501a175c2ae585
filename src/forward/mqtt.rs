//! The MQTT upstream: each outbox batch is published with QoS 1 to a topic on a cloud broker
//! (AWS IoT Core, Azure IoT Hub, an EMQX or Mosquitto cluster); the broker's PUBACK is the
//! acknowledgement. Same outbox, same guarantees as the WebSocket link.
//!
//! A message is self-contained, because subscribers share no connection state with the
//! gateway: three protocol envelopes back to back, `Hello` (gateway, epoch), `Dict` (every
//! series the batch uses) and `Batch`. Consumers deduplicate by (gateway, epoch, seq): a
//! batch whose PUBACK was lost in a disconnect is published again.

use super::{Cursors, ForwardStatus, UpstreamConfig, next_batch};
use crate::backoff::Backoff;
use crate::model::batch::OutboxBatch;
use crate::protocol::{self, DictEncoder, Frame, Hello};
use crate::store::outbox::Outbox;
use rumqttc::{
    AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS, TlsConfiguration, Transport,
};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Most batches published and not yet acknowledged.
const MAX_IN_FLIGHT: usize = 32;

/// The MQTT upstream link.
pub struct MqttLink {
    /// `[upstream]`.
    pub cfg: UpstreamConfig,
    /// Gateway id.
    pub gateway: String,
    /// Store epoch.
    pub epoch: u64,
    /// The outbox.
    pub outbox: Arc<Mutex<Outbox>>,
    /// Checkpointed outbox positions.
    pub watermark: watch::Receiver<[u64; 2]>,
    /// Shared state for status.
    pub status: Arc<ForwardStatus>,
}

/// Encodes one batch as a self-contained MQTT payload (Hello + Dict + Batch envelopes).
pub fn encode_message(
    gateway: &str,
    epoch: u64,
    first_seq: u64,
    seq: u64,
    batch: &OutboxBatch,
) -> Vec<u8> {
    let hello = Frame::Hello(Hello {
        gateway: gateway.to_string(),
        epoch,
        versions: vec![protocol::PROTOCOL_VERSION],
        first_seq,
        software: format!("edgeferry/{}", env!("CARGO_PKG_VERSION")),
    });
    let mut dict = DictEncoder::new();
    let (d, b) = dict.encode_batch(seq, batch);
    let mut out = protocol::encode(&hello);
    if let Some(d) = d {
        out.extend(protocol::encode(&d));
    }
    out.extend(protocol::encode(&b));
    out
}

impl MqttLink {
    fn options(&self) -> Result<MqttOptions, String> {
        let url = url::Url::parse(&self.cfg.url).map_err(|e| e.to_string())?;
        let tls = url.scheme() == "mqtts";
        let host = url.host_str().ok_or("no host")?.trim_matches(['[', ']']);
        let port = url.port().unwrap_or(if tls { 8883 } else { 1883 });
        let mut o = MqttOptions::new(format!("edgeferry-up-{}", self.gateway), host, port);
        o.set_clean_session(true)
            .set_keep_alive(Duration::from_secs(30))
            .set_inflight(MAX_IN_FLIGHT as u16)
            .set_max_packet_size(64 << 20, 64 << 20);
        if !url.username().is_empty() {
            let pw = match &self.cfg.token_file {
                Some(f) => std::fs::read_to_string(f)
                    .map_err(|e| format!("upstream.token_file {}: {e}", f.display()))?
                    .trim()
                    .to_string(),
                None => url.password().unwrap_or_default().to_string(),
            };
            o.set_credentials(url.username(), pw);
        }
        if tls {
            let c = crate::tls::client_config(
                self.cfg.ca_file.as_deref(),
                self.cfg.cert_file.as_deref(),
                self.cfg.key_file.as_deref(),
            )
            .map_err(|e| e.to_string())?;
            o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(c),
            )));
        }
        Ok(o)
    }

    /// Runs until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let topic = self.cfg.topic.replace("{gateway}", &self.gateway);
        let mut backoff = Backoff::new(Duration::from_millis(500), self.cfg.reconnect_max);
        let mut last_logged: Option<String> = None;
        loop {
            let r = tokio::select! {
                r = self.session(&topic) => r,
                _ = shutdown.cancelled() => break,
            };
            let _ = self
                .outbox
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .persist_acks();
            let msg = r.err().unwrap_or_else(|| "closed".into());
            self.status.link_down(&self.cfg.url, msg, &mut last_logged);
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = shutdown.cancelled() => break,
            }
        }
        let _ = self
            .outbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .persist_acks();
    }

    /// One connection: publish, map packet ids to seqs, acknowledge on PUBACK.
    async fn session(&mut self, topic: &str) -> Result<(), String> {
        let (client, mut el) = AsyncClient::new(self.options()?, MAX_IN_FLIGHT * 2);
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        net.set_connection_timeout(15);
        el.set_network_options(net);
        // Wait for the CONNACK before publishing anything.
        loop {
            match el.poll().await.map_err(|e| e.to_string())? {
                Event::Incoming(Packet::ConnAck(_)) => break,
                _ => continue,
            }
        }
        self.status.connected.store(true, Ordering::Relaxed);
        self.status.set_error(None);
        tracing::info!(url = %self.cfg.url, topic, "upstream (MQTT) connected");
        let mut cursors = Cursors::new(*self.watermark.borrow());
        let mut queued: VecDeque<u64> = VecDeque::new(); // published, pkid not yet known
        let mut in_flight: HashMap<u16, (u64, Instant)> = HashMap::new();
        let mut persist = tokio::time::interval(Duration::from_secs(2));
        loop {
            while queued.len() + in_flight.len() < MAX_IN_FLIGHT {
                let wm = *self.watermark.borrow();
                let Some(b) =
                    next_batch(&self.outbox, &mut cursors, wm).map_err(|e| e.to_string())?
                else {
                    break;
                };
                let batch: OutboxBatch = match postcard::from_bytes(&b.payload) {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::error!(seq = b.seq, "undecodable outbox batch skipped: {e}");
                        let _ = self
                            .outbox
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .ack(b.seq);
                        continue;
                    }
                };
                let first_seq = self
                    .outbox
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .first_seq();
                let payload = encode_message(&self.gateway, self.epoch, first_seq, b.seq, &batch);
                client
                    .try_publish(topic, QoS::AtLeastOnce, false, payload)
                    .map_err(|e| e.to_string())?;
                queued.push_back(b.seq);
                self.status.batches_sent.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("edgeferry_upstream_batches_sent_total").increment(1);
            }
            tokio::select! {
                ev = el.poll() => match ev.map_err(|e| e.to_string())? {
                    Event::Outgoing(Outgoing::Publish(pkid)) => {
                        if let Some(seq) = queued.pop_front() {
                            in_flight.insert(pkid, (seq, Instant::now()));
                        }
                    }
                    Event::Incoming(Packet::PubAck(a)) => {
                        if let Some((seq, sent)) = in_flight.remove(&a.pkid) {
                            metrics::histogram!("edgeferry_upstream_ack_seconds").record(sent.elapsed().as_secs_f64());
                            self.outbox.lock().unwrap_or_else(|e| e.into_inner()).ack(seq).map_err(|e| e.to_string())?;
                            self.status.batches_acked.fetch_add(1, Ordering::Relaxed);
                            metrics::counter!("edgeferry_upstream_batches_acked_total").increment(1);
                        }
                    }
                    _ => {}
                },
                r = self.watermark.changed() => {
                    if r.is_err() {
                        return Ok(());
                    }
                }
                _ = persist.tick() => {
                    let _ = self.outbox.lock().unwrap_or_else(|e| e.into_inner()).persist_acks();
                }
            }
        }
    }
}
