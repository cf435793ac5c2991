//! Random sequences of calls, finishes and returns against a small model of the answer table.

use proptest::prelude::*;

use super::*;

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
