//! An MQTT broker inside the edgeferry process (rumqttd), for `edgeferry demo` and for small
//! gateways where the sensors connect straight to edgeferry (`[mqtt] embedded_broker`).
//!
//! rumqttd runs on threads of its own (a router thread and one thread with a single-threaded
//! tokio runtime per listener); it has no shutdown, so the broker lives until the process
//! exits. Its sessions, queues and retained messages are in memory only: a restart of
//! edgeferry loses what the broker held for it (see docs/DECISIONS.md, "Embedded broker",
//! for what was measured and when Mosquitto is the better choice).
//!
//! rumqttd cannot report the port it bound, so for port 0 a free loopback port is picked
//! first (bind, read, release) and then handed to rumqttd; another process could take it in
//! between, which shows up as a start-up error, not as a silent misroute.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Largest MQTT payload the embedded broker accepts (the value recommended for Mosquitto's
/// `message_size_limit`, below edgeferry's own packet limit).
pub const MAX_PAYLOAD: usize = 1 << 20;

/// In-memory queue per topic filter: `SEGMENT_SIZE` × `SEGMENT_COUNT` bytes of messages.
/// When it is full rumqttd drops the oldest segment, including messages a disconnected
/// persistent session has not received yet.
pub const SEGMENT_SIZE: usize = 8 << 20;
/// Segments per topic filter queue; with [`SEGMENT_SIZE`] that bounds each queue at 64 MiB.
pub const SEGMENT_COUNT: usize = 8;

/// Why the embedded broker did not start.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    /// The address is not `ip:port`.
    #[error("embedded broker address {addr:?}: {reason} (expected ip:port, e.g. 127.0.0.1:1883)")]
    Address {
        /// `[mqtt] embedded_broker` as configured, so the operator sees what to fix.
        addr: String,
        /// Why it was refused.
        reason: String,
    },
    /// The listener could not be opened.
    #[error("embedded broker on {addr}: {reason}")]
    Listen {
        /// The address tried; for port 0, the free port picked once one was found.
        addr: SocketAddr,
        /// The bind error (address in use, permission denied, ...), or that rumqttd did not
        /// accept connections within 10 s.
        reason: String,
    },
}

/// Checks an `embedded_broker` address: a literal `ip:port` (no host names: the broker binds
/// exactly this address).
pub fn parse_addr(addr: &str) -> Result<SocketAddr, EmbeddedError> {
    addr.trim()
        .parse::<SocketAddr>()
        .map_err(|e| EmbeddedError::Address {
            addr: addr.to_string(),
            reason: e.to_string(),
        })
}

/// A running embedded broker.
#[derive(Debug)]
pub struct EmbeddedBroker {
    addr: SocketAddr,
}

impl EmbeddedBroker {
    /// Starts the broker on `listen` (`ip:port`, port 0 for an ephemeral one) and returns once
    /// it accepts connections.
    pub fn start(listen: &str) -> Result<EmbeddedBroker, EmbeddedError> {
        Self::start_with(listen, SEGMENT_SIZE, SEGMENT_COUNT)
    }

    /// [`start`](Self::start) with another queue size per topic filter (tests).
    fn start_with(
        listen: &str,
        segment_size: usize,
        segment_count: usize,
    ) -> Result<EmbeddedBroker, EmbeddedError> {
        let mut addr = parse_addr(listen)?;
        let listen_err = |addr: SocketAddr, reason: String| EmbeddedError::Listen { addr, reason };
        // Bind once ourselves: a taken port is reported here, clearly, and port 0 is resolved.
        {
            let probe = TcpListener::bind(addr).map_err(|e| listen_err(addr, e.to_string()))?;
            addr = probe
                .local_addr()
                .map_err(|e| listen_err(addr, e.to_string()))?;
        }
        let config = broker_config(addr, segment_size, segment_count);
        let thread = std::thread::Builder::new()
            .name("mqtt-broker".into())
            .spawn(move || {
                let mut broker = rumqttd::Broker::new(config);
                if let Err(e) = broker.start() {
                    tracing::error!("embedded MQTT broker stopped: {e}");
                }
            })
            .map_err(|e| listen_err(addr, format!("cannot start its thread: {e}")))?;
        // rumqttd binds on its own thread and only logs a failure: wait until it accepts, or
        // until its thread ends (it could not listen).
        let connect_to = if addr.ip().is_unspecified() {
            SocketAddr::new(
                match addr {
                    SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                    SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                },
                addr.port(),
            )
        } else {
            addr
        };
        let started = Instant::now();
        loop {
            if TcpStream::connect_timeout(&connect_to, Duration::from_millis(200)).is_ok() {
                break;
            }
            if thread.is_finished() {
                return Err(listen_err(
                    addr,
                    "rumqttd could not listen (address taken?)".into(),
                ));
            }
            if started.elapsed() > Duration::from_secs(10) {
                return Err(listen_err(addr, "not accepting after 10 s".into()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        tracing::info!(%addr, "embedded MQTT broker (rumqttd) listening");
        Ok(EmbeddedBroker { addr })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `mqtt://ip:port` for clients on this machine.
    pub fn url(&self) -> String {
        let ip = if self.addr.ip().is_unspecified() {
            match self.addr {
                SocketAddr::V4(_) => "127.0.0.1".to_string(),
                SocketAddr::V6(_) => "[::1]".to_string(),
            }
        } else {
            match self.addr {
                SocketAddr::V4(a) => a.ip().to_string(),
                SocketAddr::V6(a) => format!("[{}]", a.ip()),
            }
        };
        format!("mqtt://{ip}:{}", self.addr.port())
    }
}

fn broker_config(addr: SocketAddr, segment_size: usize, segment_count: usize) -> rumqttd::Config {
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: MAX_PAYLOAD,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        // Publishes to a topic nobody subscribed yet still get a log, so a subscriber that
        // comes later with a matching filter is served from it.
        dynamic_filters: true,
    };
    let server = rumqttd::ServerSettings {
        name: "edgeferry-embedded".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 10_000,
            max_outgoing_packet_count: 200,
            max_segment_size: segment_size,
            max_segment_count: segment_count,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    //! What edgeferry's ingest relies on from a broker, observed on the embedded one: QoS 1
    //! persistent sessions (clean_session = false) with manual acknowledgements.
    use super::*;
    use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS};

    fn options(id: &str, port: u16, persistent: bool) -> MqttOptions {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_clean_session(!persistent)
            .set_manual_acks(persistent)
            .set_keep_alive(Duration::from_secs(30));
        o
    }

    /// Polls until `n` publishes arrived or `quiet` passed without any; returns them and
    /// the CONNACK's session_present (if one came).
    async fn receive(
        el: &mut EventLoop,
        client: &AsyncClient,
        n: usize,
        ack: bool,
        quiet: Duration,
    ) -> (Vec<Publish>, Option<bool>) {
        let mut got = Vec::new();
        let mut session_present = None;
        while got.len() < n {
            match tokio::time::timeout(quiet, el.poll()).await {
                Ok(Ok(Event::Incoming(Packet::ConnAck(c)))) => {
                    session_present = Some(c.session_present)
                }
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    if ack {
                        client.ack(&p).await.unwrap();
                    }
                    got.push(p);
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("connection error: {e}"),
                Err(_) => break,
            }
        }
        // Let the acks go out.
        let _ = tokio::time::timeout(Duration::from_millis(200), async {
            loop {
                let _ = el.poll().await;
            }
        })
        .await;
        (got, session_present)
    }

    async fn publish(port: u16, from: usize, n: usize) {
        let (c, mut el) = AsyncClient::new(options("publisher", port, false), 100);
        for i in from..from + n {
            c.publish("t/x", QoS::AtLeastOnce, false, i.to_string())
                .await
                .unwrap();
        }
        let mut acked = 0;
        while acked < n {
            if let Event::Incoming(Packet::PubAck(_)) = el.poll().await.unwrap() {
                acked += 1;
            }
        }
    }

    fn values(p: &[Publish]) -> Vec<usize> {
        p.iter()
            .map(|p| std::str::from_utf8(&p.payload).unwrap().parse().unwrap())
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn persistent_session_keeps_what_arrives_while_away_and_redelivers_the_unacked() {
        let b = EmbeddedBroker::start("127.0.0.1:0").unwrap();
        let port = b.addr().port();
        let (c, mut el) = AsyncClient::new(options("edgeferry-x", port, true), 100);
        c.subscribe("t/#", QoS::AtLeastOnce).await.unwrap();
        // Connect and subscribe (no publish can arrive yet).
        let (_, sp) = receive(&mut el, &c, 1, false, Duration::from_millis(500)).await;
        assert_eq!(sp, Some(false), "a new session");

        // 5 delivered but never acknowledged, then the connection drops.
        publish(port, 0, 5).await;
        let (got, _) = receive(&mut el, &c, 5, false, Duration::from_secs(5)).await;
        assert_eq!(values(&got), vec![0, 1, 2, 3, 4]);
        drop(el);
        drop(c);
        tokio::time::sleep(Duration::from_millis(300)).await;

        // 5 more while the subscriber is away.
        publish(port, 5, 5).await;

        // Back with the same id: the session is still there; the unacknowledged 5 come again
        // and the 5 published while away follow.
        let (c, mut el) = AsyncClient::new(options("edgeferry-x", port, true), 100);
        let (got, sp) = receive(&mut el, &c, 10, true, Duration::from_secs(5)).await;
        assert_eq!(sp, Some(true), "session present");
        let mut v = values(&got);
        v.sort();
        assert_eq!(v, (0..10).collect::<Vec<_>>(), "{:?}", values(&got));
        drop(el);
        drop(c);
        tokio::time::sleep(Duration::from_millis(300)).await;

        // Everything was acknowledged: nothing comes again.
        let (c, mut el) = AsyncClient::new(options("edgeferry-x", port, true), 100);
        let (got, sp) = receive(&mut el, &c, 1, true, Duration::from_secs(2)).await;
        assert_eq!(sp, Some(true));
        assert_eq!(values(&got), Vec::<usize>::new());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_persistent_session_away_too_long_loses_the_oldest_messages_silently() {
        // Tiny queue: 2 segments of 4 KiB per filter. 200 messages of ~100 bytes (20 KB) are
        // published and PUBACKed while the subscriber is away.
        let b = EmbeddedBroker::start_with("127.0.0.1:0", 4096, 2).unwrap();
        let port = b.addr().port();
        let (c, mut el) = AsyncClient::new(options("edgeferry-q", port, true), 100);
        c.subscribe("t/#", QoS::AtLeastOnce).await.unwrap();
        let _ = receive(&mut el, &c, 1, false, Duration::from_millis(500)).await;
        drop(el);
        drop(c);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (p, mut pel) = AsyncClient::new(options("publisher", port, false), 300);
        let n = 200;
        for i in 0..n {
            p.publish("t/x", QoS::AtLeastOnce, false, format!("{i:0>100}"))
                .await
                .unwrap();
        }
        let mut acked = 0;
        while acked < n {
            if let Event::Incoming(Packet::PubAck(_)) = pel.poll().await.unwrap() {
                acked += 1;
            }
        }
        let (c, mut el) = AsyncClient::new(options("edgeferry-q", port, true), 100);
        let (got, sp) = receive(&mut el, &c, n, true, Duration::from_secs(2)).await;
        assert_eq!(sp, Some(true));
        let v: Vec<usize> = got
            .iter()
            .map(|p| std::str::from_utf8(&p.payload).unwrap().parse().unwrap())
            .collect();
        eprintln!(
            "published and PUBACKed {n}, delivered after reconnect {} (first {:?}, last {:?})",
            v.len(),
            v.first(),
            v.last()
        );
        // Every PUBACKed message was acknowledged to the publisher, yet the oldest are gone.
        assert!(
            v.len() < n,
            "all {n} delivered: the queue bound is larger than expected"
        );
        assert_eq!(v.last(), Some(&(n - 1)), "the newest are kept");
    }
}
