//! Packaging: the systemd unit, the cross-compilation recipe and the release profile.
//!
//! These tests only read files and run `systemd-analyze` / `bash`; they build nothing for other
//! targets and download nothing. A tool that is not installed skips its test with a notice.

mod common;

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

/// Runs `prog` with `args`, panicking with its output unless it succeeds; returns stdout.
fn run_ok(prog: &str, args: &[&str]) -> String {
    let o = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    assert!(
        o.status.success(),
        "{prog} {args:?}: {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The `.deb` under test: `EDGEFERRY_TEST_DEB`, which scripts/test.sh sets after building the
/// package with cargo-deb (a release build: too slow to repeat inside every `cargo test`).
fn deb_under_test() -> Option<PathBuf> {
    let Some(path) = std::env::var_os("EDGEFERRY_TEST_DEB") else {
        eprintln!(
            "NOTICE: EDGEFERRY_TEST_DEB is not set; skipping the Debian package test \
             (scripts/test.sh builds the package with `cargo deb` and runs it)"
        );
        return None;
    };
    Some(PathBuf::from(path))
}

#[test]
fn the_debian_package_holds_the_daemon_unit_conffile_and_mosquitto_drop_in() {
    let Some(deb) = deb_under_test() else { return };
    let deb = deb.to_str().unwrap();
    let info = run_ok("dpkg-deb", &["--info", deb]);
    for field in [
        "Package: edgeferry",
        "Section: net",
        "Recommends: mosquitto",
        "Depends: libc6",
        "Architecture: ",
    ] {
        assert!(info.contains(field), "control lacks {field:?}:\n{info}");
    }
    // The Debian changelog (lintian requires one) names this version: it cannot rot silently.
    let version = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("Version: "))
        .expect("a Version field")
        .to_string();
    let changelog = read("packaging/debian/changelog");
    assert!(
        changelog.starts_with(&format!("edgeferry ({version})")),
        "packaging/debian/changelog must start with this version ({version}): add an entry"
    );
    let contents = run_ok("dpkg-deb", &["--contents", deb]);
    // The unit under /usr/lib/systemd/system, where cargo-deb and current Debian put units:
    // systemd reads both it and /lib/systemd/system, and on merged-/usr systems (every
    // Debian since 12) /lib is /usr/lib (docs/DECISIONS.md, "A Debian package").
    for path in [
        "./usr/bin/edgeferry",
        "./usr/lib/systemd/system/edgeferry.service",
        "./etc/edgeferry/config.toml",
        "./usr/share/doc/edgeferry/examples/mosquitto-edgeferry.conf",
        "./usr/share/doc/edgeferry/README.md",
        "./usr/share/doc/edgeferry/copyright",
        "./usr/share/doc/edgeferry/changelog.Debian.gz",
    ] {
        assert!(
            contents.contains(path),
            "the package lacks {path}:\n{contents}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control");
    run_ok("dpkg-deb", &["-e", deb, control.to_str().unwrap()]);
    assert_eq!(
        fs::read_to_string(control.join("conffiles"))
            .unwrap()
            .trim(),
        "/etc/edgeferry/config.toml",
        "the config is a conffile: an upgrade never overwrites the operator's edits"
    );
    // The unit and the example config shipped are the repository's own.
    let x = dir.path().join("x");
    run_ok("dpkg-deb", &["-x", deb, x.to_str().unwrap()]);
    assert_eq!(
        fs::read_to_string(x.join("usr/lib/systemd/system/edgeferry.service")).unwrap(),
        read("systemd/edgeferry.service")
    );
    assert_eq!(
        fs::read_to_string(x.join("etc/edgeferry/config.toml")).unwrap(),
        read("config.toml.example")
    );
    // The gateway-only build, which runs.
    let bin = x.join("usr/bin/edgeferry");
    let help = run_ok(bin.to_str().unwrap(), &["--help"]);
    assert!(
        !help.contains("collect"),
        "the package ships the gateway-only build:\n{help}"
    );
    // The Mosquitto drop-in is a configuration Mosquitto accepts, as it stands: the tests'
    // broker with it appended starts and stays up (else it panics with Mosquitto's log).
    let drop_in =
        fs::read_to_string(x.join("usr/share/doc/edgeferry/examples/mosquitto-edgeferry.conf"))
            .unwrap();
    drop(common::Mosquitto::start_with(&drop_in));
    if tool_available("lintian", "--version").is_some() {
        let o = Command::new("lintian")
            .args(["--fail-on", "error", deb])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "lintian: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    } else {
        eprintln!("NOTICE: lintian not installed; the package is not linted");
    }
}

/// Unpacks the package into a throwaway root with dpkg, then runs its postinst as dpkg would on
/// configure, with stand-ins for systemd's helpers that record their calls and, in a mount
/// namespace of its own, a `/run/systemd/system` so the script believes systemd runs.
#[test]
fn the_debian_package_unpacks_and_its_postinst_starts_only_a_config_that_checks() {
    let Some(deb) = deb_under_test() else { return };
    let deb = deb.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    for d in [
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/lib/dpkg/triggers",
    ] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    let root_s = root.to_str().unwrap();
    run_ok(
        "dpkg",
        &[
            "--root",
            root_s,
            "--force-depends",
            "--force-not-root",
            "--unpack",
            deb,
        ],
    );
    assert!(root.join("usr/bin/edgeferry").exists());
    let status = fs::read_to_string(root.join("var/lib/dpkg/status")).unwrap();
    assert!(
        status.contains("Package: edgeferry") && status.contains("/etc/edgeferry/config.toml"),
        "dpkg records the package and its conffile:\n{status}"
    );

    // Stand-ins on PATH: edgeferry runs the unpacked binary's check-config on a config of the
    // test's choice; the systemd helpers log their arguments.
    let bin = dir.path().join("bin");
    fs::create_dir(&bin).unwrap();
    let log = dir.path().join("calls.log");
    let config = dir.path().join("config.toml");
    let stand_in = |name: &str, body: String| {
        let p = bin.join(name);
        fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        run_ok("chmod", &["755", p.to_str().unwrap()]);
    };
    stand_in(
        "edgeferry",
        format!(
            "echo \"edgeferry $*\" >> {log}\nexec {} check-config -c {}",
            root.join("usr/bin/edgeferry").display(),
            config.display(),
            log = log.display()
        ),
    );
    for helper in ["deb-systemd-helper", "deb-systemd-invoke", "systemctl"] {
        stand_in(helper, format!("echo \"{helper} $*\" >> {}", log.display()));
    }
    let postinst = root.join("var/lib/dpkg/info/edgeferry.postinst");
    assert!(postinst.exists(), "dpkg keeps the postinst for configure");
    let path = format!("{}:/usr/bin:/bin:/usr/sbin:/sbin", bin.display());
    let configure = |old_version: &str| -> (bool, String, String) {
        let _ = fs::remove_file(&log);
        let script = format!(
            "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/system && \
             sh {} configure {old_version}",
            postinst.display()
        );
        let o = Command::new("unshare")
            .args(["--mount", "sh", "-c", &script])
            .env("PATH", &path)
            .output()
            .unwrap();
        (
            o.status.success(),
            fs::read_to_string(&log).unwrap_or_default(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };

    // A config that passes: enabled and started on a first install, try-restarted on upgrade.
    fs::copy(repo_file("config.toml.example"), &config).unwrap();
    let (ok, calls, stderr) = configure("");
    if !ok && stderr.contains("unshare") {
        eprintln!("NOTICE: no mount namespace here ({stderr}); skipping the postinst run");
        return;
    }
    assert!(ok, "postinst failed: {stderr}");
    assert!(
        calls.contains("deb-systemd-helper enable edgeferry.service"),
        "{calls}"
    );
    assert!(
        calls.contains("deb-systemd-invoke start edgeferry.service"),
        "{calls}"
    );
    let (ok, calls, _) = configure("0.0.9-1");
    assert!(ok);
    assert!(
        calls.contains("deb-systemd-invoke try-restart edgeferry.service"),
        "{calls}"
    );
    assert!(!calls.contains("invoke start"), "{calls}");

    // A config that does not pass: enabled, not started, and the operator told what to do.
    fs::write(&config, "[gateway]\nid = \"x\"\nbogus = 1\n").unwrap();
    let (ok, calls, stderr) = configure("");
    assert!(ok, "a bad config does not fail the installation: {stderr}");
    assert!(
        calls.contains("deb-systemd-helper enable edgeferry.service"),
        "{calls}"
    );
    assert!(
        !calls.contains("deb-systemd-invoke"),
        "not started: {calls}"
    );
    assert!(stderr.contains("unknown key `gateway.bogus`"), "{stderr}");
    assert!(
        stderr.contains("does not pass check-config")
            && stderr.contains("systemctl restart edgeferry"),
        "{stderr}"
    );
}
