//! Per-window statistics of one series: count, sum, min, max, first/last by
//! event time, mean and variance (Welford), and a quantile [`Sketch`].
//!
//! # Why these choices
//!
//! * **Mergeable.** Every field merges exactly or with well-conditioned
//!   floating-point arithmetic: mean and `m2` use the parallel formulas of
//!   Chan, Golub & LeVeque, so the central system can combine windows (or
//!   gateways) without the raw readings. Welford's update avoids the
//!   catastrophic cancellation of the naive `Σx² - n·mean²` approach.
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

use crate::process::sketch::Sketch;

/// The complete state of an [`Aggregate`], field by field, for encodings that lay the
/// fields out themselves (the upstream wire protocol delta-encodes the event times).
/// [`Aggregate::from_parts`]`(a.to_parts())` is bit-identical to `a`.
#[derive(Debug, Clone, PartialEq)]
pub struct AggregateParts {
    /// Number of readings.
    pub count: u64,
    /// Sum of the readings.
    pub sum: f64,
    /// Smallest reading (`0.0` when empty).
    pub min: f64,
    /// Largest reading (`0.0` when empty).
    pub max: f64,
    /// `(time_ms, value)` of the reading with the earliest event time (`(0, 0.0)` when empty).
    pub first: (i64, f64),
    /// `(time_ms, value)` of the reading with the latest event time (`(0, 0.0)` when empty).
    pub last: (i64, f64),
    /// Running mean (Welford).
    pub mean: f64,
    /// Sum of squared deviations from the mean.
    pub m2: f64,
    /// The quantile sketch.
    pub sketch: Sketch,
}

/// Statistics of the readings of one series in one window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Aggregate {
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
    /// `(time_ms, value)` of the reading with the earliest event time.
    first: (i64, f64),
    /// `(time_ms, value)` of the reading with the latest event time.
    last: (i64, f64),
    /// Running mean (Welford).
    mean: f64,
    /// Sum of squared deviations from the mean (Welford).
    m2: f64,
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
            sum: 0.0,
            min: 0.0,
            max: 0.0,
            first: (0, 0.0),
            last: (0, 0.0),
            mean: 0.0,
            m2: 0.0,
            sketch: Sketch::new(),
        }
    }

    /// Adds one reading with its event time. Non-finite values are ignored.
    pub fn add(&mut self, value: f64, time_ms: i64) {
        if !value.is_finite() {
            return;
        }
        if self.count == 0 {
            self.count = 1;
            self.sum = value;
            self.min = value;
            self.max = value;
            self.first = (time_ms, value);
            self.last = (time_ms, value);
            self.mean = value;
            self.m2 = 0.0;
            self.sketch.insert(value);
            return;
        }
        self.count += 1;
        self.sum += value;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        if time_ms < self.first.0 {
            self.first = (time_ms, value);
        }
        if time_ms >= self.last.0 {
            self.last = (time_ms, value);
        }
        let delta = value - self.mean;
        self.mean += delta / self.count as f64;
        self.m2 += delta * (value - self.mean);
        self.sketch.insert(value);
    }

    /// Merges `other` into `self` (Chan et al. parallel update). Readings of
    /// `other` count as added after those of `self` for first/last ties.
    pub fn merge(&mut self, other: &Aggregate) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = other.clone();
            return;
        }
        let n_a = self.count as f64;
        let n_b = other.count as f64;
        let n = n_a + n_b;
        let delta = other.mean - self.mean;
        self.mean += delta * (n_b / n);
        self.m2 += other.m2 + delta * delta * (n_a * n_b / n);
        self.count += other.count;
        self.sum += other.sum;
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
        self.sum
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
        self.or_nan(self.mean)
    }

    /// Population standard deviation `sqrt(m2 / n)` (`NaN` when empty).
    pub fn stddev(&self) -> f64 {
        if self.count == 0 {
            return f64::NAN;
        }
        (self.m2.max(0.0) / self.count as f64).sqrt()
    }

    /// Sum of squared deviations from the mean; lets consumers derive the
    /// sample variance `m2 / (n - 1)` if they need it.
    pub fn m2(&self) -> f64 {
        self.m2
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

    /// The quantile sketch.
    pub fn sketch(&self) -> &Sketch {
        &self.sketch
    }

    /// The raw state, for compact encodings (see [`AggregateParts`]).
    pub fn to_parts(&self) -> AggregateParts {
        AggregateParts {
            count: self.count,
            sum: self.sum,
            min: self.min,
            max: self.max,
            first: self.first,
            last: self.last,
            mean: self.mean,
            m2: self.m2,
            sketch: self.sketch.clone(),
        }
    }

    /// Rebuilds an aggregate from [`to_parts`](Self::to_parts) output. The parts are taken
    /// as they are: a decoder of untrusted input checks them first (at least that
    /// `sketch.count() == count`).
    pub fn from_parts(parts: AggregateParts) -> Self {
        Aggregate {
            count: parts.count,
            sum: parts.sum,
            min: parts.min,
            max: parts.max,
            first: parts.first,
            last: parts.last,
            mean: parts.mean,
            m2: parts.m2,
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
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (rs.len() + 1)).collect();
            cuts.push(0);
            cuts.push(rs.len());
            cuts.sort_unstable();
            let mut merged = Aggregate::new();
            for w in cuts.windows(2) {
                merged.merge(&aggregate_of(&rs[w[0]..w[1]]));
            }
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
