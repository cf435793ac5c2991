use std::cell::RefCell;
use std::rc::Rc;

use std::pin::Pin;
use std::task::Poll;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use tokio::time::{Instant, Sleep};

use super::pool::{self, READ_BUFFER_BYTES};
use super::shared::ConnShared;
use crate::framing::Frame;
use crate::AbortReason;

/// The read side of a connection's shell: the stream and, while it holds undecoded bytes, a
/// read buffer borrowed from the worker's pool (an idle connection holds none). Decoding and
/// deadlines are the core's.
pub(super) struct ReadState<R> {
    stream: R,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    /// One timer for both deadlines, armed lazily and moved only when the core's next
    /// deadline is earlier or when it fires: no timer work per message. `None` while the
    /// core has no deadline.
    timer: Option<Pin<Box<Sleep>>>,
    eof: bool,
}

impl<R: AsyncRead + Unpin> ReadState<R> {
    pub(super) fn new(stream: R) -> Self {
        Self {
            stream,
            buf: Vec::new(),
            pos: 0,
            end: 0,
            timer: None,
            eof: false,
        }
    }

    /// The next frame from bytes already read, if they complete one (no waiting).
    pub(super) fn buffered_frame(
        &mut self,
        shared: &ConnShared,
    ) -> Result<Option<Frame>, capnp::Error> {
        while self.pos < self.end {
            let fed = shared
                .core
                .borrow_mut()
                .handle_bytes(&self.buf[self.pos..self.end]);
            let (n, frame) = fed.map_err(|e| shared.fail(e))?;
            self.pos += n;
            if let Some(frame) = frame {
                return Ok(Some(frame));
            }
        }
        Ok(None)
    }

    /// Reads the next frame. `Ok(None)` on a clean end of stream between frames.
    pub(super) async fn next_frame(
        &mut self,
        shared: &ConnShared,
    ) -> Result<Option<Frame>, capnp::Error> {
        loop {
            if let Some(frame) = self.buffered_frame(shared)? {
                return Ok(Some(frame));
            }
            self.pos = 0;
            self.end = 0;
            if !self.buf.is_empty() {
                pool::give_read(std::mem::take(&mut self.buf));
            }
            if let Some(frame) = self.wait_and_read(shared).await? {
                return Ok(Some(frame));
            }
            if self.eof {
                let end = shared.core.borrow().end_of_stream();
                return end.map(|()| None).map_err(|e| shared.fail(e));
            }
        }
    }

    /// Waits for bytes (or a deadline, or an abort). Bytes of a large frame body go straight
    /// into the frame; a completed frame is returned.
    async fn wait_and_read(&mut self, shared: &ConnShared) -> Result<Option<Frame>, capnp::Error> {
        loop {
            self.arm_timer(shared);
            let Self { stream, timer, .. } = self;
            // Large frame bodies are read straight into the frame; everything else into a
            // pooled buffer that is taken only for a poll that returns bytes.
            let read = std::future::poll_fn(|cx| {
                let mut core = shared.core.borrow_mut();
                if let Some(dst) = core.body_spare(READ_BUFFER_BYTES) {
                    let mut rb = ReadBuf::new(dst);
                    return match Pin::new(&mut *stream).poll_read(cx, &mut rb) {
                        Poll::Pending => Poll::Pending,
                        Poll::Ready(r) => Poll::Ready(r.map(|()| (rb.filled().len(), None))),
                    };
                }
                drop(core);
                let mut buf = pool::take_read();
                let mut rb = ReadBuf::new(&mut buf);
                match Pin::new(&mut *stream).poll_read(cx, &mut rb) {
                    Poll::Pending => {
                        pool::give_read(buf);
                        Poll::Pending
                    }
                    Poll::Ready(r) => {
                        let n = rb.filled().len();
                        Poll::Ready(r.map(|()| (n, Some(buf))))
                    }
                }
            });
            // No timer when the core has no deadline to keep (no idle check, between frames).
            let timer = async {
                match timer.as_mut() {
                    Some(t) => t.as_mut().await,
                    None => std::future::pending().await,
                }
            };
            let event = tokio::select! {
                biased;
                () = shared.aborted() => Event::Aborted,
                r = read => Event::Read(r),
                () = timer => Event::Timer,
            };
            match event {
                Event::Aborted => return Err(shared.abort_error()),
                Event::Read(r) => {
                    let (n, buf) =
                        r.map_err(|e| shared.fail(AbortReason::ReadFailed(e.to_string())))?;
                    if n == 0 {
                        if let Some(buf) = buf {
                            pool::give_read(buf);
                        }
                        self.eof = true;
                        return Ok(None);
                    }
                    shared.note_received(n);
                    match buf {
                        None => return Ok(shared.core.borrow_mut().advance_body(n)),
                        Some(buf) => {
                            self.buf = buf;
                            self.end = n;
                            return Ok(None);
                        }
                    }
                }
                Event::Timer => self.on_timer(shared)?,
            }
        }
    }

    /// Makes sure the timer fires no later than the core's next deadline.
    fn arm_timer(&mut self, shared: &ConnShared) {
        let mut core = shared.core.borrow_mut();
        core.before_wait(|| Instant::now().into_std(), shared.activity());
        let Some(at) = core.poll_timeout().map(Instant::from_std) else {
            return;
        };
        match &mut self.timer {
            None => self.timer = Some(Box::pin(tokio::time::sleep_until(at))),
            Some(t) if t.deadline() > at => t.as_mut().reset(at),
            Some(_) => {}
        }
    }

    /// The timer fired: the core enforces its deadlines; the timer moves to the next one.
    fn on_timer(&mut self, shared: &ConnShared) -> Result<(), capnp::Error> {
        let now = Instant::now();
        let mut core = shared.core.borrow_mut();
        let checked = core.handle_timeout(now.into_std(), shared.activity());
        let next = core.poll_timeout().map(Instant::from_std);
        drop(core);
        checked.map_err(|e| shared.fail(e))?;
        match (&mut self.timer, next) {
            (Some(timer), Some(at)) => timer.as_mut().reset(at),
            // Nothing left to keep: a fired timer must not stay armed in the past.
            (timer, None) => *timer = None,
            (None, Some(_)) => {}
        }
        Ok(())
    }

    /// After the connection closed with an error: read and discard what the peer still sends
    /// while `linger` says so (see `core::Linger`).
    pub(super) async fn linger(&mut self, mut linger: crate::core::Linger) {
        if self.eof {
            return;
        }
        let mut scratch = [0u8; 4096];
        let deadline = Instant::from_std(linger.deadline());
        let drain = async {
            loop {
                let n = self.stream.read(&mut scratch).await.unwrap_or(0);
                if !linger.discarded(n) {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout_at(deadline, drain).await;
    }
}

enum Event {
    Aborted,
    /// Bytes read, and the pooled buffer holding them (`None`: read into the frame body).
    Read(std::io::Result<(usize, Option<Vec<u8>>)>),
    Timer,
}

/// Lends the read state to one receive future and puts it back when that future ends or is
/// dropped, so the connection can still linger after capnp-rpc is gone.
pub(super) struct Lease<R> {
    slot: Rc<RefCell<Option<Box<ReadState<R>>>>>,
    state: Option<Box<ReadState<R>>>,
}

impl<R> Lease<R> {
    pub(super) fn take(slot: &Rc<RefCell<Option<Box<ReadState<R>>>>>) -> Option<Self> {
        let state = slot.borrow_mut().take()?;
        Some(Self {
            slot: slot.clone(),
            state: Some(state),
        })
    }

    pub(super) fn get(&mut self) -> &mut ReadState<R> {
        self.state
            .as_mut()
            .expect("lease holds the state until dropped")
    }
}

impl<R> Drop for Lease<R> {
    fn drop(&mut self) {
        if let Some(state) = self.state.take() {
            *self.slot.borrow_mut() = Some(state);
        }
    }
}
