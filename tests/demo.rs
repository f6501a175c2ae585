//! `edgeferry demo` end to end, and the embedded broker (`[mqtt] embedded_broker`) with a
//! foreign client (Mosquitto's `mosquitto_pub`, installed by scripts/test.sh).

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The number after `label` on the report line that starts with it.
fn report_number(out: &str, label: &str) -> u64 {
    let line = out
        .lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no line starting with {label:?} in:\n{out}"));
    line[label.len()..]
        .split(|c: char| !c.is_ascii_digit())
        .find(|s| !s.is_empty())
        .unwrap_or_else(|| panic!("no number in {line:?}"))
        .parse()
        .unwrap()
}

#[test]
fn demo_runs_for_20_seconds_and_its_closing_report_matches() {
    let keep = tempfile::tempdir().unwrap();
    let data = keep.path().join("demo");
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_edgeferry"))
        .args(["demo", "--duration", "20s", "--keep"])
        .arg(&data)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let log = read_all(&data.join("demo.log"));
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}\nlog:\n{log}"
    );
    assert!(took < Duration::from_secs(45), "took {took:?}:\n{stdout}");
    assert!(stdout.contains("RESULT: MATCH"), "{stdout}");
    assert!(!stdout.contains("MISMATCH"), "{stdout}");
    let published = report_number(&stdout, "readings published by the sensors");
    // 9 sensors x 2 metrics x 5/s x 20 s, less the silent one: well above 1000.
    assert!(published > 1000, "{stdout}");
    for w in ["5s", "10s"] {
        let line = format!("readings counted at the collector, {w:>3} windows");
        assert_eq!(report_number(&stdout, &line), published, "{stdout}");
    }
    let raised = report_number(&stdout, "alerts seen at the collector: raised");
    assert!(raised >= 1, "{stdout}");
    assert!(stdout.contains("overheat"), "{stdout}");
    // The live lines show the upstream outage and its backlog.
    assert!(stdout.contains("upstream DOWN"), "{stdout}");
    assert!(
        stdout.contains("backlog ") && stdout.contains(" batches/"),
        "{stdout}"
    );
    assert!(stdout.contains("dashboard   http://127.0.0.1:"), "{stdout}");
    // The collector's own output agrees with the report, independently computed.
    let mut lines = Vec::new();
    for line in read_all(&data.join("collector/out/demo-gateway.jsonl")).lines() {
        lines.push(serde_json::from_str::<serde_json::Value>(line).unwrap());
    }
    let counts = central_counts(&lines);
    assert_eq!(counts.get(&5), Some(&published), "{counts:?}");
    assert_eq!(counts.get(&10), Some(&published), "{counts:?}");
}

#[test]
fn embedded_broker_accepts_mosquitto_pub_and_readings_reach_the_journal() {
    let port = free_port();
    let url = format!("mqtt://127.0.0.1:{port}");
    let mut gw = Gateway::with_config(&url, &format!("embedded_broker = \"127.0.0.1:{port}\""), "");
    gw.start();
    assert!(
        gw.current_log()
            .contains("embedded MQTT broker (rumqttd) listening"),
        "{}",
        gw.current_log()
    );
    let n = 50usize;
    // One connection, QoS 1, one message per line.
    let lines: String = (0..n)
        .map(|i| format!("{}\n", reading_payload(i)))
        .collect();
    let mut child = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-q", "1", "-i", "mosquitto-pub-test"])
        .args(["-t", "sensors/site-1/dev-1/temperature", "-l"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_pub (package mosquitto-clients; scripts/test.sh installs it)");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(lines.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "mosquitto_pub failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A second, separate publish with the plain number format.
    let st = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
        .args(["-t", "plain/dev-9/humidity", "-m", "47.5"])
        .status()
        .unwrap();
    assert!(st.success());
    wait_for(
        "the readings to be journaled",
        Duration::from_secs(10),
        || {
            let (_, s, _) = gw.command(&["status", "--json"]);
            serde_json::from_str::<serde_json::Value>(&s)
                .map(|v| v["ingest"]["readings"].as_u64() == Some(n as u64 + 1))
                .unwrap_or(false)
        },
    );
    assert!(gw.stop().success(), "{}", gw.current_log());
    let journal = gw.journal();
    let temps: Vec<f64> = journal
        .iter()
        .filter(|r| r.metric == "temperature")
        .map(|r| r.value)
        .collect();
    assert_exactly_once(temps, n);
    assert!(
        journal
            .iter()
            .any(|r| r.metric == "humidity" && r.value == 47.5 && r.tags["device"] == "dev-9")
    );
}

#[test]
fn a_taken_embedded_broker_port_is_a_clear_start_up_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let url = format!("mqtt://127.0.0.1:{port}");
    let mut gw = Gateway::with_config(&url, &format!("embedded_broker = \"127.0.0.1:{port}\""), "");
    gw.spawn();
    assert!(
        gw.wait_exit(Duration::from_secs(20)),
        "{}",
        gw.current_log()
    );
    let log = gw.current_log();
    assert!(
        log.contains(&format!("embedded broker on 127.0.0.1:{port}")),
        "{log}"
    );
    drop(taken);
}

/// Measurement for docs/DECISIONS.md ("Embedded broker"), not a pass/fail check: what an
/// embedded broker loses when edgeferry stops while readings are queued in it. Run with
/// `cargo test --test demo -- --ignored --nocapture measure_`.
fn measure_loss_at_stop(kill: bool) {
    let port = free_port();
    let url = format!("mqtt://127.0.0.1:{port}");
    let mut gw = Gateway::with_config(&url, &format!("embedded_broker = \"127.0.0.1:{port}\""), "");
    gw.start();
    let publisher = Publisher::connect(port, "burst");
    let n = 40_000;
    let mut sent = 0;
    for i in 0..n {
        publisher.publish("sensors/s/d/temperature", reading_payload(i));
        sent += 1;
        if publisher.acked() >= 15_000 {
            break;
        }
    }
    let acked_before = publisher.acked();
    if kill {
        gw.kill9();
    } else {
        assert!(gw.stop().success(), "{}", gw.current_log());
    }
    std::thread::sleep(Duration::from_millis(200));
    let acked = publisher.acked();
    drop(publisher);
    let journal = gw.journal();
    let mut have = vec![false; n];
    for r in &journal {
        have[r.value as usize] = true;
    }
    // QoS 1 PUBACKs come in publish order: the first `acked` readings were accepted.
    let lost = (0..acked).filter(|&i| !have[i]).count();
    eprintln!(
        "{}: sent {sent}, PUBACKed {acked} ({acked_before} when stopping), journaled {}, \
         PUBACKed but lost {lost}",
        if kill { "SIGKILL" } else { "SIGTERM" },
        journal.len()
    );
}

#[test]
#[ignore]
fn measure_embedded_broker_loss_at_sigkill() {
    measure_loss_at_stop(true);
}

#[test]
#[ignore]
fn measure_embedded_broker_loss_at_sigterm() {
    measure_loss_at_stop(false);
}

/// Measurement for docs/DECISIONS.md: how fast readings go broker → journal through the
/// embedded broker and through Mosquitto, for the same burst.
#[test]
#[ignore]
fn measure_drain_rate_embedded_vs_mosquitto() {
    for embedded in [true, false] {
        let mosquitto = (!embedded).then(Mosquitto::start);
        let port = mosquitto.as_ref().map(|m| m.port).unwrap_or_else(free_port);
        let url = format!("mqtt://127.0.0.1:{port}");
        let extra = if embedded {
            format!("embedded_broker = \"127.0.0.1:{port}\"")
        } else {
            String::new()
        };
        let mut gw = Gateway::with_config(&url, &extra, "");
        gw.start();
        let publisher = Publisher::connect(port, "burst");
        let n = 20_000;
        let started = Instant::now();
        for i in 0..n {
            publisher.publish("sensors/s/d/temperature", reading_payload(i));
        }
        publisher.wait_acked(n, Duration::from_secs(60));
        let acked_in = started.elapsed();
        let status = || {
            let (_, s, _) = gw.command(&["status", "--json"]);
            serde_json::from_str::<serde_json::Value>(&s)
                .ok()
                .and_then(|v| v["ingest"]["readings"].as_u64())
                .unwrap_or(0)
        };
        wait_for("all journaled", Duration::from_secs(120), || {
            status() == n as u64
        });
        let journaled_in = started.elapsed();
        eprintln!(
            "{}: {n} readings PUBACKed to the publisher in {acked_in:?}, all journaled in \
             {journaled_in:?} ({:.0}/s)",
            if embedded {
                "embedded rumqttd"
            } else {
                "Mosquitto"
            },
            n as f64 / journaled_in.as_secs_f64()
        );
        assert!(gw.stop().success());
    }
}
