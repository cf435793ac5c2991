//! The demo key/value store: nested namespaces in memory, per-client shares, watchers and
//! long polls, served as the `Store` schema's capabilities (`caps.rs`).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use capgate_runtime::{ClientKey, PeerInfo};
use capgate_schema::store_capnp::{namespace, reader, store, subscription, watcher};
use capnp::capability::Rc;
use tokio::sync::{mpsc, Notify};

mod caps;
mod limits;
#[cfg(test)]
mod tests;

use caps::{NamespaceCap, StoreCap};
pub use limits::*;

/// The demo key/value store: in memory, shared by every connection and worker thread.
/// Cheap to clone. [`Store::client_for`] makes a `Store` capability for one client, whose
/// share of the store is bounded (on the calling thread); [`Store::client`] one for callers
/// that need no shares.
#[derive(Clone, Default)]
pub struct Store {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    data: Mutex<Data>,
    limits: StoreLimits,
    live: Live,
    next_watch_id: AtomicU64,
}

#[derive(Default)]
struct Live {
    stores: AtomicUsize,
    namespaces: AtomicUsize,
    readers: AtomicUsize,
    subscriptions: AtomicUsize,
    watchers: AtomicUsize,
}

/// The parent of top-level namespaces (the `Store` itself; it has no record).
const ROOT: NsId = 0;

/// A namespace, by number. Ids are never reused.
type NsId = u64;

/// Who namespaces and keys are charged to: a client, or `None` for the shared owner of
/// [`Store::client`], which has no share (only the store-wide limits).
type Owner = Option<Arc<str>>;

/// Namespaces are linked to their parent by id, never keyed by their path: a namespace costs
/// its name and a record whatever its depth.
#[derive(Default)]
struct Data {
    /// Every namespace's record.
    namespaces: HashMap<NsId, NsData>,
    /// The namespaces under each parent, by (parent, name): the only copy of a name.
    children: BTreeMap<(NsId, String), NsId>,
    /// The last id given out.
    last_id: NsId,
    /// Everything, charged against the store-wide limits.
    usage: StoreUsage,
    /// What each client is charged for; a client charged nothing has no entry.
    clients: HashMap<Arc<str>, StoreUsage>,
}

#[derive(Default)]
struct NsData {
    /// Who created it (and is charged for it).
    owner: Owner,
    keys: BTreeMap<String, Entry>,
    watchers: Vec<(u64, mpsc::Sender<Change>)>,
    changed: Arc<Notify>,
}

struct Entry {
    value: Vec<u8>,
    /// Who wrote it last (and is charged for it).
    owner: Owner,
}

struct Change {
    key: String,
    value: Vec<u8>,
    deleted: bool,
}

/// What a namespace named `name` is charged.
fn namespace_charge(name: &str) -> StoreUsage {
    StoreUsage {
        namespaces: 1,
        entries: 0,
        bytes: name.len() + NAMESPACE_OVERHEAD_BYTES,
    }
}

/// What a key and its value are charged.
fn entry_charge(key: &str, value_bytes: usize) -> StoreUsage {
    StoreUsage {
        namespaces: 0,
        entries: 1,
        bytes: key.len() + value_bytes + ENTRY_OVERHEAD_BYTES,
    }
}

/// The error for a capability whose namespace is gone.
fn gone() -> capnp::Error {
    capnp::Error::failed(
        "namespace no longer exists: it was removed (Store.remove or Namespace.remove)".into(),
    )
}

/// The store, or one client, when a limit refuses a call.
enum Holder<'a> {
    Store,
    Client(&'a str),
}

impl fmt::Display for Holder<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Holder::Store => f.write_str("the store"),
            Holder::Client(name) => write!(f, "client {name}"),
        }
    }
}

/// Fails if going from `used` to `after` grows past `max` (shrinking is never refused).
fn within(
    holder: &Holder<'_>,
    what: &str,
    limit: &str,
    max: usize,
    used: usize,
    after: usize,
) -> Result<(), capnp::Error> {
    if after <= max || after <= used {
        return Ok(());
    }
    Err(capnp::Error::overloaded(match what {
        "bytes" => format!(
            "{holder} holds {used} bytes and this needs {} more, over its {limit} limit of {max} \
             bytes (keys, values and namespace names); delete keys or remove namespaces, or \
             raise StoreLimits::{limit}",
            after - used
        ),
        "keys" => format!(
            "{holder} holds {used} keys, its {limit} limit; delete keys or raise \
             StoreLimits::{limit}"
        ),
        _ => format!(
            "{holder} holds {used} {what}, its {limit} limit; remove some (Store.remove, \
             Namespace.remove) or raise StoreLimits::{limit}"
        ),
    }))
}

impl Data {
    fn ns(&self, id: NsId) -> Result<&NsData, capnp::Error> {
        self.namespaces.get(&id).ok_or_else(gone)
    }

    fn ns_mut(&mut self, id: NsId) -> Result<&mut NsData, capnp::Error> {
        self.namespaces.get_mut(&id).ok_or_else(gone)
    }

    /// What `owner` is charged for.
    fn owed(&self, owner: &Owner) -> StoreUsage {
        owner
            .as_deref()
            .and_then(|o| self.clients.get(o))
            .copied()
            .unwrap_or_default()
    }

    /// Fails unless `owner` may take `take` once `back` is given back (to the store, and by
    /// `owner` as far as it was `owner`'s), within the store-wide limits and its share.
    fn check(
        &self,
        limits: &StoreLimits,
        owner: &Owner,
        back: StoreUsage,
        back_is_owners: bool,
        take: StoreUsage,
    ) -> Result<(), capnp::Error> {
        let (used, after) = (self.usage, self.usage.minus(back).plus(take));
        let h = Holder::Store;
        #[rustfmt::skip]
        {
            within(&h, "namespaces", "max_namespaces", limits.max_namespaces, used.namespaces, after.namespaces)?;
            within(&h, "keys", "max_entries", limits.max_entries, used.entries, after.entries)?;
            within(&h, "bytes", "max_bytes", limits.max_bytes, used.bytes, after.bytes)?;
        };
        let Some(name) = owner.as_deref() else {
            return Ok(());
        };
        let used = self.owed(owner);
        let back = if back_is_owners {
            back
        } else {
            StoreUsage::default()
        };
        let after = used.minus(back).plus(take);
        let h = Holder::Client(name);
        #[rustfmt::skip]
        {
            within(&h, "namespaces", "max_namespaces_per_client", limits.max_namespaces_per_client, used.namespaces, after.namespaces)?;
            within(&h, "keys", "max_entries_per_client", limits.max_entries_per_client, used.entries, after.entries)?;
            within(&h, "bytes", "max_bytes_per_client", limits.max_bytes_per_client, used.bytes, after.bytes)?;
        };
        Ok(())
    }

    fn charge(&mut self, owner: &Owner, amount: StoreUsage) {
        self.usage = self.usage.plus(amount);
        if let Some(name) = owner {
            let owed = self.clients.entry(name.clone()).or_default();
            *owed = owed.plus(amount);
        }
    }

    fn refund(&mut self, owner: &Owner, amount: StoreUsage) {
        self.usage = self.usage.minus(amount);
        if let Some(name) = owner.as_deref() {
            if let Some(owed) = self.clients.get_mut(name) {
                *owed = owed.minus(amount);
                if *owed == StoreUsage::default() {
                    self.clients.remove(name);
                }
            }
        }
    }
}

impl Store {
    /// An empty store with default limits.
    pub fn new() -> Self {
        Self::with_limits(StoreLimits::default())
    }

    /// An empty store with these limits.
    pub fn with_limits(limits: StoreLimits) -> Self {
        Self {
            inner: Arc::new(Inner {
                limits,
                ..Inner::default()
            }),
        }
    }

    /// A new `Store` capability for `owner`: the namespaces it creates and the keys it
    /// writes are charged to `owner`'s share (`max_*_per_client`), given back when deleted.
    /// Every capability made for the same owner draws on the same share.
    pub fn client_for(&self, owner: impl Into<String>) -> store::Client {
        self.make_client(Some(Arc::from(owner.into())))
    }

    /// A new `Store` capability for the client on the other end of a connection, identified
    /// as the server's rate limits identify it ([`ClientKey::of`]: certificate key, source
    /// IP address, Unix uid or stream label), e.g. `Ip(127.0.0.1)`. For bootstrap factories:
    /// `.bootstrap_factory(move |peer| store.client_for_peer(peer))`.
    pub fn client_for_peer(&self, peer: &PeerInfo) -> store::Client {
        self.client_for(Self::owner_of(peer))
    }

    /// The owner [`Store::client_for_peer`] charges for `peer`.
    pub fn owner_of(peer: &PeerInfo) -> String {
        format!("{:?}", ClientKey::of(peer))
    }

    /// A new `Store` capability with no share of its own: everything it creates is charged
    /// to one shared owner, held only to the store-wide limits. For a single trusted
    /// client; serve untrusted ones with [`Store::client_for`].
    pub fn client(&self) -> store::Client {
        self.make_client(None)
    }

    fn make_client(&self, owner: Owner) -> store::Client {
        self.inner.live.stores.fetch_add(1, Ordering::Relaxed);
        capnp_rpc::new_client(StoreCap {
            store: self.clone(),
            owner,
        })
    }

    /// Capabilities currently alive.
    pub fn live_objects(&self) -> LiveObjects {
        let l = &self.inner.live;
        LiveObjects {
            stores: l.stores.load(Ordering::Relaxed),
            namespaces: l.namespaces.load(Ordering::Relaxed),
            readers: l.readers.load(Ordering::Relaxed),
            subscriptions: l.subscriptions.load(Ordering::Relaxed),
            watchers: l.watchers.load(Ordering::Relaxed),
        }
    }

    /// What the store holds now, as counted against its store-wide limits.
    pub fn usage(&self) -> StoreUsage {
        self.data().usage
    }

    /// What `owner` (as given to [`Store::client_for`]) is charged for now.
    pub fn client_usage(&self, owner: &str) -> StoreUsage {
        self.data().clients.get(owner).copied().unwrap_or_default()
    }

    fn data(&self) -> MutexGuard<'_, Data> {
        // A panic while holding the lock leaves the maps consistent (no update is split by a
        // call that can panic), so a poisoned lock is safe to keep using.
        self.inner.data.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn limits(&self) -> &StoreLimits {
        &self.inner.limits
    }

    /// Opens the namespace `name` under `parent`, creating it for `owner` if needed.
    fn open(&self, parent: NsId, name: String, owner: &Owner) -> Result<NsId, capnp::Error> {
        let mut data = self.data();
        if parent != ROOT {
            data.ns(parent)?;
        }
        let key = (parent, name);
        if let Some(&id) = data.children.get(&key) {
            return Ok(id);
        }
        let charge = namespace_charge(&key.1);
        data.check(self.limits(), owner, StoreUsage::default(), false, charge)?;
        data.charge(owner, charge);
        data.last_id += 1;
        let id = data.last_id;
        data.children.insert(key, id);
        data.namespaces.insert(
            id,
            NsData {
                owner: owner.clone(),
                ..NsData::default()
            },
        );
        Ok(id)
    }

    /// Removes the namespace `name` under `parent` and everything below it, giving back
    /// what each part was charged to its owner. Its watchers are dropped (the changes already
    /// queued are still delivered); its long polls and later calls on its capabilities fail.
    /// Returns whether it existed.
    fn remove(&self, parent: NsId, name: String) -> Result<bool, capnp::Error> {
        let mut removed = Vec::new();
        {
            let mut data = self.data();
            if parent != ROOT {
                data.ns(parent)?;
            }
            let top = (parent, name);
            let Some(id) = data.children.remove(&top) else {
                return Ok(false);
            };
            let mut pending = vec![(id, top.1)];
            while let Some((id, name)) = pending.pop() {
                let below: Vec<(NsId, String)> = data
                    .children
                    .range((id, String::new())..(id + 1, String::new()))
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in below {
                    if let Some(child) = data.children.remove(&k) {
                        pending.push((child, k.1));
                    }
                }
                let Some(ns) = data.namespaces.remove(&id) else {
                    continue;
                };
                data.refund(&ns.owner, namespace_charge(&name));
                for (key, e) in &ns.keys {
                    data.refund(&e.owner, entry_charge(key, e.value.len()));
                }
                // Its long polls wake up to find it gone.
                ns.changed.notify_waiters();
                removed.push(ns);
            }
        }
        // Values and watchers are freed without holding the lock.
        drop(removed);
        Ok(true)
    }

    fn namespace_client(&self, id: NsId, owner: Owner) -> namespace::Client {
        self.inner.live.namespaces.fetch_add(1, Ordering::Relaxed);
        capnp_rpc::new_client(NamespaceCap {
            store: self.clone(),
            id,
            owner,
        })
    }

    fn check_name(&self, name: &str) -> Result<(), capnp::Error> {
        if name.is_empty() {
            return Err(capnp::Error::failed(
                "invalid namespace name: it must not be empty".into(),
            ));
        }
        if name.len() > self.limits().max_name_bytes {
            return Err(capnp::Error::failed(format!(
                "invalid namespace name: {} bytes exceed max_name_bytes = {}",
                name.len(),
                self.limits().max_name_bytes
            )));
        }
        Ok(())
    }

    fn check_key(&self, key: &str) -> Result<(), capnp::Error> {
        if key.len() > self.limits().max_key_bytes {
            return Err(capnp::Error::failed(format!(
                "key of {} bytes exceeds max_key_bytes = {}",
                key.len(),
                self.limits().max_key_bytes
            )));
        }
        Ok(())
    }

    fn notify(ns: &mut NsData, change: impl Fn() -> Change) {
        ns.changed.notify_waiters();
        // A watcher whose queue is full is too slow (or gone): drop it rather than buffer.
        ns.watchers.retain(|(_, tx)| tx.try_send(change()).is_ok());
    }
}
