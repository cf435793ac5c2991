//! The amplification bound, measured with a counting allocator: whatever a peer sends, the
//! memory the server holds because of it stays within `FACTOR * bytes sent + PER_CONNECTION`
//! (README, "Limits"), and other clients are served meanwhile. Every case sends over a real
//! socket and never reads, the worst case for what piles up in the server.

mod common;

use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use capgate::store_capnp::{namespace, reader, store};
use capgate::{ClientClass, Matcher, Policy, Quotas};
use capnp::traits::HasTypeId;
use common::*;
use peak_alloc::PeakAlloc;
use proptest::prelude::*;

#[global_allocator]
static ALLOC: PeakAlloc = PeakAlloc;

/// The documented bound: a peer makes the server hold at most this multiple of what it sent...
const FACTOR: usize = 8;
/// ...plus this much per connection with the default quotas (answer-table entries capnp-rpc
/// keeps for open answers, calls in flight, buffers).
const PER_CONNECTION: usize = 2 << 20;

/// Allocation counts are process-wide: one case at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// What one attack cost.
struct Measured {
    sent: usize,
    /// Peak allocation above the level before the attack.
    peak: usize,
    /// What the attacker's socket saw afterwards.
    outcome: Outcome,
}

/// A counter of the server's metrics.
fn counter(server: &TestServer, name: &str) -> u64 {
    server
        .stats()
        .metrics_text()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// `capgate_received_bytes_total` of the server.
fn received_bytes(server: &TestServer) -> u64 {
    counter(server, "capgate_received_bytes_total")
}

/// Waits (bounded) until nothing is allocated or freed for 50 ms, then starts counting the
/// peak from there: memory an earlier step is still freeing would hide what comes next.
fn start_peak() -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = ALLOC.current_usage();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        let now = ALLOC.current_usage();
        if now == last {
            break;
        }
        last = now;
    }
    ALLOC.reset_peak_usage();
    ALLOC.current_usage()
}

/// Sends `bytes` on a fresh connection without reading, waits (bounded) until the server has
/// read all of it or closed the connection, and measures the peak allocation meanwhile.
fn attack(server: &TestServer, bytes: &[u8]) -> Measured {
    let open_before = server.stats().open_connections();
    let received_before = received_bytes(server);
    let base = start_peak();
    let mut s = std::net::TcpStream::connect(server.tcp).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut sent = 0;
    for chunk in bytes.chunks(64 * 1024) {
        if s.write_all(chunk).is_err() {
            break; // cut off: the server closed the socket
        }
        sent += chunk.len();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let consumed = received_bytes(server) >= received_before + sent as u64;
        let closed = server.stats().open_connections() <= open_before;
        if consumed || closed {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // What the server still does with the last frames (denials, replies) is within a
    // moment of reading them; the peak is taken once its queue stops growing.
    let mut last = 0;
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(10));
        let now = ALLOC.current_usage();
        if now == last {
            break;
        }
        last = now;
    }
    let peak = ALLOC.peak_usage().saturating_sub(base);
    let outcome = observe(&mut s, Duration::from_secs(5));
    Measured {
        sent,
        peak,
        outcome,
    }
}

fn assert_bounded(what: &str, m: &Measured) {
    let bound = FACTOR * m.sent + PER_CONNECTION;
    eprintln!(
        "{what}: sent {} bytes, peak {} bytes ({:.2}x sent), bound {bound}",
        m.sent,
        m.peak,
        m.peak as f64 / m.sent.max(1) as f64
    );
    assert!(
        m.peak <= bound,
        "{what}: the server held {} bytes for {} sent (bound {bound})",
        m.peak,
        m.sent
    );
}

/// A policy that may call nothing: every call is answered by the guard.
fn nobody(quotas: Quotas) -> Policy {
    Policy::from_classes(vec![
        ClientClass::new("nobody", Matcher::Any).with_quotas(quotas)
    ])
}

/// A call on the bootstrap answer carrying `caps` capabilities (distinct senderHosted ids),
/// with results sent to `yourself` when asked (always denied).
fn call_with_caps(q: u32, caps: u32, yourself: bool) -> Vec<u8> {
    rpc_message(|m| {
        let mut call = m.init_call();
        call.set_question_id(q);
        call.set_interface_id(store::Client::TYPE_ID);
        call.set_method_id(1);
        call.reborrow()
            .init_target()
            .init_promised_answer()
            .set_question_id(0);
        if yourself {
            call.reborrow().init_send_results_to().set_yourself(());
        }
        let mut table = call.init_params().init_cap_table(caps);
        for i in 0..caps {
            table.reborrow().get(i).set_sender_hosted(i);
        }
    })
}

fn finish(q: u32) -> Vec<u8> {
    rpc_message(|m| m.init_finish().set_question_id(q))
}

#[test]
fn denied_calls_with_large_cap_tables_cost_a_small_multiple_of_their_size() {
    let _s = serial();
    let server = TestServer::start(quick_limits());
    // Six calls of 1,000 capabilities each (the finding used 10,000: see the next test),
    // denied for sendResultsTo.yourself: each is answered by a Return and 1,000 Releases.
    let mut bytes = rpc_bootstrap(0);
    for q in 1..=6 {
        bytes.extend(call_with_caps(q, 1000, true));
    }
    let m = attack(&server, &bytes);
    assert_bounded("6 denied calls x 1000 caps", &m);
    assert!(m.outcome.abort.is_none(), "{:?}", m.outcome);
    assert_served(server.tcp);
    server.stop().unwrap();
}

#[test]
fn a_cap_table_over_max_caps_per_message_aborts_with_the_reason() {
    let _s = serial();
    let server = TestServer::start(quick_limits());
    let mut bytes = rpc_bootstrap(0);
    bytes.extend(call_with_caps(1, 10_000, true));
    let m = attack(&server, &bytes);
    assert_bounded("a call with 10,000 caps", &m);
    let abort = m.outcome.abort.clone().expect("an Abort");
    assert!(
        abort.contains(
            "max_caps_per_message = 1024 exceeded: a Call carries 10000 capabilities in its \
             cap table (client \"default\")"
        ),
        "{abort}"
    );
    assert!(m.outcome.closed);
    assert_served(server.tcp);
    server.stop().unwrap();
}

#[test]
fn a_flood_of_denied_calls_and_finishes_stays_bounded() {
    let _s = serial();
    let server = TestServer::start_policy(quick_limits(), nobody(Quotas::default()));
    let mut bytes = rpc_bootstrap(0);
    for q in 1..=60_000u32 {
        bytes.extend(call_with_caps(q, 0, false));
        bytes.extend(finish(q));
    }
    let m = attack(&server, &bytes);
    assert_bounded("60,000 denied calls, each finished", &m);
    server.stop().unwrap();
}

#[test]
fn bootstraps_count_against_max_open_answers() {
    let _s = serial();
    let server = TestServer::start(quick_limits());
    let bytes: Vec<u8> = (0..50_000u32).flat_map(rpc_bootstrap).collect();
    let m = attack(&server, &bytes);
    assert_bounded("50,000 bootstraps, never finished", &m);
    let abort = m.outcome.abort.clone().expect("an Abort");
    assert!(
        abort.contains("max_open_answers = 1024 exceeded"),
        "{abort}"
    );
    assert_served(server.tcp);
    server.stop().unwrap();
}

#[test]
fn a_huge_abort_reason_is_cut_not_echoed() {
    let _s = serial();
    let server = TestServer::start(quick_limits());
    let reason = "x".repeat(3 << 20);
    let mut bytes = rpc_bootstrap(0);
    bytes.extend(rpc_message(|m| {
        let mut e = m.init_abort();
        e.set_reason(reason.as_str());
    }));
    let m = attack(&server, &bytes);
    let echoed = m
        .outcome
        .abort
        .clone()
        .expect("the server answers with its own Abort");
    assert!(echoed.len() < 2048, "{} bytes echoed", echoed.len());
    assert!(
        echoed.ends_with("... (3145728 bytes in all)"),
        "{}",
        &echoed[echoed.len().saturating_sub(80)..]
    );
    assert_served(server.tcp);
    server.stop().unwrap();
}

/// Opens a connection from `source` and asks for `gets` reads of the 1 MiB value stored
/// under `big`/`v` (calls of ~100 bytes, answers of 1 MiB), never reading the answers.
fn non_reader(server: &TestServer, source: &str, gets: u32) -> std::net::TcpStream {
    use capgate::store_capnp::reader;
    let mut s = connect_small_window(server.tcp, source);
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut bytes = rpc_bootstrap(0);
    bytes.extend(rpc_message(|m| {
        let mut call = m.init_call();
        call.set_question_id(1);
        call.set_interface_id(store::Client::TYPE_ID);
        call.set_method_id(0);
        call.reborrow()
            .init_target()
            .init_promised_answer()
            .set_question_id(0);
        call.init_params()
            .get_content()
            .init_as::<store::namespace_params::Builder>()
            .set_name("big");
    }));
    for q in 2..2 + gets {
        bytes.extend(rpc_message(|m| {
            let mut call = m.init_call();
            call.set_question_id(q);
            call.set_interface_id(reader::Client::TYPE_ID);
            call.set_method_id(0);
            let mut pa = call.reborrow().init_target().init_promised_answer();
            pa.set_question_id(1);
            pa.init_transform(1).get(0).set_get_pointer_field(0);
            call.init_params()
                .get_content()
                .init_as::<reader::get_params::Builder>()
                .set_key("v");
        }));
    }
    s.write_all(&bytes).unwrap();
    s
}

/// A Store server with a 1 MiB value under `big`/`v`.
fn big_value_server(limits: capgate::Limits, quotas: Quotas) -> TestServer {
    let policy = Policy::from_classes(vec![ClientClass::new("everyone", Matcher::Any)
        .allow_all()
        .with_quotas(quotas)]);
    let server = TestServer::start_policy(limits, policy);
    local(async {
        let (_c, s) = store_client(server.tcp).await;
        let mut req = s.namespace_request();
        req.get().set_name("big");
        let mut put = req.send().pipeline.get_ns().put_request();
        put.get().set_key("v");
        put.get().set_value(&vec![1u8; 1 << 20]);
        put.send().promise.await.expect("stored");
    });
    server
}

/// A connection from `source` whose receive buffer (and so the window it offers) is pinned
/// at 16 KiB: what the kernel can absorb for a peer that does not read stays small and the
/// same on every machine (autotuning would grow it to several MiB).
fn connect_small_window(addr: std::net::SocketAddr, source: &str) -> std::net::TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(16 * 1024).unwrap();
        sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
        let s = sock.connect(addr).await.unwrap().into_std().unwrap();
        s.set_nonblocking(false).unwrap();
        s
    })
}

/// Waits (bounded) until the server has done what the non-readers asked: every get answered,
/// or (some connections cut off) nothing more happening for 300 ms. Measuring early could
/// only make a peak look smaller, never fail a test.
fn settle(server: &TestServer, gets: u64) {
    let delivered = || {
        server
            .stats()
            .metrics_text()
            .lines()
            .filter(|l| l.starts_with("capgate_calls_total{") && l.contains("Reader.get"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = (u64::MAX, usize::MAX);
    let mut stable_since = Instant::now();
    while Instant::now() < deadline && delivered() < gets {
        let now = (delivered(), ALLOC.current_usage());
        if now != last {
            last = now;
            stable_since = Instant::now();
        } else if stable_since.elapsed() > Duration::from_millis(300) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits (bounded) until `done` holds.
fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "{what} within 20 s");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A fresh client of the "reader" class (which may not put) is answered.
fn assert_reader_served(addr: std::net::SocketAddr) {
    std::thread::spawn(move || {
        local(async move {
            let (_c, s) = store_client(addr).await;
            let mut req = s.namespace_request();
            req.get().set_name("health");
            let ns: reader::Client = capgate::cast(&req.send().pipeline.get_ns());
            let mut get = ns.get_request();
            get.get().set_key("k");
            let reply = get.send().promise.await.expect("served");
            assert!(!reply.get().unwrap().get_found());
        })
    })
    .join()
    .expect("another client was served");
}

const MIB: usize = 1 << 20;

/// The most a budget of `max` lets `n` non-reading connections asking for 1 MiB answers make
/// the server allocate: `max` for those not cut off, what each of the others held when it
/// was cut (at most `max` and an answer; freed when its thread next runs), and an answer
/// being built per connection.
fn peak_bound(max: usize, n: usize) -> usize {
    max + (n - 1) * (max + MIB) + n * 2 * MIB
}

#[test]
fn non_reading_connections_of_one_client_are_held_to_its_outgoing_budget() {
    let _s = serial();
    let mut q = Quotas::default();
    q.max_client_outgoing_bytes = 4 * MIB;
    let server = big_value_server(quick_limits(), q);
    // Three connections each asking for 16 MiB of answers (the server's socket buffer holds
    // little of them, the peer's window being small): 48 MiB for one client, each connection
    // within its own 16 MiB. Unbounded, about 40 MiB would be queued.
    let base = start_peak();
    let conns: Vec<_> = (0..3)
        .map(|_| non_reader(&server, "127.0.0.1", 16))
        .collect();
    settle(&server, 3 * 16);
    assert!(counter(&server, "capgate_outgoing_cutoffs_total") >= 1);
    // Each connection counts for at most two 16 KiB chunks more than it has queued, and
    // one answer may be on its way to the queue.
    let budget = 4 * MIB + 3 * (32 * 1024 + MIB + 4096);
    eventually("the client's queue to be within its budget", || {
        server.stats().queued_outgoing_bytes() <= budget
    });
    let peak = ALLOC.peak_usage().saturating_sub(base);
    eprintln!("one client, 3 connections: peak {peak} bytes");
    assert!(peak <= peak_bound(4 * MIB, 3), "peak {peak} bytes");
    // Another client is served meanwhile.
    assert_served(server.tcp);
    drop(conns);
    server.stop().unwrap();
}

#[test]
fn non_reading_clients_are_held_to_the_server_outgoing_budget() {
    let _s = serial();
    let mut limits = quick_limits();
    limits.max_total_outgoing_bytes = 4 * MIB;
    let server = big_value_server(limits, Quotas::default());
    // Three clients, 16 MiB of answers each: 48 MiB against the server's 4 MiB.
    let base = start_peak();
    let conns: Vec<_> = ["127.0.0.3", "127.0.0.4", "127.0.0.5"]
        .iter()
        .map(|src| non_reader(&server, src, 16))
        .collect();
    settle(&server, 3 * 16);
    assert!(counter(&server, "capgate_outgoing_cutoffs_total") >= 1);
    let budget = 4 * MIB + 3 * (32 * 1024 + MIB + 4096);
    eventually("all peers' queues to be within the server's budget", || {
        server.stats().queued_outgoing_bytes() <= budget
    });
    let peak = ALLOC.peak_usage().saturating_sub(base);
    eprintln!("three clients: peak {peak} bytes");
    assert!(peak <= peak_bound(4 * MIB, 3), "peak {peak} bytes");
    assert_served(server.tcp);
    drop(conns);
    server.stop().unwrap();
}

/// One generated step of a hostile peer.
#[derive(Clone, Debug)]
enum Op {
    Bootstrap(u32),
    /// A call on the bootstrap answer or on an earlier question, with capabilities.
    Call {
        q: u32,
        on: Option<u32>,
        caps: u16,
        duplicate_caps: bool,
        yourself: bool,
        allowed: bool,
    },
    Finish(u32),
    Release(u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u32..64).prop_map(Op::Bootstrap),
        (
            1u32..2000,
            prop::option::of(0u32..2000),
            0u16..1100,
            any::<bool>(),
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(
                |(q, on, caps, duplicate_caps, yourself, allowed)| Op::Call {
                    q,
                    on,
                    caps,
                    duplicate_caps,
                    yourself,
                    allowed,
                }
            ),
        (0u32..2000).prop_map(Op::Finish),
        (0u32..64).prop_map(Op::Release),
    ]
}

fn encode(op: &Op) -> Vec<u8> {
    match *op {
        Op::Bootstrap(q) => rpc_bootstrap(q),
        Op::Finish(q) => finish(q),
        Op::Release(id) => rpc_message(|m| {
            let mut r = m.init_release();
            r.set_id(id);
            r.set_reference_count(1);
        }),
        Op::Call {
            q,
            on,
            caps,
            duplicate_caps,
            yourself,
            allowed,
        } => rpc_message(|m| {
            let mut call = m.init_call();
            call.set_question_id(q);
            // Namespace.get is allowed for the "reader" class below, Namespace.put is not.
            call.set_interface_id(namespace::Client::TYPE_ID);
            call.set_method_id(if allowed { 0 } else { 1 });
            call.reborrow()
                .init_target()
                .init_promised_answer()
                .set_question_id(on.unwrap_or(0));
            if yourself {
                call.reborrow().init_send_results_to().set_yourself(());
            }
            let mut table = call.init_params().init_cap_table(u32::from(caps));
            for i in 0..u32::from(caps) {
                let id = if duplicate_caps { 7 } else { i };
                table.reborrow().get(i).set_sender_promise(id);
            }
        }),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    /// The harness: generated message sequences over a real connection, never read, always
    /// within the bound.
    #[test]
    fn generated_hostile_sequences_stay_within_the_bound(ops in prop::collection::vec(op(), 1..400)) {
        let _s = serial();
        let c = capgate::Catalog::builtin();
        let reader = ClientClass::new("reader", Matcher::Any)
            .allow("Store.*", c).unwrap()
            .allow("Reader.*", c).unwrap();
        let server = TestServer::start_policy(quick_limits(), Policy::from_classes(vec![reader]));
        let mut bytes = rpc_bootstrap(0);
        for op in &ops {
            bytes.extend(encode(op));
        }
        let m = attack(&server, &bytes);
        let bound = FACTOR * m.sent + PER_CONNECTION;
        prop_assert!(m.peak <= bound, "held {} for {} sent", m.peak, m.sent);
        assert_reader_served(server.tcp);
        server.stop().unwrap();
    }
}

#[test]
fn a_pipelined_call_with_a_huge_transform_stays_bounded() {
    let _s = serial();
    let server = TestServer::start(quick_limits());
    // 200,000 getPointerField ops in one promisedAnswer transform (3.2 MB in one frame).
    let mut bytes = rpc_bootstrap(0);
    bytes.extend(rpc_message(|m| {
        let mut call = m.init_call();
        call.set_question_id(1);
        call.set_interface_id(store::Client::TYPE_ID);
        call.set_method_id(1);
        let mut pa = call.reborrow().init_target().init_promised_answer();
        pa.set_question_id(0);
        let mut ops = pa.init_transform(200_000);
        for i in 0..200_000 {
            ops.reborrow().get(i).set_get_pointer_field(0);
        }
    }));
    let m = attack(&server, &bytes);
    assert_bounded("a 200,000-op transform", &m);
    assert_served(server.tcp);
    server.stop().unwrap();
}

#[test]
fn releases_and_finishes_for_ids_never_issued_cost_nothing() {
    let _s = serial();
    let server = TestServer::start(quick_limits());
    let mut bytes = rpc_bootstrap(0);
    for i in 0..100_000u32 {
        bytes.extend(rpc_message(|m| {
            let mut r = m.init_release();
            r.set_id(1_000_000 + i);
            r.set_reference_count(u32::MAX);
        }));
        bytes.extend(finish(2_000_000 + i));
    }
    let m = attack(&server, &bytes);
    assert_bounded("100,000 stray Releases and Finishes", &m);
    assert_served(server.tcp);
    server.stop().unwrap();
}
