//! Names of interfaces and methods, and the `(interfaceId, methodId)` pairs they stand for,
//! read from a `CodeGeneratorRequest`: capgate's own schema ([`Catalog::builtin`]) or any
//! user's ([`Catalog::from_code_generator_request`]). Also the struct types that methods take
//! and return, for following where capabilities go (the policy audit).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

mod cgr;
mod names;

pub use cgr::{CatalogError, MAX_REQUEST_BYTES};
pub use names::{suggest, LookupError};

use names::base_name;

/// One interface of the schema.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceInfo {
    /// Its name within its file, nested scopes included, e.g. `Namespace` or `Vault.Admin`.
    pub name: String,
    /// The schema file that declares it, as the compiler names it (e.g. `app.capnp`).
    pub file: String,
    /// Its 64-bit type id (what calls carry as `interfaceId`).
    pub id: u64,
    /// Ids of the interfaces it extends.
    pub superclasses: Vec<u64>,
    /// Its own methods, by ordinal (what calls carry as `methodId`).
    pub methods: Vec<MethodInfo>,
    /// Whether it has type parameters (it is named by its base name).
    pub generic: bool,
}

/// One method of an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MethodInfo {
    /// Its name.
    pub name: String,
    /// The id of its params struct.
    pub params: u64,
    /// The id of its results struct.
    pub results: u64,
    /// The type arguments of its params struct (a generic interface's implicit structs
    /// inherit the interface's).
    pub param_brand: Brand,
    /// The type arguments of its results struct.
    pub result_brand: Brand,
}

/// A struct (or group) of the schema, by the types of its fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StructInfo {
    /// Its name within its file (`Iface.method$Params` for implicit params structs).
    pub name: String,
    /// The file declaring it.
    pub file: String,
    /// Its type id.
    pub id: u64,
    /// Its fields, union members and groups included.
    pub fields: Vec<FieldInfo>,
}

/// A field of a struct.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldInfo {
    /// Its name.
    pub name: String,
    /// What its type says about capabilities.
    pub ty: FieldType,
}

/// A field's type, as far as capabilities are concerned.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FieldType {
    /// A capability of this interface, with its type arguments if it is generic.
    Interface {
        /// The interface's id.
        id: u64,
        /// Its type arguments (empty when it is not generic, or left unbound).
        brand: Brand,
    },
    /// A struct or group of this id, with its type arguments if it is generic.
    Struct {
        /// The struct's id.
        id: u64,
        /// Its type arguments.
        brand: Brand,
    },
    /// A list of these.
    List(Box<FieldType>),
    /// `AnyPointer` (or `AnyStruct`, `AnyList`): may hold any capability.
    AnyPointer,
    /// `Capability`: some capability, of no declared interface.
    Capability,
    /// A type parameter of a generic scope: whatever the user of the generic binds it to.
    Parameter {
        /// The id of the generic struct or interface that declares the parameter.
        scope_id: u64,
        /// Its position in that scope's parameter list.
        index: u16,
    },
    /// A method's own type parameter (`get[T] () -> (item :T)`): the caller names it per
    /// call, so the schema does not constrain it.
    MethodParameter,
    /// Data without capabilities (numbers, text, data, enums).
    Data,
}

impl FieldType {
    /// The node this type refers to, if any.
    pub fn target(&self) -> Option<u64> {
        match self {
            FieldType::Interface { id, .. } | FieldType::Struct { id, .. } => Some(*id),
            FieldType::List(t) => t.target(),
            _ => None,
        }
    }
}

/// The type arguments of a generic type where it is used (`Box(Secret)`), per scope: the
/// generic itself and each generic it is nested in. The parameters of a scope not listed
/// are unbound (`AnyPointer`), as in the schema language.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Brand {
    /// The scopes given, in the order the compiler wrote them.
    pub scopes: Vec<BrandScope>,
}

/// One scope of a [`Brand`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BrandScope {
    /// The id of the generic struct or interface whose parameters these are.
    pub scope_id: u64,
    /// What they are bound to.
    pub bindings: Bindings,
}

/// How a scope's parameters are bound.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Bindings {
    /// To these types, by parameter index (`None`: left unbound).
    Bind(Vec<Option<FieldType>>),
    /// To whatever the enclosing use binds them to (a generic interface's implicit params
    /// and results structs inherit the interface's arguments).
    Inherit,
}

/// A method as calls address it: the id of the interface that *declares* it and its ordinal.
/// An inherited method (`Namespace.get`) is the superclass's pair (`Reader.get`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MethodRef {
    /// `interfaceId` of the declaring interface.
    pub interface_id: u64,
    /// `methodId`: the ordinal within the declaring interface.
    pub method_id: u16,
}

/// The interfaces a policy can name. Cheap to clone (shared).
#[derive(Clone, Debug)]
pub struct Catalog {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Sorted by (name, file).
    interfaces: Vec<InterfaceInfo>,
    by_id: HashMap<u64, usize>,
    structs: HashMap<u64, StructInfo>,
    files: Vec<String>,
}

impl Catalog {
    /// The catalog of capgate's own schema files (`schema/*.capnp`), from the request the
    /// schema compiler wrote for them (checked in beside the generated code).
    pub fn builtin() -> &'static Catalog {
        static BUILTIN: OnceLock<Catalog> = OnceLock::new();
        BUILTIN.get_or_init(|| {
            Catalog::from_code_generator_request(include_bytes!("../generated/schema.cgr"))
                .expect("the checked-in request of capgate's own schema is valid")
        })
    }

    /// The catalog of every interface in a `CodeGeneratorRequest` (the output of
    /// `capnp compile -o-`, or capnpc's `raw_code_generator_request_path` in a build.rs).
    /// The request is checked like untrusted input: size, references, superclass cycles.
    pub fn from_code_generator_request(bytes: &[u8]) -> Result<Catalog, CatalogError> {
        Self::from_requests(&[bytes])
    }

    /// One catalog of several requests (several schema files compiled apart); a node in
    /// more than one of them (a shared import) counts once.
    pub fn from_requests(requests: &[&[u8]]) -> Result<Catalog, CatalogError> {
        let mut interfaces: Vec<InterfaceInfo> = Vec::new();
        let mut structs = HashMap::new();
        let mut files: Vec<String> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for bytes in requests {
            let parsed = cgr::parse(bytes)?;
            for i in parsed.interfaces {
                if seen.insert(i.id) {
                    interfaces.push(i);
                }
            }
            for s in parsed.structs {
                structs.entry(s.id).or_insert(s);
            }
            for f in parsed.files {
                if !files.contains(&f) {
                    files.push(f);
                }
            }
        }
        interfaces.sort_by(|a, b| (&a.name, &a.file).cmp(&(&b.name, &b.file)));
        let by_id = interfaces
            .iter()
            .enumerate()
            .map(|(k, i)| (i.id, k))
            .collect();
        Ok(Catalog {
            inner: Arc::new(Inner {
                interfaces,
                by_id,
                structs,
                files,
            }),
        })
    }

    /// Every interface, sorted by name.
    pub fn interfaces(&self) -> &[InterfaceInfo] {
        &self.inner.interfaces
    }

    /// The schema files the catalog was made from (imports included).
    pub fn files(&self) -> &[String] {
        &self.inner.files
    }

    /// The interface with this name: `Name`, `Outer.Inner`, or `file.capnp:Name` to pick
    /// one of several files declaring the same name.
    pub fn interface(&self, name: &str) -> Result<&InterfaceInfo, LookupError> {
        self.interface_for(name, "")
    }

    /// `rest` is what followed the interface in the pattern, for the ambiguity hint.
    fn interface_for(&self, name: &str, rest: &str) -> Result<&InterfaceInfo, LookupError> {
        let (file, name) = match name.rsplit_once(':') {
            Some((file, name)) => (Some(file), name),
            None => (None, name),
        };
        if let Some(file) = file {
            let known = |f: &str| f == file || base_name(f) == file;
            if !self.inner.interfaces.iter().any(|i| known(&i.file)) {
                return Err(LookupError::UnknownFile {
                    file: file.to_string(),
                    suggestion: suggest(file, self.inner.files.iter().map(|f| base_name(f)))
                        .map(str::to_string),
                });
            }
        }
        let matches: Vec<&InterfaceInfo> = self
            .inner
            .interfaces
            .iter()
            .filter(|i| i.name == name)
            .filter(|i| file.is_none_or(|f| i.file == f || base_name(&i.file) == f))
            .collect();
        match matches[..] {
            [one] => Ok(one),
            [] => Err(LookupError::UnknownInterface {
                name: name.to_string(),
                suggestion: suggest(name, self.inner.interfaces.iter().map(|i| i.name.as_str()))
                    .map(str::to_string),
            }),
            _ => Err(LookupError::Ambiguous {
                name: name.to_string(),
                files: matches.iter().map(|i| i.file.clone()).collect(),
                rest: rest.to_string(),
            }),
        }
    }

    /// The interface with this id.
    pub fn by_id(&self, id: u64) -> Option<&InterfaceInfo> {
        self.inner
            .by_id
            .get(&id)
            .map(|&k| &self.inner.interfaces[k])
    }

    /// The struct (or group) with this id.
    pub fn struct_by_id(&self, id: u64) -> Option<&StructInfo> {
        self.inner.structs.get(&id)
    }

    /// `Interface.method`, resolved through superclasses to the pair calls carry.
    pub fn method(&self, interface: &str, method: &str) -> Result<MethodRef, LookupError> {
        let iface = self.interface_for(interface, &format!(".{method}"))?;
        self.method_of(iface, method)
    }

    fn method_of(&self, iface: &InterfaceInfo, method: &str) -> Result<MethodRef, LookupError> {
        let all = self.methods(iface);
        all.iter()
            .find(|(name, _)| *name == method)
            .map(|(_, m)| *m)
            .ok_or_else(|| LookupError::UnknownMethod {
                interface: iface.name.clone(),
                method: method.to_string(),
                suggestion: suggest(method, all.iter().map(|(n, _)| *n)).map(str::to_string),
            })
    }

    /// Every method callable on `iface`, its own and inherited, with the pair calls carry.
    pub fn methods<'a>(&'a self, iface: &'a InterfaceInfo) -> Vec<(&'a str, MethodRef)> {
        let mut out = Vec::new();
        let mut todo = vec![iface.id];
        let mut seen = std::collections::HashSet::new();
        while let Some(id) = todo.pop() {
            if !seen.insert(id) {
                continue;
            }
            let Some(i) = self.by_id(id) else { continue };
            for (ordinal, m) in i.methods.iter().enumerate() {
                out.push((
                    m.name.as_str(),
                    MethodRef {
                        interface_id: i.id,
                        method_id: ordinal as u16,
                    },
                ));
            }
            todo.extend(i.superclasses.iter().copied());
        }
        out
    }

    /// What an allowlist entry or a per-method table names: `Interface.method`,
    /// `Interface.*` (its own and inherited methods), `*` (`None`: every method), each
    /// optionally as `file.capnp:Interface...`; nested interfaces by their scope
    /// (`Vault.Admin.wipe`).
    pub fn resolve(&self, pattern: &str) -> Result<Option<Vec<MethodRef>>, LookupError> {
        if pattern == "*" {
            return Ok(None);
        }
        let (file, scoped) = match pattern.rsplit_once(':') {
            Some((file, rest)) => (Some(file), rest),
            None => (None, pattern),
        };
        let Some((iface, method)) = scoped.rsplit_once('.') else {
            return Err(LookupError::BadPattern {
                pattern: pattern.to_string(),
            });
        };
        if iface.is_empty() || method.is_empty() {
            return Err(LookupError::BadPattern {
                pattern: pattern.to_string(),
            });
        }
        let qualified = match file {
            Some(f) => format!("{f}:{iface}"),
            None => iface.to_string(),
        };
        let info = self.interface_for(&qualified, &format!(".{method}"))?;
        if method == "*" {
            Ok(Some(
                self.methods(info).into_iter().map(|(_, m)| m).collect(),
            ))
        } else {
            Ok(Some(vec![self.method_of(info, method)?]))
        }
    }

    /// `Interface.method` for a pair, or the raw ids for unknown ones.
    pub fn name_of(&self, m: MethodRef) -> String {
        match self.by_id(m.interface_id) {
            Some(i) => match i.methods.get(usize::from(m.method_id)) {
                Some(method) => format!("{}.{}", i.name, method.name),
                None => format!("{}.@{}", i.name, m.method_id),
            },
            None => format!("{:#018x}.@{}", m.interface_id, m.method_id),
        }
    }
}

#[cfg(test)]
mod tests;
