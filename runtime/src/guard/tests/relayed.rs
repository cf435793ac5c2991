//! A relay's guard (`incoming_relayed`, `outgoing_relayed`): the forms a relay cannot account
//! for are refused in the same walk as the accounting, after the guard's own judgement for
//! calls and returns.

use super::*;

fn relayed(g: &mut Guard, b: &Builder<HeapAllocator>) -> Verdict {
    g.incoming_relayed(b.get_root_as_reader().unwrap())
}

fn unsupported(v: Verdict) -> String {
    match v {
        Verdict::Abort(AbortReason::Unsupported { what }) => what,
        v => panic!("expected an Unsupported abort, got {v:?}"),
    }
}

/// A call of `m` as question `q` whose params carry one third-party capability.
fn third_party_call(q: u32, m: MethodRef) -> Builder<HeapAllocator> {
    let mut b = call_msg(q, Target::Import(0), m, &[], false);
    {
        let message::Call(Ok(c)) = b.get_root::<message::Builder>().unwrap().which().unwrap()
        else {
            unreachable!()
        };
        let mut table = c.init_params().init_cap_table(1);
        table
            .reborrow()
            .get(0)
            .init_third_party_hosted()
            .set_vine_id(1);
    }
    b
}

#[test]
fn a_level_3_message_gets_its_unimplemented_echo_and_leaves_no_state() {
    let mut g = guard();
    let mut b = Builder::new_default();
    b.init_root::<message::Builder>()
        .init_provide()
        .set_question_id(5);
    let Verdict::Reply(bytes) = relayed(&mut g, &b) else {
        panic!("a Provide is answered by the relay")
    };
    let echoed = frames(&bytes);
    assert_eq!(echoed.len(), 1);
    let root = echoed[0].get_root::<message::Reader>().unwrap();
    let message::Unimplemented(Ok(inner)) = root.which().unwrap() else {
        panic!("not an Unimplemented echo")
    };
    let message::Provide(Ok(p)) = inner.which().unwrap() else {
        panic!("the echo does not carry the Provide")
    };
    assert_eq!(p.get_question_id(), 5);
    assert_eq!(g.open_answers(), 0);
    // The same message from the upstream: refused as a kind, nothing accounted.
    assert!(matches!(
        g.outgoing_relayed(b.get_root_as_reader().unwrap()),
        Ok(Some(Refusal::Unimplemented))
    ));
}

#[test]
fn an_allowed_call_with_a_third_party_capability_aborts_a_denied_one_is_denied() {
    let mut g = guard();
    let what = unsupported(relayed(
        &mut g,
        &third_party_call(1, method("Namespace", "get")),
    ));
    assert_eq!(what, "a third-party capability (thirdPartyHosted)");
    // Judged by the guard first: a call the class may not make gets its denial, whatever
    // its params hold, and the connection stays.
    let mut g = guard();
    let (q, _, reason, _) = denial(relayed(
        &mut g,
        &third_party_call(2, method("Namespace", "put")),
    ));
    assert_eq!(q, 2);
    assert!(
        reason.starts_with("permission denied: Namespace.put"),
        "{reason}"
    );
    assert_eq!(g.in_flight_calls(), 0);
}

#[test]
fn plain_messages_are_delivered_and_accounted_as_by_the_plain_guard() {
    let mut g = guard();
    let v = relayed(
        &mut g,
        &call_msg(1, Target::Import(0), method("Namespace", "get"), &[], false),
    );
    assert!(matches!(v, Verdict::Deliver));
    assert_eq!(g.in_flight_calls(), 1);
    let ret = return_msg(1);
    assert!(matches!(
        g.outgoing_relayed(ret.get_root_as_reader().unwrap()),
        Ok(None)
    ));
    assert_eq!(g.in_flight_calls(), 0);
    assert!(matches!(relayed(&mut g, &finish_msg(1)), Verdict::Deliver));
    assert_eq!(g.open_answers(), 0);
}

#[test]
fn a_return_with_accept_from_third_party_is_refused_before_any_accounting() {
    let mut g = guard();
    assert!(matches!(
        relayed(
            &mut g,
            &call_msg(1, Target::Import(0), method("Namespace", "get"), &[], false)
        ),
        Verdict::Deliver
    ));
    let mut b = Builder::new_default();
    {
        let mut r = b.init_root::<message::Builder>().init_return();
        r.set_answer_id(1);
        r.init_accept_from_third_party();
    }
    match g.outgoing_relayed(b.get_root_as_reader().unwrap()) {
        Ok(Some(Refusal::Abort(AbortReason::Unsupported { what }))) => {
            assert_eq!(what, "a Return with acceptFromThirdParty")
        }
        Ok(Some(Refusal::Abort(other))) => panic!("another reason: {other:?}"),
        Ok(Some(Refusal::Unimplemented)) => panic!("refused as a kind"),
        Ok(None) => panic!("passed on"),
        Err(e) => panic!("accounting error {e:?}"),
    }
    assert_eq!(
        g.in_flight_calls(),
        1,
        "the refused Return is not accounted"
    );
    // A results Return is checked too.
    let mut b = Builder::new_default();
    {
        let mut r = b.init_root::<message::Builder>().init_return();
        r.set_answer_id(1);
        r.init_results()
            .init_cap_table(1)
            .get(0)
            .init_third_party_hosted();
    }
    assert!(matches!(
        g.outgoing_relayed(b.get_root_as_reader().unwrap()),
        Ok(Some(Refusal::Abort(AbortReason::Unsupported { .. })))
    ));
}

#[test]
fn a_disembargo_for_a_three_party_handoff_aborts() {
    let mut g = guard();
    let mut b = Builder::new_default();
    {
        let mut d = b.init_root::<message::Builder>().init_disembargo();
        d.reborrow().init_target().set_imported_cap(0);
        d.init_context().set_accept(());
    }
    assert_eq!(
        unsupported(relayed(&mut g, &b)),
        "a Disembargo for a three-party handoff"
    );
}
