//! The payload formats a subscription can declare.

use std::fmt;

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
    /// InfluxDB line protocol (Telegraf's native output), one or more lines.
    Line,
    /// Sparkplug B protobuf payloads on `spBv1.0/...` topics (stateful: see the `sparkplug`
    /// module).
    #[serde(rename = "sparkplug_b")]
    SparkplugB,
}

impl Format {
    /// The configuration spelling (`json`, `number`, `senml`, `line`, `sparkplug_b`).
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Number => "number",
            Format::Senml => "senml",
            Format::Line => "line",
            Format::SparkplugB => "sparkplug_b",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_defaults_to_json_and_uses_lowercase_config_names() {
        assert_eq!(Format::default(), Format::Json);
        for (text, f) in [
            ("\"json\"", Format::Json),
            ("\"number\"", Format::Number),
            ("\"senml\"", Format::Senml),
            ("\"line\"", Format::Line),
            ("\"sparkplug_b\"", Format::SparkplugB),
        ] {
            assert_eq!(serde_json::from_str::<Format>(text).unwrap(), f);
            assert_eq!(serde_json::to_string(&f).unwrap(), text);
            assert_eq!(format!("\"{f}\""), text);
        }
        assert!(serde_json::from_str::<Format>("\"Json\"").is_err());
    }
}
