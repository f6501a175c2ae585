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

/// Warnings about a configuration that works but exposes something: secret files others can
/// read, credentials or readings sent in clear beyond this machine. One line each, naming the
/// key and what to do; the daemon logs them at start and `check-config` prints them.
pub fn exposure_warnings(
    secrets: &[(&str, &Option<PathBuf>)],
    urls: &[(&str, &str)],
) -> Vec<String> {
    let mut w = Vec::new();
    for (key, f) in secrets {
        #[cfg(unix)]
        if let Some(f) = f
            && let Ok(m) = std::fs::metadata(f)
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = m.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                w.push(format!(
                    "{key} = {:?} is readable by other users (mode {mode:o}); chmod 600 it",
                    f.display().to_string()
                ));
            }
        }
        #[cfg(not(unix))]
        let _ = (key, f);
    }
    for (key, value) in urls {
        let Ok(u) = url::Url::parse(value) else {
            continue;
        };
        let plain = matches!(u.scheme(), "ws" | "mqtt");
        let loopback = match u.host() {
            Some(url::Host::Ipv4(a)) => a.is_loopback(),
            Some(url::Host::Ipv6(a)) => a.is_loopback(),
            // Non-special schemes (`mqtt://`) keep IP addresses as opaque host names.
            Some(url::Host::Domain(d)) => {
                d == "localhost"
                    || d.trim_matches(['[', ']'])
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|a| a.is_loopback())
            }
            None => true,
        };
        if plain && !loopback {
            w.push(format!(
                "{key} = {value:?} is not encrypted and leaves this machine: readings and \
                 credentials travel in clear; use {}s://",
                u.scheme()
            ));
        }
    }
    w
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
    fn secrets_readable_by_others_and_clear_text_beyond_loopback_are_warned_about() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("token");
        std::fs::write(&open, "t").unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
        let closed = dir.path().join("key");
        std::fs::write(&closed, "k").unwrap();
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o600)).unwrap();
        let w = exposure_warnings(
            &[("a.token_file", &Some(open)), ("a.key_file", &Some(closed))],
            &[
                ("mqtt.url", "mqtt://127.0.0.1:1883"),
                ("upstream.url", "ws://central.example:9443/"),
                ("other.url", "wss://central.example:9443/"),
                ("local.url", "ws://localhost:1/"),
            ],
        );
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].starts_with("a.token_file = ") && w[0].contains("mode 644"),
            "{w:?}"
        );
        assert!(
            w[1].starts_with("upstream.url = ") && w[1].contains("use wss://"),
            "{w:?}"
        );
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
