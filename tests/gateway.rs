//! `capgate gateway` as a library (`Gateway::builder`) in front of a plain capnp-rust
//! `twoparty` server: the Store scenario relayed unchanged, the policy enforced at the
//! gateway, and upstream faults (unreachable, gone mid-call, restarted).

mod common;

use std::time::{Duration, Instant};

use capgate::demo::Store;
use capgate::store_capnp::{namespace, reader, store};
use capgate::{cast, Catalog, Client, ClientClass, Matcher, Policy, Quotas, Upstream};
use common::store_scenario::*;
use common::upstream::{TestGateway, TwopartyUpstream, Where};
use common::*;

fn class(name: &str, allow: &[&str], q: Quotas) -> ClientClass {
    let mut c = ClientClass::new(name, Matcher::Any).with_quotas(q);
    for a in allow {
        c = c.allow(a, Catalog::builtin()).unwrap();
    }
    c
}

fn reader_policy() -> Policy {
    Policy::from_classes(vec![class(
        "reader",
        &["Store.namespace", "Reader.*", "Namespace.readOnly"],
        Quotas::default(),
    )])
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("capgate-gw-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn every_store_method_through_the_gateway_to_a_twoparty_upstream() {
    let up = TwopartyUpstream::start(Store::new());
    let gw = TestGateway::start(up.upstream(), quick_limits(), None);
    let store = up.store.clone();
    local(async {
        let c = Client::connect(gw.addr).await.unwrap();
        scenario(c, &store).await;
    });
    gw.stop().unwrap();
}

#[test]
fn every_store_method_through_the_gateway_to_a_unix_upstream() {
    let dir = temp_dir("unix");
    let up = TwopartyUpstream::start_at(Where::Unix(dir.join("up.sock")), Store::new());
    let gw = TestGateway::start(up.upstream(), quick_limits(), None);
    let store = up.store.clone();
    local(async {
        let c = Client::connect(gw.addr).await.unwrap();
        scenario(c, &store).await;
    });
    gw.stop().unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn denials_are_answered_by_the_gateway_and_never_reach_the_upstream() {
    let up = TwopartyUpstream::start(Store::new());
    let gw = TestGateway::start(up.upstream(), quick_limits(), Some(reader_policy()));
    let data = up.store.clone();
    local(async {
        let c = Client::connect(gw.addr).await.unwrap();
        let s: store::Client = c.bootstrap();
        let mut req = s.namespace_request();
        req.get().set_name("p");
        let ns: namespace::Client = req.send().pipeline.get_ns();
        let mut put = ns.put_request();
        put.get().set_key("k");
        put.get().set_value(b"v");
        let e = put.send().promise.await.err().expect("put is denied");
        assert_eq!(e.kind, capnp::ErrorKind::Failed);
        assert_eq!(
            e.extra,
            "remote exception: permission denied: Namespace.put is not allowed for client \"reader\""
        );
        // Pipelined on the denied answer: the same denial.
        let mut sub = ns.sub_request();
        sub.get().set_name("x");
        let denied: namespace::Client = sub.send().pipeline.get_ns();
        let mut get = cast::<reader::Client>(&denied).get_request();
        get.get().set_key("k");
        let e = get
            .send()
            .promise
            .await
            .err()
            .expect("pipelined on a denial");
        assert_eq!(
            e.extra,
            "remote exception: permission denied: Namespace.sub is not allowed for client \"reader\""
        );
        // Allowed calls on the same connection reach the upstream.
        let mut get = cast::<reader::Client>(&ns).get_request();
        get.get().set_key("k");
        let reply = get.send().promise.await.unwrap();
        assert!(
            !reply.get().unwrap().get_found(),
            "the denied put never ran"
        );
        assert_eq!(
            data.live_objects().namespaces,
            1,
            "no sub-namespace was made"
        );
    });
    gw.stop().unwrap();
}

#[test]
fn an_unreachable_upstream_is_named_at_once_and_the_gateway_keeps_serving() {
    let dir = temp_dir("unreachable");
    let path = dir.join("later.sock");
    let gw = TestGateway::start(Upstream::unix(&path), quick_limits(), None);
    let started = Instant::now();
    local(async {
        let c = Client::connect(gw.addr).await.unwrap();
        let s: store::Client = c.bootstrap();
        let e = s
            .namespaces_request()
            .send()
            .promise
            .await
            .err()
            .expect("no upstream");
        assert_eq!(e.kind, capnp::ErrorKind::Disconnected, "{e}");
        assert!(
            e.extra.contains(&format!(
                "capgate: upstream unix:{} unreachable:",
                path.display()
            )),
            "{e}"
        );
    });
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "told at once, not after the connect timeout"
    );
    // The upstream comes up: new connections use it.
    let up = TwopartyUpstream::start_at(Where::Unix(path), Store::new());
    local(async {
        let c = Client::connect(gw.addr).await.unwrap();
        let s: store::Client = c.bootstrap();
        s.namespaces_request().send().promise.await.unwrap();
    });
    drop(up);
    gw.stop().unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn an_upstream_killed_mid_call_is_named_and_a_restarted_one_serves_new_connections() {
    let mut up = TwopartyUpstream::start(Store::new());
    let Where::Tcp(at) = up.at.clone() else {
        unreachable!()
    };
    let gw = TestGateway::start(up.upstream(), quick_limits(), None);
    local(async {
        let c = Client::connect(gw.addr).await.unwrap();
        let s: store::Client = c.bootstrap();
        let mut req = s.namespace_request();
        req.get().set_name("w");
        let ns: namespace::Client = req.send().pipeline.get_ns();
        let mut wait = ns.wait_request();
        wait.get().set_key("never");
        let waiting = wait.send().promise;
        // The wait is in flight on the upstream once an ordinary call on the same
        // connection came back.
        s.namespaces_request().send().promise.await.unwrap();
        up.stop();
        let e = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("told within 10 s")
            .err()
            .expect("the upstream is gone");
        // A clean close, or a reset when the dying upstream left bytes unread.
        assert!(
            e.extra.contains(&format!(
                "capgate: upstream tcp://{at} closed the connection"
            )) || e
                .extra
                .contains(&format!("capgate: upstream tcp://{at}: read failed")),
            "{e}"
        );
        assert_eq!(e.kind, capnp::ErrorKind::Disconnected);
    });
    let up = TwopartyUpstream::start_at(Where::Tcp(at), Store::new());
    local(async {
        let c = Client::connect(gw.addr).await.unwrap();
        let s: store::Client = c.bootstrap();
        s.namespaces_request().send().promise.await.unwrap();
    });
    drop(up);
    gw.stop().unwrap();
}
