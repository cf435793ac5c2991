//! The state one connection's shell shares between its reader, its writer, the messages
//! capnp-rpc holds and the connection's owner.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use crate::core::ConnectionCore;
use crate::core::{Outbox, Signal};
use crate::{AbortReason, Limits};

/// State shared by the reader, the writer, outgoing messages and the connection's owner.
pub(crate) struct ConnShared {
    /// Shared by the connections of a class (a pointer here, not a copy).
    pub(super) limits: std::sync::Arc<Limits>,
    /// The core's outgoing queue (shared, so the writer never borrows the core across a write).
    pub(super) outbox: Rc<Outbox>,
    /// Decoder, deadlines and guard (sans-IO); the shell around it is this module.
    pub(super) core: RefCell<ConnectionCore>,
    /// Why the connection closes, once known (the first reason wins).
    pub(super) abort: RefCell<Option<Box<AbortReason>>>,
    pub(super) abort_signal: Signal,
    pub(super) stats: RefCell<ConnectionStats>,
    /// The reason the peer gave in its `Abort`, if it sent one.
    pub(super) peer_abort: RefCell<Option<Box<AbortReason>>>,
    /// Bytes of incoming messages capnp-rpc still holds.
    pub(super) held_bytes: Cell<usize>,
    /// The server's metrics, when this connection reports to them.
    pub(super) metrics: RefCell<Option<std::sync::Arc<crate::Metrics>>>,
}

/// Traffic counters of one connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectionStats {
    /// Frames received and handed to capnp-rpc.
    pub frames_in: u64,
    /// Bytes read from the peer.
    pub bytes_in: u64,
    /// Frames written to the peer.
    pub frames_out: u64,
    /// Bytes written to the peer.
    pub bytes_out: u64,
    /// Socket writes that carried those frames (coalescing makes this smaller).
    pub writes: u64,
    /// Times this side polled the socket after a write instead of sleeping
    /// ([`Limits::busy_poll`], [`Limits::answer_poll`]).
    pub polls: u64,
    /// Polls that saw bytes arrive (the rest ran out of time or were cut short by
    /// something to send).
    pub poll_hits: u64,
}

impl ConnShared {
    pub(super) fn new(limits: std::sync::Arc<Limits>, core: ConnectionCore) -> Rc<Self> {
        Rc::new(ConnShared {
            outbox: core.outbox().clone(),
            core: RefCell::new(core),
            abort: RefCell::new(None),
            abort_signal: Signal::default(),
            stats: RefCell::new(ConnectionStats::default()),
            peer_abort: RefCell::new(None),
            held_bytes: Cell::new(0),
            metrics: RefCell::new(None),
            limits,
        })
    }

    /// Closes the connection with `reason` (sent to the peer in an `Abort`). The first
    /// reason wins.
    pub(super) fn abort(&self, reason: AbortReason) {
        let _ = self.fail(reason);
    }

    /// Records why the connection closes (first wins; counted in metrics, a peer's own
    /// reason kept) and returns the error to hand to capnp-rpc.
    pub(super) fn fail(&self, reason: AbortReason) -> capnp::Error {
        let error = reason.to_error();
        if let Some(m) = &*self.metrics.borrow() {
            if reason.is_framing() {
                m.frame_aborts.inc();
            }
            m.aborts(reason.label()).inc();
        }
        if let AbortReason::PeerAborted { reason: text, .. } = &reason {
            tracing::debug!(reason = %text, "the peer aborted the connection");
            *self.peer_abort.borrow_mut() = Some(Box::new(reason.clone()));
        }
        let mut slot = self.abort.borrow_mut();
        if slot.is_none() {
            *slot = Some(Box::new(reason));
            self.abort_signal.notify();
        }
        error
    }

    /// Resolves once the connection is aborted. One waiter: the reader.
    pub(super) async fn aborted(&self) {
        while self.abort.borrow().is_none() {
            self.abort_signal.wait().await;
        }
    }

    pub(super) fn abort_error(&self) -> capnp::Error {
        match &*self.abort.borrow() {
            Some(reason) => reason.to_error(),
            None => AbortReason::Closed("connection closed").to_error(),
        }
    }

    /// Grows whenever bytes move in either direction (idle detection compares snapshots,
    /// so the hot path never reads the clock).
    pub(super) fn activity(&self) -> u64 {
        let s = self.stats.borrow();
        s.bytes_in + s.bytes_out
    }

    pub(super) fn bytes_received(&self) -> u64 {
        self.stats.borrow().bytes_in
    }

    /// Our questions not answered yet (see [`Guard::awaiting_answers`]).
    pub(super) fn awaiting_answers(&self) -> u32 {
        self.core.borrow().guard().awaiting_answers()
    }

    /// Calls the peer has sent us so far.
    pub(super) fn calls_received(&self) -> u64 {
        self.core.borrow().guard().calls_received()
    }

    pub(super) fn note_poll(&self, hit: bool) {
        let mut s = self.stats.borrow_mut();
        s.polls += 1;
        s.poll_hits += u64::from(hit);
    }

    pub(super) fn note_received(&self, bytes: usize) {
        self.stats.borrow_mut().bytes_in += bytes as u64;
        if let Some(m) = &*self.metrics.borrow() {
            m.bytes_in.inc_by(bytes as u64);
        }
    }

    /// An outgoing budget cut the connection off (its peer does not read).
    pub(super) fn note_cut_off(&self) {
        if let Some(m) = &*self.metrics.borrow() {
            m.outgoing_cutoffs.inc();
        }
    }

    pub(super) fn held(&self, delta: i64) {
        if let Some(m) = &*self.metrics.borrow() {
            m.inflight_bytes.inc_by(delta);
        }
    }

    pub(super) fn note_sent(&self, frames: u64, bytes: usize) {
        let mut s = self.stats.borrow_mut();
        s.frames_out += frames;
        s.bytes_out += bytes as u64;
        s.writes += 1;
        drop(s);
        if let Some(m) = &*self.metrics.borrow() {
            m.bytes_out.inc_by(bytes as u64);
        }
    }
}
