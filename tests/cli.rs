//! The command line as a field engineer meets it: help, version, check-config.

use std::process::Command;

fn edgeferry(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_edgeferry"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_describes_each_subcommand_in_one_line() {
    let (code, out, _) = edgeferry(&["--help"]);
    assert_eq!(code, Some(0));
    for cmd in ["run", "check-config", "status", "dump-journal"] {
        assert!(out.contains(cmd), "{cmd} listed in:\n{out}");
    }
    let (code, out, _) = edgeferry(&["--version"]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("edgeferry "), "{out}");
}

#[test]
fn the_example_config_passes_check_config() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml.example");
    let (code, out, err) = edgeferry(&["check-config", "-c", example]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("OK"), "{out}");
    assert!(
        out.contains("[mqtt]") && out.contains("max_payload"),
        "effective config printed: {out}"
    );
}

#[test]
fn a_bad_config_lists_every_problem_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.toml");
    std::fs::write(
        &f,
        r#"
[gateway]
id = ""
data_dir = "/tmp/x"
[mqtt]
url = "http://broker:1883"
commit_intervall = "5ms"
[[mqtt.subscribe]]
filter = "sensors/#"
[process]
windows = ["10s", "25s"]
"#,
    )
    .unwrap();
    let (code, _, err) = edgeferry(&["check-config", "-c", f.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("unknown key `mqtt.commit_intervall` (did you mean `commit_interval`?)"),
        "{err}"
    );
    // Unknown keys are reported first; fixing them reveals the rest. Same file without it:
    std::fs::write(
        &f,
        std::fs::read_to_string(&f)
            .unwrap()
            .replace("commit_intervall = \"5ms\"\n", ""),
    )
    .unwrap();
    let (code, _, err) = edgeferry(&["check-config", "-c", f.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("gateway.id"), "{err}");
    assert!(err.contains("mqtt.url = \"http://broker:1883\""), "{err}");
    assert!(err.contains("10s does not divide 25s"), "{err}");
}

#[test]
fn a_missing_config_file_is_a_configuration_error() {
    let (code, _, err) = edgeferry(&["run", "-c", "/nonexistent/edgeferry.toml"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("cannot read /nonexistent/edgeferry.toml"),
        "{err}"
    );
}
