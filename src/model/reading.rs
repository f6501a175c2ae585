//! A reading and the identity of its series.
//!
//! A [`Reading`] is what ingest hands to the journal and to processing; its series key is the
//! identity every later stage (windows, rules, the wire dictionary, the central side) groups by.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One decoded measurement from a sensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    /// The metric name (from the topic's `{metric}` level, a JSON field name or a SenML name).
    pub metric: String,
    /// Tags taken from the topic template's named levels (sorted, so the series key is stable).
    pub tags: BTreeMap<String, String>,
    /// The value; always finite (decoders reject NaN and infinities).
    pub value: f64,
    /// Event time in milliseconds since the Unix epoch (the payload's, or arrival time).
    pub time_ms: i64,
}

impl Reading {
    /// The canonical series key: `metric{k1=v1,k2=v2}` with tags in key order, or just
    /// `metric` without tags. Two readings belong to the same series iff their keys are equal.
    pub fn series_key(&self) -> String {
        series_key(&self.metric, &self.tags)
    }
}

/// [`Reading::series_key`] for a metric and tags that are not (yet) in a [`Reading`].
pub fn series_key(metric: &str, tags: &BTreeMap<String, String>) -> String {
    let mut s = String::with_capacity(metric.len() + 16 * tags.len());
    write_series_key(&mut s, metric, tags);
    s
}

/// Appends the series key (see [`Reading::series_key`]) to `s`: lets hot paths reuse one
/// buffer instead of allocating a key per reading.
pub fn write_series_key(s: &mut String, metric: &str, tags: &BTreeMap<String, String>) {
    s.push_str(metric);
    if !tags.is_empty() {
        s.push('{');
        for (i, (k, v)) in tags.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push_str(k);
            s.push('=');
            s.push_str(v);
        }
        s.push('}');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_key_orders_tags() {
        let mut tags = BTreeMap::new();
        tags.insert("site".to_string(), "a".to_string());
        tags.insert("device".to_string(), "d1".to_string());
        assert_eq!(series_key("temp", &tags), "temp{device=d1,site=a}");
        assert_eq!(series_key("temp", &BTreeMap::new()), "temp");
    }
}

/// Identity of a series as it travels upstream: the key plus its parts, so the central side
/// never has to parse the key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SeriesInfo {
    /// The canonical key, `metric{k1=v1,...}` (see [`Reading::series_key`]).
    pub key: String,
    /// Metric name, so the central side need not parse `key`.
    pub metric: String,
    /// Tags by name (sorted), so the central side need not parse `key`.
    pub tags: BTreeMap<String, String>,
}
