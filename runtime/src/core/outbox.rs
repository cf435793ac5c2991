//! The outgoing queue of one connection, bounded in bytes, each message charged by what it
//! holds in memory (not by its encoded size).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;

use capnp::message::{Builder, HeapAllocator};

use super::signal::Signal;
use crate::framing::{encode_frame, Frame};
use crate::outgoing::OutgoingAccount;
use crate::{AbortReason, BudgetScope};

/// The largest first segment of an outgoing message, in words (512 B): room for a call with
/// about 400 B of params. Larger params get a second segment sized to fit. Kept well under
/// glibc's large-bin threshold (1008 B): `HeapAllocator` zero-allocates with `calloc`, which
/// skips the thread cache, and a large-bin request first merges every freed fast-bin chunk.
/// With 128 words (1 KiB) that cost the client 2-3% of its instructions per call (callgrind).
pub(crate) const FIRST_SEGMENT_WORDS: u32 = 64;

/// Messages larger than this skip the coalescing buffer (their segments are written as is).
const DIRECT_WRITE_BYTES: usize = 64 * 1024;
/// One write coalesces at most about this much: the buffer is a copy of what it carries, so
/// copying a whole long queue would double what the queue holds.
const MAX_BATCH_BYTES: usize = 256 * 1024;

/// One write's worth of queued messages (see [`Outbox::poll_transmit`]).
pub(crate) struct Transmit {
    /// What the messages were charged, to give back once written.
    pub(crate) charge: usize,
    /// Frames in it.
    pub(crate) frames: u64,
    /// A large message to write after the buffer, from its own segments.
    pub(crate) large: Option<Rc<Builder<HeapAllocator>>>,
}

/// What a queued message costs beyond its buffers (its queue slot, the builder's bookkeeping).
const MESSAGE_OVERHEAD_BYTES: usize = 64;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum State {
    Open,
    /// Shutdown requested: flush what is queued, then close.
    Closing,
    /// Cut off or the socket failed: drop everything.
    Failed,
}

/// One queued message.
pub(crate) enum Message {
    /// Built by capnp-rpc (which may keep a reference: a Return's results serve pipelined
    /// calls until the peer's Finish).
    Built(Rc<Builder<HeapAllocator>>),
    /// Frames the guard wrote, already encoded (see `guard/reply.rs`).
    Encoded(Box<[u8]>),
    /// A frame read from the other side of a relay, forwarded as read.
    Relayed(Frame),
}

impl Message {
    /// Bytes it holds in memory: the segments as allocated, not as used.
    pub(crate) fn charge(&self) -> usize {
        MESSAGE_OVERHEAD_BYTES
            + match self {
                Message::Built(m) => 8 * allocated_words(&m.get_segments_for_output()),
                Message::Encoded(b) => b.len(),
                Message::Relayed(f) => f.heap_bytes(),
            }
    }

    /// Appends its frames to `out`.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Message::Built(m) => encode_frame(out, &m.get_segments_for_output()),
            Message::Encoded(b) => out.extend_from_slice(b),
            Message::Relayed(f) => f.encode(out),
        }
    }
}

/// An upper bound of the words `HeapAllocator` allocated for a message of these segments,
/// built with a first segment of at most `FIRST_SEGMENT_WORDS`. It sizes each segment as
/// `max(needed, next)`, `next` growing by every segment's size, and a segment holds at least
/// what it was allocated for, so `max(used, next)` bounds each one.
pub(crate) fn allocated_words(segments: &[&[u8]]) -> usize {
    let mut next = FIRST_SEGMENT_WORDS as usize;
    let mut total = 0usize;
    for s in segments {
        let size = (s.len() / 8).max(next);
        total = total.saturating_add(size);
        next = next.saturating_add(size);
    }
    total
}

/// The outgoing queue of one connection, bounded in bytes.
pub(crate) struct Outbox {
    pub(crate) queue: RefCell<VecDeque<(Message, usize)>>,
    /// The charge of what is queued or being written.
    pub(crate) queued_bytes: Cell<usize>,
    max_bytes: usize,
    pub(crate) state: Cell<State>,
    pub(crate) wake: Signal,
    /// Signalled when the outbox fails: abandons a write in progress.
    pub(crate) cut: Signal,
    /// Signalled when a write completed or the outbox failed: a relay paused on this
    /// outbox's fill level looks again.
    pub(crate) space: Signal,
    done: Cell<bool>,
    done_notify: tokio::sync::Notify,
    /// The connection's share of its client's and the server's outgoing budgets, if it
    /// counts in them (server connections).
    account: RefCell<Option<Arc<OutgoingAccount>>>,
}

impl Outbox {
    pub(crate) fn new(max_bytes: usize) -> Self {
        Self {
            queue: RefCell::new(VecDeque::new()),
            queued_bytes: Cell::new(0),
            max_bytes,
            state: Cell::new(State::Open),
            wake: Signal::default(),
            cut: Signal::default(),
            space: Signal::default(),
            done: Cell::new(false),
            done_notify: tokio::sync::Notify::new(),
            account: RefCell::new(None),
        }
    }

    /// Charges what this connection queues to `account` too, from now on.
    pub(crate) fn share(&self, account: Arc<OutgoingAccount>) {
        *self.account.borrow_mut() = Some(account);
    }

    /// Queues a message. Returns an error (and fails the outbox) when a byte budget would
    /// be exceeded: the peer is not reading what we send.
    pub(crate) fn push(&self, msg: Message) -> Result<(), AbortReason> {
        if self.state.get() != State::Open {
            return Ok(());
        }
        let bytes = msg.charge();
        let queued = self.queued_bytes.get();
        if queued > 0 && queued + bytes > self.max_bytes {
            self.fail();
            return Err(AbortReason::NotReading {
                scope: BudgetScope::Connection,
                queued: queued + bytes,
                limit: self.max_bytes,
                held: queued + bytes,
            });
        }
        if let Some(account) = &*self.account.borrow() {
            if let Err(reason) = account.reserve(queued + bytes) {
                self.fail();
                return Err(reason);
            }
        }
        self.queued_bytes.set(queued + bytes);
        let mut q = self.queue.borrow_mut();
        q.push_back((msg, bytes));
        if q.len() == 1 {
            self.wake.notify();
        }
        Ok(())
    }

    /// Moves queued messages into `buf`, encoded, for one write: until `buf` holds
    /// `MAX_BATCH_BYTES`, or a message of `DIRECT_WRITE_BYTES` or more comes up, which is
    /// returned to be written from its own segments after `buf` (no copy). `None` when nothing
    /// is queued. Report the write with [`Outbox::sent`] and the transmit's `charge`.
    pub(crate) fn poll_transmit(&self, buf: &mut Vec<u8>) -> Option<Transmit> {
        let mut q = self.queue.borrow_mut();
        if q.is_empty() {
            return None;
        }
        let mut t = Transmit {
            charge: 0,
            frames: 0,
            large: None,
        };
        while buf.len() < MAX_BATCH_BYTES {
            let Some((msg, charge)) = q.pop_front() else {
                break;
            };
            t.charge += charge;
            t.frames += 1;
            if let Message::Built(m) = &msg {
                if charge >= DIRECT_WRITE_BYTES {
                    t.large = Some(m.clone());
                    break;
                }
            }
            msg.encode(buf);
            // A relayed frame's buffer is reused by the next large frame read on this thread.
            if let Message::Relayed(f) = msg {
                f.recycle();
            }
        }
        Some(t)
    }

    /// A batch of `charge` bytes was written.
    pub(crate) fn sent(&self, charge: usize) {
        let q = self.queued_bytes.get().saturating_sub(charge);
        self.queued_bytes.set(q);
        if let Some(account) = &*self.account.borrow() {
            account.settle(q);
        }
        self.space.notify();
    }

    /// The reason this connection was cut off to keep its client or the server within
    /// their outgoing budgets, if it was.
    pub(crate) fn cut_off_reason(&self) -> Option<AbortReason> {
        self.account.borrow().as_ref().and_then(|a| a.cut_reason())
    }

    /// Lets a cut-off decided on another thread wake the writer blocked on this connection.
    pub(crate) fn register_cut_waker(&self, waker: &std::task::Waker) {
        if let Some(account) = &*self.account.borrow() {
            account.register(waker);
        }
    }

    /// Bytes queued or being written.
    pub(crate) fn queued_bytes(&self) -> usize {
        self.queued_bytes.get()
    }

    /// Flush what is queued, then close the write side.
    pub(crate) fn close(&self) {
        if self.state.get() == State::Open {
            self.state.set(State::Closing);
        }
        self.wake.notify();
    }

    /// Drop everything queued, abandon a write in progress, and close.
    pub(crate) fn fail(&self) {
        self.state.set(State::Failed);
        self.queue.borrow_mut().clear();
        self.queued_bytes.set(0);
        if let Some(account) = &*self.account.borrow() {
            account.settle(0);
        }
        self.wake.notify();
        self.cut.notify();
        self.space.notify();
    }

    /// Resolves once the writer has finished (any number of waiters).
    pub(crate) async fn finished(&self) {
        loop {
            let mut notified = std::pin::pin!(self.done_notify.notified());
            notified.as_mut().enable();
            if self.done.get() {
                return;
            }
            notified.await;
        }
    }

    pub(crate) fn set_done(&self) {
        self.done.set(true);
        self.done_notify.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charge_covers_the_segments_as_allocated() {
        // A builder like capnp-rpc's, with a large list forcing a second segment.
        let mut b = Builder::new(HeapAllocator::new().first_segment_words(FIRST_SEGMENT_WORDS));
        b.initn_root::<capnp::data_list::Builder>(3)
            .set(0, &[7u8; 3000]);
        let used: usize = b.get_segments_for_output().iter().map(|s| s.len()).sum();
        let bound = 8 * allocated_words(&b.get_segments_for_output());
        assert!(b.get_segments_for_output().len() >= 2);
        assert!(bound >= used && bound >= 8 * FIRST_SEGMENT_WORDS as usize);
        // Not wildly over: at most twice what is used plus the first segment.
        assert!(
            bound <= 2 * used + 8 * FIRST_SEGMENT_WORDS as usize,
            "{bound} vs {used}"
        );
    }

    #[test]
    fn guard_frames_are_charged_their_length() {
        let m = Message::Encoded(vec![0u8; 40].into_boxed_slice());
        assert_eq!(m.charge(), 40 + MESSAGE_OVERHEAD_BYTES);
    }

    #[test]
    fn a_transmit_coalesces_small_frames_and_hands_large_ones_over_uncopied() {
        let outbox = Outbox::new(64 << 20);
        for _ in 0..3 {
            outbox
                .push(Message::Encoded(vec![1u8; 100].into_boxed_slice()))
                .unwrap();
        }
        let mut big = Builder::new_default();
        big.initn_root::<capnp::data_list::Builder>(1)
            .set(0, &vec![7u8; DIRECT_WRITE_BYTES]);
        let big = Rc::new(big);
        outbox.push(Message::Built(big.clone())).unwrap();
        outbox
            .push(Message::Encoded(vec![2u8; 100].into_boxed_slice()))
            .unwrap();
        let queued = outbox.queued_bytes();
        let mut buf = Vec::new();
        let t = outbox.poll_transmit(&mut buf).expect("queued");
        assert_eq!(
            buf.len(),
            300,
            "three small frames coalesced, the large one not copied"
        );
        assert_eq!(t.frames, 4);
        assert!(t.large.as_ref().is_some_and(|m| Rc::ptr_eq(m, &big)));
        outbox.sent(t.charge);
        buf.clear();
        let t = outbox.poll_transmit(&mut buf).expect("one left");
        assert_eq!((buf.len(), t.frames, t.large.is_none()), (100, 1, true));
        outbox.sent(t.charge);
        assert_eq!(
            outbox.queued_bytes(),
            0,
            "charged {queued} in all, all given back"
        );
        assert!(outbox.poll_transmit(&mut buf).is_none());
    }

    #[test]
    fn a_transmit_stops_at_the_batch_bound() {
        let outbox = Outbox::new(64 << 20);
        for _ in 0..100 {
            outbox
                .push(Message::Encoded(vec![0u8; 10_000].into_boxed_slice()))
                .unwrap();
        }
        let mut buf = Vec::new();
        let t = outbox.poll_transmit(&mut buf).unwrap();
        assert!(buf.len() >= MAX_BATCH_BYTES && buf.len() < MAX_BATCH_BYTES + 10_000);
        assert_eq!(t.frames as usize, buf.len() / 10_000);
    }
}
