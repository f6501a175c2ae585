//! Exactly-once must not depend on the broker following MQTT-4.4.0-1 (resend unacknowledged
//! messages with the same packet id and DUP=1). Against a second, independent broker
//! implementation (aedes, from npm) and against Mosquitto, edgeferry is SIGKILLed again and
//! again while timestamped readings flow; every reading is in the journal exactly once.
//! Redeliveries the broker does not flag are recognised by the readings' own identity.

mod common;

use common::*;
use rand::RngExt;
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// An aedes broker (Node.js, npm `aedes` with its in-memory persistence; tests/node) on an
/// ephemeral loopback port. (amqtt from PyPI was tried first: 0.12.1 does not deliver what it
/// should have queued for an offline persistent session, so it cannot carry a gateway at all.)
struct Aedes {
    child: Child,
    port: u16,
}

impl Aedes {
    fn start() -> Aedes {
        let node_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node");
        assert!(
            node_dir.join("node_modules/aedes").exists(),
            "aedes is not installed: `npm ci --prefix tests/node` (scripts/test.sh does)"
        );
        let port = free_port();
        let mut child = Command::new("node")
            .arg(node_dir.join("aedes-broker.js"))
            .arg(port.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("node (Debian's nodejs) runs the aedes broker");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "listening", "aedes did not start");
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "aedes did not listen"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Aedes { child, port }
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Aedes {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Publishes `n` timestamped readings while crashing the gateway `cycles` times: SIGKILL at
/// random moments, and every other time the failpoint that aborts right after a journal sync
/// and before the acknowledgements (so the broker must redeliver what is already journaled).
/// Then lets it drain and counts the journal.
fn kills_during_a_stream(url: &str, port: u16, n: usize, cycles: usize, label: &str) {
    let mut gw = Gateway::with_config(url, "", "");
    gw.start();
    let publisher = std::thread::spawn({
        let label = label.to_string();
        move || {
            let p = Publisher::connect(port, &format!("pub-{label}"));
            for i in 0..n {
                p.publish(
                    &format!("sensors/site{}/dev{}/temperature", i % 2, i % 5),
                    format!(r#"{{"value":{i},"ts":{}}}"#, now_ms()),
                );
                if i % 20 == 19 {
                    std::thread::sleep(Duration::from_millis(6));
                }
            }
            p.wait_acked(n, Duration::from_secs(120));
        }
    });
    let mut rng = rand::rng();
    let (mut sigkills, mut failpoints) = (0, 0);
    for cycle in 0..cycles {
        if cycle % 2 == 1 {
            gw.kill9();
            let after = rng.random_range(2..20u32).to_string();
            gw.spawn_with_env(&[(edgeferry::ingest::session::FAILPOINT_ENV, after)]);
            if gw.wait_exit(Duration::from_secs(5)) {
                failpoints += 1;
            } else {
                // Nothing left to commit (the publisher was done): the failpoint cannot fire.
                gw.kill9();
                sigkills += 1;
            }
        } else {
            std::thread::sleep(Duration::from_millis(rng.random_range(50..400)));
            gw.kill9();
            sigkills += 1;
        }
        gw.start();
    }
    publisher.join().unwrap();
    let readings = || gw.metric("edgeferry_ingest_readings_total").unwrap_or(0.0);
    let start = Instant::now();
    let mut last = readings();
    // Drained: nothing new for 3 s.
    loop {
        std::thread::sleep(Duration::from_secs(3));
        let now = readings();
        if now == last || start.elapsed() > Duration::from_secs(60) {
            break;
        }
        last = now;
    }
    assert!(gw.stop().success());
    // Every run's log says how many redeliveries it recognised and dropped.
    let recognised: u64 = gw
        .logs()
        .lines()
        .filter_map(|l| {
            l.split("dropped ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    let values: Vec<f64> = gw.journal().iter().map(|r| r.value).collect();
    let distinct: std::collections::BTreeSet<u64> = values.iter().map(|v| *v as u64).collect();
    eprintln!(
        "fault: {label}, {sigkills} SIGKILLs and {failpoints} crashes between journal sync and \
         acks; published {n}, journaled {}, lost {}, doubled {}, redeliveries recognised and \
         dropped {recognised}",
        values.len(),
        n - distinct.len(),
        values.len() - distinct.len()
    );
    assert_exactly_once(values, n);
    assert!(failpoints >= 1, "the crash after the sync happened");
    assert!(
        recognised > 0,
        "the broker redelivered and edgeferry recognised it"
    );
}

#[test]
fn kills_against_aedes_lose_nothing_and_double_nothing() {
    let broker = Aedes::start();
    kills_during_a_stream(&broker.url(), broker.port, 6000, 6, "aedes");
}

#[test]
fn kills_against_mosquitto_lose_nothing_and_double_nothing() {
    let broker = Mosquitto::start();
    kills_during_a_stream(&broker.url(), broker.port, 6000, 6, "mosquitto");
}
