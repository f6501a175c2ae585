//! Configuration of local processing (`[process]`) and alert rules (`[[rules]]`).

use crate::validate::Problems;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::time::Duration;

/// `[process]`: windows, lateness and the latency budget.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessConfig {
    /// Tumbling window lengths, whole seconds, each dividing the next (e.g. `["10s", "1m"]`).
    #[serde(default = "default_windows", with = "humantime_serde_vec")]
    pub windows: Vec<Duration>,
    /// How long after a window's end late readings are still folded in before it is emitted.
    #[serde(default = "default_lateness", with = "humantime_serde")]
    pub allowed_lateness: Duration,
    /// How long an emitted window is kept so that later readings produce a correction.
    #[serde(default = "default_correction_horizon", with = "humantime_serde")]
    pub correction_horizon: Duration,
    /// Most distinct series tracked; readings of new series beyond it are rejected and counted.
    #[serde(default = "default_max_series")]
    pub max_series: usize,
    /// The latency budget every step is measured against.
    #[serde(default = "default_budget", with = "humantime_serde")]
    pub budget: Duration,
    /// How often window state is checkpointed together with its journal position.
    #[serde(default = "default_checkpoint_interval", with = "humantime_serde")]
    pub checkpoint_interval: Duration,
}

impl Default for ProcessConfig {
    fn default() -> Self {
        Self {
            windows: default_windows(),
            allowed_lateness: default_lateness(),
            correction_horizon: default_correction_horizon(),
            max_series: default_max_series(),
            budget: default_budget(),
            checkpoint_interval: default_checkpoint_interval(),
        }
    }
}

/// `[[rules]]`: a local alert rule.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Unique rule name; appears in alerts and in the `{rule}` placeholder.
    pub name: String,
    /// Metric the rule watches (every series of that metric).
    pub metric: String,
    /// Raise when the value goes above this.
    #[serde(default)]
    pub above: Option<f64>,
    /// Raise when the value goes below this.
    #[serde(default)]
    pub below: Option<f64>,
    /// Hysteresis for `above`: clear only when the value falls to or below this.
    #[serde(default)]
    pub clear_below: Option<f64>,
    /// Hysteresis for `below`: clear only when the value rises to or above this.
    #[serde(default)]
    pub clear_above: Option<f64>,
    /// Raise when a series that used to report has been silent this long.
    #[serde(default, with = "humantime_serde")]
    pub silent_for: Option<Duration>,
    /// Topic the alert is published on; placeholders `{rule}`, `{metric}` and the series' tags.
    #[serde(default = "default_publish")]
    pub publish: String,
}

fn default_windows() -> Vec<Duration> {
    vec![Duration::from_secs(10), Duration::from_secs(60)]
}
fn default_lateness() -> Duration {
    Duration::from_secs(5)
}
fn default_correction_horizon() -> Duration {
    // Memory and checkpoint size grow with horizon/window per series (measured: ~8 KiB per
    // series with 10 s + 1 min windows kept 10 min), so the default is modest.
    Duration::from_secs(120)
}
fn default_max_series() -> usize {
    10_000
}
fn default_budget() -> Duration {
    Duration::from_secs(2)
}
fn default_checkpoint_interval() -> Duration {
    // Each checkpoint writes the window slots changed since the last one (a delta, 0.1 MB
    // compressed 10 s after the last with 1,000 series in the example config's windows) or,
    // every few, the whole state (0.35 MB compressed): on SD cards this interval is a
    // flash-wear knob. Aggregate batches reach the forwarder at the next checkpoint, alert
    // batches within `ALERTS_CHECKPOINT_WITHIN` (5 s); the journal keeps every reading since
    // the last one for replay after a crash.
    Duration::from_secs(30)
}
fn default_publish() -> String {
    "edgeferry/alerts/{rule}".to_string()
}

/// serde adapter for a list of humantime durations (`["10s", "1m"]`).
mod humantime_serde_vec {
    use serde::{Deserialize, Deserializer, Serializer, ser::SerializeSeq};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(v: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for d in v {
            seq.serialize_element(&humantime::format_duration(*d).to_string())?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        let raw = Vec::<String>::deserialize(d)?;
        raw.iter()
            .map(|s| {
                humantime::parse_duration(s).map_err(|e| {
                    serde::de::Error::custom(format!(
                        "bad duration {s:?}: {e} (expected e.g. \"10s\", \"1m\")"
                    ))
                })
            })
            .collect()
    }
}

impl ProcessConfig {
    /// Checks `[process]` beyond what serde can.
    pub fn validate(&self, p: &mut Problems) {
        check_windows(p, &self.windows);
        if self.max_series == 0 {
            p.push("process.max_series = 0: expected at least 1");
        }
        if self.budget.is_zero() {
            p.push("process.budget = \"0s\": expected a positive duration such as \"2s\"");
        }
    }
}

/// Checks `[[rules]]`: unique names, a condition each, consistent hysteresis, a topic without
/// wildcards to publish on.
pub fn validate_rules(rules: &[RuleConfig], p: &mut Problems) {
    let mut names = BTreeSet::new();
    for (i, r) in rules.iter().enumerate() {
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
}

/// Windows: at least one, whole seconds, each dividing the next (so the longer ones can be
/// checked against the shorter ones at the center).
fn check_windows(p: &mut Problems, windows: &[Duration]) {
    if windows.is_empty() {
        p.push("process.windows = []: expected at least one window such as \"10s\"");
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(toml_rules: &str) -> Vec<String> {
        #[derive(Deserialize)]
        struct File {
            rules: Vec<RuleConfig>,
        }
        let f: File = toml::from_str(toml_rules).unwrap();
        let mut p = Problems::new();
        validate_rules(&f.rules, &mut p);
        p.into_vec()
    }

    #[test]
    fn the_default_process_section_is_valid_and_each_bad_value_is_named() {
        let mut p = Problems::new();
        ProcessConfig::default().validate(&mut p);
        assert!(p.is_empty(), "{p:?}");
        let bad = ProcessConfig {
            windows: vec![Duration::from_secs(10), Duration::from_secs(25)],
            max_series: 0,
            budget: Duration::ZERO,
            ..ProcessConfig::default()
        };
        let mut p = Problems::new();
        bad.validate(&mut p);
        let v = p.into_vec();
        assert_eq!(v.len(), 3, "{v:?}");
        assert!(v[0].contains("10s does not divide 25s"));
        assert!(v[1].starts_with("process.max_series = 0"));
        assert!(v[2].starts_with("process.budget = \"0s\""));
    }

    #[test]
    fn rules_are_checked_one_by_one_and_names_are_unique() {
        let v = rules(
            r#"
            [[rules]]
            name = "hot"
            metric = "t"
            above = 30.0
            [[rules]]
            name = "hot"
            metric = "t"
            publish = "alerts/#"
            "#,
        );
        assert_eq!(v.len(), 3, "{v:?}");
        assert!(v[0].contains("duplicate rule name"));
        assert!(v[1].contains("expected one of `above`, `below` or `silent_for`"));
        assert!(v[2].contains("expected a topic without wildcards"));
    }
}
