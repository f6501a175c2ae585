//! Local alerts: what the rules raise and clear, published on the local broker and forwarded
//! upstream ahead of aggregates.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Whether an alert starts or ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    /// The condition began.
    Raised,
    /// The condition ended.
    Cleared,
}

/// A local alert, raised or cleared by a rule for one series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// The rule's name.
    pub rule: String,
    /// The series key (see [`super::reading::series_key`]).
    pub series: String,
    /// The series' metric.
    pub metric: String,
    /// The series' tags.
    pub tags: BTreeMap<String, String>,
    /// Raised or cleared.
    pub state: AlertState,
    /// The value that triggered it (none for silence alerts).
    pub value: Option<f64>,
    /// Event time of the triggering reading, or the processing time for silence alerts (ms).
    pub time_ms: i64,
}
