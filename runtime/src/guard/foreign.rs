//! Message forms a relay cannot account for (DESIGN rule 11), refused in both directions:
//! Level-3 RPC (provide, accept, join, third-party capabilities, answers and results),
//! obsolete messages, and union members this build does not know. In serve mode capnp-rpc
//! answers them itself; a gateway would pass them to a vat that might act on them.

use capnp::struct_list;
use capnp_rpc::rpc_capnp::{call, cap_descriptor, disembargo, message, payload, return_};

use crate::AbortReason;

/// Why `msg` must not be relayed, if it must not. Messages that do not parse are left to
/// the accounting (which ignores them) and to the receiving vat.
pub(crate) fn unsupported(msg: message::Reader<'_>) -> Option<AbortReason> {
    let what = match msg.which() {
        Err(capnp::NotInSchema(n)) => Some(format!("message type {n}")),
        Ok(message::Provide(_)) => Some("a Provide message".into()),
        Ok(message::Accept(_)) => Some("an Accept message".into()),
        Ok(message::Join(_)) => Some("a Join message".into()),
        Ok(message::ObsoleteSave(_) | message::ObsoleteDelete(_)) => {
            Some("an obsolete Save/Delete message".into())
        }
        Ok(message::Call(Ok(c))) => call_form(c),
        Ok(message::Return(Ok(r))) => return_form(r),
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
    what.map(|what| AbortReason::Unsupported { what })
}

fn call_form(c: call::Reader<'_>) -> Option<String> {
    match c.get_send_results_to().which() {
        Ok(call::send_results_to::ThirdParty(_)) => {
            return Some("a Call with sendResultsTo.thirdParty".into())
        }
        Err(capnp::NotInSchema(n)) => return Some(format!("a Call with sendResultsTo form {n}")),
        _ => {}
    }
    c.get_params().ok().and_then(payload_form)
}

fn return_form(r: return_::Reader<'_>) -> Option<String> {
    match r.which() {
        Ok(return_::AcceptFromThirdParty(_)) => Some("a Return with acceptFromThirdParty".into()),
        Ok(return_::Results(Ok(p))) => payload_form(p),
        Err(capnp::NotInSchema(n)) => Some(format!("a Return of unknown form {n}")),
        _ => None,
    }
}

fn payload_form(p: payload::Reader<'_>) -> Option<String> {
    let table: struct_list::Reader<'_, cap_descriptor::Owned> = p.get_cap_table().ok()?;
    table.iter().find_map(descriptor_form)
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
