//! The client side: connect, get the server's bootstrap capability, make calls.

use std::net::SocketAddr;
use std::path::Path;
use std::rc::Rc;

use capnp::capability::FromClientHook;
use capnp_rpc::RpcSystem;
use futures::channel::oneshot;
use futures::future::{FutureExt, Shared};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::network::{new_network, ConnectionControl};
use crate::{ConnectionStats, Error, Guard, Limits, Side};

/// Configures a [`Client`].
#[derive(Clone, Default)]
#[must_use]
pub struct ClientBuilder {
    pub(crate) limits: Limits,
    tls: Option<(
        std::sync::Arc<rustls::ClientConfig>,
        rustls_pki_types::ServerName<'static>,
    )>,
}

impl ClientBuilder {
    /// Limits for this connection (the server is a peer like any other: its frames are
    /// checked as strictly as a client's).
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Polls the socket for up to `time` after each write instead of sleeping at once (see
    /// [`Limits::busy_poll`]): lower latency for more CPU. Default: off.
    pub fn busy_poll(mut self, time: std::time::Duration) -> Self {
        self.limits.busy_poll = time;
        self
    }

    /// While calls await their answers, polls the socket for up to `time` after each write
    /// (see [`Limits::answer_poll`]). Default 100 µs; zero turns it off.
    pub fn answer_poll(mut self, time: std::time::Duration) -> Self {
        self.limits.answer_poll = time;
        self
    }

    /// Connects with TLS (see [`crate::tls::client_config`]), verifying that the server's
    /// certificate is valid for `server_name` (a DNS name or an IP address).
    pub fn tls(
        mut self,
        config: std::sync::Arc<rustls::ClientConfig>,
        server_name: &str,
    ) -> Result<Self, Error> {
        let name = rustls_pki_types::ServerName::try_from(server_name.to_string())
            .map_err(|e| Error::setting(format!("TLS server name {server_name:?}"), e))?;
        self.tls = Some((config, name));
        Ok(self)
    }

    /// Connects over TCP (with TLS if configured).
    pub async fn connect(self, addr: SocketAddr) -> Result<Client, Error> {
        let s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| Error::io(format!("connecting to tcp://{addr}"), e))?;
        let _ = s.set_nodelay(true);
        match self.tls.clone() {
            None => {
                let (r, w) = s.into_split();
                Ok(self.from_stream(r, w))
            }
            Some((config, name)) => {
                let connector = tokio_rustls::TlsConnector::from(config);
                let handshake = connector.connect(name, s);
                let tls = tokio::time::timeout(self.limits.tls_handshake_timeout, handshake)
                    .await
                    .map_err(|_| {
                        Error::io(
                            format!("TLS handshake with tcp://{addr}"),
                            std::io::ErrorKind::TimedOut.into(),
                        )
                    })?
                    .map_err(|e| Error::io(format!("TLS handshake with tcp://{addr}"), e))?;
                let (r, w) = tokio::io::split(tls);
                Ok(self.from_stream(r, w))
            }
        }
    }

    /// Connects to a Unix socket.
    pub async fn connect_unix(self, path: impl AsRef<Path>) -> Result<Client, Error> {
        let path = path.as_ref();
        let s = tokio::net::UnixStream::connect(path)
            .await
            .map_err(|e| Error::io(format!("connecting to unix:{}", path.display()), e))?;
        let (r, w) = s.into_split();
        Ok(self.from_stream(r, w))
    }

    /// Spawns `command` with piped stdin and stdout and talks Cap'n Proto over them (the
    /// child serves on its stdio, e.g. `capgate serve --stdio`). The child's stderr is
    /// inherited. Closing the client (or dropping it and its capabilities) closes the child's
    /// stdin, which ends a well-behaved server.
    pub fn spawn(
        self,
        command: std::process::Command,
    ) -> Result<(Client, tokio::process::Child), Error> {
        use std::process::Stdio;
        let mut child = tokio::process::Command::from(command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Error::io("spawning the server process", e))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(Error::Config("the child process has no stdio pipes".into()));
        };
        Ok((self.from_stream(stdout, stdin), child))
    }

    /// Runs the client over any pair of streams (pipes, stdio of a child process, TLS).
    pub fn from_stream<R, W>(self, reader: R, writer: W) -> Client
    where
        R: AsyncRead + Unpin + 'static,
        W: AsyncWrite + Unpin + 'static,
    {
        let (network, control) = new_network(
            reader,
            writer,
            Side::Client,
            self.limits,
            Guard::allow_all(),
        );
        let mut rpc = RpcSystem::new(Box::new(network), None);
        let bootstrap: capnp::capability::Client = rpc.bootstrap(Side::Server);
        let (tx, rx) = oneshot::channel();
        tokio::task::spawn_local(async move {
            let r = rpc.await;
            let _ = tx.send(r);
        });
        let done = rx
            .map(|r| match r {
                Ok(r) => r,
                Err(_) => Err(capnp::Error::disconnected(
                    "capgate: client task ended".into(),
                )),
            })
            .boxed_local()
            .shared();
        Client {
            bootstrap,
            control: Rc::new(control),
            done,
        }
    }
}

/// A connection to a capgate (or any Cap'n Proto two-party) server.
///
/// Like capnp-rpc itself, a `Client` lives on one thread: create and use it inside a
/// `tokio::task::LocalSet`. Clones share the connection.
#[derive(Clone)]
pub struct Client {
    bootstrap: capnp::capability::Client,
    control: Rc<ConnectionControl>,
    done: Shared<futures::future::LocalBoxFuture<'static, Result<(), capnp::Error>>>,
}

impl Client {
    /// Connects over TCP with default limits.
    pub async fn connect(addr: SocketAddr) -> Result<Self, Error> {
        ClientBuilder::default().connect(addr).await
    }

    /// Connects to a Unix socket with default limits.
    pub async fn connect_unix(path: impl AsRef<Path>) -> Result<Self, Error> {
        ClientBuilder::default().connect_unix(path).await
    }

    /// Starts configuring a client.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The server's bootstrap capability, as the typed client `T` (e.g. `store::Client`).
    /// Calls made before the server answers are pipelined.
    pub fn bootstrap<T: FromClientHook>(&self) -> T {
        T::new(self.bootstrap.hook.add_ref())
    }

    /// Resolves when the connection has ended; the error says why (e.g. the server's
    /// `Abort` reason).
    pub async fn closed(&self) -> Result<(), capnp::Error> {
        let result = self.done.clone().await;
        match self.control.peer_abort() {
            Some(e) => Err(e),
            None => result,
        }
    }

    /// Closes the connection.
    pub async fn shutdown(self) -> Result<(), capnp::Error> {
        self.control.abort(crate::AbortReason::Closed(
            "the client closed the connection",
        ));
        self.done.clone().await
    }

    /// Traffic counters of this connection.
    pub fn stats(&self) -> ConnectionStats {
        self.control.stats()
    }
}
