//! What a server listens on and what its listeners hand to the workers.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::PeerInfo;

pub(super) enum Listener {
    Tcp(std::net::TcpListener, SocketAddr),
    Unix(std::os::unix::net::UnixListener, PathBuf),
}

/// A socket accepted by a listener, on its way to a worker.
pub(super) enum Accepted {
    Tcp(std::net::TcpStream, PeerInfo),
    Unix(std::os::unix::net::UnixStream, PeerInfo),
}

/// Where a server listens, for printing (`tcp://127.0.0.1:4000`, `unix:/run/x.sock`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP listener's bound address (the real port when 0 was asked for).
    Tcp(SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "tcp://{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}
