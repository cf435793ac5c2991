use capnp::Word;

use super::frame::{take_recycled, Ends, Frame, RECYCLE_MIN_BYTES};
use crate::limits::fmt_bytes;

/// Limits the decoder checks before it allocates anything for a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameLimits {
    /// Largest frame (segment table included), in bytes.
    pub max_message_bytes: usize,
    /// Most segments one frame may have.
    pub max_segments: u32,
}

/// Why a frame was refused. The `Display` text is what the peer receives in the `Abort`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The segment count field is 0xFFFFFFFF, which would wrap to zero segments.
    #[error(
        "frame rejected: segment count field 0xFFFFFFFF is invalid (the count would overflow)"
    )]
    SegmentCountOverflow,
    /// More segments than `max_segments`.
    #[error(
        "frame rejected: {count} segments exceed max_segments = {limit}; \
         send fewer, larger segments or raise max_segments"
    )]
    TooManySegments {
        /// Segments the frame claims.
        count: u64,
        /// The configured limit.
        limit: u32,
    },
    /// The frame claims more bytes than `max_message_bytes`.
    #[error(
        "frame rejected: message of {} exceeds max_message_bytes = {}; \
         send smaller messages or raise max_message_bytes",
        fmt_bytes(*claimed), fmt_bytes(*limit as u64)
    )]
    TooLarge {
        /// Bytes the segment table claims (table included).
        claimed: u64,
        /// The configured limit.
        limit: usize,
    },
    /// A frame whose segments are all empty: it cannot hold a root pointer.
    #[error("frame rejected: message has no content (all segments are empty)")]
    Empty,
}

/// Body buffers grow in steps of at least this many bytes, and to at most [`GROWTH_FACTOR`]
/// times what has arrived so far: a frame that claims megabytes commits memory only as its
/// bytes arrive.
const GROWTH_STEP_BYTES: usize = 8 * 1024;
/// The body buffer grows to at most this many times what was received (plus the first step):
/// 4 rather than 2 means a large frame's body is copied about a third of its size while it
/// grows instead of about its whole size, and a peer still commits memory only in proportion
/// to the bytes it actually sent.
const GROWTH_FACTOR: usize = 4;

enum State {
    /// Reading the first four bytes: segment count minus one.
    Count { raw: [u8; 4], have: u8 },
    /// Reading the segment sizes (and the padding word half when the count is even).
    Table {
        count: u32,
        ends: Ends,
        raw: [u8; 4],
        have: u8,
        total_words: u64,
    },
    /// Reading the segments.
    Body {
        ends: Ends,
        words: Vec<Word>,
        filled: usize,
        total: usize,
    },
}

/// Incremental, allocation-bounded Cap'n Proto frame decoder.
///
/// Feed it bytes as they arrive; it returns a [`Frame`] once one is complete. The segment
/// count and the total size are checked against [`FrameLimits`] as soon as they are known,
/// before any buffer for the body exists, and the body buffer then grows only as body bytes
/// arrive (to at most four times what was received, the first step 8 KiB). Memory committed
/// for a frame in progress is therefore at most `4 * received + 8 KiB + 4 * max_segments`.
///
/// One exception saves copying large bodies as they grow: a body of 64 KiB or more starts in a
/// buffer that an earlier frame gave back with [`Frame::recycle`] on the same thread, if there
/// is one. That memory was committed by traffic that really arrived; a thread keeps at most
/// 8 MiB of it, so however many peers claim large frames, reuse adds at most that much.
pub struct FrameDecoder {
    limits: FrameLimits,
    state: State,
}

impl FrameDecoder {
    /// A decoder enforcing `limits`.
    pub fn new(limits: FrameLimits) -> Self {
        Self {
            limits,
            state: State::Count {
                raw: [0; 4],
                have: 0,
            },
        }
    }

    /// The limits this decoder enforces.
    pub fn limits(&self) -> FrameLimits {
        self.limits
    }

    /// Replaces the limits; they apply from the next frame on.
    pub fn set_limits(&mut self, limits: FrameLimits) {
        self.limits = limits;
    }

    /// True while a frame has started (at least one byte of it arrived) but is not complete.
    pub fn in_frame(&self) -> bool {
        !matches!(self.state, State::Count { have: 0, .. })
    }

    /// Bytes of the current frame's body committed in memory (for tests and accounting).
    pub fn committed_bytes(&self) -> usize {
        match &self.state {
            State::Count { .. } => 0,
            State::Table { ends, .. } => ends.heap_bytes(),
            State::Body { ends, words, .. } => ends.heap_bytes() + words.capacity() * 8,
        }
    }

    /// Bytes of the current frame received so far (segment table included).
    pub fn received_bytes(&self) -> usize {
        match &self.state {
            State::Count { have, .. } => *have as usize,
            State::Table { ends, have, .. } => 4 + 4 * ends.len() + *have as usize,
            State::Body { ends, filled, .. } => {
                frame_len_u64(ends.len() as u64, 0) as usize + *filled
            }
        }
    }

    /// Consumes bytes from `input`. Returns how many were consumed and, if a frame completed,
    /// the frame. Call again with the rest of the input: one call yields at most one frame.
    pub fn feed(&mut self, input: &[u8]) -> Result<(usize, Option<Frame>), FrameError> {
        if let State::Count { have: 0, .. } = self.state {
            if let Some((used, frame)) = self.whole_single_segment(input) {
                return Ok((used, Some(frame)));
            }
        }
        let mut used = 0;
        loop {
            match &mut self.state {
                State::Count { raw, have } => {
                    let n = take_into(raw, have, &input[used..]);
                    used += n;
                    if (*have as usize) < 4 {
                        return Ok((used, None));
                    }
                    let field = u32::from_le_bytes(*raw);
                    let count = u64::from(field) + 1;
                    if field == u32::MAX {
                        return Err(FrameError::SegmentCountOverflow);
                    }
                    if count > u64::from(self.limits.max_segments) {
                        return Err(FrameError::TooManySegments {
                            count,
                            limit: self.limits.max_segments,
                        });
                    }
                    // count <= max_segments: this allocation is bounded by configuration.
                    self.state = State::Table {
                        count: count as u32,
                        ends: Ends::with_capacity(count as usize),
                        raw: [0; 4],
                        have: 0,
                        total_words: 0,
                    };
                }
                State::Table {
                    count,
                    ends,
                    raw,
                    have,
                    total_words,
                } => {
                    let n = take_into(raw, have, &input[used..]);
                    used += n;
                    if (*have as usize) < 4 {
                        return Ok((used, None));
                    }
                    *have = 0;
                    if ends.len() < *count as usize {
                        let size = u32::from_le_bytes(*raw);
                        *total_words += u64::from(size);
                        let claimed = frame_len_u64(u64::from(*count), *total_words);
                        if claimed > self.limits.max_message_bytes as u64 {
                            return Err(FrameError::TooLarge {
                                claimed,
                                limit: self.limits.max_message_bytes,
                            });
                        }
                        // Fits in u32: max_message_bytes (a usize of bytes) bounds it.
                        ends.push(*total_words as u32);
                        // An even count leaves a half word of padding to consume first.
                        if ends.len() < *count as usize || *count % 2 == 0 {
                            continue;
                        }
                    }
                    if *total_words == 0 {
                        return Err(FrameError::Empty);
                    }
                    self.start_body();
                }
                State::Body {
                    words,
                    filled,
                    total,
                    ..
                } => {
                    let rest = &input[used..];
                    if rest.is_empty() {
                        return Ok((used, None));
                    }
                    if *filled == 0 && words.capacity() == 0 && rest.len() >= *total {
                        // The whole body has arrived (nearly every small frame): copy it into
                        // a buffer of its exact size, without zero-filling it first.
                        *words = words_of(&rest[..*total]);
                        used += *total;
                        return Ok((used, Some(self.take_frame())));
                    }
                    let want = (*total - *filled).min(rest.len());
                    grow(words, *filled, want, *total);
                    let dst = &mut Word::words_to_bytes_mut(words)[*filled..*filled + want];
                    dst.copy_from_slice(&rest[..want]);
                    *filled += want;
                    used += want;
                    if *filled == *total {
                        return Ok((used, Some(self.take_frame())));
                    }
                    return Ok((used, None));
                }
            }
        }
    }

    /// Fast path for the common case, a one-segment frame wholly in `input`: the frame,
    /// decoded in one step, and the bytes it took. Anything else (several segments, a frame
    /// cut short, a frame over the limits) is left to the general path, which also gives the
    /// errors.
    fn whole_single_segment(&self, input: &[u8]) -> Option<(usize, Frame)> {
        let header = input.get(..8)?;
        if header[..4] != [0; 4] || self.limits.max_segments == 0 {
            return None;
        }
        let words = u32::from_le_bytes(header[4..].try_into().ok()?);
        if words == 0 || frame_len_u64(1, u64::from(words)) > self.limits.max_message_bytes as u64 {
            return None;
        }
        let body = input.get(8..8 + words as usize * 8)?;
        let frame = Frame {
            words: words_of(body),
            ends: Ends {
                first: Some(words),
                rest: Vec::new(),
            },
        };
        Some((8 + body.len(), frame))
    }

    /// While a frame body is being received and at least `min_bytes` of it are missing,
    /// returns a slice of the body buffer to read into directly (skipping a copy), grown by
    /// the same rule as [`FrameDecoder::feed`]. Report the bytes written with
    /// [`FrameDecoder::advance_body`].
    pub fn body_spare(&mut self, min_bytes: usize) -> Option<&mut [u8]> {
        let State::Body {
            words,
            filled,
            total,
            ..
        } = &mut self.state
        else {
            return None;
        };
        let missing = *total - *filled;
        if missing < min_bytes {
            return None;
        }
        let step = missing.min(((GROWTH_FACTOR - 1) * *filled).max(GROWTH_STEP_BYTES));
        grow(words, *filled, step, *total);
        let end = (words.len() * 8).min(*total);
        Some(&mut Word::words_to_bytes_mut(words)[*filled..end])
    }

    /// Records `n` bytes written into the slice from [`FrameDecoder::body_spare`]. Returns the
    /// frame if it is now complete.
    pub fn advance_body(&mut self, n: usize) -> Option<Frame> {
        let State::Body { filled, total, .. } = &mut self.state else {
            return None;
        };
        *filled = (*filled + n).min(*total);
        if *filled == *total {
            Some(self.take_frame())
        } else {
            None
        }
    }

    fn start_body(&mut self) {
        let State::Table { ends, .. } = std::mem::replace(
            &mut self.state,
            State::Count {
                raw: [0; 4],
                have: 0,
            },
        ) else {
            unreachable!("start_body outside the table state")
        };
        let total = ends.last().unwrap_or(0) as usize * 8;
        let words = if total >= RECYCLE_MIN_BYTES {
            let mut w = take_recycled(total);
            w.truncate(total / 8);
            w
        } else {
            Vec::new()
        };
        self.state = State::Body {
            ends,
            words,
            filled: 0,
            total,
        };
    }

    fn take_frame(&mut self) -> Frame {
        let State::Body { ends, words, .. } = std::mem::replace(
            &mut self.state,
            State::Count {
                raw: [0; 4],
                have: 0,
            },
        ) else {
            unreachable!("take_frame outside the body state")
        };
        Frame { words, ends }
    }
}

/// `bytes` (a whole number of words) as words, in a buffer of exactly that size: copied once,
/// not zero-filled first.
fn words_of(bytes: &[u8]) -> Vec<Word> {
    let mut words = Vec::with_capacity(bytes.len() / 8);
    words.extend(
        bytes
            .chunks_exact(8)
            .map(|w| capnp::word(w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7])),
    );
    words
}

/// Copies up to `4 - have` bytes from `input` into `raw`; returns how many were copied.
fn take_into(raw: &mut [u8; 4], have: &mut u8, input: &[u8]) -> usize {
    let start = *have as usize;
    let n = (4 - start).min(input.len());
    raw[start..start + n].copy_from_slice(&input[..n]);
    *have += n as u8;
    n
}

/// Grows `words` so that `filled + want` bytes fit, never beyond `total` bytes, and by at most
/// `max((GROWTH_FACTOR - 1) * filled, GROWTH_STEP_BYTES)` beyond what is needed now.
fn grow(words: &mut Vec<Word>, filled: usize, want: usize, total: usize) {
    let need = filled + want;
    let have = words.len() * 8;
    if need <= have {
        return;
    }
    let target = need
        .max(filled + ((GROWTH_FACTOR - 1) * filled).max(GROWTH_STEP_BYTES))
        .min(total);
    let target_words = target.div_ceil(8);
    // Exactly: `resize` alone may round the capacity up (to double the old one), past what
    // the rule allows and past the frame's size.
    words.reserve_exact(target_words - words.len());
    words.resize(target_words, capnp::word(0, 0, 0, 0, 0, 0, 0, 0));
}

/// Bytes on the wire of a frame with `segments` segments holding `words` words in total.
pub(super) fn frame_len_u64(segments: u64, words: u64) -> u64 {
    // The table: one u32 for the count, one per segment, padded to a whole word.
    let table_bytes = (4 + 4 * segments).div_ceil(8) * 8;
    table_bytes + 8 * words
}
