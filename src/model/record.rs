//! What the journal stores for one MQTT message: its readings and the key that recognises the
//! broker resending it. Shared by ingest (which writes it), the store (which frames it) and
//! processing (which replays it).

use super::reading::Reading;
use serde::{Deserialize, Serialize};

/// Identifies one MQTT delivery well enough to recognise the broker resending it.
///
/// Packet ids wrap at 65535, so the key also carries a digest of topic and payload;
/// a stable checksum (not `std`'s hasher, whose output may change between Rust releases)
/// because keys are compared across restarts and upgrades.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DedupKey {
    /// MQTT packet id (0 for QoS 0, which is never redelivered).
    pub pkid: u16,
    /// CRC32 of the topic (high half) and of the payload (low half).
    pub digest: u64,
}

impl DedupKey {
    /// The key of a message.
    pub fn new(pkid: u16, topic: &str, payload: &[u8]) -> Self {
        let t = crc32fast::hash(topic.as_bytes()) as u64;
        let p = crc32fast::hash(payload) as u64;
        Self {
            pkid,
            digest: (t << 32) | p,
        }
    }
}

/// One journal record: the readings decoded from one MQTT message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// Recognises broker redeliveries after a crash.
    pub dedup: DedupKey,
    /// Wall-clock arrival time (ms since epoch); the reference for lateness and latency.
    pub received_ms: i64,
    /// Index of the `[[mqtt.subscribe]]` entry that decoded it (for per-subscription metrics).
    pub subscription: u16,
    /// The decoded readings (one or more).
    pub readings: Vec<Reading>,
}
