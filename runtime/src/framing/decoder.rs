use capnp::Word;

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

/// A complete frame: 8-byte aligned words and the bounds of each segment within them.
#[derive(Debug)]
pub struct Frame {
    words: Vec<Word>,
    /// End offset (in words) of each segment; segment `i` starts where `i - 1` ends.
    ends: Ends,
}

/// Segment end offsets. The first is kept inline: nearly every message has one segment, and
/// its frame then costs no allocation for the table.
#[derive(Debug, Default)]
struct Ends {
    first: Option<u32>,
    rest: Vec<u32>,
}

impl Ends {
    /// Room for `count` ends (bounded by `max_segments` by the caller).
    fn with_capacity(count: usize) -> Self {
        Self {
            first: None,
            rest: Vec::with_capacity(count.saturating_sub(1)),
        }
    }

    fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }

    fn push(&mut self, end: u32) {
        match self.first {
            None => self.first = Some(end),
            Some(_) => self.rest.push(end),
        }
    }

    fn get(&self, i: usize) -> Option<u32> {
        match i {
            0 => self.first,
            i => self.rest.get(i - 1).copied(),
        }
    }

    fn last(&self) -> Option<u32> {
        self.rest.last().copied().or(self.first)
    }

    /// Bytes allocated for the table.
    fn heap_bytes(&self) -> usize {
        self.rest.capacity() * 4
    }
}

impl Frame {
    /// Total size of the segments, in words.
    pub fn size_in_words(&self) -> usize {
        self.words.len()
    }

    /// Size on the wire, in bytes (segment table included).
    pub fn wire_bytes(&self) -> usize {
        super::encoder::frame_len_for(self.ends.len(), self.words.len())
    }

    /// Number of segments.
    pub fn segment_count(&self) -> usize {
        self.ends.len()
    }

    /// Opens the frame as a Cap'n Proto message.
    pub fn into_reader(
        self,
        options: capnp::message::ReaderOptions,
    ) -> capnp::message::Reader<Frame> {
        capnp::message::Reader::new(self, options)
    }
}

impl Frame {
    /// Gives this frame's buffer back for a later large frame on this thread, when it is
    /// large enough to be worth reusing (see [`FrameDecoder`]). Dropping a frame frees it.
    pub fn recycle(self) {
        let words = self.words;
        if words.capacity() * 8 < RECYCLE_MIN_BYTES {
            return;
        }
        RECYCLED.with(|r| {
            let mut r = r.borrow_mut();
            let held: usize = r.iter().map(|w| w.capacity() * 8).sum();
            if r.len() < RECYCLE_MAX_BUFFERS && held + words.capacity() * 8 <= RECYCLE_MAX_BYTES {
                r.push(words);
            }
        });
    }
}

/// Frame bodies at least this large start from a recycled buffer when one is available.
const RECYCLE_MIN_BYTES: usize = 64 * 1024;
/// At most this many bytes of recycled buffers are kept per thread...
const RECYCLE_MAX_BYTES: usize = 8 << 20;
/// ...in at most this many buffers.
const RECYCLE_MAX_BUFFERS: usize = 8;

thread_local! {
    /// Buffers of finished large frames, for the next large frames on this thread.
    static RECYCLED: std::cell::RefCell<Vec<Vec<Word>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Bytes and buffers this thread keeps for reuse.
#[cfg(test)]
pub(super) fn recycled() -> (usize, usize) {
    RECYCLED.with(|r| {
        let r = r.borrow();
        (r.iter().map(|w| w.capacity() * 8).sum(), r.len())
    })
}

/// A recycled buffer for a body of `total` bytes: the smallest that holds it, else the
/// largest there is. Its contents are stale but initialised: the body overwrites them.
fn take_recycled(total: usize) -> Vec<Word> {
    RECYCLED.with(|r| {
        let mut r = r.borrow_mut();
        let fits = r
            .iter()
            .enumerate()
            .filter(|(_, w)| w.capacity() * 8 >= total)
            .min_by_key(|(_, w)| w.capacity())
            .map(|(i, _)| i);
        let pick = fits.or_else(|| {
            r.iter()
                .enumerate()
                .max_by_key(|(_, w)| w.capacity())
                .map(|(i, _)| i)
        });
        pick.map(|i| r.swap_remove(i)).unwrap_or_default()
    })
}

impl capnp::message::ReaderSegments for Frame {
    fn get_segment(&self, idx: u32) -> Option<&[u8]> {
        // capnp calls this for every pointer it follows: segment 0, nearly always, first.
        let (start, end) = match idx {
            0 => (0, self.ends.first?),
            i => {
                let i = i as usize;
                (self.ends.get(i - 1)?, self.ends.get(i)?)
            }
        };
        Some(Word::words_to_bytes(
            &self.words[start as usize..end as usize],
        ))
    }

    fn len(&self) -> usize {
        self.ends.len()
    }
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
