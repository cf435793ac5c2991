//! What the server's listeners, workers and connections share: limits, the bootstrap
//! factory, the policy in force, the client registry, counters.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

use super::log_throttle;
use crate::{ClientRegistry, DenialCounters, Limits, Metrics, PeerAddr, PeerInfo, Policy};

/// Makes the bootstrap capability for each connection. Called on the connection's worker
/// thread (the capability it returns is `!Send` and lives there); the factory itself is
/// shared by all workers.
pub trait BootstrapFactory: Send + Sync + 'static {
    /// The capability the peer gets when it asks for the bootstrap interface.
    fn bootstrap(&self, peer: &PeerInfo) -> capnp::capability::Client;
}

/// What a connection is served by.
pub(crate) enum Backend {
    /// A local RpcSystem with this bootstrap (`capgate serve`).
    Local(Arc<dyn BootstrapFactory>),
    /// A relay to this upstream (`capgate gateway`).
    Upstream(Arc<crate::Upstream>),
}

pub(crate) struct ServerShared {
    pub(crate) limits: Limits,
    pub(crate) backend: Backend,
    pub(super) next_connection_id: AtomicU64,
    pub(crate) open_connections: AtomicUsize,
    pub(crate) policy: PolicyHandle,
    pub(crate) clients: Arc<ClientRegistry>,
    /// The shared quota store, if any (`ServerBuilder::quota_store`).
    pub(crate) fleet: Option<Arc<crate::quota_store::Fleet>>,
    pub(crate) denials: dashmap::DashMap<String, Arc<DenialCounters>>,
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
    pub(crate) metrics: Arc<Metrics>,
    /// Peer-driven log lines, summarised.
    pub(crate) log_throttle: log_throttle::LogThrottle,
    /// Bytes queued for all peers (`Limits::max_total_outgoing_bytes`).
    pub(crate) outgoing: Arc<crate::outgoing::OutgoingBudget>,
    /// The connection limits of each class's quotas, shared by its connections.
    pub(super) class_limits: std::sync::Mutex<Vec<Arc<Limits>>>,
}

/// At most this many distinct per-class limit sets are shared; beyond (many reloads with
/// ever-changing quotas), a connection gets its own copy.
const MAX_SHARED_LIMITS: usize = 64;

impl ServerShared {
    /// Whether to log a peer-driven event of `kind` now (see `log_throttle.rs`).
    pub(crate) fn throttled(&self, kind: &'static str) -> Option<u64> {
        self.log_throttle.admit(kind, std::time::Instant::now())
    }

    /// The server's limits with a class's quotas applied, shared by the connections that have
    /// the same quotas. One precedence rule: built-in default < builder (or CLI flag) < a
    /// value the class sets.
    pub(crate) fn limits_for(&self, q: &capgate_policy::Quotas) -> Arc<Limits> {
        let mut limits = self.limits.clone();
        if let Some(v) = q.max_message_bytes {
            limits.max_message_bytes = v;
        }
        if let Some(v) = q.idle_timeout {
            limits.idle_timeout = v;
        }
        let mut cache = self
            .class_limits
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(l) = cache.iter().find(|l| ***l == limits) {
            return l.clone();
        }
        let limits = Arc::new(limits);
        if cache.len() < MAX_SHARED_LIMITS {
            cache.push(limits.clone());
        }
        limits
    }

    pub(crate) fn denial_counters(&self, class: &str) -> Arc<DenialCounters> {
        self.denials
            .entry(class.to_string())
            .or_insert_with(|| Arc::new(DenialCounters::new(&self.metrics, class)))
            .clone()
    }
}

impl ServerShared {
    pub(super) fn peer(&self, addr: PeerAddr) -> PeerInfo {
        PeerInfo::new(
            self.next_connection_id.fetch_add(1, Ordering::Relaxed) + 1,
            addr,
        )
    }
}

/// The server's current policy; replacing it applies the new classes and quotas to new and
/// existing connections (each is re-matched; one that no class matches any more is closed).
#[derive(Clone)]
pub struct PolicyHandle {
    tx: Arc<watch::Sender<Arc<Policy>>>,
    catalog: crate::Catalog,
}

impl PolicyHandle {
    pub(crate) fn new(policy: Policy, catalog: crate::Catalog) -> Self {
        Self {
            tx: Arc::new(watch::channel(Arc::new(policy)).0),
            catalog,
        }
    }

    /// The catalog the server names methods by; reloaded policies are checked against it.
    pub fn catalog(&self) -> &crate::Catalog {
        &self.catalog
    }

    /// The policy in force.
    pub fn current(&self) -> Arc<Policy> {
        self.tx.borrow().clone()
    }

    /// Puts `policy` in force, whole.
    pub fn replace(&self, policy: Policy) {
        tracing::info!(
            origin = policy.origin(),
            classes = policy.classes().len(),
            "policy in force"
        );
        self.tx.send_replace(Arc::new(policy));
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Arc<Policy>> {
        self.tx.subscribe()
    }
}
