//! A complete frame: its words, its segment bounds, and a per-thread pool of large frame
//! buffers for reuse.

use capnp::Word;

/// A complete frame: 8-byte aligned words and the bounds of each segment within them.
#[derive(Debug)]
pub struct Frame {
    pub(super) words: Vec<Word>,
    /// End offset (in words) of each segment; segment `i` starts where `i - 1` ends.
    pub(super) ends: Ends,
}

/// Segment end offsets. The first is kept inline: nearly every message has one segment, and
/// its frame then costs no allocation for the table.
#[derive(Debug, Default)]
pub(super) struct Ends {
    pub(super) first: Option<u32>,
    pub(super) rest: Vec<u32>,
}

impl Ends {
    /// Room for `count` ends (bounded by `max_segments` by the caller).
    pub(super) fn with_capacity(count: usize) -> Self {
        Self {
            first: None,
            rest: Vec::with_capacity(count.saturating_sub(1)),
        }
    }

    pub(super) fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }

    pub(super) fn push(&mut self, end: u32) {
        match self.first {
            None => self.first = Some(end),
            Some(_) => self.rest.push(end),
        }
    }

    pub(super) fn get(&self, i: usize) -> Option<u32> {
        match i {
            0 => self.first,
            i => self.rest.get(i - 1).copied(),
        }
    }

    pub(super) fn last(&self) -> Option<u32> {
        self.rest.last().copied().or(self.first)
    }

    /// Bytes allocated for the table.
    pub(super) fn heap_bytes(&self) -> usize {
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

    /// Bytes it holds in memory (its words as allocated and its segment table).
    pub fn heap_bytes(&self) -> usize {
        self.words.capacity() * 8 + self.ends.heap_bytes()
    }

    /// Appends the frame to `out` exactly as it was read: segment table, then segments (a
    /// relay forwards frames this way, without re-encoding the message).
    pub fn encode(&self, out: &mut Vec<u8>) {
        use capnp::message::ReaderSegments;
        let n = self.ends.len();
        out.reserve(self.wire_bytes());
        out.extend_from_slice(&(n as u32).wrapping_sub(1).to_le_bytes());
        for i in 0..n {
            let len = self.get_segment(i as u32).map_or(0, |s| s.len() / 8);
            out.extend_from_slice(&(len as u32).to_le_bytes());
        }
        if n % 2 == 0 {
            out.extend_from_slice(&[0; 4]);
        }
        for i in 0..n {
            out.extend_from_slice(self.get_segment(i as u32).unwrap_or_default());
        }
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
    /// large enough to be worth reusing (see [`crate::FrameDecoder`]). Dropping a frame frees it.
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
pub(super) const RECYCLE_MIN_BYTES: usize = 64 * 1024;
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
pub(super) fn take_recycled(total: usize) -> Vec<Word> {
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
