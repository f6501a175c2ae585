//! Packaging: the systemd unit, the cross-compilation recipe and the release profile.
//!
//! These tests only read files and run `systemd-analyze` / `bash`; they build nothing for other
//! targets and download nothing. A tool that is not installed skips its test with a notice.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    let p = repo_file(rel);
    fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

/// One `Key=Value` assignment of a unit file, with its section.
#[derive(Debug)]
struct Directive {
    section: String,
    key: String,
    value: String,
}

/// Parses systemd unit syntax: `[Section]` headers, `#`/`;` comments, `\` line continuations.
fn parse_unit(text: &str) -> Vec<Directive> {
    let mut out = Vec::new();
    let mut section = String::new();
    let mut pending = String::new();
    for raw in text.lines() {
        let line = raw.trim();
        if pending.is_empty() && (line.is_empty() || line.starts_with('#') || line.starts_with(';'))
        {
            continue;
        }
        if let Some(cont) = line.strip_suffix('\\') {
            pending.push_str(cont);
            pending.push(' ');
            continue;
        }
        let full = format!("{pending}{line}");
        pending.clear();
        if full.starts_with('[') && full.ends_with(']') {
            section = full[1..full.len() - 1].to_string();
            continue;
        }
        let (k, v) = full
            .split_once('=')
            .unwrap_or_else(|| panic!("unit line is not Key=Value: {full:?}"));
        out.push(Directive {
            section: section.clone(),
            key: k.trim().to_string(),
            value: v.trim().to_string(),
        });
    }
    assert!(pending.is_empty(), "unit ends inside a line continuation");
    out
}

/// Values of `key` in `section`, in order (systemd keys may repeat).
fn values<'a>(unit: &'a [Directive], section: &str, key: &str) -> Vec<&'a str> {
    unit.iter()
        .filter(|d| d.section == section && d.key == key)
        .map(|d| d.value.as_str())
        .collect()
}

/// The single effective value of `key` (the last assignment wins, as in systemd).
fn value<'a>(unit: &'a [Directive], section: &str, key: &str) -> &'a str {
    values(unit, section, key)
        .last()
        .copied()
        .unwrap_or_else(|| panic!("[{section}] {key}= is missing from edgeferry.service"))
}

/// Is `prog` runnable? `None` means "not installed" (the caller skips).
fn tool_available(prog: &str, arg: &str) -> Option<String> {
    match Command::new(prog).arg(arg).output() {
        Ok(o) => Some(String::from_utf8_lossy(&o.stdout).into_owned()),
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(e) => panic!("cannot run {prog}: {e}"),
    }
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let Some(help) = tool_available("systemd-analyze", "--help") else {
        eprintln!("NOTICE: systemd-analyze not installed; skipping the unit verification");
        return;
    };

    // The unit names /usr/bin/edgeferry and /etc/edgeferry/config.toml, which do not exist on
    // a build machine, and `verify` checks that ExecStart= binaries exist. Verify a copy that
    // points at the binary under test and a copy of the example config instead.
    let bin = env!("CARGO_BIN_EXE_edgeferry");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    fs::copy(repo_file("config.toml.example"), &config).expect("copy config.toml.example");
    for p in [Path::new(bin), config.as_path()] {
        assert!(
            !p.to_string_lossy().contains(char::is_whitespace),
            "path with whitespace cannot be substituted into Exec lines unquoted: {}",
            p.display()
        );
    }

    let original = read("systemd/edgeferry.service");
    let unit_text = original
        .replace("/usr/bin/edgeferry", bin)
        .replace("/etc/edgeferry/config.toml", &config.to_string_lossy());
    let unit = parse_unit(&unit_text);
    for key in ["ExecStart", "ExecStartPre"] {
        for v in values(&unit, "Service", key) {
            assert!(
                v.contains(bin),
                "{key}= was not redirected to the test binary: {v}"
            );
        }
    }
    // The file name is the unit name: keep it `edgeferry.service`.
    let unit_path = dir.path().join("edgeferry.service");
    fs::write(&unit_path, &unit_text).expect("write unit copy");

    let mut cmd = Command::new("systemd-analyze");
    cmd.arg("verify").arg("--man=no");
    if help.contains("--recursive-errors") {
        // systemd >= 250: judge this unit only, not whatever else is installed on the host.
        cmd.arg("--recursive-errors=one");
    }
    let out = cmd
        .arg(&unit_path)
        .output()
        .expect("run systemd-analyze verify");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "systemd-analyze verify: {} ; output:\n{}",
        out.status,
        if text.trim().is_empty() {
            "(none)"
        } else {
            &text
        }
    );

    // Messages about other units installed on this host are not ours. Everything about this
    // unit names it or its file, e.g. "/tmp/.../edgeferry.service:12: Unknown key 'X' in
    // section [Service], ignoring." (exit status 0!) or "edgeferry.service: Command ... is not
    // executable".
    let dir_str = dir.path().to_string_lossy().into_owned();
    let ours: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("edgeferry") || l.contains(&dir_str))
        .collect();
    assert!(
        ours.is_empty(),
        "systemd-analyze verify reported problems with edgeferry.service:\n{}",
        ours.join("\n")
    );
    assert!(
        out.status.success(),
        "systemd-analyze verify failed: {}\n{text}",
        out.status
    );
}

#[test]
fn systemd_unit_has_the_required_directives() {
    let unit = parse_unit(&read("systemd/edgeferry.service"));
    let svc = |k: &str| value(&unit, "Service", k);

    assert_eq!(svc("Type"), "notify");
    assert_eq!(svc("NotifyAccess"), "main");
    assert!(!svc("WatchdogSec").is_empty(), "WatchdogSec= must be set");
    assert_eq!(svc("Restart"), "on-failure");
    assert_eq!(
        svc("RestartPreventExitStatus"),
        "1",
        "config errors (exit 1) must not restart"
    );
    assert_eq!(svc("StateDirectory"), "edgeferry");
    assert_eq!(svc("ConfigurationDirectory"), "edgeferry");
    assert_eq!(svc("DynamicUser"), "yes");
    assert_eq!(svc("ProtectSystem"), "strict");
    assert_eq!(svc("ProtectHome"), "yes");
    assert_eq!(svc("NoNewPrivileges"), "yes");
    assert_eq!(svc("PrivateTmp"), "yes");
    assert_eq!(svc("RestrictAddressFamilies"), "AF_INET AF_INET6 AF_UNIX");
    assert_eq!(svc("CapabilityBoundingSet"), "", "no capabilities at all");
    assert!(!svc("MemoryMax").is_empty(), "MemoryMax= must be set");
    assert_eq!(svc("KillSignal"), "SIGTERM");

    // The stop timeout must exceed edgeferry's internal 20 s shutdown deadline.
    let stop = svc("TimeoutStopSec");
    let secs: u64 = stop
        .strip_suffix('s')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("TimeoutStopSec={stop}: expected whole seconds like 30s"));
    assert!(
        secs > 20,
        "TimeoutStopSec={stop} must exceed the 20 s internal deadline"
    );

    // The daemon runs in the foreground with the packaged paths.
    assert_eq!(
        svc("ExecStart"),
        "/usr/bin/edgeferry run -c /etc/edgeferry/config.toml"
    );
    assert!(
        svc("ExecStartPre")
            .ends_with("/usr/bin/edgeferry check-config -c /etc/edgeferry/config.toml"),
        "ExecStartPre= must validate the config"
    );
    // RUST_LOG would override the config's [log] level: the unit must not set it.
    assert!(
        values(&unit, "Service", "Environment")
            .iter()
            .all(|v| !v.contains("RUST_LOG")),
        "the unit must not set RUST_LOG"
    );

    // The broker is an ordering dependency only: edgeferry reconnects by itself.
    assert!(
        values(&unit, "Unit", "After")
            .iter()
            .any(|v| v.contains("mosquitto.service"))
    );
    assert!(
        values(&unit, "Unit", "After")
            .iter()
            .any(|v| v.contains("network-online.target"))
    );
    assert!(
        values(&unit, "Unit", "Requires")
            .iter()
            .chain(&values(&unit, "Unit", "BindsTo"))
            .all(|v| !v.contains("mosquitto") && !v.contains("network-online")),
        "hard dependencies would stop edgeferry when the broker or network goes away"
    );
    assert_eq!(value(&unit, "Install", "WantedBy"), "multi-user.target");
}

#[test]
fn cross_build_script_is_valid_bash() {
    let script = repo_file("cross/build.sh");
    if tool_available("bash", "--version").is_none() {
        eprintln!("NOTICE: bash not installed; skipping the syntax check of cross/build.sh");
        return;
    }
    let out = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .expect("run bash -n");
    assert!(
        out.status.success(),
        "bash -n cross/build.sh: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );

    let text = read("cross/build.sh");
    assert!(
        text.starts_with("#!/usr/bin/env bash\n"),
        "needs a bash shebang"
    );
    assert!(
        text.contains("set -euo pipefail"),
        "must stop on the first error"
    );
    assert!(
        text.contains("CROSS_CONFIG="),
        "must point cross at cross/Cross.toml"
    );
    assert!(
        text.contains("features=(--no-default-features)")
            && text.matches("\"${features[@]}\"").count() == 2,
        "both builders must build the gateway-only set by default"
    );
    let manifest = read("Cargo.toml");
    assert!(
        manifest.contains("default = [\"central\", \"embedded-broker\"]"),
        "the features the recipe leaves out must exist"
    );
    for target in [
        "aarch64-unknown-linux-musl",
        "armv7-unknown-linux-musleabihf",
    ] {
        assert!(text.contains(target), "build.sh should default to {target}");
    }

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&script)
            .expect("stat build.sh")
            .permissions()
            .mode();
        assert!(
            mode & 0o111 != 0,
            "cross/build.sh must be executable (mode {mode:o})"
        );
    }

    // --help works without cross, Docker or any target installed.
    let out = Command::new("bash")
        .arg(&script)
        .arg("--help")
        .output()
        .expect("run build.sh");
    assert!(out.status.success(), "build.sh --help: {}", out.status);
    assert!(String::from_utf8_lossy(&out.stdout).contains("usage:"));
}

#[test]
fn cross_config_names_both_release_targets() {
    let text = read("cross/Cross.toml");
    for target in [
        "aarch64-unknown-linux-musl",
        "armv7-unknown-linux-musleabihf",
    ] {
        assert!(
            text.lines()
                .any(|l| l.trim() == format!("[target.{target}]")),
            "cross/Cross.toml has no [target.{target}] table"
        );
    }
}

#[test]
fn release_profile_is_tuned_for_size() {
    // Minimal reading of Cargo.toml: the key = value lines of [profile.release].
    let manifest = read("Cargo.toml");
    let mut in_release = false;
    let mut profile = Vec::new();
    for line in manifest.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.starts_with('[') {
            in_release = line == "[profile.release]";
            continue;
        }
        if in_release && let Some((k, v)) = line.split_once('=') {
            profile.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let get = |key: &str| -> &str {
        profile
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("[profile.release] {key} is not set in Cargo.toml"))
    };

    assert!(
        matches!(get("lto"), "\"fat\"" | "true"),
        "lto should be fat, got {}",
        get("lto")
    );
    assert_eq!(get("codegen-units"), "1");
    assert!(
        matches!(get("strip"), "true" | "\"symbols\""),
        "strip should remove symbols, got {}",
        get("strip")
    );
    // Also required for correctness of the design: a panic is just another crash, which the
    // journal and checkpoints survive; no unwinding tables on the gateways.
    assert_eq!(get("panic"), "\"abort\"");
}
