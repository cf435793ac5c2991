use std::cell::{Cell, RefCell};
use std::rc::Rc;

use capnp::capability::Promise;
use capnp::message::{Builder, HeapAllocator};
use capnp_rpc::rpc_twoparty_capnp::Side;
use tokio::io::{AsyncRead, AsyncWrite};

use super::outbox::{Message, Outbox, FIRST_SEGMENT_WORDS};
use super::reader::{Lease, ReadState};
use super::signal::Signal;
use super::writer;
use crate::core::{ConnectionCore, Event};
use crate::framing::Frame;
use crate::guard::Guard;
use crate::{AbortReason, Limits};

/// State shared by the reader, the writer, outgoing messages and the connection's owner.
pub(crate) struct ConnShared {
    /// Shared by the connections of a class (a pointer here, not a copy).
    pub(super) limits: std::sync::Arc<Limits>,
    pub(super) outbox: Outbox,
    /// Decoder, deadlines and guard (sans-IO); the shell around it is this module.
    pub(super) core: RefCell<ConnectionCore>,
    /// Why the connection closes, once known (the first reason wins).
    abort: RefCell<Option<AbortReason>>,
    abort_signal: Signal,
    stats: RefCell<ConnectionStats>,
    /// The reason the peer gave in its `Abort`, if it sent one.
    peer_abort: RefCell<Option<AbortReason>>,
    /// Bytes of incoming messages capnp-rpc still holds.
    held_bytes: Rc<Cell<usize>>,
    /// The server's metrics, when this connection reports to them.
    metrics: RefCell<Option<std::sync::Arc<crate::Metrics>>>,
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
            *self.peer_abort.borrow_mut() = Some(reason.clone());
        }
        let mut slot = self.abort.borrow_mut();
        if slot.is_none() {
            *slot = Some(reason);
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
        self.abort
            .borrow()
            .as_ref()
            .unwrap_or(&AbortReason::Closed("connection closed"))
            .to_error()
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

    fn held(&self, delta: i64) {
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

/// An incoming message as capnp-rpc sees it. Its bytes count as held (for
/// `max_inflight_bytes`) until capnp-rpc drops it, which is exact also for cancelled calls.
struct Incoming {
    /// `None` only while being dropped.
    message: Option<capnp::message::Reader<Frame>>,
    shared: Rc<ConnShared>,
    bytes: usize,
}

impl Drop for Incoming {
    fn drop(&mut self) {
        let held = &self.shared.held_bytes;
        held.set(held.get().saturating_sub(self.bytes));
        self.shared.held(-(self.bytes as i64));
        // A large frame's buffer is reused by the next large frame on this thread.
        if let Some(m) = self.message.take() {
            m.into_segments().recycle();
        }
    }
}

impl capnp_rpc::IncomingMessage for Incoming {
    fn get_body(&self) -> capnp::Result<capnp::any_pointer::Reader<'_>> {
        match &self.message {
            Some(m) => m.get_root(),
            None => Err(capnp::Error::failed(
                "capgate: message already released".into(),
            )),
        }
    }
}

/// An outgoing message being built by capnp-rpc.
struct Outgoing {
    message: Builder<HeapAllocator>,
    shared: Rc<ConnShared>,
}

impl capnp_rpc::OutgoingMessage for Outgoing {
    fn get_body(&mut self) -> capnp::Result<capnp::any_pointer::Builder<'_>> {
        self.message.get_root()
    }

    fn get_body_as_reader(&self) -> capnp::Result<capnp::any_pointer::Reader<'_>> {
        self.message.get_root_as_reader()
    }

    fn send(self: Box<Self>) -> (Promise<(), capnp::Error>, Rc<Builder<HeapAllocator>>) {
        let Self { message, shared } = *self;
        if let Ok(root) = message.get_root_as_reader() {
            let accounted = shared.core.borrow_mut().outgoing(root);
            if let Err(reason) = accounted {
                tracing::info!(%reason, "connection aborted");
                shared.abort(reason);
            }
        }
        let message = Rc::new(message);
        if let Err(reason) = shared.outbox.push(Message::Built(message.clone())) {
            tracing::info!(%reason, "connection cut off");
            shared.note_cut_off();
            shared.abort(reason);
        }
        // Completion is tracked by the outbox's byte budget, not per message.
        (Promise::ok(()), message)
    }

    fn take(self: Box<Self>) -> Builder<HeapAllocator> {
        self.message
    }

    fn size_in_words(&self) -> usize {
        self.message.size_in_words()
    }
}

struct GuardedConnection<R> {
    shared: Rc<ConnShared>,
    read: Rc<RefCell<Option<Box<ReadState<R>>>>>,
    peer_side: Side,
}

impl<R: AsyncRead + Unpin + 'static> capnp_rpc::Connection<Side> for GuardedConnection<R> {
    fn get_peer_vat_id(&self) -> Side {
        self.peer_side
    }

    fn new_outgoing_message(
        &mut self,
        first_segment_word_size: u32,
    ) -> Box<dyn capnp_rpc::OutgoingMessage> {
        // capnp-rpc asks for 1024 words (8 KiB, zero-filled) for every call it sends, whatever
        // the params; most messages need a few dozen words. A larger message simply gets a
        // second segment sized to fit.
        let words = match first_segment_word_size {
            0 => FIRST_SEGMENT_WORDS,
            n => n.min(FIRST_SEGMENT_WORDS),
        };
        Box::new(Outgoing {
            message: Builder::new(HeapAllocator::new().first_segment_words(words)),
            shared: self.shared.clone(),
        })
    }

    fn receive_incoming_message(
        &mut self,
    ) -> Promise<Option<Box<dyn capnp_rpc::IncomingMessage>>, capnp::Error> {
        let Some(mut lease) = Lease::take(&self.read) else {
            return Promise::err(capnp::Error::failed(
                "capgate: concurrent receive on one connection".into(),
            ));
        };
        // Fast path: under load, most frames are already read (many arrive per read), and
        // answering them at once saves a boxed future per message.
        loop {
            if self.shared.abort.borrow().is_some() {
                return Promise::err(self.shared.abort_error());
            }
            match lease.get().buffered_frame(&self.shared) {
                Err(e) => return Promise::err(e),
                Ok(None) => break,
                Ok(Some(frame)) => match receive(&self.shared, frame) {
                    Err(e) => return Promise::err(e),
                    Ok(Some(m)) => return Promise::ok(Some(m)),
                    Ok(None) => {}
                },
            }
        }
        let shared = self.shared.clone();
        Promise::from_future(async move {
            loop {
                let Some(frame) = lease.get().next_frame(&shared).await? else {
                    return Ok(None);
                };
                if let Some(m) = receive(&shared, frame)? {
                    return Ok(Some(m));
                }
            }
        })
    }

    fn shutdown(&mut self, _result: capnp::Result<()>) -> Promise<(), capnp::Error> {
        self.shared.outbox.close();
        let shared = self.shared.clone();
        Promise::from_future(async move {
            shared.outbox.finished().await;
            Ok(())
        })
    }
}

/// Counts a received frame and passes it through the core: `Some` to hand it to capnp-rpc,
/// `None` when the guard answered it itself.
fn receive(
    shared: &Rc<ConnShared>,
    frame: Frame,
) -> Result<Option<Box<dyn capnp_rpc::IncomingMessage>>, capnp::Error> {
    shared.stats.borrow_mut().frames_in += 1;
    let event = shared
        .core
        .borrow_mut()
        .inspect(frame, shared.held_bytes.get());
    match event.map_err(|reason| shared.fail(reason))? {
        Event::Deliver {
            message,
            wire_bytes,
        } => {
            shared.held_bytes.set(shared.held_bytes.get() + wire_bytes);
            shared.held(wire_bytes as i64);
            Ok(Some(Box::new(Incoming {
                message: Some(message),
                shared: shared.clone(),
                bytes: wire_bytes,
            })))
        }
        Event::Reply(frames) => {
            if !frames.is_empty() {
                if let Err(reason) = shared.outbox.push(Message::Encoded(frames)) {
                    tracing::info!(%reason, "connection cut off");
                    shared.note_cut_off();
                    return Err(shared.fail(reason));
                }
            }
            Ok(None)
        }
    }
}

/// capgate's `VatNetwork` for one connection (either side).
pub struct GuardedNetwork {
    make_connection: Box<dyn Fn() -> Box<dyn capnp_rpc::Connection<Side>>>,
    accepted: bool,
    side: Side,
    /// The writer, taken by `drive_until_shutdown`, which capnp-rpc calls once. Dropping the
    /// RPC system drops it, and the write half of the socket with it.
    driver: Option<Promise<(), capnp::Error>>,
}

impl capnp_rpc::VatNetwork<Side> for GuardedNetwork {
    fn connect(&mut self, host_id: Side) -> Option<Box<dyn capnp_rpc::Connection<Side>>> {
        // Two parties: every connect() names the one peer connection (capnp-rpc keeps the
        // first and drops later duplicates).
        (host_id != self.side).then(|| (self.make_connection)())
    }

    fn accept(&mut self) -> Promise<Box<dyn capnp_rpc::Connection<Side>>, capnp::Error> {
        if self.accepted {
            return Promise::from_future(futures::future::pending());
        }
        self.accepted = true;
        Promise::ok((self.make_connection)())
    }

    fn drive_until_shutdown(&mut self) -> Promise<(), capnp::Error> {
        self.driver
            .take()
            .unwrap_or_else(|| Promise::from_future(futures::future::pending()))
    }
}

/// The owner's handle on a connection: abort it, read its counters, linger after close.
pub struct ConnectionControl {
    shared: Rc<ConnShared>,
    linger: Box<dyn LingerRead>,
}

trait LingerRead {
    fn take(&self) -> Option<Box<dyn LingerState>>;
}

trait LingerState {
    fn linger<'a>(
        &'a mut self,
        time: std::time::Duration,
        max_bytes: usize,
    ) -> futures::future::LocalBoxFuture<'a, ()>;
}

impl<R: AsyncRead + Unpin + 'static> LingerRead for Rc<RefCell<Option<Box<ReadState<R>>>>> {
    fn take(&self) -> Option<Box<dyn LingerState>> {
        self.borrow_mut().take().map(|s| s as Box<dyn LingerState>)
    }
}

impl<R: AsyncRead + Unpin + 'static> LingerState for ReadState<R> {
    fn linger<'a>(
        &'a mut self,
        time: std::time::Duration,
        max_bytes: usize,
    ) -> futures::future::LocalBoxFuture<'a, ()> {
        Box::pin(ReadState::linger(self, time, max_bytes))
    }
}

impl ConnectionControl {
    /// Closes the connection: the peer gets an `Abort` with `reason`.
    pub fn abort(&self, reason: AbortReason) {
        self.shared.abort(reason);
    }

    /// Incoming calls delivered and neither returned nor finished.
    pub fn in_flight_calls(&self) -> usize {
        self.shared.core.borrow().guard().in_flight_calls()
    }

    /// The connection's guard (class, accounting, denial counters).
    pub fn guard(&self) -> std::cell::Ref<'_, Guard> {
        std::cell::Ref::map(self.shared.core.borrow(), |c| c.guard())
    }

    /// Holds the connection to another class and rate budget from now on (policy reload).
    pub fn set_class(
        &self,
        class: std::sync::Arc<capgate_policy::ClientClass>,
        rate: std::sync::Arc<dyn crate::RateLimit>,
        method_rates: Vec<Option<std::sync::Arc<dyn crate::RateLimit>>>,
    ) {
        let mut core = self.shared.core.borrow_mut();
        let guard = core.guard_mut();
        guard.set_class(class, rate);
        guard.set_method_rates(method_rates);
    }

    /// Traffic counters so far.
    pub fn stats(&self) -> ConnectionStats {
        *self.shared.stats.borrow()
    }

    /// Reports this connection's traffic, calls and in-flight work to `metrics`, and its
    /// denials to its class's `denials`, from now on (again after a reload re-matched it).
    pub fn observe(
        &self,
        metrics: std::sync::Arc<crate::Metrics>,
        denials: std::sync::Arc<crate::DenialCounters>,
    ) {
        let observer = crate::metrics::MetricsObserver::new(metrics.clone(), denials);
        self.shared
            .core
            .borrow_mut()
            .guard_mut()
            .set_observer(Box::new(observer));
        *self.shared.metrics.borrow_mut() = Some(metrics);
    }

    /// The reason the peer gave when it aborted the connection, if it did.
    pub fn peer_abort(&self) -> Option<capnp::Error> {
        self.shared
            .peer_abort
            .borrow()
            .as_ref()
            .map(AbortReason::to_error)
    }

    /// Charges what this connection queues to a client's and the server's outgoing
    /// budgets too (see `outgoing.rs`).
    pub(crate) fn share_outgoing(&self, account: std::sync::Arc<crate::outgoing::OutgoingAccount>) {
        self.shared.outbox.share(account);
    }

    /// Bytes queued for the peer and not yet written (as charged: what they hold in memory).
    pub fn queued_bytes(&self) -> usize {
        self.shared.outbox.queued_bytes()
    }

    /// After the RPC system has finished: keep reading and discarding for a short, bounded
    /// time so the peer receives our `Abort` before the socket closes (see
    /// [`Limits::linger_timeout`]).
    pub async fn linger(&self) {
        if let Some(mut state) = self.linger.take() {
            let limits = &self.shared.limits;
            state
                .linger(limits.linger_timeout, limits.max_message_bytes + 64 * 1024)
                .await;
        }
    }
}

/// Builds the `VatNetwork` for one connection over a read half and a write half.
/// The writer runs inside the RPC system (as its network's driver), so it writes only while
/// the `RpcSystem` is polled.
///
/// `side` is this end's role: the server side serves its bootstrap capability, the client
/// side asks for the server's.
pub fn new_network<R, W>(
    reader: R,
    writer: W,
    side: Side,
    limits: impl Into<std::sync::Arc<Limits>>,
    guard: Guard,
) -> (GuardedNetwork, ConnectionControl)
where
    R: AsyncRead + Unpin + 'static,
    W: AsyncWrite + Unpin + 'static,
{
    let limits = limits.into();
    let shared = Rc::new(ConnShared {
        outbox: Outbox::new(limits.max_outgoing_bytes),
        core: RefCell::new(ConnectionCore::new(&limits, guard)),
        abort: RefCell::new(None),
        abort_signal: Signal::default(),
        stats: RefCell::new(ConnectionStats::default()),
        peer_abort: RefCell::new(None),
        held_bytes: Rc::new(Cell::new(0)),
        metrics: RefCell::new(None),
        limits,
    });
    // Boxed: a receive future leases the state by moving this pointer, not the state.
    let read = Rc::new(RefCell::new(Some(Box::new(ReadState::new(reader)))));
    let peer_side = match side {
        Side::Client => Side::Server,
        Side::Server => Side::Client,
    };
    let make_connection = {
        let shared = shared.clone();
        let read = read.clone();
        Box::new(move || {
            Box::new(GuardedConnection {
                shared: shared.clone(),
                read: read.clone(),
                peer_side,
            }) as Box<dyn capnp_rpc::Connection<Side>>
        })
    };
    // The writer is the network's driver: capnp-rpc polls it among its own tasks (no task of
    // its own, so an idle connection holds no task cell for it), and the RPC system ends when
    // it has flushed and closed the stream, or failed.
    let driver = Promise::from_future(writer::run(writer, shared.clone()));
    let control = ConnectionControl {
        shared: shared.clone(),
        linger: Box::new(read),
    };
    (
        GuardedNetwork {
            make_connection,
            accepted: false,
            side,
            driver: Some(driver),
        },
        control,
    )
}
