//! Configuration of local processing (`[process]`) and alert rules (`[[rules]]`).

use serde::{Deserialize, Serialize};
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
    // Each checkpoint rewrites the whole window state: on SD cards this interval is a
    // flash-wear knob. Batches reach the forwarder at the next checkpoint (or within 1 s
    // when batches are waiting), so it does not delay alerts much.
    Duration::from_secs(5)
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
