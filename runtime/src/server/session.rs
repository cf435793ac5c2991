//! One accepted connection from start to end: TLS handshake, admission (class, quotas,
//! connection counts), the RPC system over the guarded network, policy reloads, shutdown.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use capnp_rpc::RpcSystem;
use std::rc::Rc;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::Instrument;

use super::events::{Event, Events, Subscription};
use super::listener::Accepted;
use super::shared::ServerShared;
use crate::network::new_network;
use crate::{ClientKey, Guard, PeerAddr, PeerInfo, PeerView, Side};

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

/// Gives a gauge back when the connection ends (panics included).
struct GaugeSlot(prometheus_client::metrics::gauge::Gauge);

impl Drop for GaugeSlot {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The peer as the policy sees it.
fn view(peer: &PeerInfo) -> PeerView<'_> {
    let mut v = PeerView::default();
    match &peer.addr {
        PeerAddr::Tcp(a) => v.ip = Some(a.ip()),
        PeerAddr::Unix { uid, .. } => v.unix_uid = Some(*uid),
        _ => {}
    }
    if let Some(id) = &peer.tls {
        v.cert_cns = &id.common_names;
        v.cert_sans = &id.subject_alt_names;
        v.cert_spki_sha256 = Some(&id.spki_sha256);
    }
    v
}

/// Refuses a connection before any RPC: one `Abort` frame with the reason, then close.
async fn refuse<R, W>(mut reader: R, mut writer: W, reason: String, limits: &crate::Limits)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut m = capnp::message::Builder::new_default();
    {
        let mut e = m
            .init_root::<capnp_rpc::rpc_capnp::message::Builder>()
            .init_abort();
        e.set_type(capnp_rpc::rpc_capnp::exception::Type::Failed);
        e.set_reason(reason.as_str());
    }
    let mut frame = Vec::new();
    crate::encode_frame(&mut frame, &m.get_segments_for_output());
    let _ = tokio::time::timeout(limits.write_timeout, async {
        writer.write_all(&frame).await?;
        writer.shutdown().await
    })
    .await;
    // Drain briefly so closing does not reset the connection before the peer reads. (On the
    // heap: a buffer here would enlarge every connection task's future.)
    let mut scratch = vec![0u8; 4096];
    let _ = tokio::time::timeout(limits.linger_timeout, async {
        while let Ok(n) = reader.read(&mut scratch).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
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

#[allow(clippy::large_enum_variant)] // a short-lived return value: boxing it would cost an allocation
enum Admission {
    Admitted(Admitted),
    /// Sends the refusal (or nothing, if the bootstrap factory panicked).
    Refused(std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>),
    /// Waits for the shared quota store's verdict (bounded by `admission_timeout`), then
    /// serves the connection or refuses it.
    Deferred(std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>),
}

/// What serving an admitted connection needs.
struct Admitted {
    peer: PeerInfo,
    key: ClientKey,
    /// Shutdown and policy reloads.
    events: Subscription,
    control: crate::ConnectionControl,
    rpc: RpcSystem<Side>,
    /// Released when the connection ends.
    slots: Slots,
}

/// What a connection holds in the counts (given back when dropped): its class's, its
/// client's on this server and across the fleet (with a shared quota store), the gauge.
type Slots = (
    crate::ClassSlot,
    crate::ConnectionSlot,
    GaugeSlot,
    Option<crate::quota_store::FleetSlot>,
);

/// A connection that passed this server's checks, before the fleet's (if any).
struct Local<R, W> {
    reader: R,
    writer: W,
    peer: PeerInfo,
    key: ClientKey,
    class: Arc<capgate_policy::ClientClass>,
    events: Subscription,
    class_slot: crate::ClassSlot,
    slot: crate::ConnectionSlot,
    rate: Arc<dyn crate::RateLimit>,
}

fn admit<R, W>(
    reader: R,
    writer: W,
    peer: PeerInfo,
    shared: &Arc<ServerShared>,
    events: &Rc<Events>,
    span: &tracing::Span,
) -> Admission
where
    R: AsyncRead + Unpin + 'static,
    W: AsyncWrite + Unpin + 'static,
{
    let open = shared
        .open_connections
        .load(std::sync::atomic::Ordering::Relaxed);
    if open > shared.limits.max_connections {
        return refused(
            reader,
            writer,
            shared,
            format!(
                "capgate: connection refused: the server has {} connections open \
             (max_connections = {}); retry later",
                open - 1,
                shared.limits.max_connections
            ),
        );
    }
    // Subscribed before the policy is read: a reload in between re-matches the connection.
    let events = events.subscribe();
    let policy = shared.policy.current();
    let Some((_, class)) = policy.classify(&view(&peer)) else {
        return refused(
            reader,
            writer,
            shared,
            format!(
                "capgate: connection refused: no client class of the policy ({}) matches {}",
                policy.origin(),
                peer.addr
            ),
        );
    };
    let class = class.clone();
    span.record("class", class.name());
    let key = ClientKey::of(&peer);
    let q = class.quotas();
    let class_slot = match shared
        .clients
        .connect_class(class.name(), q.max_class_connections)
    {
        Ok(s) => s,
        Err(n) => {
            return refused(
                reader,
                writer,
                shared,
                format!(
                    "capgate: connection refused: client class \"{}\" already has {n} \
                 connections (max_class_connections = {})",
                    class.name(),
                    q.max_class_connections
                ),
            )
        }
    };
    let (slot, rate) = match shared.clients.connect(
        class.name(),
        key.clone(),
        q.calls_per_second,
        q.burst,
        q.max_connections,
    ) {
        Ok(r) => r,
        Err(n) => {
            return refused(
                reader,
                writer,
                shared,
                format!(
                    "capgate: connection refused: client {} of class \"{}\" already has {n} \
                 connections (max_connections = {})",
                    peer.addr,
                    class.name(),
                    q.max_connections
                ),
            )
        }
    };
    let max = q.max_connections;
    let local = Local {
        reader,
        writer,
        peer,
        key,
        class,
        events,
        class_slot,
        slot,
        rate,
    };
    let Some(fleet) = &shared.fleet else {
        return finish(local, shared, None);
    };
    // The fleet-wide count: asked of the store, off the worker's synchronous path.
    let conns = fleet.conns(&crate::QuotaKey::client(
        local.class.name(),
        local.key.clone(),
    ));
    let who = format!("{} of class \"{}\"", local.peer.addr, local.class.name());
    let (fleet, shared) = (fleet.clone(), shared.clone());
    Admission::Deferred(Box::pin(async move {
        match fleet.admit(conns, max, &who).await {
            crate::quota_store::Admission::Admitted(fleet_slot) => {
                match finish(local, &shared, Some(fleet_slot)) {
                    Admission::Admitted(c) => serve_admitted(c, shared).await,
                    Admission::Refused(f) | Admission::Deferred(f) => f.await,
                }
            }
            crate::quota_store::Admission::Refused(reason) => {
                let Local {
                    reader,
                    writer,
                    class_slot,
                    slot,
                    ..
                } = local;
                // Counted no more while the refusal is sent.
                drop((class_slot, slot));
                refusal(reader, writer, &shared, reason).await;
            }
        }
    }))
}

/// Admits a connection that passed every check: its bootstrap, guard and RPC system.
fn finish<R, W>(
    local: Local<R, W>,
    shared: &Arc<ServerShared>,
    fleet_slot: Option<crate::quota_store::FleetSlot>,
) -> Admission
where
    R: AsyncRead + Unpin + 'static,
    W: AsyncWrite + Unpin + 'static,
{
    let Local {
        reader,
        writer,
        peer,
        key,
        class,
        events,
        class_slot,
        slot,
        rate,
    } = local;
    let q = class.quotas();
    let bootstrap =
        match std::panic::catch_unwind(AssertUnwindSafe(|| shared.factory.bootstrap(&peer))) {
            Ok(b) => b,
            Err(_) => {
                tracing::error!("bootstrap factory panicked; closing the connection");
                return Admission::Refused(Box::pin(async {}));
            }
        };
    let limits = shared.limits_for(q);
    let mut guard = Guard::new(class.clone(), rate, shared.policy.catalog().clone());
    guard.set_method_rates(shared.clients.method_rates(&slot, &class, &key));
    let class_gauge = shared.metrics.connections(class.name());
    class_gauge.inc();
    let (network, control) = new_network(reader, writer, Side::Server, limits, guard);
    control.observe(shared.metrics.clone(), shared.denial_counters(class.name()));
    control.share_outgoing(shared.outgoing.account(
        slot.outgoing(),
        q.max_client_outgoing_bytes,
        format!("{} of class \"{}\"", peer.addr, class.name()),
    ));
    let rpc = RpcSystem::new(Box::new(network), Some(bootstrap));
    tracing::debug!("connection open");
    Admission::Admitted(Admitted {
        peer,
        key,
        events,
        control,
        rpc,
        slots: (class_slot, slot, GaugeSlot(class_gauge), fleet_slot),
    })
}

/// Graceful shutdown of one connection: let in-flight calls finish, up to the deadline, then
/// close with an `Abort` saying why.
async fn drain(
    control: &crate::ConnectionControl,
    rpc: &mut RpcSystem<Side>,
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

/// Sends a refused connection its reason.
fn refused<R, W>(reader: R, writer: W, shared: &ServerShared, reason: String) -> Admission
where
    R: AsyncRead + Unpin + 'static,
    W: AsyncWrite + Unpin + 'static,
{
    Admission::Refused(refusal(reader, writer, shared, reason))
}

/// Logs a refusal (throttled) and returns the future that sends it.
fn refusal<R, W>(
    reader: R,
    writer: W,
    shared: &ServerShared,
    reason: String,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>
where
    R: AsyncRead + Unpin + 'static,
    W: AsyncWrite + Unpin + 'static,
{
    if let Some(left_out) = shared.throttled("refused") {
        tracing::info!(%reason, left_out, "connection refused (left_out: refusals not logged in the second before)");
    }
    let limits = shared.limits.clone();
    Box::pin(async move {
        refuse(reader, writer, reason, &limits).await;
    })
}

/// Serves an admitted connection until it ends, the server shuts down, or a policy reload
/// no longer matches it.
///
/// A plain fn around an `async move` block: the block uses `c` in place, where an
/// `async fn` would keep a second copy of its argument in the future's state.
#[allow(clippy::manual_async_fn)] // on purpose: see above
fn serve_admitted(
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
                r = &mut c.rpc => break Some(r),
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
                    &mut c.rpc,
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
