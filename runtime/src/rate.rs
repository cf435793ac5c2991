//! A client's call budget: GCRA (governor) in process.

use std::num::NonZeroU32;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

/// Decides whether a call may go ahead under the client's shared rate limit.
pub trait RateLimit: Send + Sync {
    /// Takes one call from the budget; false when the client is over its rate.
    fn try_call(&self) -> bool;
}

/// No rate limit.
#[derive(Debug, Default, Clone, Copy)]
pub struct Unlimited;

impl RateLimit for Unlimited {
    fn try_call(&self) -> bool {
        true
    }
}

/// A GCRA call budget (governor), generic over the clock so tests can drive time.
pub(crate) struct CallRate<C: Clock = DefaultClock> {
    limiter: RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<C::Instant>>,
}

/// Makes the rate limiter's clock ready. The first clock of a process calibrates itself
/// against the system clock (quanta: about 10M instructions, ~3 ms, kept for the process);
/// done when the server is built, that is not paid on a worker during a client's first call.
pub(crate) fn calibrate_clock() {
    let _ = DefaultClock::default();
}

impl CallRate<DefaultClock> {
    /// `per_second` sustained, `burst` at once.
    pub(crate) fn new(per_second: NonZeroU32, burst: NonZeroU32) -> Self {
        Self::with_clock(per_second, burst, &DefaultClock::default())
    }
}

impl<C: Clock + Clone> CallRate<C> {
    /// The same budget measured by `clock`.
    pub(crate) fn with_clock(per_second: NonZeroU32, burst: NonZeroU32, clock: &C) -> Self {
        let quota = Quota::per_second(per_second).allow_burst(burst);
        Self {
            limiter: RateLimiter::direct_with_clock(quota, clock.clone()),
        }
    }
}

impl<C: Clock + Clone + Send + Sync> RateLimit for CallRate<C>
where
    C::Instant: Send + Sync,
{
    fn try_call(&self) -> bool {
        self.limiter.check().is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use std::time::Duration;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    #[test]
    fn burst_of_ten_lets_exactly_ten_through_then_refills_at_the_rate() {
        let clock = FakeRelativeClock::default();
        let rate = CallRate::with_clock(nz(100), nz(10), &clock);
        let passed = (0..1000).filter(|_| rate.try_call()).count();
        assert_eq!(passed, 10);
        clock.advance(Duration::from_millis(10)); // one call's worth at 100/s
        assert!(rate.try_call());
        assert!(!rate.try_call());
        clock.advance(Duration::from_millis(50));
        assert_eq!((0..100).filter(|_| rate.try_call()).count(), 5);
    }
}
