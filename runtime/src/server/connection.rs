use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use capnp_rpc::RpcSystem;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tracing::Instrument;

use super::worker::Accepted;
use super::ServerShared;
use crate::network::new_network;
use crate::{PeerInfo, Side};

/// How often a connection that is draining for shutdown checks for in-flight calls.
const DRAIN_POLL: Duration = Duration::from_millis(10);

pub(super) async fn serve(
    accepted: Accepted,
    shared: Arc<ServerShared>,
    stop: watch::Receiver<bool>,
) {
    match accepted {
        Accepted::Tcp(s, peer) => match tokio::net::TcpStream::from_std(s) {
            Ok(s) => {
                let (r, w) = s.into_split();
                run(r, w, peer, shared, stop).await;
            }
            Err(e) => tracing::warn!(cause = %e, "cannot register a connection"),
        },
        Accepted::Unix(s, peer) => match tokio::net::UnixStream::from_std(s) {
            Ok(s) => {
                let (r, w) = s.into_split();
                run(r, w, peer, shared, stop).await;
            }
            Err(e) => tracing::warn!(cause = %e, "cannot register a connection"),
        },
    }
}

async fn run<R, W>(
    reader: R,
    writer: W,
    peer: PeerInfo,
    shared: Arc<ServerShared>,
    mut stop: watch::Receiver<bool>,
) where
    R: AsyncRead + Unpin + 'static,
    W: AsyncWrite + Unpin + 'static,
{
    let span = tracing::info_span!("conn", id = peer.connection_id, peer = %peer.addr);
    async move {
        let bootstrap =
            match std::panic::catch_unwind(AssertUnwindSafe(|| shared.factory.bootstrap(&peer))) {
                Ok(b) => b,
                Err(_) => {
                    tracing::error!("bootstrap factory panicked; closing the connection");
                    return;
                }
            };
        let limits = shared.limits.clone();
        let (network, control) = new_network(reader, writer, Side::Server, limits.clone());
        let mut rpc = std::pin::pin!(RpcSystem::new(Box::new(network), Some(bootstrap)));
        tracing::debug!("connection open");
        let result = tokio::select! {
            r = &mut rpc => Some(r),
            _ = stop.wait_for(|s| *s) => None,
        };
        let result = match result {
            Some(r) => r,
            None => {
                // Graceful shutdown: let in-flight calls finish, up to the deadline.
                let deadline = tokio::time::Instant::now() + limits.shutdown_timeout;
                let finished = loop {
                    if control.in_flight_calls() == 0 || tokio::time::Instant::now() >= deadline {
                        break None;
                    }
                    tokio::select! {
                        r = &mut rpc => break Some(r),
                        () = tokio::time::sleep(DRAIN_POLL) => {}
                    }
                };
                match finished {
                    Some(r) => r,
                    None => {
                        control.abort(capnp::Error::disconnected(
                            "capgate: the server is shutting down".into(),
                        ));
                        match tokio::time::timeout(limits.write_timeout, &mut rpc).await {
                            Ok(r) => r,
                            Err(_) => Ok(()),
                        }
                    }
                }
            }
        };
        let stats = control.stats();
        match &result {
            Ok(()) => tracing::debug!(?stats, "connection closed"),
            Err(e) => tracing::info!(cause = %e, ?stats, "connection closed with an error"),
        }
        control.linger().await;
    }
    .instrument(span)
    .await;
}
