//! `capgate policy audit`: what each client class can actually reach from the bootstrap
//! interface, walking the schema's type graph, and where its allowlist says more (dead
//! rules, wildcards) or the type graph says less (opaque results) than the author may think.
//!
//! Reachability is over-approximated, the security-minded direction:
//! - A capability whose declared type is `X` may be any subclass of `X` at runtime (a
//!   result typed `Reader` may carry a `Namespace`), and calls carry the interface id the
//!   client chooses; so every subclass of a reachable interface counts as reachable. A rule
//!   is called dead only when even that cannot reach it.
//! - A callback the client hands over (a param typed with an interface) is called by the
//!   server with what that interface declares: its methods' params are capabilities the
//!   client obtains, its results more callbacks. Callbacks are not expanded to subclasses:
//!   the client picks their objects, the server's code calls only the declared methods.
//! - Generic arguments are followed where the schema binds them (`Box(Secret)`); a
//!   parameter left unbound (`Shelf` for `Shelf(T)`, a method's own `[T]`, a generic
//!   superclass's parameters) is an opaque escape like `AnyPointer`.

use serde::Serialize;

mod text;
mod walk;

use capgate_schema::{Catalog, InterfaceInfo};

use crate::Policy;

/// The JSON shape's version: bumped only when a field changes meaning or goes away.
pub const AUDIT_VERSION: u32 = 1;

/// What [`audit`] found, per client class in the policy's order; every list sorted.
/// Serialises to the documented JSON shape (`capgate policy audit --json`); `Display` is
/// the human-readable report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct AuditReport {
    /// [`AUDIT_VERSION`].
    pub version: u32,
    /// Where the policy came from ([`Policy::origin`]).
    pub policy: String,
    /// The bootstrap interface's name.
    pub bootstrap: String,
    /// One entry per client class.
    pub classes: Vec<ClassAudit>,
    /// Dead rules plus opaque escapes, over all classes: non-zero means "look at this".
    pub warnings: usize,
}

/// The audit of one client class.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ClassAudit {
    /// The class name.
    pub name: String,
    /// Interfaces a client of the class can hold, each with the first way found to get one.
    pub reachable_interfaces: Vec<Reached>,
    /// Methods it may call and can reach (`Interface.method`, by the declaring interface).
    pub callable: Vec<String>,
    /// Allowlist entries naming methods it can never reach.
    pub dead_rules: Vec<DeadRule>,
    /// Callable methods that only a wildcard entry (`Interface.*`, `*`) allows.
    pub wildcard_allowed: Vec<WildcardAllowed>,
    /// Places where a client obtains something the type graph cannot see into.
    pub opaque_escapes: Vec<OpaqueEscape>,
    /// Interfaces the client can hand to the server, and where.
    pub callbacks: Vec<CallbackParam>,
    /// Reachable interfaces none of whose methods the class may call.
    pub reachable_nothing_allowed: Vec<String>,
}

/// A reachable interface.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[non_exhaustive]
pub struct Reached {
    /// Its name (`file.capnp:Name` when two files declare the name).
    pub name: String,
    /// How: `bootstrap`, `Interface.method results.field`, `Callback.method params.field`
    /// (the server hands it to a callback), or `subclass of Name`.
    pub via: String,
}

/// An allowlist entry whose methods no allowed path reaches.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[non_exhaustive]
pub struct DeadRule {
    /// The entry as written.
    pub pattern: String,
    /// `FILE:LINE:COL` of the entry.
    pub location: String,
    /// The unreachable methods it names.
    pub methods: Vec<String>,
}

/// A callable method allowed only by a wildcard.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[non_exhaustive]
pub struct WildcardAllowed {
    /// The method.
    pub method: String,
    /// The first wildcard entry allowing it.
    pub pattern: String,
    /// Where that entry is.
    pub location: String,
}

/// A pointer the client obtains whose capabilities the type graph cannot name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[non_exhaustive]
pub struct OpaqueEscape {
    /// The method: an allowed one (its results) or a callback's (its params).
    pub method: String,
    /// The field, from `results.` or `params.` (`[]` for a list's elements).
    pub field: String,
    /// What its type is.
    pub kind: OpaqueKind,
}

/// The types the type graph cannot see past.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum OpaqueKind {
    /// `AnyPointer`, `AnyStruct`, `AnyList`.
    AnyPointer,
    /// `Capability`.
    Capability,
    /// A generic parameter nothing binds.
    UnboundGeneric,
}

/// An interface-typed param: a capability the client hands to the server.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[non_exhaustive]
pub struct CallbackParam {
    /// The method taking it (or the callback method returning it).
    pub method: String,
    /// The field, from `params.` (or `results.` of a callback method).
    pub field: String,
    /// Its interface.
    pub interface: String,
}

/// Audits every class of `policy` from `bootstrap`, in `catalog` (the one the policy was
/// checked against). Pure: no I/O; work is bounded by the schema's size.
pub fn audit(policy: &Policy, catalog: &Catalog, bootstrap: &InterfaceInfo) -> AuditReport {
    let classes: Vec<ClassAudit> = policy
        .classes()
        .iter()
        .map(|class| walk::audit_class(class, catalog, bootstrap))
        .collect();
    let warnings = classes
        .iter()
        .map(|c| c.dead_rules.len() + c.opaque_escapes.len())
        .sum();
    AuditReport {
        version: AUDIT_VERSION,
        policy: policy.origin().to_string(),
        bootstrap: walk::display_name(catalog, bootstrap),
        classes,
        warnings,
    }
}

#[cfg(test)]
mod tests;
