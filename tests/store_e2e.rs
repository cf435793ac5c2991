//! The demo Store end to end over TCP and Unix sockets: every method, callbacks, exceptions,
//! Release, and connection lifecycle (idle timeout, graceful shutdown, panics).

mod common;

use std::time::{Duration, Instant};

use capgate::store_capnp::{reader, store};
use capgate::Client;
use common::store_scenario::*;
use common::*;
use tokio::sync::mpsc;

#[test]
fn every_store_method_over_tcp() {
    let server = TestServer::start(quick_limits());
    let store = server.store.clone();
    local(async {
        let c = Client::connect(server.tcp).await.unwrap();
        scenario(c, &store).await;
    });
    server.stop().unwrap();
}

#[test]
fn every_store_method_over_a_unix_socket() {
    let dir = std::env::temp_dir().join(format!("capgate-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("store.sock");
    let server = TestServer::start_with(quick_limits(), Some(path.clone()));
    let store = server.store.clone();
    local(async {
        let c = Client::connect_unix(&path).await.unwrap();
        scenario(c, &store).await;
    });
    server.stop().unwrap();
    assert!(!path.exists(), "the socket file is removed at shutdown");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn watcher_of_a_disconnected_client_is_dropped() {
    let server = TestServer::start(quick_limits());
    let store = server.store.clone();
    local(async {
        let (watching, s) = store_client(server.tcp).await;
        let (tx, _rx) = mpsc::unbounded_channel();
        let mut w = open(&s, "w").watch_request();
        w.get()
            .set_watcher(capnp_rpc::new_client(ChannelWatcher(tx)));
        let _sub = w.send().promise.await.unwrap();
        assert_eq!(store.live_objects().watchers, 1);
        watching.shutdown().await.ok();
        // The subscription dies with its connection; the watcher is dropped, not retried.
        let (_other, s2) = store_client(server.tcp).await;
        put(&open(&s2, "w"), "k", b"v").await;
        wait_until("the dead watcher to be dropped", || {
            let l = store.live_objects();
            l.watchers == 0 && l.subscriptions == 0
        })
        .await;
    });
    server.stop().unwrap();
}

#[test]
fn idle_connection_is_closed_with_the_reason_but_a_long_poll_is_not_idle() {
    let mut limits = quick_limits();
    limits.idle_timeout = Duration::from_millis(300);
    let server = TestServer::start(limits);
    local(async {
        let (idle, s) = store_client(server.tcp).await;
        s.namespaces_request().send().promise.await.unwrap();
        let started = Instant::now();
        let e = tokio::time::timeout(Duration::from_secs(5), idle.closed())
            .await
            .expect("closed within 5 s")
            .expect_err("closed with a reason");
        assert!(started.elapsed() >= Duration::from_millis(250));
        assert!(
            e.to_string()
                .contains("connection idle for 300 ms (idle_timeout): no frames in either direction and no calls in flight"),
            "{e}"
        );

        // A connection with a call in flight is not idle, however quiet.
        let (_busy, s) = store_client(server.tcp).await;
        let ns = open(&s, "idle");
        let mut wait = ns.wait_request();
        wait.get().set_key("later");
        let waiting = wait.send().promise;
        tokio::time::sleep(Duration::from_millis(900)).await;
        let (_c, other) = store_client(server.tcp).await;
        put(&open(&other, "idle"), "later", b"done").await;
        let got = waiting
            .await
            .expect("the long poll survived 3 idle periods");
        assert_eq!(got.get().unwrap().get_value().unwrap(), b"done");
    });
    server.stop().unwrap();
}

#[test]
fn graceful_shutdown_lets_in_flight_calls_finish_then_closes() {
    let mut limits = quick_limits();
    limits.shutdown_timeout = Duration::from_secs(5);
    let server = TestServer::start(limits);
    let handle = server.shutdown_handle();
    local(async {
        let (_c, s) = store_client(server.tcp).await;
        let ns = open(&s, "g");
        put(&ns, "warm", b"up").await;
        let mut wait = ns.wait_request();
        wait.get().set_key("k");
        let waiting = wait.send().promise;
        tokio::time::sleep(Duration::from_millis(50)).await;
        handle.shutdown();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // New connections are refused; this one still serves until its calls are done.
        assert!(
            Client::connect(server.tcp).await.is_err() || {
                // The listener may still be in the kernel's backlog: a call must fail then.
                let (_c2, s2) = store_client(server.tcp).await;
                s2.namespaces_request().send().promise.await.is_err()
            }
        );
        put(&ns, "k", b"finished").await;
        let got = waiting.await.expect("the in-flight call completed");
        assert_eq!(got.get().unwrap().get_value().unwrap(), b"finished");
    });
    server.stop().expect("server exits cleanly");
}

#[test]
fn graceful_shutdown_deadline_fails_stuck_calls_with_a_clear_error() {
    let mut limits = quick_limits();
    limits.shutdown_timeout = Duration::from_millis(300);
    let server = TestServer::start(limits);
    let handle = server.shutdown_handle();
    local(async {
        let (_c, s) = store_client(server.tcp).await;
        let mut wait = open(&s, "stuck").wait_request();
        wait.get().set_key("never");
        let waiting = wait.send().promise;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        handle.shutdown();
        let e = waiting
            .await
            .err()
            .expect("the stuck call fails at the deadline");
        assert!(started.elapsed() >= Duration::from_millis(250));
        assert!(e.to_string().contains("the server is shutting down"), "{e}");
    });
    server.stop().expect("server exits cleanly");
}

#[test]
fn a_panicking_handler_costs_only_its_connection() {
    use capgate::bench_capnp::echo;
    let (addr, handle) = TestServer::start_echo(quick_limits());
    local(async {
        // One worker: both connections share the thread that panics.
        let good = Client::connect(addr).await.unwrap();
        let good_echo: echo::Client = good.bootstrap();
        let mut req = good_echo.echo_request();
        req.get().set_payload(b"before");
        req.send().promise.await.unwrap();

        let bad = Client::connect(addr).await.unwrap();
        let bad_echo: echo::Client = bad.bootstrap();
        let e = bad_echo
            .panic_request()
            .send()
            .promise
            .await
            .err()
            .expect("the panicking call fails");
        assert_eq!(e.kind, capnp::ErrorKind::Disconnected, "{e}");

        let mut req = good_echo.echo_request();
        req.get().set_payload(b"after");
        let reply = req
            .send()
            .promise
            .await
            .expect("the other connection still works");
        assert_eq!(reply.get().unwrap().get_payload().unwrap(), b"after");
        let fresh = Client::connect(addr).await.unwrap();
        let e: echo::Client = fresh.bootstrap();
        let mut req = e.echo_request();
        req.get().set_payload(b"new");
        req.send()
            .promise
            .await
            .expect("new connections are served");
    });
    handle.shutdown();
}

#[test]
fn large_values_come_back_intact_however_buffers_are_reused() {
    // Frames of 64 KiB and more reuse the buffers of earlier ones on both sides: every value
    // must come back with its own bytes, never stale ones, whatever the order of sizes.
    let server = TestServer::start(capgate::Limits::default());
    local(async {
        let c = Client::connect(server.tcp).await.unwrap();
        let s: store::Client = c.bootstrap();
        let ns = open(&s, "large");
        let r = capgate::cast::<reader::Client>(&ns);
        let sizes = [300 << 10, 70 << 10, 1 << 20, 100 << 10, 64 << 10, 900 << 10];
        for (i, size) in sizes.into_iter().enumerate() {
            let value: Vec<u8> = (0..size).map(|j| (j * 7 + i * 13) as u8).collect();
            let key = format!("v{i}");
            put(&ns, &key, &value).await;
            assert_eq!(
                get(&r, &key).await.as_deref(),
                Some(&value[..]),
                "value {i}"
            );
        }
        // Read back in another order: every answer is a new large frame for the client.
        for (i, size) in sizes.into_iter().enumerate().rev() {
            let value: Vec<u8> = (0..size).map(|j| (j * 7 + i * 13) as u8).collect();
            assert_eq!(get(&r, &format!("v{i}")).await.as_deref(), Some(&value[..]));
        }
    });
    assert_served(server.tcp);
}
