//! The journal's compact record encoding (payload tag 1): a series is written out once per
//! segment and referred to by a small number after that, values are decimals when they are.
//!
//! # Why
//! A gateway's journal takes most of the bytes it writes to its flash card (issue 11). The
//! first encoding was the postcard form of [`JournalEntry`]: every record carried its
//! series' metric name and tags as strings, and the value as 8 bytes of `f64`, 72 bytes for
//! a 52-byte JSON reading (88 on disk with the frame). Sensors repeat the same few series
//! forever and send values like `21.5`, so this encoding writes a series' name once per
//! segment (a *definition*, inside the first record that uses it) and then only its
//! number, and a value as the integer `215` with its decimal exponent: 26 bytes for the
//! same reading.
//!
//! # The dictionary lives in the segment
//! Definitions are scoped to one segment file: the writer forgets every number when a
//! record starts a new segment, so a segment can be read (and trimmed, and salvaged) on its
//! own. Recovery only ever keeps a *prefix* of a segment, so a record that survives always
//! has its definitions before it. The writer may also forget in the middle of a segment (a
//! restart, a rolled-back write): it then numbers from 0 again with new definitions, and
//! a definition simply replaces whatever that number meant before. The reader therefore
//! decodes a segment front to back, which [`super::Journal::read_from`] does.
//!
//! # Exactness
//! Decoding gives back the very [`JournalEntry`] that was encoded, bit for bit (the
//! property test below): a value is written as a decimal `m / 10^e` only when dividing gives
//! exactly its bits back, and as raw `f64` otherwise. Division of two exactly representable
//! integers is correctly rounded, like parsing the decimal text, so every reading a sensor
//! sent as a short decimal takes the short form.

use crate::model::Reading;
use crate::model::record::{DedupKey, JournalEntry};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// The payload tag of segments holding compact records.
pub const TAG: u8 = 1;

/// The writer forgets its numbers after this many series in one segment (each definition
/// is in the segment too, so the dictionary never holds more than the segment's bytes).
const MAX_SERIES_PER_SEGMENT: usize = 1 << 16;

/// Decimal exponents tried for the short form of a value.
const POW10: [f64; 7] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6];

#[derive(Serialize, Deserialize)]
struct Record<'a> {
    pkid: u16,
    #[serde(with = "postcard::fixint::le")]
    digest: u64,
    received_ms: i64,
    subscription: u16,
    /// Series first used in this segment by this record (usually none).
    #[serde(borrow)]
    defs: Vec<Def<'a>>,
    readings: Vec<Value>,
}

#[derive(Serialize, Deserialize)]
struct Def<'a> {
    id: u32,
    metric: &'a str,
    #[serde(borrow)]
    tags: Vec<(&'a str, &'a str)>,
}

#[derive(Serialize, Deserialize)]
struct Value {
    series: u32,
    value: Number,
    /// Event time minus arrival time, in ms: 0 for readings stamped on arrival.
    time_offset_ms: i64,
}

/// A value: `m / 10^e` for the variant's `e`, or the raw bits.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq)]
enum Number {
    E0(i64),
    E1(i64),
    E2(i64),
    E3(i64),
    E4(i64),
    E5(i64),
    E6(i64),
    Raw(f64),
}

impl Number {
    fn of(v: f64) -> Number {
        for (e, p) in POW10.iter().enumerate() {
            let m = (v * p).round();
            // |m| < 2^53: exactly an integer in f64 and in i64. The check goes through the
            // integer, which is what decoding divides (so -0.0 keeps its raw form).
            if m.is_nan() || m.abs() >= 9.007_199_254_740_992e15 {
                continue;
            }
            let m = m as i64;
            if (m as f64 / p).to_bits() == v.to_bits() {
                return match e {
                    0 => Number::E0(m),
                    1 => Number::E1(m),
                    2 => Number::E2(m),
                    3 => Number::E3(m),
                    4 => Number::E4(m),
                    5 => Number::E5(m),
                    _ => Number::E6(m),
                };
            }
        }
        Number::Raw(v)
    }

    fn value(self) -> f64 {
        let (m, e) = match self {
            Number::E0(m) => (m, 0),
            Number::E1(m) => (m, 1),
            Number::E2(m) => (m, 2),
            Number::E3(m) => (m, 3),
            Number::E4(m) => (m, 4),
            Number::E5(m) => (m, 5),
            Number::E6(m) => (m, 6),
            Number::Raw(v) => return v,
        };
        m as f64 / POW10[e]
    }
}

/// Why a compact record could not be decoded (the log's checksums make this a bug or a
/// record read outside its segment's order, never plain disk damage).
#[derive(Debug, thiserror::Error)]
pub enum CompactError {
    #[error("undecodable compact record: {0}")]
    Postcard(#[from] postcard::Error),
    #[error("compact record refers to series {0}, which its segment never defined before it")]
    UnknownSeries(u32),
    #[error(
        "compact record defines series {id} out of order (the segment defines {known} before it)"
    )]
    DefinitionOutOfOrder { id: u32, known: usize },
    #[error("compact record holds a value that is not finite")]
    NotFinite,
}

/// The writer's side: which number each series has in the active segment.
#[derive(Default)]
pub struct Encoder {
    ids: HashMap<Vec<u8>, u32>,
    key: Vec<u8>,
}

impl Encoder {
    /// Forgets every number: the next record starts a new segment, or follows a rollback.
    pub fn reset(&mut self) {
        self.ids.clear();
    }

    /// Encodes `entry` into `out` (cleared first), defining the series this segment has not
    /// seen yet.
    pub fn encode(
        &mut self,
        entry: &JournalEntry,
        out: &mut Vec<u8>,
    ) -> Result<(), postcard::Error> {
        if self.ids.len() + entry.readings.len() > MAX_SERIES_PER_SEGMENT {
            self.reset();
        }
        let mut defs = Vec::new();
        let mut readings = Vec::with_capacity(entry.readings.len());
        for r in &entry.readings {
            exact_key(&mut self.key, &r.metric, &r.tags);
            let id = match self.ids.get(self.key.as_slice()) {
                Some(id) => *id,
                None => {
                    let id = self.ids.len() as u32;
                    self.ids.insert(self.key.clone(), id);
                    defs.push(Def {
                        id,
                        metric: &r.metric,
                        tags: r
                            .tags
                            .iter()
                            .map(|(k, v)| (k.as_str(), v.as_str()))
                            .collect(),
                    });
                    id
                }
            };
            readings.push(Value {
                series: id,
                value: Number::of(r.value),
                time_offset_ms: r.time_ms.wrapping_sub(entry.received_ms),
            });
        }
        let record = Record {
            pkid: entry.dedup.pkid,
            digest: entry.dedup.digest,
            received_ms: entry.received_ms,
            subscription: entry.subscription,
            defs,
            readings,
        };
        out.clear();
        let bytes = postcard::to_extend(&record, std::mem::take(out))?;
        *out = bytes;
        Ok(())
    }
}

/// The reader's side: the series the segment defined so far, by number.
#[derive(Default)]
pub struct Decoder {
    series: Vec<(String, BTreeMap<String, String>)>,
}

impl Decoder {
    /// Forgets every number: reading goes on in another segment.
    pub fn reset(&mut self) {
        self.series.clear();
    }

    /// Decodes the next record of the segment (every earlier one was given to this decoder).
    pub fn decode(&mut self, bytes: &[u8]) -> Result<JournalEntry, CompactError> {
        let record: Record<'_> = postcard::from_bytes(bytes)?;
        for d in record.defs {
            let known = self.series.len();
            let def = (
                d.metric.to_owned(),
                d.tags
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
            );
            match (d.id as usize).cmp(&known) {
                std::cmp::Ordering::Less => self.series[d.id as usize] = def,
                std::cmp::Ordering::Equal => self.series.push(def),
                std::cmp::Ordering::Greater => {
                    return Err(CompactError::DefinitionOutOfOrder { id: d.id, known });
                }
            }
        }
        let mut readings = Vec::with_capacity(record.readings.len());
        for v in record.readings {
            let (metric, tags) = self
                .series
                .get(v.series as usize)
                .ok_or(CompactError::UnknownSeries(v.series))?;
            let value = v.value.value();
            if !value.is_finite() {
                return Err(CompactError::NotFinite);
            }
            readings.push(Reading {
                metric: metric.clone(),
                tags: tags.clone(),
                value,
                time_ms: record.received_ms.wrapping_add(v.time_offset_ms),
            });
        }
        Ok(JournalEntry {
            dedup: DedupKey {
                pkid: record.pkid,
                digest: record.digest,
            },
            received_ms: record.received_ms,
            subscription: record.subscription,
            readings,
        })
    }
}

/// An unambiguous key of a series (the display key `metric{k=v}` is not: a metric name may
/// contain `{`): every string with its length in front.
fn exact_key(buf: &mut Vec<u8>, metric: &str, tags: &BTreeMap<String, String>) {
    buf.clear();
    let mut put = |s: &str| {
        buf.extend_from_slice(&(s.len() as u32).to_le_bytes());
        buf.extend_from_slice(s.as_bytes());
    };
    put(metric);
    for (k, v) in tags {
        put(k);
        put(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(
        metric: &str,
        tags: &[(&str, &str)],
        value: f64,
        received: i64,
        time: i64,
    ) -> JournalEntry {
        JournalEntry {
            dedup: DedupKey::new(7, "sensors/a/temp", b"{\"temp\":21.5}"),
            received_ms: received,
            subscription: 0,
            readings: vec![Reading {
                metric: metric.into(),
                tags: tags
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                value,
                time_ms: time,
            }],
        }
    }

    #[test]
    fn a_repeated_reading_takes_a_third_of_its_postcard_size() {
        let e = entry(
            "temperature",
            &[("site", "plant-1"), ("sensor", "s0042")],
            21.5,
            1_764_800_000_123,
            1_764_800_000_123,
        );
        let mut enc = Encoder::default();
        let mut first = Vec::new();
        enc.encode(&e, &mut first).unwrap();
        let mut again = Vec::new();
        enc.encode(&e, &mut again).unwrap();
        let postcard = postcard::to_stdvec(&e).unwrap();
        println!(
            "postcard {} bytes; compact first use {} bytes, then {} bytes",
            postcard.len(),
            first.len(),
            again.len()
        );
        assert!(
            again.len() * 3 <= postcard.len(),
            "{} vs {}",
            again.len(),
            postcard.len()
        );
        let mut dec = Decoder::default();
        assert_eq!(dec.decode(&first).unwrap(), e);
        assert_eq!(dec.decode(&again).unwrap(), e);
    }

    #[test]
    fn decimals_take_the_short_form_and_other_values_stay_exact() {
        assert_eq!(Number::of(21.5), Number::E1(215));
        assert_eq!(Number::of(-3.0), Number::E0(-3));
        assert_eq!(Number::of(23.45), Number::E2(2345));
        assert_eq!(Number::of(0.001), Number::E3(1));
        assert!(matches!(Number::of(std::f64::consts::PI), Number::Raw(_)));
        assert!(matches!(Number::of(1e300), Number::Raw(_)));
        // -0.0 is not 0: its sign survives.
        assert_eq!(Number::of(-0.0).value().to_bits(), (-0.0f64).to_bits());
    }

    #[test]
    fn a_series_unknown_to_the_segment_is_an_error_not_a_guess() {
        let e = entry("t", &[], 1.0, 10, 10);
        let mut enc = Encoder::default();
        let mut first = Vec::new();
        enc.encode(&e, &mut first).unwrap();
        let mut second = Vec::new();
        enc.encode(&e, &mut second).unwrap();
        // Read out of order (as if the first record were lost): refused.
        let mut dec = Decoder::default();
        assert!(matches!(
            dec.decode(&second),
            Err(CompactError::UnknownSeries(0))
        ));
    }

    #[test]
    fn a_writer_that_forgets_mid_segment_redefines_and_the_reader_follows() {
        let a = entry("a", &[("k", "1")], 1.0, 10, 10);
        let b = entry("b", &[], 2.0, 11, 5);
        let mut enc = Encoder::default();
        let mut dec = Decoder::default();
        let mut buf = Vec::new();
        enc.encode(&a, &mut buf).unwrap();
        assert_eq!(dec.decode(&buf).unwrap(), a);
        enc.reset(); // e.g. a restart: "b" now gets number 0, which meant "a"
        enc.encode(&b, &mut buf).unwrap();
        assert_eq!(dec.decode(&buf).unwrap(), b);
        enc.encode(&a, &mut buf).unwrap();
        assert_eq!(dec.decode(&buf).unwrap(), a);
    }

    #[test]
    fn series_whose_display_keys_collide_stay_apart() {
        let a = entry("m{k=v}", &[], 1.0, 10, 10);
        let b = entry("m", &[("k", "v")], 1.0, 10, 10);
        let mut enc = Encoder::default();
        let mut dec = Decoder::default();
        let mut buf = Vec::new();
        for e in [&a, &b, &a] {
            enc.encode(e, &mut buf).unwrap();
            assert_eq!(&dec.decode(&buf).unwrap(), e);
        }
    }

    fn any_entry() -> impl Strategy<Value = JournalEntry> {
        let reading = (
            prop::sample::select(vec!["t", "h", "p{x}", ""]),
            prop::collection::btree_map(
                prop::sample::select(vec!["site", "s", "k=v"]),
                prop::sample::select(vec!["a", "b", "", "c,d"]),
                0..3,
            ),
            prop_oneof![
                any::<f64>().prop_filter("finite", |v| v.is_finite()),
                (-100_000i64..100_000, 0u32..7).prop_map(|(m, e)| m as f64 / POW10[e as usize]),
            ],
            any::<i64>(),
        )
            .prop_map(|(m, tags, value, time_ms)| Reading {
                metric: m.to_string(),
                tags: tags
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                value,
                time_ms,
            });
        (
            any::<u16>(),
            any::<u64>(),
            any::<i64>(),
            any::<u16>(),
            prop::collection::vec(reading, 0..4),
        )
            .prop_map(
                |(pkid, digest, received_ms, subscription, readings)| JournalEntry {
                    dedup: DedupKey { pkid, digest },
                    received_ms,
                    subscription,
                    readings,
                },
            )
    }

    proptest! {
        /// Whatever is encoded (any value, any times, series coming and going, the writer
        /// forgetting at any point) decodes to exactly the same entries in order.
        #[test]
        fn every_entry_decodes_to_itself(
            entries in prop::collection::vec((any_entry(), any::<bool>()), 1..40),
        ) {
            let mut enc = Encoder::default();
            let mut dec = Decoder::default();
            let mut buf = Vec::new();
            for (e, forget) in &entries {
                if *forget {
                    enc.reset();
                }
                enc.encode(e, &mut buf).unwrap();
                let back = dec.decode(&buf).unwrap();
                prop_assert_eq!(back.readings.len(), e.readings.len());
                for (x, y) in back.readings.iter().zip(&e.readings) {
                    prop_assert_eq!(x.value.to_bits(), y.value.to_bits());
                }
                prop_assert_eq!(&back, e);
            }
        }
    }
}
