//! Cap'n Proto stream framing with limits: a sans-IO decoder that checks the segment table
//! before allocating and grows its buffer only as bytes arrive, and an encoder.

mod decoder;
mod encoder;
mod frame;

pub use decoder::{FrameDecoder, FrameError, FrameLimits};
pub use encoder::{encode_frame, encode_header, frame_len};
pub use frame::Frame;

#[cfg(test)]
mod tests;
