//! The sans-IO core of one connection (after quinn-proto's `Connection`): the frame decoder
//! with its limits, the frame and idle deadlines, and the guard, driven by bytes and instants
//! the shell passes in. No sockets, no clock, no tasks: the server's shell (`network/`) feeds
//! it what it reads and hands what it delivers to capnp-rpc; a relay's shell can join two.
//!
//! The shell's part: read into [`ConnectionCore::body_spare`] or pass bytes to
//! [`ConnectionCore::handle_bytes`]; for each frame call [`ConnectionCore::inspect`]; before
//! waiting call [`ConnectionCore::before_wait`] and sleep until
//! [`ConnectionCore::poll_timeout`], then [`ConnectionCore::handle_timeout`]; pass every
//! outgoing message to [`ConnectionCore::outgoing`]. Any `Err` is the reason to close with.

mod abort;
mod deadlines;
mod outbox;
mod signal;

use std::rc::Rc;
use std::time::Instant;

use capnp::message::ReaderOptions;

pub use abort::{AbortReason, BudgetScope};
pub(crate) use outbox::{Message, Outbox, State, FIRST_SEGMENT_WORDS};
pub(crate) use signal::Signal;

use deadlines::Deadlines;
pub(crate) use deadlines::Linger;

use crate::framing::{Frame, FrameDecoder};
use crate::guard::{Guard, Verdict};
use crate::Limits;

/// What the core made of one incoming frame.
pub(crate) enum Event {
    /// Deliver this message (to capnp-rpc, or to the other side of a relay); it is
    /// `wire_bytes` long on the wire.
    Deliver {
        message: capnp::message::Reader<Frame>,
        wire_bytes: usize,
    },
    /// The guard answered the message itself: send these frames back (none: consumed).
    Reply(Box<[u8]>),
}

/// The state machine of one connection's incoming side and its accounting.
pub(crate) struct ConnectionCore {
    decoder: FrameDecoder,
    /// What this side queued for the peer, bounded in bytes; shared with the shell's writer
    /// and capnp-rpc's outgoing messages, which push and drain it without borrowing the core.
    outbox: Rc<Outbox>,
    deadlines: Deadlines,
    guard: Guard,
    traversal_factor: usize,
    nesting_limit: i32,
    linger_timeout: std::time::Duration,
    /// At most this much is read and dropped while lingering: room for the rest of a frame
    /// of up to twice the limit, so a peer still writing an oversized message reads our
    /// Abort instead of a reset (the linger timeout bounds the time).
    linger_bytes: usize,
}

impl ConnectionCore {
    pub(crate) fn new(limits: &Limits, guard: Guard) -> Self {
        Self {
            decoder: FrameDecoder::new(limits.frame_limits()),
            outbox: Rc::new(Outbox::new(limits.max_outgoing_bytes)),
            deadlines: Deadlines::new(
                limits.frame_timeout,
                Some(limits.idle_timeout),
                limits.write_timeout,
            ),
            guard,
            traversal_factor: limits.traversal_factor,
            nesting_limit: limits.nesting_limit,
            linger_timeout: limits.linger_timeout,
            linger_bytes: limits.max_message_bytes.saturating_mul(2) + 64 * 1024,
        }
    }

    /// The same core without an idle check: for a relay's upstream side, whose calls in
    /// flight and idle time count on the client side.
    pub(crate) fn without_idle_check(mut self) -> Self {
        self.deadlines.without_idle_check();
        self
    }

    /// Decodes from bytes read from the peer: how many it consumed, and a frame if one
    /// completed (call again with the rest).
    pub(crate) fn handle_bytes(
        &mut self,
        input: &[u8],
    ) -> Result<(usize, Option<Frame>), AbortReason> {
        let (n, frame) = self.decoder.feed(input)?;
        if frame.is_some() {
            self.deadlines.frame_done();
        }
        Ok((n, frame))
    }

    /// While a large frame body is arriving, a slice of it to read into directly (see
    /// [`FrameDecoder::body_spare`]); report what was read with [`Self::advance_body`].
    pub(crate) fn body_spare(&mut self, min_bytes: usize) -> Option<&mut [u8]> {
        self.decoder.body_spare(min_bytes)
    }

    /// `n` bytes were read into [`Self::body_spare`]; the frame if it is now complete.
    pub(crate) fn advance_body(&mut self, n: usize) -> Option<Frame> {
        let frame = self.decoder.advance_body(n);
        if frame.is_some() {
            self.deadlines.frame_done();
        }
        frame
    }

    /// The peer closed its side: fine between frames, an abort inside one.
    pub(crate) fn end_of_stream(&self) -> Result<(), AbortReason> {
        if self.decoder.in_frame() {
            Err(AbortReason::ClosedMidFrame)
        } else {
            Ok(())
        }
    }

    /// Passes a complete frame through the guard. `held_bytes`: bytes of incoming messages
    /// the consumer still holds (for `max_inflight_bytes`).
    pub(crate) fn inspect(
        &mut self,
        frame: Frame,
        held_bytes: usize,
    ) -> Result<Event, AbortReason> {
        self.inspect_as(frame, held_bytes, false)
    }

    /// [`Self::inspect`] for a relay, which passes delivered frames on as read: what it
    /// cannot account for (`Guard::incoming_relayed`), and frames that are not rpc
    /// messages, are refused here.
    pub(crate) fn inspect_relayed(
        &mut self,
        frame: Frame,
        held_bytes: usize,
    ) -> Result<Event, AbortReason> {
        self.inspect_as(frame, held_bytes, true)
    }

    fn inspect_as(
        &mut self,
        frame: Frame,
        held_bytes: usize,
        relayed: bool,
    ) -> Result<Event, AbortReason> {
        use capnp_rpc::rpc_capnp::message;
        let wire_bytes = frame.wire_bytes();
        let message = self.open(frame);
        let root = match message.get_root::<message::Reader<'_>>() {
            Ok(root) => root,
            Err(e) if relayed => {
                return Err(AbortReason::Unsupported {
                    what: format!("a message that is not an rpc message ({e})"),
                })
            }
            // Not an rpc message at all: the consumer reports it to the peer.
            Err(_) => {
                return Ok(Event::Deliver {
                    message,
                    wire_bytes,
                })
            }
        };
        // Checked by the union tag alone: the guard parses the message itself. Not delivered:
        // capnp-rpc would echo the peer's reason, whatever its size, in its own Abort.
        if root.has_abort() {
            return Err(peer_abort(root));
        }
        self.guard.set_held_bytes(held_bytes, wire_bytes);
        let verdict = if relayed {
            self.guard.incoming_relayed(root)
        } else {
            self.guard.incoming(root)
        };
        match verdict {
            Verdict::Deliver => Ok(Event::Deliver {
                message,
                wire_bytes,
            }),
            Verdict::Reply(frames) => Ok(Event::Reply(frames)),
            Verdict::Abort(reason) => Err(reason),
        }
    }

    /// Opens a frame as a message with this connection's traversal and nesting limits.
    pub(crate) fn open(&self, frame: Frame) -> capnp::message::Reader<Frame> {
        let options = ReaderOptions {
            traversal_limit_in_words: Some(
                frame
                    .size_in_words()
                    .max(64)
                    .saturating_mul(self.traversal_factor),
            ),
            nesting_limit: self.nesting_limit,
        };
        frame.into_reader(options)
    }

    /// Accounts for a message this side sends.
    pub(crate) fn outgoing(
        &mut self,
        msg: capnp_rpc::rpc_capnp::message::Reader<'_>,
    ) -> Result<(), AbortReason> {
        self.guard.outgoing(msg)
    }

    /// Accounts for a message a relay passes on to this side's peer: what it must refuse
    /// instead (see `Guard::outgoing_relayed`), or the accounting's error.
    pub(crate) fn outgoing_relayed(
        &mut self,
        msg: capnp_rpc::rpc_capnp::message::Reader<'_>,
    ) -> Result<Option<crate::guard::Refusal>, AbortReason> {
        self.guard.outgoing_relayed(msg)
    }

    /// The shell is about to wait for bytes; `activity` counts bytes moved either way so far.
    /// `now` is read only when a deadline starts.
    pub(crate) fn before_wait(&mut self, now: impl Fn() -> Instant, activity: u64) {
        self.deadlines
            .before_wait(now, self.decoder.in_frame(), activity);
    }

    /// When [`Self::handle_timeout`] must run next.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.deadlines.poll_timeout()
    }

    /// The shell's timer fired at `now`.
    pub(crate) fn handle_timeout(
        &mut self,
        now: Instant,
        activity: u64,
    ) -> Result<(), AbortReason> {
        let in_flight = self.guard.in_flight_calls();
        let received = self.decoder.received_bytes();
        self.deadlines
            .handle_timeout(now, activity, in_flight, received)
    }

    /// A write could not complete at once: when it must have (see `deadlines.rs`).
    pub(crate) fn write_blocked(&mut self, now: impl Fn() -> Instant) -> Instant {
        self.deadlines.write_blocked(now)
    }

    /// The current write completed or was abandoned.
    pub(crate) fn write_done(&mut self) {
        self.deadlines.write_done();
    }

    /// The writer's timer fired at `now`: an error if the blocked write is past its deadline.
    pub(crate) fn check_write(&self, now: Instant) -> Result<(), AbortReason> {
        self.deadlines.check_write(now)
    }

    /// The connection closed with an error at `now`: how long and how much to drain.
    pub(crate) fn linger(&self, now: Instant) -> Linger {
        Linger::new(now, self.linger_timeout, self.linger_bytes)
    }

    /// The outgoing queue (see [`Outbox::poll_transmit`]).
    pub(crate) fn outbox(&self) -> &Rc<Outbox> {
        &self.outbox
    }

    pub(crate) fn guard(&self) -> &Guard {
        &self.guard
    }

    pub(crate) fn guard_mut(&mut self) -> &mut Guard {
        &mut self.guard
    }
}

/// The reason the peer gave in its `Abort`, cut to `PEER_REASON_CHARS` and escaped.
pub(crate) fn peer_abort(root: capnp_rpc::rpc_capnp::message::Reader<'_>) -> AbortReason {
    use capnp_rpc::rpc_capnp::{exception, message};
    let (kind, reason) = match root.which() {
        Ok(message::Abort(Ok(e))) => (
            e.get_type().ok(),
            e.get_reason().map(|r| excerpt(r.as_bytes())).ok(),
        ),
        _ => (None, None),
    };
    AbortReason::PeerAborted {
        kind: match kind {
            Some(exception::Type::Overloaded) => capnp::ErrorKind::Overloaded,
            Some(exception::Type::Disconnected) => capnp::ErrorKind::Disconnected,
            _ => capnp::ErrorKind::Failed,
        },
        reason: reason.unwrap_or_else(|| "(no reason given)".into()),
    }
}

/// Characters of a peer's abort reason kept for logs and errors.
const PEER_REASON_CHARS: usize = 512;

/// A peer's text fit for a log line: at most `PEER_REASON_CHARS` characters, control
/// characters escaped, invalid UTF-8 replaced, and the full length said when cut.
fn excerpt(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(4 * PEER_REASON_CHARS)]);
    let mut out: String = text
        .chars()
        .take(PEER_REASON_CHARS)
        .flat_map(|c| {
            let escaped = c.is_control().then(|| c.escape_default());
            escaped
                .into_iter()
                .flatten()
                .chain((!c.is_control()).then_some(c))
        })
        .collect();
    if text.chars().count() > PEER_REASON_CHARS || bytes.len() > 4 * PEER_REASON_CHARS {
        out.push_str(&format!("... ({} bytes in all)", bytes.len()));
    }
    out
}

/// One `Abort` frame carrying `error` (what a closing side sends its peer).
pub(crate) fn abort_frame(error: &capnp::Error) -> Box<[u8]> {
    use capnp_rpc::rpc_capnp::{exception, message};
    let mut m = capnp::message::Builder::new_default();
    {
        let mut e = m.init_root::<message::Builder<'_>>().init_abort();
        e.set_type(match error.kind {
            capnp::ErrorKind::Overloaded => exception::Type::Overloaded,
            capnp::ErrorKind::Disconnected => exception::Type::Disconnected,
            capnp::ErrorKind::Unimplemented => exception::Type::Unimplemented,
            _ => exception::Type::Failed,
        });
        e.set_reason(error.extra.as_str());
    }
    let mut frame = Vec::new();
    crate::framing::encode_frame(&mut frame, &m.get_segments_for_output());
    frame.into_boxed_slice()
}

#[cfg(test)]
mod tests;
