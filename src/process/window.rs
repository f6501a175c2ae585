//! Tumbling event-time windows with allowed lateness, retention and
//! versioned corrections.
//!
//! # Model
//!
//! For each configured length `L` (in seconds, several tracked
//! independently), a reading with event time `t` belongs to the window
//! `[start, start + L)` with `start = floor(t / L) * L` (epoch-aligned,
//! `div_euclid` semantics so negative times work too). A reading exactly on a
//! boundary belongs to the window that *starts* there.
//!
//! With `end = start + L`, and `now` the caller's clock:
//!
//! | condition | state of the window | a reading for it |
//! | --- | --- | --- |
//! | `now < end + lateness` | open | aggregated, [`Applied::Open`] |
//! | `end + lateness <= now < end + lateness + retention` | closed, retained | aggregated, [`Applied::Correction`] |
//! | `now >= end + lateness + retention` | dropped | ignored, [`Applied::TooLate`] |
//!
//! [`Windows::close_due`] emits each window once it is closed (version 1),
//! re-emits a closed window with `version + 1` whenever corrections arrived
//! since its previous emission, and forgets windows past their retention.
//!
//! # Why complete aggregates, not deltas
//!
//! Every emission carries the *complete* aggregate of the window, and its
//! version strictly increases. The central side keeps, per
//! `(gateway, series, window_start, window_secs)`, the emission with the
//! highest version. That is correct whatever the transport does: a duplicate
//! is harmless (same version, same content), a reordered older version is
//! ignored, and a lost intermediate version is superseded by the next one.
//! Deltas would need exactly-once, in-order delivery to be summed correctly.
//!
//! # Why the clock is clamped
//!
//! `now` is clamped to the highest value seen so far (by `apply` or
//! `close_due`). A window's fate is then a monotone function of the clock: a
//! window that was dropped can never be "re-opened" by a stale `now`, which
//! would otherwise produce a fresh version 1 that the central side would
//! ignore in favour of the old, higher version.
//!
//! # Determinism and checkpoints
//!
//! All state lives in ordered maps and all arithmetic happens in call order,
//! so the same sequence of `apply`/`close_due` calls yields identical output.
//! The whole state (including the spec, clock and pending corrections) is
//! serializable; serializing, deserializing and continuing produces exactly
//! the output of an uninterrupted run. Deserialization validates the state
//! and rebuilds derived indexes.
//!
//! # Memory and cost
//!
//! State is proportional to the number of open + retained windows. Windows are
//! kept in a `BTreeMap` keyed by `(end, window_secs)` holding a [`Slot`]: the
//! windows still open in full, by series, and the closed ones packed in
//! columns (most of the state is closed windows kept for corrections: see
//! [`Slot`] for the figures). `close_due` only touches windows that are due
//! (range scan from the last closing point), pending corrections (a separate
//! ordered set) and the windows being dropped (a prefix of the map); it never
//! scans all series. Applying a reading to an existing open window allocates
//! nothing; a correction unpacks the one group of at most [`PACK_ROWS`]
//! windows that holds its series. A series with no readings within the
//! retention horizon holds no state at all, so no explicit idle-series removal
//! is needed.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use std::sync::Arc;

use serde::de::{Error as _, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

use crate::model::aggregate::Aggregate;
use crate::protocol::packed;

/// Which windows to compute and how long to accept late readings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowSpec {
    /// Window lengths in seconds, e.g. `[10, 60]`; each tracked independently.
    pub lengths_secs: Vec<u32>,
    /// How long after its end a window still accepts readings before its
    /// first emission.
    pub allowed_lateness_ms: i64,
    /// How long after closing (`end + allowed_lateness_ms`) a window is kept
    /// so that late readings produce corrections.
    pub retention_ms: i64,
}

impl WindowSpec {
    /// Checks that the spec is usable: at least one length, no zero or
    /// duplicate length, non-negative lateness and retention.
    pub fn validate(&self) -> Result<(), WindowError> {
        if self.lengths_secs.is_empty() {
            return Err(WindowError::NoLengths);
        }
        let mut seen = BTreeSet::new();
        for &secs in &self.lengths_secs {
            if secs == 0 {
                return Err(WindowError::ZeroLength);
            }
            if !seen.insert(secs) {
                return Err(WindowError::DuplicateLength(secs));
            }
        }
        if self.allowed_lateness_ms < 0 {
            return Err(WindowError::NegativeLateness(self.allowed_lateness_ms));
        }
        if self.retention_ms < 0 {
            return Err(WindowError::NegativeRetention(self.retention_ms));
        }
        if self
            .allowed_lateness_ms
            .checked_add(self.retention_ms)
            .is_none()
        {
            return Err(WindowError::HorizonOverflow);
        }
        Ok(())
    }
}

/// Invalid spec or invalid checkpointed state.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WindowError {
    /// `lengths_secs` is empty.
    #[error("no window lengths configured")]
    NoLengths,
    /// A window length of zero seconds.
    #[error("window lengths must be positive")]
    ZeroLength,
    /// The same length configured twice (readings would be counted twice).
    #[error("window length {0} s is configured more than once")]
    DuplicateLength(u32),
    /// `allowed_lateness_ms` is below zero (the value carried, in ms).
    #[error("allowed lateness must be >= 0, got {0} ms")]
    NegativeLateness(i64),
    /// `retention_ms` is below zero (the value carried, in ms).
    #[error("retention must be >= 0, got {0} ms")]
    NegativeRetention(i64),
    /// `allowed_lateness_ms + retention_ms` overflows `i64`.
    #[error("allowed lateness plus retention overflows")]
    HorizonOverflow,
    /// Checkpoint holds a window whose length is not in the spec.
    #[error("checkpoint holds a {0} s window, which the spec does not configure")]
    UnknownLength(u32),
    /// Checkpoint holds a window that is not epoch-aligned or out of range.
    #[error("checkpoint window ending at {end_ms} is invalid for {window_secs} s windows")]
    InvalidWindow {
        /// End of the window.
        end_ms: i64,
        /// Length of the window.
        window_secs: u32,
    },
    /// Checkpoint holds the same window twice.
    #[error("checkpoint holds the window ending at {end_ms} ({window_secs} s) twice")]
    DuplicateWindow {
        /// End of the window.
        end_ms: i64,
        /// Length of the window.
        window_secs: u32,
    },
    /// Checkpoint holds an inconsistent window (empty, or emitted while open).
    #[error("checkpoint window of series {series:?} ending at {end_ms} is inconsistent")]
    InconsistentWindow {
        /// Series of the window.
        series: String,
        /// End of the window.
        end_ms: i64,
    },
    /// A pending correction refers to a window that is missing or not closed.
    #[error("checkpoint has a pending correction for a missing or open window of {series:?}")]
    DanglingCorrection {
        /// Series of the correction.
        series: String,
    },
}

/// One emitted window: the complete aggregate, with its version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowAggregate {
    /// Series key (`metric{tag=value,...}`); processing looks up the metric and tags by it.
    pub series: String,
    /// Start of the window (inclusive), epoch milliseconds.
    pub window_start_ms: i64,
    /// Window length in seconds.
    pub window_secs: u32,
    /// 1 for the first emission, +1 per correction. `0` only in
    /// [`Windows::snapshot_open`] output (provisional, never forwarded).
    pub version: u32,
    /// Complete aggregate of every accepted reading of the window.
    pub agg: Aggregate,
}

impl WindowAggregate {
    /// End of the window (exclusive), epoch milliseconds.
    pub fn window_end_ms(&self) -> i64 {
        self.window_start_ms + len_ms(self.window_secs)
    }
}

/// Outcome of [`Windows::apply`]. When window lengths disagree, the most
/// severe outcome wins: `TooLate` over `Correction` over `Open`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Went into open windows only.
    Open,
    /// Went into at least one window that is already closed by the clock
    /// (`now >= end + lateness`) but retained. If `close_due` had already
    /// emitted that window, its next `close_due` emits `version + 1`;
    /// otherwise the reading simply becomes part of version 1.
    Correction,
    /// For at least one window length the window was already dropped
    /// (`now >= end + lateness + retention`); that length ignores the reading
    /// (other lengths may still have taken it).
    TooLate,
    /// Not applied at all: the value is not finite, or the event time is so
    /// close to the `i64` limits that its window cannot be represented.
    /// The state, including the clock, is left untouched.
    Rejected,
}

fn len_ms(secs: u32) -> i64 {
    i64::from(secs) * 1000
}

/// Windows of one length ending at the same time; ordered by `(end, secs)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct SlotKey {
    end_ms: i64,
    window_secs: u32,
}

/// A window awaiting a correction emission; ordered by `(end, secs, series)`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct WindowKey {
    end_ms: i64,
    window_secs: u32,
    series: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct WindowState {
    agg: Aggregate,
    /// Last emitted version; 0 = not emitted yet.
    version: u32,
}

type Slots = BTreeMap<SlotKey, Slot>;

fn serialize_slots<S: Serializer>(slots: &Slots, s: S) -> Result<S::Ok, S::Error> {
    // A sequence of (key, per-series map) pairs: works with formats whose
    // map keys must be strings, and costs nothing extra in postcard.
    s.collect_seq(slots.iter())
}

/// Windows per packed group of a closed slot: small enough that a correction unpacks little,
/// large enough that the group's column headers cost well under a byte per window.
const PACK_ROWS: usize = 128;

/// The windows of one slot (one length, one end), of every series that has one.
///
/// # Why closed slots are packed
///
/// Most of the state is closed windows kept only in case a correction arrives (with the
/// example config's 2-minute horizon, 14 of every 16 windows), and corrections are rare.
/// In full, a window costs ~500 bytes of heap (the aggregate, its series name, its sketch's
/// bins and the map's nodes: 77 MiB for 10,000 series); packed in columns as the upstream
/// protocol carries them ([`packed`]), tens of bytes plus a shared pointer to the name
/// (issue 11: the whole window state with 10,000 series measured 76.6 MiB in full, 18.5 MiB
/// packed, most of it the two open windows per series). A correction unpacks the one group
/// holding its series; the next `close_due` emits it and packs it again. Packing is exact (bit for bit), so
/// nothing about the output depends on whether a window was packed.
///
/// Invariant: a slot not yet passed by `close_due` has nothing packed (readings go to open
/// slots all the time), and no series is both in `open` and in a group.
#[derive(Debug, Clone, Default)]
struct Slot {
    /// Windows in full, by series.
    open: BTreeMap<Arc<str>, WindowState>,
    /// The other windows, packed in groups of at most [`PACK_ROWS`].
    packed: Vec<PackedGroup>,
    /// `open.len()` at the previous [`Slot::settle`] and right after the last compaction:
    /// bookkeeping, not state (neither compared nor serialized).
    seen: usize,
    compacted: usize,
}

/// Windows of one slot packed by [`Slot::pack`]: `names[i]` is the series of row `i`.
#[derive(Debug, Clone)]
struct PackedGroup {
    names: Box<[Arc<str>]>,
    bytes: Box<[u8]>,
}

impl PackedGroup {
    fn new(entries: &[(Arc<str>, WindowState)]) -> PackedGroup {
        let rows: Vec<packed::Row> = entries
            .iter()
            .enumerate()
            .map(|(i, (_, state))| packed::Row {
                series: i as u32,
                // Not stored: the slot's key says it, and the columns pack only differences.
                window_start_ms: 0,
                window_secs: 0,
                version: state.version,
                agg: state.agg.to_parts(),
            })
            .collect();
        PackedGroup {
            names: entries.iter().map(|(n, _)| n.clone()).collect(),
            bytes: packed::encode(&rows, 0).into_boxed_slice(),
        }
    }

    /// The group of `entries` if it unpacks to exactly them; `None` otherwise.
    fn exact(entries: &[(Arc<str>, WindowState)]) -> Option<PackedGroup> {
        let group = PackedGroup::new(entries);
        let rows = packed::decode(&group.bytes, 0).ok()?;
        let same = rows.len() == entries.len()
            && rows.into_iter().zip(entries).all(|(row, (_, state))| {
                row.version == state.version && Aggregate::from_parts(row.agg) == state.agg
            });
        same.then_some(group)
    }

    fn contains(&self, series: &str) -> bool {
        self.names.binary_search_by(|n| (**n).cmp(series)).is_ok()
    }

    fn unpack(&self) -> impl Iterator<Item = (Arc<str>, WindowState)> + '_ {
        // These bytes were made by `new` in this process: they decode, or memory is corrupt.
        let rows = packed::decode(&self.bytes, 0).expect("a group packed in memory decodes");
        rows.into_iter().map(|row| {
            (
                self.names[row.series as usize].clone(),
                WindowState {
                    agg: Aggregate::from_parts(row.agg),
                    version: row.version,
                },
            )
        })
    }
}

impl Slot {
    fn len(&self) -> usize {
        self.open.len() + self.packed.iter().map(|g| g.names.len()).sum::<usize>()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The window of `series`, unpacking its group if it is packed.
    fn get_mut(&mut self, series: &str) -> Option<&mut WindowState> {
        if !self.open.contains_key(series) {
            let i = self.packed.iter().position(|g| g.contains(series))?;
            let group = self.packed.swap_remove(i);
            self.open.extend(group.unpack());
        }
        self.open.get_mut(series)
    }

    /// Rebuilds the map of open windows with full nodes once series stop arriving.
    ///
    /// # Why
    ///
    /// Every series of a fleet arrives in a new slot within a second or so of its start, in
    /// no particular order, and a `BTreeMap` filled in random order has its nodes about two
    /// thirds full; an open window is 168 bytes plus its name's pointer, and a gateway holds
    /// two or three open slots per length (issue 11: ~3 open windows per series, 10,000
    /// series). `BTreeMap::append` builds its result from the merged, sorted entries with
    /// every node full, freeing the old nodes as it goes, so a settled slot takes about two
    /// thirds of the memory. Done only when the slot did not grow since the previous call:
    /// inserting into full nodes splits them in halves, which would be worse than not
    /// compacting.
    fn settle(&mut self) {
        let n = self.open.len();
        if n == self.seen && n != self.compacted && n >= PACK_ROWS {
            let mut rest = std::mem::take(&mut self.open);
            if let Some((name, state)) = rest.pop_first() {
                self.open.insert(name, state);
                self.open.append(&mut rest);
            }
            self.compacted = n;
        }
        self.seen = n;
    }

    /// Packs every window held in full.
    fn pack(&mut self) {
        // Group by group out of the map (which frees its nodes as it goes), not the whole
        // slot into one vector first: that vector was the processor's largest allocation
        // (10,000 series: 2.2 MB at once, at every close).
        let mut open = std::mem::take(&mut self.open).into_iter();
        let mut chunk: Vec<(Arc<str>, WindowState)> = Vec::with_capacity(PACK_ROWS);
        loop {
            chunk.clear();
            chunk.extend(open.by_ref().take(PACK_ROWS));
            if chunk.is_empty() {
                break;
            }
            match PackedGroup::exact(&chunk) {
                Some(group) => self.packed.push(group),
                // A state the columns cannot hold bit for bit (only seen in fuzzed
                // checkpoints so far) stays in full rather than changing or panicking later.
                None => self.open.extend(chunk.drain(..)),
            }
        }
    }

    /// Unpacks every window.
    fn unpack_all(&mut self) {
        for group in std::mem::take(&mut self.packed) {
            self.open.extend(group.unpack());
        }
    }

    /// Every series with a window here, in no particular order.
    fn names(&self) -> impl Iterator<Item = &Arc<str>> {
        self.open
            .keys()
            .chain(self.packed.iter().flat_map(|g| g.names.iter()))
    }

    /// Every window in full, by series.
    fn entries(&self) -> Vec<(Arc<str>, WindowState)> {
        let mut all: Vec<(Arc<str>, WindowState)> = self
            .open
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .chain(self.packed.iter().flat_map(PackedGroup::unpack))
            .collect();
        all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Makes every name the one `series` holds (deserialization allocates each anew) and
    /// counts the windows per series.
    fn intern(&mut self, series: &mut BTreeMap<Arc<str>, usize>) {
        let mut canonical = |name: &Arc<str>| -> Arc<str> {
            match series.get_key_value(&**name) {
                Some((k, _)) => {
                    let k = k.clone();
                    *series.get_mut(&*k).expect("just found") += 1;
                    k
                }
                None => {
                    series.insert(name.clone(), 1);
                    name.clone()
                }
            }
        };
        for group in &mut self.packed {
            for name in group.names.iter_mut() {
                *name = canonical(name);
            }
        }
        self.open = std::mem::take(&mut self.open)
            .into_iter()
            .map(|(k, v)| (canonical(&k), v))
            .collect();
    }
}

impl PartialEq for Slot {
    fn eq(&self, other: &Slot) -> bool {
        self.entries() == other.entries()
    }
}

/// A map from series to window, sorted: the format of the checkpoints before packing.
impl Serialize for Slot {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.packed.is_empty() {
            return s.collect_map(self.open.iter().map(|(k, v)| (&**k, v)));
        }
        s.collect_map(self.entries().iter().map(|(k, v)| (&**k, v)))
    }
}

/// Read as written by [`Serialize`], packing as it goes so that loading a checkpoint never
/// holds more than one group in full beside the packed state (the caller unpacks the open
/// slots).
impl<'de> Deserialize<'de> for Slot {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Slot, D::Error> {
        struct Entries;
        impl<'de> Visitor<'de> for Entries {
            type Value = Slot;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map from series to window, sorted by series")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Slot, A::Error> {
                let mut slot = Slot::default();
                let mut last: Option<Arc<str>> = None;
                while let Some((name, state)) = map.next_entry::<String, WindowState>()? {
                    if last.as_deref().is_some_and(|l| l >= name.as_str()) {
                        return Err(A::Error::custom(format!(
                            "series {name:?} out of order or twice in one window slot"
                        )));
                    }
                    let name: Arc<str> = name.into();
                    last = Some(name.clone());
                    slot.open.insert(name, state);
                    if slot.open.len() == PACK_ROWS {
                        slot.pack();
                    }
                }
                slot.pack();
                Ok(slot)
            }
        }
        d.deserialize_map(Entries)
    }
}

/// Serialized form of [`Windows`]; validated before becoming `Windows`.
#[derive(Deserialize)]
struct WindowsRepr {
    spec: WindowSpec,
    now_ms: i64,
    closed_through_ms: i64,
    slots: Vec<(SlotKey, Slot)>,
    pending: BTreeSet<WindowKey>,
}

/// Event-time window state of all series. See the [module docs](self).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "WindowsRepr")]
pub struct Windows {
    spec: WindowSpec,
    /// Highest clock value seen (`i64::MIN` before the first call).
    now_ms: i64,
    /// Every window with `end <= closed_through_ms` has been passed by
    /// `close_due` (emitted if it had readings).
    closed_through_ms: i64,
    #[serde(serialize_with = "serialize_slots")]
    slots: Slots,
    /// Closed windows with readings not yet emitted.
    pending: BTreeSet<WindowKey>,
    /// Number of windows per series (derived; rebuilt on deserialization).
    #[serde(skip_serializing)]
    series: BTreeMap<Arc<str>, usize>,
    /// Slots changed since the last checkpoint took them (see [`Windows::delta`]).
    #[serde(skip_serializing)]
    changed: ChangedSlots,
}

/// The slots a checkpoint delta must carry: bookkeeping about what was written, not window
/// state, so two `Windows` with the same windows are equal whatever it holds.
#[derive(Debug, Clone, Default)]
struct ChangedSlots(BTreeSet<SlotKey>);

impl PartialEq for ChangedSlots {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// Slots taken for a delta by [`Windows::take_changed`].
#[derive(Debug, Default)]
pub struct TakenSlots(BTreeSet<SlotKey>);

/// What changed in [`Windows`] since the previous checkpoint, borrowed for writing: every
/// scalar, the keys of every slot still held, and the slots that changed in full. Closed
/// windows kept for corrections are most of the state and rarely change, so this is a fraction
/// of the whole (issue 11). Encoded like [`WindowsDelta`].
#[derive(Serialize)]
pub struct WindowsDeltaRef<'a> {
    spec: &'a WindowSpec,
    now_ms: i64,
    closed_through_ms: i64,
    present: Vec<SlotKey>,
    changed: Vec<(&'a SlotKey, &'a Slot)>,
    pending: &'a BTreeSet<WindowKey>,
}

/// A [`WindowsDeltaRef`] read back; [`Windows::apply_delta`] makes it state again.
#[derive(Deserialize)]
pub struct WindowsDelta {
    spec: WindowSpec,
    now_ms: i64,
    closed_through_ms: i64,
    present: Vec<SlotKey>,
    changed: Vec<(SlotKey, Slot)>,
    pending: BTreeSet<WindowKey>,
}

impl TryFrom<WindowsRepr> for Windows {
    type Error = WindowError;

    fn try_from(repr: WindowsRepr) -> Result<Self, WindowError> {
        repr.spec.validate()?;
        let horizon = repr.spec.allowed_lateness_ms + repr.spec.retention_ms;
        let mut slots = Slots::new();
        let mut series: BTreeMap<Arc<str>, usize> = BTreeMap::new();
        for (key, mut windows) in repr.slots {
            if !repr.spec.lengths_secs.contains(&key.window_secs) {
                return Err(WindowError::UnknownLength(key.window_secs));
            }
            let invalid = WindowError::InvalidWindow {
                end_ms: key.end_ms,
                window_secs: key.window_secs,
            };
            if key.end_ms.rem_euclid(len_ms(key.window_secs)) != 0
                || key.end_ms.checked_sub(len_ms(key.window_secs)).is_none()
                || key.end_ms.checked_add(horizon).is_none()
                || windows.is_empty()
            {
                return Err(invalid);
            }
            let closed = key.end_ms <= repr.closed_through_ms;
            if !closed {
                // Readings go here: held in full (see `Slot`).
                windows.unpack_all();
            }
            let inconsistent = |(name, state): (&Arc<str>, &WindowState)| {
                (state.agg.is_empty() || (!closed && state.version != 0)).then(|| {
                    WindowError::InconsistentWindow {
                        series: name.to_string(),
                        end_ms: key.end_ms,
                    }
                })
            };
            if let Some(e) = windows.open.iter().find_map(inconsistent) {
                return Err(e);
            }
            for group in &windows.packed {
                if let Some(e) = group.unpack().find_map(|(n, s)| inconsistent((&n, &s))) {
                    return Err(e);
                }
            }
            windows.intern(&mut series);
            if slots.insert(key, windows).is_some() {
                return Err(WindowError::DuplicateWindow {
                    end_ms: key.end_ms,
                    window_secs: key.window_secs,
                });
            }
        }
        for p in &repr.pending {
            let slot = SlotKey {
                end_ms: p.end_ms,
                window_secs: p.window_secs,
            };
            let exists = slots.get(&slot).is_some_and(|w| {
                w.open.contains_key(p.series.as_str())
                    || w.packed.iter().any(|g| g.contains(&p.series))
            });
            if !exists || p.end_ms > repr.closed_through_ms {
                return Err(WindowError::DanglingCorrection {
                    series: p.series.clone(),
                });
            }
        }
        Ok(Windows {
            spec: repr.spec,
            now_ms: repr.now_ms,
            closed_through_ms: repr.closed_through_ms,
            slots,
            pending: repr.pending,
            series,
            changed: ChangedSlots::default(),
        })
    }
}

impl Windows {
    /// Creates empty window state.
    ///
    /// # Panics
    ///
    /// If the spec is invalid (see [`WindowSpec::validate`]); use
    /// [`Windows::try_new`] to handle that as an error.
    pub fn new(spec: WindowSpec) -> Self {
        match Self::try_new(spec) {
            Ok(w) => w,
            Err(e) => panic!("invalid window spec: {e}"),
        }
    }

    /// Creates empty window state, or returns why the spec is invalid.
    pub fn try_new(spec: WindowSpec) -> Result<Self, WindowError> {
        spec.validate()?;
        Ok(Windows {
            spec,
            now_ms: i64::MIN,
            closed_through_ms: i64::MIN,
            slots: Slots::new(),
            pending: BTreeSet::new(),
            series: BTreeMap::new(),
            changed: ChangedSlots::default(),
        })
    }

    /// Takes the record of the slots changed since the last checkpoint (or since this state
    /// was created or loaded), for a delta: the next delta starts from here. If the delta is
    /// not written after all, [`Windows::restore_changed`] puts them back.
    pub fn take_changed(&mut self) -> TakenSlots {
        TakenSlots(std::mem::take(&mut self.changed.0))
    }

    /// Puts back slots a delta that was not written had taken (the next delta covers them).
    pub fn restore_changed(&mut self, taken: TakenSlots) {
        self.changed.0.extend(taken.0);
    }

    /// The delta of `taken` (from [`Windows::take_changed`]): every scalar, the keys of the
    /// slots held and those of `taken` still held in full.
    pub fn delta<'a>(&'a self, taken: &TakenSlots) -> WindowsDeltaRef<'a> {
        WindowsDeltaRef {
            spec: &self.spec,
            now_ms: self.now_ms,
            closed_through_ms: self.closed_through_ms,
            present: self.slots.keys().copied().collect(),
            changed: self
                .slots
                .iter()
                .filter(|(k, _)| taken.0.contains(k))
                .collect(),
            pending: &self.pending,
        }
    }

    /// Forgets what changed: a whole checkpoint was just taken.
    pub fn mark_written(&mut self) {
        self.changed.0.clear();
    }

    /// The state `delta` describes on top of `self` (the state of the previous checkpoint),
    /// validated as a checkpoint is.
    pub fn apply_delta(mut self, delta: WindowsDelta) -> Result<Windows, WindowError> {
        let mut changed: BTreeMap<SlotKey, Slot> = delta.changed.into_iter().collect();
        let mut slots = Vec::with_capacity(delta.present.len());
        for key in delta.present {
            let windows = match changed.remove(&key) {
                Some(w) => w,
                None => self.slots.remove(&key).ok_or(WindowError::InvalidWindow {
                    end_ms: key.end_ms,
                    window_secs: key.window_secs,
                })?,
            };
            slots.push((key, windows));
        }
        Windows::try_from(WindowsRepr {
            spec: delta.spec,
            now_ms: delta.now_ms,
            closed_through_ms: delta.closed_through_ms,
            slots,
            pending: delta.pending,
        })
    }

    /// The spec this state was created with.
    pub fn spec(&self) -> &WindowSpec {
        &self.spec
    }

    /// Highest clock value seen so far (`i64::MIN` before any call).
    pub fn now_ms(&self) -> i64 {
        self.now_ms
    }

    fn advance(&mut self, now_ms: i64) -> i64 {
        self.now_ms = self.now_ms.max(now_ms);
        self.now_ms
    }

    /// End of the `secs` window containing `time_ms`, if representable
    /// together with its lateness + retention horizon.
    fn window_end(&self, time_ms: i64, secs: u32) -> Option<i64> {
        let len = len_ms(secs);
        let end = time_ms
            .checked_sub(time_ms.rem_euclid(len))?
            .checked_add(len)?;
        end.checked_add(self.spec.allowed_lateness_ms + self.spec.retention_ms)?;
        Some(end)
    }

    /// Adds one reading of `series` at event time `time_ms` to its window of
    /// every configured length, given the current clock `now_ms` (clamped to
    /// be non-decreasing). See [`Applied`] for the outcome.
    pub fn apply(&mut self, series: &str, value: f64, time_ms: i64, now_ms: i64) -> Applied {
        if !value.is_finite() {
            return Applied::Rejected;
        }
        let representable = self
            .spec
            .lengths_secs
            .iter()
            .all(|&secs| self.window_end(time_ms, secs).is_some());
        if !representable {
            return Applied::Rejected;
        }
        let now = self.advance(now_ms);
        let lateness = self.spec.allowed_lateness_ms;
        let retention = self.spec.retention_ms;
        let mut outcome = Applied::Open;
        for i in 0..self.spec.lengths_secs.len() {
            let secs = self.spec.lengths_secs[i];
            let Some(end) = self.window_end(time_ms, secs) else {
                continue; // checked above
            };
            let close_at = end + lateness;
            if now >= close_at + retention {
                outcome = Applied::TooLate;
                continue;
            }
            if now >= close_at && outcome == Applied::Open {
                outcome = Applied::Correction;
            }
            let slot = SlotKey {
                end_ms: end,
                window_secs: secs,
            };
            self.changed.0.insert(slot);
            let windows = self.slots.entry(slot).or_default();
            if windows.get_mut(series).is_none() {
                let name = match self.series.get_key_value(series) {
                    Some((name, _)) => name.clone(),
                    None => Arc::from(series),
                };
                *self.series.entry(name.clone()).or_insert(0) += 1;
                windows.open.insert(
                    name,
                    WindowState {
                        agg: Aggregate::new(),
                        version: 0,
                    },
                );
            }
            let state = windows
                .open
                .get_mut(series)
                .expect("just inserted or unpacked");
            state.agg.add(value, time_ms);
            if end <= self.closed_through_ms {
                // Already passed by close_due: needs a (re-)emission.
                self.pending.insert(WindowKey {
                    end_ms: end,
                    window_secs: secs,
                    series: series.to_owned(),
                });
            }
        }
        outcome
    }

    /// Emits (appends to `out`) every window whose `end + allowed_lateness <=
    /// now_ms` that was not emitted yet (version 1), plus every closed window
    /// that received corrections since its last emission (next version, the
    /// complete aggregate). Then drops windows with `end + lateness +
    /// retention <= now_ms`. Output order: by `(window_end, window_secs,
    /// series)`. `now_ms` is clamped to be non-decreasing.
    ///
    /// `out` takes them one at a time, so a caller can pass them on without holding all of a
    /// close at once (a `Vec` collects them).
    pub fn close_due(&mut self, now_ms: i64, out: &mut impl Extend<WindowAggregate>) {
        let now = self.advance(now_ms);
        let cutoff = now.saturating_sub(self.spec.allowed_lateness_ms);

        // Slots emitted from, packed again at the end.
        let mut emitted = BTreeSet::new();
        // Corrections first: they all end at or before closed_through_ms,
        // while newly closed windows end after it, so this keeps the order.
        for key in std::mem::take(&mut self.pending) {
            let slot = SlotKey {
                end_ms: key.end_ms,
                window_secs: key.window_secs,
            };
            emitted.insert(slot);
            if let Some(state) = self
                .slots
                .get_mut(&slot)
                .and_then(|w| w.get_mut(&key.series))
            {
                self.changed.0.insert(slot);
                state.version += 1;
                out.extend(Some(WindowAggregate {
                    window_start_ms: key.end_ms - len_ms(key.window_secs),
                    window_secs: key.window_secs,
                    version: state.version,
                    agg: state.agg.clone(),
                    series: key.series,
                }));
            }
        }

        if cutoff > self.closed_through_ms {
            let range = (
                Bound::Excluded(SlotKey {
                    end_ms: self.closed_through_ms,
                    window_secs: u32::MAX,
                }),
                Bound::Included(SlotKey {
                    end_ms: cutoff,
                    window_secs: u32::MAX,
                }),
            );
            for (slot, windows) in self.slots.range_mut(range) {
                self.changed.0.insert(*slot);
                emitted.insert(*slot);
                debug_assert!(windows.packed.is_empty(), "an open slot is never packed");
                for (series, state) in windows.open.iter_mut() {
                    state.version += 1;
                    out.extend(Some(WindowAggregate {
                        series: series.to_string(),
                        window_start_ms: slot.end_ms - len_ms(slot.window_secs),
                        window_secs: slot.window_secs,
                        version: state.version,
                        agg: state.agg.clone(),
                    }));
                }
            }
            self.closed_through_ms = cutoff;
        }

        let still_open = self.still_open();
        for (_, windows) in self.slots.range_mut(still_open) {
            windows.settle();
        }

        let drop_through = cutoff.saturating_sub(self.spec.retention_ms);
        while let Some(entry) = self.slots.first_entry() {
            if entry.key().end_ms > drop_through {
                break;
            }
            for series in entry.remove().names() {
                if let Some(n) = self.series.get_mut(&**series) {
                    *n -= 1;
                    if *n == 0 {
                        self.series.remove(&**series);
                    }
                }
            }
        }
        for slot in emitted {
            if let Some(windows) = self.slots.get_mut(&slot) {
                windows.pack();
            }
        }
    }

    /// The slots not yet passed by `close_due`: those ending after `closed_through_ms`.
    fn still_open(&self) -> (Bound<SlotKey>, Bound<SlotKey>) {
        (
            Bound::Excluded(SlotKey {
                end_ms: self.closed_through_ms,
                window_secs: u32::MAX,
            }),
            Bound::Unbounded,
        )
    }

    /// Appends the current aggregates of all windows not yet passed by
    /// `close_due`, with `version: 0` (provisional — must not be forwarded
    /// as a final result). Does not change any state or version.
    pub fn snapshot_open(&self, out: &mut Vec<WindowAggregate>) {
        for (slot, windows) in self.slots.range(self.still_open()) {
            debug_assert!(windows.packed.is_empty(), "an open slot is never packed");
            for (series, state) in &windows.open {
                out.push(WindowAggregate {
                    series: series.to_string(),
                    window_start_ms: slot.end_ms - len_ms(slot.window_secs),
                    window_secs: slot.window_secs,
                    version: 0,
                    agg: state.agg.clone(),
                });
            }
        }
    }

    fn count_windows(&self, range: (Bound<SlotKey>, Bound<SlotKey>)) -> usize {
        self.slots.range(range).map(|(_, w)| w.len()).sum()
    }

    /// Number of (series, window) pairs not yet passed by `close_due`.
    pub fn open_windows(&self) -> usize {
        self.count_windows((
            Bound::Excluded(SlotKey {
                end_ms: self.closed_through_ms,
                window_secs: u32::MAX,
            }),
            Bound::Unbounded,
        ))
    }

    /// Number of closed (series, window) pairs kept for corrections.
    pub fn retained_windows(&self) -> usize {
        self.count_windows((
            Bound::Unbounded,
            Bound::Included(SlotKey {
                end_ms: self.closed_through_ms,
                window_secs: u32::MAX,
            }),
        ))
    }

    /// Number of closed windows with corrections awaiting emission.
    pub fn pending_corrections(&self) -> usize {
        self.pending.len()
    }

    /// Number of distinct series with at least one open or retained window.
    pub fn series_count(&self) -> usize {
        self.series.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec(lengths: &[u32], lateness: i64, retention: i64) -> WindowSpec {
        WindowSpec {
            lengths_secs: lengths.to_vec(),
            allowed_lateness_ms: lateness,
            retention_ms: retention,
        }
    }

    fn open_starts(w: &Windows) -> Vec<(u32, i64)> {
        let mut out = Vec::new();
        w.snapshot_open(&mut out);
        out.iter()
            .map(|a| (a.window_secs, a.window_start_ms))
            .collect()
    }

    fn close(w: &mut Windows, now: i64) -> Vec<WindowAggregate> {
        let mut out = Vec::new();
        w.close_due(now, &mut out);
        out
    }

    #[test]
    fn ten_and_sixty_second_windows_align_to_the_epoch() {
        let mut w = Windows::new(spec(&[10, 60], 0, 0));
        w.apply("t", 1.0, 65_432, 0);
        let mut starts = open_starts(&w);
        starts.sort_unstable();
        assert_eq!(starts, vec![(10, 60_000), (60, 60_000)]);

        let mut w = Windows::new(spec(&[10, 60], 0, 0));
        w.apply("t", 1.0, 179_999, 0);
        let mut starts = open_starts(&w);
        starts.sort_unstable();
        assert_eq!(starts, vec![(10, 170_000), (60, 120_000)]);
    }

    #[test]
    fn negative_event_times_align_downwards() {
        let mut w = Windows::new(spec(&[10, 60], 0, 0));
        w.apply("t", 1.0, -1, i64::MIN);
        let mut starts = open_starts(&w);
        starts.sort_unstable();
        assert_eq!(starts, vec![(10, -10_000), (60, -60_000)]);
    }

    #[test]
    fn reading_exactly_at_a_boundary_belongs_to_the_next_window() {
        let mut w = Windows::new(spec(&[10, 60], 0, 0));
        w.apply("t", 1.0, 60_000, 0);
        let mut starts = open_starts(&w);
        starts.sort_unstable();
        assert_eq!(starts, vec![(10, 60_000), (60, 60_000)]);
        w.apply("t", 1.0, 59_999, 0);
        assert_eq!(w.open_windows(), 4);
    }

    #[test]
    fn window_closes_only_after_its_allowed_lateness() {
        let mut w = Windows::new(spec(&[10], 2_000, 30_000));
        assert_eq!(w.apply("t", 1.0, 5_000, 5_000), Applied::Open);
        assert!(close(&mut w, 11_999).is_empty());
        // Within lateness: still part of version 1.
        assert_eq!(w.apply("t", 2.0, 9_000, 11_999), Applied::Open);
        let out = close(&mut w, 12_000);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].window_start_ms, 0);
        assert_eq!(out[0].version, 1);
        assert_eq!(out[0].agg.count(), 2);
        assert!(close(&mut w, 12_500).is_empty(), "emitted only once");
    }

    #[test]
    fn late_reading_for_a_retained_window_is_a_correction_emitted_with_the_next_version() {
        let mut w = Windows::new(spec(&[10], 2_000, 30_000));
        w.apply("t", 1.0, 1_000, 1_000);
        w.apply("t", 2.0, 2_000, 2_000);
        assert_eq!(close(&mut w, 12_000)[0].version, 1);
        assert_eq!(w.apply("t", 10.0, 3_000, 13_000), Applied::Correction);
        assert_eq!(w.pending_corrections(), 1);
        let out = close(&mut w, 13_000);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].version, 2);
        // Complete aggregate, not a delta.
        assert_eq!(out[0].agg.count(), 3);
        assert_eq!(out[0].agg.sum(), 13.0);
        assert!(close(&mut w, 14_000).is_empty());
        assert_eq!(w.apply("t", 5.0, 4_000, 20_000), Applied::Correction);
        let out = close(&mut w, 20_000);
        assert_eq!((out[0].version, out[0].agg.count()), (3, 4));
    }

    #[test]
    fn late_first_reading_of_a_closed_window_is_emitted_as_version_one() {
        let mut w = Windows::new(spec(&[10], 0, 60_000));
        w.apply("a", 1.0, 1_000, 1_000);
        close(&mut w, 50_000);
        // Series "b" never had a reading in [0, 10 s).
        assert_eq!(w.apply("b", 7.0, 5_000, 50_000), Applied::Correction);
        let out = close(&mut w, 50_000);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].series.as_str(), out[0].version), ("b", 1));
    }

    #[test]
    fn reading_after_retention_is_too_late_and_ignored() {
        let mut w = Windows::new(spec(&[10], 2_000, 30_000));
        w.apply("t", 1.0, 1_000, 1_000);
        assert_eq!(close(&mut w, 12_000).len(), 1);
        // Window [0, 10 s) is dropped at 10 s + 2 s + 30 s.
        assert_eq!(w.apply("t", 5.0, 3_000, 41_999), Applied::Correction);
        assert_eq!(close(&mut w, 41_999)[0].version, 2);
        assert_eq!(w.apply("t", 5.0, 3_000, 42_000), Applied::TooLate);
        assert!(close(&mut w, 42_000).is_empty());
        assert_eq!(w.open_windows() + w.retained_windows(), 0);
        assert_eq!(w.series_count(), 0);
    }

    #[test]
    fn too_late_for_one_length_still_counts_for_a_longer_retained_one() {
        let mut w = Windows::new(spec(&[10, 60], 0, 20_000));
        w.apply("t", 1.0, 5_000, 5_000);
        assert_eq!(close(&mut w, 60_000).len(), 2);
        // 10 s window [0,10 s) was dropped at 30 s; 60 s window is retained
        // until 80 s.
        assert_eq!(w.apply("t", 3.0, 6_000, 61_000), Applied::TooLate);
        let out = close(&mut w, 61_000);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].window_secs, out[0].version), (60, 2));
        assert_eq!(out[0].agg.count(), 2);
    }

    #[test]
    fn stale_clock_cannot_reopen_a_dropped_window() {
        let mut w = Windows::new(spec(&[10], 0, 0));
        w.apply("t", 1.0, 1_000, 1_000);
        assert_eq!(close(&mut w, 20_000).len(), 1);
        assert_eq!(w.apply("t", 1.0, 1_000, 1_000), Applied::TooLate);
        assert!(close(&mut w, 1_000).is_empty());
        assert_eq!(w.now_ms(), 20_000);
    }

    #[test]
    fn non_finite_values_and_unrepresentable_times_are_rejected() {
        let mut w = Windows::new(spec(&[10], 0, 0));
        assert_eq!(w.apply("t", f64::NAN, 0, 0), Applied::Rejected);
        assert_eq!(w.apply("t", f64::INFINITY, 0, 0), Applied::Rejected);
        assert_eq!(w.apply("t", 1.0, i64::MAX, 0), Applied::Rejected);
        assert_eq!(w.apply("t", 1.0, i64::MIN, 0), Applied::Rejected);
        assert_eq!(w.open_windows(), 0);
        assert_eq!(w.series_count(), 0);
    }

    #[test]
    fn emissions_are_ordered_by_window_end_then_length_then_series() {
        let mut w = Windows::new(spec(&[60, 10], 0, 0));
        for (s, t) in [("b", 55_000), ("a", 55_000), ("c", 5_000), ("a", 65_000)] {
            w.apply(s, 1.0, t, 0);
        }
        let out = close(&mut w, 200_000);
        let keys: Vec<(i64, u32, &str)> = out
            .iter()
            .map(|a| (a.window_end_ms(), a.window_secs, a.series.as_str()))
            .collect();
        assert_eq!(
            keys,
            vec![
                (10_000, 10, "c"),
                (60_000, 10, "a"),
                (60_000, 10, "b"),
                (60_000, 60, "a"),
                (60_000, 60, "b"),
                (60_000, 60, "c"),
                (70_000, 10, "a"),
                (120_000, 60, "a"),
            ]
        );
    }

    #[test]
    fn invalid_specs_are_rejected() {
        assert_eq!(
            Windows::try_new(spec(&[], 0, 0)).unwrap_err(),
            WindowError::NoLengths
        );
        assert_eq!(
            Windows::try_new(spec(&[0], 0, 0)).unwrap_err(),
            WindowError::ZeroLength
        );
        assert_eq!(
            Windows::try_new(spec(&[10, 10], 0, 0)).unwrap_err(),
            WindowError::DuplicateLength(10)
        );
        assert_eq!(
            Windows::try_new(spec(&[10], -1, 0)).unwrap_err(),
            WindowError::NegativeLateness(-1)
        );
        assert_eq!(
            Windows::try_new(spec(&[10], 0, -1)).unwrap_err(),
            WindowError::NegativeRetention(-1)
        );
    }

    #[test]
    fn checkpoint_with_unknown_window_length_is_rejected() {
        let mut w = Windows::new(spec(&[10], 0, 1_000));
        w.apply("t", 1.0, 0, 0);
        let mut bytes = postcard::to_stdvec(&w).unwrap();
        let other = Windows::new(spec(&[20], 0, 1_000));
        // Re-encode with a different spec prefix: serialize the spec alone.
        let spec_len = postcard::to_stdvec(&w.spec).unwrap().len();
        let mut patched = postcard::to_stdvec(&other.spec).unwrap();
        patched.extend_from_slice(&bytes.split_off(spec_len));
        assert_eq!(
            postcard::from_bytes::<Windows>(&patched).unwrap_err(),
            postcard::Error::SerdeDeCustom
        );
    }

    /// Prints the postcard size of typical emitted window aggregates.
    #[test]
    fn typical_window_aggregates_at_one_hertz_encode_compactly() {
        let mut w = Windows::new(spec(&[10, 60], 2_000, 60_000));
        let t0 = 1_764_000_000_000i64; // aligned to 60 s
        for i in 0..60 {
            let v = 21.5 + 0.5 * ((i as f64) * 0.7).sin() + 0.01 * i as f64;
            w.apply(
                "site1/boiler/temperature",
                v,
                t0 + i * 1_000,
                t0 + i * 1_000,
            );
        }
        let out = close(&mut w, t0 + 62_000);
        for secs in [10u32, 60] {
            let agg = out.iter().find(|a| a.window_secs == secs).unwrap();
            let bytes = postcard::to_stdvec(agg).unwrap();
            println!(
                "WindowAggregate {secs} s @ 1 Hz ({} readings): {} bytes postcard (Aggregate alone {})",
                agg.agg.count(),
                bytes.len(),
                postcard::to_stdvec(&agg.agg).unwrap().len()
            );
            assert!(bytes.len() < 250);
        }
        let checkpoint = postcard::to_stdvec(&w).unwrap();
        println!(
            "Windows checkpoint with {} retained windows: {} bytes",
            w.retained_windows(),
            checkpoint.len()
        );
    }

    // ----- property tests against a naive reference -----

    #[derive(Debug, Clone)]
    enum Op {
        /// Reading at `now + offset_ms`, applied with clock `now - clock_lag_ms`.
        Apply {
            series: u8,
            value: f64,
            offset_ms: i64,
            clock_lag_ms: i64,
        },
        /// Advance the clock, then `close_due(now)`.
        Close { advance_ms: i64 },
    }

    /// Times are multiples of 250 ms so that readings, clocks and window
    /// boundaries coincide often (boundary conditions get exercised).
    const TICK: i64 = 250;

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (
                0u8..3,
                -100.0f64..100.0,
                -360i64..20,
                prop_oneof![3 => Just(0i64), 1 => 0i64..20],
            )
                .prop_map(|(series, value, offset, lag)| Op::Apply {
                    series,
                    value,
                    offset_ms: offset * TICK,
                    clock_lag_ms: lag * TICK,
                }),
            // The same reading again: exact duplicates.
            1 => (0u8..3).prop_map(|series| Op::Apply {
                series,
                value: 42.0,
                offset_ms: -7_000,
                clock_lag_ms: 0,
            }),
            2 => (0i64..60).prop_map(|advance| Op::Close { advance_ms: advance * TICK }),
        ]
    }

    fn spec_strategy() -> impl Strategy<Value = WindowSpec> {
        (
            prop_oneof![
                Just(vec![10u32, 60]),
                Just(vec![10u32]),
                Just(vec![60u32, 10, 1]),
            ],
            0i64..20,
            0i64..160,
        )
            .prop_map(|(lengths_secs, lateness, retention)| WindowSpec {
                lengths_secs,
                allowed_lateness_ms: lateness * TICK,
                retention_ms: retention * TICK,
            })
    }

    const SERIES: [&str; 3] = ["a", "b", "c"];
    const START_MS: i64 = -30_000; // crosses the epoch: negative times too

    /// Runs the ops, optionally round-tripping the state through postcard
    /// before the ops whose index is in `checkpoints`. Returns the outcome of
    /// every apply and the output of every close_due (including a final
    /// close far in the future).
    fn run(
        spec: &WindowSpec,
        ops: &[Op],
        checkpoints: &[usize],
    ) -> (Vec<Applied>, Vec<Vec<WindowAggregate>>) {
        let mut w = Windows::new(spec.clone());
        let mut now = START_MS;
        let mut applied = Vec::new();
        let mut outputs = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            if checkpoints.contains(&i) {
                let bytes = postcard::to_stdvec(&w).unwrap();
                let restored: Windows = postcard::from_bytes(&bytes).unwrap();
                assert_eq!(restored, w);
                w = restored;
            }
            match *op {
                Op::Apply {
                    series,
                    value,
                    offset_ms,
                    clock_lag_ms,
                } => applied.push(w.apply(
                    SERIES[series as usize],
                    value,
                    now + offset_ms,
                    now - clock_lag_ms,
                )),
                Op::Close { advance_ms } => {
                    now += advance_ms;
                    let mut out = Vec::new();
                    w.close_due(now, &mut out);
                    outputs.push(out);
                    // Memory stays bounded: nothing past its retention is kept.
                    let horizon = spec.allowed_lateness_ms + spec.retention_ms;
                    assert!(w.slots.keys().all(|k| k.end_ms + horizon > w.now_ms()));
                }
            }
        }
        let mut out = Vec::new();
        w.close_due(i64::MAX / 2, &mut out);
        outputs.push(out);
        assert_eq!(w.open_windows() + w.retained_windows(), 0);
        assert_eq!(w.series_count(), 0);
        (applied, outputs)
    }

    type RefKey = (String, i64, u32); // (series, window_start_ms, window_secs)
    type Accepted = BTreeMap<RefKey, Vec<(f64, i64)>>;
    /// Per window: last emitted version and the reading count it carried.
    type Emitted = BTreeMap<RefKey, (u32, usize)>;

    /// Checks one `close_due` output against the reference state.
    fn check_output(
        lat: i64,
        out: &[WindowAggregate],
        clock: i64,
        accepted: &Accepted,
        last_version: &mut Emitted,
    ) -> Result<(), TestCaseError> {
        for pair in out.windows(2) {
            let a = (
                pair[0].window_end_ms(),
                pair[0].window_secs,
                &pair[0].series,
            );
            let b = (
                pair[1].window_end_ms(),
                pair[1].window_secs,
                &pair[1].series,
            );
            prop_assert!(a < b, "order/uniqueness violated: {:?} then {:?}", a, b);
        }
        for e in out {
            let key = (e.series.clone(), e.window_start_ms, e.window_secs);
            prop_assert!(clock >= e.window_end_ms() + lat, "emitted before closing");
            let readings = accepted.get(&key).expect("emitted window has readings");
            let prev = last_version.get(&key).map_or(0, |v| v.0);
            prop_assert_eq!(e.version, prev + 1, "versions have no gaps");
            // Each emission is the complete aggregate so far.
            prop_assert_eq!(e.agg.count(), readings.len() as u64);
            let sum: f64 = readings.iter().map(|r| r.0).sum();
            let min = readings.iter().map(|r| r.0).fold(f64::INFINITY, f64::min);
            let max = readings
                .iter()
                .map(|r| r.0)
                .fold(f64::NEG_INFINITY, f64::max);
            prop_assert!((e.agg.sum() - sum).abs() <= 1e-9 * sum.abs().max(1.0));
            prop_assert_eq!(e.agg.min(), min);
            prop_assert_eq!(e.agg.max(), max);
            last_version.insert(key, (e.version, readings.len()));
        }
        // Every closed window's latest emission is complete.
        for (key, readings) in accepted {
            let end = key.1 + len_ms(key.2);
            if clock >= end + lat {
                prop_assert_eq!(
                    last_version.get(key).map(|v| v.1),
                    Some(readings.len()),
                    "closed window {:?} not (re-)emitted completely",
                    key
                );
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn highest_emitted_version_equals_the_reference_over_accepted_readings(
            spec in spec_strategy(),
            ops in prop::collection::vec(op(), 0..150),
        ) {
            let (applied, outputs) = run(&spec, &ops, &[]);
            let lat = spec.allowed_lateness_ms;
            let ret = spec.retention_ms;

            // Reference: replay with a naive model and check every emission.
            let mut accepted = Accepted::new();
            let mut last_version = Emitted::new();
            let mut clock = i64::MIN;
            let mut now = START_MS;
            let mut applied_iter = applied.iter();
            let mut outputs_iter = outputs.iter();
            for op in &ops {
                match *op {
                    Op::Apply { series, value, offset_ms, clock_lag_ms } => {
                        let time = now + offset_ms;
                        clock = clock.max(now - clock_lag_ms);
                        let mut expected = Applied::Open;
                        for &secs in &spec.lengths_secs {
                            let len = len_ms(secs);
                            let start = time.div_euclid(len) * len;
                            let end = start + len;
                            if clock >= end + lat + ret {
                                expected = Applied::TooLate;
                                continue;
                            }
                            if clock >= end + lat && expected == Applied::Open {
                                expected = Applied::Correction;
                            }
                            accepted
                                .entry((SERIES[series as usize].to_owned(), start, secs))
                                .or_default()
                                .push((value, time));
                        }
                        prop_assert_eq!(*applied_iter.next().unwrap(), expected);
                    }
                    Op::Close { advance_ms } => {
                        now += advance_ms;
                        clock = clock.max(now);
                        check_output(lat, outputs_iter.next().unwrap(), clock, &accepted, &mut last_version)?;
                    }
                }
            }
            check_output(lat, outputs_iter.next().unwrap(), i64::MAX / 2, &accepted, &mut last_version)?;

            // Highest version of every window equals the full reference.
            prop_assert_eq!(last_version.len(), accepted.len());
            let mut highest: BTreeMap<RefKey, &WindowAggregate> = BTreeMap::new();
            for e in outputs.iter().flatten() {
                highest.insert((e.series.clone(), e.window_start_ms, e.window_secs), e);
            }
            for (key, readings) in &accepted {
                let e = highest[key];
                let mut reference = Aggregate::new();
                for &(v, t) in readings {
                    reference.add(v, t);
                }
                prop_assert_eq!(&e.agg, &reference);
            }
        }

        #[test]
        fn checkpoint_round_trips_mid_stream_give_identical_output(
            spec in spec_strategy(),
            ops in prop::collection::vec(op(), 0..150),
            checkpoints in prop::collection::vec(0usize..150, 1..4),
        ) {
            let uninterrupted = run(&spec, &ops, &[]);
            let replayed = run(&spec, &ops, &[]);
            prop_assert_eq!(&replayed, &uninterrupted, "replay is deterministic");
            let restored = run(&spec, &ops, &checkpoints);
            prop_assert_eq!(&restored, &uninterrupted);
        }

        /// A whole checkpoint followed by deltas taken at any points, each encoded and
        /// decoded, rebuilds exactly the live state at every delta (and the live state goes
        /// on as if nothing had been taken).
        #[test]
        fn a_whole_checkpoint_and_its_deltas_rebuild_the_state_exactly(
            spec in spec_strategy(),
            ops in prop::collection::vec(op(), 0..150),
            base_at in 0usize..150,
            deltas in prop::collection::btree_set(0usize..151, 0..8),
        ) {
            let mut w = Windows::new(spec.clone());
            let mut rebuilt: Option<Windows> = None;
            let mut now = START_MS;
            let mut out = Vec::new();
            for i in 0..=ops.len() {
                if i == base_at.min(ops.len()) && rebuilt.is_none() {
                    let bytes = postcard::to_stdvec(&w).unwrap();
                    w.mark_written();
                    rebuilt = Some(postcard::from_bytes(&bytes).unwrap());
                } else if deltas.contains(&i) && let Some(base) = rebuilt.take() {
                    let taken = w.take_changed();
                    let bytes = postcard::to_stdvec(&w.delta(&taken)).unwrap();
                    let d: WindowsDelta = postcard::from_bytes(&bytes).unwrap();
                    let next = base.apply_delta(d).unwrap();
                    prop_assert_eq!(&next, &w, "after op {}", i);
                    rebuilt = Some(next);
                }
                let Some(op) = ops.get(i) else { break };
                match *op {
                    Op::Apply { series, value, offset_ms, clock_lag_ms } => {
                        w.apply(SERIES[series as usize], value, now + offset_ms, now - clock_lag_ms);
                    }
                    Op::Close { advance_ms } => {
                        now += advance_ms;
                        w.close_due(now, &mut out);
                    }
                }
            }
            // A final delta always matches too.
            if let Some(base) = rebuilt {
                let taken = w.take_changed();
                let bytes = postcard::to_stdvec(&w.delta(&taken)).unwrap();
                let d: WindowsDelta = postcard::from_bytes(&bytes).unwrap();
                prop_assert_eq!(&base.apply_delta(d).unwrap(), &w);
            }
        }
    }

    #[test]
    fn a_delta_on_a_base_that_lacks_one_of_its_slots_is_refused() {
        let mut w = Windows::new(spec(&[10], 0, 60_000));
        w.apply("a", 1.0, 5_000, 5_000);
        let base = Windows::new(spec(&[10], 0, 60_000)); // not the state the delta follows
        w.mark_written();
        let taken = w.take_changed();
        let bytes = postcard::to_stdvec(&w.delta(&taken)).unwrap();
        let d: WindowsDelta = postcard::from_bytes(&bytes).unwrap();
        assert!(base.apply_delta(d).is_err());
    }

    #[test]
    fn an_open_slot_is_compacted_once_series_stop_arriving_and_keeps_every_window() {
        let mut w = Windows::new(spec(&[10], 5_000, 0));
        let n = 2 * PACK_ROWS + 5;
        // Every series arrives in an order unrelated to its name (7 is coprime with n).
        assert_ne!(n % 7, 0);
        let names: Vec<String> = (0..n).map(|i| format!("s{:04}", (i * 7) % n)).collect();
        let key = SlotKey {
            end_ms: 10_000,
            window_secs: 10,
        };
        for (i, name) in names.iter().enumerate() {
            w.apply(name, 1.0, 1_000 + i as i64, 1_000);
        }
        close(&mut w, 2_000);
        assert_eq!(
            w.slots[&key].compacted, 0,
            "the slot grew since the last look"
        );
        close(&mut w, 2_250);
        assert_eq!(w.slots[&key].compacted, n, "no new series: compacted");
        // Readings into the compacted windows, and a series arriving after the compaction.
        for name in &names {
            w.apply(name, 3.0, 5_000, 5_000);
        }
        w.apply("late-comer", 2.0, 6_000, 6_000);
        let out = close(&mut w, 15_000);
        assert_eq!(out.len(), n + 1);
        assert!(out.windows(2).all(|p| p[0].series < p[1].series), "sorted");
        for a in &out {
            let (count, mean) = if a.series == "late-comer" {
                (1, 2.0)
            } else {
                (2, 2.0)
            };
            assert_eq!((a.agg.count(), a.agg.mean()), (count, mean), "{}", a.series);
        }
    }

    #[test]
    fn closed_windows_are_packed_and_a_correction_unpacks_only_its_group() {
        let mut w = Windows::new(spec(&[10], 0, 60_000));
        let names: Vec<String> = (0..3 * PACK_ROWS + 5).map(|i| format!("s{i:04}")).collect();
        for (i, n) in names.iter().enumerate() {
            w.apply(n, i as f64 / 10.0, 1_000 + i as i64, 1_000);
        }
        let first = close(&mut w, 10_000);
        assert_eq!(first.len(), names.len());
        let slot = &w.slots[&SlotKey {
            end_ms: 10_000,
            window_secs: 10,
        }];
        assert!(slot.open.is_empty(), "a closed slot is held packed");
        assert_eq!(slot.packed.len(), 4);
        assert_eq!(w.retained_windows(), names.len());

        // A late reading for one series: only its group is unpacked, then packed again.
        let late = &names[PACK_ROWS + 7];
        assert_eq!(w.apply(late, 99.5, 9_999, 10_000), Applied::Correction);
        let slot = &w.slots[&SlotKey {
            end_ms: 10_000,
            window_secs: 10,
        }];
        assert_eq!(slot.open.len(), PACK_ROWS);
        assert_eq!(slot.packed.len(), 3);
        // A checkpoint taken now (partly packed) continues exactly like the original.
        let mut restored: Windows =
            postcard::from_bytes(&postcard::to_stdvec(&w).unwrap()).unwrap();
        assert_eq!(restored, w);
        let correction = close(&mut w, 11_000);
        assert_eq!(close(&mut restored, 11_000), correction);
        assert_eq!(correction.len(), 1);
        let c = &correction[0];
        assert_eq!((c.series.as_str(), c.version), (late.as_str(), 2));
        let mut expected = first
            .iter()
            .find(|a| &a.series == late)
            .unwrap()
            .agg
            .clone();
        expected.add(99.5, 9_999);
        assert_eq!(c.agg, expected);
        assert!(
            w.slots.values().all(|s| s.open.is_empty()),
            "packed again after emission"
        );

        // Every packed window comes back bit for bit: a checkpoint of the packed state holds
        // exactly the aggregates that were emitted.
        let mut emitted: BTreeMap<&str, &Aggregate> =
            first.iter().map(|a| (a.series.as_str(), &a.agg)).collect();
        emitted.insert(late, &c.agg);
        let slot = &w.slots[&SlotKey {
            end_ms: 10_000,
            window_secs: 10,
        }];
        let held = slot.entries();
        assert_eq!(held.len(), names.len());
        for (name, state) in &held {
            assert_eq!(&state.agg, emitted[&**name], "{name}");
        }
        // Names are shared with the series index, not copied per window.
        let (name, _) = w.series.get_key_value("s0001").unwrap();
        assert!(Arc::strong_count(name) >= 2);
    }
}
