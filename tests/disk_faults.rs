//! A disk that refuses writes — full (ENOSPC), failing (EIO), or remounted read-only by the
//! kernel after an error (EROFS) — on each kind of file edgeferry writes: the journal, the
//! outbox (its segments and the acknowledgement state), the checkpoint, and all at once, also
//! across a restart, and the store epoch a restored data directory must renew. Each is waited
//! out like the disk quota: nothing is acknowledged that is not durable, the state is logged
//! once per episode, counted and shown in `/status`, and everything resumes by itself when the
//! disk takes writes again; at the end the central side holds every reading exactly once and
//! `store verify` is clean.
//!
//! The faults come from `tests/faultfs.py`, a pass-through FUSE file system the test mounts
//! over the data directory (it runs as root) and switches at run time: a small tmpfs gives a
//! real ENOSPC (`tests/disk_full.rs`), but a real EIO or read-only remount needs a failing
//! device (device-mapper's error target), which containers lack.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const PROCESS: &str = r#"
[process]
windows = ["1s", "2s"]
allowed_lateness = "300ms"
checkpoint_interval = "500ms"
"#;

/// The fault file system over a data directory, unmounted on drop.
struct FaultFs {
    child: Child,
    mount: PathBuf,
    control: PathBuf,
}

impl FaultFs {
    /// Mounts `tests/faultfs.py` at `mount` over `backing`, or `None` (with a notice) where
    /// FUSE or Python's fusepy is missing.
    fn mount(backing: &Path, mount: &Path) -> Option<FaultFs> {
        let python = Path::new("/usr/bin/python3");
        let usable = Path::new("/dev/fuse").exists()
            && Command::new(python)
                .args(["-c", "import fusepy"])
                .status()
                .is_ok_and(|s| s.success());
        if !usable {
            eprintln!(
                "NOTICE: no FUSE or no python3-fusepy here; skipping the disk fault test \
                 (scripts/test.sh installs python3-fusepy)"
            );
            return None;
        }
        std::fs::create_dir_all(backing).unwrap();
        std::fs::create_dir_all(mount).unwrap();
        let control = backing.with_extension("control");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/faultfs.py");
        let child = Command::new(python)
            .arg(script)
            .args([backing, mount, &control])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(backing.with_extension("log")).unwrap())
            .spawn()
            .unwrap();
        let fs = FaultFs {
            child,
            mount: mount.to_path_buf(),
            control,
        };
        wait_for("the fault file system", Duration::from_secs(10), || {
            read_all(Path::new("/proc/mounts")).contains(&format!(" {} fuse", mount.display()))
        });
        Some(fs)
    }

    /// From now on every write under one of `paths` (relative to the mount) fails with `errno`.
    fn fail(&self, errno: &str, paths: &[&str]) {
        let spec = serde_json::json!({ "errno": errno, "paths": paths });
        let tmp = self.control.with_extension("next");
        std::fs::write(&tmp, spec.to_string()).unwrap();
        std::fs::rename(&tmp, &self.control).unwrap();
    }

    /// The disk takes writes again.
    fn heal(&self) {
        self.fail("", &[]);
    }

    /// How many operations the fault refused so far.
    fn refusals(&self) -> usize {
        read_all(&self.control.with_extension("control.hits"))
            .lines()
            .count()
    }
}

impl Drop for FaultFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn status(gw: &Gateway) -> serde_json::Value {
    serde_json::from_str(&gw.admin_get("/status").unwrap_or_default()).unwrap_or_default()
}

fn problems(gw: &Gateway) -> String {
    status(gw)["problems"].to_string()
}

/// Waits until the central side counts `n` readings in both window lengths.
fn wait_for_central(c: &Collector, n: u64, timeout: Duration) -> Vec<u64> {
    let start = Instant::now();
    loop {
        let counts: Vec<u64> = central_counts(&c.lines()).into_values().collect();
        if (counts.len() == 2 && counts.iter().all(|&v| v >= n)) || start.elapsed() > timeout {
            return counts;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One fault episode: what refuses writes, and the `/status` problem it must show.
struct Episode {
    paths: &'static [&'static str],
    shows: &'static [&'static str],
    restart: bool,
}

const JOURNAL: &str = "journal cannot write";
const PROCESSING: &str = "processing cannot write";

fn faults_are_waited_out(errno: &str) {
    let broker = Mosquitto::start();
    let mut collector = Collector::new(&[]);
    let upstream = format!(
        "[upstream]\nurl = \"{}\"\nbatch_max = 5\nlinger = \"200ms\"\n",
        collector.url()
    );
    let mut gw = Gateway::with_config(&broker.url(), "", &format!("{PROCESS}{upstream}"));
    let Some(fs) = FaultFs::mount(&gw.dir.path().join("backing"), &gw.dir.path().join("data"))
    else {
        return;
    };
    collector.start();
    gw.start();

    // Readings with their own timestamps flow throughout, ~250 a second over 16 series.
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicUsize::new(0));
    let port = broker.port;
    let publisher = {
        let (stop, published) = (stop.clone(), published.clone());
        std::thread::spawn(move || {
            let p = Publisher::connect(port, "pub-disk-faults");
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let topic = format!("sensors/site{}/dev{}/temperature", i % 2, i % 16);
                p.publish(&topic, format!(r#"{{"value":{i},"ts":{}}}"#, now_ms()));
                i += 1;
                published.store(i, Ordering::SeqCst);
                if i % 10 == 0 {
                    std::thread::sleep(Duration::from_millis(40));
                }
            }
            p.wait_acked(i, Duration::from_secs(90));
            i
        })
    };

    let episodes = [
        Episode {
            paths: &["journal/"],
            shows: &[JOURNAL],
            restart: false,
        },
        Episode {
            paths: &["outbox/"],
            shows: &[PROCESSING],
            restart: false,
        },
        Episode {
            paths: &["state/"],
            shows: &[PROCESSING],
            restart: false,
        },
        // The whole data directory, and the gateway restarted (SIGKILL) while it lasts: it
        // starts, waits, and does not exit (under systemd that would be a crash loop). On a
        // read-only file system no journal can even be opened: it waits before starting its
        // stages, saying so once.
        Episode {
            paths: &[""],
            shows: &[JOURNAL],
            restart: true,
        },
    ];
    let mut summary = Vec::new();
    for e in &episodes {
        std::thread::sleep(Duration::from_secs(2));
        let before = fs.refusals();
        fs.fail(errno, e.paths);
        let since = Instant::now();
        for shows in e.shows {
            wait_for(
                &format!("{shows} in /status with {errno} on {:?}", e.paths),
                Duration::from_secs(20),
                || problems(&gw).contains(shows),
            );
        }
        assert_eq!(status(&gw)["healthy"], false);
        if e.restart {
            gw.kill9();
            gw.spawn();
            let start = Instant::now();
            let waiting = |gw: &Gateway| {
                if errno == "EROFS" {
                    gw.current_log()
                        .contains("is on a read-only file system (os error 30): waiting")
                } else {
                    problems(gw).contains(JOURNAL)
                }
            };
            while !waiting(&gw) {
                assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "the gateway restarted on a failing disk shows no journal problem:\n{}",
                    gw.current_log()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        std::thread::sleep(Duration::from_secs(3));
        assert!(
            gw.pid()
                .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists()),
            "the gateway waits on a failing disk, it does not exit:\n{}",
            gw.current_log()
        );
        if e.restart && errno == "EROFS" {
            assert_eq!(
                gw.current_log().matches("read-only file system").count(),
                1,
                "said once, not at every retry:\n{}",
                gw.current_log()
            );
        }
        let refused = fs.refusals() - before;
        fs.heal();
        let healed = Instant::now();
        wait_for(
            &format!("healthy again after {errno} on {:?}", e.paths),
            Duration::from_secs(30),
            || status(&gw)["healthy"] == true,
        );
        summary.push(format!(
            "{errno} on {:?}{} for {:.1} s ({refused} writes refused), healthy {:.1} s after",
            e.paths,
            if e.restart { " across a restart" } else { "" },
            healed.duration_since(since).as_secs_f64(),
            healed.elapsed().as_secs_f64()
        ));
    }
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    let n = publisher.join().unwrap();
    let counts = wait_for_central(&collector, n as u64, Duration::from_secs(60));
    let log = gw.logs();
    assert!(gw.stop().success(), "{log}");
    let (st, verify, _) = gw.command(&["store", "verify"]);
    let journaled: Vec<f64> = gw.journal().iter().map(|r| r.value).collect();
    let distinct: std::collections::BTreeSet<u64> = journaled.iter().map(|v| *v as u64).collect();
    let renewals = log.matches("restored from an older copy").count();
    eprintln!(
        "fault: {}; published {n}, journaled {}, counted centrally {counts:?}, lost {}, \
         doubled {}, epoch renewals {renewals}",
        summary.join("; "),
        journaled.len(),
        n - distinct.len(),
        journaled.len() - distinct.len()
    );
    assert!(st.success(), "store verify after the faults:\n{verify}");
    assert_eq!(renewals, 0, "{log}");
    assert_exactly_once(journaled, n);
    assert_eq!(counts, vec![n as u64, n as u64], "{log}");
    // Each episode is logged once, not once per retry.
    let journal_episodes = log.matches("journal write failed").count();
    let processing_episodes = log.matches("cannot write the outbox or checkpoint").count();
    assert!(
        (2..=3).contains(&journal_episodes),
        "journal: {journal_episodes} lines for 2 episodes (one across a restart):\n{log}"
    );
    assert!(
        (2..=4).contains(&processing_episodes),
        "processing: {processing_episodes} lines for 2-3 episodes:\n{log}"
    );
    assert!(log.contains("journal writes again"), "{log}");
}

#[test]
fn a_full_disk_on_the_journal_outbox_or_checkpoint_is_waited_out_with_nothing_lost_or_doubled() {
    faults_are_waited_out("ENOSPC");
}

#[test]
fn a_failing_disk_eio_is_waited_out_with_nothing_lost_or_doubled() {
    faults_are_waited_out("EIO");
}

#[test]
fn a_disk_remounted_read_only_is_waited_out_with_nothing_lost_or_doubled() {
    faults_are_waited_out("EROFS");
}

/// A data directory restored from an older copy needs a new store epoch before it may send
/// anything; when the disk refuses the epoch file, the gateway sends nothing under the old
/// epoch (the central side would take new batches for duplicates), retries, and renews it
/// once the disk takes writes again.
#[test]
fn a_new_epoch_the_disk_refuses_is_retried_and_nothing_goes_out_under_the_old_one() {
    let broker = Mosquitto::start();
    let mut collector = Collector::new(&[]);
    let upstream = format!(
        "[upstream]\nurl = \"{}\"\nbatch_max = 5\nlinger = \"200ms\"\n",
        collector.url()
    );
    let mut gw = Gateway::with_config(&broker.url(), "", &format!("{PROCESS}{upstream}"));
    let data = gw.dir.path().join("data");
    let Some(fs) = FaultFs::mount(&gw.dir.path().join("backing"), &data) else {
        return;
    };
    collector.start();
    gw.start();
    let p = Publisher::connect(broker.port, "pub-epoch-fault");
    let mut i = 0;
    let mut publish_for = |secs: u64| {
        let until = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < until {
            let topic = format!("sensors/site{}/dev{}/temperature", i % 2, i % 8);
            p.publish(&topic, live_payload(i));
            i += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    publish_for(3);
    std::thread::sleep(Duration::from_secs(3));
    assert!(gw.stop().success(), "{}", gw.logs());
    let backup = gw.dir.path().join("copy");
    copy_dir(&data, &backup);
    let old_epoch = std::fs::read_to_string(data.join("epoch")).unwrap();
    // Life goes on: more batches reach the central side, then the older copy comes back.
    gw.start();
    publish_for(3);
    std::thread::sleep(Duration::from_secs(3));
    assert!(gw.stop().success(), "{}", gw.logs());
    for entry in std::fs::read_dir(&data).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path).unwrap();
        } else {
            std::fs::remove_file(&path).unwrap();
        }
    }
    copy_dir(&backup, &data);

    // The disk is full for the epoch file (and its temporary) when the gateway finds out.
    fs.fail("ENOSPC", &["epoch"]);
    let lines_before = collector.lines().len();
    gw.start();
    publish_for(2);
    wait_for(
        "the refused epoch in the log",
        Duration::from_secs(20),
        || gw.current_log().contains("cannot write a new epoch"),
    );
    std::thread::sleep(Duration::from_secs(3));
    let refused = fs.refusals();
    assert!(refused > 0);
    assert_eq!(
        collector.lines().len(),
        lines_before,
        "nothing is sent under the old epoch"
    );
    assert_eq!(
        std::fs::read_to_string(data.join("epoch")).unwrap(),
        old_epoch
    );
    assert!(!gw.current_log().contains("restored from an older copy"));

    fs.heal();
    wait_for(
        "the restore handled once the disk takes writes",
        Duration::from_secs(30),
        || gw.current_log().contains("restored from an older copy"),
    );
    let new_epoch = std::fs::read_to_string(data.join("epoch")).unwrap();
    assert_ne!(new_epoch, old_epoch);
    let new_epoch = u64::from_str_radix(new_epoch.trim(), 16).unwrap();
    wait_for(
        "batches under the new epoch",
        Duration::from_secs(30),
        || {
            collector.lines().iter().skip(lines_before).any(|l| {
                l["epoch"].as_u64() == Some(new_epoch)
                    || l["epoch"]
                        .as_str()
                        .and_then(|s| u64::from_str_radix(s, 16).ok())
                        == Some(new_epoch)
            })
        },
    );
    let log = gw.logs();
    assert_eq!(
        log.matches("restored from an older copy").count(),
        1,
        "one renewal: {log}"
    );
    eprintln!(
        "fault: ENOSPC on the epoch file of a restored copy ({refused} writes refused): nothing \
         sent under the old epoch, renewed after healing; {} lines of the refusal in the log",
        gw.current_log().matches("cannot write a new epoch").count()
    );
    assert!(gw.stop().success(), "{log}");
}
