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

impl JournalEntry {
    /// The identity of the readings themselves: a 64-bit hash of every reading's series,
    /// event time and value, for recognising a redelivery the broker did not flag as one (new
    /// packet id, DUP=0). `timed` says the record's subscription decodes timestamps from its
    /// payloads (JSON with a `timestamp` path, SenML): then it has an identity even when a
    /// time happens to equal the arrival time to the millisecond. Otherwise only when some
    /// reading's time differs from the arrival time: an arrival-time reading gets a new time
    /// on every delivery, so it has no identity to recognise. `buf` is scratch space for the
    /// series keys. Stable within one process (it is recomputed from the journal at start),
    /// not across versions.
    pub fn identity(&self, timed: bool, buf: &mut String) -> Option<u64> {
        use std::hash::Hasher;
        if !timed && !self.readings.iter().any(|r| r.time_ms != self.received_ms) {
            return None;
        }
        let mut h = std::hash::DefaultHasher::new();
        for r in &self.readings {
            buf.clear();
            super::reading::write_series_key(buf, &r.metric, &r.tags);
            h.write(buf.as_bytes());
            h.write_u8(0xff);
            h.write_i64(r.time_ms);
            h.write_u64(r.value.to_bits());
        }
        Some(h.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn entry(received_ms: i64, readings: &[(f64, i64)]) -> JournalEntry {
        JournalEntry {
            dedup: DedupKey::new(1, "t", b"p"),
            received_ms,
            subscription: 0,
            readings: readings
                .iter()
                .map(|&(value, time_ms)| Reading {
                    metric: "temp".into(),
                    tags: BTreeMap::from([("device".into(), "d1".into())]),
                    value,
                    time_ms,
                })
                .collect(),
        }
    }

    #[test]
    fn readings_with_their_own_timestamps_have_an_identity_arrival_times_do_not() {
        let mut buf = String::new();
        let a = entry(2000, &[(21.5, 1000)]);
        // The same readings delivered again later (new arrival time, new packet id).
        let mut again = entry(9000, &[(21.5, 1000)]);
        again.dedup = DedupKey::new(77, "t", b"p");
        assert_eq!(a.identity(false, &mut buf), again.identity(false, &mut buf));
        assert!(a.identity(false, &mut buf).is_some());
        // Another value at the same time, or another time, is another reading.
        assert_ne!(
            a.identity(false, &mut buf),
            entry(2000, &[(21.6, 1000)]).identity(false, &mut buf)
        );
        assert_ne!(
            a.identity(false, &mut buf),
            entry(2000, &[(21.5, 1001)]).identity(false, &mut buf)
        );
        // Readings stamped with their arrival time: no identity to recognise, unless their
        // subscription reads timestamps from payloads (a time equal to the arrival time).
        assert_eq!(entry(2000, &[(21.5, 2000)]).identity(false, &mut buf), None);
        assert!(
            entry(2000, &[(21.5, 2000)])
                .identity(true, &mut buf)
                .is_some()
        );
    }
}
