//! Event times read from payloads: epoch seconds or milliseconds, or RFC 3339.

use super::json::json_kind;
use super::reject::{Reject, snippet};
use serde_json::Value;
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

/// Converts a JSON timestamp value to ms since the epoch.
///
/// Numbers: `|n| >= 1e11` are ms, else seconds (fractions allowed); rounded to the
/// nearest ms. Strings: RFC 3339 only (a numeric string is rejected, like numeric value
/// strings). Negative times and times after [`MAX_TIME_MS`] are rejected.
pub(super) fn parse_timestamp(v: &Value, path: &str) -> Result<i64, Reject> {
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
pub(super) fn ms_in_range(ms: f64) -> Option<i64> {
    // Both bounds are exactly representable in f64 (< 2^53), so the cast is exact.
    (0.0..=MAX_TIME_MS as f64)
        .contains(&ms)
        .then_some(ms as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::decode::testkit::*;

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
}
