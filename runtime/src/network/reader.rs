use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use std::pin::Pin;
use std::task::Poll;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use tokio::time::{Instant, Sleep};

use super::connection::ConnShared;
use super::pool::{self, READ_BUFFER_BYTES};
use crate::framing::{Frame, FrameDecoder};
use crate::limits::fmt_bytes;

/// The read side of a connection: the stream, the decoder and, while it holds undecoded
/// bytes, a read buffer borrowed from the worker's pool (an idle connection holds none).
pub(super) struct ReadState<R> {
    stream: R,
    decoder: FrameDecoder,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    /// When the reader first had to wait for the rest of the current frame.
    frame_started: Option<Instant>,
    /// One timer for both deadlines, armed lazily and re-armed only when it fires (or when a
    /// frame deadline is earlier): no timer work per message.
    timer: Option<Pin<Box<Sleep>>>,
    /// `ConnShared::activity` when the idle timer was armed.
    idle_mark: u64,
    eof: bool,
}

impl<R: AsyncRead + Unpin> ReadState<R> {
    pub(super) fn new(stream: R, decoder: FrameDecoder) -> Self {
        Self {
            stream,
            decoder,
            buf: Vec::new(),
            pos: 0,
            end: 0,
            frame_started: None,
            timer: None,
            idle_mark: 0,
            eof: false,
        }
    }

    /// The next frame from bytes already read, if they complete one (no waiting).
    pub(super) fn buffered_frame(
        &mut self,
        shared: &ConnShared,
    ) -> Result<Option<Frame>, capnp::Error> {
        while self.pos < self.end {
            let (n, frame) = self
                .decoder
                .feed(&self.buf[self.pos..self.end])
                .map_err(|e| {
                    shared.note_frame_abort();
                    capnp::Error::failed(format!("capgate: {e}"))
                })?;
            self.pos += n;
            if let Some(frame) = frame {
                self.frame_started = None;
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
                self.frame_started = None;
                return Ok(Some(frame));
            }
            if self.eof {
                return if self.decoder.in_frame() {
                    Err(capnp::Error::disconnected(
                        "capgate: the peer closed the connection in the middle of a frame".into(),
                    ))
                } else {
                    Ok(None)
                };
            }
        }
    }

    /// Waits for bytes (or a deadline, or an abort). Bytes of a large frame body go straight
    /// into the frame; a completed frame is returned.
    async fn wait_and_read(&mut self, shared: &ConnShared) -> Result<Option<Frame>, capnp::Error> {
        let limits = &shared.limits;
        loop {
            self.arm_timer(shared);
            let Self {
                stream,
                decoder,
                timer,
                ..
            } = self;
            // Large frame bodies are read straight into the frame; everything else into a
            // pooled buffer that is taken only for a poll that returns bytes.
            let read = std::future::poll_fn(|cx| {
                if let Some(dst) = decoder.body_spare(READ_BUFFER_BYTES) {
                    let mut rb = ReadBuf::new(dst);
                    return match Pin::new(&mut *stream).poll_read(cx, &mut rb) {
                        Poll::Pending => Poll::Pending,
                        Poll::Ready(r) => Poll::Ready(r.map(|()| (rb.filled().len(), None))),
                    };
                }
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
            let timer = timer.as_mut().expect("armed above");
            let event = tokio::select! {
                biased;
                () = shared.aborted() => Event::Aborted,
                r = read => Event::Read(r),
                () = timer.as_mut() => Event::Timer,
            };
            match event {
                Event::Aborted => return Err(shared.abort_error()),
                Event::Read(r) => {
                    let (n, buf) = r.map_err(|e| {
                        capnp::Error::disconnected(format!("capgate: read failed: {e}"))
                    })?;
                    if n == 0 {
                        if let Some(buf) = buf {
                            pool::give_read(buf);
                        }
                        self.eof = true;
                        return Ok(None);
                    }
                    shared.note_received(n);
                    match buf {
                        None => return Ok(self.decoder.advance_body(n)),
                        Some(buf) => {
                            self.buf = buf;
                            self.end = n;
                            return Ok(None);
                        }
                    }
                }
                Event::Timer => self.on_timer(shared, limits)?,
            }
        }
    }

    /// Makes sure the timer fires no later than the deadline that applies now.
    fn arm_timer(&mut self, shared: &ConnShared) {
        let limits = &shared.limits;
        if self.decoder.in_frame() && self.frame_started.is_none() {
            self.frame_started = Some(Instant::now());
        }
        let frame_deadline = self.frame_started.map(|t| t + limits.frame_timeout);
        match (&mut self.timer, frame_deadline) {
            (None, _) => {
                let idle = Instant::now() + limits.idle_timeout;
                let at = frame_deadline.map_or(idle, |f| f.min(idle));
                self.idle_mark = shared.activity();
                self.timer = Some(Box::pin(tokio::time::sleep_until(at)));
            }
            (Some(t), Some(f)) if t.deadline() > f => t.as_mut().reset(f),
            _ => {}
        }
    }

    /// The timer fired: enforce the frame deadline, or close an idle connection, or re-arm.
    fn on_timer(
        &mut self,
        shared: &ConnShared,
        limits: &crate::Limits,
    ) -> Result<(), capnp::Error> {
        let now = Instant::now();
        match self.frame_started {
            Some(t) if now >= t + limits.frame_timeout => {
                shared.note_frame_abort();
                return Err(capnp::Error::failed(format!(
                    "capgate: frame not completed within {} (frame_timeout); \
                     {} of it had arrived",
                    fmt_duration(limits.frame_timeout),
                    fmt_bytes(self.decoder.received_bytes() as u64),
                )));
            }
            Some(_) => {}
            None => {
                let activity = shared.activity();
                if activity == self.idle_mark && shared.in_flight_calls() == 0 {
                    return Err(capnp::Error::disconnected(format!(
                        "capgate: connection idle for {} (idle_timeout): no frames in \
                         either direction and no calls in flight",
                        fmt_duration(limits.idle_timeout),
                    )));
                }
            }
        }
        self.idle_mark = shared.activity();
        let mut at = now + limits.idle_timeout;
        if let Some(t) = self.frame_started {
            at = at.min(t + limits.frame_timeout);
        }
        if let Some(timer) = &mut self.timer {
            timer.as_mut().reset(at);
        }
        Ok(())
    }

    /// After the connection closed with an error: read and discard what the peer still sends,
    /// for at most `time` or `max_bytes`, so that closing does not reset the connection (which
    /// could destroy the `Abort` we sent before the peer reads it).
    pub(super) async fn linger(&mut self, time: Duration, max_bytes: usize) {
        if self.eof {
            return;
        }
        let mut scratch = [0u8; 4096];
        let mut left = max_bytes;
        let drain = async {
            while left > 0 {
                match self.stream.read(&mut scratch).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        };
        let _ = tokio::time::timeout(time, drain).await;
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

pub(crate) fn fmt_duration(d: Duration) -> String {
    if d.as_millis() % 1000 == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}
