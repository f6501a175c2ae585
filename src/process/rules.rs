//! Local alert rules: threshold rules with hysteresis and silence (dead sensor) rules.
//!
//! A rule (`[[rules]]`, see [`RuleConfig`]) watches every series whose metric equals the
//! rule's `metric`. For each (rule, series) pair there is exactly **one** alert state, which
//! is either clear or raised; every transition produces one [`Alert`] (raised or cleared),
//! so the alerts of a pair always alternate `raised, cleared, raised, ...`.
//!
//! # Threshold rules and why hysteresis
//!
//! * `above = A`: raise when a value is strictly greater than `A`; once raised, clear only
//!   when a value is `<= clear_below` (default: `<= A`).
//! * `below = B`: raise when a value is strictly less than `B`; once raised, clear only when
//!   a value is `>= clear_above` (default: `>= B`).
//! * Both on one rule: still one alert state. It is raised when *either* raise condition
//!   holds and cleared only when *both* clear conditions hold (a value that jumps from too
//!   high to too low stays one alert, not a clear followed by a raise).
//!
//! Real sensors are noisy: a temperature hovering around 80.0 produces 80.1, 79.9, 80.1, ...
//! Without a gap between the raise and the clear level every wiggle would raise and clear
//! an alert, flooding the uplink and the on-call phone with hundreds of alerts for one
//! condition. With `clear_below = 75` the alert is raised once and cleared only when the
//! value has really recovered. A clear level on the wrong side of its limit (e.g.
//! `clear_below > above`) would make the rule flap on every reading, so it is clamped to the
//! limit. NaN limits are treated as absent.
//!
//! # Silence rules and why
//!
//! The commonest field failure of an IoT installation is not a value out of range but a
//! sensor that stops reporting: flat battery, dead radio, unplugged device, corroded
//! connector. Nothing arrives, so no threshold can fire; only the absence can be noticed.
//! With `silent_for = D` the rule remembers, per series, the processing time (`now_ms`)
//! of the last reading. [`Rules::on_tick`] raises (value `None`, `time_ms` = the tick's
//! `now_ms`) for every series of the metric that *used to report* and has been silent for
//! `>= D`. A series never seen cannot raise (there is nothing to miss). The next reading of
//! the series clears that alert (value `Some(v)`, `time_ms` = the reading's event time) and
//! is then evaluated against the rule's thresholds like any other reading (so a returning
//! sensor with an out-of-range value yields `cleared` then `raised`).
//!
//! Silence is measured on the processing clock, not on event time: a device with a wrong
//! clock, or a replay of buffered readings, must not make a live sensor look dead.
//!
//! A rule may combine thresholds and `silent_for`; it still has one alert state per series.
//! A series that goes silent while its threshold alert is raised does not raise again (the
//! alert is already raised); its next reading is evaluated against the thresholds.
//!
//! # Other decisions
//!
//! * Non-finite values (NaN, ±inf) are ignored entirely: they change no state and do not
//!   count as a sign of life, so a sensor that only sends garbage is eventually "silent".
//! * State exists only for (rule, series) pairs whose metric matches, and only for rules
//!   that can alert at all (a rule with neither `above`, `below` nor `silent_for` tracks
//!   nothing). [`Rules::forget_idle`] bounds it; a raised alert is never forgotten (it would
//!   never be cleared upstream), and for a rule with `silent_for` the idle time used is at
//!   least `silent_for`, so forgetting can never pre-empt the silence alert it exists for.
//! * Determinism: series are kept in a `BTreeMap` (key order) and rules in configuration
//!   order; [`Rules::on_tick`] emits in (series key, rule) order, [`Rules::on_reading`] in
//!   rule order. The whole state, including the rule definitions, serializes with serde
//!   (postcard in checkpoints), and a restored value continues exactly as the original
//!   would. Use [`Rules::reconfigure`] after restoring a checkpoint under a changed config.
//! * Topics: see [`Rules::topic`]; unknown placeholders become `_`.

use crate::model::{Alert, AlertState, Offline, SeriesInfo};
use crate::process::config::RuleConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Topic template used for an alert whose rule is unknown to this [`Rules`] (same as the
/// configuration's default `publish`).
const FALLBACK_PUBLISH: &str = "edgeferry/alerts/{rule}";

/// One limit of a threshold rule: where it raises and where it clears again.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Limit {
    raise: f64,
    clear: f64,
}

/// A compiled rule (durations in ms, clear levels resolved and clamped).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Rule {
    name: String,
    metric: String,
    /// Raise when value > raise; clear when value <= clear (clear <= raise).
    above: Option<Limit>,
    /// Raise when value < raise; clear when value >= clear (clear >= raise).
    below: Option<Limit>,
    silent_for_ms: Option<i64>,
    publish: String,
}

impl Rule {
    fn compile(c: &RuleConfig) -> Rule {
        let finite_or_none = |v: Option<f64>| v.filter(|x| !x.is_nan());
        let above = finite_or_none(c.above).map(|a| Limit {
            raise: a,
            // f64::min ignores a NaN operand, so a NaN clear level falls back to the limit.
            clear: c.clear_below.map_or(a, |cl| cl.min(a)),
        });
        let below = finite_or_none(c.below).map(|b| Limit {
            raise: b,
            clear: c.clear_above.map_or(b, |cl| cl.max(b)),
        });
        let silent_for_ms = c
            .silent_for
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        Rule {
            name: c.name.clone(),
            metric: c.metric.clone(),
            above,
            below,
            silent_for_ms,
            publish: c.publish.clone(),
        }
    }

    /// Whether the rule can ever alert (otherwise it tracks no state).
    fn can_alert(&self) -> bool {
        self.above.is_some() || self.below.is_some() || self.silent_for_ms.is_some()
    }

    fn applies_to(&self, metric: &str) -> bool {
        self.metric == metric && self.can_alert()
    }

    /// Either raise condition holds.
    fn breached(&self, v: f64) -> bool {
        self.above.is_some_and(|l| v > l.raise) || self.below.is_some_and(|l| v < l.raise)
    }

    /// Every clear condition holds (vacuously true for a rule without thresholds, so a
    /// threshold alert left over from a reconfiguration clears on the next reading).
    fn recovered(&self, v: f64) -> bool {
        self.above.is_none_or(|l| v <= l.clear) && self.below.is_none_or(|l| v >= l.clear)
    }
}

/// Why a (rule, series) alert is raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Cause {
    Threshold,
    Silence,
}

/// The alert state of one (rule, series) pair.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RuleState {
    /// Index into [`Rules::rules`].
    rule: usize,
    /// `Some` while raised, with what raised it: a silence alert clears on the next reading, a
    /// threshold alert only once the value has recovered.
    active: Option<Cause>,
}

/// Everything held for one series: its identity, when it last reported and one state per
/// matching rule (in rule order). The last-seen time is shared: every rule of the metric
/// sees the same readings.
///
/// The identity is shared with the processor's series table ([`Rules::share_series`]): a copy
/// of the tag map per series was 5.4 MiB of the gateway's peak heap at 10,000 series. It is
/// stored as before (metric, tags, last seen, states), so checkpoints are unchanged.
#[derive(Debug, Clone)]
struct Tracked {
    series: Arc<SeriesInfo>,
    /// Processing time (`now_ms`) of the last finite reading.
    last_seen_ms: i64,
    states: Vec<RuleState>,
}

/// How a [`Tracked`] is written: the fields it always had, in their order.
#[derive(Serialize)]
struct TrackedRef<'a> {
    metric: &'a str,
    tags: &'a crate::model::Tags,
    last_seen_ms: i64,
    states: &'a [RuleState],
}

/// How a [`Tracked`] is read back.
#[derive(Deserialize)]
struct TrackedOwned {
    metric: String,
    tags: crate::model::Tags,
    last_seen_ms: i64,
    states: Vec<RuleState>,
}

impl Serialize for Tracked {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        TrackedRef {
            metric: &self.series.metric,
            tags: &self.series.tags,
            last_seen_ms: self.last_seen_ms,
            states: &self.states,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Tracked {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let t = TrackedOwned::deserialize(d)?;
        Ok(Tracked {
            series: Arc::new(SeriesInfo {
                key: crate::model::series_key(&t.metric, &t.tags),
                metric: t.metric,
                tags: t.tags,
            }),
            last_seen_ms: t.last_seen_ms,
            states: t.states,
        })
    }
}

/// The alert rules and their per-(rule, series) state. See the module docs for semantics.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rules {
    rules: Vec<Rule>,
    /// Keyed by series key.
    series: BTreeMap<String, Tracked>,
}

/// Raises `st`'s silence alert for the series (value `None`, `time_ms = now_ms`): its rule
/// saw nothing for `silent_for`, or the source said it is gone.
fn raise_silence(
    rule: &Rule,
    key: &str,
    series: &SeriesInfo,
    st: &mut RuleState,
    now_ms: i64,
    out: &mut Vec<Alert>,
) {
    st.active = Some(Cause::Silence);
    out.push(make_alert(
        rule,
        key,
        &series.metric,
        &series.tags,
        AlertState::Raised,
        None,
        now_ms,
    ));
}

fn make_alert(
    rule: &Rule,
    key: &str,
    metric: &str,
    tags: &crate::model::Tags,
    state: AlertState,
    value: Option<f64>,
    time_ms: i64,
) -> Alert {
    Alert {
        rule: rule.name.clone(),
        series: key.to_string(),
        metric: metric.to_string(),
        tags: tags.to_map(),
        state,
        value,
        time_ms,
    }
}

impl Rules {
    /// Compiles the rules. Rule names should be unique (the configuration check's job);
    /// with duplicates, [`Rules::topic`] uses the first rule of that name.
    pub fn new(rules: &[RuleConfig]) -> Rules {
        Rules {
            rules: rules.iter().map(Rule::compile).collect(),
            series: BTreeMap::new(),
        }
    }

    /// Replaces the rule definitions (e.g. after restoring a checkpoint taken under an older
    /// configuration), keeping the state of rules whose name is unchanged. Raised alerts of
    /// rules that are gone (or no longer apply to the series' metric) are cleared into `out`
    /// (value `None`, `time_ms = now_ms`), so nothing stays raised upstream forever.
    pub fn reconfigure(&mut self, rules: &[RuleConfig], now_ms: i64, out: &mut Vec<Alert>) {
        let new_rules: Vec<Rule> = rules.iter().map(Rule::compile).collect();
        let old_rules = std::mem::replace(&mut self.rules, new_rules);
        self.series.retain(|key, t| {
            let mut states = Vec::new();
            for (i, rule) in self.rules.iter().enumerate() {
                if !rule.applies_to(&t.series.metric) {
                    continue;
                }
                let active = t
                    .states
                    .iter()
                    .find(|s| old_rules.get(s.rule).is_some_and(|r| r.name == rule.name))
                    .and_then(|s| s.active);
                states.push(RuleState { rule: i, active });
            }
            for s in &t.states {
                let Some(old) = old_rules.get(s.rule) else {
                    continue;
                };
                let kept = states.iter().any(|n| self.rules[n.rule].name == old.name);
                if s.active.is_some() && !kept {
                    out.push(make_alert(
                        old,
                        key,
                        &t.series.metric,
                        &t.series.tags,
                        AlertState::Cleared,
                        None,
                        now_ms,
                    ));
                }
            }
            t.states = states;
            !t.states.is_empty()
        });
    }

    /// The wall clock stepped forward by `by_ms`, noticed at `at_ms` (on the new time): every
    /// series last heard before it moves forward by the step (never past `at_ms`), so that
    /// its silence is measured in time that passed, not in the step.
    pub fn shift_silence(&mut self, at_ms: i64, by_ms: i64) {
        for t in self.series.values_mut() {
            if t.last_seen_ms < at_ms {
                t.last_seen_ms = t.last_seen_ms.saturating_add(by_ms).min(at_ms);
            }
        }
    }

    /// Makes every tracked series share its identity with `table` (the processor's series
    /// table, by key): after a checkpoint is read, each holds a copy of its own.
    pub fn share_series(&mut self, table: &BTreeMap<String, Arc<SeriesInfo>>) {
        for (key, t) in self.series.iter_mut() {
            if let Some(shared) = table.get(key)
                && **shared == *t.series
            {
                t.series = Arc::clone(shared);
            }
        }
    }

    /// Evaluates the rules of `series.metric` for one reading and notes the series as alive
    /// (at processing time `now_ms`) for silence rules. Raised/cleared alerts are appended to
    /// `out` in rule order; threshold alerts carry `time_ms` (the reading's event time).
    /// Non-finite values are ignored.
    pub fn on_reading(
        &mut self,
        series: &Arc<SeriesInfo>,
        value: f64,
        time_ms: i64,
        now_ms: i64,
        out: &mut Vec<Alert>,
    ) {
        if !value.is_finite() {
            return;
        }
        if !self.series.contains_key(series.key.as_str()) {
            let states: Vec<RuleState> = self
                .rules
                .iter()
                .enumerate()
                .filter(|(_, r)| r.applies_to(&series.metric))
                .map(|(rule, _)| RuleState { rule, active: None })
                .collect();
            if states.is_empty() {
                return;
            }
            self.series.insert(
                series.key.clone(),
                Tracked {
                    series: Arc::clone(series),
                    last_seen_ms: now_ms,
                    states,
                },
            );
        }
        let Some(tracked) = self.series.get_mut(series.key.as_str()) else {
            return;
        };
        let Tracked {
            series: shared,
            last_seen_ms,
            states,
        } = tracked;
        let (metric, tags) = (&shared.metric, &shared.tags);
        *last_seen_ms = now_ms;
        let key = series.key.as_str();
        for st in states.iter_mut() {
            // Only a corrupt checkpoint could hold an out-of-range index; skip it.
            let Some(rule) = self.rules.get(st.rule) else {
                continue;
            };
            if st.active == Some(Cause::Silence) {
                st.active = None;
                out.push(make_alert(
                    rule,
                    key,
                    metric,
                    tags,
                    AlertState::Cleared,
                    Some(value),
                    time_ms,
                ));
            }
            match st.active {
                None if rule.breached(value) => {
                    st.active = Some(Cause::Threshold);
                    out.push(make_alert(
                        rule,
                        key,
                        metric,
                        tags,
                        AlertState::Raised,
                        Some(value),
                        time_ms,
                    ));
                }
                Some(_) if rule.recovered(value) => {
                    st.active = None;
                    out.push(make_alert(
                        rule,
                        key,
                        metric,
                        tags,
                        AlertState::Cleared,
                        Some(value),
                        time_ms,
                    ));
                }
                _ => {}
            }
        }
    }

    /// Silence rules: raises (value `None`, `time_ms = now_ms`) for every tracked series of a
    /// rule with `silent_for` whose last reading arrived `>= silent_for` before `now_ms` and
    /// whose alert is not already raised. Emits in (series key, rule) order.
    pub fn on_tick(&mut self, now_ms: i64, out: &mut Vec<Alert>) {
        for (key, t) in &mut self.series {
            let silent_ms = now_ms.saturating_sub(t.last_seen_ms);
            for st in &mut t.states {
                let Some(rule) = self.rules.get(st.rule) else {
                    continue;
                };
                let Some(limit) = rule.silent_for_ms else {
                    continue;
                };
                if st.active.is_none() && silent_ms >= limit {
                    raise_silence(rule, key, &t.series, st, now_ms, out);
                }
            }
        }
    }

    /// A source reported itself gone ([`Offline`]): every silence rule of its tracked series
    /// raises now (value `None`, `time_ms = now_ms`), unless raised already; its next reading
    /// clears it as usual. Emits in (series key, rule) order.
    pub fn mark_offline(&mut self, gone: &Offline, now_ms: i64, out: &mut Vec<Alert>) {
        for (key, t) in &mut self.series {
            if !gone.covers(&t.series.tags) {
                continue;
            }
            for st in &mut t.states {
                let Some(rule) = self.rules.get(st.rule) else {
                    continue;
                };
                if rule.silent_for_ms.is_some() && st.active.is_none() {
                    raise_silence(rule, key, &t.series, st, now_ms, out);
                }
            }
        }
    }

    /// The topic `alert` is published on: its rule's `publish` template with `{rule}`,
    /// `{metric}` and `{<tag name>}` filled in (`{rule}`/`{metric}` win over tags of those
    /// names). An unknown placeholder (no such tag) becomes `_`, so the topic keeps its
    /// level structure and stays a valid MQTT topic. Substituted values have the MQTT
    /// specials `/`, `+`, `#` and NUL replaced by `_` (a value must not add levels or
    /// wildcards), and an empty value becomes `_`. A `{` without a closing `}` is kept
    /// literally. An alert of a rule unknown here uses `edgeferry/alerts/{rule}`.
    pub fn topic(&self, alert: &Alert) -> String {
        let template = self
            .rules
            .iter()
            .find(|r| r.name == alert.rule)
            .map_or(FALLBACK_PUBLISH, |r| r.publish.as_str());
        let mut out = String::with_capacity(template.len() + 32);
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            match after.find(['{', '}']) {
                Some(close) if after.as_bytes()[close] == b'}' => {
                    let name = &after[..close];
                    let value = match name {
                        "rule" => Some(alert.rule.as_str()),
                        "metric" => Some(alert.metric.as_str()),
                        _ => alert.tags.get(name).map(String::as_str),
                    };
                    push_level_value(&mut out, value);
                    rest = &after[close + 1..];
                }
                _ => {
                    out.push('{');
                    rest = after;
                }
            }
        }
        out.push_str(rest);
        out
    }

    /// Number of alerts currently raised (O(tracked)).
    pub fn active(&self) -> usize {
        self.series
            .values()
            .flat_map(|t| &t.states)
            .filter(|s| s.active.is_some())
            .count()
    }

    /// Number of (rule, series) states held (O(series)).
    pub fn tracked(&self) -> usize {
        self.series.values().map(|t| t.states.len()).sum()
    }

    /// Forgets the state of series whose last reading (processing time) is more than
    /// `idle_ms` before `now_ms` and that have no raised alert. For a series under a rule
    /// with `silent_for`, the idle time used is at least `silent_for`, so a silence alert is
    /// never pre-empted by forgetting. A series is forgotten as a whole (all its rules).
    pub fn forget_idle(&mut self, now_ms: i64, idle_ms: i64) {
        let rules = &self.rules;
        self.series.retain(|_, t| {
            if t.states.iter().any(|s| s.active.is_some()) {
                return true;
            }
            let keep_for = t
                .states
                .iter()
                .filter_map(|s| rules.get(s.rule).and_then(|r| r.silent_for_ms))
                .fold(idle_ms, i64::max);
            now_ms.saturating_sub(t.last_seen_ms) <= keep_for
        });
    }
}

/// Appends one substituted placeholder value, made safe for an MQTT topic level.
fn push_level_value(out: &mut String, value: Option<&str>) {
    match value {
        Some(v) if !v.is_empty() => out.extend(v.chars().map(|c| match c {
            '/' | '+' | '#' | '\0' => '_',
            c => c,
        })),
        _ => out.push('_'),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::series_key;
    use proptest::prelude::*;
    use std::time::Duration;

    fn rule(name: &str, metric: &str) -> RuleConfig {
        RuleConfig {
            name: name.to_string(),
            metric: metric.to_string(),
            above: None,
            below: None,
            clear_below: None,
            clear_above: None,
            silent_for: None,
            publish: "edgeferry/alerts/{rule}".to_string(),
        }
    }

    fn series(metric: &str, tags: &[(&str, &str)]) -> Arc<SeriesInfo> {
        let tags: BTreeMap<String, String> = tags
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Arc::new(SeriesInfo {
            key: series_key(metric, &tags),
            metric: metric.to_string(),
            tags: tags.into(),
        })
    }

    /// Feeds values (event time = index seconds, now = same) and returns the alerts.
    fn feed(rules: &mut Rules, s: &Arc<SeriesInfo>, values: &[f64]) -> Vec<Alert> {
        let mut out = Vec::new();
        for (i, v) in values.iter().enumerate() {
            let t = i as i64 * 1000;
            rules.on_reading(s, *v, t, t, &mut out);
        }
        out
    }

    fn summary(alerts: &[Alert]) -> Vec<(AlertState, Option<f64>)> {
        alerts.iter().map(|a| (a.state, a.value)).collect()
    }

    #[test]
    fn tracked_series_are_stored_as_before_and_shared_again_after_a_restore() {
        /// The layout a tracked series always had in checkpoints.
        #[derive(Serialize)]
        struct Before<'a> {
            metric: &'a str,
            tags: &'a BTreeMap<String, String>,
            last_seen_ms: i64,
            states: Vec<RuleState>,
        }
        let mut r = rule("hot", "temp");
        r.above = Some(80.0);
        let mut rules = Rules::new(&[r]);
        let s = series("temp", &[("site", "a")]);
        feed(&mut rules, &s, &[81.0]);
        let t = &rules.series[&s.key];
        assert!(Arc::ptr_eq(&t.series, &s), "tracking shares the series");
        let before = Before {
            metric: &s.metric,
            tags: &s.tags.to_map(),
            last_seen_ms: t.last_seen_ms,
            states: t.states.clone(),
        };
        assert_eq!(
            postcard::to_stdvec(t).unwrap(),
            postcard::to_stdvec(&before).unwrap()
        );

        let bytes = postcard::to_stdvec(&rules).unwrap();
        let mut back: Rules = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(postcard::to_stdvec(&back).unwrap(), bytes);
        assert_eq!(*back.series[&s.key].series, *s, "the key is rebuilt");
        let table = BTreeMap::from([(s.key.clone(), Arc::clone(&s))]);
        back.share_series(&table);
        assert!(Arc::ptr_eq(&back.series[&s.key].series, &s));
    }

    #[test]
    fn above_with_hysteresis_raises_once_and_clears_only_below_clear_level() {
        let mut r = rule("hot", "temp");
        r.above = Some(80.0);
        r.clear_below = Some(75.0);
        let mut rules = Rules::new(&[r]);
        let s = series("temp", &[("site", "a")]);
        let out = feed(&mut rules, &s, &[79.0, 81.0, 80.5, 79.0, 76.0, 74.0, 81.0]);
        assert_eq!(
            summary(&out),
            vec![
                (AlertState::Raised, Some(81.0)),
                (AlertState::Cleared, Some(74.0)),
                (AlertState::Raised, Some(81.0)),
            ]
        );
        // Threshold alerts carry the reading's event time and the series identity.
        assert_eq!(out[0].time_ms, 1000);
        assert_eq!(out[1].time_ms, 5000);
        assert_eq!(out[0].rule, "hot");
        assert_eq!(out[0].series, "temp{site=a}");
        assert_eq!(out[0].metric, "temp");
        assert_eq!(out[0].tags.get("site").map(String::as_str), Some("a"));
        assert_eq!(rules.active(), 1);
        assert_eq!(rules.tracked(), 1);
    }

    #[test]
    fn value_hovering_at_the_limit_raises_one_alert() {
        let mut r = rule("hot", "temp");
        r.above = Some(80.0);
        r.clear_below = Some(75.0);
        let mut rules = Rules::new(&[r]);
        let s = series("temp", &[]);
        let values: Vec<f64> = (0..500)
            .map(|i| if i % 2 == 0 { 80.1 } else { 79.9 })
            .collect();
        let out = feed(&mut rules, &s, &values);
        assert_eq!(summary(&out), vec![(AlertState::Raised, Some(80.1))]);
    }

    #[test]
    fn above_without_clear_level_clears_at_or_below_the_limit() {
        let mut r = rule("hot", "temp");
        r.above = Some(80.0);
        let mut rules = Rules::new(&[r]);
        let s = series("temp", &[]);
        let out = feed(&mut rules, &s, &[80.0, 80.5, 80.2, 80.0, 80.0]);
        assert_eq!(
            summary(&out),
            vec![
                (AlertState::Raised, Some(80.5)),
                (AlertState::Cleared, Some(80.0)),
            ]
        );
    }

    #[test]
    fn below_is_symmetric_with_hysteresis() {
        let mut r = rule("cold", "temp");
        r.below = Some(5.0);
        r.clear_above = Some(10.0);
        let mut rules = Rules::new(&[r]);
        let s = series("temp", &[]);
        let out = feed(&mut rules, &s, &[6.0, 5.0, 4.0, 4.5, 6.0, 9.9, 10.0, 4.9]);
        assert_eq!(
            summary(&out),
            vec![
                (AlertState::Raised, Some(4.0)),
                (AlertState::Cleared, Some(10.0)),
                (AlertState::Raised, Some(4.9)),
            ]
        );
    }

    #[test]
    fn below_without_clear_level_clears_at_or_above_the_limit() {
        let mut r = rule("cold", "temp");
        r.below = Some(5.0);
        let mut rules = Rules::new(&[r]);
        let s = series("temp", &[]);
        let out = feed(&mut rules, &s, &[4.0, 5.0]);
        assert_eq!(
            summary(&out),
            vec![
                (AlertState::Raised, Some(4.0)),
                (AlertState::Cleared, Some(5.0)),
            ]
        );
    }

    #[test]
    fn above_and_below_share_one_alert_cleared_only_when_both_recover() {
        let mut r = rule("range", "temp");
        r.above = Some(80.0);
        r.clear_below = Some(75.0);
        r.below = Some(5.0);
        r.clear_above = Some(10.0);
        let mut rules = Rules::new(&[r]);
        let s = series("temp", &[]);
        // 90 raises; jumping to 0 stays the same alert; 8 is not yet >= 10; 50 clears.
        // 3 raises again; 77 is >= 10 but not <= 75, so no clear (both clear conditions
        // must hold); 70 clears.
        let out = feed(
            &mut rules,
            &s,
            &[50.0, 90.0, 0.0, 8.0, 50.0, 3.0, 77.0, 70.0],
        );
        assert_eq!(
            summary(&out),
            vec![
                (AlertState::Raised, Some(90.0)),
                (AlertState::Cleared, Some(50.0)),
                (AlertState::Raised, Some(3.0)),
                (AlertState::Cleared, Some(70.0)),
            ]
        );
        assert_eq!(rules.tracked(), 1);
    }

    #[test]
    fn clear_level_on_the_wrong_side_is_clamped_to_the_limit() {
        let mut r = rule("hot", "temp");
        r.above = Some(80.0);
        r.clear_below = Some(90.0);
        let mut rules = Rules::new(&[r]);
        let s = series("temp", &[]);
        let out = feed(&mut rules, &s, &[85.0, 85.0, 85.0, 80.0]);
        assert_eq!(
            summary(&out),
            vec![
                (AlertState::Raised, Some(85.0)),
                (AlertState::Cleared, Some(80.0)),
            ]
        );
    }

    #[test]
    fn non_finite_values_are_ignored() {
        let mut r = rule("hot", "temp");
        r.above = Some(80.0);
        let mut rules = Rules::new(&[r]);
        let s = series("temp", &[]);
        let out = feed(
            &mut rules,
            &s,
            &[f64::NAN, f64::INFINITY, f64::NEG_INFINITY],
        );
        assert!(out.is_empty());
        assert_eq!(rules.tracked(), 0, "garbage is not a sign of life");
    }

    #[test]
    fn rules_apply_only_to_series_of_their_metric() {
        let mut r = rule("hot", "temp");
        r.above = Some(80.0);
        let mut rules = Rules::new(&[r, rule("inert", "temp")]);
        let out = feed(&mut rules, &series("humidity", &[]), &[99.0]);
        assert!(out.is_empty());
        assert_eq!(rules.tracked(), 0);
        let out = feed(&mut rules, &series("temp", &[("d", "1")]), &[99.0]);
        assert_eq!(out.len(), 1);
        // The inert rule (no threshold, no silence) holds no state.
        assert_eq!(rules.tracked(), 1);
    }

    /// Processing clock for paused-time tests: a fixed epoch plus tokio's (paused) time.
    struct Clock {
        epoch_ms: i64,
        start: tokio::time::Instant,
    }

    impl Clock {
        fn new() -> Clock {
            Clock {
                epoch_ms: 1_700_000_000_000,
                start: tokio::time::Instant::now(),
            }
        }
        fn now_ms(&self) -> i64 {
            self.epoch_ms + self.start.elapsed().as_millis() as i64
        }
    }

    #[tokio::test(start_paused = true)]
    async fn silent_series_raises_once_after_silent_for_and_clears_on_return() {
        let mut r = rule("dead-sensor", "temp");
        r.silent_for = Some(Duration::from_secs(300));
        let mut rules = Rules::new(&[r]);
        let clock = Clock::new();
        let temp = series("temp", &[("device", "d1")]);
        let other = series("humidity", &[("device", "d1")]);
        let mut out = Vec::new();

        // Both report every second for a minute, with a tick each second.
        for _ in 0..60 {
            let now = clock.now_ms();
            rules.on_reading(&temp, 21.5, now - 200, now, &mut out);
            rules.on_reading(&other, 40.0, now - 200, now, &mut out);
            rules.on_tick(now, &mut out);
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert!(out.is_empty(), "a live series never raises: {out:?}");
        let last_seen = clock.now_ms() - 1000;

        // Both stop. Tick every second for 10 minutes: exactly one raise, at 5m of silence.
        for _ in 0..600 {
            rules.on_tick(clock.now_ms(), &mut out);
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert_eq!(out.len(), 1, "{out:?}");
        let raised = &out[0];
        assert_eq!(raised.state, AlertState::Raised);
        assert_eq!(raised.value, None);
        assert_eq!(raised.series, "temp{device=d1}");
        assert_eq!(raised.time_ms, last_seen + 300_000);
        assert_eq!(rules.active(), 1);

        // The sensor comes back: one clear carrying the reading's value and event time.
        out.clear();
        let now = clock.now_ms();
        rules.on_reading(&temp, 22.0, now - 50, now, &mut out);
        rules.on_tick(now, &mut out);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].state, AlertState::Cleared);
        assert_eq!(out[0].value, Some(22.0));
        assert_eq!(out[0].time_ms, now - 50);
        assert_eq!(rules.active(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn silence_just_short_of_the_limit_does_not_raise() {
        let mut r = rule("dead-sensor", "temp");
        r.silent_for = Some(Duration::from_secs(300));
        let mut rules = Rules::new(&[r]);
        let clock = Clock::new();
        let temp = series("temp", &[]);
        let mut out = Vec::new();
        rules.on_reading(&temp, 1.0, 0, clock.now_ms(), &mut out);
        tokio::time::advance(Duration::from_millis(299_999)).await;
        rules.on_tick(clock.now_ms(), &mut out);
        assert!(out.is_empty());
        tokio::time::advance(Duration::from_millis(1)).await;
        rules.on_tick(clock.now_ms(), &mut out);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn a_wall_clock_step_forward_is_not_silence() {
        let mut r = rule("dead-sensor", "temp");
        r.silent_for = Some(Duration::from_secs(300));
        let mut rules = Rules::new(&[r]);
        let t0 = 1_700_000_000_000;
        let early = series("temp", &[("device", "early")]);
        let late = series("temp", &[("device", "late")]);
        let mut out = Vec::new();
        rules.on_reading(&early, 1.0, t0, t0, &mut out);
        // NTP moves the clock an hour on at t0 + 1 s; one series reports right after it.
        let step_at = t0 + 1000 + 3_600_000;
        rules.on_reading(&late, 1.0, step_at, step_at, &mut out);
        rules.shift_silence(step_at, 3_600_000);
        rules.on_tick(step_at + 1000, &mut out);
        assert!(out.is_empty(), "{out:?}");
        // Silence is then measured from the shifted time: 300 s after t0 + 1 h ...
        rules.on_tick(t0 + 3_600_000 + 299_999, &mut out);
        assert!(out.is_empty(), "{out:?}");
        // ... and the series heard after the step keeps its own time.
        rules.on_tick(step_at + 300_000, &mut out);
        let raised: Vec<_> = out.iter().map(|a| a.series.as_str()).collect();
        assert_eq!(raised, ["temp{device=early}", "temp{device=late}"]);
    }

    #[test]
    fn series_never_seen_does_not_raise() {
        let mut r = rule("dead-sensor", "temp");
        r.silent_for = Some(Duration::from_secs(1));
        let mut rules = Rules::new(&[r]);
        let mut out = Vec::new();
        rules.on_tick(i64::MAX, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn returning_sensor_with_bad_value_clears_silence_then_raises_threshold() {
        let mut r = rule("temp-watch", "temp");
        r.silent_for = Some(Duration::from_secs(60));
        r.above = Some(80.0);
        let mut rules = Rules::new(&[r]);
        let s = series("temp", &[]);
        let mut out = Vec::new();
        rules.on_reading(&s, 20.0, 0, 0, &mut out);
        rules.on_tick(60_000, &mut out);
        rules.on_reading(&s, 95.0, 61_000, 61_000, &mut out);
        assert_eq!(
            summary(&out),
            vec![
                (AlertState::Raised, None),
                (AlertState::Cleared, Some(95.0)),
                (AlertState::Raised, Some(95.0)),
            ]
        );
        // Silent while the threshold alert is raised: no second raise.
        out.clear();
        rules.on_tick(1_000_000, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn topic_fills_rule_metric_and_tags() {
        let mut r = rule("hot", "temp");
        r.above = Some(80.0);
        r.publish = "alerts/{site}/{device}/{rule}/{metric}".to_string();
        let mut rules = Rules::new(&[r]);
        let s = series("temp", &[("site", "plant1"), ("device", "d7")]);
        let out = feed(&mut rules, &s, &[90.0]);
        assert_eq!(rules.topic(&out[0]), "alerts/plant1/d7/hot/temp");
    }

    #[test]
    fn topic_unknown_placeholder_becomes_underscore() {
        let mut r = rule("hot", "temp");
        r.above = Some(80.0);
        r.publish = "alerts/{site}/{room}/{}/{rule}".to_string();
        let mut rules = Rules::new(&[r]);
        let s = series("temp", &[("site", "plant1")]);
        let out = feed(&mut rules, &s, &[90.0]);
        assert_eq!(rules.topic(&out[0]), "alerts/plant1/_/_/hot");
    }

    #[test]
    fn topic_values_cannot_add_levels_or_wildcards_and_stray_braces_stay() {
        let mut r = rule("hot", "temp");
        r.above = Some(80.0);
        r.publish = "a/{site}/{device}/{x{rule}/b}".to_string();
        let mut rules = Rules::new(&[r]);
        let s = series("temp", &[("site", "p/1+#"), ("device", "")]);
        let out = feed(&mut rules, &s, &[90.0]);
        assert_eq!(rules.topic(&out[0]), "a/p_1__/_/{xhot/b}");
        // An alert of a rule this instance does not know uses the default template.
        let mut foreign = out[0].clone();
        foreign.rule = "other".to_string();
        assert_eq!(rules.topic(&foreign), "edgeferry/alerts/other");
    }

    #[test]
    fn forget_idle_drops_only_idle_inactive_series() {
        let mut hot = rule("hot", "temp");
        hot.above = Some(80.0);
        let mut dead = rule("dead", "volts");
        dead.silent_for = Some(Duration::from_secs(600));
        let mut rules = Rules::new(&[hot, dead]);
        let mut out = Vec::new();
        let idle = series("temp", &[("d", "idle")]);
        let hot_s = series("temp", &[("d", "hot")]);
        let fresh = series("temp", &[("d", "fresh")]);
        let battery = series("volts", &[("d", "b")]);
        rules.on_reading(&idle, 20.0, 0, 0, &mut out);
        rules.on_reading(&hot_s, 90.0, 0, 0, &mut out);
        rules.on_reading(&battery, 3.3, 0, 0, &mut out);
        rules.on_reading(&fresh, 20.0, 0, 90_000, &mut out);
        assert_eq!(rules.tracked(), 4);
        rules.forget_idle(100_000, 60_000);
        // idle is gone; hot is raised; fresh is recent; battery waits for its silence.
        assert_eq!(rules.tracked(), 3);
        rules.on_tick(600_000, &mut out);
        assert_eq!(rules.active(), 2);
        rules.forget_idle(10_000_000, 60_000);
        assert_eq!(rules.tracked(), 2, "raised alerts are never forgotten");
    }

    #[test]
    fn reconfigure_keeps_state_of_unchanged_rules_and_clears_removed_ones() {
        let mut hot = rule("hot", "temp");
        hot.above = Some(80.0);
        let mut cold = rule("cold", "temp");
        cold.below = Some(0.0);
        let mut rules = Rules::new(&[hot.clone(), cold]);
        let s = series("temp", &[]);
        let mut out = feed(&mut rules, &s, &[90.0]);
        let mut cold2 = rule("cold", "temp");
        cold2.below = Some(95.0);
        // Order changed, "hot" kept, "cold" kept, raised state of "hot" survives.
        rules.reconfigure(&[cold2, hot], 5, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(rules.active(), 1);
        // "hot" removed: its raised alert is cleared at once.
        rules.reconfigure(&[rule("cold", "temp")], 7, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].state, AlertState::Cleared);
        assert_eq!(out[1].rule, "hot");
        assert_eq!(out[1].time_ms, 7);
        assert_eq!(rules.active(), 0);
        assert_eq!(rules.tracked(), 0, "an inert rule holds no state");
    }

    // ---- property tests ----

    #[derive(Debug, Clone)]
    enum Op {
        Reading { series: usize, value: f64, dt: i64 },
        Tick { dt: i64 },
        Forget { idle: i64 },
    }

    fn prop_rules() -> Vec<RuleConfig> {
        let mut hot = rule("hot", "temp");
        hot.above = Some(50.0);
        hot.clear_below = Some(40.0);
        let mut range = rule("range", "temp");
        range.above = Some(70.0);
        range.below = Some(10.0);
        range.clear_above = Some(15.0);
        range.silent_for = Some(Duration::from_secs(5));
        let mut dead = rule("dead", "volts");
        dead.silent_for = Some(Duration::from_secs(3));
        let mut low = rule("low", "volts");
        low.below = Some(30.0);
        vec![hot, range, dead, low]
    }

    fn prop_series() -> Vec<Arc<SeriesInfo>> {
        vec![
            series("temp", &[("d", "1")]),
            series("temp", &[("d", "2")]),
            series("volts", &[("d", "1")]),
            series("humidity", &[("d", "1")]),
        ]
    }

    fn value() -> impl Strategy<Value = f64> {
        prop_oneof![
            8 => (0..=100i32).prop_map(f64::from),
            4 => 0.0..100.0f64,
            1 => Just(f64::NAN),
            1 => Just(f64::INFINITY),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..4usize, value(), 0..2_000i64)
                .prop_map(|(series, value, dt)| Op::Reading { series, value, dt }),
            3 => (0..4_000i64).prop_map(|dt| Op::Tick { dt }),
            1 => (0..10_000i64).prop_map(|idle| Op::Forget { idle }),
        ]
    }

    /// Applies ops, advancing the clock; returns all alerts and the final clock.
    fn run(rules: &mut Rules, ops: &[Op], mut now: i64, out: &mut Vec<Alert>) -> i64 {
        let all = prop_series();
        for op in ops {
            match op {
                Op::Reading { series, value, dt } => {
                    now += dt;
                    rules.on_reading(&all[*series], *value, now - 100, now, out);
                }
                Op::Tick { dt } => {
                    now += dt;
                    rules.on_tick(now, out);
                }
                Op::Forget { idle } => rules.forget_idle(now, *idle),
            }
        }
        now
    }

    proptest! {
        #[test]
        fn postcard_round_trip_mid_stream_gives_identical_outputs(
            ops in prop::collection::vec(op(), 0..200),
            split in 0usize..200,
        ) {
            let split = split.min(ops.len());
            let mut straight = Rules::new(&prop_rules());
            let mut expected = Vec::new();
            run(&mut straight, &ops, 0, &mut expected);

            let mut first = Rules::new(&prop_rules());
            let mut got = Vec::new();
            let now = run(&mut first, &ops[..split], 0, &mut got);
            let bytes = postcard::to_stdvec(&first).expect("serialize");
            let mut restored: Rules = postcard::from_bytes(&bytes).expect("deserialize");
            run(&mut restored, &ops[split..], now, &mut got);

            prop_assert_eq!(got, expected);
            prop_assert_eq!(
                postcard::to_stdvec(&restored).expect("serialize"),
                postcard::to_stdvec(&straight).expect("serialize")
            );
        }

        #[test]
        fn alerts_alternate_raised_cleared_per_rule_and_series(
            ops in prop::collection::vec(op(), 0..300),
        ) {
            let mut rules = Rules::new(&prop_rules());
            let mut out = Vec::new();
            run(&mut rules, &ops, 0, &mut out);
            let mut last: BTreeMap<(String, String), AlertState> = BTreeMap::new();
            for a in &out {
                prop_assert!(a.metric != "humidity");
                let prev = last.insert((a.rule.clone(), a.series.clone()), a.state);
                match a.state {
                    AlertState::Raised => prop_assert_ne!(prev, Some(AlertState::Raised)),
                    AlertState::Cleared => prop_assert_eq!(prev, Some(AlertState::Raised)),
                }
                if let Some(v) = a.value {
                    prop_assert!(v.is_finite());
                }
            }
            let raised = last.values().filter(|s| **s == AlertState::Raised).count();
            prop_assert_eq!(rules.active(), raised);
            // temp{d=1}, temp{d=2}: 2 rules each; volts{d=1}: 2 rules; humidity: none.
            prop_assert!(rules.tracked() <= 6);
        }
    }
}
