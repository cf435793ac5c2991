//! The guard: a sans-IO state machine per connection between the frame reader and capnp-rpc.
//!
//! Every incoming message passes through [`Guard::incoming`], which delivers it, answers it
//! itself (a denial: the `Return` plus the `Release`s the caller needs) or aborts the
//! connection; every outgoing message passes through [`Guard::outgoing`] for accounting.
//! The rules (`DESIGN.md` section 3) keep capnp-rpc's tables consistent:
//!
//! 1. A denied call `Q` gets `Return{Q, exception, releaseParamCaps: false}` and one
//!    `Release{id, 1}` per `senderHosted`/`senderPromise` descriptor of its params (capnp-rust
//!    callers ignore `releaseParamCaps`); `Q` is remembered as denied.
//! 2. `Finish(Q)` for a denied `Q` is consumed, never delivered.
//! 3. Calls pipelined on a denied answer are denied with the same reason (transitively).
//! 4. A `Call`/`Bootstrap` reusing an open question id aborts the connection.
//! 5. `sendResultsTo` other than `caller` is denied.
//! 6. Bootstrap answers are answers like any other (the capnp-rust client sends everything to
//!    `promisedAnswer(0)`).
//! 7. Nothing is held back or reordered: quotas deny at once with `Overloaded`.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use capgate_policy::ClientClass;
use capgate_schema::{Catalog, MethodRef};
use capnp_rpc::rpc_capnp::{call, cap_descriptor, exception, message, message_target};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use crate::{AbortReason, Metrics};

mod methods;
mod reply;
mod table;
use methods::{MethodLimits, Over};
use table::IdTable;

/// Decides whether a call may go ahead under the client's shared rate limit.
pub trait RateLimit: Send + Sync {
    /// Takes one call from the budget; false when the client is over its rate.
    fn try_call(&self) -> bool;
}

/// No rate limit.
#[derive(Debug, Default, Clone, Copy)]
pub struct Unlimited;

impl RateLimit for Unlimited {
    fn try_call(&self) -> bool {
        true
    }
}

/// What to do with one incoming message.
pub enum Verdict {
    /// Hand it to capnp-rpc.
    Deliver,
    /// Do not deliver it; send these frames back instead: encoded back to back in a buffer
    /// of exactly their size (empty when the message is only consumed).
    Reply(Box<[u8]>),
    /// Close the connection; the reason goes to the peer in an `Abort`.
    Abort(AbortReason),
}

impl std::fmt::Debug for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Deliver => write!(f, "Deliver"),
            Verdict::Reply(r) => write!(f, "Reply({} bytes)", r.len()),
            Verdict::Abort(reason) => write!(f, "Abort({reason:?})"),
        }
    }
}

/// The state of one question id the peer has opened (an answer on our side).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Answer {
    /// Delivered; no Return sent and no Finish received: in flight. The method, for calls
    /// (per-method in-flight counts); `None` for bootstraps.
    Running(Option<MethodRef>),
    /// Returned; capnp-rpc keeps the results until Finish.
    Returned,
    /// Finished before it returned: capnp-rpc keeps the entry for the connection's life.
    Cancelled,
    /// Denied by the guard; waiting for the peer's Finish.
    Denied(Rc<Denial>),
}

#[derive(Debug, PartialEq, Eq)]
struct Denial {
    kind: exception::Type,
    reason: String,
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

/// Denials by reason across all connections of one client class (shared, lock-free; they
/// are also the server's `capgate_denials_total` metric).
#[derive(Debug, Default)]
pub struct DenialCounters {
    permission: Counter,
    rate: Counter,
    inflight_calls: Counter,
    inflight_bytes: Counter,
    open_answers: Counter,
    send_results_to: Counter,
    method_rate: Counter,
    method_inflight_calls: Counter,
    /// By rule: `capgate_method_denials_total`.
    by_rule: crate::metrics::MethodDenials,
    class: String,
}

impl DenialCounters {
    /// The counters of `class` in `metrics`.
    pub fn new(metrics: &Metrics, class: &str) -> Self {
        Self {
            permission: metrics.denials(class, "permission"),
            rate: metrics.denials(class, "rate"),
            inflight_calls: metrics.denials(class, "inflight_calls"),
            inflight_bytes: metrics.denials(class, "inflight_bytes"),
            open_answers: metrics.denials(class, "open_answers"),
            send_results_to: metrics.denials(class, "send_results_to"),
            method_rate: metrics.denials(class, "method_rate"),
            method_inflight_calls: metrics.denials(class, "method_inflight_calls"),
            by_rule: metrics.method_denials.clone(),
            class: class.to_string(),
        }
    }

    /// The counts so far.
    pub fn snapshot(&self) -> DenialCounts {
        DenialCounts {
            permission: self.permission.get(),
            rate: self.rate.get(),
            inflight_calls: self.inflight_calls.get(),
            inflight_bytes: self.inflight_bytes.get(),
            open_answers: self.open_answers.get(),
            send_results_to: self.send_results_to.get(),
            method_rate: self.method_rate.get(),
            method_inflight_calls: self.method_inflight_calls.get(),
        }
    }

    /// Counts a denial by method rule `rule` under `quota`.
    fn method_rule(&self, rule: &str, quota: &'static str) {
        crate::metrics::method_denial(&self.by_rule, &self.class, rule, quota).inc();
    }
}

/// What a connection's guard reports to the server's metrics.
struct Observer {
    metrics: Arc<Metrics>,
    calls: HashMap<MethodRef, Counter>,
    inflight: Gauge,
}

/// Per-connection, sans-IO message guard.
pub struct Guard {
    class: Arc<ClientClass>,
    catalog: Catalog,
    rate: Arc<dyn RateLimit>,
    /// The class's method rules on this connection.
    methods: MethodLimits,
    answers: IdTable<Answer>,
    running: u32,
    calls: u64,
    denials: DenialCounts,
    /// Bytes of incoming messages capnp-rpc still holds, and the size of the message being
    /// inspected (set by the connection before each `incoming`).
    held_bytes: usize,
    message_bytes: usize,
    /// Mirror of our export table as the peer sees it: export id -> references it holds.
    exports: HashMap<u32, u32>,
    /// Export ids carried by each Return we sent, released by the peer's Finish.
    returned_caps: HashMap<u32, Vec<u32>>,
    /// The class-wide counters this connection's denials are added to.
    shared_denials: Option<Arc<DenialCounters>>,
    observer: Option<Observer>,
    /// Our own questions (calls and bootstraps we sent) not yet answered by a Return. Only
    /// a hint for answer polling: a peer that never returns merely keeps it high.
    awaiting: u32,
}

impl Guard {
    /// A guard enforcing `class` (its allowlist and per-connection quotas), with `rate` as
    /// the client's shared call budget.
    pub fn new(class: Arc<ClientClass>, rate: Arc<dyn RateLimit>) -> Self {
        Self::with_catalog(class, rate, Catalog::builtin().clone())
    }

    /// The same, naming methods (in denials and metrics) by `catalog`.
    pub fn with_catalog(
        class: Arc<ClientClass>,
        rate: Arc<dyn RateLimit>,
        catalog: Catalog,
    ) -> Self {
        Self {
            methods: MethodLimits::local(&class),
            class,
            catalog,
            rate,
            answers: IdTable::default(),
            running: 0,
            calls: 0,
            denials: DenialCounts::default(),
            held_bytes: 0,
            message_bytes: 0,
            exports: HashMap::new(),
            returned_caps: HashMap::new(),
            shared_denials: None,
            observer: None,
            awaiting: 0,
        }
    }

    /// Reports calls (by class and method) and in-flight calls to `metrics` from now on.
    pub fn observe(&mut self, metrics: Arc<Metrics>) {
        let inflight = metrics.inflight_calls.clone();
        inflight.inc_by(i64::from(self.running));
        if let Some(old) = self.observer.take() {
            old.inflight.dec_by(i64::from(self.running));
        }
        self.observer = Some(Observer {
            metrics,
            calls: HashMap::new(),
            inflight,
        });
    }

    fn started(&mut self, m: Option<MethodRef>) {
        if let Some(m) = m {
            self.methods.started(&self.class, m);
        }
        self.running += 1;
        if let Some(o) = &self.observer {
            o.inflight.inc();
        }
    }

    fn ended(&mut self, m: Option<MethodRef>) {
        if let Some(m) = m {
            self.methods.ended(&self.class, m);
        }
        self.running -= 1;
        if let Some(o) = &self.observer {
            o.inflight.dec();
        }
    }

    /// Also counts denials into `counters` (the class-wide registry).
    pub fn count_denials_into(&mut self, counters: Arc<DenialCounters>) {
        self.shared_denials = Some(counters);
    }

    /// Tells the guard how many bytes of incoming messages are held now and how large the
    /// next message is (for `max_inflight_bytes`).
    pub fn set_held_bytes(&mut self, held: usize, next_message: usize) {
        self.held_bytes = held;
        self.message_bytes = next_message;
    }

    /// A guard that allows every call, without rate limit (the client side of a connection,
    /// and servers without a policy use an equivalent class built from their limits).
    pub fn allow_all() -> Self {
        Self::new(
            Arc::new(ClientClass::new("default", capgate_policy::Matcher::Any).allow_all()),
            Arc::new(Unlimited),
        )
    }

    /// Uses the client's shared budgets for the class's method rules: one per rule (in the
    /// order of [`ClientClass::method_quotas`]), `None` for rules without a rate. Until then
    /// (and for a list of the wrong length) each rule's rate is this connection's alone.
    pub fn set_method_rates(&mut self, rates: Vec<Option<Arc<dyn RateLimit>>>) {
        self.methods.set_rates(rates);
    }

    /// Replaces the class and rate budget (after a policy reload); open answers are kept, and
    /// calls in flight count toward the new class's method rules. Method rates are this
    /// connection's until [`Guard::set_method_rates`].
    pub fn set_class(&mut self, class: Arc<ClientClass>, rate: Arc<dyn RateLimit>) {
        self.methods = MethodLimits::local(&class);
        let running = self.answers.values().filter_map(|a| match a {
            Answer::Running(m) => *m,
            _ => None,
        });
        self.methods.recount(&class, running);
        self.class = class;
        self.rate = rate;
        if let Some(o) = &mut self.observer {
            // Call counters are labelled by class.
            o.calls.clear();
        }
    }

    /// The class this connection is held to.
    pub fn class(&self) -> &Arc<ClientClass> {
        &self.class
    }

    /// Inspects an incoming message.
    pub fn incoming(&mut self, msg: message::Reader<'_>) -> Verdict {
        match msg.which() {
            Ok(message::Call(Ok(c))) => self.call(c),
            Ok(message::Bootstrap(Ok(b))) => {
                let q = b.get_question_id();
                if let Some(v) = self.reuse(q).or_else(|| self.answers_overflow()) {
                    return v;
                }
                // A bootstrap opens an answer like a call (rule 6), so it counts the same.
                let quotas = self.class.quotas();
                if self.answers.len() >= quotas.max_open_answers as usize {
                    count(&mut self.denials, &self.shared_denials, Reason::OpenAnswers);
                    let d = Denial {
                        kind: exception::Type::Overloaded,
                        reason: format!(
                            "overloaded: Bootstrap refused: max_open_answers = {} reached ({} \
                             answers open: calls and bootstraps not yet finished) for client \"{}\"",
                            quotas.max_open_answers,
                            self.answers.len(),
                            self.class.name()
                        ),
                    };
                    return self.deny(q, None, Rc::new(d));
                }
                self.answers.insert(q, Answer::Running(None));
                self.started(None);
                Verdict::Deliver
            }
            Ok(message::Release(Ok(r))) => {
                self.release_export(r.get_id(), r.get_reference_count());
                Verdict::Deliver
            }
            Ok(message::Finish(Ok(f))) => {
                let q = f.get_question_id();
                if let Some(ids) = self.returned_caps.remove(&q) {
                    if f.get_release_result_caps() {
                        for id in ids {
                            self.release_export(id, 1);
                        }
                    }
                }
                match self.answers.get(q) {
                    Some(Answer::Denied(_)) => {
                        self.answers.remove(q);
                        Verdict::Reply(Box::default())
                    }
                    Some(&Answer::Running(m)) => {
                        self.ended(m);
                        self.answers.insert(q, Answer::Cancelled);
                        Verdict::Deliver
                    }
                    Some(Answer::Returned) => {
                        self.answers.remove(q);
                        Verdict::Deliver
                    }
                    Some(Answer::Cancelled) | None => Verdict::Deliver,
                }
            }
            Ok(message::Return(Ok(ret))) => {
                self.awaiting = self.awaiting.saturating_sub(1);
                if let Ok(capnp_rpc::rpc_capnp::return_::Results(Ok(p))) = ret.which() {
                    if let Some(v) = self.too_many_caps("Return", p.get_cap_table()) {
                        return v;
                    }
                }
                Verdict::Deliver
            }
            // Everything else (and what does not parse) is capnp-rpc's to judge.
            _ => Verdict::Deliver,
        }
    }

    fn reuse(&self, q: u32) -> Option<Verdict> {
        self.answers.get(q).map(|a| {
            Verdict::Abort(AbortReason::QuestionReused {
                id: q,
                state: match a {
                    Answer::Running(_) => "call in flight",
                    Answer::Returned => "returned, not finished",
                    Answer::Cancelled => "cancelled",
                    Answer::Denied(_) => "denied, not finished",
                },
            })
        })
    }

    /// Denials are answers too; a peer that never finishes them would grow the table.
    fn answers_overflow(&self) -> Option<Verdict> {
        let hard_cap = (self.class.quotas().max_open_answers as usize)
            .saturating_mul(2)
            .saturating_add(16);
        (self.answers.len() >= hard_cap).then(|| {
            Verdict::Abort(AbortReason::OpenAnswers {
                limit: self.class.quotas().max_open_answers,
                open: self.answers.len(),
                class: self.class.name().to_string(),
            })
        })
    }

    /// A cap table longer than `max_caps_per_message` aborts: denying would fan one frame out
    /// into a Release per capability, delivering would fill capnp-rpc's import table.
    fn too_many_caps(
        &self,
        what: &'static str,
        table: capnp::Result<capnp::struct_list::Reader<'_, cap_descriptor::Owned>>,
    ) -> Option<Verdict> {
        let n = table.map_or(0, |t| t.len());
        let max = self.class.quotas().max_caps_per_message;
        (n > max).then(|| {
            Verdict::Abort(AbortReason::TooManyCaps {
                what,
                count: n,
                limit: max,
                class: self.class.name().to_string(),
            })
        })
    }

    fn call(&mut self, c: call::Reader<'_>) -> Verdict {
        let q = c.get_question_id();
        if let Some(v) = self.reuse(q).or_else(|| self.answers_overflow()) {
            return v;
        }
        if let Ok(p) = c.get_params() {
            if let Some(v) = self.too_many_caps("Call", p.get_cap_table()) {
                return v;
            }
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
                count(&mut self.denials, &self.shared_denials, Reason::Permission);
                return self.deny(q, Some(c), d);
            }
        }
        // Rule 5.
        if !matches!(
            c.get_send_results_to().which(),
            Ok(call::send_results_to::Caller(()))
        ) {
            count(
                &mut self.denials,
                &self.shared_denials,
                Reason::SendResultsTo,
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
            count(&mut self.denials, &self.shared_denials, Reason::Permission);
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
            count(&mut self.denials, &self.shared_denials, Reason::OpenAnswers);
            Some(format!(
                "max_open_answers = {} reached ({} answers open: calls not yet finished, cancelled calls included)",
                quotas.max_open_answers,
                self.answers.len()
            ))
        } else if self.held_bytes + self.message_bytes > quotas.max_inflight_bytes {
            count(
                &mut self.denials,
                &self.shared_denials,
                Reason::InflightBytes,
            );
            Some(format!(
                "max_inflight_bytes = {} reached ({} bytes of calls held, this one {})",
                quotas.max_inflight_bytes, self.held_bytes, self.message_bytes
            ))
        } else if self.running >= quotas.max_inflight_calls {
            count(
                &mut self.denials,
                &self.shared_denials,
                Reason::InflightCalls,
            );
            Some(format!(
                "max_inflight_calls = {} reached ({} calls in flight on this connection)",
                quotas.max_inflight_calls, self.running
            ))
        } else if let Err((i, over)) = self.methods.check(&self.class, m) {
            return self.deny_by_method_rule(q, c, m, i, over);
        } else if !self.rate.try_call() {
            count(&mut self.denials, &self.shared_denials, Reason::Rate);
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
        self.answers.insert(q, Answer::Running(Some(m)));
        self.started(Some(m));
        if let Some(o) = &mut self.observer {
            let (metrics, class, catalog) = (&o.metrics, self.class.name(), &self.catalog);
            o.calls
                .entry(m)
                .or_insert_with(|| metrics.calls(class, catalog.name_of(m)))
                .inc();
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
            Over::Rate => Reason::MethodRate,
            Over::Inflight => Reason::MethodInflight,
        };
        count(&mut self.denials, &self.shared_denials, reason);
        if let Some(s) = &self.shared_denials {
            s.method_rule(&rule.pattern, over.quota());
        }
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
    fn deny(&mut self, q: u32, c: Option<call::Reader<'_>>, d: Rc<Denial>) -> Verdict {
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

    /// Accounts for an outgoing message. An error means the connection must be aborted
    /// (rule 8: outgoing messages are never rewritten): the peer holds more capabilities
    /// from us than `max_exports`.
    pub fn outgoing(&mut self, msg: message::Reader<'_>) -> Result<(), AbortReason> {
        match msg.which() {
            Ok(message::Return(Ok(ret))) => {
                let q = ret.get_answer_id();
                // capnp-rpc sets noFinishNeeded on results without capabilities: the peer
                // will not send Finish, and the answer is gone once returned.
                let done = ret.get_no_finish_needed();
                match self.answers.get(q) {
                    Some(&Answer::Running(m)) => {
                        self.ended(m);
                        if done {
                            self.answers.remove(q);
                        } else {
                            self.answers.insert(q, Answer::Returned);
                        }
                    }
                    Some(Answer::Cancelled) => {
                        self.answers.remove(q);
                    }
                    _ => {}
                }
                if let Ok(capnp_rpc::rpc_capnp::return_::Results(Ok(payload))) = ret.which() {
                    let ids = self.export_descriptors(payload.get_cap_table());
                    if !ids.is_empty() {
                        self.returned_caps.insert(q, ids);
                    }
                }
            }
            Ok(message::Call(Ok(c))) => {
                self.awaiting = self.awaiting.saturating_add(1);
                if let Ok(p) = c.get_params() {
                    self.export_descriptors(p.get_cap_table());
                }
            }
            Ok(message::Bootstrap(_)) => {
                self.awaiting = self.awaiting.saturating_add(1);
                return Ok(());
            }
            Ok(message::Resolve(Ok(r))) => {
                if let Ok(capnp_rpc::rpc_capnp::resolve::Cap(Ok(d))) = r.which() {
                    self.export_descriptor(d);
                }
            }
            _ => return Ok(()),
        }
        let max = self.class.quotas().max_exports;
        if self.exports.len() > max as usize {
            return Err(AbortReason::Exports {
                limit: max,
                held: self.exports.len(),
                class: self.class.name().to_string(),
            });
        }
        Ok(())
    }

    fn export_descriptors(
        &mut self,
        table: capnp::Result<capnp::struct_list::Reader<'_, cap_descriptor::Owned>>,
    ) -> Vec<u32> {
        let mut ids = Vec::new();
        if let Ok(table) = table {
            for d in table.iter() {
                if let Some(id) = self.export_descriptor(d) {
                    ids.push(id);
                }
            }
        }
        ids
    }

    fn export_descriptor(&mut self, d: cap_descriptor::Reader<'_>) -> Option<u32> {
        match d.which() {
            Ok(cap_descriptor::SenderHosted(id) | cap_descriptor::SenderPromise(id)) => {
                *self.exports.entry(id).or_insert(0) += 1;
                Some(id)
            }
            _ => None,
        }
    }

    fn release_export(&mut self, id: u32, count: u32) {
        if let Some(n) = self.exports.get_mut(&id) {
            *n = n.saturating_sub(count);
            if *n == 0 {
                self.exports.remove(&id);
            }
        }
    }

    /// Capabilities the peer holds from us (distinct export ids).
    pub fn exports_held(&self) -> usize {
        self.exports.len()
    }

    /// Incoming calls delivered and neither returned nor finished.
    pub fn in_flight_calls(&self) -> usize {
        self.running as usize
    }

    /// Questions we sent (calls, bootstraps) that the peer has not answered yet.
    pub fn awaiting_answers(&self) -> u32 {
        self.awaiting
    }

    /// Answers the peer has open (in flight, returned but not finished, cancelled, denied).
    pub fn open_answers(&self) -> usize {
        self.answers.len()
    }

    /// Calls received since the connection opened (denied ones included).
    pub fn calls_received(&self) -> u64 {
        self.calls
    }

    /// Denials so far, by reason.
    pub fn denials(&self) -> DenialCounts {
        self.denials
    }
}

/// Why a call was denied.
#[derive(Clone, Copy)]
enum Reason {
    Permission,
    Rate,
    InflightCalls,
    InflightBytes,
    OpenAnswers,
    SendResultsTo,
    MethodRate,
    MethodInflight,
}

/// Counts one denial here and in the class-wide counters.
fn count(local: &mut DenialCounts, shared: &Option<Arc<DenialCounters>>, reason: Reason) {
    let (l, s) = match reason {
        Reason::Permission => (
            &mut local.permission,
            shared.as_ref().map(|c| &c.permission),
        ),
        Reason::Rate => (&mut local.rate, shared.as_ref().map(|c| &c.rate)),
        Reason::InflightCalls => (
            &mut local.inflight_calls,
            shared.as_ref().map(|c| &c.inflight_calls),
        ),
        Reason::InflightBytes => (
            &mut local.inflight_bytes,
            shared.as_ref().map(|c| &c.inflight_bytes),
        ),
        Reason::OpenAnswers => (
            &mut local.open_answers,
            shared.as_ref().map(|c| &c.open_answers),
        ),
        Reason::SendResultsTo => (
            &mut local.send_results_to,
            shared.as_ref().map(|c| &c.send_results_to),
        ),
        Reason::MethodRate => (
            &mut local.method_rate,
            shared.as_ref().map(|c| &c.method_rate),
        ),
        Reason::MethodInflight => (
            &mut local.method_inflight_calls,
            shared.as_ref().map(|c| &c.method_inflight_calls),
        ),
    };
    *l += 1;
    if let Some(s) = s {
        s.inc();
    }
}

#[cfg(test)]
mod tests;
