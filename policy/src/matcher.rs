use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

/// What the transport tells about a peer, as far as matching needs it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerView<'a> {
    /// Source address of a TCP peer.
    pub ip: Option<IpAddr>,
    /// Kernel-reported user id of a Unix-socket peer.
    pub unix_uid: Option<u32>,
    /// Common names of a verified TLS client certificate.
    pub cert_cns: &'a [String],
    /// Subject alternative names of a verified TLS client certificate.
    pub cert_sans: &'a [String],
    /// SHA-256 of a verified TLS client certificate's public key, lowercase hex.
    pub cert_spki_sha256: Option<&'a str>,
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
    /// TLS clients whose verified certificate has this common name.
    CertCn(String),
    /// TLS clients whose verified certificate has this subject alternative name.
    CertSan(String),
    /// TLS clients whose verified certificate's public key has this SHA-256 (hex).
    CertSpkiSha256(String),
}

impl Matcher {
    /// Does this peer belong to the class?
    pub fn matches(&self, peer: &PeerView) -> bool {
        match self {
            Matcher::Any => true,
            Matcher::Source(net) => peer.ip.is_some_and(|ip| net.contains(&ip)),
            Matcher::UnixUid(uid) => peer.unix_uid == Some(*uid),
            Matcher::CertCn(cn) => peer.cert_cns.iter().any(|c| c == cn),
            Matcher::CertSan(san) => peer.cert_sans.iter().any(|s| s.eq_ignore_ascii_case(san)),
            Matcher::CertSpkiSha256(h) => peer
                .cert_spki_sha256
                .is_some_and(|p| p.eq_ignore_ascii_case(h)),
        }
    }
}

impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Matcher::Any => write!(f, "any"),
            Matcher::Source(n) => write!(f, "source = {n}"),
            Matcher::UnixUid(u) => write!(f, "unix_uid = {u}"),
            Matcher::CertCn(c) => write!(f, "cert_cn = {c}"),
            Matcher::CertSan(s) => write!(f, "cert_san = {s}"),
            Matcher::CertSpkiSha256(h) => write!(f, "cert_spki_sha256 = {h}"),
        }
    }
}
