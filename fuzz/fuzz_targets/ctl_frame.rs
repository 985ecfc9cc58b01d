//! Decodes arbitrary bytes as control-socket frames, the way the fleet worker reads a client:
//! every input must give a request, "need more bytes" or an error — never a panic or an
//! allocation beyond the frame limit. Run: `cargo +nightly fuzz run ctl_frame` in `fuzz/`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::frame::Decoded;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    // Several frames back to back, as a stream delivers them.
    while let Ok(Decoded::Frame(_, used)) = protocol::ctl::decode_request(rest) {
        rest = &rest[used..];
    }
    let _ = protocol::frame::decode::<protocol::Hello>(data);
});
