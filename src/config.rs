//! The configuration file: one TOML file, overridden by `EDGEFERRY__SECTION__KEY` environment
//! variables, checked as a whole so a field engineer sees every problem at once.
//!
//! Each stage owns the type of its own section (`ingest::MqttConfig`, `process::ProcessConfig`,
//! ...); this module only assembles them, loads the file and runs the cross-field checks
//! that serde cannot express.

use crate::admin::AdminConfig;
use crate::forward::UpstreamConfig;
use crate::ingest::MqttConfig;
use crate::process::{ProcessConfig, RuleConfig};
use crate::store::StoreConfig;
use crate::telemetry::LogConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

/// Prefix of environment overrides: `EDGEFERRY__UPSTREAM__URL` sets `upstream.url`.
pub const ENV_PREFIX: &str = "EDGEFERRY";

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[gateway]`: who this gateway is and where it keeps its data.
    pub gateway: GatewayConfig,
    /// `[mqtt]`: the local broker the sensors publish to.
    pub mqtt: MqttConfig,
    /// `[process]`: windows and the latency budget.
    #[serde(default)]
    pub process: ProcessConfig,
    /// `[[rules]]`: local alert rules.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
    /// `[store]`: disk quota and its policy.
    #[serde(default)]
    pub store: StoreConfig,
    /// `[upstream]`: the central system. Absent = keep batches locally (bounded by `max_disk`).
    #[serde(default)]
    pub upstream: Option<UpstreamConfig>,
    /// `[admin]`: metrics, status and dashboard endpoint.
    #[serde(default)]
    pub admin: AdminConfig,
    /// `[log]`: log level and format.
    #[serde(default)]
    pub log: LogConfig,
}

/// `[gateway]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Stable identity of this gateway; part of every batch id sent upstream.
    pub id: String,
    /// Directory for the journal, state and outbox (systemd: `/var/lib/edgeferry`).
    pub data_dir: PathBuf,
}

/// Every problem found in a configuration, each naming the key, the value and what is expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file that was loaded.
    pub file: PathBuf,
    /// One human-readable line per problem.
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} problem(s) in configuration {}:",
            self.problems.len(),
            self.file.display()
        )?;
        for p in &self.problems {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Loads `path`, applies environment overrides and validates the result.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    /// Like [`Config::load`] with an explicit environment (tests use this so they do not
    /// have to mutate the process environment).
    pub fn load_with_env(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let fail = |problems: Vec<String>| ConfigError {
            file: path.to_path_buf(),
            problems,
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| fail(vec![format!("cannot read {}: {e}", path.display())]))?;
        Self::from_toml_with_env(&text, env).map_err(fail)
    }

    /// Parses TOML text plus environment overrides; returns every problem found.
    pub fn from_toml_with_env(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, Vec<String>> {
        let env: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
            .collect();
        let built = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    .source(Some(env)),
            )
            .build()
            .map_err(|e| vec![describe_config_error(&e.to_string())])?;
        let mut tree: serde_json::Value = built
            .try_deserialize()
            .map_err(|e| vec![describe_config_error(&e.to_string())])?;
        // serde stops at the first error; to report *every* problem we remove each offending
        // key and try again, collecting messages, up to a sane limit.
        let mut problems = Vec::new();
        let mut removed: Vec<String> = Vec::new();
        for _ in 0..64 {
            match serde_path_to_error::deserialize::<_, Config>(&tree) {
                Ok(cfg) => {
                    if problems.is_empty() {
                        let more = cfg.validate();
                        return if more.is_empty() { Ok(cfg) } else { Err(more) };
                    }
                    return Err(problems);
                }
                Err(e) => {
                    let path = e.path().to_string();
                    let inner = e.into_inner().to_string();
                    // Environment values are parsed eagerly ("42" becomes a number); a string
                    // key such as `gateway.id` must still accept them, as the config crate would.
                    if inner.starts_with("invalid type:")
                        && inner.ends_with("expected a string")
                        && stringify_at(&mut tree, &path)
                    {
                        continue;
                    }
                    if let Some(field) = inner
                        .strip_prefix("missing field `")
                        .and_then(|r| r.split_once('`'))
                        .map(|(f, _)| f)
                    {
                        let full = join_key(&path, field);
                        if removed.contains(&full) {
                            // Already reported (it had a bad value): nothing more to learn.
                            return Err(problems);
                        }
                    }
                    problems.push(explain(&path, &inner, &tree));
                    removed.push(path.clone());
                    if !remove_path(&mut tree, &path, &inner) {
                        return Err(problems);
                    }
                }
            }
        }
        Err(problems)
    }

    /// Cross-field checks serde cannot express. Returns one line per problem.
    pub fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.gateway.id.trim().is_empty() {
            p.push("gateway.id = \"\": expected a non-empty, stable gateway name".into());
        } else if !self
            .gateway
            .id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            p.push(format!(
                "gateway.id = {:?}: expected letters, digits, '-', '_' or '.' only",
                self.gateway.id
            ));
        }
        if self.gateway.data_dir.as_os_str().is_empty() {
            p.push("gateway.data_dir = \"\": expected a directory path".into());
        }
        check_url(&mut p, "mqtt.url", &self.mqtt.url, &["mqtt", "mqtts"]);
        if let Some(e) = &self.mqtt.embedded_broker {
            check_embedded_broker(&mut p, e, &self.mqtt.url);
        }
        let files = [
            ("mqtt.password_file", &self.mqtt.password_file),
            ("mqtt.ca_file", &self.mqtt.ca_file),
            ("mqtt.cert_file", &self.mqtt.cert_file),
            ("mqtt.key_file", &self.mqtt.key_file),
        ];
        check_files(&mut p, &files);
        check_pair(&mut p, "mqtt", &self.mqtt.cert_file, &self.mqtt.key_file);
        if self.mqtt.max_payload.as_u64() == 0 || self.mqtt.max_payload.as_u64() > 256 * 1024 * 1024
        {
            p.push(format!(
                "mqtt.max_payload = \"{}\": expected between 1B and 256MiB",
                self.mqtt.max_payload
            ));
        }
        if self.mqtt.commit_max == 0 {
            p.push("mqtt.commit_max = 0: expected at least 1".into());
        }
        if self.mqtt.max_unacked < self.mqtt.commit_max {
            p.push(format!(
                "mqtt.max_unacked = {}: expected at least mqtt.commit_max ({})",
                self.mqtt.max_unacked, self.mqtt.commit_max
            ));
        }
        if self.mqtt.subscribe.is_empty() {
            p.push("mqtt.subscribe: expected at least one [[mqtt.subscribe]] with a filter".into());
        }
        for (i, s) in self.mqtt.subscribe.iter().enumerate() {
            if let Err(e) = crate::ingest::validate_filter(&s.filter) {
                p.push(format!("mqtt.subscribe[{i}].filter = {:?}: {e}", s.filter));
            }
            if let Some(t) = &s.template
                && let Err(e) = crate::ingest::decode::Template::parse(t)
            {
                p.push(format!("mqtt.subscribe[{i}].template = {t:?}: {e}"));
            }
        }
        check_windows(&mut p, &self.process.windows);
        if self.process.max_series == 0 {
            p.push("process.max_series = 0: expected at least 1".into());
        }
        if self.process.budget.is_zero() {
            p.push("process.budget = \"0s\": expected a positive duration such as \"2s\"".into());
        }
        let mut names = BTreeSet::new();
        for (i, r) in self.rules.iter().enumerate() {
            let at = format!("rules[{i}]");
            if r.name.trim().is_empty() {
                p.push(format!("{at}.name = \"\": expected a rule name"));
            } else if !names.insert(r.name.clone()) {
                p.push(format!("{at}.name = {:?}: duplicate rule name", r.name));
            }
            if r.metric.trim().is_empty() {
                p.push(format!(
                    "{at}.metric = \"\": expected the metric the rule watches"
                ));
            }
            if r.above.is_none() && r.below.is_none() && r.silent_for.is_none() {
                p.push(format!(
                    "{at} ({}): expected one of `above`, `below` or `silent_for`",
                    r.name
                ));
            }
            if let (Some(a), Some(c)) = (r.above, r.clear_below)
                && c > a
            {
                p.push(format!(
                    "{at}.clear_below = {c}: expected at most `above` ({a}) for hysteresis"
                ));
            }
            if let (Some(b), Some(c)) = (r.below, r.clear_above)
                && c < b
            {
                p.push(format!(
                    "{at}.clear_above = {c}: expected at least `below` ({b}) for hysteresis"
                ));
            }
            if r.clear_below.is_some() && r.above.is_none() {
                p.push(format!(
                    "{at}.clear_below: only meaningful together with `above`"
                ));
            }
            if r.clear_above.is_some() && r.below.is_none() {
                p.push(format!(
                    "{at}.clear_above: only meaningful together with `below`"
                ));
            }
            if r.publish.contains('+') || r.publish.contains('#') || r.publish.is_empty() {
                p.push(format!(
                    "{at}.publish = {:?}: expected a topic without wildcards",
                    r.publish
                ));
            }
        }
        if self.store.max_disk.as_u64() < 1024 * 1024 {
            p.push(format!(
                "store.max_disk = \"{}\": expected at least 1MiB",
                self.store.max_disk
            ));
        }
        if let Some(u) = &self.upstream {
            check_url(
                &mut p,
                "upstream.url",
                &u.url,
                &["ws", "wss", "mqtt", "mqtts"],
            );
            let files = [
                ("upstream.token_file", &u.token_file),
                ("upstream.ca_file", &u.ca_file),
                ("upstream.cert_file", &u.cert_file),
                ("upstream.key_file", &u.key_file),
            ];
            check_files(&mut p, &files);
            check_pair(&mut p, "upstream", &u.cert_file, &u.key_file);
            if u.batch_max == 0 {
                p.push("upstream.batch_max = 0: expected at least 1".into());
            }
        }
        if let Err(e) = self.admin.listen.parse::<std::net::SocketAddr>() {
            p.push(format!(
                "admin.listen = {:?}: {e}; expected an address such as \"127.0.0.1:9870\"",
                self.admin.listen
            ));
        }
        p
    }

    /// The MQTT client id actually used.
    pub fn client_id(&self) -> String {
        self.mqtt
            .client_id
            .clone()
            .unwrap_or_else(|| format!("edgeferry-{}", self.gateway.id))
    }

    /// The effective configuration as TOML with secrets redacted (for `check-config`).
    /// Secrets live in `*_file` keys by design, so only user names are masked here.
    pub fn to_redacted_toml(&self) -> String {
        let mut c = self.clone();
        if c.mqtt.username.is_some() {
            c.mqtt.username = Some("<redacted>".into());
        }
        toml::to_string_pretty(&c).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// `mqtt.embedded_broker`: a literal `ip:port` with a fixed port, and `mqtt.url` pointing at
/// it over plain MQTT (the embedded broker has no TLS listener).
fn check_embedded_broker(p: &mut Vec<String>, value: &str, url: &str) {
    let addr = match crate::ingest::embedded::parse_addr(value) {
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

fn check_url(p: &mut Vec<String>, key: &str, value: &str, schemes: &[&str]) {
    match url::Url::parse(value) {
        Ok(u) if schemes.contains(&u.scheme()) => {
            if u.host_str().is_none_or(str::is_empty) {
                p.push(format!("{key} = {value:?}: expected a host name"));
            }
        }
        Ok(u) => p.push(format!(
            "{key} = {value:?}: scheme {:?} is not supported; expected one of {}",
            u.scheme(),
            schemes
                .iter()
                .map(|s| format!("{s}://"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
        Err(e) => p.push(format!(
            "{key} = {value:?}: {e}; expected a URL such as \"{}://host:port\"",
            schemes[0]
        )),
    }
}

fn check_files(p: &mut Vec<String>, files: &[(&str, &Option<PathBuf>)]) {
    for (key, f) in files {
        if let Some(f) = f
            && let Err(e) = std::fs::File::open(f)
        {
            p.push(format!(
                "{key} = {:?}: cannot open: {e}; expected a readable file",
                f.display().to_string()
            ));
        }
    }
}

fn check_pair(p: &mut Vec<String>, section: &str, cert: &Option<PathBuf>, key: &Option<PathBuf>) {
    if cert.is_some() != key.is_some() {
        p.push(format!(
            "{section}.cert_file and {section}.key_file: expected both (mutual TLS) or neither"
        ));
    }
}

fn check_windows(p: &mut Vec<String>, windows: &[std::time::Duration]) {
    if windows.is_empty() {
        p.push("process.windows = []: expected at least one window such as \"10s\"".into());
    }
    for w in windows {
        if w.subsec_nanos() != 0 || w.is_zero() {
            p.push(format!(
                "process.windows: {:?} is not a whole number of seconds; expected e.g. \"10s\" or \"1m\"",
                humantime::format_duration(*w).to_string()
            ));
        }
    }
    let mut secs: Vec<u64> = windows
        .iter()
        .map(|w| w.as_secs())
        .filter(|s| *s > 0)
        .collect();
    secs.sort_unstable();
    for pair in secs.windows(2) {
        if pair[0] == pair[1] {
            p.push(format!("process.windows: {}s is listed twice", pair[0]));
        } else if pair[1] % pair[0] != 0 {
            p.push(format!(
                "process.windows: {}s does not divide {}s; expected each window to divide the next",
                pair[0], pair[1]
            ));
        }
    }
}

/// Turns an error of the `config` crate into one line.
fn describe_config_error(msg: &str) -> String {
    format!("cannot parse configuration: {msg}")
}

/// One line for a serde error at `path`, with a "did you mean" hint for unknown keys.
fn explain(path: &str, msg: &str, tree: &serde_json::Value) -> String {
    if let Some((field, expected)) = parse_unknown_field(msg) {
        // serde_path_to_error's path already ends with the unknown field itself.
        let full = if path.ends_with(field.as_str()) {
            path.to_string()
        } else {
            join_key(path, &field)
        };
        let hint = expected
            .iter()
            .map(|c| (strsim::damerau_levenshtein(&field, c), c))
            .filter(|(d, c)| *d <= 2.max(c.len() / 3))
            .min()
            .map(|(_, c)| format!(" (did you mean `{c}`?)"))
            .unwrap_or_default();
        let known = if expected.is_empty() {
            String::new()
        } else {
            format!("; known keys here: {}", expected.join(", "))
        };
        return format!("unknown key `{full}`{hint}{known}");
    }
    let value = lookup(tree, path)
        .map(|v| format!(" = {v}"))
        .unwrap_or_default();
    let key = if path == "." { "configuration" } else { path };
    format!("{key}{value}: {msg}")
}

/// Parses serde's "unknown field `x`, expected one of `a`, `b`" message.
fn parse_unknown_field(msg: &str) -> Option<(String, Vec<String>)> {
    let rest = msg.strip_prefix("unknown field `")?;
    let (field, rest) = rest.split_once('`')?;
    let expected = rest
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    Some((field.to_string(), expected))
}

fn join_key(path: &str, field: &str) -> String {
    if path == "." || path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

/// Replaces a number or boolean at `path` by its string form. Returns false if there is none.
fn stringify_at(tree: &mut serde_json::Value, path: &str) -> bool {
    let mut cur = tree;
    for seg in path.split('.').filter(|s| !s.is_empty()) {
        let next = match seg.strip_suffix(']').and_then(|s| s.split_once('[')) {
            Some((name, idx)) => match idx.parse::<usize>() {
                Ok(i) => cur.get_mut(name).and_then(|v| v.get_mut(i)),
                Err(_) => None,
            },
            None => cur.get_mut(seg),
        };
        match next {
            Some(n) => cur = n,
            None => return false,
        }
    }
    let s = match cur {
        serde_json::Value::Number(n) => n.to_string(),
        serde_json::Value::Bool(b) => b.to_string(),
        _ => return false,
    };
    *cur = serde_json::Value::String(s);
    true
}

fn lookup<'a>(tree: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    let mut cur = tree;
    for seg in path.split('.').filter(|s| !s.is_empty()) {
        cur = match seg.strip_suffix(']').and_then(|s| s.split_once('[')) {
            Some((name, idx)) => cur.get(name)?.get(idx.parse::<usize>().ok()?)?,
            None => cur.get(seg)?,
        };
    }
    Some(cur)
}

/// Removes the offending key so the next attempt can find the next problem. For an unknown
/// field the key is the field itself; otherwise the value at `path`. Returns false if
/// nothing could be removed (then we stop rather than loop).
fn remove_path(tree: &mut serde_json::Value, path: &str, msg: &str) -> bool {
    let mut segs: Vec<String> = path
        .split('.')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if let Some((field, _)) = parse_unknown_field(msg)
        && segs.last() != Some(&field)
    {
        segs.push(field);
    }
    let Some(last) = segs.pop() else {
        return false;
    };
    let mut cur = &mut *tree;
    for seg in &segs {
        let next = match seg.strip_suffix(']').and_then(|s| s.split_once('[')) {
            Some((name, idx)) => {
                let Ok(i) = idx.parse::<usize>() else {
                    return false;
                };
                cur.get_mut(name).and_then(|v| v.get_mut(i))
            }
            None => cur.get_mut(seg.as_str()),
        };
        match next {
            Some(n) => cur = n,
            None => return false,
        }
    }
    match last.strip_suffix(']').and_then(|s| s.split_once('[')) {
        Some((name, idx)) => {
            let (Some(arr), Ok(i)) = (
                cur.get_mut(name).and_then(|v| v.as_array_mut()),
                idx.parse::<usize>(),
            ) else {
                return false;
            };
            if i < arr.len() {
                arr.remove(i);
                true
            } else {
                false
            }
        }
        None => cur
            .as_object_mut()
            .is_some_and(|o| o.remove(&last).is_some()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[gateway]
id = "gw-1"
data_dir = "/tmp/edgeferry-test"

[mqtt]
url = "mqtt://127.0.0.1:1883"

[[mqtt.subscribe]]
filter = "sensors/#"
"#;

    fn parse(text: &str) -> Result<Config, Vec<String>> {
        Config::from_toml_with_env(text, Vec::<(String, String)>::new())
    }

    fn problems(text: &str) -> Vec<String> {
        parse(text).expect_err("expected the configuration to be refused")
    }

    fn with(extra: &str) -> String {
        format!("{MINIMAL}\n{extra}")
    }

    fn with_embedded(url: &str, broker: &str) -> String {
        MINIMAL.replace(
            "url = \"mqtt://127.0.0.1:1883\"",
            &format!("url = {url:?}\nembedded_broker = {broker:?}"),
        )
    }

    #[test]
    fn the_embedded_broker_needs_an_ip_port_that_mqtt_url_points_at() {
        let c = parse(&with_embedded("mqtt://127.0.0.1:1883", "0.0.0.0:1883")).unwrap();
        assert_eq!(c.mqtt.embedded_broker.as_deref(), Some("0.0.0.0:1883"));
        assert!(parse(MINIMAL).unwrap().mqtt.embedded_broker.is_none());
        let p = problems(&with_embedded("mqtt://127.0.0.1:1883", "localhost:1883"));
        assert!(
            p[0].contains("mqtt.embedded_broker = \"localhost:1883\""),
            "{p:?}"
        );
        let p = problems(&with_embedded("mqtt://127.0.0.1:1883", "127.0.0.1:0"));
        assert!(p[0].contains("fixed port"), "{p:?}");
        let p = problems(&with_embedded("mqtt://127.0.0.1:1884", "127.0.0.1:1883"));
        assert!(p[0].contains("expected port 1883"), "{p:?}");
        let p = problems(&with_embedded("mqtts://127.0.0.1:1883", "127.0.0.1:1883"));
        assert!(p[0].contains("plain MQTT only"), "{p:?}");
    }

    #[test]
    fn a_minimal_file_gets_sensible_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.client_id(), "edgeferry-gw-1");
        assert_eq!(c.mqtt.max_payload.as_u64(), 64 * 1024);
        assert_eq!(c.process.windows.len(), 2);
        assert_eq!(c.process.budget, std::time::Duration::from_secs(2));
        assert_eq!(c.admin.listen, "127.0.0.1:9870");
    }

    #[test]
    fn the_example_file_passes() {
        let text = include_str!("../config.toml.example");
        let c = parse(text).unwrap_or_else(|p| panic!("config.toml.example: {p:#?}"));
        assert_eq!(c.rules.len(), 2);
        assert!(c.upstream.is_some());
    }

    #[test]
    fn unknown_key_is_named_with_a_suggestion() {
        let p = problems(&MINIMAL.replace("[mqtt]", "[mqtt]\nmax_paylod = \"1KiB\""));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("unknown key `mqtt.max_paylod`"), "{p:?}");
        assert!(p[0].contains("did you mean `max_payload`"), "{p:?}");
    }

    #[test]
    fn unknown_section_is_named() {
        let p = problems(&with("[procss]\nwindows = [\"10s\"]"));
        assert!(p[0].contains("unknown key `procss`"), "{p:?}");
        assert!(p[0].contains("did you mean `process`"), "{p:?}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = MINIMAL
            .replace(
                "[mqtt]",
                "[mqtt]\nmax_payload = \"lots\"\ncommit_max = \"many\"",
            )
            .replace("[gateway]", "[gateway]\ncolour = \"blue\"");
        let p = problems(&text);
        assert_eq!(p.len(), 3, "{p:#?}");
        assert!(p.iter().any(|l| l.contains("gateway.colour")));
        assert!(
            p.iter()
                .any(|l| l.contains("mqtt.max_payload") && l.contains("lots"))
        );
        assert!(
            p.iter()
                .any(|l| l.contains("mqtt.commit_max") && l.contains("many"))
        );
    }

    #[test]
    fn wrong_type_names_key_value_and_expectation() {
        let p = problems(&MINIMAL.replace("[mqtt]", "[mqtt]\ncommit_max = \"many\""));
        assert!(p[0].starts_with("mqtt.commit_max = \"many\""), "{p:?}");
        assert!(p[0].contains("expected"), "{p:?}");
    }

    #[test]
    fn bad_duration_is_explained() {
        let p = problems(&MINIMAL.replace("[mqtt]", "[mqtt]\ncommit_interval = \"10x\""));
        assert!(p[0].starts_with("mqtt.commit_interval = \"10x\""), "{p:?}");
        let p = problems(&with("[process]\nwindows = [\"10x\"]"));
        assert!(
            p[0].contains("process.windows") && p[0].contains("10x"),
            "{p:?}"
        );
    }

    #[test]
    fn bad_size_is_explained() {
        let p = problems(&MINIMAL.replace("[mqtt]", "[mqtt]\nmax_payload = \"12 parsecs\""));
        assert!(
            p[0].starts_with("mqtt.max_payload = \"12 parsecs\""),
            "{p:?}"
        );
    }

    #[test]
    fn bad_url_scheme_lists_the_supported_ones() {
        let p = problems(&MINIMAL.replace("mqtt://127", "http://127"));
        assert!(
            p[0].contains("mqtt.url") && p[0].contains("\"http\""),
            "{p:?}"
        );
        assert!(p[0].contains("mqtt://, mqtts://"), "{p:?}");
        let p = problems(&with("[upstream]\nurl = \"ftp://central\""));
        assert!(
            p[0].contains("upstream.url") && p[0].contains("ws://, wss://"),
            "{p:?}"
        );
        let p = problems(&MINIMAL.replace("mqtt://127.0.0.1:1883", "not a url"));
        assert!(p[0].contains("mqtt.url = \"not a url\""), "{p:?}");
    }

    #[test]
    fn empty_gateway_id_is_refused() {
        let p = problems(&MINIMAL.replace("id = \"gw-1\"", "id = \"\""));
        assert!(p[0].contains("gateway.id"), "{p:?}");
    }

    #[test]
    fn windows_must_be_whole_seconds_and_divide_each_other() {
        let p = problems(&with("[process]\nwindows = [\"1500ms\"]"));
        assert!(p[0].contains("not a whole number of seconds"), "{p:?}");
        let p = problems(&with("[process]\nwindows = [\"10s\", \"25s\"]"));
        assert!(p[0].contains("10s does not divide 25s"), "{p:?}");
        assert!(parse(&with("[process]\nwindows = [\"1m\", \"10s\", \"1h\"]")).is_ok());
    }

    #[test]
    fn missing_referenced_files_are_named() {
        let p = problems(&MINIMAL.replace(
            "[mqtt]",
            "[mqtt]\npassword_file = \"/nonexistent/edgeferry-pw\"",
        ));
        assert!(
            p[0].contains("mqtt.password_file") && p[0].contains("/nonexistent/edgeferry-pw"),
            "{p:?}"
        );
    }

    #[test]
    fn cert_without_key_is_refused() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let p = problems(&MINIMAL.replace(
            "[mqtt]",
            &format!("[mqtt]\ncert_file = {:?}", f.path().display().to_string()),
        ));
        assert!(
            p.iter()
                .any(|l| l.contains("mqtt.cert_file and mqtt.key_file")),
            "{p:?}"
        );
    }

    #[test]
    fn bad_template_and_filter_are_refused() {
        let p = problems(&MINIMAL.replace(
            "filter = \"sensors/#\"",
            "filter = \"sensors/#/x\"\ntemplate = \"sensors/{site\"",
        ));
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("mqtt.subscribe[0].filter"));
        assert!(p[1].contains("mqtt.subscribe[0].template"));
    }

    #[test]
    fn rules_need_a_condition_and_consistent_hysteresis() {
        let p = problems(&with("[[rules]]\nname = \"r\"\nmetric = \"t\""));
        assert!(
            p[0].contains("expected one of `above`, `below` or `silent_for`"),
            "{p:?}"
        );
        let p = problems(&with(
            "[[rules]]\nname = \"r\"\nmetric = \"t\"\nabove = 10.0\nclear_below = 12.0",
        ));
        assert!(p[0].contains("rules[0].clear_below = 12"), "{p:?}");
    }

    #[test]
    fn environment_overrides_the_file_with_double_underscores() {
        let env = vec![
            (
                "EDGEFERRY__MQTT__URL".to_string(),
                "mqtt://127.0.0.1:1999".to_string(),
            ),
            ("EDGEFERRY__GATEWAY__ID".to_string(), "42".to_string()),
            (
                "EDGEFERRY__PROCESS__MAX_SERIES".to_string(),
                "77".to_string(),
            ),
            ("UNRELATED".to_string(), "x".to_string()),
        ];
        let c = Config::from_toml_with_env(MINIMAL, env).unwrap();
        assert_eq!(c.mqtt.url, "mqtt://127.0.0.1:1999");
        assert_eq!(c.gateway.id, "42", "a numeric-looking id stays a string");
        assert_eq!(c.process.max_series, 77);
    }

    #[test]
    fn unknown_environment_key_is_reported_like_a_file_key() {
        let env = vec![("EDGEFERRY__MQTT__URLL".to_string(), "x".to_string())];
        let p = Config::from_toml_with_env(MINIMAL, env).unwrap_err();
        assert!(
            p[0].contains("unknown key `mqtt.urll`") && p[0].contains("did you mean `url`"),
            "{p:?}"
        );
    }

    #[test]
    fn redacted_output_hides_the_user_name_and_reparses() {
        let c = parse(&MINIMAL.replace("[mqtt]", "[mqtt]\nusername = \"secret-user\"")).unwrap();
        let out = c.to_redacted_toml();
        assert!(!out.contains("secret-user"));
        assert!(
            parse(&out).is_ok(),
            "check-config output is itself a valid config:\n{out}"
        );
    }
}
