//! The demo services: the Store (schema/store.capnp) and the Echo benchmark service, and a
//! relay that adds latency to loopback for demos, tests and benchmarks.

mod echo;
mod latency;
mod store;

pub use echo::EchoService;
pub use latency::LatencyProxy;
pub use store::{
    LiveObjects, Store, StoreLimits, StoreUsage, ENTRY_OVERHEAD_BYTES, NAMESPACE_OVERHEAD_BYTES,
};
