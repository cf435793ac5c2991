//! The walk itself: a breadth-first search over (side, interface, type arguments) states,
//! so that the first way found to reach an interface is a shortest one.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

use capgate_schema::{Bindings, Brand, BrandScope, Catalog, FieldType, InterfaceInfo, MethodRef};

use super::{
    CallbackParam, ClassAudit, DeadRule, OpaqueEscape, OpaqueKind, Reached, WildcardAllowed,
};
use crate::{AllowRule, ClientClass};

/// Most distinct sets of type arguments one interface or struct is explored with; beyond
/// it, once more with none (its parameters unbound: opaque, so warned about). Stops the walk
/// from running forever on recursive generics (`G(T)` returning `G(List(T))`).
const MAX_BRANDS_PER_NODE: usize = 64;

/// Largest type argument kept, in type nodes; larger ones count as unbound. With the cap
/// above, keeps generics that grow their arguments (`P(A, B)` returning `P(P(A, B), A)`)
/// from building exponentially large types.
const MAX_ARGUMENT_NODES: usize = 256;

/// Whose object a capability is: the server's, held by the client (the client calls it,
/// through the allowlist), or the client's, handed to the server (the server calls it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Side {
    Held,
    Offered,
}

/// What a struct's fields lead to.
enum Found {
    Interface(u64, Brand, String),
    Opaque(OpaqueKind, String),
}

/// Interface names as the report shows them: `file.capnp:Name` when two files declare it.
pub(super) fn display_name(catalog: &Catalog, iface: &InterfaceInfo) -> String {
    let shared = catalog
        .interfaces()
        .iter()
        .filter(|i| i.name == iface.name)
        .count();
    if shared > 1 {
        format!("{}:{}", iface.file, iface.name)
    } else {
        iface.name.clone()
    }
}

struct Walk<'a> {
    catalog: &'a Catalog,
    class: &'a ClientClass,
    names: HashMap<u64, String>,
    /// Direct subclasses, sorted by name.
    subclasses: HashMap<u64, Vec<u64>>,
    seen: HashSet<(Side, u64, Brand)>,
    brands: HashMap<(Side, u64), usize>,
    queue: VecDeque<(Side, u64, Brand)>,
    /// Held interfaces, with the first way found to get one, in the order reached.
    reached: Vec<(u64, String)>,
    reached_ids: HashSet<u64>,
    reachable: HashSet<MethodRef>,
    escapes: BTreeSet<OpaqueEscape>,
    callbacks: BTreeSet<CallbackParam>,
}

pub(super) fn audit_class(
    class: &ClientClass,
    catalog: &Catalog,
    bootstrap: &InterfaceInfo,
) -> ClassAudit {
    let mut subclasses: HashMap<u64, Vec<u64>> = HashMap::new();
    for i in catalog.interfaces() {
        for s in &i.superclasses {
            subclasses.entry(*s).or_default().push(i.id);
        }
    }
    let names = catalog
        .interfaces()
        .iter()
        .map(|i| (i.id, display_name(catalog, i)))
        .collect();
    let mut w = Walk {
        catalog,
        class,
        names,
        subclasses,
        seen: HashSet::new(),
        brands: HashMap::new(),
        queue: VecDeque::new(),
        reached: Vec::new(),
        reached_ids: HashSet::new(),
        reachable: HashSet::new(),
        escapes: BTreeSet::new(),
        callbacks: BTreeSet::new(),
    };
    w.enqueue(Side::Held, bootstrap.id, Brand::default(), || {
        "bootstrap".into()
    });
    while let Some((side, id, brand)) = w.queue.pop_front() {
        w.visit(side, id, &brand);
    }
    w.report()
}

impl Walk<'_> {
    fn enqueue(&mut self, side: Side, id: u64, brand: Brand, via: impl FnOnce() -> String) {
        if self.catalog.by_id(id).is_none() {
            return;
        }
        let count = self.brands.entry((side, id)).or_insert(0);
        let brand = if *count < MAX_BRANDS_PER_NODE {
            brand
        } else {
            Brand::default()
        };
        if !self.seen.insert((side, id, brand.clone())) {
            return;
        }
        *count += 1;
        if side == Side::Held && self.reached_ids.insert(id) {
            self.reached.push((id, via()));
        }
        self.queue.push_back((side, id, brand));
    }

    fn method_name(&self, m: MethodRef) -> String {
        match (
            self.names.get(&m.interface_id),
            self.catalog
                .by_id(m.interface_id)
                .and_then(|i| i.methods.get(usize::from(m.method_id))),
        ) {
            (Some(iface), Some(method)) => format!("{iface}.{}", method.name),
            _ => self.catalog.name_of(m),
        }
    }

    fn iface_name(&self, id: u64) -> String {
        self.names
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("{id:#018x}"))
    }

    fn visit(&mut self, side: Side, id: u64, brand: &Brand) {
        let catalog = self.catalog;
        let Some(iface) = catalog.by_id(id) else {
            return;
        };
        if side == Side::Held {
            let children = self.subclasses.get(&id).cloned().unwrap_or_default();
            for child in children {
                let via = format!("subclass of {}", self.iface_name(id));
                self.enqueue(Side::Held, child, Brand::default(), || via);
            }
        }
        for (_, m) in catalog.methods(iface) {
            let Some(info) = catalog
                .by_id(m.interface_id)
                .and_then(|i| i.methods.get(usize::from(m.method_id)))
            else {
                continue;
            };
            let method = self.method_name(m);
            let params = fields(catalog, info.params, resolve(&info.param_brand, brand));
            let results = fields(catalog, info.results, resolve(&info.result_brand, brand));
            // What the caller of this method obtains, and what it hands over.
            let (obtained, handed, obtains_in) = match side {
                Side::Held => {
                    self.reachable.insert(m);
                    if !self.class.allows(m) {
                        continue;
                    }
                    (results, params, "results")
                }
                Side::Offered => (params, results, "params"),
            };
            let handed_in = if side == Side::Held {
                "params"
            } else {
                "results"
            };
            for f in obtained {
                match f {
                    Found::Interface(target, b, path) => {
                        let via = format!("{method} {obtains_in}.{path}");
                        self.enqueue(Side::Held, target, b, || via);
                    }
                    Found::Opaque(kind, path) => {
                        self.escapes.insert(OpaqueEscape {
                            method: method.clone(),
                            field: format!("{obtains_in}.{path}"),
                            kind,
                        });
                    }
                }
            }
            // An opaque param is the client handing over something the server's code
            // treats as untyped: nothing the client gains, so not reported.
            for f in handed {
                if let Found::Interface(target, b, path) = f {
                    self.callbacks.insert(CallbackParam {
                        method: method.clone(),
                        field: format!("{handed_in}.{path}"),
                        interface: self.iface_name(target),
                    });
                    self.enqueue(Side::Offered, target, b, String::new);
                }
            }
        }
    }

    fn report(self) -> ClassAudit {
        let class = self.class;
        let rules = class.rules();
        let mut reachable_interfaces: Vec<Reached> = self
            .reached
            .iter()
            .map(|(id, via)| Reached {
                name: self.iface_name(*id),
                via: via.clone(),
            })
            .collect();
        reachable_interfaces.sort();
        let mut callable: Vec<MethodRef> = self
            .reachable
            .iter()
            .copied()
            .filter(|&m| class.allows(m))
            .collect();
        callable.sort_by_cached_key(|&m| self.method_name(m));
        let dead_rules = rules
            .iter()
            .filter_map(|r| {
                let mut methods: Vec<String> = r
                    .methods()?
                    .iter()
                    .filter(|m| !self.reachable.contains(m))
                    .map(|&m| self.method_name(m))
                    .collect();
                methods.sort();
                methods.dedup();
                (!methods.is_empty()).then(|| DeadRule {
                    pattern: r.pattern.clone(),
                    location: r.location.clone(),
                    methods,
                })
            })
            .collect();
        let wildcard_allowed = callable
            .iter()
            .filter(|&&m| !rules.iter().any(|r| !is_wildcard(r) && covers(r, m)))
            .filter_map(|&m| {
                let r = rules.iter().find(|r| is_wildcard(r) && covers(r, m))?;
                Some(WildcardAllowed {
                    method: self.method_name(m),
                    pattern: r.pattern.clone(),
                    location: r.location.clone(),
                })
            })
            .collect();
        let mut reachable_nothing_allowed: Vec<String> = self
            .reached
            .iter()
            .filter_map(|(id, _)| self.catalog.by_id(*id))
            .filter(|i| {
                !self
                    .catalog
                    .methods(i)
                    .iter()
                    .any(|(_, m)| class.allows(*m))
            })
            .map(|i| self.iface_name(i.id))
            .collect();
        reachable_nothing_allowed.sort();
        ClassAudit {
            name: class.name().to_string(),
            reachable_interfaces,
            callable: callable.iter().map(|&m| self.method_name(m)).collect(),
            dead_rules,
            wildcard_allowed,
            opaque_escapes: self.escapes.into_iter().collect(),
            callbacks: self.callbacks.into_iter().collect(),
            reachable_nothing_allowed,
        }
    }
}

fn is_wildcard(r: &AllowRule) -> bool {
    r.methods().is_none() || r.pattern.ends_with(".*")
}

fn covers(r: &AllowRule, m: MethodRef) -> bool {
    r.methods().is_none_or(|ms| ms.contains(&m))
}

/// Where the fields of struct `root` (with these type arguments) lead: interfaces and
/// opaque pointers, each with its field path, in field order. Through nested structs,
/// groups, unions and lists; an explicit stack, as the nesting is the input's.
fn fields(catalog: &Catalog, root: u64, brand: Brand) -> Vec<Found> {
    let mut out = Vec::new();
    let mut seen: HashSet<(u64, Brand)> = HashSet::new();
    let mut brands: HashMap<u64, usize> = HashMap::new();
    let mut stack = vec![(
        bounded(FieldType::Struct { id: root, brand }),
        String::new(),
    )];
    while let Some((ty, path)) = stack.pop() {
        // Every type on the stack is resolved: its arguments are bound types or unbound.
        match ty {
            FieldType::Interface { id, brand } => out.push(Found::Interface(id, brand, path)),
            FieldType::Struct { id, brand } => {
                let Some(s) = catalog.struct_by_id(id) else {
                    continue;
                };
                let count = brands.entry(id).or_insert(0);
                let brand = if *count < MAX_BRANDS_PER_NODE {
                    brand
                } else {
                    Brand::default()
                };
                if !seen.insert((id, brand.clone())) {
                    continue;
                }
                *count += 1;
                for f in s.fields.iter().rev() {
                    let child = if path.is_empty() {
                        f.name.clone()
                    } else {
                        format!("{path}.{}", f.name)
                    };
                    stack.push((bounded(substitute(&f.ty, &brand)), child));
                }
            }
            FieldType::List(t) => stack.push((*t, format!("{path}[]"))),
            FieldType::Data => {}
            FieldType::AnyPointer => out.push(Found::Opaque(OpaqueKind::AnyPointer, path)),
            FieldType::Capability => out.push(Found::Opaque(OpaqueKind::Capability, path)),
            // Left unbound by `substitute`, a method's own parameter, or a kind of type
            // this build does not know: nothing says what it holds.
            _ => out.push(Found::Opaque(OpaqueKind::UnboundGeneric, path)),
        }
    }
    out
}

/// `t` as used where the type arguments are `env`: parameters replaced by what `env` binds
/// them to (or `MethodParameter`, "unconstrained", when it binds nothing), brands resolved.
/// Recurses over the schema's type only (the reader bounds its depth); bound types are
/// copied whole.
fn substitute(t: &FieldType, env: &Brand) -> FieldType {
    match t {
        FieldType::Interface { id, brand } => FieldType::Interface {
            id: *id,
            brand: resolve(brand, env),
        },
        FieldType::Struct { id, brand } => FieldType::Struct {
            id: *id,
            brand: resolve(brand, env),
        },
        FieldType::List(inner) => FieldType::List(Box::new(substitute(inner, env))),
        FieldType::Parameter { scope_id, index } => env
            .scopes
            .iter()
            .find(|s| s.scope_id == *scope_id)
            .and_then(|s| match &s.bindings {
                Bindings::Bind(types) => types.get(usize::from(*index)).cloned().flatten(),
                Bindings::Inherit => None,
            })
            .unwrap_or(FieldType::MethodParameter),
        other => other.clone(),
    }
}

/// A brand as used where the type arguments are `env`: bound types substituted, inherited
/// scopes copied from `env` (dropped, so unbound, when `env` lacks them).
fn resolve(brand: &Brand, env: &Brand) -> Brand {
    let scopes = brand
        .scopes
        .iter()
        .filter_map(|s| match &s.bindings {
            Bindings::Bind(types) => Some(BrandScope {
                scope_id: s.scope_id,
                bindings: Bindings::Bind(
                    types
                        .iter()
                        .map(|t| t.as_ref().map(|t| substitute(t, env)))
                        .collect(),
                ),
            }),
            Bindings::Inherit => env
                .scopes
                .iter()
                .find(|e| e.scope_id == s.scope_id)
                .cloned(),
        })
        .collect();
    Brand { scopes }
}

/// `t`, with each type argument larger than [`MAX_ARGUMENT_NODES`] unbound.
fn bounded(t: FieldType) -> FieldType {
    match t {
        FieldType::Interface { id, brand } => FieldType::Interface {
            id,
            brand: bounded_brand(brand),
        },
        FieldType::Struct { id, brand } => FieldType::Struct {
            id,
            brand: bounded_brand(brand),
        },
        FieldType::List(inner) => FieldType::List(Box::new(bounded(*inner))),
        other => other,
    }
}

fn bounded_brand(mut brand: Brand) -> Brand {
    for s in &mut brand.scopes {
        if let Bindings::Bind(types) = &mut s.bindings {
            for t in types.iter_mut() {
                if t.as_ref()
                    .is_some_and(|t| nodes(t, MAX_ARGUMENT_NODES) > MAX_ARGUMENT_NODES)
                {
                    *t = None;
                }
            }
        }
    }
    brand
}

/// How many type nodes `t` has, counting no further than just past `limit`.
fn nodes(t: &FieldType, limit: usize) -> usize {
    let mut count = 0;
    let mut stack = vec![t];
    while let Some(t) = stack.pop() {
        count += 1;
        if count > limit {
            break;
        }
        match t {
            FieldType::Interface { brand, .. } | FieldType::Struct { brand, .. } => {
                for s in &brand.scopes {
                    if let Bindings::Bind(types) = &s.bindings {
                        stack.extend(types.iter().flatten());
                    }
                }
            }
            FieldType::List(inner) => stack.push(inner),
            _ => {}
        }
    }
    count
}
