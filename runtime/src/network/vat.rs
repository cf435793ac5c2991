//! capgate's `VatNetwork` over one stream: capnp-rpc's view of a connection, and how one is
//! built from a read half, a write half and a guard.

use std::cell::RefCell;
use std::rc::Rc;

use capnp::capability::Promise;
use capnp::message::{Builder, HeapAllocator};
use capnp_rpc::rpc_twoparty_capnp::Side;
use tokio::io::{AsyncRead, AsyncWrite};

use super::control::ConnectionControl;
use super::messages::{receive, Outgoing};
use super::reader::{Lease, ReadState};
use super::shared::ConnShared;
use super::writer;
use crate::core::ConnectionCore;
use crate::core::FIRST_SEGMENT_WORDS;
use crate::guard::Guard;
use crate::Limits;

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
    let core = ConnectionCore::new(&limits, guard);
    let shared = ConnShared::new(limits, core);
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
