//! capgate policy: who a client is (client classes matched by Unix uid, source address, or
//! anything), what it may call (typed allowlists checked against the schema catalog when the
//! policy loads) and how much (quotas). No networking: the runtime's guard asks it questions.
#![forbid(unsafe_code)]

mod audit;
mod class;
mod error;
mod file;
mod matcher;
mod method_quota;
mod quotas;
mod units;

pub use audit::{
    audit, AuditReport, CallbackParam, ClassAudit, DeadRule, OpaqueEscape, OpaqueKind, Reached,
    WildcardAllowed, AUDIT_VERSION,
};
pub use class::{AllowRule, ClientClass, Decision};
pub use error::{PolicyError, PolicyErrors};
pub use matcher::{Matcher, PeerView};
pub use method_quota::{MethodQuota, MethodRate};
pub use quotas::Quotas;
pub use units::{parse_bytes, parse_duration};

use std::sync::Arc;

use capgate_schema::Catalog;

/// A compiled policy: client classes in order (first match wins).
#[derive(Clone, Debug)]
pub struct Policy {
    classes: Vec<Arc<ClientClass>>,
    origin: String,
}

impl Policy {
    /// The policy used when none is configured: one class, `default`, matching every client,
    /// allowing every method, with the default quotas.
    pub fn allow_all() -> Self {
        Self {
            classes: vec![Arc::new(
                ClientClass::new("default", Matcher::Any)
                    .allow_all()
                    .with_quotas(Quotas::default()),
            )],
            origin: "built-in default (allow = [\"*\"])".into(),
        }
    }

    /// A policy built in code. Classes are tried in order.
    pub fn from_classes(classes: Vec<ClientClass>) -> Self {
        Self {
            classes: classes.into_iter().map(Arc::new).collect(),
            origin: "built in code".into(),
        }
    }

    /// Parses and checks a policy file's text; `file` names it in error messages.
    pub fn parse(file: &str, text: &str, catalog: &Catalog) -> Result<Self, PolicyErrors> {
        let classes = file::parse(file, text, catalog)?;
        Ok(Self {
            classes: classes.into_iter().map(Arc::new).collect(),
            origin: file.to_string(),
        })
    }

    /// Reads, parses and checks a policy file.
    pub fn load(path: &std::path::Path, catalog: &Catalog) -> Result<Self, PolicyErrors> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            PolicyErrors::single(PolicyError::new(&name, 0, 0, format!("cannot read: {e}")))
        })?;
        Self::parse(&name, &text, catalog)
    }

    /// Where this policy came from (a file name, or a description).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The classes, in matching order.
    pub fn classes(&self) -> &[Arc<ClientClass>] {
        &self.classes
    }

    /// The class by name.
    pub fn class(&self, name: &str) -> Option<&Arc<ClientClass>> {
        self.classes.iter().find(|c| c.name() == name)
    }

    /// The first class matching this peer, with its index. Connections share the class.
    pub fn classify(&self, peer: &PeerView) -> Option<(usize, &Arc<ClientClass>)> {
        self.classes
            .iter()
            .enumerate()
            .find(|(_, c)| c.matcher().matches(peer))
    }
}
