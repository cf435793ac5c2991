//! Arbitrary bytes, split into arbitrary reads, through the frame decoder; every frame is
//! then opened as an rpc message the way the connection does. Must never panic, and memory
//! committed for a partial frame must stay within four times what arrived plus a constant.
#![no_main]

use capgate_runtime::fuzzing::{FrameDecoder, FrameLimits};
use capnp_rpc::rpc_capnp::message;
use libfuzzer_sys::fuzz_target;

const LIMITS: FrameLimits = FrameLimits {
    max_message_bytes: 1 << 20,
    max_segments: 64,
};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the read size, the rest is the stream.
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut decoder = FrameDecoder::new(LIMITS);
    let mut received = 0usize;
    for piece in stream.chunks(chunk) {
        let mut input = piece;
        while !input.is_empty() {
            let (used, frame) = match decoder.feed(input) {
                Ok(r) => r,
                Err(_) => return,
            };
            received += used;
            input = &input[used..];
            assert!(decoder.committed_bytes() <= 4 * received + 8 * 1024 + 4 * 64 + 8);
            if let Some(frame) = frame {
                received = 0;
                let options = capnp::message::ReaderOptions {
                    traversal_limit_in_words: Some(frame.size_in_words().max(64) * 8),
                    nesting_limit: 64,
                };
                let reader = frame.into_reader(options);
                if let Ok(m) = reader.get_root::<message::Reader>() {
                    let _ = m.which();
                    let _ = m.total_size();
                }
            }
        }
    }
});
