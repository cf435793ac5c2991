//! A peer that sends calls but never reads the answers is cut off once the bytes queued for
//! it exceed `max_outgoing_bytes`, instead of growing server memory; others are served.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use capgate::bench_capnp::echo;
use capgate::Client;
use common::*;

#[test]
fn a_peer_that_never_reads_is_cut_off() {
    let mut limits = quick_limits();
    limits.max_outgoing_bytes = 1 << 20;
    let (addr, handle) = TestServer::start_echo(limits);
    let before = rss_bytes();

    // 400 calls of 64 KiB: 25 MiB of answers, far beyond socket buffers plus 1 MiB.
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(&rpc_bootstrap(0)).unwrap();
    let call_bytes: usize = {
        let mut sent = 0;
        for q in 1..=400u32 {
            match s.write_all(&rpc_echo_call(q, 64 * 1024)) {
                Ok(()) => sent += 1,
                Err(_) => break, // already cut off: the server closed the socket
            }
        }
        sent
    };
    assert!(call_bytes > 0);
    std::thread::sleep(Duration::from_millis(300));
    let grown = rss_bytes().saturating_sub(before);

    // Meanwhile, another client is served.
    local(async {
        let c = Client::connect(addr).await.unwrap();
        let e: echo::Client = c.bootstrap();
        let mut req = e.echo_request();
        req.get().set_payload(b"still here");
        let reply = req.send().promise.await.unwrap();
        assert_eq!(reply.get().unwrap().get_payload().unwrap(), b"still here");
    });

    // Now read: what was already in flight arrives, then the server has closed the socket.
    let start = Instant::now();
    let mut total = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => total += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break false,
            Err(_) => break true, // reset: also closed
        }
        assert!(start.elapsed() < Duration::from_secs(10), "bounded");
    };
    assert!(
        closed,
        "the server closed the non-reading peer (read {total} bytes)"
    );
    let answers = 400 * 64 * 1024;
    assert!(
        total < answers / 2,
        "cut off early: got {total} of {answers} bytes"
    );
    assert!(
        grown < 24 << 20,
        "server memory stayed bounded: RSS grew {grown} bytes"
    );
    handle.shutdown();
}

#[test]
fn a_peer_flooding_denied_calls_without_reading_is_cut_off() {
    let mut limits = quick_limits();
    limits.max_outgoing_bytes = 256 << 10;
    // A class that may call nothing: every call is answered by the guard itself.
    let policy = capgate::Policy::from_classes(vec![capgate::ClientClass::new(
        "nobody",
        capgate::Matcher::Any,
    )]);
    let server = TestServer::start_policy(limits, policy);
    let before = rss_bytes();
    let mut s = std::net::TcpStream::connect(server.tcp).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    // A flooder never sends Finish, so every call needs a fresh question id.
    let mut sent_calls = 0u32;
    let _ = s.write_all(&rpc_bootstrap(0));
    'flood: for round in 0..200u32 {
        let mut bytes = Vec::new();
        for i in 0..1000u32 {
            bytes.extend(rpc_echo_call(1 + round * 1000 + i, 0));
        }
        if s.write_all(&bytes).is_err() {
            break 'flood;
        }
        sent_calls += 1000;
    }
    assert!(sent_calls > 0);
    // Meanwhile another client is served.
    assert_served_policy_free(server.tcp);
    let grown = rss_bytes().saturating_sub(before);
    // The flooder is gone: reading ends with EOF or a reset, not a stall.
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break false,
            Err(_) => break true,
        }
    };
    assert!(closed, "the flooder was cut off (sent {sent_calls} calls)");
    assert!(grown < 32 << 20, "RSS grew by {grown} bytes");
    server.stop().unwrap();
}

/// The "nobody" class denies everything, so "served" here means: a call gets its denial
/// promptly on a fresh connection.
fn assert_served_policy_free(addr: std::net::SocketAddr) {
    std::thread::spawn(move || {
        local(async move {
            let c = Client::connect(addr).await.unwrap();
            let e: echo::Client = c.bootstrap();
            let err = e.echo_request().send().promise.await.err().expect("denied");
            assert!(
                err.extra
                    .contains("permission denied: Echo.echo is not allowed for client \"nobody\""),
                "{err}"
            );
        })
    })
    .join()
    .expect("another client was answered");
}

/// A connection whose receive window is pinned at 16 KiB (autotuning would let the kernel
/// absorb megabytes for a peer that does not read).
fn connect_small_window(addr: std::net::SocketAddr) -> std::net::TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(16 * 1024).unwrap();
        let s = sock.connect(addr).await.unwrap().into_std().unwrap();
        s.set_nonblocking(false).unwrap();
        s
    })
}

#[test]
fn a_write_blocked_longer_than_write_timeout_closes_the_connection_and_says_so() {
    use std::num::NonZeroUsize;
    let mut limits = quick_limits();
    limits.write_timeout = Duration::from_millis(300);
    // Budgets far above what is sent: the write deadline, not a budget, must close it.
    limits.max_outgoing_bytes = 256 << 20;
    let server = capgate::Server::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .workers(NonZeroUsize::new(1).unwrap())
        .limits(limits)
        .policy(permissive_policy(16))
        .bootstrap_factory(|_| capgate::demo::EchoService.client())
        .build()
        .unwrap();
    let capgate::ListenAddr::Tcp(addr) = server.local_addrs()[0].clone() else {
        unreachable!()
    };
    let (stats, stop) = (server.stats(), server.shutdown_handle());
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(server.serve())
    });
    // 16 calls of 512 KiB: 8 MiB of answers, more than the socket buffers on both sides hold
    // for a peer that does not read.
    let mut s = connect_small_window(addr);
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&rpc_bootstrap(0)).unwrap();
    for q in 1..=16u32 {
        if s.write_all(&rpc_echo_call(q, 512 * 1024)).is_err() {
            break; // closed already
        }
    }
    let aborts = || {
        let text = stats.metrics_text();
        text.lines()
            .find(|l| l.starts_with("capgate_aborts_total{reason=\"write_timeout\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while aborts() == 0 {
        assert!(Instant::now() < deadline, "no write timeout within 30 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(aborts(), 1);
    let text = stats.metrics_text();
    assert!(
        !text.contains("capgate_aborts_total{reason=\"not_reading\"}"),
        "a budget closed it, not the write deadline: {text}"
    );
    // Another client is served meanwhile.
    local(async {
        let c = Client::connect(addr).await.unwrap();
        let e: echo::Client = c.bootstrap();
        let mut req = e.echo_request();
        req.get().set_payload(b"still here");
        let reply = req.send().promise.await.unwrap();
        assert_eq!(reply.get().unwrap().get_payload().unwrap(), b"still here");
    });
    // The stalled peer, reading at last, finds the connection closed.
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let start = Instant::now();
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break false,
            Err(_) => break true,
        }
        assert!(start.elapsed() < Duration::from_secs(20), "bounded");
    };
    assert!(closed, "the server closed the stalled connection");
    stop.shutdown();
}
