//! TLS (rustls, ring provider): server and client configurations from PEM files, and the
//! identity of a verified client certificate.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::Error;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| Error::setting(format!("reading certificates from {}", path.display()), e))?;
    if certs.is_empty() {
        return Err(Error::Config(format!(
            "no certificate in {}",
            path.display()
        )));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        Error::setting(
            format!("reading the private key from {}", path.display()),
            e,
        )
    })
}

fn roots(path: &Path) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    for c in certs(path)? {
        roots
            .add(c)
            .map_err(|e| Error::setting(format!("CA certificate in {}", path.display()), e))?;
    }
    Ok(roots)
}

/// A server configuration: TLS 1.3 and 1.2, the server's certificate chain and key, and,
/// with `client_ca`, verification of client certificates against that CA (required when
/// `require_client_cert`, optional otherwise).
pub fn server_config(
    cert: &Path,
    key_path: &Path,
    client_ca: Option<&Path>,
    require_client_cert: bool,
) -> Result<Arc<ServerConfig>, Error> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::setting("TLS", e))?;
    let builder = match client_ca {
        Some(ca) => {
            let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider());
            let v = if require_client_cert {
                v
            } else {
                v.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(
                v.build()
                    .map_err(|e| Error::setting(format!("client CA {}", ca.display()), e))?,
            )
        }
        None if require_client_cert => {
            return Err(Error::Config(
                "require_client_cert needs a client CA to verify certificates against".into(),
            ))
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(certs(cert)?, key(key_path)?)
        .map_err(|e| Error::setting(format!("server certificate {}", cert.display()), e))?;
    Ok(Arc::new(config))
}

/// A client configuration trusting `ca` for the server, presenting `identity` (certificate
/// chain and key) when given.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, Error> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::setting("TLS", e))?
        .with_root_certificates(roots(ca)?);
    let config = match identity {
        Some((cert, k)) => builder
            .with_client_auth_cert(certs(cert)?, key(k)?)
            .map_err(|e| Error::setting(format!("client certificate {}", cert.display()), e))?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// What a verified client certificate says about its holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertIdentity {
    /// The subject's common names.
    pub common_names: Vec<String>,
    /// DNS names, e-mail addresses, URIs and IP addresses from the subjectAltName extension.
    pub subject_alt_names: Vec<String>,
    /// SHA-256 of the subjectPublicKeyInfo, lowercase hex: stable across re-issued
    /// certificates with the same key.
    pub spki_sha256: String,
}

impl CertIdentity {
    /// Reads the identity from a DER certificate.
    pub fn from_der(der: &[u8]) -> Option<Self> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let common_names = cert
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok().map(str::to_string))
            .collect();
        let mut subject_alt_names = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for n in &san.value.general_names {
                match n {
                    GeneralName::DNSName(s) | GeneralName::RFC822Name(s) | GeneralName::URI(s) => {
                        subject_alt_names.push(s.to_string())
                    }
                    GeneralName::IPAddress(b) => {
                        let ip = match b.len() {
                            4 => <[u8; 4]>::try_from(*b).ok().map(std::net::IpAddr::from),
                            16 => <[u8; 16]>::try_from(*b).ok().map(std::net::IpAddr::from),
                            _ => None,
                        };
                        subject_alt_names.extend(ip.map(|ip| ip.to_string()));
                    }
                    _ => {}
                }
            }
        }
        let spki = cert.public_key().raw;
        let digest = ring::digest::digest(&ring::digest::SHA256, spki);
        let spki_sha256 = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        Some(Self {
            common_names,
            subject_alt_names,
            spki_sha256,
        })
    }
}

impl fmt::Display for CertIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.common_names.first() {
            Some(cn) => write!(f, "cn={cn}"),
            None => write!(f, "spki={}", &self.spki_sha256[..16]),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    #[test]
    fn a_refused_setting_keeps_its_source() {
        let dir = std::env::temp_dir().join(format!("capgate-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A PEM block that is no certificate: rustls refuses it as a root.
        let ca = dir.join("ca.pem");
        std::fs::write(
            &ca,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = super::client_config(&ca, None).unwrap_err();
        let source = e.source().expect("the refusal is kept");
        assert!(
            source.downcast_ref::<rustls::Error>().is_some(),
            "{source:?}"
        );
        assert_eq!(
            e.to_string(),
            format!(
                "invalid configuration: CA certificate in {}: {source}",
                ca.display()
            )
        );
        // A file that is not there: the PEM reader's error.
        let e = super::client_config(&dir.join("missing.pem"), None).unwrap_err();
        assert!(e.source().is_some(), "{e}");
        assert!(e
            .to_string()
            .starts_with("invalid configuration: reading certificates from "));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
