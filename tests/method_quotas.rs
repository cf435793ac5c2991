//! Per-method quotas over real sockets: a limited method is refused with `Overloaded` naming
//! the rule while the client's other methods run; rates are shared by one client's
//! connections and not by two clients; a method's `max_inflight_calls`; a reload changes
//! them on a live connection. Counts are bounded by what the elapsed time allows, so a slow
//! machine cannot turn them into failures.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use capgate::store_capnp::{namespace, reader, store};
use capgate::{cast, Catalog, Client, Policy};
use common::*;

/// Every client of 127.0.0.0/8 (each source address its own client) may call anything;
/// `methods` is appended as the class's method rules.
fn policy(methods: &str) -> Policy {
    let text = format!(
        "[[client]]\nname = \"writer\"\nmatch = {{ source = \"127.0.0.0/8\" }}\nallow = [\"*\"]\n\n{methods}"
    );
    Policy::parse("methods.toml", &text, Catalog::builtin()).unwrap()
}

async fn connect_from(source: &str, server: SocketAddr) -> (Client, store::Client) {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let s = sock.connect(server).await.unwrap();
    let (r, w) = s.into_split();
    let c = Client::builder().from_stream(r, w);
    let s = c.bootstrap();
    (c, s)
}

fn open(s: &store::Client, name: &str) -> namespace::Client {
    let mut req = s.namespace_request();
    req.get().set_name(name);
    req.send().pipeline.get_ns()
}

async fn put(ns: &namespace::Client, key: String) -> Result<(), capnp::Error> {
    let mut p = ns.put_request();
    p.get().set_key(&key);
    p.get().set_value(b"v");
    p.send().promise.await.map(|_| ())
}

async fn get(ns: &namespace::Client, key: impl AsRef<str>) -> Result<bool, capnp::Error> {
    let mut req = cast::<reader::Client>(ns).get_request();
    req.get().set_key(key.as_ref());
    Ok(req.send().promise.await?.get()?.get_found())
}

/// Sends `n` puts at once; returns how many succeeded, checking every failure is the
/// method rule's Overloaded with `text`.
async fn concurrent_puts(ns: &namespace::Client, n: usize, text: &str) -> usize {
    let calls: Vec<_> = (0..n).map(|i| put(ns, format!("k{i}"))).collect();
    let mut ok = 0;
    for r in futures::future::join_all(calls).await {
        match r {
            Ok(()) => ok += 1,
            Err(e) => {
                assert_eq!(e.kind, capnp::ErrorKind::Overloaded, "{e}");
                assert_eq!(e.extra, format!("remote exception: {text}"));
            }
        }
    }
    ok
}

const PUT_5: &str = "[client.methods.\"Namespace.put\"]\ncalls_per_second = 5\nburst = 5\n";
const PUT_5_TEXT: &str = "overloaded: Namespace.put refused: calls_per_second = 5 with burst = 5 \
                          exceeded for client \"writer\"";

#[test]
fn over_a_method_rate_the_method_is_refused_by_name_and_other_methods_run() {
    let server = TestServer::start_policy(quick_limits(), policy(PUT_5));
    local(async {
        let (_c, s) = connect_from("127.0.0.2", server.tcp).await;
        let ns = open(&s, "m");
        // Make sure the namespace exists before the clock starts.
        assert!(!get(&ns, "none").await.unwrap());
        let start = Instant::now();
        let puts = concurrent_puts(&ns, 20, PUT_5_TEXT);
        let gets = futures::future::join_all((0..20).map(|i| get(&ns, format!("g{i}"))));
        let (ok, gets) = futures::join!(puts, gets);
        let refill = (start.elapsed().as_secs_f64() * 5.0).ceil() as usize;
        assert!(
            (5..=5 + refill.max(3)).contains(&ok),
            "{ok} of 20 puts passed (burst 5, {refill} refilled)"
        );
        for g in gets {
            g.expect("Reader.get is not limited by the Namespace.put rule");
        }
    });
    let d = server.stats().denials("writer");
    assert!(d.method_rate >= 12, "{d:?}");
    assert_eq!(d.rate, 0, "the class rate took nothing");
    let metrics = server.stats().metrics_text();
    assert!(
        metrics.contains(&format!(
            "capgate_method_denials_total{{class=\"writer\",rule=\"Namespace.put\",quota=\"calls_per_second\"}} {}",
            d.method_rate
        )),
        "{metrics}"
    );
    assert_served(server.tcp);
    server.stop().unwrap();
}

#[test]
fn a_method_rate_is_shared_by_one_clients_connections_and_not_by_two_clients() {
    // One call a second refills: what the test's own duration could add stays small.
    let rule = "[client.methods.\"Namespace.put\"]\ncalls_per_second = 1\nburst = 5\n";
    let text = "overloaded: Namespace.put refused: calls_per_second = 1 with burst = 5 exceeded \
                for client \"writer\"";
    let server = TestServer::start_policy(quick_limits(), policy(rule));
    local(async {
        let (_a1, s1) = connect_from("127.0.0.2", server.tcp).await;
        let (_a2, s2) = connect_from("127.0.0.2", server.tcp).await;
        let (_b, s3) = connect_from("127.0.0.3", server.tcp).await;
        let (n1, n2, n3) = (open(&s1, "a"), open(&s2, "a"), open(&s3, "b"));
        for ns in [&n1, &n2, &n3] {
            assert!(!get(ns, "none").await.unwrap());
        }
        let start = Instant::now();
        let (a, b) = futures::join!(
            concurrent_puts(&n1, 10, text),
            concurrent_puts(&n2, 10, text)
        );
        let refill = start.elapsed().as_secs() as usize + 1;
        assert!(
            (5..=5 + refill).contains(&(a + b)),
            "client 127.0.0.2 got {a} + {b} over two connections (burst 5, {refill} refilled)"
        );
        let start = Instant::now();
        let c = concurrent_puts(&n3, 10, text).await;
        let refill = start.elapsed().as_secs() as usize + 1;
        assert!(
            (5..=5 + refill).contains(&c),
            "client 127.0.0.3 has its own budget: {c}"
        );
    });
    assert_served(server.tcp);
    server.stop().unwrap();
}

#[test]
fn max_inflight_calls_of_a_method_refuses_the_third_long_poll_and_frees_on_return() {
    let rule = "[client.methods.\"Namespace.wait\"]\nmax_inflight_calls = 2\n";
    let server = TestServer::start_policy(quick_limits(), policy(rule));
    local(async {
        let (_c, s) = connect_from("127.0.0.2", server.tcp).await;
        let ns = open(&s, "w");
        let wait = |key: &str| {
            let mut w = ns.wait_request();
            w.get().set_key(key);
            w.send().promise
        };
        let first = wait("k");
        let second = wait("k");
        // The two are in flight once a later call on the connection has been answered
        // (the server handles one connection's messages in order).
        assert!(!get(&ns, "none").await.unwrap());
        let e = wait("k").await.err().expect("a third wait is refused");
        assert_eq!(e.kind, capnp::ErrorKind::Overloaded);
        assert_eq!(
            e.extra,
            "remote exception: overloaded: Namespace.wait refused: max_inflight_calls = 2 \
             reached (2 calls in flight on this connection) for client \"writer\""
        );
        // Other methods run; the key appears and both waits return.
        put(&ns, "k".into()).await.unwrap();
        first.await.unwrap();
        second.await.unwrap();
        wait("k").await.expect("a slot is free again");
    });
    let d = server.stats().denials("writer");
    assert_eq!(d.method_inflight_calls, 1);
    assert_served(server.tcp);
    server.stop().unwrap();
}

#[test]
fn a_reload_changes_method_quotas_on_a_live_connection() {
    let server = TestServer::start_policy(quick_limits(), policy(""));
    let handle = server.policy_handle();
    local(async {
        let (_c, s) = connect_from("127.0.0.2", server.tcp).await;
        let ns = open(&s, "r");
        assert_eq!(
            concurrent_puts(&ns, 20, PUT_5_TEXT).await,
            20,
            "no method rule yet"
        );
        handle.replace(policy(PUT_5));
        // The reload reaches the connection asynchronously: wait (bounded) for a refusal.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if concurrent_puts(&ns, 20, PUT_5_TEXT).await < 20 {
                break;
            }
            assert!(Instant::now() < deadline, "the reload never applied");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // And a reload lifting the rule lifts it on the same connection.
        handle.replace(policy(""));
        let deadline = Instant::now() + Duration::from_secs(20);
        while concurrent_puts(&ns, 20, PUT_5_TEXT).await < 20 {
            assert!(Instant::now() < deadline, "the second reload never applied");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    assert_served(server.tcp);
    server.stop().unwrap();
}
