//! Configuration of the upstream link (`[upstream]`).

use crate::validate::Problems;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// `[upstream]`: where aggregate batches go.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `wss://` / `ws://` (WebSocket) or `mqtts://` / `mqtt://` (MQTT broker upstream): one
    /// URL, or a list of them (all of one transport) the link fails over between.
    pub url: Urls,
    /// Bearer token sent in the WebSocket handshake.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// CA bundle (PEM) that verifies the server; system roots when absent.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Most items (aggregates or alerts) per batch.
    #[serde(default = "default_batch_max")]
    pub batch_max: usize,
    /// Longest an item waits for its batch to fill.
    #[serde(default = "default_linger", with = "humantime_serde")]
    pub linger: Duration,
    /// Longest pause between reconnect attempts (exponential backoff with full jitter, so a
    /// fleet that lost the same central system does not come back in lockstep). It is also
    /// how long fresh data may wait after the link returns.
    #[serde(default = "default_reconnect_max", with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// MQTT upstream only: topic the batches are published on (`{gateway}` placeholder).
    #[serde(default = "default_topic")]
    pub topic: String,
}

fn default_batch_max() -> usize {
    500
}
fn default_linger() -> Duration {
    Duration::from_secs(1)
}
fn default_reconnect_max() -> Duration {
    Duration::from_secs(15)
}
fn default_topic() -> String {
    "edgeferry/{gateway}/batches".to_string()
}

/// `[upstream] url`: one URL (`url = "wss://a:9443/"`) or several (`url = ["wss://a:9443/",
/// "wss://b:9443/"]`). With several, a gateway starts at a random one, so a fleet spreads
/// over its collectors without a load balancer, and moves to the next when a connection
/// fails or a link dies (the resume handshake makes a switch lossless).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Urls(Vec<String>);

impl Urls {
    /// The URLs in the order configured (never empty once validated).
    pub fn list(&self) -> &[String] {
        &self.0
    }

    /// Whether they are MQTT broker URLs (`mqtt://`, `mqtts://`) rather than WebSocket ones.
    pub fn is_mqtt(&self) -> bool {
        self.0.first().is_some_and(|u| u.starts_with("mqtt"))
    }
}

impl From<&str> for Urls {
    fn from(url: &str) -> Urls {
        Urls(vec![url.to_string()])
    }
}

impl std::fmt::Display for Urls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(", "))
    }
}

impl<'de> Deserialize<'de> for Urls {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Urls, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged, expecting = "a URL, or a list of URLs")]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        Ok(match OneOrMany::deserialize(d)? {
            OneOrMany::One(u) => Urls(vec![u]),
            OneOrMany::Many(v) => Urls(v),
        })
    }
}

impl Serialize for Urls {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => s.serialize_str(one),
            many => many.serialize(s),
        }
    }
}

impl UpstreamConfig {
    /// Checks `[upstream]` beyond what serde can.
    pub fn validate(&self, p: &mut Problems) {
        let urls = self.url.list();
        match urls {
            [] => p.push("upstream.url = []: expected at least one URL"),
            [one] => p.url("upstream.url", one, &["ws", "wss", "mqtt", "mqtts"]),
            many => {
                for (i, u) in many.iter().enumerate() {
                    p.url(
                        &format!("upstream.url[{i}]"),
                        u,
                        &["ws", "wss", "mqtt", "mqtts"],
                    );
                }
                if many
                    .iter()
                    .any(|u| u.starts_with("mqtt") != self.url.is_mqtt())
                {
                    p.push(format!(
                        "upstream.url = {:?}: mixes WebSocket and MQTT URLs; expected one transport for all of them",
                        many
                    ));
                }
                let mut seen = std::collections::HashSet::new();
                for u in many {
                    if !seen.insert(u) {
                        p.push(format!("upstream.url: {u:?} is listed twice"));
                    }
                }
            }
        }
        p.readable_files(&[
            ("upstream.token_file", &self.token_file),
            ("upstream.ca_file", &self.ca_file),
            ("upstream.cert_file", &self.cert_file),
            ("upstream.key_file", &self.key_file),
        ]);
        p.cert_key_pair("upstream", &self.cert_file, &self.key_file);
        if self.batch_max == 0 {
            p.push("upstream.batch_max = 0: expected at least 1");
        }
    }
}
