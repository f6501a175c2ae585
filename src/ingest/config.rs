//! Configuration of the MQTT ingest stage (`[mqtt]` and `[[mqtt.subscribe]]`).

use super::decode::sparkplug::TagNames;
use super::decode::{Decoder, Format, Precision, Template, TemplateError};
use crate::validate::Problems;
use bytesize::ByteSize;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// `[mqtt]`: where sensor readings come from and how they are acknowledged.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `mqtt://host:port` (plain) or `mqtts://host:port` (TLS).
    pub url: String,
    /// Run an MQTT broker (rumqttd) inside edgeferry on this `ip:port`, for small gateways
    /// where the sensors connect straight to edgeferry; `url` must then point at it.
    /// In-memory only: see docs/DECISIONS.md ("Embedded broker") before using it in production.
    #[serde(default)]
    pub embedded_broker: Option<String>,
    /// Fixed client id: persistent sessions only survive reconnects under the same id.
    /// Defaults to `edgeferry-<gateway.id>`.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Optional broker user name.
    #[serde(default)]
    pub username: Option<String>,
    /// File holding the broker password (kept out of the config so the config can be shared).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// CA bundle (PEM) for `mqtts://`; system roots when absent.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Largest accepted payload; larger messages are rejected (and still acknowledged).
    #[serde(default = "default_max_payload")]
    pub max_payload: ByteSize,
    /// Group commit: the longest a received reading waits before its journal batch is synced
    /// (a group also closes once its records fill the journal's page; see
    /// `ingest::commit`). The main flash-wear knob at low rates: each sync writes at least
    /// one 4 KiB page (docs/DECISIONS.md has the measurements).
    #[serde(default = "default_commit_interval", with = "humantime_serde")]
    pub commit_interval: Duration,
    /// Group commit: sync as soon as this many messages are pending.
    #[serde(default = "default_commit_max")]
    pub commit_max: usize,
    /// Upper bound on messages received but not yet acknowledged. Mosquitto does not enforce
    /// its inflight window for slow ackers, so this is what bounds edgeferry's memory.
    #[serde(default = "default_max_unacked")]
    pub max_unacked: usize,
    /// Readings whose event time is further than this ahead of a synchronised clock are
    /// rejected (see `[clock]`).
    #[serde(default = "default_future_skew", with = "humantime_serde")]
    pub future_skew: Duration,
    /// Also recognise redeliveries by the readings' identity (series, event time, value),
    /// whatever the broker's packet id and DUP flag: for brokers that resend with new ids and
    /// DUP=0. Applies to the first `2 × max_unacked + commit_max` messages of each connection
    /// (the only ones that can be redeliveries) and to readings with their own timestamps;
    /// a reading equal in series, time and value to one just journaled is then dropped as the
    /// same reading. Costs 8 bytes per remembered message (~330 KB at the defaults).
    #[serde(default = "default_true")]
    pub dedup_by_identity: bool,
    /// MQTT keep-alive: edgeferry pings the broker after this long without traffic, so a dead
    /// connection is noticed and the broker can drop a vanished client.
    #[serde(default = "default_keep_alive", with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Longest pause between reconnect attempts (exponential backoff with full jitter).
    #[serde(default = "default_reconnect_max", with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// The subscriptions; at least one.
    #[serde(default)]
    pub subscribe: Vec<SubscribeConfig>,
}

/// `[[mqtt.subscribe]]`: one topic filter and how to decode what arrives on it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscribeConfig {
    /// MQTT topic filter, subscribed with QoS 1.
    pub filter: String,
    /// Topic template mapping levels to tags, e.g. `sensors/{site}/{device}/{metric}`.
    #[serde(default)]
    pub template: Option<String>,
    /// Payload format: `json`, `number`, `senml`, `line` or `sparkplug_b`.
    #[serde(default)]
    pub format: Format,
    /// JSON: dotted path of the value field; absent = every numeric field is a reading.
    #[serde(default)]
    pub value: Option<String>,
    /// JSON: dotted path of the event-time field; absent = arrival time.
    #[serde(default)]
    pub timestamp: Option<String>,
    /// Line protocol: the unit of the lines' timestamps (`ns`, `us`, `ms`, `s`); absent =
    /// `ns`, as InfluxDB and Telegraf default to.
    #[serde(default)]
    pub precision: Option<Precision>,
    /// `format = "sparkplug_b"` only: ask an edge node for a rebirth (`NCMD` with `Node
    /// Control/Rebirth = true`, at most every 5 s per node) when its data names aliases no
    /// birth declared or its `seq` skips. Default: true.
    #[serde(default)]
    pub rebirth: Option<bool>,
    /// `format = "sparkplug_b"` only: the names of the tags the topic's levels become, e.g.
    /// `{ group = "site", edge_node = "gateway", device = "machine" }`. Default: `group`,
    /// `edge_node`, `device`.
    #[serde(default)]
    pub tag_names: Option<TagNames>,
}

impl SubscribeConfig {
    /// The decoder this subscription configures, or why its options do not fit together
    /// (checked by `check-config` too, so the daemon never starts with one it cannot build).
    pub fn decoder(&self) -> Result<Decoder, TemplateError> {
        let d = Decoder::new(
            self.template.as_deref(),
            self.format,
            self.value.as_deref(),
            self.timestamp.as_deref(),
        )?;
        let d = match self.precision {
            Some(p) => d.with_precision(p)?,
            None => d,
        };
        if self.rebirth.is_none() && self.tag_names.is_none() {
            return Ok(d);
        }
        d.with_sparkplug(crate::ingest::decode::sparkplug::Options {
            rebirth: self.rebirth.unwrap_or(true),
            names: self.tag_names.clone().unwrap_or_default(),
        })
    }
}

fn default_max_payload() -> ByteSize {
    ByteSize::kib(64)
}
fn default_commit_interval() -> Duration {
    Duration::from_millis(350)
}
fn default_commit_max() -> usize {
    1000
}
fn default_max_unacked() -> usize {
    20_000
}
fn default_true() -> bool {
    true
}
fn default_future_skew() -> Duration {
    Duration::from_secs(300)
}
fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
}
fn default_reconnect_max() -> Duration {
    Duration::from_secs(30)
}

impl MqttConfig {
    /// Checks `[mqtt]` and its `[[mqtt.subscribe]]` entries beyond what serde can.
    pub fn validate(&self, p: &mut Problems) {
        p.url("mqtt.url", &self.url, &["mqtt", "mqtts"]);
        if let Some(e) = &self.embedded_broker {
            #[cfg(feature = "embedded-broker")]
            check_embedded_broker(p, e, &self.url);
            #[cfg(not(feature = "embedded-broker"))]
            p.push(format!(
                "mqtt.embedded_broker = {e:?}: this edgeferry was built without the embedded \
                 broker (cargo feature `embedded-broker`); run a broker such as Mosquitto and \
                 remove the key"
            ));
        }
        p.readable_files(&[
            ("mqtt.password_file", &self.password_file),
            ("mqtt.ca_file", &self.ca_file),
            ("mqtt.cert_file", &self.cert_file),
            ("mqtt.key_file", &self.key_file),
        ]);
        p.cert_key_pair("mqtt", &self.cert_file, &self.key_file);
        if self.max_payload.as_u64() == 0 || self.max_payload.as_u64() > 256 * 1024 * 1024 {
            p.push(format!(
                "mqtt.max_payload = \"{}\": expected between 1B and 256MiB",
                self.max_payload
            ));
        }
        if self.commit_max == 0 {
            p.push("mqtt.commit_max = 0: expected at least 1");
        }
        if self.max_unacked < self.commit_max {
            p.push(format!(
                "mqtt.max_unacked = {}: expected at least mqtt.commit_max ({})",
                self.max_unacked, self.commit_max
            ));
        }
        if self.subscribe.is_empty() {
            p.push("mqtt.subscribe: expected at least one [[mqtt.subscribe]] with a filter");
        }
        for (i, s) in self.subscribe.iter().enumerate() {
            if let Err(e) = validate_filter(&s.filter) {
                p.push(format!("mqtt.subscribe[{i}].filter = {:?}: {e}", s.filter));
            }
            if let Some(t) = &s.template
                && let Err(e) = Template::parse(t)
            {
                p.push(format!("mqtt.subscribe[{i}].template = {t:?}: {e}"));
            } else if let Err(e) = s.decoder() {
                p.push(format!("mqtt.subscribe[{i}]: {e}"));
            }
        }
    }

    /// The largest MQTT packet accepted: 16 MiB or four times `max_payload`, whichever is
    /// larger (a packet carries topic and properties besides the payload, and a smaller limit
    /// would make rumqttc drop the connection instead of letting ingest reject the message).
    pub fn packet_limit(&self) -> usize {
        (self.max_payload.as_u64() as usize)
            .saturating_mul(4)
            .max(16 * 1024 * 1024)
    }
}

/// `mqtt.embedded_broker`: a literal `ip:port` with a fixed port, and `mqtt.url` pointing at
/// it over plain MQTT (the embedded broker has no TLS listener).
#[cfg(feature = "embedded-broker")]
fn check_embedded_broker(p: &mut Problems, value: &str, url: &str) {
    let addr = match super::embedded::parse_addr(value) {
        Ok(a) => a,
        Err(e) => {
            p.push(format!(
                "mqtt.embedded_broker = {value:?}: {e}; expected an address such as \"127.0.0.1:1883\""
            ));
            return;
        }
    };
    if addr.port() == 0 {
        p.push(format!(
            "mqtt.embedded_broker = {value:?}: expected a fixed port (sensors must know it), such as \"127.0.0.1:1883\""
        ));
        return;
    }
    let Ok(u) = url::Url::parse(url) else {
        return; // reported under mqtt.url
    };
    if u.scheme() != "mqtt" {
        p.push(format!(
            "mqtt.url = {url:?}: with mqtt.embedded_broker the URL must be mqtt://127.0.0.1:{} (the embedded broker speaks plain MQTT only)",
            addr.port()
        ));
    } else if u.port().unwrap_or(1883) != addr.port() {
        p.push(format!(
            "mqtt.url = {url:?}: expected port {} to reach mqtt.embedded_broker = {value:?}",
            addr.port()
        ));
    }
}

/// Why a topic filter is not a valid MQTT filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// Nothing to subscribe to.
    #[error("expected a topic filter such as \"sensors/#\"")]
    Empty,
    /// `#` inside a level, or not the last level.
    #[error("`#` must be a whole level and the last one")]
    MultiLevelNotLast,
    /// `+` inside a level.
    #[error("`+` must be a whole level")]
    SingleLevelNotWhole,
}

/// Checks an MQTT topic filter: non-empty, `+` and `#` alone in their level, `#` last.
pub fn validate_filter(filter: &str) -> Result<(), FilterError> {
    if filter.is_empty() {
        return Err(FilterError::Empty);
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, l) in levels.iter().enumerate() {
        if l.contains('#') && (*l != "#" || i + 1 != levels.len()) {
            return Err(FilterError::MultiLevelNotLast);
        }
        if l.contains('+') && *l != "+" {
            return Err(FilterError::SingleLevelNotWhole);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_filters_are_checked_like_mqtt_does() {
        assert!(validate_filter("sensors/#").is_ok());
        assert!(validate_filter("sensors/+/temp").is_ok());
        assert!(validate_filter("#").is_ok());
        assert_eq!(validate_filter(""), Err(FilterError::Empty));
        assert_eq!(
            validate_filter("sensors/#/x"),
            Err(FilterError::MultiLevelNotLast)
        );
        assert_eq!(
            validate_filter("sensors/a#"),
            Err(FilterError::MultiLevelNotLast)
        );
        assert_eq!(
            validate_filter("sensors/a+/x"),
            Err(FilterError::SingleLevelNotWhole)
        );
    }
}
