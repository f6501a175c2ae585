//! Column-packed aggregates: how protocol version 2 carries a run of aggregates in a
//! [`Batch`](crate::protocol::Batch).
//!
//! # Why columns
//!
//! A batch holds the same statistics for many series and usually one window. Laid out row by
//! row, every aggregate paid for nine `f64` (≈ 76 bytes each, 21.7 % of the raw JSON of 1 Hz
//! readings with 10 s windows). Laid out as columns, most columns are constant within a batch
//! (window start, length, version, count, scale) and cost nothing per row, and the rest are
//! small integers:
//!
//! * the moments of an exact aggregate ([`Moments::Exact`]) are integers: `Σk` is sent as
//!   the difference from `n·(k_first + k_last)/2` (a few units of the sensor's resolution) and
//!   `Σk²` as `W = Σk² − ⌈(Σk)² / n⌉` (`n` times the variance in those units); `Σk²` is
//!   recovered exactly from `W`, `Σk` and `n`;
//! * first/last/min/max are decimals at the aggregate's scale: `k_first`, `k_last − k_first`,
//!   and min/max as differences from `min(k_first, k_last)` / `max(k_first, k_last)`;
//! * sketch stores are sent as their length and the distance of their highest bin from the
//!   bin of `max` (`|min|` for the negative store), which is `0`, then one column of all bin
//!   counts but each aggregate's last, which its count implies.
//!
//! Each column is **frame-of-reference bit-packed**: its minimum (`base`), the bit width of
//! `max − min`, then every row's `value − base` in exactly that many bits. Aggregates that
//! are not exact (a reading that was not a decimal) or whose values have no decimal form at
//! their scale send the affected fields as raw little-endian `f64` after the columns, so
//! every aggregate round-trips bit for bit. docs/PROTOCOL.md §4 is the normative layout.

use crate::model::aggregate::{
    AggregateParts, MAX_MANTISSA, MAX_SCALE, Moments, decimal_of, decimal_value,
};
use crate::model::sketch::{self, Sketch, SketchParts};

/// Most aggregates one packed group may hold (bounds a receiver's memory; the gateway's
/// `upstream.batch_max` is limited to it).
pub const MAX_ROWS: usize = 10_000;
/// Most sketch bins one packed group may hold (8 bytes each when decoded).
pub const MAX_BINS_PER_GROUP: usize = 1 << 22;

/// One aggregate of a packed group: everything but the series, which travels as a
/// dictionary id.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Dictionary id of the series.
    pub series: u32,
    /// Window start, ms since the Unix epoch.
    pub window_start_ms: i64,
    /// Window length, seconds.
    pub window_secs: u32,
    /// 1 for the window's first emission, +1 per correction.
    pub version: u32,
    /// The aggregate's complete state, field by field, as packed in the columns.
    pub agg: AggregateParts,
}

/// Why a packed group could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("packed aggregates: {0}")]
pub struct PackedError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, PackedError> {
    Err(PackedError(msg.into()))
}

// ---------------------------------------------------------------------------------------------
// Bits
// ---------------------------------------------------------------------------------------------

/// Appends bit fields least significant bit first.
#[derive(Default)]
struct BitWriter {
    out: Vec<u8>,
    /// Bits used in the last byte of `out` (0 = a new byte is needed).
    used: u32,
}

impl BitWriter {
    fn put(&mut self, mut v: u128, mut width: u32) {
        while width > 0 {
            if self.used == 0 {
                self.out.push(0);
            }
            let take = (8 - self.used).min(width);
            let last = self.out.last_mut().expect("pushed above");
            *last |= ((v & ((1 << take) - 1)) as u8) << self.used;
            v >>= take;
            width -= take;
            self.used = (self.used + take) % 8;
        }
    }

    /// An unsigned number of unknown size: its bit length in 8 bits, then its bits.
    fn put_uint(&mut self, v: u128) {
        let len = 128 - v.leading_zeros();
        self.put(u128::from(len), 8);
        self.put(v, len);
    }
}

struct BitReader<'a> {
    bytes: &'a [u8],
    /// Next bit to read, counted from the start of `bytes` (least significant bit first).
    pos: usize,
}

impl BitReader<'_> {
    fn get(&mut self, width: u32) -> Result<u128, PackedError> {
        if width > 128 {
            return err(format!("bit width {width} is over 128"));
        }
        if self.pos + width as usize > self.bytes.len() * 8 {
            return err("ends early");
        }
        let mut v = 0u128;
        let mut got = 0;
        while got < width {
            let byte = self.bytes[self.pos / 8];
            let at = (self.pos % 8) as u32;
            let take = (8 - at).min(width - got);
            let bits = (u128::from(byte) >> at) & ((1 << take) - 1);
            v |= bits << got;
            got += take;
            self.pos += take as usize;
        }
        Ok(v)
    }

    fn get_uint(&mut self) -> Result<u128, PackedError> {
        let len = self.get(8)?;
        self.get(len as u32)
    }
}

fn zigzag(v: i128) -> u128 {
    ((v << 1) ^ (v >> 127)) as u128
}

fn unzigzag(v: u128) -> i128 {
    ((v >> 1) as i128) ^ -((v & 1) as i128)
}

/// Writes one frame-of-reference column.
fn put_column(w: &mut BitWriter, values: &[i128]) {
    let base = values.iter().copied().min().unwrap_or(0);
    let top = values
        .iter()
        .map(|v| v.wrapping_sub(base) as u128)
        .max()
        .unwrap_or(0);
    let width = 128 - top.leading_zeros();
    w.put(u128::from(width), 8);
    w.put_uint(zigzag(base));
    for v in values {
        w.put(v.wrapping_sub(base) as u128, width);
    }
}

fn get_column(r: &mut BitReader, n: usize) -> Result<Vec<i128>, PackedError> {
    let width = r.get(8)? as u32;
    if width > 128 {
        return err(format!("column bit width {width} is over 128"));
    }
    let base = unzigzag(r.get_uint()?);
    if width as usize * n > (r.bytes.len() * 8).saturating_sub(r.pos) {
        return err("column longer than the data");
    }
    (0..n)
        .map(|_| Ok(base.wrapping_add(r.get(width)? as i128)))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Rows ↔ columns
// ---------------------------------------------------------------------------------------------

/// Columns per row, in this order (the bin counts follow as one more column).
const COLUMNS: usize = 20;
const COL_SERIES: usize = 0;
const COL_START: usize = 1;
const COL_SECS: usize = 2;
const COL_VERSION: usize = 3;
const COL_COUNT: usize = 4;
const COL_FIRST_DT: usize = 5;
const COL_LAST_DT: usize = 6;
const COL_MODE: usize = 7;
const COL_SCALE: usize = 8;
/// `k_first`; then `k_last`, `k_min`, `k_max` minus `k_first` in the next three columns.
const COL_FIRST: usize = 9;
const COL_SUM: usize = 13;
const COL_W: usize = 14;
const COL_ZERO: usize = 15;
const COL_POS_LEN: usize = 16;
const COL_POS_TOP: usize = 17;
const COL_NEG_LEN: usize = 18;
const COL_NEG_TOP: usize = 19;

/// How a row's moments and values travel (column `mode`).
const MODE_FLOAT: i128 = 0;
/// Exact moments; min/max/first/last as raw `f64`.
const MODE_EXACT_RAW: i128 = 1;
/// Exact moments; min/max/first/last as decimals at the moments' scale.
const MODE_EXACT: i128 = 2;

/// `k` such that `decimal_value(k, scale)` is bit-identical to `v`.
fn mantissa_at(v: f64, scale: u8) -> Option<i64> {
    let (k, s) = decimal_of(v)?;
    let k = k.checked_mul(10i64.checked_pow(u32::from(scale.checked_sub(s)?))?)?;
    (k.abs() <= MAX_MANTISSA && decimal_value(k, scale).to_bits() == v.to_bits()).then_some(k)
}

/// `(⌈(Σk)²/n⌉`-like quotient `q`, such that `Σk² = W + q`, for `n > 0`): `(sum² + r) / n`
/// with `r = (−sum²) mod n`, computed without overflow.
fn sum_sq_offset(sum: i128, n: u64) -> Option<i128> {
    if n == 0 {
        return Some(0);
    }
    let n = i128::from(n);
    let sq = sum.checked_mul(sum)?;
    let (q, rem) = (sq / n, sq % n);
    let r = (n - rem) % n;
    // rem + r is 0 or n.
    Some(q + (rem + r) / n)
}

/// What `Σk` is sent relative to: `n·(k_first + k_last) / 2` (rounded down) when the values
/// are decimals, which leaves a residual of a few units per reading for a smooth signal.
fn sum_estimate(n: u64, ints: Option<[i64; 4]>) -> i128 {
    ints.map_or(0, |k| {
        (i128::from(n) * (i128::from(k[0]) + i128::from(k[1]))).div_euclid(2)
    })
}

/// Hint for the highest bin of a store: the bin of the reading with the largest magnitude
/// of that sign.
fn top_hint(v: f64, positive: bool) -> i128 {
    let right_sign = if positive { v > 0.0 } else { v < 0.0 };
    match sketch::bin_index(v) {
        Some(i) if right_sign => i128::from(i),
        _ => 0,
    }
}

fn top_of(offset: i32, len: usize) -> i128 {
    if len == 0 {
        0
    } else {
        i128::from(offset) + len as i128 - 1
    }
}

/// Encodes `rows` (at most [`MAX_ROWS`]) against the batch's `created_ms`.
pub fn encode(rows: &[Row], created_ms: i64) -> Vec<u8> {
    debug_assert!(rows.len() <= MAX_ROWS);
    let whole_seconds = rows.iter().all(|r| r.window_start_ms.rem_euclid(1000) == 0);
    let created_s = created_ms.div_euclid(1000);
    let n = rows.len();
    let mut cols: Vec<Vec<i128>> = (0..COLUMNS).map(|_| Vec::with_capacity(n)).collect();
    let mut bins = Vec::new();
    let mut raw = Vec::new();
    let first_series = rows.first().map_or(0, |r| r.series);
    let mut prev_series = i128::from(first_series) - 1;
    for row in rows {
        let a = &row.agg;
        let start = row.window_start_ms;
        let rel_start = if whole_seconds {
            start.div_euclid(1000).wrapping_sub(created_s)
        } else {
            start.wrapping_sub(created_ms)
        };
        let series = i128::from(row.series);
        let (mode, scale, ints) = match a.moments {
            Moments::Float { .. } => (MODE_FLOAT, 0, None),
            Moments::Exact { scale, .. } => {
                let ks = [a.first.1, a.last.1, a.min, a.max].map(|v| mantissa_at(v, scale));
                match ks {
                    [Some(f), Some(l), Some(lo), Some(hi)] => {
                        (MODE_EXACT, scale, Some([f, l, lo, hi]))
                    }
                    _ => (MODE_EXACT_RAW, scale, None),
                }
            }
        };
        let (sum_rel, w) = match a.moments {
            Moments::Exact { sum, sum_sq, .. } => {
                let offset = sum_sq_offset(sum, a.count).unwrap_or(0);
                (sum - sum_estimate(a.count, ints), sum_sq - offset)
            }
            Moments::Float { sum, mean, m2 } => {
                for v in [sum, mean, m2] {
                    raw.extend_from_slice(&v.to_le_bytes());
                }
                (0, 0)
            }
        };
        if ints.is_none() {
            for v in [a.first.1, a.last.1, a.min, a.max] {
                raw.extend_from_slice(&v.to_le_bytes());
            }
        }
        let k = ints.map_or([0; 4], |k| k.map(i128::from));
        let sk = a.sketch.to_parts();
        // Laid out by the COL_* indices that `decode` reads them with.
        let mut v = [0i128; COLUMNS];
        v[COL_SERIES] = series - prev_series;
        v[COL_START] = i128::from(rel_start);
        v[COL_SECS] = i128::from(row.window_secs);
        v[COL_VERSION] = i128::from(row.version);
        v[COL_COUNT] = i128::from(a.count);
        v[COL_FIRST_DT] = i128::from(a.first.0.wrapping_sub(start));
        v[COL_LAST_DT] = i128::from(a.last.0.wrapping_sub(a.first.0));
        v[COL_MODE] = mode;
        v[COL_SCALE] = i128::from(scale);
        v[COL_FIRST] = k[0];
        v[COL_FIRST + 1] = k[1] - k[0];
        // min <= min(first, last) and max >= max(first, last): the differences from those
        // are usually 0 or small.
        v[COL_FIRST + 2] = k[2] - k[0].min(k[1]);
        v[COL_FIRST + 3] = k[3] - k[0].max(k[1]);
        v[COL_SUM] = sum_rel;
        v[COL_W] = w;
        v[COL_ZERO] = i128::from(sk.zero);
        v[COL_POS_LEN] = sk.positive.len() as i128;
        v[COL_POS_TOP] = top_of(sk.positive_offset, sk.positive.len()) - top_hint(a.max, true);
        v[COL_NEG_LEN] = sk.negative.len() as i128;
        v[COL_NEG_TOP] = top_of(sk.negative_offset, sk.negative.len()) - top_hint(a.min, false);
        for (col, x) in cols.iter_mut().zip(v) {
            col.push(x);
        }
        // The last bin is left out: it is what the count leaves for it.
        let sent = (sk.positive.len() + sk.negative.len()).saturating_sub(1);
        let counts = sk.positive.iter().chain(&sk.negative).take(sent);
        bins.extend(counts.map(|&c| i128::from(c)));
        prev_series = series;
    }
    let mut w = BitWriter::default();
    w.put_uint(n as u128);
    w.put(u128::from(whole_seconds), 1);
    w.put_uint(u128::from(first_series));
    for col in &cols {
        put_column(&mut w, col);
    }
    put_column(&mut w, &bins);
    let mut out = w.out;
    out.extend_from_slice(&raw);
    out
}

/// Decodes a packed group; every field is checked, so untrusted input gives an error,
/// never a panic or an aggregate that breaks an invariant.
pub fn decode(bytes: &[u8], created_ms: i64) -> Result<Vec<Row>, PackedError> {
    let mut r = BitReader { bytes, pos: 0 };
    let n = r.get_uint()?;
    if n > MAX_ROWS as u128 {
        return err(format!("{n} aggregates in one group, more than {MAX_ROWS}"));
    }
    let n = n as usize;
    let whole_seconds = r.get(1)? == 1;
    let first_series = r.get_uint()?;
    let cols = (0..COLUMNS)
        .map(|_| get_column(&mut r, n))
        .collect::<Result<Vec<_>, _>>()?;
    // Store lengths; every row with bins leaves its last one out.
    let mut sent_bins = 0usize;
    for (&pos, &neg) in cols[COL_POS_LEN].iter().zip(&cols[COL_NEG_LEN]) {
        let mut row_bins = 0usize;
        for len in [pos, neg] {
            row_bins += usize::try_from(len)
                .ok()
                .filter(|&l| l <= sketch::MAX_BINS)
                .ok_or_else(|| PackedError(format!("sketch store of {len} bins")))?;
        }
        sent_bins += row_bins.saturating_sub(1);
    }
    if sent_bins > MAX_BINS_PER_GROUP {
        return err(format!(
            "{sent_bins} sketch bins, more than {MAX_BINS_PER_GROUP}"
        ));
    }
    let bins = get_column(&mut r, sent_bins)?;
    let mut raw = &bytes[r.pos.div_ceil(8)..];
    let mut next_f64 = || -> Result<f64, PackedError> {
        let (head, rest) = raw
            .split_first_chunk::<8>()
            .ok_or_else(|| PackedError("raw values end early".into()))?;
        raw = rest;
        Ok(f64::from_le_bytes(*head))
    };
    let created_s = created_ms.div_euclid(1000);
    let mut rows = Vec::with_capacity(n);
    let mut series = i128::from(u32::try_from(first_series).unwrap_or(0)) - 1;
    let mut bins = bins.into_iter();
    // Row `i` is the `i`-th entry of every column.
    #[allow(clippy::needless_range_loop)]
    for i in 0..n {
        let c = |j: usize| cols[j][i];
        let out_of_range = |what: &str| PackedError(format!("{what} out of range"));
        let int = |j: usize, what: &str| i64::try_from(c(j)).map_err(|_| out_of_range(what));
        series += c(COL_SERIES);
        let series = u32::try_from(series).map_err(|_| out_of_range("series id"))?;
        let rel_start = int(COL_START, "window start")?;
        let window_start_ms = if whole_seconds {
            rel_start.wrapping_add(created_s).wrapping_mul(1000)
        } else {
            rel_start.wrapping_add(created_ms)
        };
        let window_secs = u32::try_from(c(COL_SECS)).map_err(|_| out_of_range("window_secs"))?;
        let version = u32::try_from(c(COL_VERSION)).map_err(|_| out_of_range("version"))?;
        let count = u64::try_from(c(COL_COUNT)).map_err(|_| out_of_range("count"))?;
        let first_t = int(COL_FIRST_DT, "first time")?.wrapping_add(window_start_ms);
        let last_t = int(COL_LAST_DT, "last time")?.wrapping_add(first_t);
        let mode = c(COL_MODE);
        let scale = u8::try_from(c(COL_SCALE))
            .ok()
            .filter(|&s| s <= MAX_SCALE)
            .ok_or_else(|| out_of_range("scale"))?;
        // first, last, min, max as mantissas at `scale`.
        let ints = if mode == MODE_EXACT {
            let plus = |j: usize, to: i64| {
                i64::try_from(c(j))
                    .ok()
                    .and_then(|d| d.checked_add(to))
                    .filter(|k| k.abs() <= MAX_MANTISSA)
                    .ok_or_else(|| out_of_range("decimal value"))
            };
            let k_first = plus(COL_FIRST, 0)?;
            let k_last = plus(COL_FIRST + 1, k_first)?;
            let k_min = plus(COL_FIRST + 2, k_first.min(k_last))?;
            let k_max = plus(COL_FIRST + 3, k_first.max(k_last))?;
            Some([k_first, k_last, k_min, k_max])
        } else {
            None
        };
        let moments = match mode {
            MODE_FLOAT => Moments::Float {
                sum: next_f64()?,
                mean: next_f64()?,
                m2: next_f64()?,
            },
            MODE_EXACT | MODE_EXACT_RAW => {
                let sum = c(COL_SUM).checked_add(sum_estimate(count, ints));
                let sum_sq = sum
                    .and_then(|s| sum_sq_offset(s, count))
                    .and_then(|o| c(COL_W).checked_add(o));
                match (sum, sum_sq) {
                    (Some(sum), Some(sum_sq)) => Moments::Exact { scale, sum, sum_sq },
                    _ => return Err(out_of_range("exact moments")),
                }
            }
            other => return err(format!("unknown mode {other}")),
        };
        moments.check(count).map_err(|e| PackedError(e.into()))?;
        let [first, last, min, max] = match ints {
            Some(ks) => ks.map(|k| decimal_value(k, scale)),
            None => [next_f64()?, next_f64()?, next_f64()?, next_f64()?],
        };
        // Bins: all but the row's very last one were sent; the count gives that one.
        let (pos_len, neg_len) = (c(COL_POS_LEN) as usize, c(COL_NEG_LEN) as usize);
        let zero = u64::try_from(c(COL_ZERO)).map_err(|_| out_of_range("zero count"))?;
        let mut counts = Vec::with_capacity(pos_len + neg_len);
        for _ in 1..pos_len + neg_len {
            let b = bins.next().expect("counted above");
            counts.push(u64::try_from(b).map_err(|_| out_of_range("bin count"))?);
        }
        if pos_len + neg_len > 0 {
            let rest = counts
                .iter()
                .try_fold(zero, |acc, &b| acc.checked_add(b))
                .and_then(|sent| count.checked_sub(sent))
                .ok_or_else(|| PackedError("bin counts exceed the count".into()))?;
            counts.push(rest);
        }
        let negative = counts.split_off(pos_len);
        let positive = counts;
        let offset = |top_rel: i128, hint: i128, len: usize| -> Result<i32, PackedError> {
            if len == 0 {
                return Ok(0);
            }
            top_rel
                .checked_add(hint)
                .and_then(|top| top.checked_sub(len as i128 - 1))
                .and_then(|o| i32::try_from(o).ok())
                .ok_or_else(|| out_of_range("sketch offset"))
        };
        let sketch = Sketch::from_parts(SketchParts {
            zero,
            positive_offset: offset(c(COL_POS_TOP), top_hint(max, true), pos_len)?,
            negative_offset: offset(c(COL_NEG_TOP), top_hint(min, false), neg_len)?,
            positive,
            negative,
        })
        .map_err(|e| PackedError(e.to_string()))?;
        if sketch.count() != count {
            return err(format!(
                "aggregate count {count} differs from its sketch's count {}",
                sketch.count()
            ));
        }
        rows.push(Row {
            series,
            window_start_ms,
            window_secs,
            version,
            agg: AggregateParts {
                count,
                min,
                max,
                first: (first_t, first),
                last: (last_t, last),
                moments,
                sketch,
            },
        });
    }
    if !raw.is_empty() {
        return err(format!("{} bytes after the last value", raw.len()));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::aggregate::Aggregate;
    use proptest::prelude::*;

    fn row(series: u32, start: i64, readings: &[(f64, i64)]) -> Row {
        let mut agg = Aggregate::new();
        for &(v, t) in readings {
            agg.add(v, start + t);
        }
        Row {
            series,
            window_start_ms: start,
            window_secs: 10,
            version: 1,
            agg: agg.to_parts(),
        }
    }

    /// Readings of one window: decimals (the packed-integer case), other floats, or both.
    fn readings() -> impl Strategy<Value = Vec<(f64, i64)>> {
        let value = prop_oneof![
            4 => (-100_000i64..100_000, 0u8..=3).prop_map(|(k, s)| decimal_value(k, s)),
            1 => (-MAX_MANTISSA..=MAX_MANTISSA, 0u8..=MAX_SCALE)
                .prop_map(|(k, s)| decimal_value(k, s)),
            1 => any::<f64>().prop_filter("finite", |v| v.is_finite()),
            1 => Just(-0.0),
        ];
        prop::collection::vec((value, -5_000i64..15_000), 0..30)
    }

    fn rows() -> impl Strategy<Value = (Vec<Row>, i64)> {
        let one = (
            any::<u32>(),
            prop_oneof![
                (1_764_000_000i64..1_764_000_100).prop_map(|s| s * 1000),
                any::<i64>()
            ],
            readings(),
            any::<u32>(),
            any::<u32>(),
        )
            .prop_map(|(series, start, rs, secs, version)| {
                let mut r = row(series, start, &rs);
                r.window_secs = secs;
                r.version = version;
                r
            });
        (
            prop::collection::vec(one, 0..12),
            prop_oneof![1_764_000_000_000i64..1_764_000_100_000, any::<i64>()],
        )
    }

    proptest! {
        #[test]
        fn rows_round_trip_bit_for_bit((rows, created) in rows()) {
            let bytes = encode(&rows, created);
            let back = decode(&bytes, created).unwrap();
            // f64 fields compared by bits (-0.0, NaN payloads would fool `==`).
            prop_assert_eq!(format!("{back:?}"), format!("{rows:?}"));
            for (a, b) in back.iter().zip(&rows) {
                prop_assert_eq!(a.agg.min.to_bits(), b.agg.min.to_bits());
                prop_assert_eq!(a.agg.first.1.to_bits(), b.agg.first.1.to_bits());
            }
        }

        #[test]
        fn damaged_bytes_give_an_error_or_valid_aggregates_never_a_panic(
            (rows, created) in rows(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = encode(&rows, created);
            if bytes.is_empty() {
                return Ok(());
            }
            for (at, x) in flips {
                let i = at.index(bytes.len());
                bytes[i] ^= x;
            }
            for candidate in [&bytes[..], &bytes[..cut.index(bytes.len())]] {
                if let Ok(decoded) = decode(candidate, created) {
                    for r in decoded {
                        prop_assert_eq!(r.agg.sketch.count(), r.agg.count);
                        prop_assert!(r.agg.moments.check(r.agg.count).is_ok());
                    }
                }
            }
        }
    }

    #[test]
    fn columns_that_do_not_vary_cost_no_bits_per_row() {
        // 100 series, same window, same count; only the values differ a little.
        let rows: Vec<Row> = (0..100)
            .map(|s| {
                let rs: Vec<(f64, i64)> = (0..10)
                    .map(|i| (decimal_value(2_150 + (s + i) % 4, 2), i * 1000))
                    .collect();
                row(s as u32, 1_764_000_000_000, &rs)
            })
            .collect();
        let bytes = encode(&rows, 1_764_000_012_000);
        assert!(
            bytes.len() < 100 * 4,
            "{} bytes for 100 aggregates",
            bytes.len()
        );
        assert_eq!(
            format!("{:?}", decode(&bytes, 1_764_000_012_000).unwrap()),
            format!("{rows:?}")
        );
    }

    #[test]
    fn a_sketch_that_disagrees_with_the_count_is_refused() {
        // The count is sent once and the last bin is derived from it, so the only ways to
        // disagree are a count the bins cannot make up and a count with no bins to absorb it.
        let mut zeros = row(1, 0, &[(0.0, 0), (0.0, 1)]);
        zeros.agg.count = 3;
        let e = decode(&encode(&[zeros], 0), 0).unwrap_err();
        assert!(e.0.contains("differs from its sketch"), "{e}");

        let mut short = row(1, 0, &[(1.5, 0), (2.5, 1)]);
        short.agg.count = 1;
        assert!(decode(&encode(&[short], 0), 0).is_err());
        let mut none = row(1, 0, &[(1.5, 0), (2.5, 1)]);
        none.agg.count = 0;
        assert!(decode(&encode(&[none], 0), 0).is_err());
    }

    #[test]
    fn exact_moments_with_a_negative_variance_are_refused() {
        let mut r = row(1, 0, &[(1.5, 0), (2.5, 1)]);
        r.agg.moments = Moments::Exact {
            scale: 1,
            sum: 40,
            sum_sq: 0,
        };
        let e = decode(&encode(&[r], 0), 0).unwrap_err();
        assert!(e.0.contains("variance") || e.0.contains("range"), "{e}");
    }

    #[test]
    fn too_many_rows_are_refused_before_anything_is_allocated() {
        let mut w = BitWriter::default();
        w.put_uint(u128::from(u32::MAX));
        let e = decode(&w.out, 0).unwrap_err();
        assert!(e.0.contains("more than"), "{e}");
    }

    #[test]
    fn bytes_after_the_last_value_are_refused() {
        let mut bytes = encode(&[row(1, 0, &[(1.0 / 3.0, 0)])], 0);
        bytes.push(0);
        assert!(decode(&bytes, 0).is_err());
    }
}

#[cfg(test)]
mod worked_example {
    use super::*;
    use crate::model::aggregate::Aggregate;

    /// docs/PROTOCOL.md §9, "A packed group".
    #[test]
    fn matches_the_documented_example() {
        let start = 1_764_000_000_000;
        let mut agg = Aggregate::new();
        for (v, t) in [(21.5, 0), (21.25, 1000), (20.0, 2000)] {
            agg.add(v, start + t);
        }
        let row = Row {
            series: 0,
            window_start_ms: start,
            window_secs: 10,
            version: 1,
            agg: agg.to_parts(),
        };
        let bytes = encode(std::slice::from_ref(&row), start + 12_000);
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "01030008085070010a288080000306000060007d8001020c10a081190224ac04000000003820033ca0\
             930100000814000000000020002001"
        );
        assert_eq!(decode(&bytes, start + 12_000).unwrap(), vec![row]);
    }
}
