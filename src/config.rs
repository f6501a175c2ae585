//! The configuration file: one TOML file, overridden by `EDGEFERRY__SECTION__KEY` environment
//! variables, checked as a whole so a field engineer sees every problem at once.
//!
//! Each stage owns the type of its own section (`ingest::MqttConfig`, `process::ProcessConfig`,
//! ...); this module only assembles them, loads the file and runs the cross-field checks
//! that serde cannot express.

use crate::admin::AdminConfig;
use crate::clock::ClockConfig;
use crate::forward::UpstreamConfig;
use crate::ingest::MqttConfig;
use crate::process::{ProcessConfig, RuleConfig};
use crate::store::StoreConfig;
use crate::telemetry::LogConfig;
use crate::validate::Problems;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};

/// Prefix of environment overrides: `EDGEFERRY__UPSTREAM__URL` sets `upstream.url`.
pub const ENV_PREFIX: &str = "EDGEFERRY";

/// Everything edgeferry reads from its configuration file (after environment overrides),
/// one field per section; each section's type lives with the stage that uses it.
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
    /// `[clock]`: whether the wall clock may be trusted (NTP state).
    #[serde(default)]
    pub clock: ClockConfig,
}

/// `[gateway]`: this gateway's identity and where it keeps its durable data.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Stable identity of this gateway; part of every batch id sent upstream.
    pub id: String,
    /// Directory for the journal, state and outbox (systemd: `/var/lib/edgeferry`).
    pub data_dir: PathBuf,
}

impl GatewayConfig {
    /// Checks `[gateway]`: an id usable in batch ids and file names, a data directory.
    pub fn validate(&self, p: &mut Problems) {
        if self.id.trim().is_empty() {
            p.push("gateway.id = \"\": expected a non-empty, stable gateway name");
        } else if !self
            .id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            p.push(format!(
                "gateway.id = {:?}: expected letters, digits, '-', '_' or '.' only",
                self.id
            ));
        }
        if self.data_dir.as_os_str().is_empty() {
            p.push("gateway.data_dir = \"\": expected a directory path");
        }
    }
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

    /// Checks serde cannot express: each section checks itself (next to its type) and every
    /// problem of every section is returned at once, one line each.
    pub fn validate(&self) -> Vec<String> {
        let mut p = Problems::new();
        self.gateway.validate(&mut p);
        self.mqtt.validate(&mut p);
        self.process.validate(&mut p);
        crate::process::config::validate_rules(&self.rules, &mut p);
        self.store.validate(&mut p);
        if let Some(u) = &self.upstream {
            u.validate(&mut p);
        }
        self.admin.validate(&mut p);
        self.log.validate(&mut p);
        p.into_vec()
    }

    /// What works but exposes something (see [`crate::validate::exposure_warnings`]).
    pub fn warnings(&self) -> Vec<String> {
        let mut secrets = vec![
            ("mqtt.password_file", &self.mqtt.password_file),
            ("mqtt.key_file", &self.mqtt.key_file),
        ];
        let mut urls = vec![("mqtt.url", self.mqtt.url.as_str())];
        if let Some(u) = &self.upstream {
            secrets.push(("upstream.token_file", &u.token_file));
            secrets.push(("upstream.key_file", &u.key_file));
            urls.extend(
                u.url
                    .list()
                    .iter()
                    .map(|url| ("upstream.url", url.as_str())),
            );
        }
        let mut w = crate::validate::exposure_warnings(&secrets, &urls);
        // The admin endpoint has no authentication: beyond loopback, anyone on the network
        // reads the status, the metrics and the live readings.
        if let Ok(addr) = self.admin.listen.parse::<std::net::SocketAddr>()
            && !addr.ip().is_loopback()
        {
            w.push(format!(
                "admin.listen = {:?} is not loopback: the dashboard, /status, /metrics and the \
                 live readings are served without authentication to the network; keep it on \
                 127.0.0.1 and reach it through SSH or a reverse proxy with authentication",
                self.admin.listen
            ));
        }
        w
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

    #[test]
    fn an_admin_endpoint_beyond_loopback_is_warned_about_and_the_default_is_not() {
        assert!(parse(MINIMAL).unwrap().warnings().is_empty());
        let open = parse(&with("[admin]\nlisten = \"0.0.0.0:9870\"\n")).unwrap();
        let w = open.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with("admin.listen = \"0.0.0.0:9870\" is not loopback"),
            "{w:?}"
        );
        let v6 = parse(&with("[admin]\nlisten = \"[::1]:9870\"\n")).unwrap();
        assert!(v6.warnings().is_empty());
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
    #[cfg(feature = "embedded-broker")]
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
    #[cfg(not(feature = "embedded-broker"))]
    fn a_gateway_only_build_says_it_has_no_embedded_broker() {
        let p = problems(&with_embedded("mqtt://127.0.0.1:1883", "127.0.0.1:1883"));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("built without the embedded broker"), "{p:?}");
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
    fn upstream_url_is_one_url_or_a_list_of_one_transport() {
        let one = parse(&with("[upstream]\nurl = \"wss://a.example:9443/\"")).unwrap();
        assert_eq!(one.upstream.unwrap().url.list(), ["wss://a.example:9443/"]);
        let two = parse(&with(
            "[upstream]\nurl = [\"wss://a.example:9443/\", \"wss://b.example:9443/\"]",
        ))
        .unwrap();
        let up = two.upstream.unwrap();
        assert_eq!(up.url.list().len(), 2);
        assert!(!up.url.is_mqtt());
        assert_eq!(
            up.url.to_string(),
            "wss://a.example:9443/, wss://b.example:9443/"
        );

        let p = problems(&with(
            "[upstream]\nurl = [\"wss://a.example:9443/\", \"mqtts://b.example\"]",
        ));
        assert!(p[0].contains("mixes WebSocket and MQTT URLs"), "{p:?}");
        let p = problems(&with("[upstream]\nurl = []"));
        assert!(p[0].contains("expected at least one URL"), "{p:?}");
        let p = problems(&with(
            "[upstream]\nurl = [\"wss://a.example:9443/\", \"ftp://b\"]",
        ));
        assert!(p[0].starts_with("upstream.url[1] = \"ftp://b\""), "{p:?}");
        let p = problems(&with(
            "[upstream]\nurl = [\"wss://a.example:9443/\", \"wss://a.example:9443/\"]",
        ));
        assert!(p[0].contains("listed twice"), "{p:?}");
        let p = problems(&with("[upstream]\nurl = 7"));
        assert!(p[0].contains("upstream.url"), "{p:?}");

        // An environment override names one URL, replacing the file's list.
        let env = vec![(
            "EDGEFERRY__UPSTREAM__URL".to_string(),
            "ws://127.0.0.1:9443/".to_string(),
        )];
        let text = with("[upstream]\nurl = [\"wss://a.example:9443/\", \"wss://b.example:9443/\"]");
        let c = Config::from_toml_with_env(&text, env).unwrap();
        assert_eq!(c.upstream.unwrap().url.list(), ["ws://127.0.0.1:9443/"]);
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
    fn line_protocol_takes_a_precision_and_options_that_do_not_fit_the_format_are_refused() {
        let c = parse(&MINIMAL.replace(
            "filter = \"sensors/#\"",
            "filter = \"telegraf/#\"\nformat = \"line\"\nprecision = \"ms\"",
        ))
        .unwrap();
        let d = c.mqtt.subscribe[0].decoder().unwrap();
        let mut out = Vec::new();
        d.decode(
            "telegraf/h1",
            b"cpu,host=h1 usage=12.5 1700000000123",
            0,
            &mut out,
        )
        .unwrap();
        assert_eq!(
            (out[0].metric.as_str(), out[0].time_ms),
            ("cpu.usage", 1_700_000_000_123)
        );
        // check-config names the subscription and the option, for every format it misfits.
        let p = problems(&MINIMAL.replace(
            "filter = \"sensors/#\"",
            "filter = \"sensors/#\"\nprecision = \"s\"",
        ));
        assert_eq!(
            p,
            [
                "mqtt.subscribe[0]: precision cannot be used with format json: only line protocol \
              timestamps have a configurable unit"
            ]
        );
        let p = problems(&MINIMAL.replace(
            "filter = \"sensors/#\"",
            "filter = \"sensors/#\"\nformat = \"senml\"\nvalue = \"v\"",
        ));
        assert!(
            p[0].starts_with("mqtt.subscribe[0]: value cannot be used with format senml"),
            "{p:?}"
        );
        let p = problems(&MINIMAL.replace(
            "filter = \"sensors/#\"",
            "filter = \"sensors/#\"\nformat = \"line\"\nprecision = \"h\"",
        ));
        assert!(p[0].contains("precision"), "{p:?}");
    }

    #[test]
    fn sparkplug_takes_tag_names_and_rebirth_and_refuses_what_its_fixed_structure_cannot_use() {
        let c = parse(&MINIMAL.replace(
            "filter = \"sensors/#\"",
            "filter = \"spBv1.0/#\"\nformat = \"sparkplug_b\"\nrebirth = false\n\
             tag_names = { group = \"site\", edge_node = \"gateway\" }",
        ))
        .unwrap();
        let d = c.mqtt.subscribe[0].decoder().unwrap();
        assert!(!d.sparkplug().rebirth);
        assert_eq!(d.sparkplug().names.group, "site");
        assert_eq!(d.sparkplug().names.device, "device", "the default stays");
        for (extra, named) in [
            (
                "template = \"spBv1.0/{a}/{b}/{c}\"",
                "template cannot be used with format sparkplug_b",
            ),
            (
                "value = \"v\"",
                "value cannot be used with format sparkplug_b",
            ),
            (
                "timestamp = \"t\"",
                "timestamp cannot be used with format sparkplug_b",
            ),
            (
                "tag_names = { group = \"x\", edge_node = \"x\" }",
                "tag_names: the names must differ",
            ),
            ("tag_names = { site = \"x\" }", "unknown key"),
        ] {
            let p = problems(&MINIMAL.replace(
                "filter = \"sensors/#\"",
                &format!("filter = \"spBv1.0/#\"\nformat = \"sparkplug_b\"\n{extra}"),
            ));
            assert!(p.len() == 1 && p[0].contains(named), "{extra}: {p:?}");
        }
        let p = problems(&MINIMAL.replace(
            "filter = \"sensors/#\"",
            "filter = \"sensors/#\"\nrebirth = true",
        ));
        assert!(
            p[0].contains("rebirth and tag_names cannot be used with format json"),
            "{p:?}"
        );
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

    proptest::proptest! {
        /// The same property as `fuzz/fuzz_targets/config.rs`: any text (here: the example
        /// with one span replaced) is a configuration or a list of problems, never a panic.
        #[test]
        fn any_configuration_text_is_loaded_or_refused_with_named_problems(
            at in 0usize..8192,
            len in 0usize..64,
            junk in "[ -~\n]{0,32}",
        ) {
            let example = include_str!("../config.toml.example");
            let at = at % example.len();
            let end = (at + len).min(example.len());
            if example.is_char_boundary(at) && example.is_char_boundary(end) {
                let text = format!("{}{junk}{}", &example[..at], &example[end..]);
                if let Err(problems) = parse(&text) {
                    proptest::prop_assert!(!problems.is_empty());
                    proptest::prop_assert!(problems.iter().all(|p| !p.trim().is_empty()));
                }
            }
        }
    }
}
