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
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::conns::{mark_dirty, AdmitRequest};
use super::lease::Grant;
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

/// One operation of a round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    /// Marks this server live until `now + expiry` and drops servers that are not. Replies
    /// whether it was live already (if not, its entries may be gone: rewrite them).
    Heartbeat,
    /// Replaces all of this server's connection entries with these counts.
    Resync(Vec<(String, u32)>),
    /// Sets this server's count of `key` to `mine`, first admitting up to `admit` more
    /// connections if the live servers' counts leave room under `max`.
    Conns {
        key: String,
        mine: u32,
        admit: u32,
        max: u32,
    },
    /// Takes up to `n` tokens from the budget `key` (GCRA of `per_second` and `burst`).
    Lease {
        key: String,
        per_second: u32,
        burst: u32,
        n: u32,
    },
    /// Removes this server's entries (clean shutdown).
    Leave,
}

/// The store's answer to one [`Op`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Reply {
    /// To `Heartbeat`: whether this server was live already.
    Alive(bool),
    /// To `Resync` and `Leave`.
    Done,
    /// To `Conns`: connections admitted, and the live count of the other servers.
    Conns { accepted: u32, others: u32 },
    /// To `Lease`.
    Lease(Grant),
}

/// A failed round or operation.
#[derive(Debug)]
pub(crate) struct StoreError {
    pub(crate) kind: ErrorKind,
    pub(crate) detail: String,
}

impl StoreError {
    pub(crate) fn new(kind: ErrorKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
        }
    }

    pub(crate) fn reply(detail: impl Into<String>) -> Self {
        Self::new(ErrorKind::Reply, detail)
    }
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

/// What a round's replies come back as: per operation, in order; `Err` for the round as a
/// whole when it failed (connection lost): the store is down.
pub(crate) type RoundResult = Result<Vec<Result<Reply, StoreError>>, StoreError>;

/// A store the background task can talk to (Redis, or a fake one in tests).
pub(crate) trait Backend: Send + 'static {
    /// Connects (again); ready for rounds when it returns `Ok`.
    fn connect(&mut self) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Runs `ops` in order, in one round trip.
    fn round(&mut self, ops: &[Op]) -> impl Future<Output = RoundResult> + Send;
    /// Where the store is, for logs (no secrets).
    fn describe(&self) -> String;
}

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

    /// Applies one operation's reply.
    fn apply(&mut self, item: Item, reply: Result<Reply, StoreError>, now: Instant) {
        match (item, reply) {
            (Item::Heartbeat, Ok(Reply::Alive(alive))) => {
                if !alive {
                    // Its entries lapsed (Redis was flushed or restarted, or this server
                    // was cut off longer than the expiry): write them all now.
                    self.needs_resync = true;
                    self.next_heartbeat = now;
                }
            }
            (Item::Resync, Ok(Reply::Done)) => {}
            (
                Item::Conns {
                    conns,
                    mine,
                    admits,
                },
                Ok(Reply::Conns { accepted, others }),
            ) if accepted as usize <= admits.len() => {
                let total = others.saturating_add(mine).saturating_add(accepted);
                let mut recount = false;
                for (i, a) in admits.into_iter().enumerate() {
                    let admit = (i as u32) < accepted;
                    // A waiter that gave up was decided by the fallback: the count the store
                    // has may be off by it.
                    recount |= !a.decide(&self.fleet, Some(admit), total) && admit;
                }
                if recount {
                    mark_dirty(&self.fleet, &conns);
                }
            }
            (Item::Lease { rate, n }, Ok(Reply::Lease(g)))
                if g.granted <= n && g.wait <= MAX_WAIT =>
            {
                rate.degraded
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                if g.granted > 0 {
                    self.fleet.metrics.leases.inc();
                    self.fleet.metrics.leased_calls.inc_by(u64::from(g.granted));
                } else {
                    *super::lock(&rate.not_before) = Some(now + g.wait);
                }
                rate.bucket.grant(g.granted);
            }
            (item, reply) => {
                let e = match reply {
                    Err(e) => e,
                    Ok(r) => StoreError::reply(format!("unexpected reply {r:?}")),
                };
                self.op_error(item, &e, now);
            }
        }
    }

    /// One operation failed (the others stand): count it, let the fallback decide, try
    /// again later.
    fn op_error(&mut self, item: Item, e: &StoreError, now: Instant) {
        self.fleet.metrics.error(e.kind);
        let what = match item {
            Item::Heartbeat => {
                self.needs_resync = true;
                "heartbeat"
            }
            Item::Resync => {
                self.needs_resync = true;
                "rewriting this server's connection counts"
            }
            Item::Conns { admits, .. } => {
                for a in admits {
                    a.decide(&self.fleet, None, 0);
                }
                self.needs_resync = true;
                "connection count"
            }
            Item::Lease { rate, .. } => {
                *super::lock(&rate.not_before) = Some(now + RETRY_AFTER_ERROR);
                rate.degraded
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                rate.bucket.grant(0);
                "lease"
            }
        };
        let quiet = self
            .last_error_log
            .is_some_and(|t| now.duration_since(t) < ERROR_LOG_PERIOD);
        if quiet {
            self.errors_not_logged += 1;
        } else {
            tracing::warn!(
                store = %self.backend.describe(),
                cause = %e,
                left_out = self.errors_not_logged,
                "quota store: bad reply to a {what}; the fallback decides for it \
                 (left_out: bad replies not logged in the {ERROR_LOG_PERIOD:?} before)"
            );
            self.last_error_log = Some(now);
            self.errors_not_logged = 0;
        }
    }

    /// The round failed as a whole: the store is down.
    fn fail_round(&mut self, items: Vec<Item>, e: StoreError) {
        self.fail_items(items);
        self.connected = false;
        self.needs_resync = true;
        self.down(&e);
    }

    /// Gives every item back undecided.
    fn fail_items(&mut self, items: Vec<Item>) {
        for item in items {
            match item {
                Item::Conns { admits, .. } => {
                    for a in admits {
                        a.decide(&self.fleet, None, 0);
                    }
                }
                Item::Lease { rate, .. } => rate.bucket.grant(0),
                Item::Heartbeat | Item::Resync => {}
            }
        }
    }

    /// Everything queued is given back undecided (the fallback decides while the store is
    /// down; calls queue nothing meanwhile).
    fn refuse(&mut self, w: Work) {
        match w {
            Work::Lease(r) => r.bucket.grant(0),
            Work::Admit(a) => {
                a.decide(&self.fleet, None, 0);
            }
            // Written by the rewrite once the store is back.
            Work::Dirty(c) => c.take_dirty(),
        }
    }

    fn refuse_pending(&mut self) {
        for r in std::mem::take(&mut self.leases) {
            r.bucket.grant(0);
        }
        for Reverse(d) in std::mem::take(&mut self.deferred) {
            d.rate.bucket.grant(0);
        }
        for a in std::mem::take(&mut self.admits) {
            a.decide(&self.fleet, None, 0);
        }
        for c in std::mem::take(&mut self.dirty) {
            c.take_dirty();
        }
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

#[cfg(test)]
mod tests;
