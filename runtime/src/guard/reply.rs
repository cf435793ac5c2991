//! The messages the guard writes itself, encoded once into a right-sized buffer: what the
//! outbox holds for them is what is charged for them (see `core/outbox.rs`), not a
//! message builder's default 8 KiB first segment per reply.

use capnp::message::{Builder, HeapAllocator};
use capnp_rpc::rpc_capnp::{exception, message};

use crate::framing::encode_frame;

/// Words enough for a `Release` (root pointer, message, release).
const RELEASE_WORDS: u32 = 8;

/// Appends a `Return{answer_id, exception, releaseParamCaps: false}` frame to `out`.
pub(super) fn push_return_exception(
    out: &mut Vec<u8>,
    answer_id: u32,
    kind: exception::Type,
    reason: &str,
) {
    // Root, message, return, exception and the reason's text, rounded up.
    let words = 16 + (reason.len() as u32).div_ceil(8) + 1;
    let mut m = Builder::new(HeapAllocator::new().first_segment_words(words));
    {
        let mut ret = m.init_root::<message::Builder>().init_return();
        ret.set_answer_id(answer_id);
        ret.set_release_param_caps(false);
        let mut e = ret.init_exception();
        e.set_type(kind);
        e.set_reason(reason);
    }
    encode_frame(out, &m.get_segments_for_output());
}

/// Appends one `Release{id, count}` frame per distinct id of `ids` (sorted here), `count`
/// being how often the id occurs: one message per capability the peer holds a reference
/// to, however many times a cap table names it.
pub(super) fn push_releases(out: &mut Vec<u8>, ids: &mut [u32]) {
    if ids.is_empty() {
        return;
    }
    ids.sort_unstable();
    let mut m = Builder::new(HeapAllocator::new().first_segment_words(RELEASE_WORDS));
    m.init_root::<message::Builder>().init_release();
    let mut i = 0;
    while i < ids.len() {
        let id = ids[i];
        let run = ids[i..].iter().take_while(|&&x| x == id).count();
        i += run;
        // The one builder is rewritten in place for every id: no allocation per Release.
        if let Ok(root) = m.get_root::<message::Builder>() {
            if let Ok(message::WhichBuilder::Release(Ok(mut r))) = root.which() {
                r.set_id(id);
                r.set_reference_count(u32::try_from(run).unwrap_or(u32::MAX));
            }
        }
        encode_frame(out, &m.get_segments_for_output());
    }
}
