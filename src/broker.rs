//! An MQTT broker's address as the configuration gives it, an `mqtt://` or `mqtts://` URL, for
//! every MQTT client edgeferry runs: the ingest session, the MQTT upstream and the collector's
//! MQTT source.
//!
//! One parser, so that the three agree on the schemes, the default ports (1883, 8883 with
//! TLS), IPv6 literals (`mqtt://[::1]:1883`: rumqttc wants the address without brackets) and
//! how TLS is put on the connection (rustls on `ring`, built by [`crate::tls`]).

use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use std::sync::Arc;

/// What is wrong with a broker URL (the caller names the setting).
#[derive(Debug, thiserror::Error)]
pub enum BrokerUrlError {
    /// Not a URL at all.
    #[error("{0}")]
    Parse(#[from] url::ParseError),
    /// A scheme other than `mqtt` or `mqtts`.
    #[error("unsupported scheme {0:?}; use mqtt:// or mqtts://")]
    Scheme(String),
    /// A URL without a host (`mqtt:///x`).
    #[error("no host")]
    NoHost,
}

/// A parsed broker URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// Host name or address, IPv6 without its brackets.
    pub host: String,
    /// The URL's port, or the scheme's default.
    pub port: u16,
    /// `mqtts://`.
    pub tls: bool,
    /// The user name in the URL (`mqtt://user@host`), empty when none.
    pub username: String,
    /// The password in the URL, if any.
    pub password: Option<String>,
}

impl BrokerUrl {
    /// Parses `mqtt://[user[:password]@]host[:port]` or `mqtts://…`.
    pub fn parse(s: &str) -> Result<BrokerUrl, BrokerUrlError> {
        let url = url::Url::parse(s)?;
        let tls = match url.scheme() {
            "mqtt" => false,
            "mqtts" => true,
            other => return Err(BrokerUrlError::Scheme(other.to_string())),
        };
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or(BrokerUrlError::NoHost)?
            .trim_matches(['[', ']'])
            .to_string();
        Ok(BrokerUrl {
            host,
            port: url.port().unwrap_or(if tls { 8883 } else { 1883 }),
            tls,
            username: url.username().to_string(),
            password: url.password().map(str::to_string),
        })
    }

    /// Client options to this broker as `client_id`, over `tls` when given (the caller
    /// builds it, from its own settings, when [`BrokerUrl::tls`] says so). Everything else
    /// (session, acks, limits, credentials) is the caller's.
    pub fn options(
        &self,
        client_id: impl Into<String>,
        tls: Option<rustls::ClientConfig>,
    ) -> MqttOptions {
        let mut o = MqttOptions::new(client_id, self.host.clone(), self.port);
        if let Some(c) = tls {
            o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(c),
            )));
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_default_ports_ipv6_and_credentials() {
        let u = BrokerUrl::parse("mqtt://127.0.0.1").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.tls), ("127.0.0.1", 1883, false));
        let u = BrokerUrl::parse("mqtts://broker.example").unwrap();
        assert_eq!((u.port, u.tls), (8883, true));
        let u = BrokerUrl::parse("mqtt://[::1]:1884").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port),
            ("::1", 1884),
            "rumqttc wants no brackets"
        );
        let u = BrokerUrl::parse("mqtts://gw:s3cret@h:9000").unwrap();
        assert_eq!(
            (u.username.as_str(), u.password.as_deref()),
            ("gw", Some("s3cret"))
        );
        assert_eq!(BrokerUrl::parse("mqtt://h").unwrap().password, None);
    }

    #[test]
    fn what_is_not_a_broker_url_is_named() {
        let e = BrokerUrl::parse("http://h").unwrap_err();
        assert_eq!(
            e.to_string(),
            "unsupported scheme \"http\"; use mqtt:// or mqtts://"
        );
        assert!(matches!(
            BrokerUrl::parse("not a url"),
            Err(BrokerUrlError::Parse(_))
        ));
        assert!(matches!(
            BrokerUrl::parse("mqtt:///x"),
            Err(BrokerUrlError::NoHost)
        ));
    }

    #[test]
    fn options_carry_the_address_and_tls_when_given() {
        let u = BrokerUrl::parse("mqtt://[::1]:1884").unwrap();
        let o = u.options("c1", None);
        assert_eq!(o.broker_address(), ("::1".to_string(), 1884));
        assert_eq!(o.client_id(), "c1");
        assert!(matches!(o.transport(), Transport::Tcp));
        let c = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let o = BrokerUrl::parse("mqtts://h")
            .unwrap()
            .options("c2", Some(c));
        assert!(matches!(o.transport(), Transport::Tls(_)));
    }
}
