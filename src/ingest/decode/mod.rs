//! Payload decoding: turns one MQTT message (topic + payload bytes) into [`Reading`]s.
//!
//! A [`Decoder`] is built once from configuration (topic template, payload [`Format`],
//! optional JSON value and timestamp paths) and then called for every message. It either
//! appends one or more readings or returns a [`Reject`] whose [`Reject::reason`] is a
//! stable, low-cardinality label suitable for a "rejected payloads" counter, while its
//! `Display` text carries the detail for logs.
//!
//! # Topic templates
//! See [`Template`]: `sensors/{site}/{device}/{metric}` turns the topic
//! `sensors/lab/d1/temp` into metric `temp` with tags `site=lab`, `device=d1`.
//!
//! # Formats
//! * [`Format::Number`]: the payload is a plain decimal number (`21.5`, `-3`, `1e3`,
//!   surrounding whitespace ignored) or `true`/`false` (1/0).
//! * [`Format::Json`]: either a single value at a configured dotted path, or (no path
//!   configured) one reading per numeric/boolean top-level field, or a bare JSON number.
//!   Numeric *strings* such as `"21.5"` are deliberately **not** converted: a device that
//!   sends strings is usually sending something else too (units, `"n/a"`), and silently
//!   guessing hides that; such values are rejected as `wrong_type`.
//! * [`Format::Senml`]: RFC 8428 SenML in its JSON representation.
//! * [`Format::Line`]: InfluxDB line protocol, one reading per numeric or boolean field of
//!   each line (see the `line` module).
//! * [`Format::SparkplugB`]: Sparkplug B; stateful (aliases, sequence numbers), so decoded by
//!   the session's [`sparkplug::SparkplugState`], not by [`Decoder::decode`].
//!
//! # Time
//! Every reading carries an event time in ms since the Unix epoch. Without a timestamp
//! source it is the arrival time passed to [`Decoder::decode`]. Valid times are
//! `0..=`[`MAX_TIME_MS`] (1970-01-01 through 9999-12-31); anything else is rejected as
//! `bad_timestamp` rather than clamped, because a clamped time would silently land the
//! reading in the wrong place of a time series.

mod format;
mod json;
mod line;
mod number;
mod reject;
mod senml;
pub mod sparkplug;
mod template;
#[cfg(test)]
mod testkit;
mod time;

pub use format::Format;
pub use line::Precision;
pub use reject::{ALL_REASONS, Reject};
pub use senml::SENML_RELATIVE_LIMIT;
pub use template::{Template, TemplateError};
pub use time::{MAX_TIME_MS, MS_THRESHOLD};

use crate::model::Reading;
use json::{FieldPath, json_scalar, parse_json, pick_json};
use line::{LineOptions, decode_line_protocol};
use number::parse_number;
use reject::snippet;
use senml::decode_senml;
use serde_json::Value;
use std::collections::BTreeMap;
use time::parse_timestamp;

/// Per-message context shared by the format decoders.
struct Msg<'a> {
    topic: &'a str,
    metric: Option<String>,
    tags: BTreeMap<String, String>,
    arrival_ms: i64,
}

/// Decodes messages of one subscription into readings.
///
/// Metric naming, in order of precedence:
/// 1. the template's `{metric}` capture (not for SenML and line protocol, whose names come
///    from the payload: see the `line` module for its naming);
/// 2. JSON multi-field mode: the field name, or `<captured metric>.<field>`;
/// 3. the last segment of the configured `value` path (json and number);
/// 4. with a template: the last topic level; without a template: the full topic (there is
///    no structure to pick a level from). If the last level is empty (topic ends in `/`)
///    the full topic is used so that a metric name is never empty.
#[derive(Debug, Clone)]
pub struct Decoder {
    template: Option<Template>,
    format: Format,
    value: Option<FieldPath>,
    timestamp: Option<FieldPath>,
    /// For [`Format::Line`]: the field `value` names and the timestamps' unit.
    line: LineOptions,
    /// For [`Format::SparkplugB`]: tag names and rebirth requests.
    sparkplug: sparkplug::Options,
}

impl Decoder {
    /// Builds a decoder.
    ///
    /// * `template` — topic template ([`Template`]); `None` = topic not parsed into tags;
    ///   metric then defaults to the full topic.
    /// * `value` — dotted path of the value in a JSON payload. With `number` it only names
    ///   the metric (its last segment); with `line` it names the one field taken. Not
    ///   allowed with `senml` (values come from the pack).
    /// * `timestamp` — dotted path of the event time in a JSON payload. Only allowed with
    ///   `json` (a number payload has no room for one; SenML carries its own times).
    pub fn new(
        template: Option<&str>,
        format: Format,
        value: Option<&str>,
        timestamp: Option<&str>,
    ) -> Result<Decoder, TemplateError> {
        let template = template.map(Template::parse).transpose()?;
        let value = value.map(|p| FieldPath::parse("value", p)).transpose()?;
        let timestamp = timestamp
            .map(|p| FieldPath::parse("timestamp", p))
            .transpose()?;
        if format == Format::Senml && value.is_some() {
            return Err(TemplateError::NotApplicable {
                option: "value",
                format,
                why: "SenML records carry their own names and values",
            });
        }
        if format != Format::Json && timestamp.is_some() {
            return Err(TemplateError::NotApplicable {
                option: "timestamp",
                format,
                why: "only JSON payloads have fields to read a timestamp from",
            });
        }
        if format == Format::SparkplugB {
            let why = "Sparkplug B topics and payloads have a fixed structure (tags group, \
                       edge_node, device; the metric's own name and timestamp)";
            for (option, set) in [("template", template.is_some()), ("value", value.is_some())] {
                if set {
                    return Err(TemplateError::NotApplicable {
                        option,
                        format,
                        why,
                    });
                }
            }
        }
        let line = LineOptions {
            field: value.as_ref().map(|p| p.text.clone()),
            precision: Precision::default(),
        };
        Ok(Decoder {
            template,
            format,
            value,
            timestamp,
            line,
            sparkplug: sparkplug::Options::default(),
        })
    }

    /// Sets the unit of line protocol timestamps (nanoseconds unless set); only for
    /// `format = "line"`, whose payloads are the only ones with integer timestamps of a
    /// configurable unit.
    pub fn with_precision(mut self, precision: Precision) -> Result<Decoder, TemplateError> {
        if self.format != Format::Line {
            return Err(TemplateError::NotApplicable {
                option: "precision",
                format: self.format,
                why: "only line protocol timestamps have a configurable unit",
            });
        }
        self.line.precision = precision;
        Ok(self)
    }

    /// Whether payloads carry their readings' timestamps (JSON with a `timestamp` path,
    /// SenML), so that a reading has an identity of its own (series, event time, value).
    pub fn reads_timestamps(&self) -> bool {
        matches!(self.format, Format::Senml | Format::SparkplugB) || self.timestamp.is_some()
    }

    /// For `format = "sparkplug_b"` only: the tag names and whether nodes are asked for a
    /// rebirth when their state is missing or messages were lost (on by default).
    pub fn with_sparkplug(mut self, options: sparkplug::Options) -> Result<Decoder, TemplateError> {
        if self.format != Format::SparkplugB {
            return Err(TemplateError::NotApplicable {
                option: "rebirth and tag_names",
                format: self.format,
                why: "only Sparkplug B has edge nodes to ask for a rebirth and topic levels to name",
            });
        }
        if let Some(why) = options.names.problem() {
            return Err(TemplateError::BadTagNames(why));
        }
        self.sparkplug = options;
        Ok(self)
    }

    /// How Sparkplug B messages are decoded (see [`Decoder::with_sparkplug`]).
    pub fn sparkplug(&self) -> &sparkplug::Options {
        &self.sparkplug
    }

    /// The payload format this decoder expects.
    pub fn format(&self) -> Format {
        self.format
    }

    /// The parsed topic template, if any.
    pub fn template(&self) -> Option<&Template> {
        self.template.as_ref()
    }

    /// Appends 1+ readings to `out` or returns why the payload is rejected (then appends
    /// nothing: a message is accepted or rejected as a whole, so a partially bad SenML pack
    /// never yields a partial series).
    ///
    /// `arrival_ms` is the receive time (ms since the epoch); it is the event time when
    /// the payload has none, and the reference for SenML relative times.
    ///
    /// Checks run in this order: topic against template, UTF-8, emptiness, then the format.
    pub fn decode(
        &self,
        topic: &str,
        payload: &[u8],
        arrival_ms: i64,
        out: &mut Vec<Reading>,
    ) -> Result<(), Reject> {
        if self.format == Format::SparkplugB {
            return Err(Reject::BadSparkplug {
                detail: "Sparkplug B needs the session's state: decoded by SparkplugState".into(),
            });
        }
        let (metric, tags) = match &self.template {
            Some(t) => t.matches(topic).ok_or_else(|| Reject::TopicMismatch {
                topic: snippet(topic),
                template: t.as_str().to_string(),
            })?,
            None => (None, BTreeMap::new()),
        };
        let text = std::str::from_utf8(payload).map_err(|e| Reject::InvalidUtf8 {
            valid_up_to: e.valid_up_to(),
        })?;
        if text.trim().is_empty() {
            return Err(Reject::EmptyPayload);
        }
        let mut msg = Msg {
            topic,
            metric,
            tags,
            arrival_ms,
        };
        let start = out.len();
        let result = match self.format {
            Format::Number => self.decode_number(text, &mut msg, out),
            Format::Json => self.decode_json(text, &mut msg, out),
            Format::Senml => decode_senml(text, &msg.tags, msg.arrival_ms, out),
            Format::Line => decode_line_protocol(text, &self.line, &msg.tags, msg.arrival_ms, out),
            Format::SparkplugB => unreachable!("returned before"),
        };
        if result.is_err() {
            out.truncate(start);
        }
        result
    }

    /// The metric name for single-value payloads (number, json with `value`, bare JSON).
    /// Takes the captured metric out of `msg` (one reading per message on these paths).
    fn single_metric(&self, msg: &mut Msg<'_>) -> String {
        if let Some(m) = msg.metric.take() {
            return m;
        }
        if let Some(p) = &self.value {
            return p.last().to_string();
        }
        self.template
            .as_ref()
            .and_then(|_| msg.topic.rsplit('/').next())
            .filter(|last| !last.is_empty())
            .unwrap_or(msg.topic)
            .to_string()
    }

    fn decode_number(
        &self,
        text: &str,
        msg: &mut Msg<'_>,
        out: &mut Vec<Reading>,
    ) -> Result<(), Reject> {
        let value = parse_number(text)?;
        out.push(Reading {
            metric: self.single_metric(msg),
            tags: std::mem::take(&mut msg.tags),
            value,
            time_ms: msg.arrival_ms,
        });
        Ok(())
    }

    fn decode_json(
        &self,
        text: &str,
        msg: &mut Msg<'_>,
        out: &mut Vec<Reading>,
    ) -> Result<(), Reject> {
        if let Some(path) = &self.value {
            // The common case (`value` and maybe `timestamp` configured): pick the two
            // fields in one pass instead of building a `Value` tree of the whole payload.
            let [v, ts] = pick_json(text, path, self.timestamp.as_ref())?;
            let v = v.ok_or_else(|| Reject::MissingField {
                path: path.text.clone(),
            })?;
            let value = json_scalar(&v, &path.text)?;
            let time_ms = self.time_from(ts.as_ref(), msg.arrival_ms)?;
            out.push(Reading {
                metric: self.single_metric(msg),
                tags: std::mem::take(&mut msg.tags),
                value,
                time_ms,
            });
            return Ok(());
        }
        let root = parse_json(text)?;
        let Value::Object(map) = &root else {
            // A bare number or boolean is one reading; anything else is the wrong type.
            let value = json_scalar(&root, "")?;
            out.push(Reading {
                metric: self.single_metric(msg),
                tags: std::mem::take(&mut msg.tags),
                value,
                time_ms: msg.arrival_ms,
            });
            return Ok(());
        };
        let time_ms = self.json_time(&root, msg.arrival_ms)?;
        let skip = self
            .timestamp
            .as_ref()
            .filter(|p| p.segments.len() == 1)
            .map(|p| p.segments[0].as_str());
        let start = out.len();
        for (field, v) in map {
            if field.is_empty() || Some(field.as_str()) == skip {
                continue;
            }
            let value = match v {
                Value::Number(_) | Value::Bool(_) => json_scalar(v, field)?,
                _ => continue,
            };
            let metric = match &msg.metric {
                Some(m) => format!("{m}.{field}"),
                None => field.clone(),
            };
            out.push(Reading {
                metric,
                tags: msg.tags.clone(),
                value,
                time_ms,
            });
        }
        if out.len() == start {
            return Err(Reject::NoNumericValue {
                detail: "the JSON object has no numeric or boolean top-level field".to_string(),
            });
        }
        // Field order must not depend on serde_json's `preserve_order` feature, which
        // another crate in the build could switch on.
        out[start..].sort_by(|a, b| a.metric.cmp(&b.metric));
        Ok(())
    }

    /// The event time of a JSON payload: the configured timestamp field, or the arrival
    /// time when none is configured or the field is absent or `null` (devices without a
    /// synchronised clock commonly send `null`; that is "unknown", not "bad").
    fn json_time(&self, root: &Value, arrival_ms: i64) -> Result<i64, Reject> {
        let found = self.timestamp.as_ref().and_then(|p| p.lookup(root));
        self.time_from(found, arrival_ms)
    }

    /// [`Decoder::json_time`] given what was found at the timestamp path.
    fn time_from(&self, found: Option<&Value>, arrival_ms: i64) -> Result<i64, Reject> {
        let Some(path) = &self.timestamp else {
            return Ok(arrival_ms);
        };
        match found {
            None | Some(Value::Null) => Ok(arrival_ms),
            Some(v) => parse_timestamp(v, &path.text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::decode::testkit::*;

    #[test]
    fn decoder_config_errors() {
        let cases: &[ConfigCase] = &[
            (Some("a/{"), Format::Json, None, None, "unbalanced"),
            (
                None,
                Format::Json,
                Some(""),
                None,
                "value path \"\" is invalid",
            ),
            (
                None,
                Format::Json,
                Some("a..b"),
                None,
                "value path \"a..b\" is invalid",
            ),
            (None, Format::Json, Some(".a"), None, "value path"),
            (
                None,
                Format::Json,
                Some("v"),
                Some("ts."),
                "timestamp path \"ts.\" is invalid",
            ),
            (
                None,
                Format::Senml,
                Some("v"),
                None,
                "value cannot be used with format senml",
            ),
            (
                None,
                Format::Number,
                None,
                Some("ts"),
                "timestamp cannot be used with format number",
            ),
            (
                None,
                Format::Senml,
                None,
                Some("ts"),
                "timestamp cannot be used with format senml",
            ),
        ];
        for (template, format, value, ts, needle) in cases {
            let err = Decoder::new(*template, *format, *value, *ts).unwrap_err();
            assert!(err.to_string().contains(needle), "{err} lacks {needle:?}");
        }
    }

    #[test]
    fn decoder_accepts_value_path_with_number_format_to_name_the_metric() {
        let d = decoder(None, Format::Number, Some("room.temperature"), None);
        assert_eq!(
            run(&d, "t", "20").unwrap(),
            vec![reading("temperature", 20.0, ARRIVAL)]
        );
        assert_eq!(d.format(), Format::Number);
        assert!(d.template().is_none());
    }

    // ------------------------------------------------------------------ common rejections

    #[test]
    fn decode_appends_to_existing_output() {
        let d = decoder(None, Format::Number, None, None);
        let mut out = vec![reading("existing", 1.0, 0)];
        d.decode("x", b"2", ARRIVAL, &mut out).unwrap();
        assert_eq!(
            out,
            vec![reading("existing", 1.0, 0), reading("x", 2.0, ARRIVAL)]
        );
    }

    #[test]
    fn non_utf8_payload_is_invalid_utf8_for_every_format() {
        for format in [Format::Json, Format::Number, Format::Senml] {
            let d = decoder(None, format, None, None);
            let err = run_bytes(&d, "t", b"21\xff.5").unwrap_err();
            assert_eq!(err, Reject::InvalidUtf8 { valid_up_to: 2 }, "{format}");
            assert!(err.to_string().contains("offset 2"));
        }
    }

    #[test]
    fn empty_or_whitespace_payload_is_empty_payload_for_every_format() {
        for format in [Format::Json, Format::Number, Format::Senml] {
            let d = decoder(None, format, None, None);
            for payload in ["", "   ", "\r\n"] {
                assert_eq!(
                    run(&d, "t", payload).unwrap_err(),
                    Reject::EmptyPayload,
                    "{format}"
                );
            }
        }
    }

    #[test]
    fn topic_not_matching_template_is_topic_mismatch_and_checked_before_payload() {
        let d = decoder(
            Some("sensors/{device}/{metric}"),
            Format::Number,
            None,
            None,
        );
        let err = run_bytes(&d, "other/d1/temp", b"\xff").unwrap_err();
        assert_eq!(
            err,
            Reject::TopicMismatch {
                topic: "other/d1/temp".into(),
                template: "sensors/{device}/{metric}".into()
            }
        );
        assert_eq!(
            err.to_string(),
            "topic \"other/d1/temp\" does not match the template \"sensors/{device}/{metric}\""
        );
    }

    /// One row per way of producing each reason; also proves ALL_REASONS is exhaustive.
    #[test]
    fn every_reject_reason_is_produced_and_listed() {
        let rows: &[ReasonRow] = &[
            (
                Format::Json,
                Some("a/{b}"),
                None,
                "x/y",
                b"1",
                "topic_mismatch",
            ),
            (Format::Json, None, None, "t", b"\xc3\x28", "invalid_utf8"),
            (Format::Json, None, None, "t", b" ", "empty_payload"),
            (Format::Json, None, None, "t", b"{\"a\":", "malformed_json"),
            (Format::Number, None, None, "t", b"NaN", "not_finite"),
            (
                Format::Json,
                None,
                Some("v"),
                "t",
                b"{\"v\":\"1\"}",
                "wrong_type",
            ),
            (
                Format::Json,
                None,
                Some("v"),
                "t",
                b"{\"w\":1}",
                "missing_field",
            ),
            (
                Format::Json,
                None,
                None,
                "t",
                b"{\"s\":\"x\"}",
                "no_numeric_value",
            ),
            (
                Format::Json,
                None,
                Some("v"),
                "t",
                b"{\"v\":1,\"ts\":\"x\"}",
                "bad_timestamp",
            ),
            (Format::Number, None, None, "t", b"12abc", "bad_number"),
            (Format::Senml, None, None, "t", b"{}", "bad_senml"),
            (Format::Line, None, None, "t", b"cpu usage=high", "bad_line"),
        ];
        let mut produced = BTreeSet::new();
        for (format, template, value, topic, payload, reason) in rows {
            let ts = (*format == Format::Json).then_some("ts");
            let d = decoder(*template, *format, *value, ts);
            let err = run_bytes(&d, topic, payload).unwrap_err();
            assert_eq!(err.reason(), *reason, "{payload:?}: {err}");
            assert!(ALL_REASONS.contains(&err.reason()));
            assert!(!err.to_string().is_empty());
            produced.insert(err.reason());
        }
        // Sparkplug B decodes with the session's state.
        let mut state = sparkplug::SparkplugState::new(10);
        let options = sparkplug::Options::default();
        for (topic, payload, reason) in [
            ("spBv1.0/g/NDATA", &b""[..], "bad_sparkplug"),
            ("spBv1.0/g/NDATA/n", &b""[..], "unknown_alias"),
        ] {
            let err = state
                .decode(topic, payload, 0, &options, &mut Vec::new())
                .unwrap_err();
            assert_eq!(err.reason(), reason, "{topic}: {err}");
            produced.insert(err.reason());
        }
        let listed: BTreeSet<&str> = ALL_REASONS.iter().copied().collect();
        assert_eq!(
            listed.len(),
            ALL_REASONS.len(),
            "ALL_REASONS has duplicates"
        );
        assert_eq!(produced, listed);
        assert!(ALL_REASONS.iter().all(|r| is_snake_case_label(r)));
    }

    // ------------------------------------------------------------------ properties

    fn any_decoder() -> impl Strategy<Value = Decoder> {
        prop_oneof![
            Just(decoder(None, Format::Number, None, None)),
            Just(decoder(
                Some("s/{device}/{metric}"),
                Format::Number,
                None,
                None
            )),
            Just(decoder(None, Format::Json, None, None)),
            Just(decoder(None, Format::Json, None, Some("ts"))),
            Just(decoder(
                Some("s/{device}/{metric}"),
                Format::Json,
                Some("a.v"),
                Some("ts")
            )),
            Just(decoder(None, Format::Senml, None, None)),
            Just(decoder(Some("s/+/#"), Format::Senml, None, None)),
        ]
    }

    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            (-1e13f64..1e13).prop_map(Value::from),
            "[a-z_:]{0,6}".prop_map(Value::String),
            prop_oneof![Just("2023-11-14T22:13:20Z"), Just("nope")]
                .prop_map(|s| Value::String(s.into())),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            let key = prop_oneof![
                Just("n".to_string()),
                Just("bn".to_string()),
                Just("v".to_string()),
                Just("vb".to_string()),
                Just("bv".to_string()),
                Just("t".to_string()),
                Just("bt".to_string()),
                Just("ts".to_string()),
                Just("a".to_string()),
                Just("x_".to_string()),
                "[a-z]{1,3}",
            ];
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(key, inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn check_contract(d: &Decoder, topic: &str, payload: &[u8]) -> Result<(), TestCaseError> {
        let sentinel = reading("sentinel", 0.0, 0);
        let mut out = vec![sentinel.clone()];
        match d.decode(topic, payload, ARRIVAL, &mut out) {
            Ok(()) => {
                prop_assert!(out.len() >= 2, "success must append at least one reading");
                for r in &out[1..] {
                    prop_assert!(r.value.is_finite());
                    prop_assert!((0..=MAX_TIME_MS).contains(&r.time_ms));
                    prop_assert!(!r.metric.is_empty());
                }
            }
            Err(e) => {
                prop_assert_eq!(&out, &vec![sentinel], "rejection must append nothing");
                prop_assert!(ALL_REASONS.contains(&e.reason()));
            }
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn decode_never_panics_on_arbitrary_bytes(
            d in any_decoder(),
            // MQTT topic names are never empty; mostly use one the templates match.
            topic in prop_oneof![Just("s/d1/m".to_string()), "[a-z$]{1,3}(/[a-z0-9]{0,3}){0,4}"],
            payload in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            check_contract(&d, &topic, &payload)?;
        }

        #[test]
        fn decode_never_panics_on_arbitrary_json(d in any_decoder(), doc in any_json()) {
            let payload = serde_json::to_vec(&doc).unwrap();
            check_contract(&d, "s/d1/m", &payload)?;
        }

        #[test]
        fn any_finite_f64_round_trips_through_number(x in any::<f64>().prop_filter("finite", |x| x.is_finite())) {
            let d = decoder(None, Format::Number, None, None);
            let got = run(&d, "t", &format!("{x}")).unwrap();
            prop_assert_eq!(got.len(), 1);
            prop_assert_eq!(got[0].value.to_bits(), x.to_bits(), "{} printed as {}", x, format!("{x}"));
        }
    }
}
