//! Lifecycle under systemd: readiness and watchdog notifications, orderly and forced shutdown.

mod common;

use common::*;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Collects sd_notify datagrams sent to a socket we own (what systemd would receive).
fn notifications(sock: &UnixDatagram, until: Duration, stop_at: &str) -> Vec<String> {
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while start.elapsed() < until {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = msg.contains(stop_at);
            got.push(msg);
            if done {
                break;
            }
        }
    }
    got
}

#[test]
fn ready_is_sent_after_subscription_and_watchdog_pings_follow_progress() {
    let broker = Mosquitto::start();
    let gw = Gateway::new(&broker.url());
    let sock_path = gw.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let log = std::fs::File::create(gw.dir.path().join("lifecycle.log")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgeferry"))
        .args(["run", "-c"])
        .arg(&gw.config)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "1000000")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let got = notifications(&sock, Duration::from_secs(15), "READY=1");
    assert!(got.iter().any(|m| m.contains("READY=1")), "{got:?}");
    let log_path = gw.dir.path().join("lifecycle.log");
    wait_for("the ready log line", Duration::from_secs(5), || {
        read_all(&log_path).contains("ready: state recovered")
    });
    let logs = read_all(&log_path);
    let subscribed = logs.find("subscribed with QoS 1").expect("subscribed");
    let ready = logs.find("ready: state recovered").expect("ready");
    assert!(subscribed < ready, "READY only after the SUBACK:\n{logs}");
    // WATCHDOG_USEC=1s: pings every ~0.5 s while the commit loop makes progress.
    let later = notifications(&sock, Duration::from_secs(3), "never");
    let pings = later.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    assert!(pings >= 3, "watchdog pings in 3 s: {later:?}");
    assert!(later.iter().any(|m| m.contains("STATUS=")), "{later:?}");
    // `systemctl reload` (ExecReload= sends SIGHUP): RELOADING=1 with the monotonic time
    // systemd asks for, then READY=1 with the outcome.
    signal(child.id(), "HUP");
    let reload = notifications(&sock, Duration::from_secs(5), "READY=1");
    let reloading = reload
        .iter()
        .position(|m| m.contains("RELOADING=1") && m.contains("MONOTONIC_USEC="));
    let ready = reload
        .iter()
        .position(|m| m.contains("READY=1") && m.contains("configuration reload: unchanged"));
    assert!(
        matches!((reloading, ready), (Some(a), Some(b)) if a < b),
        "{reload:?}"
    );
    signal(child.id(), "TERM");
    let stopping = notifications(&sock, Duration::from_secs(5), "STOPPING=1");
    assert!(
        stopping.iter().any(|m| m.contains("STOPPING=1")),
        "{stopping:?}"
    );
    assert!(child.wait().unwrap().success());
}

#[test]
fn sigterm_stops_cleanly_with_exit_0_and_sigint_too() {
    let broker = Mosquitto::start();
    let mut gw = Gateway::new(&broker.url());
    gw.start();
    let st = gw.stop();
    assert_eq!(st.code(), Some(0));
    assert!(gw.current_log().contains("stopped cleanly"));
    gw.start();
    signal(gw.pid().unwrap(), "INT");
    assert!(gw.wait_exit(Duration::from_secs(20)));
    assert!(
        gw.current_log().contains("stopped cleanly"),
        "{}",
        gw.current_log()
    );
}

#[test]
fn a_second_signal_forces_exit() {
    // With the broker unreachable the shutdown is quick anyway; the point is the exit code:
    // a forced exit is not a clean stop.
    let port = free_port();
    let mut gw = Gateway::new(&format!("mqtt://127.0.0.1:{port}"));
    gw.spawn();
    wait_for("start", Duration::from_secs(10), || {
        gw.current_log().contains("admin listening")
    });
    let pid = gw.pid().unwrap();
    signal(pid, "TERM");
    signal(pid, "TERM");
    assert!(gw.wait_exit(Duration::from_secs(10)));
    let log = gw.current_log();
    assert!(
        log.contains("second signal: exiting now") || log.contains("stopped cleanly"),
        "{log}"
    );
}
