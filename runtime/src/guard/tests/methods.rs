//! Per-method quotas in the guard, with an injected clock: exact counts.

use std::num::NonZeroU32;

use capgate_policy::MethodQuota;
use governor::clock::FakeRelativeClock;

use super::*;
use crate::CallRate;

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap()
}

/// A writer allowed everything, with `rules` as method rules.
fn writer(rules: Vec<MethodQuota>) -> Arc<ClientClass> {
    let mut class = ClientClass::new("writer", Matcher::Any).allow_all();
    for r in rules {
        class = class.with_method_quota(r);
    }
    Arc::new(class)
}

fn rule(pattern: &str) -> MethodQuota {
    MethodQuota::new(pattern, Catalog::builtin()).unwrap()
}

fn put(q: u32) -> Builder<HeapAllocator> {
    call_msg(q, Target::Import(0), method("Namespace", "put"), &[], false)
}

fn get(q: u32) -> Builder<HeapAllocator> {
    call_msg(q, Target::Import(0), method("Namespace", "get"), &[], false)
}

/// A guard whose method rates are measured by `clock`.
fn guard_with_clock(class: Arc<ClientClass>, clock: &FakeRelativeClock) -> Guard {
    let rates = class
        .method_quotas()
        .iter()
        .map(|r| {
            r.rate.map(|r| {
                Arc::new(CallRate::with_clock(r.calls_per_second, r.burst, clock))
                    as Arc<dyn RateLimit>
            })
        })
        .collect();
    let mut g = Guard::new(class, Arc::new(Unlimited), Catalog::builtin().clone());
    g.set_method_rates(rates);
    g
}

#[test]
fn burst_five_lets_exactly_five_through_then_one_per_refill_and_other_methods_are_untouched() {
    let clock = FakeRelativeClock::default();
    let mut g = guard_with_clock(
        writer(vec![rule("Namespace.put").with_rate(nz(5), nz(5))]),
        &clock,
    );
    let mut q = 0;
    let mut passed = 0;
    for _ in 0..20 {
        q += 1;
        match feed(&mut g, &put(q)) {
            Verdict::Deliver => passed += 1,
            v => {
                let (id, kind, reason, _) = denial(v);
                assert_eq!((id, kind), (q, exception::Type::Overloaded));
                assert_eq!(
                    reason,
                    "overloaded: Namespace.put refused: calls_per_second = 5 with burst = 5 \
                     exceeded for client \"writer\""
                );
            }
        }
        // Another method of the same client is not limited by the rule.
        q += 1;
        assert!(matches!(feed(&mut g, &get(q)), Verdict::Deliver));
    }
    assert_eq!(passed, 5);
    assert_eq!(g.denials().method_rate, 15);
    assert_eq!(g.denials().rate, 0);
    // One call's worth refills in 200 ms.
    clock.advance(std::time::Duration::from_millis(200));
    assert!(matches!(feed(&mut g, &put(1000)), Verdict::Deliver));
    assert!(matches!(feed(&mut g, &put(1001)), Verdict::Reply(_)));
}

#[test]
fn max_inflight_calls_of_a_method_counts_until_return_or_finish() {
    let mut g = Guard::new(
        writer(vec![rule("Namespace.put").with_max_inflight_calls(2)]),
        Arc::new(Unlimited),
        Catalog::builtin().clone(),
    );
    assert!(matches!(feed(&mut g, &put(1)), Verdict::Deliver));
    assert!(matches!(feed(&mut g, &put(2)), Verdict::Deliver));
    let reason = overloaded(feed(&mut g, &put(3)));
    assert_eq!(
        reason,
        "overloaded: Namespace.put refused: max_inflight_calls = 2 reached (2 calls in flight \
         on this connection) for client \"writer\""
    );
    assert!(matches!(feed(&mut g, &get(4)), Verdict::Deliver));
    // A Return frees one slot, a Finish of a running call (a cancel) another.
    send(&mut g, &return_msg(1));
    assert!(matches!(feed(&mut g, &put(5)), Verdict::Deliver));
    assert!(matches!(feed(&mut g, &finish_msg(2)), Verdict::Deliver));
    assert!(matches!(feed(&mut g, &put(6)), Verdict::Deliver));
    assert!(matches!(feed(&mut g, &put(7)), Verdict::Reply(_)));
    assert_eq!(g.denials().method_inflight_calls, 2);
}

#[test]
fn a_wildcard_rule_is_one_budget_for_its_methods_and_names_itself_in_the_denial() {
    let mut g = Guard::new(
        writer(vec![rule("Namespace.*").with_max_inflight_calls(1)]),
        Arc::new(Unlimited),
        Catalog::builtin().clone(),
    );
    assert!(matches!(feed(&mut g, &put(1)), Verdict::Deliver));
    let (_, _, reason, _) = denial(feed(&mut g, &get(2)));
    assert_eq!(
        reason,
        "overloaded: Reader.get refused: max_inflight_calls = 1 reached (1 calls in flight on \
         this connection) (method rule \"Namespace.*\") for client \"writer\""
    );
    let store = call_msg(
        3,
        Target::Import(0),
        method("Store", "namespace"),
        &[],
        false,
    );
    assert!(matches!(feed(&mut g, &store), Verdict::Deliver));
}

#[test]
fn a_method_denial_takes_no_token_of_the_class_rate() {
    let clock = FakeRelativeClock::default();
    let class_rate = Arc::new(CallRate::with_clock(nz(1), nz(3), &clock));
    let mut g = Guard::new(
        writer(vec![rule("Namespace.put").with_max_inflight_calls(0)]),
        class_rate,
        Catalog::builtin().clone(),
    );
    for q in 0..10 {
        assert!(matches!(feed(&mut g, &put(q)), Verdict::Reply(_)));
    }
    // The class's burst of 3 is whole.
    for q in 10..13 {
        assert!(matches!(feed(&mut g, &get(q)), Verdict::Deliver));
    }
    assert!(matches!(feed(&mut g, &get(13)), Verdict::Reply(_)));
}

#[test]
fn a_reload_counts_calls_in_flight_under_the_new_rules() {
    let mut g = Guard::new(
        writer(vec![]),
        Arc::new(Unlimited),
        Catalog::builtin().clone(),
    );
    assert!(matches!(feed(&mut g, &put(1)), Verdict::Deliver));
    assert!(matches!(feed(&mut g, &put(2)), Verdict::Deliver));
    g.set_class(
        writer(vec![rule("Namespace.put").with_max_inflight_calls(2)]),
        Arc::new(Unlimited),
    );
    assert!(matches!(feed(&mut g, &put(3)), Verdict::Reply(_)));
    send(&mut g, &return_msg(1));
    assert!(matches!(feed(&mut g, &put(4)), Verdict::Deliver));
    // And a reload that drops the rule lifts it.
    g.set_class(writer(vec![]), Arc::new(Unlimited));
    assert!(matches!(feed(&mut g, &put(5)), Verdict::Deliver));
}
