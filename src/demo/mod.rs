//! The demo services: the Store (schema/store.capnp) and the Echo benchmark service.

mod echo;
mod store;

pub use echo::EchoService;
pub use store::{
    LiveObjects, Store, StoreLimits, StoreUsage, ENTRY_OVERHEAD_BYTES, NAMESPACE_OVERHEAD_BYTES,
};
