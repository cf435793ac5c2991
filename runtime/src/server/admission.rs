//! Admission: which class a new connection belongs to, whether its class, client and the
//! fleet leave room for it, and the guarded network it is served on; or the refusal it is
//! sent, with the reason.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use capnp_rpc::RpcSystem;
use std::rc::Rc;
use tokio::io::{AsyncRead, AsyncWrite};

use super::events::{Events, Subscription};
use super::session::serve_admitted;
use super::shared::{Backend, ServerShared};
use crate::network::{new_network, new_relay};
use crate::{ClientKey, Guard, PeerAddr, PeerInfo, PeerView, Side};

/// Gives a gauge back when the connection ends (panics included).
pub(super) struct GaugeSlot(pub(super) prometheus_client::metrics::gauge::Gauge);

impl Drop for GaugeSlot {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The peer as the policy sees it.
pub(super) fn view(peer: &PeerInfo) -> PeerView<'_> {
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
pub(super) async fn refuse<R, W>(
    mut reader: R,
    mut writer: W,
    reason: String,
    limits: &crate::Limits,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let frame = crate::core::abort_frame(&capnp::Error::failed(reason));
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

#[allow(clippy::large_enum_variant)] // a short-lived return value: boxing it would cost an allocation
pub(super) enum Admission {
    Admitted(Admitted),
    /// Sends the refusal (or nothing, if the bootstrap factory panicked).
    Refused(std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>),
    /// Waits for the shared quota store's verdict (bounded by `admission_timeout`), then
    /// serves the connection or refuses it.
    Deferred(std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>),
}

/// What serving an admitted connection needs.
pub(super) struct Admitted {
    pub(super) peer: PeerInfo,
    pub(super) key: ClientKey,
    /// Shutdown and policy reloads.
    pub(super) events: Subscription,
    pub(super) control: crate::ConnectionControl,
    pub(super) serving: Serving,
    /// Released when the connection ends.
    pub(super) slots: Slots,
}

/// What serves an admitted connection: a local RPC system or a relay to the upstream. Runs
/// until the connection ends.
pub(super) enum Serving {
    Rpc(RpcSystem<Side>),
    Relay(crate::network::RelayFuture),
}

impl std::future::Future for Serving {
    type Output = Result<(), capnp::Error>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match self.get_mut() {
            Serving::Rpc(rpc) => std::pin::Pin::new(rpc).poll(cx),
            Serving::Relay(relay) => relay.as_mut().poll(cx),
        }
    }
}

/// What a connection holds in the counts (given back when dropped): its class's, its
/// client's on this server and across the fleet (with a shared quota store), the gauge.
pub(super) type Slots = (
    crate::ClassSlot,
    crate::ConnectionSlot,
    GaugeSlot,
    Option<crate::quota_store::FleetSlot>,
);

/// A connection that passed this server's checks, before the fleet's (if any).
pub(super) struct Local<R, W> {
    pub(super) reader: R,
    pub(super) writer: W,
    pub(super) peer: PeerInfo,
    pub(super) key: ClientKey,
    pub(super) class: Arc<capgate_policy::ClientClass>,
    pub(super) events: Subscription,
    pub(super) class_slot: crate::ClassSlot,
    pub(super) slot: crate::ConnectionSlot,
    pub(super) rate: Arc<dyn crate::RateLimit>,
}

pub(super) fn admit<R, W>(
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
pub(super) fn finish<R, W>(
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
    let limits = shared.limits_for(q);
    let mut guard = Guard::new(class.clone(), rate, shared.policy.catalog().clone());
    guard.set_method_rates(shared.clients.method_rates(&slot, &class, &key));
    let (serving, control) = match &shared.backend {
        Backend::Local(factory) => {
            let bootstrap =
                match std::panic::catch_unwind(AssertUnwindSafe(|| factory.bootstrap(&peer))) {
                    Ok(b) => b,
                    Err(_) => {
                        tracing::error!("bootstrap factory panicked; closing the connection");
                        return Admission::Refused(Box::pin(async {}));
                    }
                };
            let (network, control) = new_network(reader, writer, Side::Server, limits, guard);
            let rpc = RpcSystem::new(Box::new(network), Some(bootstrap));
            (Serving::Rpc(rpc), control)
        }
        Backend::Upstream(upstream) => {
            let connect = {
                let upstream = upstream.clone();
                async move { upstream.connect().await }
            };
            let (relay, control) = new_relay(
                reader,
                writer,
                limits,
                guard,
                upstream.shared_name(),
                connect,
            );
            (Serving::Relay(relay), control)
        }
    };
    let class_gauge = shared.metrics.connections(class.name());
    class_gauge.inc();
    control.observe(shared.metrics.clone(), shared.denial_counters(class.name()));
    control.share_outgoing(shared.outgoing.account(
        slot.outgoing(),
        q.max_client_outgoing_bytes,
        format!("{} of class \"{}\"", peer.addr, class.name()),
    ));
    tracing::debug!("connection open");
    Admission::Admitted(Admitted {
        peer,
        key,
        events,
        control,
        serving,
        slots: (class_slot, slot, GaugeSlot(class_gauge), fleet_slot),
    })
}

/// Sends a refused connection its reason.
pub(super) fn refused<R, W>(
    reader: R,
    writer: W,
    shared: &ServerShared,
    reason: String,
) -> Admission
where
    R: AsyncRead + Unpin + 'static,
    W: AsyncWrite + Unpin + 'static,
{
    Admission::Refused(refusal(reader, writer, shared, reason))
}

/// Logs a refusal (throttled) and returns the future that sends it.
pub(super) fn refusal<R, W>(
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
