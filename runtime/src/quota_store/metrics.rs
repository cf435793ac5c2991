//! The quota store's metrics (registered with the server's when a shared store is used).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::metrics::registered;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WhatLabel {
    what: &'static str,
}

/// Why a round or an operation failed, as the `kind` label of
/// `capgate_quota_store_errors_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ErrorKind {
    /// Connecting failed, or the connection broke.
    Unreachable,
    /// No answer within `command_timeout`.
    Timeout,
    /// An error reply, or a reply of the wrong shape or out of range.
    Reply,
}

/// Handles on the store's metric families.
#[derive(Clone)]
pub(crate) struct StoreMetrics {
    pub(crate) up: Gauge,
    errors: Family<KindLabel, Counter>,
    pub(crate) leases: Counter,
    pub(crate) leased_calls: Counter,
    pub(crate) fallback_calls: Counter,
    pub(crate) fallback_connections: Counter,
    pub(crate) admission_timeouts: Counter,
    pub(crate) latency: Histogram,
    pub(crate) commands: Counter,
}

impl Default for StoreMetrics {
    /// Metrics registered nowhere (tests).
    fn default() -> Self {
        Self::register(&mut Registry::default())
    }
}

impl StoreMetrics {
    /// New metrics, registered in `registry` (prefix `capgate_quota_store_`).
    pub(crate) fn register(registry: &mut Registry) -> Self {
        let r = registry.sub_registry_with_prefix("quota_store");
        let up = registered(
            r,
            "up",
            "1 while the shared quota store answers, 0 while the fallback decides",
            Gauge::default(),
        );
        let errors = registered(
            r,
            "errors",
            "Failed round trips to the quota store (unreachable, timeout) and bad replies",
            Family::default(),
        );
        let leases = registered(
            r,
            "leases",
            "Leases taken from the quota store (grants of at least one call)",
            Counter::default(),
        );
        let leased_calls = registered(
            r,
            "leased_calls",
            "Calls granted by the quota store in leases",
            Counter::default(),
        );
        let fallbacks = registered(
            r,
            "fallbacks",
            "Calls and connections decided by the local fallback (store down or slow)",
            Family::<WhatLabel, Counter>::default(),
        );
        Self {
            up,
            errors,
            leases,
            leased_calls,
            fallback_calls: fallbacks.get_or_create_owned(&WhatLabel { what: "call" }),
            fallback_connections: fallbacks.get_or_create_owned(&WhatLabel { what: "connection" }),
            admission_timeouts: registered(
                r,
                "admission_timeouts",
                "Connections whose admission did not hear from the store within admission_timeout",
                Counter::default(),
            ),
            // 100 µs .. ~3 s.
            latency: registered(
                r,
                "latency_seconds",
                "Round trips to the quota store",
                Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            ),
            commands: registered(
                r,
                "commands",
                "Commands sent to the quota store",
                Counter::default(),
            ),
        }
    }

    /// Counts an error of `kind`.
    pub(crate) fn error(&self, kind: ErrorKind) {
        let kind = match kind {
            ErrorKind::Unreachable => "unreachable",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Reply => "reply",
        };
        self.errors.get_or_create(&KindLabel { kind }).inc();
    }

    /// Errors of `kind` so far.
    #[cfg(test)]
    pub(crate) fn errors(&self, kind: &'static str) -> u64 {
        self.errors.get_or_create(&KindLabel { kind }).get()
    }
}
