use std::collections::{BTreeMap, HashMap};
use std::pin::pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use capgate_schema::store_capnp::{namespace, reader, store, subscription, watcher};
use capnp::capability::Rc;
use tokio::sync::{mpsc, Notify};

/// Limits of the in-memory store: it serves untrusted clients too.
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

/// What the store holds, as charged against its limits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreUsage {
    /// Namespaces (nested ones included).
    pub namespaces: usize,
    /// Keys, all namespaces together.
    pub entries: usize,
    /// Bytes charged against [`StoreLimits::max_bytes`].
    pub bytes: usize,
}

/// Bookkeeping charged for each key on top of its key and value bytes (its map entry, the
/// value's allocation), so that many empty keys are not free.
pub const ENTRY_OVERHEAD_BYTES: usize = 128;

/// Bookkeeping charged for each namespace on top of its name (its record, its entry in the
/// parent's index, its change notifier), so that many short-named namespaces are not free.
pub const NAMESPACE_OVERHEAD_BYTES: usize = 256;

/// The demo key/value store: in memory, shared by every connection and worker thread.
/// Cheap to clone. [`Store::client`] makes a `Store` capability (on the calling thread).
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
    usage: StoreUsage,
}

#[derive(Default)]
struct NsData {
    keys: BTreeMap<String, Vec<u8>>,
    watchers: Vec<(u64, mpsc::Sender<Change>)>,
    changed: Arc<Notify>,
}

struct Change {
    key: String,
    value: Vec<u8>,
    deleted: bool,
}

/// Bytes charged for a namespace named `name`.
fn namespace_charge(name: &str) -> usize {
    name.len() + NAMESPACE_OVERHEAD_BYTES
}

/// Bytes charged for a key and its value.
fn entry_charge(key: &str, value_bytes: usize) -> usize {
    key.len() + value_bytes + ENTRY_OVERHEAD_BYTES
}

/// The error for a capability whose namespace is gone.
fn gone() -> capnp::Error {
    capnp::Error::failed("namespace no longer exists".into())
}

impl Data {
    fn ns(&self, id: NsId) -> Result<&NsData, capnp::Error> {
        self.namespaces.get(&id).ok_or_else(gone)
    }

    fn ns_mut(&mut self, id: NsId) -> Result<&mut NsData, capnp::Error> {
        self.namespaces.get_mut(&id).ok_or_else(gone)
    }

    /// Fails if taking `more` bytes (after giving back `less`) would exceed `max_bytes`.
    fn check_bytes(
        &self,
        limits: &StoreLimits,
        less: usize,
        more: usize,
    ) -> Result<(), capnp::Error> {
        let used = self.usage.bytes - less;
        if used.saturating_add(more) > limits.max_bytes {
            return Err(capnp::Error::overloaded(format!(
                "the store holds {used} bytes and this needs {more} more, over its max_bytes \
                 limit of {} bytes (keys, values and namespace names); delete keys or raise \
                 StoreLimits::max_bytes",
                limits.max_bytes
            )));
        }
        Ok(())
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

    /// A new `Store` capability on this store.
    pub fn client(&self) -> store::Client {
        self.inner.live.stores.fetch_add(1, Ordering::Relaxed);
        capnp_rpc::new_client(StoreCap(self.clone()))
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

    /// What the store holds now, as charged against its limits.
    pub fn usage(&self) -> StoreUsage {
        self.data().usage
    }

    fn data(&self) -> MutexGuard<'_, Data> {
        // A panic while holding the lock leaves the maps consistent (no update is split by a
        // call that can panic), so a poisoned lock is safe to keep using.
        self.inner.data.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn limits(&self) -> &StoreLimits {
        &self.inner.limits
    }

    /// Opens (creating if needed) the namespace `name` under `parent`.
    fn open(&self, parent: NsId, name: String) -> Result<NsId, capnp::Error> {
        let limits = self.limits();
        let mut data = self.data();
        if parent != ROOT {
            data.ns(parent)?;
        }
        let key = (parent, name);
        if let Some(&id) = data.children.get(&key) {
            return Ok(id);
        }
        if data.usage.namespaces >= limits.max_namespaces {
            return Err(capnp::Error::overloaded(format!(
                "the store holds {} namespaces, its max_namespaces limit",
                limits.max_namespaces
            )));
        }
        let charge = namespace_charge(&key.1);
        data.check_bytes(limits, 0, charge)?;
        data.last_id += 1;
        let id = data.last_id;
        data.children.insert(key, id);
        data.namespaces.insert(id, NsData::default());
        data.usage.namespaces += 1;
        data.usage.bytes += charge;
        Ok(id)
    }

    fn namespace_client(&self, id: NsId) -> namespace::Client {
        self.inner.live.namespaces.fetch_add(1, Ordering::Relaxed);
        capnp_rpc::new_client(NamespaceCap {
            store: self.clone(),
            id,
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

struct StoreCap(Store);

impl Drop for StoreCap {
    fn drop(&mut self) {
        self.0.inner.live.stores.fetch_sub(1, Ordering::Relaxed);
    }
}

impl store::Server for StoreCap {
    async fn namespace(
        self: Rc<Self>,
        params: store::NamespaceParams,
        mut results: store::NamespaceResults,
    ) -> Result<(), capnp::Error> {
        let name = text(params.get()?.get_name()?)?;
        self.0.check_name(&name)?;
        let id = self.0.open(ROOT, name)?;
        results.get().set_ns(self.0.namespace_client(id));
        Ok(())
    }

    async fn namespaces(
        self: Rc<Self>,
        _: store::NamespacesParams,
        mut results: store::NamespacesResults,
    ) -> Result<(), capnp::Error> {
        let names: Vec<String> = self
            .0
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
    if let Some(v) = value {
        r.set_value(v);
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
        let charge = entry_charge(&key, value.len());
        let mut data = self.store.data();
        let old = data
            .ns(self.id)?
            .keys
            .get(&key)
            .map(|v| entry_charge(&key, v.len()));
        if old.is_none() && data.usage.entries >= limits.max_entries {
            return Err(capnp::Error::overloaded(format!(
                "the store holds {} keys, its max_entries limit",
                limits.max_entries
            )));
        }
        data.check_bytes(limits, old.unwrap_or(0), charge)?;
        let usage = &mut data.usage;
        usage.bytes = usage.bytes - old.unwrap_or(0) + charge;
        usage.entries += usize::from(old.is_none());
        let ns = data.ns_mut(self.id)?;
        ns.keys.insert(key.clone(), value.to_vec());
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
        if let Some(v) = &removed {
            Store::notify(ns, || Change {
                key: key.clone(),
                value: Vec::new(),
                deleted: true,
            });
            data.usage.entries -= 1;
            data.usage.bytes -= entry_charge(&key, v.len());
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
        let id = self.store.open(self.id, name)?;
        results.get().set_ns(self.store.namespace_client(id));
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
                if let Some(v) = ns.keys.get(&key) {
                    results.get().set_value(v);
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

    fn holding(bytes: usize) -> Data {
        Data {
            usage: StoreUsage {
                bytes,
                ..StoreUsage::default()
            },
            ..Data::default()
        }
    }

    #[test]
    fn the_byte_bound_is_inclusive_and_counts_what_is_given_back() {
        let limits = StoreLimits {
            max_bytes: 1000,
            ..StoreLimits::default()
        };
        assert!(holding(900).check_bytes(&limits, 0, 100).is_ok());
        let e = holding(900).check_bytes(&limits, 0, 101).unwrap_err();
        assert_eq!(e.kind, capnp::ErrorKind::Overloaded);
        assert!(
            e.extra.contains("holds 900 bytes and this needs 101 more"),
            "{e}"
        );
        assert!(holding(900).check_bytes(&limits, 50, 150).is_ok());
        assert!(holding(0).check_bytes(&limits, 0, usize::MAX).is_err());
    }

    #[test]
    fn charges_are_the_bytes_plus_fixed_bookkeeping() {
        assert_eq!(namespace_charge("abc"), 3 + NAMESPACE_OVERHEAD_BYTES);
        assert_eq!(entry_charge("k", 10), 11 + ENTRY_OVERHEAD_BYTES);
    }
}
