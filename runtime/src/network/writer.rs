use std::collections::VecDeque;
use std::future::Future;
use std::rc::Rc;

use capnp::message::{Builder, HeapAllocator};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::pool;
use super::shared::ConnShared;
use crate::core::{Outbox, State};
use crate::framing::encode_header;
use crate::poll::{may_poll, poll_for, PollBackoff, Polled, PollingMark};
use crate::AbortReason;

/// The writer gathers (yields to producers) at most this many times per write...
const GATHER_MAX_YIELDS: usize = 16;
/// ...and stops once this many frames or bytes are queued.
const GATHER_FRAMES: usize = 8;
const GATHER_BYTES: usize = 64 * 1024;
/// After this many writes in a row for which gathering found nothing to add, it stops...
const GATHER_PATIENCE: u32 = 8;
/// ...and is tried again only every this many writes.
const GATHER_PROBE_EVERY: u32 = 8;

/// Writes queued messages, coalescing everything queued into one write, until the outbox is
/// closed (then flushes and shuts the stream down) or fails.
pub(super) async fn run<W: AsyncWrite + Unpin>(
    mut stream: W,
    shared: Rc<ConnShared>,
) -> Result<(), capnp::Error> {
    let result = write_loop(&mut stream, &shared).await;
    shared.outbox.set_done();
    result.map_err(|reason| {
        let e = reason.to_error();
        shared.abort(reason);
        e
    })
}

async fn write_loop<W: AsyncWrite + Unpin>(
    stream: &mut W,
    shared: &ConnShared,
) -> Result<(), AbortReason> {
    let outbox = &shared.outbox;
    let limits = &shared.limits;
    let mut buf: Vec<u8> = Vec::new();
    // Consecutive writes for which gathering found nothing to add.
    let mut misses: u32 = 0;
    let mut batches: u32 = 0;
    let mut backoff = PollBackoff::default();
    loop {
        match outbox.state.get() {
            State::Failed => return Ok(()),
            State::Open | State::Closing => {}
        }
        if let Some(reason) = outbox.cut_off_reason() {
            return Err(cut_off(shared, reason));
        }
        // Gather: while the queue keeps growing, let the tasks that produce messages run
        // before writing, so that one write carries many frames. Under light load yielding
        // finds nothing new and only adds latency, so it is skipped until a periodic probe
        // sees the queue grow again.
        let queued = !outbox.queue.borrow().is_empty();
        if queued && (misses < GATHER_PATIENCE || batches % GATHER_PROBE_EVERY == 0) {
            if gather(outbox).await {
                misses = 0;
            } else {
                misses = misses.saturating_add(1);
            }
        }
        if queued {
            batches = batches.wrapping_add(1);
        }
        if buf.capacity() == 0 && !outbox.queue.borrow().is_empty() {
            buf = pool::take_write();
        }
        let transmit = outbox.poll_transmit(&mut buf);
        let (batch_charge, batch_frames, large) = match transmit {
            Some(t) => (t.charge, t.frames, t.large),
            None => (0, 0, None),
        };
        if batch_charge == 0 {
            if outbox.state.get() == State::Closing {
                // Boxed: its timer would otherwise enlarge every connection's writer.
                let shutdown = Box::pin(tokio::time::timeout(
                    limits.write_timeout,
                    stream.shutdown(),
                ));
                let _ = shutdown.await;
                return Ok(());
            }
            // Idle: the coalescing buffer goes back to the worker's pool, and the empty queue
            // gives its slots back (an idle connection holds neither).
            pool::give_write(std::mem::take(&mut buf));
            *outbox.queue.borrow_mut() = VecDeque::new();
            if batches > 0 {
                let budget = if !limits.busy_poll.is_zero() {
                    Some(limits.busy_poll)
                } else {
                    // An answer to our call is due, or the peer (which calls us) may follow
                    // our answer with its next call.
                    let due = if shared.awaiting_answers() > 0 {
                        limits.answer_poll
                    } else if shared.calls_received() > 0 {
                        limits.call_poll
                    } else {
                        std::time::Duration::ZERO
                    };
                    (!due.is_zero() && backoff.ready()).then_some(due)
                };
                if let Some(budget) = budget.filter(|_| may_poll(limits.poll_when_busy)) {
                    let polled = busy_poll(shared, budget).await;
                    if polled != Polled::Skipped {
                        shared.note_poll(polled == Polled::Hit);
                    }
                    if limits.busy_poll.is_zero() {
                        backoff.record(polled);
                    }
                }
            }
            outbox.wake.wait().await;
            continue;
        }
        let written = {
            let write = async {
                match &large {
                    None => stream.write_all(&buf).await?,
                    Some(msg) => write_large(stream, &buf, msg).await?,
                }
                stream.flush().await
            };
            // Polled in place (a helper `async fn` would hold a second copy of the write).
            let mut write = std::pin::pin!(write);
            let mut timer = None;
            let written = std::future::poll_fn(|cx| {
                poll_with_deadline(write.as_mut(), cx, &mut timer, shared)
            })
            .await;
            shared.core.borrow_mut().write_done();
            written
        };
        match written {
            Written::Done(Ok(())) => {}
            Written::Done(Err(e)) => {
                // The peer is gone. Stop writing, but let the reader see the peer's last
                // words (often an Abort with the reason) before the connection ends.
                tracing::debug!(cause = %e, "write failed");
                outbox.fail();
                return Ok(());
            }
            Written::Cut => {
                return match outbox.cut_off_reason() {
                    Some(reason) => Err(cut_off(shared, reason)),
                    None => Ok(()),
                }
            }
            Written::TimedOut(reason) => {
                outbox.fail();
                return Err(reason);
            }
        }
        let wire_bytes = buf.len() + large.as_ref().map_or(0, |m| frame_len(m));
        buf.clear();
        outbox.sent(batch_charge);
        shared.note_sent(batch_frames, wire_bytes);
    }
}

/// Bytes on the wire of a message built by capnp-rpc.
fn frame_len(m: &Builder<HeapAllocator>) -> usize {
    crate::framing::frame_len(&m.get_segments_for_output())
}

/// Another connection's push exceeded a shared outgoing budget and picked this one, the
/// largest holder: drop what is queued and close with the reason.
fn cut_off(shared: &ConnShared, reason: AbortReason) -> AbortReason {
    tracing::info!(%reason, "connection cut off");
    shared.note_cut_off();
    shared.outbox.fail();
    reason
}

enum Written {
    Done(std::io::Result<()>),
    /// The outbox failed meanwhile: the write was abandoned.
    Cut,
    TimedOut(AbortReason),
}

/// After a write: keeps the thread polling the socket instead of sleeping, until bytes
/// arrive, something is queued to send, the outbox closes, `budget` has passed, or another
/// thread needed the core (`poll::poll_for`, which yields to the runtime each round: the
/// reader sees the peer's answer as soon as it arrives, other tasks are not held up). Boxed,
/// and only when it polls: inline, the poll's state would enlarge every connection's writer.
async fn busy_poll(shared: &ConnShared, budget: std::time::Duration) -> Polled {
    let Some(_mark) = PollingMark::take() else {
        return Polled::Skipped;
    };
    let received = shared.bytes_received();
    let outbox = &shared.outbox;
    let check = || {
        if shared.bytes_received() != received {
            Some(Polled::Hit)
        } else if !outbox.queue.borrow().is_empty() || outbox.state.get() != State::Open {
            Some(Polled::Interrupted)
        } else {
            None
        }
    };
    Box::pin(poll_for(budget, shared.limits.poll_when_busy, check))
        .await
        .unwrap_or(Polled::Miss)
}

/// Polls `write` until it completes, `cut` is signalled, or it has been blocked for
/// `timeout`. The timer is made only once the socket blocks, and dropped with the write: a
/// write that completes at once (nearly all of them) costs no timer, and the writer's future
/// stays small while it waits for messages.
fn poll_with_deadline(
    write: std::pin::Pin<&mut impl Future<Output = std::io::Result<()>>>,
    cx: &mut std::task::Context<'_>,
    timer: &mut Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    shared: &ConnShared,
) -> std::task::Poll<Written> {
    use std::task::Poll;
    if let Poll::Ready(r) = write.poll(cx) {
        return Poll::Ready(Written::Done(r));
    }
    // Blocked: the peer is not reading. Another thread may pick this connection to cut off.
    let outbox = &shared.outbox;
    outbox.register_cut_waker(cx.waker());
    if outbox.cut.poll_wait(cx).is_ready() || outbox.cut_off_reason().is_some() {
        return Poll::Ready(Written::Cut);
    }
    // The core decides the deadline; the timer is armed only once a write blocks.
    let timer = timer.get_or_insert_with(|| {
        let now = || tokio::time::Instant::now().into_std();
        let at = shared.core.borrow_mut().write_blocked(now);
        Box::pin(tokio::time::sleep_until(at.into()))
    });
    if timer.as_mut().poll(cx).is_ready() {
        let checked = shared
            .core
            .borrow()
            .check_write(tokio::time::Instant::now().into_std());
        if let Err(reason) = checked {
            return Poll::Ready(Written::TimedOut(reason));
        }
        // Early by the core's clock: wait for the deadline it gives (the write's start is
        // known, so no clock is read).
        let at = shared
            .core
            .borrow_mut()
            .write_blocked(std::time::Instant::now);
        timer.as_mut().reset(at.into());
        let _ = timer.as_mut().poll(cx);
    }
    Poll::Pending
}

/// Writes what is coalesced, then a large frame's segment table and its segments (not
/// copied), in as few `writev`s as the socket takes. Boxed from a plain fn: large frames are
/// rare, and their write state would otherwise enlarge every connection's writer.
fn write_large<'a, W: AsyncWrite + Unpin>(
    stream: &'a mut W,
    buf: &'a [u8],
    msg: &'a Builder<HeapAllocator>,
) -> std::pin::Pin<Box<dyn Future<Output = std::io::Result<()>> + 'a>> {
    Box::pin(async move {
        let segments = msg.get_segments_for_output();
        let mut header = Vec::with_capacity(8 + 4 * segments.len());
        encode_header(&mut header, &segments);
        let mut parts = Vec::with_capacity(2 + segments.len());
        parts.push(buf);
        parts.push(&header[..]);
        parts.extend(segments.iter().copied());
        write_all_vectored(stream, &parts).await
    })
}

/// Yields while the queue grows; returns whether there is load worth gathering for (the
/// queue grew, or was already full enough).
async fn gather(outbox: &Outbox) -> bool {
    let mut seen = outbox.queue.borrow().len();
    let mut grew = false;
    for _ in 0..GATHER_MAX_YIELDS {
        if seen == 0 || seen >= GATHER_FRAMES || outbox.queued_bytes.get() >= GATHER_BYTES {
            break;
        }
        yield_to_local_tasks().await;
        let now = outbox.queue.borrow().len();
        if now == seen {
            break;
        }
        grew = true;
        seen = now;
    }
    grew || seen >= GATHER_FRAMES
}

/// Returns `Pending` once after asking to be polled again: the task goes to the back of the
/// `LocalSet` queue, behind the tasks that are ready now (unlike `tokio::task::yield_now`,
/// which waits for the I/O driver to be polled first).
async fn yield_to_local_tasks() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            std::task::Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    })
    .await;
}

/// Writes every byte of `parts` in order, with vectored writes.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    stream: &mut W,
    parts: &[&[u8]],
) -> std::io::Result<()> {
    let mut slices: Vec<std::io::IoSlice<'_>> = parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| std::io::IoSlice::new(p))
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = stream.write_vectored(rest).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        std::io::IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// Takes at most 3 bytes per write, so every slice boundary is crossed mid-write.
    struct Trickle(Vec<u8>);

    impl tokio::io::AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let n = buf.len().min(3);
            self.0.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn vectored_writes_deliver_every_byte_in_order() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let parts: [&[u8]; 4] = [b"", b"abcde", b"f", b"ghijklmnop"];
        let mut w = Trickle(Vec::new());
        rt.block_on(super::write_all_vectored(&mut w, &parts))
            .unwrap();
        assert_eq!(w.0, b"abcdefghijklmnop");
    }
}
