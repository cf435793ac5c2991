//! The quota store's background task: the only code that talks to the store.
//!
//! Calls and connections queue work (a budget to top up, a connection to admit, a count that
//! changed) and never wait for this task, except an admission, for at most
//! `admission_timeout`. The task runs rounds: each carries everything pending in one
//! pipeline (heartbeat when due, a full rewrite of this server's entries when needed, one
//! count update per client whose count changed or who is being admitted, one lease per
//! budget that runs low), with one round in flight at a time. A round that fails or takes
//! longer than `command_timeout` marks the store down: the fallback decides, the change is
//! logged once, and the task connects again with backoff (50 ms doubling to 2 s); the first
//! round that succeeds marks it up again and rewrites this server's entries.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::backend::{Backend, Op, Reply, StoreError};
use super::conns::{mark_dirty, AdmitRequest};
use super::metrics::ErrorKind;
use super::{ConnCount, Fallback, Fleet, LeasedRate, RedisStoreConfig, Work};

/// The first wait before connecting again; doubled after each failure up to [`MAX_BACKOFF`].
pub(crate) const MIN_BACKOFF: Duration = Duration::from_millis(50);
/// The longest wait between two attempts to reach the store.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Longest wait the store may tell a server before it asks again; a larger one is a bad reply.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// After a bad reply to a lease, its budget is not asked for again before this.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(1);
/// Bad replies are logged at most once per this period (they are all counted).
const ERROR_LOG_PERIOD: Duration = Duration::from_secs(10);

/// Whether the store is up, as last logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Health {
    Starting,
    Up,
    Down,
}

/// What one operation of the round in flight is for.
enum Item {
    Heartbeat,
    Resync,
    Conns {
        conns: Arc<ConnCount>,
        mine: u32,
        admits: Vec<AdmitRequest>,
    },
    Lease {
        rate: Arc<LeasedRate>,
        n: u32,
    },
}

/// A budget told to wait, ordered by when it may ask again.
struct Deferred {
    at: Instant,
    seq: u64,
    rate: Arc<LeasedRate>,
}

impl PartialEq for Deferred {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Deferred {}
impl PartialOrd for Deferred {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Deferred {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// The background task of one server's shared quota store.
pub(crate) struct Driver<B> {
    fleet: Arc<Fleet>,
    backend: B,
    rx: mpsc::UnboundedReceiver<Work>,
    heartbeat_interval: Duration,
    command_timeout: Duration,
    health: Health,
    connected: bool,
    /// This server's entries in the store may be wrong: rewrite them with the next heartbeat.
    needs_resync: bool,
    next_heartbeat: Instant,
    backoff: Duration,
    leases: Vec<Arc<LeasedRate>>,
    admits: Vec<AdmitRequest>,
    dirty: Vec<Arc<ConnCount>>,
    deferred: BinaryHeap<Reverse<Deferred>>,
    seq: u64,
    /// The round in flight (kept here, so a cancelled run can give its leases back).
    inflight: Vec<Item>,
    last_error_log: Option<Instant>,
    errors_not_logged: u64,
}

impl<B: Backend> Driver<B> {
    pub(crate) fn new(
        fleet: Arc<Fleet>,
        backend: B,
        rx: mpsc::UnboundedReceiver<Work>,
        config: &RedisStoreConfig,
    ) -> Self {
        Self {
            fleet,
            backend,
            rx,
            heartbeat_interval: config.heartbeat_interval,
            command_timeout: config.command_timeout,
            health: Health::Starting,
            connected: false,
            needs_resync: true,
            next_heartbeat: Instant::now(),
            backoff: MIN_BACKOFF,
            leases: Vec::new(),
            admits: Vec::new(),
            dirty: Vec::new(),
            deferred: BinaryHeap::new(),
            seq: 0,
            inflight: Vec::new(),
            last_error_log: None,
            errors_not_logged: 0,
        }
    }

    /// Runs until `stop` says so (or every sender is gone), then removes this server's
    /// entries from the store (bounded by `command_timeout`).
    pub(crate) async fn run(&mut self, mut stop: watch::Receiver<bool>) {
        self.recover();
        loop {
            if *stop.borrow() {
                break;
            }
            if !self.connected {
                let r = tokio::time::timeout(self.command_timeout, self.backend.connect()).await;
                match r.unwrap_or_else(|_| Err(timeout_error("connecting"))) {
                    Ok(()) => {
                        self.connected = true;
                        self.needs_resync = true;
                        self.next_heartbeat = Instant::now();
                    }
                    Err(e) => {
                        self.down(&e);
                        if self.wait_backoff(&mut stop).await {
                            break;
                        }
                        continue;
                    }
                }
            }
            if !self.has_work(Instant::now()) {
                let wake = self.next_wake();
                tokio::select! {
                    r = stop.changed() => if r.is_err() { break } else { continue },
                    w = self.rx.recv() => match w {
                        Some(w) => self.take(w),
                        None => break,
                    },
                    () = tokio::time::sleep_until(wake) => {}
                }
            }
            while let Ok(w) = self.rx.try_recv() {
                self.take(w);
            }
            if self.has_work(Instant::now())
                && !self.round().await
                && self.wait_backoff(&mut stop).await
            {
                break;
            }
        }
        self.leave().await;
    }

    /// Gives back what a cancelled run left in flight.
    fn recover(&mut self) {
        if !self.inflight.is_empty() {
            let items = std::mem::take(&mut self.inflight);
            self.fail_items(items);
            self.connected = false;
        }
    }

    fn take(&mut self, w: Work) {
        match w {
            Work::Lease(r) => self.leases.push(r),
            Work::Admit(a) => self.admits.push(a),
            Work::Dirty(c) => self.dirty.push(c),
        }
    }

    fn has_work(&self, now: Instant) -> bool {
        !self.leases.is_empty()
            || !self.admits.is_empty()
            || !self.dirty.is_empty()
            || now >= self.next_heartbeat
            || self.deferred.peek().is_some_and(|Reverse(d)| d.at <= now)
    }

    fn next_wake(&self) -> Instant {
        match self.deferred.peek() {
            Some(Reverse(d)) => d.at.min(self.next_heartbeat),
            None => self.next_heartbeat,
        }
    }

    /// Builds and runs one round; false if it failed (the store is down now).
    async fn round(&mut self) -> bool {
        let now = Instant::now();
        let mut ops = Vec::new();
        let mut items = Vec::new();
        if now >= self.next_heartbeat {
            self.next_heartbeat = now + self.heartbeat_interval;
            self.fleet.sweep_conns();
            ops.push(Op::Heartbeat);
            items.push(Item::Heartbeat);
            if self.needs_resync {
                self.needs_resync = false;
                ops.push(Op::Resync(self.fleet.conn_snapshot()));
                items.push(Item::Resync);
            }
        }
        // Leases before admissions: a connection admitted in this round finds the tokens its
        // client was granted in it.
        while self.deferred.peek().is_some_and(|Reverse(d)| d.at <= now) {
            if let Some(Reverse(d)) = self.deferred.pop() {
                self.leases.push(d.rate);
            }
        }
        for rate in std::mem::take(&mut self.leases) {
            // Nobody else holds it: the client is gone or its budget was replaced.
            if Arc::strong_count(&rate) == 1 {
                continue;
            }
            let not_before = *super::lock(&rate.not_before);
            if let Some(at) = not_before.filter(|at| *at > now) {
                self.seq += 1;
                self.deferred.push(Reverse(Deferred {
                    at,
                    seq: self.seq,
                    rate,
                }));
                continue;
            }
            let n = rate.bucket.request();
            if n == 0 {
                rate.bucket.grant(0);
                continue;
            }
            ops.push(Op::Lease {
                key: rate.key.clone(),
                per_second: rate.per_second.get(),
                burst: rate.burst.get(),
                n,
            });
            items.push(Item::Lease { rate, n });
        }
        // One count update per client: its admissions and its changed count together.
        let mut by_key: HashMap<String, (Arc<ConnCount>, Vec<AdmitRequest>, u32)> = HashMap::new();
        for c in self.dirty.drain(..) {
            c.take_dirty();
            by_key
                .entry(c.key.clone())
                .or_insert_with(|| (c, Vec::new(), u32::MAX));
        }
        for a in self.admits.drain(..) {
            let e = by_key
                .entry(a.conns.key.clone())
                .or_insert_with(|| (a.conns.clone(), Vec::new(), u32::MAX));
            e.2 = e.2.min(a.max);
            e.1.push(a);
        }
        for (key, (conns, admits, max)) in by_key {
            let mine = conns.count();
            ops.push(Op::Conns {
                key,
                mine,
                admit: admits.len() as u32,
                max: if admits.is_empty() { 0 } else { max },
            });
            items.push(Item::Conns {
                conns,
                mine,
                admits,
            });
        }
        if ops.is_empty() {
            return true;
        }
        self.inflight = items;
        let started = Instant::now();
        let r = tokio::time::timeout(self.command_timeout, self.backend.round(&ops)).await;
        let elapsed = started.elapsed();
        self.fleet.metrics.latency.observe(elapsed.as_secs_f64());
        let items = std::mem::take(&mut self.inflight);
        let replies = match r {
            Ok(Ok(replies)) if replies.len() == ops.len() => replies,
            Ok(Ok(replies)) => {
                let e = StoreError::reply(format!(
                    "{} replies to {} operations",
                    replies.len(),
                    ops.len()
                ));
                self.fail_round(items, e);
                return false;
            }
            Ok(Err(e)) => {
                self.fail_round(items, e);
                return false;
            }
            Err(_) => {
                let what = format!("a round of {} operations", ops.len());
                self.fail_round(items, timeout_error(&what));
                return false;
            }
        };
        // The heartbeat is the store's health check: a bad reply to it is a store gone wrong.
        let heartbeat = items.iter().position(|i| matches!(i, Item::Heartbeat));
        if let Some(Err(e)) = heartbeat.map(|i| &replies[i]) {
            let e = StoreError::reply(format!("bad reply to the heartbeat: {e}"));
            self.fail_round(items, e);
            return false;
        }
        self.up();
        let now = Instant::now();
        for (item, reply) in items.into_iter().zip(replies) {
            self.apply(item, reply, now);
        }
        true
    }

    fn down(&mut self, e: &StoreError) {
        self.fleet.metrics.error(e.kind);
        self.fleet.set_up(false);
        self.refuse_pending();
        if self.health != Health::Down {
            let fallback = match self.fleet.fallback {
                Fallback::Local => format!(
                    "each server allows its local share (fallback = local: quotas / fleet_size {})",
                    self.fleet.fleet_size
                ),
                Fallback::Deny => {
                    "new connections are refused and calls beyond the tokens held are \
                     Overloaded (fallback = deny)"
                        .to_string()
                }
            };
            tracing::warn!(
                store = %self.backend.describe(),
                cause = %e,
                "quota store unreachable; until it is back {fallback}; reconnecting with backoff"
            );
            self.health = Health::Down;
        }
    }

    fn up(&mut self) {
        self.backoff = MIN_BACKOFF;
        if self.health == Health::Up {
            return;
        }
        self.fleet.set_up(true);
        match self.health {
            Health::Starting => tracing::info!(
                store = %self.backend.describe(),
                "quota store connected: rates and connection counts are shared with the fleet"
            ),
            _ => tracing::warn!(
                store = %self.backend.describe(),
                "quota store reachable again: sharing quotas resumes"
            ),
        }
        self.health = Health::Up;
    }

    /// Waits out the backoff, giving queued work back meanwhile; true if told to stop.
    async fn wait_backoff(&mut self, stop: &mut watch::Receiver<bool>) -> bool {
        let until = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        loop {
            tokio::select! {
                r = stop.changed() => if r.is_err() || *stop.borrow() { return true },
                w = self.rx.recv() => match w {
                    Some(w) => self.refuse(w),
                    None => return true,
                },
                () = tokio::time::sleep_until(until) => return false,
            }
        }
    }

    /// Removes this server's entries (a clean stop: its connections stop counting at once).
    async fn leave(&mut self) {
        self.refuse_pending();
        while let Ok(w) = self.rx.try_recv() {
            self.refuse(w);
        }
        if self.connected {
            let r =
                tokio::time::timeout(self.command_timeout, self.backend.round(&[Op::Leave])).await;
            if !matches!(r, Ok(Ok(ref v)) if matches!(v.first(), Some(Ok(Reply::Done)))) {
                tracing::info!(
                    store = %self.backend.describe(),
                    "quota store: could not remove this server's entries; they expire on their own"
                );
            }
        }
        self.connected = false;
        self.fleet.set_up(false);
        self.health = Health::Starting;
    }
}

fn timeout_error(what: &str) -> StoreError {
    StoreError::new(
        ErrorKind::Timeout,
        format!("{what} took longer than command_timeout"),
    )
}

mod replies;
#[cfg(test)]
mod tests;
