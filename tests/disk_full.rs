//! A full disk is waited out, not fatal: the data directory on a small tmpfs (the test mounts
//! it; it runs as root) is filled to its last byte by another file while readings flow. The
//! gateway stops acknowledging (the broker keeps the messages), says so in `/status`, keeps
//! running (no crash loop), and once the other file is gone it journals every reading exactly
//! once by itself, with `store verify` clean.

mod common;

use common::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A tmpfs mounted by the test, unmounted (lazily, so a still-open file cannot keep it) on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts `size` of tmpfs at `dir`, or `None` (with a notice) where mounting is not allowed.
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "NOTICE: cannot mount a tmpfs ({}); skipping the full-disk test",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Writes `path` until the file system refuses another byte; returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let mut written = 0u64;
    for chunk in [1 << 20, 4096, 512, 1] {
        let buf = vec![0x5Au8; chunk];
        while f.write_all(&buf).is_ok() {
            written += chunk as u64;
        }
    }
    let _ = f.sync_all();
    written
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

fn status(gw: &Gateway) -> serde_json::Value {
    serde_json::from_str(&gw.admin_get("/status").unwrap()).unwrap()
}

fn readings_total(gw: &Gateway) -> u64 {
    gw.metric("edgeferry_ingest_readings_total").unwrap_or(0.0) as u64
}

fn topic(i: usize) -> String {
    format!("sensors/site{}/dev{}/temperature", i % 3, i % 10)
}

#[test]
fn a_full_data_disk_holds_ingest_back_and_it_resumes_by_itself_with_nothing_lost_or_doubled() {
    let broker = Mosquitto::start();
    let mut gw = Gateway::new(&broker.url());
    let data = gw.dir.path().join("data");
    let Some(_disk) = Tmpfs::mount(&data, "8m") else {
        return;
    };
    gw.start();
    let p = Publisher::connect(broker.port, "pub-disk-full");
    let mut i = 0;
    let mut publish = |n: usize| {
        for _ in 0..n {
            p.publish(&topic(i), reading_payload(i));
            i += 1;
            std::thread::sleep(Duration::from_millis(2));
        }
        i
    };
    let before = publish(1000);
    wait_for("the first readings", Duration::from_secs(20), || {
        readings_total(&gw) == before as u64
    });

    // Another program fills the disk to its last byte.
    let filler = data.join("filler");
    let filled = fill(&filler);
    let full_at = Instant::now();
    let during = publish(1500);
    wait_for(
        "the journal problem in /status",
        Duration::from_secs(20),
        || {
            let s = status(&gw);
            s["problems"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p.as_str().unwrap().contains("journal cannot write"))
        },
    );
    let s = status(&gw);
    assert_eq!(s["healthy"], false, "{s}");
    let stalled = readings_total(&gw);
    assert!(
        stalled < during as u64,
        "nothing can be journaled on a full disk"
    );
    // It waits, it does not exit (under systemd that would be a crash loop).
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        gw.pid()
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
    );
    let n = publish(500);

    // Space comes back: ingest resumes by itself.
    std::fs::remove_file(&filler).unwrap();
    let freed_at = Instant::now();
    wait_for("every reading journaled", Duration::from_secs(60), || {
        readings_total(&gw) == n as u64
    });
    let resumed_after = freed_at.elapsed();
    wait_for("a healthy status again", Duration::from_secs(20), || {
        status(&gw)["healthy"] == true
    });
    p.wait_acked(n, Duration::from_secs(30));
    // The journal gauge (which the quota reads) says what is on disk after the episode.
    let on_disk = dir_size(&data.join("journal"));
    let gauge = gw.metric("edgeferry_journal_bytes").unwrap() as u64;
    assert!(
        on_disk.abs_diff(gauge) <= 4096,
        "journal {on_disk} bytes on disk, edgeferry_journal_bytes {gauge}"
    );
    assert!(gw.stop().success(), "{}", gw.logs());

    let (st, out, _) = gw.command(&["store", "verify"]);
    assert!(st.success(), "store verify after the episode:\n{out}");
    let values: Vec<f64> = gw.journal().iter().map(|r| r.value).collect();
    let counted = values.len();
    let distinct: std::collections::BTreeSet<u64> = values.iter().map(|v| *v as u64).collect();
    eprintln!(
        "fault: ENOSPC (8 MiB tmpfs, filler {filled} B) for {:.1} s, resumed {:.1} s after space \
         returned; published {n}, counted {counted}, lost {}, doubled {}",
        full_at.elapsed().as_secs_f64() - resumed_after.as_secs_f64(),
        resumed_after.as_secs_f64(),
        n - distinct.len(),
        counted - distinct.len()
    );
    assert_exactly_once(values, n);
    let log = gw.logs();
    assert_eq!(
        log.matches("journal write failed").count(),
        1,
        "logged once per episode:\n{log}"
    );
    assert!(log.contains("journal writes again"), "{log}");
    // The error line says its cause once.
    let line = log
        .lines()
        .find(|l| l.contains("journal write failed"))
        .unwrap();
    eprintln!("{line}");
    assert_eq!(line.matches("No space left on device").count(), 1, "{line}");
}
