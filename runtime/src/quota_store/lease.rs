//! Leases: a server's local slice of a client's fleet-wide call budget.
//!
//! The fleet-wide budget is a GCRA in the store: `r` calls per second with a burst of `b`
//! (`Gcra`, the same arithmetic as the Lua script in `redis.rs`). Each server holds, per
//! budget, a count of tokens ([`LocalBucket`]); a call spends one, locally and synchronously
//! (an atomic decrement: no lock, no network). When a server's tokens fall to half the lease
//! size `L`, its background task asks the store to top them up to `L`; the store grants all,
//! part or none (then with the time until `L` would fit, before which the server does not
//! ask again).
//!
//! # The error bound
//!
//! A server asks for `L - held`, with at most one request per budget in flight, and its
//! tokens only fall while a request is in flight: what it holds plus what is on the way
//! never exceeds `L`. The store's GCRA grants at most `b + r·t` tokens in any window of
//! length `t`. So in any window of length `t`, `N` servers together allow at most
//!
//! ```text
//! b + r·t + N·L
//! ```
//!
//! calls: what the store granted in the window, plus what the servers held (or had on the
//! way) when it began. The other way, a client that keeps calling is short of `b + r·t` by
//! at most what the servers still hold at the window's end and what the store has not
//! leased yet: about `N·L + L`.
//!
//! # Lease size
//!
//! `L = max(1, min(ceil(r · lease_period), floor(b / fleet_size)))`: by default 50 ms of the
//! rate, and never more than the fleet's share of the burst, so the servers together hold
//! at most about one burst. (2,000/s with a burst of 200 and 3 servers: `L = 66`, at most
//! 198 calls over the fleet-wide rate; 50/s with a burst of 10: `L = 3`.) A client calling at
//! its full rate on one server costs one lease per `L/2` calls, about `2000 / L` Redis
//! commands per 1,000 calls.
//!
//! While the store is unreachable the fallback decides instead (see [`crate::Fallback`]);
//! the bound above holds while it is up.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use super::{Fallback, Fleet, Work};
use crate::{CallRate, RateLimit};

/// The lease size `L` for a budget (see the module docs).
pub(crate) fn lease_size(
    per_second: NonZeroU32,
    burst: NonZeroU32,
    lease_period: Duration,
    fleet_size: NonZeroU32,
) -> u32 {
    let by_time = (f64::from(per_second.get()) * lease_period.as_secs_f64()).ceil();
    let by_burst = burst.get() / fleet_size.get();
    (by_time.min(f64::from(by_burst)) as u32).max(1)
}

/// What the store answered a lease request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Grant {
    /// Tokens granted (at most the number asked for).
    pub(crate) granted: u32,
    /// With none granted: how long until the request would be granted whole.
    pub(crate) wait: Duration,
}

/// Seconds subtracted from the Unix time before it is counted in microseconds, so that times
/// stay well inside the integers a double holds exactly (Lua's numbers are doubles).
pub(crate) const EPOCH_SECS: u64 = 1_700_000_000;

/// The store's GCRA for one budget: the theoretical arrival time of the next call, in
/// microseconds since [`EPOCH_SECS`]. This is the Lua script's arithmetic, in the same
/// doubles, so the fake store in tests grants exactly what Redis would.
#[cfg(test)]
#[derive(Clone, Debug, Default)]
pub(crate) struct Gcra {
    tat_us: Option<f64>,
}

#[cfg(test)]
impl Gcra {
    /// Takes up to `n` tokens at `now_us` from a budget of `per_second` with `burst`.
    pub(crate) fn lease(&mut self, now_us: f64, per_second: u32, burst: u32, n: u32) -> Grant {
        let interval = 1_000_000.0 / f64::from(per_second);
        let capacity = f64::from(burst) * interval;
        let tat = match self.tat_us {
            Some(t) if t >= now_us => t,
            _ => now_us,
        };
        let avail = ((capacity - (tat - now_us)) / interval).floor();
        let granted = avail.min(f64::from(n));
        if granted >= 1.0 {
            self.tat_us = Some(tat + granted * interval);
            return Grant {
                granted: granted as u32,
                wait: Duration::ZERO,
            };
        }
        let want = f64::from(n.min(burst));
        let wait_us = (tat - capacity + want * interval - now_us).ceil().max(1.0);
        Grant {
            granted: 0,
            wait: Duration::from_micros(wait_us as u64),
        }
    }
}

/// The local tokens of one budget on one server: sans-IO, shared by the call path (spend)
/// and the background task (request, grant).
#[derive(Debug)]
pub(crate) struct LocalBucket {
    tokens: AtomicU32,
    /// A top-up is queued or in flight.
    wanted: AtomicBool,
    lease: u32,
}

/// What a spend did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Spend {
    /// Spent a token; enough are left.
    Spent,
    /// Spent a token, and the bucket is at or below half a lease: ask for a top-up.
    SpentLow,
    /// No token left: the call is over the budget (or the top-up has not come yet).
    Empty,
}

impl LocalBucket {
    pub(crate) fn new(lease: u32) -> Self {
        Self {
            tokens: AtomicU32::new(0),
            wanted: AtomicBool::new(false),
            lease: lease.max(1),
        }
    }

    /// Takes one token, if there is one.
    pub(crate) fn spend(&self) -> Spend {
        let mut t = self.tokens.load(Ordering::Relaxed);
        loop {
            if t == 0 {
                return Spend::Empty;
            }
            match self
                .tokens
                .compare_exchange_weak(t, t - 1, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) if t - 1 <= self.lease / 2 => return Spend::SpentLow,
                Ok(_) => return Spend::Spent,
                Err(now) => t = now,
            }
        }
    }

    /// Marks a top-up as wanted; true if it was not already (the caller queues it).
    pub(crate) fn want(&self) -> bool {
        !self.wanted.load(Ordering::Relaxed) && !self.wanted.swap(true, Ordering::AcqRel)
    }

    /// How many tokens to ask for now: up to a whole lease.
    pub(crate) fn request(&self) -> u32 {
        self.lease
            .saturating_sub(self.tokens.load(Ordering::Relaxed))
    }

    /// Adds what the store granted (never more than asked for: checked by the caller) and
    /// lets the next low spend ask again.
    pub(crate) fn grant(&self, granted: u32) {
        self.tokens.fetch_add(granted, Ordering::AcqRel);
        self.wanted.store(false, Ordering::Release);
    }

    /// Tokens held now.
    #[cfg(test)]
    pub(crate) fn tokens(&self) -> u32 {
        self.tokens.load(Ordering::Relaxed)
    }
}

/// A client's call budget leased from a shared store: what the guard's [`RateLimit`] spends
/// on a server with a Redis quota store.
pub(crate) struct LeasedRate {
    /// The budget's key in the store (`QuotaKey::store_key`).
    pub(crate) key: String,
    pub(crate) per_second: NonZeroU32,
    pub(crate) burst: NonZeroU32,
    pub(crate) bucket: LocalBucket,
    /// Not before this does the background task ask again (the store said none were left).
    /// Only the background task reads or writes it.
    pub(crate) not_before: Mutex<Option<tokio::time::Instant>>,
    /// The local share, spent while the store is down (`Fallback::Local`).
    fallback: CallRate,
    /// The store's last answer for this budget was bad: the fallback decides until a good
    /// one comes.
    pub(crate) degraded: AtomicBool,
    fleet: Arc<Fleet>,
    me: Weak<LeasedRate>,
}

impl LeasedRate {
    pub(crate) fn new(
        fleet: Arc<Fleet>,
        key: String,
        per_second: NonZeroU32,
        burst: NonZeroU32,
    ) -> Arc<Self> {
        let lease = lease_size(per_second, burst, fleet.lease_period, fleet.fleet_size);
        let share = |v: NonZeroU32| {
            NonZeroU32::new(v.get() / fleet.fleet_size.get()).unwrap_or(NonZeroU32::MIN)
        };
        let fallback = CallRate::new(share(per_second), share(burst));
        Arc::new_cyclic(|me| Self {
            key,
            per_second,
            burst,
            bucket: LocalBucket::new(lease),
            not_before: Mutex::new(None),
            fallback,
            degraded: AtomicBool::new(false),
            fleet,
            me: me.clone(),
        })
    }

    /// Whether the store decides for this budget now (else the fallback does).
    fn shared(&self) -> bool {
        self.fleet.is_up() && !self.degraded.load(Ordering::Relaxed)
    }

    /// Asks the background task for a top-up, unless one is queued or in flight (or the store
    /// is down: then the fallback decides and nothing is leased).
    pub(crate) fn want(&self) {
        if self.fleet.is_up() && self.bucket.want() {
            match self.me.upgrade() {
                Some(me) => self.fleet.send(Work::Lease(me)),
                None => self.bucket.grant(0),
            }
        }
    }
}

impl RateLimit for LeasedRate {
    fn try_call(&self) -> bool {
        match self.bucket.spend() {
            Spend::Spent => true,
            Spend::SpentLow => {
                self.want();
                true
            }
            Spend::Empty if self.shared() => {
                self.want();
                false
            }
            Spend::Empty => {
                // Keeps asking (at most once per retry period) while degraded.
                self.want();
                self.fleet.metrics.fallback_calls.inc();
                match self.fleet.fallback {
                    Fallback::Local => self.fallback.try_call(),
                    Fallback::Deny => false,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    #[test]
    fn lease_size_is_the_rate_over_the_period_capped_by_the_fleet_share_of_the_burst() {
        let ms = Duration::from_millis;
        assert_eq!(lease_size(nz(2000), nz(200), ms(50), nz(3)), 66);
        assert_eq!(lease_size(nz(2000), nz(200), ms(50), nz(1)), 100);
        assert_eq!(lease_size(nz(50), nz(10), ms(50), nz(3)), 3);
        assert_eq!(lease_size(nz(1), nz(1), ms(50), nz(8)), 1, "at least one");
    }

    #[test]
    fn gcra_grants_the_burst_then_the_rate_and_says_how_long_to_wait() {
        // 50/s: one token every 20 ms; burst 10.
        let mut g = Gcra::default();
        let t0 = 1e12;
        assert_eq!(g.lease(t0, 50, 10, 4).granted, 4);
        assert_eq!(g.lease(t0, 50, 10, 4).granted, 4);
        assert_eq!(
            g.lease(t0, 50, 10, 4).granted,
            2,
            "partial: the burst is spent"
        );
        let none = g.lease(t0, 50, 10, 4);
        assert_eq!(none.granted, 0);
        assert_eq!(none.wait, Duration::from_millis(80), "until 4 fit");
        // 30 ms later one token has come back (and 10 ms of the next).
        assert_eq!(g.lease(t0 + 30_000.0, 50, 10, 4).granted, 1);
        let after = g.lease(t0 + 30_000.0, 50, 10, 4);
        assert_eq!(after.granted, 0);
        assert_eq!(after.wait, Duration::from_millis(70));
        // A long pause refills to the burst, not beyond.
        assert_eq!(g.lease(t0 + 60e6, 50, 10, 100).granted, 10);
    }

    #[test]
    fn a_bucket_spends_asks_at_half_a_lease_and_tops_up_to_one_lease() {
        let b = LocalBucket::new(6);
        assert_eq!(b.spend(), Spend::Empty);
        assert!(b.want());
        assert!(!b.want(), "one request at a time");
        assert_eq!(b.request(), 6);
        b.grant(6);
        assert_eq!(b.spend(), Spend::Spent);
        assert_eq!(b.spend(), Spend::Spent);
        assert_eq!(b.spend(), Spend::SpentLow, "3 left of 6");
        assert!(b.want());
        assert_eq!(b.spend(), Spend::SpentLow);
        assert_eq!(b.request(), 4, "tops up to a lease, no more");
        b.grant(4);
        assert_eq!(b.tokens(), 6);
    }

    /// N servers, each a `LocalBucket` and the request protocol of the background task (one
    /// request in flight, ask for `L - held`, wait as told after a refusal), against one
    /// `Gcra`, with random call times, servers and store latencies. Time in microseconds.
    struct Sim<'a> {
        buckets: Vec<LocalBucket>,
        not_before: Vec<u64>,
        asked: Vec<u32>,
        deferred: Vec<bool>,
        /// (due, server, Some(grant) for a reply or None for a request reaching the store)
        pending: Vec<(u64, usize, Option<Grant>)>,
        gcra: Gcra,
        latency: std::iter::Cycle<std::slice::Iter<'a, u64>>,
        per_second: u32,
        burst: u32,
    }

    impl Sim<'_> {
        fn ask(&mut self, s: usize, now: u64) {
            if now < self.not_before[s] {
                self.deferred[s] = true;
                return;
            }
            self.asked[s] = self.buckets[s].request();
            let d = self.latency.next().copied().unwrap_or(0);
            self.pending.push((now + d, s, None));
        }

        /// Runs the store's and the servers' events due at `now`; false if there were none.
        fn step(&mut self, now: u64) -> bool {
            if let Some(k) = self.pending.iter().position(|p| p.0 == now) {
                let (_, s, grant) = self.pending.remove(k);
                match grant {
                    None => {
                        let g =
                            self.gcra
                                .lease(now as f64, self.per_second, self.burst, self.asked[s]);
                        let d = self.latency.next().copied().unwrap_or(0);
                        self.pending.push((now + d, s, Some(g)));
                    }
                    Some(g) => {
                        assert!(g.granted <= self.asked[s]);
                        if g.granted == 0 {
                            self.not_before[s] = now + g.wait.as_micros() as u64;
                        }
                        self.buckets[s].grant(g.granted);
                    }
                }
                return true;
            }
            let due =
                (0..self.buckets.len()).find(|s| self.deferred[*s] && self.not_before[*s] <= now);
            if let Some(s) = due {
                self.deferred[s] = false;
                self.ask(s, now);
                return true;
            }
            false
        }

        fn next_event(&self) -> Option<u64> {
            let ev = self.pending.iter().map(|p| p.0).min();
            let due = (0..self.buckets.len())
                .filter(|s| self.deferred[*s])
                .map(|s| self.not_before[s])
                .min();
            [ev, due].into_iter().flatten().min()
        }
    }

    /// The times of the calls allowed.
    fn simulate(
        servers: usize,
        per_second: u32,
        burst: u32,
        lease: u32,
        calls: &[(u64, usize)],
        latency_us: &[u64],
    ) -> Vec<u64> {
        let mut sim = Sim {
            buckets: (0..servers).map(|_| LocalBucket::new(lease)).collect(),
            not_before: vec![0; servers],
            asked: vec![0; servers],
            deferred: vec![false; servers],
            pending: Vec::new(),
            gcra: Gcra::default(),
            latency: latency_us.iter().cycle(),
            per_second,
            burst,
        };
        let mut allowed = Vec::new();
        for &(t, s) in calls {
            // Store events first, up to and including the call's time.
            while let Some(e) = sim.next_event().filter(|e| *e <= t) {
                if !sim.step(e) {
                    break;
                }
            }
            let s = s % servers;
            let spend = sim.buckets[s].spend();
            if spend != Spend::Empty {
                allowed.push(t);
            }
            if spend != Spend::Spent && sim.buckets[s].want() {
                sim.ask(s, t);
            }
            // Held plus on the way never exceeds a lease.
            let on_the_way: u32 = sim
                .pending
                .iter()
                .filter(|p| p.1 == s)
                .map(|p| p.2.map_or(sim.asked[s], |g| g.granted))
                .sum();
            assert!(sim.buckets[s].tokens() + on_the_way <= lease);
        }
        allowed
    }

    /// Most calls allowed in any window of `window_us` (times sorted).
    fn max_in_window(times: &[u64], window_us: u64) -> usize {
        let mut best = 0;
        let mut lo = 0;
        for hi in 0..times.len() {
            while times[hi] - times[lo] > window_us {
                lo += 1;
            }
            best = best.max(hi - lo + 1);
        }
        best
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
        #[test]
        fn n_servers_never_allow_more_than_burst_plus_rate_times_t_plus_n_leases(
            servers in 1usize..6,
            per_second in 1u32..5000,
            burst in 1u32..300,
            period_ms in 1u64..200,
            gaps in proptest::collection::vec((0u64..3000, 0usize..6), 1..1500),
            latency in proptest::collection::vec(0u64..50_000, 1..8),
            windows in proptest::collection::vec(1u64..3_000_000, 1..6),
        ) {
            let lease = lease_size(
                nz(per_second), nz(burst), Duration::from_millis(period_ms), nz(servers as u32));
            let mut t = 0;
            let calls: Vec<(u64, usize)> = gaps.iter().map(|(g, s)| { t += g; (t, *s) }).collect();
            let allowed = simulate(servers, per_second, burst, lease, &calls, &latency);
            for w in windows {
                let most = max_in_window(&allowed, w) as f64;
                let bound = f64::from(burst)
                    + f64::from(per_second) * w as f64 / 1e6
                    + servers as f64 * f64::from(lease);
                prop_assert!(most <= bound.floor(), "{most} calls in {w} us, bound {bound}");
            }
        }
    }

    #[test]
    fn a_client_that_keeps_calling_gets_close_to_its_budget_over_three_servers() {
        // 50/s, burst 10, 3 servers (lease 3), a call every 1 ms round robin for 10 s, 0.2 ms
        // store latency each way: within 5% of 10 + 50 x 10.
        let lease = lease_size(nz(50), nz(10), Duration::from_millis(50), nz(3));
        let calls: Vec<(u64, usize)> = (0..10_000u64).map(|i| (i * 1000, i as usize % 3)).collect();
        let allowed = simulate(3, 50, 10, lease, &calls, &[200]);
        let in_ten_s = allowed.iter().filter(|t| **t < 10_000_000).count();
        assert!((485..=535).contains(&in_ten_s), "{in_ten_s} allowed");
    }
}
