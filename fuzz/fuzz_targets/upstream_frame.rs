//! The upstream frame decoder, as both sides run it: the gateway decodes what the central
//! side sends, the collector decodes frames, applies dictionaries and unpacks batches.
#![no_main]
use edgeferry::protocol::{self, DictDecoder, Frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut dict = DictDecoder::new();
    // One input may hold several frames, split at 0xFF 0xFE (arbitrary but fixed).
    for part in data.split(|&b| b == 0xfe) {
        match protocol::decode(part, protocol::DEFAULT_MAX_FRAME) {
            Ok(Frame::Dict(d)) => {
                let _ = dict.apply(&d);
            }
            Ok(Frame::Batch(b)) => {
                let _ = dict.decode_batch(&b);
            }
            Ok(_) | Err(_) => {}
        }
    }
    let _ = protocol::packed::decode(data, 1_700_000_000_000);
});
