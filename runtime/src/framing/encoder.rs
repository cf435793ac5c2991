/// Bytes on the wire of a frame for these segments.
pub fn frame_len(segments: &[&[u8]]) -> usize {
    let words: usize = segments.iter().map(|s| s.len() / 8).sum();
    frame_len_for(segments.len(), words)
}

pub(super) fn frame_len_for(segments: usize, words: usize) -> usize {
    super::decoder::frame_len_u64(segments as u64, words as u64) as usize
}

/// Appends the frame for `segments` (each a whole number of words) to `out`.
pub fn encode_frame(out: &mut Vec<u8>, segments: &[&[u8]]) {
    out.reserve(frame_len(segments));
    encode_header(out, segments);
    for s in segments {
        out.extend_from_slice(s);
    }
}

/// Appends the segment table for `segments` to `out`.
pub fn encode_header(out: &mut Vec<u8>, segments: &[&[u8]]) {
    let n = segments.len();
    debug_assert!(n > 0, "a frame has at least one segment");
    out.extend_from_slice(&(n as u32).wrapping_sub(1).to_le_bytes());
    for s in segments {
        out.extend_from_slice(&((s.len() / 8) as u32).to_le_bytes());
    }
    if n % 2 == 0 {
        out.extend_from_slice(&[0; 4]);
    }
}
