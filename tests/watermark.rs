//! Windows close on a watermark driven by the data, not by the wall clock: readings with their
//! own timestamps that the broker (persistence on) queued while edgeferry was stopped, for far
//! longer than `allowed_lateness` + `correction_horizon`, land in the windows of their own event
//! times when it starts again, each counted exactly once at the central side, none "too late".

mod common;

use common::*;
use std::time::{Duration, Instant};

const LATENESS_S: u64 = 1;
const HORIZON_S: u64 = 4;

fn config(collector: &Collector) -> String {
    format!(
        "[process]\nwindows = [\"5s\"]\nallowed_lateness = \"{LATENESS_S}s\"\n\
         correction_horizon = \"{HORIZON_S}s\"\ncheckpoint_interval = \"500ms\"\n\n\
         [upstream]\nurl = \"{}\"\nbatch_max = 50\nlinger = \"200ms\"\n",
        collector.url()
    )
}

fn topic(i: usize) -> String {
    format!("sensors/site{}/dev{}/temperature", i % 2, i % 8)
}

fn metric(gw: &Gateway, name: &str) -> f64 {
    gw.metric(name).unwrap_or(0.0)
}

/// Publishes one timestamped reading every 10 ms for `secs`, from index `from`.
fn publish_for(p: &Publisher, from: usize, secs: f64) -> usize {
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let mut i = from;
    while Instant::now() < until {
        p.publish(&topic(i), live_payload(i));
        i += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    i
}

fn stopped_longer_than_the_horizon(kill: bool) {
    let broker = Mosquitto::start();
    let mut collector = Collector::new(&[]);
    collector.start();
    let mut gw = Gateway::with_config(&broker.url(), "", &config(&collector));
    gw.start();
    let p = Publisher::connect(
        broker.port,
        if kill { "pub-wm-kill" } else { "pub-wm-term" },
    );
    let i = publish_for(&p, 0, 3.0);
    std::thread::sleep(Duration::from_millis(700));
    if kill {
        gw.kill9();
    } else {
        assert!(gw.stop().success());
    }
    // Three times lateness + horizon: by the wall clock, all of this is far too late.
    let stop = Duration::from_secs(3 * (LATENESS_S + HORIZON_S));
    let queued_from = i;
    let i = publish_for(&p, i, stop.as_secs_f64());
    gw.start();
    let n = publish_for(&p, i, 3.0);
    p.wait_acked(n, Duration::from_secs(30));
    let total = || {
        central_counts(&collector.lines())
            .get(&5)
            .copied()
            .unwrap_or(0)
    };
    wait_for(
        "every reading at the central side",
        Duration::from_secs(60),
        || total() >= n as u64,
    );
    std::thread::sleep(Duration::from_secs(2));
    let too_late = metric(&gw, "edgeferry_process_too_late_total");
    let counted = total();
    eprintln!(
        "fault: edgeferry {} for {stop:?} (lateness {LATENESS_S} s, horizon {HORIZON_S} s), \
         {} readings queued meanwhile; published {n}, counted {counted}, too late {too_late}",
        if kill { "SIGKILLed" } else { "stopped" },
        i - queued_from
    );
    assert_eq!(too_late, 0.0, "nothing is late relative to the data");
    assert_eq!(counted, n as u64, "each reading once, in its own window");
    // And in the windows of their own event times: windows that ended while edgeferry was
    // stopped were filled and emitted after it started.
    let lines = collector.lines();
    let starts: std::collections::BTreeSet<&str> = lines
        .iter()
        .filter(|l| l["kind"] == "aggregate")
        .filter_map(|l| l["window_start"].as_str())
        .collect();
    assert!(
        starts.len() as u64 >= stop.as_secs() / 5,
        "windows of the stopped period exist: {starts:?}"
    );
    assert!(gw.stop().success());
}

#[test]
fn readings_queued_while_edgeferry_was_stopped_land_in_their_own_windows() {
    stopped_longer_than_the_horizon(false);
}

#[test]
fn readings_queued_while_edgeferry_was_killed_land_in_their_own_windows() {
    stopped_longer_than_the_horizon(true);
}

#[test]
fn readings_too_late_for_the_data_make_the_status_degraded_with_the_reason() {
    let broker = Mosquitto::start();
    let mut collector = Collector::new(&[]);
    collector.start();
    let mut gw = Gateway::with_config(&broker.url(), "", &config(&collector));
    gw.start();
    let p = Publisher::connect(broker.port, "pub-wm-degraded");
    let i = publish_for(&p, 0, 2.0);
    let (st, out, _) = gw.command(&["status"]);
    assert_eq!(st.code(), Some(0), "healthy before: {out}");
    // A reading a minute older than everything else: far beyond the horizon behind the data.
    let old = format!(r#"{{"value":{i},"ts":{}}}"#, now_ms() - 60_000);
    p.publish(&topic(i), old);
    p.wait_acked(i + 1, Duration::from_secs(10));
    wait_for("the drop to be counted", Duration::from_secs(10), || {
        metric(&gw, "edgeferry_process_too_late_total") >= 1.0
    });
    let (st, out, _) = gw.command(&["status"]);
    assert_eq!(st.code(), Some(3), "{out}");
    assert!(out.contains(": DEGRADED"), "{out}");
    assert!(
        out.contains("DEGRADED 1 reading(s) dropped as too late since start"),
        "{out}"
    );
    assert!(gw.stop().success());
}
