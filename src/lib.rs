//! capgate: capability-secured Cap'n Proto RPC for networks you do not trust.
//!
//! ```no_run
//! # async fn example() -> Result<(), capgate::Error> {
//! use capgate::store_capnp::store;
//! let data = capgate::demo::Store::new();
//! let server = capgate::Server::builder()
//!     .listen("127.0.0.1:4000".parse().unwrap())
//!     .bootstrap_factory(move |peer| data.client_for_peer(peer))
//!     .build()?;
//! server.serve().await
//! # }
//! ```
#![forbid(unsafe_code)]

pub mod demo;
mod dev_certs;
pub mod load;
pub mod schema;
pub use dev_certs::{write_dev_certs, DevCa, DevCerts};

// `capgate policy audit`: what each client class can reach from the bootstrap interface.
pub use capgate_policy::{
    audit, AuditReport, CallbackParam, ClassAudit, DeadRule, OpaqueEscape, OpaqueKind, Reached,
    WildcardAllowed, AUDIT_VERSION,
};
pub use capgate_runtime::*;
pub use capgate_schema::{bench_capnp, store_capnp};

/// Reloads the policy file at `path` into a running server: a file with errors is rejected
/// (the errors are returned and logged) and the policy in force stays, whole.
pub fn reload_policy(path: &std::path::Path, handle: &PolicyHandle) -> Result<(), PolicyErrors> {
    match Policy::load(path, handle.catalog()) {
        Ok(p) => {
            handle.replace(p);
            Ok(())
        }
        Err(errors) => {
            for e in &errors.0 {
                tracing::error!("{e}");
            }
            tracing::error!(
                "policy reload rejected; keeping the policy in force ({})",
                handle.current().origin()
            );
            Err(errors)
        }
    }
}
