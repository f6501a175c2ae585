//! InfluxDB line protocol, Telegraf's native output and common on MQTT:
//! `weather,location=us-midwest temperature=82,humidity=71i 1465839830100400200`.
//!
//! Each numeric or boolean field of each line is a reading. Its metric is
//! `measurement.field`, or the measurement alone for the one field a subscription's `value`
//! names (then only that field is taken); its tags are the line's tag set merged over the
//! topic template's (the line's win: they are the more specific); its time is the line's
//! timestamp at the subscription's [`Precision`] (nanoseconds unless configured, as in
//! InfluxDB), or the arrival time when the line has none.
//!
//! The syntax and escaping follow the InfluxDB v2 line protocol reference: measurements
//! escape commas and spaces, tag keys, tag values and field keys escape commas, equals signs
//! and spaces, string field values escape double quotes and backslashes; a backslash before
//! any other character is itself. Floats (`1`, `-1.5`, `1e3`), integers (`12i`), unsigned
//! integers (`12u`) and booleans (`t`, `T`, `true`, `True`, `TRUE` and the same for false)
//! are readings; string fields are skipped (like a JSON object's non-numeric fields). Empty
//! lines and lines starting with `#` are skipped. A field given twice in one line keeps the
//! last value, as InfluxDB does.
//!
//! A payload is accepted or rejected as a whole: a line that breaks the syntax rejects the
//! message as `bad_line` with its line number, so a half-read payload never yields half its
//! readings.

use super::reject::{Reject, snippet};
use super::time::MAX_TIME_MS;
use crate::model::Reading;
use std::collections::BTreeMap;

/// The unit of line protocol timestamps (InfluxDB's write `precision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Nanoseconds since the Unix epoch: line protocol's default.
    #[default]
    Ns,
    /// Microseconds.
    Us,
    /// Milliseconds.
    Ms,
    /// Seconds.
    S,
}

impl Precision {
    /// `t` in this unit as milliseconds since the epoch, rounded down (a reading belongs to
    /// the millisecond it happened in); `None` if it does not fit.
    fn to_ms(self, t: i64) -> Option<i64> {
        match self {
            Precision::Ns => Some(t.div_euclid(1_000_000)),
            Precision::Us => Some(t.div_euclid(1_000)),
            Precision::Ms => Some(t),
            Precision::S => t.checked_mul(1000),
        }
    }
}

/// How a subscription with `format = "line"` names and picks its readings.
#[derive(Debug, Clone, Default)]
pub(super) struct LineOptions {
    /// Only this field is taken, and its metric is the measurement.
    pub(super) field: Option<String>,
    /// The timestamps' unit.
    pub(super) precision: Precision,
}

fn bad(line: usize, detail: impl Into<String>) -> Reject {
    Reject::BadLine {
        line,
        detail: detail.into(),
    }
}

/// Decodes every line of `text` into `out` (nothing on a reject: the caller truncates).
pub(super) fn decode_line_protocol(
    text: &str,
    opts: &LineOptions,
    topic_tags: &BTreeMap<String, String>,
    arrival_ms: i64,
    out: &mut Vec<Reading>,
) -> Result<(), Reject> {
    let start = out.len();
    for (i, raw) in text.split('\n').enumerate() {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        let line = line.trim_start_matches([' ', '\t']);
        if line.trim_end().is_empty() || line.starts_with('#') {
            continue;
        }
        decode_one(line, i + 1, opts, topic_tags, arrival_ms, out)?;
    }
    if out.len() == start {
        return Err(Reject::NoNumericValue {
            detail: match &opts.field {
                Some(f) => format!("no line has a numeric or boolean field {f:?}"),
                None => "no line has a numeric or boolean field".to_string(),
            },
        });
    }
    Ok(())
}

/// Reads characters up to the first unescaped character of `stops`, unescaping those of
/// `escapes`. Returns the text and the rest of the input from the stop character on (empty
/// at the end).
fn take_until<'a>(s: &'a str, stops: &[char], escapes: &[char]) -> (String, &'a str) {
    let mut out = String::new();
    let mut chars = s.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        if c == '\\' {
            if let Some(&(_, next)) = chars.peek()
                && escapes.contains(&next)
            {
                out.push(next);
                chars.next();
                continue;
            }
            out.push(c);
            continue;
        }
        if stops.contains(&c) {
            return (out, &s[at..]);
        }
        out.push(c);
    }
    (out, "")
}

const MEASUREMENT_ESCAPES: &[char] = &[',', ' '];
const KEY_ESCAPES: &[char] = &[',', '=', ' '];

fn decode_one(
    line: &str,
    n: usize,
    opts: &LineOptions,
    topic_tags: &BTreeMap<String, String>,
    arrival_ms: i64,
    out: &mut Vec<Reading>,
) -> Result<(), Reject> {
    let (measurement, mut rest) = take_until(line, &[',', ' '], MEASUREMENT_ESCAPES);
    if measurement.is_empty() {
        return Err(bad(n, "the line has no measurement"));
    }
    let mut tags = topic_tags.clone();
    while let Some(after) = rest.strip_prefix(',') {
        let (key, r) = take_until(after, &['=', ',', ' '], KEY_ESCAPES);
        let Some(r) = r.strip_prefix('=') else {
            return Err(bad(
                n,
                format!("tag {:?} has no '=' and value", snippet(&key)),
            ));
        };
        let (value, r) = take_until(r, &[',', ' ', '='], KEY_ESCAPES);
        if key.is_empty() || value.is_empty() {
            return Err(bad(n, "a tag key or value is empty"));
        }
        if r.starts_with('=') {
            return Err(bad(
                n,
                format!("tag {key:?}: an unescaped '=' in its value"),
            ));
        }
        tags.insert(key, value);
        rest = r;
    }
    let Some(fields_text) = rest.strip_prefix(' ') else {
        return Err(bad(n, "the line has no field set"));
    };
    let (fields, rest) = parse_fields(fields_text, n)?;
    let time_ms = match rest.trim_end_matches([' ', '\t']) {
        "" => arrival_ms,
        ts => {
            let Some(ts) = ts.strip_prefix(' ') else {
                return Err(bad(n, "expected a space before the timestamp"));
            };
            let t: i64 = ts.parse().map_err(|_| Reject::BadTimestamp {
                detail: format!("line {n}: {:?} is not an integer timestamp", snippet(ts)),
            })?;
            opts.precision
                .to_ms(t)
                .filter(|ms| (0..=MAX_TIME_MS).contains(ms))
                .ok_or_else(|| Reject::BadTimestamp {
                    detail: format!("line {n}: {t} ({:?}) is outside 1970..9999", opts.precision),
                })?
        }
    };
    for (field, value) in fields {
        let metric = match &opts.field {
            Some(f) if *f == field => measurement.clone(),
            Some(_) => continue,
            None => format!("{measurement}.{field}"),
        };
        let Some(value) = value else { continue };
        out.push(Reading {
            metric,
            tags: tags.clone(),
            value,
            time_ms,
        });
    }
    Ok(())
}

/// A line's fields by key, each with its value as a reading (`None` for a string field).
type Fields = BTreeMap<String, Option<f64>>;

/// The field set, the last value of a key given twice; and the rest of the line after it.
fn parse_fields(s: &str, n: usize) -> Result<(Fields, &str), Reject> {
    let mut fields = BTreeMap::new();
    let mut rest = s;
    loop {
        let (key, r) = take_until(rest, &['=', ',', ' '], KEY_ESCAPES);
        let Some(r) = r.strip_prefix('=') else {
            return Err(bad(
                n,
                format!("field {:?} has no '=' and value", snippet(&key)),
            ));
        };
        if key.is_empty() {
            return Err(bad(n, "a field key is empty"));
        }
        let (value, r) = if let Some(quoted) = r.strip_prefix('"') {
            (None, skip_string(quoted, n)?)
        } else {
            let end = r.find([',', ' ']).unwrap_or(r.len());
            (Some(field_value(&r[..end], &key, n)?), &r[end..])
        };
        fields.insert(key, value);
        match r.strip_prefix(',') {
            Some(next) => rest = next,
            None => return Ok((fields, r)),
        }
    }
}

/// Skips a string field's value after its opening quote; returns what follows the closing one.
fn skip_string(s: &str, n: usize) -> Result<&str, Reject> {
    let mut chars = s.char_indices();
    while let Some((at, c)) = chars.next() {
        match c {
            '\\' => {
                chars.next();
            }
            '"' => return Ok(&s[at + 1..]),
            _ => {}
        }
    }
    Err(bad(n, "a string field value has no closing quote"))
}

/// A field's unquoted value as a reading: float, `i`/`u` integer or boolean.
fn field_value(text: &str, key: &str, n: usize) -> Result<f64, Reject> {
    match text {
        "t" | "T" | "true" | "True" | "TRUE" => return Ok(1.0),
        "f" | "F" | "false" | "False" | "FALSE" => return Ok(0.0),
        _ => {}
    }
    let not = |kind: &str| {
        bad(
            n,
            format!("field {key:?}: {:?} is not {kind}", snippet(text)),
        )
    };
    if let Some(int) = text.strip_suffix('i') {
        return int
            .parse::<i64>()
            .map(|v| v as f64)
            .map_err(|_| not("an integer"));
    }
    if let Some(uint) = text.strip_suffix('u') {
        return uint
            .parse::<u64>()
            .map(|v| v as f64)
            .map_err(|_| not("an unsigned integer"));
    }
    // Only decimal notation: Rust's parser would also take "inf" and "NaN".
    let decimal = !text.is_empty()
        && text.bytes().any(|b| b.is_ascii_digit())
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'));
    let v: f64 = text
        .parse()
        .ok()
        .filter(|_| decimal)
        .ok_or_else(|| not("a number, an integer (12i, 12u) or a boolean"))?;
    if !v.is_finite() {
        return Err(Reject::NotFinite {
            detail: format!("line {n}: field {key:?} is {:?}", snippet(text)),
        });
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(text: &str, opts: &LineOptions) -> Result<Vec<Reading>, Reject> {
        let mut out = Vec::new();
        let topic = BTreeMap::from([("site".to_string(), "plant".to_string())]);
        decode_line_protocol(text, opts, &topic, 5_000, &mut out).map(|()| out)
    }

    fn tags(r: &Reading) -> Vec<(&str, &str)> {
        r.tags
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    #[test]
    fn the_reference_example_gives_one_reading_per_numeric_field_at_its_nanosecond_time() {
        // From the line protocol reference ("Elements of line protocol").
        let r = decode(
            "myMeasurement,tag1=value1,tag2=value2 fieldKey=\"fieldValue\",n=3i 1556813561098000000",
            &LineOptions::default(),
        )
        .unwrap();
        assert_eq!(r.len(), 1, "the string field is skipped");
        assert_eq!(r[0].metric, "myMeasurement.n");
        assert_eq!(r[0].value, 3.0);
        assert_eq!(r[0].time_ms, 1_556_813_561_098);
        assert_eq!(
            tags(&r[0]),
            [("site", "plant"), ("tag1", "value1"), ("tag2", "value2")]
        );
    }

    #[test]
    fn every_value_type_of_the_reference_and_several_lines_per_payload() {
        // The data types section's examples: float, integer, unsigned, booleans, string.
        let text = "# comment line\n\
                    myMeasurement fieldKey=1.0 1556813561098000000\n\
                    myMeasurement fieldKey=1 1556813561098000000\r\n\
                    \n\
                    myMeasurement fieldKey=-1.234456e+78 1556813561098000000\n\
                    myMeasurement fieldKey=12485903i\n\
                    myMeasurement fieldKey=12485903u\n\
                    myMeasurement fieldKey=\"this is a string\"\n\
                    myMeasurement a=t,b=T,c=true,d=True,e=TRUE,f=f,g=F,h=false,i=False,j=FALSE\n";
        let r = decode(text, &LineOptions::default()).unwrap();
        let values: Vec<f64> = r.iter().map(|r| r.value).collect();
        assert_eq!(
            values,
            [
                1.0,
                1.0,
                -1.234456e78,
                12485903.0,
                12485903.0,
                1.0,
                1.0,
                1.0,
                1.0,
                1.0,
                0.0,
                0.0,
                0.0,
                0.0,
                0.0
            ]
        );
        assert_eq!(r[3].time_ms, 5_000, "no timestamp: the arrival time");
        assert_eq!(r[5].metric, "myMeasurement.a");
    }

    #[test]
    fn escapes_follow_the_reference_per_element() {
        // The special characters section's examples.
        let text = "my\\ Measurement,tag\\ Key1=tag\\ Value1,tag\\,Key2=tag\\,Value2,tag\\=Key3=tag\\=Value3 \
                    field\\ Key=1,field\\,Key2=2,field\\=Key3=3,s=\"a \\\"quoted\\\" string, with a \\\\ and =\" 1556813561098000000";
        let r = decode(text, &LineOptions::default()).unwrap();
        let metrics: Vec<&str> = r.iter().map(|r| r.metric.as_str()).collect();
        assert_eq!(
            metrics,
            [
                "my Measurement.field Key",
                "my Measurement.field,Key2",
                "my Measurement.field=Key3"
            ]
        );
        assert_eq!(
            tags(&r[0]),
            [
                ("site", "plant"),
                ("tag Key1", "tag Value1"),
                ("tag,Key2", "tag,Value2"),
                ("tag=Key3", "tag=Value3")
            ]
        );
        // A backslash before anything else is itself.
        let r = decode("path\\x,dir=C:\\temp v=1", &LineOptions::default()).unwrap();
        assert_eq!(r[0].metric, "path\\x.v");
        assert_eq!(r[0].tags["dir"], "C:\\temp");
    }

    #[test]
    fn a_named_field_becomes_the_measurement_and_line_tags_win_over_topic_tags() {
        let opts = LineOptions {
            field: Some("value".into()),
            precision: Precision::S,
        };
        let r = decode("temperature,site=hall value=21.5,other=3 1700000000", &opts).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].metric.as_str(), r[0].value), ("temperature", 21.5));
        assert_eq!(r[0].time_ms, 1_700_000_000_000);
        assert_eq!(tags(&r[0]), [("site", "hall")]);
        let err = decode("temperature other=3", &opts).unwrap_err();
        assert_eq!(err.reason(), "no_numeric_value");
    }

    #[test]
    fn precisions_convert_to_milliseconds_rounding_down() {
        for (p, ts, ms) in [
            (Precision::Ns, "1700000000123999999", 1_700_000_000_123),
            (Precision::Us, "1700000000123999", 1_700_000_000_123),
            (Precision::Ms, "1700000000123", 1_700_000_000_123),
            (Precision::S, "1700000000", 1_700_000_000_000),
        ] {
            let opts = LineOptions {
                field: None,
                precision: p,
            };
            let r = decode(&format!("m v=1 {ts}"), &opts).unwrap();
            assert_eq!(r[0].time_ms, ms, "{p:?}");
        }
        for (p, ts) in [
            (Precision::Ns, "-1000000"),
            (Precision::S, "9223372036854775"),
            (Precision::Ms, "abc"),
            (Precision::Ms, "1.5"),
        ] {
            let opts = LineOptions {
                field: None,
                precision: p,
            };
            let err = decode(&format!("m v=1 {ts}"), &opts).unwrap_err();
            assert_eq!(err.reason(), "bad_timestamp", "{p:?} {ts}: {err}");
        }
    }

    #[test]
    fn broken_lines_reject_the_whole_payload_with_their_line_number() {
        let opts = LineOptions::default();
        for (text, reason, says) in [
            ("m", "bad_line", "line 1: the line has no field set"),
            ("m,t=1", "bad_line", "no field set"),
            (",t=1 v=1", "bad_line", "no measurement"),
            // Leading whitespace is not part of the line: this is measurement "v=1" alone.
            (" v=1", "bad_line", "no field set"),
            ("m,t v=1", "bad_line", "has no '='"),
            ("m,t= v=1", "bad_line", "empty"),
            ("m v", "bad_line", "has no '='"),
            ("m =1", "bad_line", "field key is empty"),
            ("m v=1x", "bad_line", "is not a number"),
            ("m v=inf", "bad_line", "is not a number"),
            ("m v=NaN", "bad_line", "is not a number"),
            ("m v=1.5i", "bad_line", "is not an integer"),
            ("m v=-1u", "bad_line", "is not an unsigned integer"),
            ("m v=\"open", "bad_line", "no closing quote"),
            ("m v=1 1 2", "bad_timestamp", "not an integer"),
            ("m v=1e999", "not_finite", "1e999"),
            ("m s=\"x\"", "no_numeric_value", "no line"),
            ("# only a comment\n\n", "no_numeric_value", "no line"),
            ("m v=1\nm v=oops", "bad_line", "line 2:"),
        ] {
            let err = decode(text, &opts).unwrap_err();
            assert_eq!(err.reason(), reason, "{text:?}: {err}");
            assert!(err.to_string().contains(says), "{text:?}: {err}");
        }
    }

    #[test]
    fn a_field_given_twice_keeps_the_last_value_and_trailing_spaces_are_ignored() {
        let r = decode("m v=1,v=2 1700000000000000000  ", &LineOptions::default()).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].value, 2.0);
    }
}
