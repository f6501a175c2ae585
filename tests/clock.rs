//! The wall clock is not trusted for intervals and does not decide what is late: edgeferry
//! runs under libfaketime (Debian's `faketime`), whose offset the test steps by rewriting a
//! file while readings flow through a real Mosquitto; the monotonic clock is left alone, as a
//! real NTP step or `date -s` leaves it. Every reading is counted once at the central side,
//! nothing is dropped as too late, and each step is counted and logged once. An unsynchronised
//! clock an hour away from its sensors rejects nothing and says it is suspect.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// libfaketime's preload library, wherever Debian put it for this architecture.
fn faketime_lib() -> PathBuf {
    let found = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("faketime/libfaketime.so.1"))
        .find(|p| p.exists());
    found.unwrap_or_else(|| {
        panic!(
            "libfaketime is not installed (apt-get install faketime; scripts/test.sh does): \
             these tests step the daemon's wall clock with it"
        )
    })
}

/// The offset file libfaketime reads (re-read every call: `FAKETIME_NO_CACHE`).
struct FakeWall {
    file: PathBuf,
}

impl FakeWall {
    fn new(dir: &Path) -> FakeWall {
        let w = FakeWall {
            file: dir.join("faketime.rc"),
        };
        w.set(0);
        w
    }

    /// The daemon's wall clock runs `offset_s` from the real one from now on.
    fn set(&self, offset_s: i64) {
        let tmp = self.file.with_extension("tmp");
        std::fs::write(&tmp, format!("{offset_s:+}\n")).unwrap();
        std::fs::rename(&tmp, &self.file).unwrap();
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("LD_PRELOAD", faketime_lib().display().to_string()),
            ("FAKETIME_TIMESTAMP_FILE", self.file.display().to_string()),
            ("FAKETIME_NO_CACHE", "1".into()),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1".into()),
        ]
    }
}

fn config(collector: &Collector, clock: &str) -> String {
    format!(
        "[process]\nwindows = [\"5s\"]\nallowed_lateness = \"1s\"\ncorrection_horizon = \"4s\"\n\
         checkpoint_interval = \"500ms\"\n\n\
         [upstream]\nurl = \"{}\"\nbatch_max = 50\nlinger = \"200ms\"\n\n\
         [clock]\nsynchronised = \"{clock}\"\n",
        collector.url()
    )
}

/// Publishes one reading every 10 ms for `secs`: arrival-timed (`plain/…`, a bare number) or
/// with the sensor's own timestamp (`sensors/…`, JSON with `ts` from the real clock, shifted
/// by `sensor_offset_ms`).
fn publish_for(
    p: &Publisher,
    from: usize,
    secs: f64,
    timestamped: bool,
    sensor_offset_ms: i64,
) -> usize {
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let mut i = from;
    while Instant::now() < until {
        if timestamped {
            let ts = now_ms() as i64 + sensor_offset_ms;
            p.publish(
                &format!("sensors/site{}/dev{}/temperature", i % 2, i % 4),
                format!(r#"{{"value":{i},"ts":{ts}}}"#),
            );
        } else {
            p.publish(&format!("plain/dev{}/temperature", i % 4), i.to_string());
        }
        i += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    i
}

fn counted(collector: &Collector) -> u64 {
    central_counts(&collector.lines())
        .get(&5)
        .copied()
        .unwrap_or(0)
}

/// Waits until the first `n` readings are counted at the central side, then checks that
/// nothing more arrives and nothing was too late.
fn all_counted_none_late(p: &Publisher, gw: &Gateway, collector: &Collector, n: usize) {
    p.wait_acked(n, Duration::from_secs(30));
    wait_for(
        "every reading at the central side",
        Duration::from_secs(60),
        || counted(collector) >= n as u64,
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(metric(gw, "edgeferry_process_too_late_total"), 0.0);
    assert_eq!(counted(collector), n as u64);
}

fn metric(gw: &Gateway, name: &str) -> f64 {
    gw.metric(name).unwrap_or(0.0)
}

/// Runs the daemon under a fake wall clock, steps it through `offsets` (seconds, each held
/// for `hold_s` while readings flow) and checks the far end.
fn steps_lose_nothing(
    timestamped: bool,
    offsets: &[i64],
    expected_steps: f64,
) -> (Gateway, Collector) {
    let broker = Mosquitto::start();
    let mut collector = Collector::new(&[]);
    collector.start();
    let mut gw = Gateway::with_config(&broker.url(), "", &config(&collector, "yes"));
    let wall = FakeWall::new(gw.dir.path());
    gw.spawn_with_env(&wall.env());
    gw.wait_ready();
    let p = Publisher::connect(
        broker.port,
        if timestamped {
            "pub-clock-ts"
        } else {
            "pub-clock-arrival"
        },
    );
    let mut i = publish_for(&p, 0, 2.0, timestamped, 0);
    for &offset in offsets {
        wall.set(offset);
        i = publish_for(&p, i, 3.0, timestamped, 0);
    }
    p.wait_acked(i, Duration::from_secs(30));
    wait_for(
        "every reading at the central side",
        Duration::from_secs(60),
        || counted(&collector) >= i as u64,
    );
    std::thread::sleep(Duration::from_secs(2));
    let total = counted(&collector);
    let too_late = metric(&gw, "edgeferry_process_too_late_total");
    let steps = metric(&gw, "edgeferry_clock_steps_total");
    let log = gw.current_log();
    let logged = log.matches("the wall clock stepped").count();
    eprintln!(
        "{} readings, wall clock offsets {offsets:?} s: published {i}, counted {total}, \
         too late {too_late}, steps counted {steps}, logged {logged}",
        if timestamped {
            "timestamped"
        } else {
            "arrival-time"
        }
    );
    assert_eq!(
        too_late, 0.0,
        "nothing is late because the gateway's clock moved"
    );
    assert_eq!(total, i as u64, "every reading once");
    assert_eq!(steps, expected_steps, "each step counted once:\n{log}");
    assert_eq!(
        logged as f64, expected_steps,
        "each step logged once:\n{log}"
    );
    (gw, collector)
}

#[test]
fn arrival_times_lose_nothing_when_the_wall_clock_steps_back_an_hour_for_a_while_and_for_good() {
    // Back an hour, put right again (not a second step: arrival times were held meanwhile),
    // then back an hour for good (a second step, held until the wall clock catches up).
    let (mut gw, _c) = steps_lose_nothing(false, &[-3600, 0, -3600], 2.0);
    let s: serde_json::Value = serde_json::from_str(&gw.admin_get("/status").unwrap()).unwrap();
    let ahead = s["clock"]["ahead_of_wall_ms"].as_i64().unwrap();
    assert!(
        (3_590_000..=3_610_000).contains(&ahead),
        "arrival times run an hour ahead of the stepped-back wall clock: {s}"
    );
    let (st, out, _) = gw.command(&["status"]);
    assert_eq!(st.code(), Some(3), "{out}");
    assert!(
        out.contains("DEGRADED clock suspect: the wall clock is"),
        "{out}"
    );
    assert!(out.contains("2 step(s), the last back by 1h"), "{out}");
    assert!(gw.stop().success());
}

#[test]
fn timestamped_readings_lose_nothing_when_the_wall_clock_steps_back_and_forward() {
    // Back (held), put right, an hour forward (followed), back to the real time (held).
    let (mut gw, _c) = steps_lose_nothing(true, &[-3600, 0, 3600, 0], 3.0);
    assert!(gw.stop().success());
}

#[test]
fn a_restart_behind_the_recorded_arrival_times_goes_on_from_them() {
    let broker = Mosquitto::start();
    let mut collector = Collector::new(&[]);
    collector.start();
    let mut gw = Gateway::with_config(&broker.url(), "", &config(&collector, "yes"));
    let wall = FakeWall::new(gw.dir.path());
    gw.spawn_with_env(&wall.env());
    gw.wait_ready();
    let p = Publisher::connect(broker.port, "pub-clock-restart");
    let i = publish_for(&p, 0, 2.0, false, 0);
    gw.kill9();
    // The gateway comes back an hour in the past (a board without a battery clock).
    wall.set(-3600);
    gw.spawn_with_env(&wall.env());
    gw.wait_ready();
    let n = publish_for(&p, i, 3.0, false, 0);
    all_counted_none_late(&p, &gw, &collector, n);
    assert!(
        gw.current_log()
            .contains("behind the last arrival time this data directory recorded"),
        "{}",
        gw.current_log()
    );
    // NTP then sets the real time: followed, and what follows is counted too.
    wall.set(0);
    let m = publish_for(&p, n, 3.0, false, 0);
    all_counted_none_late(&p, &gw, &collector, m);
    assert!(gw.stop().success());
}

/// An unsynchronised gateway `gateway_offset_s` away from sensors that are right.
fn unsynchronised_clock_rejects_nothing(gateway_offset_s: i64) {
    let broker = Mosquitto::start();
    let mut collector = Collector::new(&[]);
    collector.start();
    let mut gw = Gateway::with_config(&broker.url(), "", &config(&collector, "no"));
    let wall = FakeWall::new(gw.dir.path());
    wall.set(gateway_offset_s);
    gw.spawn_with_env(&wall.env());
    gw.wait_ready();
    let p = Publisher::connect(broker.port, "pub-clock-unsync");
    let n = publish_for(&p, 0, 4.0, true, 0);
    p.wait_acked(n, Duration::from_secs(30));
    wait_for(
        "every reading at the central side",
        Duration::from_secs(60),
        || counted(&collector) >= n as u64,
    );
    std::thread::sleep(Duration::from_secs(2));
    let rejected = metric(&gw, "edgeferry_ingest_rejected_total");
    let too_late = metric(&gw, "edgeferry_process_too_late_total");
    let total = counted(&collector);
    eprintln!(
        "gateway clock {gateway_offset_s:+} s from its sensors, not synchronised: published {n}, \
         counted {total}, rejected {rejected}, too late {too_late}"
    );
    assert_eq!(rejected, 0.0, "an unsynchronised clock judges no timestamp");
    assert_eq!(too_late, 0.0);
    assert_eq!(total, n as u64);
    // The windows are the sensors' own: every aggregate starts within the real publish time.
    let real_now = now_ms() as i64;
    for l in collector
        .lines()
        .iter()
        .filter(|l| l["kind"] == "aggregate")
    {
        let start = l["window_start"].as_str().unwrap();
        let t = time::OffsetDateTime::parse(start, &time::format_description::well_known::Rfc3339)
            .unwrap();
        let ms = (t.unix_timestamp_nanos() / 1_000_000) as i64;
        assert!(
            (real_now - 120_000..=real_now).contains(&ms),
            "window {start} is on the sensors' time, not the gateway's"
        );
    }
    let s: serde_json::Value = serde_json::from_str(&gw.admin_get("/status").unwrap()).unwrap();
    assert_eq!(s["clock"]["synchronised"], false, "{s}");
    assert!(s["clock"]["disagreements"].as_u64().unwrap() > 0, "{s}");
    let (st, out, _) = gw.command(&["status"]);
    assert_eq!(st.code(), Some(3), "{out}");
    let way = if gateway_offset_s < 0 {
        "ahead of"
    } else {
        "behind"
    };
    assert!(
        out.contains(&format!(
            "DEGRADED clock suspect: this gateway's clock is not synchronised (NTP) and sensor \
             timestamps are 1h {way} it"
        )),
        "{out}"
    );
    assert!(out.contains("clock    NOT synchronised"), "{out}");
    assert!(gw.stop().success());
}

#[test]
fn an_unsynchronised_clock_an_hour_behind_its_sensors_rejects_nothing_and_is_suspect() {
    unsynchronised_clock_rejects_nothing(-3600);
}

#[test]
fn an_unsynchronised_clock_an_hour_ahead_of_its_sensors_rejects_nothing_and_is_suspect() {
    unsynchronised_clock_rejects_nothing(3600);
}

#[test]
fn a_synchronised_clock_still_rejects_timestamps_from_the_future() {
    let broker = Mosquitto::start();
    let mut collector = Collector::new(&[]);
    collector.start();
    let mut gw = Gateway::with_config(&broker.url(), "", &config(&collector, "yes"));
    gw.start();
    let p = Publisher::connect(broker.port, "pub-clock-future");
    let n = publish_for(&p, 0, 0.5, true, 3_600_000);
    p.wait_acked(n, Duration::from_secs(10));
    wait_for("the rejections", Duration::from_secs(10), || {
        metric(&gw, "edgeferry_ingest_rejected_total") >= n as f64
    });
    let (st, out, _) = gw.command(&["status"]);
    assert_eq!(st.code(), Some(3), "{out}");
    assert!(
        out.contains("ahead of this gateway's clock (mqtt.future_skew)"),
        "{out}"
    );
    assert!(out.contains("clock    synchronised"), "{out}");
    assert!(gw.stop().success());
}
