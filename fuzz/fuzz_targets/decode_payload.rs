//! Every payload decoder on arbitrary bytes: a reading or a reject, never a panic, and every
//! reading finite.
#![no_main]
use edgeferry::ingest::decode::{Decoder, Format};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let decoders = [
        Decoder::new(
            Some("s/{site}/{device}/{metric}"),
            Format::Json,
            Some("value"),
            Some("ts"),
        ),
        Decoder::new(Some("s/{site}/{device}/{metric}"), Format::Json, None, None),
        Decoder::new(None, Format::Json, Some("a.b.value"), Some("meta.time")),
        Decoder::new(
            Some("s/{site}/{device}/{metric}"),
            Format::Number,
            None,
            None,
        ),
        Decoder::new(Some("s/{site}/+/{metric}"), Format::Senml, None, None),
    ];
    let mut out = Vec::new();
    for d in decoders {
        let d = d.expect("a valid decoder");
        out.clear();
        if d.decode("s/a/d1/temperature", data, 1_700_000_000_000, &mut out)
            .is_ok()
        {
            assert!(!out.is_empty(), "accepted means at least one reading");
            assert!(out.iter().all(|r| r.value.is_finite()));
        } else {
            assert!(out.is_empty(), "a rejected message yields nothing");
        }
    }
});
