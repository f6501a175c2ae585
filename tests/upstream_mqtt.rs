//! The MQTT upstream (`mqtts://`, mutual TLS) against a real "cloud" Mosquitto: every message
//! is self-contained (Hello + Dict + Batch envelopes), every aggregate reaches a subscriber,
//! and a cloud broker outage loses nothing (consumers deduplicate by (epoch, seq)).

mod common;

use common::cloud::Cloud;
use common::*;
use edgeferry::protocol::{self, DictDecoder, Frame, HEADER_LEN, OutboxItem};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TOPIC: &str = "edgeferry/gw-test/batches";

fn gateway(local: &Mosquitto, cloud: &Cloud) -> Gateway {
    gateway_with(local, &cloud.upstream_section())
}

fn gateway_with(local: &Mosquitto, upstream: &str) -> Gateway {
    Gateway::with_config(
        &local.url(),
        "",
        &format!(
            "[process]\nwindows = [\"1s\"]\nallowed_lateness = \"200ms\"\ncheckpoint_interval = \"500ms\"\n\n{upstream}"
        ),
    )
}

/// How many times the gateway's log says the MQTT upstream connected.
fn connects(gw: &Gateway) -> usize {
    gw.current_log().matches("upstream connected (MQTT").count()
}

/// Publishes readings `from..` for `secs` seconds; returns the next index.
fn publish_for(p: &Publisher, from: usize, secs: u64) -> usize {
    let until = Instant::now() + Duration::from_secs(secs);
    let mut i = from;
    while Instant::now() < until {
        p.publish(&topic(i), live_payload(i));
        i += 1;
        std::thread::sleep(Duration::from_millis(6));
    }
    i
}

/// What the consumer concluded from every message it received.
#[derive(Default)]
struct Consumed {
    messages: usize,
    /// (epoch, seq) of every batch taken (first copy only).
    batches: BTreeSet<(u64, u64)>,
    /// Copies of a batch already taken (resends after a lost PUBACK).
    duplicates: usize,
    /// (series, window_start_ms, window_secs) → (highest version, its count).
    windows: BTreeMap<(String, i64, u32), (u32, u64)>,
    /// (series, window_start_ms, window_secs, version) → count: one version, one content.
    versions: BTreeMap<(String, i64, u32, u32), u64>,
    errors: Vec<String>,
}

impl Consumed {
    /// Sum of `count` over the highest version of every window.
    fn total(&self) -> u64 {
        self.windows.values().map(|&(_, c)| c).sum()
    }

    /// Decodes one MQTT message: Hello, Dict, Batch envelopes back to back.
    fn take(&mut self, msg: &[u8]) {
        self.messages += 1;
        if let Err(e) = self.try_take(msg) {
            self.errors.push(e);
        }
    }

    fn try_take(&mut self, msg: &[u8]) -> Result<(), String> {
        let mut frames = Vec::new();
        let mut at = 0;
        while at < msg.len() {
            let rest = &msg[at..];
            if rest.len() < HEADER_LEN {
                return Err(format!("{} trailing bytes", rest.len()));
            }
            let len = u32::from_le_bytes(rest[4..8].try_into().unwrap()) as usize;
            let end = HEADER_LEN + len;
            if rest.len() < end {
                return Err(format!("envelope of {end} bytes, {} left", rest.len()));
            }
            frames.push(protocol::decode(&rest[..end], u32::MAX).map_err(|e| e.to_string())?);
            at += end;
        }
        let mut it = frames.into_iter();
        let Some(Frame::Hello(hello)) = it.next() else {
            return Err("message does not start with Hello".into());
        };
        if hello.gateway != "gw-test" {
            return Err(format!("gateway {:?}", hello.gateway));
        }
        // Each message is self-contained: a fresh dictionary per message.
        let mut dict = DictDecoder::new();
        let mut batch = None;
        for f in it {
            match f {
                Frame::Dict(d) => dict.apply(&d).map_err(|e| e.to_string())?,
                Frame::Batch(b) if batch.is_none() => batch = Some(b),
                other => return Err(format!("unexpected frame {:?}", other.kind())),
            }
        }
        let b = batch.ok_or("no Batch frame")?;
        let items = dict.decode_batch(&b).map_err(|e| e.to_string())?;
        if !self.batches.insert((hello.epoch, b.seq)) {
            self.duplicates += 1;
            return Ok(());
        }
        for item in items {
            if let OutboxItem::Aggregate {
                series,
                window_start_ms,
                window_secs,
                version,
                agg,
            } = item
            {
                let count = agg.count();
                let vk = (series.key.clone(), window_start_ms, window_secs, version);
                if let Some(&prev) = self.versions.get(&vk)
                    && prev != count
                {
                    return Err(format!("{vk:?} seen with counts {prev} and {count}"));
                }
                self.versions.insert(vk, count);
                let e = self
                    .windows
                    .entry((series.key.clone(), window_start_ms, window_secs))
                    .or_insert((0, 0));
                if version >= e.0 {
                    *e = (version, count);
                }
            }
        }
        Ok(())
    }
}

/// A QoS 1 subscriber on the cloud broker's plain listener, with a persistent session (so
/// what is published while it reconnects after a broker restart is queued for it).
struct Subscriber {
    consumed: Arc<Mutex<Consumed>>,
    /// Runs the event loop; dropped (and the task with it) with the subscriber.
    _rt: tokio::runtime::Runtime,
}

impl Subscriber {
    /// Connects and returns once the subscription is acknowledged.
    fn connect(port: u16) -> Subscriber {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let mut o = rumqttc::MqttOptions::new("cloud-consumer", "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30))
            .set_clean_session(false)
            .set_max_packet_size(64 << 20, 64 << 20);
        let (client, mut el) = rumqttc::AsyncClient::new(o, 100);
        let consumed = Arc::new(Mutex::new(Consumed::default()));
        let c = consumed.clone();
        let (subacked_tx, subacked_rx) = std::sync::mpsc::channel();
        rt.spawn(async move {
            // Subscribe on every connection without a stored session (the first one).
            loop {
                match el.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a))) => {
                        if !a.session_present {
                            client
                                .subscribe(TOPIC, rumqttc::QoS::AtLeastOnce)
                                .await
                                .unwrap();
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        let _ = subacked_tx.send(());
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        c.lock().unwrap().take(&p.payload);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        subacked_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("SUBACK from the cloud broker");
        Subscriber { consumed, _rt: rt }
    }

    fn total(&self) -> u64 {
        self.consumed.lock().unwrap().total()
    }

    /// Waits until the consumer's count reaches `n`, then a little longer, and returns what
    /// it concluded.
    fn wait_total(&self, n: u64, timeout: Duration) -> std::sync::MutexGuard<'_, Consumed> {
        let start = Instant::now();
        while self.total() < n && start.elapsed() < timeout {
            std::thread::sleep(Duration::from_millis(100));
        }
        // Anything late (a resend, a stray correction) would show now.
        std::thread::sleep(Duration::from_secs(2));
        self.consumed.lock().unwrap()
    }
}

fn topic(i: usize) -> String {
    format!("sensors/site{}/dev{}/temperature", i % 2, i % 10)
}

fn assert_consumed(c: &Consumed, n: u64, gw: &Gateway) {
    let problem = format!(
        "messages {}, batches {}, duplicates {}, windows {}, errors {:?}\nlog:\n{}",
        c.messages,
        c.batches.len(),
        c.duplicates,
        c.windows.len(),
        &c.errors[..c.errors.len().min(5)],
        gw.current_log()
    );
    eprintln!(
        "consumed: messages {}, batches {}, duplicates {}, windows {}",
        c.messages,
        c.batches.len(),
        c.duplicates,
        c.windows.len()
    );
    assert!(c.errors.is_empty(), "{problem}");
    assert_eq!(c.total(), n, "{problem}");
    assert!(c.windows.keys().all(|(_, _, secs)| *secs == 1), "{problem}");
}

#[test]
fn mqtt_upstream_with_mutual_tls_delivers_every_aggregate_once() {
    let local = Mosquitto::start();
    let cloud = Cloud::start();
    let sub = Subscriber::connect(cloud.broker.port);
    let mut gw = gateway(&local, &cloud);
    gw.start();
    wait_for("the upstream MQTT link", Duration::from_secs(15), || {
        gw.current_log().contains("upstream connected (MQTT")
    });
    let n = 500;
    let p = Publisher::connect(local.port, "pub-up-mqtt");
    for i in 0..n {
        p.publish(&topic(i), live_payload(i));
        std::thread::sleep(Duration::from_millis(6));
    }
    p.wait_acked(n, Duration::from_secs(20));
    let c = sub.wait_total(n as u64, Duration::from_secs(30));
    assert_consumed(&c, n as u64, &gw);
    assert!(c.messages >= 2, "windows of ~3 s come in several batches");
    drop(c);
    assert!(gw.stop().success());
}

#[test]
fn cloud_broker_outage_then_recovery_loses_nothing() {
    let local = Mosquitto::start();
    let mut cloud = Cloud::start();
    let sub = Subscriber::connect(cloud.broker.port);
    let mut gw = gateway(&local, &cloud);
    gw.start();
    wait_for("the upstream MQTT link", Duration::from_secs(15), || {
        gw.current_log().contains("upstream connected (MQTT")
    });
    let n = 1500;
    let p = Publisher::connect(local.port, "pub-up-mqtt-outage");
    let mut before_outage = 0;
    for i in 0..n {
        if i == 400 {
            // Something has gone through before the outage.
            wait_for("batches before the outage", Duration::from_secs(10), || {
                sub.total() > 0
            });
            before_outage = sub.total();
            cloud.broker.stop();
        }
        if i == 900 {
            cloud.broker.restart();
            cloud.wait_tls();
        }
        p.publish(&topic(i), live_payload(i));
        std::thread::sleep(Duration::from_millis(6));
    }
    p.wait_acked(n, Duration::from_secs(20));
    let c = sub.wait_total(n as u64, Duration::from_secs(40));
    assert!(before_outage > 0);
    assert_consumed(&c, n as u64, &gw);
    drop(c);
    let log = gw.current_log();
    assert!(
        log.matches("upstream connected (MQTT").count() >= 2,
        "the link came back:\n{log}"
    );
    assert!(gw.stop().success());
}

#[test]
fn rotated_client_certificates_are_used_without_a_restart_and_nothing_is_lost() {
    let local = Mosquitto::start();
    let cloud = Cloud::start();
    let sub = Subscriber::connect(cloud.broker.port);
    // The gateway starts with an expired client certificate: the cloud refuses it.
    let mut gw = gateway_with(
        &local,
        &cloud.upstream_section_with(true, "reconnect_max = \"1s\"\n"),
    );
    gw.start();
    wait_for(
        "the refused link to be reported",
        Duration::from_secs(15),
        || {
            gw.metric("edgeferry_upstream_reconnects_total")
                .unwrap_or(0.0)
                >= 2.0
        },
    );
    assert_eq!(connects(&gw), 0, "an expired certificate must not connect");
    let p = Publisher::connect(local.port, "pub-up-mqtt-rotate");
    let i = publish_for(&p, 0, 2);
    // The operator renews the certificate in place: the next attempt uses it.
    cloud.write_client_cert(false);
    wait_for(
        "the link with the renewed certificate",
        Duration::from_secs(15),
        || connects(&gw) == 1,
    );
    let i = publish_for(&p, i, 2);
    // Renewed again while connected: the link notices the files changed and reconnects.
    cloud.write_client_cert(false);
    wait_for(
        "the reconnect after the rotation",
        Duration::from_secs(20),
        || connects(&gw) == 2,
    );
    assert!(
        gw.current_log()
            .contains("credentials changed on disk; reconnecting")
    );
    let n = publish_for(&p, i, 2);
    p.wait_acked(n, Duration::from_secs(20));
    let c = sub.wait_total(n as u64, Duration::from_secs(30));
    assert_consumed(&c, n as u64, &gw);
    drop(c);
    assert!(gw.stop().success());
}

#[test]
fn after_a_link_that_lived_30_s_the_backoff_starts_over() {
    let local = Mosquitto::start();
    let mut cloud = Cloud::start();
    cloud.broker.stop();
    let mut gw = gateway_with(
        &local,
        &cloud.upstream_section_with(false, "reconnect_max = \"20s\"\n"),
    );
    gw.start();
    // Failures while the cloud is away grow the pause (0.5 s, 1 s, 2 s, ... up to 20 s).
    wait_for("six failed attempts", Duration::from_secs(40), || {
        gw.metric("edgeferry_upstream_reconnects_total")
            .unwrap_or(0.0)
            >= 6.0
    });
    cloud.broker.restart();
    cloud.wait_tls();
    wait_for("the link", Duration::from_secs(30), || connects(&gw) == 1);
    // A healthy link for longer than STABLE_AFTER ...
    std::thread::sleep(edgeferry::forward::link::STABLE_AFTER + Duration::from_secs(1));
    let failures = gw.metric("edgeferry_upstream_reconnects_total").unwrap();
    cloud.broker.restart();
    cloud.wait_tls();
    wait_for(
        "the link to notice the restart",
        Duration::from_secs(60),
        || {
            gw.metric("edgeferry_upstream_reconnects_total")
                .unwrap_or(0.0)
                > failures
        },
    );
    // ... so the backoff started over: the attempts since the break count from one (a
    // broker restart costs a failure or three), not on from the six before the link.
    wait_for("the link again", Duration::from_secs(10), || {
        connects(&gw) == 2
    });
    let attempt = gw.metric("edgeferry_upstream_reconnect_attempt").unwrap();
    assert!(
        attempt <= 4.0,
        "attempt {attempt} after a stable link: the backoff went on from the earlier failures"
    );
    assert!(gw.stop().success());
}

#[test]
fn a_data_directory_restored_from_an_older_copy_is_caught_by_the_stored_state_and_gets_a_new_epoch()
{
    let local = Mosquitto::start();
    let cloud = Cloud::start();
    let sub = Subscriber::connect(cloud.broker.port);
    let mut gw = gateway(&local, &cloud);
    gw.start();
    let p = Publisher::connect(local.port, "pub-up-mqtt-restore");
    wait_for("the link", Duration::from_secs(15), || connects(&gw) == 1);
    let i = publish_for(&p, 0, 2);
    std::thread::sleep(Duration::from_secs(3));
    assert!(gw.stop().success());
    let data = gw.dir.path().join("data");
    let backup = gw.dir.path().join("backup");
    copy_dir(&data, &backup);
    let epoch_before = std::fs::read_to_string(data.join("epoch")).unwrap();
    // Life goes on: more batches reach the cloud (and its retained state says so) ...
    gw.start();
    let i = publish_for(&p, i, 3);
    std::thread::sleep(Duration::from_secs(3));
    assert!(gw.stop().success());
    let seen_before_restore = sub.consumed.lock().unwrap().batches.len();
    // ... then the box is restored from the older copy.
    std::fs::remove_dir_all(&data).unwrap();
    copy_dir(&backup, &data);
    gw.start();
    let n = publish_for(&p, i, 2);
    wait_for(
        "the restore to be detected",
        Duration::from_secs(20),
        || gw.current_log().contains("restored from an older copy"),
    );
    let epoch_after = std::fs::read_to_string(data.join("epoch")).unwrap();
    assert_ne!(epoch_before, epoch_after, "a new store epoch");
    let new_epoch = u64::from_str_radix(epoch_after.trim(), 16).unwrap();
    wait_for(
        "batches under the new epoch",
        Duration::from_secs(20),
        || {
            sub.consumed
                .lock()
                .unwrap()
                .batches
                .iter()
                .any(|&(e, _)| e == new_epoch)
        },
    );
    p.wait_acked(n, Duration::from_secs(20));
    assert!(gw.stop().success());
    let c = sub.consumed.lock().unwrap();
    assert!(c.errors.is_empty(), "{:?}", c.errors);
    assert!(c.batches.len() > seen_before_restore);
    drop(c);
    // Once renewed, a further restart under the new epoch is not taken for a restore.
    gw.start();
    wait_for("the link", Duration::from_secs(15), || connects(&gw) >= 1);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        gw.current_log()
            .matches("restored from an older copy")
            .count(),
        0,
        "{}",
        gw.current_log()
    );
    assert!(gw.stop().success());
}
