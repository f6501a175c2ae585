//! The gateway's status report: what `/status` serves, `edgeferry status` renders and the live
//! feed carries to the dashboard. Its field names are part of the interface of `edgeferry
//! status`, so it lives below every stage that fills it in.

use serde::{Deserialize, Serialize};

/// One rejected message, kept so a field engineer can see what a sensor sent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RejectedMessage {
    /// When it arrived (RFC 3339).
    pub time: String,
    /// Its topic.
    pub topic: String,
    /// Stable reason label (also the metric label).
    pub reason: String,
    /// Human explanation.
    pub detail: String,
    /// The first bytes of the payload, lossily as text.
    pub payload: String,
}

/// What `/status` reports (field names are part of the interface of `edgeferry status`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    /// `[gateway] id`.
    pub gateway: String,
    /// edgeferry version.
    pub version: String,
    /// Seconds since start.
    pub uptime_secs: u64,
    /// State recovered and subscriptions acknowledged.
    pub ready: bool,
    /// True when nothing in `problems`.
    pub healthy: bool,
    /// Human descriptions of what is wrong right now.
    pub problems: Vec<String>,
    /// Broker link.
    pub broker: BrokerStatus,
    /// Ingest counters since start.
    pub ingest: IngestCounters,
    /// The last rejected messages, oldest first.
    pub rejected_recent: Vec<RejectedMessage>,
    /// Local processing.
    pub process: ProcessCounters,
    /// The outbox backlog (not yet acknowledged by the central side).
    pub backlog: Backlog,
    /// The upstream link (absent when no `[upstream]` is configured).
    pub upstream: Option<UpstreamStatus>,
}

/// Processing counters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessCounters {
    /// Series with state.
    pub series: u64,
    /// Alerts currently raised.
    pub alerts_active: u64,
    /// Alerts raised or cleared since start.
    pub alerts: u64,
    /// Windows emitted since start.
    pub windows_emitted: u64,
    /// Times the processing backlog was older than the budget.
    pub budget_violations: u64,
    /// Items dropped at the disk quota since start.
    pub dropped_items: u64,
    /// Ingest held back at the disk quota (`when_full = "block"`).
    pub blocked: bool,
}

/// Outbox backlog.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Backlog {
    /// Batches waiting.
    pub batches: u64,
    /// Items in them.
    pub items: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Age of the oldest waiting batch, seconds.
    pub oldest_age_secs: Option<u64>,
}

/// Upstream link state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpstreamStatus {
    /// `[upstream] url`.
    pub url: String,
    /// Connected now.
    pub connected: bool,
    /// Batches sent since start (including resends).
    pub batches_sent: u64,
    /// Batches acknowledged since start.
    pub batches_acked: u64,
    /// Reconnects since start.
    pub reconnects: u64,
    /// Why it is down.
    pub last_error: Option<String>,
}

/// Broker link state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BrokerStatus {
    /// `[mqtt] url`.
    pub url: String,
    /// Connected now.
    pub connected: bool,
    /// Subscriptions acknowledged on the current connection.
    pub subscribed: bool,
    /// Reconnects since start.
    pub reconnects: u64,
    /// Last connection error while down.
    pub last_error: Option<String>,
}

/// Ingest counters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IngestCounters {
    /// Messages received.
    pub messages: u64,
    /// Readings committed to the journal.
    pub readings: u64,
    /// Messages (or readings, for the series limit) rejected.
    pub rejected: u64,
    /// Broker redeliveries recognised and dropped.
    pub duplicates_dropped: u64,
}
