//! Crashes inside the checkpoint chain (issue 11): the gateway aborts while it writes a
//! checkpoint delta — with the delta's file complete but not yet in place, and with it in
//! place but before processing learned so — again and again while readings flow, and the
//! central side still counts every reading exactly once. Between the crashes the gateway
//! restarts from its chain (a whole checkpoint and the deltas after it) and replays the
//! journal from the newest delta on.

mod common;

use common::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Closed windows kept for a minute: most of the state is in slots that rarely change, which
/// is what deltas leave out.
const PROCESS: &str = r#"
[process]
windows = ["1s", "10s"]
allowed_lateness = "500ms"
correction_horizon = "60s"
checkpoint_interval = "300ms"
"#;

const SERIES: usize = 40;

fn publish_until_stopped(port: u16, stop: Arc<AtomicBool>) -> u64 {
    let p = Publisher::connect(port, "pub-delta-crash");
    let mut i = 0usize;
    while !stop.load(Ordering::SeqCst) {
        for _ in 0..SERIES {
            p.publish(
                &format!("sensors/site{}/dev{}/temperature", i % 2, i % SERIES),
                format!(r#"{{"value":{}}}"#, i % 97),
            );
            i += 1;
        }
        std::thread::sleep(Duration::from_millis(100)); // 400 readings/s
    }
    p.wait_acked(i, Duration::from_secs(120));
    i as u64
}

#[test]
fn crashes_while_a_checkpoint_delta_is_written_lose_and_double_nothing() {
    let broker = Mosquitto::start();
    let mut collector = Collector::new(&[]);
    let mut gw = Gateway::with_config(
        &broker.url(),
        "",
        &format!(
            "{PROCESS}[upstream]\nurl = \"{}\"\nlinger = \"200ms\"\n",
            collector.url()
        ),
    );
    collector.start();
    let stop = Arc::new(AtomicBool::new(false));
    let mut publisher = None;
    let state = gw.dir.path().join("data").join("state");
    // Odd: the delta's temporary file is complete, not in place. Even: in place, unknown to
    // the process. Later rounds crash later in the chain.
    for n in 1..=8u32 {
        gw.spawn_with_env(&[(
            edgeferry::process::DELTA_FAILPOINT_ENV,
            (n + n / 2).to_string(),
        )]);
        gw.wait_ready();
        if publisher.is_none() {
            // Only once the gateway's session exists: the broker keeps nothing for a
            // subscriber it has never seen.
            let (port, stop) = (broker.port, stop.clone());
            publisher = Some(std::thread::spawn(move || {
                publish_until_stopped(port, stop)
            }));
        }
        assert!(
            gw.wait_exit(Duration::from_secs(60)),
            "the failpoint in delta {} ended the process:\n{}",
            n + n / 2,
            gw.current_log()
        );
        let deltas = std::fs::read_dir(&state)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("checkpoint-delta-")
            })
            .count();
        assert!(deltas > 0, "the crash left a chain of deltas behind");
    }
    gw.start();
    stop.store(true, Ordering::SeqCst);
    let n = publisher.expect("started").join().unwrap();

    let logs = gw.logs();
    assert!(
        logs.matches("checkpoint loaded with").count() >= 4,
        "restarts loaded their chains with deltas:\n{logs}"
    );
    assert!(!logs.contains("damaged"), "{logs}");
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let counts = central_counts(&collector.lines());
        if counts.len() == 2 && counts.values().all(|&c| c >= n) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not every reading reached the central side: published {n}, counted {counts:?}\n{}\n{}",
            gw.admin_get("/status").unwrap_or_default(),
            gw.current_log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // Counted once: not a reading more (central_counts also checks that no window version
    // arrived twice with different contents).
    let counts = central_counts(&collector.lines());
    println!("published {n}, counted per window length {counts:?}, 8 crashes inside a delta");
    assert_eq!(counts.get(&1), Some(&n), "1 s windows");
    assert_eq!(counts.get(&10), Some(&n), "10 s windows");
    assert!(gw.stop().success());
}
