//! Local alerts: what the rules raise and clear, published on the local broker and forwarded
//! upstream ahead of aggregates.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Whether an alert starts or ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    /// The rule's condition started to hold: a threshold was crossed or the series fell silent.
    Raised,
    /// The condition no longer holds: the value recovered past the clear level, a silent series
    /// reported again, or the rule was removed from the configuration.
    Cleared,
}

/// A local alert, raised or cleared by a rule for one series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// Name of the `[[rules]]` entry that raised or cleared it.
    pub rule: String,
    /// The series key (see [`super::reading::series_key`]).
    pub series: String,
    /// The series' metric, carried so consumers need not parse `series`.
    pub metric: String,
    /// The series' tags; with the rule and metric they fill the publish topic's placeholders.
    pub tags: BTreeMap<String, String>,
    /// Raised or cleared.
    pub state: AlertState,
    /// The value that triggered it (none for silence alerts).
    pub value: Option<f64>,
    /// Event time of the triggering reading, or the processing time for silence alerts (ms).
    pub time_ms: i64,
}
