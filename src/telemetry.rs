//! Logging setup and rate-limited warnings.
//!
//! Under systemd, stdout goes to journald, which adds its own timestamps and does not render
//! ANSI colours; so colours are only used on a terminal, and JSON is available for log shippers.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::prelude::*;

/// `[log]`: how much is logged and in which format.
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

/// `[log] format`: how log lines on stdout are written (text for journald and terminals,
/// JSON for log shippers).
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

/// The filter for a level or directive list such as `info` or `warn,edgeferry=debug`
/// (`target=level` pairs; `off` silences a target).
///
/// `Targets` rather than `EnvFilter`: the same directive syntax without span and field filters,
/// and without the regex engine those need (about 300 KiB of a gateway binary;
/// docs/DECISIONS.md).
pub fn filter(directives: &str) -> Result<Targets, FilterError> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    for d in directives
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
    {
        let level = d.rsplit_once('=').map_or(d, |(_, l)| l);
        // `Targets` reads a bare word as a target with every level, so a mistyped level
        // ("infp") would silently log nothing of edgeferry's own: refuse it instead.
        if !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(level.trim())) {
            return Err(FilterError(format!("{d:?} is not a level or target=level")));
        }
    }
    directives
        .parse()
        .map_err(|e: tracing_subscriber::filter::ParseError| FilterError(e.to_string()))
}

/// Why a log filter is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FilterError(String);

/// The filter in effect: `RUST_LOG` when it is set and valid, else `[log] level`, else `info`;
/// never more verbose than [`SECRET_SAFE`] allows for the libraries that would print secrets.
pub fn effective_filter(cfg: &LogConfig) -> Targets {
    secret_safe(quiet_embedded_broker(
        env_filter()
            .or_else(|| filter(&cfg.level).ok())
            .unwrap_or_else(|| Targets::new().with_default(LevelFilter::INFO)),
    ))
}

/// `RUST_LOG`'s filter, when it is set to something valid (an empty value counts as unset).
fn env_filter() -> Option<Targets> {
    std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .and_then(|v| filter(&v).ok())
}

/// Libraries whose most verbose level prints credentials, and the most they may log: tungstenite
/// traces the whole HTTP upgrade request, `authorization: Bearer <token>` included.
pub const SECRET_SAFE: &[(&str, LevelFilter)] = &[("tungstenite", LevelFilter::DEBUG)];

/// Caps the [`SECRET_SAFE`] targets, whatever the directives say (secrets must not reach a
/// log at any level: logs are shipped, attached to tickets and kept for years).
pub fn secret_safe(filter: Targets) -> Targets {
    let default = filter.default_level().unwrap_or(LevelFilter::OFF);
    let mut out = Targets::new().with_default(default);
    for (target, level) in filter.iter() {
        let capped = SECRET_SAFE
            .iter()
            .find(|(t, _)| target.starts_with(t))
            .map_or(level, |&(_, max)| level.min(max));
        out = out.with_target(target, capped);
    }
    for &(target, max) in SECRET_SAFE {
        let wanted = filter
            .iter()
            .find(|(t, _)| *t == target)
            .map_or(default, |(_, l)| l);
        out = out.with_target(target, wanted.min(max));
    }
    out
}

/// The running subscriber's filter, swapped by [`set_level`] (configuration reload).
type LevelHandle = tracing_subscriber::reload::Handle<Targets, tracing_subscriber::Registry>;

static LEVEL: std::sync::OnceLock<LevelHandle> = std::sync::OnceLock::new();

/// Installs the global subscriber. Safe to call more than once (later calls are ignored),
/// which keeps tests that run several daemons in one process simple.
///
/// The filter sits in a reload layer so that `[log] level` can change while the daemon runs
/// ([`set_level`]); the format cannot (it is the layer's type).
pub fn init(cfg: &LogConfig) {
    let (filter, handle) = tracing_subscriber::reload::Layer::new(effective_filter(cfg));
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false);
    let installed = match cfg.format {
        LogFormat::Text => tracing_subscriber::registry()
            .with(
                layer
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_filter(filter),
            )
            .try_init(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(layer.json().flatten_event(true).with_filter(filter))
            .try_init(),
    };
    if installed.is_ok() {
        let _ = LEVEL.set(handle);
    }
}

/// What [`set_level`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LevelChange {
    /// The new `[log] level` is in effect.
    Applied,
    /// `RUST_LOG` is set and wins over the file, as at start: nothing changed.
    EnvironmentWins,
    /// No subscriber of ours is installed (a library user's own, or none): nothing changed.
    NotInstalled,
}

/// Puts `cfg.level` into effect in the running subscriber (configuration reload).
pub fn set_level(cfg: &LogConfig) -> LevelChange {
    if env_filter().is_some() {
        return LevelChange::EnvironmentWins;
    }
    let Some(handle) = LEVEL.get() else {
        return LevelChange::NotInstalled;
    };
    match handle.reload(effective_filter(cfg)) {
        Ok(()) => LevelChange::Applied,
        Err(_) => LevelChange::NotInstalled,
    }
}

impl LogConfig {
    /// Checks `[log]`: the level must parse as a filter.
    pub fn validate(&self, p: &mut crate::validate::Problems) {
        if let Err(e) = filter(&self.level) {
            p.push(format!(
                "log.level = {:?}: {e}; expected a level (error, warn, info, debug, trace) or \
                 directives such as \"warn,edgeferry=debug\"",
                self.level
            ));
        }
    }
}

/// Silences the embedded broker (rumqttd) unless the filter names it (`RUST_LOG=info,rumqttd=info`):
/// it logs every ordinary client disconnect, and every TCP connection closed before CONNECT, at
/// ERROR level, which would drown edgeferry's own messages. edgeferry reports the broker's
/// start-up failures itself.
pub fn quiet_embedded_broker(filter: Targets) -> Targets {
    if filter
        .iter()
        .any(|(target, _)| target.starts_with("rumqttd"))
    {
        filter
    } else {
        filter.with_target("rumqttd", LevelFilter::OFF)
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

    /// Logs `msg` as a warning unless one for `key` was logged within the interval; says how
    /// many were suppressed since.
    pub fn warn(&self, key: &'static str, msg: &str) {
        match self.check(key) {
            Some(0) => tracing::warn!("{msg}"),
            Some(n) => tracing::warn!("{msg} ({n} similar messages suppressed)"),
            None => {}
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
    fn levels_and_directives_parse_and_the_embedded_broker_stays_quiet_unless_named() {
        use tracing::Level;
        let f = quiet_embedded_broker(filter("warn,edgeferry=debug").unwrap());
        assert!(f.would_enable("edgeferry::ingest", &Level::DEBUG));
        assert!(!f.would_enable("rumqttc", &Level::INFO));
        assert!(f.would_enable("rumqttc", &Level::WARN));
        assert!(!f.would_enable("rumqttd::router", &Level::ERROR));
        let named = quiet_embedded_broker(filter("info,rumqttd=info").unwrap());
        assert!(named.would_enable("rumqttd::router", &Level::INFO));
    }

    #[test]
    fn libraries_that_print_credentials_are_capped_whatever_the_directives_say() {
        use tracing::Level;
        for d in [
            "trace",
            "info,tungstenite=trace",
            "tungstenite::handshake=trace,debug",
        ] {
            let f = secret_safe(filter(d).unwrap());
            assert!(
                !f.would_enable("tungstenite::handshake::client", &Level::TRACE),
                "{d}: the upgrade request (with its bearer token) would be logged"
            );
        }
        let f = secret_safe(filter("trace").unwrap());
        assert!(f.would_enable("tungstenite::handshake::client", &Level::DEBUG));
        assert!(
            f.would_enable("edgeferry::forward", &Level::TRACE),
            "others untouched"
        );
        let quiet = secret_safe(filter("warn").unwrap());
        assert!(
            !quiet.would_enable("tungstenite", &Level::DEBUG),
            "never raised"
        );
    }

    #[test]
    fn an_unusable_level_is_a_configuration_problem() {
        let mut p = crate::validate::Problems::new();
        LogConfig::default().validate(&mut p);
        assert!(p.is_empty());
        let bad = LogConfig {
            level: "loud".into(),
            ..LogConfig::default()
        };
        bad.validate(&mut p);
        let v = p.into_vec();
        assert_eq!(v.len(), 1);
        assert!(v[0].starts_with("log.level = \"loud\""), "{v:?}");
    }

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
