use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;

use capnp::capability::FromClientHook;

use super::listener::Listener;
use super::shared::{Backend, BootstrapFactory, PolicyHandle, ServerShared};
use super::{Server, ShutdownHandle};
use crate::quota_store::{Fleet, StoreMetrics};
use crate::{ClientClass, ClientRegistry, Error, Matcher, Metrics, Policy, QuotaStore, Quotas};
use crate::{Limits, PeerInfo};

struct FnFactory<F>(F);

impl<F, C> BootstrapFactory for FnFactory<F>
where
    F: Fn(&PeerInfo) -> C + Send + Sync + 'static,
    C: FromClientHook,
{
    fn bootstrap(&self, peer: &PeerInfo) -> capnp::capability::Client {
        capnp::capability::Client::new((self.0)(peer).into_client_hook())
    }
}

impl Server {
    /// Starts configuring a server.
    pub fn builder() -> ServerBuilder {
        ServerBuilder::new()
    }
}

/// A gateway: capgate's listeners, TLS, policy, quotas and limits in front of an existing
/// Cap'n Proto server (any language), relaying each client connection to its own upstream
/// connection without an RpcSystem in the middle. Built like a server:
/// `Gateway::builder().upstream(Upstream::parse("unix:/run/app.sock")?).listen(..).build()`
/// gives a [`Server`] that relays.
pub struct Gateway(());

impl Gateway {
    /// Starts configuring a gateway: a [`ServerBuilder`] that needs
    /// [`ServerBuilder::upstream`] instead of a bootstrap factory.
    pub fn builder() -> ServerBuilder {
        ServerBuilder::new()
    }
}

/// Configures a [`Server`]. Nothing is defaulted silently where it matters for security:
/// a server needs at least one listener and a bootstrap factory.
#[must_use]
pub struct ServerBuilder {
    tcp: Vec<SocketAddr>,
    unix: Vec<PathBuf>,
    limits: Limits,
    workers: Option<NonZeroUsize>,
    factory: Option<Arc<dyn BootstrapFactory>>,
    upstream: Option<crate::Upstream>,
    policy: Option<Policy>,
    catalog: Option<crate::Catalog>,
    tls: Option<Arc<rustls::ServerConfig>>,
    metrics: Option<SocketAddr>,
    quota_store: QuotaStore,
}

impl ServerBuilder {
    pub(super) fn new() -> Self {
        Self {
            tcp: Vec::new(),
            unix: Vec::new(),
            limits: Limits::default(),
            workers: None,
            factory: None,
            upstream: None,
            policy: None,
            catalog: None,
            tls: None,
            metrics: None,
            quota_store: QuotaStore::InProcess,
        }
    }

    /// Listens on a TCP address (port 0 picks a free port; see [`Server::local_addrs`]).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.tcp.push(addr);
        self
    }

    /// Listens on a Unix socket path. A stale socket file left by a dead server is replaced;
    /// a live one is an error.
    pub fn listen_unix(mut self, path: impl AsRef<Path>) -> Self {
        self.unix.push(path.as_ref().to_path_buf());
        self
    }

    /// Replaces the connection limits (default: [`Limits::default`]).
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Polls each connection's socket for up to `time` after each write instead of sleeping
    /// at once (see [`Limits::busy_poll`]): lower latency for more CPU. Default: off.
    pub fn busy_poll(mut self, time: std::time::Duration) -> Self {
        self.limits.busy_poll = time;
        self
    }

    /// After answering a client's calls, polls its socket for up to `time` for its next call
    /// (see [`Limits::call_poll`]). Default 25 µs; zero turns it off.
    pub fn call_poll(mut self, time: std::time::Duration) -> Self {
        self.limits.call_poll = time;
        self
    }

    /// The policy: client classes, allowlists, quotas (from a file with [`Policy::load`] or
    /// built in code). Without one, every client may call every method, with the default
    /// quotas; `build` logs a warning saying so.
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = Some(policy);
        self
    }

    /// The schema the server's interfaces come from (default: capgate's own, the demo
    /// Store's). Denials, metrics' method labels and policy reloads name methods by it; load
    /// the policy against the same catalog (`Policy::load(path, &catalog)`).
    pub fn catalog(mut self, catalog: crate::Catalog) -> Self {
        self.catalog = Some(catalog);
        self
    }

    /// Serves TLS on every TCP listener (see [`crate::tls::server_config`]); with a client
    /// CA, the verified client certificate's identity reaches the policy and the bootstrap
    /// factory ([`PeerInfo::tls`]). Unix listeners stay plaintext.
    pub fn tls(mut self, config: Arc<rustls::ServerConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    /// Serves the metrics in the Prometheus text format over HTTP on this address.
    pub fn metrics(mut self, addr: SocketAddr) -> Self {
        self.metrics = Some(addr);
        self
    }

    /// Where per-client rates and connection counts are counted (default:
    /// [`QuotaStore::InProcess`], this server alone). With [`QuotaStore::Redis`], servers
    /// sharing the store share each client's `calls_per_second`/`burst` and
    /// `max_connections`; calls never wait on the store (see the README's "Fleet quotas").
    pub fn quota_store(mut self, store: QuotaStore) -> Self {
        self.quota_store = store;
        self
    }

    /// Number of worker threads (default: the available cores).
    pub fn workers(mut self, n: NonZeroUsize) -> Self {
        self.workers = Some(n);
        self
    }

    /// Sets the per-connection bootstrap factory. It receives the peer's identity and returns
    /// any capability client type, e.g. `capnp_rpc::new_client::<store::Client, _>(..)`.
    pub fn bootstrap_factory<F, C>(mut self, f: F) -> Self
    where
        F: Fn(&PeerInfo) -> C + Send + Sync + 'static,
        C: FromClientHook,
    {
        self.factory = Some(Arc::new(FnFactory(f)));
        self
    }

    /// Like [`ServerBuilder::bootstrap_factory`], with a factory object.
    pub fn bootstrap(mut self, factory: Arc<dyn BootstrapFactory>) -> Self {
        self.factory = Some(factory);
        self
    }

    /// Relays every connection to `upstream` instead of serving it locally: a gateway (see
    /// [`crate::Gateway`]). The policy, limits and quotas apply as for a local server.
    pub fn upstream(mut self, upstream: crate::Upstream) -> Self {
        self.upstream = Some(upstream);
        self
    }

    /// Binds every listener. Call [`Server::serve`] to start serving.
    pub fn build(self) -> Result<Server, Error> {
        let backend = match (self.factory, self.upstream) {
            (Some(f), None) => Backend::Local(f),
            (None, Some(u)) => Backend::Upstream(Arc::new(u)),
            (None, None) => {
                return Err(Error::Config(
                    "no bootstrap factory: call bootstrap_factory(..) (or upstream(..) for a \
                     gateway)"
                        .into(),
                ))
            }
            (Some(_), Some(_)) => {
                return Err(Error::Config(
                    "both a bootstrap factory and an upstream: a server serves one or relays \
                     to the other"
                        .into(),
                ))
            }
        };
        if self.limits.max_message_bytes < 64 || self.limits.max_segments == 0 {
            return Err(Error::Config(format!(
                "max_message_bytes ({}) must be at least 64 and max_segments ({}) at least 1",
                self.limits.max_message_bytes, self.limits.max_segments
            )));
        }
        crate::rate::calibrate_clock();
        let mut listeners = Vec::new();
        for addr in self.tcp {
            let l = std::net::TcpListener::bind(addr)
                .map_err(|e| Error::io(format!("binding tcp://{addr}"), e))?;
            l.set_nonblocking(true)
                .map_err(|e| Error::io("configuring a listener", e))?;
            let local = l
                .local_addr()
                .map_err(|e| Error::io("reading a listener's address", e))?;
            listeners.push(Listener::Tcp(l, local));
        }
        for path in self.unix {
            let l = bind_unix(&path)?;
            listeners.push(Listener::Unix(l, path));
        }
        let workers = self
            .workers
            .or_else(|| std::thread::available_parallelism().ok())
            .map_or(1, NonZeroUsize::get);
        let policy = match self.policy {
            Some(p) => p,
            None => {
                tracing::warn!(
                    "no policy given: every client may call every method (allow = [\"*\"]) \
                     with the default quotas"
                );
                // The class's quotas leave message size and idle time to the server's limits.
                Policy::from_classes(vec![ClientClass::new("default", Matcher::Any)
                    .allow_all()
                    .with_quotas(Quotas::default())])
            }
        };
        let metrics_listener = match self.metrics {
            Some(addr) => {
                let l = std::net::TcpListener::bind(addr)
                    .map_err(|e| Error::io(format!("binding the metrics endpoint {addr}"), e))?;
                l.set_nonblocking(true)
                    .map_err(|e| Error::io("configuring a listener", e))?;
                let local = l
                    .local_addr()
                    .map_err(|e| Error::io("reading a listener's address", e))?;
                Some((l, local))
            }
            None => None,
        };
        let mut metrics = Metrics::default();
        let fleet = match &self.quota_store {
            QuotaStore::InProcess => None,
            QuotaStore::Redis(config) => {
                config.validate()?;
                tracing::info!(
                    store = %config.addr(),
                    fallback = ?config.fallback,
                    fleet_size = config.fleet_size,
                    "quota store: Redis"
                );
                Some(Fleet::redis(
                    config,
                    StoreMetrics::register(metrics.registry_mut()),
                ))
            }
        };
        let clients = match &fleet {
            Some(f) => ClientRegistry::with_fleet(f.clone()),
            None => ClientRegistry::default(),
        };
        Ok(Server {
            listeners,
            metrics_listener,
            shared: Arc::new(ServerShared {
                log_throttle: Default::default(),
                outgoing: crate::outgoing::OutgoingBudget::new(
                    self.limits.max_total_outgoing_bytes,
                ),
                limits: self.limits,
                backend,
                next_connection_id: AtomicU64::new(0),
                open_connections: AtomicUsize::new(0),
                policy: PolicyHandle::new(
                    policy,
                    self.catalog
                        .unwrap_or_else(|| crate::Catalog::builtin().clone()),
                ),
                clients: Arc::new(clients),
                fleet,
                denials: Default::default(),
                tls: self.tls.map(tokio_rustls::TlsAcceptor::from),
                metrics: Arc::new(metrics),
                class_limits: Default::default(),
            }),
            workers,
            shutdown: ShutdownHandle::new(),
        })
    }
}

fn bind_unix(path: &Path) -> Result<std::os::unix::net::UnixListener, Error> {
    use std::os::unix::net::{UnixListener, UnixStream};
    let shown = path.display();
    let l = match UnixListener::bind(path) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if UnixStream::connect(path).is_ok() {
                return Err(Error::io(
                    format!("binding unix:{shown}: another server is listening there"),
                    e,
                ));
            }
            std::fs::remove_file(path)
                .map_err(|e| Error::io(format!("removing stale socket unix:{shown}"), e))?;
            UnixListener::bind(path).map_err(|e| Error::io(format!("binding unix:{shown}"), e))?
        }
        Err(e) => return Err(Error::io(format!("binding unix:{shown}"), e)),
    };
    l.set_nonblocking(true)
        .map_err(|e| Error::io("configuring a listener", e))?;
    Ok(l)
}
