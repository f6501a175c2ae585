//! FIFO comparison of the segment log and sled 0.34.7, one store per process run so that
//! peak RSS (VmHWM) belongs to one store only.
//!
//! ```text
//! cargo run --release --example fifo_compare -- seglog [DIR]
//! cargo run --release --example fifo_compare -- sled   [DIR]
//! ```
//!
//! Workload: 1,000,000 appends of 64 bytes with a durable sync every 1,000, then a drain
//! that reads every record back in order and removes it (sync every 1,000) until empty.
use edgeferry::store::seglog::{LogConfig, SegmentLog};
use std::path::{Path, PathBuf};
use std::time::Instant;

const N: u64 = 1_000_000;
const BATCH: u64 = 1_000;
const RECORD: usize = 64;

/// Bytes allocated on disk under `dir` (like `du`), recursively.
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if let Ok(m) = e.metadata() {
                if m.is_dir() {
                    total += disk_usage(&e.path());
                } else {
                    total += m.blocks() * 512;
                }
            }
        }
    }
    total
}

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn record(i: u64) -> [u8; RECORD] {
    let mut r = [0u8; RECORD];
    for (j, b) in r.iter_mut().enumerate() {
        *b = (i as u8).wrapping_add(j as u8);
    }
    r
}

struct Report {
    append_secs: f64,
    drain_secs: f64,
    peak_disk: u64,
    after_drain: u64,
}

fn run_seglog(dir: &Path) -> Report {
    let cfg = LogConfig::default();
    let (mut log, _) = SegmentLog::open(dir, cfg).expect("open");
    let mut peak = 0;
    let t = Instant::now();
    for i in 0..N {
        log.append(&record(i)).expect("append");
        if (i + 1).is_multiple_of(BATCH) {
            log.sync().expect("sync");
            peak = peak.max(disk_usage(dir));
        }
    }
    log.sync().expect("sync");
    let append_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut n = 0u64;
    for item in log.read_from(0).expect("reader") {
        let (lsn, data) = item.expect("read");
        assert_eq!(data, record(lsn));
        n += 1;
        if n.is_multiple_of(BATCH) {
            log.trim_before(lsn + 1).expect("trim");
            log.sync().expect("sync");
            peak = peak.max(disk_usage(dir));
        }
    }
    assert_eq!(n, N);
    log.trim_before(log.next_lsn()).expect("trim");
    log.sync().expect("sync");
    let drain_secs = t.elapsed().as_secs_f64();
    Report {
        append_secs,
        drain_secs,
        peak_disk: peak,
        after_drain: disk_usage(dir),
    }
}

fn run_sled(dir: &Path) -> Report {
    let db = sled::Config::new()
        .path(dir)
        .cache_capacity(16 * 1024 * 1024)
        .open()
        .expect("open sled");
    let mut peak = 0;
    let t = Instant::now();
    for i in 0..N {
        db.insert(i.to_be_bytes(), &record(i)[..]).expect("insert");
        if (i + 1).is_multiple_of(BATCH) {
            db.flush().expect("flush");
            peak = peak.max(disk_usage(dir));
        }
    }
    db.flush().expect("flush");
    let append_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut n = 0u64;
    while let Some((k, v)) = db.pop_min().expect("pop_min") {
        let mut key = [0u8; 8];
        key.copy_from_slice(&k);
        assert_eq!(&v[..], &record(u64::from_be_bytes(key))[..]);
        n += 1;
        if n.is_multiple_of(BATCH) {
            db.flush().expect("flush");
            peak = peak.max(disk_usage(dir));
        }
    }
    assert_eq!(n, N);
    db.flush().expect("flush");
    let drain_secs = t.elapsed().as_secs_f64();
    Report {
        append_secs,
        drain_secs,
        peak_disk: peak,
        after_drain: disk_usage(dir),
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let which = args.next().unwrap_or_default();
    let dir = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(format!("target/fifo-bench/{which}")));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create bench dir");
    let r = match which.as_str() {
        "seglog" => run_seglog(&dir),
        "sled" => run_sled(&dir),
        _ => {
            eprintln!("usage: fifo_compare seglog|sled [DIR]");
            std::process::exit(2);
        }
    };
    let mb = |b: u64| b as f64 / 1e6;
    println!(
        "{which}: {N} x {RECORD} B, sync every {BATCH}: appends {:.0}/s ({:.2} s), drain {:.0}/s ({:.2} s), peak disk {:.1} MB, after drain {:.2} MB, peak RSS {:.1} MB",
        N as f64 / r.append_secs,
        r.append_secs,
        N as f64 / r.drain_secs,
        r.drain_secs,
        mb(r.peak_disk),
        mb(r.after_drain),
        vm_hwm_kib() as f64 / 1024.0,
    );
    let _ = std::fs::remove_dir_all(&dir);
}
