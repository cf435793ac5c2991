use std::collections::BTreeMap;
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

#[derive(Default)]
struct Data {
    namespaces: BTreeMap<Vec<String>, NsData>,
    entries: usize,
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

type Path = Arc<[String]>;

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

    fn data(&self) -> MutexGuard<'_, Data> {
        // A panic while holding the lock leaves the map consistent (every update is a single
        // insert/remove), so a poisoned lock is safe to keep using.
        self.inner.data.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn limits(&self) -> &StoreLimits {
        &self.inner.limits
    }

    /// Opens (creating if needed) the namespace at `path`.
    fn open(&self, path: Vec<String>) -> Result<Path, capnp::Error> {
        let mut data = self.data();
        if !data.namespaces.contains_key(&path) {
            if data.namespaces.len() >= self.limits().max_namespaces {
                return Err(capnp::Error::overloaded(format!(
                    "the store holds {} namespaces, its max_namespaces limit",
                    self.limits().max_namespaces
                )));
            }
            data.namespaces.insert(path.clone(), NsData::default());
        }
        Ok(path.into())
    }

    fn namespace_client(&self, path: Path) -> namespace::Client {
        self.inner.live.namespaces.fetch_add(1, Ordering::Relaxed);
        capnp_rpc::new_client(NamespaceCap {
            store: self.clone(),
            path,
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
        let path = self.0.open(vec![name])?;
        results.get().set_ns(self.0.namespace_client(path));
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
            .namespaces
            .keys()
            .filter(|p| p.len() == 1)
            .map(|p| p[0].clone())
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
    path: &Path,
    params: reader::GetParams,
    mut results: reader::GetResults,
) -> Result<(), capnp::Error> {
    let key = text(params.get()?.get_key()?)?;
    let data = store.data();
    let value = data
        .namespaces
        .get(&path[..])
        .and_then(|ns| ns.keys.get(&key));
    let mut r = results.get();
    r.set_found(value.is_some());
    if let Some(v) = value {
        r.set_value(v);
    }
    Ok(())
}

async fn list(
    store: &Store,
    path: &Path,
    params: reader::ListParams,
    mut results: reader::ListResults,
) -> Result<(), capnp::Error> {
    let prefix = text(params.get()?.get_prefix()?)?;
    let keys: Vec<String> = {
        let data = store.data();
        match data.namespaces.get(&path[..]) {
            Some(ns) => ns
                .keys
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .map(|(k, _)| k.clone())
                .collect(),
            None => Vec::new(),
        }
    };
    let mut list = results.get().init_keys(keys.len() as u32);
    for (i, k) in keys.iter().enumerate() {
        list.set(i as u32, k.as_str());
    }
    Ok(())
}

struct NamespaceCap {
    store: Store,
    path: Path,
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
        get(&self.store, &self.path, params, results).await
    }

    async fn list(
        self: Rc<Self>,
        params: reader::ListParams,
        results: reader::ListResults,
    ) -> Result<(), capnp::Error> {
        list(&self.store, &self.path, params, results).await
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
        let mut data = self.store.data();
        let Data {
            namespaces,
            entries,
        } = &mut *data;
        let ns = namespaces.entry(self.path.to_vec()).or_default();
        if !ns.keys.contains_key(&key) {
            if *entries >= limits.max_entries {
                return Err(capnp::Error::overloaded(format!(
                    "the store holds {} keys, its max_entries limit",
                    limits.max_entries
                )));
            }
            *entries += 1;
        }
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
        let Data {
            namespaces,
            entries,
        } = &mut *data;
        let existed = match namespaces.get_mut(&self.path[..]) {
            Some(ns) => {
                let existed = ns.keys.remove(&key).is_some();
                if existed {
                    *entries -= 1;
                    Store::notify(ns, || Change {
                        key: key.clone(),
                        value: Vec::new(),
                        deleted: true,
                    });
                }
                existed
            }
            None => false,
        };
        results.get().set_existed(existed);
        Ok(())
    }

    async fn sub(
        self: Rc<Self>,
        params: namespace::SubParams,
        mut results: namespace::SubResults,
    ) -> Result<(), capnp::Error> {
        let name = text(params.get()?.get_name()?)?;
        self.store.check_name(&name)?;
        let mut path = self.path.to_vec();
        path.push(name);
        let path = self.store.open(path)?;
        results.get().set_ns(self.store.namespace_client(path));
        Ok(())
    }

    async fn read_only(
        self: Rc<Self>,
        _: namespace::ReadOnlyParams,
        mut results: namespace::ReadOnlyResults,
    ) -> Result<(), capnp::Error> {
        self.store
            .inner
            .live
            .readers
            .fetch_add(1, Ordering::Relaxed);
        results.get().set_reader(capnp_rpc::new_client(ReaderCap {
            store: self.store.clone(),
            path: self.path.clone(),
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
            let ns = data.namespaces.entry(self.path.to_vec()).or_default();
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
                path: self.path.clone(),
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
                let Some(ns) = data.namespaces.get(&self.path[..]) else {
                    return Err(capnp::Error::failed("namespace no longer exists".into()));
                };
                if let Some(v) = ns.keys.get(&key) {
                    results.get().set_value(v);
                    return Ok(());
                }
                ns.changed.clone()
            };
            let mut notified = pin!(changed.notified());
            notified.as_mut().enable();
            // Re-check: a put may have landed between the lookup and enable().
            if self
                .store
                .data()
                .namespaces
                .get(&self.path[..])
                .is_some_and(|ns| ns.keys.contains_key(&key))
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
    path: Path,
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
        get(&self.store, &self.path, params, results).await
    }

    async fn list(
        self: Rc<Self>,
        params: reader::ListParams,
        results: reader::ListResults,
    ) -> Result<(), capnp::Error> {
        list(&self.store, &self.path, params, results).await
    }
}

struct SubscriptionCap {
    store: Store,
    path: Path,
    id: u64,
}

impl SubscriptionCap {
    fn end(&self) {
        let mut data = self.store.data();
        if let Some(ns) = data.namespaces.get_mut(&self.path[..]) {
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
