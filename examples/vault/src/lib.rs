//! A service with its own schema behind capgate: the vault of `schema/vault.capnp`, its
//! catalog from the CodeGeneratorRequest that build.rs keeps, and a server holding every
//! client to `policy.toml`, whose names (`Vault.open`, `Box.fetch`, `Vault.Admin.wipe`) are
//! checked against that catalog when the policy loads.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::{Arc, Mutex, MutexGuard};

use capgate::{Catalog, Policy, Server};

/// The code capnpc generated for `schema/vault.capnp`.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod vault_capnp {
    include!(concat!(env!("OUT_DIR"), "/vault_capnp.rs"));
}

use vault_capnp::{box_, vault};

/// The catalog of `schema/vault.capnp`.
pub fn catalog() -> Catalog {
    Catalog::from_code_generator_request(include_bytes!(concat!(env!("OUT_DIR"), "/vault.cgr")))
        .expect("build.rs wrote a valid request")
}

/// `policy.toml` of this example, checked against the vault's catalog.
pub fn policy(catalog: &Catalog) -> Result<Policy, capgate::PolicyErrors> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policy.toml");
    Policy::load(&path, catalog)
}

/// A server on `addr` with one vault shared by every connection, enforcing `policy`.
pub fn server(addr: std::net::SocketAddr, policy: Policy) -> Result<Server, capgate::Error> {
    let shared = VaultImpl::default();
    Server::builder()
        .listen(addr)
        .catalog(catalog())
        .policy(policy)
        .bootstrap_factory(move |_peer| {
            capnp_rpc::new_client::<vault::Client, _>(VaultImpl {
                own: shared.own.clone(),
                boxes: shared.boxes.clone(),
            })
        })
        .build()
}

/// Shared by all connections, on every worker thread.
type Values = Arc<Mutex<BTreeMap<String, Vec<u8>>>>;

/// A poisoned lock still holds a whole map (every change is one insert).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One box of values.
#[derive(Default)]
struct BoxImpl {
    values: Values,
}

async fn store(values: &Values, params: box_::StoreParams) -> Result<(), capnp::Error> {
    let p = params.get()?;
    let key = p.get_key()?.to_string()?;
    lock(values).insert(key, p.get_value()?.to_vec());
    Ok(())
}

async fn fetch(
    values: &Values,
    params: box_::FetchParams,
    mut results: box_::FetchResults,
) -> Result<(), capnp::Error> {
    let key = params.get()?.get_key()?.to_string()?;
    let values = lock(values);
    let mut r = results.get();
    r.set_found(values.contains_key(&key));
    if let Some(v) = values.get(&key) {
        r.set_value(v);
    }
    Ok(())
}

impl box_::Server for BoxImpl {
    async fn store(
        self: Rc<Self>,
        params: box_::StoreParams,
        _: box_::StoreResults,
    ) -> Result<(), capnp::Error> {
        store(&self.values, params).await
    }

    async fn fetch(
        self: Rc<Self>,
        params: box_::FetchParams,
        results: box_::FetchResults,
    ) -> Result<(), capnp::Error> {
        fetch(&self.values, params, results).await
    }
}

/// The vault: a box itself, and named boxes inside.
#[derive(Default)]
struct VaultImpl {
    own: Values,
    boxes: Arc<Mutex<BTreeMap<String, Values>>>,
}

impl box_::Server for VaultImpl {
    async fn store(
        self: Rc<Self>,
        params: box_::StoreParams,
        _: box_::StoreResults,
    ) -> Result<(), capnp::Error> {
        store(&self.own, params).await
    }

    async fn fetch(
        self: Rc<Self>,
        params: box_::FetchParams,
        results: box_::FetchResults,
    ) -> Result<(), capnp::Error> {
        fetch(&self.own, params, results).await
    }
}

impl vault::Server for VaultImpl {
    async fn open(
        self: Rc<Self>,
        params: vault::OpenParams,
        mut results: vault::OpenResults,
    ) -> Result<(), capnp::Error> {
        let name = params.get()?.get_name()?.to_string()?;
        let values = lock(&self.boxes).entry(name).or_default().clone();
        results
            .get()
            .set_box(capnp_rpc::new_client(BoxImpl { values }));
        Ok(())
    }

    async fn admin(
        self: Rc<Self>,
        _: vault::AdminParams,
        mut results: vault::AdminResults,
    ) -> Result<(), capnp::Error> {
        results.get().set_admin(capnp_rpc::new_client(AdminImpl {
            boxes: self.boxes.clone(),
        }));
        Ok(())
    }
}

struct AdminImpl {
    boxes: Arc<Mutex<BTreeMap<String, Values>>>,
}

impl vault::admin::Server for AdminImpl {
    async fn wipe(
        self: Rc<Self>,
        _: vault::admin::WipeParams,
        mut results: vault::admin::WipeResults,
    ) -> Result<(), capnp::Error> {
        let removed = std::mem::take(&mut *lock(&self.boxes)).len();
        results
            .get()
            .set_removed(u32::try_from(removed).unwrap_or(u32::MAX));
        Ok(())
    }
}
