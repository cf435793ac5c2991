//! Cap'n Proto stream framing with limits: a sans-IO decoder that checks the segment table
//! before allocating and grows its buffer only as bytes arrive, and an encoder.

mod decoder;
mod encoder;

pub use decoder::{Frame, FrameDecoder, FrameError, FrameLimits};
pub use encoder::{encode_frame, encode_header, frame_len};

#[cfg(test)]
mod tests;
