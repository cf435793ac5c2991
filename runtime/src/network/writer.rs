use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

use capnp::message::{Builder, HeapAllocator};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::connection::ConnShared;
use super::signal::Signal;
use crate::framing::{encode_frame, encode_header, frame_len};
use crate::limits::fmt_bytes;

/// Messages larger than this skip the coalescing buffer (their segments are written as is).
const DIRECT_WRITE_BYTES: usize = 64 * 1024;
/// The writer gathers (yields to producers) at most this many times per write...
const GATHER_MAX_YIELDS: usize = 16;
/// ...and stops once this many frames or bytes are queued.
const GATHER_FRAMES: usize = 8;
const GATHER_BYTES: usize = 64 * 1024;
/// After this many writes in a row for which gathering found nothing to add, it stops...
const GATHER_PATIENCE: u32 = 8;
/// ...and is tried again only every this many writes.
const GATHER_PROBE_EVERY: u32 = 8;
/// The coalescing buffer is released while idle if it grew beyond this.
const KEEP_BUFFER_BYTES: usize = 16 * 1024;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Open,
    /// Shutdown requested: flush what is queued, then close.
    Closing,
    /// Cut off or the socket failed: drop everything.
    Failed,
}

pub(super) type Message = Rc<Builder<HeapAllocator>>;

/// The outgoing queue of one connection, bounded in bytes.
pub(super) struct Outbox {
    queue: RefCell<VecDeque<(Message, usize)>>,
    queued_bytes: Cell<usize>,
    max_bytes: usize,
    state: Cell<State>,
    wake: Signal,
    /// Signalled when the outbox fails: abandons a write in progress.
    cut: Signal,
    done: Cell<bool>,
    done_notify: tokio::sync::Notify,
}

impl Outbox {
    pub(super) fn new(max_bytes: usize) -> Self {
        Self {
            queue: RefCell::new(VecDeque::new()),
            queued_bytes: Cell::new(0),
            max_bytes,
            state: Cell::new(State::Open),
            wake: Signal::default(),
            cut: Signal::default(),
            done: Cell::new(false),
            done_notify: tokio::sync::Notify::new(),
        }
    }

    /// Queues a message. Returns an error (and fails the outbox) when the byte budget would
    /// be exceeded: the peer is not reading what we send.
    pub(super) fn push(&self, msg: Message) -> Result<(), capnp::Error> {
        if self.state.get() != State::Open {
            return Ok(());
        }
        let bytes = frame_len(&msg.get_segments_for_output());
        let queued = self.queued_bytes.get();
        if queued > 0 && queued + bytes > self.max_bytes {
            self.fail();
            return Err(capnp::Error::failed(format!(
                "capgate: peer is not reading: {} queued for it would exceed \
                 max_outgoing_bytes = {}; the connection is cut off",
                fmt_bytes((queued + bytes) as u64),
                fmt_bytes(self.max_bytes as u64)
            )));
        }
        self.queued_bytes.set(queued + bytes);
        let mut q = self.queue.borrow_mut();
        q.push_back((msg, bytes));
        if q.len() == 1 {
            self.wake.notify();
        }
        Ok(())
    }

    /// Bytes queued or being written.
    pub(super) fn queued_bytes(&self) -> usize {
        self.queued_bytes.get()
    }

    /// Flush what is queued, then close the write side.
    pub(super) fn close(&self) {
        if self.state.get() == State::Open {
            self.state.set(State::Closing);
        }
        self.wake.notify();
    }

    /// Drop everything queued, abandon a write in progress, and close.
    pub(super) fn fail(&self) {
        self.state.set(State::Failed);
        self.queue.borrow_mut().clear();
        self.queued_bytes.set(0);
        self.wake.notify();
        self.cut.notify();
    }

    /// Resolves once the writer has finished (any number of waiters).
    pub(super) async fn finished(&self) {
        loop {
            let mut notified = std::pin::pin!(self.done_notify.notified());
            notified.as_mut().enable();
            if self.done.get() {
                return;
            }
            notified.await;
        }
    }

    fn set_done(&self) {
        self.done.set(true);
        self.done_notify.notify_waiters();
    }
}

/// Writes queued messages, coalescing everything queued into one write, until the outbox is
/// closed (then flushes and shuts the stream down) or fails.
pub(super) async fn run<W: AsyncWrite + Unpin>(
    mut stream: W,
    shared: Rc<ConnShared>,
) -> Result<(), capnp::Error> {
    let result = write_loop(&mut stream, &shared).await;
    if let Err(e) = &result {
        shared.abort(e.clone());
    }
    shared.outbox.set_done();
    result
}

async fn write_loop<W: AsyncWrite + Unpin>(
    stream: &mut W,
    shared: &ConnShared,
) -> Result<(), capnp::Error> {
    let outbox = &shared.outbox;
    let limits = &shared.limits;
    let mut buf: Vec<u8> = Vec::new();
    // Consecutive writes for which gathering found nothing to add.
    let mut misses: u32 = 0;
    let mut batches: u32 = 0;
    loop {
        match outbox.state.get() {
            State::Failed => return Ok(()),
            State::Open | State::Closing => {}
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
        let mut batch_bytes = 0usize;
        let mut batch_frames = 0u64;
        let mut large: Option<Message> = None;
        {
            let mut q = outbox.queue.borrow_mut();
            while let Some((msg, bytes)) = q.pop_front() {
                batch_bytes += bytes;
                batch_frames += 1;
                if bytes >= DIRECT_WRITE_BYTES {
                    large = Some(msg);
                    break;
                }
                encode_frame(&mut buf, &msg.get_segments_for_output());
            }
        }
        if batch_bytes == 0 {
            if outbox.state.get() == State::Closing {
                let _ = tokio::time::timeout(limits.write_timeout, stream.shutdown()).await;
                return Ok(());
            }
            if buf.capacity() > KEEP_BUFFER_BYTES {
                buf = Vec::new();
            }
            outbox.wake.wait().await;
            continue;
        }
        let write = async {
            if !buf.is_empty() {
                stream.write_all(&buf).await?;
            }
            if let Some(msg) = &large {
                let segments = msg.get_segments_for_output();
                let mut header = Vec::with_capacity(8 + 4 * segments.len());
                encode_header(&mut header, &segments);
                stream.write_all(&header).await?;
                for s in segments.iter() {
                    stream.write_all(s).await?;
                }
            }
            stream.flush().await
        };
        let written = tokio::select! {
            r = tokio::time::timeout(limits.write_timeout, write) => r,
            () = outbox.cut.wait() => return Ok(()),
        };
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                // The peer is gone. Stop writing, but let the reader see the peer's last
                // words (often an Abort with the reason) before the connection ends.
                tracing::debug!(cause = %e, "write failed");
                outbox.fail();
                return Ok(());
            }
            Err(_) => {
                outbox.fail();
                return Err(capnp::Error::failed(format!(
                    "capgate: a write to the peer stalled for {:?} (write_timeout); \
                     the connection is cut off",
                    limits.write_timeout
                )));
            }
        }
        buf.clear();
        let q = outbox.queued_bytes.get();
        outbox.queued_bytes.set(q.saturating_sub(batch_bytes));
        shared.note_sent(batch_frames, batch_bytes);
    }
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
