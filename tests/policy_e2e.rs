//! The policy over real sockets: allowlist denials (pipelined ones too, and the release of
//! capabilities passed in denied calls), quotas answering Overloaded, per-client rate and
//! connection limits, refusals, protocol violations, reload.

mod common;

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use capgate::store_capnp::{namespace, reader, store, watcher};
use capgate::{cast, Catalog, Client, ClientClass, Matcher, Policy, Quotas};
use capnp::capability::Rc as CapRc;
use common::*;

fn class(name: &str, m: Matcher, allow: &[&str], q: Quotas) -> ClientClass {
    let mut c = ClientClass::new(name, m).with_quotas(q);
    for a in allow {
        c = c.allow(a, Catalog::builtin()).unwrap();
    }
    c
}

fn reader_policy(q: Quotas) -> Policy {
    Policy::from_classes(vec![class(
        "reader",
        Matcher::Any,
        &["Store.namespace", "Reader.*", "Namespace.readOnly"],
        q,
    )])
}

/// A client whose connection comes from `source` (any 127.0.0.0/8 address works on Linux).
async fn connect_from(source: &str, server: SocketAddr) -> Client {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let s = sock.connect(server).await.unwrap();
    let (r, w) = s.into_split();
    Client::builder().from_stream(r, w)
}

fn open(s: &store::Client, name: &str) -> namespace::Client {
    let mut req = s.namespace_request();
    req.get().set_name(name);
    req.send().pipeline.get_ns()
}

async fn get(ns: &namespace::Client, key: &str) -> Result<bool, capnp::Error> {
    let mut req = cast::<reader::Client>(ns).get_request();
    req.get().set_key(key);
    Ok(req.send().promise.await?.get()?.get_found())
}

#[test]
fn denied_calls_and_pipelined_calls_on_them_get_the_permission_error() {
    let server = TestServer::start_policy(quick_limits(), reader_policy(Quotas::default()));
    let data = server.store.clone();
    local(async {
        let (_c, s) = store_client(server.tcp).await;
        let ns = open(&s, "p");
        let mut put = ns.put_request();
        put.get().set_key("k");
        put.get().set_value(b"v");
        let e = put.send().promise.await.err().expect("put is denied");
        assert_eq!(e.kind, capnp::ErrorKind::Failed);
        assert_eq!(
            e.extra,
            "remote exception: permission denied: Namespace.put is not allowed for client \"reader\""
        );
        // The server method never ran.
        assert!(!get(&ns, "k").await.unwrap());

        // A call pipelined on a denied answer gets the same denial, never reaching the server.
        let mut sub = ns.sub_request();
        sub.get().set_name("x");
        let denied_ns = sub.send().pipeline.get_ns();
        let e = get(&denied_ns, "k")
            .await
            .expect_err("pipelined on a denied answer");
        assert_eq!(
            e.extra,
            "remote exception: permission denied: Namespace.sub is not allowed for client \"reader\""
        );
        assert_eq!(
            data.live_objects().namespaces,
            1,
            "no sub-namespace was created"
        );

        // Allowed calls on the same connection still work.
        let ro = ns.read_only_request().send().pipeline.get_reader();
        let mut l = ro.list_request();
        l.get().set_prefix("");
        assert_eq!(
            l.send()
                .promise
                .await
                .unwrap()
                .get()
                .unwrap()
                .get_keys()
                .unwrap()
                .len(),
            0
        );
    });
    server.stop().unwrap();
}

struct TrackedWatcher(Rc<Cell<bool>>);

impl Drop for TrackedWatcher {
    fn drop(&mut self) {
        self.0.set(true);
    }
}

impl watcher::Server for TrackedWatcher {
    async fn changed(
        self: CapRc<Self>,
        _: watcher::ChangedParams,
        _: watcher::ChangedResults,
    ) -> Result<(), capnp::Error> {
        Ok(())
    }
}

#[test]
fn a_capability_passed_in_a_denied_call_is_released() {
    let server = TestServer::start_policy(quick_limits(), reader_policy(Quotas::default()));
    local(async {
        let (_c, s) = store_client(server.tcp).await;
        let freed = Rc::new(Cell::new(false));
        {
            let mut w = open(&s, "w").watch_request();
            w.get()
                .set_watcher(capnp_rpc::new_client(TrackedWatcher(freed.clone())));
            let e = w.send().promise.await.err().expect("watch is denied");
            assert!(e.extra.contains("Namespace.watch is not allowed"), "{e}");
        }
        for _ in 0..200 {
            if freed.get() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            freed.get(),
            "the client's Watcher was released by the server's denial"
        );
    });
    server.stop().unwrap();
}

#[test]
fn over_rate_calls_are_overloaded_shared_by_one_client_not_by_two() {
    let mut q = Quotas::default();
    q.calls_per_second = std::num::NonZeroU32::new(1).unwrap();
    q.burst = std::num::NonZeroU32::new(6).unwrap();
    let policy = Policy::from_classes(vec![class("reader", Matcher::Any, &["*"], q)]);
    let server = TestServer::start_policy(quick_limits(), policy);
    local(async {
        // Two connections from 127.0.0.1: one client, one budget of 6.
        let a = connect_from("127.0.0.1", server.tcp).await;
        let b = connect_from("127.0.0.1", server.tcp).await;
        let mut ok = 0;
        let mut overloaded = Vec::new();
        for c in [&a, &b] {
            let s: store::Client = c.bootstrap();
            let calls: Vec<_> = (0..5)
                .map(|_| s.namespaces_request().send().promise)
                .collect();
            for r in futures::future::join_all(calls).await {
                match r {
                    Ok(_) => ok += 1,
                    Err(e) => overloaded.push(e),
                }
            }
        }
        assert_eq!(ok, 6, "exactly the burst passes across both connections");
        assert_eq!(overloaded.len(), 4);
        for e in &overloaded {
            assert_eq!(e.kind, capnp::ErrorKind::Overloaded);
            assert!(
                e.extra.contains("Store.namespaces refused: calls_per_second = 1 with burst = 6 exceeded; retry later for client \"reader\""),
                "{e}"
            );
        }
        assert_eq!(server.stats().denials("reader").rate, 4);
        // Another source address is another client with its own budget.
        let other = connect_from("127.0.0.2", server.tcp).await;
        let s: store::Client = other.bootstrap();
        for _ in 0..6 {
            s.namespaces_request()
                .send()
                .promise
                .await
                .expect("own budget");
        }
    });
    server.stop().unwrap();
}

#[test]
fn unmatched_and_over_connection_limit_clients_are_refused_with_the_reason() {
    let mut q = Quotas::default();
    q.max_connections = 2;
    let policy = Policy::from_classes(vec![class(
        "two",
        Matcher::Source("127.0.0.2/32".parse().unwrap()),
        &["*"],
        q,
    )]);
    let server = TestServer::start_policy(quick_limits(), policy);
    local(async {
        let stranger = connect_from("127.0.0.1", server.tcp).await;
        let s: store::Client = stranger.bootstrap();
        let e = s
            .namespaces_request()
            .send()
            .promise
            .await
            .err()
            .expect("refused");
        assert!(
            e.extra.contains("connection refused: no client class of the policy (built in code) matches tcp://127.0.0.1:"),
            "{e}"
        );
        let c1 = connect_from("127.0.0.2", server.tcp).await;
        let c2 = connect_from("127.0.0.2", server.tcp).await;
        for c in [&c1, &c2] {
            let s: store::Client = c.bootstrap();
            s.namespaces_request()
                .send()
                .promise
                .await
                .expect("within max_connections");
        }
        let c3 = connect_from("127.0.0.2", server.tcp).await;
        let s: store::Client = c3.bootstrap();
        let e = s
            .namespaces_request()
            .send()
            .promise
            .await
            .err()
            .expect("third refused");
        assert!(
            e.extra
                .contains("of class \"two\" already has 2 connections (max_connections = 2)"),
            "{e}"
        );
        // The first two are still served.
        let s: store::Client = c1.bootstrap();
        s.namespaces_request().send().promise.await.unwrap();
        drop(s);
        c2.shutdown().await.ok();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let c4 = connect_from("127.0.0.2", server.tcp).await;
        let s: store::Client = c4.bootstrap();
        s.namespaces_request()
            .send()
            .promise
            .await
            .expect("a slot was given back");
    });
    server.stop().unwrap();
}

#[test]
fn question_id_reuse_over_a_raw_socket_aborts_with_the_reason() {
    let server = TestServer::start_policy(quick_limits(), permissive_policy(64));
    let mut bytes = rpc_bootstrap(0);
    // Question 0 is the bootstrap, still open (never finished): reusing it is a violation.
    bytes.extend(rpc_bootstrap(0));
    let mut s = raw_send(server.tcp, &bytes);
    let out = observe(&mut s, Duration::from_secs(5));
    let abort = out.abort.expect("an Abort");
    assert!(
        abort.contains(
            "protocol violation: question id 0 reused while its previous use is still open"
        ),
        "{abort}"
    );
    assert!(out.closed);
    assert_served(server.tcp);
    server.stop().unwrap();
}

#[test]
fn a_reloaded_policy_applies_to_existing_connections_and_a_broken_file_changes_nothing() {
    let server = TestServer::start_policy(quick_limits(), reader_policy(Quotas::default()));
    let handle = server.policy_handle();
    local(async {
        let (_c, s) = store_client(server.tcp).await;
        let ns = open(&s, "r");
        let put = |ns: &namespace::Client| {
            let mut p = ns.put_request();
            p.get().set_key("k");
            p.get().set_value(b"v");
            p.send().promise
        };
        assert!(put(&ns).await.is_err(), "denied under the first policy");

        // A broken file is rejected; the policy in force stays.
        let dir = std::env::temp_dir().join(format!("capgate-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("bad.toml");
        std::fs::write(
            &bad,
            "[[client]]\nname = \"w\"\nmatch = \"any\"\nallow = [\"Namespace.pt\"]\n",
        )
        .unwrap();
        let errors = capgate::reload_policy(&bad, &handle).unwrap_err();
        assert_eq!(
            errors.to_string(),
            format!(
                "{}:4:10: interface `Namespace` has no method `pt` (did you mean `Namespace.put`?)",
                bad.display()
            )
        );
        assert_eq!(handle.current().origin(), "built in code");
        assert!(put(&ns).await.is_err(), "still denied");

        // A good file applies to this very connection, without dropping it.
        let good = dir.join("good.toml");
        std::fs::write(
            &good,
            "[[client]]\nname = \"writer\"\nmatch = \"any\"\nallow = [\"*\"]\n",
        )
        .unwrap();
        capgate::reload_policy(&good, &handle).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        put(&ns)
            .await
            .expect("allowed under the reloaded policy, same connection");
        let _ = std::fs::remove_dir_all(dir);
    });
    server.stop().unwrap();
}

#[test]
fn a_client_collecting_capabilities_hits_max_exports_and_is_cut_off() {
    let mut q = Quotas::default();
    q.max_exports = 5;
    let policy = Policy::from_classes(vec![class("hoarder", Matcher::Any, &["*"], q)]);
    let server = TestServer::start_policy(quick_limits(), policy);
    local(async {
        let (c, s) = store_client(server.tcp).await;
        let mut held = Vec::new();
        let mut failure = None;
        for i in 0..10 {
            let mut req = s.namespace_request();
            req.get().set_name(format!("n{i}"));
            match req.send().promise.await {
                Ok(r) => held.push(r.get().unwrap().get_ns().unwrap()),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        // The bootstrap is one export; the Return that crosses the limit is still delivered
        // (outgoing messages are never rewritten), then the connection is aborted.
        assert!(
            (4..=6).contains(&held.len()),
            "{} capabilities collected",
            held.len()
        );
        let e = failure.expect("cut off");
        assert!(
            e.extra
                .contains("max_exports = 5 exceeded: the peer holds 6 capabilities"),
            "{e}"
        );
        let closed = c.closed().await.expect_err("closed with the reason");
        assert!(
            closed.extra.contains("max_exports = 5 exceeded"),
            "{closed}"
        );
    });
    assert_served(server.tcp);
    server.stop().unwrap();
}

#[test]
fn a_client_that_starts_and_cancels_calls_hits_max_open_answers() {
    let mut q = Quotas::default();
    q.max_open_answers = 6;
    let policy = Policy::from_classes(vec![class("canceller", Matcher::Any, &["*"], q)]);
    let server = TestServer::start_policy(quick_limits(), policy);
    local(async {
        let (_c, s) = store_client(server.tcp).await;
        let ns = open(&s, "cancel");
        get(&ns, "warm").await.unwrap();
        let mut cancelled = 0;
        let refusal = loop {
            assert!(cancelled < 50, "max_open_answers never reached");
            // A long poll dropped before it returns: the client sends Finish, capnp-rpc keeps
            // the answer for the connection's life (its call is cancelled, never returned).
            let mut w = ns.wait_request();
            w.get().set_key("never");
            drop(w.send().promise);
            cancelled += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
            if let Err(e) = get(&ns, "k").await {
                break e;
            }
        };
        assert_eq!(refusal.kind, capnp::ErrorKind::Overloaded);
        assert!(
            refusal.extra.contains("max_open_answers = 6 reached (6 answers open: calls not yet finished, cancelled calls included) for client \"canceller\""),
            "{refusal}"
        );
        // Bootstrap and the namespace are two open answers: four cancellations fill the rest.
        assert_eq!(cancelled, 4);
    });
    assert_served(server.tcp);
    server.stop().unwrap();
}

#[test]
fn send_results_to_yourself_over_a_raw_socket_is_denied_and_the_connection_stays_usable() {
    use capgate::store_capnp::store as st;
    use capnp::traits::HasTypeId;
    let server = TestServer::start_policy(quick_limits(), permissive_policy(64));
    let call = |q: u32, yourself: bool| {
        rpc_message(|m| {
            let mut c = m.init_call();
            c.set_question_id(q);
            c.set_interface_id(st::Client::TYPE_ID);
            c.set_method_id(1); // Store.namespaces
            c.reborrow()
                .init_target()
                .init_promised_answer()
                .set_question_id(0);
            if yourself {
                c.reborrow().init_send_results_to().set_yourself(());
            }
            c.init_params();
        })
    };
    let mut bytes = rpc_bootstrap(0);
    bytes.extend(call(1, true));
    bytes.extend(call(2, false));
    let mut s = raw_send(server.tcp, &bytes);
    let out = observe(&mut s, Duration::from_millis(500));
    assert!(out.abort.is_none(), "{out:?}");
    assert!(!out.closed);
    // Bootstrap's Return, the denial's Return, the allowed call's Return.
    assert_eq!(out.others, ["return", "return", "return"], "{out:?}");
    assert_served(server.tcp);
    server.stop().unwrap();
}

#[test]
fn release_of_an_unknown_export_over_a_raw_socket_aborts_that_connection_only() {
    let server = TestServer::start_policy(quick_limits(), permissive_policy(64));
    let mut bytes = rpc_bootstrap(0);
    bytes.extend(rpc_message(|m| {
        let mut r = m.init_release();
        r.set_id(999);
        r.set_reference_count(1);
    }));
    let mut s = raw_send(server.tcp, &bytes);
    let out = observe(&mut s, Duration::from_secs(5));
    let abort = out.abort.expect("Abort");
    assert!(
        abort.contains("Tried to release invalid export ID"),
        "{abort}"
    );
    assert!(out.closed);
    assert_served(server.tcp);
    server.stop().unwrap();
}

#[test]
fn max_message_bytes_is_per_class() {
    let mut small = Quotas::default();
    small.max_message_bytes = Some(64 << 10);
    let policy = Policy::from_classes(vec![
        class(
            "small",
            Matcher::Source("127.0.0.2/32".parse().unwrap()),
            &["*"],
            small,
        ),
        class("big", Matcher::Any, &["*"], Quotas::default()),
    ]);
    let server = TestServer::start_policy(quick_limits(), policy);
    local(async {
        let put = |c: &Client| {
            let s: store::Client = c.bootstrap();
            let mut p = open(&s, "m").put_request();
            p.get().set_key("k");
            p.get().set_value(&vec![1u8; 100 << 10]);
            p.send().promise
        };
        let small = connect_from("127.0.0.2", server.tcp).await;
        let e = put(&small).await.err().expect("over the class's limit");
        assert!(
            e.extra
                .contains("exceeds max_message_bytes = 65536 bytes (64 KiB)"),
            "{e}"
        );
        let big = connect_from("127.0.0.1", server.tcp).await;
        put(&big).await.expect("the other class allows 4 MiB");
    });
    server.stop().unwrap();
}

#[test]
fn a_reload_that_no_longer_matches_a_connection_closes_it_with_the_reason() {
    let all = || Policy::from_classes(vec![class("all", Matcher::Any, &["*"], Quotas::default())]);
    let server = TestServer::start_policy(quick_limits(), all());
    let handle = server.policy_handle();
    local(async {
        // Connections on both workers, from two source addresses.
        let a: Vec<Client> =
            futures::future::join_all((0..2).map(|_| connect_from("127.0.0.1", server.tcp))).await;
        let b: Vec<Client> =
            futures::future::join_all((0..2).map(|_| connect_from("127.0.0.2", server.tcp))).await;
        for c in a.iter().chain(&b) {
            let s: store::Client = c.bootstrap();
            s.namespaces_request().send().promise.await.expect("served");
        }
        // Only 127.0.0.2 matches the new policy.
        handle.replace(Policy::from_classes(vec![class(
            "second",
            Matcher::Source("127.0.0.2/32".parse().unwrap()),
            &["*"],
            Quotas::default(),
        )]));
        for c in &a {
            let e = tokio::time::timeout(Duration::from_secs(10), c.closed())
                .await
                .expect("closed within 10 s")
                .expect_err("closed with the reason");
            assert!(
                e.extra
                    .contains("the policy was reloaded and no client class of it")
                    && e.extra.contains("matches tcp://127.0.0.1:"),
                "{e}"
            );
        }
        // The others were re-matched and keep being served, under the new class, where
        // they are now counted.
        for c in &b {
            let s: store::Client = c.bootstrap();
            s.namespaces_request()
                .send()
                .promise
                .await
                .expect("still served");
        }
        let counted = |text: &str| {
            text.contains("capgate_connections{class=\"second\"} 2\n")
                && text.contains("capgate_connections{class=\"all\"} 0\n")
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !counted(&server.stats().metrics_text()) {
            assert!(
                std::time::Instant::now() < deadline,
                "{}",
                server.stats().metrics_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        handle.replace(all());
    });
    assert_served(server.tcp);
}
