//! Exponential backoff with full jitter.
//!
//! Full jitter (a uniformly random pause between zero and the exponential cap) is what keeps a
//! thousand gateways that lost the same broker or uplink at the same moment from reconnecting
//! in lockstep. `backon`'s jitter only adds a random amount on top of the exponential delay,
//! which still synchronises the first retries, so this small type is kept here instead.

use std::time::Duration;

/// Backoff state for one link.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// Pauses start around `base` and never exceed `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap: cap.max(base),
            attempt: 0,
        }
    }

    /// The next pause: uniform in `[0, min(cap, base * 2^attempt)]`, never zero.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX));
        let ceiling = exp.min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let ms = ceiling.as_millis().max(1) as u64;
        Duration::from_millis(rand::random_range(1..=ms))
    }

    /// The link works again: start over from `base`.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// How many consecutive failures have been seen.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_and_are_jittered_below_it() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut seen_max = Duration::ZERO;
        for i in 0..50 {
            let d = b.next_delay();
            let ceiling =
                Duration::from_millis(100 * (1u64 << i.min(20))).min(Duration::from_secs(5));
            assert!(d <= ceiling, "attempt {i}: {d:?} > {ceiling:?}");
            assert!(d > Duration::ZERO);
            seen_max = seen_max.max(d);
        }
        assert!(
            seen_max > Duration::from_secs(1),
            "delays should approach the cap"
        );
        let distinct: std::collections::HashSet<_> = (0..20).map(|_| b.next_delay()).collect();
        assert!(distinct.len() > 5, "full jitter spreads the delays");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
