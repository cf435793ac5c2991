//! What the guard tells the world, without knowing who listens: denials counted by reason,
//! and an observer the shell implements (the server's turns it into Prometheus metrics).

use capgate_schema::{Catalog, MethodRef};

/// Why a call was denied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DenialReason {
    Permission,
    Rate,
    InflightCalls,
    InflightBytes,
    OpenAnswers,
    SendResultsTo,
    MethodRate,
    MethodInflight,
}

impl DenialReason {
    /// The `reason` label of `capgate_denials_total`.
    pub(crate) fn label(self) -> &'static str {
        match self {
            DenialReason::Permission => "permission",
            DenialReason::Rate => "rate",
            DenialReason::InflightCalls => "inflight_calls",
            DenialReason::InflightBytes => "inflight_bytes",
            DenialReason::OpenAnswers => "open_answers",
            DenialReason::SendResultsTo => "send_results_to",
            DenialReason::MethodRate => "method_rate",
            DenialReason::MethodInflight => "method_inflight_calls",
        }
    }

    /// Every reason, for registering counters.
    pub(crate) const ALL: [DenialReason; 8] = [
        DenialReason::Permission,
        DenialReason::Rate,
        DenialReason::InflightCalls,
        DenialReason::InflightBytes,
        DenialReason::OpenAnswers,
        DenialReason::SendResultsTo,
        DenialReason::MethodRate,
        DenialReason::MethodInflight,
    ];
}

/// Counters of denials by reason, for this connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DenialCounts {
    /// Method not in the allowlist (pipelined calls on denied answers included).
    pub permission: u64,
    /// Over `calls_per_second`/`burst`.
    pub rate: u64,
    /// Over `max_inflight_calls`.
    pub inflight_calls: u64,
    /// Over `max_open_answers`.
    pub open_answers: u64,
    /// Over `max_inflight_bytes`.
    pub inflight_bytes: u64,
    /// `sendResultsTo` other than `caller`.
    pub send_results_to: u64,
    /// Over a method rule's `calls_per_second`/`burst`.
    pub method_rate: u64,
    /// Over a method rule's `max_inflight_calls`.
    pub method_inflight_calls: u64,
}

impl DenialCounts {
    /// The counter of `reason`.
    pub(crate) fn of(&mut self, reason: DenialReason) -> &mut u64 {
        match reason {
            DenialReason::Permission => &mut self.permission,
            DenialReason::Rate => &mut self.rate,
            DenialReason::InflightCalls => &mut self.inflight_calls,
            DenialReason::InflightBytes => &mut self.inflight_bytes,
            DenialReason::OpenAnswers => &mut self.open_answers,
            DenialReason::SendResultsTo => &mut self.send_results_to,
            DenialReason::MethodRate => &mut self.method_rate,
            DenialReason::MethodInflight => &mut self.method_inflight_calls,
        }
    }
}

/// Receives what a guard does, as it does it. Called on the connection's thread, inside the
/// guard's step: keep it cheap (counters, no I/O).
pub(crate) trait GuardObserver {
    /// Calls (and bootstraps) in flight changed by `delta`.
    fn inflight(&mut self, delta: i64);
    /// A call of `m` was delivered for a client of `class` (`catalog` names it).
    fn delivered(&mut self, class: &str, catalog: &Catalog, m: MethodRef);
    /// A call was denied; `rule` is the method rule and its quota for per-method refusals.
    fn denied(&mut self, reason: DenialReason, rule: Option<(&str, &'static str)>);
    /// The connection now belongs to another class (a policy reload).
    fn class_changed(&mut self);
}
