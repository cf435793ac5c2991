//! capgate runtime: capability-secured Cap'n Proto RPC over hardened transports.
//!
//! The path of one connection: socket -> a sans-IO connection core (the frame decoder, whose
//! limits ([`Limits`]) are checked before any allocation, the deadlines and the guard with its
//! [`Policy`]: allowlist, quotas) -> capnp-rpc `RpcSystem` -> your capability; and back
//! through the guard's accounting to a coalescing, byte-bounded writer. See
//! `docs/ARCHITECTURE.md`.
//!
//! Serve with [`Server::builder`], put the guard in front of an existing server with
//! [`Gateway::builder`] and an [`Upstream`], connect with [`Client::builder`] (or
//! [`ClientHandle`] from other threads).
#![forbid(unsafe_code)]

mod client;
mod core;
mod error;
// These modules' `pub` items are the `fuzzing` API; without that feature they are internal,
// and what only fuzz targets and wire-level tests use goes unused.
#[cfg_attr(
    not(feature = "fuzzing"),
    allow(unreachable_pub, dead_code, unused_imports)
)]
mod framing;
#[cfg_attr(
    not(feature = "fuzzing"),
    allow(unreachable_pub, dead_code, unused_imports)
)]
mod guard;
mod handle;
mod limits;
#[cfg_attr(not(feature = "fuzzing"), allow(unreachable_pub))]
mod metrics;
#[cfg_attr(
    not(feature = "fuzzing"),
    allow(unreachable_pub, dead_code, unused_imports)
)]
mod network;
mod outgoing;
mod peer;
mod poll;
mod quota_store;
// `RateLimit` and `Unlimited` are public through the `fuzzing` API only.
#[cfg_attr(not(feature = "fuzzing"), allow(unreachable_pub))]
mod rate;
mod registry;
mod server;
pub mod tls;
mod upstream;

pub use crate::core::{AbortReason, BudgetScope};
pub use capgate_policy::{
    parse_bytes, parse_duration, AllowRule, ClientClass, Decision, Matcher, MethodQuota,
    MethodRate, PeerView, Policy, PolicyError, PolicyErrors, Quotas,
};
pub use capgate_schema::{Catalog, MethodRef};
pub use client::{Client, ClientBuilder};
pub use error::Error;
pub use guard::DenialCounts;
pub use handle::ClientHandle;
pub use limits::Limits;
pub use network::ConnectionStats;
pub use peer::{ClientKey, PeerAddr, PeerInfo};
pub use quota_store::{Fallback, QuotaStore, RedisStoreConfig};
pub use server::{
    BootstrapFactory, Gateway, ListenAddr, PolicyHandle, Server, ServerBuilder, ServerStats,
    ShutdownHandle,
};
pub use tls::CertIdentity;
pub use upstream::{Upstream, DEFAULT_CONNECT_TIMEOUT};

pub(crate) use framing::FrameLimits;
pub(crate) use guard::{Guard, RateLimit};
pub(crate) use metrics::{DenialCounters, Metrics};
pub(crate) use network::ConnectionControl;
pub(crate) use quota_store::QuotaKey;
pub(crate) use rate::CallRate;
pub(crate) use registry::{ClassSlot, ClientRegistry, ConnectionSlot};

/// The sans-IO pieces under the server, for fuzz targets and wire-level tests: the frame
/// decoder and encoder, the guard, one guarded connection. Not a stable API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::framing::{
        encode_frame, encode_header, frame_len, Frame, FrameDecoder, FrameError, FrameLimits,
    };
    pub use crate::guard::{Guard, RateLimit, Unlimited, Verdict};
    pub use crate::metrics::{DenialCounters, Metrics};
    pub use crate::network::{new_network, ConnectionControl, GuardedNetwork};
}

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
