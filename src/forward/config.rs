//! Configuration of the upstream link (`[upstream]`).

use crate::validate::Problems;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// `[upstream]`: where aggregate batches go.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `wss://` / `ws://` (WebSocket) or `mqtts://` / `mqtt://` (MQTT broker upstream).
    pub url: String,
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

impl UpstreamConfig {
    /// Checks `[upstream]` beyond what serde can.
    pub fn validate(&self, p: &mut Problems) {
        p.url("upstream.url", &self.url, &["ws", "wss", "mqtt", "mqtts"]);
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
