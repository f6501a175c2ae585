//! The "cloud": a second Mosquitto with a plain listener (test clients) and a TLS listener
//! that requires a client certificate (gateways' MQTT upstream, collectors' `--mqtt`).

use super::certs::{Ca, ca, leaf, write};
use super::{Mosquitto, free_port, wait_for};
use std::time::Duration;

/// The cloud: a broker with a plain listener (the test subscriber) and a TLS listener that
/// requires a client certificate (the gateway).
pub struct Cloud {
    pub broker: Mosquitto,
    pub tls_port: u16,
    pub certs: tempfile::TempDir,
    pub server_ca: Ca,
    pub client_ca: Ca,
}

/// A broker with a plain listener (for the test publisher) and a TLS listener that requires
/// client certificates from `client_ca`.
pub fn tls_broker(
    server_ca: &Ca,
    client_ca: &Ca,
    expired: bool,
) -> (Mosquitto, u16, tempfile::TempDir) {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = leaf(server_ca, &["localhost"], expired);
    let cert = write(certs.path(), "server.pem", &cert);
    let key = write(certs.path(), "server.key", &key);
    let cafile = write(certs.path(), "client-ca.pem", &client_ca.pem);
    let tls_port = free_port();
    let broker = Mosquitto::start_with(&format!(
        "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
        cafile.display(),
        cert.display(),
        key.display()
    ));
    wait_for("the TLS listener", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", tls_port)).is_ok()
    });
    (broker, tls_port, certs)
}

impl Cloud {
    pub fn start() -> Cloud {
        let server_ca = ca("cloud-server-ca");
        let client_ca = ca("cloud-client-ca");
        let (broker, tls_port, certs) = tls_broker(&server_ca, &client_ca, false);
        Cloud {
            broker,
            tls_port,
            certs,
            server_ca,
            client_ca,
        }
    }

    pub fn wait_tls(&self) {
        let port = self.tls_port;
        wait_for("the cloud TLS listener", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    /// `[upstream]` for the gateway: mqtts with the cloud's CA and a client certificate.
    pub fn upstream_section(&self) -> String {
        self.upstream_section_with(false, "")
    }

    /// (Re)writes the gateway's client certificate and key, `expired` or valid.
    pub fn write_client_cert(&self, expired: bool) -> (std::path::PathBuf, std::path::PathBuf) {
        let (cert, key) = leaf(&self.client_ca, &["gw-test"], expired);
        (
            write(self.certs.path(), "client.pem", &cert),
            write(self.certs.path(), "client.key", &key),
        )
    }

    /// `[upstream]` with the client certificate `expired` or not, plus `extra` keys.
    pub fn upstream_section_with(&self, expired: bool, extra: &str) -> String {
        let ca = self.trust_file();
        let (cert, key) = self.write_client_cert(expired);
        format!(
            "[upstream]\nurl = \"mqtts://localhost:{}\"\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\nlinger = \"200ms\"\n{extra}",
            self.tls_port,
            ca.display().to_string(),
            cert.display().to_string(),
            key.display().to_string()
        )
    }

    /// The CA file that trusts the cloud's server certificate.
    pub fn trust_file(&self) -> std::path::PathBuf {
        write(self.certs.path(), "trust.pem", &self.server_ca.pem)
    }

    /// A valid client certificate and key for `name` (e.g. a collector).
    pub fn client_files(&self, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let (cert, key) = leaf(&self.client_ca, &[name], false);
        (
            write(self.certs.path(), &format!("{name}.pem"), &cert),
            write(self.certs.path(), &format!("{name}.key"), &key),
        )
    }
}
