//! Flash wear (issue 11): what the gateway makes the disk write for what its sensors send.
//!
//! SD cards and eMMC wear out by the bytes written to them, so the bytes the kernel counts
//! for the daemon (`write_bytes` of `/proc/PID/io`: journal, outbox, checkpoint, every file)
//! are measured against the payload bytes the sensors published, with the example config's
//! shape (windows 10 s and 1 min, lateness 5 s, a rule, an upstream collector connected)
//! and its commit and checkpoint defaults. A bound on bytes, not a timing: it holds on a slow
//! machine as on a fast one. `cargo bench --bench flash` measures the same at fleet sizes.

mod common;

use common::flash::{example_shaped, proc_write_bytes, publish_evenly};
use common::{Collector, Gateway, Mosquitto, Publisher, wait_for};
use std::time::{Duration, Instant};

#[test]
fn two_hundred_sensors_at_five_hertz_write_at_most_four_bytes_per_payload_byte() {
    let broker = Mosquitto::start();
    let mut collector = Collector::new(&[]);
    collector.start();
    let mut gw = Gateway::new(&broker.url());
    std::fs::write(
        &gw.config,
        example_shaped(&gw, "gw-flash", &broker.url(), &collector.url()),
    )
    .unwrap();
    gw.start();
    wait_for("the upstream link", Duration::from_secs(20), || {
        gw.metric("edgeferry_upstream_connected") == Some(1.0)
    });
    let pid = gw.pid().unwrap();
    let publisher = Publisher::connect(broker.port, "flash-sensors");
    let (sensors, hz, secs) = (200usize, 5u64, 20u64);
    let syncs_before = gw.metric("edgeferry_disk_syncs_total").unwrap_or(0.0);
    let checkpoint_before = gw
        .metric("edgeferry_checkpoint_written_bytes_total")
        .unwrap_or(0.0);
    let before = proc_write_bytes(pid);
    let t0 = Instant::now();
    let (sent, payload_bytes) = publish_evenly(&publisher, sensors, hz, secs, |_| None);
    publisher.wait_acked(sent, Duration::from_secs(30));
    wait_for("every reading journaled", Duration::from_secs(30), || {
        gw.metric("edgeferry_ingest_readings_total") == Some(sent as f64)
    });
    let written = proc_write_bytes(pid) - before;
    let syncs = gw.metric("edgeferry_disk_syncs_total").unwrap_or(0.0) - syncs_before;
    let checkpoint = gw
        .metric("edgeferry_checkpoint_written_bytes_total")
        .unwrap_or(0.0)
        - checkpoint_before;
    let per_payload = written as f64 / payload_bytes as f64;
    let elapsed = t0.elapsed().as_secs_f64();
    eprintln!(
        "flash: {sensors} sensors × {hz} Hz for {secs} s: {sent} readings, {payload_bytes} payload \
         bytes; the daemon wrote {written} bytes = {:.0} per reading, {per_payload:.2} per payload \
         byte ({:.2} GB/day); {:.0} syncs/s, checkpoints {:.0} bytes/s",
        written as f64 / sent as f64,
        written as f64 / elapsed * 86_400.0 / 1e9,
        syncs / elapsed,
        checkpoint / elapsed,
    );
    assert!(
        per_payload <= 4.0,
        "the gateway wrote {per_payload:.2} bytes per payload byte (at most 4 wanted)"
    );
    // The daemon's own figure agrees with the kernel's (it samples every 10 s).
    let own = gw.metric("edgeferry_disk_written_bytes_total").unwrap();
    assert!(own > 0.0 && own <= proc_write_bytes(pid) as f64, "{own}");
}
