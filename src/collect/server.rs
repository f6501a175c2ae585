//! The collector's network side: listener, connection cap, TLS, bearer-token check on the
//! WebSocket upgrade, and the per-connection protocol state machine.
//!
//! A connection never affects another: every failure (bad TLS, bad token, malformed or
//! oversized frame, wrong first frame, silence, slow reader) ends that connection only,
//! after an [`ErrorFrame`](protocol::ErrorFrame) where the protocol allows one, and is logged
//! through a rate limiter.

use super::buffer::Buffer;
use super::config::CollectConfig;
use super::fleet::Fleet;
use super::sink::{SinkSpec, Sinks};
use super::store::Stored;
use crate::clock::now_ms;
use crate::protocol::{
    self, Ack, ErrorCode, Frame, HEADER_LEN, Heartbeat, MAX_STORED_RANGES, SUPPORTED_VERSIONS,
    Welcome,
};
use crate::telemetry::RateLimit;
use anyhow::{Context, Result, bail};
use futures_util::FutureExt;
use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt, StreamExt};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::{JoinError, JoinHandle};
use tokio::time::{Instant, sleep_until, timeout};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message, http};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Extra room above `max_frame` for the WebSocket message limit, so that a frame slightly
/// above the limit is read whole and answered with `TooLarge` by the envelope check.
const WS_SLACK: usize = 64 * 1024;

/// Per-connection WebSocket read buffer (see [`Shared::websocket`]).
const WS_READ_BUFFER: usize = 16 * 1024;

/// Name of the file (in the data directory) holding the bound listen address.
pub const ADDR_FILE: &str = "collect.addr";

struct Shared {
    cfg: CollectConfig,
    tokens: Option<Vec<String>>,
    tls: Option<TlsAcceptor>,
    sinks: Arc<Sinks>,
    log: RateLimit,
    shutdown: CancellationToken,
    /// Connections not yet authenticated (their own budget: [`Pending`]).
    pending: Pending,
    /// Gateway sessions (`max_connections`): taken at the upgrade, after the token check.
    sessions: Arc<Semaphore>,
    /// Batches handed to the sinks and not yet stored, all sessions together.
    buffer: Buffer,
    /// What the collector knows of each gateway (`/fleet`).
    fleet: Arc<Fleet>,
}

/// A batch the sinks finished with: what to acknowledge, or why not.
struct Done {
    seq: u64,
    items: usize,
    stored: Result<Stored>,
}

/// The answer to a plain-HTTP client refused before its upgrade (TLS ones are just closed).
const BUSY_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\n\
Content-Length: 0\r\nConnection: close\r\n\r\n";

/// The connections still in their TLS handshake or WebSocket upgrade: at most
/// `max_pending` in all and `max_pending_per_address` per IP address, each within
/// `handshake_timeout`. At the total limit the oldest is closed for the newcomer (an idle
/// flood ages out instead of locking real gateways out, which finish in milliseconds).
struct Pending {
    max: usize,
    per_address: usize,
    inner: std::sync::Mutex<PendingInner>,
}

#[derive(Default)]
struct PendingInner {
    next: u64,
    /// By arrival: the first is the oldest.
    open: std::collections::BTreeMap<u64, (IpAddr, CancellationToken)>,
    by_address: std::collections::HashMap<IpAddr, usize>,
}

/// Why a connection was not admitted to the pending budget.
#[derive(Debug, PartialEq, Eq)]
enum Refused {
    PerAddress,
}

/// A pending connection's place; leaving it (drop) frees the place.
struct PendingSlot<'a> {
    pending: &'a Pending,
    id: u64,
    /// Cancelled when the slot is taken for a newer connection.
    evicted: CancellationToken,
}

impl Pending {
    fn new(max: usize, per_address: usize) -> Pending {
        Pending {
            max: max.max(1),
            per_address: per_address.max(1),
            inner: Default::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PendingInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn admit(&self, ip: IpAddr) -> Result<(PendingSlot<'_>, bool), Refused> {
        let mut g = self.lock();
        if g.by_address.get(&ip).copied().unwrap_or(0) >= self.per_address {
            return Err(Refused::PerAddress);
        }
        let mut evicted_one = false;
        if g.open.len() >= self.max
            && let Some((_, (old_ip, token))) = g.open.pop_first()
        {
            token.cancel();
            Self::release_address(&mut g, old_ip);
            evicted_one = true;
        }
        let id = g.next;
        g.next += 1;
        let evicted = CancellationToken::new();
        g.open.insert(id, (ip, evicted.clone()));
        *g.by_address.entry(ip).or_insert(0) += 1;
        metrics::gauge!("edgeferry_collect_pending_connections").set(g.open.len() as f64);
        Ok((
            PendingSlot {
                pending: self,
                id,
                evicted,
            },
            evicted_one,
        ))
    }

    fn release_address(g: &mut PendingInner, ip: IpAddr) {
        if let Some(n) = g.by_address.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                g.by_address.remove(&ip);
            }
        }
    }
}

impl Drop for PendingSlot<'_> {
    fn drop(&mut self) {
        let mut g = self.pending.lock();
        if let Some((ip, _)) = g.open.remove(&self.id) {
            Pending::release_address(&mut g, ip);
        }
        metrics::gauge!("edgeferry_collect_pending_connections").set(g.open.len() as f64);
    }
}

/// Why a connection ended, for the log.
struct End {
    /// Rate-limiter key and short reason.
    key: &'static str,
    detail: String,
    /// Whether this is a problem worth a warning (vs. a normal close).
    problem: bool,
}

impl End {
    fn ok(key: &'static str, detail: impl Into<String>) -> End {
        End {
            key,
            detail: detail.into(),
            problem: false,
        }
    }
    fn bad(key: &'static str, detail: impl Into<String>) -> End {
        End {
            key,
            detail: detail.into(),
            problem: true,
        }
    }
}

/// Reads the token file: one token per line, blank lines and `#` comments ignored.
pub fn load_tokens(path: &std::path::Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the token file {}", path.display()))?;
    let tokens: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    if tokens.is_empty() {
        bail!("the token file {} holds no token", path.display());
    }
    Ok(tokens)
}

fn tls_acceptor(cfg: &CollectConfig) -> Result<Option<TlsAcceptor>> {
    let (cert, key) = match (&cfg.tls_cert, &cfg.tls_key) {
        (None, None) => {
            if cfg.client_ca.is_some() {
                bail!("--client-ca needs --tls-cert and --tls-key");
            }
            return Ok(None);
        }
        (Some(c), Some(k)) => (c, k),
        _ => bail!("--tls-cert and --tls-key go together"),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match &cfg.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in crate::tls::load_certs(ca)? {
                roots.add(c)?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .context("cannot build the client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(crate::tls::load_certs(cert)?, crate::tls::load_key(key)?)
        .context("the server certificate and key do not make a TLS configuration")?;
    Ok(Some(TlsAcceptor::from(Arc::new(config))))
}

/// Constant-time comparison (the token check should not leak how much of a token matched).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorized(tokens: Option<&[String]>, req: &Request) -> bool {
    let Some(tokens) = tokens else {
        return true;
    };
    let Some(given) = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let given = given.trim().as_bytes();
    // Compare against every token, so timing does not reveal which one matched.
    tokens
        .iter()
        .fold(false, |ok, t| ct_eq(t.as_bytes(), given) | ok)
}

/// At `max_connections`: the gateway backs off and retries (or tries another collector).
fn busy() -> ErrorResponse {
    let mut resp = http::Response::new(Some("collector at its session limit\n".to_string()));
    *resp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
    resp.headers_mut().insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from_static("5"),
    );
    resp
}

fn unauthorized() -> ErrorResponse {
    let mut resp = http::Response::new(Some("missing or invalid bearer token\n".to_string()));
    *resp.status_mut() = http::StatusCode::UNAUTHORIZED;
    resp.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        http::HeaderValue::from_static("Bearer"),
    );
    resp
}

/// Runs the collector until `shutdown` is cancelled: then stops accepting, lets every
/// connection finish the batch it is storing (its ack included), and returns.
pub async fn run(cfg: CollectConfig, shutdown: CancellationToken) -> Result<()> {
    run_with(cfg, shutdown, Health::default()).await
}

/// The collector's health for `/healthz`, answerable from the start: "opening the sinks"
/// until they are open (NATS may be down at start), then what the sinks say; and its
/// gateways for `/fleet`.
#[derive(Clone, Default)]
pub struct Health {
    sinks: Arc<std::sync::OnceLock<Arc<Sinks>>>,
    fleet: Arc<Fleet>,
    /// The `--mqtt` subscription's state, when there is one.
    mqtt: Arc<std::sync::OnceLock<Arc<super::mqtt::SourceState>>>,
}

impl Health {
    fn set(&self, sinks: Arc<Sinks>) {
        let _ = self.sinks.set(sinks);
    }

    /// Why the collector cannot acknowledge batches now, if it cannot.
    pub fn unhealthy(&self) -> Option<String> {
        match self.sinks.get() {
            None => Some("opening the sinks".to_string()),
            Some(s) => s
                .unhealthy()
                .or_else(|| self.mqtt.get().and_then(|m| m.down())),
        }
    }

    /// The gateways this collector serves and served.
    pub fn fleet(&self) -> Arc<Fleet> {
        self.fleet.clone()
    }

    /// `GET /fleet`: every gateway this collector knows, as JSON.
    pub fn routes(&self) -> axum::Router {
        let fleet = self.fleet.clone();
        axum::Router::new().route(
            "/fleet",
            axum::routing::get(move || async move {
                let t = fleet.totals();
                axum::Json(serde_json::json!({
                    "collector": fleet.id(),
                    "connected": t.connected,
                    "disconnected": t.disconnected,
                    "backlog_batches": t.backlog_batches,
                    "oldest_backlog_secs": t.oldest_secs,
                    "gateways": fleet.snapshot(),
                }))
            }),
        )
    }
}

/// [`run`], reporting its health through `health`.
pub async fn run_with(
    cfg: CollectConfig,
    shutdown: CancellationToken,
    health: Health,
) -> Result<()> {
    let tokens = match &cfg.token_file {
        Some(p) => Some(load_tokens(p)?),
        None => {
            if cfg.listen.is_some() {
                tracing::warn!("no --token-file: every client is accepted without authentication");
            }
            None
        }
    };
    let tls = tls_acceptor(&cfg)?;
    let mqtt = match &cfg.mqtt {
        Some(m) => Some(super::mqtt::MqttSource::new(
            m.clone(),
            &cfg.data_dir,
            cfg.max_frame,
        )?),
        None => None,
    };
    if cfg.listen.is_none() && mqtt.is_none() {
        bail!("nothing to receive from: give --listen, --mqtt or both");
    }
    if cfg.heartbeat < Duration::from_secs(1) {
        bail!("the heartbeat interval must be at least one second");
    }
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create {}", cfg.data_dir.display()))?;
    let specs = if cfg.sinks.is_empty() {
        vec![SinkSpec::Jsonl(cfg.data_dir.clone())]
    } else {
        cfg.sinks.clone()
    };
    let sinks = tokio::select! {
        () = shutdown.cancelled() => return Ok(()),
        s = Sinks::open(&specs) => Arc::new(s?),
    };
    health.set(sinks.clone());
    sinks.spawn_monitors(&shutdown);
    sinks.publish_fleet(&health.fleet());
    {
        let (fleet, shutdown) = (health.fleet(), shutdown.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = every.tick() => fleet.report(),
                    () = shutdown.cancelled() => return,
                }
            }
        });
    }
    let listener = match &cfg.listen {
        Some(listen) => {
            let listener = TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            let addr = listener.local_addr()?;
            let addr_file = cfg.data_dir.join(ADDR_FILE);
            std::fs::write(addr_file.with_extension("addr.tmp"), format!("{addr}\n"))
                .and_then(|()| std::fs::rename(addr_file.with_extension("addr.tmp"), &addr_file))
                .with_context(|| format!("cannot write {}", addr_file.display()))?;
            tracing::info!(
                %addr,
                tls = tls.is_some(),
                mutual_tls = cfg.client_ca.is_some(),
                auth = tokens.is_some(),
                data_dir = %cfg.data_dir.display(),
                sinks = %specs.iter().map(ToString::to_string).collect::<Vec<_>>().join(" "),
                "collector listening"
            );
            Some(listener)
        }
        None => None,
    };
    let buffer = Buffer::new(cfg.max_buffered);
    let tracker = TaskTracker::new();
    if let Some(source) = mqtt {
        let state = Arc::new(super::mqtt::SourceState::default());
        let _ = health.mqtt.set(state.clone());
        tracker.spawn(source.run(sinks.clone(), buffer.clone(), state, shutdown.clone()));
    }
    let shared = Arc::new(Shared {
        pending: Pending::new(cfg.max_pending, cfg.max_pending_per_address),
        sessions: Arc::new(Semaphore::new(cfg.max_connections)),
        buffer,
        fleet: health.fleet(),
        cfg,
        tokens,
        tls,
        sinks: sinks.clone(),
        log: RateLimit::new(Duration::from_secs(5)),
        shutdown: shutdown.clone(),
    });
    let listening = listener.is_some();
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = async { listener.as_ref().expect("checked").accept().await }, if listening => match accepted {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    let sh = shared.clone();
                    tracker.spawn(async move {
                        sh.connection(tcp, peer).await;
                    });
                }
                Err(e) => {
                    // E.g. EMFILE: back off a little instead of spinning.
                    shared.warn("accept", &format!("accept failed: {e}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    drop(listener);
    tracker.close();
    let open = tracker.len();
    if open > 0 {
        tracing::info!(
            connections = open,
            "waiting for connections to finish their batch"
        );
    }
    if timeout(shared.cfg.shutdown_timeout, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("connections did not finish in time; unacknowledged batches will be resent");
    }
    sinks.flush().await?;
    tracing::info!("collector stopped");
    Ok(())
}

impl Shared {
    fn warn(&self, key: &'static str, msg: &str) {
        self.log.warn(key, msg);
    }

    async fn connection(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr) {
        let slot = match self.pending.admit(peer.ip()) {
            Ok((slot, evicted_one)) => {
                if evicted_one {
                    metrics::counter!("edgeferry_collect_pending_evicted_total").increment(1);
                    self.warn(
                        "pending_evicted",
                        &format!(
                            "{} connections are still in their handshake (collect \
                             --max-pending): closed the oldest of them for {peer}",
                            self.cfg.max_pending
                        ),
                    );
                }
                slot
            }
            Err(Refused::PerAddress) => {
                metrics::counter!("edgeferry_collect_refused_total", "reason" => "per_address")
                    .increment(1);
                self.warn(
                    "per_address",
                    &format!(
                        "refusing {peer}: {} connections from {} are still in their handshake \
                         (collect --max-pending-per-address)",
                        self.cfg.max_pending_per_address,
                        peer.ip()
                    ),
                );
                if self.tls.is_none() {
                    let _ = tcp.try_write(BUSY_RESPONSE);
                }
                return;
            }
        };
        let hs = self.cfg.handshake_timeout;
        let evicted = slot.evicted.clone();
        let end = match &self.tls {
            Some(acceptor) => {
                let stream = tokio::select! {
                    () = evicted.cancelled() => Err(End::ok("pending_evicted", "closed for a newer connection while still in its TLS handshake")),
                    r = timeout(hs, acceptor.accept(tcp)) => match r {
                        Ok(Ok(stream)) => Ok(stream),
                        Ok(Err(e)) => Err(End::bad("tls", format!("TLS handshake failed: {e}"))),
                        Err(_) => Err(End::bad("tls_timeout", "TLS handshake timed out")),
                    },
                };
                match stream {
                    Ok(stream) => self.websocket(stream, peer, slot).await,
                    Err(end) => end,
                }
            }
            None => self.websocket(tcp, peer, slot).await,
        };
        metrics::counter!("edgeferry_collect_connections_closed_total", "reason" => end.key)
            .increment(1);
        if let Some(stage) = end.key.strip_suffix("_timeout") {
            // tls, upgrade or hello: a client that connects and then stalls.
            metrics::counter!("edgeferry_collect_handshake_timeouts_total", "stage" => stage)
                .increment(1);
        }
        if end.problem {
            self.warn(
                end.key,
                &format!("connection from {peer} dropped: {}", end.detail),
            );
        } else {
            tracing::debug!(%peer, reason = end.key, "{}", end.detail);
        }
    }

    async fn websocket<S>(&self, stream: S, peer: SocketAddr, slot: PendingSlot<'_>) -> End
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let limit = self.cfg.max_frame as usize + HEADER_LEN + WS_SLACK;
        // tungstenite reads into a buffer of `read_buffer_size` allocated per connection,
        // 128 KiB by default: most of a connection's memory, with thousands of gateways per
        // collector (benches/fleet.rs measured 226 KiB of RSS per connected gateway). A batch
        // is tens of KiB; reading it in 16 KiB chunks costs a syscall or two more.
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(WS_READ_BUFFER)
            .max_message_size(Some(limit))
            .max_frame_size(Some(limit));
        let tokens = self.tokens.as_deref();
        // A session place is taken only for an authorized client, at its upgrade.
        let mut session: Option<tokio::sync::OwnedSemaphorePermit> = None;
        let sessions = &self.sessions;
        // The signature is tungstenite's `Callback`; the large error type is theirs.
        #[allow(clippy::result_large_err)]
        let callback = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
            if !authorized(tokens, req) {
                return Err(unauthorized());
            }
            match sessions.clone().try_acquire_owned() {
                Ok(p) => {
                    session = Some(p);
                    Ok(resp)
                }
                Err(_) => Err(busy()),
            }
        };
        let upgrade = timeout(
            self.cfg.handshake_timeout,
            tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(ws_config)),
        );
        let accepted = tokio::select! {
            () = slot.evicted.cancelled() => {
                return End::ok(
                    "pending_evicted",
                    "closed for a newer connection while still before its WebSocket upgrade",
                );
            }
            r = upgrade => r,
        };
        drop(slot); // authenticated (or gone): no longer pending
        let ws = match accepted {
            Ok(Ok(ws)) => ws,
            Ok(Err(tungstenite::Error::Http(resp))) => {
                if resp.status() == http::StatusCode::SERVICE_UNAVAILABLE {
                    metrics::counter!("edgeferry_collect_refused_total", "reason" => "sessions_full")
                        .increment(1);
                    return End::bad(
                        "sessions_full",
                        format!(
                            "refused with HTTP 503: {} gateway sessions already open (collect \
                             --max-connections)",
                            self.cfg.max_connections
                        ),
                    );
                }
                metrics::counter!("edgeferry_collect_refused_total", "reason" => "unauthorized")
                    .increment(1);
                return End::bad(
                    "unauthorized",
                    format!("upgrade refused with HTTP {}", resp.status()),
                );
            }
            // Connected and closed without a request: a TCP health check or port scan.
            Ok(Err(tungstenite::Error::Protocol(
                tungstenite::error::ProtocolError::HandshakeIncomplete,
            ))) => return End::ok("probe", "closed before sending a request"),
            Ok(Err(e)) => return End::bad("upgrade", format!("WebSocket upgrade failed: {e}")),
            Err(_) => return End::bad("upgrade_timeout", "WebSocket upgrade timed out"),
        };
        let Some(_session) = session else {
            return End::bad("upgrade", "upgraded without a session place");
        };
        metrics::gauge!("edgeferry_collect_sessions")
            .set((self.cfg.max_connections - self.sessions.available_permits()) as f64);
        Session {
            shared: self,
            peer,
            ws,
            gateway: None,
            epoch: 0,
            dict: protocol::DictDecoder::new(),
            stores: FuturesUnordered::new(),
        }
        .run()
        .await
    }
}

/// One connection after the upgrade.
struct Session<'a, S> {
    shared: &'a Shared,
    peer: SocketAddr,
    ws: tokio_tungstenite::WebSocketStream<S>,
    /// The gateway id from its Hello; `None` until then, while only a Hello is accepted.
    gateway: Option<String>,
    epoch: u64,
    dict: protocol::DictDecoder,
    /// Batches handed to the sinks, not yet acknowledged: at most `max_in_flight`, stored
    /// concurrently (a gateway's window fills the engine's pipeline, not one round trip at
    /// a time) and acknowledged as each becomes durable, in whatever order.
    stores: FuturesUnordered<JoinHandle<Done>>,
}

impl<S> Drop for Session<'_, S> {
    fn drop(&mut self) {
        if let Some(g) = &self.gateway {
            self.shared.fleet.disconnected(g);
        }
    }
}

/// What processing one frame asks for.
enum Next {
    Continue,
    Reply(Frame),
    /// Send an Error frame and close.
    Fail(ErrorCode, String, &'static str),
}

impl<S> Session<'_, S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    async fn send(&mut self, frame: &Frame) -> Result<(), End> {
        let msg = Message::Binary(protocol::encode(frame).into());
        match timeout(self.shared.cfg.write_timeout, self.ws.send(msg)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(End::bad("send", format!("send failed: {e}"))),
            Err(_) => Err(End::bad(
                "slow_reader",
                "client does not read (write timeout)",
            )),
        }
    }

    /// Sends an Error frame, closes, and drains what the client still sends for a moment so
    /// it can read the Error before the connection goes.
    async fn fail(&mut self, code: ErrorCode, message: String, key: &'static str) -> End {
        let detail = format!(
            "{code:?}: {message}{}",
            self.gateway
                .as_deref()
                .map(|g| format!(" (gateway {g})"))
                .unwrap_or_default()
        );
        let frame = Frame::error(code, message);
        if self.send(&frame).await.is_ok() {
            let wt = self.shared.cfg.write_timeout;
            let _ = timeout(wt, self.ws.close(None)).await;
            let _ = timeout(Duration::from_secs(1), async {
                while let Some(Ok(_)) = self.ws.next().await {}
            })
            .await;
        }
        End::bad(key, detail)
    }

    async fn run(mut self) -> End {
        let hb = self.shared.cfg.heartbeat;
        let idle = hb * 3;
        let hello_deadline = Instant::now() + self.shared.cfg.handshake_timeout;
        let mut last_rx = Instant::now();
        let mut next_heartbeat = Instant::now() + hb;
        let max_in_flight = self.shared.cfg.max_in_flight.max(1) as usize;
        let mut window_full = false;
        loop {
            let deadline = if self.gateway.is_none() {
                hello_deadline
            } else {
                last_rx + idle
            };
            // With its window full the gateway waits for us: no reading, no idle check.
            let reading = self.stores.len() < max_in_flight;
            if !reading && !window_full {
                // The per-gateway limit bites: this gateway waits, the others do not.
                metrics::counter!("edgeferry_collect_window_full_total").increment(1);
            }
            window_full = !reading;
            let msg = tokio::select! {
                biased;
                () = self.shared.shutdown.cancelled() => {
                    // Acknowledging what the sinks are finishing saves the gateway resends.
                    while let Some(done) = self.stores.next().await {
                        if let Err(end) = self.acknowledge(done).await {
                            return end;
                        }
                    }
                    let _ = timeout(Duration::from_secs(2), self.ws.close(None)).await;
                    return End::ok("shutdown", "closed for shutdown");
                }
                Some(done) = self.stores.next(), if !self.stores.is_empty() => {
                    if let Err(end) = self.acknowledge(done).await {
                        return end;
                    }
                    continue;
                }
                () = sleep_until(deadline), if reading => {
                    return if self.gateway.is_none() {
                        End::bad("hello_timeout", "no Hello within the handshake timeout")
                    } else {
                        End::bad("idle", format!("silent for {idle:?}"))
                    };
                }
                () = sleep_until(next_heartbeat), if self.gateway.is_some() => {
                    next_heartbeat = Instant::now() + hb;
                    if let Err(end) = self.send(&Frame::Heartbeat(Heartbeat { time_ms: now_ms() })).await {
                        return end;
                    }
                    continue;
                }
                m = self.ws.next(), if reading => m,
            };
            let bytes = match msg {
                None => return End::ok("closed", "connection closed"),
                Some(Err(tungstenite::Error::Capacity(e))) => {
                    return self
                        .fail(
                            ErrorCode::TooLarge,
                            format!("message too large: {e}"),
                            "too_large",
                        )
                        .await;
                }
                Some(Err(e)) => return End::bad("read", format!("read failed: {e}")),
                Some(Ok(Message::Binary(b))) => b,
                Some(Ok(Message::Close(_))) => return End::ok("closed", "client closed"),
                Some(Ok(Message::Text(_))) => {
                    return self
                        .fail(
                            ErrorCode::Malformed,
                            "text messages are not part of the protocol".into(),
                            "malformed",
                        )
                        .await;
                }
                Some(Ok(_)) => {
                    // Ping/pong: tungstenite answers pings itself; counts as a sign of life.
                    last_rx = Instant::now();
                    continue;
                }
            };
            last_rx = Instant::now();
            match self.handle(&bytes).await {
                Next::Continue => {}
                Next::Reply(frame) => {
                    if let Err(end) = self.send(&frame).await {
                        return end;
                    }
                }
                Next::Fail(code, message, key) => return self.fail(code, message, key).await,
            }
        }
    }

    /// Acknowledges a finished batch, and with it every other one finished by now (one Ack
    /// frame); a batch a sink failed to store ends the connection (after acknowledging
    /// those that were stored), and the gateway resends it.
    async fn acknowledge(&mut self, first: Result<Done, JoinError>) -> Result<(), End> {
        let mut seqs = Vec::new();
        let mut failed = None;
        let mut next = Some(first);
        while let Some(joined) = next {
            match joined {
                Ok(Done {
                    seq,
                    items,
                    stored: Ok(outcome),
                }) => {
                    if outcome != Stored::Written(items) {
                        tracing::debug!(peer = %self.peer, seq, ?outcome, "batch not written again");
                    }
                    seqs.push(seq);
                }
                Ok(Done { stored: Err(e), .. }) => failed = Some(format!("{e:#}")),
                Err(e) => failed = Some(format!("storing a batch panicked: {e}")),
            }
            if failed.is_some() {
                break;
            }
            next = self.stores.next().now_or_never().flatten();
        }
        if !seqs.is_empty() {
            if let Some(g) = &self.gateway {
                self.shared.fleet.seen(g, seqs.len() as u64);
            }
            self.send(&Frame::Ack(Ack { seqs })).await?;
        }
        match failed {
            None => Ok(()),
            Some(e) => {
                tracing::error!("{e}");
                Err(self
                    .fail(ErrorCode::Internal, "storage failure".into(), "storage")
                    .await)
            }
        }
    }

    async fn handle(&mut self, bytes: &[u8]) -> Next {
        let frame = match protocol::decode(bytes, self.shared.cfg.max_frame) {
            Ok(f) => f,
            Err(e) => {
                let key = match e.code() {
                    ErrorCode::TooLarge => "too_large",
                    ErrorCode::UnsupportedVersion => "version",
                    _ => "malformed",
                };
                return Next::Fail(e.code(), e.to_string(), key);
            }
        };
        let Some(gateway) = self.gateway.clone() else {
            let Frame::Hello(hello) = frame else {
                return Next::Fail(
                    ErrorCode::Malformed,
                    format!("expected Hello first, got {:?}", frame.kind()),
                    "no_hello",
                );
            };
            return self.hello(hello).await;
        };
        match frame {
            Frame::Dict(d) => match self.dict.apply(&d) {
                Ok(()) => Next::Continue,
                Err(e) => Next::Fail(e.code(), e.to_string(), "dict"),
            },
            Frame::Batch(b) => {
                let items = match self.dict.decode_batch(&b) {
                    Ok(items) => items,
                    Err(e) => return Next::Fail(e.code(), e.to_string(), "batch"),
                };
                let (epoch, seq, n) = (self.epoch, b.seq, items.len());
                let lines = match Sinks::lines(&gateway, epoch, seq, &items) {
                    Ok(lines) => lines,
                    Err(e) => {
                        tracing::error!("{e:#}");
                        return Next::Fail(
                            ErrorCode::Internal,
                            "storage failure".into(),
                            "storage",
                        );
                    }
                };
                drop(items);
                let shared = self.shared;
                let Some(room) = shared.buffer.reserve(lines.len(), &shared.shutdown).await else {
                    return Next::Continue; // shutting down: not acknowledged, resent later
                };
                let sinks = shared.sinks.clone();
                // A task of its own: it finishes (and saves a resend) even if this
                // connection goes. The ack is sent only after every sink made it durable.
                self.stores.push(tokio::spawn(async move {
                    let stored = sinks.store_batch(&gateway, epoch, seq, lines, n).await;
                    drop(room);
                    Done {
                        seq,
                        items: n,
                        stored,
                    }
                }));
                Next::Continue
            }
            Frame::Heartbeat(_) => {
                self.shared.fleet.seen(&gateway, 0);
                Next::Continue
            }
            Frame::Health(h) => {
                self.shared.fleet.health(&gateway, h);
                Next::Continue
            }
            Frame::Error(e) => Next::Fail(
                ErrorCode::Malformed,
                format!("client sent an error: {:?} {}", e.code, e.message),
                "client_error",
            ),
            other => Next::Fail(
                ErrorCode::Malformed,
                format!("unexpected {:?} frame", other.kind()),
                "unexpected",
            ),
        }
    }

    async fn hello(&mut self, hello: protocol::Hello) -> Next {
        if !protocol::valid_gateway_id(&hello.gateway) {
            return Next::Fail(
                ErrorCode::Malformed,
                "gateway id must be 1..=128 bytes of [A-Za-z0-9._-], not starting with '.'".into(),
                "gateway_id",
            );
        }
        let Some(version) = protocol::negotiate(SUPPORTED_VERSIONS, &hello.versions) else {
            return Next::Fail(
                ErrorCode::UnsupportedVersion,
                format!(
                    "no common protocol version: client {:?}, server {:?}",
                    hello.versions, SUPPORTED_VERSIONS
                ),
                "version",
            );
        };
        let (epoch, first) = (hello.epoch, hello.first_seq);
        let stored = match self
            .shared
            .sinks
            .hello(&hello.gateway, epoch, first, MAX_STORED_RANGES)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("{e:#}");
                return Next::Fail(ErrorCode::Internal, "storage failure".into(), "storage");
            }
        };
        tracing::info!(
            peer = %self.peer,
            gateway = %hello.gateway,
            epoch = hello.epoch,
            first_seq = hello.first_seq,
            software = %hello.software,
            stored_ranges = stored.len(),
            "gateway connected"
        );
        self.shared.fleet.connected(
            &hello.gateway,
            hello.epoch,
            &hello.software,
            &self.peer.to_string(),
        );
        self.gateway = Some(hello.gateway);
        self.epoch = hello.epoch;
        let cfg = &self.shared.cfg;
        Next::Reply(Frame::Welcome(Welcome {
            version,
            stored,
            max_in_flight: cfg.max_in_flight,
            max_frame: cfg.max_frame,
            heartbeat_secs: u32::try_from(cfg.heartbeat.as_secs()).unwrap_or(u32::MAX),
        }))
    }
}
