//! Hostile frames over real sockets. Each case checks the reason the peer gets, that another
//! client is served normally meanwhile, and that server memory stays bounded (process RSS).

mod common;

use std::sync::Mutex;
use std::time::Duration;

use common::*;

/// RSS readings are process-wide: run the memory-sensitive cases one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const MIB: usize = 1 << 20;

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sends `bytes`, expects an Abort containing `reason` and a closed connection, checks that
/// others are served and that RSS grew by less than `max_growth`.
fn expect_abort(bytes: &[u8], reason: &str, max_growth: usize) {
    let _serial = serial();
    let server = TestServer::start(quick_limits());
    assert_served(server.tcp);
    let before = rss_bytes();
    let mut s = raw_send(server.tcp, bytes);
    let out = observe(&mut s, Duration::from_secs(5));
    let grown = rss_bytes().saturating_sub(before);
    let abort = out
        .abort
        .clone()
        .unwrap_or_else(|| panic!("no Abort received: {out:?}"));
    assert!(
        abort.contains(reason),
        "abort reason {abort:?} lacks {reason:?}"
    );
    assert!(out.closed, "connection closed after the Abort");
    assert!(grown < max_growth, "RSS grew by {grown} bytes");
    assert_served(server.tcp);
    server.stop().unwrap();
}

#[test]
fn segment_table_claiming_2_pow_31_words() {
    expect_abort(
        &header(0, &[1 << 31]),
        "frame rejected: message of 17179869192 bytes (16.0 GiB) exceeds max_message_bytes = 4194304 bytes (4 MiB)",
        MIB,
    );
}

#[test]
fn segment_count_of_512_and_10000() {
    expect_abort(
        &header(511, &[1; 512]),
        "frame rejected: 512 segments exceed max_segments = 64",
        MIB,
    );
    expect_abort(
        &header(9999, &[]),
        "frame rejected: 10000 segments exceed max_segments = 64",
        MIB,
    );
}

#[test]
fn segment_count_0xffffffff() {
    expect_abort(
        &u32::MAX.to_le_bytes(),
        "segment count field 0xFFFFFFFF is invalid",
        MIB,
    );
}

#[test]
fn random_garbage() {
    // Deterministic garbage (xorshift): the first word decodes as an absurd segment count.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let bytes: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    expect_abort(&bytes, "frame rejected", MIB);
}

#[test]
fn claim_of_exactly_the_max_then_silence_commits_little_and_times_out() {
    let _serial = serial();
    let limits = quick_limits();
    let server = TestServer::start(limits.clone());
    assert_served(server.tcp);
    let before = rss_bytes();
    // A table claiming exactly max_message_bytes (one segment: 8 bytes of table + body).
    let words = (limits.max_message_bytes - 8) / 8;
    let mut s = raw_send(server.tcp, &header(0, &[words as u32]));
    // Meanwhile another client is served.
    assert_served(server.tcp);
    let grown = rss_bytes().saturating_sub(before);
    assert!(
        grown < MIB,
        "a 4 MiB claim with no body made RSS grow by {grown} bytes"
    );
    let out = observe(&mut s, Duration::from_secs(5));
    let abort = out.abort.expect("Abort at the frame deadline");
    assert!(
        abort.contains(
            "frame not completed within 500 ms (frame_timeout); 8 bytes of it had arrived"
        ),
        "{abort}"
    );
    assert!(out.closed);
    assert!(
        out.elapsed < Duration::from_secs(3),
        "closed after {:?}",
        out.elapsed
    );
    server.stop().unwrap();
}

#[test]
fn truncated_body_then_silence_is_closed_at_the_deadline() {
    let _serial = serial();
    let server = TestServer::start(quick_limits());
    // A 1,000-word frame of which only 100 bytes arrive.
    let mut bytes = header(0, &[1000]);
    bytes.extend_from_slice(&[0u8; 100]);
    let mut s = raw_send(server.tcp, &bytes);
    assert_served(server.tcp);
    let out = observe(&mut s, Duration::from_secs(5));
    let abort = out.abort.expect("Abort at the frame deadline");
    assert!(
        abort.contains("(frame_timeout); 108 bytes of it had arrived"),
        "{abort}"
    );
    assert!(out.closed);
    assert!(
        out.elapsed >= Duration::from_millis(300),
        "closed early: {:?}",
        out.elapsed
    );
    server.stop().unwrap();
}

#[test]
fn sixty_four_header_only_connections_stay_cheap() {
    let _serial = serial();
    let limits = quick_limits();
    let mut long = limits.clone();
    long.frame_timeout = Duration::from_secs(10);
    let server = TestServer::start_policy(long.clone(), permissive_policy(1000));
    assert_served(server.tcp);
    let before = rss_bytes();
    let words = (long.max_message_bytes - 8) / 8;
    let mut held: Vec<_> = (0..64)
        .map(|_| raw_send(server.tcp, &header(0, &[words as u32])))
        .collect();
    // Each claims 4 MiB: committing the claims would be 256 MiB.
    std::thread::sleep(Duration::from_millis(300));
    assert_served(server.tcp);
    let grown = rss_bytes().saturating_sub(before);
    assert!(
        grown < 4 * MIB,
        "64 held headers made RSS grow by {grown} bytes (claims total 256 MiB)"
    );
    for s in &mut held {
        s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
        let mut b = [0u8; 1];
        // Still open: nothing to read yet.
        assert!(matches!(
            std::io::Read::read(s, &mut b),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
        ));
    }
    drop(held);
    server.stop().unwrap();
}

#[test]
fn valid_frame_with_a_non_rpc_root() {
    let _serial = serial();
    let server = TestServer::start(quick_limits());
    // Root pointer is a list (an rpc Message must be a struct): capnp-rpc cannot read it.
    let mut m = capnp::message::Builder::new_default();
    {
        let mut list = m
            .init_root::<capnp::any_pointer::Builder>()
            .initn_as::<capnp::primitive_list::Builder<u64>>(4);
        for i in 0..4 {
            list.set(i, 0xDEAD_BEEF);
        }
    }
    let bytes = frame(&m);
    let mut s = raw_send(server.tcp, &bytes);
    let out = observe(&mut s, Duration::from_secs(5));
    let abort = out.abort.expect("a list root is refused with an Abort");
    assert!(
        abort.contains("non-struct pointer where struct pointer was expected"),
        "{abort}"
    );
    assert!(out.closed);
    assert_served(server.tcp);

    // A struct root whose union tag is no rpc message kind: echoed back as Unimplemented,
    // as the protocol asks; the connection stays usable.
    let mut m = capnp::message::Builder::new_default();
    {
        let st = m.init_root::<capnp_rpc::rpc_capnp::message::Builder>();
        st.init_bootstrap().set_question_id(7);
    }
    let mut bytes = frame(&m);
    // Patch the union discriminant (first 16 bits of the data section) to an unknown value.
    bytes[16] = 0xEE;
    bytes[17] = 0x00;
    let mut s = raw_send(server.tcp, &bytes);
    let out = observe(&mut s, Duration::from_millis(500));
    assert_eq!(out.others, vec!["unimplemented".to_string()], "{out:?}");
    assert!(
        !out.closed,
        "an unknown message kind does not close the connection"
    );
    server.stop().unwrap();
}
