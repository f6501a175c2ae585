//! The gateway's own WebSocket link over TLS: server verified against `ca_file`, mutual TLS
//! with `cert_file`/`key_file`, a bearer token from `token_file`; a wrong token or an untrusted
//! server is refused; rotated certificate files are picked up without a restart.

mod common;

use common::certs::{Ca, ca, leaf, write};

use common::*;
use std::path::PathBuf;
use std::time::Duration;

struct Setup {
    _certs: tempfile::TempDir,
    collector: Collector,
    gw: Gateway,
    client_ca: Ca,
    client_cert: PathBuf,
    client_key: PathBuf,
}

/// A TLS collector requiring client certificates and a token, and a gateway pointed at it
/// trusting `trusted` and presenting `token`.
fn setup(trust_server: bool, token: &str) -> (Setup, Mosquitto) {
    let certs = tempfile::tempdir().unwrap();
    let server_ca = ca("central-ca");
    let client_ca = ca("gateway-ca");
    let (sc, sk) = leaf(&server_ca, &["localhost"], false);
    let (cc, ck) = leaf(&client_ca, &["gw-test"], false);
    let server_cert = write(certs.path(), "server.pem", &sc);
    let server_key = write(certs.path(), "server.key", &sk);
    let client_ca_file = write(certs.path(), "client-ca.pem", &client_ca.pem);
    let tokens = write(certs.path(), "tokens", "# gateways\ns3cret-token\n");
    let trusted = if trust_server {
        server_ca.pem.clone()
    } else {
        ca("stranger").pem
    };
    let trust_file = write(certs.path(), "trust.pem", &trusted);
    let client_cert = write(certs.path(), "client.pem", &cc);
    let client_key = write(certs.path(), "client.key", &ck);
    let token_file = write(certs.path(), "token", &format!("{token}\n"));
    let collector = Collector::new(&[
        "--tls-cert",
        server_cert.to_str().unwrap(),
        "--tls-key",
        server_key.to_str().unwrap(),
        "--client-ca",
        client_ca_file.to_str().unwrap(),
        "--token-file",
        tokens.to_str().unwrap(),
    ]);
    let broker = Mosquitto::start();
    let gw = Gateway::with_config(
        &broker.url(),
        "",
        &format!(
            "[process]\nwindows = [\"1s\"]\nallowed_lateness = \"200ms\"\ncheckpoint_interval = \"500ms\"\n\
             [upstream]\nurl = \"wss://localhost:{}/\"\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n\
             token_file = {:?}\nlinger = \"100ms\"\nreconnect_max = \"1s\"\n",
            collector.port,
            trust_file.display().to_string(),
            client_cert.display().to_string(),
            client_key.display().to_string(),
            token_file.display().to_string(),
        ),
    );
    (
        Setup {
            _certs: certs,
            collector,
            gw,
            client_ca,
            client_cert,
            client_key,
        },
        broker,
    )
}

fn publish(broker: &Mosquitto, from: usize, n: usize, id: &str) {
    let p = Publisher::connect(broker.port, id);
    for i in from..from + n {
        p.publish(
            &format!("sensors/a/d{}/temperature", i % 4),
            live_payload(i),
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    p.wait_acked(n, Duration::from_secs(20));
}

#[test]
fn mutual_tls_with_a_token_delivers_and_rotated_client_certificates_are_picked_up() {
    let (mut s, broker) = setup(true, "s3cret-token");
    s.collector.start();
    s.gw.start();
    publish(&broker, 0, 300, "pub-wss-1");
    let total = |c: &Collector| central_counts(&c.lines()).get(&1).copied().unwrap_or(0);
    wait_for(
        "300 readings over wss + mTLS",
        Duration::from_secs(20),
        || total(&s.collector) == 300,
    );
    // Rotate the client certificate on disk: the link reconnects with the new one by itself.
    let (cc, ck) = leaf(&s.client_ca, &["gw-test"], false);
    std::fs::write(&s.client_key, ck).unwrap();
    std::fs::write(&s.client_cert, cc).unwrap();
    wait_for(
        "the link to notice the rotation",
        Duration::from_secs(20),
        || s.gw.current_log().contains("credentials changed on disk"),
    );
    publish(&broker, 300, 300, "pub-wss-2");
    wait_for(
        "300 more after the rotation",
        Duration::from_secs(20),
        || total(&s.collector) == 600,
    );
    assert!(
        s.gw.current_log().matches("upstream connected").count() >= 2,
        "{}",
        s.gw.current_log()
    );
    assert!(s.gw.stop().success());
}

#[test]
fn a_wrong_token_is_refused_and_status_says_why() {
    let (mut s, _broker) = setup(true, "guessed-token");
    s.collector.start();
    s.gw.start();
    wait_for("the refusal", Duration::from_secs(20), || {
        s.gw.current_log().contains("401")
    });
    let (code, out, _) = s.gw.command(&["status"]);
    assert_eq!(code.code(), Some(3), "{out}");
    assert!(
        out.contains("upstream") && out.contains("DOWN") && out.contains("401"),
        "{out}"
    );
    assert!(s.gw.stop().success());
}

#[test]
fn an_untrusted_central_certificate_is_refused() {
    let (mut s, _broker) = setup(false, "s3cret-token");
    s.collector.start();
    s.gw.start();
    wait_for("the TLS refusal", Duration::from_secs(20), || {
        s.gw.current_log().contains("UnknownIssuer")
    });
    assert!(s.collector.lines().is_empty());
    assert!(s.gw.stop().success());
}

#[test]
fn the_upstream_token_appears_in_no_log_status_metrics_or_check_config_even_at_trace() {
    let (mut s, broker) = setup(true, "s3cret-token");
    s.collector.start();
    s.gw.spawn_with_env(&[("RUST_LOG", "trace".into())]);
    s.gw.wait_ready();
    publish(&broker, 0, 100, "pub-wss-secret");
    let total = |c: &Collector| central_counts(&c.lines()).get(&1).copied().unwrap_or(0);
    wait_for("100 readings over wss", Duration::from_secs(20), || {
        total(&s.collector) == 100
    });
    let addr = std::fs::read_to_string(s.gw.dir.path().join("data/admin.addr")).unwrap();
    let get = |path: &str| {
        edgeferry::admin::http_get(&addr, path, Duration::from_secs(3))
            .unwrap()
            .1
    };
    let (status, metrics) = (get("/status"), get("/metrics"));
    let (_, config, _) = s.gw.command(&["check-config"]);
    assert!(s.gw.stop().success());
    let log = s.gw.logs();
    assert!(
        log.contains("upstream connected") && log.lines().count() > 100,
        "a trace log of a working link"
    );
    for (what, text) in [
        ("the gateway's trace log", &log),
        ("the collector's log", &s.collector.log()),
        ("/status", &status),
        ("/metrics", &metrics),
        ("check-config", &config),
    ] {
        assert!(!text.contains("s3cret-token"), "the token is in {what}");
    }
}
