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
pub fn series_key<'a>(
    metric: &str,
    tags: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> String {
    let mut s = String::with_capacity(metric.len() + 32);
    write_series_key(&mut s, metric, tags);
    s
}

/// Appends the series key (see [`Reading::series_key`]) to `s`: lets hot paths reuse one
/// buffer instead of allocating a key per reading. `tags` come sorted by name.
pub fn write_series_key<'a>(
    s: &mut String,
    metric: &str,
    tags: impl IntoIterator<Item = (&'a String, &'a String)>,
) {
    s.push_str(metric);
    let mut any = false;
    for (k, v) in tags {
        s.push(if any { ',' } else { '{' });
        any = true;
        s.push_str(k);
        s.push('=');
        s.push_str(v);
    }
    if any {
        s.push('}');
    }
}

/// A series' tags, sorted by name, each name once: a sorted boxed slice rather than a
/// `BTreeMap` because processing holds one per series for as long as the series lives, and
/// a map's smallest node for `String` pairs is 544 bytes whatever it holds (10,000 series of
/// two tags: 5.4 MB as maps, ~1 MB as slices). Serialized exactly as the map was (a map of
/// name to value), so checkpoints and the wire format do not change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Tags(Box<[(String, String)]>);

impl Tags {
    /// The value of tag `name`.
    pub fn get(&self, name: &str) -> Option<&String> {
        self.0
            .binary_search_by(|(k, _)| k.as_str().cmp(name))
            .ok()
            .map(|i| &self.0[i].1)
    }

    /// (name, value) in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.into_iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The tags as a map (what an [`crate::model::Alert`] carries).
    pub fn to_map(&self) -> BTreeMap<String, String> {
        self.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

impl IntoIterator for Tags {
    type Item = (String, String);
    type IntoIter = std::vec::IntoIter<(String, String)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_vec().into_iter()
    }
}

impl<'a> IntoIterator for &'a Tags {
    type Item = (&'a String, &'a String);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (String, String)>,
        fn(&'a (String, String)) -> (&'a String, &'a String),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

impl From<BTreeMap<String, String>> for Tags {
    fn from(map: BTreeMap<String, String>) -> Tags {
        Tags(map.into_iter().collect())
    }
}

impl From<&BTreeMap<String, String>> for Tags {
    fn from(map: &BTreeMap<String, String>) -> Tags {
        Tags(map.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }
}

impl<const N: usize> From<[(String, String); N]> for Tags {
    fn from(pairs: [(String, String); N]) -> Tags {
        pairs.into_iter().collect()
    }
}

impl FromIterator<(String, String)> for Tags {
    /// Sorted by name; of two equal names the later value wins, as in a map.
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Tags {
        Tags::from(iter.into_iter().collect::<BTreeMap<_, _>>())
    }
}

impl Serialize for Tags {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Tags {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Tags, D::Error> {
        BTreeMap::<String, String>::deserialize(d).map(Tags::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_written_exactly_as_the_map_they_replace() {
        let map = BTreeMap::from([
            ("site".to_string(), "a".to_string()),
            ("device".to_string(), "d1".to_string()),
        ]);
        let tags = Tags::from(&map);
        assert_eq!(
            postcard::to_stdvec(&tags).unwrap(),
            postcard::to_stdvec(&map).unwrap()
        );
        assert_eq!(
            serde_json::to_string(&tags).unwrap(),
            serde_json::to_string(&map).unwrap()
        );
        let back: Tags = postcard::from_bytes(&postcard::to_stdvec(&map).unwrap()).unwrap();
        assert_eq!(back, tags);
        assert_eq!(series_key("temp", &tags), series_key("temp", &map));
    }

    #[test]
    fn tags_are_sorted_and_a_later_duplicate_wins_as_in_a_map() {
        let tags: Tags = [
            ("z".to_string(), "1".to_string()),
            ("a".to_string(), "2".to_string()),
            ("z".to_string(), "3".to_string()),
        ]
        .into();
        let pairs: Vec<_> = tags.iter().collect();
        assert_eq!(
            pairs,
            [(&"a".into(), &"2".into()), (&"z".into(), &"3".into())]
        );
        assert_eq!(tags.get("z").map(String::as_str), Some("3"));
        assert_eq!(tags.get("b"), None);
        assert_eq!(tags.len(), 2);
        assert!(Tags::default().is_empty());
    }

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
    pub tags: Tags,
}
