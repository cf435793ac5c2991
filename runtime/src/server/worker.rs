use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};

use super::events::Events;
use super::listener::Accepted;
use super::session;
use super::shared::ServerShared;
use crate::Error;

/// One worker thread: a current-thread runtime with a `LocalSet` running its connections.
pub(super) struct Worker {
    tx: mpsc::UnboundedSender<Accepted>,
    load: Arc<AtomicUsize>,
    done: oneshot::Receiver<()>,
}

impl Worker {
    pub(super) fn spawn(
        index: usize,
        shared: Arc<ServerShared>,
        stop: watch::Receiver<bool>,
    ) -> Result<Self, Error> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (done_tx, done) = oneshot::channel();
        let load = Arc::new(AtomicUsize::new(0));
        let thread_load = load.clone();
        std::thread::Builder::new()
            .name(format!("capgate-worker-{index}"))
            .spawn(move || {
                run(rx, shared, stop, thread_load);
                let _ = done_tx.send(());
            })
            .map_err(|e| Error::io("starting a worker thread", e))?;
        Ok(Self { tx, load, done })
    }

    pub(super) async fn join(self) {
        drop(self.tx);
        let _ = self.done.await;
    }
}

/// Hands a connection to the least loaded worker.
pub(super) fn dispatch(workers: &[Worker], accepted: Accepted) {
    let Some(w) = workers
        .iter()
        .min_by_key(|w| w.load.load(Ordering::Relaxed))
    else {
        return;
    };
    w.load.fetch_add(1, Ordering::Relaxed);
    if w.tx.send(accepted).is_err() {
        w.load.fetch_sub(1, Ordering::Relaxed);
    }
}

fn run(
    mut rx: mpsc::UnboundedReceiver<Accepted>,
    shared: Arc<ServerShared>,
    stop: watch::Receiver<bool>,
    load: Arc<AtomicUsize>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(cause = %e, "worker runtime failed to start");
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        // Shutdown and policy reloads reach this worker's connections through one follower.
        let events = Rc::new(Events::default());
        let follower = {
            let events = events.clone();
            let policy = shared.policy.subscribe();
            tokio::task::spawn_local(async move { events.follow(stop, policy).await })
        };
        let mut tasks = Vec::new();
        while let Some(accepted) = rx.recv().await {
            tasks.retain(|t: &tokio::task::JoinHandle<()>| !t.is_finished());
            let shared = shared.clone();
            let load = load.clone();
            // Counts down even if the connection's task panics and unwinds.
            shared.open_connections.fetch_add(1, Ordering::Relaxed);
            let load = LoadGuard(load, shared.clone());
            // The connection's future is built here and boxed, so the task itself stays a
            // few words (an idle connection's memory is mostly its futures).
            let conn = session::serve(accepted, shared, &events);
            tasks.push(tokio::task::spawn_local(async move {
                let _load = load;
                conn.await;
            }));
        }
        // The acceptors are gone (shutdown): let every connection finish its graceful close.
        for t in tasks {
            if let Err(e) = t.await {
                if e.is_panic() {
                    tracing::error!("a connection task panicked during shutdown");
                }
            }
        }
        follower.abort();
    });
}

struct LoadGuard(Arc<AtomicUsize>, Arc<ServerShared>);

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        self.1.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}
