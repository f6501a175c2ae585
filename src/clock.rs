//! The one wall-clock helper. Event times, arrival times and batch creation times are
//! milliseconds since the Unix epoch; every module reads "now" here so that there is one
//! definition of it (and one place to make it injectable).

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, now; 0 if the clock is before 1970 (a gateway without a
/// battery clock can boot there), saturating far in the future.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_and_seconds_agree() {
        let ms = now_ms();
        let s = now_secs();
        assert!(ms > 1_600_000_000_000, "clock reads {ms}");
        assert!((ms / 1000 - s as i64).abs() <= 1);
    }
}
