//! A bounded, mergeable quantile sketch with relative-error guarantees
//! (DDSketch-style).
//!
//! # Why this design
//!
//! Gateways forward *windowed* aggregates upstream and the central system
//! merges them (across windows, across gateways). Quantiles cannot be merged
//! from quantiles, so each aggregate carries a small sketch. A logarithmic
//! bucketing sketch was chosen because:
//!
//! * **Merging is exact.** A value always lands in the same bin no matter which
//!   sketch it is inserted into, so merging is bin-wise addition of counts:
//!   `merge(sketch(A), sketch(B))` is *structurally identical* to
//!   `sketch(A ∪ B)` (the derived `PartialEq` compares the bins). This holds
//!   even when the collapse limit is hit (see below), because collapsing folds
//!   every bin below a threshold that depends only on the largest bin index.
//! * **The error is relative, not rank-based.** With relative accuracy
//!   [`RELATIVE_ACCURACY`] `= 0.01`, every quantile estimate is within 1 % of
//!   the exact quantile value (up to floating-point rounding), for positive and
//!   negative values alike. Sensor readings span very different scales
//!   (milli-volts next to kilo-pascals), which a relative guarantee handles
//!   without per-series tuning.
//! * **It is small.** Readings of one sensor in one window typically cover a
//!   few dozen bins; counts are serialized as a run of integers starting at an
//!   offset, which postcard encodes as varints (one byte per count < 128).
//!
//! # Bucketing
//!
//! `gamma = (1 + alpha) / (1 - alpha)`. A value `x` with `|x| >= MIN_INDEXABLE`
//! goes to bin `i = ceil(ln|x| / ln gamma)` of the positive or negative store
//! (by sign), i.e. bin `i` covers `(gamma^(i-1), gamma^i]`. The estimate for bin
//! `i` is `2 * gamma^i / (gamma + 1)`, whose relative distance to both bin
//! edges is exactly `alpha`. Values with `|x| < MIN_INDEXABLE` (including
//! `±0.0`) are counted in a separate zero bucket and estimated as `0.0`.
//! Non-finite values (NaN, ±∞) are ignored: they carry no rank information and
//! would poison the bin arithmetic.
//!
//! # Bounded memory
//!
//! Each store keeps at most [`MAX_BINS`] contiguous bins. When a new value
//! would widen a store beyond that, all bins below `highest_index - MAX_BINS +
//! 1` are collapsed into that lowest kept bin. With `MAX_BINS = 2048` a store
//! covers a dynamic range of `gamma^2048 ≈ 6e17` before collapsing, so it only
//! happens for wildly heterogeneous data. When it does, accuracy degrades only
//! for the values of smallest magnitude in that store: the lowest quantiles of
//! the positive values, and the negative values closest to zero. Memory per
//! sketch is therefore at most `2 * MAX_BINS` counters.
//!
//! # Quantile convention
//!
//! [`Sketch::quantile`] returns the estimate of the element at rank
//! `floor(q * (n - 1))` (0-based) of the sorted inserted values — the "lower"
//! nearest-rank convention, with no interpolation — so it can be compared
//! directly with the exact quantile defined the same way.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Relative accuracy `alpha` of every quantile estimate (1 %).
pub const RELATIVE_ACCURACY: f64 = 0.01;

/// Maximum number of contiguous bins kept per store (positive / negative).
pub const MAX_BINS: usize = 2048;

/// Values with an absolute value below this are counted as zero.
pub const MIN_INDEXABLE: f64 = 1e-9;

/// `gamma = (1 + alpha) / (1 - alpha)`: ratio between consecutive bin edges.
pub const GAMMA: f64 = (1.0 + RELATIVE_ACCURACY) / (1.0 - RELATIVE_ACCURACY);

fn ln_gamma() -> f64 {
    GAMMA.ln()
}

/// Bin index of a finite value with `abs >= MIN_INDEXABLE`.
fn index_of(abs: f64) -> i32 {
    // |index| <= ~35_500 for finite f64, so the cast is lossless.
    (abs.ln() / ln_gamma()).ceil() as i32
}

/// Representative value of bin `index` (its relative distance to both bin
/// edges is `alpha`).
fn value_of(index: i32) -> f64 {
    // Computed in log space so that the top bin (whose upper edge may exceed
    // f64::MAX) still yields a finite estimate.
    (f64::from(index) * ln_gamma() + (2.0 / (GAMMA + 1.0)).ln()).exp()
}

/// Smallest and largest bin index a finite value can map to.
fn index_bounds() -> (i32, i32) {
    (index_of(MIN_INDEXABLE), index_of(f64::MAX))
}

/// Error returned when deserialized sketch data is not in canonical form.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SketchError {
    /// A store has more than [`MAX_BINS`] bins.
    #[error("sketch store has {0} bins, more than the maximum {MAX_BINS}")]
    TooManyBins(usize),
    /// A store's first or last count is zero (stores are kept trimmed).
    #[error("sketch store is not trimmed (zero count at an edge)")]
    NotTrimmed,
    /// An empty store with a non-zero offset.
    #[error("empty sketch store has non-zero offset {0}")]
    EmptyWithOffset(i32),
    /// Bin indices outside what a finite value can produce.
    #[error("sketch store bin range {lo}..={hi} is outside the valid index range")]
    IndexOutOfRange {
        /// Lowest bin index of the store.
        lo: i64,
        /// Highest bin index of the store.
        hi: i64,
    },
    /// The total count does not fit in a `u64`.
    #[error("sketch total count overflows u64")]
    CountOverflow,
}

/// Contiguous run of bin counts: `counts[j]` is the count of bin `offset + j`.
///
/// Canonical form (kept by every operation and checked on deserialization):
/// either empty with `offset == 0`, or non-empty with non-zero first and last
/// counts and at most [`MAX_BINS`] entries. Canonical form is what makes the
/// derived `PartialEq` a structural equality.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Store {
    offset: i32,
    /// A boxed slice, not a `Vec`: 8 bytes less in every open window (a gateway holds tens of
    /// thousands) and no spare capacity; the range grows rarely (a sensor's values stay in
    /// a few bins), so a reallocation then costs nothing that matters.
    counts: Box<[u64]>,
}

impl Store {
    fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// Highest bin index; only meaningful when non-empty.
    fn hi(&self) -> i32 {
        // counts.len() <= MAX_BINS, so the cast is lossless.
        self.offset + self.counts.len() as i32 - 1
    }

    /// Makes the store cover `[lo, hi]` (plus what it already covers), folding
    /// bins that fall below the `MAX_BINS` limit into the lowest kept bin.
    /// Returns the lowest kept index; callers must clamp indices to it.
    fn ensure_range(&mut self, lo: i32, hi: i32) -> i32 {
        if self.is_empty() {
            let new_lo = lo.max(hi - (MAX_BINS as i32 - 1));
            self.offset = new_lo;
            self.counts = vec![0; (hi - new_lo + 1) as usize].into_boxed_slice();
            return new_lo;
        }
        let cur_lo = self.offset;
        let cur_hi = self.hi();
        let hi = hi.max(cur_hi);
        let lo = lo.min(cur_lo).max(hi - (MAX_BINS as i32 - 1));
        if lo == cur_lo {
            // Only (possibly) grows to the right: cheap in-place resize.
            let len = (hi - lo + 1) as usize;
            if len != self.counts.len() {
                let mut counts = std::mem::take(&mut self.counts).into_vec();
                counts.resize(len, 0);
                self.counts = counts.into_boxed_slice();
            }
            return lo;
        }
        let mut counts = vec![0u64; (hi - lo + 1) as usize];
        for (j, &c) in self.counts.iter().enumerate() {
            let index = (cur_lo + j as i32).max(lo);
            let slot = &mut counts[(index - lo) as usize];
            *slot = slot.saturating_add(c);
        }
        self.offset = lo;
        self.counts = counts.into_boxed_slice();
        lo
    }

    fn add(&mut self, index: i32, n: u64) {
        if n == 0 {
            return;
        }
        let lo = self.ensure_range(index, index);
        let slot = &mut self.counts[(index.max(lo) - lo) as usize];
        *slot = slot.saturating_add(n);
    }

    fn merge(&mut self, other: &Store) {
        if other.is_empty() {
            return;
        }
        let lo = self.ensure_range(other.offset, other.hi());
        for (j, &c) in other.counts.iter().enumerate() {
            let index = (other.offset + j as i32).max(lo);
            let slot = &mut self.counts[(index - lo) as usize];
            *slot = slot.saturating_add(c);
        }
    }

    fn validate(&self) -> Result<(), SketchError> {
        if self.counts.is_empty() {
            return if self.offset == 0 {
                Ok(())
            } else {
                Err(SketchError::EmptyWithOffset(self.offset))
            };
        }
        if self.counts.len() > MAX_BINS {
            return Err(SketchError::TooManyBins(self.counts.len()));
        }
        if self.counts[0] == 0 || self.counts[self.counts.len() - 1] == 0 {
            return Err(SketchError::NotTrimmed);
        }
        let lo = i64::from(self.offset);
        let hi = lo + self.counts.len() as i64 - 1;
        let (min_index, max_index) = index_bounds();
        if lo < i64::from(min_index) || hi > i64::from(max_index) {
            return Err(SketchError::IndexOutOfRange { lo, hi });
        }
        Ok(())
    }
}

/// Serialized form of a [`Sketch`]; validated before becoming a sketch.
#[derive(Deserialize)]
struct SketchRepr {
    zero: u64,
    positive: Store,
    negative: Store,
}

/// Mergeable quantile sketch with relative accuracy [`RELATIVE_ACCURACY`].
///
/// See the [module documentation](self) for the design.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "SketchRepr")]
pub struct Sketch {
    /// Count of values with `|x| < MIN_INDEXABLE`.
    zero: u64,
    /// Bins of positive values.
    positive: Store,
    /// Bins of negative values, indexed by the absolute value.
    negative: Store,
    /// Total count; derived from the bins, so not serialized.
    #[serde(skip_serializing)]
    count: u64,
}

impl TryFrom<SketchRepr> for Sketch {
    type Error = SketchError;

    fn try_from(repr: SketchRepr) -> Result<Self, SketchError> {
        repr.positive.validate()?;
        repr.negative.validate()?;
        let count = repr
            .positive
            .counts
            .iter()
            .chain(repr.negative.counts.iter())
            .try_fold(repr.zero, |acc, &c| acc.checked_add(c))
            .ok_or(SketchError::CountOverflow)?;
        Ok(Sketch {
            zero: repr.zero,
            positive: repr.positive,
            negative: repr.negative,
            count,
        })
    }
}

impl Sketch {
    /// An empty sketch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one value. Non-finite values are ignored (see module docs).
    pub fn insert(&mut self, x: f64) {
        if !x.is_finite() {
            return;
        }
        let abs = x.abs();
        if abs < MIN_INDEXABLE {
            self.zero = self.zero.saturating_add(1);
        } else if x > 0.0 {
            self.positive.add(index_of(abs), 1);
        } else {
            self.negative.add(index_of(abs), 1);
        }
        self.count = self.count.saturating_add(1);
    }

    /// Adds all values of `other` into `self` (bin-wise addition; exact).
    pub fn merge(&mut self, other: &Sketch) {
        self.zero = self.zero.saturating_add(other.zero);
        self.positive.merge(&other.positive);
        self.negative.merge(&other.negative);
        self.count = self.count.saturating_add(other.count);
    }

    /// Number of values inserted (non-finite values are not counted).
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Whether no value has been inserted.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Number of bins currently allocated (positive + negative stores); at
    /// most `2 * MAX_BINS`.
    pub fn allocated_bins(&self) -> usize {
        self.positive.counts.len() + self.negative.counts.len()
    }

    /// Estimate of the value at rank `floor(q * (n - 1))` of the sorted
    /// values, within [`RELATIVE_ACCURACY`] of the exact value.
    ///
    /// Returns `None` when the sketch is empty or `q` is not in `[0, 1]`.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 || !(0.0..=1.0).contains(&q) {
            return None;
        }
        // Same expression as the documented exact convention, so both agree
        // on the rank bit for bit.
        let rank = (q * (self.count - 1) as f64).floor() as u64;
        let mut seen = 0u64;
        // Most negative first: highest |x| index of the negative store.
        for (j, &c) in self.negative.counts.iter().enumerate().rev() {
            seen = seen.saturating_add(c);
            if seen > rank {
                return Some(-value_of(self.negative.offset + j as i32));
            }
        }
        seen = seen.saturating_add(self.zero);
        if seen > rank {
            return Some(0.0);
        }
        for (j, &c) in self.positive.counts.iter().enumerate() {
            seen = seen.saturating_add(c);
            if seen > rank {
                return Some(value_of(self.positive.offset + j as i32));
            }
        }
        // Only reachable if counts saturated; the largest bin is the answer.
        if !self.positive.is_empty() {
            Some(value_of(self.positive.hi()))
        } else if self.zero > 0 {
            Some(0.0)
        } else {
            Some(-value_of(self.negative.offset))
        }
    }

    /// The non-empty bins as `(key, count)` in ascending order of value, with keys that
    /// say the value on their own ([`bin_key_value`]): what the central side stores, so that
    /// merging windows and gateways is a sum of counts per key (in SQL: `unnest` and
    /// `GROUP BY key`) and a quantile is a walk up the keys in order.
    pub fn keyed_bins(&self) -> Vec<(i32, u64)> {
        let mut out = Vec::new();
        for (j, &c) in self.negative.counts.iter().enumerate().rev() {
            if c > 0 {
                out.push((-(BIN_KEY_BASE + self.negative.offset + j as i32), c));
            }
        }
        if self.zero > 0 {
            out.push((0, self.zero));
        }
        for (j, &c) in self.positive.counts.iter().enumerate() {
            if c > 0 {
                out.push((BIN_KEY_BASE + self.positive.offset + j as i32, c));
            }
        }
        out
    }

    /// The bins, for encodings that lay them out themselves (the upstream protocol).
    pub fn to_parts(&self) -> SketchParts {
        SketchParts {
            zero: self.zero,
            positive_offset: self.positive.offset,
            positive: self.positive.counts.to_vec(),
            negative_offset: self.negative.offset,
            negative: self.negative.counts.to_vec(),
        }
    }

    /// A sketch from [`to_parts`](Self::to_parts) output, checked for canonical form
    /// exactly like a deserialized sketch.
    pub fn from_parts(parts: SketchParts) -> Result<Sketch, SketchError> {
        Sketch::try_from(SketchRepr {
            zero: parts.zero,
            positive: Store {
                offset: parts.positive_offset,
                counts: parts.positive.into_boxed_slice(),
            },
            negative: Store {
                offset: parts.negative_offset,
                counts: parts.negative.into_boxed_slice(),
            },
        })
    }
}

/// The bins of a [`Sketch`], field by field (see [`Sketch::to_parts`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SketchParts {
    /// Count of values with `|x| < MIN_INDEXABLE`.
    pub zero: u64,
    /// Bin index of `positive[0]`.
    pub positive_offset: i32,
    /// Counts of consecutive bins of positive values.
    pub positive: Vec<u64>,
    /// Bin index of `negative[0]` (bins of negative values are indexed by `|x|`).
    pub negative_offset: i32,
    /// Counts of consecutive bins of negative values.
    pub negative: Vec<u64>,
}

/// Offset of the keys of [`Sketch::keyed_bins`]: bin `i` of the positive values is key
/// `BIN_KEY_BASE + i`, bin `i` of the negative ones `-(BIN_KEY_BASE + i)`, the zero bucket 0.
/// Bin indices stay within ±36,000 for finite values, so keys order as their values do.
pub const BIN_KEY_BASE: i32 = 100_000;

/// The value a key of [`Sketch::keyed_bins`] stands for (what [`Sketch::quantile`] returns
/// for it): `sign(k) · 2γ^(|k| − BIN_KEY_BASE) / (γ + 1)`.
pub fn bin_key_value(key: i32) -> f64 {
    match key {
        0 => 0.0,
        k if k > 0 => value_of(k - BIN_KEY_BASE),
        k => -value_of(-k - BIN_KEY_BASE),
    }
}

/// The bin a value with `|x| >= MIN_INDEXABLE` falls in, indexed by `|x|` (`None` for
/// values counted as zero and for non-finite values). The largest positive reading of a
/// sketch is always in its highest positive bin, which lets encoders send that index as a
/// difference from [`bin_index`]`(max)`.
pub fn bin_index(x: f64) -> Option<i32> {
    (x.is_finite() && x.abs() >= MIN_INDEXABLE).then(|| index_of(x.abs()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keyed_bins_order_as_their_values_and_give_the_same_quantiles() {
        let values = [
            -1e6, -3.5, -3.5, -1e-3, 0.0, 1e-12, 2e-7, 1.0, 21.5, 21.5, 4e9,
        ];
        let s = sketch_of(&values);
        let bins = s.keyed_bins();
        assert!(bins.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(
            bins.windows(2)
                .all(|w| bin_key_value(w[0].0) < bin_key_value(w[1].0))
        );
        assert_eq!(bins.iter().map(|b| b.1).sum::<u64>(), s.count());
        for q in [0.0, 0.1, 0.25, 0.5, 0.9, 0.99, 1.0] {
            let rank = (q * (s.count() - 1) as f64).floor() as u64;
            let mut seen = 0;
            let key = bins
                .iter()
                .find(|b| {
                    seen += b.1;
                    seen > rank
                })
                .unwrap()
                .0;
            assert_eq!(Some(bin_key_value(key)), s.quantile(q), "q {q}");
        }
    }

    /// Exact quantile with the documented convention.
    fn exact_quantile(values: &[f64], q: f64) -> f64 {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        sorted[(q * (sorted.len() - 1) as f64).floor() as usize]
    }

    fn sketch_of(values: &[f64]) -> Sketch {
        let mut s = Sketch::new();
        for &v in values {
            s.insert(v);
        }
        s
    }

    fn assert_within_relative_accuracy(values: &[f64]) -> Result<(), TestCaseError> {
        let s = sketch_of(values);
        for q in [0.0, 0.5, 0.9, 0.99, 1.0] {
            let exact = exact_quantile(values, q);
            let est = s.quantile(q).expect("non-empty");
            // alpha plus a hair for floating-point rounding at bin edges.
            let tol = RELATIVE_ACCURACY * (1.0 + 1e-9) * exact.abs();
            prop_assert!(
                (est - exact).abs() <= tol,
                "q={q} exact={exact} est={est} tol={tol}"
            );
        }
        Ok(())
    }

    fn magnitude() -> impl Strategy<Value = f64> {
        // Log-uniform over 1e-6 .. 1e9.
        (-6.0f64..9.0).prop_map(|e| 10f64.powf(e))
    }

    fn mixed_value() -> impl Strategy<Value = f64> {
        prop_oneof![
            4 => magnitude(),
            4 => magnitude().prop_map(|m| -m),
            1 => Just(0.0),
        ]
    }

    proptest! {
        #[test]
        fn quantiles_of_positive_values_are_within_one_percent(
            values in prop::collection::vec(magnitude(), 1..400)
        ) {
            assert_within_relative_accuracy(&values)?;
        }

        #[test]
        fn quantiles_of_negative_values_are_within_one_percent(
            values in prop::collection::vec(magnitude().prop_map(|m| -m), 1..400)
        ) {
            assert_within_relative_accuracy(&values)?;
        }

        #[test]
        fn quantiles_of_mixed_sign_values_with_zeros_are_within_one_percent(
            values in prop::collection::vec(mixed_value(), 1..400)
        ) {
            assert_within_relative_accuracy(&values)?;
        }

        #[test]
        fn merging_sketches_equals_sketching_the_union(
            a in prop::collection::vec(mixed_value(), 0..200),
            b in prop::collection::vec(mixed_value(), 0..200),
        ) {
            let mut ab = sketch_of(&a);
            ab.merge(&sketch_of(&b));
            let mut ba = sketch_of(&b);
            ba.merge(&sketch_of(&a));
            let union: Vec<f64> = a.iter().chain(b.iter()).copied().collect();
            let direct = sketch_of(&union);
            prop_assert_eq!(&ab, &direct);
            prop_assert_eq!(&ba, &direct);
        }

        #[test]
        fn sketch_is_independent_of_insertion_order(
            values in prop::collection::vec(mixed_value(), 0..200)
        ) {
            let mut reversed = values.clone();
            reversed.reverse();
            prop_assert_eq!(sketch_of(&values), sketch_of(&reversed));
        }

        #[test]
        fn postcard_round_trip_preserves_the_sketch(
            values in prop::collection::vec(mixed_value(), 0..300)
        ) {
            let s = sketch_of(&values);
            let bytes = postcard::to_stdvec(&s).unwrap();
            let back: Sketch = postcard::from_bytes(&bytes).unwrap();
            prop_assert_eq!(&back, &s);
            prop_assert_eq!(back.count(), values.len() as u64);
        }

        #[test]
        fn merging_stays_exact_and_bounded_when_bins_collapse(
            a in prop::collection::vec((-300.0f64..300.0).prop_map(|e| 10f64.powf(e)), 1..100),
            b in prop::collection::vec((-300.0f64..300.0).prop_map(|e| 10f64.powf(e)), 1..100),
        ) {
            let mut merged = sketch_of(&a);
            merged.merge(&sketch_of(&b));
            let union: Vec<f64> = a.iter().chain(b.iter()).copied().collect();
            let direct = sketch_of(&union);
            prop_assert!(direct.allocated_bins() <= 2 * MAX_BINS);
            prop_assert_eq!(&merged, &direct);
            // The top quantile is unaffected by collapsing the lowest bins; when every value
            // is below MIN_INDEXABLE, all of them count as zero (the documented contract).
            let exact = exact_quantile(&union, 1.0);
            let est = direct.quantile(1.0).unwrap();
            if exact >= MIN_INDEXABLE {
                prop_assert!((est - exact).abs() <= RELATIVE_ACCURACY * (1.0 + 1e-9) * exact);
            } else {
                prop_assert_eq!(est, 0.0);
            }
        }
    }

    #[test]
    fn empty_sketch_has_no_quantile() {
        let s = Sketch::new();
        assert_eq!(s.count(), 0);
        assert_eq!(s.quantile(0.5), None);
    }

    #[test]
    fn quantile_outside_unit_interval_is_none() {
        let s = sketch_of(&[1.0, 2.0]);
        assert_eq!(s.quantile(-0.1), None);
        assert_eq!(s.quantile(1.1), None);
        assert_eq!(s.quantile(f64::NAN), None);
    }

    #[test]
    fn non_finite_values_are_ignored() {
        let s = sketch_of(&[f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 5.0]);
        assert_eq!(s.count(), 1);
        let est = s.quantile(0.5).unwrap();
        assert!((est - 5.0).abs() <= 0.05);
    }

    #[test]
    fn tiny_values_count_as_zero() {
        let s = sketch_of(&[1e-12, -1e-12, 0.0, -0.0]);
        assert_eq!(s.count(), 4);
        assert_eq!(s.quantile(0.5), Some(0.0));
        assert_eq!(s.allocated_bins(), 0);
    }

    #[test]
    fn extreme_finite_values_are_indexable() {
        let s = sketch_of(&[f64::MAX, -f64::MAX, f64::MIN_POSITIVE, MIN_INDEXABLE]);
        assert_eq!(s.count(), 4);
        let top = s.quantile(1.0).unwrap();
        assert!(top.is_finite() && (top - f64::MAX).abs() <= 0.0100001 * f64::MAX);
        let bottom = s.quantile(0.0).unwrap();
        assert!(bottom.is_finite() && (bottom + f64::MAX).abs() <= 0.0100001 * f64::MAX);
    }

    #[test]
    fn store_never_exceeds_max_bins() {
        let mut s = Sketch::new();
        // Each step is a factor 10 => ~115 bins apart; 200 steps span far more
        // than MAX_BINS bins.
        for e in -9..300 {
            s.insert(10f64.powi(e));
        }
        assert_eq!(
            s.positive.counts.len(),
            MAX_BINS,
            "collapsed to exactly the limit"
        );
        assert_eq!(s.count(), 309);
        // The maximum is still estimated accurately.
        let top = s.quantile(1.0).unwrap();
        assert!((top - 1e299).abs() <= 0.0100001 * 1e299);
    }

    #[test]
    fn non_canonical_serialized_sketch_is_rejected() {
        #[derive(Serialize)]
        struct Raw {
            zero: u64,
            positive: Store,
            negative: Store,
        }
        let untrimmed = Raw {
            zero: 0,
            positive: Store {
                offset: 3,
                counts: vec![0, 1].into_boxed_slice(),
            },
            negative: Store::default(),
        };
        let bytes = postcard::to_stdvec(&untrimmed).unwrap();
        assert!(postcard::from_bytes::<Sketch>(&bytes).is_err());

        let too_wide = Raw {
            zero: 0,
            positive: Store {
                offset: 0,
                counts: vec![1; MAX_BINS + 1].into_boxed_slice(),
            },
            negative: Store::default(),
        };
        let bytes = postcard::to_stdvec(&too_wide).unwrap();
        assert!(postcard::from_bytes::<Sketch>(&bytes).is_err());
    }

    #[test]
    fn sketch_of_600_values_between_20_and_30_encodes_in_a_few_hundred_bytes() {
        let mut s = Sketch::new();
        for i in 0..600 {
            // Deterministic spread over [20, 30).
            let x = 20.0 + 10.0 * ((i * 7919) % 600) as f64 / 600.0;
            s.insert(x);
        }
        let bytes = postcard::to_stdvec(&s).unwrap();
        println!(
            "sketch of 600 values in 20..30: {} bytes, {} bins",
            bytes.len(),
            s.allocated_bins()
        );
        assert!(bytes.len() <= 400, "{} bytes", bytes.len());
    }
}
