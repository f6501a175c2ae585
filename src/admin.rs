//! The admin endpoint: Prometheus metrics, JSON status, health and readiness, the live feed
//! as a WebSocket (`/live`) and the live dashboard (`/`) built on it.
//!
//! Unauthenticated by design, so it listens on loopback unless the installer decides
//! otherwise. The bound address is also written to `<data_dir>/admin.addr`, so
//! `edgeferry status` finds a daemon configured with port 0.

use crate::ingest::IngestStatus;
use crate::live::{LiveEvent, LiveFeed};
use crate::model::{
    Backlog, BrokerStatus, ClockStatus, IngestCounters, ProcessCounters, StatusReport,
    UpstreamStatus,
};
use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, watch};
use tokio_util::sync::CancellationToken;

/// `[admin]`: where the unauthenticated admin HTTP endpoint listens.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin HTTP endpoint. Loopback by default: it is unauthenticated.
    #[serde(default = "default_listen")]
    pub listen: String,
}

impl AdminConfig {
    /// Checks `[admin]` beyond what serde can.
    pub fn validate(&self, p: &mut crate::validate::Problems) {
        if let Err(e) = self.listen.parse::<std::net::SocketAddr>() {
            p.push(format!(
                "admin.listen = {:?}: {e}; expected an address such as \"127.0.0.1:9870\"",
                self.listen
            ));
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:9870".to_string()
}

/// The file (in the data dir) holding the admin endpoint's bound address.
pub const ADDR_FILE: &str = "admin.addr";

/// Installs the process-wide Prometheus recorder once and returns its handle.
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .install_recorder()
                .expect("the metrics recorder is installed once")
        })
        .clone()
}

/// Shared state of the admin endpoint.
#[derive(Clone)]
pub struct Admin {
    /// `[gateway] id`, reported as `gateway` in the status.
    pub gateway: String,
    /// `[mqtt] url`, reported in the status and named in its problem lines.
    pub broker_url: String,
    /// Ingest's broker connection state and message counters, updated by the ingest task.
    pub ingest: Arc<IngestStatus>,
    /// Becomes true once ready.
    pub ready: watch::Receiver<bool>,
    /// When the daemon started; the reported uptime is measured from it.
    pub started: Instant,
    /// Renders `/metrics`; its upkeep also runs every 5 s while the endpoint serves.
    pub prometheus: PrometheusHandle,
    /// Processing's live counters (series, alerts, quota block), updated by the processor.
    pub process: Arc<crate::process::ProcessStatus>,
    /// The outbox, for the backlog figures.
    pub outbox: Arc<std::sync::Mutex<crate::store::outbox::Outbox>>,
    /// Upstream URL and link state, when configured (a configuration reload can add, change
    /// or remove it).
    pub upstream: watch::Receiver<Option<(String, Arc<crate::forward::ForwardStatus>)>>,
    /// The live feed behind `/live`.
    pub live: LiveFeed,
    /// The gateway's clock: trusted or not, steps seen.
    pub clock: Arc<crate::clock::GatewayClock>,
    /// What this process made the disk write, sampled by [`crate::store::wear::run_sampler`].
    pub disk_writes: Arc<crate::store::wear::WriteRate>,
    /// `[store] endurance` in bytes, when configured.
    pub endurance: Option<u64>,
}

/// How long a loss of readings keeps the status DEGRADED after the last one.
pub const DEGRADED_FOR: Duration = Duration::from_secs(15 * 60);

impl Admin {
    /// Readings lost within [`DEGRADED_FOR`] although the daemon works, one line per cause,
    /// with the total since start and the time of the last one.
    fn degraded(&self) -> Vec<String> {
        let now = crate::clock::now_ms();
        let recent = |at: i64| at > 0 && now - at <= DEGRADED_FOR.as_millis() as i64;
        let p = &self.process;
        let i = &self.ingest;
        let mut out = Vec::new();
        let too_late = p.too_late.load(Ordering::Relaxed);
        let at = p.last_too_late_ms.load(Ordering::Relaxed);
        if too_late > 0 && recent(at) {
            out.push(format!(
                "{too_late} reading(s) dropped as too late since start (older than \
                 process.correction_horizon behind the data), the last at {}",
                crate::util::rfc3339_ms(at)
            ));
        }
        let future = i.future_rejected.load(Ordering::Relaxed);
        let at = i.last_future_ms.load(Ordering::Relaxed);
        if future > 0 && recent(at) {
            out.push(format!(
                "{future} message(s) rejected since start for a timestamp ahead of this \
                 gateway's clock (mqtt.future_skew), the last at {}: check the clocks",
                crate::util::rfc3339_ms(at)
            ));
        }
        let lost = i.sessions_lost.load(Ordering::Relaxed);
        let at = i.last_session_lost_ms.load(Ordering::Relaxed);
        if lost > 0 && recent(at) {
            out.push(format!(
                "the MQTT broker lost edgeferry's session {lost} time(s) since start, the last \
                 at {}: what it queued meanwhile may be gone (check its persistence and \
                 autosave_interval)",
                crate::util::rfc3339_ms(at)
            ));
        }
        let dropped = p.dropped_items.load(Ordering::Relaxed);
        let at = p.last_dropped_ms.load(Ordering::Relaxed);
        if dropped > 0 && recent(at) {
            out.push(format!(
                "{dropped} unsent item(s) dropped at the disk quota since start \
                 (store.max_disk, when_full = \"drop_oldest\"), the last at {}",
                crate::util::rfc3339_ms(at)
            ));
        }
        out.extend(self.clock_status().suspect);
        out
    }

    /// The clock part of the report. The clock is suspect while arrival times are held
    /// ahead of a wall clock that stepped back, or while it is untrusted and sensor
    /// timestamps disagreed with it (within [`DEGRADED_FOR`]).
    fn clock_status(&self) -> ClockStatus {
        let c = &self.clock;
        let i = &self.ingest;
        let synchronised = c.trusted();
        let ahead = c.ahead_of_wall_ms();
        let last_step = c.steps_after(0).last().map(|s| {
            format!(
                "{} by {} at {}",
                if s.delta_ms >= 0 { "forward" } else { "back" },
                crate::clock::human(s.delta_ms.unsigned_abs()),
                crate::util::rfc3339_ms(s.at_ms)
            )
        });
        let mut suspect = Vec::new();
        if ahead > 0 {
            suspect.push(format!(
                "the wall clock is {} behind the arrival times (it stepped back): they go on \
                 from the monotonic clock until it catches up, so nothing is judged late",
                crate::clock::human(ahead as u64)
            ));
        }
        let at = i.last_clock_disagreement_mono.load(Ordering::Relaxed);
        let disagreements = i.clock_disagreements.load(Ordering::Relaxed);
        if !synchronised
            && at > 0
            && crate::clock::mono_ms() - at <= DEGRADED_FOR.as_millis() as i64
        {
            let off = i.clock_disagreement_ms.load(Ordering::Relaxed);
            suspect.push(format!(
                "this gateway's clock is not synchronised (NTP) and sensor timestamps are {} {} \
                 it ({disagreements} message(s) since start, all accepted): one of the clocks \
                 is wrong",
                crate::clock::human(off.unsigned_abs()),
                if off > 0 { "ahead of" } else { "behind" },
            ));
        }
        ClockStatus {
            synchronised,
            steps: c.steps(),
            last_step,
            ahead_of_wall_ms: ahead,
            disagreements,
            suspect: (!suspect.is_empty())
                .then(|| format!("clock suspect: {}", suspect.join("; "))),
        }
    }

    /// Builds the status served at `/status` and sent each second on `/live`; it is healthy
    /// only when no problem (broker, journal writes, upstream, disk quota) is listed.
    pub fn report(&self) -> StatusReport {
        let i = &self.ingest;
        let connected = i.connected.load(Ordering::Relaxed);
        let ready = *self.ready.borrow();
        let mut problems = Vec::new();
        if !connected {
            problems.push(match i.last_error() {
                Some(e) => format!("MQTT broker {} unreachable: {e}", self.broker_url),
                None => format!("not connected to MQTT broker {} yet", self.broker_url),
            });
        } else if !i.subscribed.load(Ordering::Relaxed) {
            problems.push("subscriptions not acknowledged by the broker".into());
        }
        if let Some(e) = i.journal_error() {
            problems.push(format!(
                "journal cannot write ({e}): not acknowledging the broker, retrying until the \
                 disk takes writes again (free space in gateway.data_dir)"
            ));
        }
        let p = &self.process;
        let process = ProcessCounters {
            series: p.series.load(Ordering::Relaxed),
            alerts_active: p.alerts_active.load(Ordering::Relaxed),
            alerts: p.alerts.load(Ordering::Relaxed),
            windows_emitted: p.windows_emitted.load(Ordering::Relaxed),
            budget_violations: p.budget_violations.load(Ordering::Relaxed),
            dropped_items: p.dropped_items.load(Ordering::Relaxed),
            blocked: p.blocked.load(Ordering::Relaxed),
        };
        if let Some(e) = p
            .write_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            problems.push(format!(
                "processing cannot write the outbox or checkpoint ({e}): keeping its state in \
                 memory and retrying (free space in gateway.data_dir)"
            ));
        }
        if process.blocked {
            problems.push("disk quota reached (store.max_disk): ingest is blocked until the upstream drains the outbox".into());
        }
        let backlog = self.backlog();
        let upstream = self.upstream.borrow().clone();
        let upstream = upstream.as_ref().map(|(urls, f)| UpstreamStatus {
            url: f.url().unwrap_or_else(|| urls.clone()),
            switches: f.switches.load(Ordering::Relaxed),
            connected: f.connected.load(Ordering::Relaxed),
            batches_sent: f.batches_sent.load(Ordering::Relaxed),
            batches_acked: f.batches_acked.load(Ordering::Relaxed),
            reconnects: f.reconnects.load(Ordering::Relaxed),
            last_error: f.last_error(),
        });
        if let Some(u) = &upstream
            && !u.connected
        {
            problems.push(match &u.last_error {
                Some(e) => format!("upstream {} unreachable: {e}", u.url),
                None => format!("not connected to upstream {} yet", u.url),
            });
        }
        StatusReport {
            process,
            backlog,
            upstream,
            gateway: self.gateway.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_secs: self.started.elapsed().as_secs(),
            ready,
            healthy: problems.is_empty(),
            problems,
            degraded: self.degraded(),
            broker: BrokerStatus {
                url: self.broker_url.clone(),
                connected,
                subscribed: i.subscribed.load(Ordering::Relaxed),
                reconnects: IngestStatus::get(&i.reconnects),
                last_error: i.last_error(),
            },
            ingest: IngestCounters {
                messages: IngestStatus::get(&i.messages),
                readings: IngestStatus::get(&i.readings),
                rejected: IngestStatus::get(&i.rejected),
                duplicates_dropped: IngestStatus::get(&i.duplicates),
            },
            rejected_recent: i.recent_rejects(),
            clock: self.clock_status(),
            disk: self.disk_writes(),
        }
    }
}

impl Admin {
    /// The disk-write figures: total, rate per day, and the years the card's rated
    /// endurance lasts at that rate.
    fn disk_writes(&self) -> crate::model::status::DiskWrites {
        let per_day = self.disk_writes.per_day();
        crate::model::status::DiskWrites {
            written_bytes: self.disk_writes.total(),
            per_day_bytes: per_day,
            endurance_bytes: self.endurance,
            years_to_endurance: self
                .endurance
                .zip(per_day)
                .and_then(|(e, d)| crate::store::wear::years_to_endurance(e, d)),
        }
    }

    /// Backlog over both outbox lanes (reads the outbox; called on demand only).
    pub fn backlog(&self) -> Backlog {
        let ob = self.outbox.lock().unwrap_or_else(|e| e.into_inner());
        let mut b = Backlog::default();
        let mut oldest: Option<i64> = None;
        for lane in crate::store::outbox::Lane::PRIORITY {
            if let Ok((batches, items, bytes, o)) = ob.backlog(lane) {
                b.batches += batches;
                b.items += items;
                b.bytes += bytes;
                oldest = match (oldest, o) {
                    (Some(a), Some(c)) => Some(a.min(c)),
                    (a, c) => a.or(c),
                };
            }
        }
        b.oldest_age_secs = oldest.map(|t| ((crate::clock::now_ms() - t).max(0) / 1000) as u64);
        b
    }
}

/// The recorder's upkeep (histogram buckets, idle metrics) every 5 s until `shutdown`.
fn spawn_upkeep(handle: PrometheusHandle, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut t = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = t.tick() => handle.run_upkeep(),
                _ = shutdown.cancelled() => return,
            }
        }
    });
}

/// Serves the admin endpoint on `listener` until `shutdown`.
pub async fn serve(listener: tokio::net::TcpListener, admin: Admin, shutdown: CancellationToken) {
    spawn_upkeep(admin.prometheus.clone(), shutdown.clone());
    let ctx = LiveCtx {
        clients: Arc::new(Semaphore::new(MAX_LIVE_CLIENTS)),
        shutdown: shutdown.clone(),
    };
    let app = Router::new()
        .route("/", get(dashboard))
        .route(
            "/live",
            get(
                move |State(a): State<Admin>, uri: Uri, ws: WebSocketUpgrade| {
                    live(a, ctx.clone(), uri, ws)
                },
            ),
        )
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(admin);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::error!("admin endpoint failed: {e}");
    }
}

/// Most WebSocket clients of `/live` at once; more are refused with 503.
pub const MAX_LIVE_CLIENTS: usize = 16;

/// A `/live` client that does not take a message within this long is disconnected.
const LIVE_SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// The dashboard: one self-contained page (inline CSS and JS, nothing fetched elsewhere).
pub const DASHBOARD_HTML: &str = include_str!("dashboard.html");

#[derive(Clone)]
struct LiveCtx {
    clients: Arc<Semaphore>,
    shutdown: CancellationToken,
}

async fn dashboard() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            // Everything is inline; the only connection is the page's own WebSocket.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'",
            ),
        ],
        DASHBOARD_HTML,
    )
}

/// `GET /live[?series=PATTERN]`: a WebSocket of JSON [`LiveEvent`]s — a status snapshot
/// first, then pipeline events as they happen (those of series matching the glob-like
/// PATTERN only, when given) and a status snapshot every second.
async fn live(a: Admin, ctx: LiveCtx, uri: Uri, ws: WebSocketUpgrade) -> Response {
    let Ok(permit) = ctx.clients.clone().try_acquire_owned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("too many /live clients (at most {MAX_LIVE_CLIENTS})\n"),
        )
            .into_response();
    };
    let filter = uri.query().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "series")
            .map(|(_, v)| v.into_owned())
            .filter(|v| !v.is_empty())
    });
    // Subscribed before the upgrade completes: nothing after the first snapshot is missed.
    let rx = a.live.subscribe();
    ws.on_upgrade(move |socket| live_session(a, socket, rx, filter, ctx.shutdown, permit))
}

async fn live_session(
    a: Admin,
    mut socket: WebSocket,
    mut rx: broadcast::Receiver<LiveEvent>,
    filter: Option<String>,
    shutdown: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    metrics::gauge!("edgeferry_live_clients").increment(1.0);
    // The first tick is immediate: the snapshot comes first.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let ev = tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                let close = CloseFrame {
                    code: 1001,
                    reason: "edgeferry is shutting down".into(),
                };
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    socket.send(Message::Close(Some(close))),
                )
                .await;
                break;
            }
            _ = tick.tick() => LiveEvent::Status { status: Box::new(a.report()) },
            r = rx.recv() => match r {
                Ok(ev) => {
                    if let (Some(p), Some(s)) = (&filter, ev.series())
                        && !crate::live::glob_match(p, s)
                    {
                        continue;
                    }
                    ev
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    metrics::counter!(crate::live::LAGGED_METRIC).increment(missed);
                    LiveEvent::Lagged { missed }
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
            m = socket.recv() => match m {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => continue,
            },
        };
        let Ok(text) = serde_json::to_string(&ev) else {
            continue;
        };
        match tokio::time::timeout(LIVE_SEND_TIMEOUT, socket.send(Message::Text(text.into()))).await
        {
            Ok(Ok(())) => {}
            _ => break,
        }
    }
    metrics::gauge!("edgeferry_live_clients").decrement(1.0);
}

async fn metrics(State(a): State<Admin>) -> impl IntoResponse {
    a.refresh_gauges();
    (
        [("content-type", "text/plain; version=0.0.4")],
        a.prometheus.render(),
    )
}

impl Admin {
    /// Sets the gauges that are cheaper to compute when scraped than on every change
    /// (the outbox backlog reads the outbox's files).
    pub fn refresh_gauges(&self) {
        let r = self.report();
        let b = &r.backlog;
        metrics::gauge!("edgeferry_series").set(r.process.series as f64);
        metrics::gauge!("edgeferry_alerts_active").set(r.process.alerts_active as f64);
        metrics::gauge!("edgeferry_outbox_batches").set(b.batches as f64);
        metrics::gauge!("edgeferry_outbox_items").set(b.items as f64);
        metrics::gauge!("edgeferry_outbox_bytes").set(b.bytes as f64);
        metrics::gauge!("edgeferry_outbox_oldest_age_seconds")
            .set(b.oldest_age_secs.unwrap_or(0) as f64);
        metrics::gauge!("edgeferry_ingest_blocked").set(if r.process.blocked { 1.0 } else { 0.0 });
        metrics::gauge!("edgeferry_mqtt_connected").set(if r.broker.connected { 1.0 } else { 0.0 });
        metrics::counter!("edgeferry_mqtt_reconnects_total").absolute(r.broker.reconnects);
        if let Some(u) = &r.upstream {
            metrics::gauge!("edgeferry_upstream_connected").set(if u.connected {
                1.0
            } else {
                0.0
            });
            metrics::counter!("edgeferry_upstream_reconnects_total").absolute(u.reconnects);
        }
        metrics::gauge!("edgeferry_uptime_seconds").set(r.uptime_secs as f64);
    }
}

async fn status(State(a): State<Admin>) -> Json<StatusReport> {
    Json(a.report())
}

/// Serves the admin endpoint while the daemon waits for its data directory before it can
/// start (read-only, full or failing disk), until `stop`. A field engineer's first tool,
/// `edgeferry status`, must say what is wrong then too: `/status` and `/readyz` answer
/// HTTP 503 with what the daemon waits for (the CLI prints it and exits non-zero), `/healthz`
/// says the process is alive, `/metrics` renders (`edgeferry_store_waiting` is 1).
pub async fn serve_waiting(
    listener: tokio::net::TcpListener,
    waiting: watch::Receiver<Option<String>>,
    prometheus: PrometheusHandle,
    stop: CancellationToken,
) {
    let why = move || {
        let w = waiting
            .borrow()
            .clone()
            .unwrap_or_else(|| "starting".into());
        (StatusCode::SERVICE_UNAVAILABLE, format!("waiting: {w}\n"))
    };
    let app = Router::new()
        .route(
            "/metrics",
            get(move || async move {
                (
                    [("content-type", "text/plain; version=0.0.4")],
                    prometheus.render(),
                )
            }),
        )
        .route(
            "/status",
            get({
                let why = why.clone();
                move || async move { why() }
            }),
        )
        .route("/readyz", get(move || async move { why() }))
        .route("/healthz", get(healthz));
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        tracing::error!("admin endpoint failed: {e}");
    }
}

/// `/metrics` and `/healthz` alone, for processes without a gateway's status (`edgeferry
/// collect --metrics-listen`).
#[cfg(feature = "central")]
///
/// `/healthz` answers 200 `ok` while `unhealthy` returns `None`, and 503 with its reason
/// otherwise (a collector whose engine is down: load balancers steer gateways elsewhere).
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
    unhealthy: impl Fn() -> Option<String> + Clone + Send + Sync + 'static,
    extra: Router,
) {
    let handle = prometheus();
    spawn_upkeep(handle.clone(), shutdown.clone());
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let h = handle.clone();
                async move { ([("content-type", "text/plain; version=0.0.4")], h.render()) }
            }),
        )
        .route(
            "/healthz",
            get(move || async move {
                match unhealthy() {
                    None => (StatusCode::OK, "ok\n".to_string()),
                    Some(why) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("unhealthy: {why}\n"),
                    ),
                }
            }),
        )
        .merge(extra);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::error!("metrics endpoint failed: {e}");
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(a): State<Admin>) -> (StatusCode, &'static str) {
    if *a.ready.borrow() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// Where `edgeferry status` should connect: the configured address, or the bound one
/// recorded in the data dir when the configuration says port 0.
pub fn resolve_addr(listen: &str, data_dir: &Path) -> String {
    if listen.ends_with(":0")
        && let Ok(a) = std::fs::read_to_string(data_dir.join(ADDR_FILE))
    {
        return a.trim().to_string();
    }
    listen.to_string()
}

/// Records the bound address for `edgeferry status`.
pub fn record_addr(data_dir: &Path, addr: &std::net::SocketAddr) -> std::io::Result<PathBuf> {
    let p = data_dir.join(ADDR_FILE);
    std::fs::write(&p, addr.to_string())?;
    Ok(p)
}

/// How often a failed [`record_addr`] is retried.
const RECORD_RETRY: Duration = Duration::from_secs(5);

/// Records the bound address, retrying until it succeeds or `shutdown` is cancelled.
///
/// Why not fail the start: `admin.addr` is a convenience for `edgeferry status` (it finds the
/// port when `admin.listen` ends in `:0`). A full or failing data disk is exactly when the
/// gateway must keep ingesting into whatever the journal can still hold and serve `/status`, so
/// a refused write here is a warning (once per episode), not an exit that systemd would turn
/// into a crash loop. Until the file is written, `status` falls back to `admin.listen`.
pub async fn record_addr_until_done(
    data_dir: PathBuf,
    addr: std::net::SocketAddr,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut warned = false;
    loop {
        match record_addr(&data_dir, &addr) {
            Ok(_) => {
                if warned {
                    tracing::info!(
                        "recorded the admin address in {}",
                        data_dir.join(ADDR_FILE).display()
                    );
                }
                return;
            }
            Err(e) if !warned => {
                warned = true;
                // A previous run's file would send `status` to a port nobody listens on.
                let _ = std::fs::remove_file(data_dir.join(ADDR_FILE));
                tracing::warn!(
                    "cannot record the admin address in {}: {e}; `edgeferry status` falls back to \
                     admin.listen until it can (retrying every {RECORD_RETRY:?})",
                    data_dir.join(ADDR_FILE).display()
                );
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(RECORD_RETRY) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// A minimal HTTP GET against the loopback admin endpoint (no HTTP client stack needed for
/// one request to ourselves). Returns (status code, body).
pub fn http_get(addr: &str, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let sock: std::net::SocketAddr = addr.parse().map_err(|e| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{addr}: {e}"))
    })?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, body.to_string()))
}
