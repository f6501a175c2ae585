//! The subscriptions in effect: which filter a topic belongs to and how its payloads are
//! decoded. A configuration reload replaces the whole table while the session runs.
//!
//! Why a table travels with the messages: the poll task matches a message's topic when it
//! arrives and the committer decodes it later, a few messages behind. If each kept its own
//! copy, the messages in between would be matched by the new filters and decoded by the old
//! decoders (or the other way round). So the poll task swaps its table and hands the new one
//! to the committer on the first message it matched with it ([`super::poll::Incoming`]): in
//! the order of the channel, every message is decoded by the table that matched it.

use super::config::SubscribeConfig;
use super::decode::{Decoder, TemplateError};
use tokio::sync::oneshot;

/// The `[[mqtt.subscribe]]` entries as the session uses them; indexes are positions in the
/// configuration (the journal records the index for per-subscription figures), followed by
/// the retired ones.
///
/// Retired: filters a reload removed. They are unsubscribed, but the broker may still deliver
/// what it had queued for them before (MQTT allows that, and a persistent session's queue can
/// be long after a day offline): those readings were published while the subscription was in
/// effect, so they are decoded as before instead of being rejected. A filter configured again
/// is live again; at most [`MAX_RETIRED`] are kept (the oldest go first).
pub(super) struct Subscriptions {
    /// The configured entries first, then the retired ones.
    pub(super) configs: Vec<SubscribeConfig>,
    /// The configured entries' topic filters, subscribed with QoS 1.
    pub(super) filters: Vec<String>,
    /// Each entry's decoder.
    pub(super) decoders: Vec<Decoder>,
    /// Each entry's readings counter, registered once (a registry lookup per message is not
    /// free at 100k+ messages/s).
    pub(super) readings: Vec<metrics::Counter>,
}

/// Retired subscriptions kept to decode what the broker still delivers for them.
pub(super) const MAX_RETIRED: usize = 32;

impl Subscriptions {
    /// The table for `subscribe`; fails on options its format cannot use (the configuration
    /// check refuses those first, with the same message).
    pub(super) fn new(subscribe: &[SubscribeConfig]) -> Result<Subscriptions, TemplateError> {
        Self::with_retired(subscribe.to_vec(), subscribe.len())
    }

    /// The table after a reload to `subscribe`: the entries of `self` whose filter is no
    /// longer configured are retired (newest first).
    pub(super) fn reloaded(
        &self,
        subscribe: &[SubscribeConfig],
    ) -> Result<Subscriptions, TemplateError> {
        let mut configs = subscribe.to_vec();
        let gone = self
            .configs
            .iter()
            .filter(|c| !subscribe.iter().any(|s| s.filter == c.filter))
            .take(MAX_RETIRED);
        configs.extend(gone.cloned());
        Self::with_retired(configs, subscribe.len())
    }

    fn with_retired(configs: Vec<SubscribeConfig>, live: usize) -> Result<Self, TemplateError> {
        Ok(Subscriptions {
            filters: configs[..live].iter().map(|s| s.filter.clone()).collect(),
            decoders: configs
                .iter()
                .map(SubscribeConfig::decoder)
                .collect::<Result<_, _>>()?,
            readings: configs
                .iter()
                .map(|s| {
                    metrics::counter!("edgeferry_ingest_readings_total", "subscription" => s.filter.clone())
                })
                .collect(),
            configs,
        })
    }

    /// The first subscription whose filter matches `topic` (configuration order decides
    /// between overlapping filters), or else the first retired one.
    pub(super) fn matching(&self, topic: &str) -> Option<usize> {
        self.configs
            .iter()
            .position(|c| topic_matches(&c.filter, topic))
    }

    /// Whether subscription `index` reads event times from its payloads.
    pub(super) fn reads_timestamps(&self, index: usize) -> bool {
        self.decoders
            .get(index)
            .is_some_and(Decoder::reads_timestamps)
    }
}

/// MQTT topic filter matching (`+` one level, `#` the rest).
pub(super) fn topic_matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// What changing the subscriptions of the live session did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resubscribed {
    /// The broker acknowledged the new filters (or there were none to add); removed filters
    /// were unsubscribed.
    Acknowledged,
    /// The broker is not connected: the new table is in effect and the filters are
    /// (un)subscribed as soon as it is back.
    AtReconnect,
}

/// A configuration reload's new `[[mqtt.subscribe]]` list, for the running session.
#[derive(Debug)]
pub struct SubscriptionChange {
    /// The subscriptions now configured (order matters as at start).
    pub subscribe: Vec<SubscribeConfig>,
    /// Answered when the broker acknowledged the added filters, or at once when it is not
    /// connected; an error names the filters it refused. Dropped unanswered when the
    /// connection broke before the acknowledgement (the filters are subscribed at reconnect).
    pub done: oneshot::Sender<Result<Resubscribed, String>>,
}

/// The filters in `new` that are not in `old`, and those in `old` that are not in `new`.
pub(super) fn filter_diff(old: &[String], new: &[String]) -> (Vec<String>, Vec<String>) {
    let added = new.iter().filter(|f| !old.contains(f)).cloned().collect();
    let removed = old.iter().filter(|f| !new.contains(f)).cloned().collect();
    (added, removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(filter: &str, format: &str) -> SubscribeConfig {
        serde_json::from_value(serde_json::json!({ "filter": filter, "format": format })).unwrap()
    }

    #[test]
    fn topic_filter_matching_follows_mqtt_rules() {
        assert!(topic_matches("sensors/#", "sensors/a/b"));
        assert!(topic_matches("sensors/#", "sensors"));
        assert!(topic_matches("sensors/+/t", "sensors/a/t"));
        assert!(!topic_matches("sensors/+/t", "sensors/a/b/t"));
        assert!(!topic_matches("sensors/a", "sensors/b"));
        assert!(topic_matches("#", "x/y"));
    }

    #[test]
    fn a_topic_belongs_to_the_first_filter_that_matches_it() {
        let t = Subscriptions::new(&[sub("a/+", "number"), sub("a/#", "json")]).unwrap();
        assert_eq!(t.matching("a/b"), Some(0));
        assert_eq!(t.matching("a/b/c"), Some(1));
        assert_eq!(t.matching("b"), None);
        assert!(!t.reads_timestamps(0), "a bare number carries no time");
        assert!(!t.reads_timestamps(7), "no such subscription");
    }

    #[test]
    fn a_removed_filter_still_decodes_what_the_broker_had_queued_for_it() {
        let t = Subscriptions::new(&[sub("a/+", "number"), sub("b/+", "json")]).unwrap();
        let t = t.reloaded(&[sub("c/+", "number")]).unwrap();
        assert_eq!(
            t.filters,
            ["c/+"],
            "only the configured filter is subscribed"
        );
        assert_eq!(t.matching("c/x"), Some(0));
        assert_eq!(t.matching("a/x"), Some(1), "retired, still decoded");
        assert_eq!(t.matching("b/x"), Some(2));
        // Configured again: live again, and not retired twice.
        let t = t.reloaded(&[sub("a/+", "json")]).unwrap();
        assert_eq!(t.filters, ["a/+"]);
        assert_eq!(t.configs.len(), 3, "a/+ live, c/+ and b/+ retired");
        assert_eq!(t.matching("a/x"), Some(0));
    }

    #[test]
    fn the_retired_filters_are_bounded() {
        let mut t = Subscriptions::new(&[sub("f/0", "number")]).unwrap();
        for i in 1..100 {
            t = t.reloaded(&[sub(&format!("f/{i}"), "number")]).unwrap();
        }
        assert_eq!(t.configs.len(), 1 + MAX_RETIRED);
        assert_eq!(t.matching("f/98"), Some(1), "the newest retired first");
        assert_eq!(t.matching("f/0"), None, "the oldest went");
    }

    #[test]
    fn a_reload_subscribes_what_is_new_and_unsubscribes_what_is_gone() {
        let s = |v: &[&str]| v.iter().map(|f| f.to_string()).collect::<Vec<_>>();
        let (added, removed) = filter_diff(&s(&["a/#", "b/#"]), &s(&["b/#", "c/+"]));
        assert_eq!(added, s(&["c/+"]));
        assert_eq!(removed, s(&["a/#"]));
        let (added, removed) = filter_diff(&s(&["a/#"]), &s(&["a/#"]));
        assert!(added.is_empty() && removed.is_empty());
    }
}
