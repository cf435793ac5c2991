//! The call path: allowed calls, denials and the replies they get (a Return and the
//! Releases of the sender's capabilities), calls pipelined on denied answers, question ids,
//! `sendResultsTo`.

use super::*;

#[test]
fn allowed_call_is_delivered_and_accounting_returns_to_zero() {
    let mut g = guard();
    let v = feed_call(&mut g, 1, method("Namespace", "get"));
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
    assert!(matches!(feed_call(&mut g, 1, get), Verdict::Deliver));
    match feed_call(&mut g, 1, get) {
        Verdict::Abort(r) => assert_eq!(
            r.to_string(),
            "capgate: protocol violation: question id 1 reused while its previous use is still open (call in flight)"
        ),
        v => panic!("{v:?}"),
    }
    // Denied and not finished: also open.
    denial(feed_call(&mut g, 2, method("Namespace", "put")));
    assert!(matches!(
        feed_call(&mut g, 2, get),
        Verdict::Abort(r) if r.to_string().contains("(denied, not finished)")
    ));
    // Finished: free to reuse.
    feed(&mut g, &finish_msg(2));
    assert!(matches!(feed_call(&mut g, 2, get), Verdict::Deliver));
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
