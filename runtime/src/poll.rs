//! Adaptive polling: instead of sleeping at once, poll briefly for what is due (an answer,
//! the peer's next call, a caller's next job), and stop trying for a while when it keeps
//! coming later than the budget.

/// How a poll ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Polled {
    /// What was waited for arrived.
    Hit,
    /// The time ran out first.
    Miss,
    /// Something was queued to send, or the outbox closed: neither tells whether polling
    /// pays.
    Interrupted,
    /// Someone else polls already (another connection of this thread, which keeps the
    /// thread awake for all of them; another caller of the same handle).
    Skipped,
}

/// The longest run of chances to poll passed up after polls that saw nothing.
pub(crate) const MAX_POLL_BACKOFF: u8 = 64;

/// The adaptation: after a poll that saw nothing, the next `skip` chances to poll are passed
/// up, and each further such poll doubles the run (up to [`MAX_POLL_BACKOFF`]); a poll that
/// sees what it waited for halves it. What comes later than the budget thus costs about one
/// wasted poll per `MAX_POLL_BACKOFF` chances, and what comes in time only now and then
/// (polls that pay less often than they waste) drifts towards the same; what comes in time
/// more often than not keeps being polled for.
#[derive(Default, Debug)]
pub(crate) struct PollBackoff {
    skip: u8,
    backoff: u8,
}

impl PollBackoff {
    /// Packed, to keep in an atomic.
    pub(crate) fn to_bits(&self) -> u16 {
        u16::from_le_bytes([self.skip, self.backoff])
    }

    pub(crate) fn from_bits(bits: u16) -> Self {
        let [skip, backoff] = bits.to_le_bytes();
        Self { skip, backoff }
    }

    /// Whether to poll this time (counts a skipped chance).
    pub(crate) fn ready(&mut self) -> bool {
        if self.skip > 0 {
            self.skip -= 1;
            false
        } else {
            true
        }
    }

    pub(crate) fn record(&mut self, polled: Polled) {
        match polled {
            Polled::Hit => {
                self.backoff /= 2;
                self.skip = 0;
            }
            Polled::Miss => {
                self.backoff = match self.backoff {
                    0 => 1,
                    n => n.saturating_mul(2).min(MAX_POLL_BACKOFF),
                };
                self.skip = self.backoff;
            }
            Polled::Interrupted | Polled::Skipped => {}
        }
    }
}

/// A `sched_yield` that takes longer than this gave the core to another thread meanwhile.
const CONTENDED: std::time::Duration = std::time::Duration::from_micros(30);

/// One round of polling: gives the core to any other thread ready to run on it, then lets the
/// runtime poll for I/O and run whatever is ready. Returns false when another thread did take
/// the core for a while ([`CONTENDED`]): the cores are wanted elsewhere, and polling on would
/// take time from real work. (Only the yield is timed: this thread's own tasks, run by the
/// runtime, are work, not contention.)
pub(crate) async fn poll_round() -> bool {
    let t = std::time::Instant::now();
    std::thread::yield_now();
    let free = t.elapsed() < CONTENDED;
    tokio::task::yield_now().await;
    free
}

/// Polls `check` until it gives something, `budget` has passed, or (unless `when_busy`) a
/// round shows another thread wanted the core; `None` if it gave nothing. `check` is tried
/// once more after the last round, which may have brought what it looks for.
pub(crate) async fn poll_for<T>(
    budget: std::time::Duration,
    when_busy: bool,
    mut check: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = std::time::Instant::now() + budget;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if std::time::Instant::now() >= deadline || !(poll_round().await || when_busy) {
            return check();
        }
    }
}

/// How long a reading of [`cores_free`] is trusted on a thread.
const CORES_FRESH: std::time::Duration = std::time::Duration::from_millis(5);

thread_local! {
    /// The last reading of [`cores_free`] on this thread, and when it was taken.
    static CORES: std::cell::Cell<Option<(std::time::Instant, bool)>> =
        const { std::cell::Cell::new(None) };
    /// `/proc/loadavg`, kept open: one `pread` per reading instead of open, read, close.
    #[cfg(target_os = "linux")]
    static LOADAVG: Option<std::fs::File> = std::fs::File::open("/proc/loadavg").ok();
}

/// Whether to poll now: always with `when_busy` ([`crate::Limits::poll_when_busy`]), else
/// only while [`cores_free`].
pub(crate) fn may_poll(when_busy: bool) -> bool {
    when_busy || cores_free()
}

/// Whether every runnable thread of the machine has a core of its own right now, so that
/// polling spends only a core that would otherwise sit idle. With more runnable threads than
/// cores, a polling thread takes time from one that has work (in this process or another):
/// then nobody polls. Linux: the running count of `/proc/loadavg` against the cores this
/// process may use; read at most every 5 ms per thread (one `pread`, ~2 µs). Elsewhere, or
/// if it cannot be read: true.
pub(crate) fn cores_free() -> bool {
    let now = std::time::Instant::now();
    if let Some((at, free)) = CORES.get() {
        if now.duration_since(at) < CORES_FRESH {
            return free;
        }
    }
    let free = match (runnable_threads(), usable_cores()) {
        (Some(running), Some(cores)) => running <= cores,
        _ => true,
    };
    CORES.set(Some((now, free)));
    free
}

/// The cores this process may use, read once: `available_parallelism` opens and reads
/// cgroup files on every call (~10 µs and six syscalls), too much to repeat every 5 ms on
/// every thread. A quota changed at run time is missed, which only mistunes polling.
fn usable_cores() -> Option<usize> {
    static USABLE: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *USABLE.get_or_init(|| std::thread::available_parallelism().ok().map(|n| n.get()))
}

/// Threads runnable on the machine now (this one included): the fourth field of
/// `/proc/loadavg`, `running/total`.
#[cfg(target_os = "linux")]
fn runnable_threads() -> Option<usize> {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 128];
    let n = LOADAVG.with(|f| f.as_ref()?.read_at(&mut buf, 0).ok())?;
    parse_running(std::str::from_utf8(&buf[..n]).ok()?)
}

/// Unknown elsewhere: polling is then governed by its budget and back-off alone.
#[cfg(not(target_os = "linux"))]
fn runnable_threads() -> Option<usize> {
    None
}

#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn parse_running(loadavg: &str) -> Option<usize> {
    loadavg
        .split_whitespace()
        .nth(3)?
        .split('/')
        .next()?
        .parse()
        .ok()
}

thread_local! {
    /// Whether a connection of this thread is busy polling (one at a time is enough: while
    /// one polls, the runtime checks every socket of the thread without sleeping).
    static POLLING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks this thread as polling while alive (also when the poll is dropped half-way).
pub(crate) struct PollingMark;

impl PollingMark {
    /// The mark, unless this thread has it already.
    pub(crate) fn take() -> Option<Self> {
        POLLING.with(|p| (!p.replace(true)).then_some(PollingMark))
    }
}

impl Drop for PollingMark {
    fn drop(&mut self) {
        POLLING.with(|p| p.set(false));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_running_count_is_read_from_loadavg() {
        assert_eq!(super::parse_running("0.52 0.58 0.59 3/467 8235\n"), Some(3));
        assert_eq!(super::parse_running("0.52 0.58 0.59"), None);
        assert_eq!(super::parse_running("a b c x/1 2"), None);
        // On Linux the file is there and parses; the count includes this thread.
        if std::path::Path::new("/proc/loadavg").exists() {
            assert!(super::runnable_threads().is_some_and(|n| n >= 1));
        }
    }

    #[test]
    fn poll_backoff_doubles_up_to_its_bound_and_halves_on_a_hit() {
        use super::{PollBackoff, Polled, MAX_POLL_BACKOFF};
        // Every poll misses: the chances between polls grow 1, 2, 4, ... up to the bound.
        let mut b = PollBackoff::default();
        let polled_at: Vec<usize> = (0..400)
            .filter(|_| {
                let ready = b.ready();
                if ready {
                    b.record(Polled::Miss);
                }
                ready
            })
            .collect();
        let skipped: Vec<usize> = polled_at.windows(2).map(|w| w[1] - w[0] - 1).collect();
        let bound = usize::from(MAX_POLL_BACKOFF);
        assert_eq!(skipped[..8], [1, 2, 4, 8, 16, 32, bound, bound]);
        assert!(skipped.iter().all(|&n| n <= bound));
        // A hit halves it (and polls at the next chance); interruptions and skips change
        // nothing.
        b.record(Polled::Hit);
        b.record(Polled::Interrupted);
        b.record(Polled::Skipped);
        assert_eq!(b.backoff, MAX_POLL_BACKOFF / 2);
        assert!(b.ready() && b.ready());
        for _ in 0..6 {
            b.record(Polled::Hit);
        }
        assert_eq!(b.backoff, 0);
        b.record(Polled::Miss);
        assert!(!b.ready());
        assert!(b.ready());
        // Hits and misses in turn: the backoff stays small, polls keep coming.
        let mut polls = 0;
        for i in 0..100 {
            if b.ready() {
                polls += 1;
                b.record(if i % 2 == 0 {
                    Polled::Hit
                } else {
                    Polled::Miss
                });
            }
        }
        assert!(polls >= 40, "{polls} polls in 100 chances");
        b.record(Polled::Miss);
        let c = PollBackoff::from_bits(b.to_bits());
        assert_eq!((c.skip, c.backoff), (b.skip, b.backoff));
    }
}
