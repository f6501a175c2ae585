//! Helpers shared by the decoder's tests.

pub(crate) use super::{Decoder, Format, Reject};
pub(crate) use crate::model::Reading;
pub(crate) use proptest::prelude::*;
pub(crate) use std::collections::{BTreeMap, BTreeSet};

pub(crate) type Opt = Option<&'static str>;
/// (template, format, value path, timestamp path, expected message fragment)
pub(crate) type ConfigCase = (Opt, Format, Opt, Opt, &'static str);
/// (template, value path, topic, expected metric, expected tags)
pub(crate) type NamingCase = (
    Opt,
    Opt,
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
);
/// (format, template, value path, topic, payload, expected reason)
pub(crate) type ReasonRow = (Format, Opt, Opt, &'static str, &'static [u8], &'static str);

/// Arrival time used throughout: 2023-11-14T22:13:20Z.
pub(crate) const ARRIVAL: i64 = 1_700_000_000_000;

pub(crate) fn decoder(
    template: Option<&str>,
    format: Format,
    value: Option<&str>,
    ts: Option<&str>,
) -> Decoder {
    Decoder::new(template, format, value, ts).expect("valid decoder config")
}

pub(crate) fn run(d: &Decoder, topic: &str, payload: &str) -> Result<Vec<Reading>, Reject> {
    run_bytes(d, topic, payload.as_bytes())
}

pub(crate) fn run_bytes(d: &Decoder, topic: &str, payload: &[u8]) -> Result<Vec<Reading>, Reject> {
    let mut out = Vec::new();
    d.decode(topic, payload, ARRIVAL, &mut out)?;
    Ok(out)
}

pub(crate) fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub(crate) fn reading(metric: &str, value: f64, time_ms: i64) -> Reading {
    Reading {
        metric: metric.to_string(),
        tags: BTreeMap::new(),
        value,
        time_ms,
    }
}

/// (metric, value, time_ms) triples, for compact expectations.
pub(crate) fn summary(readings: &[Reading]) -> Vec<(String, f64, i64)> {
    readings
        .iter()
        .map(|r| (r.metric.clone(), r.value, r.time_ms))
        .collect()
}

pub(crate) fn is_snake_case_label(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

pub(crate) fn expect_reject(d: &Decoder, topic: &str, payload: &str) -> Reject {
    match run(d, topic, payload) {
        Ok(r) => panic!("payload {payload:?} on {topic:?} was accepted: {r:?}"),
        Err(e) => e,
    }
}
