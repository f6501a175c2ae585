//! The gateway's clocks. Two questions are kept apart because the wall clock answers only one
//! of them well:
//!
//! - **How long?** Timers, idle detection, the latency budget and the watchdog measure
//!   intervals on the monotonic clock ([`Instant`], [`mono_ms`]), which no NTP step, `date -s`
//!   or boot without a battery clock moves.
//! - **When?** Arrival times of readings (their event time when the payload carries none) come
//!   from [`GatewayClock::arrival_ms`]: the wall clock, but never going backwards. A step
//!   forward (NTP synchronising after a boot with an old time) is followed at once: the data's
//!   windows skip ahead and nothing is late. A step back is *not* followed: arrival times go on
//!   from the monotonic clock until the wall clock catches up, so readings after the step are
//!   not judged older than the ones before it (which would drop them as too late). Each step is
//!   logged once, counted and shown in `/status`.
//!
//! Whether the wall clock can be believed at all is a third question, answered by the kernel's
//! NTP state (`adjtimex`: `STA_UNSYNC` clear once chrony, ntpd or systemd-timesyncd has
//! synchronised it) or by `[clock] synchronised`. Only a synchronised clock may reject a sensor's
//! timestamp as "from the future"; an unsynchronised one accepts it and is reported as suspect.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, now, by the wall clock; 0 if the clock is before 1970 (a
/// gateway without a battery clock can boot there), saturating far in the future. For labels
/// (file names, report times), never for intervals.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Whole seconds since the Unix epoch, now (0 before 1970).
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Milliseconds on the monotonic clock since this process first asked: for intervals stored in
/// atomics (progress stamps, "the last one at"), where an [`Instant`] does not fit.
pub fn mono_ms() -> i64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_millis() as i64
}

/// `[clock]`: whether the gateway's wall clock may be trusted.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClockConfig {
    /// `"auto"` (default): ask the kernel whether NTP has synchronised the clock; `"yes"`: trust
    /// it (a GPS or PTP disciplined clock that does not report to the kernel); `"no"`: never
    /// trust it (no time source at all).
    #[serde(default)]
    pub synchronised: Synchronised,
}

/// `[clock] synchronised`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Synchronised {
    /// The kernel's NTP state decides (`adjtimex`).
    #[default]
    Auto,
    /// Always trusted.
    Yes,
    /// Never trusted.
    No,
}

/// Where the clock readings come from; a fake one in tests steps the wall clock at will.
pub trait ClockSource: Send + Sync {
    /// Wall clock, ms since the Unix epoch.
    fn wall_ms(&self) -> i64;
    /// Monotonic clock, ms from any fixed origin.
    fn mono_ms(&self) -> i64;
    /// Whether the kernel reports the wall clock synchronised; `None` when it cannot tell.
    fn kernel_synchronised(&self) -> Option<bool>;
}

/// The machine's clocks.
pub struct SystemClocks;

impl ClockSource for SystemClocks {
    fn wall_ms(&self) -> i64 {
        now_ms()
    }
    fn mono_ms(&self) -> i64 {
        mono_ms()
    }
    fn kernel_synchronised(&self) -> Option<bool> {
        kernel_synchronised()
    }
}

/// The kernel's NTP state: `adjtimex` with no modes only reads it (no privilege needed).
/// `STA_UNSYNC` is set at boot and cleared by the time daemon once it has synchronised.
#[cfg(target_os = "linux")]
pub fn kernel_synchronised() -> Option<bool> {
    // SAFETY: a zeroed `timex` with `modes = 0` asks for the state and changes nothing; the
    // kernel only writes into the struct we own.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    let state = unsafe { libc::adjtimex(&mut tx) };
    if state < 0 {
        return None;
    }
    Some(state != libc::TIME_ERROR && tx.status & libc::STA_UNSYNC == 0)
}

/// Other systems: unknown, so the clock is not trusted unless configured.
#[cfg(not(target_os = "linux"))]
pub fn kernel_synchronised() -> Option<bool> {
    None
}

/// A step's size for people: to the nearest second once it is a second or more.
pub fn human(ms: u64) -> String {
    let d = if ms >= 1000 {
        std::time::Duration::from_secs((ms + 500) / 1000)
    } else {
        std::time::Duration::from_millis(ms)
    };
    humantime::format_duration(d).to_string()
}

/// A signed offset for people: "1h", "-1h 30m".
pub fn signed_human(ms: i64) -> String {
    let h = human(ms.unsigned_abs());
    if ms < 0 { format!("-{h}") } else { h }
}

/// Differences between wall and monotonic time up to this much are slewing and scheduling
/// noise, not steps (chrony's default `makestep` threshold is 1 s).
pub const STEP_TOLERANCE_MS: i64 = 1000;

/// How often the kernel's NTP state is asked again.
const SYNC_RECHECK_MS: i64 = 1000;

/// One step of the wall clock as seen by [`GatewayClock`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockStep {
    /// Counts steps since start (1 = the first).
    pub seq: u64,
    /// The arrival time at which the step was noticed (after it, for a forward step).
    pub at_ms: i64,
    /// Signed size: positive forward, negative back.
    pub delta_ms: i64,
}

struct Anchor {
    /// Wall and monotonic time of the last reading that agreed with the wall clock.
    wall: i64,
    mono: i64,
    /// The last arrival time handed out: arrival times never decrease.
    last: i64,
    /// Behind the held time after a step back: how far, when noticed (0 when not held).
    held_by: i64,
    /// When the NTP state was last asked (monotonic ms).
    sync_checked: i64,
}

/// The gateway's notion of "now" for arrival times, and what it knows about its wall clock:
/// synchronised or not, steps seen. Shared by ingest (stamps), processing (ticks, silence
/// rules) and the status report.
pub struct GatewayClock {
    source: Box<dyn ClockSource>,
    trust: Synchronised,
    anchor: Mutex<Anchor>,
    /// 0 unknown, 1 synchronised, 2 not.
    kernel_sync: AtomicU8,
    steps: AtomicU64,
    /// The latest steps, newest last (bounded: [`RECENT_STEPS`]).
    recent: Mutex<Vec<ClockStep>>,
    /// How far arrival times run ahead of the wall clock now (after a step back), ms.
    ahead_ms: AtomicI64,
}

/// Steps remembered for consumers that apply them late (processing's silence rules).
pub const RECENT_STEPS: usize = 16;

impl GatewayClock {
    /// The machine's clocks.
    pub fn system(cfg: &ClockConfig) -> Self {
        Self::with_source(Box::new(SystemClocks), cfg.synchronised)
    }

    /// The clock over any source (tests step a fake one).
    pub fn with_source(source: Box<dyn ClockSource>, trust: Synchronised) -> Self {
        let wall = source.wall_ms();
        let mono = source.mono_ms();
        let clock = Self {
            trust,
            anchor: Mutex::new(Anchor {
                wall,
                mono,
                last: wall,
                held_by: 0,
                sync_checked: i64::MIN / 2,
            }),
            kernel_sync: AtomicU8::new(0),
            steps: AtomicU64::new(0),
            recent: Mutex::new(Vec::new()),
            ahead_ms: AtomicI64::new(0),
            source,
        };
        clock.arrival_ms(); // reads the NTP state at once
        clock
    }

    /// `floor_ms` is the latest arrival time the data directory has already recorded: a wall
    /// clock behind it (stepped back while edgeferry was down, or a gateway booted without a
    /// battery clock) is a step back from there, and arrival times go on from it.
    pub fn raise_floor(&self, floor_ms: i64) {
        let now = self.arrival_ms();
        if floor_ms <= now + STEP_TOLERANCE_MS {
            return;
        }
        let mut a = self.anchor.lock().unwrap_or_else(|e| e.into_inner());
        a.held_by = floor_ms - now;
        a.wall = floor_ms;
        a.mono = self.source.mono_ms();
        a.last = floor_ms;
        drop(a);
        self.ahead_ms.store(floor_ms - now, Ordering::Relaxed);
        self.record_step(floor_ms, now - floor_ms, true);
    }

    /// Arrival time for a reading received now, ms since the Unix epoch: the wall clock,
    /// except that it never goes back (see the module documentation).
    pub fn arrival_ms(&self) -> i64 {
        let wall = self.source.wall_ms();
        let mono = self.source.mono_ms();
        let mut a = self.anchor.lock().unwrap_or_else(|e| e.into_inner());
        if mono - a.sync_checked >= SYNC_RECHECK_MS {
            a.sync_checked = mono;
            let v = match self.source.kernel_synchronised() {
                None => 0,
                Some(true) => 1,
                Some(false) => 2,
            };
            self.kernel_sync.store(v, Ordering::Relaxed);
            metrics::gauge!("edgeferry_clock_synchronised").set(if self.trusted() {
                1.0
            } else {
                0.0
            });
        }
        let projected = a.wall + (mono - a.mono);
        let now = if wall > projected + STEP_TOLERANCE_MS {
            // Forward: follow it (nothing becomes late by time moving on).
            if a.held_by > 0 {
                self.note_caught_up(wall - projected);
            } else {
                drop(a);
                self.record_step(wall, wall - projected, false);
                a = self.anchor.lock().unwrap_or_else(|e| e.into_inner());
            }
            a.held_by = 0;
            a.wall = wall;
            a.mono = mono;
            wall
        } else if wall < projected - STEP_TOLERANCE_MS {
            // Back (or still behind after an earlier step back): hold to the monotonic clock.
            if a.held_by == 0 {
                a.held_by = projected - wall;
                drop(a);
                self.record_step(projected, wall - projected, false);
                a = self.anchor.lock().unwrap_or_else(|e| e.into_inner());
            }
            self.ahead_ms.store(projected - wall, Ordering::Relaxed);
            metrics::gauge!("edgeferry_clock_ahead_of_wall_seconds")
                .set((projected - wall) as f64 / 1000.0);
            projected
        } else {
            if a.held_by > 0 {
                self.note_caught_up(0);
                a.held_by = 0;
            }
            a.wall = wall;
            a.mono = mono;
            wall
        };
        let now = now.max(a.last);
        a.last = now;
        now
    }

    fn note_caught_up(&self, jump_ms: i64) {
        self.ahead_ms.store(0, Ordering::Relaxed);
        metrics::gauge!("edgeferry_clock_ahead_of_wall_seconds").set(0.0);
        tracing::info!(
            "the wall clock has caught up with arrival times{}; following it again",
            if jump_ms > 0 {
                format!(" (stepping {} s forward past them)", jump_ms / 1000)
            } else {
                String::new()
            }
        );
    }

    fn record_step(&self, at_ms: i64, delta_ms: i64, at_start: bool) {
        let seq = self.steps.fetch_add(1, Ordering::Relaxed) + 1;
        let (direction, verb) = if delta_ms >= 0 {
            ("forward", "forward")
        } else {
            ("back", "back")
        };
        metrics::counter!("edgeferry_clock_steps_total", "direction" => direction).increment(1);
        let size = human(delta_ms.unsigned_abs());
        if at_start {
            tracing::warn!(
                "the wall clock is {size} behind the last arrival time this data directory \
                 recorded; arrival times go on from there on the monotonic clock until the wall \
                 clock catches up (nothing is dropped as too late)"
            );
        } else if delta_ms >= 0 {
            tracing::warn!(
                "the wall clock stepped {verb} by {size}; arrival times follow it (windows skip ahead, nothing is late)"
            );
        } else {
            tracing::warn!(
                "the wall clock stepped {verb} by {size}; arrival times go on from the \
                 monotonic clock until it catches up, so readings after the step are not \
                 judged older than those before it"
            );
        }
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == RECENT_STEPS {
            recent.remove(0);
        }
        recent.push(ClockStep {
            seq,
            at_ms,
            delta_ms,
        });
    }

    /// Whether the wall clock may be believed: `[clock] synchronised`, or the kernel's NTP
    /// state when that is `"auto"` (unknown counts as not).
    pub fn trusted(&self) -> bool {
        match self.trust {
            Synchronised::Yes => true,
            Synchronised::No => false,
            Synchronised::Auto => self.kernel_sync.load(Ordering::Relaxed) == 1,
        }
    }

    /// Steps seen since start.
    pub fn steps(&self) -> u64 {
        self.steps.load(Ordering::Relaxed)
    }

    /// The remembered steps after `seq` (at most [`RECENT_STEPS`]), oldest first.
    pub fn steps_after(&self, seq: u64) -> Vec<ClockStep> {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.iter().filter(|s| s.seq > seq).copied().collect()
    }

    /// How far arrival times run ahead of the wall clock after a step back, ms (0 normally).
    pub fn ahead_of_wall_ms(&self) -> i64 {
        self.ahead_ms.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for GatewayClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayClock")
            .field("trust", &self.trust)
            .field("steps", &self.steps())
            .field("ahead_of_wall_ms", &self.ahead_of_wall_ms())
            .finish()
    }
}

#[cfg(test)]
pub mod testkit {
    //! A clock whose wall time a test steps by hand.
    use super::*;
    use std::sync::Arc;

    /// Wall and monotonic time set by the test; both start at `start_ms`.
    #[derive(Clone)]
    pub struct FakeClocks {
        pub wall: Arc<AtomicI64>,
        pub mono: Arc<AtomicI64>,
        pub synced: Arc<AtomicU8>,
    }

    impl FakeClocks {
        pub fn new(start_ms: i64) -> Self {
            Self {
                wall: Arc::new(AtomicI64::new(start_ms)),
                mono: Arc::new(AtomicI64::new(0)),
                synced: Arc::new(AtomicU8::new(1)),
            }
        }
        /// Both clocks move on by `ms`.
        pub fn advance(&self, ms: i64) {
            self.wall.fetch_add(ms, Ordering::Relaxed);
            self.mono.fetch_add(ms, Ordering::Relaxed);
        }
        /// Only the wall clock moves (a step).
        pub fn step(&self, ms: i64) {
            self.wall.fetch_add(ms, Ordering::Relaxed);
        }
    }

    impl ClockSource for FakeClocks {
        fn wall_ms(&self) -> i64 {
            self.wall.load(Ordering::Relaxed)
        }
        fn mono_ms(&self) -> i64 {
            self.mono.load(Ordering::Relaxed)
        }
        fn kernel_synchronised(&self) -> Option<bool> {
            match self.synced.load(Ordering::Relaxed) {
                1 => Some(true),
                2 => Some(false),
                _ => None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testkit::FakeClocks;
    use super::*;

    const T0: i64 = 1_700_000_000_000;

    fn clock(fake: &FakeClocks, floor: i64) -> GatewayClock {
        let c = GatewayClock::with_source(Box::new(fake.clone()), Synchronised::Auto);
        c.raise_floor(floor);
        c
    }

    #[test]
    fn milliseconds_and_seconds_agree() {
        let ms = now_ms();
        let s = now_secs();
        assert!(ms > 1_600_000_000_000, "clock reads {ms}");
        assert!((ms / 1000 - s as i64).abs() <= 1);
    }

    #[test]
    fn arrival_time_is_the_wall_clock_while_it_runs_with_the_monotonic_one() {
        let fake = FakeClocks::new(T0);
        let c = clock(&fake, 0);
        assert_eq!(c.arrival_ms(), T0);
        fake.advance(1500);
        fake.step(300); // slewing and jitter below the tolerance are followed
        assert_eq!(c.arrival_ms(), T0 + 1800);
        assert_eq!(c.steps(), 0);
    }

    #[test]
    fn a_step_forward_is_followed_and_counted_once() {
        let fake = FakeClocks::new(T0);
        let c = clock(&fake, 0);
        c.arrival_ms();
        fake.step(3_600_000);
        assert_eq!(c.arrival_ms(), T0 + 3_600_000);
        fake.advance(10);
        assert_eq!(c.arrival_ms(), T0 + 3_600_010);
        assert_eq!(c.steps(), 1);
        let steps = c.steps_after(0);
        assert_eq!(steps.len(), 1);
        assert_eq!(steps[0].delta_ms, 3_600_000);
        assert_eq!(steps[0].at_ms, T0 + 3_600_000);
    }

    #[test]
    fn after_a_step_back_arrival_times_go_on_monotonically_until_the_wall_clock_catches_up() {
        let fake = FakeClocks::new(T0);
        let c = clock(&fake, 0);
        c.arrival_ms();
        fake.step(-3_600_000);
        fake.advance(1000);
        assert_eq!(c.arrival_ms(), T0 + 1000, "held to the monotonic clock");
        assert_eq!(c.ahead_of_wall_ms(), 3_600_000);
        fake.advance(1000);
        assert_eq!(c.arrival_ms(), T0 + 2000);
        assert_eq!(c.steps(), 1, "one step, however long it is held");
        // The wall clock is put right again (the back step was a mistake): followed, and
        // not a second step, so the step is counted once.
        fake.step(3_600_000);
        fake.advance(1000);
        assert_eq!(c.arrival_ms(), T0 + 3000);
        assert_eq!(c.ahead_of_wall_ms(), 0);
        assert_eq!(c.steps(), 1);
    }

    #[test]
    fn a_wall_clock_that_catches_up_by_itself_is_followed_again() {
        let fake = FakeClocks::new(T0);
        let c = clock(&fake, 0);
        c.arrival_ms();
        fake.step(-5_000);
        assert_eq!(c.arrival_ms(), T0);
        // Running 10 % fast (as a slewing daemon would) closes the gap.
        for _ in 0..60 {
            fake.advance(1000);
            fake.step(100);
            c.arrival_ms();
        }
        assert_eq!(c.ahead_of_wall_ms(), 0);
        assert_eq!(c.arrival_ms(), fake.wall_ms());
    }

    #[test]
    fn arrival_times_never_decrease() {
        let fake = FakeClocks::new(T0);
        let c = clock(&fake, 0);
        let mut last = c.arrival_ms();
        for i in 0..200 {
            match i % 7 {
                0 => fake.step(-700), // below the tolerance: not a step, still not backwards
                3 => fake.step(-5_000),
                5 => fake.step(9_000),
                _ => fake.advance(250),
            }
            let now = c.arrival_ms();
            assert!(now >= last, "{now} < {last} at {i}");
            last = now;
        }
    }

    #[test]
    fn a_wall_clock_behind_the_recorded_data_starts_from_the_data() {
        let fake = FakeClocks::new(T0);
        let c = clock(&fake, T0 + 60_000);
        assert_eq!(c.arrival_ms(), T0 + 60_000);
        assert_eq!(c.ahead_of_wall_ms(), 60_000);
        assert_eq!(c.steps(), 1);
        // Booted without a battery clock, then NTP sets the right time: followed.
        fake.advance(1000);
        fake.step(86_400_000);
        assert_eq!(c.arrival_ms(), T0 + 86_401_000);
        assert_eq!(c.ahead_of_wall_ms(), 0);
    }

    #[test]
    fn trust_follows_the_kernel_or_the_configuration() {
        let fake = FakeClocks::new(T0);
        let auto = clock(&fake, 0);
        auto.arrival_ms();
        assert!(auto.trusted());
        fake.synced.store(2, Ordering::Relaxed);
        fake.advance(SYNC_RECHECK_MS);
        auto.arrival_ms();
        assert!(!auto.trusted(), "the kernel's STA_UNSYNC is rechecked");
        fake.synced.store(0, Ordering::Relaxed);
        fake.advance(SYNC_RECHECK_MS);
        auto.arrival_ms();
        assert!(!auto.trusted(), "unknown is not trusted");
        let yes = GatewayClock::with_source(Box::new(fake.clone()), Synchronised::Yes);
        assert!(yes.trusted());
        fake.synced.store(1, Ordering::Relaxed);
        let no = GatewayClock::with_source(Box::new(fake.clone()), Synchronised::No);
        no.arrival_ms();
        assert!(!no.trusted());
    }

    #[test]
    fn the_kernel_can_be_asked() {
        // Whatever this machine says, asking works without privilege on Linux.
        #[cfg(target_os = "linux")]
        assert!(kernel_synchronised().is_some());
    }
}
