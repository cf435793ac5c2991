//! capgate's own `capnp_rpc::VatNetwork`: hardened framing on the way in, the guard in the
//! middle, a coalescing, byte-bounded writer on the way out.

mod control;
mod messages;
mod pool;
mod reader;
mod relay;
mod shared;
mod vat;
mod writer;

pub use control::ConnectionControl;
pub(crate) use relay::{new_relay, RelayFuture};
pub use shared::ConnectionStats;
pub use vat::{new_network, GuardedNetwork};
