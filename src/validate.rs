//! The collector of configuration problems every section's `validate` writes into, and the
//! checks several sections share (URLs, readable files, certificate/key pairs).
//!
//! Each problem is one line that names the key, the value and what is expected instead, because
//! it is read by whoever edits the file; all of them are reported at once, so a field engineer
//! fixes a configuration in one round instead of one error per restart.

use std::path::PathBuf;

/// Problems found so far, in the order the keys appear.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Problems(Vec<String>);

impl Problems {
    /// No problems yet.
    pub fn new() -> Problems {
        Problems::default()
    }

    /// Records one problem: one line naming the key, the value and what is expected instead.
    pub fn push(&mut self, problem: impl Into<String>) {
        self.0.push(problem.into());
    }

    /// Whether nothing was found.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The problems, one line each.
    pub fn into_vec(self) -> Vec<String> {
        self.0
    }

    /// `key = value` must be a URL with one of `schemes` and a host.
    pub fn url(&mut self, key: &str, value: &str, schemes: &[&str]) {
        match url::Url::parse(value) {
            Ok(u) if schemes.contains(&u.scheme()) => {
                if u.host_str().is_none_or(str::is_empty) {
                    self.push(format!("{key} = {value:?}: expected a host name"));
                }
            }
            Ok(u) => self.push(format!(
                "{key} = {value:?}: scheme {:?} is not supported; expected one of {}",
                u.scheme(),
                schemes
                    .iter()
                    .map(|s| format!("{s}://"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            Err(e) => self.push(format!(
                "{key} = {value:?}: {e}; expected a URL such as \"{}://host:port\"",
                schemes[0]
            )),
        }
    }

    /// Every `(key, file)` that is set must name a file that can be opened now: a typo found
    /// at start-up beats a TLS error at the first reconnect.
    pub fn readable_files(&mut self, files: &[(&str, &Option<PathBuf>)]) {
        for (key, f) in files {
            if let Some(f) = f
                && let Err(e) = std::fs::File::open(f)
            {
                self.push(format!(
                    "{key} = {:?}: cannot open: {e}; expected a readable file",
                    f.display().to_string()
                ));
            }
        }
    }

    /// `<section>.cert_file` and `<section>.key_file`: both (mutual TLS) or neither.
    pub fn cert_key_pair(&mut self, section: &str, cert: &Option<PathBuf>, key: &Option<PathBuf>) {
        if cert.is_some() != key.is_some() {
            self.push(format!(
                "{section}.cert_file and {section}.key_file: expected both (mutual TLS) or neither"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(value: &str) -> Vec<String> {
        let mut p = Problems::new();
        p.url("x.url", value, &["mqtt", "mqtts"]);
        p.into_vec()
    }

    #[test]
    fn urls_need_a_known_scheme_and_a_host() {
        assert!(url("mqtt://broker:1883").is_empty());
        assert_eq!(
            url("http://broker"),
            [
                "x.url = \"http://broker\": scheme \"http\" is not supported; expected one of mqtt://, mqtts://"
            ]
        );
        assert_eq!(
            url("mqtt://"),
            ["x.url = \"mqtt://\": expected a host name"]
        );
        assert!(url("broker:1883 ").len() == 1);
    }

    #[test]
    fn files_are_opened_and_pairs_are_complete() {
        let mut p = Problems::new();
        let missing = Some(PathBuf::from("/nonexistent/edgeferry/ca.pem"));
        let present = Some(PathBuf::from("/proc/self/status"));
        p.readable_files(&[
            ("a.ca_file", &missing),
            ("a.cert_file", &present),
            ("a.key_file", &None),
        ]);
        p.cert_key_pair("a", &present, &None);
        let v = p.into_vec();
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(v[0].starts_with("a.ca_file = \"/nonexistent/edgeferry/ca.pem\": cannot open"));
        assert_eq!(
            v[1],
            "a.cert_file and a.key_file: expected both (mutual TLS) or neither"
        );
    }
}
