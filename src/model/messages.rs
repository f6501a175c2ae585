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

/// What ingest hands to processing per commit group: the records, and the devices the group
/// reported gone (Sparkplug B deaths), each after the records that came before it.
#[derive(Debug, Clone, Default)]
pub struct CommitGroup {
    /// The group's committed records, in journal order.
    pub records: Vec<Committed>,
    /// Deaths, in message order.
    pub offline: Vec<Offline>,
}

/// A source that reported itself gone (a Sparkplug B NDEATH or DDEATH): its series' silence
/// rules raise at once instead of after `silent_for`. Not a journal record: the decoder's
/// node file holds it (written before the death is acknowledged), and the daemon applies
/// what it holds again after a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offline {
    /// Tags every series of the source carries (`group`, `edge_node`, and `device` for a
    /// device): a series is the source's when its tags include all of them.
    pub tags: Vec<(String, String)>,
    /// How many of the group's records came before it.
    pub after: usize,
}

impl Offline {
    /// Whether a series with `tags` belongs to the source that went.
    pub fn covers(&self, tags: &super::reading::Tags) -> bool {
        self.tags
            .iter()
            .all(|(k, v)| tags.get(k).is_some_and(|t| t == v))
    }
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
