//! The processing checkpoint from arbitrary bytes (`edgeferry store verify` and start-up read
//! it): a summary or a reason it is damaged, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = edgeferry::process::inspect_checkpoint(data);
});
