//! The guard: a sans-IO state machine per connection between the frame reader and capnp-rpc.
//!
//! Every incoming message passes through [`Guard::incoming`], which delivers it, answers it
//! itself (a denial: the `Return` plus the `Release`s the caller needs) or aborts the
//! connection; every outgoing message passes through [`Guard::outgoing`] for accounting.
//! The rules keep capnp-rpc's tables consistent:
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

use crate::AbortReason;
use capgate_policy::ClientClass;
use capgate_schema::{Catalog, MethodRef};
use capnp_rpc::rpc_capnp::{cap_descriptor, exception, message, resolve};

mod calls;
mod exports;
mod foreign;
mod methods;
mod observer;
mod reply;
mod table;
use exports::QuestionCaps;
pub(crate) use foreign::{unimplemented, Refusal};
use methods::MethodLimits;
pub use observer::DenialCounts;
pub(crate) use observer::{DenialReason, GuardObserver};
use table::IdTable;

pub use crate::rate::{RateLimit, Unlimited};

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
    /// Returned; capnp-rpc keeps the results until Finish. The export ids the results
    /// carried, released by a Finish that says `releaseResultCaps`.
    Returned(Box<[u32]>),
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
    /// Export ids carried by a Return we sent whose answer is not kept (see
    /// `Answer::Returned`), released by the peer's Finish.
    returned_caps: QuestionCaps,
    /// Export ids carried by the params of each call we sent, released by the peer's Return
    /// when it says `releaseParamCaps`.
    param_caps: QuestionCaps,
    /// Who hears about calls and denials (the server's metrics), if anyone.
    observer: Option<Box<dyn GuardObserver>>,
    /// Our own questions (calls and bootstraps we sent) not yet answered by a Return. Only
    /// a hint for answer polling: a peer that never returns merely keeps it high.
    awaiting: u32,
}

impl Guard {
    /// A guard enforcing `class` (its allowlist and per-connection quotas), with `rate` as
    /// the client's shared call budget, naming methods (in denials and metrics) by `catalog`
    /// (the schema the policy was checked against).
    pub fn new(class: Arc<ClientClass>, rate: Arc<dyn RateLimit>, catalog: Catalog) -> Self {
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
            returned_caps: QuestionCaps::default(),
            param_caps: QuestionCaps::default(),
            observer: None,
            awaiting: 0,
        }
    }

    /// Reports calls, denials and calls in flight to `observer` from now on (the calls in
    /// flight move from the previous observer to it).
    pub(crate) fn set_observer(&mut self, mut observer: Box<dyn GuardObserver>) {
        let running = i64::from(self.running);
        if let Some(old) = &mut self.observer {
            old.inflight(-running);
        }
        observer.inflight(running);
        self.observer = Some(observer);
    }

    fn started(&mut self, m: Option<MethodRef>) {
        if let Some(m) = m {
            self.methods.started(&self.class, m);
        }
        self.running += 1;
        if let Some(o) = &mut self.observer {
            o.inflight(1);
        }
    }

    fn ended(&mut self, m: Option<MethodRef>) {
        if let Some(m) = m {
            self.methods.ended(&self.class, m);
        }
        self.running -= 1;
        if let Some(o) = &mut self.observer {
            o.inflight(-1);
        }
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
            Catalog::builtin().clone(),
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
            o.class_changed();
        }
    }

    /// The class this connection is held to.
    pub fn class(&self) -> &Arc<ClientClass> {
        &self.class
    }

    /// Inspects an incoming message.
    pub fn incoming(&mut self, msg: message::Reader<'_>) -> Verdict {
        self.incoming_kind(msg.which(), false)
    }

    /// `relayed`: also refuse the forms inside a Call or Return that a relay cannot account
    /// for (see `foreign.rs`), after the guard's own judgement.
    fn incoming_kind(
        &mut self,
        which: Result<message::WhichReader<'_>, capnp::NotInSchema>,
        relayed: bool,
    ) -> Verdict {
        match which {
            Ok(message::Call(Ok(c))) => self.call(c, relayed),
            Ok(message::Bootstrap(Ok(b))) => {
                let q = b.get_question_id();
                if let Some(v) = self.reuse(q).or_else(|| self.answers_overflow()) {
                    return v;
                }
                // A bootstrap opens an answer like a call (rule 6), so it counts the same.
                let quotas = self.class.quotas();
                if self.answers.len() >= quotas.max_open_answers as usize {
                    denied(
                        &mut self.denials,
                        &mut self.observer,
                        DenialReason::OpenAnswers,
                        None,
                    );
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
                if let Some(ids) = self.returned_caps.remove(q) {
                    self.finished_caps(&ids, f.get_release_result_caps());
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
                    Some(Answer::Returned(_)) => {
                        if let Some(Answer::Returned(ids)) = self.answers.remove(q) {
                            self.finished_caps(&ids, f.get_release_result_caps());
                        }
                        Verdict::Deliver
                    }
                    Some(Answer::Cancelled) | None => Verdict::Deliver,
                }
            }
            Ok(message::Return(Ok(ret))) => {
                self.awaiting = self.awaiting.saturating_sub(1);
                self.returned_to_us(ret.get_answer_id(), ret.get_release_param_caps());
                let table = match ret.which() {
                    Ok(capnp_rpc::rpc_capnp::return_::Results(Ok(p))) => p.get_cap_table().ok(),
                    other => {
                        if let Some(what) = relayed.then(|| foreign::return_form(&other)).flatten()
                        {
                            return Verdict::Abort(AbortReason::Unsupported { what });
                        }
                        None
                    }
                };
                if let Some(v) = self.too_many_caps("Return", table) {
                    return v;
                }
                match relayed.then(|| foreign::table_form(table)).flatten() {
                    Some(what) => Verdict::Abort(AbortReason::Unsupported { what }),
                    None => Verdict::Deliver,
                }
            }
            // The peer could not take a capability we resolved a promise to: it never held
            // it (rule 11; C++ releases the export the same way).
            Ok(message::Unimplemented(Ok(echo))) => {
                let resolved = match echo.which() {
                    Ok(message::Resolve(Ok(r))) => match r.which() {
                        Ok(resolve::Cap(Ok(d))) => exports::sender_export(d),
                        _ => None,
                    },
                    _ => None,
                };
                if let Some(id) = resolved {
                    self.release_export(id, 1);
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
                    Answer::Returned(_) => "returned, not finished",
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
        table: Option<capnp::struct_list::Reader<'_, cap_descriptor::Owned>>,
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

/// Counts a denial on the connection and tells the observer. (A function of the two fields,
/// not a method: the call path holds borrows of the class and catalog meanwhile.)
fn denied(
    counts: &mut DenialCounts,
    observer: &mut Option<Box<dyn GuardObserver>>,
    reason: DenialReason,
    rule: Option<(&str, &'static str)>,
) {
    *counts.of(reason) += 1;
    if let Some(o) = observer {
        o.denied(reason, rule);
    }
}

#[cfg(test)]
mod tests;
