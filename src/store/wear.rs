//! Flash wear: how many bytes edgeferry makes the disk write, and what that rate means for an
//! SD card or eMMC with a rated write endurance.
//!
//! The figure comes from the kernel (`write_bytes` in `/proc/self/io`: every page this process
//! dirtied and caused to be written, whatever file it belongs to), not from edgeferry's own
//! bookkeeping, so nothing it writes can be left out: journal, outbox, checkpoint, epoch and
//! acknowledgement files, temporary files. The file system's own journal (jbd2 on ext4) comes
//! on top and is not in it. The rate is taken over the last [`RATE_WINDOW`]; until a minute
//! of samples exists there is no rate (a start-up's recovery writes would mislead).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often [`run_sampler`] reads `/proc/self/io`.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// The span the write rate is measured over.
pub const RATE_WINDOW: Duration = Duration::from_secs(10 * 60);
/// Samples needed before a rate is reported.
const MIN_SPAN: Duration = Duration::from_secs(60);

/// Bytes this process caused to be written to storage since it started (`write_bytes` of
/// `/proc/self/io`); `None` where the kernel does not say (no procfs, no task I/O accounting).
pub fn process_write_bytes() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The recent samples of bytes written, bounded to [`RATE_WINDOW`] (≤ 61 entries at
/// [`SAMPLE_EVERY`]).
#[derive(Debug, Default)]
pub struct WriteRate {
    samples: Mutex<VecDeque<(Instant, u64)>>,
}

impl WriteRate {
    /// Records a sample taken at `at`, forgetting the ones older than [`RATE_WINDOW`].
    pub fn record(&self, at: Instant, written: u64) {
        let mut s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        s.push_back((at, written));
        while s
            .front()
            .is_some_and(|(t, _)| at.duration_since(*t) > RATE_WINDOW)
        {
            s.pop_front();
        }
    }

    /// The total written at the last sample.
    pub fn total(&self) -> Option<u64> {
        let s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        s.back().map(|(_, w)| *w)
    }

    /// Bytes per day at the rate of the samples held, once they span at least a minute.
    pub fn per_day(&self) -> Option<u64> {
        let s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let ((t0, w0), (t1, w1)) = (s.front()?, s.back()?);
        let span = t1.duration_since(*t0);
        if span < MIN_SPAN {
            return None;
        }
        let bytes = w1.saturating_sub(*w0) as f64;
        Some((bytes * 86_400.0 / span.as_secs_f64()) as u64)
    }
}

/// Years until a card rated for `endurance` bytes written has taken them, at `per_day`;
/// `None` when nothing is written.
pub fn years_to_endurance(endurance: u64, per_day: u64) -> Option<f64> {
    (per_day > 0).then(|| endurance as f64 / per_day as f64 / 365.25)
}

/// Samples `/proc/self/io` every [`SAMPLE_EVERY`] into `rate` and the counter
/// `edgeferry_disk_written_bytes_total` until `stop`. Without `/proc/self/io` it says so once
/// and ends: the status then shows no write rate rather than a wrong one.
pub async fn run_sampler(
    rate: std::sync::Arc<WriteRate>,
    stop: tokio_util::sync::CancellationToken,
) {
    let counter = metrics::counter!("edgeferry_disk_written_bytes_total");
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let Some(written) = process_write_bytes() else {
            tracing::info!(
                "/proc/self/io is not readable here: disk writes are not measured (status shows none)"
            );
            return;
        };
        counter.absolute(written);
        rate.record(Instant::now(), written);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_counts_what_this_process_writes_and_syncs() {
        let Some(before) = process_write_bytes() else {
            eprintln!("SKIPPED: no /proc/self/io");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, vec![7u8; 256 * 1024]).unwrap();
        std::fs::File::open(&f).unwrap().sync_data().unwrap();
        let after = process_write_bytes().unwrap();
        // tmpfs has no backing store and counts nothing: only a real disk is a fair test.
        if after == before {
            eprintln!("SKIPPED: the temporary directory is not on a disk the kernel accounts");
            return;
        }
        assert!(after - before >= 256 * 1024, "{before} → {after}");
    }

    #[test]
    fn the_rate_needs_a_minute_of_samples_and_forgets_what_is_older_than_its_window() {
        let r = WriteRate::default();
        let t0 = Instant::now();
        r.record(t0, 1_000);
        r.record(t0 + Duration::from_secs(30), 2_000);
        assert_eq!(r.per_day(), None, "30 s is too short to project a day");
        r.record(t0 + Duration::from_secs(60), 3_000);
        // 2,000 bytes in 60 s.
        assert_eq!(r.per_day(), Some(2_000 * 1_440));
        assert_eq!(r.total(), Some(3_000));
        // Ten minutes on at a tenth of the rate: the early samples are forgotten.
        let mut w = 3_000;
        for i in 1..=70 {
            w += 20;
            r.record(t0 + Duration::from_secs(60 + i * 10), w);
        }
        let per_day = r.per_day().unwrap();
        assert_eq!(per_day, 2 * 86_400, "20 bytes per 10 s");
        assert!(r.samples.lock().unwrap().len() <= 61);
    }

    #[test]
    fn a_card_rated_for_forty_terabytes_lasts_about_a_century_at_a_gigabyte_a_day() {
        let years = years_to_endurance(40_000_000_000_000, 1_000_000_000).unwrap();
        assert!((years - 109.5).abs() < 0.1, "{years}");
        assert_eq!(years_to_endurance(1, 0), None);
    }
}
