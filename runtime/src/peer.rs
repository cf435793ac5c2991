//! Who is on the other end of a connection.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// The transport-level identity of a peer, as far as the transport can vouch for it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeerAddr {
    /// A TCP peer's source address.
    Tcp(SocketAddr),
    /// A Unix-socket peer's credentials, from the kernel (`SO_PEERCRED`).
    Unix {
        /// Effective user id of the peer process.
        uid: u32,
        /// Effective group id of the peer process.
        gid: u32,
        /// Process id, where the platform reports it.
        pid: Option<i32>,
    },
    /// A stream the application handed over (in-process pipes, stdio), with its label.
    Stream(String),
}

/// What the server knows about one connection's peer; given to the bootstrap factory.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerInfo {
    /// Server-unique connection id (also in the connection's tracing span).
    pub connection_id: u64,
    /// Transport identity.
    pub addr: PeerAddr,
    /// The verified client certificate's identity, on TLS connections that presented one.
    /// (Boxed: most connections have none, and a peer's info is kept for its lifetime.)
    pub tls: Option<Box<crate::CertIdentity>>,
}

impl PeerInfo {
    /// Peer info for a connection.
    pub fn new(connection_id: u64, addr: PeerAddr) -> Self {
        Self {
            connection_id,
            addr,
            tls: None,
        }
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerAddr::Tcp(a) => write!(f, "tcp://{a}"),
            PeerAddr::Unix { uid, pid, .. } => match pid {
                Some(pid) => write!(f, "unix:uid={uid},pid={pid}"),
                None => write!(f, "unix:uid={uid}"),
            },
            PeerAddr::Stream(label) => write!(f, "stream:{label}"),
        }
    }
}

impl fmt::Display for PeerInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{} {}", self.connection_id, self.addr)?;
        if let Some(id) = &self.tls {
            write!(f, " ({id})")?;
        }
        Ok(())
    }
}

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
