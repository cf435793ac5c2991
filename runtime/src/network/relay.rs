//! The gateway's shell: a client connection joined to its own upstream connection, each a
//! connection core with the server's reader and writer. Client frames pass the client core's
//! guard (`inspect`) and go upstream as read; upstream frames pass its accounting
//! (`outgoing`) and go to the client as read. No RpcSystem: the two end vats own the
//! protocol's tables, ids pass through unchanged.

use std::cell::RefCell;
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use capnp_rpc::rpc_capnp::message;
use tokio::io::{AsyncRead, AsyncWrite};

use super::control::ConnectionControl;
use super::reader::{Lease, ReadState};
use super::shared::ConnShared;
use super::writer;
use crate::core::{abort_frame, peer_abort, ConnectionCore, Event, Message};
use crate::guard::{unimplemented, Guard, Refusal};
use crate::upstream::Streams;
use crate::{AbortReason, Limits};

/// The client's stream pauses while this much is queued toward the upstream (it stopped
/// reading: TCP semantics, bounded by the upstream's `write_timeout`).
const PAUSE_BYTES: usize = 256 * 1024;

/// A relayed connection, from connecting upstream until both sides are closed.
pub(crate) type RelayFuture = std::pin::Pin<Box<dyn Future<Output = Result<(), capnp::Error>>>>;

type ReadSlot<R> = Rc<RefCell<Option<Box<ReadState<R>>>>>;

/// How one pair ended.
enum End {
    /// The client closed its side between frames.
    ClientClosed,
    /// The client side's core or shell recorded why (in `ConnShared::abort`).
    Recorded,
    /// Close with this reason (not recorded yet).
    Close(AbortReason),
}

/// Builds a relayed connection for a client: the future connects to the upstream with
/// `connect` and relays until either side ends; the control is the client side's.
pub(crate) fn new_relay<R, W, C>(
    reader: R,
    writer: W,
    limits: Arc<Limits>,
    guard: Guard,
    upstream: Arc<str>,
    connect: C,
) -> (RelayFuture, ConnectionControl)
where
    R: AsyncRead + Unpin + 'static,
    W: AsyncWrite + Unpin + 'static,
    C: Future<Output = Result<Streams, String>> + 'static,
{
    let client = ConnShared::new(limits.clone(), ConnectionCore::new(&limits, guard));
    let read: ReadSlot<R> = Rc::new(RefCell::new(Some(Box::new(ReadState::new(reader)))));
    let control = ConnectionControl {
        shared: client.clone(),
        linger: Box::new(read.clone()),
    };
    let run = Box::pin(async move {
        let writing = writer::run(writer, client.clone());
        let relaying = relay(&client, &read, &limits, &upstream, connect);
        let ((), relayed) = futures::join!(
            async {
                let _ = writing.await;
            },
            relaying
        );
        relayed
    });
    (run, control)
}

async fn relay<R, C>(
    client: &Rc<ConnShared>,
    read: &ReadSlot<R>,
    limits: &Arc<Limits>,
    upstream: &Arc<str>,
    connect: C,
) -> Result<(), capnp::Error>
where
    R: AsyncRead + Unpin + 'static,
    C: Future<Output = Result<Streams, String>>,
{
    let Some(mut lease) = Lease::take(read) else {
        return Err(capnp::Error::failed("capgate: relay started twice".into()));
    };
    // Connecting is bounded by the upstream's connect timeout; a shutdown ends it early.
    let connected = tokio::select! {
        biased;
        () = client.aborted() => None,
        r = connect => Some(r),
    };
    let end = match connected {
        None => End::Recorded,
        Some(Err(error)) => End::Close(AbortReason::UpstreamUnreachable {
            upstream: upstream.to_string(),
            error,
        }),
        Some(Ok((up_read, up_write))) => {
            let up_limits = Arc::new(Limits {
                max_outgoing_bytes: PAUSE_BYTES + limits.max_message_bytes + 64 * 1024,
                // The client side polls for its next call (as in serve); the upstream side
                // has no calls of its own to wait for.
                busy_poll: Duration::ZERO,
                answer_poll: Duration::ZERO,
                call_poll: Duration::ZERO,
                ..Limits::clone(limits)
            });
            // The client side's idle check covers the pair: calls in flight count there.
            let core = ConnectionCore::new(&up_limits, Guard::allow_all()).without_idle_check();
            let up = ConnShared::new(up_limits, core);
            let mut up_lease = ReadState::new(up_read);
            let up_writing = writer::run(up_write, up.clone());
            let mut up_writing = std::pin::pin!(up_writing);
            let pumps = async {
                tokio::select! {
                    end = client_to_upstream(client, lease.get(), &up, upstream) => end,
                    end = upstream_to_client(client, &mut up_lease, &up, upstream) => end,
                }
            };
            let mut pumps = std::pin::pin!(pumps);
            let mut up_written = false;
            let end = loop {
                tokio::select! {
                    end = &mut pumps => break end,
                    _ = &mut up_writing, if !up_written => up_written = true,
                }
            };
            // The upstream hears only that the client is gone: nothing the gateway sends it
            // is its own.
            match &end {
                End::Close(AbortReason::Upstream { .. } | AbortReason::UpstreamAborted { .. }) => {
                    up.outbox.fail()
                }
                _ => up.outbox.close(),
            }
            if !up_written {
                let _ = up_writing.await;
            }
            end
        }
    };
    drop(lease);
    let result = match end {
        End::ClientClosed => Ok(()),
        End::Recorded => Err(client.abort_error()),
        End::Close(reason) => {
            if !matches!(reason, AbortReason::UpstreamClosed { .. }) {
                tracing::info!(%reason, "relayed connection closed");
            }
            Err(client.fail(reason))
        }
    };
    if let Err(e) = &result {
        // Best effort: an outbox that failed (cut off) takes nothing more.
        let _ = client.outbox.push(Message::Encoded(abort_frame(e)));
    }
    client.outbox.close();
    result
}

/// Client -> upstream: every frame through the guard; what it delivers goes upstream as
/// read, what it answers goes back to the client.
async fn client_to_upstream<R: AsyncRead + Unpin>(
    client: &ConnShared,
    read: &mut ReadState<R>,
    up: &ConnShared,
    upstream: &Arc<str>,
) -> End {
    loop {
        while up.outbox.queued_bytes() >= PAUSE_BYTES {
            tokio::select! {
                biased;
                () = client.aborted() => return End::Recorded,
                () = up.outbox.space.wait() => {}
            }
        }
        let frame = match read.next_frame(client).await {
            Ok(Some(frame)) => frame,
            Ok(None) => return End::ClientClosed,
            Err(_) => return End::Recorded,
        };
        client.stats.borrow_mut().frames_in += 1;
        let event = client
            .core
            .borrow_mut()
            .inspect_relayed(frame, up.outbox.queued_bytes());
        match event {
            Err(reason) => return End::Close(reason),
            Ok(Event::Reply(frames)) => {
                if frames.is_empty() {
                    continue;
                }
                if let Err(reason) = client.outbox.push(Message::Encoded(frames)) {
                    client.note_cut_off();
                    return End::Close(reason);
                }
            }
            Ok(Event::Deliver { message, .. }) => {
                if let Err(reason) = up.outbox.push(Message::Relayed(message.into_segments())) {
                    return End::Close(upstream_fault(upstream, reason));
                }
            }
        }
    }
}

/// Upstream -> client: every frame through the client guard's outgoing accounting, then to
/// the client as read.
async fn upstream_to_client<R: AsyncRead + Unpin>(
    client: &ConnShared,
    read: &mut ReadState<R>,
    up: &ConnShared,
    upstream: &Arc<str>,
) -> End {
    loop {
        let frame = match read.next_frame(up).await {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                return End::Close(AbortReason::UpstreamClosed {
                    upstream: upstream.to_string(),
                })
            }
            Err(e) => {
                let reason = up
                    .abort
                    .borrow()
                    .as_deref()
                    .cloned()
                    .unwrap_or(AbortReason::ReadFailed(e.extra));
                return End::Close(upstream_fault(upstream, reason));
            }
        };
        up.stats.borrow_mut().frames_in += 1;
        let message = up.core.borrow().open(frame);
        let accounted = match message.get_root::<message::Reader<'_>>() {
            Err(e) => Err(upstream_fault(
                upstream,
                AbortReason::Unsupported {
                    what: format!("a message that is not an rpc message ({e})"),
                },
            )),
            Ok(root) if root.has_abort() => Err(match peer_abort(root) {
                AbortReason::PeerAborted { kind, reason } => AbortReason::UpstreamAborted {
                    upstream: upstream.to_string(),
                    kind,
                    reason,
                },
                other => upstream_fault(upstream, other),
            }),
            Ok(root) => match client.core.borrow_mut().outgoing_relayed(root) {
                Ok(None) => Ok(None),
                Ok(Some(refusal)) => answer(refusal, root)
                    .map(Some)
                    .map_err(|reason| upstream_fault(upstream, reason)),
                Err(reason) => Err(reason.relayed_from(upstream)),
            },
        };
        match accounted {
            Err(reason) => return End::Close(reason),
            Ok(Some(echo)) => {
                // Answered to the upstream; nothing reaches the client.
                if let Err(reason) = up.outbox.push(Message::Encoded(echo)) {
                    return End::Close(upstream_fault(upstream, reason));
                }
                continue;
            }
            Ok(None) => {}
        }
        if let Err(reason) = client
            .outbox
            .push(Message::Relayed(message.into_segments()))
        {
            client.note_cut_off();
            return End::Close(reason);
        }
    }
}

/// The frame answering a refused message: its `Unimplemented` echo, or the reason to close.
fn answer(refusal: Refusal, root: message::Reader<'_>) -> Result<Box<[u8]>, AbortReason> {
    match refusal {
        Refusal::Abort(reason) => Err(reason),
        Refusal::Unimplemented => unimplemented(root).map_err(|e| AbortReason::Unsupported {
            what: format!("a message that cannot be echoed as Unimplemented ({e})"),
        }),
    }
}

fn upstream_fault(upstream: &Arc<str>, reason: AbortReason) -> AbortReason {
    AbortReason::Upstream {
        upstream: upstream.to_string(),
        reason: Box::new(reason),
    }
}
