//! One accepted connection from start to end: TLS handshake, admission (class, quotas,
//! connection counts), the RPC system over the guarded network, policy reloads, shutdown.

use std::sync::Arc;
use std::time::Duration;

use std::rc::Rc;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::Instrument;

use super::admission::{admit, view, Admission, Admitted, GaugeSlot, Serving};
use super::events::{Event, Events};
use super::listener::Accepted;
use super::shared::ServerShared;
use crate::PeerInfo;
/// How often a connection that is draining for shutdown checks for in-flight calls.
const DRAIN_POLL: Duration = Duration::from_millis(10);

/// Moves a future to the heap from a plain function (done inside an `async fn`, the
/// moved-from value would still occupy that function's state).
fn boxed<F: std::future::Future<Output = ()> + 'static>(
    f: F,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>> {
    Box::pin(f)
}

/// The future that serves one accepted connection, boxed per transport: a plaintext
/// connection allocates its own state only, not the size of the largest variant (the TLS
/// handshake's is ~3 KiB). Call inside the worker's runtime (it registers the socket).
pub(super) fn serve(
    accepted: Accepted,
    shared: Arc<ServerShared>,
    events: &Rc<Events>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>> {
    match accepted {
        Accepted::Tcp(s, peer) => match tokio::net::TcpStream::from_std(s) {
            Ok(s) => match shared.tls.clone() {
                None => {
                    let (r, w) = s.into_split();
                    run(r, w, peer, shared, events)
                }
                Some(acceptor) => boxed(serve_tls(s, acceptor, peer, shared, events.clone())),
            },
            Err(e) => {
                tracing::warn!(cause = %e, "cannot register a connection");
                boxed(async {})
            }
        },
        Accepted::Unix(s, peer) => match tokio::net::UnixStream::from_std(s) {
            Ok(s) => {
                let (r, w) = s.into_split();
                run(r, w, peer, shared, events)
            }
            Err(e) => {
                tracing::warn!(cause = %e, "cannot register a connection");
                boxed(async {})
            }
        },
    }
}

/// The TLS handshake (bounded by `tls_handshake_timeout`), then the connection.
async fn serve_tls(
    s: tokio::net::TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    mut peer: PeerInfo,
    shared: Arc<ServerShared>,
    events: Rc<Events>,
) {
    let timeout = shared.limits.tls_handshake_timeout;
    let tls = match tokio::time::timeout(timeout, acceptor.accept(s)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            if let Some(left_out) = shared.throttled("tls_handshake") {
                tracing::info!(peer = %peer.addr, cause = %e, left_out, "TLS handshake failed");
            }
            shared.metrics.handshake_failures.inc();
            return;
        }
        Err(_) => {
            shared.metrics.handshake_failures.inc();
            if let Some(left_out) = shared.throttled("tls_handshake_timeout") {
                tracing::info!(peer = %peer.addr, ?timeout, left_out, "TLS handshake not completed in time (tls_handshake_timeout)");
            }
            return;
        }
    };
    peer.tls = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| crate::CertIdentity::from_der(c))
        .map(Box::new);
    let (r, w) = tokio::io::split(tls);
    run(r, w, peer, shared, &events).await;
}

/// One connection from start to end: admission (policy class, connection limits,
/// bootstrap) happens synchronously here; the returned future serves an admitted connection
/// or sends a refused one its reason. Keeping admission out of the future keeps an idle
/// connection's future small (it holds only what serving needs).
pub(super) fn run<R, W>(
    reader: R,
    writer: W,
    peer: PeerInfo,
    shared: Arc<ServerShared>,
    events: &Rc<Events>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>
where
    R: AsyncRead + Unpin + 'static,
    W: AsyncWrite + Unpin + 'static,
{
    let span = tracing::info_span!("conn", id = peer.connection_id, peer = %peer, class = tracing::field::Empty);
    let admitted = {
        let _entered = span.enter();
        admit(reader, writer, peer, &shared, events, &span)
    };
    match admitted {
        Admission::Admitted(c) => Box::pin(serve_admitted(c, shared).instrument(span)),
        Admission::Refused(f) | Admission::Deferred(f) => Box::pin(f.instrument(span)),
    }
}

/// Graceful shutdown of one connection: let in-flight calls finish, up to the deadline, then
/// close with an `Abort` saying why.
async fn drain(
    control: &crate::ConnectionControl,
    rpc: &mut Serving,
    shutdown_timeout: Duration,
    write_timeout: Duration,
) -> Result<(), capnp::Error> {
    let deadline = tokio::time::Instant::now() + shutdown_timeout;
    let finished = loop {
        if control.in_flight_calls() == 0 || tokio::time::Instant::now() >= deadline {
            break None;
        }
        tokio::select! {
            r = &mut *rpc => break Some(r),
            () = tokio::time::sleep(DRAIN_POLL) => {}
        }
    };
    match finished {
        Some(r) => r,
        None => {
            control.abort(crate::AbortReason::Shutdown);
            match tokio::time::timeout(write_timeout, &mut *rpc).await {
                Ok(r) => r,
                Err(_) => Ok(()),
            }
        }
    }
}

/// Serves an admitted connection until it ends, the server shuts down, or a policy reload
/// no longer matches it.
///
/// A plain fn around an `async move` block: the block uses `c` in place, where an
/// `async fn` would keep a second copy of its argument in the future's state.
#[allow(clippy::manual_async_fn)] // on purpose: see above
pub(super) fn serve_admitted(
    mut c: Admitted,
    shared: Arc<ServerShared>,
) -> impl std::future::Future<Output = ()> {
    async move {
        // Use `c` whole, so the block owns all of it: closures capture only the fields they
        // use, and the connection slots (never read) would otherwise be released at once.
        let c = &mut c;
        let control = &c.control;
        let result = loop {
            tokio::select! {
                r = &mut c.serving => break Some(r),
                event = c.events.next() => match event {
                    Event::Stop => break None,
                    Event::PolicyChanged => {
                        let policy = shared.policy.current();
                        match policy.classify(&view(&c.peer)) {
                            Some((_, k)) => {
                                let k = k.clone();
                                let q = k.quotas();
                                // The connection now counts, and shares its client's budget,
                                // in the class it matches (the new slots are taken before the
                                // old ones are given back).
                                let (class_slot, slot, rate) = shared.clients.rematch(k.name(), c.key.clone(), q.calls_per_second, q.burst);
                                let gauge = shared.metrics.connections(k.name());
                                gauge.inc();
                                let fleet_slot = shared.fleet.as_ref().map(|f| {
                                    let conns = f.conns(&crate::QuotaKey::client(k.name(), c.key.clone()));
                                    crate::quota_store::FleetSlot::join(f, conns)
                                });
                                let method_rates = shared.clients.method_rates(&slot, &k, &c.key);
                                c.slots = (class_slot, slot, GaugeSlot(gauge), fleet_slot);
                                tracing::info!(class = k.name(), "policy reloaded: connection re-matched");
                                control.set_class(k.clone(), rate, method_rates);
                                control.observe(shared.metrics.clone(), shared.denial_counters(k.name()));
                            }
                            None => control.abort(crate::AbortReason::NoClassMatches {
                                policy: policy.origin().to_string(),
                                peer: c.peer.addr.to_string(),
                            }),
                        }
                    }
                },
            }
        };
        close(c, result, &shared).await;
    }
}

/// The end of a connection: the graceful drain if the server is shutting down, the closing
/// log line, and the linger. Boxed from a plain fn: its timers and locals would otherwise
/// enlarge every open connection's future.
fn close<'a>(
    c: &'a mut Admitted,
    finished: Option<Result<(), capnp::Error>>,
    shared: &'a ServerShared,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + 'a>> {
    Box::pin(async move {
        let control = &c.control;
        let result = match finished {
            Some(r) => r,
            None => {
                let limits = &shared.limits;
                drain(
                    control,
                    &mut c.serving,
                    limits.shutdown_timeout,
                    limits.write_timeout,
                )
                .await
            }
        };
        let stats = control.stats();
        match &result {
            Ok(()) => tracing::debug!(?stats, "connection closed"),
            Err(e) => {
                if let Some(left_out) = shared.throttled("closed_with_error") {
                    tracing::info!(cause = %e, ?stats, left_out, "connection closed with an error");
                }
            }
        }
        control.linger().await;
    })
}
