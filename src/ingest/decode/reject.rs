//! Why a message produced no readings: stable reason labels for metrics, detail for logs.

/// How long a payload or topic excerpt quoted in a [`Reject`] message may get (in chars),
/// so a hostile or broken sender cannot blow up log lines.
const SNIPPET_CHARS: usize = 48;

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
    "bad_line",
    "bad_sparkplug",
    "unknown_alias",
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
        /// Where and what the value was, e.g. `payload is "NaN"` or which number overflowed.
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
        /// Which rule is broken, e.g. a field of the wrong JSON type or an empty resolved name.
        detail: String,
    },
    /// A line of an InfluxDB line protocol payload that breaks its syntax.
    #[error("invalid line protocol: line {line}: {detail}")]
    BadLine {
        /// 1-based number of the offending line in the payload.
        line: usize,
        /// Which rule is broken.
        detail: String,
    },
    /// A Sparkplug B topic or payload that breaks the specification.
    #[error("invalid Sparkplug B message: {detail}")]
    BadSparkplug {
        /// What is wrong (the topic's structure, the protobuf).
        detail: String,
    },
    /// Sparkplug B data whose metrics no birth declared (a rebirth is requested).
    #[error("unknown Sparkplug B alias: {detail}")]
    UnknownAlias {
        /// Which node, device or aliases.
        detail: String,
    },
}

pub(super) fn describe_path(path: &str) -> String {
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
            Reject::BadLine { .. } => "bad_line",
            Reject::BadSparkplug { .. } => "bad_sparkplug",
            Reject::UnknownAlias { .. } => "unknown_alias",
        }
    }
}

/// Shortens `s` for inclusion in an error message.
pub(super) fn snippet(s: &str) -> String {
    match s.char_indices().nth(SNIPPET_CHARS) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_string(),
    }
}
