//! The collector's settings: command-line flags of `edgeferry collect`, with defaults sized for
//! a fleet of gateways per instance.

use std::path::PathBuf;
use std::time::Duration;

/// Everything `edgeferry collect` is configured with.
#[derive(Debug, Clone)]
pub struct CollectConfig {
    /// Listen address for gateways over WebSocket, e.g. `0.0.0.0:9443` (port 0: ephemeral;
    /// the bound address is written to `DIR/collect.addr`); `None`: no listener (a collector
    /// that only reads an MQTT broker, `mqtt`).
    pub listen: Option<String>,
    /// Batches of gateways whose upstream is an MQTT broker (`--mqtt`): subscribed there.
    pub mqtt: Option<MqttSourceConfig>,
    /// `collect.addr`, `metrics.addr`, and the JSONL sink when no `sinks` are given.
    pub data_dir: PathBuf,
    /// Where batches are made durable (`--sink`, repeatable); empty: `jsonl:<data_dir>`.
    pub sinks: Vec<super::sink::SinkSpec>,
    /// Accepted bearer tokens, one per line (blank lines and `#` comments ignored); `None`
    /// accepts every client.
    pub token_file: Option<PathBuf>,
    /// Server certificate chain (PEM); with `tls_key`, enables TLS.
    pub tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) that client certificates must chain to; enables mutual TLS.
    pub client_ca: Option<PathBuf>,
    /// Most concurrent gateway sessions (connections past the WebSocket upgrade and its
    /// token check); a gateway beyond it is refused with HTTP 503 and retries.
    pub max_connections: usize,
    /// Most connections still in their TLS handshake or WebSocket upgrade (not yet
    /// authenticated), a separate and smaller budget so that idle or slow clients cannot use
    /// up the gateways' one; at the limit the oldest of them is closed for the newcomer.
    pub max_pending: usize,
    /// Most such unauthenticated connections from one IP address; more from it are refused
    /// (HTTP 503 on plain connections).
    pub max_pending_per_address: usize,
    /// Where to serve `/metrics` and `/healthz` (the bound address is written to
    /// `DIR/metrics.addr`); `None`: not served.
    pub metrics_listen: Option<String>,
    /// Largest frame body accepted.
    pub max_frame: u32,
    /// Most unacknowledged batches a client may have outstanding (announced in Welcome).
    pub max_in_flight: u32,
    /// Most bytes of batches (their JSON lines) being stored at once, all connections
    /// together; at the limit a connection waits before it reads its next batch (counted in
    /// `edgeferry_collect_buffer_full_total`). One batch larger than this is stored alone.
    pub max_buffered: u64,
    /// Heartbeat interval (whole seconds, at least 1); silence for 3 intervals drops a peer.
    pub heartbeat: Duration,
    /// Time allowed for the TLS handshake, the WebSocket upgrade and the Hello frame, each
    /// (the first two together for an unauthenticated connection).
    pub handshake_timeout: Duration,
    /// Time allowed for sending one frame to a client (slow readers are dropped).
    pub write_timeout: Duration,
    /// How long shutdown waits for connections to finish their current batch.
    pub shutdown_timeout: Duration,
}

impl CollectConfig {
    /// Defaults for everything but the addresses and files.
    pub fn new(listen: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        CollectConfig {
            listen: Some(listen.into()),
            mqtt: None,
            data_dir: data_dir.into(),
            sinks: Vec::new(),
            token_file: None,
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            max_connections: 1024,
            max_pending: 128,
            max_pending_per_address: 16,
            metrics_listen: None,
            max_frame: crate::protocol::DEFAULT_MAX_FRAME,
            max_in_flight: 64,
            max_buffered: 256 * 1024 * 1024,
            heartbeat: Duration::from_secs(15),
            handshake_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(20),
        }
    }
}

/// `edgeferry collect --mqtt URL`: where and how to subscribe to the batches that gateways
/// publish to an MQTT broker (docs/PROTOCOL.md §10).
#[derive(Debug, Clone)]
pub struct MqttSourceConfig {
    /// `mqtt://host[:port]` or `mqtts://host[:port]`; a user name in the URL
    /// (`mqtts://collector@host`) logs in with the password from `password_file`.
    pub url: String,
    /// Topic filters, subscribed with QoS 1. A shared subscription
    /// (`$share/GROUP/edgeferry/+/batches`) splits the messages between the collectors of
    /// the group, each message to one of them.
    pub topics: Vec<String>,
    /// The MQTT client id of the persistent session: unique per collector and the same
    /// across its restarts, so that what it received and did not acknowledge is redelivered
    /// to it. `None`: one made up once and kept in `DIR/mqtt-client-id`.
    pub client_id: Option<String>,
    /// CA (PEM) the broker's certificate must chain to; `None`: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM), for brokers that require one.
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    pub key_file: Option<PathBuf>,
    /// File holding the password for the URL's user name (one line).
    pub password_file: Option<PathBuf>,
    /// Most messages received and not yet acknowledged (being stored, or waiting for an
    /// earlier one: acknowledgements go in the order of arrival). At the limit the
    /// subscription is not read until one is done (counted in
    /// `edgeferry_collect_mqtt_in_flight_full_total`); the broker holds the rest.
    pub max_in_flight: usize,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// Longest wait between reconnection attempts (full-jitter backoff from 200 ms).
    pub reconnect_max: Duration,
}

impl MqttSourceConfig {
    /// Defaults for everything but the broker and the topics.
    pub fn new(url: impl Into<String>, topics: Vec<String>) -> Self {
        MqttSourceConfig {
            url: url.into(),
            topics,
            client_id: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            password_file: None,
            max_in_flight: 256,
            keep_alive: Duration::from_secs(30),
            reconnect_max: Duration::from_secs(30),
        }
    }
}
