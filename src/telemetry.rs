//! Logging setup and rate-limited warnings.
//!
//! Under systemd, stdout goes to journald, which adds its own timestamps and does not render
//! ANSI colours; so colours are only used on a terminal, and JSON is available for log shippers.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tracing_subscriber::EnvFilter;

/// `[log]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Default level (`error`, `warn`, `info`, `debug`, `trace`) or a full filter directive;
    /// `RUST_LOG`, when set, wins.
    #[serde(default = "default_level")]
    pub level: String,
    /// `text` (human, journald) or `json` (one object per line).
    #[serde(default)]
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: default_level(),
            format: LogFormat::Text,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Plain text; ANSI colours only when stdout is a terminal.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

fn default_level() -> String {
    "info".to_string()
}

/// Installs the global subscriber. Safe to call more than once (later calls are ignored),
/// which keeps tests that run several daemons in one process simple.
pub fn init(cfg: &LogConfig) {
    let filter = quiet_embedded_broker(
        EnvFilter::try_from_default_env()
            .or_else(|_| EnvFilter::try_new(&cfg.level))
            .unwrap_or_else(|_| EnvFilter::new("info")),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match cfg.format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Silences the embedded broker (rumqttd) unless the filter names it (`RUST_LOG=info,rumqttd=info`):
/// it logs every ordinary client disconnect, and every TCP connection closed before CONNECT, at
/// ERROR level, which would drown edgeferry's own messages. edgeferry reports the broker's
/// start-up failures itself.
pub fn quiet_embedded_broker(filter: EnvFilter) -> EnvFilter {
    if filter.to_string().contains("rumqttd") {
        filter
    } else {
        filter.add_directive("rumqttd=off".parse().expect("a valid directive"))
    }
}

/// The identity of a failure message for "log each state change once": the same failure
/// often carries a changing time, counter or port, so digits are ignored.
pub fn failure_key(msg: &str) -> String {
    msg.chars().filter(|c| !c.is_ascii_digit()).collect()
}

/// Lets a repeated warning through at most once per `interval` per key, counting what it
/// suppressed so the next message can say how many were hidden. Keys are static strings
/// (reasons), so the map is bounded by the number of reasons in the code.
#[derive(Debug)]
pub struct RateLimit {
    interval: Duration,
    last: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl RateLimit {
    /// A limiter letting one message per key through every `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// Returns `Some(suppressed_since_last)` when a message for `key` may be logged now.
    pub fn check(&self, key: &'static str) -> Option<u64> {
        let now = Instant::now();
        let mut map = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match map.get_mut(key) {
            Some((at, suppressed)) if now.duration_since(*at) < self.interval => {
                *suppressed += 1;
                None
            }
            Some((at, suppressed)) => {
                let n = *suppressed;
                *at = now;
                *suppressed = 0;
                Some(n)
            }
            None => {
                map.insert(key, (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_keys_ignore_changing_numbers_only() {
        assert_eq!(
            failure_key("expired: verification time 1795928600"),
            failure_key("expired: verification time 1795928601")
        );
        assert_ne!(failure_key("connection refused"), failure_key("timed out"));
    }

    #[test]
    fn rate_limit_lets_one_message_per_interval_and_counts_the_rest() {
        let rl = RateLimit::new(Duration::from_secs(3600));
        assert_eq!(rl.check("a"), Some(0));
        assert_eq!(rl.check("a"), None);
        assert_eq!(rl.check("a"), None);
        assert_eq!(rl.check("b"), Some(0), "keys are independent");
        let rl = RateLimit::new(Duration::ZERO);
        assert_eq!(rl.check("a"), Some(0));
        assert_eq!(rl.check("a"), Some(0));
    }
}
