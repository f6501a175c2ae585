//! A sensor's QoS 1 resend after a broker restart reaches edgeferry as a new message (new
//! packet id, DUP=0). It is recognised by the readings' identity among the first messages of
//! *every* connection, also one on which the broker kept edgeferry's session (found by
//! tests/soak.rs: the window used to open only on the first connection of the process and
//! after a lost session, so later resends were journaled twice).

mod common;

use common::*;
use std::time::Duration;

fn topic(i: usize) -> String {
    format!("sensors/a/dev{}/temperature", i % 10)
}

#[test]
fn a_resend_after_a_broker_restart_that_kept_the_session_is_not_journaled_twice() {
    let mut broker = Mosquitto::start();
    // Recent-commit bound 2 × 10 + 5 = 25: the first connection's identity window is used up
    // long before the restart.
    let mut gw = Gateway::with_config(&broker.url(), "max_unacked = 10\ncommit_max = 5", "");
    gw.start();
    let n = 100;
    {
        let p = Publisher::connect(broker.port, "pub-before");
        for i in 0..n {
            p.publish(&topic(i), reading_payload(i));
        }
        p.wait_acked(n, Duration::from_secs(30));
    }
    wait_for("every reading journaled", Duration::from_secs(20), || {
        gw.metric("edgeferry_ingest_readings_total")
            .is_some_and(|v| v >= n as f64)
    });
    broker.restart();
    wait_for("the reconnect", Duration::from_secs(20), || {
        gw.current_log().matches("connected to MQTT broker").count() >= 2
    });
    assert!(
        gw.current_log().contains("session_present=true"),
        "the broker kept the session:\n{}",
        gw.current_log()
    );
    let p = Publisher::connect(broker.port, "pub-after");
    // The last reading again, as a sensor whose PUBACK was lost resends it, then a new one.
    p.publish(&topic(n - 1), reading_payload(n - 1));
    p.publish(&topic(n), reading_payload(n));
    p.wait_acked(2, Duration::from_secs(20));
    wait_for("the new reading journaled", Duration::from_secs(20), || {
        gw.metric("edgeferry_ingest_duplicates_dropped_total")
            .is_some_and(|v| v >= 1.0)
            || gw
                .metric("edgeferry_ingest_readings_total")
                .is_some_and(|v| v > n as f64 + 1.0)
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(gw.stop().success());
    assert_exactly_once(gw.journal().iter().map(|r| r.value), n + 1);
}
