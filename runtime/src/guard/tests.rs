//! The guard's tests, by topic: `calls` (the allowlist, denials and their replies,
//! pipelining, question ids), `quotas` (class quotas and exports), `model` (a property test
//! against a model of the answer table), `methods` (per-method rules), `relayed` (a relay's
//! refusal of the forms it cannot account for). The messages they feed and the decoding of
//! replies are here.

use std::sync::Arc;

use capgate_policy::{ClientClass, Matcher, Quotas};
use capgate_schema::Catalog;
use capnp::message::{Builder, HeapAllocator};
use capnp_rpc::rpc_capnp::{exception, message};

use super::*;

mod calls;
mod methods;
mod model;
mod quotas;
mod relayed;

#[derive(Clone, Copy)]
enum Target {
    Import(u32),
    Answer(u32),
}

#[derive(Clone, Copy)]
enum Cap {
    SenderHosted(u32),
    SenderPromise(u32),
    ReceiverHosted(u32),
}

fn reader_class(quotas: Quotas) -> Arc<ClientClass> {
    let c = Catalog::builtin();
    Arc::new(
        ClientClass::new("reader", Matcher::Any)
            .allow("Store.namespace", c)
            .unwrap()
            .allow("Reader.*", c)
            .unwrap()
            .with_quotas(quotas),
    )
}

/// A reader's guard held to `quotas`, without a rate limit.
fn guard_with(quotas: Quotas) -> Guard {
    Guard::new(
        reader_class(quotas),
        Arc::new(Unlimited),
        Catalog::builtin().clone(),
    )
}

fn guard() -> Guard {
    guard_with(Quotas::default())
}

fn method(iface: &str, m: &str) -> MethodRef {
    Catalog::builtin().method(iface, m).unwrap()
}

fn call_msg(
    q: u32,
    target: Target,
    m: MethodRef,
    caps: &[Cap],
    yourself: bool,
) -> Builder<HeapAllocator> {
    let mut b = Builder::new_default();
    {
        let mut c = b.init_root::<message::Builder>().init_call();
        c.set_question_id(q);
        c.set_interface_id(m.interface_id);
        c.set_method_id(m.method_id);
        match target {
            Target::Import(id) => c.reborrow().init_target().set_imported_cap(id),
            Target::Answer(a) => c
                .reborrow()
                .init_target()
                .init_promised_answer()
                .set_question_id(a),
        }
        if yourself {
            c.reborrow().init_send_results_to().set_yourself(());
        }
        let mut table = c.init_params().init_cap_table(caps.len() as u32);
        for (i, cap) in caps.iter().enumerate() {
            let mut d = table.reborrow().get(i as u32);
            match *cap {
                Cap::SenderHosted(id) => d.set_sender_hosted(id),
                Cap::SenderPromise(id) => d.set_sender_promise(id),
                Cap::ReceiverHosted(id) => d.set_receiver_hosted(id),
            }
        }
    }
    b
}

fn finish_msg(q: u32) -> Builder<HeapAllocator> {
    let mut b = Builder::new_default();
    b.init_root::<message::Builder>()
        .init_finish()
        .set_question_id(q);
    b
}

fn return_msg(q: u32) -> Builder<HeapAllocator> {
    let mut b = Builder::new_default();
    b.init_root::<message::Builder>()
        .init_return()
        .set_answer_id(q);
    b
}

fn feed(g: &mut Guard, b: &Builder<HeapAllocator>) -> Verdict {
    g.incoming(b.get_root_as_reader().unwrap())
}

/// Feeds a call of `m` as question `q`, on the bootstrap capability and without capabilities.
fn feed_call(g: &mut Guard, q: u32, m: MethodRef) -> Verdict {
    feed(g, &call_msg(q, Target::Import(0), m, &[], false))
}

fn send(g: &mut Guard, b: &Builder<HeapAllocator>) {
    g.outgoing(b.get_root_as_reader().unwrap()).unwrap();
}

/// The frames of a reply, decoded.
fn frames(mut bytes: &[u8]) -> Vec<capnp::message::Reader<capnp::serialize::OwnedSegments>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        out.push(
            capnp::serialize::read_message(&mut bytes, capnp::message::ReaderOptions::new())
                .unwrap(),
        );
    }
    out
}

/// (answer id, exception type, reason) of a denial's Return, and the Released ids, each as
/// often as its reference count.
fn denial(v: Verdict) -> (u32, exception::Type, String, Vec<u32>) {
    let Verdict::Reply(bytes) = v else {
        panic!("expected a denial, got {v:?}")
    };
    let mut releases = Vec::new();
    let mut ret = None;
    for m in &frames(&bytes) {
        let r = m.get_root::<message::Reader>().unwrap();
        match r.which().unwrap() {
            message::Return(Ok(rt)) => {
                assert!(
                    !rt.get_release_param_caps(),
                    "rule 1: never rely on releaseParamCaps"
                );
                let message::Return(_) = r.which().unwrap() else {
                    unreachable!()
                };
                let capnp_rpc::rpc_capnp::return_::Exception(Ok(e)) = rt.which().unwrap() else {
                    panic!("denial without exception")
                };
                ret = Some((
                    rt.get_answer_id(),
                    e.get_type().unwrap(),
                    e.get_reason().unwrap().to_string().unwrap(),
                ));
            }
            message::Release(Ok(rel)) => {
                assert!(
                    !releases.contains(&rel.get_id()),
                    "one Release per id, with the count of its references"
                );
                for _ in 0..rel.get_reference_count() {
                    releases.push(rel.get_id());
                }
            }
            _ => panic!("unexpected reply"),
        }
    }
    let (q, t, reason) = ret.expect("a Return");
    (q, t, reason, releases)
}

/// The reason of a denial that must be `Overloaded`.
fn overloaded(v: Verdict) -> String {
    let (_, kind, reason, _) = denial(v);
    assert_eq!(kind, exception::Type::Overloaded, "{reason}");
    reason
}
