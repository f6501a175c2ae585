//! The configuration loader on arbitrary text: a configuration or a list of problems, never a
//! panic (and every problem names something).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Err(problems) =
        edgeferry::config::Config::from_toml_with_env(&text, Vec::<(String, String)>::new())
    {
        assert!(!problems.is_empty());
        assert!(problems.iter().all(|p| !p.trim().is_empty()));
    }
});
