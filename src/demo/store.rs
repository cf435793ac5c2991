use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use capgate_runtime::{ClientKey, PeerInfo};
use capgate_schema::store_capnp::{namespace, reader, store, subscription, watcher};
use capnp::capability::Rc;
use tokio::sync::{mpsc, Notify};

/// Limits of the in-memory store: it serves untrusted clients too.
///
/// The store-wide limits bound what all clients together may make the server hold; the
/// per-client ones (for `Store` capabilities made by [`Store::client_for`]) keep one client
/// from taking all of it, so that filling its share leaves the others room.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreLimits {
    /// Longest key, in bytes. Default 1 KiB.
    pub max_key_bytes: usize,
    /// Largest value, in bytes. Default 1 MiB.
    pub max_value_bytes: usize,
    /// Most keys across all namespaces. Default 100,000.
    pub max_entries: usize,
    /// Most namespaces (nested ones included). Default 10,000.
    pub max_namespaces: usize,
    /// Most bytes the store holds, all namespaces together: every key costs its length, its
    /// value's length and [`ENTRY_OVERHEAD_BYTES`]; every namespace its name's length and
    /// [`NAMESPACE_OVERHEAD_BYTES`]. Default 256 MiB: the counts alone allow 100,000 values
    /// of 1 MiB, which is 100 GB of memory for any client that asks.
    pub max_bytes: usize,
    /// Most keys one client's writes may hold (a key is charged to the client that last wrote
    /// it). Default 10,000: a tenth of `max_entries`, so one client cannot take them all.
    pub max_entries_per_client: usize,
    /// Most namespaces one client may have created. Default 1,000: a tenth of
    /// `max_namespaces`; without it one client created all 10,000 in 5 s and every other
    /// client got `Overloaded` for new namespaces from then on.
    pub max_namespaces_per_client: usize,
    /// Most bytes (counted as for `max_bytes`) charged to one client: its keys and the
    /// namespaces it created. Default 16 MiB: a sixteenth of `max_bytes`.
    pub max_bytes_per_client: usize,
    /// Longest namespace name, in bytes. Default 256.
    pub max_name_bytes: usize,
    /// Most watchers on one namespace. Default 1,024.
    pub max_watchers_per_namespace: usize,
    /// Changes queued for one slow watcher before it is dropped. Default 256.
    pub max_pending_changes: usize,
}

impl Default for StoreLimits {
    fn default() -> Self {
        Self {
            max_key_bytes: 1024,
            max_value_bytes: 1 << 20,
            max_entries: 100_000,
            max_namespaces: 10_000,
            max_bytes: 256 << 20,
            max_entries_per_client: 10_000,
            max_namespaces_per_client: 1_000,
            max_bytes_per_client: 16 << 20,
            max_name_bytes: 256,
            max_watchers_per_namespace: 1024,
            max_pending_changes: 256,
        }
    }
}

/// Capabilities of the store currently alive on the server (not yet released by clients).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveObjects {
    /// `Store` capabilities.
    pub stores: usize,
    /// `Namespace` capabilities.
    pub namespaces: usize,
    /// `Reader` capabilities.
    pub readers: usize,
    /// `Subscription` capabilities.
    pub subscriptions: usize,
    /// Client `Watcher` capabilities the server holds.
    pub watchers: usize,
}

/// What the store holds (or one client is charged for), as counted against its limits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreUsage {
    /// Namespaces (nested ones included).
    pub namespaces: usize,
    /// Keys, all namespaces together.
    pub entries: usize,
    /// Bytes counted against [`StoreLimits::max_bytes`].
    pub bytes: usize,
}

impl StoreUsage {
    fn plus(self, o: Self) -> Self {
        Self {
            namespaces: self.namespaces + o.namespaces,
            entries: self.entries + o.entries,
            bytes: self.bytes.saturating_add(o.bytes),
        }
    }

    /// `self` less `o`, which it includes.
    fn minus(self, o: Self) -> Self {
        debug_assert!(
            self.namespaces >= o.namespaces && self.entries >= o.entries && self.bytes >= o.bytes,
            "{self:?} does not include {o:?}"
        );
        Self {
            namespaces: self.namespaces.saturating_sub(o.namespaces),
            entries: self.entries.saturating_sub(o.entries),
            bytes: self.bytes.saturating_sub(o.bytes),
        }
    }
}

/// Bookkeeping charged for each key on top of its key and value bytes (its map entry, the
/// two allocations), so that many empty keys are not free. Measured (x86-64, glibc): about
/// 170 bytes.
pub const ENTRY_OVERHEAD_BYTES: usize = 176;

/// Bookkeeping charged for each namespace on top of its name (its record, its entry in the
/// index, its change notifier), so that many short-named namespaces are not free. Measured
/// (x86-64, glibc): about 275 bytes.
pub const NAMESPACE_OVERHEAD_BYTES: usize = 288;

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

fn text(r: capnp::text::Reader<'_>) -> Result<String, capnp::Error> {
    r.to_string()
        .map_err(|e| capnp::Error::failed(format!("text is not valid UTF-8: {e}")))
}

struct StoreCap {
    store: Store,
    /// Who is charged for what this capability creates.
    owner: Owner,
}

impl Drop for StoreCap {
    fn drop(&mut self) {
        self.store.inner.live.stores.fetch_sub(1, Ordering::Relaxed);
    }
}

impl store::Server for StoreCap {
    async fn namespace(
        self: Rc<Self>,
        params: store::NamespaceParams,
        mut results: store::NamespaceResults,
    ) -> Result<(), capnp::Error> {
        let name = text(params.get()?.get_name()?)?;
        self.store.check_name(&name)?;
        let id = self.store.open(ROOT, name, &self.owner)?;
        results
            .get()
            .set_ns(self.store.namespace_client(id, self.owner.clone()));
        Ok(())
    }

    async fn namespaces(
        self: Rc<Self>,
        _: store::NamespacesParams,
        mut results: store::NamespacesResults,
    ) -> Result<(), capnp::Error> {
        let names: Vec<String> = self
            .store
            .data()
            .children
            .range((ROOT, String::new())..(ROOT + 1, String::new()))
            .map(|((_, name), _)| name.clone())
            .collect();
        let mut list = results.get().init_names(names.len() as u32);
        for (i, n) in names.iter().enumerate() {
            list.set(i as u32, n.as_str());
        }
        Ok(())
    }

    async fn remove(
        self: Rc<Self>,
        params: store::RemoveParams,
        mut results: store::RemoveResults,
    ) -> Result<(), capnp::Error> {
        let name = text(params.get()?.get_name()?)?;
        let existed = self.store.remove(ROOT, name)?;
        results.get().set_existed(existed);
        Ok(())
    }
}

/// Shared by `Namespace` and its attenuated `Reader` view.
async fn get(
    store: &Store,
    id: NsId,
    params: reader::GetParams,
    mut results: reader::GetResults,
) -> Result<(), capnp::Error> {
    let key = text(params.get()?.get_key()?)?;
    let data = store.data();
    let value = data.ns(id)?.keys.get(&key);
    let mut r = results.get();
    r.set_found(value.is_some());
    if let Some(e) = value {
        r.set_value(&e.value);
    }
    Ok(())
}

async fn list(
    store: &Store,
    id: NsId,
    params: reader::ListParams,
    mut results: reader::ListResults,
) -> Result<(), capnp::Error> {
    let prefix = text(params.get()?.get_prefix()?)?;
    let keys: Vec<String> = store
        .data()
        .ns(id)?
        .keys
        .range(prefix.clone()..)
        .take_while(|(k, _)| k.starts_with(&prefix))
        .map(|(k, _)| k.clone())
        .collect();
    let mut list = results.get().init_keys(keys.len() as u32);
    for (i, k) in keys.iter().enumerate() {
        list.set(i as u32, k.as_str());
    }
    Ok(())
}

struct NamespaceCap {
    store: Store,
    id: NsId,
    /// Who is charged for what this capability creates (its client, not the namespace's
    /// creator).
    owner: Owner,
}

impl Drop for NamespaceCap {
    fn drop(&mut self) {
        self.store
            .inner
            .live
            .namespaces
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl reader::Server for NamespaceCap {
    async fn get(
        self: Rc<Self>,
        params: reader::GetParams,
        results: reader::GetResults,
    ) -> Result<(), capnp::Error> {
        get(&self.store, self.id, params, results).await
    }

    async fn list(
        self: Rc<Self>,
        params: reader::ListParams,
        results: reader::ListResults,
    ) -> Result<(), capnp::Error> {
        list(&self.store, self.id, params, results).await
    }
}

impl namespace::Server for NamespaceCap {
    async fn put(
        self: Rc<Self>,
        params: namespace::PutParams,
        _: namespace::PutResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let key = text(p.get_key()?)?;
        self.store.check_key(&key)?;
        let value = p.get_value()?;
        let limits = self.store.limits();
        if value.len() > limits.max_value_bytes {
            return Err(capnp::Error::failed(format!(
                "value of {} bytes exceeds max_value_bytes = {}",
                value.len(),
                limits.max_value_bytes
            )));
        }
        let take = entry_charge(&key, value.len());
        let mut data = self.store.data();
        let old = data
            .ns(self.id)?
            .keys
            .get(&key)
            .map(|e| (e.owner.clone(), entry_charge(&key, e.value.len())));
        let (back, back_is_owners) = match &old {
            Some((owner, charge)) => (*charge, *owner == self.owner),
            None => (StoreUsage::default(), false),
        };
        data.check(limits, &self.owner, back, back_is_owners, take)?;
        if let Some((owner, charge)) = old {
            data.refund(&owner, charge);
        }
        data.charge(&self.owner, take);
        let ns = data.ns_mut(self.id)?;
        let entry = Entry {
            value: value.to_vec(),
            owner: self.owner.clone(),
        };
        ns.keys.insert(key.clone(), entry);
        Store::notify(ns, || Change {
            key: key.clone(),
            value: value.to_vec(),
            deleted: false,
        });
        Ok(())
    }

    async fn delete(
        self: Rc<Self>,
        params: namespace::DeleteParams,
        mut results: namespace::DeleteResults,
    ) -> Result<(), capnp::Error> {
        let key = text(params.get()?.get_key()?)?;
        let mut data = self.store.data();
        let ns = data.ns_mut(self.id)?;
        let removed = ns.keys.remove(&key);
        if let Some(e) = &removed {
            Store::notify(ns, || Change {
                key: key.clone(),
                value: Vec::new(),
                deleted: true,
            });
            data.refund(&e.owner, entry_charge(&key, e.value.len()));
        }
        results.get().set_existed(removed.is_some());
        Ok(())
    }

    async fn sub(
        self: Rc<Self>,
        params: namespace::SubParams,
        mut results: namespace::SubResults,
    ) -> Result<(), capnp::Error> {
        let name = text(params.get()?.get_name()?)?;
        self.store.check_name(&name)?;
        let id = self.store.open(self.id, name, &self.owner)?;
        results
            .get()
            .set_ns(self.store.namespace_client(id, self.owner.clone()));
        Ok(())
    }

    async fn remove(
        self: Rc<Self>,
        params: namespace::RemoveParams,
        mut results: namespace::RemoveResults,
    ) -> Result<(), capnp::Error> {
        let name = text(params.get()?.get_name()?)?;
        let existed = self.store.remove(self.id, name)?;
        results.get().set_existed(existed);
        Ok(())
    }

    async fn read_only(
        self: Rc<Self>,
        _: namespace::ReadOnlyParams,
        mut results: namespace::ReadOnlyResults,
    ) -> Result<(), capnp::Error> {
        self.store.data().ns(self.id)?;
        self.store
            .inner
            .live
            .readers
            .fetch_add(1, Ordering::Relaxed);
        results.get().set_reader(capnp_rpc::new_client(ReaderCap {
            store: self.store.clone(),
            id: self.id,
        }));
        Ok(())
    }

    async fn watch(
        self: Rc<Self>,
        params: namespace::WatchParams,
        mut results: namespace::WatchResults,
    ) -> Result<(), capnp::Error> {
        let watcher = params.get()?.get_watcher()?;
        let limits = self.store.limits();
        let id = self
            .store
            .inner
            .next_watch_id
            .fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(limits.max_pending_changes);
        {
            let mut data = self.store.data();
            let ns = data.ns_mut(self.id)?;
            if ns.watchers.len() >= limits.max_watchers_per_namespace {
                return Err(capnp::Error::overloaded(format!(
                    "this namespace has {} watchers, its max_watchers_per_namespace limit",
                    limits.max_watchers_per_namespace
                )));
            }
            ns.watchers.push((id, tx));
        }
        // Deliveries run on this connection's thread, one at a time, in order.
        tokio::task::spawn_local(deliver(self.store.clone(), watcher, rx));
        self.store
            .inner
            .live
            .subscriptions
            .fetch_add(1, Ordering::Relaxed);
        results
            .get()
            .set_subscription(capnp_rpc::new_client(SubscriptionCap {
                store: self.store.clone(),
                ns: self.id,
                id,
            }));
        Ok(())
    }

    async fn wait(
        self: Rc<Self>,
        params: namespace::WaitParams,
        mut results: namespace::WaitResults,
    ) -> Result<(), capnp::Error> {
        let key = text(params.get()?.get_key()?)?;
        loop {
            let changed = {
                let data = self.store.data();
                let ns = data.ns(self.id)?;
                if let Some(e) = ns.keys.get(&key) {
                    results.get().set_value(&e.value);
                    return Ok(());
                }
                ns.changed.clone()
            };
            let mut notified = pin!(changed.notified());
            notified.as_mut().enable();
            // Re-check: a put (or the namespace's removal) may have landed between the
            // lookup and enable().
            if self
                .store
                .data()
                .namespaces
                .get(&self.id)
                .is_none_or(|ns| ns.keys.contains_key(&key))
            {
                continue;
            }
            notified.await;
        }
    }
}

/// Calls the client's watcher for each change until the subscription ends or the watcher
/// fails (its client disconnected): a dead watcher is dropped, never retried.
async fn deliver(store: Store, watcher: watcher::Client, mut rx: mpsc::Receiver<Change>) {
    store.inner.live.watchers.fetch_add(1, Ordering::Relaxed);
    while let Some(change) = rx.recv().await {
        let mut req = watcher.changed_request();
        {
            let mut p = req.get();
            p.set_key(change.key.as_str());
            p.set_value(&change.value);
            p.set_deleted(change.deleted);
        }
        if let Err(e) = req.send().promise.await {
            tracing::debug!(cause = %e, "watcher failed; dropping it");
            break;
        }
    }
    drop(watcher);
    store.inner.live.watchers.fetch_sub(1, Ordering::Relaxed);
}

struct ReaderCap {
    store: Store,
    id: NsId,
}

impl Drop for ReaderCap {
    fn drop(&mut self) {
        self.store
            .inner
            .live
            .readers
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl reader::Server for ReaderCap {
    async fn get(
        self: Rc<Self>,
        params: reader::GetParams,
        results: reader::GetResults,
    ) -> Result<(), capnp::Error> {
        get(&self.store, self.id, params, results).await
    }

    async fn list(
        self: Rc<Self>,
        params: reader::ListParams,
        results: reader::ListResults,
    ) -> Result<(), capnp::Error> {
        list(&self.store, self.id, params, results).await
    }
}

struct SubscriptionCap {
    store: Store,
    /// The watched namespace.
    ns: NsId,
    /// The watcher's id there.
    id: u64,
}

impl SubscriptionCap {
    fn end(&self) {
        let mut data = self.store.data();
        if let Some(ns) = data.namespaces.get_mut(&self.ns) {
            ns.watchers.retain(|(id, _)| *id != self.id);
        }
    }
}

impl Drop for SubscriptionCap {
    fn drop(&mut self) {
        self.end();
        self.store
            .inner
            .live
            .subscriptions
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl subscription::Server for SubscriptionCap {
    async fn cancel(
        self: Rc<Self>,
        _: subscription::CancelParams,
        _: subscription::CancelResults,
    ) -> Result<(), capnp::Error> {
        self.end();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(namespaces: usize, entries: usize, bytes: usize) -> StoreUsage {
        StoreUsage {
            namespaces,
            entries,
            bytes,
        }
    }

    fn limits() -> StoreLimits {
        StoreLimits {
            max_bytes: 1000,
            max_bytes_per_client: 600,
            max_entries: 10,
            max_entries_per_client: 5,
            max_namespaces: 4,
            max_namespaces_per_client: 2,
            ..StoreLimits::default()
        }
    }

    fn owner(name: &str) -> Owner {
        Some(Arc::from(name))
    }

    #[test]
    fn bounds_are_inclusive_and_count_what_is_given_back() {
        let (l, none) = (limits(), StoreUsage::default());
        let mut d = Data::default();
        d.charge(&None, usage(0, 0, 900));
        assert!(d.check(&l, &None, none, false, usage(0, 1, 100)).is_ok());
        let e = d
            .check(&l, &None, none, false, usage(0, 1, 101))
            .unwrap_err();
        assert_eq!(e.kind, capnp::ErrorKind::Overloaded);
        assert!(e.extra.contains("the store holds 900 bytes and this needs 101 more, over its max_bytes limit of 1000"), "{e}");
        assert!(d
            .check(&l, &None, usage(0, 0, 50), false, usage(0, 0, 150))
            .is_ok());
        assert!(d
            .check(&l, &None, none, false, usage(0, 0, usize::MAX))
            .is_err());
        // The shared owner has no share.
        assert!(d.check(&l, &None, none, false, usage(2, 0, 0)).is_ok());
        assert!(d.check(&l, &None, none, false, usage(5, 0, 0)).is_err());
    }

    #[test]
    fn a_client_is_held_to_its_share_and_gets_back_only_what_was_its_own() {
        let (l, none) = (limits(), StoreUsage::default());
        let (a, b) = (owner("a"), owner("b"));
        let mut d = Data::default();
        d.charge(&a, usage(2, 5, 500));
        let e = d.check(&l, &a, none, false, usage(1, 0, 0)).unwrap_err();
        assert_eq!(
            e.extra,
            "client a holds 2 namespaces, its max_namespaces_per_client limit; remove some \
             (Store.remove, Namespace.remove) or raise StoreLimits::max_namespaces_per_client"
        );
        let e = d.check(&l, &a, none, false, usage(0, 1, 0)).unwrap_err();
        assert!(
            e.extra
                .starts_with("client a holds 5 keys, its max_entries_per_client limit"),
            "{e}"
        );
        let e = d.check(&l, &a, none, false, usage(0, 0, 101)).unwrap_err();
        assert!(e.extra.contains("client a holds 500 bytes and this needs 101 more, over its max_bytes_per_client limit of 600"), "{e}");
        // Replacing its own key: what the old one cost comes back first.
        assert!(d
            .check(&l, &a, usage(0, 1, 100), true, usage(0, 1, 200))
            .is_ok());
        // Replacing another client's key: the store gets it back, `b`'s share does not.
        assert!(d
            .check(&l, &b, usage(0, 1, 500), false, usage(0, 1, 600))
            .is_ok());
        assert!(d
            .check(&l, &b, usage(0, 1, 500), false, usage(0, 1, 601))
            .is_err());
        assert!(d.check(&l, &b, none, false, usage(2, 0, 0)).is_ok());
        assert!(d.check(&l, &b, none, false, usage(3, 0, 0)).is_err());

        d.refund(&a, usage(2, 5, 500));
        assert_eq!(d.usage, none);
        assert!(
            d.clients.is_empty(),
            "a client charged nothing has no entry"
        );
    }

    #[test]
    fn charges_are_the_bytes_plus_fixed_bookkeeping() {
        assert_eq!(
            namespace_charge("abc"),
            usage(1, 0, 3 + NAMESPACE_OVERHEAD_BYTES)
        );
        assert_eq!(
            entry_charge("k", 10),
            usage(0, 1, 11 + ENTRY_OVERHEAD_BYTES)
        );
    }
}
