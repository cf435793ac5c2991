//! A `Send + Clone` handle to a client connection, for multi-threaded runtimes.
//!
//! capnp-rpc's capabilities are `!Send`: a connection and everything reached through it
//! live on one thread. [`ClientHandle`] runs the connection on a thread of its own and lets
//! any task, on any thread, send it work: a closure that gets the connection (or its typed
//! bootstrap capability) and returns a future whose `Send` result comes back to the caller.
//! The closure and its future run on the connection's thread, so they may hold capabilities,
//! pipeline and await freely; only the closure itself and the result cross threads.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;

use capnp::capability::FromClientHook;
use tokio::sync::{mpsc, oneshot};

use crate::{Client, ClientBuilder, ConnectionStats, Error};

type Job = Box<dyn FnOnce(&Client) + Send>;

/// A connection usable from any thread: `Send + Sync + Clone`. Clones share the connection;
/// it closes when the last clone is dropped (or on [`ClientHandle::shutdown`]).
///
/// ```no_run
/// # async fn demo(addr: std::net::SocketAddr) -> Result<(), capgate_runtime::Error> {
/// use capgate_runtime::ClientHandle;
/// # mod store { pub type Client = capnp::capability::Client; }
/// let handle = ClientHandle::connect(addr).await?; // from #[tokio::main], any task
/// let n = handle
///     .call(|store: store::Client| async move {
///         // runs on the connection's thread: capabilities, pipelining, callbacks
///         Ok(1)
///     })
///     .await?;
/// # let _: i32 = n; Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct ClientHandle {
    jobs: mpsc::UnboundedSender<Job>,
}

impl ClientHandle {
    /// Connects over TCP with default limits, on a new connection thread.
    pub async fn connect(addr: SocketAddr) -> Result<Self, Error> {
        ClientBuilder::default().connect_handle(addr).await
    }

    /// Runs the connection that `connect` makes (called on the new connection thread) and
    /// returns a handle to it once it is up.
    pub async fn spawn<F, Fut>(connect: F) -> Result<Self, Error>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Client, Error>> + 'static,
    {
        let (jobs, mut rx) = mpsc::unbounded_channel::<Job>();
        let (ready_tx, ready_rx) = oneshot::channel();
        std::thread::Builder::new()
            .name("capgate-client".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(Error::io("starting the client runtime", e)));
                        return;
                    }
                };
                tokio::task::LocalSet::new().block_on(&rt, async move {
                    let client = match connect().await {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    if ready_tx.send(Ok(())).is_err() {
                        return;
                    }
                    while let Some(job) = rx.recv().await {
                        job(&client);
                        // Take whatever else is queued without another wake-up.
                        while let Ok(job) = rx.try_recv() {
                            job(&client);
                        }
                    }
                    // Every handle is gone: close the connection, letting the tasks still
                    // running finish first.
                    let _ = client.shutdown().await;
                });
            })
            .map_err(|e| Error::io("starting the client thread", e))?;
        match ready_rx.await {
            Ok(Ok(())) => Ok(Self { jobs }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::Config(
                "the client thread ended before connecting".into(),
            )),
        }
    }

    /// Runs `f` with the connection on the connection's thread and returns its result.
    /// Fails only if the connection thread is gone, or `f`'s future panicked.
    pub async fn run<F, Fut, T>(&self, f: F) -> Result<T, Error>
    where
        F: FnOnce(Client) -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |client: &Client| {
            let fut = f(client.clone());
            tokio::task::spawn_local(async move {
                let _ = tx.send(fut.await);
            });
        });
        self.jobs.send(job).map_err(|_| gone())?;
        rx.await.map_err(|_| {
            Error::Rpc(capnp::Error::failed(
                "capgate: the task on the connection thread ended without a result \
                 (it panicked, or the connection thread stopped)"
                    .into(),
            ))
        })
    }

    /// Runs `f` with the server's bootstrap capability as the typed client `C` (e.g.
    /// `store::Client`) on the connection's thread. RPC errors come back as [`Error::Rpc`].
    pub async fn call<C, F, Fut, T>(&self, f: F) -> Result<T, Error>
    where
        C: FromClientHook,
        F: FnOnce(C) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, capnp::Error>> + 'static,
        T: Send + 'static,
    {
        self.run(move |client| f(client.bootstrap::<C>()))
            .await?
            .map_err(Error::Rpc)
    }

    /// Traffic counters of the connection.
    pub async fn stats(&self) -> Result<ConnectionStats, Error> {
        self.run(|c| async move { c.stats() }).await
    }

    /// Resolves when the connection has ended; the error says why.
    pub async fn closed(&self) -> Result<(), Error> {
        self.run(|c| async move { c.closed().await })
            .await?
            .map_err(Error::Rpc)
    }

    /// Closes the connection now (for every clone).
    pub async fn shutdown(&self) -> Result<(), Error> {
        self.run(|c| c.shutdown()).await?.map_err(Error::Rpc)
    }
}

fn gone() -> Error {
    Error::Rpc(capnp::Error::disconnected(
        "capgate: the client connection thread has stopped".into(),
    ))
}

impl ClientBuilder {
    /// Connects over TCP (with TLS if configured) on a new connection thread and returns a
    /// `Send + Clone` [`ClientHandle`].
    pub async fn connect_handle(self, addr: SocketAddr) -> Result<ClientHandle, Error> {
        ClientHandle::spawn(move || self.connect(addr)).await
    }

    /// Connects to a Unix socket on a new connection thread; see [`ClientHandle`].
    pub async fn connect_unix_handle(
        self,
        path: impl Into<PathBuf>,
    ) -> Result<ClientHandle, Error> {
        let path = path.into();
        ClientHandle::spawn(move || self.connect_unix(path)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync_clone<T: Send + Sync + Clone + 'static>() {}

    #[test]
    fn handle_is_send_sync_clone() {
        assert_send_sync_clone::<ClientHandle>();
    }
}
