//! The server: listeners, an acceptor per listener, N worker threads each running its
//! connections on a current-thread runtime with a `LocalSet`.

mod admission;
mod builder;
mod events;
mod listener;
mod log_throttle;
mod session;
mod shared;
mod worker;

pub use builder::{Gateway, ServerBuilder};
pub use listener::ListenAddr;
pub use shared::{BootstrapFactory, PolicyHandle};

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::{DenialCounts, Error, PeerAddr};
use listener::{Accepted, Listener};
use shared::ServerShared;
use worker::Worker;

/// A bound, ready-to-run capgate server. Made by [`Server::builder`].
pub struct Server {
    listeners: Vec<Listener>,
    metrics_listener: Option<(std::net::TcpListener, SocketAddr)>,
    shared: Arc<ServerShared>,
    workers: usize,
    shutdown: ShutdownHandle,
}

/// Live counters of a server, readable from any thread.
#[derive(Clone)]
pub struct ServerStats {
    shared: Arc<ServerShared>,
}

impl ServerStats {
    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.shared.open_connections.load(Ordering::Relaxed)
    }

    /// Clients the server keeps per-client state for (rate budget, connection count): those
    /// connected, and those whose rate budget is still refilling. Forgotten after that.
    pub fn known_clients(&self) -> usize {
        self.shared.clients.known_clients()
    }

    /// Bytes queued for all peers now, as charged against `max_total_outgoing_bytes`
    /// (reserved in 16 KiB chunks per writing connection).
    pub fn queued_outgoing_bytes(&self) -> usize {
        self.shared.outgoing.total()
    }

    /// With a shared quota store, whether it answers now (`None` without one). While it does
    /// not, the fallback decides.
    pub fn quota_store_up(&self) -> Option<bool> {
        self.shared.fleet.as_ref().map(|f| f.is_up())
    }

    /// All metrics in the Prometheus text format.
    pub fn metrics_text(&self) -> String {
        self.shared.metrics.encode()
    }

    /// Denials so far for a client class, by reason (all its connections, past and present).
    pub fn denials(&self, class: &str) -> DenialCounts {
        self.shared
            .denials
            .get(class)
            .map(|c| c.snapshot())
            .unwrap_or_default()
    }
}

/// Stops a running server gracefully: no new connections; in-flight calls get up to
/// [`crate::Limits::shutdown_timeout`] to finish; then every connection is closed with an `Abort`
/// saying the server is shutting down. Cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct ShutdownHandle {
    tx: Arc<watch::Sender<bool>>,
}

impl ShutdownHandle {
    fn new() -> Self {
        Self {
            tx: Arc::new(watch::channel(false).0),
        }
    }

    /// Begins the graceful shutdown. Idempotent.
    pub fn shutdown(&self) {
        self.tx.send_replace(true);
    }

    fn subscribe(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }
}

impl Server {
    /// The addresses the server is bound to, in the order they were added.
    pub fn local_addrs(&self) -> Vec<ListenAddr> {
        self.listeners
            .iter()
            .map(|l| match l {
                Listener::Tcp(_, a) => ListenAddr::Tcp(*a),
                Listener::Unix(_, p) => ListenAddr::Unix(p.clone()),
            })
            .collect()
    }

    /// Live counters (connections, denials by class and reason).
    pub fn stats(&self) -> ServerStats {
        ServerStats {
            shared: self.shared.clone(),
        }
    }

    /// A handle to read or replace the policy while the server runs.
    pub fn policy_handle(&self) -> PolicyHandle {
        self.shared.policy.clone()
    }

    /// Where the Prometheus metrics endpoint listens, if configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.as_ref().map(|(_, a)| *a)
    }

    /// A handle that stops the server gracefully.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Connections currently open, across all workers.
    pub fn open_connections(&self) -> usize {
        self.shared.open_connections.load(Ordering::Relaxed)
    }

    /// Serves one connection over a pair of streams (a child's stdin/stdout, a pipe) on the
    /// current thread, which must run a `tokio::task::LocalSet`, with the same policy,
    /// limits and bootstrap factory as the listeners. Returns when the connection ends (the
    /// peer closed its side, or [`ShutdownHandle::shutdown`] was called).
    pub async fn serve_stream<R, W>(&self, reader: R, writer: W, label: &str)
    where
        R: tokio::io::AsyncRead + Unpin + 'static,
        W: tokio::io::AsyncWrite + Unpin + 'static,
    {
        let peer = self.shared.peer(PeerAddr::Stream(label.to_string()));
        self.shared.open_connections.fetch_add(1, Ordering::Relaxed);
        let events = std::rc::Rc::new(events::Events::default());
        // Subscribed before the connection is admitted: no reload can fall in between.
        let (stop, policy) = (self.shutdown.subscribe(), self.shared.policy.subscribe());
        let conn = session::run(reader, writer, peer, self.shared.clone(), &events);
        let follow = async {
            events.follow(stop, policy).await;
            // After shutdown the connection drains on its own.
            std::future::pending::<()>().await;
        };
        // The quota store's task runs as long as the connection, unless `serve` runs it.
        let mut driver = self.shared.fleet.as_ref().and_then(|f| f.take_driver());
        let (store_stop, store_stopped) = watch::channel(false);
        let store = async {
            match driver.as_mut() {
                Some(d) => d.run(store_stopped).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = conn => {}
            () = follow => {}
            () = store => {}
        }
        drop(store_stop);
        if let (Some(f), Some(d)) = (&self.shared.fleet, driver) {
            f.put_driver(d);
        }
        self.shared.open_connections.fetch_sub(1, Ordering::Relaxed);
    }

    /// Serves until [`ShutdownHandle::shutdown`] is called, then shuts down gracefully and
    /// returns once every worker has finished.
    pub async fn serve(self) -> Result<(), Error> {
        let Server {
            listeners,
            metrics_listener,
            shared,
            workers,
            shutdown,
        } = self;
        if listeners.is_empty() {
            return Err(Error::Config(
                "no listener: call listen(..) or listen_unix(..) (or use serve_stream)".into(),
            ));
        }
        let workers: Vec<Worker> = (0..workers)
            .map(|i| Worker::spawn(i, shared.clone(), shutdown.subscribe()))
            .collect::<Result<_, _>>()?;
        // The quota store's task, on this runtime; stopped once the workers are done.
        let mut driver = shared.fleet.as_ref().and_then(|f| f.take_driver());
        let (store_stop, store_stopped) = watch::channel(false);
        let store = async {
            if let Some(d) = driver.as_mut() {
                d.run(store_stopped).await;
            }
        };
        let workers = Arc::new(workers);
        let mut acceptors = Vec::new();
        let mut unix_paths = Vec::new();
        for l in listeners {
            let workers = workers.clone();
            let shared = shared.clone();
            let stop = shutdown.subscribe();
            match l {
                Listener::Tcp(l, _) => {
                    let l = tokio::net::TcpListener::from_std(l)
                        .map_err(|e| Error::io("registering a TCP listener", e))?;
                    acceptors.push(futures::future::Either::Left(accept_tcp(
                        l, workers, shared, stop,
                    )));
                }
                Listener::Unix(l, path) => {
                    unix_paths.push(path);
                    let l = tokio::net::UnixListener::from_std(l)
                        .map_err(|e| Error::io("registering a Unix listener", e))?;
                    acceptors.push(futures::future::Either::Right(accept_unix(
                        l, workers, shared, stop,
                    )));
                }
            }
        }
        let metrics = async {
            if let Some((l, _)) = metrics_listener {
                match tokio::net::TcpListener::from_std(l) {
                    Ok(l) => {
                        crate::metrics::serve_http(l, shared.metrics.clone(), shutdown.subscribe())
                            .await
                    }
                    Err(e) => tracing::warn!(cause = %e, "cannot serve metrics"),
                }
            }
        };
        let serving = async {
            futures::future::join(futures::future::join_all(acceptors), metrics).await;
            for p in unix_paths {
                let _ = std::fs::remove_file(p);
            }
            // Acceptors are gone: workers drain their connections and exit.
            let workers = Arc::try_unwrap(workers).unwrap_or_else(|_| {
                unreachable!("acceptors have returned; no other reference to the workers remains")
            });
            for w in workers {
                w.join().await;
            }
            let _ = store_stop.send(true);
        };
        futures::future::join(serving, store).await;
        if let (Some(f), Some(d)) = (&shared.fleet, driver) {
            f.put_driver(d);
        }
        Ok(())
    }
}

/// Backoff after an accept error (EMFILE and friends): the listener keeps serving once the
/// condition clears, without spinning meanwhile.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Accepts until shutdown, handing each connection to the least loaded worker. `accept`
/// yields the next connection ready for a worker, `Ok(None)` for one refused already.
async fn accept_loop<F, Fut>(
    mut accept: F,
    workers: Arc<Vec<Worker>>,
    mut stop: watch::Receiver<bool>,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<Option<Accepted>>>,
{
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            r = accept() => r,
        };
        match accepted {
            Ok(Some(a)) => worker::dispatch(&workers, a),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(cause = %e, "accept failed; retrying");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
}

async fn accept_tcp(
    listener: tokio::net::TcpListener,
    workers: Arc<Vec<Worker>>,
    shared: Arc<ServerShared>,
    stop: watch::Receiver<bool>,
) {
    let accept = || async {
        let (stream, addr) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let peer = shared.peer(PeerAddr::Tcp(addr));
        Ok(Some(Accepted::Tcp(stream.into_std()?, peer)))
    };
    accept_loop(accept, workers, stop).await;
}

async fn accept_unix(
    listener: tokio::net::UnixListener,
    workers: Arc<Vec<Worker>>,
    shared: Arc<ServerShared>,
    stop: watch::Receiver<bool>,
) {
    let accept = || async {
        let (stream, _) = listener.accept().await?;
        let addr = match stream.peer_cred() {
            Ok(c) => PeerAddr::Unix {
                uid: c.uid(),
                gid: c.gid(),
                pid: c.pid(),
            },
            Err(e) => {
                tracing::warn!(cause = %e, "no peer credentials; refusing the connection");
                return Ok(None);
            }
        };
        let peer = shared.peer(addr);
        Ok(Some(Accepted::Unix(stream.into_std()?, peer)))
    };
    accept_loop(accept, workers, stop).await;
}
