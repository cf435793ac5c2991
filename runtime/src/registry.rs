//! The client registry: state shared by all connections of one client (one identity within a
//! class, [`crate::ClientKey`]), across worker threads: its call-rate budget and its
//! connection count.
//!
//! With the in-process quota store (the default) the budget is a [`CallRate`] and the count
//! is this server's alone. With a shared store the budget is leased from it (see
//! `quota_store`), and the fleet-wide connection count is checked at admission on top of
//! this server's.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::outgoing::ClientOutgoing;
use crate::quota_store::{Fleet, QuotaKey};
use crate::rate::CallRate;
use crate::rate::RateLimit;
use crate::{ClientClass, ClientKey};

/// A client's call budget and the quotas it was made for.
struct Budget {
    limit: Arc<dyn RateLimit>,
    per_second: NonZeroU32,
    burst: NonZeroU32,
}

/// One client's shared state. Connections hold it directly, so giving a slot back is one
/// atomic decrement, with no lookup and no copy of the key.
struct ClientEntry {
    rate: Mutex<Budget>,
    /// Budgets of the class's method rules with a rate, by rule pattern.
    method_rates: Mutex<Vec<(String, Budget)>>,
    connections: AtomicUsize,
    /// Bytes queued for this client across its connections.
    outgoing: Arc<ClientOutgoing>,
    /// Since when it has had no connection (`None` while it has one).
    idle_since: Mutex<Option<Instant>>,
}

impl ClientEntry {
    /// True when forgetting this client loses nothing: no connection, and idle for longer
    /// than its rate budget takes to refill completely (a new budget would be the same).
    fn forgettable(&self, now: Instant) -> bool {
        if self.connections.load(Ordering::Relaxed) > 0 {
            return false;
        }
        let Some(since) = *lock(&self.idle_since) else {
            return false;
        };
        let refill = |b: &Budget| {
            Duration::from_secs_f64(f64::from(b.burst.get()) / f64::from(b.per_second.get()))
        };
        let mut longest = refill(&lock(&self.rate));
        for (_, b) in lock(&self.method_rates).iter() {
            longest = longest.max(refill(b));
        }
        now.saturating_duration_since(since) > longest
    }
}

/// The registry is swept for forgettable clients whenever it has grown to twice its size
/// after the last sweep, and at least to this many clients.
const SWEEP_MIN_CLIENTS: usize = 1024;

/// All clients of a server, keyed by class name and identity.
///
/// A client stays known while it has connections and until its rate budget has refilled
/// after the last one ends; then it may be forgotten. So the registry holds the clients of
/// roughly the last refill period, not every address that ever connected (a peer rotating
/// through an IPv6 prefix cannot grow it without bound).
pub(crate) struct ClientRegistry {
    clients: DashMap<(String, ClientKey), Arc<ClientEntry>>,
    classes: DashMap<String, Arc<AtomicUsize>>,
    /// The size at which the next sweep runs.
    next_sweep: AtomicUsize,
    /// The shared quota store budgets are leased from, if any.
    fleet: Option<Arc<Fleet>>,
}

impl Default for ClientRegistry {
    fn default() -> Self {
        Self {
            clients: DashMap::new(),
            classes: DashMap::new(),
            next_sweep: AtomicUsize::new(SWEEP_MIN_CLIENTS),
            fleet: None,
        }
    }
}

/// A connection's place in its class's count; given back when dropped.
pub(crate) struct ClassSlot(Arc<AtomicUsize>);

impl Drop for ClassSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection's slot in its client's count; gives it back when dropped.
pub(crate) struct ConnectionSlot(Arc<ClientEntry>);

impl ConnectionSlot {
    /// What the client's connections have queued together.
    pub(crate) fn outgoing(&self) -> Arc<ClientOutgoing> {
        self.0.outgoing.clone()
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut idle = lock(&self.0.idle_since);
        if self.0.connections.fetch_sub(1, Ordering::Relaxed) == 1 {
            *idle = Some(Instant::now());
        }
    }
}

impl ClientRegistry {
    /// A registry whose budgets are leased from a shared store.
    pub(crate) fn with_fleet(fleet: Arc<Fleet>) -> Self {
        Self {
            fleet: Some(fleet),
            ..Self::default()
        }
    }

    /// A new budget for a client: in-process, or leased from the shared store.
    fn budget(
        &self,
        class: &str,
        key: &ClientKey,
        method: Option<&str>,
        per_second: NonZeroU32,
        burst: NonZeroU32,
    ) -> Budget {
        let limit: Arc<dyn RateLimit> = match &self.fleet {
            Some(f) => {
                let k = match method {
                    Some(m) => QuotaKey::method(class, key.clone(), m),
                    None => QuotaKey::client(class, key.clone()),
                };
                let rate = f.rate(&k, per_second, burst);
                // The first lease travels with the connection's admission: its first call
                // finds tokens.
                rate.want();
                rate
            }
            None => Arc::new(CallRate::new(per_second, burst)),
        };
        Budget {
            limit,
            per_second,
            burst,
        }
    }

    fn entry(
        &self,
        class: &str,
        key: ClientKey,
        per_second: NonZeroU32,
        burst: NonZeroU32,
    ) -> dashmap::mapref::one::RefMut<'_, (String, ClientKey), Arc<ClientEntry>> {
        let budget_key = key.clone();
        self.clients
            .entry((class.to_string(), key))
            .or_insert_with(|| {
                Arc::new(ClientEntry {
                    rate: Mutex::new(self.budget(class, &budget_key, None, per_second, burst)),
                    method_rates: Mutex::default(),
                    connections: AtomicUsize::new(0),
                    outgoing: Arc::default(),
                    // Idle until a connection succeeds: a refused first attempt leaves
                    // nothing behind for long.
                    idle_since: Mutex::new(Some(Instant::now())),
                })
            })
    }

    /// Forgets the clients that can be forgotten, once the registry has doubled since the
    /// last sweep (amortised: constant work per connection).
    fn maybe_sweep(&self) {
        let len = self.clients.len();
        if len < self.next_sweep.load(Ordering::Relaxed) {
            return;
        }
        let now = Instant::now();
        self.clients.retain(|_, e| !e.forgettable(now));
        let left = self.clients.len();
        self.next_sweep
            .store((2 * left).max(SWEEP_MIN_CLIENTS), Ordering::Relaxed);
    }

    /// Clients known now (connected, or recently enough that their rate budget is still
    /// refilling).
    pub(crate) fn known_clients(&self) -> usize {
        self.clients.len()
    }

    /// Registers one more connection of this client, unless it already has
    /// `max_connections` on this server. Returns the slot and the client's (shared) rate
    /// budget.
    pub(crate) fn connect(
        self: &Arc<Self>,
        class: &str,
        key: ClientKey,
        per_second: NonZeroU32,
        burst: NonZeroU32,
        max_connections: u32,
    ) -> Result<(ConnectionSlot, Arc<dyn RateLimit>), usize> {
        self.maybe_sweep();
        // The map's entry stays locked from the check to the increment (a sweep cannot
        // forget it meanwhile).
        let entry = self.entry(class, key, per_second, burst);
        let idle = lock(&entry.idle_since);
        let n = entry.connections.load(Ordering::Relaxed);
        if n >= max_connections as usize {
            return Err(n);
        }
        Ok(self.join(&entry, idle, per_second, burst))
    }

    /// Registers one more connection of the class, unless it already has `max`. The error is
    /// the current count.
    pub(crate) fn connect_class(
        self: &Arc<Self>,
        class: &str,
        max: u32,
    ) -> Result<ClassSlot, usize> {
        let entry = self.classes.entry(class.to_string()).or_default();
        let n = entry.load(Ordering::Relaxed);
        if n >= max as usize {
            return Err(n);
        }
        Ok(join_class(&entry))
    }

    /// Moves an open connection to `class` after a policy reload: one more connection of this
    /// client there (not checked against a maximum: the connection exists already), and the
    /// client's rate budget under the class's quotas (replaced if they changed). Take the new
    /// slots before dropping the old ones.
    pub(crate) fn rematch(
        self: &Arc<Self>,
        class: &str,
        key: ClientKey,
        per_second: NonZeroU32,
        burst: NonZeroU32,
    ) -> (ClassSlot, ConnectionSlot, Arc<dyn RateLimit>) {
        let class_slot = join_class(&self.classes.entry(class.to_string()).or_default());
        let entry = self.entry(class, key, per_second, burst);
        let idle = lock(&entry.idle_since);
        let (slot, rate) = self.join(&entry, idle, per_second, burst);
        (class_slot, slot, rate)
    }

    /// Connections of this client now.
    #[cfg(test)]
    pub(crate) fn connections(&self, class: &str, key: &ClientKey) -> usize {
        self.clients
            .get(&(class.to_string(), key.clone()))
            .map_or(0, |e| e.connections.load(Ordering::Relaxed))
    }

    /// One more connection of a client whose entry is locked in the map (`idle` is its idle
    /// mark, locked too): the slot, and its rate budget under `per_second`/`burst` (replaced
    /// if the quotas changed since the budget was made, e.g. by a policy reload).
    fn join(
        &self,
        entry: &dashmap::mapref::one::RefMut<'_, (String, ClientKey), Arc<ClientEntry>>,
        mut idle: std::sync::MutexGuard<'_, Option<Instant>>,
        per_second: NonZeroU32,
        burst: NonZeroU32,
    ) -> (ConnectionSlot, Arc<dyn RateLimit>) {
        entry.connections.fetch_add(1, Ordering::Relaxed);
        *idle = None;
        drop(idle);
        let mut rate = lock(&entry.rate);
        if rate.per_second != per_second || rate.burst != burst {
            let (class, key) = entry.key();
            *rate = self.budget(class, key, None, per_second, burst);
        }
        (ConnectionSlot(entry.value().clone()), rate.limit.clone())
    }

    /// The client's budgets for the method rules of `class` (the class its `slot` was taken
    /// in): one per rule, in order, `None` for rules without a rate. Budgets are shared by the
    /// client's connections and kept while a rule's rate is unchanged (a reload that leaves a
    /// rule alone does not refill it); rules the class no longer has are dropped.
    pub(crate) fn method_rates(
        &self,
        slot: &ConnectionSlot,
        class: &ClientClass,
        key: &ClientKey,
    ) -> Vec<Option<Arc<dyn RateLimit>>> {
        let rules = class.method_quotas();
        if rules.is_empty() {
            return Vec::new();
        }
        let mut held = lock(&slot.0.method_rates);
        let mut kept: Vec<(String, Budget)> = Vec::new();
        let out = rules
            .iter()
            .map(|r| {
                let rate = r.rate?;
                let (per_second, burst) = (rate.calls_per_second, rate.burst);
                let same = |(p, b): &(String, Budget)| {
                    *p == r.pattern && b.per_second == per_second && b.burst == burst
                };
                let budget = match held.iter().position(same) {
                    Some(i) => held.swap_remove(i),
                    None => (
                        r.pattern.clone(),
                        self.budget(class.name(), key, Some(&r.pattern), per_second, burst),
                    ),
                };
                let limit = budget.1.limit.clone();
                kept.push(budget);
                Some(limit)
            })
            .collect();
        *held = kept;
        out
    }
}

/// One more connection of a class whose count is locked in the map.
fn join_class(count: &Arc<AtomicUsize>) -> ClassSlot {
    count.fetch_add(1, Ordering::Relaxed);
    ClassSlot(count.clone())
}

/// The lock holds no invariant a panic could break (a pointer swap), so poisoning is ignored.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    #[test]
    fn connections_are_counted_per_client_and_given_back() {
        let reg = Arc::new(ClientRegistry::default());
        let a = ClientKey::Ip("127.0.0.1".parse().unwrap());
        let b = ClientKey::Ip("127.0.0.2".parse().unwrap());
        let (s1, r1) = reg.connect("c", a.clone(), nz(10), nz(10), 2).unwrap();
        let (_s2, r2) = reg.connect("c", a.clone(), nz(10), nz(10), 2).unwrap();
        assert!(Arc::ptr_eq(&r1, &r2), "one client, one shared budget");
        assert_eq!(
            reg.connect("c", a.clone(), nz(10), nz(10), 2).err(),
            Some(2)
        );
        let (_s3, r3) = reg.connect("c", b, nz(10), nz(10), 2).unwrap();
        assert!(!Arc::ptr_eq(&r1, &r3), "another address is another client");
        drop(s1);
        assert_eq!(reg.connections("c", &a), 1);
        assert!(reg.connect("c", a, nz(10), nz(10), 2).is_ok());
    }

    #[test]
    fn class_slots_are_counted_and_given_back() {
        let reg = Arc::new(ClientRegistry::default());
        let a = reg.connect_class("c", 2).unwrap();
        let _b = reg.connect_class("c", 2).unwrap();
        assert_eq!(reg.connect_class("c", 2).err(), Some(2));
        assert!(
            reg.connect_class("other", 2).is_ok(),
            "classes are counted apart"
        );
        drop(a);
        assert!(reg.connect_class("c", 2).is_ok());
    }

    #[test]
    fn clients_are_forgotten_once_idle_and_refilled_so_the_registry_stays_bounded() {
        let reg = Arc::new(ClientRegistry::default());
        // 1000 calls/s with a burst of 1: a budget refills in 1 ms.
        let (rate, burst) = (nz(1000), nz(1));
        let held = reg
            .connect("c", ClientKey::Uid(u32::MAX), rate, burst, 10)
            .unwrap();
        for i in 0..20_000u32 {
            let (slot, _) = reg
                .connect("c", ClientKey::Uid(i), rate, burst, 10)
                .unwrap();
            drop(slot);
            if i % 500 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        // Without forgetting, 20,001 clients; sweeps keep it near the number of clients
        // of the last refill period.
        assert!(
            reg.known_clients() <= 2 * SWEEP_MIN_CLIENTS,
            "{} clients known",
            reg.known_clients()
        );
        // A connected client is never forgotten, and a refused attempt leaves nothing for long.
        assert_eq!(reg.connections("c", &ClientKey::Uid(u32::MAX)), 1);
        assert_eq!(
            reg.connect("c", ClientKey::Uid(u32::MAX - 1), rate, burst, 0)
                .err(),
            Some(0)
        );
        std::thread::sleep(Duration::from_millis(5));
        reg.next_sweep.store(0, Ordering::Relaxed);
        reg.maybe_sweep();
        assert_eq!(reg.known_clients(), 1, "only the connected client is left");
        drop(held);
    }

    #[test]
    fn a_client_still_refilling_keeps_its_spent_budget() {
        let reg = Arc::new(ClientRegistry::default());
        let key = ClientKey::Uid(7);
        // 1 call/s, burst 2: the budget takes 2 s to refill.
        let (slot, rate) = reg.connect("c", key.clone(), nz(1), nz(2), 10).unwrap();
        assert!(rate.try_call() && rate.try_call() && !rate.try_call());
        drop(slot);
        reg.next_sweep.store(0, Ordering::Relaxed);
        reg.maybe_sweep();
        // Reconnecting does not buy a fresh budget.
        let (_slot, again) = reg.connect("c", key, nz(1), nz(2), 10).unwrap();
        assert!(Arc::ptr_eq(&rate, &again));
        assert!(!again.try_call());
    }

    #[test]
    fn a_rematched_connection_counts_in_its_new_class_and_shares_its_budget_there() {
        let reg = Arc::new(ClientRegistry::default());
        let key = ClientKey::Uid(9);
        let old_class = reg.connect_class("old", 10).unwrap();
        let (old_slot, _) = reg.connect("old", key.clone(), nz(1), nz(2), 10).unwrap();
        let (new_class, new_slot, rate) = reg.rematch("new", key.clone(), nz(1), nz(2));
        drop((old_class, old_slot));
        assert_eq!(reg.connections("old", &key), 0);
        assert_eq!(reg.connections("new", &key), 1);
        assert_eq!(
            reg.connect_class("new", 1).err(),
            Some(1),
            "counted in its new class"
        );
        // A sweep keeps the client (it is connected), and a second connection of it in the
        // new class shares the same budget.
        reg.next_sweep.store(0, Ordering::Relaxed);
        reg.maybe_sweep();
        let (_second, again) = reg.connect("new", key.clone(), nz(1), nz(2), 10).unwrap();
        assert!(Arc::ptr_eq(&rate, &again));
        assert_eq!(reg.connections("new", &key), 2);
        drop((new_class, new_slot));
        assert_eq!(reg.connections("new", &key), 1);
    }

    #[test]
    fn a_new_connection_gets_the_quotas_in_force_not_those_of_an_older_budget() {
        let reg = Arc::new(ClientRegistry::default());
        let key = ClientKey::Uid(3);
        let (first, old) = reg.connect("c", key.clone(), nz(1), nz(2), 10).unwrap();
        // The policy was reloaded with a larger burst; the client connects again.
        let (_second, new) = reg.connect("c", key.clone(), nz(1), nz(5), 10).unwrap();
        assert!(!Arc::ptr_eq(&old, &new));
        assert_eq!((0..10).filter(|_| new.try_call()).count(), 5);
        drop(first);
    }
}
