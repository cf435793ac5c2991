//! Where a gateway sends its clients' connections: an existing Cap'n Proto server over TCP
//! (optionally TLS) or a Unix socket, one upstream connection per client connection.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::Error;

/// The read and write halves of one upstream connection.
pub(crate) type Streams = (Box<dyn AsyncRead + Unpin>, Box<dyn AsyncWrite + Unpin>);

/// A gateway's upstream: the server every client connection is relayed to.
#[derive(Clone)]
pub struct Upstream {
    addr: Addr,
    tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls_pki_types::ServerName<'static>,
    )>,
    connect_timeout: Duration,
    name: Arc<str>,
}

#[derive(Clone, Debug)]
enum Addr {
    /// `HOST:PORT`, resolved at each connect.
    Tcp(String),
    Unix(PathBuf),
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("addr", &self.name)
            .field("tls", &self.tls.is_some())
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// How long connecting (and the TLS handshake) to the upstream may take by default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl Upstream {
    /// `tcp://HOST:PORT` or `unix:PATH`.
    pub fn parse(s: &str) -> Result<Self, Error> {
        if let Some(addr) = s.strip_prefix("tcp://") {
            let ok = addr
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !ok {
                return Err(Error::Config(format!(
                    "upstream {s:?}: expected tcp://HOST:PORT (a port from 1 to 65535)"
                )));
            }
            return Ok(Self::tcp(addr));
        }
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(Error::Config(format!("upstream {s:?}: expected unix:PATH")));
            }
            return Ok(Self::unix(path));
        }
        Err(Error::Config(format!(
            "upstream {s:?}: expected tcp://HOST:PORT or unix:PATH"
        )))
    }

    /// A TCP upstream at `HOST:PORT` (resolved at each connect).
    pub fn tcp(addr: impl Into<String>) -> Self {
        let addr = addr.into();
        Self {
            name: format!("tcp://{addr}").into(),
            addr: Addr::Tcp(addr),
            tls: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }

    /// A Unix-socket upstream.
    pub fn unix(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        Self {
            name: format!("unix:{}", path.display()).into(),
            addr: Addr::Unix(path),
            tls: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }

    /// Speaks TLS to a TCP upstream (see [`crate::tls::client_config`]), verifying that its
    /// certificate is valid for `server_name`.
    pub fn tls(
        mut self,
        config: Arc<rustls::ClientConfig>,
        server_name: &str,
    ) -> Result<Self, Error> {
        if matches!(self.addr, Addr::Unix(_)) {
            return Err(Error::Config(format!(
                "upstream {}: TLS is for TCP upstreams only",
                self.name
            )));
        }
        let name = rustls_pki_types::ServerName::try_from(server_name.to_string())
            .map_err(|e| Error::setting(format!("upstream TLS server name {server_name:?}"), e))?;
        self.tls = Some((config, name));
        Ok(self)
    }

    /// Bounds connecting and the TLS handshake (default [`DEFAULT_CONNECT_TIMEOUT`]).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// `tcp://HOST:PORT` or `unix:PATH`, as in logs and abort reasons.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn shared_name(&self) -> Arc<str> {
        self.name.clone()
    }

    /// The host part, for a default TLS server name.
    pub fn host(&self) -> Option<&str> {
        match &self.addr {
            Addr::Tcp(a) => a.rsplit_once(':').map(|(h, _)| h.trim_matches(['[', ']'])),
            Addr::Unix(_) => None,
        }
    }

    /// Opens one connection, within the connect timeout. The error says what failed.
    pub(crate) async fn connect(&self) -> Result<Streams, String> {
        match tokio::time::timeout(self.connect_timeout, self.open()).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "no connection within {:?} (connect timeout)",
                self.connect_timeout
            )),
        }
    }

    async fn open(&self) -> Result<Streams, String> {
        match &self.addr {
            Addr::Unix(path) => {
                let s = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|e| e.to_string())?;
                let (r, w) = s.into_split();
                Ok((Box::new(r), Box::new(w)))
            }
            Addr::Tcp(addr) => {
                let s = tokio::net::TcpStream::connect(addr.as_str())
                    .await
                    .map_err(|e| e.to_string())?;
                let _ = s.set_nodelay(true);
                match &self.tls {
                    None => {
                        let (r, w) = s.into_split();
                        Ok((Box::new(r), Box::new(w)))
                    }
                    Some((config, name)) => {
                        let tls = tokio_rustls::TlsConnector::from(config.clone())
                            .connect(name.clone(), s)
                            .await
                            .map_err(|e| format!("TLS handshake failed: {e}"))?;
                        let (r, w) = tokio::io::split(tls);
                        Ok((Box::new(r), Box::new(w)))
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_say_what_is_wrong() {
        assert_eq!(
            Upstream::parse("tcp://127.0.0.1:4000").unwrap().name(),
            "tcp://127.0.0.1:4000"
        );
        assert_eq!(
            Upstream::parse("unix:/run/app.sock").unwrap().name(),
            "unix:/run/app.sock"
        );
        assert_eq!(
            Upstream::parse("tcp://[::1]:9").unwrap().host(),
            Some("::1")
        );
        for bad in [
            "tcp://host",
            "tcp://:80",
            "tcp://h:99999",
            "unix:",
            "http://x:1",
            "x",
        ] {
            let e = Upstream::parse(bad).unwrap_err().to_string();
            assert!(e.contains("expected"), "{bad}: {e}");
        }
    }
}
