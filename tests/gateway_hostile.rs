//! Hostile input at the gateway, both sides: every hostile-frame case of
//! `hostile_frames.rs` sent by a client (the upstream never sees it, the gateway stays
//! small and keeps serving), and hostile upstreams (oversized frame, garbage, a frame left
//! unfinished, closing mid-call).

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use capgate::demo::Store;
use capgate::store_capnp::store;
use capgate::{Client, Upstream};
use common::upstream::{hostile_upstream, CountingProxy, TestGateway, TwopartyUpstream, Where};
use common::*;

const MIB: usize = 1 << 20;

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The hostile cases, as `(bytes, what the Abort says)`.
fn cases() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let garbage: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut list_root = capnp::message::Builder::new_default();
    list_root
        .init_root::<capnp::any_pointer::Builder>()
        .initn_as::<capnp::primitive_list::Builder<u64>>(4);
    let mut truncated = header(0, &[1000]);
    truncated.extend_from_slice(&[0u8; 100]);
    vec![
        (
            "2^31 words",
            header(0, &[1 << 31]),
            "frame rejected: message of 17179869192 bytes (16.0 GiB) exceeds max_message_bytes",
        ),
        (
            "512 segments",
            header(511, &[1; 512]),
            "frame rejected: 512 segments exceed max_segments = 64",
        ),
        (
            "10000 segments",
            header(9999, &[]),
            "frame rejected: 10000 segments exceed max_segments = 64",
        ),
        (
            "count 0xFFFFFFFF",
            u32::MAX.to_le_bytes().to_vec(),
            "segment count field 0xFFFFFFFF is invalid",
        ),
        ("garbage", garbage, "frame rejected"),
        (
            "truncated body",
            truncated,
            "(frame_timeout); 108 bytes of it had arrived",
        ),
        (
            "list root",
            frame(&list_root),
            "a message that is not an rpc message",
        ),
    ]
}

/// A gateway whose upstream (a twoparty Store) sits behind a relay counting what reaches it;
/// checked to serve before it is handed out.
fn behind_a_counter() -> (TwopartyUpstream, CountingProxy, TestGateway) {
    let up = TwopartyUpstream::start(Store::new());
    let Where::Tcp(at) = up.at.clone() else {
        unreachable!()
    };
    let proxy = CountingProxy::start(at);
    let gw = TestGateway::start(Upstream::tcp(proxy.addr.to_string()), quick_limits(), None);
    assert_served(gw.addr);
    (up, proxy, gw)
}

/// A Bootstrap frame whose union tag is patched to a message kind no schema has.
fn unknown_kind() -> Vec<u8> {
    let mut m = capnp::message::Builder::new_default();
    m.init_root::<capnp_rpc::rpc_capnp::message::Builder>()
        .init_bootstrap()
        .set_question_id(7);
    let mut bytes = frame(&m);
    bytes[16] = 0xEE;
    bytes[17] = 0x00;
    bytes
}

#[test]
fn unknown_and_level_3_messages_get_unimplemented_from_the_gateway_as_from_serve() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (_up, proxy, gw) = behind_a_counter();
    let provide = rpc_message(|m| {
        m.init_provide().set_question_id(3);
    });
    for (name, bytes) in [("unknown kind", unknown_kind()), ("Provide", provide)] {
        let carried = proxy.carried();
        let mut s = raw_send(gw.addr, &bytes);
        let out = observe(&mut s, Duration::from_millis(500));
        assert_eq!(
            out.others,
            vec!["unimplemented".to_string()],
            "{name}: {out:?}"
        );
        assert!(!out.closed, "{name}: the connection stays open");
        assert_eq!(
            proxy.carried(),
            carried,
            "{name}: the upstream saw none of it"
        );
    }
    assert_served(gw.addr);
    gw.stop().unwrap();
}

#[test]
fn an_upstream_sending_an_unknown_message_kind_gets_unimplemented() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let up = hostile_upstream(move |mut s| {
        // Takes in what the client sent (whole frames), so what follows is only the answer.
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut b = [0u8; 4096];
        while matches!(s.read(&mut b), Ok(n) if n > 0) {}
        let _ = s.write_all(&unknown_kind());
        let out = observe(&mut s, Duration::from_millis(500));
        let _ = tx.lock().unwrap().send(out.others);
    });
    let gw = TestGateway::start(Upstream::tcp(up.to_string()), quick_limits(), None);
    local(async {
        let c = Client::connect(gw.addr).await.unwrap();
        let s: store::Client = c.bootstrap();
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            s.namespaces_request().send().promise,
        )
        .await;
    });
    let answered = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the upstream reported");
    assert_eq!(answered, vec!["unimplemented".to_string()]);
    gw.stop().unwrap();
}

#[test]
fn hostile_client_frames_are_refused_at_the_gateway_and_never_reach_the_upstream() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (_up, proxy, gw) = behind_a_counter();
    for (name, bytes, reason) in cases() {
        let before = rss_bytes();
        let carried = proxy.carried();
        let mut s = raw_send(gw.addr, &bytes);
        let out = observe(&mut s, Duration::from_secs(5));
        let abort = out
            .abort
            .clone()
            .unwrap_or_else(|| panic!("{name}: no Abort received: {out:?}"));
        assert!(abort.contains(reason), "{name}: {abort:?} lacks {reason:?}");
        assert!(out.closed, "{name}: closed after the Abort");
        assert_eq!(
            proxy.carried(),
            carried,
            "{name}: the upstream saw none of it"
        );
        let grown = rss_bytes().saturating_sub(before);
        assert!(grown < MIB, "{name}: RSS grew by {grown} bytes");
        assert_served(gw.addr);
    }
    gw.stop().unwrap();
}

/// A client call through a gateway whose upstream behaves as `behave`: the error it gets.
fn call_error(upstream: SocketAddr) -> capnp::Error {
    let gw = TestGateway::start(Upstream::tcp(upstream.to_string()), quick_limits(), None);
    let e = local(async {
        let c = Client::connect(gw.addr).await.unwrap();
        let s: store::Client = c.bootstrap();
        tokio::time::timeout(
            Duration::from_secs(10),
            s.namespaces_request().send().promise,
        )
        .await
        .expect("answered within 10 s")
        .err()
        .expect("the upstream is hostile")
    });
    gw.stop().unwrap();
    e
}

/// Reads what the gateway sends (the client's bootstrap) so the upstream's answer follows it.
fn read_some(s: &mut std::net::TcpStream) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 64];
    let _ = s.read(&mut b);
}

#[test]
fn an_upstream_sending_an_oversized_frame_aborts_the_pair_with_the_reason() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let up = hostile_upstream(|mut s| {
        read_some(&mut s);
        let _ = s.write_all(&header(0, &[1 << 30]));
        std::thread::sleep(Duration::from_secs(2));
    });
    let e = call_error(up);
    assert!(
        e.extra.contains(&format!(
            "capgate: upstream tcp://{up}: frame rejected: message of 8589934600 bytes"
        )),
        "{e}"
    );
}

#[test]
fn an_upstream_sending_garbage_or_an_unfinished_frame_aborts_the_pair() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let up = hostile_upstream(|mut s| {
        read_some(&mut s);
        let _ = s.write_all(&[0xFFu8; 64]);
        std::thread::sleep(Duration::from_secs(2));
    });
    let e = call_error(up);
    assert!(
        e.extra
            .contains(&format!("capgate: upstream tcp://{up}: frame rejected")),
        "{e}"
    );
    let up = hostile_upstream(|mut s| {
        read_some(&mut s);
        let mut half = header(0, &[100]);
        half.extend_from_slice(&[0u8; 16]);
        let _ = s.write_all(&half);
        std::thread::sleep(Duration::from_secs(3));
    });
    let e = call_error(up);
    assert!(
        e.extra.contains(&format!(
            "capgate: upstream tcp://{up}: frame not completed within 500 ms (frame_timeout)"
        )),
        "{e}"
    );
}

#[test]
fn an_upstream_closing_mid_call_is_named() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let up = hostile_upstream(|mut s| {
        read_some(&mut s);
        // Gone without a word.
    });
    let e = call_error(up);
    // A clean close, or a reset when it left bytes unread: either way named.
    assert!(
        e.extra.contains(&format!(
            "capgate: upstream tcp://{up} closed the connection"
        )) || e
            .extra
            .contains(&format!("capgate: upstream tcp://{up}: read failed")),
        "{e}"
    );
    assert_eq!(e.kind, capnp::ErrorKind::Disconnected);
}

#[test]
fn an_upstream_that_stops_reading_pauses_the_client_then_the_pair_is_closed() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Accepts and never reads: what the gateway writes fills the socket buffers, then stalls.
    let up = hostile_upstream(|s| {
        std::thread::sleep(Duration::from_secs(20));
        drop(s);
    });
    let mut limits = quick_limits();
    limits.write_timeout = Duration::from_secs(1);
    let gw = TestGateway::start(Upstream::tcp(up.to_string()), limits, None);
    let before = rss_bytes();
    let mut s = raw_send(gw.addr, &rpc_bootstrap(0));
    // 48 calls of 1 MiB each, written from a thread (the gateway stops reading them).
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        w.set_write_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut sent = 0usize;
        for q in 1..=48 {
            if w.write_all(&rpc_echo_call(q, 1 << 20)).is_err() {
                break;
            }
            sent += 1;
        }
        sent
    });
    let out = observe(&mut s, Duration::from_secs(15));
    let abort = out
        .abort
        .clone()
        .unwrap_or_else(|| panic!("no Abort: {out:?}"));
    assert!(
        abort.contains(&format!(
            "capgate: upstream tcp://{up}: a write to the peer stalled for 1s (write_timeout)"
        )),
        "{abort}"
    );
    // How much the kernel's socket buffers absorbed varies by machine; what the gateway
    // held is bounded (the pause at 256 KiB), whatever the client offered.
    let sent = writer.join().unwrap();
    let grown = rss_bytes().saturating_sub(before);
    assert!(
        grown < 8 * MIB,
        "{sent} MiB offered toward a stalled upstream: RSS grew by {grown} bytes"
    );
    gw.stop().unwrap();
}

#[test]
fn a_silent_upstream_does_not_hold_up_shutdown_past_its_deadline() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let up = hostile_upstream(|mut s| {
        // Reads everything, answers nothing.
        let mut b = [0u8; 4096];
        while matches!(s.read(&mut b), Ok(n) if n > 0) {}
    });
    let mut limits = quick_limits();
    limits.shutdown_timeout = Duration::from_millis(500);
    let gw = TestGateway::start(Upstream::tcp(up.to_string()), limits, None);
    let addr = gw.addr;
    let stop = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        let t = std::time::Instant::now();
        gw.stop().unwrap();
        t.elapsed()
    });
    let e = local(async {
        let c = Client::connect(addr).await.unwrap();
        let s: store::Client = c.bootstrap();
        tokio::time::timeout(
            Duration::from_secs(10),
            s.namespaces_request().send().promise,
        )
        .await
        .expect("ended by the shutdown")
        .err()
        .expect("never answered")
    });
    assert!(
        e.extra.contains("capgate: the server is shutting down"),
        "{e}"
    );
    let took = stop.join().unwrap();
    assert!(took < Duration::from_secs(10), "shutdown took {took:?}");
}
