//! The guard's cost of per-method rules: a class with 20 method rules (one of them covering
//! the benchmarked Echo.echo with a rate and an in-flight limit it never reaches) against the
//! same class with none, side by side in one run: sequential latency and throughput at 128
//! calls in flight on one connection.
//!
//! `cargo bench --bench method_quotas` (full), `cargo bench --bench method_quotas -- --test`
//! (smoke).

use std::num::{NonZeroU32, NonZeroUsize};

use capgate::demo::EchoService;
use capgate::{Catalog, ClientClass, Matcher, MethodQuota, Policy, Server};

mod common;

fn roomy() -> ClientClass {
    ClientClass::new("bench", Matcher::Any)
        .allow_all()
        .with_quotas(common::roomy_quotas())
}

/// 19 rules on the Store's methods and one on Echo.echo, each with a rate and an in-flight
/// limit: the call path checks both for every echo call.
fn with_rules(catalog: &Catalog) -> ClientClass {
    let store = [
        "Store.namespace",
        "Store.namespaces",
        "Store.remove",
        "Reader.get",
        "Reader.list",
        "Namespace.put",
        "Namespace.delete",
        "Namespace.sub",
        "Namespace.readOnly",
        "Namespace.watch",
        "Namespace.wait",
        "Namespace.remove",
        "Namespace.*",
        "Reader.*",
        "Store.*",
        "Watcher.changed",
        "Subscription.cancel",
        "Watcher.*",
        "Subscription.*",
    ];
    let nz = |n| NonZeroU32::new(n).unwrap();
    let mut class = roomy();
    for p in store {
        class = class.with_method_quota(
            MethodQuota::new(p, catalog)
                .unwrap()
                .with_rate(nz(100), nz(10))
                .with_max_inflight_calls(4),
        );
    }
    class.with_method_quota(
        MethodQuota::new("Echo.echo", catalog)
            .unwrap()
            .with_rate(NonZeroU32::MAX, NonZeroU32::MAX)
            .with_max_inflight_calls(100_000),
    )
}

fn start(class: ClientClass) -> std::net::SocketAddr {
    let server = Server::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .workers(NonZeroUsize::new(1).unwrap())
        .policy(Policy::from_classes(vec![class]))
        .bootstrap_factory(|_| EchoService.client())
        .build()
        .unwrap();
    common::serve_on_thread(server)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--test");
    let (rounds, seq, total) = if quick {
        (1, 50, 500)
    } else {
        (9, 2_000, 20_000)
    };
    let catalog = Catalog::builtin();
    let ruled = with_rules(catalog);
    assert_eq!(ruled.method_quotas().len(), 20);
    let servers = [("no rules", start(roomy())), ("20 rules", start(ruled))];
    let (lat, thr) = common::side_by_side(&servers, rounds, seq, total);
    println!("20 rules / none: sequential p50 {lat:.2}, throughput {thr:.2}");
}
