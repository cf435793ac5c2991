//! Messages as capnp-rpc sees them: incoming ones (counted as held until dropped) and
//! outgoing ones (accounted by the core, queued in the outbox without copying).

use std::rc::Rc;

use capnp::capability::Promise;
use capnp::message::{Builder, HeapAllocator};

use super::shared::ConnShared;
use crate::core::Event;
use crate::core::Message;
use crate::framing::Frame;

/// An incoming message as capnp-rpc sees it. Its bytes count as held (for
/// `max_inflight_bytes`) until capnp-rpc drops it, which is exact also for cancelled calls.
pub(super) struct Incoming {
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
pub(super) struct Outgoing {
    pub(super) message: Builder<HeapAllocator>,
    pub(super) shared: Rc<ConnShared>,
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

/// Counts a received frame and passes it through the core: `Some` to hand it to capnp-rpc,
/// `None` when the guard answered it itself.
pub(super) fn receive(
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
