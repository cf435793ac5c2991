//! Quota stores: where per-client rates and connection counts are counted.
//!
//! - **In-process** (the default, [`QuotaStore::InProcess`]): each server counts its clients
//!   alone ([`crate::ClientRegistry`]), so a client spread over N servers gets N times its
//!   rate and connections.
//! - **Redis** ([`QuotaStore::Redis`]): N servers or gateways share each client's budget and
//!   connection count through one Redis. The call path never waits on the network: each
//!   server spends tokens it holds locally and a background task leases more from Redis
//!   (see `lease.rs` for the arithmetic and the error bound). Connection counts are per-server
//!   entries that expire when a server stops refreshing them (see `conns.rs`).
//!
//! The background task (`driver.rs`) runs inside [`crate::Server::serve`] on the caller's
//! runtime, one Redis connection per server, at most one round trip in flight: each round
//! carries every pending lease, admission and count update, in one pipeline.
//!
//! Budgets are keyed by [`QuotaKey`]: a class and client, or for a per-method rule's rate a
//! class, client and rule ([`QuotaKey::method`]).

mod backend;
mod conns;
mod driver;
mod lease;
#[cfg(test)]
mod memory;
mod metrics;
mod redis;

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

pub(crate) use conns::{Admission, ConnCount, FleetSlot};
pub(crate) use driver::Driver;
pub(crate) use lease::LeasedRate;
pub(crate) use metrics::StoreMetrics;
pub(crate) use redis::RedisBackend;

use crate::{ClientKey, Error};

/// Where per-client quotas are counted. Give it to [`crate::ServerBuilder::quota_store`].
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub enum QuotaStore {
    /// Each server counts its clients alone (today's behaviour, the default): a client
    /// spread over N servers gets N times its rate and its connections.
    #[default]
    InProcess,
    /// Servers share each client's rate budget and connection count through Redis.
    Redis(Box<RedisStoreConfig>),
}

impl QuotaStore {
    /// A Redis store at `url` (`redis://host:port[/db]`, `rediss://` for TLS) with the
    /// default settings of [`RedisStoreConfig`].
    pub fn redis(url: &str) -> Result<Self, Error> {
        Ok(RedisStoreConfig::new(url)?.into())
    }
}

impl From<RedisStoreConfig> for QuotaStore {
    fn from(config: RedisStoreConfig) -> Self {
        Self::Redis(Box::new(config))
    }
}

/// What a server does while the store is unreachable (or does not answer in time).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fallback {
    /// Each server allows its share on its own: `calls_per_second / fleet_size` (burst
    /// `burst / fleet_size`) and `max_connections / fleet_size` connections per client (at
    /// least 1 of each). With the right `fleet_size` the fleet stays near the configured
    /// totals. The default.
    #[default]
    Local,
    /// Refuse what the store cannot vouch for: calls get `Overloaded` once the tokens a
    /// server holds are spent, new connections are refused. Existing connections stay open.
    Deny,
}

impl std::str::FromStr for Fallback {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "local" => Ok(Fallback::Local),
            "deny" => Ok(Fallback::Deny),
            other => Err(format!(
                "unknown fallback `{other}`: expected `local` or `deny`"
            )),
        }
    }
}

/// A Redis quota store's settings. Made by [`RedisStoreConfig::new`]; the fields have
/// working defaults.
#[derive(Clone)]
#[non_exhaustive]
pub struct RedisStoreConfig {
    client: ::redis::Client,
    /// What to allow while Redis is unreachable. Default [`Fallback::Local`].
    pub fallback: Fallback,
    /// How many servers share the store, as far as the operator expects: each server's
    /// fallback share is the quota divided by it, and a lease is at most `burst / fleet_size`.
    /// Default 1 (during an outage each server then allows what it would allow alone).
    pub fleet_size: NonZeroU32,
    /// How often a server refreshes its connection entries. Entries of a server that stopped
    /// (crashed, cut off from Redis) stop counting `3 x heartbeat_interval` after its last
    /// refresh. Default 1 s, so 3 s.
    pub heartbeat_interval: Duration,
    /// How long admitting a connection may wait for Redis before the fallback decides.
    /// Default 100 ms. Only connection set-up waits; calls never do.
    pub admission_timeout: Duration,
    /// A round trip to Redis that takes longer than this counts as a failure: the store is
    /// considered down and the connection is made again (with backoff). Default 1 s.
    pub command_timeout: Duration,
    /// The lease size in time: a lease is `calls_per_second x lease_period` tokens (at least
    /// 1, at most `burst / fleet_size`). Longer leases mean fewer Redis commands and a larger
    /// error bound (`N x lease`). Default 50 ms.
    pub lease_period: Duration,
    /// Prefix of every Redis key capgate writes (so fleets can share a database). Default
    /// `capgate`.
    pub key_prefix: String,
}

impl std::fmt::Debug for RedisStoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The address only: the URL may carry a password.
        f.debug_struct("RedisStoreConfig")
            .field("addr", &self.addr())
            .field("fallback", &self.fallback)
            .field("fleet_size", &self.fleet_size)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("admission_timeout", &self.admission_timeout)
            .field("command_timeout", &self.command_timeout)
            .field("lease_period", &self.lease_period)
            .field("key_prefix", &self.key_prefix)
            .finish()
    }
}

impl RedisStoreConfig {
    /// Settings for the Redis at `url`: `redis://[user:password@]host:port[/db]`, or
    /// `rediss://` for TLS (verified against the system's roots; see
    /// [`RedisStoreConfig::with_tls_ca`]). Nothing is connected yet.
    pub fn new(url: &str) -> Result<Self, Error> {
        let client =
            ::redis::Client::open(url).map_err(|e| Error::setting("quota store URL", e))?;
        Ok(Self::with_client(client))
    }

    /// Settings for a `rediss://` URL whose server certificate is verified against the CA
    /// certificates in `ca_pem` (PEM) instead of the system's roots.
    pub fn with_tls_ca(url: &str, ca_pem: Vec<u8>) -> Result<Self, Error> {
        let client = ::redis::Client::build_with_tls(
            url,
            ::redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca_pem),
            },
        )
        .map_err(|e| Error::setting("quota store URL with TLS", e))?;
        Ok(Self::with_client(client))
    }

    fn with_client(client: ::redis::Client) -> Self {
        Self {
            client,
            fallback: Fallback::Local,
            fleet_size: NonZeroU32::MIN,
            heartbeat_interval: Duration::from_secs(1),
            admission_timeout: Duration::from_millis(100),
            command_timeout: Duration::from_secs(1),
            lease_period: Duration::from_millis(50),
            key_prefix: "capgate".into(),
        }
    }

    /// Where the store is, for logs (never the password): `redis://host:port/db`.
    pub fn addr(&self) -> String {
        let info = self.client.get_connection_info();
        let scheme = match info.addr() {
            ::redis::ConnectionAddr::Tcp(..) => "redis://",
            ::redis::ConnectionAddr::TcpTls { .. } => "rediss://",
            _ => "unix:",
        };
        format!("{scheme}{}/{}", info.addr(), info.redis_settings().db())
    }

    /// How long a stopped server's connection entries keep counting: 3 heartbeats.
    pub fn expiry(&self) -> Duration {
        self.heartbeat_interval * EXPIRY_HEARTBEATS
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        let positive = [
            ("heartbeat_interval", self.heartbeat_interval),
            ("admission_timeout", self.admission_timeout),
            ("command_timeout", self.command_timeout),
            ("lease_period", self.lease_period),
        ];
        for (name, d) in positive {
            if d.is_zero() {
                return Err(Error::Config(format!(
                    "quota store: {name} must be above 0"
                )));
            }
        }
        if self.expiry() < Duration::from_millis(10) {
            return Err(Error::Config(
                "quota store: heartbeat_interval must be at least 4 ms".into(),
            ));
        }
        Ok(())
    }
}

/// Connection entries of a server expire after this many heartbeats without a refresh.
pub(crate) const EXPIRY_HEARTBEATS: u32 = 3;

/// What a budget or a connection count is kept under, fleet-wide: a client class and a
/// client in it, and (for per-method rates) a method.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct QuotaKey {
    class: String,
    client: ClientKey,
    method: Option<String>,
}

impl QuotaKey {
    /// The budget and connection count of `client` in `class`.
    pub(crate) fn client(class: &str, client: ClientKey) -> Self {
        Self {
            class: class.to_string(),
            client,
            method: None,
        }
    }

    /// A per-method budget of `client` in `class` (`method` as the policy spells it, e.g.
    /// `Namespace.put`): leased from the same store as the class-wide one, under its own key.
    pub(crate) fn method(class: &str, client: ClientKey, method: &str) -> Self {
        Self {
            class: class.to_string(),
            client,
            method: Some(method.to_string()),
        }
    }

    /// The key as the store spells it: `class/client[/method]`, each part escaped so that no
    /// two keys spell the same (`%` and `/` are percent-encoded).
    pub(crate) fn store_key(&self) -> String {
        let mut s = escape(&self.class);
        s.push('/');
        match &self.client {
            ClientKey::Ip(ip) => s.push_str(&format!("ip:{ip}")),
            ClientKey::Uid(uid) => s.push_str(&format!("uid:{uid}")),
            ClientKey::Stream(label) => {
                s.push_str("stream:");
                s.push_str(&escape(label));
            }
            ClientKey::Cert(spki) => {
                s.push_str("cert:");
                s.push_str(&escape(spki));
            }
        }
        if let Some(m) = &self.method {
            s.push('/');
            s.push_str(&escape(m));
        }
        s
    }
}

fn escape(s: &str) -> String {
    s.replace('%', "%25").replace('/', "%2F")
}

/// Work for the store's background task, queued by calls and connections (never waited on
/// by a call).
pub(crate) enum Work {
    /// A budget's tokens are low: top them up.
    Lease(Arc<LeasedRate>),
    /// A connection waits for the fleet's verdict.
    Admit(conns::AdmitRequest),
    /// A client's connection count on this server changed: tell the store.
    Dirty(Arc<ConnCount>),
}

/// A server's side of a shared store, used from every worker thread: whether the store is up,
/// the queue to its background task, this server's connection counts.
pub(crate) struct Fleet {
    pub(crate) fallback: Fallback,
    pub(crate) fleet_size: NonZeroU32,
    pub(crate) lease_period: Duration,
    pub(crate) admission_timeout: Duration,
    up: AtomicBool,
    tx: mpsc::UnboundedSender<Work>,
    conns: dashmap::DashMap<String, Arc<ConnCount>>,
    pub(crate) metrics: StoreMetrics,
    /// The background task, until [`crate::Server::serve`] takes it.
    driver: Mutex<Option<Driver<RedisBackend>>>,
}

impl Fleet {
    /// The shared side and its (not yet running) background task, for a Redis store.
    pub(crate) fn redis(config: &RedisStoreConfig, metrics: StoreMetrics) -> Arc<Self> {
        let (fleet, rx) = Self::new(config, metrics);
        let backend = RedisBackend::new(config, &server_id(), fleet.metrics.commands.clone());
        let driver = Driver::new(fleet.clone(), backend, rx, config);
        *lock(&fleet.driver) = Some(driver);
        fleet
    }

    /// The shared side alone; the caller makes the driver from the receiver.
    pub(crate) fn new(
        config: &RedisStoreConfig,
        metrics: StoreMetrics,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<Work>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let fleet = Arc::new(Self {
            fallback: config.fallback,
            fleet_size: config.fleet_size,
            lease_period: config.lease_period,
            admission_timeout: config.admission_timeout,
            up: AtomicBool::new(false),
            tx,
            conns: Default::default(),
            metrics,
            driver: Mutex::new(None),
        });
        (fleet, rx)
    }

    /// Whether the store answered the last round (if not, the fallback decides).
    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub(crate) fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Relaxed);
        self.metrics.up.set(i64::from(up));
    }

    /// Queues work for the background task (non-blocking). Dropped if the task is gone.
    pub(crate) fn send(&self, w: Work) {
        let _ = self.tx.send(w);
    }

    /// The background task, once: [`crate::Server::serve`] runs it and gives it back.
    pub(crate) fn take_driver(&self) -> Option<Driver<RedisBackend>> {
        lock(&self.driver).take()
    }

    /// Gives the background task back after a run (`serve_stream` borrows it).
    pub(crate) fn put_driver(&self, d: Driver<RedisBackend>) {
        *lock(&self.driver) = Some(d);
    }

    /// A budget leased from the store under `key`, with a local fallback share.
    pub(crate) fn rate(
        self: &Arc<Self>,
        key: &QuotaKey,
        per_second: NonZeroU32,
        burst: NonZeroU32,
    ) -> Arc<LeasedRate> {
        LeasedRate::new(self.clone(), key.store_key(), per_second, burst)
    }

    /// This server's connection count of `key` (made on first use).
    pub(crate) fn conns(&self, key: &QuotaKey) -> Arc<ConnCount> {
        let k = key.store_key();
        self.conns
            .entry(k.clone())
            .or_insert_with(|| Arc::new(ConnCount::new(k)))
            .clone()
    }

    /// This server's nonzero connection counts, for a full rewrite of its entries.
    pub(crate) fn conn_snapshot(&self) -> Vec<(String, u32)> {
        self.conns
            .iter()
            .filter_map(|e| {
                let n = e.value().count();
                (n > 0).then(|| (e.key().clone(), n))
            })
            .collect()
    }

    /// Forgets counts that are zero and that nothing else holds (written already, or covered
    /// by the next full rewrite).
    pub(crate) fn sweep_conns(&self) {
        self.conns
            .retain(|_, c| c.count() > 0 || Arc::strong_count(c) > 1);
    }
}

/// A process-unique, fleet-unique name for this server's entries: random, so a restarted
/// server never takes over a crashed one's entries (those expire).
fn server_id() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        // No system randomness: time and pid are unique enough among live servers.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        b = (t ^ (u64::from(std::process::id()) << 40)).to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The locks here hold no invariant a panic could break, so poisoning is ignored.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_keys_are_unambiguous() {
        let a = QuotaKey::client("a/b", ClientKey::Stream("c".into())).store_key();
        let b = QuotaKey::client("a", ClientKey::Stream("b/c".into())).store_key();
        assert_ne!(a, b);
        assert_eq!(a, "a%2Fb/stream:c");
        assert_eq!(
            QuotaKey::client("reader", ClientKey::Ip("127.0.0.1".parse().unwrap())).store_key(),
            "reader/ip:127.0.0.1"
        );
        assert_eq!(
            QuotaKey::method("reader", ClientKey::Uid(0), "Namespace.put").store_key(),
            "reader/uid:0/Namespace.put"
        );
    }

    #[test]
    fn urls_are_checked_and_passwords_not_shown() {
        let c = RedisStoreConfig::new("redis://:secret@127.0.0.1:6390/2").unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("127.0.0.1:6390/2"), "{shown}");
        assert!(RedisStoreConfig::new("http://x").is_err());
        assert_eq!("deny".parse::<Fallback>(), Ok(Fallback::Deny));
        assert!("maybe".parse::<Fallback>().is_err());
    }
}
