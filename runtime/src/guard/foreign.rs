//! Message forms a relay cannot account for (DESIGN rule 11), refused in both directions:
//! Level-3 RPC (provide, accept, join, third-party capabilities, answers and results),
//! obsolete messages, and union members this build does not know. Whole messages of such
//! kinds get `Unimplemented`, as capnp-rpc answers them in serve mode; such forms inside a
//! message close the connection. A gateway would otherwise pass them to a vat that might act
//! on them.

use capnp::struct_list;
use capnp_rpc::rpc_capnp::{call, cap_descriptor, disembargo, message, return_};

use super::{Guard, Verdict};
use crate::AbortReason;

/// What a relay does with a message it cannot account for.
pub(crate) enum Refusal {
    /// A whole message of a kind the relay does not handle: answer it with `Unimplemented`
    /// (as capnp-rpc does in serve mode), keeping the connection.
    Unimplemented,
    /// A form inside a message the relay otherwise handles: close with this reason.
    Abort(AbortReason),
}

impl Guard {
    /// [`Guard::incoming`] for a relay: the same walk of the message also refuses what the
    /// relay cannot account for. In a Call or Return the guard judges first (a denied call
    /// is answered whatever its params hold); the other kinds refused here leave no state
    /// in the guard.
    pub(crate) fn incoming_relayed(&mut self, msg: message::Reader<'_>) -> Verdict {
        let which = msg.which();
        match refusal(&which) {
            Some(r) => refuse(r, msg),
            None => self.incoming_kind(which, true),
        }
    }

    /// [`Guard::outgoing`] for a relay: what the relay must refuse instead of passing on
    /// (nothing is accounted for it), or the accounting's error.
    pub(crate) fn outgoing_relayed(
        &mut self,
        msg: message::Reader<'_>,
    ) -> Result<Option<Refusal>, AbortReason> {
        let which = msg.which();
        if let Some(r) = refusal(&which) {
            return Ok(Some(r));
        }
        let form = self.outgoing_kind(which, true)?;
        Ok(form.map(|what| Refusal::Abort(AbortReason::Unsupported { what })))
    }
}

/// The verdict on a refused incoming message: its `Unimplemented` echo, or the abort.
fn refuse(refusal: Refusal, msg: message::Reader<'_>) -> Verdict {
    match refusal {
        Refusal::Abort(reason) => Verdict::Abort(reason),
        Refusal::Unimplemented => match unimplemented(msg) {
            Ok(echo) => Verdict::Reply(echo),
            Err(e) => Verdict::Abort(AbortReason::Unsupported {
                what: format!("a message that cannot be echoed as Unimplemented ({e})"),
            }),
        },
    }
}

/// Why a message of this kind must not be relayed, if it must not; forms inside a Call or
/// Return are found in the guard's own walk of them (`call_form`, `return_form`,
/// `table_form`). Messages that do not parse are left to the accounting (which ignores
/// them) and to the receiving vat.
fn refusal(which: &Result<message::WhichReader<'_>, capnp::NotInSchema>) -> Option<Refusal> {
    let what = match which {
        Err(capnp::NotInSchema(_))
        | Ok(
            message::Provide(_)
            | message::Accept(_)
            | message::Join(_)
            | message::ObsoleteSave(_)
            | message::ObsoleteDelete(_),
        ) => return Some(Refusal::Unimplemented),
        Ok(message::Resolve(Ok(r))) => match r.which() {
            Ok(capnp_rpc::rpc_capnp::resolve::Cap(Ok(d))) => descriptor_form(d),
            Err(capnp::NotInSchema(n)) => Some(format!("a Resolve of unknown form {n}")),
            _ => None,
        },
        Ok(message::Disembargo(Ok(d))) => match d.get_context().which() {
            Ok(disembargo::context::Accept(()) | disembargo::context::Provide(_)) => {
                Some("a Disembargo for a three-party handoff".into())
            }
            Err(capnp::NotInSchema(n)) => Some(format!("a Disembargo of unknown form {n}")),
            _ => None,
        },
        _ => None,
    };
    what.map(|what| Refusal::Abort(AbortReason::Unsupported { what }))
}

/// The `Unimplemented` answer to `msg`: a copy of it, as the protocol asks.
pub(crate) fn unimplemented(msg: message::Reader<'_>) -> capnp::Result<Box<[u8]>> {
    let mut b = capnp::message::Builder::new_default();
    b.init_root::<message::Builder<'_>>()
        .set_unimplemented(msg)?;
    let mut frame = Vec::new();
    crate::framing::encode_frame(&mut frame, &b.get_segments_for_output());
    Ok(frame.into_boxed_slice())
}

/// A Call's forms a relay refuses: results sent to a third party, third-party caps.
pub(super) fn call_form(c: call::Reader<'_>) -> Option<String> {
    match c.get_send_results_to().which() {
        Ok(call::send_results_to::ThirdParty(_)) => {
            return Some("a Call with sendResultsTo.thirdParty".into())
        }
        Err(capnp::NotInSchema(n)) => return Some(format!("a Call with sendResultsTo form {n}")),
        _ => {}
    }
    table_form(c.get_params().and_then(|p| p.get_cap_table()).ok())
}

/// A Return's forms a relay refuses, other than results (see `table_form`).
pub(super) fn return_form(
    which: &Result<return_::WhichReader<'_>, capnp::NotInSchema>,
) -> Option<String> {
    match which {
        Ok(return_::AcceptFromThirdParty(_)) => Some("a Return with acceptFromThirdParty".into()),
        Err(capnp::NotInSchema(n)) => Some(format!("a Return of unknown form {n}")),
        _ => None,
    }
}

/// The first capability in a cap table that a relay refuses, if any.
pub(super) fn table_form(
    table: Option<struct_list::Reader<'_, cap_descriptor::Owned>>,
) -> Option<String> {
    table?.iter().find_map(descriptor_form)
}

fn descriptor_form(d: cap_descriptor::Reader<'_>) -> Option<String> {
    match d.which() {
        Ok(cap_descriptor::ThirdPartyHosted(_)) => {
            Some("a third-party capability (thirdPartyHosted)".into())
        }
        Err(capnp::NotInSchema(n)) => Some(format!("a capability descriptor of unknown form {n}")),
        _ => None,
    }
}
