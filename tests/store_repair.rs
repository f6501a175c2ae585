//! `edgeferry store verify` and `edgeferry store repair` against stores written by a real
//! gateway (real Mosquitto), and the daemon's own promise: a damaged store never keeps it from
//! starting.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

const TOPIC: &str = "sensors/a/d1/temperature";

/// Waits until the running gateway has journaled `n` readings since it started.
fn wait_journaled(gw: &Gateway, n: u64) {
    wait_for(
        &format!("{n} readings journaled"),
        Duration::from_secs(30),
        || {
            let (_, out, _) = gw.command(&["status", "--json"]);
            serde_json::from_str::<serde_json::Value>(&out)
                .ok()
                .and_then(|v| v["ingest"]["readings"].as_u64())
                .is_some_and(|r| r >= n)
        },
    );
}

/// Starts the gateway, sends readings 0..n, waits until all are journaled and stops it
/// cleanly.
fn ingest(broker: &Mosquitto, gw: &mut Gateway, n: usize) {
    gw.start();
    let p = Publisher::connect(broker.port, "pub-store");
    for i in 0..n {
        p.publish(TOPIC, reading_payload(i));
    }
    p.wait_acked(n, Duration::from_secs(30));
    wait_journaled(gw, n as u64);
    let st = gw.stop();
    assert!(st.success(), "clean stop: {st}\n{}", gw.logs());
}

fn data(gw: &Gateway) -> PathBuf {
    gw.dir.path().join("data")
}

/// The journal's only segment (the test config uses 256 MiB segments).
fn journal_segment(gw: &Gateway) -> PathBuf {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(data(gw).join("journal"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    assert_eq!(segs.len(), 1, "{segs:?}");
    segs.pop().unwrap()
}

/// Byte offsets where the records of a segment file start (header 20 bytes, then frames of
/// `len u32 | crc u32 | lsn u64 | payload`).
/// Where each record's frame starts and ends in a segment file. Padding frames (lsn field all
/// ones: the journal pads every sync to a page boundary) are no records and are skipped.
fn record_frames(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    let mut pos = 20;
    while pos + 16 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
        let lsn = u64::from_le_bytes(bytes[pos + 8..pos + 16].try_into().unwrap());
        if lsn != u64::MAX {
            v.push((pos, pos + 16 + len));
        }
        pos += 16 + len;
    }
    v
}

fn frame_starts(bytes: &[u8]) -> Vec<usize> {
    record_frames(bytes).into_iter().map(|f| f.0).collect()
}

fn verify_json(gw: &Gateway) -> (Option<i32>, serde_json::Value) {
    let (st, out, err) = gw.command(&["store", "verify", "--json"]);
    let v = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    (st.code(), v)
}

/// Values in the journal, checked to be distinct and all below `n`.
fn journal_values(gw: &Gateway, n: usize) -> Vec<usize> {
    let mut v: Vec<usize> = gw.journal().iter().map(|r| r.value as usize).collect();
    v.sort();
    let len = v.len();
    v.dedup();
    assert_eq!(v.len(), len, "no duplicates");
    assert!(v.iter().all(|&x| x < n), "{v:?}");
    v
}

/// Starts the gateway (it must reach ready), sends one more reading, stops it, and returns
/// the lsn that reading got.
fn restart_and_ingest_one(broker: &Mosquitto, gw: &mut Gateway, value: usize) -> u64 {
    gw.start();
    let p = Publisher::connect(broker.port, "pub-after");
    p.publish(TOPIC, reading_payload(value));
    p.wait_acked(1, Duration::from_secs(20));
    wait_journaled(gw, 1);
    assert!(gw.stop().success(), "{}", gw.current_log());
    let (st, out, err) = gw.command(&["dump-journal"]);
    assert!(st.success(), "{err}");
    let lsn = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|r| r["readings"][0]["value"].as_f64() == Some(value as f64))
        .unwrap_or_else(|| panic!("reading {value} not journaled:\n{out}"))["lsn"]
        .as_u64()
        .unwrap();
    // Processing took it in: the final checkpoint reflects it.
    let (code, v) = verify_json(gw);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["parts"][3]["checkpoint"]["applied_lsn"], lsn + 1, "{v}");
    lsn
}

fn assert_within(file: &Path, dir: &Path) {
    assert!(
        file.starts_with(dir),
        "{} not in {}",
        file.display(),
        dir.display()
    );
    assert!(file.exists(), "{} missing", file.display());
}

#[test]
fn verify_of_a_cleanly_stopped_gateway_reports_every_part_ok_and_exits_0() {
    let broker = Mosquitto::start();
    let mut gw = Gateway::new(&broker.url());
    ingest(&broker, &mut gw, 50);

    let (st, out, err) = gw.command(&["store", "verify"]);
    assert_eq!(st.code(), Some(0), "{out}{err}");
    assert!(out.contains("verdict: OK"), "{out}");
    assert!(!out.contains("DAMAGED"), "{out}");
    assert!(out.contains("50 record(s), lsn 0..=49"), "{out}");
    assert!(!out.contains("is running"), "{out}");

    let (code, v) = verify_json(&gw);
    assert_eq!(code, Some(0));
    assert_eq!(v["clean"], true);
    let part = |name: &str| {
        v["parts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["part"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(part("journal")["records"], 50);
    assert_eq!(part("journal")["state"], "ok");
    assert_eq!(part("checkpoint")["state"], "ok");
    assert_eq!(part("checkpoint")["checkpoint"]["applied_lsn"], 50);
    assert_eq!(part("epoch")["state"], "ok");
    assert_eq!(part("outbox/aggregates")["state"], "ok");
}

#[test]
fn flipped_bytes_in_the_journal_are_named_by_verify_salvaged_by_repair_and_the_daemon_starts() {
    let broker = Mosquitto::start();
    let mut gw = Gateway::new(&broker.url());
    let n = 300;
    ingest(&broker, &mut gw, n);
    let seg = journal_segment(&gw);
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = bytes.len() * 2 / 5;
    for b in &mut bytes[at..at + 4] {
        *b ^= 0xA5;
    }
    std::fs::write(&seg, &bytes).unwrap();
    // The records that lie wholly before the damage.
    let intact = record_frames(&bytes)
        .iter()
        .take_while(|f| f.1 <= at)
        .count();

    let (st, out, err) = gw.command(&["store", "verify"]);
    assert_eq!(st.code(), Some(3), "damage → exit 3\n{out}{err}");
    assert!(out.contains("journal") && out.contains("DAMAGED"), "{out}");
    assert!(
        out.contains(&seg.display().to_string()),
        "names the file: {out}"
    );
    let (_, v) = verify_json(&gw);
    let d = &v["parts"][0]["damage"][0];
    let offset = d["offset"].as_u64().unwrap();
    assert!(offset <= at as u64, "{d}");
    assert_eq!(d["bytes"].as_u64().unwrap(), bytes.len() as u64 - offset);
    assert!(
        out.contains(&format!("from offset {offset}")),
        "names the offset: {out}"
    );
    assert_eq!(v["parts"][0]["records"].as_u64().unwrap(), intact as u64);
    assert_eq!(
        std::fs::read(&seg).unwrap(),
        bytes,
        "verify changes nothing"
    );

    let (st, out, err) = gw.command(&["store", "repair"]);
    assert_eq!(st.code(), Some(0), "{out}{err}");
    assert!(out.contains(&format!("kept {intact} record(s)")), "{out}");
    let qdir = data(&gw).join("quarantine");
    let moved_to: Vec<PathBuf> = out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("-> "))
        .map(PathBuf::from)
        .collect();
    assert_eq!(moved_to.len(), 1, "{out}");
    assert_within(&moved_to[0], &qdir);
    assert_eq!(
        std::fs::read(&moved_to[0]).unwrap(),
        &bytes[offset as usize..],
        "the damaged rest is kept byte for byte"
    );
    assert!(out.contains("verdict: OK"), "{out}");

    let (st, out, _) = gw.command(&["store", "verify"]);
    assert_eq!(st.code(), Some(0), "{out}");
    assert_eq!(journal_values(&gw, n), (0..intact).collect::<Vec<_>>());

    // The daemon starts on the salvaged store, and new readings get lsns past the lost ones.
    let lsn = restart_and_ingest_one(&broker, &mut gw, 10_000);
    assert!(lsn >= n as u64, "lsn {lsn} reissued");
    assert_eq!(journal_values(&gw, 10_001).len(), intact + 1);
}

#[test]
fn a_journal_truncated_mid_record_has_its_torn_tail_cut_and_the_prefix_kept() {
    let broker = Mosquitto::start();
    let mut gw = Gateway::new(&broker.url());
    let n = 100;
    ingest(&broker, &mut gw, n);
    let seg = journal_segment(&gw);
    let bytes = std::fs::read(&seg).unwrap();
    let starts = frame_starts(&bytes);
    let keep = starts.len() * 3 / 5;
    let cut = starts[keep] + 7;
    std::fs::File::options()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(cut as u64)
        .unwrap();

    // A torn tail is what a crash leaves: shown, not judged as damage (exit 0).
    let (st, out, _) = gw.command(&["store", "verify"]);
    assert_eq!(st.code(), Some(0), "{out}");
    assert!(out.contains("verdict: OK"), "{out}");
    assert!(out.contains(&seg.display().to_string()), "{out}");
    assert!(
        out.contains(&format!(
            "7 byte(s) bad in {} from offset {}",
            seg.display(),
            starts[keep]
        )),
        "{out}"
    );
    assert!(out.contains("torn tail"), "{out}");

    let (st, out, err) = gw.command(&["store", "repair"]);
    assert_eq!(st.code(), Some(0), "{out}{err}");
    assert!(out.contains("cut a torn tail of 7 B"), "{out}");
    assert!(out.contains(&format!("kept {keep} record(s)")), "{out}");
    let copy: Vec<&str> = out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("-> "))
        .collect();
    assert_eq!(copy.len(), 1, "a copy of the cut bytes is kept: {out}");
    assert_eq!(
        std::fs::read(copy[0]).unwrap(),
        &bytes[starts[keep]..cut],
        "{out}"
    );
    let (st, _, _) = gw.command(&["store", "verify"]);
    assert_eq!(st.code(), Some(0));
    assert_eq!(journal_values(&gw, n), (0..keep).collect::<Vec<_>>());

    restart_and_ingest_one(&broker, &mut gw, 10_000);
    assert_eq!(journal_values(&gw, 10_001).len(), keep + 1);
}

#[test]
fn a_garbage_checkpoint_is_reported_and_the_daemon_moves_it_aside_and_rebuilds() {
    let broker = Mosquitto::start();
    let mut gw = Gateway::new(&broker.url());
    ingest(&broker, &mut gw, 20);
    let cp = data(&gw).join("state/checkpoint.bin");
    std::fs::write(&cp, b"this is not a checkpoint at all").unwrap();

    let (st, out, _) = gw.command(&["store", "verify"]);
    assert_eq!(st.code(), Some(3), "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("checkpoint"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("DAMAGED"), "{out}");
    assert!(
        out.contains(&format!(
            "31 byte(s) bad in {} from offset 0: not a file of this kind (bad magic)",
            cp.display()
        )),
        "{out}"
    );

    gw.start();
    let log = gw.current_log();
    assert!(log.contains("is damaged"), "{log}");
    assert!(log.contains("rebuilding from the journal"), "{log}");
    let aside = data(&gw).join("state");
    assert!(
        log.contains(&aside.join("checkpoint.bin.bad-").display().to_string()),
        "{log}"
    );
    assert!(gw.stop().success());

    let (st, out, _) = gw.command(&["store", "verify"]);
    assert_eq!(st.code(), Some(0), "a fresh checkpoint was written:\n{out}");
    assert!(
        out.contains("checkpoint.bin.bad-"),
        "the set-aside file is listed: {out}"
    );
    assert_eq!(journal_values(&gw, 20).len(), 20);
}

#[test]
fn a_damaged_store_without_repair_still_starts_and_says_loudly_where_the_damage_went() {
    let broker = Mosquitto::start();
    let mut gw = Gateway::new(&broker.url());
    let n = 200;
    ingest(&broker, &mut gw, n);
    let seg = journal_segment(&gw);
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0xFF;
    std::fs::write(&seg, &bytes).unwrap();
    std::fs::write(data(&gw).join("epoch"), b"not hex\n").unwrap();

    gw.start();
    let log = gw.current_log();
    let qdir = data(&gw).join("journal/quarantine");
    assert!(log.contains("ERROR"), "{log}");
    assert!(log.contains(&qdir.display().to_string()), "{log}");
    assert!(log.contains("journal was damaged"), "{log}");
    assert!(
        log.contains("store epoch") && log.contains("is damaged"),
        "{log}"
    );
    assert!(gw.stop().success());

    // A second start finds nothing more to repair: no crash loop, no repeated salvage.
    gw.start();
    let log = gw.current_log();
    assert!(
        !log.contains("was damaged") && !log.contains("ERROR"),
        "{log}"
    );
    assert!(gw.stop().success());

    let (st, out, _) = gw.command(&["store", "verify"]);
    assert_eq!(st.code(), Some(0), "{out}");
    assert!(out.contains("quarantine: "), "{out}");
    assert!(out.contains(&qdir.display().to_string()), "{out}");
    let kept = journal_values(&gw, n);
    assert!(!kept.is_empty() && kept.len() < n, "{}", kept.len());
    assert_eq!(
        kept,
        (0..kept.len()).collect::<Vec<_>>(),
        "a prefix is kept"
    );
}

#[test]
fn repair_refuses_while_the_daemon_runs_and_names_its_pid() {
    let broker = Mosquitto::start();
    let mut gw = Gateway::new(&broker.url());
    gw.start();
    let pid = gw.pid().unwrap();

    let (st, out, err) = gw.command(&["store", "repair"]);
    assert_eq!(st.code(), Some(2), "{out}{err}");
    assert!(err.contains("refusing to repair"), "{err}");
    assert!(
        err.contains(&format!("daemon pid {pid} is running")),
        "{err}"
    );
    assert!(!data(&gw).join("quarantine").exists());

    let (st, out, _) = gw.command(&["store", "verify"]);
    assert_eq!(st.code(), Some(0), "{out}");
    assert!(
        out.contains(&format!(
            "daemon pid {pid} is running; results may be stale"
        )),
        "{out}"
    );
    assert!(gw.stop().success());
}
