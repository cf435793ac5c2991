//! Class quotas: calls and bytes in flight, open answers (bootstraps too), the rate budget,
//! capabilities per message and exports.

use std::sync::atomic::{AtomicU32, Ordering};

use super::*;

#[test]
fn in_flight_and_open_answer_quotas_answer_overloaded() {
    let mut q = Quotas::default();
    q.max_inflight_calls = 2;
    q.max_open_answers = 3;
    let mut g = guard_with(q);
    let get = method("Reader", "get");
    for id in 0..2 {
        assert!(matches!(feed_call(&mut g, id, get), Verdict::Deliver));
    }
    let reason = overloaded(feed_call(&mut g, 9, get));
    assert_eq!(
        reason,
        "overloaded: Reader.get refused: max_inflight_calls = 2 reached (2 calls in flight on this connection) for client \"reader\""
    );
    feed(&mut g, &finish_msg(9));
    // Cancel both (Finish before Return): no longer in flight, but their answers stay open.
    feed(&mut g, &finish_msg(0));
    feed(&mut g, &finish_msg(1));
    assert_eq!((g.in_flight_calls(), g.open_answers()), (0, 2));
    assert!(matches!(feed_call(&mut g, 5, get), Verdict::Deliver));
    let reason = overloaded(feed_call(&mut g, 6, get));
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
    denial(feed_call(&mut g, 10, put));
    assert!(matches!(feed_call(&mut g, 1, get), Verdict::Deliver));
    assert!(matches!(feed_call(&mut g, 2, get), Verdict::Deliver));
    let reason = overloaded(feed_call(&mut g, 3, get));
    assert!(
        reason.contains("calls_per_second = 2000 with burst = 200 exceeded"),
        "{reason}"
    );
    assert_eq!(g.denials().rate, 1);
}

#[test]
fn held_bytes_over_max_inflight_bytes_answer_overloaded() {
    let mut q = Quotas::default();
    q.max_inflight_bytes = 1000;
    let mut g = guard_with(q);
    g.set_held_bytes(900, 200);
    let reason = overloaded(feed_call(&mut g, 1, method("Reader", "get")));
    assert!(
        reason
            .contains("max_inflight_bytes = 1000 reached (900 bytes of calls held, this one 200)"),
        "{reason}"
    );
    g.set_held_bytes(700, 200);
    assert!(matches!(
        feed_call(&mut g, 2, method("Reader", "get")),
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
    let mut g = guard_with(q);
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
    let mut g = guard_with(q);
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
    let mut g = guard_with(q);
    let ns = method("Store", "namespace");
    feed_call(&mut g, 1, ns);
    g.outgoing(return_with_caps(1, &[10, 11]).get_root_as_reader().unwrap())
        .unwrap();
    assert_eq!(g.exports_held(), 2);
    // Finish(releaseResultCaps = true, the default) gives the result caps back.
    feed(&mut g, &finish_msg(1));
    assert_eq!(g.exports_held(), 0);
    feed_call(&mut g, 2, ns);
    g.outgoing(
        return_with_caps(2, &[12, 13, 14])
            .get_root_as_reader()
            .unwrap(),
    )
    .unwrap();
    feed_call(&mut g, 3, ns);
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
fn result_caps_stay_held_without_release_result_caps_and_are_released_once() {
    let mut g = guard();
    let ns = method("Store", "namespace");
    let finish = |q: u32, release: bool| {
        let mut b = Builder::new_default();
        {
            let mut f = b.init_root::<message::Builder>().init_finish();
            f.set_question_id(q);
            f.set_release_result_caps(release);
        }
        b
    };
    feed_call(&mut g, 1, ns);
    g.outgoing(return_with_caps(1, &[10]).get_root_as_reader().unwrap())
        .unwrap();
    feed(&mut g, &finish(1, false));
    assert_eq!(g.exports_held(), 1, "the peer kept the result's capability");
    // The answer is gone: a second Finish for the id releases nothing more.
    feed_call(&mut g, 2, ns);
    g.outgoing(return_with_caps(2, &[10, 11]).get_root_as_reader().unwrap())
        .unwrap();
    assert_eq!(g.exports_held(), 2);
    feed(&mut g, &finish(2, true));
    feed(&mut g, &finish(2, true));
    assert_eq!(g.exports_held(), 1, "export 10 is still held once");
}

#[test]
fn result_caps_of_an_answer_not_kept_are_released_by_its_finish() {
    let mut g = guard();
    let ns = method("Store", "namespace");
    // A foreign callee may say noFinishNeeded on results with capabilities; the peer may
    // still finish the question.
    feed_call(&mut g, 1, ns);
    let mut ret = return_with_caps(1, &[20]);
    {
        let root = ret.get_root::<message::Builder>().unwrap();
        if let Ok(message::Which::Return(Ok(mut r))) = root.which() {
            r.set_no_finish_needed(true);
        }
    }
    g.outgoing(ret.get_root_as_reader().unwrap()).unwrap();
    assert_eq!(g.exports_held(), 1);
    feed(&mut g, &finish_msg(1));
    assert_eq!(g.exports_held(), 0);
}

#[test]
fn an_unimplemented_echo_of_our_resolve_takes_its_capability_off_the_mirror() {
    let mut g = guard();
    let resolve = |m: message::Builder<'_>| {
        let mut r = m.init_resolve();
        r.set_promise_id(7);
        r.init_cap().set_sender_hosted(30);
    };
    let mut ours = Builder::new_default();
    resolve(ours.init_root::<message::Builder>());
    g.outgoing(ours.get_root_as_reader().unwrap()).unwrap();
    assert_eq!(g.exports_held(), 1);
    let mut echo = Builder::new_default();
    resolve(echo.init_root::<message::Builder>().init_unimplemented());
    assert!(matches!(feed(&mut g, &echo), Verdict::Deliver));
    assert_eq!(g.exports_held(), 0, "the peer never took it");
}
