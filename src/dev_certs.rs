//! Throwaway certificates for development and tests: a CA, a server certificate for
//! localhost / 127.0.0.1 / ::1, and client certificates whose common names are class names.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

/// Where [`write_dev_certs`] put the files.
#[derive(Clone, Debug)]
pub struct DevCerts {
    /// The CA certificate (trust it on both sides).
    pub ca: PathBuf,
    /// Server certificate chain and key.
    pub server: (PathBuf, PathBuf),
    /// Client certificate and key per client name.
    pub clients: Vec<(String, PathBuf, PathBuf)>,
}

/// A certificate authority that signs dev certificates.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn err(e: rcgen::Error) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl DevCa {
    /// A new CA with this common name, valid from yesterday for 30 days.
    pub fn new(name: &str) -> std::io::Result<Self> {
        let mut params = CertificateParams::new(Vec::new()).map_err(err)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, Duration::days(-1), Duration::days(30));
        let key = KeyPair::generate().map_err(err)?;
        let cert = params.self_signed(&key).map_err(err)?;
        Ok(Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A leaf certificate and key (PEM) for `names` (DNS names or IP addresses as SANs), with
    /// `cn` as common name, valid between `from` and `until` relative to now.
    pub fn leaf(
        &self,
        cn: &str,
        names: &[&str],
        server: bool,
        from: Duration,
        until: Duration,
    ) -> std::io::Result<(String, String)> {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .map_err(err)?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        validity(&mut params, from, until);
        let key = KeyPair::generate().map_err(err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(err)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

fn validity(params: &mut CertificateParams, from: Duration, until: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now + from;
    params.not_after = now + until;
}

/// Writes `ca.pem`, `server.pem`/`server.key` (localhost, 127.0.0.1, ::1) and, per client
/// name, `NAME.pem`/`NAME.key` (common name and SAN `NAME`) into `dir`.
pub fn write_dev_certs(dir: &Path, clients: &[&str]) -> std::io::Result<DevCerts> {
    std::fs::create_dir_all(dir)?;
    let ca = DevCa::new("capgate dev CA")?;
    let write = |name: &str, body: &str| -> std::io::Result<PathBuf> {
        let p = dir.join(name);
        std::fs::write(&p, body)?;
        Ok(p)
    };
    let ca_path = write("ca.pem", ca.pem())?;
    let day = Duration::days(1);
    let (cert, key) = ca.leaf(
        "localhost",
        &["localhost", "127.0.0.1", "::1"],
        true,
        -day,
        day * 30,
    )?;
    let server = (write("server.pem", &cert)?, write("server.key", &key)?);
    let mut out = Vec::new();
    for c in clients {
        let (cert, key) = ca.leaf(c, &[c], false, -day, day * 30)?;
        out.push((
            c.to_string(),
            write(&format!("{c}.pem"), &cert)?,
            write(&format!("{c}.key"), &key)?,
        ));
    }
    Ok(DevCerts {
        ca: ca_path,
        server,
        clients: out,
    })
}
