//! capgate's Cap'n Proto schemas and the Rust code generated from them.
//!
//! - [`store_capnp`]: the demo Store service (`schema/store.capnp`).
//! - [`bench_capnp`]: interfaces used by benchmarks and tests (`schema/bench.capnp`).
//!
//! The generated code is checked in; `scripts/regenerate-schema` rewrites it and CI checks
//! that it is current.
#![forbid(unsafe_code)]

#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
#[path = "generated/store_capnp.rs"]
pub mod store_capnp;

#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
#[path = "generated/bench_capnp.rs"]
pub mod bench_capnp;

mod catalog;
pub use catalog::{
    suggest, Bindings, Brand, BrandScope, Catalog, CatalogError, FieldInfo, FieldType,
    InterfaceInfo, LookupError, MethodInfo, MethodRef, StructInfo, MAX_REQUEST_BYTES,
};
