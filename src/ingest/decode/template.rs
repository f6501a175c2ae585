//! Topic templates: which topics a subscription takes, and the metric and tags their
//! levels carry; and the configuration errors of a decoder.

use super::format::Format;
use std::collections::BTreeMap;
use std::fmt;

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
    /// A placeholder written `{}`, without a name.
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
        /// The whole level as written, so the operator can find it in the template.
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
        /// The whole level as written, so the operator can find it in the template.
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
        /// `value`, `timestamp`, `precision`, `template`, `rebirth` or `tag_names`.
        option: &'static str,
        /// The configured format.
        format: Format,
        /// Why it does not apply.
        why: &'static str,
    },
    /// `tag_names` of a Sparkplug B subscription that cannot name three distinct tags.
    #[error("tag_names: {0}")]
    BadTagNames(String),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::decode::testkit::*;

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

    proptest::proptest! {
        /// The same property as `fuzz/fuzz_targets/topic_template.rs`.
        #[test]
        fn any_template_text_is_parsed_or_refused_and_matching_never_panics(
            template in "[a-z{}+#/]{0,24}",
            topic in "[a-z0-9$/+#]{0,24}",
        ) {
            if let Ok(t) = Template::parse(&template) {
                let _ = t.matches(&topic);
                let _ = t.matches(&template);
            }
        }
    }
}
