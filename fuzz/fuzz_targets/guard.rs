//! Arbitrary rpc message sequences through the guard, with a restrictive class: must never
//! panic, and its accounting must stay consistent (in flight <= open answers).
#![no_main]

use std::sync::Arc;

use capgate_policy::{ClientClass, Matcher, Quotas};
use capgate_runtime::fuzzing::{FrameDecoder, FrameLimits, Guard, Unlimited, Verdict};
use capgate_schema::Catalog;
use capnp_rpc::rpc_capnp::message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut q = Quotas::default();
    q.max_inflight_calls = 8;
    q.max_open_answers = 16;
    let class = ClientClass::new("fuzz", Matcher::Any)
        .allow("Store.namespace", Catalog::builtin())
        .and_then(|c| c.allow("Reader.*", Catalog::builtin()))
        .map(|c| c.with_quotas(q))
        .expect("valid allowlist");
    let mut guard = Guard::new(Arc::new(class), Arc::new(Unlimited), Catalog::builtin().clone());
    let mut decoder = FrameDecoder::new(FrameLimits {
        max_message_bytes: 1 << 16,
        max_segments: 16,
    });
    let mut input = data;
    while !input.is_empty() {
        let Ok((used, frame)) = decoder.feed(input) else {
            return;
        };
        input = &input[used..];
        let Some(frame) = frame else { continue };
        let reader = frame.into_reader(Default::default());
        let Ok(msg) = reader.get_root::<message::Reader>() else {
            continue;
        };
        // A Return in the stream stands for the server answering: feed it as outgoing (one
        // the guard refuses to let out is fine; only its accounting is checked).
        if let Ok(message::Return(_)) = msg.which() {
            let _ = guard.outgoing(msg);
        } else if let Verdict::Abort(_) = guard.incoming(msg) {
            return;
        }
        assert!(guard.in_flight_calls() <= guard.open_answers());
    }
});
