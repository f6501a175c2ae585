//! Topic templates from arbitrary text (a configuration value), matched against arbitrary
//! topics: parsed or refused with a reason, never a panic.
#![no_main]
use edgeferry::ingest::decode::Template;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (template, topic) = text.split_once('\n').unwrap_or((&text, "a/b/c"));
    if let Ok(t) = Template::parse(template) {
        let _ = t.matches(topic);
        let _ = t.matches(template);
    }
});
