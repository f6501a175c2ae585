//! Ingest: MQTT subscription → decode → journal commit → acknowledgement.
//!
//! ```text
//!  broker ──publish──▶ [poll task] ──Incoming──▶ [committer] ──Committed──▶ processing
//!     ▲                  │   ▲ (bounded channel,      │ journal.append × N
//!     │                  │   │  max_unacked permits)  │ journal.sync (group commit)
//!     └──── PUBACKs ◀────┘   └──── ack group ─────────┘ (in order, after the sync)
//! ```
//!
//! The durability rule: a PUBACK leaves only after the message's journal group is synced, so
//! a crash at any point makes the broker redeliver exactly what is not yet durable. What *is*
//! durable but not yet acknowledged comes back with DUP=1 and is recognised ([`dedup`]).
//!
//! The poll task owns rumqttc's event loop and writes each commit group's PUBACKs straight
//! into the connection's buffer with one flush (rumqttc's `AsyncClient::ack` flushes per ack
//! and can block while the event loop is not polled). It stops reading from the socket when
//! `max_unacked` messages are not yet durable, which is what bounds memory (Mosquitto does
//! not hold its inflight window for a client that acknowledges late); a permit comes back as
//! soon as its message is durable.
//!
//! QoS 0 messages are journaled too, but cannot be protected: the broker forgets them as soon
//! as they are sent, so one in the socket buffer when edgeferry dies is gone.

pub mod config;
pub mod decode;
pub mod dedup;
pub mod embedded;
pub mod session;

pub use config::{MqttConfig, SubscribeConfig};
pub use session::{IngestError, now_ms, run};

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// What ingest hands to processing: one committed journal record.
#[derive(Debug, Clone)]
pub struct Committed {
    /// The record's position in the journal (the checkpoint position after applying it is `lsn + 1`).
    pub lsn: u64,
    /// The record.
    pub entry: crate::store::journal::JournalEntry,
    /// When the message arrived (live records only; replayed ones have none).
    pub received_at: Option<std::time::Instant>,
}

/// A message edgeferry publishes on the local broker (alerts), with QoS 1.
#[derive(Debug, Clone)]
pub struct Publication {
    /// Topic.
    pub topic: String,
    /// Payload (JSON).
    pub payload: Vec<u8>,
    /// When the reading that caused it was received (for the publish→alert latency).
    pub received_at: Option<std::time::Instant>,
}

/// Checks an MQTT topic filter: non-empty, `+` and `#` alone in their level, `#` last.
pub fn validate_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() {
        return Err("expected a topic filter such as \"sensors/#\"".into());
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, l) in levels.iter().enumerate() {
        if l.contains('#') && (*l != "#" || i + 1 != levels.len()) {
            return Err("`#` must be a whole level and the last one".into());
        }
        if l.contains('+') && *l != "+" {
            return Err("`+` must be a whole level".into());
        }
    }
    Ok(())
}

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

/// Live counters and state of ingest, shared with status reporting.
#[derive(Debug, Default)]
pub struct IngestStatus {
    /// Connected to the broker right now.
    pub connected: AtomicBool,
    /// Every subscription acknowledged by the broker in the current connection.
    pub subscribed: AtomicBool,
    /// Messages received from the broker.
    pub messages: AtomicU64,
    /// Readings committed to the journal.
    pub readings: AtomicU64,
    /// Messages rejected (any reason).
    pub rejected: AtomicU64,
    /// Redeliveries recognised and dropped.
    pub duplicates: AtomicU64,
    /// Reconnects to the broker.
    pub reconnects: AtomicU64,
    /// Last connection error, for status.
    pub last_error: Mutex<Option<String>>,
    /// The last rejected messages (bounded by [`REJECTS_KEPT`]).
    pub rejects: Mutex<VecDeque<RejectedMessage>>,
}

/// How many rejected messages status keeps.
pub const REJECTS_KEPT: usize = 20;

impl IngestStatus {
    fn remember_reject(&self, r: RejectedMessage) {
        let mut q = self.rejects.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() == REJECTS_KEPT {
            q.pop_front();
        }
        q.push_back(r);
    }

    fn set_error(&self, e: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = e;
    }

    /// A copy of the kept rejected messages, oldest first.
    pub fn recent_rejects(&self) -> Vec<RejectedMessage> {
        self.rejects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// The last connection error, if the link is down.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Shorthand used by status.
    pub fn get(v: &AtomicU64) -> u64 {
        v.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_filters_are_checked_like_mqtt_does() {
        assert!(validate_filter("sensors/#").is_ok());
        assert!(validate_filter("sensors/+/temp").is_ok());
        assert!(validate_filter("#").is_ok());
        assert!(validate_filter("").is_err());
        assert!(validate_filter("sensors/#/x").is_err());
        assert!(validate_filter("sensors/a#").is_err());
        assert!(validate_filter("sensors/a+/x").is_err());
    }
}
