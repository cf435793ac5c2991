//! Per-method quotas: limits on the methods one `[client.methods."PATTERN"]` table names, on
//! top of the class's quotas (a call must pass both).
//!
//! A rule naming several methods (`Box.*`, `*`) gives them one budget together: `Box.* = 10/s`
//! is ten calls a second to all of `Box`, as an operator limiting an expensive interface
//! means. To limit each method on its own, write one rule per method.

use std::num::NonZeroU32;

use capgate_schema::{Catalog, LookupError, MethodRef};

/// The quotas of one method rule.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MethodQuota {
    /// The methods, as written: any allowlist name form (`Iface.method`, `Outer.Inner.m`,
    /// `file.capnp:Iface.m`, `Iface.*`, `*`).
    pub pattern: String,
    /// `FILE:LINE:COL` of the rule's table, or a description for rules built in code.
    pub location: String,
    /// Sustained rate and burst (GCRA), per client across all its connections, like the
    /// class rate. `None`: no rate of its own.
    pub rate: Option<MethodRate>,
    /// Calls of these methods in flight at once, per connection. `None`: no limit of its own.
    pub max_inflight_calls: Option<u32>,
    /// The methods it covers, sorted (`None`: every method).
    methods: Option<Vec<MethodRef>>,
}

/// A method rule's rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MethodRate {
    /// Calls per second, sustained.
    pub calls_per_second: NonZeroU32,
    /// Calls at once above the rate.
    pub burst: NonZeroU32,
}

impl MethodQuota {
    /// A rule for the methods `pattern` names, checked against the catalog; no quota yet.
    pub fn new(pattern: &str, catalog: &Catalog) -> Result<Self, LookupError> {
        Self::located(pattern, catalog, "built in code".into())
    }

    pub(crate) fn located(
        pattern: &str,
        catalog: &Catalog,
        location: String,
    ) -> Result<Self, LookupError> {
        let methods = catalog.resolve(pattern)?.map(|mut ms| {
            ms.sort_unstable();
            ms.dedup();
            ms
        });
        Ok(Self {
            pattern: pattern.to_string(),
            location,
            rate: None,
            max_inflight_calls: None,
            methods,
        })
    }

    /// With a rate of its own.
    pub fn with_rate(mut self, calls_per_second: NonZeroU32, burst: NonZeroU32) -> Self {
        self.rate = Some(MethodRate {
            calls_per_second,
            burst,
        });
        self
    }

    /// With an in-flight limit of its own.
    pub fn with_max_inflight_calls(mut self, n: u32) -> Self {
        self.max_inflight_calls = Some(n);
        self
    }

    /// The methods it covers (`None`: every method).
    pub fn methods(&self) -> Option<&[MethodRef]> {
        self.methods.as_deref()
    }

    /// Whether it covers `m`.
    pub fn covers(&self, m: MethodRef) -> bool {
        self.methods
            .as_ref()
            .is_none_or(|ms| ms.binary_search(&m).is_ok())
    }
}

/// The method rules of a class, indexed by method for the call path.
#[derive(Clone, Debug, Default)]
pub(crate) struct MethodRules {
    pub(crate) rules: Vec<MethodQuota>,
    /// For each method some rule names: every rule covering it (wildcard rules included),
    /// sorted by method for a binary search.
    index: Vec<(MethodRef, Box<[u16]>)>,
    /// The rules covering every method (`*`): what applies to a method no rule names.
    everywhere: Box<[u16]>,
}

/// More rules than this in one class is an error (rule indices are 16-bit).
pub(crate) const MAX_METHOD_RULES: usize = 4096;

impl MethodRules {
    pub(crate) fn push(&mut self, rule: MethodQuota) {
        self.rules.push(rule);
        self.reindex();
    }

    fn reindex(&mut self) {
        let everywhere: Vec<u16> = (0..self.rules.len())
            .filter(|&i| self.rules[i].methods.is_none())
            .map(|i| i as u16)
            .collect();
        let mut named: Vec<MethodRef> = self
            .rules
            .iter()
            .filter_map(|r| r.methods.as_deref())
            .flatten()
            .copied()
            .collect();
        named.sort_unstable();
        named.dedup();
        self.index = named
            .into_iter()
            .map(|m| {
                let ids: Vec<u16> = (0..self.rules.len())
                    .filter(|&i| self.rules[i].covers(m))
                    .map(|i| i as u16)
                    .collect();
                (m, ids.into_boxed_slice())
            })
            .collect();
        self.everywhere = everywhere.into_boxed_slice();
    }

    /// Indices (into `rules`) of the rules covering `m`, in the order they were written.
    pub(crate) fn of(&self, m: MethodRef) -> &[u16] {
        if self.rules.is_empty() {
            return &[];
        }
        match self.index.binary_search_by_key(&m, |(k, _)| *k) {
            Ok(i) => &self.index[i].1,
            Err(_) => &self.everywhere,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    #[test]
    fn a_method_gets_every_rule_that_names_it_in_order_and_others_only_the_wildcards() {
        let cat = Catalog::builtin();
        let mut rules = MethodRules::default();
        rules.push(
            MethodQuota::new("Namespace.*", cat)
                .unwrap()
                .with_max_inflight_calls(4),
        );
        rules.push(MethodQuota::new("*", cat).unwrap().with_rate(nz(5), nz(5)));
        rules.push(
            MethodQuota::new("Namespace.put", cat)
                .unwrap()
                .with_rate(nz(1), nz(1)),
        );
        let put = cat.method("Namespace", "put").unwrap();
        let get = cat.method("Namespace", "get").unwrap();
        let namespace = cat.method("Store", "namespace").unwrap();
        assert_eq!(rules.of(put), &[0, 1, 2]);
        // Namespace.* covers the methods Namespace inherits.
        assert_eq!(rules.of(get), &[0, 1]);
        assert_eq!(rules.of(namespace), &[1]);
        assert!(MethodRules::default().of(put).is_empty());
    }

    #[test]
    fn an_inherited_method_is_covered_under_the_subclass_name_and_the_declaring_one() {
        let cat = Catalog::builtin();
        // Namespace.get is declared by Reader: both names are one method.
        let by_sub = MethodQuota::new("Namespace.get", cat).unwrap();
        let by_base = MethodQuota::new("Reader.get", cat).unwrap();
        assert_eq!(by_sub.methods(), by_base.methods());
    }
}
