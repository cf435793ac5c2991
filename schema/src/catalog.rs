//! Names of interfaces and methods, and the `(interfaceId, methodId)` pairs they stand for,
//! from the compiled schema (`generated/catalog.rs`, written by the codegen tool).

use std::fmt;

/// One interface of the schema.
#[derive(Debug)]
pub struct InterfaceInfo {
    /// Its name in the schema file, e.g. `Namespace`.
    pub name: &'static str,
    /// The schema file that declares it.
    pub file: &'static str,
    /// Its 64-bit type id (what calls carry as `interfaceId`).
    pub id: u64,
    /// Ids of the interfaces it extends.
    pub superclasses: &'static [u64],
    /// Its own methods, by ordinal (what calls carry as `methodId`).
    pub methods: &'static [&'static str],
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

/// Why a name did not resolve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LookupError {
    /// No interface of that name; maybe a close one.
    UnknownInterface {
        /// The name asked for.
        name: String,
        /// A known interface with a similar name.
        suggestion: Option<&'static str>,
    },
    /// The interface (with its superclasses) has no such method.
    UnknownMethod {
        /// The interface asked for.
        interface: &'static str,
        /// The method asked for.
        method: String,
        /// A method of that interface with a similar name.
        suggestion: Option<&'static str>,
    },
}

impl fmt::Display for LookupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LookupError::UnknownInterface { name, suggestion } => {
                write!(f, "unknown interface `{name}`")?;
                if let Some(s) = suggestion {
                    write!(f, " (did you mean `{s}`?)")?;
                }
                Ok(())
            }
            LookupError::UnknownMethod {
                interface,
                method,
                suggestion,
            } => {
                write!(f, "interface `{interface}` has no method `{method}`")?;
                if let Some(s) = suggestion {
                    write!(f, " (did you mean `{interface}.{s}`?)")?;
                }
                Ok(())
            }
        }
    }
}

/// The interfaces a policy can name.
#[derive(Debug)]
pub struct Catalog {
    interfaces: &'static [InterfaceInfo],
}

impl Catalog {
    /// The catalog of capgate's own schema files.
    pub fn builtin() -> &'static Catalog {
        static BUILTIN: Catalog = Catalog {
            interfaces: crate::generated_catalog::INTERFACES,
        };
        &BUILTIN
    }

    /// Every interface.
    pub fn interfaces(&self) -> &[InterfaceInfo] {
        self.interfaces
    }

    /// The interface with this name.
    pub fn interface(&self, name: &str) -> Result<&InterfaceInfo, LookupError> {
        self.interfaces
            .iter()
            .find(|i| i.name == name)
            .ok_or_else(|| LookupError::UnknownInterface {
                name: name.to_string(),
                suggestion: suggest(name, self.interfaces.iter().map(|i| i.name)),
            })
    }

    /// The interface with this id.
    pub fn by_id(&self, id: u64) -> Option<&InterfaceInfo> {
        self.interfaces.iter().find(|i| i.id == id)
    }

    /// `Interface.method`, resolved through superclasses to the pair calls carry.
    pub fn method(&self, interface: &str, method: &str) -> Result<MethodRef, LookupError> {
        let iface = self.interface(interface)?;
        self.methods(iface)
            .into_iter()
            .find(|(name, _)| *name == method)
            .map(|(_, m)| m)
            .ok_or_else(|| LookupError::UnknownMethod {
                interface: iface.name,
                method: method.to_string(),
                suggestion: suggest(method, self.methods(iface).into_iter().map(|(n, _)| n)),
            })
    }

    /// Every method callable on `iface`, its own and inherited, with the pair calls carry.
    pub fn methods(&self, iface: &InterfaceInfo) -> Vec<(&'static str, MethodRef)> {
        let mut out = Vec::new();
        let mut todo = vec![iface.id];
        let mut seen = Vec::new();
        while let Some(id) = todo.pop() {
            if seen.contains(&id) {
                continue;
            }
            seen.push(id);
            let Some(i) = self.by_id(id) else { continue };
            for (ordinal, name) in i.methods.iter().enumerate() {
                out.push((
                    *name,
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

    /// `Interface.method` for a pair, or the raw ids for unknown ones.
    pub fn name_of(&self, m: MethodRef) -> String {
        match self.by_id(m.interface_id) {
            Some(i) => match i.methods.get(usize::from(m.method_id)) {
                Some(name) => format!("{}.{name}", i.name),
                None => format!("{}.@{}", i.name, m.method_id),
            },
            None => format!("{:#018x}.@{}", m.interface_id, m.method_id),
        }
    }
}

/// The candidate closest to `name` (edit distance at most 2, or a case-insensitive match).
pub fn suggest<'a>(name: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let lower = name.to_ascii_lowercase();
    candidates
        .map(|c| {
            let d = if c.to_ascii_lowercase() == lower {
                0
            } else {
                edit_distance(&lower, &c.to_ascii_lowercase())
            };
            (d, c)
        })
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inherited_methods_resolve_to_the_superclass_pair() {
        let c = Catalog::builtin();
        let via_namespace = c.method("Namespace", "get").unwrap();
        let via_reader = c.method("Reader", "get").unwrap();
        assert_eq!(via_namespace, via_reader);
        assert_eq!(via_reader.interface_id, c.interface("Reader").unwrap().id);
        assert_eq!(c.name_of(via_namespace), "Reader.get");
        let put = c.method("Namespace", "put").unwrap();
        assert_eq!(put.method_id, 0);
        assert_eq!(c.name_of(put), "Namespace.put");
    }

    #[test]
    fn unknown_names_get_suggestions() {
        let c = Catalog::builtin();
        assert_eq!(
            c.method("Namespace", "pt").unwrap_err().to_string(),
            "interface `Namespace` has no method `pt` (did you mean `Namespace.put`?)"
        );
        assert_eq!(
            c.interface("Stor").unwrap_err().to_string(),
            "unknown interface `Stor` (did you mean `Store`?)"
        );
        assert_eq!(
            c.interface("Nothing").unwrap_err().to_string(),
            "unknown interface `Nothing`"
        );
    }
}
