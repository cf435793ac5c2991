//! Building a catalog from a `CodeGeneratorRequest` (what `capnp compile -o-` writes). The
//! request is untrusted input like any other: bounded in size, read with a traversal limit,
//! every reference checked, every failure an error naming the node.

use std::collections::{HashMap, HashSet};

use capnp::schema_capnp::{brand, code_generator_request, field, node, type_};

use super::{
    Bindings, Brand, BrandScope, FieldInfo, FieldType, InterfaceInfo, MethodInfo, StructInfo,
};

/// Largest request accepted, in bytes. capgate's own schema is ~30 KiB; a schema with
/// hundreds of interfaces stays well under 1 MiB.
pub const MAX_REQUEST_BYTES: usize = 64 << 20;

/// Why a code generator request was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CatalogError(String);

impl std::fmt::Display for CatalogError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid code generator request: {}", self.0)
    }
}

impl std::error::Error for CatalogError {}

impl From<capnp::Error> for CatalogError {
    fn from(e: capnp::Error) -> Self {
        CatalogError(format!("cannot read it: {e}"))
    }
}

impl From<capnp::NotInSchema> for CatalogError {
    fn from(e: capnp::NotInSchema) -> Self {
        CatalogError(format!("a union it holds has an unknown variant: {e}"))
    }
}

impl From<std::str::Utf8Error> for CatalogError {
    fn from(e: std::str::Utf8Error) -> Self {
        CatalogError(format!("a name is not UTF-8: {e}"))
    }
}

pub(super) struct Parsed {
    pub(super) interfaces: Vec<InterfaceInfo>,
    pub(super) structs: Vec<StructInfo>,
    pub(super) files: Vec<String>,
}

/// Reads the request in `bytes` (one framed message).
pub(super) fn parse(bytes: &[u8]) -> Result<Parsed, CatalogError> {
    if bytes.len() > MAX_REQUEST_BYTES {
        return Err(CatalogError(format!(
            "{} bytes exceed the limit of {MAX_REQUEST_BYTES} bytes",
            bytes.len()
        )));
    }
    let words = (bytes.len() / 8) as u64 + 64;
    let options = capnp::message::ReaderOptions {
        // Each node is read a few times (names, then references).
        traversal_limit_in_words: Some(words.saturating_mul(8) as usize),
        nesting_limit: 64,
    };
    let mut input = bytes;
    let message = capnp::serialize::read_message(&mut input, options)?;
    let request: code_generator_request::Reader = message.get_root()?;
    let nodes = request.get_nodes()?;
    let mut ids = HashSet::with_capacity(nodes.len() as usize);
    let mut interfaces = Vec::new();
    let mut structs = Vec::new();
    let mut files = Vec::new();
    for n in nodes {
        let id = n.get_id();
        let display = n.get_display_name()?.to_str()?;
        if !ids.insert(id) {
            return Err(CatalogError(format!(
                "two nodes share the id {id:#018x} (the second is `{display}`)"
            )));
        }
        let (file, name) = display.split_once(':').unwrap_or((display, ""));
        match n.which()? {
            node::File(()) => files.push(display.to_string()),
            node::Interface(i) => {
                let mut methods = Vec::new();
                for m in i.get_methods()? {
                    methods.push(MethodInfo {
                        name: m.get_name()?.to_str()?.to_string(),
                        params: m.get_param_struct_type(),
                        results: m.get_result_struct_type(),
                        param_brand: read_brand(m.get_param_brand()?, 0)?,
                        result_brand: read_brand(m.get_result_brand()?, 0)?,
                    });
                }
                if methods.len() > usize::from(u16::MAX) + 1 {
                    return Err(CatalogError(format!(
                        "interface `{display}` has {} methods; method ordinals are 16 bits",
                        methods.len()
                    )));
                }
                interfaces.push(InterfaceInfo {
                    name: name.to_string(),
                    file: file.to_string(),
                    id,
                    superclasses: i.get_superclasses()?.iter().map(|s| s.get_id()).collect(),
                    methods,
                    generic: n.get_is_generic(),
                });
            }
            node::Struct(s) => {
                let mut fields = Vec::new();
                for f in s.get_fields()? {
                    let ty = match f.which()? {
                        field::Slot(slot) => field_type(slot.get_type()?, 0)?,
                        // A group shares its struct's scope: it inherits the arguments.
                        field::Group(g) => FieldType::Struct {
                            id: g.get_type_id(),
                            brand: Brand::default(),
                        },
                    };
                    fields.push(FieldInfo {
                        name: f.get_name()?.to_str()?.to_string(),
                        ty,
                    });
                }
                structs.push(StructInfo {
                    name: name.to_string(),
                    file: file.to_string(),
                    id,
                    fields,
                });
            }
            _ => {}
        }
    }
    check_references(&interfaces, &structs, &ids)?;
    check_acyclic(&interfaces)?;
    Ok(Parsed {
        interfaces,
        structs,
        files,
    })
}

/// Deepest nesting of list element types and type arguments in one field's type.
const MAX_TYPE_DEPTH: u32 = 64;

/// What a field's type says about capabilities. Lists and type arguments nest at most
/// [`MAX_TYPE_DEPTH`] deep (the reader's nesting limit usually stops deeper ones first).
fn field_type(t: type_::Reader<'_>, depth: u32) -> Result<FieldType, CatalogError> {
    use type_::any_pointer::unconstrained;
    if depth > MAX_TYPE_DEPTH {
        return Err(CatalogError(format!(
            "a type nests more than {MAX_TYPE_DEPTH} deep"
        )));
    }
    Ok(match t.which()? {
        type_::Interface(i) => FieldType::Interface {
            id: i.get_type_id(),
            brand: read_brand(i.get_brand()?, depth + 1)?,
        },
        type_::Struct(s) => FieldType::Struct {
            id: s.get_type_id(),
            brand: read_brand(s.get_brand()?, depth + 1)?,
        },
        type_::List(l) => FieldType::List(Box::new(field_type(l.get_element_type()?, depth + 1)?)),
        type_::AnyPointer(a) => match a.which()? {
            type_::any_pointer::Unconstrained(u) => match u.which()? {
                unconstrained::Capability(()) => FieldType::Capability,
                _ => FieldType::AnyPointer,
            },
            type_::any_pointer::Parameter(p) => FieldType::Parameter {
                scope_id: p.get_scope_id(),
                index: p.get_parameter_index(),
            },
            type_::any_pointer::ImplicitMethodParameter(_) => FieldType::MethodParameter,
        },
        _ => FieldType::Data,
    })
}

/// The type arguments of one use of a type; each bound type is read like a field's.
fn read_brand(b: brand::Reader<'_>, depth: u32) -> Result<Brand, CatalogError> {
    let mut scopes = Vec::new();
    for s in b.get_scopes()? {
        let bindings = match s.which()? {
            brand::scope::Bind(list) => {
                let mut bound = Vec::new();
                for binding in list? {
                    bound.push(match binding.which()? {
                        brand::binding::Unbound(()) => None,
                        brand::binding::Type(t) => Some(field_type(t?, depth + 1)?),
                    });
                }
                Bindings::Bind(bound)
            }
            brand::scope::Inherit(()) => Bindings::Inherit,
        };
        scopes.push(BrandScope {
            scope_id: s.get_scope_id(),
            bindings,
        });
    }
    Ok(Brand { scopes })
}

/// Every superclass, method param/result struct and field type named must be in the request.
fn check_references(
    interfaces: &[InterfaceInfo],
    structs: &[StructInfo],
    ids: &HashSet<u64>,
) -> Result<(), CatalogError> {
    let missing = |id: u64| !ids.contains(&id);
    for i in interfaces {
        let shown = format!("{}:{}", i.file, i.name);
        if let Some(s) = i.superclasses.iter().find(|&&s| missing(s)) {
            return Err(CatalogError(format!(
                "interface `{shown}` extends {s:#018x}, which is not in the request"
            )));
        }
        for m in &i.methods {
            for (what, id, brand) in [
                ("params", m.params, &m.param_brand),
                ("results", m.results, &m.result_brand),
            ] {
                if let Some(bad) = brand_missing(brand, &missing) {
                    return Err(CatalogError(format!(
                        "method `{shown}.{}` binds its {what} struct's type parameters to \
                         {bad:#018x}, which is not in the request",
                        m.name
                    )));
                }
                if missing(id) {
                    return Err(CatalogError(format!(
                        "method `{shown}.{}` names its {what} struct {id:#018x}, which is not \
                         in the request",
                        m.name
                    )));
                }
            }
        }
    }
    for s in structs {
        for f in &s.fields {
            if let Some(id) = first_missing(&f.ty, &missing) {
                return Err(CatalogError(format!(
                    "field `{}:{}.{}` has type {id:#018x}, which is not in the request",
                    s.file, s.name, f.name
                )));
            }
        }
    }
    Ok(())
}

/// The first node a type names, itself or in its type arguments, that is not in the request.
fn first_missing(t: &FieldType, missing: &impl Fn(u64) -> bool) -> Option<u64> {
    match t {
        FieldType::Interface { id, brand } | FieldType::Struct { id, brand } => {
            if missing(*id) {
                return Some(*id);
            }
            brand_missing(brand, missing)
        }
        FieldType::List(t) => first_missing(t, missing),
        _ => None,
    }
}

fn brand_missing(brand: &Brand, missing: &impl Fn(u64) -> bool) -> Option<u64> {
    brand.scopes.iter().find_map(|s| match &s.bindings {
        Bindings::Bind(types) => types
            .iter()
            .flatten()
            .find_map(|t| first_missing(t, missing)),
        Bindings::Inherit => None,
    })
}

/// An interface may not extend itself, directly or through others.
fn check_acyclic(interfaces: &[InterfaceInfo]) -> Result<(), CatalogError> {
    let index: HashMap<u64, usize> = interfaces
        .iter()
        .enumerate()
        .map(|(k, i)| (i.id, k))
        .collect();
    // 0: not visited, 1: on the current path, 2: done. Iterative: depth is the input's.
    let mut state = vec![0u8; interfaces.len()];
    for start in 0..interfaces.len() {
        if state[start] != 0 {
            continue;
        }
        let mut stack = vec![(start, 0usize)];
        state[start] = 1;
        while let Some((k, next)) = stack.pop() {
            let supers = &interfaces[k].superclasses;
            if next == supers.len() {
                state[k] = 2;
                continue;
            }
            stack.push((k, next + 1));
            // A superclass that is not an interface was caught by the reference check or is
            // a struct id misused: refuse it too.
            let Some(&s) = index.get(&supers[next]) else {
                return Err(CatalogError(format!(
                    "interface `{}:{}` extends {:#018x}, which is not an interface",
                    interfaces[k].file, interfaces[k].name, supers[next]
                )));
            };
            match state[s] {
                0 => {
                    state[s] = 1;
                    stack.push((s, 0));
                }
                1 => {
                    return Err(CatalogError(format!(
                        "interface `{}:{}` extends itself (through `{}:{}`)",
                        interfaces[s].file,
                        interfaces[s].name,
                        interfaces[k].file,
                        interfaces[k].name
                    )))
                }
                _ => {}
            }
        }
    }
    Ok(())
}
