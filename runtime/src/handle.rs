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
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use capnp::capability::FromClientHook;
use tokio::sync::{mpsc, oneshot};

use crate::poll::{may_poll, poll_for, PollBackoff, Polled, PollingMark};
use crate::{Client, ClientBuilder, ConnectionStats, Error, Limits};

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
    results: Arc<ResultPoll>,
}

/// How callers wait for their results: like a connection waiting for an answer
/// ([`Limits::answer_poll`]), a caller polls for its result for a short while before it
/// sleeps, adaptively, one caller of a handle at a time.
#[derive(Debug)]
struct ResultPoll {
    polls: Polls,
    /// Set while a caller polls; only that caller touches `backoff`.
    polling: AtomicBool,
    /// A [`PollBackoff`], packed.
    backoff: AtomicU16,
}

impl ResultPoll {
    /// Polls `rx` for up to the budget: `Some` with what came (or `Err` if the sender is
    /// gone), `None` to wait for it normally.
    async fn wait<T>(&self, rx: &mut oneshot::Receiver<T>) -> Option<Result<T, ()>> {
        let Polls { budget, when_busy } = self.polls;
        if budget.is_zero() || !may_poll(when_busy) || self.polling.swap(true, Ordering::Acquire) {
            return None;
        }
        let _polling = Release(&self.polling);
        let mut backoff = PollBackoff::from_bits(self.backoff.load(Ordering::Relaxed));
        let ready = backoff.ready();
        self.backoff.store(backoff.to_bits(), Ordering::Relaxed);
        if !ready {
            return None;
        }
        let polled = poll_for(budget, when_busy, || match rx.try_recv() {
            Ok(v) => Some(Ok(v)),
            Err(oneshot::error::TryRecvError::Closed) => Some(Err(())),
            Err(oneshot::error::TryRecvError::Empty) => None,
        })
        .await;
        if let Some(Err(())) = polled {
            // The sender is gone: that tells nothing about polling.
            return polled;
        }
        backoff.record(if polled.is_some() {
            Polled::Hit
        } else {
            Polled::Miss
        });
        self.backoff.store(backoff.to_bits(), Ordering::Relaxed);
        polled
    }
}

/// How a handle polls: for up to `budget` ([`Limits::answer_poll`]), and whether also when
/// the machine is busy ([`Limits::poll_when_busy`]).
#[derive(Clone, Copy, Debug)]
struct Polls {
    budget: Duration,
    when_busy: bool,
}

impl Polls {
    fn of(limits: &Limits) -> Self {
        Self {
            budget: limits.answer_poll,
            when_busy: limits.poll_when_busy,
        }
    }
}

/// Clears a flag when dropped.
struct Release<'a>(&'a AtomicBool);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// The connection thread's job loop: runs jobs as they come; after a burst, polls for the
/// next job for up to `budget` before sleeping (a caller making calls one after another
/// sends it soon after its result), adaptively.
async fn run_jobs(client: &Client, rx: &mut mpsc::UnboundedReceiver<Job>, polls: Polls) {
    let Polls { budget, when_busy } = polls;
    let mut backoff = PollBackoff::default();
    while let Some(job) = rx.recv().await {
        job(client);
        loop {
            // Take whatever else is queued without another wake-up.
            while let Ok(job) = rx.try_recv() {
                job(client);
            }
            if budget.is_zero() || !may_poll(when_busy) || !backoff.ready() {
                break;
            }
            match poll_job(rx, polls).await {
                Some(job) => {
                    backoff.record(Polled::Hit);
                    job(client);
                }
                None => {
                    backoff.record(Polled::Miss);
                    break;
                }
            }
        }
    }
}

/// Polls for a job for up to `budget`, keeping the thread awake meanwhile (the connection's
/// own answer polling stands aside while this one runs: see [`PollingMark`]).
async fn poll_job(rx: &mut mpsc::UnboundedReceiver<Job>, polls: Polls) -> Option<Job> {
    let _mark = PollingMark::take();
    poll_for(polls.budget, polls.when_busy, || match rx.try_recv() {
        Ok(job) => Some(Some(job)),
        Err(mpsc::error::TryRecvError::Disconnected) => Some(None),
        Err(mpsc::error::TryRecvError::Empty) => None,
    })
    .await
    .flatten()
}

impl ClientHandle {
    /// Connects over TCP with default limits, on a new connection thread.
    pub async fn connect(addr: SocketAddr) -> Result<Self, Error> {
        ClientBuilder::default().connect_handle(addr).await
    }

    /// Runs the connection that `connect` makes (called on the new connection thread) and
    /// returns a handle to it once it is up.
    ///
    /// Callers and the connection thread poll for results and jobs as [`Limits::default`]
    /// says (`answer_poll`); [`ClientBuilder::connect_handle`] takes the builder's limits.
    pub async fn spawn<F, Fut>(connect: F) -> Result<Self, Error>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Client, Error>> + 'static,
    {
        Self::spawn_polling(connect, Polls::of(&Limits::default())).await
    }

    async fn spawn_polling<F, Fut>(connect: F, poll: Polls) -> Result<Self, Error>
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
                    run_jobs(&client, &mut rx, poll).await;
                    // Every handle is gone: close the connection, letting the tasks still
                    // running finish first.
                    let _ = client.shutdown().await;
                });
            })
            .map_err(|e| Error::io("starting the client thread", e))?;
        match ready_rx.await {
            Ok(Ok(())) => Ok(Self {
                jobs,
                results: Arc::new(ResultPoll {
                    polls: poll,
                    polling: AtomicBool::new(false),
                    backoff: AtomicU16::new(0),
                }),
            }),
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
        let mut rx = rx;
        let result = match self.results.wait(&mut rx).await {
            Some(r) => r,
            None => rx.await.map_err(|_| ()),
        };
        result.map_err(|_| {
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
        let poll = Polls::of(&self.limits);
        ClientHandle::spawn_polling(move || self.connect(addr), poll).await
    }

    /// Connects to a Unix socket on a new connection thread; see [`ClientHandle`].
    pub async fn connect_unix_handle(
        self,
        path: impl Into<PathBuf>,
    ) -> Result<ClientHandle, Error> {
        let path = path.into();
        let poll = Polls::of(&self.limits);
        ClientHandle::spawn_polling(move || self.connect_unix(path), poll).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn assert_send_sync_clone<T: Send + Sync + Clone + 'static>() {}

    #[test]
    fn handle_is_send_sync_clone() {
        assert_send_sync_clone::<ClientHandle>();
    }

    fn result_poll(budget: Duration) -> ResultPoll {
        ResultPoll {
            polls: Polls {
                budget,
                // Whatever else runs on the machine (other tests).
                when_busy: true,
            },
            polling: AtomicBool::new(false),
            backoff: AtomicU16::new(0),
        }
    }

    #[test]
    fn callers_poll_for_results_and_back_off_when_they_come_late() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let poll = result_poll(Duration::from_millis(100));
            // A result that is there (or comes within the budget) is taken while polling.
            let (tx, mut rx) = oneshot::channel();
            tx.send(1).unwrap();
            assert_eq!(poll.wait(&mut rx).await, Some(Ok(1)));
            let (tx, mut rx) = oneshot::channel();
            let sender = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(5));
                tx.send(2).unwrap();
            });
            assert_eq!(poll.wait(&mut rx).await, Some(Ok(2)));
            sender.join().unwrap();
            // One that comes later: the poll gives up after the budget...
            let (_tx, mut rx) = oneshot::channel::<i32>();
            let t = Instant::now();
            assert_eq!(poll.wait(&mut rx).await, None);
            assert!(t.elapsed() >= Duration::from_millis(100));
            // ... and the next caller does not poll at all (then the one after does again).
            let t = Instant::now();
            assert_eq!(poll.wait(&mut rx).await, None);
            assert!(t.elapsed() < Duration::from_millis(50), "{:?}", t.elapsed());
            let t = Instant::now();
            assert_eq!(poll.wait(&mut rx).await, None);
            assert!(t.elapsed() >= Duration::from_millis(100));
            // A sender that is gone ends the poll at once.
            let (tx, mut rx) = oneshot::channel::<i32>();
            drop(tx);
            let poll = result_poll(Duration::from_secs(10));
            assert_eq!(poll.wait(&mut rx).await, Some(Err(())));
            // While one caller polls, others do not.
            poll.polling.store(true, Ordering::Relaxed);
            let (_tx, mut rx) = oneshot::channel::<i32>();
            assert_eq!(poll.wait(&mut rx).await, None);
            // Zero turns it off.
            let (tx, mut rx) = oneshot::channel();
            tx.send(3).unwrap();
            assert_eq!(result_poll(Duration::ZERO).wait(&mut rx).await, None);
        });
    }
}
