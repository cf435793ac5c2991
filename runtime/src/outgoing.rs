//! Outgoing budgets beyond one connection: the bytes queued for one client across all its
//! connections, and for all peers of the server (`Send + Sync`, shared by every worker).
//!
//! Each connection reserves its share in chunks, so its outbox touches the shared counters
//! about once per write rather than once per message; a connection therefore counts for at
//! most `CHUNK_BYTES` more than it has queued (two chunks while it is writing). Over a limit,
//! the connection of that scope holding the most is cut off; it may be on another thread, so
//! it is flagged and its blocked writer woken.

use crate::{AbortReason, BudgetScope};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use futures::task::AtomicWaker;

/// The granularity of reservations.
const CHUNK_BYTES: usize = 16 * 1024;

/// The server-wide outgoing budget and every connection's account in it.
pub(crate) struct OutgoingBudget {
    total: AtomicUsize,
    max_total: usize,
    accounts: Mutex<HashMap<u64, Weak<OutgoingAccount>>>,
    next_id: AtomicU64,
}

/// What one client's connections have reserved together.
#[derive(Default)]
pub(crate) struct ClientOutgoing(AtomicUsize);

/// One connection's share of its client's and the server's outgoing budgets.
pub(crate) struct OutgoingAccount {
    id: u64,
    server: Arc<OutgoingBudget>,
    client: Arc<ClientOutgoing>,
    max_client: usize,
    /// Who the client is, for the cut-off reason.
    client_label: Box<str>,
    reserved: AtomicUsize,
    cut: AtomicBool,
    reason: Mutex<Option<Box<AbortReason>>>,
    waker: AtomicWaker,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Scope {
    Client,
    Server,
}

impl OutgoingBudget {
    pub(crate) fn new(max_total: usize) -> Arc<Self> {
        Arc::new(Self {
            total: AtomicUsize::new(0),
            max_total,
            accounts: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        })
    }

    /// Bytes reserved by all connections now.
    pub(crate) fn total(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// An account for a new connection of the client whose counter is `client`.
    pub(crate) fn account(
        self: &Arc<Self>,
        client: Arc<ClientOutgoing>,
        max_client: usize,
        client_label: String,
    ) -> Arc<OutgoingAccount> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let account = Arc::new(OutgoingAccount {
            id,
            server: self.clone(),
            client,
            max_client,
            client_label: client_label.into(),
            reserved: AtomicUsize::new(0),
            cut: AtomicBool::new(false),
            reason: Mutex::new(None),
            waker: AtomicWaker::new(),
        });
        lock(&self.accounts).insert(id, Arc::downgrade(&account));
        account
    }
}

impl ClientOutgoing {
    /// Bytes reserved by this client's connections now.
    #[cfg(test)]
    pub(crate) fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

impl OutgoingAccount {
    /// Makes sure `queued` bytes are covered by this connection's reservation. An error is
    /// the reason to cut this connection off (it holds the most in a budget now exceeded).
    pub(crate) fn reserve(&self, queued: usize) -> Result<(), AbortReason> {
        let reserved = self.reserved.load(Ordering::Relaxed);
        if queued <= reserved {
            return Ok(());
        }
        let need = (queued - reserved).div_ceil(CHUNK_BYTES) * CHUNK_BYTES;
        self.reserved.fetch_add(need, Ordering::Relaxed);
        let client = self.client.0.fetch_add(need, Ordering::Relaxed) + need;
        let total = self.server.total.fetch_add(need, Ordering::Relaxed) + need;
        let verdict = if client > self.max_client {
            self.enforce(Scope::Client, client, self.max_client)
        } else if total > self.server.max_total {
            self.enforce(Scope::Server, total, self.server.max_total)
        } else {
            Ok(())
        };
        if verdict.is_err() {
            self.release(need);
        }
        verdict
    }

    /// After a write: keeps the reservation near what is still queued (one spare chunk
    /// while anything is, none once the queue is empty).
    pub(crate) fn settle(&self, queued: usize) {
        let want = match queued {
            0 => 0,
            q => (q.div_ceil(CHUNK_BYTES) + 1) * CHUNK_BYTES,
        };
        let reserved = self.reserved.load(Ordering::Relaxed);
        if reserved > want {
            self.release(reserved - want);
        }
    }

    fn release(&self, n: usize) {
        self.reserved.fetch_sub(n, Ordering::Relaxed);
        self.client.0.fetch_sub(n, Ordering::Relaxed);
        self.server.total.fetch_sub(n, Ordering::Relaxed);
    }

    /// `scope`'s budget is exceeded (`now` > `max`): cut off its largest connection, unless
    /// connections already cut off will free enough.
    fn enforce(&self, scope: Scope, now: usize, max: usize) -> Result<(), AbortReason> {
        // Collected first: an account dropped while the map is locked would deadlock.
        let accounts: Vec<Arc<OutgoingAccount>> = lock(&self.server.accounts)
            .values()
            .filter_map(Weak::upgrade)
            .filter(|a| scope == Scope::Server || Arc::ptr_eq(&a.client, &self.client))
            .collect();
        let mut freeing = 0usize;
        let mut largest: Option<&Arc<OutgoingAccount>> = None;
        for a in &accounts {
            let r = a.reserved.load(Ordering::Relaxed);
            if a.cut.load(Ordering::Relaxed) {
                freeing += r;
            } else if largest.is_none_or(|l| r > l.reserved.load(Ordering::Relaxed)) {
                largest = Some(a);
            }
        }
        if now - freeing <= max {
            return Ok(());
        }
        let victim = largest.map_or(self.id, |a| a.id);
        let held = largest.map_or(0, |a| a.reserved.load(Ordering::Relaxed));
        let reason = AbortReason::NotReading {
            scope: match scope {
                Scope::Client => BudgetScope::Client(self.client_label.to_string()),
                Scope::Server => BudgetScope::Server,
            },
            queued: now,
            limit: max,
            held,
        };
        match largest {
            Some(a) if victim != self.id => {
                a.cut_off(reason);
                Ok(())
            }
            _ => Err(reason),
        }
    }

    fn cut_off(&self, reason: AbortReason) {
        *lock(&self.reason) = Some(Box::new(reason));
        self.cut.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Why another connection's push cut this one off, if it did.
    pub(crate) fn cut_reason(&self) -> Option<AbortReason> {
        if self.cut.load(Ordering::Acquire) {
            lock(&self.reason).as_deref().cloned()
        } else {
            None
        }
    }

    /// The waker of this connection's blocked writer, woken by a cut-off.
    pub(crate) fn register(&self, waker: &std::task::Waker) {
        self.waker.register(waker);
    }
}

impl Drop for OutgoingAccount {
    fn drop(&mut self) {
        let reserved = self.reserved.load(Ordering::Relaxed);
        self.release(reserved);
        lock(&self.server.accounts).remove(&self.id);
    }
}

/// The locks guard plain maps and strings; a panic cannot leave them inconsistent.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(
        b: &Arc<OutgoingBudget>,
        client: &Arc<ClientOutgoing>,
        max: usize,
    ) -> Arc<OutgoingAccount> {
        b.account(client.clone(), max, "c".into())
    }

    #[test]
    fn reservations_are_chunked_and_given_back() {
        let b = OutgoingBudget::new(usize::MAX);
        let c = Arc::new(ClientOutgoing::default());
        let a = account(&b, &c, usize::MAX);
        a.reserve(100).unwrap();
        assert_eq!((b.total(), c.get()), (CHUNK_BYTES, CHUNK_BYTES));
        a.reserve(CHUNK_BYTES).unwrap();
        assert_eq!(b.total(), CHUNK_BYTES, "still within the first chunk");
        a.reserve(CHUNK_BYTES + 1).unwrap();
        assert_eq!(b.total(), 2 * CHUNK_BYTES);
        a.settle(10);
        assert_eq!(
            b.total(),
            2 * CHUNK_BYTES,
            "one spare chunk kept while busy"
        );
        a.settle(0);
        assert_eq!((b.total(), c.get()), (0, 0));
        a.reserve(5 * CHUNK_BYTES).unwrap();
        drop(a);
        assert_eq!(
            (b.total(), c.get()),
            (0, 0),
            "a closed connection gives all back"
        );
    }

    #[test]
    fn over_the_client_budget_the_largest_connection_of_that_client_is_cut() {
        let b = OutgoingBudget::new(usize::MAX);
        let (c1, c2) = (
            Arc::new(ClientOutgoing::default()),
            Arc::new(ClientOutgoing::default()),
        );
        let max = 10 * CHUNK_BYTES;
        let big = account(&b, &c1, max);
        let small = account(&b, &c1, max);
        let other = account(&b, &c2, max);
        other.reserve(9 * CHUNK_BYTES).unwrap();
        big.reserve(8 * CHUNK_BYTES).unwrap();
        small.reserve(CHUNK_BYTES).unwrap();
        // small asks for more: the client is over, big holds the most and is cut.
        small.reserve(4 * CHUNK_BYTES).unwrap();
        let reason = big
            .cut_reason()
            .expect("the largest is cut off")
            .to_string();
        assert!(
            reason.contains("max_client_outgoing_bytes = 163840 bytes (160 KiB)"),
            "{reason}"
        );
        assert!(small.cut_reason().is_none() && other.cut_reason().is_none());
        // While big's bytes are being freed, more pressure cuts nobody else...
        small.reserve(5 * CHUNK_BYTES).unwrap();
        assert!(small.cut_reason().is_none());
        // ...and once big is gone, the pusher itself is the largest: its push fails.
        drop(big);
        small.reserve(11 * CHUNK_BYTES).unwrap_err();
        assert_eq!(
            c1.get(),
            5 * CHUNK_BYTES,
            "a refused reservation is given back"
        );
    }

    #[test]
    fn over_the_server_budget_the_largest_connection_of_any_client_is_cut() {
        let b = OutgoingBudget::new(10 * CHUNK_BYTES);
        let (c1, c2) = (
            Arc::new(ClientOutgoing::default()),
            Arc::new(ClientOutgoing::default()),
        );
        let x = account(&b, &c1, usize::MAX);
        let y = account(&b, &c2, usize::MAX);
        x.reserve(8 * CHUNK_BYTES).unwrap();
        y.reserve(3 * CHUNK_BYTES).unwrap();
        let reason = x.cut_reason().expect("x holds the most").to_string();
        assert!(reason.contains("max_total_outgoing_bytes"), "{reason}");
        assert!(y.cut_reason().is_none());
    }
}
