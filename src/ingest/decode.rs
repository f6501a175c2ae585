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
//!
//! # Time
//! Every reading carries an event time in ms since the Unix epoch. Without a timestamp
//! source it is the arrival time passed to [`Decoder::decode`]. Valid times are
//! `0..=`[`MAX_TIME_MS`] (1970-01-01 through 9999-12-31); anything else is rejected as
//! `bad_timestamp` rather than clamped, because a clamped time would silently land the
//! reading in the wrong place of a time series.

use crate::model::Reading;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;
use time::OffsetDateTime;

/// Latest accepted event time: 9999-12-31T23:59:59.999Z in ms since the epoch.
///
/// Later times cannot be written as RFC 3339 and are almost certainly unit mistakes
/// (e.g. microseconds sent as milliseconds).
pub const MAX_TIME_MS: i64 = 253_402_300_799_999;

/// Numeric JSON timestamps with an absolute value at or above this are epoch
/// milliseconds, below it epoch seconds. 1e11 s is the year 5138, 1e11 ms is March 1973:
/// no realistic device clock is ambiguous between the two.
pub const MS_THRESHOLD: f64 = 1e11;

/// SenML (RFC 8428 section 4.5.3): resolved times below 2^28 seconds are relative to "now".
pub const SENML_RELATIVE_LIMIT: f64 = 268_435_456.0;

/// How long a payload or topic excerpt quoted in a [`Reject`] message may get (in chars),
/// so a hostile or broken sender cannot blow up log lines.
const SNIPPET_CHARS: usize = 48;

/// The payload encoding of a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// A JSON document (object, or a bare number/boolean). The default because it is what
    /// most off-the-shelf sensors and bridges publish.
    #[default]
    Json,
    /// A plain ASCII decimal number, as published by minimal firmware.
    Number,
    /// An RFC 8428 SenML pack in JSON.
    Senml,
}

impl Format {
    /// The configuration spelling (`json`, `number`, `senml`).
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Number => "number",
            Format::Senml => "senml",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a topic template or a decoder option is invalid. Each message names the problem
/// and what is expected instead, because it is shown to whoever edits the configuration.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TemplateError {
    /// The template string is empty.
    #[error(
        "topic template is empty; expected topic levels separated by '/', \
         e.g. \"sensors/{{device}}/{{metric}}\""
    )]
    Empty,
    /// A placeholder name occurs twice (also `{metric}`).
    #[error(
        "topic template level {level}: placeholder {{{name}}} is used more than once; \
         expected each placeholder name at most once"
    )]
    DuplicatePlaceholder {
        /// 1-based level number.
        level: usize,
        /// The repeated name.
        name: String,
    },
    /// `{}`.
    #[error(
        "topic template level {level}: placeholder {{}} has an empty name; \
         expected a name such as {{device}}"
    )]
    EmptyName {
        /// 1-based level number.
        level: usize,
    },
    /// A placeholder name with characters that would make tag keys ambiguous.
    #[error(
        "topic template level {level}: placeholder name {name:?} is invalid; \
         expected only ASCII letters, digits, '_', '-' or '.'"
    )]
    InvalidName {
        /// 1-based level number.
        level: usize,
        /// The offending name.
        name: String,
    },
    /// `{a`, `a}`, `{{a}}` and the like.
    #[error(
        "topic template level {level} ({text:?}) has unbalanced or nested braces; \
         expected a placeholder to be written as {{name}}"
    )]
    UnbalancedBraces {
        /// 1-based level number.
        level: usize,
        /// The level text.
        text: String,
    },
    /// `#` somewhere other than the last level (same rule as MQTT filters).
    #[error(
        "topic template level {level}: '#' must be the last level; \
         expected '#' only at the end, e.g. \"sensors/{{device}}/#\""
    )]
    HashNotLast {
        /// 1-based level number.
        level: usize,
    },
    /// A level mixing a placeholder or wildcard with other text: `a{b}`, `{a}{b}`, `x+`.
    #[error(
        "topic template level {level} ({text:?}) mixes a placeholder or wildcard with other \
         text; expected the whole level to be a literal, one {{name}}, '+' or '#'"
    )]
    MixedLevel {
        /// 1-based level number.
        level: usize,
        /// The level text.
        text: String,
    },
    /// A `value` or `timestamp` path that is empty or has an empty segment (`a..b`).
    #[error(
        "{option} path {path:?} is invalid; expected dot-separated non-empty field names, \
         e.g. \"data.temperature\""
    )]
    InvalidPath {
        /// `value` or `timestamp`.
        option: &'static str,
        /// The configured path.
        path: String,
    },
    /// An option that the chosen format cannot use; rejected instead of ignored so that a
    /// misconfiguration is noticed at startup, not as wrong data later.
    #[error("{option} cannot be used with format {format}: {why}")]
    NotApplicable {
        /// `value` or `timestamp`.
        option: &'static str,
        /// The configured format.
        format: Format,
        /// Why it does not apply.
        why: &'static str,
    },
}

/// One level of a parsed [`Template`].
#[derive(Debug, Clone, PartialEq)]
enum Level {
    Literal(String),
    Capture(String),
    Metric,
    AnyOne,
    Rest,
}

/// A parsed topic template, e.g. `sensors/{site}/+/{device}/{metric}/#`.
///
/// Levels are separated by `/`. Each level is one of:
/// * a literal, which must equal the topic level exactly;
/// * `{name}`, capturing the topic level as tag `name` (an empty topic level does not
///   match, since an empty tag value is never meaningful);
/// * `{metric}`, capturing the topic level as the metric name instead of a tag;
/// * `+`, matching any single level (which is then ignored);
/// * `#`, only as the last level, matching all remaining levels (zero or more, as in
///   MQTT, so `a/#` also matches `a`).
///
/// Otherwise the topic must have exactly as many levels as the template. As in MQTT
/// (section 4.7.2), topics starting with `$` (e.g. `$SYS/...`) never match a template whose
/// first level is a placeholder or wildcard.
#[derive(Debug, Clone)]
pub struct Template {
    source: String,
    levels: Vec<Level>,
}

fn valid_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')
}

impl Template {
    /// Parses a template; see [`Template`] for the syntax and [`TemplateError`] for what is
    /// rejected.
    pub fn parse(s: &str) -> Result<Template, TemplateError> {
        if s.is_empty() {
            return Err(TemplateError::Empty);
        }
        let raw: Vec<&str> = s.split('/').collect();
        let mut levels = Vec::with_capacity(raw.len());
        let mut seen: Vec<String> = Vec::new();
        for (i, text) in raw.iter().enumerate() {
            let level = i + 1;
            let opens = text.matches('{').count();
            let closes = text.matches('}').count();
            if opens > 0 || closes > 0 {
                let mut depth = 0i32;
                for c in text.chars() {
                    match c {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        _ => {}
                    }
                    if !(0..=1).contains(&depth) {
                        return Err(TemplateError::UnbalancedBraces {
                            level,
                            text: text.to_string(),
                        });
                    }
                }
                if depth != 0 {
                    return Err(TemplateError::UnbalancedBraces {
                        level,
                        text: text.to_string(),
                    });
                }
                if opens > 1 || !(text.starts_with('{') && text.ends_with('}')) {
                    return Err(TemplateError::MixedLevel {
                        level,
                        text: text.to_string(),
                    });
                }
                let name = &text[1..text.len() - 1];
                if name.is_empty() {
                    return Err(TemplateError::EmptyName { level });
                }
                if !name.chars().all(valid_name_char) {
                    return Err(TemplateError::InvalidName {
                        level,
                        name: name.to_string(),
                    });
                }
                if seen.iter().any(|n| n == name) {
                    return Err(TemplateError::DuplicatePlaceholder {
                        level,
                        name: name.to_string(),
                    });
                }
                seen.push(name.to_string());
                levels.push(if name == "metric" {
                    Level::Metric
                } else {
                    Level::Capture(name.to_string())
                });
            } else if *text == "+" {
                levels.push(Level::AnyOne);
            } else if *text == "#" {
                if level != raw.len() {
                    return Err(TemplateError::HashNotLast { level });
                }
                levels.push(Level::Rest);
            } else if text.contains(['+', '#']) {
                return Err(TemplateError::MixedLevel {
                    level,
                    text: text.to_string(),
                });
            } else {
                levels.push(Level::Literal(text.to_string()));
            }
        }
        Ok(Template {
            source: s.to_string(),
            levels,
        })
    }

    /// Whether the template has a `{metric}` level (which then names every reading).
    pub fn has_metric(&self) -> bool {
        self.levels.contains(&Level::Metric)
    }

    /// The template text as configured.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The MQTT subscription filter that receives exactly the candidate topics:
    /// placeholders become `+`. Useful so operators need not repeat the topic twice.
    pub fn subscription_filter(&self) -> String {
        let parts: Vec<&str> = self
            .levels
            .iter()
            .map(|l| match l {
                Level::Literal(s) => s.as_str(),
                Level::Capture(_) | Level::Metric | Level::AnyOne => "+",
                Level::Rest => "#",
            })
            .collect();
        parts.join("/")
    }

    /// Matches `topic`, returning the `{metric}` capture (if the template has one) and the
    /// captured tags, or `None` if the topic does not fit the template.
    pub fn matches(&self, topic: &str) -> Option<(Option<String>, BTreeMap<String, String>)> {
        if topic.starts_with('$') && !matches!(self.levels.first(), Some(Level::Literal(_))) {
            return None;
        }
        let mut parts = topic.split('/');
        let mut metric = None;
        let mut tags = BTreeMap::new();
        for level in &self.levels {
            if *level == Level::Rest {
                return Some((metric, tags));
            }
            let part = parts.next()?;
            match level {
                Level::Literal(lit) => {
                    if lit != part {
                        return None;
                    }
                }
                Level::AnyOne => {}
                Level::Capture(name) => {
                    if part.is_empty() {
                        return None;
                    }
                    tags.insert(name.clone(), part.to_string());
                }
                Level::Metric => {
                    if part.is_empty() {
                        return None;
                    }
                    metric = Some(part.to_string());
                }
                Level::Rest => unreachable!("handled before consuming a level"),
            }
        }
        if parts.next().is_some() {
            return None;
        }
        Some((metric, tags))
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// Every label [`Reject::reason`] can return, for pre-registering metric label values
/// (so dashboards show explicit zeros instead of missing series).
pub const ALL_REASONS: &[&str] = &[
    "topic_mismatch",
    "invalid_utf8",
    "empty_payload",
    "malformed_json",
    "not_finite",
    "wrong_type",
    "missing_field",
    "no_numeric_value",
    "bad_timestamp",
    "bad_number",
    "bad_senml",
];

/// Why a message produced no readings. `Display` is a human explanation with the detail
/// (field, found type, offending text); [`Reject::reason`] is the stable metric label.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Reject {
    /// A template is configured and the topic does not fit it.
    #[error("topic {topic:?} does not match the template {template:?}")]
    TopicMismatch {
        /// The topic (possibly shortened).
        topic: String,
        /// The configured template.
        template: String,
    },
    /// The payload bytes are not UTF-8 (checked for every format).
    #[error("payload is not valid UTF-8 (first invalid byte at offset {valid_up_to})")]
    InvalidUtf8 {
        /// Length of the valid UTF-8 prefix.
        valid_up_to: usize,
    },
    /// The payload is empty or only whitespace (e.g. a retained-message clear).
    #[error("payload is empty or only whitespace")]
    EmptyPayload,
    /// The payload is not syntactically valid JSON.
    #[error("payload is not valid JSON: {detail}")]
    MalformedJson {
        /// serde_json's message, including line and column.
        detail: String,
    },
    /// A value is NaN, infinite, or overflows a 64-bit float.
    #[error("value is not a finite number: {detail}")]
    NotFinite {
        /// What was found.
        detail: String,
    },
    /// A value has a JSON type that is not a number or boolean.
    #[error(
        "{} is {found}; expected a number or boolean (numeric strings are not converted)",
        describe_path(path)
    )]
    WrongType {
        /// Dotted path of the value (empty = the whole payload).
        path: String,
        /// The JSON type found, with article: "a string", "null", "an object", ...
        found: &'static str,
    },
    /// The configured value path does not exist in the payload.
    #[error("field {path:?} is missing from the payload")]
    MissingField {
        /// The configured dotted path.
        path: String,
    },
    /// The payload parsed but contains nothing numeric to record.
    #[error("payload has no numeric value: {detail}")]
    NoNumericValue {
        /// What was found instead.
        detail: String,
    },
    /// A timestamp is present but unusable.
    #[error("bad timestamp: {detail}")]
    BadTimestamp {
        /// What is wrong with it.
        detail: String,
    },
    /// A `number` payload that is not a decimal number.
    #[error("payload {text:?} is not a decimal number (expected e.g. 21.5, -3, 1e3, true)")]
    BadNumber {
        /// The trimmed payload (possibly shortened).
        text: String,
    },
    /// A SenML pack that violates RFC 8428 (or uses what this decoder does not support).
    #[error("invalid SenML pack: {}{detail}", record_prefix(*record))]
    BadSenml {
        /// 0-based index of the offending record, if the problem is in one record.
        record: Option<usize>,
        /// What is wrong.
        detail: String,
    },
}

fn describe_path(path: &str) -> String {
    if path.is_empty() {
        "the payload".to_string()
    } else {
        format!("field {path:?}")
    }
}

fn record_prefix(record: Option<usize>) -> String {
    record.map_or_else(String::new, |i| format!("record {i}: "))
}

impl Reject {
    /// Short, stable snake_case label for metrics; one of [`ALL_REASONS`].
    pub fn reason(&self) -> &'static str {
        match self {
            Reject::TopicMismatch { .. } => "topic_mismatch",
            Reject::InvalidUtf8 { .. } => "invalid_utf8",
            Reject::EmptyPayload => "empty_payload",
            Reject::MalformedJson { .. } => "malformed_json",
            Reject::NotFinite { .. } => "not_finite",
            Reject::WrongType { .. } => "wrong_type",
            Reject::MissingField { .. } => "missing_field",
            Reject::NoNumericValue { .. } => "no_numeric_value",
            Reject::BadTimestamp { .. } => "bad_timestamp",
            Reject::BadNumber { .. } => "bad_number",
            Reject::BadSenml { .. } => "bad_senml",
        }
    }
}

/// Shortens `s` for inclusion in an error message.
fn snippet(s: &str) -> String {
    match s.char_indices().nth(SNIPPET_CHARS) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_string(),
    }
}

/// A parsed dotted JSON path (`a.b.c`). Keys containing dots cannot be addressed.
#[derive(Debug, Clone)]
struct FieldPath {
    text: String,
    segments: Vec<String>,
}

impl FieldPath {
    fn parse(option: &'static str, path: &str) -> Result<FieldPath, TemplateError> {
        let segments: Vec<String> = path.split('.').map(str::to_string).collect();
        if segments.iter().any(String::is_empty) {
            return Err(TemplateError::InvalidPath {
                option,
                path: path.to_string(),
            });
        }
        Ok(FieldPath {
            text: path.to_string(),
            segments,
        })
    }

    fn last(&self) -> &str {
        self.segments.last().map_or("", String::as_str)
    }

    /// The value at this path; `None` if a segment is missing or an intermediate value is
    /// not an object.
    fn lookup<'a>(&self, root: &'a Value) -> Option<&'a Value> {
        self.segments
            .iter()
            .try_fold(root, |v, seg| v.as_object()?.get(seg))
    }
}

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
/// 1. the template's `{metric}` capture (not for SenML, whose names come from the pack);
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
}

impl Decoder {
    /// Builds a decoder.
    ///
    /// * `template` — topic template ([`Template`]); `None` = topic not parsed into tags;
    ///   metric then defaults to the full topic.
    /// * `value` — dotted path of the value in a JSON payload. With `number` it only names
    ///   the metric (its last segment). Not allowed with `senml` (values come from the
    ///   pack).
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
        Ok(Decoder {
            template,
            format,
            value,
            timestamp,
        })
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
        let (metric, tags) = match &self.template {
            Some(t) => t.matches(topic).ok_or_else(|| Reject::TopicMismatch {
                topic: snippet(topic),
                template: t.source.clone(),
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
            Format::Senml => decode_senml(text, &msg, out),
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

/// Parses a `number` payload. Only plain decimal syntax is accepted (no hex, no digit
/// separators, no units) so that garbage is reported instead of half-parsed.
fn parse_number(text: &str) -> Result<f64, Reject> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("true") {
        return Ok(1.0);
    }
    if t.eq_ignore_ascii_case("false") {
        return Ok(0.0);
    }
    let unsigned = t.strip_prefix(['+', '-']).unwrap_or(t);
    if ["nan", "inf", "infinity"]
        .iter()
        .any(|w| unsigned.eq_ignore_ascii_case(w))
    {
        return Err(Reject::NotFinite {
            detail: format!("payload is {t:?}"),
        });
    }
    if !is_decimal_literal(t) {
        return Err(Reject::BadNumber { text: snippet(t) });
    }
    let v: f64 = t
        .parse()
        .map_err(|_| Reject::BadNumber { text: snippet(t) })?;
    if !v.is_finite() {
        return Err(Reject::NotFinite {
            detail: format!("{} overflows a 64-bit float", snippet(t)),
        });
    }
    Ok(v)
}

/// `[+-]? digits? ('.' digits?)? ([eE] [+-]? digits)?` with at least one mantissa digit.
fn is_decimal_literal(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    let digits = |i: &mut usize| {
        let start = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i - start
    };
    if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
        i += 1;
    }
    let mut mantissa = digits(&mut i);
    if i < b.len() && b[i] == b'.' {
        i += 1;
        mantissa += digits(&mut i);
    }
    if mantissa == 0 {
        return false;
    }
    if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
        i += 1;
        if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == b.len()
}

/// Parses JSON, mapping serde_json's "number out of range" (e.g. `1e400`, which would be
/// infinite as f64) to `not_finite` rather than `malformed_json`: the document is
/// well-formed, the value is just not representable.
fn parse_json(text: &str) -> Result<Value, Reject> {
    serde_json::from_str(text).map_err(json_reject)
}

fn json_reject(e: serde_json::Error) -> Reject {
    let detail = e.to_string();
    if detail.starts_with("number out of range") {
        Reject::NotFinite {
            detail: format!("a JSON number is too large for a 64-bit float ({detail})"),
        }
    } else {
        Reject::MalformedJson { detail }
    }
}

/// The values at the paths `a` and `b` of a JSON document, found in one pass without
/// building a [`Value`] tree (which costs several allocations per message). The outcome is
/// exactly that of [`parse_json`] followed by [`FieldPath::lookup`]: the whole document is
/// still parsed, numbers included (so `1e400` anywhere is `not_finite`, and syntax errors
/// carry the same messages), and of duplicate keys the last one counts. Arrays and objects
/// found at a path come back empty: callers only need their kind.
fn pick_json(
    text: &str,
    a: &FieldPath,
    b: Option<&FieldPath>,
) -> Result<[Option<Value>; 2], Reject> {
    use serde::de::DeserializeSeed;
    let want = [
        Some(a.segments.as_slice()),
        b.map(|p| p.segments.as_slice()),
    ];
    let mut de = serde_json::Deserializer::from_str(text);
    let picked = Pick(want).deserialize(&mut de).map_err(json_reject)?;
    de.end().map_err(json_reject)?;
    Ok(picked)
}

/// For each of two paths: the segments still to descend at this node (`Some(&[])`: this
/// node is the value wanted), or `None` when the path does not lead through this node.
type Want<'p> = [Option<&'p [String]>; 2];

/// Visits one JSON node on the way to the wanted values (see [`pick_json`]).
struct Pick<'p>(Want<'p>);

impl Pick<'_> {
    /// The result for a node of this value: itself where a path ends here, `None` where a
    /// path would have to descend further (it is not an object).
    fn here(&self, make: impl Fn() -> Value) -> [Option<Value>; 2] {
        self.0
            .map(|w| w.filter(|rest| rest.is_empty()).map(|_| make()))
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Pick<'_> {
    type Value = [Option<Value>; 2];
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Pick<'_> {
    type Value = [Option<Value>; 2];
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any valid JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(self.here(|| Value::Bool(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(self.here(|| Value::Number(v.into())))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(self.here(|| Value::Number(v.into())))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        // As serde_json's own `Value` visitor does.
        Ok(self.here(|| serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(self.here(|| Value::String(v.to_owned())))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(self.here(|| Value::Null))
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(self.here(|| Value::Null))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element_seed(Skip)?.is_some() {}
        Ok(self.here(|| Value::Array(Vec::new())))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = self.here(|| Value::Object(serde_json::Map::new()));
        while let Some(into) = map.next_key_seed(Key(self.0))? {
            if into == [false, false] {
                map.next_value_seed(Skip)?;
                continue;
            }
            let child: Want<'_> =
                [0, 1].map(|i| self.0[i].filter(|_| into[i]).map(|rest| &rest[1..]));
            let got = map.next_value_seed(Pick(child))?;
            for (i, g) in got.into_iter().enumerate() {
                if into[i] {
                    out[i] = g; // a later duplicate key replaces an earlier one
                }
            }
        }
        Ok(out)
    }
}

/// An object key: which of the paths continue into its value.
struct Key<'p>(Want<'p>);

impl<'de> serde::de::DeserializeSeed<'de> for Key<'_> {
    type Value = [bool; 2];
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Key<'_> {
    type Value = [bool; 2];
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(self
            .0
            .map(|w| w.is_some_and(|rest| rest.first().is_some_and(|seg| seg == v))))
    }
}

/// Parses and discards one JSON value, numbers included (unlike `IgnoredAny`, which does not
/// check that a number fits an f64), so a skipped field is rejected exactly when the same
/// field in a [`Value`] tree would be.
struct Skip;

impl<'de> serde::de::DeserializeSeed<'de> for Skip {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Skip {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any valid JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_none<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Skip)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_key_seed(Skip)?.is_some() {
            map.next_value_seed(Skip)?;
        }
        Ok(())
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A JSON number or boolean as f64; other types are `wrong_type`.
fn json_scalar(v: &Value, path: &str) -> Result<f64, Reject> {
    match v {
        Value::Bool(b) => Ok(if *b { 1.0 } else { 0.0 }),
        Value::Number(n) => match n.as_f64() {
            // Only reachable with serde_json's `arbitrary_precision`, but cheap to keep.
            Some(f) if f.is_finite() => Ok(f),
            _ => Err(Reject::NotFinite {
                detail: format!("{} is {n}", describe_path(path)),
            }),
        },
        other => Err(Reject::WrongType {
            path: path.to_string(),
            found: json_kind(other),
        }),
    }
}

/// Converts a JSON timestamp value to ms since the epoch.
///
/// Numbers: `|n| >= 1e11` are ms, else seconds (fractions allowed); rounded to the
/// nearest ms. Strings: RFC 3339 only (a numeric string is rejected, like numeric value
/// strings). Negative times and times after [`MAX_TIME_MS`] are rejected.
fn parse_timestamp(v: &Value, path: &str) -> Result<i64, Reject> {
    let bad = |detail: String| Reject::BadTimestamp {
        detail: format!("field {path:?} {detail}"),
    };
    match v {
        Value::Number(n) => {
            let Some(f) = n.as_f64().filter(|f| f.is_finite()) else {
                return Err(bad(format!("is {n}, which is not a finite number")));
            };
            let ms = if f.abs() >= MS_THRESHOLD {
                f.round()
            } else {
                (f * 1000.0).round()
            };
            ms_in_range(ms).ok_or_else(|| {
                bad(format!(
                    "is {n}, outside 1970-01-01..9999-12-31 \
                     (read as epoch {})",
                    if f.abs() >= MS_THRESHOLD {
                        "milliseconds"
                    } else {
                        "seconds"
                    }
                ))
            })
        }
        Value::String(s) => {
            let dt = OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .map_err(|e| {
                    bad(format!(
                        "is {:?}, not an RFC 3339 time such as 2024-05-01T12:00:00Z ({e})",
                        snippet(s)
                    ))
                })?;
            let nanos = dt.unix_timestamp_nanos();
            let ms = (nanos + 500_000).div_euclid(1_000_000);
            if nanos < 0 || ms > i128::from(MAX_TIME_MS) {
                return Err(bad(format!("is {s:?}, outside 1970-01-01..9999-12-31")));
            }
            i64::try_from(ms).map_err(|_| bad(format!("is {s:?}, out of range")))
        }
        other => Err(bad(format!(
            "is {}; expected epoch seconds or milliseconds, or an RFC 3339 string",
            json_kind(other)
        ))),
    }
}

/// `Some(ms as i64)` if `ms` (already rounded) is a valid event time.
fn ms_in_range(ms: f64) -> Option<i64> {
    // Both bounds are exactly representable in f64 (< 2^53), so the cast is exact.
    (0.0..=MAX_TIME_MS as f64)
        .contains(&ms)
        .then_some(ms as i64)
}

/// SenML base state carried from record to record.
#[derive(Default)]
struct SenmlBase {
    name: String,
    time: f64,
    value: f64,
}

/// Whether `name` is a valid resolved SenML name (RFC 8428 section 4.5.1): starts with
/// an ASCII letter or digit, then letters, digits, `-`, `:`, `.`, `/`, `_`. Enforced
/// because names become metric names and series keys, where `{`, `,`, `=` or spaces
/// would be ambiguous.
fn valid_senml_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | ':' | '.' | '/' | '_'))
}

/// Decodes an RFC 8428 SenML JSON pack.
///
/// * Base fields (`bn`, `bt`, `bv`, `bu`, `bs`, `bver`) apply to their record and all
///   following ones until overridden.
/// * Name = `bn` + `n`, validated as in RFC 8428 section 4.5.1; the template's
///   `{metric}` capture is ignored (names come from the pack), its tags are applied.
/// * Value = `bv` + `v`; `vb` gives 1/0. Records with only `vs`, `vd`, a sum `s`, or only
///   base fields carry nothing numeric and are skipped. Two value fields in one record,
///   or wrongly typed known fields, are errors.
/// * Units (`u`, `bu`) are validated as strings but not stored: [`Reading`] has no unit.
///   Note that records distinguished only by unit (RFC 8428 section 5.1.3) therefore
///   share a metric name.
/// * Time = `bt` + `t` (missing = 0) in seconds; below 2^28 it is relative to arrival.
/// * `bver` must be a positive integer; fields ending in `_` are "must understand"
///   extensions this decoder does not know, so the pack is rejected (RFC 8428 section 4.4);
///   other unknown fields are ignored.
fn decode_senml(text: &str, msg: &Msg<'_>, out: &mut Vec<Reading>) -> Result<(), Reject> {
    let root = parse_json(text)?;
    let Value::Array(records) = &root else {
        return Err(Reject::BadSenml {
            record: None,
            detail: format!(
                "a pack must be a JSON array of records, found {}",
                json_kind(&root)
            ),
        });
    };
    let mut base = SenmlBase::default();
    let start = out.len();
    for (i, rec) in records.iter().enumerate() {
        let bad = |detail: String| Reject::BadSenml {
            record: Some(i),
            detail,
        };
        let Value::Object(map) = rec else {
            return Err(bad(format!(
                "a record must be a JSON object, found {}",
                json_kind(rec)
            )));
        };
        let string = |k: &str, v: &Value| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| bad(format!("{k:?} must be a string, found {}", json_kind(v))))
        };
        let number = |k: &str, v: &Value| {
            v.as_f64()
                .filter(|f| f.is_finite())
                .ok_or_else(|| bad(format!("{k:?} must be a number, found {}", json_kind(v))))
        };
        let mut name = None;
        let mut time = None;
        let mut value = None;
        let mut value_fields = 0;
        for (k, v) in map {
            match k.as_str() {
                "bn" => base.name = string(k, v)?,
                "bt" => base.time = number(k, v)?,
                "bv" => base.value = number(k, v)?,
                "bs" | "s" | "ut" => {
                    number(k, v)?;
                }
                "bu" | "u" => {
                    string(k, v)?;
                }
                // Any positive integer version is accepted: later versions only add
                // fields, and unknown must-understand fields are rejected below anyway.
                "bver" if v.as_u64().is_none_or(|n| n == 0) => {
                    return Err(bad(format!(
                        "\"bver\" must be a positive integer, found {v}"
                    )));
                }
                "bver" => {}
                "n" => name = Some(string(k, v)?),
                "t" => time = Some(number(k, v)?),
                "v" => {
                    value = Some(number(k, v)?);
                    value_fields += 1;
                }
                "vb" => {
                    let b = v.as_bool().ok_or_else(|| {
                        bad(format!("\"vb\" must be a boolean, found {}", json_kind(v)))
                    })?;
                    value = Some(if b { 1.0 } else { 0.0 });
                    value_fields += 1;
                }
                "vs" | "vd" => {
                    string(k, v)?;
                    value_fields += 1;
                }
                other if other.ends_with('_') => {
                    return Err(bad(format!(
                        "must-understand field {other:?} is not supported"
                    )));
                }
                _ => {}
            }
        }
        if value_fields > 1 {
            return Err(bad(
                "a record may carry only one of \"v\", \"vb\", \"vs\", \"vd\"".to_string(),
            ));
        }
        let is_bool = map.contains_key("vb");
        let Some(raw) = value else {
            continue;
        };
        let full_name = format!("{}{}", base.name, name.as_deref().unwrap_or(""));
        if full_name.is_empty() {
            return Err(bad("the resolved name (bn + n) is empty".to_string()));
        }
        if !valid_senml_name(&full_name) {
            return Err(bad(format!(
                "the resolved name {:?} is invalid; expected a letter or digit followed by \
                 letters, digits, '-', ':', '.', '/', '_'",
                snippet(&full_name)
            )));
        }
        let resolved = if is_bool { raw } else { base.value + raw };
        if !resolved.is_finite() {
            return Err(Reject::NotFinite {
                detail: format!("record {i}: bv + v overflows a 64-bit float"),
            });
        }
        let t = base.time + time.unwrap_or(0.0);
        let ms = if t < SENML_RELATIVE_LIMIT {
            (msg.arrival_ms as f64 + t * 1000.0).round()
        } else {
            (t * 1000.0).round()
        };
        let time_ms = ms_in_range(ms).ok_or_else(|| Reject::BadTimestamp {
            detail: format!("record {i}: resolved time {t} s is outside 1970-01-01..9999-12-31"),
        })?;
        out.push(Reading {
            metric: full_name,
            tags: msg.tags.clone(),
            value: resolved,
            time_ms,
        });
    }
    if out.len() == start {
        let detail = if records.is_empty() {
            "the SenML pack has no records".to_string()
        } else {
            format!(
                "none of the {} SenML records has a numeric or boolean value",
                records.len()
            )
        };
        return Err(Reject::NoNumericValue { detail });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    type Opt = Option<&'static str>;
    /// (template, format, value path, timestamp path, expected message fragment)
    type ConfigCase = (Opt, Format, Opt, Opt, &'static str);
    /// (template, value path, topic, expected metric, expected tags)
    type NamingCase = (
        Opt,
        Opt,
        &'static str,
        &'static str,
        &'static [(&'static str, &'static str)],
    );
    /// (format, template, value path, topic, payload, expected reason)
    type ReasonRow = (Format, Opt, Opt, &'static str, &'static [u8], &'static str);

    /// Arrival time used throughout: 2023-11-14T22:13:20Z.
    const ARRIVAL: i64 = 1_700_000_000_000;

    fn decoder(
        template: Option<&str>,
        format: Format,
        value: Option<&str>,
        ts: Option<&str>,
    ) -> Decoder {
        Decoder::new(template, format, value, ts).expect("valid decoder config")
    }

    fn run(d: &Decoder, topic: &str, payload: &str) -> Result<Vec<Reading>, Reject> {
        run_bytes(d, topic, payload.as_bytes())
    }

    fn run_bytes(d: &Decoder, topic: &str, payload: &[u8]) -> Result<Vec<Reading>, Reject> {
        let mut out = Vec::new();
        d.decode(topic, payload, ARRIVAL, &mut out)?;
        Ok(out)
    }

    fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn reading(metric: &str, value: f64, time_ms: i64) -> Reading {
        Reading {
            metric: metric.to_string(),
            tags: BTreeMap::new(),
            value,
            time_ms,
        }
    }

    /// (metric, value, time_ms) triples, for compact expectations.
    fn summary(readings: &[Reading]) -> Vec<(String, f64, i64)> {
        readings
            .iter()
            .map(|r| (r.metric.clone(), r.value, r.time_ms))
            .collect()
    }

    fn is_snake_case_label(s: &str) -> bool {
        s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    }

    fn expect_reject(d: &Decoder, topic: &str, payload: &str) -> Reject {
        match run(d, topic, payload) {
            Ok(r) => panic!("payload {payload:?} on {topic:?} was accepted: {r:?}"),
            Err(e) => e,
        }
    }

    // ------------------------------------------------------------------ Format

    #[test]
    fn format_defaults_to_json_and_uses_lowercase_config_names() {
        assert_eq!(Format::default(), Format::Json);
        for (text, f) in [
            ("\"json\"", Format::Json),
            ("\"number\"", Format::Number),
            ("\"senml\"", Format::Senml),
        ] {
            assert_eq!(serde_json::from_str::<Format>(text).unwrap(), f);
            assert_eq!(serde_json::to_string(&f).unwrap(), text);
            assert_eq!(format!("\"{f}\""), text);
        }
        assert!(serde_json::from_str::<Format>("\"Json\"").is_err());
    }

    // ------------------------------------------------------------------ Template

    #[test]
    fn template_matching_table() {
        type Expect = Option<(
            Option<&'static str>,
            &'static [(&'static str, &'static str)],
        )>;
        let cases: &[(&str, &str, Expect)] = &[
            (
                "sensors/{device}/{metric}",
                "sensors/d1/temp",
                Some((Some("temp"), &[("device", "d1")])),
            ),
            (
                "sensors/{site}/{device}",
                "sensors/lab/d1",
                Some((None, &[("site", "lab"), ("device", "d1")])),
            ),
            ("a/b", "a/b", Some((None, &[]))),
            ("a/b", "a/c", None),
            ("a/b", "A/b", None),
            ("sensors/{device}", "sensors/d1/extra", None),
            ("sensors/{device}/x", "sensors/d1", None),
            (
                "sensors/+/{device}",
                "sensors/anything/d2",
                Some((None, &[("device", "d2")])),
            ),
            (
                "sensors/+/{device}",
                "sensors//d2",
                Some((None, &[("device", "d2")])),
            ),
            (
                "sensors/{device}/#",
                "sensors/d1/a/b/c",
                Some((None, &[("device", "d1")])),
            ),
            (
                "sensors/{device}/#",
                "sensors/d1",
                Some((None, &[("device", "d1")])),
            ),
            ("sensors/#", "other/d1", None),
            ("#", "any/topic/at/all", Some((None, &[]))),
            ("sensors/{device}/{metric}", "sensors//temp", None),
            ("sensors/{device}/{metric}", "sensors/d1/", None),
            ("+/status", "$SYS/status", None),
            ("{device}/status", "$SYS/status", None),
            (
                "$SYS/{what}",
                "$SYS/uptime",
                Some((None, &[("what", "uptime")])),
            ),
            ("a//b", "a//b", Some((None, &[]))),
        ];
        for (template, topic, expected) in cases {
            let t = Template::parse(template).unwrap();
            let got = t.matches(topic);
            let want = expected.map(|(m, tg)| (m.map(str::to_string), tags(tg)));
            assert_eq!(got, want, "template {template:?} topic {topic:?}");
        }
    }

    #[test]
    fn template_parse_errors_say_what_is_wrong_and_what_is_expected() {
        let cases: &[(&str, TemplateError, &str)] = &[
            ("", TemplateError::Empty, "is empty"),
            (
                "a/{x}/{x}",
                TemplateError::DuplicatePlaceholder {
                    level: 3,
                    name: "x".into(),
                },
                "more than once",
            ),
            (
                "{metric}/{metric}",
                TemplateError::DuplicatePlaceholder {
                    level: 2,
                    name: "metric".into(),
                },
                "at most once",
            ),
            ("a/{}", TemplateError::EmptyName { level: 2 }, "empty name"),
            (
                "a/{b",
                TemplateError::UnbalancedBraces {
                    level: 2,
                    text: "{b".into(),
                },
                "unbalanced",
            ),
            (
                "a/b}",
                TemplateError::UnbalancedBraces {
                    level: 2,
                    text: "b}".into(),
                },
                "unbalanced",
            ),
            (
                "{{b}}",
                TemplateError::UnbalancedBraces {
                    level: 1,
                    text: "{{b}}".into(),
                },
                "nested",
            ),
            (
                "}b{",
                TemplateError::UnbalancedBraces {
                    level: 1,
                    text: "}b{".into(),
                },
                "expected",
            ),
            (
                "a/#/b",
                TemplateError::HashNotLast { level: 2 },
                "must be the last level",
            ),
            (
                "a{b}",
                TemplateError::MixedLevel {
                    level: 1,
                    text: "a{b}".into(),
                },
                "mixes",
            ),
            (
                "{a}{b}",
                TemplateError::MixedLevel {
                    level: 1,
                    text: "{a}{b}".into(),
                },
                "mixes",
            ),
            (
                "x/{b}c",
                TemplateError::MixedLevel {
                    level: 2,
                    text: "{b}c".into(),
                },
                "mixes",
            ),
            (
                "a+/b",
                TemplateError::MixedLevel {
                    level: 1,
                    text: "a+".into(),
                },
                "wildcard",
            ),
            (
                "a/b#",
                TemplateError::MixedLevel {
                    level: 2,
                    text: "b#".into(),
                },
                "wildcard",
            ),
            (
                "{a b}",
                TemplateError::InvalidName {
                    level: 1,
                    name: "a b".into(),
                },
                "letters",
            ),
            (
                "{a=b}",
                TemplateError::InvalidName {
                    level: 1,
                    name: "a=b".into(),
                },
                "letters",
            ),
        ];
        for (template, expected, needle) in cases {
            let err = Template::parse(template).unwrap_err();
            assert_eq!(&err, expected, "template {template:?}");
            let msg = err.to_string();
            assert!(
                msg.contains(needle),
                "{template:?}: {msg:?} lacks {needle:?}"
            );
            assert!(
                msg.contains("expected"),
                "{template:?}: {msg:?} does not say what is expected"
            );
        }
    }

    #[test]
    fn template_knows_whether_it_names_the_metric() {
        assert!(Template::parse("s/{device}/{metric}").unwrap().has_metric());
        assert!(!Template::parse("s/{device}/+").unwrap().has_metric());
    }

    #[test]
    fn template_derives_its_mqtt_subscription_filter() {
        let t = Template::parse("sensors/{site}/+/{metric}/#").unwrap();
        assert_eq!(t.subscription_filter(), "sensors/+/+/+/#");
        assert_eq!(t.as_str(), "sensors/{site}/+/{metric}/#");
        assert_eq!(t.to_string(), t.as_str());
    }

    // ------------------------------------------------------------------ Decoder::new

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

    // ------------------------------------------------------------------ number

    #[test]
    fn number_payloads_that_are_accepted() {
        let d = decoder(None, Format::Number, None, None);
        let cases: &[(&str, f64)] = &[
            ("21.5", 21.5),
            ("-3", -3.0),
            ("1e3", 1000.0),
            ("1E-2", 0.01),
            ("2.5e+2", 250.0),
            ("+4", 4.0),
            (".5", 0.5),
            ("5.", 5.0),
            ("0", 0.0),
            ("  21.5\n", 21.5),
            ("\t\r\n-7.25 \r\n", -7.25),
            ("1e308", 1e308),
            ("true", 1.0),
            ("false", 0.0),
            ("TRUE", 1.0),
            ("False", 0.0),
        ];
        for (payload, want) in cases {
            let got = run(&d, "home/kitchen/temp", payload).unwrap();
            assert_eq!(
                got,
                vec![reading("home/kitchen/temp", *want, ARRIVAL)],
                "payload {payload:?}"
            );
        }
    }

    #[test]
    fn number_payloads_that_are_rejected() {
        let d = decoder(None, Format::Number, None, None);
        let cases: &[(&str, &str)] = &[
            ("nan", "not_finite"),
            ("NaN", "not_finite"),
            ("inf", "not_finite"),
            ("-inf", "not_finite"),
            ("+INF", "not_finite"),
            ("Infinity", "not_finite"),
            ("-infinity", "not_finite"),
            ("1e400", "not_finite"),
            ("-1e400", "not_finite"),
            ("abc", "bad_number"),
            ("21.5C", "bad_number"),
            ("21.5 C", "bad_number"),
            ("0x10", "bad_number"),
            ("1_000", "bad_number"),
            ("1,5", "bad_number"),
            ("--1", "bad_number"),
            ("e5", "bad_number"),
            (".", "bad_number"),
            ("1e", "bad_number"),
            ("1e+", "bad_number"),
            ("+", "bad_number"),
            ("∞", "bad_number"),
            ("{\"v\":1}", "bad_number"),
            ("", "empty_payload"),
            (" \n\t", "empty_payload"),
        ];
        for (payload, reason) in cases {
            let err = expect_reject(&d, "t", payload);
            assert_eq!(err.reason(), *reason, "payload {payload:?}: {err}");
        }
    }

    #[test]
    fn number_bad_number_message_quotes_the_payload() {
        let d = decoder(None, Format::Number, None, None);
        let msg = expect_reject(&d, "t", " 21,5 ").to_string();
        assert!(msg.contains("\"21,5\""), "{msg}");
        let long = "x".repeat(500);
        let msg = expect_reject(&d, "t", &long).to_string();
        assert!(msg.len() < 200, "long payloads are shortened: {msg}");
    }

    #[test]
    fn number_metric_naming_follows_precedence() {
        // (template, value path, topic, expected metric, expected tags)
        let cases: &[NamingCase] = &[
            (None, None, "home/kitchen/temp", "home/kitchen/temp", &[]),
            (
                Some("home/{room}/+"),
                None,
                "home/kitchen/temp",
                "temp",
                &[("room", "kitchen")],
            ),
            (
                Some("home/{room}/{metric}"),
                None,
                "home/kitchen/temp",
                "temp",
                &[("room", "kitchen")],
            ),
            (
                Some("home/{room}/+"),
                Some("humidity"),
                "home/kitchen/x",
                "humidity",
                &[("room", "kitchen")],
            ),
            (
                Some("home/{metric}/+"),
                Some("humidity"),
                "home/pressure/x",
                "pressure",
                &[],
            ),
            (Some("home/#"), None, "home/kitchen/", "home/kitchen/", &[]),
        ];
        for (template, value, topic, metric, tg) in cases {
            let d = decoder(*template, Format::Number, *value, None);
            let got = run(&d, topic, "1").unwrap();
            assert_eq!(got.len(), 1);
            assert_eq!(
                got[0].metric, *metric,
                "template {template:?} value {value:?}"
            );
            assert_eq!(got[0].tags, tags(tg));
        }
    }

    // ------------------------------------------------------------------ json

    #[test]
    fn json_value_path_reads_nested_numbers_and_booleans() {
        let cases: &[(&str, &str, f64)] = &[
            ("temperature", r#"{"temperature": 21.5}"#, 21.5),
            ("data.temperature", r#"{"data": {"temperature": -4}}"#, -4.0),
            (
                "a.b.c",
                r#"{"a": {"b": {"c": 1e3}}, "x": "ignored"}"#,
                1000.0,
            ),
            ("door.open", r#"{"door": {"open": true}}"#, 1.0),
            ("door.open", r#"{"door": {"open": false}}"#, 0.0),
            (
                "big",
                r#"{"big": 18446744073709551615}"#,
                18446744073709551615.0,
            ),
        ];
        for (path, payload, want) in cases {
            let d = decoder(None, Format::Json, Some(path), None);
            let got = run(&d, "dev/1", payload).unwrap();
            let last = path.rsplit('.').next().unwrap();
            assert_eq!(got, vec![reading(last, *want, ARRIVAL)], "path {path:?}");
        }
    }

    #[test]
    fn json_string_value_is_rejected_as_wrong_type() {
        let d = decoder(None, Format::Json, Some("data.temperature"), None);
        let err = expect_reject(&d, "t", r#"{"data": {"temperature": "21.5"}}"#);
        assert_eq!(
            err,
            Reject::WrongType {
                path: "data.temperature".into(),
                found: "a string"
            }
        );
        assert_eq!(err.reason(), "wrong_type");
        let msg = err.to_string();
        assert!(
            msg.contains("\"data.temperature\"") && msg.contains("is a string"),
            "{msg}"
        );
        assert!(msg.contains("numeric strings are not converted"), "{msg}");
    }

    #[test]
    fn json_value_of_other_non_numeric_types_is_rejected_as_wrong_type() {
        let d = decoder(None, Format::Json, Some("v"), None);
        for (payload, found) in [
            (r#"{"v": null}"#, "null"),
            (r#"{"v": {"x": 1}}"#, "an object"),
            (r#"{"v": [1, 2]}"#, "an array"),
        ] {
            let err = expect_reject(&d, "t", payload);
            assert_eq!(
                err,
                Reject::WrongType {
                    path: "v".into(),
                    found
                },
                "{payload}"
            );
        }
    }

    #[test]
    fn json_missing_value_field_is_rejected_with_its_path() {
        let d = decoder(None, Format::Json, Some("data.temperature"), None);
        for payload in [
            r#"{"data": {"humidity": 40}}"#,
            r#"{"other": 1}"#,
            r#"{"data": 5}"#,
            r#"{"data": [{"temperature": 1}]}"#,
            "21.5",
            "[1]",
        ] {
            let err = expect_reject(&d, "t", payload);
            assert_eq!(
                err,
                Reject::MissingField {
                    path: "data.temperature".into()
                },
                "{payload}"
            );
            assert!(err.to_string().contains("\"data.temperature\" is missing"));
        }
    }

    #[test]
    fn json_bare_number_or_boolean_without_value_path_is_one_reading() {
        let d = decoder(Some("home/{room}/{metric}"), Format::Json, None, Some("ts"));
        let got = run(&d, "home/hall/temp", " 21.5\n").unwrap();
        let mut want = reading("temp", 21.5, ARRIVAL);
        want.tags = tags(&[("room", "hall")]);
        assert_eq!(got, vec![want]);
        let got = run(&d, "home/hall/motion", "true").unwrap();
        assert_eq!(summary(&got), vec![("motion".to_string(), 1.0, ARRIVAL)]);
        let d = decoder(None, Format::Json, None, None);
        assert_eq!(
            run(&d, "a/b", "-2").unwrap(),
            vec![reading("a/b", -2.0, ARRIVAL)]
        );
    }

    #[test]
    fn json_bare_non_numeric_payload_without_value_path_is_wrong_type() {
        let d = decoder(None, Format::Json, None, None);
        for (payload, found) in [
            (r#""21.5""#, "a string"),
            ("null", "null"),
            ("[1,2]", "an array"),
        ] {
            let err = expect_reject(&d, "t", payload);
            assert_eq!(
                err,
                Reject::WrongType {
                    path: String::new(),
                    found
                },
                "{payload}"
            );
            assert!(err.to_string().starts_with("the payload is"), "{err}");
        }
    }

    #[test]
    fn json_object_without_value_path_yields_one_reading_per_numeric_field() {
        let d = decoder(None, Format::Json, None, None);
        let payload = r#"{"temp": 21.5, "hum": 40, "ok": true, "name": "x", "n": null,
                          "nested": {"a": 1}, "list": [1, 2], "": 7}"#;
        let got = run(&d, "dev/1", payload).unwrap();
        assert_eq!(
            summary(&got),
            vec![
                ("hum".to_string(), 40.0, ARRIVAL),
                ("ok".to_string(), 1.0, ARRIVAL),
                ("temp".to_string(), 21.5, ARRIVAL),
            ]
        );
    }

    #[test]
    fn json_multi_field_metric_is_prefixed_by_the_captured_metric() {
        let d = decoder(Some("site/{device}/{metric}"), Format::Json, None, None);
        let got = run(&d, "site/d7/env", r#"{"temp": 20, "hum": 55.5}"#).unwrap();
        assert_eq!(
            summary(&got),
            vec![
                ("env.hum".to_string(), 55.5, ARRIVAL),
                ("env.temp".to_string(), 20.0, ARRIVAL)
            ]
        );
        assert!(got.iter().all(|r| r.tags == tags(&[("device", "d7")])));
    }

    #[test]
    fn json_multi_field_skips_the_timestamp_field_and_uses_it_as_time() {
        let d = decoder(None, Format::Json, None, Some("ts"));
        let got = run(&d, "t", r#"{"ts": 1700000001, "temp": 20}"#).unwrap();
        assert_eq!(got, vec![reading("temp", 20.0, 1_700_000_001_000)]);
    }

    #[test]
    fn json_object_without_numeric_fields_is_no_numeric_value() {
        let d = decoder(None, Format::Json, None, Some("ts"));
        for payload in [
            r#"{}"#,
            r#"{"name": "x", "n": null, "o": {"a": 1}}"#,
            r#"{"ts": 1700000000}"#,
        ] {
            let err = expect_reject(&d, "t", payload);
            assert_eq!(err.reason(), "no_numeric_value", "{payload}");
        }
    }

    #[test]
    fn json_numbers_beyond_f64_range_are_rejected_as_not_finite() {
        // serde_json refuses 1e400 ("number out of range") instead of producing inf; the
        // decoder reports that as not_finite because the JSON itself is well-formed.
        for (value, payload) in [
            (Some("v"), r#"{"v": 1e400}"#),
            (Some("v"), r#"{"v": -1e400}"#),
            (None, r#"{"a": 1, "b": 1e400}"#),
            (None, "1e400"),
        ] {
            let d = decoder(None, Format::Json, value, None);
            let err = expect_reject(&d, "t", payload);
            assert_eq!(err.reason(), "not_finite", "{payload}: {err}");
            assert!(err.to_string().contains("too large"), "{err}");
        }
    }

    /// `pick_json` must decide exactly like parsing a `Value` tree and looking the paths up.
    #[test]
    fn picking_fields_agrees_with_a_full_value_tree() {
        fn shallow(v: &Value) -> Value {
            match v {
                Value::Array(_) => Value::Array(Vec::new()),
                Value::Object(_) => Value::Object(serde_json::Map::new()),
                other => other.clone(),
            }
        }
        let payloads = [
            r#"{"value":20.000123,"ts":1732870000000}"#,
            r#"{"ts":"2024-05-01T12:00:00Z","value":true}"#,
            r#"{"value":1,"value":2}"#,
            r#"{"value":{"x":1},"value":3}"#,
            r#"{"data":{"temperature":21.5,"ts":1700000000},"ts":null}"#,
            r#"{"data":{"temperature":21.5},"data":5}"#,
            r#"{"data":[1,2],"value":[{"a":1}]}"#,
            r#"{"value":1,"other":1e400}"#,
            r#"{"value":1e400}"#,
            r#"{"value":-0,"ts":-1}"#,
            r#"{"value":18446744073709551615,"ts":1.5e12}"#,
            r#"{"va\u006cue":3,"t\"s":1}"#,
            r#"{"value":"21.5"}"#,
            r#"{"value":null}"#,
            r#"{"value":{}}"#,
            r#"[1,{"value":2}]"#,
            "21.5",
            "null",
            r#""text""#,
            r#"{"value": 21.5"#,
            r#"{"value": 1} trailing"#,
            "{'value': 1}",
            r#"{"value":1,"deep":[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]}"#,
            &format!(r#"{{"value":1,"deep":{}}}"#, "[".repeat(200)),
            "",
            " ",
        ];
        let paths = [
            ("value", None),
            ("value", Some("ts")),
            ("data.temperature", Some("data.ts")),
            ("data.temperature", Some("ts")),
            ("value", Some("value")),
            ("data", Some("data.temperature")),
            ("t\"s", Some("value")),
        ];
        for (v, t) in paths {
            let a = FieldPath::parse("value", v).unwrap();
            let b = t.map(|t| FieldPath::parse("timestamp", t).unwrap());
            for payload in payloads {
                let fast = pick_json(payload, &a, b.as_ref());
                let slow = parse_json(payload).map(|root| {
                    [
                        a.lookup(&root).map(shallow),
                        b.as_ref().and_then(|b| b.lookup(&root)).map(shallow),
                    ]
                });
                assert_eq!(
                    format!("{fast:?}"),
                    format!("{slow:?}"),
                    "paths {v:?}/{t:?}, payload {payload:?}"
                );
            }
        }
    }

    /// Random JSON documents over the keys the paths use, duplicates and nesting included.
    fn json_documents() -> impl Strategy<Value = String> {
        let key = prop::sample::select(vec!["value", "ts", "data", "temperature", "x"]);
        let leaf = prop_oneof![
            Just("null".to_string()),
            any::<bool>().prop_map(|b| b.to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
            (-1e6f64..1e6).prop_map(|f| f.to_string()),
            Just("1e400".to_string()),
            "[a-z]{0,4}".prop_map(|t| format!("{t:?}")),
        ];
        leaf.prop_recursive(4, 32, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4)
                    .prop_map(|v| format!("[{}]", v.join(","))),
                prop::collection::vec((key.clone(), inner), 0..5).prop_map(|kv| {
                    let fields: Vec<String> =
                        kv.into_iter().map(|(k, v)| format!("{k:?}:{v}")).collect();
                    format!("{{{}}}", fields.join(","))
                }),
            ]
        })
    }

    proptest! {
        #[test]
        fn picking_fields_agrees_with_a_full_value_tree_on_random_documents(
            doc in json_documents(),
            cut in any::<prop::sample::Index>(),
        ) {
            fn shallow(v: &Value) -> Value {
                match v {
                    Value::Array(_) => Value::Array(Vec::new()),
                    Value::Object(_) => Value::Object(serde_json::Map::new()),
                    other => other.clone(),
                }
            }
            let a = FieldPath::parse("value", "data.temperature").unwrap();
            let b = FieldPath::parse("timestamp", "ts").unwrap();
            let truncated = &doc[..cut.index(doc.len() + 1)];
            for text in [doc.as_str(), truncated] {
                let fast = pick_json(text, &a, Some(&b));
                let slow = parse_json(text).map(|root| {
                    [a.lookup(&root).map(shallow), b.lookup(&root).map(shallow)]
                });
                prop_assert_eq!(format!("{fast:?}"), format!("{slow:?}"), "{}", text);
            }
        }
    }

    #[test]
    fn json_malformed_payload_reports_serde_position() {
        let d = decoder(None, Format::Json, Some("v"), None);
        for payload in [
            r#"{"v": 21.5"#,
            r#"{"v": }"#,
            "{'v': 1}",
            "NaN",
            r#"{"v": 1} trailing"#,
            "[[[[",
        ] {
            let err = expect_reject(&d, "t", payload);
            assert_eq!(err.reason(), "malformed_json", "{payload}");
            assert!(err.to_string().contains("line 1 column"), "{err}");
        }
    }

    #[test]
    fn json_deeply_nested_payload_is_rejected_not_overflowing_the_stack() {
        let d = decoder(None, Format::Json, None, None);
        let payload = "[".repeat(100_000);
        assert_eq!(expect_reject(&d, "t", &payload).reason(), "malformed_json");
    }

    // ------------------------------------------------------------------ timestamps

    #[test]
    fn json_timestamp_forms_are_converted_to_epoch_ms() {
        let cases: &[(&str, i64)] = &[
            ("1700000000123", 1_700_000_000_123),
            ("1700000000", 1_700_000_000_000),
            ("1700000000.123", 1_700_000_000_123),
            ("1700000000.1234", 1_700_000_000_123),
            ("1700000000.1236", 1_700_000_000_124),
            ("1700000000123.6", 1_700_000_000_124),
            ("1.7e9", 1_700_000_000_000),
            ("1.7e12", 1_700_000_000_000),
            ("99999999999", 99_999_999_999_000),
            ("100000000000", 100_000_000_000),
            ("0", 0),
            ("253402300799999", MAX_TIME_MS),
            (r#""2023-11-14T22:13:20Z""#, 1_700_000_000_000),
            (r#""2023-11-14T22:13:20.123Z""#, 1_700_000_000_123),
            (r#""2023-11-15T00:13:20.5+02:00""#, 1_700_000_000_500),
            (r#""2023-11-14T17:13:20-05:00""#, 1_700_000_000_000),
            (r#""2023-11-14T22:13:20.0004Z""#, 1_700_000_000_000),
            (r#""2023-11-14T22:13:20.0005Z""#, 1_700_000_000_001),
            (r#""1970-01-01T00:00:00Z""#, 0),
        ];
        let d = decoder(None, Format::Json, Some("v"), Some("meta.ts"));
        for (ts, want) in cases {
            let payload = format!(r#"{{"v": 1, "meta": {{"ts": {ts}}}}}"#);
            let got = run(&d, "t", &payload).unwrap();
            assert_eq!(got[0].time_ms, *want, "timestamp {ts}");
        }
    }

    #[test]
    fn json_absent_or_null_timestamp_falls_back_to_arrival_time() {
        let d = decoder(None, Format::Json, Some("v"), Some("meta.ts"));
        for payload in [
            r#"{"v": 1}"#,
            r#"{"v": 1, "meta": {}}"#,
            r#"{"v": 1, "meta": {"ts": null}}"#,
            r#"{"v": 1, "meta": 3}"#,
        ] {
            assert_eq!(
                run(&d, "t", payload).unwrap()[0].time_ms,
                ARRIVAL,
                "{payload}"
            );
        }
    }

    #[test]
    fn json_without_timestamp_config_uses_arrival_even_if_payload_has_a_time() {
        let d = decoder(None, Format::Json, Some("v"), None);
        assert_eq!(
            run(&d, "t", r#"{"v": 1, "ts": 5}"#).unwrap()[0].time_ms,
            ARRIVAL
        );
    }

    #[test]
    fn json_unusable_timestamps_are_rejected_as_bad_timestamp() {
        let cases: &[(&str, &str)] = &[
            ("-1", "outside"),
            ("-1700000000000", "outside"),
            ("253402300800000", "outside"),
            ("1e16", "outside"),
            (r#""yesterday""#, "RFC 3339"),
            (r#""1700000000""#, "RFC 3339"),
            (r#""2023-11-14 22:13:20""#, "RFC 3339"),
            (r#""2023-11-14T22:13:20""#, "RFC 3339"),
            (r#""2023-02-30T00:00:00Z""#, "RFC 3339"),
            (r#""1969-12-31T23:59:59Z""#, "outside"),
            (r#""9999-12-31T23:59:59.9999Z""#, "outside"),
            ("true", "a boolean"),
            (r#"{"s": 1}"#, "an object"),
            ("[1700000000]", "an array"),
        ];
        let d = decoder(None, Format::Json, Some("v"), Some("ts"));
        for (ts, needle) in cases {
            let payload = format!(r#"{{"v": 1, "ts": {ts}}}"#);
            let err = expect_reject(&d, "t", &payload);
            assert_eq!(err.reason(), "bad_timestamp", "timestamp {ts}: {err}");
            let msg = err.to_string();
            assert!(
                msg.contains("\"ts\"") && msg.contains(needle),
                "{ts}: {msg}"
            );
        }
    }

    // ------------------------------------------------------------------ senml

    fn senml() -> Decoder {
        decoder(None, Format::Senml, None, None)
    }

    fn assert_senml(payload: &str, want: &[(&str, f64, i64)]) {
        let got = run(&senml(), "senml/topic", payload).unwrap();
        let want: Vec<(String, f64, i64)> = want
            .iter()
            .map(|(n, v, t)| (n.to_string(), *v, *t))
            .collect();
        assert_eq!(summary(&got), want);
    }

    #[test]
    fn senml_rfc8428_5_1_1_single_datapoint_is_stamped_with_arrival_time() {
        assert_senml(
            r#"[{"n":"urn:dev:ow:10e2073a01080063","u":"Cel","v":23.1}]"#,
            &[("urn:dev:ow:10e2073a01080063", 23.1, ARRIVAL)],
        );
    }

    #[test]
    fn senml_rfc8428_5_1_2_multiple_datapoints_concatenate_base_name() {
        assert_senml(
            r#"[
                 {"bn":"urn:dev:ow:10e2073a01080063:","n":"voltage","u":"V","v":120.1},
                 {"n":"current","u":"A","v":1.2}
               ]"#,
            &[
                ("urn:dev:ow:10e2073a01080063:voltage", 120.1, ARRIVAL),
                ("urn:dev:ow:10e2073a01080063:current", 1.2, ARRIVAL),
            ],
        );
    }

    const RFC_5_1_2_WITH_BASE_TIME: &str = r#"[
        {"bn":"urn:dev:ow:10e2073a0108006:","bt":1.276020076001e+09,
         "bu":"A","bver":5,
         "n":"voltage","u":"V","v":120.1},
        {"n":"current","t":-5,"v":1.2},
        {"n":"current","t":-4,"v":1.3},
        {"n":"current","t":-3,"v":1.4},
        {"n":"current","t":-2,"v":1.5},
        {"n":"current","t":-1,"v":1.6},
        {"n":"current","v":1.7}
    ]"#;

    const RFC_5_1_4_RESOLVED: &str = r#"[
        {"n":"urn:dev:ow:10e2073a0108006:voltage","u":"V","v":120.1,"t":1.276020076001e+09},
        {"n":"urn:dev:ow:10e2073a0108006:current","u":"A","v":1.2,"t":1.276020071001e+09},
        {"n":"urn:dev:ow:10e2073a0108006:current","u":"A","v":1.3,"t":1.276020072001e+09},
        {"n":"urn:dev:ow:10e2073a0108006:current","u":"A","v":1.4,"t":1.276020073001e+09},
        {"n":"urn:dev:ow:10e2073a0108006:current","u":"A","v":1.5,"t":1.276020074001e+09},
        {"n":"urn:dev:ow:10e2073a0108006:current","u":"A","v":1.6,"t":1.276020075001e+09},
        {"n":"urn:dev:ow:10e2073a0108006:current","u":"A","v":1.7,"t":1.276020076001e+09}
    ]"#;

    #[test]
    fn senml_rfc8428_5_1_2_base_time_and_relative_offsets_resolve_to_absolute_times() {
        let voltage = "urn:dev:ow:10e2073a0108006:voltage";
        let current = "urn:dev:ow:10e2073a0108006:current";
        assert_senml(
            RFC_5_1_2_WITH_BASE_TIME,
            &[
                (voltage, 120.1, 1_276_020_076_001),
                (current, 1.2, 1_276_020_071_001),
                (current, 1.3, 1_276_020_072_001),
                (current, 1.4, 1_276_020_073_001),
                (current, 1.5, 1_276_020_074_001),
                (current, 1.6, 1_276_020_075_001),
                (current, 1.7, 1_276_020_076_001),
            ],
        );
    }

    #[test]
    fn senml_rfc8428_5_1_4_resolved_form_decodes_identically_to_the_base_form() {
        let base = run(&senml(), "t", RFC_5_1_2_WITH_BASE_TIME).unwrap();
        let resolved = run(&senml(), "t", RFC_5_1_4_RESOLVED).unwrap();
        assert_eq!(base, resolved);
        assert_eq!(resolved.len(), 7);
    }

    #[test]
    fn senml_rfc8428_5_1_3_multiple_measurements_share_the_base_name() {
        // Units are not stored, so humidity, latitude and longitude resolve to the same
        // name here (a documented limitation); values and times must still be exact.
        let payload = r#"[
            {"bn":"urn:dev:ow:10e2073a01080063","bt":1.320067464e+09,"bu":"%RH","v":20},
            {"u":"lon","v":24.30621},
            {"u":"lat","v":60.07965},
            {"t":60,"v":20.3},
            {"u":"lon","t":60,"v":24.30622},
            {"u":"lat","t":60,"v":60.07965},
            {"t":120,"v":20.7},
            {"u":"lon","t":120,"v":24.30623},
            {"u":"lat","t":120,"v":60.07966},
            {"u":"%EL","t":150,"v":98},
            {"t":180,"v":21.2},
            {"u":"lon","t":180,"v":24.30628},
            {"u":"lat","t":180,"v":60.07967}
        ]"#;
        let n = "urn:dev:ow:10e2073a01080063";
        let t0 = 1_320_067_464_000;
        assert_senml(
            payload,
            &[
                (n, 20.0, t0),
                (n, 24.30621, t0),
                (n, 60.07965, t0),
                (n, 20.3, t0 + 60_000),
                (n, 24.30622, t0 + 60_000),
                (n, 60.07965, t0 + 60_000),
                (n, 20.7, t0 + 120_000),
                (n, 24.30623, t0 + 120_000),
                (n, 60.07966, t0 + 120_000),
                (n, 98.0, t0 + 150_000),
                (n, 21.2, t0 + 180_000),
                (n, 24.30628, t0 + 180_000),
                (n, 60.07967, t0 + 180_000),
            ],
        );
    }

    #[test]
    fn senml_rfc8428_5_1_5_multiple_data_types_keep_numbers_and_booleans_only() {
        assert_senml(
            r#"[
                 {"bn":"urn:dev:ow:10e2073a01080063:","n":"temp","u":"Cel","v":23.1},
                 {"n":"label","vs":"Machine Room"},
                 {"n":"open","vb":false},
                 {"n":"nfc-reader","vd":"aGkgCg"}
               ]"#,
            &[
                ("urn:dev:ow:10e2073a01080063:temp", 23.1, ARRIVAL),
                ("urn:dev:ow:10e2073a01080063:open", 0.0, ARRIVAL),
            ],
        );
    }

    #[test]
    fn senml_rfc8428_5_1_6_collection_of_resources() {
        assert_senml(
            r#"[
                 {"bn":"2001:db8::2/","bt":1.320078429e+09,
                  "n":"temperature","u":"Cel","v":27.2},
                 {"n":"humidity","u":"%RH","v":80}
               ]"#,
            &[
                ("2001:db8::2/temperature", 27.2, 1_320_078_429_000),
                ("2001:db8::2/humidity", 80.0, 1_320_078_429_000),
            ],
        );
    }

    #[test]
    fn senml_base_fields_apply_until_overridden() {
        assert_senml(
            r#"[
                 {"bn":"a:","bt":1700000000,"bv":100,"n":"x","v":1},
                 {"n":"y","v":2,"t":10},
                 {"bn":"b:","bv":0,"n":"x","v":3},
                 {"bt":1800000000,"n":"z","v":-4.5}
               ]"#,
            &[
                ("a:x", 101.0, 1_700_000_000_000),
                ("a:y", 102.0, 1_700_000_010_000),
                ("b:x", 3.0, 1_700_000_000_000),
                ("b:z", -4.5, 1_800_000_000_000),
            ],
        );
    }

    #[test]
    fn senml_base_value_is_not_added_to_booleans() {
        assert_senml(
            r#"[{"bn":"d","bv":10,"vb":true},{"n":"x","v":1}]"#,
            &[("d", 1.0, ARRIVAL), ("dx", 11.0, ARRIVAL)],
        );
    }

    #[test]
    fn senml_small_times_are_relative_to_arrival() {
        assert_senml(
            r#"[{"n":"a","v":1,"t":-1.5},{"n":"b","v":2,"t":268435455},{"n":"c","v":3,"t":268435456}]"#,
            &[
                ("a", 1.0, ARRIVAL - 1_500),
                ("b", 2.0, ARRIVAL + 268_435_455_000),
                ("c", 3.0, 268_435_456_000),
            ],
        );
    }

    #[test]
    fn senml_records_without_numeric_value_are_skipped() {
        assert_senml(
            r#"[
                 {"bn":"dev:","bt":1700000000},
                 {"n":"label","vs":"x"},
                 {"n":"blob","vd":"AAEC"},
                 {"n":"energy","s":1234.5},
                 {"n":"power","v":5,"s":9,"ut":60,"x-vendor":{"any":"thing"}}
               ]"#,
            &[("dev:power", 5.0, 1_700_000_000_000)],
        );
    }

    #[test]
    fn senml_template_tags_apply_to_every_record_and_its_metric_is_ignored() {
        let d = decoder(Some("gw/{gateway}/{metric}"), Format::Senml, None, None);
        let got = run(
            &d,
            "gw/g1/ignored",
            r#"[{"bn":"d:","n":"a","v":1},{"n":"b","v":2}]"#,
        )
        .unwrap();
        assert_eq!(
            got.iter().map(|r| r.metric.as_str()).collect::<Vec<_>>(),
            ["d:a", "d:b"]
        );
        assert!(got.iter().all(|r| r.tags == tags(&[("gateway", "g1")])));
    }

    #[test]
    fn senml_invalid_packs_are_rejected_as_bad_senml() {
        let cases: &[(&str, &str)] = &[
            (r#"{"n":"a","v":1}"#, "must be a JSON array"),
            ("21.5", "must be a JSON array"),
            (
                r#"[{"n":"a","v":1}, 5]"#,
                "record 1: a record must be a JSON object",
            ),
            (r#"[{"v":1}]"#, "resolved name (bn + n) is empty"),
            (r#"[{"bn":"","n":"","v":1}]"#, "is empty"),
            (r#"[{"n":"has space","v":1}]"#, "is invalid"),
            (r#"[{"n":"-lead","v":1}]"#, "is invalid"),
            (r#"[{"n":"a{b=c}","v":1}]"#, "is invalid"),
            (
                r#"[{"n":"a","v":"21.5"}]"#,
                "\"v\" must be a number, found a string",
            ),
            (
                r#"[{"n":"a","v":null}]"#,
                "\"v\" must be a number, found null",
            ),
            (r#"[{"n":"a","vb":1}]"#, "\"vb\" must be a boolean"),
            (r#"[{"n":"a","vs":3}]"#, "\"vs\" must be a string"),
            (r#"[{"n":5,"v":1}]"#, "\"n\" must be a string"),
            (r#"[{"bn":5,"n":"a","v":1}]"#, "\"bn\" must be a string"),
            (r#"[{"n":"a","v":1,"t":"now"}]"#, "\"t\" must be a number"),
            (r#"[{"bt":"x","n":"a","v":1}]"#, "\"bt\" must be a number"),
            (r#"[{"bv":true,"n":"a","v":1}]"#, "\"bv\" must be a number"),
            (r#"[{"n":"a","u":1,"v":1}]"#, "\"u\" must be a string"),
            (r#"[{"n":"a","v":1,"vs":"x"}]"#, "only one of"),
            (r#"[{"n":"a","v":1,"vb":true}]"#, "only one of"),
            (
                r#"[{"n":"a","v":1,"rel_":"x"}]"#,
                "must-understand field \"rel_\"",
            ),
            (
                r#"[{"n":"a","vs":"x","xx_":1},{"n":"b","v":1}]"#,
                "record 0: must-understand",
            ),
            (r#"[{"bver":0,"n":"a","v":1}]"#, "positive integer"),
            (r#"[{"bver":-1,"n":"a","v":1}]"#, "positive integer"),
            (r#"[{"bver":1.5,"n":"a","v":1}]"#, "positive integer"),
            (r#"[{"bver":"10","n":"a","v":1}]"#, "positive integer"),
        ];
        for (payload, needle) in cases {
            let err = expect_reject(&senml(), "t", payload);
            assert_eq!(err.reason(), "bad_senml", "{payload}: {err}");
            assert!(
                err.to_string().contains(needle),
                "{payload}: {err} lacks {needle:?}"
            );
        }
    }

    #[test]
    fn senml_accepts_any_positive_integer_version() {
        assert_senml(r#"[{"bver":10,"n":"a","v":1}]"#, &[("a", 1.0, ARRIVAL)]);
        assert_senml(r#"[{"bver":99,"n":"a","v":1}]"#, &[("a", 1.0, ARRIVAL)]);
    }

    #[test]
    fn senml_pack_without_numeric_record_is_no_numeric_value() {
        for (payload, needle) in [
            ("[]", "has no records"),
            (
                r#"[{"n":"label","vs":"x"},{"n":"e","s":1}]"#,
                "none of the 2",
            ),
        ] {
            let err = expect_reject(&senml(), "t", payload);
            assert_eq!(err.reason(), "no_numeric_value", "{payload}");
            assert!(err.to_string().contains(needle), "{err}");
        }
    }

    #[test]
    fn senml_out_of_range_times_are_bad_timestamp() {
        for payload in [
            r#"[{"n":"a","v":1,"bt":1e300}]"#,
            r#"[{"n":"a","v":1,"t":253402300800}]"#,
            r#"[{"n":"a","v":1,"t":-2000000000}]"#,
        ] {
            let err = expect_reject(&senml(), "t", payload);
            assert_eq!(err.reason(), "bad_timestamp", "{payload}: {err}");
            assert!(err.to_string().contains("record 0"), "{err}");
        }
    }

    #[test]
    fn senml_base_value_overflow_is_not_finite() {
        let err = expect_reject(&senml(), "t", r#"[{"n":"a","bv":1e308,"v":1e308}]"#);
        assert_eq!(err.reason(), "not_finite");
    }

    #[test]
    fn senml_rejection_appends_nothing_even_after_good_records() {
        let mut out = vec![reading("existing", 1.0, 0)];
        let err = senml()
            .decode(
                "t",
                br#"[{"n":"a","v":1},{"n":"b","v":"bad"}]"#,
                ARRIVAL,
                &mut out,
            )
            .unwrap_err();
        assert_eq!(err.reason(), "bad_senml");
        assert_eq!(out, vec![reading("existing", 1.0, 0)]);
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
