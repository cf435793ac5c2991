use capgate_schema::{Catalog, LookupError, MethodRef};

use crate::method_quota::MethodRules;
use crate::{Matcher, MethodQuota, Quotas};

/// One entry of an allowlist, as written, with where it was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowRule {
    /// The text: `Interface.method`, `Interface.*` or `*` (optionally `file.capnp:...`).
    pub pattern: String,
    /// `FILE:LINE:COL` of the entry, or a description for policies built in code.
    pub location: String,
    methods: Option<Vec<MethodRef>>,
}

impl AllowRule {
    /// Resolves a pattern against the catalog.
    pub fn parse(pattern: &str, catalog: &Catalog, location: String) -> Result<Self, LookupError> {
        let methods = catalog.resolve(pattern)?;
        Ok(Self {
            pattern: pattern.to_string(),
            location,
            methods,
        })
    }

    /// The methods it names, resolved (`None` for `*`: every method).
    pub fn methods(&self) -> Option<&[MethodRef]> {
        self.methods.as_deref()
    }

    fn covers(&self, m: MethodRef) -> bool {
        self.methods.as_ref().is_none_or(|ms| ms.contains(&m))
    }
}

/// What the policy says about one call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Allowed by this rule (pattern and location).
    Allowed(String, String),
    /// No rule of the class allows it.
    Denied,
}

/// A client class: how its clients are recognised, what they may call, their quotas.
#[derive(Clone, Debug)]
pub struct ClientClass {
    name: String,
    matcher: Matcher,
    rules: Vec<AllowRule>,
    /// The allowed methods, sorted (`None`: all). A binary search over the few dozen
    /// methods of an allowlist costs less than hashing the peer's method id with SipHash.
    allowed: Option<Vec<MethodRef>>,
    quotas: Quotas,
    methods: MethodRules,
}

impl ClientClass {
    /// A class that allows nothing yet, with default quotas.
    pub fn new(name: impl Into<String>, matcher: Matcher) -> Self {
        Self {
            name: name.into(),
            matcher,
            rules: Vec::new(),
            allowed: Some(Vec::new()),
            quotas: Quotas::default(),
            methods: MethodRules::default(),
        }
    }

    /// Allows every method.
    pub fn allow_all(mut self) -> Self {
        self.rules.push(AllowRule {
            pattern: "*".into(),
            location: "built in code".into(),
            methods: None,
        });
        self.allowed = None;
        self
    }

    /// Allows `Interface.method`, `Interface.*` or `*`, checked against the catalog.
    pub fn allow(self, pattern: &str, catalog: &Catalog) -> Result<Self, LookupError> {
        let rule = AllowRule::parse(pattern, catalog, "built in code".into())?;
        Ok(self.with_rule(rule))
    }

    pub(crate) fn with_rule(mut self, rule: AllowRule) -> Self {
        match (&mut self.allowed, &rule.methods) {
            (_, None) => self.allowed = None,
            (Some(set), Some(ms)) => {
                set.extend(ms.iter().copied());
                set.sort_unstable();
                set.dedup();
            }
            (None, Some(_)) => {}
        }
        self.rules.push(rule);
        self
    }

    /// Replaces the quotas.
    pub fn with_quotas(mut self, quotas: Quotas) -> Self {
        self.quotas = quotas;
        self
    }

    /// Adds a per-method rule: its quotas apply on top of the class's to the methods it
    /// names. Rules may overlap; a call must pass every rule covering it.
    pub fn with_method_quota(mut self, rule: MethodQuota) -> Self {
        self.methods.push(rule);
        self
    }

    /// The per-method rules, in the order written.
    pub fn method_quotas(&self) -> &[MethodQuota] {
        &self.methods.rules
    }

    /// Indices into [`ClientClass::method_quotas`] of the rules covering `m` (the call path:
    /// nothing when the class has no method rules, else one binary search).
    pub fn method_quotas_of(&self, m: MethodRef) -> &[u16] {
        self.methods.of(m)
    }

    /// The class name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How clients are matched.
    pub fn matcher(&self) -> &Matcher {
        &self.matcher
    }

    /// The quotas.
    pub fn quotas(&self) -> &Quotas {
        &self.quotas
    }

    /// The allowlist entries, as written.
    pub fn rules(&self) -> &[AllowRule] {
        &self.rules
    }

    /// Is this call allowed? (The hot path: one binary search.)
    pub fn allows(&self, m: MethodRef) -> bool {
        self.allowed
            .as_ref()
            .is_none_or(|set| set.binary_search(&m).is_ok())
    }

    /// Which rule allows the call, if any (for `policy explain`).
    pub fn decide(&self, m: MethodRef) -> Decision {
        match self.rules.iter().find(|r| r.covers(m)) {
            Some(r) => Decision::Allowed(r.pattern.clone(), r.location.clone()),
            None => Decision::Denied,
        }
    }
}
