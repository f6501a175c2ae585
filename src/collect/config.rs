//! The collector's settings: command-line flags of `edgeferry collect`, with defaults sized for
//! a fleet of gateways per instance.

use std::path::PathBuf;
use std::time::Duration;

/// Everything `edgeferry collect` is configured with.
#[derive(Debug, Clone)]
pub struct CollectConfig {
    /// Listen address, e.g. `0.0.0.0:9443` (port 0: ephemeral; the bound address is written
    /// to `DIR/collect.addr`).
    pub listen: String,
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
            listen: listen.into(),
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
