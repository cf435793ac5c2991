use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use capgate_policy::{ClientClass, Matcher, Quotas};
use capgate_schema::Catalog;
use capnp::message::{Builder, HeapAllocator};
use capnp_rpc::rpc_capnp::{exception, message};
use proptest::prelude::*;

use super::*;

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

fn guard() -> Guard {
    Guard::new(
        reader_class(Quotas::default()),
        Arc::new(Unlimited),
        Catalog::builtin().clone(),
    )
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

#[test]
fn allowed_call_is_delivered_and_accounting_returns_to_zero() {
    let mut g = guard();
    let v = feed(
        &mut g,
        &call_msg(1, Target::Import(0), method("Namespace", "get"), &[], false),
    );
    assert!(matches!(v, Verdict::Deliver));
    assert_eq!((g.in_flight_calls(), g.open_answers()), (1, 1));
    send(&mut g, &return_msg(1));
    assert_eq!((g.in_flight_calls(), g.open_answers()), (0, 1));
    assert!(matches!(feed(&mut g, &finish_msg(1)), Verdict::Deliver));
    assert_eq!((g.in_flight_calls(), g.open_answers()), (0, 0));
}

#[test]
fn denied_call_gets_return_and_releases_for_every_sender_cap() {
    let mut g = guard();
    let caps = [
        Cap::SenderHosted(7),
        Cap::ReceiverHosted(3),
        Cap::SenderPromise(8),
        Cap::SenderHosted(7),
    ];
    let v = feed(
        &mut g,
        &call_msg(
            4,
            Target::Answer(0),
            method("Namespace", "put"),
            &caps,
            false,
        ),
    );
    let (q, kind, reason, releases) = denial(v);
    assert_eq!(q, 4);
    assert_eq!(kind, exception::Type::Failed);
    assert_eq!(
        reason,
        "permission denied: Namespace.put is not allowed for client \"reader\""
    );
    assert_eq!(
        releases,
        [7, 7, 8],
        "a reference released per sender descriptor, duplicates counted"
    );
    assert_eq!(g.in_flight_calls(), 0);
    assert_eq!(g.denials().permission, 1);
    // Rule 2: its Finish is consumed, not delivered.
    match feed(&mut g, &finish_msg(4)) {
        Verdict::Reply(r) => assert!(r.is_empty()),
        v => panic!("Finish of a denied call must not reach capnp-rpc: {v:?}"),
    }
    assert_eq!(g.open_answers(), 0);
}

#[test]
fn calls_pipelined_on_a_denied_answer_are_denied_transitively() {
    let mut g = guard();
    let sub = method("Namespace", "sub");
    let (_, _, first, _) = denial(feed(
        &mut g,
        &call_msg(2, Target::Answer(0), sub, &[], false),
    ));
    let get = method("Reader", "get");
    let (q, _, second, _) = denial(feed(
        &mut g,
        &call_msg(3, Target::Answer(2), get, &[], false),
    ));
    assert_eq!(
        (q, &second),
        (3, &first),
        "same reason as the answer it targets"
    );
    let (q, _, third, _) = denial(feed(
        &mut g,
        &call_msg(5, Target::Answer(3), get, &[], false),
    ));
    assert_eq!((q, third), (5, first));
    assert_eq!(g.denials().permission, 3);
}

#[test]
fn question_id_reuse_aborts() {
    let mut g = guard();
    let get = method("Reader", "get");
    assert!(matches!(
        feed(&mut g, &call_msg(1, Target::Import(0), get, &[], false)),
        Verdict::Deliver
    ));
    match feed(&mut g, &call_msg(1, Target::Import(0), get, &[], false)) {
        Verdict::Abort(r) => assert_eq!(
            r.to_string(),
            "capgate: protocol violation: question id 1 reused while its previous use is still open (call in flight)"
        ),
        v => panic!("{v:?}"),
    }
    // Denied and not finished: also open.
    denial(feed(
        &mut g,
        &call_msg(2, Target::Import(0), method("Namespace", "put"), &[], false),
    ));
    assert!(matches!(
        feed(&mut g, &call_msg(2, Target::Import(0), get, &[], false)),
        Verdict::Abort(r) if r.to_string().contains("(denied, not finished)")
    ));
    // Finished: free to reuse.
    feed(&mut g, &finish_msg(2));
    assert!(matches!(
        feed(&mut g, &call_msg(2, Target::Import(0), get, &[], false)),
        Verdict::Deliver
    ));
}

#[test]
fn send_results_to_yourself_is_denied() {
    let mut g = guard();
    let (_, kind, reason, _) = denial(feed(
        &mut g,
        &call_msg(1, Target::Import(0), method("Reader", "get"), &[], true),
    ));
    assert_eq!(kind, exception::Type::Failed);
    assert_eq!(
        reason,
        "capgate: Reader.get: sendResultsTo other than caller is not supported"
    );
}

#[test]
fn in_flight_and_open_answer_quotas_answer_overloaded() {
    let mut q = Quotas::default();
    q.max_inflight_calls = 2;
    q.max_open_answers = 3;
    let mut g = Guard::new(
        reader_class(q),
        Arc::new(Unlimited),
        Catalog::builtin().clone(),
    );
    let get = method("Reader", "get");
    for id in 0..2 {
        assert!(matches!(
            feed(&mut g, &call_msg(id, Target::Import(0), get, &[], false)),
            Verdict::Deliver
        ));
    }
    let (_, kind, reason, _) = denial(feed(
        &mut g,
        &call_msg(9, Target::Import(0), get, &[], false),
    ));
    assert_eq!(kind, exception::Type::Overloaded);
    assert_eq!(
        reason,
        "overloaded: Reader.get refused: max_inflight_calls = 2 reached (2 calls in flight on this connection) for client \"reader\""
    );
    feed(&mut g, &finish_msg(9));
    // Cancel both (Finish before Return): no longer in flight, but their answers stay open.
    feed(&mut g, &finish_msg(0));
    feed(&mut g, &finish_msg(1));
    assert_eq!((g.in_flight_calls(), g.open_answers()), (0, 2));
    assert!(matches!(
        feed(&mut g, &call_msg(5, Target::Import(0), get, &[], false)),
        Verdict::Deliver
    ));
    let (_, kind, reason, _) = denial(feed(
        &mut g,
        &call_msg(6, Target::Import(0), get, &[], false),
    ));
    assert_eq!(kind, exception::Type::Overloaded);
    assert!(
        reason.contains("max_open_answers = 3 reached (3 answers open"),
        "{reason}"
    );
}

/// A budget of N calls, then none.
struct Budget(AtomicU32);

impl RateLimit for Budget {
    fn try_call(&self) -> bool {
        self.0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }
}

#[test]
fn over_rate_calls_answer_overloaded_and_denied_calls_do_not_spend_the_budget() {
    let mut g = Guard::new(
        reader_class(Quotas::default()),
        Arc::new(Budget(AtomicU32::new(2))),
        Catalog::builtin().clone(),
    );
    let get = method("Reader", "get");
    let put = method("Namespace", "put");
    denial(feed(
        &mut g,
        &call_msg(10, Target::Import(0), put, &[], false),
    ));
    assert!(matches!(
        feed(&mut g, &call_msg(1, Target::Import(0), get, &[], false)),
        Verdict::Deliver
    ));
    assert!(matches!(
        feed(&mut g, &call_msg(2, Target::Import(0), get, &[], false)),
        Verdict::Deliver
    ));
    let (_, kind, reason, _) = denial(feed(
        &mut g,
        &call_msg(3, Target::Import(0), get, &[], false),
    ));
    assert_eq!(kind, exception::Type::Overloaded);
    assert!(
        reason.contains("calls_per_second = 2000 with burst = 200 exceeded"),
        "{reason}"
    );
    assert_eq!(g.denials().rate, 1);
}

#[derive(Clone, Debug)]
enum Op {
    Call {
        q: u32,
        target: Option<u32>,
        allowed: bool,
        caps: u8,
    },
    Finish(u32),
    Return(u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u32..12, prop::option::of(0u32..12), any::<bool>(), 0u8..3).prop_map(
            |(q, target, allowed, caps)| Op::Call {
                q,
                target,
                allowed,
                caps
            }
        ),
        (0u32..12).prop_map(Op::Finish),
        (0u32..12).prop_map(Op::Return),
    ]
}

proptest! {
    /// Against a small model: a call that targets a denied answer is never delivered, a
    /// denied question's Finish is never delivered, nothing panics, and once every question
    /// is returned and finished nothing is in flight and only cancelled answers stay open.
    #[test]
    fn guard_against_model(ops in prop::collection::vec(op(), 0..80)) {
        let mut g = guard();
        let get = method("Reader", "get");
        let put = method("Namespace", "put");
        // Model: id -> denied?
        let mut open: std::collections::HashMap<u32, bool> = Default::default();
        let mut running: std::collections::HashSet<u32> = Default::default();
        let mut cancelled: std::collections::HashSet<u32> = Default::default();
        for op in ops {
            match op {
                Op::Call { q, target, allowed, caps } => {
                    let t = target.map_or(Target::Import(0), Target::Answer);
                    let cap_list: Vec<Cap> = (0..caps).map(|i| Cap::SenderHosted(u32::from(i))).collect();
                    let v = feed(&mut g, &call_msg(q, t, if allowed { get } else { put }, &cap_list, false));
                    if open.contains_key(&q) {
                        prop_assert!(matches!(v, Verdict::Abort(_)));
                        // The connection would be closed: stop here.
                        return Ok(());
                    }
                    let on_denied = target.is_some_and(|a| open.get(&a) == Some(&true));
                    match v {
                        Verdict::Deliver => {
                            prop_assert!(allowed && !on_denied, "delivered a call that must be denied");
                            open.insert(q, false);
                            running.insert(q);
                        }
                        Verdict::Reply(r) => {
                            prop_assert!(!allowed || on_denied);
                            prop_assert_eq!(frames(&r).len(), 1 + caps as usize);
                            open.insert(q, true);
                        }
                        Verdict::Abort(_) => prop_assert!(false, "unexpected abort"),
                    }
                }
                Op::Finish(q) => {
                    let v = feed(&mut g, &finish_msg(q));
                    match open.get(&q) {
                        Some(true) => {
                            prop_assert!(matches!(v, Verdict::Reply(ref r) if r.is_empty()));
                            open.remove(&q);
                        }
                        Some(false) => {
                            prop_assert!(matches!(v, Verdict::Deliver));
                            if running.remove(&q) {
                                // Cancelled before it returned: capnp-rpc keeps the answer
                                // for the connection's life, and so does the accounting.
                                cancelled.insert(q);
                            } else if !cancelled.contains(&q) {
                                open.remove(&q);
                            }
                        }
                        None => prop_assert!(matches!(v, Verdict::Deliver)),
                    }
                }
                Op::Return(q) => {
                    if running.remove(&q) {
                        send(&mut g, &return_msg(q));
                    }
                }
            }
            prop_assert_eq!(g.in_flight_calls(), running.len());
        }
        // Return and finish everything still open.
        for q in running.clone() {
            send(&mut g, &return_msg(q));
        }
        for q in open.keys().copied().collect::<Vec<_>>() {
            feed(&mut g, &finish_msg(q));
        }
        prop_assert_eq!(g.in_flight_calls(), 0);
        prop_assert_eq!(g.open_answers(), cancelled.len());
    }
}

fn return_with_caps(q: u32, caps: &[u32]) -> Builder<HeapAllocator> {
    let mut b = Builder::new_default();
    {
        let mut ret = b.init_root::<message::Builder>().init_return();
        ret.set_answer_id(q);
        let mut table = ret.init_results().init_cap_table(caps.len() as u32);
        for (i, id) in caps.iter().enumerate() {
            table.reborrow().get(i as u32).set_sender_hosted(*id);
        }
    }
    b
}

#[test]
fn exports_are_mirrored_and_over_max_exports_aborts() {
    let mut q = Quotas::default();
    q.max_exports = 3;
    let mut g = Guard::new(
        reader_class(q),
        Arc::new(Unlimited),
        Catalog::builtin().clone(),
    );
    let ns = method("Store", "namespace");
    feed(&mut g, &call_msg(1, Target::Import(0), ns, &[], false));
    g.outgoing(return_with_caps(1, &[10, 11]).get_root_as_reader().unwrap())
        .unwrap();
    assert_eq!(g.exports_held(), 2);
    // Finish(releaseResultCaps = true, the default) gives the result caps back.
    feed(&mut g, &finish_msg(1));
    assert_eq!(g.exports_held(), 0);
    feed(&mut g, &call_msg(2, Target::Import(0), ns, &[], false));
    g.outgoing(
        return_with_caps(2, &[12, 13, 14])
            .get_root_as_reader()
            .unwrap(),
    )
    .unwrap();
    feed(&mut g, &call_msg(3, Target::Import(0), ns, &[], false));
    let err = g
        .outgoing(return_with_caps(3, &[15]).get_root_as_reader().unwrap())
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "capgate: max_exports = 3 exceeded: the peer holds 4 capabilities from this server (client \"reader\"); release capabilities you no longer use"
    );
    // Release brings the count down.
    let mut rel = Builder::new_default();
    {
        let mut r = rel.init_root::<message::Builder>().init_release();
        r.set_id(12);
        r.set_reference_count(1);
    }
    feed(&mut g, &rel);
    assert_eq!(g.exports_held(), 3);
}

#[test]
fn held_bytes_over_max_inflight_bytes_answer_overloaded() {
    let mut q = Quotas::default();
    q.max_inflight_bytes = 1000;
    let mut g = Guard::new(
        reader_class(q),
        Arc::new(Unlimited),
        Catalog::builtin().clone(),
    );
    g.set_held_bytes(900, 200);
    let (_, kind, reason, _) = denial(feed(
        &mut g,
        &call_msg(1, Target::Import(0), method("Reader", "get"), &[], false),
    ));
    assert_eq!(kind, exception::Type::Overloaded);
    assert!(
        reason
            .contains("max_inflight_bytes = 1000 reached (900 bytes of calls held, this one 200)"),
        "{reason}"
    );
    g.set_held_bytes(700, 200);
    assert!(matches!(
        feed(
            &mut g,
            &call_msg(2, Target::Import(0), method("Reader", "get"), &[], false)
        ),
        Verdict::Deliver
    ));
}

fn bootstrap_msg(q: u32) -> Builder<HeapAllocator> {
    let mut b = Builder::new_default();
    b.init_root::<message::Builder>()
        .init_bootstrap()
        .set_question_id(q);
    b
}

#[test]
fn bootstraps_count_against_max_open_answers_and_are_refused_at_the_limit() {
    let mut q = Quotas::default();
    q.max_open_answers = 3;
    let mut g = Guard::new(
        reader_class(q),
        Arc::new(Unlimited),
        Catalog::builtin().clone(),
    );
    for i in 0..3 {
        assert!(matches!(feed(&mut g, &bootstrap_msg(i)), Verdict::Deliver));
    }
    let (id, kind, reason, releases) = denial(feed(&mut g, &bootstrap_msg(3)));
    assert_eq!((id, kind), (3, exception::Type::Overloaded));
    assert_eq!(
        reason,
        "overloaded: Bootstrap refused: max_open_answers = 3 reached (3 answers open: calls \
         and bootstraps not yet finished) for client \"reader\""
    );
    assert!(releases.is_empty());
    assert_eq!(g.denials().open_answers, 1);
    // A call pipelined on the refused bootstrap is refused the same way.
    let (_, kind, again, _) = denial(feed(
        &mut g,
        &call_msg(4, Target::Answer(3), method("Reader", "get"), &[], false),
    ));
    assert_eq!((kind, again), (exception::Type::Overloaded, reason));
    // Refusals are answers too: a peer that never finishes them is cut off.
    let mut aborted = None;
    for i in 5..100 {
        if let Verdict::Abort(r) = feed(&mut g, &bootstrap_msg(i)) {
            aborted = Some(r);
            break;
        }
    }
    let r = aborted.expect("the answer table is bounded").to_string();
    assert!(
        r.starts_with("capgate: max_open_answers = 3 exceeded"),
        "{r}"
    );
    assert!(g.open_answers() <= 2 * 3 + 16);
}

#[test]
fn a_cap_table_over_max_caps_per_message_aborts_before_any_reply() {
    let mut q = Quotas::default();
    q.max_caps_per_message = 4;
    let mut g = Guard::new(
        reader_class(q),
        Arc::new(Unlimited),
        Catalog::builtin().clone(),
    );
    let caps: Vec<Cap> = (0..5).map(Cap::SenderHosted).collect();
    // Denied (sendResultsTo.yourself) and allowed calls alike.
    for (m, yourself) in [
        (method("Reader", "get"), true),
        (method("Reader", "get"), false),
    ] {
        match feed(&mut g, &call_msg(1, Target::Import(0), m, &caps, yourself)) {
            Verdict::Abort(r) => assert_eq!(
                r.to_string(),
                "capgate: max_caps_per_message = 4 exceeded: a Call carries 5 capabilities in its cap \
                 table (client \"reader\"); raise max_caps_per_message in the policy if that \
                 many are meant"
            ),
            v => panic!("expected an abort, got {v:?}"),
        }
    }
    // At the limit it is an ordinary call.
    let v = feed(
        &mut g,
        &call_msg(
            1,
            Target::Import(0),
            method("Reader", "get"),
            &caps[..4],
            false,
        ),
    );
    assert!(matches!(v, Verdict::Deliver));
}

/// The reply to a denied `Namespace.put` carrying `caps`, and the size of the call.
fn denied_put_reply(caps: &[Cap]) -> (Box<[u8]>, usize) {
    let mut g = guard();
    let call = call_msg(
        2,
        Target::Import(0),
        method("Namespace", "put"),
        caps,
        false,
    );
    let Verdict::Reply(bytes) = feed(&mut g, &call) else {
        panic!("expected a denial")
    };
    (
        bytes,
        capnp::serialize::compute_serialized_size_in_words(&call) * 8,
    )
}

#[test]
fn a_denied_call_with_many_references_to_one_capability_costs_one_release() {
    let (bytes, sent) = denied_put_reply(&vec![Cap::SenderHosted(9); 1000]);
    // The Return and one Release{9, 1000}, in a buffer of exactly their size.
    assert_eq!(frames(&bytes).len(), 2);
    assert!(
        bytes.len() < 400 && bytes.len() < sent / 10,
        "{} bytes",
        bytes.len()
    );
}

#[test]
fn a_denial_reply_is_at_most_a_small_multiple_of_the_call() {
    // Distinct capabilities: each costs a Release (40 bytes) for its 16-byte descriptor.
    let caps: Vec<Cap> = (0..1000).map(Cap::SenderPromise).collect();
    let (bytes, sent) = denied_put_reply(&caps);
    assert_eq!(frames(&bytes).len(), 1001);
    assert!(
        bytes.len() <= 3 * sent,
        "{} bytes for {sent} sent",
        bytes.len()
    );
}

mod methods;
