//! The policy through the gateway: class and per-method quotas, the exports mirror against
//! an upstream that is not capgate, reload on a live pair, and pipelining through it.

mod common;

use std::time::{Duration, Instant};

use capgate::demo::{LatencyProxy, Store};
use capgate::store_capnp::{namespace, reader, store};
use capgate::{cast, Catalog, Client, ClientClass, Matcher, MethodQuota, Policy, Quotas};
use common::store_scenario::{churn_then_hoard, time_pipelined_chain};
use common::upstream::{TestGateway, TwopartyUpstream};
use common::*;

/// Every method allowed under `q`, the rate out of the way (these tests are not about it and
/// run as fast as the machine).
fn everyone(mut q: Quotas) -> ClientClass {
    q.calls_per_second = std::num::NonZeroU32::MAX;
    q.burst = std::num::NonZeroU32::MAX;
    ClientClass::new("everyone", Matcher::Any)
        .allow_all()
        .with_quotas(q)
}

fn open(s: &store::Client, name: &str) -> namespace::Client {
    let mut req = s.namespace_request();
    req.get().set_name(name);
    req.send().pipeline.get_ns()
}

fn wait(
    ns: &namespace::Client,
) -> capnp::capability::RemotePromise<namespace::wait_results::Owned> {
    let mut w = ns.wait_request();
    w.get().set_key("never");
    w.send()
}

/// A namespace whose capability has resolved (calls on it no longer pipeline on `namespace`).
async fn resolved(s: &store::Client, name: &str) -> namespace::Client {
    let mut req = s.namespace_request();
    req.get().set_name(name);
    req.send()
        .promise
        .await
        .unwrap()
        .get()
        .unwrap()
        .get_ns()
        .unwrap()
}

#[test]
fn a_method_rule_answers_overloaded_at_the_gateway() {
    let up = TwopartyUpstream::start(Store::new());
    let mut q = Quotas::default();
    q.max_inflight_calls = 2;
    let rule = MethodQuota::new("Namespace.wait", Catalog::builtin())
        .unwrap()
        .with_max_inflight_calls(1);
    let policy = Policy::from_classes(vec![everyone(q).with_method_quota(rule)]);
    let gw = TestGateway::start(up.upstream(), quick_limits(), Some(policy));
    local(async {
        let c = Client::connect(gw.addr).await.unwrap();
        let s: store::Client = c.bootstrap();
        let ns = resolved(&s, "q").await;
        // Calls on one connection reach the guard in the order sent: the first wait is in
        // flight when the second arrives.
        let first = wait(&ns);
        let e = wait(&ns).promise.await.err().expect("the rule's limit");
        assert_eq!(e.kind, capnp::ErrorKind::Overloaded);
        assert!(
            e.extra.contains(
                "overloaded: Namespace.wait refused: max_inflight_calls = 1 reached (1 calls in \
                 flight on this connection)"
            ),
            "{e}"
        );
        drop(first);
    });
    gw.stop().unwrap();
}

#[test]
fn the_class_in_flight_limit_answers_overloaded_at_the_gateway() {
    let up = TwopartyUpstream::start(Store::new());
    let mut q = Quotas::default();
    q.max_inflight_calls = 2;
    let gw = TestGateway::start(
        up.upstream(),
        quick_limits(),
        Some(Policy::from_classes(vec![everyone(q)])),
    );
    local(async {
        let c = Client::connect(gw.addr).await.unwrap();
        let s: store::Client = c.bootstrap();
        let ns = resolved(&s, "q").await;
        let held = (wait(&ns), wait(&ns));
        let e = s
            .namespaces_request()
            .send()
            .promise
            .await
            .err()
            .expect("over the limit");
        assert_eq!(e.kind, capnp::ErrorKind::Overloaded);
        assert!(
            e.extra.contains(
                "max_inflight_calls = 2 reached (2 calls in flight on this connection) for \
                 client \"everyone\""
            ),
            "{e}"
        );
        drop(held);
        // Cancelled (Finish sent): room again once the upstream answers the cancellations.
        let deadline = Instant::now() + Duration::from_secs(10);
        while s.namespaces_request().send().promise.await.is_err() {
            assert!(Instant::now() < deadline, "in-flight count never went down");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    gw.stop().unwrap();
}

#[test]
fn the_exports_mirror_holds_against_an_upstream_that_is_not_capgate() {
    let up = TwopartyUpstream::start(Store::new());
    let mut q = Quotas::default();
    q.max_exports = 100;
    let gw = TestGateway::start(
        up.upstream(),
        quick_limits(),
        Some(Policy::from_classes(vec![everyone(q)])),
    );
    local(async {
        let c = Client::connect(gw.addr).await.unwrap();
        let s: store::Client = c.bootstrap();
        // Create and drop, 2,000 times: every Release reaches the mirror; then hoard.
        let (held, failure) = churn_then_hoard(&s, 2000).await;
        assert!((98..=101).contains(&held), "{held} held");
        assert_eq!(
            failure.extra,
            format!(
                "the peer aborted the connection: capgate: max_exports = 100 exceeded: the peer \
                 holds 101 capabilities from \
                 upstream {} through this gateway (client \"everyone\"); release capabilities \
                 you no longer use",
                up.upstream().name()
            )
        );
    });
    assert_served(gw.addr);
    gw.stop().unwrap();
}

#[test]
fn a_reload_applies_to_a_live_relayed_connection() {
    let up = TwopartyUpstream::start(Store::new());
    let gw = TestGateway::start(
        up.upstream(),
        quick_limits(),
        Some(Policy::from_classes(vec![everyone(Quotas::default())])),
    );
    local(async {
        let c = Client::connect(gw.addr).await.unwrap();
        let s: store::Client = c.bootstrap();
        let ns = open(&s, "r");
        let mut put = ns.put_request();
        put.get().set_key("k");
        put.get().set_value(b"v");
        put.send().promise.await.expect("allowed before the reload");
        let mut reader = ClientClass::new("reader", Matcher::Any).with_quotas(Quotas::default());
        for a in ["Store.namespace", "Reader.*"] {
            reader = reader.allow(a, Catalog::builtin()).unwrap();
        }
        gw.policy.replace(Policy::from_classes(vec![reader]));
        let deadline = Instant::now() + Duration::from_secs(10);
        let e = loop {
            assert!(Instant::now() < deadline, "the reload never applied");
            let mut put = ns.put_request();
            put.get().set_key("k2");
            put.get().set_value(b"v");
            match put.send().promise.await {
                Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(e) => break e,
            }
        };
        assert_eq!(
            e.extra,
            "remote exception: permission denied: Namespace.put is not allowed for client \"reader\""
        );
        let mut get = cast::<reader::Client>(&ns).get_request();
        get.get().set_key("k");
        assert!(get.send().promise.await.unwrap().get().unwrap().get_found());
    });
    gw.stop().unwrap();
}

const ONE_WAY: Duration = Duration::from_millis(10);
const RTT: Duration = Duration::from_millis(20);

#[test]
fn a_four_call_chain_through_the_gateway_costs_about_one_round_trip() {
    let up = TwopartyUpstream::start(Store::new());
    let gw = TestGateway::start(up.upstream(), quick_limits(), None);
    local(async {
        let proxy = LatencyProxy::start(gw.addr, ONE_WAY).await.unwrap();
        let client = Client::connect(proxy.local_addr()).await.unwrap();
        let s: store::Client = client.bootstrap();
        let pipelined = time_pipelined_chain(&s).await;
        // Four calls awaited one by one would take four round trips (80 ms) at least.
        assert!(
            pipelined < 3 * RTT,
            "pipelined chain took {pipelined:?} (RTT {RTT:?})"
        );
    });
    gw.stop().unwrap();
}
