//! The store's capabilities: `Store`, `Namespace`, its read-only `Reader` view and watch
//! `Subscription`s.

use super::*;

pub(super) fn text(r: capnp::text::Reader<'_>) -> Result<String, capnp::Error> {
    r.to_string()
        .map_err(|e| capnp::Error::failed(format!("text is not valid UTF-8: {e}")))
}

pub(super) struct StoreCap {
    pub(super) store: Store,
    /// Who is charged for what this capability creates.
    pub(super) owner: Owner,
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

pub(super) struct NamespaceCap {
    pub(super) store: Store,
    pub(super) id: NsId,
    /// Who is charged for what this capability creates (its client, not the namespace's
    /// creator).
    pub(super) owner: Owner,
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

pub(super) struct ReaderCap {
    pub(super) store: Store,
    pub(super) id: NsId,
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

pub(super) struct SubscriptionCap {
    pub(super) store: Store,
    /// The watched namespace.
    pub(super) ns: NsId,
    /// The watcher's id there.
    pub(super) id: u64,
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
