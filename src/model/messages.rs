//! The messages that travel between stages on their channels: what ingest hands to processing,
//! and what processing asks ingest's MQTT client to publish.

/// What ingest hands to processing: one committed journal record.
#[derive(Debug, Clone)]
pub struct Committed {
    /// The record's position in the journal (the checkpoint position after applying it is `lsn + 1`).
    pub lsn: u64,
    /// The journal record as committed: the message's readings, arrival time and the key that
    /// recognises broker redeliveries.
    pub entry: super::record::JournalEntry,
    /// When the message arrived (live records only; replayed ones have none).
    pub received_at: Option<std::time::Instant>,
}

/// A message edgeferry publishes on the local broker (alerts), with QoS 1.
#[derive(Debug, Clone)]
pub struct Publication {
    /// Topic on the local broker: the rule's `publish` template with its placeholders filled in.
    pub topic: String,
    /// JSON object with the alert's rule, series, metric, tags, state, value and RFC 3339 time.
    pub payload: Vec<u8>,
    /// When the reading that caused it was received (for the publish→alert latency).
    pub received_at: Option<std::time::Instant>,
}
