//! `mqtts://` ingest with rustls: mutual TLS works; an untrusted or expired server certificate
//! is refused with a clear reason. Certificates are made by rcgen for each test.

mod common;

use common::certs::{Ca, ca, leaf, write};

use common::cloud::tls_broker;
use common::*;
use std::path::Path;
use std::time::Duration;

fn tls_gateway(tls_port: u16, trust: &Ca, client: (String, String), certs: &Path) -> Gateway {
    let ca = write(certs, "trust.pem", &trust.pem);
    let cert = write(certs, "client.pem", &client.0);
    let key = write(certs, "client.key", &client.1);
    Gateway::with_config(
        &format!("mqtts://localhost:{tls_port}"),
        &format!(
            "ca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}",
            ca.display().to_string(),
            cert.display().to_string(),
            key.display().to_string()
        ),
        "",
    )
}

#[test]
fn mutual_tls_ingest_journals_every_reading() {
    let server_ca = ca("server-ca");
    let client_ca = ca("client-ca");
    let (broker, tls_port, certs) = tls_broker(&server_ca, &client_ca, false);
    let client = leaf(&client_ca, &["gw-test"], false);
    let mut gw = tls_gateway(tls_port, &server_ca, client, certs.path());
    gw.start();
    let p = Publisher::connect(broker.port, "pub-tls");
    for i in 0..200 {
        p.publish(
            &format!("sensors/a/d{}/temperature", i % 4),
            reading_payload(i),
        );
    }
    p.wait_acked(200, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(500));
    assert!(gw.stop().success());
    assert_exactly_once(gw.journal().iter().map(|r| r.value), 200);
}

fn assert_refused(gw: &mut Gateway, needle: &str) {
    gw.spawn();
    let start = std::time::Instant::now();
    while !gw.current_log().contains(needle) {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no TLS error mentioning {needle:?}:\n{}",
            gw.current_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = gw.current_log();
    assert!(
        !log.contains("ready: state recovered"),
        "must not become ready:\n{log}"
    );
    assert_eq!(
        log.matches("unreachable").count(),
        1,
        "the same failure is logged once, not once per attempt:\n{log}"
    );
    assert!(gw.stop().success());
}

#[test]
fn an_untrusted_server_certificate_is_refused() {
    let server_ca = ca("server-ca");
    let client_ca = ca("client-ca");
    let (_broker, tls_port, certs) = tls_broker(&server_ca, &client_ca, false);
    let stranger = ca("some-other-ca");
    let client = leaf(&client_ca, &["gw-test"], false);
    let mut gw = tls_gateway(tls_port, &stranger, client, certs.path());
    assert_refused(&mut gw, "UnknownIssuer");
}

#[test]
fn an_expired_server_certificate_is_refused() {
    let server_ca = ca("server-ca");
    let client_ca = ca("client-ca");
    let (_broker, tls_port, certs) = tls_broker(&server_ca, &client_ca, true);
    let client = leaf(&client_ca, &["gw-test"], false);
    let mut gw = tls_gateway(tls_port, &server_ca, client, certs.path());
    assert_refused(&mut gw, "certificate expired");
}
