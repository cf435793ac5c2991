//! The owner's handle on a connection.

use std::cell::RefCell;
use std::rc::Rc;

use tokio::io::AsyncRead;

use super::reader::ReadState;
use super::shared::{ConnShared, ConnectionStats};
use crate::core::Linger;
use crate::guard::Guard;
use crate::AbortReason;

/// The owner's handle on a connection: abort it, read its counters, linger after close.
pub struct ConnectionControl {
    pub(super) shared: Rc<ConnShared>,
    pub(super) linger: Box<dyn LingerRead>,
}

pub(super) trait LingerRead {
    fn take(&self) -> Option<Box<dyn LingerState>>;
}

pub(super) trait LingerState {
    fn linger<'a>(&'a mut self, linger: Linger) -> futures::future::LocalBoxFuture<'a, ()>;
}

impl<R: AsyncRead + Unpin + 'static> LingerRead for Rc<RefCell<Option<Box<ReadState<R>>>>> {
    fn take(&self) -> Option<Box<dyn LingerState>> {
        self.borrow_mut().take().map(|s| s as Box<dyn LingerState>)
    }
}

impl<R: AsyncRead + Unpin + 'static> LingerState for ReadState<R> {
    fn linger<'a>(&'a mut self, linger: Linger) -> futures::future::LocalBoxFuture<'a, ()> {
        Box::pin(ReadState::linger(self, linger))
    }
}

impl ConnectionControl {
    /// Closes the connection: the peer gets an `Abort` with `reason`.
    pub fn abort(&self, reason: AbortReason) {
        self.shared.abort(reason);
    }

    /// Incoming calls delivered and neither returned nor finished.
    pub fn in_flight_calls(&self) -> usize {
        self.shared.core.borrow().guard().in_flight_calls()
    }

    /// The connection's guard (class, accounting, denial counters).
    pub fn guard(&self) -> std::cell::Ref<'_, Guard> {
        std::cell::Ref::map(self.shared.core.borrow(), |c| c.guard())
    }

    /// Holds the connection to another class and rate budget from now on (policy reload).
    pub fn set_class(
        &self,
        class: std::sync::Arc<capgate_policy::ClientClass>,
        rate: std::sync::Arc<dyn crate::RateLimit>,
        method_rates: Vec<Option<std::sync::Arc<dyn crate::RateLimit>>>,
    ) {
        let mut core = self.shared.core.borrow_mut();
        let guard = core.guard_mut();
        guard.set_class(class, rate);
        guard.set_method_rates(method_rates);
    }

    /// Traffic counters so far.
    pub fn stats(&self) -> ConnectionStats {
        *self.shared.stats.borrow()
    }

    /// Reports this connection's traffic, calls and in-flight work to `metrics`, and its
    /// denials to its class's `denials`, from now on (again after a reload re-matched it).
    pub fn observe(
        &self,
        metrics: std::sync::Arc<crate::Metrics>,
        denials: std::sync::Arc<crate::DenialCounters>,
    ) {
        let observer = crate::metrics::MetricsObserver::new(metrics.clone(), denials);
        self.shared
            .core
            .borrow_mut()
            .guard_mut()
            .set_observer(Box::new(observer));
        *self.shared.metrics.borrow_mut() = Some(metrics);
    }

    /// The reason the peer gave when it aborted the connection, if it did.
    pub fn peer_abort(&self) -> Option<capnp::Error> {
        self.shared
            .peer_abort
            .borrow()
            .as_ref()
            .map(|r| r.to_error())
    }

    /// Charges what this connection queues to a client's and the server's outgoing
    /// budgets too (see `outgoing.rs`).
    pub(crate) fn share_outgoing(&self, account: std::sync::Arc<crate::outgoing::OutgoingAccount>) {
        self.shared.outbox.share(account);
    }

    /// Bytes queued for the peer and not yet written (as charged: what they hold in memory).
    pub fn queued_bytes(&self) -> usize {
        self.shared.outbox.queued_bytes()
    }

    /// After the RPC system has finished: keep reading and discarding for a short, bounded
    /// time so the peer receives our `Abort` before the socket closes (see
    /// [`crate::Limits::linger_timeout`]).
    pub async fn linger(&self) {
        if let Some(mut state) = self.linger.take() {
            let now = tokio::time::Instant::now().into_std();
            let linger = self.shared.core.borrow().linger(now);
            state.linger(linger).await;
        }
    }
}
