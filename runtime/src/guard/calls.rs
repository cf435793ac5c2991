//! The call path: a Call is checked against the allowlist, the class's quotas and its
//! method rules, and delivered, or denied with a Return (and Releases) the guard builds.

use std::rc::Rc;

use capgate_schema::MethodRef;
use capnp_rpc::rpc_capnp::{call, cap_descriptor, exception, message_target};

use super::methods::Over;
use super::{denied, reply, Answer, Denial, DenialReason, Guard, Verdict};

impl Guard {
    /// `relayed`: a call the guard would deliver whose params carry a form a relay cannot
    /// account for closes the connection instead (see `foreign.rs`).
    pub(super) fn call(&mut self, c: call::Reader<'_>, relayed: bool) -> Verdict {
        let q = c.get_question_id();
        if let Some(v) = self.reuse(q).or_else(|| self.answers_overflow()) {
            return v;
        }
        let table = c.get_params().and_then(|p| p.get_cap_table()).ok();
        if let Some(v) = self.too_many_caps("Call", table) {
            return v;
        }
        self.calls += 1;
        let m = MethodRef {
            interface_id: c.get_interface_id(),
            method_id: c.get_method_id(),
        };
        let name = || self.catalog.name_of(m);
        let class = self.class.name();
        // Rule 3: pipelined on a denied answer.
        if let Ok(Ok(message_target::PromisedAnswer(Ok(pa)))) = c.get_target().map(|t| t.which()) {
            if let Some(Answer::Denied(d)) = self.answers.get(pa.get_question_id()) {
                let d = d.clone();
                denied(
                    &mut self.denials,
                    &mut self.observer,
                    DenialReason::Permission,
                    None,
                );
                return self.deny(q, Some(c), d);
            }
        }
        // Rule 5.
        if !matches!(
            c.get_send_results_to().which(),
            Ok(call::send_results_to::Caller(()))
        ) {
            denied(
                &mut self.denials,
                &mut self.observer,
                DenialReason::SendResultsTo,
                None,
            );
            let d = Denial {
                kind: exception::Type::Failed,
                reason: format!(
                    "capgate: {}: sendResultsTo other than caller is not supported",
                    name()
                ),
            };
            return self.deny(q, Some(c), Rc::new(d));
        }
        if !self.class.allows(m) {
            denied(
                &mut self.denials,
                &mut self.observer,
                DenialReason::Permission,
                None,
            );
            let d = Denial {
                kind: exception::Type::Failed,
                reason: format!(
                    "permission denied: {} is not allowed for client \"{class}\"",
                    name()
                ),
            };
            return self.deny(q, Some(c), Rc::new(d));
        }
        let quotas = self.class.quotas();
        let over = if self.answers.len() >= quotas.max_open_answers as usize {
            denied(
                &mut self.denials,
                &mut self.observer,
                DenialReason::OpenAnswers,
                None,
            );
            Some(format!(
                "max_open_answers = {} reached ({} answers open: calls not yet finished, cancelled calls included)",
                quotas.max_open_answers,
                self.answers.len()
            ))
        } else if self.held_bytes + self.message_bytes > quotas.max_inflight_bytes {
            denied(
                &mut self.denials,
                &mut self.observer,
                DenialReason::InflightBytes,
                None,
            );
            Some(format!(
                "max_inflight_bytes = {} reached ({} bytes of calls held, this one {})",
                quotas.max_inflight_bytes, self.held_bytes, self.message_bytes
            ))
        } else if self.running >= quotas.max_inflight_calls {
            denied(
                &mut self.denials,
                &mut self.observer,
                DenialReason::InflightCalls,
                None,
            );
            Some(format!(
                "max_inflight_calls = {} reached ({} calls in flight on this connection)",
                quotas.max_inflight_calls, self.running
            ))
        } else if let Err((i, over)) = self.methods.check(&self.class, m) {
            return self.deny_by_method_rule(q, c, m, i, over);
        } else if !self.rate.try_call() {
            denied(
                &mut self.denials,
                &mut self.observer,
                DenialReason::Rate,
                None,
            );
            Some(format!(
                "calls_per_second = {} with burst = {} exceeded; retry later",
                quotas.calls_per_second, quotas.burst
            ))
        } else {
            None
        };
        if let Some(what) = over {
            let d = Denial {
                kind: exception::Type::Overloaded,
                reason: format!(
                    "overloaded: {} refused: {what} for client \"{class}\"",
                    name()
                ),
            };
            // An Overloaded answer is not inherited by pipelined calls as a permission denial
            // would be, but they cannot run either: the same denial applies.
            return self.deny(q, Some(c), Rc::new(d));
        }
        if let Some(what) = relayed.then(|| super::foreign::table_form(table)).flatten() {
            return Verdict::Abort(crate::AbortReason::Unsupported { what });
        }
        self.answers.insert(q, Answer::Running(Some(m)));
        self.started(Some(m));
        if let Some(o) = &mut self.observer {
            o.delivered(self.class.name(), &self.catalog, m);
        }
        Verdict::Deliver
    }

    /// Over a quota of method rule `i`: `Overloaded`, naming the rule when its pattern is not
    /// the method's own name.
    fn deny_by_method_rule(
        &mut self,
        q: u32,
        c: call::Reader<'_>,
        m: MethodRef,
        i: usize,
        over: Over,
    ) -> Verdict {
        let rule = &self.class.method_quotas()[i];
        let name = self.catalog.name_of(m);
        let what = match (over, rule.rate) {
            (Over::Rate, Some(r)) => format!(
                "calls_per_second = {} with burst = {} exceeded",
                r.calls_per_second, r.burst
            ),
            _ => format!(
                "max_inflight_calls = {} reached ({} calls in flight on this connection)",
                rule.max_inflight_calls.unwrap_or(0),
                self.methods.inflight(i)
            ),
        };
        let of_rule = if rule.pattern == name {
            String::new()
        } else {
            format!(" (method rule \"{}\")", rule.pattern)
        };
        let reason = match over {
            Over::Rate => DenialReason::MethodRate,
            Over::Inflight => DenialReason::MethodInflight,
        };
        denied(
            &mut self.denials,
            &mut self.observer,
            reason,
            Some((&rule.pattern, over.quota())),
        );
        let d = Denial {
            kind: exception::Type::Overloaded,
            reason: format!(
                "overloaded: {name} refused: {what}{of_rule} for client \"{}\"",
                self.class.name()
            ),
        };
        self.deny(q, Some(c), Rc::new(d))
    }

    /// Rule 1: the Return with the exception, then a Release per capability in the params
    /// (one per distinct id, with the count of its references).
    pub(super) fn deny(&mut self, q: u32, c: Option<call::Reader<'_>>, d: Rc<Denial>) -> Verdict {
        let _span = tracing::debug_span!("denied", question = q, reason = %d.reason).entered();
        tracing::debug!("call denied");
        let mut out = Vec::new();
        reply::push_return_exception(&mut out, q, d.kind, &d.reason);
        if let Some(Ok(Ok(caps))) = c.map(|c| c.get_params().map(|p| p.get_cap_table())) {
            let mut ids: Vec<u32> = caps
                .iter()
                .filter_map(|cap| match cap.which() {
                    Ok(cap_descriptor::SenderHosted(id) | cap_descriptor::SenderPromise(id)) => {
                        Some(id)
                    }
                    _ => None,
                })
                .collect();
            reply::push_releases(&mut out, &mut ids);
        }
        self.answers.insert(q, Answer::Denied(d));
        Verdict::Reply(out.into_boxed_slice())
    }
}
