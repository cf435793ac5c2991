//! capgate: capability-secured Cap'n Proto RPC for networks you do not trust.
//!
//! ```no_run
//! # async fn example() -> Result<(), capgate::Error> {
//! use capgate::store_capnp::store;
//! let data = capgate::demo::Store::new();
//! let server = capgate::Server::builder()
//!     .listen("127.0.0.1:4000".parse().unwrap())
//!     .bootstrap_factory(move |_peer| data.client())
//!     .build()?;
//! server.serve().await
//! # }
//! ```
#![forbid(unsafe_code)]

pub mod demo;

pub use capgate_runtime::*;
pub use capgate_schema::{bench_capnp, store_capnp};
