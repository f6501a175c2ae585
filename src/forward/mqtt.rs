//! The MQTT transport of the upstream link ([`super::link`] holds the logic both transports
//! share): each outbox batch is published with QoS 1 to a topic on a cloud broker (AWS IoT
//! Core, Azure IoT Hub, an EMQX or Mosquitto cluster); the broker's PUBACK is the
//! acknowledgement. Same outbox, same guarantees as the WebSocket link.
//!
//! A message is self-contained, because subscribers share no connection state with the
//! gateway: three protocol envelopes back to back, `Hello` (gateway, epoch), `Dict` (every
//! series the batch uses) and `Batch`. Consumers deduplicate by (gateway, epoch, seq): a
//! batch whose PUBACK was lost in a disconnect is published again.
//!
//! A broker has no `Welcome` to say what it already holds, so the gateway keeps that itself,
//! on the broker: a retained **state message** on `<topic>/state` (JSON: gateway, epoch, the
//! highest acknowledged seq per lane), read back at every connect. It is what tells a data
//! directory restored from an older copy (its outbox has not written seqs the broker already
//! acknowledged under the same epoch) so the link renews the store epoch, exactly as the
//! WebSocket link does from `Welcome`. See docs/PROTOCOL.md §10.

use super::UpstreamConfig;
use super::link::{Connection, LinkError, Resume, Transport};
use crate::broker::BrokerUrl;
use crate::model::batch::OutboxBatch;
use crate::protocol::Hello;
pub use crate::protocol::message::encode_message;
use crate::store::outbox::{Lane, lane_lsn};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::time::Duration;

/// Most batches published and not yet acknowledged.
const MAX_IN_FLIGHT: usize = 32;

/// How long connecting (TCP, TLS, CONNACK) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// How long to wait for the retained state message after the broker acknowledged the
/// subscription: brokers send retained messages right after the SUBACK, so this only runs
/// out for a gateway that has never stored anything (its first connect ever).
const STATE_WAIT: Duration = Duration::from_secs(2);

/// The retained state message: what the broker has acknowledged under which epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredState {
    /// The gateway id that wrote it; a state message of another gateway or epoch is ignored.
    pub gateway: String,
    /// The store epoch, 16 hex digits (as in batch ids).
    pub epoch: String,
    /// The highest acknowledged seq of the aggregates and alerts lanes.
    pub acked: [Option<u64>; 2],
}

/// The topic of the retained state message for batches published on `topic`.
pub fn state_topic(topic: &str) -> String {
    format!("{topic}/state")
}

/// Publishes to `[upstream] url` (`mqtt://` or `mqtts://`) on `[upstream] topic`.
pub struct MqttTransport {
    cfg: UpstreamConfig,
    gateway: String,
    topic: String,
}

impl MqttTransport {
    /// A transport for `[upstream]` of gateway `gateway`.
    pub fn new(cfg: UpstreamConfig, gateway: &str) -> MqttTransport {
        let topic = cfg.topic.replace("{gateway}", gateway);
        MqttTransport {
            cfg,
            gateway: gateway.to_string(),
            topic,
        }
    }

    /// Client options for broker `url` with the credentials as they are on disk now.
    fn options(&self, url: &str) -> Result<MqttOptions, LinkError> {
        let broker = BrokerUrl::parse(url)
            .map_err(|e| LinkError::Connect(format!("upstream.url {url:?}: {e}")))?;
        let tls = if broker.tls {
            Some(
                crate::tls::client_config(
                    self.cfg.ca_file.as_deref(),
                    self.cfg.cert_file.as_deref(),
                    self.cfg.key_file.as_deref(),
                )
                .map_err(|e| LinkError::Connect(e.to_string()))?,
            )
        } else {
            None
        };
        let mut o = broker.options(format!("edgeferry-up-{}", self.gateway), tls);
        o.set_clean_session(true)
            .set_keep_alive(Duration::from_secs(30))
            .set_inflight(MAX_IN_FLIGHT as u16)
            .set_max_packet_size(64 << 20, 64 << 20);
        if !broker.username.is_empty() {
            let pw = match &self.cfg.token_file {
                Some(f) => std::fs::read_to_string(f)
                    .map_err(|e| {
                        LinkError::Connect(format!("upstream.token_file {}: {e}", f.display()))
                    })?
                    .trim()
                    .to_string(),
                None => broker.password.clone().unwrap_or_default(),
            };
            o.set_credentials(broker.username.clone(), pw);
        }
        Ok(o)
    }
}

/// One MQTT session on the cloud broker.
pub struct MqttConnection {
    client: AsyncClient,
    el: EventLoop,
    topic: String,
    gateway: String,
    epoch: u64,
    /// Published, packet id not yet known (rumqttc assigns it when the packet goes out).
    queued: VecDeque<u64>,
    /// Packet id → seq.
    in_flight: HashMap<u16, u64>,
    /// The state as the broker holds it (read at connect, then as last published).
    known: [Option<u64>; 2],
}

fn broken(e: impl std::fmt::Display) -> LinkError {
    LinkError::Broken(e.to_string())
}

/// The highest of two optional seqs.
fn higher(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    a.max(b)
}

impl Transport for MqttTransport {
    type Conn = MqttConnection;

    async fn connect(
        &mut self,
        url: &str,
        hello: &Hello,
    ) -> Result<(MqttConnection, Resume), LinkError> {
        let (client, mut el) = AsyncClient::new(self.options(url)?, MAX_IN_FLIGHT * 2);
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        net.set_connection_timeout(CONNECT_TIMEOUT.as_secs());
        el.set_network_options(net);
        let wait = async {
            loop {
                if let Event::Incoming(Packet::ConnAck(_)) = el.poll().await.map_err(broken)? {
                    return Ok::<_, LinkError>(());
                }
            }
        };
        tokio::time::timeout(CONNECT_TIMEOUT, wait)
            .await
            .map_err(|_| LinkError::Connect("no CONNACK within 15 s".into()))??;

        // Read the retained state message back.
        let state_topic = state_topic(&self.topic);
        client
            .try_subscribe(&state_topic, QoS::AtLeastOnce)
            .map_err(broken)?;
        let mut state: Option<StoredState> = None;
        let read = async {
            loop {
                match el.poll().await.map_err(broken)? {
                    Event::Incoming(Packet::SubAck(_)) => break,
                    Event::Incoming(Packet::Publish(p)) if p.topic == state_topic => {
                        state = serde_json::from_slice(&p.payload).ok();
                    }
                    _ => {}
                }
            }
            if state.is_none() {
                // Running out of time here is the normal "nothing stored yet".
                if let Ok(r) = tokio::time::timeout(STATE_WAIT, async {
                    loop {
                        if let Event::Incoming(Packet::Publish(p)) =
                            el.poll().await.map_err(broken)?
                            && p.topic == state_topic
                        {
                            state = serde_json::from_slice(&p.payload).ok();
                            return Ok::<_, LinkError>(());
                        }
                    }
                })
                .await
                {
                    r?;
                }
            }
            client.try_unsubscribe(&state_topic).map_err(broken)?;
            Ok::<_, LinkError>(())
        };
        tokio::time::timeout(CONNECT_TIMEOUT, read)
            .await
            .map_err(|_| {
                LinkError::Connect("no SUBACK for the state topic within 15 s".into())
            })??;

        let epoch_hex = format!("{:016x}", hello.epoch);
        let known = match &state {
            Some(s)
                if s.gateway == self.gateway && s.epoch == epoch_hex && state_is_consistent(s) =>
            {
                s.acked
            }
            _ => [None, None],
        };
        let stored = known
            .iter()
            .flatten()
            .map(|&seq| (seq, seq))
            .collect::<Vec<_>>();
        let conn = MqttConnection {
            client,
            el,
            topic: self.topic.clone(),
            gateway: self.gateway.clone(),
            epoch: hello.epoch,
            queued: VecDeque::new(),
            in_flight: HashMap::new(),
            known,
        };
        let resume = Resume {
            stored,
            max_in_flight: MAX_IN_FLIGHT,
            detail: format!(
                "MQTT, topic {}, {}",
                self.topic,
                match &state {
                    Some(s) => format!("stored state epoch {} acked {:?}", s.epoch, s.acked),
                    None => "no stored state yet".into(),
                }
            ),
        };
        Ok((conn, resume))
    }
}

impl Connection for MqttConnection {
    async fn send(
        &mut self,
        seq: u64,
        batch: &OutboxBatch,
        hello: &Hello,
    ) -> Result<(), LinkError> {
        let payload = encode_message(hello, seq, batch);
        self.client
            .try_publish(&self.topic, QoS::AtLeastOnce, false, payload)
            .map_err(broken)?;
        self.queued.push_back(seq);
        Ok(())
    }

    async fn acks(&mut self) -> Result<Vec<u64>, LinkError> {
        loop {
            match self.el.poll().await.map_err(broken)? {
                Event::Outgoing(Outgoing::Publish(pkid)) => {
                    if let Some(seq) = self.queued.pop_front() {
                        self.in_flight.insert(pkid, seq);
                    }
                }
                Event::Incoming(Packet::PubAck(a)) => {
                    if let Some(seq) = self.in_flight.remove(&a.pkid) {
                        return Ok(vec![seq]);
                    }
                }
                _ => {}
            }
        }
    }

    async fn stored_state(&mut self, acked: [Option<u64>; 2]) {
        let next = [
            higher(self.known[0], acked[0]),
            higher(self.known[1], acked[1]),
        ];
        if next == self.known {
            return;
        }
        let state = StoredState {
            gateway: self.gateway.clone(),
            epoch: format!("{:016x}", self.epoch),
            acked: next,
        };
        let body = serde_json::to_vec(&state).expect("the state always encodes");
        let topic = state_topic(&self.topic);
        // Retained, QoS 1; not waited for: the state only has to grow, and a lost update
        // is written again at the next tick.
        if self
            .client
            .try_publish(topic, QoS::AtLeastOnce, true, body)
            .is_ok()
        {
            self.known = next;
        }
    }

    async fn close(&mut self) {
        let _ = self.client.try_disconnect();
        // Let the DISCONNECT (and a last state update) leave.
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            loop {
                match self.el.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    _ => {}
                }
            }
        })
        .await;
    }
}

/// The lane of each seq a state message holds, checked: `acked[0]` must be an aggregates seq
/// and `acked[1]` an alerts seq (a hand-edited or foreign message is ignored).
pub fn state_is_consistent(s: &StoredState) -> bool {
    [Lane::Aggregates, Lane::Alerts]
        .into_iter()
        .zip(s.acked)
        .all(|(lane, seq)| seq.is_none_or(|q| lane_lsn(q).0 == lane))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::outbox::seq_of;

    #[test]
    fn the_state_message_round_trips_as_json_and_lanes_are_checked() {
        let s = StoredState {
            gateway: "gw".into(),
            epoch: "00000000000000ab".into(),
            acked: [Some(seq_of(Lane::Aggregates, 9)), None],
        };
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(
            json,
            r#"{"gateway":"gw","epoch":"00000000000000ab","acked":[18,null]}"#
        );
        assert_eq!(serde_json::from_str::<StoredState>(&json).unwrap(), s);
        assert!(state_is_consistent(&s));
        let swapped = StoredState {
            acked: [None, Some(seq_of(Lane::Aggregates, 1))],
            ..s
        };
        assert!(!state_is_consistent(&swapped));
    }

    #[test]
    fn the_state_topic_is_beside_the_batches_topic_not_under_its_filters() {
        assert_eq!(
            state_topic("edgeferry/gw-1/batches"),
            "edgeferry/gw-1/batches/state"
        );
        // One level deeper than the batches: `edgeferry/+/batches` does not match it.
        assert_eq!(state_topic("a/b/c").split('/').count(), 4);
    }
}
