//! `format = "senml"`: RFC 8428 SenML packs in their JSON representation.

use super::json::{json_kind, parse_json};
use super::reject::{Reject, snippet};
use super::time::ms_in_range;
use crate::model::Reading;
use serde_json::Value;
use std::collections::BTreeMap;

/// SenML (RFC 8428 section 4.5.3): resolved times below 2^28 seconds are relative to "now".
pub const SENML_RELATIVE_LIMIT: f64 = 268_435_456.0;

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
pub(super) fn decode_senml(
    text: &str,
    tags: &BTreeMap<String, String>,
    arrival_ms: i64,
    out: &mut Vec<Reading>,
) -> Result<(), Reject> {
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
            (arrival_ms as f64 + t * 1000.0).round()
        } else {
            (t * 1000.0).round()
        };
        let time_ms = ms_in_range(ms).ok_or_else(|| Reject::BadTimestamp {
            detail: format!("record {i}: resolved time {t} s is outside 1970-01-01..9999-12-31"),
        })?;
        out.push(Reading {
            metric: full_name,
            tags: tags.clone(),
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

    use crate::ingest::decode::testkit::*;

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
}
