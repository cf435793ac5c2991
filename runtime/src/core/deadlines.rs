//! The read side's deadlines, sans-IO: a frame must complete within `frame_timeout` of the
//! first wait for its rest, and a connection with no frames either way and no call in flight
//! for `idle_timeout` closes. The shell owns one timer, sets it to [`Deadlines::poll_timeout`]
//! and calls [`Deadlines::handle_timeout`] when it fires; the clock is the shell's.
//!
//! A write that blocks (the peer does not read) must complete within `write_timeout` of
//! blocking: the writer, which has its own timer, asks [`Deadlines::write_blocked`] when to
//! fire and [`Deadlines::check_write`] whether the deadline has passed.
//!
//! Idle detection compares a count of bytes moved (the caller's `activity`) between two timer
//! firings instead of stamping every message with the time, so the hot path reads no clock:
//! an idle connection closes between `idle_timeout` and twice that after its last frame.

use std::time::{Duration, Instant};

use super::AbortReason;

/// Frame and idle deadlines of one connection.
#[derive(Debug)]
pub(crate) struct Deadlines {
    frame_timeout: Duration,
    /// `None`: no idle check (a relay's upstream side, whose calls count on the client side).
    idle_timeout: Option<Duration>,
    /// When the reader first waited for the rest of the current frame.
    frame_started: Option<Instant>,
    /// When the idle check runs next, and the activity count it compares against.
    idle_check: Option<(Instant, u64)>,
    write_timeout: Duration,
    /// Since when the current write has been blocked.
    write_blocked: Option<Instant>,
}

impl Deadlines {
    pub(crate) fn new(
        frame_timeout: Duration,
        idle_timeout: Option<Duration>,
        write_timeout: Duration,
    ) -> Self {
        Self {
            frame_timeout,
            idle_timeout,
            frame_started: None,
            idle_check: None,
            write_timeout,
            write_blocked: None,
        }
    }

    /// No idle check from now on.
    pub(crate) fn without_idle_check(&mut self) {
        self.idle_timeout = None;
        self.idle_check = None;
    }

    /// The current write could not complete at once: its deadline (`now` is read when the
    /// write first blocks).
    pub(crate) fn write_blocked(&mut self, now: impl Fn() -> Instant) -> Instant {
        *self.write_blocked.get_or_insert_with(now) + self.write_timeout
    }

    /// The current write completed (or was abandoned): its clock stops.
    pub(crate) fn write_done(&mut self) {
        self.write_blocked = None;
    }

    /// The writer's timer fired at `now`: whether the blocked write is past its deadline.
    pub(crate) fn check_write(&self, now: Instant) -> Result<(), AbortReason> {
        match self.write_blocked {
            Some(t) if now >= t + self.write_timeout => Err(AbortReason::WriteTimeout {
                limit: self.write_timeout,
            }),
            _ => Ok(()),
        }
    }

    /// The reader is about to wait for bytes, inside a frame or not. `now` is read only when
    /// a clock starts (the first wait of a frame, the first wait of the connection).
    pub(crate) fn before_wait(&mut self, now: impl Fn() -> Instant, in_frame: bool, activity: u64) {
        if in_frame && self.frame_started.is_none() {
            self.frame_started = Some(now());
        }
        if let (None, Some(idle)) = (self.idle_check, self.idle_timeout) {
            self.idle_check = Some((now() + idle, activity));
        }
    }

    /// A frame completed: its clock stops.
    pub(crate) fn frame_done(&mut self) {
        self.frame_started = None;
    }

    /// When [`Deadlines::handle_timeout`] must run next (`None` before the first wait).
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let frame = self.frame_started.map(|t| t + self.frame_timeout);
        let idle = self.idle_check.map(|(t, _)| t);
        match (frame, idle) {
            (Some(f), Some(i)) => Some(f.min(i)),
            (f, i) => f.or(i),
        }
    }

    /// The timer fired at `now`: the frame deadline passed, or the connection has been idle
    /// since the last check (no `activity`, nothing in flight), or the next check is armed.
    /// `received` is what the current frame has of its bytes (for the reason).
    pub(crate) fn handle_timeout(
        &mut self,
        now: Instant,
        activity: u64,
        in_flight: usize,
        received: usize,
    ) -> Result<(), AbortReason> {
        match self.frame_started {
            Some(t) if now >= t + self.frame_timeout => {
                return Err(AbortReason::FrameTimeout {
                    limit: self.frame_timeout,
                    received,
                })
            }
            Some(_) => {}
            None => {
                if let Some((at, mark)) = self.idle_check {
                    if now < at {
                        return Ok(());
                    }
                    if let (Some(limit), true) =
                        (self.idle_timeout, activity == mark && in_flight == 0)
                    {
                        return Err(AbortReason::Idle { limit });
                    }
                }
            }
        }
        self.idle_check = self.idle_timeout.map(|idle| (now + idle, activity));
        Ok(())
    }
}

/// After the connection closed with an error, the shell keeps reading and discarding what
/// the peer still sends, so that closing does not reset the connection (which could destroy
/// the `Abort` we sent before the peer reads it); bounded in time and in bytes.
#[derive(Debug)]
pub(crate) struct Linger {
    until: Instant,
    bytes_left: usize,
}

impl Linger {
    pub(crate) fn new(now: Instant, time: Duration, max_bytes: usize) -> Self {
        Self {
            until: now + time,
            bytes_left: max_bytes,
        }
    }

    /// When to stop at the latest.
    pub(crate) fn deadline(&self) -> Instant {
        self.until
    }

    /// `n` bytes were read and dropped (0: end of stream): whether to read on.
    pub(crate) fn discarded(&mut self, n: usize) -> bool {
        self.bytes_left = self.bytes_left.saturating_sub(n);
        n > 0 && self.bytes_left > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAME: Duration = Duration::from_millis(500);
    const IDLE: Duration = Duration::from_secs(10);
    const WRITE: Duration = Duration::from_secs(2);

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn a_frame_not_completed_in_time_aborts_with_what_had_arrived() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(FRAME, Some(IDLE), WRITE);
        d.before_wait(|| t0, true, 10);
        assert_eq!(d.poll_timeout(), Some(at(t0, 500)));
        // Waiting again inside the same frame does not move its deadline.
        d.before_wait(|| at(t0, 400), true, 20);
        assert_eq!(d.poll_timeout(), Some(at(t0, 500)));
        assert_eq!(
            d.handle_timeout(at(t0, 500), 20, 0, 12),
            Err(AbortReason::FrameTimeout {
                limit: FRAME,
                received: 12
            })
        );
    }

    #[test]
    fn without_an_idle_check_only_frames_have_deadlines() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(FRAME, None, WRITE);
        d.before_wait(|| t0, false, 10);
        assert_eq!(d.poll_timeout(), None, "nothing to wake for between frames");
        d.before_wait(|| t0, true, 10);
        assert_eq!(d.poll_timeout(), Some(at(t0, 500)));
        d.frame_done();
        assert_eq!(d.handle_timeout(at(t0, 100_000), 10, 0, 0), Ok(()));
        assert_eq!(d.poll_timeout(), None);
    }

    #[test]
    fn a_completed_frame_stops_its_clock() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(FRAME, Some(IDLE), WRITE);
        d.before_wait(|| t0, true, 10);
        d.frame_done();
        assert_eq!(d.poll_timeout(), Some(at(t0, 10_000)));
        d.before_wait(|| at(t0, 9_000), true, 30);
        assert_eq!(d.poll_timeout(), Some(at(t0, 9_500)));
    }

    #[test]
    fn idle_closes_only_without_activity_and_calls_in_flight() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(FRAME, Some(IDLE), WRITE);
        d.before_wait(|| t0, false, 100);
        // Bytes moved since: re-armed one period on.
        assert_eq!(d.handle_timeout(at(t0, 10_000), 150, 0, 0), Ok(()));
        assert_eq!(d.poll_timeout(), Some(at(t0, 20_000)));
        // No bytes, but a call in flight (a long poll): still open.
        assert_eq!(d.handle_timeout(at(t0, 20_000), 150, 1, 0), Ok(()));
        assert_eq!(
            d.handle_timeout(at(t0, 30_000), 150, 0, 0),
            Err(AbortReason::Idle { limit: IDLE })
        );
    }

    #[test]
    fn an_early_timer_changes_nothing() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(FRAME, Some(IDLE), WRITE);
        d.before_wait(|| t0, false, 0);
        assert_eq!(d.handle_timeout(at(t0, 1), 0, 0, 0), Ok(()));
        assert_eq!(d.poll_timeout(), Some(at(t0, 10_000)));
    }

    #[test]
    fn inside_a_frame_the_idle_check_is_re_armed_not_applied() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(Duration::from_secs(60), Some(IDLE), WRITE);
        d.before_wait(|| t0, true, 0);
        assert_eq!(d.poll_timeout(), Some(at(t0, 10_000)));
        assert_eq!(d.handle_timeout(at(t0, 10_000), 0, 0, 4), Ok(()));
        assert_eq!(d.poll_timeout(), Some(at(t0, 20_000)));
    }

    #[test]
    fn a_blocked_write_times_out_from_when_it_first_blocked_and_a_done_one_never() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(FRAME, Some(IDLE), WRITE);
        assert_eq!(d.check_write(at(t0, 100_000)), Ok(()), "no write blocked");
        assert_eq!(d.write_blocked(|| t0), at(t0, 2_000));
        // Blocking again later (the write made some progress, then blocked) keeps the start.
        assert_eq!(d.write_blocked(|| at(t0, 1_500)), at(t0, 2_000));
        assert_eq!(d.check_write(at(t0, 1_999)), Ok(()));
        assert_eq!(
            d.check_write(at(t0, 2_000)),
            Err(AbortReason::WriteTimeout { limit: WRITE })
        );
        d.write_done();
        assert_eq!(d.check_write(at(t0, 9_000)), Ok(()));
        assert_eq!(d.write_blocked(|| at(t0, 9_000)), at(t0, 11_000));
    }

    #[test]
    fn lingering_stops_at_its_deadline_its_byte_bound_or_the_end_of_stream() {
        let t0 = Instant::now();
        let mut l = Linger::new(t0, Duration::from_millis(200), 10_000);
        assert_eq!(l.deadline(), at(t0, 200));
        assert!(l.discarded(4096));
        assert!(l.discarded(4096));
        assert!(!l.discarded(4096), "10,000 bytes are enough");
        let mut l = Linger::new(t0, Duration::from_millis(200), 10_000);
        assert!(!l.discarded(0), "the peer closed");
    }
}
