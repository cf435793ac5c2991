//! Connection counts across a fleet.
//!
//! Each server writes, per client, how many connections it has (`ConnCount`) into its own
//! entry in the store; the entries of a server count only while it refreshes them (every
//! `heartbeat_interval`; they lapse after 3). Admitting a connection asks the store, in one
//! atomic step, whether the live entries of the other servers plus this server's
//! connections leave room under `max_connections`, and if so records the new count. The
//! connection waits for that answer at most `admission_timeout`; then, or when the store is
//! down, the fallback decides: `Local` admits up to `max_connections / fleet_size` of the
//! client's connections on this server, `Deny` refuses.
//!
//! Counts written to the store are absolute (this server's count, not +1/-1), computed when
//! the round is built, and one round is in flight at a time, so a lost or repeated write is
//! repaired by the next one; after any failure the server rewrites all its entries.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::Arc;

use tokio::sync::oneshot;

use super::{Fallback, Fleet, Work};

/// One client's connections on this server, as counted toward the fleet.
#[derive(Debug)]
pub(crate) struct ConnCount {
    /// `QuotaKey::store_key`.
    pub(crate) key: String,
    count: AtomicU32,
    /// An update is queued for the background task.
    dirty: AtomicBool,
}

impl ConnCount {
    pub(crate) fn new(key: String) -> Self {
        Self {
            key,
            count: AtomicU32::new(0),
            dirty: AtomicBool::new(false),
        }
    }

    /// Connections of this client here now.
    pub(crate) fn count(&self) -> u32 {
        self.count.load(Ordering::Acquire)
    }

    pub(crate) fn add(&self) {
        self.count.fetch_add(1, Ordering::AcqRel);
    }

    /// One more connection if fewer than `share` are open here (the local fallback).
    fn add_below(&self, share: u32) -> bool {
        self.count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
                (c < share).then_some(c + 1)
            })
            .is_ok()
    }

    fn remove(&self) {
        // Never below zero, whatever happened before.
        let _ = self
            .count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| c.checked_sub(1));
    }

    /// The background task takes the update: later changes queue a new one.
    pub(crate) fn take_dirty(&self) {
        self.dirty.store(false, Ordering::Release);
    }
}

/// Queues an update of `conns` unless one is queued already.
pub(crate) fn mark_dirty(fleet: &Fleet, conns: &Arc<ConnCount>) {
    if !conns.dirty.swap(true, Ordering::AcqRel) {
        fleet.send(Work::Dirty(conns.clone()));
    }
}

/// A connection's place in its client's fleet-wide count; given back when dropped.
pub(crate) struct FleetSlot {
    conns: Arc<ConnCount>,
    fleet: Arc<Fleet>,
}

impl FleetSlot {
    /// Counts one more connection without a check (a connection re-matched to another class
    /// after a policy reload exists already).
    pub(crate) fn join(fleet: &Arc<Fleet>, conns: Arc<ConnCount>) -> Self {
        conns.add();
        mark_dirty(fleet, &conns);
        Self {
            conns,
            fleet: fleet.clone(),
        }
    }

    /// Counts one more connection the store has counted already.
    fn join_counted(fleet: &Arc<Fleet>, conns: Arc<ConnCount>) -> Self {
        conns.add();
        Self {
            conns,
            fleet: fleet.clone(),
        }
    }
}

impl Drop for FleetSlot {
    fn drop(&mut self) {
        self.conns.remove();
        mark_dirty(&self.fleet, &self.conns);
    }
}

const PENDING: u8 = 0;
const DECIDED: u8 = 1;
const ABANDONED: u8 = 2;

/// A connection waiting for the store's verdict.
pub(crate) struct AdmitRequest {
    pub(crate) conns: Arc<ConnCount>,
    pub(crate) max: u32,
    /// Who decided: the background task (`DECIDED`) or the waiter, on timeout (`ABANDONED`).
    state: Arc<AtomicU8>,
    reply: oneshot::Sender<Verdict>,
}

/// The store's verdict on one connection.
pub(crate) enum Verdict {
    /// Counted in the store, and here by the slot (dropped unread, it gives the count back).
    Admitted(FleetSlot),
    /// The fleet has `total` connections of this client already.
    Full { total: u32 },
    /// The store could not decide (down, an error): the fallback decides.
    Unavailable,
}

impl AdmitRequest {
    /// The background task's verdict: `Some(true)` to admit (counted here from now on),
    /// `Some(false)` for a full fleet with `total` connections, `None` when the store could
    /// not decide. Returns false when the waiter gave up first (the fallback decided, so the
    /// store's count may be off: the caller rewrites it).
    pub(crate) fn decide(self, fleet: &Arc<Fleet>, admit: Option<bool>, total: u32) -> bool {
        let won = self
            .state
            .compare_exchange(PENDING, DECIDED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if !won {
            return false;
        }
        let verdict = match admit {
            Some(true) => Verdict::Admitted(FleetSlot::join_counted(fleet, self.conns)),
            Some(false) => Verdict::Full { total },
            None => Verdict::Unavailable,
        };
        // A waiter that is gone drops the verdict (and a slot in it gives its count back).
        let _ = self.reply.send(verdict);
        true
    }
}

/// How a connection was admitted, or why not.
pub(crate) enum Admission {
    /// Admitted: the slot counts it until dropped.
    Admitted(FleetSlot),
    /// Refused: the reason for the peer.
    Refused(String),
}

impl Fleet {
    /// Admits one connection of `conns`'s client if the fleet has fewer than `max` of them:
    /// asks the store (waiting at most `admission_timeout`), else the fallback decides.
    /// `who` names the client in a refusal.
    pub(crate) async fn admit(
        self: &Arc<Self>,
        conns: Arc<ConnCount>,
        max: u32,
        who: &str,
    ) -> Admission {
        let verdict = if self.is_up() {
            let state = Arc::new(AtomicU8::new(PENDING));
            let (tx, mut rx) = oneshot::channel();
            self.send(Work::Admit(AdmitRequest {
                conns: conns.clone(),
                max,
                state: state.clone(),
                reply: tx,
            }));
            match tokio::time::timeout(self.admission_timeout, &mut rx).await {
                Ok(Ok(v)) => v,
                // The task is gone or dropped the request.
                Ok(Err(_)) => Verdict::Unavailable,
                Err(_) => {
                    if state
                        .compare_exchange(PENDING, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        self.metrics.admission_timeouts.inc();
                        Verdict::Unavailable
                    } else {
                        // Decided just now: the task sets the state before it sends, so the
                        // verdict is there or comes at once.
                        rx.await.unwrap_or(Verdict::Unavailable)
                    }
                }
            }
        } else {
            Verdict::Unavailable
        };
        match verdict {
            Verdict::Admitted(slot) => Admission::Admitted(slot),
            Verdict::Full { total } => Admission::Refused(format!(
                "capgate: connection refused: client {who} already has {total} connections \
                 across the fleet (max_connections = {max})"
            )),
            Verdict::Unavailable => self.admit_fallback(conns, max, who),
        }
    }

    fn admit_fallback(self: &Arc<Self>, conns: Arc<ConnCount>, max: u32, who: &str) -> Admission {
        self.metrics.fallback_connections.inc();
        match self.fallback {
            Fallback::Local => {
                let share = (max / self.fleet_size.get()).max(1);
                if conns.add_below(share) {
                    mark_dirty(self, &conns);
                    Admission::Admitted(FleetSlot {
                        conns,
                        fleet: self.clone(),
                    })
                } else {
                    Admission::Refused(format!(
                        "capgate: connection refused: the quota store is unavailable and \
                         client {who} has {share} connections on this server, its local share \
                         (max_connections = {max} / fleet_size = {})",
                        self.fleet_size
                    ))
                }
            }
            Fallback::Deny => Admission::Refused(
                "capgate: connection refused: the quota store is unavailable \
                 (fallback = deny); retry later"
                    .into(),
            ),
        }
    }
}
