//! Per-method quotas on one connection: calls in flight per method rule, and the client's
//! rate budget per rule (shared by its connections, made by the client registry).

use std::sync::Arc;

use capgate_policy::ClientClass;
use capgate_schema::MethodRef;

use crate::rate::RateLimit;
use crate::CallRate;

/// Which quota of a method rule refused a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Over {
    Rate,
    Inflight,
}

impl Over {
    /// The quota's name, as the policy file spells it (also the metric's `quota` label).
    pub(super) fn quota(self) -> &'static str {
        match self {
            Over::Rate => "calls_per_second",
            Over::Inflight => "max_inflight_calls",
        }
    }
}

/// The state of a class's method rules on one connection, by rule index.
#[derive(Default)]
pub(super) struct MethodLimits {
    inflight: Vec<u32>,
    rates: Vec<Option<Arc<dyn RateLimit>>>,
}

impl MethodLimits {
    /// For `class`, with rate budgets of this connection alone (a guard built without the
    /// client registry: tests, fuzzing, the client side).
    pub(super) fn local(class: &ClientClass) -> Self {
        let rates = class
            .method_quotas()
            .iter()
            .map(|r| {
                r.rate.map(|rate| {
                    Arc::new(CallRate::new(rate.calls_per_second, rate.burst)) as Arc<dyn RateLimit>
                })
            })
            .collect();
        Self {
            inflight: vec![0; class.method_quotas().len()],
            rates,
        }
    }

    /// Uses the client's shared budgets (one per rule of the class, `None` for rules without
    /// a rate). A list of the wrong length (a class changed under the caller) is ignored.
    pub(super) fn set_rates(&mut self, rates: Vec<Option<Arc<dyn RateLimit>>>) {
        if rates.len() == self.rates.len() {
            self.rates = rates;
        }
    }

    /// Counts the calls in flight again under `class`'s rules (after a reload).
    pub(super) fn recount(
        &mut self,
        class: &ClientClass,
        running: impl Iterator<Item = MethodRef>,
    ) {
        self.inflight = vec![0; class.method_quotas().len()];
        for m in running {
            self.started(class, m);
        }
    }

    /// Whether a call of `m` may start under every rule covering it: in-flight limits first
    /// (they take nothing), then rates. A refused call takes no rate token of a later rule.
    pub(super) fn check(&self, class: &ClientClass, m: MethodRef) -> Result<(), (usize, Over)> {
        let rules = class.method_quotas_of(m);
        if rules.is_empty() {
            return Ok(());
        }
        let quotas = class.method_quotas();
        for &i in rules {
            let i = usize::from(i);
            if let Some(max) = quotas[i].max_inflight_calls {
                if self.inflight.get(i).copied().unwrap_or(0) >= max {
                    return Err((i, Over::Inflight));
                }
            }
        }
        for &i in rules {
            let i = usize::from(i);
            if let Some(Some(rate)) = self.rates.get(i) {
                if !rate.try_call() {
                    return Err((i, Over::Rate));
                }
            }
        }
        Ok(())
    }

    /// In flight on this connection under rule `i`.
    pub(super) fn inflight(&self, i: usize) -> u32 {
        self.inflight.get(i).copied().unwrap_or(0)
    }

    pub(super) fn started(&mut self, class: &ClientClass, m: MethodRef) {
        for &i in class.method_quotas_of(m) {
            if let Some(n) = self.inflight.get_mut(usize::from(i)) {
                *n += 1;
            }
        }
    }

    pub(super) fn ended(&mut self, class: &ClientClass, m: MethodRef) {
        for &i in class.method_quotas_of(m) {
            if let Some(n) = self.inflight.get_mut(usize::from(i)) {
                *n = n.saturating_sub(1);
            }
        }
    }
}
