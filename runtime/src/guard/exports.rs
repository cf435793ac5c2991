//! Outgoing accounting: the capabilities the peer holds from us (a mirror of capnp-rpc's
//! export table, for `max_exports`) and our own questions awaiting answers.

use std::collections::HashMap;

use capnp_rpc::rpc_capnp::{cap_descriptor, message};

use super::{foreign, Answer, Guard};
use crate::AbortReason;

impl Guard {
    /// Accounts for an outgoing message. An error means the connection must be aborted
    /// (rule 8: outgoing messages are never rewritten): the peer holds more capabilities
    /// from us than `max_exports`.
    pub fn outgoing(&mut self, msg: message::Reader<'_>) -> Result<(), AbortReason> {
        self.outgoing_kind(msg.which(), false).map(|_| ())
    }

    /// `relayed`: a Call or Return carrying a form a relay cannot account for is not
    /// accounted; the form is returned instead (see `foreign.rs`).
    pub(super) fn outgoing_kind(
        &mut self,
        which: Result<message::WhichReader<'_>, capnp::NotInSchema>,
        relayed: bool,
    ) -> Result<Option<String>, AbortReason> {
        match which {
            Ok(message::Return(Ok(ret))) => {
                let q = ret.get_answer_id();
                // capnp-rpc sets noFinishNeeded on results without capabilities: the peer
                // will not send Finish, and the answer is gone once returned.
                let done = ret.get_no_finish_needed();
                let table = match ret.which() {
                    Ok(capnp_rpc::rpc_capnp::return_::Results(Ok(payload))) => {
                        payload.get_cap_table().ok()
                    }
                    other => {
                        if relayed {
                            if let Some(what) = foreign::return_form(&other) {
                                return Ok(Some(what));
                            }
                        }
                        None
                    }
                };
                if relayed {
                    if let Some(what) = foreign::table_form(table) {
                        return Ok(Some(what));
                    }
                }
                let ids = self.export_descriptors(table);
                // The ids stay with the answer until its Finish; an answer that is not kept
                // (finished already, or no Finish expected) keeps them in `returned_caps`.
                match self.answers.get(q) {
                    Some(&Answer::Running(m)) if !done => {
                        self.ended(m);
                        self.answers
                            .insert(q, Answer::Returned(ids.into_boxed_slice()));
                    }
                    Some(&Answer::Running(m)) => {
                        self.ended(m);
                        self.answers.remove(q);
                        self.returned_caps.insert(q, ids);
                    }
                    Some(Answer::Cancelled) => {
                        self.answers.remove(q);
                        self.returned_caps.insert(q, ids);
                    }
                    _ => self.returned_caps.insert(q, ids),
                }
            }
            Ok(message::Call(Ok(c))) => {
                if relayed {
                    if let Some(what) = foreign::call_form(c) {
                        return Ok(Some(what));
                    }
                }
                self.awaiting = self.awaiting.saturating_add(1);
                if let Ok(p) = c.get_params() {
                    let ids = self.export_descriptors(p.get_cap_table().ok());
                    self.param_caps.insert(c.get_question_id(), ids);
                }
            }
            Ok(message::Bootstrap(_)) => {
                self.awaiting = self.awaiting.saturating_add(1);
                return Ok(None);
            }
            Ok(message::Resolve(Ok(r))) => {
                if let Ok(capnp_rpc::rpc_capnp::resolve::Cap(Ok(d))) = r.which() {
                    self.export_descriptor(d);
                }
            }
            _ => return Ok(None),
        }
        let max = self.class.quotas().max_exports;
        if self.exports.len() > max as usize {
            return Err(AbortReason::Exports {
                limit: max,
                held: self.exports.len(),
                class: self.class.name().to_string(),
                upstream: None,
            });
        }
        Ok(None)
    }

    fn export_descriptors(
        &mut self,
        table: Option<capnp::struct_list::Reader<'_, cap_descriptor::Owned>>,
    ) -> Vec<u32> {
        let mut ids = Vec::new();
        if let Some(table) = table {
            for d in table.iter() {
                if let Some(id) = self.export_descriptor(d) {
                    ids.push(id);
                }
            }
        }
        ids
    }

    fn export_descriptor(&mut self, d: cap_descriptor::Reader<'_>) -> Option<u32> {
        let id = sender_export(d)?;
        *self.exports.entry(id).or_insert(0) += 1;
        Some(id)
    }

    /// The peer returned our call `q`: with `releaseParamCaps` (C++ callees may set it),
    /// the capabilities our params carried are released with it.
    pub(super) fn returned_to_us(&mut self, q: u32, release_param_caps: bool) {
        if let Some(ids) = self.param_caps.remove(q) {
            if release_param_caps {
                for id in ids {
                    self.release_export(id, 1);
                }
            }
        }
    }

    /// The peer finished a question whose Return carried `ids`: with `releaseResultCaps`
    /// (the default) it no longer holds them.
    pub(super) fn finished_caps(&mut self, ids: &[u32], release_result_caps: bool) {
        if release_result_caps {
            for &id in ids {
                self.release_export(id, 1);
            }
        }
    }

    pub(super) fn release_export(&mut self, id: u32, count: u32) {
        if let Some(n) = self.exports.get_mut(&id) {
            *n = n.saturating_sub(count);
            if *n == 0 {
                self.exports.remove(&id);
            }
        }
    }
}

/// The export a descriptor written by us names, if it names one of ours.
pub(super) fn sender_export(d: cap_descriptor::Reader<'_>) -> Option<u32> {
    match d.which() {
        Ok(cap_descriptor::SenderHosted(id) | cap_descriptor::SenderPromise(id)) => Some(id),
        _ => None,
    }
}

/// Export ids by question id, allocated only once one is recorded: most connections never
/// have any (the ids of a returned answer live in its entry), and an empty map costs 48
/// bytes.
#[derive(Default)]
#[allow(clippy::box_collection)] // the box is the point: 8 bytes while empty, not 48
pub(super) struct QuestionCaps(Option<Box<HashMap<u32, Vec<u32>>>>);

impl QuestionCaps {
    /// Records `ids` for `q`; no ids, no entry (and no map).
    pub(super) fn insert(&mut self, q: u32, ids: Vec<u32>) {
        if !ids.is_empty() {
            self.0.get_or_insert_with(Default::default).insert(q, ids);
        }
    }

    pub(super) fn remove(&mut self, q: u32) -> Option<Vec<u32>> {
        self.0.as_mut()?.remove(&q)
    }
}
