//! JSON payloads: dotted field paths, picking fields in one pass, scalars.

use super::reject::{Reject, describe_path};
use super::template::TemplateError;
use serde_json::Value;
use std::fmt;

/// A parsed dotted JSON path (`a.b.c`). Keys containing dots cannot be addressed.
#[derive(Debug, Clone)]
pub(super) struct FieldPath {
    pub(super) text: String,
    pub(super) segments: Vec<String>,
}

impl FieldPath {
    pub(super) fn parse(option: &'static str, path: &str) -> Result<FieldPath, TemplateError> {
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

    pub(super) fn last(&self) -> &str {
        self.segments.last().map_or("", String::as_str)
    }

    /// The value at this path; `None` if a segment is missing or an intermediate value is
    /// not an object.
    pub(super) fn lookup<'a>(&self, root: &'a Value) -> Option<&'a Value> {
        self.segments
            .iter()
            .try_fold(root, |v, seg| v.as_object()?.get(seg))
    }
}

/// Parses JSON, mapping serde_json's "number out of range" (e.g. `1e400`, which would be
/// infinite as f64) to `not_finite` rather than `malformed_json`: the document is
/// well-formed, the value is just not representable.
pub(super) fn parse_json(text: &str) -> Result<Value, Reject> {
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
pub(super) fn pick_json(
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

pub(super) fn json_kind(v: &Value) -> &'static str {
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
pub(super) fn json_scalar(v: &Value, path: &str) -> Result<f64, Reject> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::decode::testkit::*;

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
}
