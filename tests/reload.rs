//! Configuration reload (SIGHUP, `systemctl reload edgeferry`) against a real Mosquitto and
//! real edgeferry processes: rules, subscriptions, the log level, the admin endpoint and the
//! upstream change in place; keys that cannot change are refused by name; a bad file changes
//! nothing; and readings flowing through several reloads all arrive, once.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const RULE: &str = r#"
[[rules]]
name = "overheat"
metric = "temperature"
above = 80.0
clear_below = 75.0
publish = "alerts/{device}/{rule}"
"#;

/// `edgeferry_config_reloads_total{result="<result>"}`, 0 when not yet counted.
fn reloads(gw: &Gateway, result: &str) -> f64 {
    let text = gw.admin_get("/metrics").unwrap_or_default();
    let wanted = format!("edgeferry_config_reloads_total{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&wanted)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Writes `config` as the gateway's file and sends SIGHUP; returns once the reload with
/// `result` was counted.
fn reload(gw: &Gateway, config: &str, result: &str) {
    let before = reloads(gw, result);
    std::fs::write(&gw.config, config).unwrap();
    signal(gw.pid().unwrap(), "HUP");
    wait_for(
        &format!("a reload counted as {result}"),
        Duration::from_secs(20),
        || reloads(gw, result) > before,
    );
}

/// The gateway's configuration file as `Gateway::with_config` writes it.
fn config_of(gw: &Gateway, broker: &Mosquitto, mqtt_extra: &str, extra: &str) -> String {
    gateway_config(gw.dir.path(), &broker.url(), mqtt_extra, extra)
}

fn hot_reading(p: &Publisher, device: &str) {
    p.publish(
        &format!("sensors/plant/{device}/temperature"),
        format!(r#"{{"value":90.0,"ts":{}}}"#, now_ms()),
    );
}

#[test]
fn a_rule_added_by_reload_fires_on_the_next_reading() {
    let broker = Mosquitto::start();
    let mut gw = Gateway::new(&broker.url());
    gw.start();
    let alerts = subscriber(broker.port, "alerts/#", "reload-alerts-1");
    let p = Publisher::connect(broker.port, "pub-reload-1");
    hot_reading(&p, "boiler");
    p.wait_acked(1, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(500));
    assert!(alerts.lock().unwrap().is_empty(), "no rule yet, no alert");

    reload(&gw, &config_of(&gw, &broker, "", RULE), "applied");
    hot_reading(&p, "boiler");
    wait_for("the new rule's alert", Duration::from_secs(10), || {
        !alerts.lock().unwrap().is_empty()
    });
    let got = alerts.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, "alerts/boiler/overheat");
    assert_eq!(got[0].1["state"], "raised");
    let log = gw.current_log();
    assert!(
        log.contains("configuration reloaded from") && log.contains("rules changed"),
        "the log says what changed:\n{log}"
    );

    // The same file again: nothing to do, and said so.
    reload(&gw, &config_of(&gw, &broker, "", RULE), "unchanged");
    assert!(gw.current_log().contains("nothing changed"));
}

#[test]
fn an_invalid_file_changes_nothing_logs_every_problem_and_is_counted() {
    let broker = Mosquitto::start();
    let mut gw = Gateway::with_config(&broker.url(), "", RULE);
    gw.start();
    let alerts = subscriber(broker.port, "alerts/#", "reload-alerts-2");
    // Two problems at once, as check-config would list them: an unknown key and a bad level.
    let bad = config_of(&gw, &broker, "commit_max = \"many\"", RULE).replace(
        "[log]\nlevel = \"info\"",
        "[log]\nlevel = \"info\"\ncolour = true",
    );
    assert!(bad.contains("colour"), "the test edits the file");
    reload(&gw, &bad, "invalid");
    let log = gw.current_log();
    assert!(log.contains("configuration reload refused"), "{log}");
    assert!(log.contains("colour"), "the unknown key is named:\n{log}");
    assert!(
        log.contains("mqtt.commit_max"),
        "the bad value is named:\n{log}"
    );
    assert_eq!(reloads(&gw, "applied"), 0.0);

    // The old configuration still runs: its rule still fires.
    let p = Publisher::connect(broker.port, "pub-reload-2");
    hot_reading(&p, "kiln");
    wait_for("the old rule's alert", Duration::from_secs(10), || {
        !alerts.lock().unwrap().is_empty()
    });
    let status = gw.admin_get("/status").unwrap();
    assert!(status.contains("\"ready\":true"), "{status}");
}

#[test]
fn keys_that_cannot_change_while_running_are_refused_by_name_and_nothing_changes() {
    let broker = Mosquitto::start();
    let mut gw = Gateway::new(&broker.url());
    gw.start();
    let alerts = subscriber(broker.port, "alerts/#", "reload-alerts-3");
    let changed = config_of(
        &gw,
        &broker,
        "",
        &format!("{RULE}\n[process]\nwindows = [\"30s\"]\n"),
    )
    .replace("id = \"gw-test\"", "id = \"gw-other\"")
    .replace("/data\"", "/elsewhere\"");
    reload(&gw, &changed, "refused");
    let log = gw.current_log();
    assert!(
        log.contains(
            "gateway.data_dir, gateway.id, process.windows cannot change while edgeferry runs"
        ),
        "each key is named:\n{log}"
    );
    // The rule that came with them is not in effect either: a reload is all or nothing.
    let p = Publisher::connect(broker.port, "pub-reload-3");
    hot_reading(&p, "oven");
    p.wait_acked(1, Duration::from_secs(10));
    wait_for("the reading ingested", Duration::from_secs(10), || {
        gw.metric("edgeferry_ingest_readings_total").unwrap_or(0.0) >= 1.0
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        alerts.lock().unwrap().is_empty(),
        "the refused file's rule fired"
    );
    assert!(!gw.dir.path().join("elsewhere").exists());
}

#[test]
fn subscriptions_change_on_the_live_session_and_while_the_broker_is_away() {
    let mut broker = Mosquitto::start();
    let mut gw = Gateway::new(&broker.url());
    gw.start();
    let p = Publisher::connect(broker.port, "pub-reload-4");
    p.publish("plain/d1/temperature", "1");
    p.wait_acked(1, Duration::from_secs(10));

    // `plain/+/+` goes, `other/+/+` comes.
    let swapped = config_of(&gw, &broker, "", "").replace(
        "filter = \"plain/+/+\"\ntemplate = \"plain/",
        "filter = \"other/+/+\"\ntemplate = \"other/",
    );
    assert!(swapped.contains("other/+/+"));
    reload(&gw, &swapped, "applied");
    p.publish("plain/d1/temperature", "2");
    p.publish("other/d1/temperature", "3");
    p.wait_acked(3, Duration::from_secs(10));
    wait_for("the new filter's reading", Duration::from_secs(10), || {
        gw.metric("edgeferry_ingest_readings_total").unwrap_or(0.0) >= 2.0
    });

    // While the broker is away: `plain/+/+` comes back and `other/+/+` goes again; both
    // happen when it is back (its persistent session still holds `other/+/+`).
    broker.stop();
    wait_for("the broker gone", Duration::from_secs(10), || {
        gw.admin_get("/status")
            .is_some_and(|s| s.contains("\"connected\":false"))
    });
    reload(&gw, &config_of(&gw, &broker, "", ""), "applied");
    assert!(gw.current_log().contains("made when it is back"));
    broker.start_again();
    wait_for("subscribed again", Duration::from_secs(20), || {
        gw.admin_get("/status")
            .is_some_and(|s| s.contains("\"subscribed\":true"))
    });
    let p = Publisher::connect(broker.port, "pub-reload-4b");
    p.publish("other/d1/temperature", "4");
    p.publish("plain/d1/temperature", "5");
    p.wait_acked(2, Duration::from_secs(10));
    wait_for(
        "the restored filter's reading",
        Duration::from_secs(10),
        || gw.metric("edgeferry_ingest_readings_total").unwrap_or(0.0) >= 3.0,
    );
    std::thread::sleep(Duration::from_millis(500));
    let unmatched = gw
        .admin_get("/metrics")
        .unwrap_or_default()
        .lines()
        .any(|l| l.contains("reason=\"no_subscription\"") && !l.ends_with(" 0"));
    assert!(
        !unmatched,
        "the broker delivered a topic of a removed filter: it was not unsubscribed"
    );
    gw.stop();
    let mut values: Vec<f64> = gw.journal().iter().map(|r| r.value).collect();
    values.sort_by(f64::total_cmp);
    assert_eq!(
        values,
        [1.0, 3.0, 5.0],
        "only the readings of the filters in effect when they were published"
    );
}

#[test]
fn the_log_level_changes_in_place() {
    let broker = Mosquitto::start();
    let quiet = |level: &str| format!("[log]\nlevel = \"{level}\"");
    let mut gw = Gateway::new(&broker.url());
    let warn_only =
        config_of(&gw, &broker, "", "").replace("[log]\nlevel = \"info\"", &quiet("warn"));
    std::fs::write(&gw.config, &warn_only).unwrap();
    // An empty RUST_LOG counts as unset: `[log] level` decides.
    gw.spawn_with_env(&[("RUST_LOG", String::new())]);
    wait_for("ready", Duration::from_secs(20), || {
        gw.admin_get("/status")
            .is_some_and(|s| s.contains("\"ready\":true"))
    });
    assert!(!gw.current_log().contains(" INFO "), "{}", gw.current_log());

    reload(&gw, &config_of(&gw, &broker, "", ""), "applied");
    let log = gw.current_log();
    assert!(
        log.contains(" INFO ") && log.contains("configuration reloaded from"),
        "info lines appear once the level is info:\n{log}"
    );
    reload(&gw, &warn_only, "applied");
    let infos = gw.current_log().matches(" INFO ").count();
    reload(&gw, &format!("{warn_only}\n{RULE}"), "applied");
    assert_eq!(
        gw.current_log().matches(" INFO ").count(),
        infos,
        "back at warn: no more info lines"
    );
}

#[test]
fn the_admin_endpoint_moves_to_its_new_address_and_a_busy_one_changes_nothing() {
    let broker = Mosquitto::start();
    let mut gw = Gateway::new(&broker.url());
    gw.start();
    let old = std::fs::read_to_string(gw.dir.path().join("data/admin.addr")).unwrap();

    // A busy address: the reload fails before anything changed (the rule in the same file
    // is not in effect), and the old endpoint serves on.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();
    let to = |addr: &str, extra: &str| {
        config_of(&gw, &broker, "", extra)
            .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{addr}\""))
    };
    reload(&gw, &to(&busy_addr, RULE), "failed");
    assert!(
        gw.current_log()
            .contains(&format!("admin.listen {busy_addr}"))
    );
    assert!(
        http_get(old.trim(), "/healthz").is_some(),
        "the old endpoint serves on"
    );
    drop(busy);

    let port = free_port();
    let new = format!("127.0.0.1:{port}");
    reload(&gw, &to(&new, ""), "applied");
    wait_for("the new address recorded", Duration::from_secs(10), || {
        std::fs::read_to_string(gw.dir.path().join("data/admin.addr"))
            .is_ok_and(|a| a.trim() == new)
    });
    let (code, body) = http_get(&new, "/status").expect("the new endpoint answers");
    assert_eq!(code, 200, "{body}");
    wait_for("the old endpoint closed", Duration::from_secs(10), || {
        std::net::TcpStream::connect(old.trim()).is_err()
    });
    let (st, out, err) = gw.command(&["status"]);
    assert!(
        st.success(),
        "edgeferry status finds the new address: {out}{err}"
    );
}

/// Readings flow while the file is reloaded again and again (rules, subscriptions, the log
/// level, and the upstream moving between two collectors): every reading is in the journal
/// once and reaches the central side (the two collectors together) once.
#[test]
fn readings_under_load_through_reloads_and_an_upstream_move_arrive_exactly_once() {
    let broker = Mosquitto::start();
    let mut a = Collector::new(&[]);
    let mut b = Collector::new(&[]);
    a.start();
    b.start();
    let process = "[process]\nwindows = [\"1s\", \"2s\"]\nallowed_lateness = \"500ms\"\n\
                   checkpoint_interval = \"500ms\"\n";
    let upstream = |c: &Collector| {
        format!(
            "[upstream]\nurl = \"{}\"\nbatch_max = 5\nlinger = \"200ms\"\nreconnect_max = \"1s\"\n",
            c.url()
        )
    };
    let mut gw = Gateway::with_config(&broker.url(), "", &format!("{process}{}", upstream(&a)));
    gw.start();
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = publish_until_stopped(broker.port, "pub-reload-load", 6, stop.clone());

    let variants = [
        format!("{process}{}{RULE}", upstream(&a)),
        format!("{process}{}{RULE}", upstream(&b)),
        format!("{process}{}", upstream(&b)).replace("level = \"info\"", "level = \"debug\""),
        format!("{process}{}", upstream(&a)),
        format!("{process}{}{RULE}", upstream(&b)),
    ];
    for (i, extra) in variants.iter().enumerate() {
        std::thread::sleep(Duration::from_millis(700));
        let mut text = config_of(&gw, &broker, "", extra);
        if i % 2 == 1 {
            // And a subscription more, of topics nobody publishes.
            text.push_str(
                "\n[[mqtt.subscribe]]\nfilter = \"spare/+\"\ntemplate = \"spare/{metric}\"\nformat = \"number\"\n",
            );
        }
        reload(&gw, &text, "applied");
    }
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::SeqCst);
    let n = publisher.join().unwrap() as u64;

    let union = || {
        let mut lines = a.lines();
        lines.extend(b.lines());
        lines
    };
    wait_for(
        "every reading at the central side",
        Duration::from_secs(60),
        || central_counts(&union()) == BTreeMap::from([(1, n), (2, n)]),
    );
    assert!(
        !b.lines().is_empty() && !a.lines().is_empty(),
        "both collectors got batches"
    );
    gw.stop();
    assert_exactly_once(gw.journal().iter().map(|r| r.value), n as usize);
    assert_eq!(reloads_logged(&gw), variants.len());
}

fn reloads_logged(gw: &Gateway) -> usize {
    gw.logs().matches("configuration reloaded from").count()
}
