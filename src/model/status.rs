//! The gateway's status report: what `/status` serves, `edgeferry status` renders and the live
//! feed carries to the dashboard. Its field names are part of the interface of `edgeferry
//! status`, so it lives below every stage that fills it in.

use serde::{Deserialize, Serialize};

/// One rejected message, kept so a field engineer can see what a sensor sent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RejectedMessage {
    /// When it arrived (RFC 3339).
    pub time: String,
    /// The MQTT topic it was published on, which usually identifies the sensor.
    pub topic: String,
    /// Stable reason label (also the metric label).
    pub reason: String,
    /// What exactly was wrong with it, e.g. the size limit exceeded or which part failed to
    /// decode.
    pub detail: String,
    /// The first bytes of the payload, lossily as text.
    pub payload: String,
}

/// What `/status` reports (field names are part of the interface of `edgeferry status`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    /// `[gateway] id`.
    pub gateway: String,
    /// Version of the running edgeferry binary, e.g. to spot a gateway not yet upgraded.
    pub version: String,
    /// Seconds since start.
    pub uptime_secs: u64,
    /// State recovered and subscriptions acknowledged.
    pub ready: bool,
    /// True when nothing in `problems`.
    pub healthy: bool,
    /// Human descriptions of what is wrong right now.
    pub problems: Vec<String>,
    /// Readings lost recently although the daemon works (dropped as too late, rejected for
    /// clock skew, dropped at the disk quota): the status is DEGRADED while this is not empty.
    #[serde(default)]
    pub degraded: Vec<String>,
    /// The connection to the local MQTT broker: URL, connected, subscribed, last error.
    pub broker: BrokerStatus,
    /// Ingest counters since start.
    pub ingest: IngestCounters,
    /// The last rejected messages, oldest first.
    pub rejected_recent: Vec<RejectedMessage>,
    /// Processing counters: series tracked, alerts, windows, budget misses, quota drops.
    pub process: ProcessCounters,
    /// The outbox backlog (not yet acknowledged by the central side).
    pub backlog: Backlog,
    /// The upstream link (absent when no `[upstream]` is configured).
    pub upstream: Option<UpstreamStatus>,
    /// The gateway's wall clock: trusted or not, steps, disagreement with the sensors.
    #[serde(default)]
    pub clock: ClockStatus,
    /// What edgeferry makes the disk write (flash wear).
    #[serde(default)]
    pub disk: DiskWrites,
}

/// What edgeferry makes the disk write: SD cards and eMMC wear out by the bytes written to
/// them (see `crate::store::wear`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DiskWrites {
    /// Bytes this process caused to be written since it started (`/proc/self/io`); `None`
    /// where the kernel does not say.
    pub written_bytes: Option<u64>,
    /// The write rate of the last ten minutes, as bytes per day; `None` in the first minute.
    pub per_day_bytes: Option<u64>,
    /// `[store] endurance`: the card's rated write endurance, when configured.
    pub endurance_bytes: Option<u64>,
    /// Years until edgeferry alone has written `endurance_bytes` at `per_day_bytes`.
    pub years_to_endurance: Option<f64>,
}

/// What edgeferry knows about the gateway's wall clock (see `crate::clock`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClockStatus {
    /// Trusted: `[clock] synchronised = "yes"`, or the kernel reports NTP synchronisation.
    /// Only a trusted clock rejects sensor timestamps from the future.
    pub synchronised: bool,
    /// Wall-clock steps (forward or back) seen since start.
    pub steps: u64,
    /// The last of them, e.g. "back by 1h at 2026-12-03T10:00:00.000Z".
    pub last_step: Option<String>,
    /// How far arrival times run ahead of the wall clock, ms: after a step back they go on
    /// from the monotonic clock until the wall clock catches up (0 normally).
    pub ahead_of_wall_ms: i64,
    /// Messages whose timestamps disagreed with the untrusted clock by more than
    /// `mqtt.future_skew` (accepted) since start.
    pub disagreements: u64,
    /// Why the clock is suspect right now (also a `degraded` line); `None` when it is not.
    pub suspect: Option<String>,
}

/// Processing's counters when the report was made: `series`, `alerts_active` and `blocked`
/// describe that moment, the others count since start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessCounters {
    /// Distinct series (metric + tags) processing tracks, bounded by `process.max_series`.
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

/// What waits in the outbox (both lanes) for the central side's acknowledgement.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Backlog {
    /// Unacknowledged batches over both lanes.
    pub batches: u64,
    /// Aggregates and alerts in those batches.
    pub items: u64,
    /// Their stored size in bytes (record headers included, segment-file framing not).
    pub bytes: u64,
    /// Age of the oldest waiting batch, seconds.
    pub oldest_age_secs: Option<u64>,
}

/// The link to the central system as the forwarder sees it; down makes the gateway
/// unhealthy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpstreamStatus {
    /// The URL of `[upstream] url` in use (connected to, or being tried).
    pub url: String,
    /// Moves from one of `[upstream] url`'s URLs to the next since start.
    #[serde(default)]
    pub switches: u64,
    /// Whether a connection to the central system is up when the report is made.
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

/// The connection to the local MQTT broker the sensors publish to; down makes the gateway
/// unhealthy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BrokerStatus {
    /// `[mqtt] url`.
    pub url: String,
    /// Whether the MQTT connection is up when the report is made.
    pub connected: bool,
    /// Subscriptions acknowledged on the current connection.
    pub subscribed: bool,
    /// Reconnects since start.
    pub reconnects: u64,
    /// Last connection error while down.
    pub last_error: Option<String>,
}

/// What ingest has received from the broker since start and what became of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IngestCounters {
    /// PUBLISH packets received from the broker, retained copies and redeliveries included.
    pub messages: u64,
    /// Readings committed to the journal.
    pub readings: u64,
    /// Messages (or readings, for the series limit) rejected.
    pub rejected: u64,
    /// Broker redeliveries recognised and dropped.
    pub duplicates_dropped: u64,
}
