//! The amplification bound as the oracle: an arbitrary sequence of rpc messages (calls with
//! large cap tables, denied calls, bootstraps, finishes, releases, pipelined calls) sent over
//! a real connection to a capgate server that never gets read must not make the server
//! allocate more than `FACTOR * bytes sent + PER_CONNECTION` (README, "Limits").
#![no_main]

use std::io::Write;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use capgate_policy::{ClientClass, Matcher, Policy};
use capgate_runtime::{ListenAddr, Server, ServerStats};
use capgate_schema::bench_capnp::echo;
use capgate_schema::Catalog;
use capnp::traits::HasTypeId;
use capnp_rpc::rpc_capnp::message;
use libfuzzer_sys::fuzz_target;
use peak_alloc::PeakAlloc;

#[global_allocator]
static ALLOC: PeakAlloc = PeakAlloc;

const FACTOR: usize = 8;
const PER_CONNECTION: usize = 2 << 20;

struct Echo;

impl echo::Server for Echo {
    async fn echo(
        self: Rc<Self>,
        params: echo::EchoParams,
        mut results: echo::EchoResults,
    ) -> Result<(), capnp::Error> {
        results.get().set_payload(params.get()?.get_payload()?);
        Ok(())
    }
}

/// One server for the whole run: Echo.echo allowed, Echo.panic denied.
fn server() -> &'static (SocketAddr, ServerStats) {
    static SERVER: OnceLock<(SocketAddr, ServerStats)> = OnceLock::new();
    SERVER.get_or_init(|| {
        let class = ClientClass::new("fuzz", Matcher::Any)
            .allow("Echo.echo", Catalog::builtin())
            .expect("valid allowlist");
        let server = Server::builder()
            .listen("127.0.0.1:0".parse().unwrap())
            .policy(Policy::from_classes(vec![class]))
            .bootstrap_factory(|_| capnp_rpc::new_client::<echo::Client, _>(Echo))
            .build()
            .expect("server builds");
        let ListenAddr::Tcp(addr) = server.local_addrs()[0].clone() else {
            unreachable!()
        };
        let stats = server.stats();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(server.serve())
        });
        (addr, stats)
    })
}

fn received(stats: &ServerStats) -> u64 {
    stats
        .metrics_text()
        .lines()
        .find_map(|l| l.strip_prefix("capgate_received_bytes_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn frame(f: impl FnOnce(message::Builder)) -> Vec<u8> {
    let mut m = capnp::message::Builder::new_default();
    f(m.init_root());
    let mut out = Vec::new();
    capgate_runtime::fuzzing::encode_frame(&mut out, &m.get_segments_for_output());
    out
}

/// Turns the input into rpc messages, one a byte: the byte picks the kind and its flags, and
/// with its position the question id and the count (cap table length, payload words).
fn messages(data: &[u8]) -> Vec<u8> {
    let mut out = frame(|m| m.init_bootstrap().set_question_id(0));
    for (i, &b) in data.iter().enumerate() {
        let op = [b];
        let (i, b) = (i as u32, u32::from(b));
        let q = (i * 131 + b) % 2048;
        let n = (b * 97 + i * 13) % 1100;
        out.extend(match op[0] % 5 {
            0 => frame(|m| m.init_bootstrap().set_question_id(q)),
            1 => frame(|m| m.init_finish().set_question_id(q)),
            2 => frame(|m| {
                let mut r = m.init_release();
                r.set_id(n);
                r.set_reference_count(1);
            }),
            kind => frame(|m| {
                let mut call = m.init_call();
                call.set_question_id(q);
                call.set_interface_id(echo::Client::TYPE_ID);
                // Method 1 (panic) is denied by the policy.
                call.set_method_id(u16::from(op[0] & 0x10 != 0));
                let mut target = call.reborrow().init_target().init_promised_answer();
                // Pipelined on question 0 (the bootstrap) or on an earlier call.
                target.set_question_id(if op[0] & 0x20 != 0 { q / 2 } else { 0 });
                if op[0] & 0x40 != 0 {
                    call.reborrow().init_send_results_to().set_yourself(());
                }
                let mut params = call.init_params();
                if kind == 4 {
                    params
                        .reborrow()
                        .get_content()
                        .init_as::<echo::echo_params::Builder>()
                        .init_payload(n * 64);
                }
                let mut table = params.init_cap_table(if kind == 3 { n } else { 0 });
                for i in 0..table.len() {
                    let id = if op[0] & 0x80 != 0 { 1 } else { i };
                    table.reborrow().get(i).set_sender_hosted(id);
                }
            }),
        });
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let (addr, stats) = server();
    let bytes = messages(data);
    let before = received(stats);
    let base = ALLOC.current_usage();
    ALLOC.reset_peak_usage();
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return;
    };
    let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
    let mut sent = 0usize;
    for chunk in bytes.chunks(64 * 1024) {
        if s.write_all(chunk).is_err() {
            break;
        }
        sent += chunk.len();
    }
    // Until the server has read it all (or closed the connection), bounded.
    let deadline = Instant::now() + Duration::from_secs(10);
    while received(stats) < before + sent as u64 && Instant::now() < deadline {
        let mut probe = [0u8; 1];
        let _ = s.set_nonblocking(true);
        if let Ok(0) = std::io::Read::read(&mut s, &mut probe) {
            break;
        }
        let _ = s.set_nonblocking(false);
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(2));
    let peak = ALLOC.peak_usage().saturating_sub(base);
    let bound = FACTOR * sent + PER_CONNECTION;
    assert!(
        peak <= bound,
        "the server held {peak} bytes for {sent} sent"
    );
});
