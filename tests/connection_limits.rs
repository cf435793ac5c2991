//! Connection limits with many idle connections: per class and in total, each refusal with
//! its reason while the server keeps serving.

mod common;

use std::io::Read;
use std::time::Duration;

use capgate::{ClientClass, Matcher, Policy, Quotas};
use common::*;

/// A raw connection that bootstrapped (so the server has fully set it up) and now idles.
fn idle_connection(addr: std::net::SocketAddr, source: &str) -> std::net::TcpStream {
    let mut s = connect_from(addr, source);
    std::io::Write::write_all(&mut s, &rpc_bootstrap(0)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 8];
    s.read_exact(&mut b).expect("the bootstrap is answered");
    s
}

fn refusal(addr: std::net::SocketAddr, source: &str) -> String {
    let mut s = connect_from(addr, source);
    observe(&mut s, Duration::from_secs(5))
        .abort
        .expect("refused with an Abort")
}

#[test]
fn two_thousand_idle_connections_then_class_and_total_limits() {
    let mut crowd = Quotas::default();
    crowd.max_connections = 5000;
    crowd.max_class_connections = 2000;
    let mut other = Quotas::default();
    other.max_connections = 100;
    let policy = Policy::from_classes(vec![
        ClientClass::new("other", Matcher::Source("127.0.0.2/32".parse().unwrap()))
            .allow_all()
            .with_quotas(other),
        ClientClass::new("crowd", Matcher::Any)
            .allow_all()
            .with_quotas(crowd),
    ]);
    let mut limits = quick_limits();
    limits.max_connections = 2010;
    let server = TestServer::start_policy(limits, policy);

    let before = rss_bytes();
    let crowd_conns: Vec<_> = (0..2000)
        .map(|_| idle_connection(server.tcp, "127.0.0.1"))
        .collect();
    let per_conn = rss_bytes().saturating_sub(before) / 2000;
    assert!(
        per_conn < 64 << 10,
        "{per_conn} bytes of RSS per idle connection"
    );

    let why = refusal(server.tcp, "127.0.0.1");
    assert!(
        why.contains("connection refused: client class \"crowd\" already has 2000 connections (max_class_connections = 2000)"),
        "{why}"
    );
    // Another class is still served.
    let others: Vec<_> = (0..10)
        .map(|_| idle_connection(server.tcp, "127.0.0.2"))
        .collect();
    // 2010 open: the total limit refuses the next, whatever its class.
    let why = refusal(server.tcp, "127.0.0.2");
    assert!(
        why.contains(
            "connection refused: the server has 2010 connections open (max_connections = 2010)"
        ),
        "{why}"
    );
    // Closing some makes room again.
    drop(others);
    std::thread::sleep(Duration::from_millis(300));
    let _again = idle_connection(server.tcp, "127.0.0.2");
    drop(crowd_conns);
    server.stop().unwrap();
}

#[test]
fn clients_from_thousands_of_addresses_are_forgotten_once_idle() {
    // A peer rotating through source addresses (an IPv6 prefix holds billions) must not grow
    // the server's per-client state without bound: a client is forgotten once it has no
    // connection and its rate budget has refilled (0.1 s with the default quotas).
    let server = TestServer::start(quick_limits());
    let addr = server.tcp;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for i in 0..5000u32 {
            let source = format!("127.1.{}.{}:0", i / 250, 1 + i % 250);
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.bind(source.parse().unwrap()).unwrap();
            let s = sock.connect(addr).await.unwrap();
            drop(s);
            if i % 500 == 499 {
                // Let the server catch up (and the oldest budgets refill).
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        }
    });
    let stats = server.stats();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while stats.open_connections() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(stats.open_connections(), 0);
    let known = stats.known_clients();
    assert!(
        known <= 2048,
        "{known} clients still known after 5000 came and went"
    );
    assert_served(addr);
}
