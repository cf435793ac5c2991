//! Server metrics in the Prometheus text format (prometheus-client): connections by class,
//! calls by class and method, denials by class and reason, in-flight calls and bytes, bytes
//! in and out, frame-limit aborts, TLS handshake failures; with a shared quota store, its
//! health, errors, leases, fallbacks and latency (`quota_store/metrics.rs`).

use std::collections::HashMap;
use std::sync::Arc;

use capgate_schema::{Catalog, MethodRef};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Metric, Registry};

use crate::guard::{DenialCounts, DenialReason, GuardObserver};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabel {
    class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    class: String,
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DenialLabels {
    class: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AbortLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct MethodDenialLabels {
    class: String,
    rule: String,
    quota: &'static str,
}

/// Denials by method rule: `capgate_method_denials_total{class, rule, quota}`.
pub(crate) type MethodDenials = Family<MethodDenialLabels, Counter>;

/// One method rule's denial counter.
pub(crate) fn method_denial(
    family: &MethodDenials,
    class: &str,
    rule: &str,
    quota: &'static str,
) -> Counter {
    family.get_or_create_owned(&MethodDenialLabels {
        class: class.to_string(),
        rule: rule.to_string(),
        quota,
    })
}

/// The metric families of one server.
pub struct Metrics {
    registry: Registry,
    connections: Family<ClassLabel, Gauge>,
    calls: Family<CallLabels, Counter>,
    denials: Family<DenialLabels, Counter>,
    pub(crate) method_denials: MethodDenials,
    aborts: Family<AbortLabel, Counter>,
    pub(crate) inflight_calls: Gauge,
    pub(crate) inflight_bytes: Gauge,
    pub(crate) bytes_in: Counter,
    pub(crate) bytes_out: Counter,
    pub(crate) frame_aborts: Counter,
    pub(crate) outgoing_cutoffs: Counter,
    pub(crate) handshake_failures: Counter,
}

/// Registers `metric` in `registry` as `name` with `help`, and returns the handle to keep.
pub(crate) fn registered<M: Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    registry.register(name, help, metric.clone());
    metric
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("capgate");
        let r = &mut registry;
        Metrics {
            connections: registered(
                r,
                "connections",
                "Open connections by client class",
                Family::default(),
            ),
            calls: registered(
                r,
                "calls",
                "Calls delivered to the server, by client class and method",
                Family::default(),
            ),
            denials: registered(
                r,
                "denials",
                "Calls denied by the guard, by client class and reason",
                Family::default(),
            ),
            method_denials: registered(
                r,
                "method_denials",
                "Calls denied by a per-method rule, by client class, rule (as the policy names \
                 it) and quota (calls_per_second, max_inflight_calls)",
                Family::default(),
            ),
            aborts: registered(
                r,
                "aborts",
                "Connections closed, by reason (frame_limit, idle_timeout, not_reading, \
                 peer_aborted, shutdown, ...)",
                Family::default(),
            ),
            inflight_calls: registered(
                r,
                "inflight_calls",
                "Calls delivered and neither returned nor finished",
                Gauge::default(),
            ),
            inflight_bytes: registered(
                r,
                "inflight_bytes",
                "Bytes of incoming messages still held by the server",
                Gauge::default(),
            ),
            bytes_in: registered(
                r,
                "received_bytes",
                "Bytes read from peers",
                Counter::default(),
            ),
            bytes_out: registered(
                r,
                "sent_bytes",
                "Bytes written to peers",
                Counter::default(),
            ),
            frame_aborts: registered(
                r,
                "frame_aborts",
                "Connections closed for a framing violation (limits, deadlines)",
                Counter::default(),
            ),
            outgoing_cutoffs: registered(
                r,
                "outgoing_cutoffs",
                "Connections cut off because a peer did not read (max_outgoing_bytes, \
                 max_client_outgoing_bytes, max_total_outgoing_bytes)",
                Counter::default(),
            ),
            handshake_failures: registered(
                r,
                "tls_handshake_failures",
                "TLS handshakes that failed or timed out",
                Counter::default(),
            ),
            registry,
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The open-connections gauge of a class.
    pub(crate) fn connections(&self, class: &str) -> Gauge {
        self.connections.get_or_create_owned(&ClassLabel {
            class: class.to_string(),
        })
    }

    /// The calls counter of a class and method.
    pub(crate) fn calls(&self, class: &str, method: String) -> Counter {
        self.calls.get_or_create_owned(&CallLabels {
            class: class.to_string(),
            method,
        })
    }

    /// Where other parts register their metrics (the quota store's `capgate_quota_store_*`).
    pub(crate) fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// The counter of connections closed for `reason` (an `AbortReason::label`).
    pub(crate) fn aborts(&self, reason: &'static str) -> Counter {
        self.aborts.get_or_create_owned(&AbortLabel { reason })
    }

    /// The denials counter of a class and reason.
    pub(crate) fn denials(&self, class: &str, reason: &str) -> Counter {
        self.denials.get_or_create_owned(&DenialLabels {
            class: class.to_string(),
            reason: reason.to_string(),
        })
    }
}

/// Denials by reason across all connections of one client class (shared, lock-free; they
/// are also the server's `capgate_denials_total` metric).
#[derive(Debug)]
pub struct DenialCounters {
    by_reason: [Counter; DenialReason::ALL.len()],
    /// By rule: `capgate_method_denials_total`.
    by_rule: MethodDenials,
    class: String,
}

impl DenialCounters {
    /// The counters of `class` in `metrics`.
    pub fn new(metrics: &Metrics, class: &str) -> Self {
        Self {
            by_reason: DenialReason::ALL.map(|r| metrics.denials(class, r.label())),
            by_rule: metrics.method_denials.clone(),
            class: class.to_string(),
        }
    }

    /// Counts a denial for `reason`.
    fn add(&self, reason: DenialReason) {
        self.by_reason[reason as usize].inc();
    }

    /// The denial counter of a method rule and its quota (a look-up in the family: callers
    /// keep it).
    fn rule_counter(&self, rule: &str, quota: &'static str) -> Counter {
        method_denial(&self.by_rule, &self.class, rule, quota)
    }

    /// The counts so far.
    pub fn snapshot(&self) -> DenialCounts {
        let mut counts = DenialCounts::default();
        for r in DenialReason::ALL {
            *counts.of(r) = self.by_reason[r as usize].get();
        }
        counts
    }
}

/// Method rule denial counters by rule and quota.
type RuleDenials = Vec<(Box<str>, &'static str, Counter)>;

/// A connection's guard reporting to the server's metrics: calls by class and method, calls
/// in flight, denials into its class's counters.
pub(crate) struct MetricsObserver {
    metrics: Arc<Metrics>,
    denials: Arc<DenialCounters>,
    calls: HashMap<MethodRef, Counter>,
    /// The method rules' denial counters this connection has used, by rule and quota (a
    /// class has few rules: a scan, no label strings built and no family lock per refusal).
    /// Boxed, and made at the first such refusal: a connection that never gets one carries a
    /// pointer, not an empty vector (8 bytes, not 24, in every connection's observer).
    rule_denials: Option<Box<RuleDenials>>,
}

impl MetricsObserver {
    pub(crate) fn new(metrics: Arc<Metrics>, denials: Arc<DenialCounters>) -> Self {
        Self {
            metrics,
            denials,
            calls: HashMap::new(),
            rule_denials: None,
        }
    }
}

impl GuardObserver for MetricsObserver {
    fn inflight(&mut self, delta: i64) {
        self.metrics.inflight_calls.inc_by(delta);
    }

    fn delivered(&mut self, class: &str, catalog: &Catalog, m: MethodRef) {
        let metrics = &self.metrics;
        self.calls
            .entry(m)
            .or_insert_with(|| metrics.calls(class, catalog.name_of(m)))
            .inc();
    }

    fn denied(&mut self, reason: DenialReason, rule: Option<(&str, &'static str)>) {
        self.denials.add(reason);
        let Some((rule, quota)) = rule else { return };
        let cache = self.rule_denials.get_or_insert_with(Default::default);
        let cached = cache
            .iter()
            .position(|(r, q, _)| **r == *rule && *q == quota);
        let i = cached.unwrap_or_else(|| {
            cache.push((rule.into(), quota, self.denials.rule_counter(rule, quota)));
            cache.len() - 1
        });
        cache[i].2.inc();
    }

    fn class_changed(&mut self) {
        // Both are labelled by class, and a reload brings the class's rules anew.
        self.calls.clear();
        self.rule_denials = None;
    }
}

/// Serves `GET /metrics` (any path, really) on `listener` until the server stops.
pub(crate) async fn serve_http(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            r = listener.accept() => r,
        };
        let Ok((mut s, _)) = accepted else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            // Read the request head (bounded), answer with the exposition, close.
            let mut buf = [0u8; 2048];
            let mut n = 0;
            let read = async {
                while n < buf.len() {
                    match s.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => {
                            n += k;
                            if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                                break;
                            }
                        }
                    }
                }
            };
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), read).await;
            let body = metrics.encode();
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(body.as_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_denials_count_into_the_family_through_the_cached_counter() {
        let metrics = Arc::new(Metrics::default());
        let denials = Arc::new(DenialCounters::new(&metrics, "writer"));
        let mut o = MetricsObserver::new(metrics.clone(), denials.clone());
        let put = Some(("Namespace.put", "calls_per_second"));
        o.denied(DenialReason::MethodRate, put);
        o.denied(DenialReason::MethodRate, put);
        o.denied(
            DenialReason::MethodInflight,
            Some(("Namespace.put", "max_inflight_calls")),
        );
        o.denied(DenialReason::Rate, None);
        assert_eq!(o.rule_denials.as_ref().map(|c| c.len()), Some(2));
        o.class_changed();
        assert!(o.rule_denials.is_none());
        o.denied(DenialReason::MethodRate, put);
        let text = metrics.encode();
        for line in [
            r#"capgate_method_denials_total{class="writer",rule="Namespace.put",quota="calls_per_second"} 3"#,
            r#"capgate_method_denials_total{class="writer",rule="Namespace.put",quota="max_inflight_calls"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
        let counts = denials.snapshot();
        assert_eq!(
            (
                counts.method_rate,
                counts.method_inflight_calls,
                counts.rate
            ),
            (3, 1, 1)
        );
    }
}
