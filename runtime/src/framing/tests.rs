use capnp::message::ReaderSegments;
use proptest::prelude::*;

use super::*;

const LIMITS: FrameLimits = FrameLimits {
    max_message_bytes: 1 << 20,
    max_segments: 64,
};

fn header(count_field: u32, sizes: &[u32]) -> Vec<u8> {
    let mut v = count_field.to_le_bytes().to_vec();
    for s in sizes {
        v.extend_from_slice(&s.to_le_bytes());
    }
    if v.len() % 8 != 0 {
        v.extend_from_slice(&[0; 4]);
    }
    v
}

/// Feeds `input` in one go, collecting frames; returns frames and the first error.
fn decode_all(dec: &mut FrameDecoder, mut input: &[u8]) -> (Vec<Frame>, Option<FrameError>) {
    let mut frames = Vec::new();
    while !input.is_empty() {
        match dec.feed(input) {
            Ok((n, f)) => {
                input = &input[n..];
                frames.extend(f);
                if n == 0 {
                    break;
                }
            }
            Err(e) => return (frames, Some(e)),
        }
    }
    (frames, None)
}

fn segments_of(frame: &Frame) -> Vec<Vec<u8>> {
    (0..frame.segment_count() as u32)
        .map(|i| frame.get_segment(i).unwrap().to_vec())
        .collect()
}

#[test]
fn rejects_huge_claim_before_allocating() {
    let mut dec = FrameDecoder::new(LIMITS);
    let (_, err) = decode_all(&mut dec, &header(0, &[1 << 31]));
    let err = err.expect("a 16 GiB claim is refused");
    assert!(matches!(err, FrameError::TooLarge { claimed, .. } if claimed == (1u64 << 34) + 8));
    assert_eq!(
        dec.committed_bytes(),
        0,
        "nothing: a one-entry segment table is inline"
    );
    assert!(err
        .to_string()
        .contains("exceeds max_message_bytes = 1048576 bytes (1 MiB)"));
}

#[test]
fn rejects_segment_count_overflow_and_too_many_segments() {
    let mut dec = FrameDecoder::new(LIMITS);
    assert_eq!(
        dec.feed(&u32::MAX.to_le_bytes()).unwrap_err(),
        FrameError::SegmentCountOverflow
    );
    let mut dec = FrameDecoder::new(LIMITS);
    let e = dec.feed(&511u32.to_le_bytes()).unwrap_err();
    assert_eq!(
        e,
        FrameError::TooManySegments {
            count: 512,
            limit: 64
        }
    );
    assert_eq!(dec.committed_bytes(), 0);
}

#[test]
fn claim_of_exactly_the_limit_commits_nothing_until_bytes_arrive() {
    let mut dec = FrameDecoder::new(LIMITS);
    let words = (LIMITS.max_message_bytes - 8) / 8;
    let (frames, err) = decode_all(&mut dec, &header(0, &[words as u32]));
    assert!(frames.is_empty() && err.is_none());
    assert!(dec.in_frame());
    assert_eq!(
        dec.committed_bytes(),
        0,
        "nothing: a one-entry segment table is inline"
    );
    // 100 bytes of body commit at most one growth step.
    decode_all(&mut dec, &[0u8; 100]);
    assert!(dec.committed_bytes() <= 8 * 1024 + 8);
    // One byte over the limit is refused.
    let mut dec = FrameDecoder::new(LIMITS);
    let (_, err) = decode_all(&mut dec, &header(0, &[words as u32 + 1]));
    assert!(matches!(err, Some(FrameError::TooLarge { .. })));
}

/// A one-segment frame that arrives whole takes the decoder's fast path; the limits hold
/// there exactly as on the byte-by-byte path.
#[test]
fn whole_frames_in_one_read_are_held_to_the_limits() {
    let small = FrameLimits {
        max_message_bytes: 8 + 8 * 4,
        max_segments: 1,
    };
    let whole = |words: u32| {
        let mut v = header(0, &[words]);
        v.extend((0..words * 8).map(|i| i as u8));
        v
    };
    // Exactly the limit, followed by the next frame's first bytes: one frame, its bytes only.
    let mut dec = FrameDecoder::new(small);
    let mut wire = whole(4);
    wire.extend_from_slice(&[0, 0]);
    let (n, frame) = dec.feed(&wire).unwrap();
    assert_eq!(n, 8 + 32);
    assert_eq!(segments_of(&frame.unwrap()), vec![wire[8..40].to_vec()]);
    assert!(!dec.in_frame());
    // One word over: refused, though every byte of it is there.
    let mut dec = FrameDecoder::new(small);
    let err = dec.feed(&whole(5)).unwrap_err();
    assert!(matches!(
        err,
        FrameError::TooLarge {
            claimed: 48,
            limit: 40
        }
    ));
    // No segments allowed at all, and an empty one-segment frame: refused.
    let mut dec = FrameDecoder::new(FrameLimits {
        max_segments: 0,
        ..small
    });
    assert!(matches!(
        dec.feed(&whole(1)).unwrap_err(),
        FrameError::TooManySegments { count: 1, limit: 0 }
    ));
    let mut dec = FrameDecoder::new(small);
    assert_eq!(dec.feed(&whole(0)).unwrap_err(), FrameError::Empty);
}

#[test]
fn empty_frame_is_refused() {
    let mut dec = FrameDecoder::new(LIMITS);
    let (_, err) = decode_all(&mut dec, &header(1, &[0, 0]));
    assert_eq!(err, Some(FrameError::Empty));
}

#[test]
fn direct_body_reads_complete_a_frame() {
    let payload: Vec<u8> = (0..64 * 1024u32).map(|i| i as u8).collect();
    let mut wire = Vec::new();
    encode_frame(&mut wire, &[&payload]);
    let mut dec = FrameDecoder::new(LIMITS);
    let (n, f) = dec.feed(&wire[..8]).unwrap();
    assert_eq!((n, f.is_none()), (8, true));
    let mut pos = 8;
    let frame = loop {
        let spare = dec.body_spare(1).expect("in body");
        let k = spare.len().min(wire.len() - pos).min(5000);
        spare[..k].copy_from_slice(&wire[pos..pos + k]);
        pos += k;
        if let Some(f) = dec.advance_body(k) {
            break f;
        }
    };
    assert_eq!(segments_of(&frame), vec![payload]);
}

fn arb_segments() -> impl Strategy<Value = Vec<Vec<u8>>> {
    prop::collection::vec(
        prop::collection::vec(any::<u8>(), 1..40).prop_map(|mut v| {
            v.resize(v.len().div_ceil(8) * 8, 0);
            v
        }),
        1..6,
    )
}

proptest! {
    /// Any framing of any segments decodes back to the same segments, however the byte
    /// stream is split into reads (whole-frame reads take the decoder's one-copy path).
    #[test]
    fn encode_decode_round_trip(
        frames in prop::collection::vec(arb_segments(), 1..4),
        chunk in prop_oneof![1usize..64, Just(usize::MAX)],
    ) {
        let mut wire = Vec::new();
        for segs in &frames {
            let refs: Vec<&[u8]> = segs.iter().map(|s| s.as_slice()).collect();
            let before = wire.len();
            encode_frame(&mut wire, &refs);
            prop_assert_eq!(wire.len() - before, frame_len(&refs));
        }
        let mut dec = FrameDecoder::new(LIMITS);
        let mut got = Vec::new();
        for piece in wire.chunks(chunk) {
            let (fs, err) = decode_all(&mut dec, piece);
            prop_assert!(err.is_none());
            got.extend(fs.iter().map(segments_of));
        }
        prop_assert_eq!(got, frames);
        prop_assert!(!dec.in_frame());
    }

    /// Arbitrary bytes never panic, and memory committed for a partial frame never exceeds
    /// four times what arrived plus a constant (one growth step and the segment table).
    #[test]
    fn arbitrary_bytes_never_overcommit(
        bytes in prop::collection::vec(any::<u8>(), 0..4096),
        chunk in 1usize..512,
    ) {
        let mut dec = FrameDecoder::new(LIMITS);
        let mut received = 0usize;
        'outer: for piece in bytes.chunks(chunk) {
            let mut input = piece;
            while !input.is_empty() {
                match dec.feed(input) {
                    Ok((n, _)) => {
                        received += n;
                        input = &input[n..];
                        let bound = 4 * received + 8 * 1024 + 4 * 64 + 8;
                        prop_assert!(dec.committed_bytes() <= bound,
                            "committed {} after {} bytes", dec.committed_bytes(), received);
                    }
                    Err(_) => break 'outer,
                }
            }
        }
    }

    /// Bodies decoded into recycled buffers (whose old contents are stale) come out exactly
    /// as sent, through both the copying and the direct-read paths, in any chunking.
    #[test]
    fn recycled_buffers_never_show_stale_bytes(
        sizes in prop::collection::vec(prop_oneof![1usize..64, 8192usize..30_000], 1..6),
        seed in any::<u8>(),
        chunk in 1usize..20_000,
    ) {
        let limits = FrameLimits { max_message_bytes: 1 << 20, max_segments: 64 };
        let mut dec = FrameDecoder::new(limits);
        for (n, words) in sizes.into_iter().enumerate() {
            let body: Vec<u8> = (0..words * 8)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed).wrapping_add(n as u8))
                .collect();
            let mut wire = Vec::new();
            encode_frame(&mut wire, &[&body]);
            let frames = decode_direct(&mut dec, &wire, chunk);
            prop_assert_eq!(frames.len(), 1);
            prop_assert_eq!(segments_of(&frames[0]), vec![body]);
            frames.into_iter().for_each(Frame::recycle);
        }
    }
}

/// Decodes `input` in `chunk`-sized pieces, reading straight into the body whenever the
/// decoder offers it (as the connection's reader does) and feeding otherwise.
fn decode_direct(dec: &mut FrameDecoder, input: &[u8], chunk: usize) -> Vec<Frame> {
    let mut frames = Vec::new();
    let mut i = 0;
    while i < input.len() {
        if let Some(dst) = dec.body_spare(1) {
            let n = dst.len().min(chunk).min(input.len() - i);
            dst[..n].copy_from_slice(&input[i..i + n]);
            i += n;
            frames.extend(dec.advance_body(n));
        } else {
            let end = (i + chunk).min(input.len());
            let (n, f) = dec.feed(&input[i..end]).unwrap();
            i += n;
            frames.extend(f);
        }
    }
    frames
}

#[test]
fn a_large_body_reuses_a_recycled_buffer() {
    let limits = FrameLimits {
        max_message_bytes: 4 << 20,
        max_segments: 64,
    };
    let mut dec = FrameDecoder::new(limits);
    let mut wire = Vec::new();
    encode_frame(&mut wire, &[&vec![0xAA; 128 * 1024]]);
    let a = decode_direct(&mut dec, &wire, 4096).pop().unwrap();
    let a_ptr = a.get_segment(0).unwrap().as_ptr();
    a.recycle();
    assert_eq!(frame::recycled(), (128 * 1024, 1));
    // A smaller large frame lands in the same buffer, with its own bytes only.
    let body: Vec<u8> = (0..100 * 1024).map(|i| (i % 251) as u8).collect();
    let mut wire = Vec::new();
    encode_frame(&mut wire, &[&body]);
    let b = decode_direct(&mut dec, &wire, 1000).pop().unwrap();
    assert_eq!(b.get_segment(0).unwrap().as_ptr(), a_ptr, "buffer reused");
    assert_eq!(b.get_segment(0).unwrap(), &body[..]);
    assert_eq!(b.size_in_words(), 100 * 1024 / 8);
    assert_eq!(frame::recycled(), (0, 0));
    // Small frames neither take nor give buffers.
    let mut wire = Vec::new();
    encode_frame(&mut wire, &[&[1u8; 64]]);
    let c = decode_direct(&mut dec, &wire, 7).pop().unwrap();
    c.recycle();
    assert_eq!(frame::recycled(), (0, 0));
}

#[test]
fn recycling_is_bounded_per_thread() {
    let limits = FrameLimits {
        max_message_bytes: 4 << 20,
        max_segments: 64,
    };
    let mut wire = Vec::new();
    encode_frame(&mut wire, &[&vec![1u8; 1 << 20]]);
    let frames: Vec<Frame> = (0..20)
        .map(|_| {
            let mut dec = FrameDecoder::new(limits);
            decode_direct(&mut dec, &wire, 64 * 1024).pop().unwrap()
        })
        .collect();
    frames.into_iter().for_each(Frame::recycle);
    let (bytes, buffers) = frame::recycled();
    assert!(
        bytes <= 8 << 20 && buffers <= 8,
        "{bytes} bytes in {buffers} buffers"
    );
    // A peer claiming 4 MiB and sending 16 bytes of it gets one recycled buffer at most:
    // nothing new is allocated for what it merely claims.
    let mut dec = FrameDecoder::new(limits);
    let mut claim = header(0, &[(4 << 20) / 8 - 1]);
    claim.extend_from_slice(&[0; 16]);
    let (frames, err) = decode_all(&mut dec, &claim);
    assert!(frames.is_empty() && err.is_none());
    assert!(dec.committed_bytes() <= (1 << 20) + 4 * 16 + 8 * 1024 + 8);
    assert_eq!(frame::recycled().1, buffers - 1);
}
