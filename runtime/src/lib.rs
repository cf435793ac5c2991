//! capgate runtime: capability-secured Cap'n Proto RPC over hardened transports.
//!
//! The path of one connection: socket -> [`FrameDecoder`] (limits checked before any
//! allocation) -> [`Guard`] -> capnp-rpc `RpcSystem` -> your capability; and back through the
//! guard's accounting to a coalescing, byte-bounded writer. See `DESIGN.md`.
#![forbid(unsafe_code)]

mod client;
mod error;
mod framing;
mod guard;
mod handle;
mod limits;
mod metrics;
mod network;
mod outgoing;
mod peer;
mod poll;
mod quota_store;
mod registry;
mod server;
pub mod tls;

pub use capgate_policy::{
    parse_bytes, parse_duration, AllowRule, ClientClass, Decision, Matcher, MethodQuota,
    MethodRate, PeerView, Policy, PolicyError, PolicyErrors, Quotas,
};
pub use capgate_schema::{Catalog, MethodRef};
pub use client::{Client, ClientBuilder};
pub use error::Error;
pub use framing::{
    encode_frame, encode_header, frame_len, Frame, FrameDecoder, FrameError, FrameLimits,
};
pub use guard::{DenialCounters, DenialCounts, Guard, RateLimit, Unlimited, Verdict};
pub use handle::ClientHandle;
pub use limits::Limits;
pub use metrics::Metrics;
pub use network::{new_network, ConnectionControl, ConnectionStats, GuardedNetwork};
pub use peer::{ClientKey, PeerAddr, PeerInfo};
pub use quota_store::{Fallback, QuotaKey, QuotaStore, RedisStoreConfig};
pub use registry::{CallRate, ClassSlot, ClientRegistry, ConnectionSlot};
pub use server::{
    BootstrapFactory, ListenAddr, PolicyHandle, Server, ServerBuilder, ServerStats, ShutdownHandle,
};
pub use tls::CertIdentity;

/// Re-exported so users name the same `Side` type capgate uses.
pub use capnp_rpc::rpc_twoparty_capnp::Side;

/// Views a capability as another interface type, typically a superclass:
/// `cast::<reader::Client>(&namespace)` calls inherited methods such as `Reader.get`.
/// (The server answers `Unimplemented` if the object does not implement `T`.)
pub fn cast<T: capnp::capability::FromClientHook>(
    client: &impl capnp::capability::FromClientHook,
) -> T {
    T::new(client.as_client_hook().add_ref())
}
