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

/// With `when_full = "drop_oldest"` (the default) the readings come first: when the journal
/// cannot write for a full disk, the oldest unsent aggregate segments are dropped (counted)
/// to give it room, and ingest goes on while the other file still fills the disk.
#[test]
fn on_a_full_disk_drop_oldest_gives_the_journal_the_room_of_the_oldest_unsent_aggregates() {
    let broker = Mosquitto::start();
    // The upstream is down throughout: the outbox holds every aggregate, in 64 KiB segments
    // of which all but the active one can be dropped. Checkpoints each second trim the
    // journal behind them, so the readings are counted as journaled by the daemon.
    let gw = Gateway::with_config(
        &broker.url(),
        "",
        &format!(
            r#"
[process]
windows = ["1s"]
allowed_lateness = "200ms"
checkpoint_interval = "1s"

[upstream]
url = "ws://127.0.0.1:{}/"
"#,
            free_port()
        ),
    );
    let text = std::fs::read_to_string(&gw.config).unwrap();
    let needle = "segment_size = \"256MiB\"";
    assert!(text.contains(needle), "gateway_config changed: {text}");
    std::fs::write(
        &gw.config,
        text.replace(
            needle,
            "segment_size = \"64KiB\"\nwhen_full = \"drop_oldest\"",
        ),
    )
    .unwrap();
    let mut gw = gw;
    let data = gw.dir.path().join("data");
    let Some(_disk) = Tmpfs::mount(&data, "8m") else {
        return;
    };
    gw.start();
    let p = Publisher::connect(broker.port, "pub-disk-full-drop");
    // 1000 devices, one reading each per (event-time) second: 1000 aggregates a window.
    let topic = |i: usize| format!("sensors/site{}/dev{}/temperature", i % 3, i % 1000);
    let mut i = 0;
    let mut publish = |n: usize| {
        for _ in 0..n {
            p.publish(&topic(i), reading_payload(i));
            i += 1;
            if i % 4 == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        i
    };
    let before = publish(6000);
    wait_for(
        "the first readings and their aggregates in the outbox",
        Duration::from_secs(30),
        || {
            readings_total(&gw) == before as u64
                && dir_size(&data.join("outbox/aggregates")) > 4 * 64 * 1024
        },
    );

    let filler = data.join("filler");
    let filled = fill(&filler);
    let full_at = Instant::now();
    let n = publish(2000);
    wait_for(
        "every reading journaled while the disk is still full",
        Duration::from_secs(60),
        || readings_total(&gw) == n as u64,
    );
    let took = full_at.elapsed();
    p.wait_acked(n, Duration::from_secs(30));
    assert!(filler.exists());
    let dropped = gw
        .metric("edgeferry_outbox_dropped_items_total")
        .unwrap_or(0.0);
    assert!(dropped > 0.0, "aggregates gave their room: {}", gw.logs());
    let s = status(&gw);
    assert!(
        s["process"]["dropped_items"].as_u64().unwrap_or(0) > 0,
        "the drop shows in /status: {s}"
    );
    std::fs::remove_file(&filler).unwrap();
    // Nothing more arrives late (a redelivery journaled again would show here).
    std::thread::sleep(Duration::from_secs(2));
    let journaled = readings_total(&gw) as usize;
    assert!(gw.stop().success(), "{}", gw.logs());

    // The journal is trimmed behind checkpoints here (the outbox takes batches only below a
    // checkpoint, and one comes within a second of them), so the readings are counted as
    // journaled by the daemon; what the journal still holds must be distinct and verify clean.
    let (st, out, _) = gw.command(&["store", "verify"]);
    assert!(st.success(), "store verify after the episode:\n{out}");
    let values: Vec<u64> = gw.journal().iter().map(|r| r.value as u64).collect();
    let distinct: std::collections::BTreeSet<u64> = values.iter().copied().collect();
    assert_eq!(distinct.len(), values.len(), "no reading journaled twice");
    assert!(distinct.iter().all(|v| (*v as usize) < n));
    eprintln!(
        "fault: ENOSPC with drop_oldest (8 MiB tmpfs, filler {filled} B, still full): {} \
         readings journaled in {:.1} s, {dropped} aggregates dropped; published {n}, counted \
         {journaled}, lost {}, doubled {}",
        n - before,
        took.as_secs_f64(),
        n.saturating_sub(journaled),
        journaled.saturating_sub(n),
    );
    assert_eq!(journaled, n, "every reading journaled once");
    // Which writer meets the full disk first is a race: the journal (it then gets the room of
    // the oldest aggregates) or the outbox (which then drops them for its own write, leaving
    // room the journal uses without ever failing). Either way the drop was said.
    let log = gw.logs();
    assert!(
        log.contains("the journal cannot write (store.when_full = \"drop_oldest\")")
            || log.contains(
                "disk full: the outbox or checkpoint cannot write (store.when_full = \"drop_oldest\")"
            ),
        "{log}"
    );
}

/// A gateway installed on a disk that is already full cannot even make its data directory's
/// first files: it says so once and waits (under systemd an exit is a restart loop), then
/// starts by itself when space comes back and takes every reading the broker kept.
#[test]
fn a_new_data_directory_on_a_full_disk_waits_and_starts_by_itself() {
    let broker = Mosquitto::start();
    let mut gw = Gateway::new(&broker.url());
    let disk = gw.dir.path().join("disk");
    let Some(_disk) = Tmpfs::mount(&disk, "1m") else {
        return;
    };
    let filler = disk.join("filler");
    fill(&filler);
    // The data directory is a new one on that disk.
    let text = std::fs::read_to_string(&gw.config).unwrap();
    let data = gw.dir.path().join("data");
    let new_data = disk.join("edgeferry");
    // A fixed admin port, as by default: `admin.addr` cannot be written on this disk.
    let admin = format!("127.0.0.1:{}", free_port());
    std::fs::write(
        &gw.config,
        text.replace(&data.display().to_string(), &new_data.display().to_string())
            .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{admin}\"")),
    )
    .unwrap();
    // The broker keeps what is published meanwhile in edgeferry's session, once it has one:
    // a first run elsewhere is not possible here, so the readings come after the start.
    gw.spawn();
    wait_for("the wait in the log", Duration::from_secs(20), || {
        gw.current_log().contains("cannot open the stores")
    });
    std::thread::sleep(Duration::from_secs(6));
    assert!(
        gw.pid()
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists()),
        "it waits, it does not exit:\n{}",
        gw.current_log()
    );
    let log = gw.current_log();
    assert_eq!(
        log.matches("cannot open the stores").count(),
        1,
        "said once:\n{log}"
    );
    assert!(log.contains("No space left on device"), "{log}");
    // `edgeferry status` says why, and fails.
    let (st, out, err) = gw.command(&["status"]);
    assert!(!st.success(), "{out}");
    assert!(
        err.contains("waiting: cannot open the stores") && err.contains("No space left"),
        "edgeferry status while waiting:\n{out}{err}"
    );
    let (code, _) = edgeferry::admin::http_get(&admin, "/readyz", Duration::from_secs(3)).unwrap();
    assert_eq!(code, 503);
    let (_, metrics) =
        edgeferry::admin::http_get(&admin, "/metrics", Duration::from_secs(3)).unwrap();
    assert!(metrics.contains("edgeferry_store_waiting 1"), "{metrics}");

    std::fs::remove_file(&filler).unwrap();
    gw.wait_ready();
    let p = Publisher::connect(broker.port, "pub-new-dir-full");
    for i in 0..200 {
        p.publish(&topic(i), reading_payload(i));
    }
    wait_for("every reading journaled", Duration::from_secs(20), || {
        readings_total(&gw) == 200
    });
    p.wait_acked(200, Duration::from_secs(10));
    let (_, metrics) =
        edgeferry::admin::http_get(&admin, "/metrics", Duration::from_secs(3)).unwrap();
    assert!(metrics.contains("edgeferry_store_waiting 0"), "{metrics}");
    let (st, out, err) = gw.command(&["status"]);
    assert!(
        out.contains("gw-test"),
        "edgeferry status once started:\n{out}{err}"
    );
    let _ = st; // not healthy yet perhaps (the upstream-less gateway is; the clock may not be)
    assert!(gw.stop().success(), "{}", gw.logs());
    let log = gw.logs();
    assert!(log.contains("takes writes again"), "{log}");
    let (st, out, _) = gw.command(&["store", "verify"]);
    assert!(st.success(), "store verify:\n{out}");
    assert_exactly_once(gw.journal().iter().map(|r| r.value), 200);
    eprintln!("fault: ENOSPC on a new data directory; waited, started, 200 of 200 journaled once");
}
