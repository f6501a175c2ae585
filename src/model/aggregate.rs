//! Per-window statistics of one series: count, sum, min, max, first/last by
//! event time, mean and variance, and a quantile [`Sketch`].
//!
//! # Why these choices
//!
//! * **Exact sums for decimal readings.** Sensors send decimals (`21.37`), which binary
//!   floating point cannot hold, so a float running sum drifts and two replicas that add the
//!   same readings in a different grouping disagree in the last bits. While every reading of
//!   a window is an exact decimal `k·10⁻ˢ` (`s ≤ 15`, `|k| ≤ 2⁵³`: nearly every reading a
//!   sensor sends, see [`decimal_of`]), the aggregate keeps `Σk` and `Σk²` as 128-bit
//!   integers at a common scale ([`Moments::Exact`]). Sum, mean and variance then carry no
//!   accumulated rounding error, merging is integer addition (`merge(A, B)` is bit-identical
//!   to the aggregate of `A ∪ B`), and the upstream protocol sends the moments as a few small
//!   integers instead of three `f64` (see `forward::packed`). A reading that is not such a
//!   decimal, or sums that would overflow, switch the aggregate to floating point for good
//!   ([`Moments::Float`], Welford) — deterministically, so a replay still gives the same bits.
//! * **Mergeable.** In floating-point mode mean and `m2` use the parallel formulas of
//!   Chan, Golub & LeVeque, so the central system can combine windows (or
//!   gateways) without the raw readings. Welford's update avoids the
//!   catastrophic cancellation of the naive `Σx² - n·mean²` approach (the exact mode has no
//!   cancellation: `n·Σk² − (Σk)²` is computed in integers).
//! * **Population standard deviation.** A window aggregate describes *all*
//!   readings of that window, not a sample from a larger population, so
//!   [`Aggregate::stddev`] is `sqrt(m2 / n)`. This also makes a one-reading
//!   window have deviation `0` instead of `NaN`. The sample deviation can be
//!   derived upstream as `sqrt(m2 / (n - 1))` from the same state.
//! * **First/last by event time, deterministically.** Readings arrive out of
//!   order, so "first" is the reading with the *earliest* event time and
//!   "last" the one with the *latest*. Ties are broken by arrival order:
//!   among equal times, `first` keeps the reading added first and `last` the
//!   reading added last. For [`Aggregate::merge`], every reading of `self`
//!   counts as added before every reading of `other`. Hence the result depends
//!   only on the sequence of `add`/`merge` calls, and a replay of the same
//!   sequence (e.g. after crash recovery) yields a bit-identical aggregate.
//! * **Non-finite values are ignored** by [`Aggregate::add`]: one NaN would
//!   otherwise poison sum, mean and min/max forever. Callers that want to
//!   count rejections check `is_finite()` first (as `window::Windows` does).
//!
//! Accessors of an empty aggregate return `NaN` for the value statistics
//! (`min`, `max`, `mean`, `stddev`, `first`, `last`), `0` for `count`/`sum`
//! and `None` for quantiles. Internally empty aggregates store neutral values
//! (not NaN) so that `PartialEq` works on them.

use serde::{Deserialize, Serialize};

use super::sketch::Sketch;

/// Largest decimal scale (digits after the point) an exact aggregate keeps.
pub const MAX_SCALE: u8 = 15;

/// Largest `|k|` of an exact decimal `k·10⁻ˢ`: every integer up to 2⁵³ is exact in `f64`,
/// which is what makes [`decimal_value`] correctly rounded.
pub const MAX_MANTISSA: i64 = 1 << 53;

const POW10: [f64; MAX_SCALE as usize + 1] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
];

/// The value of the decimal `k·10⁻ˢ` as the nearest `f64` (`s <= MAX_SCALE`).
///
/// For `|k| <= 2⁵³` both operands are exact and IEEE division rounds correctly, so this is
/// the one `f64` nearest to the decimal, on every platform.
pub fn decimal_value(k: i64, scale: u8) -> f64 {
    k as f64 / POW10[usize::from(scale.min(MAX_SCALE))]
}

/// The decimal form `(k, s)` of `v` with the smallest scale `s <= MAX_SCALE` such that
/// [`decimal_value`]`(k, s)` is bit-identical to `v`; `None` when there is none (`1/3`,
/// `-0.0`, non-finite values, or `|k|` would exceed [`MAX_MANTISSA`]).
pub fn decimal_of(v: f64) -> Option<(i64, u8)> {
    if !v.is_finite() {
        return None;
    }
    for scale in 0..=MAX_SCALE {
        let x = v * POW10[usize::from(scale)];
        if x.abs() > MAX_MANTISSA as f64 {
            return None;
        }
        let k = x.round();
        // If v is the decimal k·10^-scale, the rounded product is within a few ulps of k
        // (relative error ~2^-52): anything farther cannot pass the exact test below, which
        // saves its divisions for the scales that are not it (this runs once per reading).
        if (x - k).abs() > x.abs() * f64::EPSILON * 4.0 {
            continue;
        }
        // |x| <= 2^53, so the cast is lossless. Near 2^53 the product's rounding can put it
        // one unit away from the mantissa: try the neighbours too.
        let k = k as i64;
        for k in [k, k - 1, k + 1] {
            if k.abs() <= MAX_MANTISSA && decimal_value(k, scale).to_bits() == v.to_bits() {
                return Some((k, scale));
            }
        }
    }
    None
}

fn pow10_i128(exp: u8) -> i128 {
    10i128.pow(u32::from(exp))
}

/// Sum, mean and spread of an aggregate's readings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Moments {
    /// Every reading so far is an exact decimal: the readings are `kᵢ·10^-scale` and the
    /// sums are exact. Invariant (for `n` readings): `n·sum_sq` and `sum²` fit in `i128`,
    /// so `n·Σk² − (Σk)²` (which is `n²` times the variance in units of `10^-2·scale`) can
    /// always be computed.
    Exact {
        /// Digits after the decimal point common to all readings (`<= MAX_SCALE`).
        scale: u8,
        /// `Σkᵢ`.
        sum: i128,
        /// `Σkᵢ²`.
        sum_sq: i128,
    },
    /// Floating point, from the first reading that was not an exact decimal on.
    Float {
        /// Sum of the readings.
        sum: f64,
        /// Running mean (Welford).
        mean: f64,
        /// Sum of squared deviations from the mean.
        m2: f64,
    },
}

impl Moments {
    /// The moments of no reading.
    pub const EMPTY: Moments = Moments::Exact {
        scale: 0,
        sum: 0,
        sum_sq: 0,
    };

    /// Exact moments, if they keep the invariant for `n` readings.
    fn exact(scale: u8, sum: i128, sum_sq: i128, n: u64) -> Option<Moments> {
        if scale > MAX_SCALE || sum_sq < 0 {
            return None;
        }
        i128::from(n).checked_mul(sum_sq)?;
        sum.checked_mul(sum)?;
        Some(Moments::Exact { scale, sum, sum_sq })
    }

    /// Checks decoded moments of `n` readings (untrusted input): exact moments must keep
    /// the invariant and describe a non-negative variance.
    pub fn check(&self, n: u64) -> Result<(), &'static str> {
        if let Moments::Exact { scale, sum, sum_sq } = *self {
            if Moments::exact(scale, sum, sum_sq, n).is_none() {
                return Err("exact moments out of range");
            }
            if self.variance_numerator(n) < 0 {
                return Err("exact moments with a negative variance");
            }
            if n == 0 && (sum != 0 || sum_sq != 0) {
                return Err("exact moments of no reading are not zero");
            }
        }
        Ok(())
    }

    /// `n·Σk² − (Σk)²` of exact moments (0 for float moments).
    fn variance_numerator(&self, n: u64) -> i128 {
        match *self {
            // Cannot overflow under the invariant; saturating keeps unchecked input harmless.
            Moments::Exact { sum, sum_sq, .. } => i128::from(n)
                .saturating_mul(sum_sq)
                .saturating_sub(sum.saturating_mul(sum)),
            Moments::Float { .. } => 0,
        }
    }

    /// Sum of the readings.
    fn sum(&self) -> f64 {
        match *self {
            Moments::Exact { scale, sum, .. } => sum as f64 / POW10[usize::from(scale)],
            Moments::Float { sum, .. } => sum,
        }
    }

    /// `(sum, mean, m2)` of `n` readings as floating point.
    fn float_parts(&self, n: u64) -> (f64, f64, f64) {
        match *self {
            Moments::Float { sum, mean, m2 } => (sum, mean, m2),
            Moments::Exact { .. } if n == 0 => (0.0, 0.0, 0.0),
            Moments::Exact { scale, .. } => {
                let sum = self.sum();
                let unit = POW10[usize::from(scale)];
                let m2 = self.variance_numerator(n) as f64 / n as f64 / unit / unit;
                (sum, sum / n as f64, m2)
            }
        }
    }

    /// The moments after adding `value` to `n` readings.
    fn add(self, n: u64, value: f64) -> Moments {
        if let Moments::Exact { scale, sum, sum_sq } = self {
            // `+ 0.0` turns -0.0 into 0.0: the sign of zero does not matter to a sum.
            let exact = decimal_of(value + 0.0).and_then(|(k, s)| {
                let to = scale.max(s);
                let (a, b) = (pow10_i128(to - scale), pow10_i128(to - s));
                let k = i128::from(k).checked_mul(b)?;
                let sum = sum.checked_mul(a)?.checked_add(k)?;
                let sum_sq = sum_sq
                    .checked_mul(a.checked_mul(a)?)?
                    .checked_add(k.checked_mul(k)?)?;
                Moments::exact(to, sum, sum_sq, n + 1)
            });
            if let Some(m) = exact {
                return m;
            }
        }
        let (sum, mean, m2) = self.float_parts(n);
        let delta = value - mean;
        let mean = mean + delta / (n + 1) as f64;
        Moments::Float {
            sum: sum + value,
            mean,
            m2: m2 + delta * (value - mean),
        }
    }

    /// The moments of `n_a` readings (`self`) and `n_b` readings (`other`) together.
    fn merge(self, n_a: u64, other: Moments, n_b: u64) -> Moments {
        if let (
            Moments::Exact {
                scale: sa,
                sum: a,
                sum_sq: qa,
            },
            Moments::Exact {
                scale: sb,
                sum: b,
                sum_sq: qb,
            },
        ) = (self, other)
        {
            let to = sa.max(sb);
            let (fa, fb) = (pow10_i128(to - sa), pow10_i128(to - sb));
            let exact = (|| {
                let sum = a.checked_mul(fa)?.checked_add(b.checked_mul(fb)?)?;
                let sum_sq = qa
                    .checked_mul(fa.checked_mul(fa)?)?
                    .checked_add(qb.checked_mul(fb.checked_mul(fb)?)?)?;
                Moments::exact(to, sum, sum_sq, n_a + n_b)
            })();
            if let Some(m) = exact {
                return m;
            }
        }
        let (sum_a, mean_a, m2_a) = self.float_parts(n_a);
        let (sum_b, mean_b, m2_b) = other.float_parts(n_b);
        let (na, nb) = (n_a as f64, n_b as f64);
        let n = na + nb;
        let delta = mean_b - mean_a;
        Moments::Float {
            sum: sum_a + sum_b,
            mean: mean_a + delta * (nb / n),
            m2: m2_a + m2_b + delta * delta * (na * nb / n),
        }
    }
}

/// [`Moments`] as an [`Aggregate`] holds them: the same values with each `i128` kept as two
/// `u64` halves, so that an aggregate is aligned to 8 bytes instead of 16. That is 16 bytes
/// less per aggregate (176 → 160) and 24 per open window (192 → 168): a gateway holds tens of
/// thousands of them (issue 11, memory at 10,000 series). Serialized as [`Moments`], so
/// checkpoints keep their bytes; compared as the values they hold.
#[derive(Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(from = "Moments", into = "Moments")]
enum StoredMoments {
    Exact {
        scale: u8,
        sum: [u64; 2],
        sum_sq: [u64; 2],
    },
    Float {
        sum: f64,
        mean: f64,
        m2: f64,
    },
}

fn halves(v: i128) -> [u64; 2] {
    [v as u64, (v >> 64) as u64]
}

fn whole([lo, hi]: [u64; 2]) -> i128 {
    (i128::from(hi as i64) << 64) | i128::from(lo)
}

impl StoredMoments {
    fn get(self) -> Moments {
        Moments::from(self)
    }
}

impl From<Moments> for StoredMoments {
    fn from(m: Moments) -> StoredMoments {
        match m {
            Moments::Exact { scale, sum, sum_sq } => StoredMoments::Exact {
                scale,
                sum: halves(sum),
                sum_sq: halves(sum_sq),
            },
            Moments::Float { sum, mean, m2 } => StoredMoments::Float { sum, mean, m2 },
        }
    }
}

impl From<StoredMoments> for Moments {
    fn from(m: StoredMoments) -> Moments {
        match m {
            StoredMoments::Exact { scale, sum, sum_sq } => Moments::Exact {
                scale,
                sum: whole(sum),
                sum_sq: whole(sum_sq),
            },
            StoredMoments::Float { sum, mean, m2 } => Moments::Float { sum, mean, m2 },
        }
    }
}

impl std::fmt::Debug for StoredMoments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.get().fmt(f)
    }
}

/// The complete state of an [`Aggregate`], field by field, for encodings that lay the
/// fields out themselves (the upstream wire protocol packs them into columns).
/// [`Aggregate::from_parts`]`(a.to_parts())` is bit-identical to `a`.
#[derive(Debug, Clone, PartialEq)]
pub struct AggregateParts {
    /// Number of readings.
    pub count: u64,
    /// Smallest reading (`0.0` when empty).
    pub min: f64,
    /// Largest reading (`0.0` when empty).
    pub max: f64,
    /// `(time_ms, value)` of the reading with the earliest event time (`(0, 0.0)` when empty).
    pub first: (i64, f64),
    /// `(time_ms, value)` of the reading with the latest event time (`(0, 0.0)` when empty).
    pub last: (i64, f64),
    /// Sum, mean and spread.
    pub moments: Moments,
    /// The readings' quantile sketch (1 % relative error); a decoder checks its count against
    /// `count`.
    pub sketch: Sketch,
}

/// Statistics of the readings of one series in one window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Aggregate {
    count: u64,
    min: f64,
    max: f64,
    /// `(time_ms, value)` of the reading with the earliest event time.
    first: (i64, f64),
    /// `(time_ms, value)` of the reading with the latest event time.
    last: (i64, f64),
    moments: StoredMoments,
    sketch: Sketch,
}

impl Default for Aggregate {
    fn default() -> Self {
        Self::new()
    }
}

impl Aggregate {
    /// An empty aggregate.
    pub fn new() -> Self {
        Aggregate {
            count: 0,
            min: 0.0,
            max: 0.0,
            first: (0, 0.0),
            last: (0, 0.0),
            moments: Moments::EMPTY.into(),
            sketch: Sketch::new(),
        }
    }

    /// Adds one reading with its event time. Non-finite values are ignored.
    pub fn add(&mut self, value: f64, time_ms: i64) {
        if !value.is_finite() {
            return;
        }
        if self.count == 0 {
            self.min = value;
            self.max = value;
            self.first = (time_ms, value);
            self.last = (time_ms, value);
        } else {
            self.min = self.min.min(value);
            self.max = self.max.max(value);
            if time_ms < self.first.0 {
                self.first = (time_ms, value);
            }
            if time_ms >= self.last.0 {
                self.last = (time_ms, value);
            }
        }
        self.moments = self.moments.get().add(self.count, value).into();
        self.count += 1;
        self.sketch.insert(value);
    }

    /// Merges `other` into `self`. Readings of `other` count as added after those of
    /// `self` for first/last ties.
    pub fn merge(&mut self, other: &Aggregate) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = other.clone();
            return;
        }
        self.moments = (self.moments.get())
            .merge(self.count, other.moments.get(), other.count)
            .into();
        self.count += other.count;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        if other.first.0 < self.first.0 {
            self.first = other.first;
        }
        if other.last.0 >= self.last.0 {
            self.last = other.last;
        }
        self.sketch.merge(&other.sketch);
    }

    /// Number of readings.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Whether no reading has been added.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Sum of the readings (`0` when empty).
    pub fn sum(&self) -> f64 {
        self.moments.get().sum()
    }

    fn or_nan(&self, v: f64) -> f64 {
        if self.count == 0 { f64::NAN } else { v }
    }

    /// Smallest reading (`NaN` when empty).
    pub fn min(&self) -> f64 {
        self.or_nan(self.min)
    }

    /// Largest reading (`NaN` when empty).
    pub fn max(&self) -> f64 {
        self.or_nan(self.max)
    }

    /// Arithmetic mean (`NaN` when empty).
    pub fn mean(&self) -> f64 {
        self.or_nan(self.moments.get().float_parts(self.count).1)
    }

    /// Population standard deviation `sqrt(m2 / n)` (`NaN` when empty).
    pub fn stddev(&self) -> f64 {
        if self.count == 0 {
            return f64::NAN;
        }
        (self.m2().max(0.0) / self.count as f64).sqrt()
    }

    /// Sum of squared deviations from the mean; lets consumers derive the
    /// sample variance `m2 / (n - 1)` if they need it.
    pub fn m2(&self) -> f64 {
        self.moments.get().float_parts(self.count).2
    }

    /// Whether the moments are exact (every reading was an exact decimal, see the module
    /// documentation).
    pub fn is_exact(&self) -> bool {
        matches!(self.moments, StoredMoments::Exact { .. })
    }

    /// Value of the reading with the earliest event time (`NaN` when empty).
    pub fn first(&self) -> f64 {
        self.or_nan(self.first.1)
    }

    /// Value of the reading with the latest event time (`NaN` when empty).
    pub fn last(&self) -> f64 {
        self.or_nan(self.last.1)
    }

    /// Event time of the [`first`](Self::first) reading (`None` when empty).
    pub fn first_time_ms(&self) -> Option<i64> {
        (self.count > 0).then_some(self.first.0)
    }

    /// Event time of the [`last`](Self::last) reading (`None` when empty).
    pub fn last_time_ms(&self) -> Option<i64> {
        (self.count > 0).then_some(self.last.0)
    }

    /// Quantile estimate from the sketch (rank `floor(q * (n - 1))`, within
    /// 1 % relative error), clamped to `[min, max]` — the exact quantile
    /// always lies in that interval, so clamping can only reduce the error.
    /// `None` when empty or `q` is outside `[0, 1]`.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        self.sketch.quantile(q).map(|v| v.clamp(self.min, self.max))
    }

    /// The quantile sketch itself (to merge or encode it); [`Aggregate::quantile`] gives
    /// clamped estimates.
    pub fn sketch(&self) -> &Sketch {
        &self.sketch
    }

    /// The raw state, for compact encodings (see [`AggregateParts`]).
    pub fn to_parts(&self) -> AggregateParts {
        AggregateParts {
            count: self.count,
            min: self.min,
            max: self.max,
            first: self.first,
            last: self.last,
            moments: self.moments.get(),
            sketch: self.sketch.clone(),
        }
    }

    /// Rebuilds an aggregate from [`to_parts`](Self::to_parts) output. The parts are taken
    /// as they are: a decoder of untrusted input checks them first (at least that
    /// `sketch.count() == count` and [`Moments::check`]).
    pub fn from_parts(parts: AggregateParts) -> Self {
        Aggregate {
            count: parts.count,
            min: parts.min,
            max: parts.max,
            first: parts.first,
            last: parts.last,
            moments: parts.moments.into(),
            sketch: parts.sketch,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn close(a: f64, b: f64, scale: f64) -> bool {
        (a - b).abs() <= 1e-9 * (a.abs().max(b.abs()).max(scale))
    }

    fn aggregate_of(readings: &[(f64, i64)]) -> Aggregate {
        let mut agg = Aggregate::new();
        for &(v, t) in readings {
            agg.add(v, t);
        }
        agg
    }

    /// Splits `rs` at `cuts` (taken modulo its length), aggregates each contiguous part with
    /// `of` and merges the parts in order.
    fn merge_of_splits<T>(rs: &[T], cuts: Vec<usize>, of: fn(&[T]) -> Aggregate) -> Aggregate {
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (rs.len() + 1)).collect();
        cuts.push(0);
        cuts.push(rs.len());
        cuts.sort_unstable();
        let mut merged = Aggregate::new();
        for w in cuts.windows(2) {
            merged.merge(&of(&rs[w[0]..w[1]]));
        }
        merged
    }

    /// First/last by the documented rule, computed independently.
    fn naive_first_last(readings: &[(f64, i64)]) -> (f64, f64) {
        let mut first = readings[0];
        let mut last = readings[0];
        for &r in &readings[1..] {
            if r.1 < first.1 {
                first = r;
            }
            if r.1 >= last.1 {
                last = r;
            }
        }
        (first.0, last.0)
    }

    fn readings() -> impl Strategy<Value = Vec<(f64, i64)>> {
        // Small time range so that equal event times are common.
        prop::collection::vec((-1e6f64..1e6, -20i64..20), 1..200)
    }

    proptest! {
        #[test]
        fn statistics_equal_a_naive_reference(rs in readings()) {
            let agg = aggregate_of(&rs);
            let n = rs.len() as f64;
            let scale = rs.iter().fold(0.0f64, |m, r| m.max(r.0.abs()));
            let naive_sum: f64 = rs.iter().map(|r| r.0).sum();
            let naive_min = rs.iter().map(|r| r.0).fold(f64::INFINITY, f64::min);
            let naive_max = rs.iter().map(|r| r.0).fold(f64::NEG_INFINITY, f64::max);
            let naive_mean = naive_sum / n;
            let two_pass_var = rs.iter().map(|r| (r.0 - naive_mean).powi(2)).sum::<f64>() / n;
            let (first, last) = naive_first_last(&rs);

            prop_assert_eq!(agg.count(), rs.len() as u64);
            prop_assert!(close(agg.sum(), naive_sum, scale));
            prop_assert_eq!(agg.min(), naive_min);
            prop_assert_eq!(agg.max(), naive_max);
            prop_assert!(close(agg.mean(), naive_mean, scale), "{} vs {}", agg.mean(), naive_mean);
            prop_assert!(close(agg.stddev(), two_pass_var.sqrt(), scale),
                "{} vs {}", agg.stddev(), two_pass_var.sqrt());
            prop_assert_eq!(agg.first(), first);
            prop_assert_eq!(agg.last(), last);
        }

        #[test]
        fn merging_contiguous_splits_equals_adding_everything(
            rs in readings(),
            cuts in prop::collection::vec(0usize..200, 0..5),
        ) {
            let merged = merge_of_splits(&rs, cuts, aggregate_of);
            let all = aggregate_of(&rs);
            let scale = rs.iter().fold(0.0f64, |m, r| m.max(r.0.abs()));

            prop_assert_eq!(merged.count(), all.count());
            prop_assert!(close(merged.sum(), all.sum(), scale));
            prop_assert_eq!(merged.min(), all.min());
            prop_assert_eq!(merged.max(), all.max());
            prop_assert!(close(merged.mean(), all.mean(), scale));
            prop_assert!(close(merged.stddev(), all.stddev(), scale));
            prop_assert_eq!(merged.first(), all.first());
            prop_assert_eq!(merged.last(), all.last());
            prop_assert_eq!(merged.first_time_ms(), all.first_time_ms());
            prop_assert_eq!(merged.last_time_ms(), all.last_time_ms());
            prop_assert_eq!(merged.sketch(), all.sketch());
        }

        #[test]
        fn replaying_the_same_readings_gives_a_bit_identical_aggregate(rs in readings()) {
            prop_assert_eq!(aggregate_of(&rs), aggregate_of(&rs));
        }

        #[test]
        fn postcard_round_trip_preserves_the_aggregate(rs in readings()) {
            let agg = aggregate_of(&rs);
            let bytes = postcard::to_stdvec(&agg).unwrap();
            let back: Aggregate = postcard::from_bytes(&bytes).unwrap();
            prop_assert_eq!(back, agg);
        }
    }

    /// Readings a sensor sends: decimals with 0–3 digits after the point, mixed.
    fn decimal_readings() -> impl Strategy<Value = Vec<(i64, u8, i64)>> {
        prop::collection::vec((-10_000_000i64..10_000_000, 0u8..=3, -20i64..20), 1..200)
    }

    fn aggregate_of_decimals(rs: &[(i64, u8, i64)]) -> Aggregate {
        let mut agg = Aggregate::new();
        for &(k, s, t) in rs {
            agg.add(decimal_value(k, s), t);
        }
        agg
    }

    proptest! {
        #[test]
        fn decimal_form_reproduces_the_value_bit_for_bit(
            k in -MAX_MANTISSA..=MAX_MANTISSA,
            s in 0..=MAX_SCALE,
        ) {
            let v = decimal_value(k, s);
            if k == 0 {
                prop_assert_eq!(decimal_of(v), Some((0, 0)));
            } else {
                let (k2, s2) = decimal_of(v).expect("a decimal has a decimal form");
                prop_assert!(s2 <= s, "smallest scale: {} > {}", s2, s);
                prop_assert_eq!(decimal_value(k2, s2).to_bits(), v.to_bits());
            }
        }

        #[test]
        fn decimal_readings_give_exact_sum_mean_and_variance(rs in decimal_readings()) {
            let agg = aggregate_of_decimals(&rs);
            prop_assert!(agg.is_exact());
            // Reference in integers at scale 3 (every reading has at most 3 decimals).
            let k3: Vec<i128> = rs.iter()
                .map(|&(k, s, _)| i128::from(k) * 10i128.pow(3 - u32::from(s)))
                .collect();
            let n = k3.len() as i128;
            let sum: i128 = k3.iter().sum();
            let sum_sq: i128 = k3.iter().map(|k| k * k).sum();
            // The exact sum, rounded once.
            prop_assert_eq!(agg.sum(), sum as f64 / 1e3);
            prop_assert_eq!(agg.mean(), (sum as f64 / 1e3) / n as f64);
            let var = (n * sum_sq - sum * sum) as f64 / (n * n) as f64 / 1e6;
            prop_assert!(close(agg.stddev(), var.sqrt(), 1e-300),
                "{} vs {}", agg.stddev(), var.sqrt());
        }

        #[test]
        fn merging_exact_aggregates_is_bit_identical_to_adding_everything(
            rs in decimal_readings(),
            cuts in prop::collection::vec(0usize..200, 0..5),
        ) {
            let merged = merge_of_splits(&rs, cuts, aggregate_of_decimals);
            prop_assert_eq!(merged, aggregate_of_decimals(&rs));
        }
    }

    #[test]
    fn decimal_forms_of_typical_and_odd_values() {
        assert_eq!(decimal_of(21.37), Some((2137, 2)));
        assert_eq!(decimal_of(20.0), Some((20, 0)));
        assert_eq!(decimal_of(-0.5), Some((-5, 1)));
        assert_eq!(decimal_of(20.123456), Some((20_123_456, 6)));
        assert_eq!(decimal_of(MAX_MANTISSA as f64), Some((MAX_MANTISSA, 0)));
        // 17 significant digits after the point, more than MAX_SCALE:
        assert_eq!(decimal_of(0.1 + 0.2), None);
        assert_eq!(decimal_of(1.0 / 3.0), None);
        assert_eq!(decimal_of(1e300), None);
        assert_eq!(
            decimal_of(-0.0),
            None,
            "the sign of zero has no decimal form"
        );
        assert_eq!(decimal_of(f64::NAN), None);
    }

    #[test]
    fn a_value_without_decimal_form_switches_to_floating_point_for_good() {
        let readings = [(1.5, 1), (-0.0, 2), (2.25, 3)];
        assert!(
            aggregate_of(&readings).is_exact(),
            "-0.0 counts as 0 in the sums"
        );
        let readings = [(1.5, 1), (1.0 / 3.0, 2), (2.25, 3)];
        let agg = aggregate_of(&readings);
        assert!(!agg.is_exact());
        let sum = 1.5 + 1.0 / 3.0 + 2.25;
        assert!(close(agg.sum(), sum, 1.0));
        let mean = sum / 3.0;
        let var = readings.iter().map(|r| (r.0 - mean).powi(2)).sum::<f64>() / 3.0;
        assert!(close(agg.stddev(), var.sqrt(), 1.0));
    }

    #[test]
    fn sums_that_would_overflow_switch_to_floating_point() {
        // k = 2^53 at scale 15: k² alone is 2^106; a few hundred of them overflow n·Σk².
        let v = decimal_value(MAX_MANTISSA, 15);
        let mut agg = Aggregate::new();
        for t in 0..5_000 {
            agg.add(v, t);
        }
        assert!(!agg.is_exact());
        assert_eq!(agg.count(), 5_000);
        assert!(close(agg.mean(), v, v));
        assert!(agg.stddev() <= 1e-9 * v, "{}", agg.stddev());
    }

    #[test]
    fn mixed_scales_are_kept_at_the_finest_scale() {
        let agg = aggregate_of(&[(21.5, 1), (21.25, 2), (20.0, 3)]);
        assert_eq!(
            agg.to_parts().moments,
            Moments::Exact {
                scale: 2,
                sum: 2150 + 2125 + 2000,
                sum_sq: 2150 * 2150 + 2125 * 2125 + 2000 * 2000,
            }
        );
        assert_eq!(agg.sum(), 62.75);
    }

    #[test]
    fn decoded_moments_are_checked() {
        let bad = Moments::Exact {
            scale: 1,
            sum: 10,
            sum_sq: 1,
        };
        assert!(bad.check(2).is_err(), "negative variance");
        let big = Moments::Exact {
            scale: 0,
            sum: i128::MAX,
            sum_sq: 0,
        };
        assert!(big.check(1).is_err());
        assert!(Moments::EMPTY.check(0).is_ok());
        let scale = Moments::Exact {
            scale: 16,
            sum: 0,
            sum_sq: 0,
        };
        assert!(scale.check(1).is_err());
    }

    #[test]
    fn empty_aggregate_reports_nan_and_no_quantile() {
        let agg = Aggregate::new();
        assert_eq!(agg.count(), 0);
        assert_eq!(agg.sum(), 0.0);
        assert!(agg.min().is_nan() && agg.max().is_nan() && agg.mean().is_nan());
        assert!(agg.stddev().is_nan() && agg.first().is_nan() && agg.last().is_nan());
        assert_eq!(agg.quantile(0.5), None);
        assert_eq!(Aggregate::new(), Aggregate::new());
    }

    #[test]
    fn single_reading_has_zero_stddev() {
        let agg = aggregate_of(&[(4.5, 10)]);
        assert_eq!(agg.stddev(), 0.0);
        assert_eq!(agg.mean(), 4.5);
    }

    #[test]
    fn first_and_last_follow_event_time_not_arrival() {
        let agg = aggregate_of(&[(2.0, 200), (1.0, 100), (3.0, 300), (0.5, 150)]);
        assert_eq!(agg.first(), 1.0);
        assert_eq!(agg.last(), 3.0);
        assert_eq!(agg.first_time_ms(), Some(100));
        assert_eq!(agg.last_time_ms(), Some(300));
    }

    #[test]
    fn equal_event_times_keep_first_added_as_first_and_last_added_as_last() {
        let agg = aggregate_of(&[(1.0, 5), (2.0, 5), (3.0, 5)]);
        assert_eq!(agg.first(), 1.0);
        assert_eq!(agg.last(), 3.0);

        let mut a = aggregate_of(&[(1.0, 5)]);
        a.merge(&aggregate_of(&[(2.0, 5)]));
        assert_eq!(a.first(), 1.0, "self's readings count as added first");
        assert_eq!(a.last(), 2.0, "other's readings count as added last");
    }

    #[test]
    fn non_finite_readings_are_ignored() {
        let agg = aggregate_of(&[(f64::NAN, 1), (1.0, 2), (f64::INFINITY, 3)]);
        assert_eq!(agg.count(), 1);
        assert_eq!(agg.sum(), 1.0);
        assert_eq!(agg.last(), 1.0);
    }

    #[test]
    fn quantile_is_clamped_to_min_and_max() {
        let agg = aggregate_of(&[(10.0, 0)]);
        assert_eq!(agg.quantile(0.0), Some(10.0));
        assert_eq!(agg.quantile(1.0), Some(10.0));
    }

    #[test]
    fn stored_moments_hold_every_i128_and_serialize_as_moments() {
        for v in [
            0,
            1,
            -1,
            i128::MAX,
            i128::MIN,
            1 << 64,
            -(1 << 64),
            12_345_678_901_234_567_890,
        ] {
            let m = Moments::Exact {
                scale: 3,
                sum: v,
                sum_sq: v.wrapping_neg(),
            };
            let stored = StoredMoments::from(m);
            assert_eq!(stored.get(), m, "{v}");
            assert_eq!(
                postcard::to_stdvec(&stored).unwrap(),
                postcard::to_stdvec(&m).unwrap()
            );
            assert_eq!(
                serde_json::to_string(&stored).unwrap(),
                serde_json::to_string(&m).unwrap()
            );
        }
        let float = Moments::Float {
            sum: 1.5,
            mean: 0.75,
            m2: 0.125,
        };
        assert_eq!(StoredMoments::from(float).get(), float);
    }

    /// The size an open window's aggregate takes, times tens of thousands per gateway: the
    /// moments must not bring `i128`'s 16-byte alignment back.
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn an_aggregate_is_160_bytes_aligned_to_8() {
        assert_eq!(std::mem::align_of::<Aggregate>(), 8);
        assert_eq!(std::mem::size_of::<Aggregate>(), 160);
    }

    /// Prints the postcard size of typical 1 Hz aggregates.
    #[test]
    fn typical_aggregates_at_one_hertz_encode_compactly() {
        type Signal = fn(i64) -> f64;
        let signals: [(&str, Signal); 2] = [
            // A temperature-like signal: 21.5 °C ± 0.5 with slow drift.
            ("temperature 21.5±0.5", |i| {
                21.5 + 0.5 * ((i as f64) * 0.7).sin() + 0.01 * i as f64
            }),
            // A noisier signal spread over [20, 30): ~21 sketch bins.
            ("spread over 20..30", |i| {
                20.0 + ((i * 7919) % 60) as f64 / 6.0
            }),
        ];
        for (name, signal) in signals {
            for secs in [10i64, 60] {
                let mut agg = Aggregate::new();
                for i in 0..secs {
                    agg.add(signal(i), 1_764_000_000_000 + i * 1000);
                }
                let bytes = postcard::to_stdvec(&agg).unwrap();
                println!(
                    "aggregate of {secs} readings at 1 Hz ({name}): {} bytes postcard ({} sketch bins)",
                    bytes.len(),
                    agg.sketch().allocated_bins()
                );
                assert!(bytes.len() < 200, "{} bytes", bytes.len());
            }
        }
    }
}
