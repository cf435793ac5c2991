//! State shared by all connections of one client (one identity within a class), across
//! worker threads: its call-rate budget and its connection count.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::guard::RateLimit;
use crate::{PeerAddr, PeerInfo};

/// Who a client is within its class: two source addresses are two clients.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// A TCP client, by source address (not port).
    Ip(IpAddr),
    /// A Unix-socket client, by user id.
    Uid(u32),
    /// A stream handed over by the application, by its label.
    Stream(String),
    /// A TLS client, by its certificate's public key (SHA-256, hex).
    Cert(String),
}

impl ClientKey {
    /// The identity of a peer.
    pub fn of(peer: &PeerInfo) -> Self {
        if let Some(id) = &peer.tls {
            return ClientKey::Cert(id.spki_sha256.clone());
        }
        match &peer.addr {
            PeerAddr::Tcp(a) => ClientKey::Ip(a.ip()),
            PeerAddr::Unix { uid, .. } => ClientKey::Uid(*uid),
            PeerAddr::Stream(label) => ClientKey::Stream(label.clone()),
        }
    }
}

/// A GCRA call budget (governor), generic over the clock so tests can drive time.
pub struct CallRate<C: Clock = DefaultClock> {
    limiter: RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<C::Instant>>,
    per_second: NonZeroU32,
    burst: NonZeroU32,
}

impl CallRate<DefaultClock> {
    /// `per_second` sustained, `burst` at once.
    pub fn new(per_second: NonZeroU32, burst: NonZeroU32) -> Self {
        Self::with_clock(per_second, burst, &DefaultClock::default())
    }
}

impl<C: Clock + Clone> CallRate<C> {
    /// The same budget measured by `clock`.
    pub fn with_clock(per_second: NonZeroU32, burst: NonZeroU32, clock: &C) -> Self {
        let quota = Quota::per_second(per_second).allow_burst(burst);
        Self {
            limiter: RateLimiter::direct_with_clock(quota, clock.clone()),
            per_second,
            burst,
        }
    }
}

impl<C: Clock + Clone + Send + Sync> RateLimit for CallRate<C>
where
    C::Instant: Send + Sync,
{
    fn try_call(&self) -> bool {
        self.limiter.check().is_ok()
    }
}

struct ClientState {
    rate: Arc<CallRate>,
    connections: usize,
}

/// All clients of a server, keyed by class name and identity.
#[derive(Default)]
pub struct ClientRegistry {
    clients: DashMap<(String, ClientKey), ClientState>,
    classes: DashMap<String, usize>,
}

/// A connection's place in its class's count; given back when dropped.
pub struct ClassSlot {
    registry: Arc<ClientRegistry>,
    class: String,
}

impl Drop for ClassSlot {
    fn drop(&mut self) {
        if let Some(mut n) = self.registry.classes.get_mut(&self.class) {
            *n = n.saturating_sub(1);
        }
    }
}

/// A connection's slot in its client's count; gives it back when dropped.
pub struct ConnectionSlot {
    registry: Arc<ClientRegistry>,
    key: (String, ClientKey),
}

impl ClientRegistry {
    /// Registers one more connection of this client, unless it already has
    /// `max_connections`. Returns the slot and the client's (shared) rate budget.
    pub fn connect(
        self: &Arc<Self>,
        class: &str,
        key: ClientKey,
        per_second: NonZeroU32,
        burst: NonZeroU32,
        max_connections: u32,
    ) -> Result<(ConnectionSlot, Arc<CallRate>), usize> {
        let k = (class.to_string(), key);
        let mut entry = self
            .clients
            .entry(k.clone())
            .or_insert_with(|| ClientState {
                rate: Arc::new(CallRate::new(per_second, burst)),
                connections: 0,
            });
        if entry.connections >= max_connections as usize {
            return Err(entry.connections);
        }
        entry.connections += 1;
        let rate = entry.rate.clone();
        drop(entry);
        Ok((
            ConnectionSlot {
                registry: self.clone(),
                key: k,
            },
            rate,
        ))
    }

    /// Registers one more connection of the class, unless it already has `max`. The error is
    /// the current count.
    pub fn connect_class(self: &Arc<Self>, class: &str, max: u32) -> Result<ClassSlot, usize> {
        let mut n = self.classes.entry(class.to_string()).or_insert(0);
        if *n >= max as usize {
            return Err(*n);
        }
        *n += 1;
        drop(n);
        Ok(ClassSlot {
            registry: self.clone(),
            class: class.to_string(),
        })
    }

    /// The client's rate budget under (possibly new) quotas: replaced if they changed.
    pub fn rate(
        &self,
        class: &str,
        key: &ClientKey,
        per_second: NonZeroU32,
        burst: NonZeroU32,
    ) -> Arc<CallRate> {
        let k = (class.to_string(), key.clone());
        let mut entry = self.clients.entry(k).or_insert_with(|| ClientState {
            rate: Arc::new(CallRate::new(per_second, burst)),
            connections: 0,
        });
        if entry.rate.per_second != per_second || entry.rate.burst != burst {
            entry.rate = Arc::new(CallRate::new(per_second, burst));
        }
        entry.rate.clone()
    }

    /// Connections of this client now.
    pub fn connections(&self, class: &str, key: &ClientKey) -> usize {
        self.clients
            .get(&(class.to_string(), key.clone()))
            .map_or(0, |e| e.connections)
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        if let Some(mut e) = self.registry.clients.get_mut(&self.key) {
            e.connections = e.connections.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use std::time::Duration;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    #[test]
    fn burst_of_ten_lets_exactly_ten_through_then_refills_at_the_rate() {
        let clock = FakeRelativeClock::default();
        let rate = CallRate::with_clock(nz(100), nz(10), &clock);
        let passed = (0..1000).filter(|_| rate.try_call()).count();
        assert_eq!(passed, 10);
        clock.advance(Duration::from_millis(10)); // one call's worth at 100/s
        assert!(rate.try_call());
        assert!(!rate.try_call());
        clock.advance(Duration::from_millis(50));
        assert_eq!((0..100).filter(|_| rate.try_call()).count(), 5);
    }

    #[test]
    fn connections_are_counted_per_client_and_given_back() {
        let reg = Arc::new(ClientRegistry::default());
        let a = ClientKey::Ip("127.0.0.1".parse().unwrap());
        let b = ClientKey::Ip("127.0.0.2".parse().unwrap());
        let (s1, r1) = reg.connect("c", a.clone(), nz(10), nz(10), 2).unwrap();
        let (_s2, r2) = reg.connect("c", a.clone(), nz(10), nz(10), 2).unwrap();
        assert!(Arc::ptr_eq(&r1, &r2), "one client, one shared budget");
        assert_eq!(
            reg.connect("c", a.clone(), nz(10), nz(10), 2).err(),
            Some(2)
        );
        let (_s3, r3) = reg.connect("c", b, nz(10), nz(10), 2).unwrap();
        assert!(!Arc::ptr_eq(&r1, &r3), "another address is another client");
        drop(s1);
        assert_eq!(reg.connections("c", &a), 1);
        assert!(reg.connect("c", a, nz(10), nz(10), 2).is_ok());
    }
}
