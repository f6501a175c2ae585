//! `format = "number"`: a plain decimal number or a boolean.

use super::reject::{Reject, snippet};

/// Parses a `number` payload. Only plain decimal syntax is accepted (no hex, no digit
/// separators, no units) so that garbage is reported instead of half-parsed.
pub(super) fn parse_number(text: &str) -> Result<f64, Reject> {
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

#[cfg(test)]
mod tests {

    use crate::ingest::decode::testkit::*;

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
}
