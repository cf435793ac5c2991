//! capgate's own `capnp_rpc::VatNetwork`: hardened framing on the way in, the guard in the
//! middle, a coalescing, byte-bounded writer on the way out.

mod connection;
mod outbox;
mod pool;
mod reader;
mod signal;
mod writer;

pub use connection::{new_network, ConnectionControl, ConnectionStats, GuardedNetwork};
