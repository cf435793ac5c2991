use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

/// What the transport tells about a peer, as far as matching needs it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerView {
    /// Source address of a TCP peer.
    pub ip: Option<IpAddr>,
    /// Kernel-reported user id of a Unix-socket peer.
    pub unix_uid: Option<u32>,
}

/// How a client class recognises its clients.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Matcher {
    /// Every client.
    Any,
    /// TCP clients whose source address is in this network (`127.0.0.1/32`, `10.0.0.0/8`).
    Source(IpNet),
    /// Unix-socket clients running as this user id.
    UnixUid(u32),
}

impl Matcher {
    /// Does this peer belong to the class?
    pub fn matches(&self, peer: &PeerView) -> bool {
        match self {
            Matcher::Any => true,
            Matcher::Source(net) => peer.ip.is_some_and(|ip| net.contains(&ip)),
            Matcher::UnixUid(uid) => peer.unix_uid == Some(*uid),
        }
    }
}

impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Matcher::Any => write!(f, "any"),
            Matcher::Source(n) => write!(f, "source = {n}"),
            Matcher::UnixUid(u) => write!(f, "unix_uid = {u}"),
        }
    }
}
