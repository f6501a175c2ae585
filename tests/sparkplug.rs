//! `format = "sparkplug_b"` end to end: payloads encoded by pysparkplug (PyPI; an
//! implementation edgeferry did not write, driven by tests/sparkplug.py), published through a
//! real Mosquitto to a real edgeferry: births, aliases, devices, historical values, `seq`
//! wrap and gaps, rebirth requests seen on the broker, and aliases that survive a restart.

mod common;

use common::*;
use serde_json::json;
use std::process::{Command, Stdio};
use std::time::Duration;

const SUBSCRIPTION: &str = r#"
[[mqtt.subscribe]]
filter = "spBv1.0/#"
format = "sparkplug_b"
"#;

const T0: i64 = 1_700_000_000_000;

/// Encodes each message of `msgs` (tests/sparkplug.py's JSON) with pysparkplug.
fn encode(msgs: serde_json::Value) -> Vec<Vec<u8>> {
    let out = python(&["tests/sparkplug.py"], &msgs.to_string());
    out.lines().map(|l| hex(l.trim())).collect()
}

/// The metrics (name, value) of a rebirth request, as pysparkplug reads it.
fn decode_command(payload: &[u8]) -> serde_json::Value {
    let text: String = payload.iter().map(|b| format!("{b:02x}")).collect();
    serde_json::from_str(&python(&["tests/sparkplug.py", "--decode"], &text)).unwrap()
}

fn python(args: &[&str], stdin: &str) -> String {
    use std::io::Write;
    let mut child = Command::new("python3")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (the test command installs pysparkplug)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "tests/sparkplug.py failed (pysparkplug is installed by scripts/test.sh): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// A birth certificate at `ts` (its metrics take that time unless they say otherwise).
fn birth(ts: i64, metrics: serde_json::Value) -> serde_json::Value {
    let mut all = vec![json!({"name": "bdSeq", "datatype": "INT64", "value": 0})];
    all.extend(metrics.as_array().unwrap().iter().cloned());
    json!({"type": "NBIRTH", "seq": 0, "timestamp": ts, "metrics": all})
}

fn data(kind: &str, seq: u64, ts: i64, metrics: serde_json::Value) -> serde_json::Value {
    json!({"type": kind, "seq": seq, "timestamp": ts, "metrics": metrics})
}

fn by_alias(alias: u64, datatype: &str, value: serde_json::Value, ts: i64) -> serde_json::Value {
    json!({"name": null, "alias": alias, "datatype": datatype, "value": value, "timestamp": ts})
}

/// An NDATA of `node` with one double metric by alias, at `ts`.
fn ndata(
    node: &str,
    seq: u64,
    ts: i64,
    alias: u64,
    value: serde_json::Value,
) -> (String, serde_json::Value) {
    (
        topic("NDATA", node),
        data(
            "NDATA",
            seq,
            ts,
            json!([by_alias(alias, "DOUBLE", value, ts)]),
        ),
    )
}

/// Publishes `(topic, message)` pairs in order and waits for the broker's PUBACKs.
fn publish(p: &Publisher, sent: &mut usize, msgs: &[(String, serde_json::Value)]) {
    let payloads = encode(json!(
        msgs.iter().map(|(_, m)| m.clone()).collect::<Vec<_>>()
    ));
    for ((topic, _), payload) in msgs.iter().zip(payloads) {
        p.publish(topic, payload);
        *sent += 1;
    }
    p.wait_acked(*sent, Duration::from_secs(10));
}

/// Messages seen on the broker: (topic, payload).
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

/// Rebirth requests seen on the broker.
fn commands(broker: &Mosquitto, id: &str) -> Seen {
    subscribe_with(broker.port, "spBv1.0/+/NCMD/+", id, |p| {
        (p.topic.clone(), p.payload.to_vec())
    })
}

fn counted(gw: &Gateway, line_start: &str) -> f64 {
    gw.admin_get("/metrics")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn topic(kind: &str, node: &str) -> String {
    format!("spBv1.0/plant/{kind}/{node}")
}

#[test]
fn births_aliases_devices_and_history_encoded_by_pysparkplug_become_readings() {
    let broker = Mosquitto::start();
    let mut gw = Gateway::with_config(&broker.url(), "", SUBSCRIPTION);
    gw.start();
    let ncmd = commands(&broker, "sp-watch-1");
    let p = Publisher::connect(broker.port, "sp-node-1");
    let mut sent = 0;
    publish(
        &p,
        &mut sent,
        &[
            (
                topic("NBIRTH", "gw1"),
                birth(
                    T0,
                    json!([
                        {"name": "temp", "alias": 1, "datatype": "DOUBLE", "value": 20.5},
                        {"name": "level", "alias": 2, "datatype": "INT16", "value": -3},
                        {"name": "running", "alias": 3, "datatype": "BOOLEAN", "value": true},
                        {"name": "label", "alias": 4, "datatype": "STRING", "value": "kiln"},
                        {"name": "Node Control/Rebirth", "datatype": "BOOLEAN", "value": false}
                    ]),
                ),
            ),
            (
                topic("NDATA", "gw1"),
                data(
                    "NDATA",
                    1,
                    T0 + 1000,
                    json!([
                        by_alias(1, "DOUBLE", json!(21.0), T0 + 1000),
                        by_alias(2, "INT16", json!(-4), T0 + 1000),
                        {"name": null, "alias": 1, "datatype": "DOUBLE", "value": 19.0,
                         "timestamp": T0 - 60_000, "is_historical": true}
                    ]),
                ),
            ),
            (
                format!("{}/pump", topic("DBIRTH", "gw1")),
                data(
                    "DBIRTH",
                    2,
                    T0,
                    json!([
                        {"name": "speed", "alias": 10, "datatype": "UINT16", "value": 1200},
                        {"name": "pressure", "alias": 11, "datatype": "FLOAT", "value": 2.5}
                    ]),
                ),
            ),
            (
                format!("{}/pump", topic("DDATA", "gw1")),
                data(
                    "DDATA",
                    3,
                    T0 + 2000,
                    json!([by_alias(10, "UINT16", json!(1300), T0 + 2000)]),
                ),
            ),
        ],
    );
    wait_for("nine readings", Duration::from_secs(10), || {
        gw.metric("edgeferry_ingest_readings_total").unwrap_or(0.0) >= 9.0
    });
    assert!(
        counted(
            &gw,
            "edgeferry_sparkplug_events_total{event=\"skipped_metric\"}"
        ) >= 1.0,
        "the String metric is skipped and counted"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        ncmd.lock().unwrap().is_empty(),
        "nothing was missing: no rebirth"
    );
    gw.stop();
    let mut got: Vec<(String, Option<String>, f64, i64)> = gw
        .journal()
        .into_iter()
        .map(|r| {
            assert_eq!(r.tags["group"], "plant");
            assert_eq!(r.tags["edge_node"], "gw1");
            (r.metric, r.tags.get("device").cloned(), r.value, r.time_ms)
        })
        .collect();
    got.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pump = Some("pump".to_string());
    let mut want = vec![
        ("temp".to_string(), None, 20.5, T0),
        ("level".into(), None, -3.0, T0),
        ("running".into(), None, 1.0, T0),
        ("temp".into(), None, 21.0, T0 + 1000),
        ("level".into(), None, -4.0, T0 + 1000),
        ("temp".into(), None, 19.0, T0 - 60_000),
        ("speed".into(), pump.clone(), 1200.0, T0),
        ("pressure".into(), pump.clone(), 2.5, T0),
        ("speed".into(), pump, 1300.0, T0 + 2000),
    ];
    want.sort_by(|a, b| a.partial_cmp(b).unwrap());
    assert_eq!(got, want);
}

#[test]
fn an_unknown_alias_a_seq_gap_or_data_before_birth_asks_for_a_rebirth_and_a_wrap_does_not() {
    let broker = Mosquitto::start();
    let mut gw = Gateway::with_config(&broker.url(), "", SUBSCRIPTION);
    gw.start();
    let ncmd = commands(&broker, "sp-watch-2");
    let p = Publisher::connect(broker.port, "sp-node-2");
    let mut sent = 0;
    let temp = json!([{"name": "temp", "alias": 1, "datatype": "DOUBLE", "value": 1.0}]);
    // Node "wrap": seq 0 (birth), 1..=255, then 0 again: no gap.
    let mut msgs = vec![(topic("NBIRTH", "wrap"), birth(T0, temp.clone()))];
    for (i, seq) in (1..=255).chain([0]).enumerate() {
        let ts = T0 + 1 + i as i64;
        msgs.push(ndata("wrap", seq, ts, 1, json!(seq)));
    }
    // Node "gap": seq 1 is lost. Node "alias": an alias its birth never declared. Node
    // "unborn": data before any birth.
    msgs.extend([
        (topic("NBIRTH", "gap"), birth(T0, temp.clone())),
        ndata("gap", 2, T0, 1, json!(7.0)),
        (topic("NBIRTH", "alias"), birth(T0, temp.clone())),
        ndata("alias", 1, T0, 99, json!(8.0)),
        ndata("unborn", 4, T0, 1, json!(9.0)),
    ]);
    publish(&p, &mut sent, &msgs);
    wait_for("three rebirth requests", Duration::from_secs(10), || {
        ncmd.lock().unwrap().len() >= 3
    });
    std::thread::sleep(Duration::from_millis(500));
    let got = ncmd.lock().unwrap().clone();
    let mut nodes: Vec<&str> = got
        .iter()
        .map(|(t, _)| t.rsplit('/').next().unwrap())
        .collect();
    nodes.sort();
    assert_eq!(
        nodes,
        ["alias", "gap", "unborn"],
        "one request per node that needs one"
    );
    for (_, payload) in &got {
        assert_eq!(
            decode_command(payload),
            json!([{"name": "Node Control/Rebirth", "value": true}]),
            "pysparkplug reads a rebirth request"
        );
    }
    assert_eq!(
        counted(
            &gw,
            "edgeferry_ingest_rejected_total{reason=\"unknown_alias\"}"
        ),
        2.0,
        "the unknown alias and the unborn node's data are rejected"
    );
    assert_eq!(
        counted(&gw, "edgeferry_sparkplug_events_total{event=\"seq_gap\"}"),
        1.0
    );
    // The data after the gap is taken: 257 of "wrap", 1 + 1 of "gap", 1 birth of "alias".
    wait_for("every resolvable reading", Duration::from_secs(10), || {
        gw.metric("edgeferry_ingest_readings_total").unwrap_or(0.0) >= 260.0
    });
    assert_eq!(gw.metric("edgeferry_ingest_readings_total"), Some(260.0));
}

#[test]
fn aliases_survive_a_crash_between_birth_and_data_and_a_lost_state_is_rebuilt_by_a_rebirth() {
    let broker = Mosquitto::start();
    let mut gw = Gateway::with_config(&broker.url(), "", SUBSCRIPTION);
    gw.start();
    let ncmd = commands(&broker, "sp-watch-3");
    let p = Publisher::connect(broker.port, "sp-node-3");
    let mut sent = 0;
    let temp = json!([{"name": "temp", "alias": 1, "datatype": "DOUBLE", "value": 1.0}]);
    publish(
        &p,
        &mut sent,
        &[(topic("NBIRTH", "gw1"), birth(T0, temp.clone()))],
    );
    wait_for("the birth's reading", Duration::from_secs(10), || {
        gw.metric("edgeferry_ingest_readings_total").unwrap_or(0.0) >= 1.0
    });
    gw.kill9();
    gw.start();
    publish(&p, &mut sent, &[ndata("gw1", 1, T0 + 1, 1, json!(2.0))]);
    wait_for(
        "the data after the restart",
        Duration::from_secs(10),
        || gw.metric("edgeferry_ingest_readings_total").unwrap_or(0.0) >= 1.0,
    );
    assert!(gw.current_log().contains("Sparkplug B state loaded"));
    assert!(ncmd.lock().unwrap().is_empty(), "the aliases were known");

    // Without the state file (lost with a replaced card, say): the node is asked for a
    // rebirth, and its new birth makes its data resolve again.
    gw.kill9();
    std::fs::remove_dir_all(gw.dir.path().join("data/state/sparkplug")).unwrap();
    gw.start();
    publish(&p, &mut sent, &[ndata("gw1", 2, T0 + 2, 1, json!(3.0))]);
    wait_for("a rebirth request", Duration::from_secs(10), || {
        !ncmd.lock().unwrap().is_empty()
    });
    publish(
        &p,
        &mut sent,
        &[
            (topic("NBIRTH", "gw1"), birth(T0 + 3, temp)),
            ndata("gw1", 1, T0 + 4, 1, json!(4.0)),
        ],
    );
    wait_for(
        "the data after the rebirth",
        Duration::from_secs(10),
        || gw.metric("edgeferry_ingest_readings_total").unwrap_or(0.0) >= 2.0,
    );
    gw.stop();
    let mut values: Vec<f64> = gw.journal().iter().map(|r| r.value).collect();
    values.sort_by(f64::total_cmp);
    assert_eq!(
        values,
        [1.0, 1.0, 2.0, 4.0],
        "two births, the data after the crash, the data after the rebirth; the one that \
         could not resolve is counted as rejected"
    );
}

const SILENCE: &str = r#"
[[rules]]
name = "gone"
metric = "temp"
silent_for = "1h"
publish = "alerts/{edge_node}/{rule}"
"#;

#[test]
fn a_death_raises_the_silence_alert_at_once_a_birth_clears_it_and_a_crash_keeps_it() {
    let broker = Mosquitto::start();
    let mut gw = Gateway::with_config(&broker.url(), "", &format!("{SUBSCRIPTION}{SILENCE}"));
    gw.start();
    let alerts = subscriber(broker.port, "alerts/#", "sp-alerts-4");
    let p = Publisher::connect(broker.port, "sp-node-4");
    let mut sent = 0;
    let now = now_ms() as i64;
    let temp = |v: f64| json!([{"name": "temp", "alias": 1, "datatype": "DOUBLE", "value": v}]);
    let death = json!({"type": "NDEATH", "timestamp": now,
                       "metrics": [{"name": "bdSeq", "datatype": "INT64", "value": 0}]});
    let stale = json!({"type": "NDEATH", "timestamp": now,
                       "metrics": [{"name": "bdSeq", "datatype": "INT64", "value": 9}]});
    publish(
        &p,
        &mut sent,
        &[
            (topic("NBIRTH", "kiln"), birth(now, temp(500.0))),
            (topic("NBIRTH", "oven"), birth(now, temp(200.0))),
            // A will left over from an earlier connection (another bdSeq) is not a death.
            (topic("NDEATH", "kiln"), stale),
            (topic("NDEATH", "kiln"), death.clone()),
        ],
    );
    wait_for("the silence alert", Duration::from_secs(5), || {
        !alerts.lock().unwrap().is_empty()
    });
    std::thread::sleep(Duration::from_millis(300));
    {
        let got = alerts.lock().unwrap();
        assert_eq!(got.len(), 1, "only the dead node's series, once: {got:?}");
        assert_eq!(got[0].0, "alerts/kiln/gone");
        assert_eq!(got[0].1["state"], "raised");
    }
    // A crash right after the death: the alert is still raised after the restart.
    gw.kill9();
    gw.start();
    let active = || -> u64 {
        let s: serde_json::Value = serde_json::from_str(&gw.admin_get("/status").unwrap()).unwrap();
        s["process"]["alerts_active"].as_u64().unwrap()
    };
    assert_eq!(active(), 1, "raised across the crash");
    // The node is born again: its reading clears the alert.
    publish(
        &p,
        &mut sent,
        &[(topic("NBIRTH", "kiln"), birth(now + 1, temp(501.0)))],
    );
    wait_for("the clear", Duration::from_secs(5), || {
        alerts
            .lock()
            .unwrap()
            .iter()
            .any(|(_, a, _)| a["state"] == "cleared")
    });
    wait_for("no alert active", Duration::from_secs(5), || active() == 0);
}
