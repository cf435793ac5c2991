//! capgate vs raw capnp-rpc `twoparty` (buffered streams), side by side in one run, on
//! loopback, same Echo service: sequential latency, throughput at 1/16/128 calls in flight on
//! one connection, and idle memory per server-side connection.
//!
//! `cargo bench --bench rpc` runs criterion, then an interleaved percentile pass and the
//! memory pass, and prints ratios. `cargo bench --bench rpc -- --test` is the quick smoke run.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::rc::Rc;
use std::time::{Duration, Instant};

use capgate::bench_capnp::echo;
use capgate::demo::EchoService;
use capgate::{Catalog, Client, ClientClass, Matcher, Policy, Quotas, Server};
use capnp_rpc::{rpc_twoparty_capnp::Side, RpcSystem};
use criterion::{BenchmarkId, Criterion, Throughput};
use std::num::NonZeroU32;
use tokio::runtime::Runtime;
use tokio::task::LocalSet;

mod common;
use common::{
    interleaved_latency, median, percentile, range, threads_cpu_ns, twoparty_connect,
    twoparty_network, us,
};

const PAYLOAD: &[u8] = &[42u8; 64];

/// Raw capnp-rpc twoparty server (the baseline), one thread, buffered streams.
fn start_twoparty_server() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        LocalSet::new().block_on(&rt, async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let network = twoparty_network(stream, Side::Server);
                let client: echo::Client = capnp_rpc::new_client(EchoService);
                tokio::task::spawn_local(RpcSystem::new(network, Some(client.client)));
            }
        });
    });
    addr
}

/// A class for benchmarking: every quota far above what the benchmark reaches.
fn roomy(name: &str, m: Matcher) -> ClientClass {
    let mut q = Quotas::default();
    q.calls_per_second = NonZeroU32::MAX;
    q.burst = NonZeroU32::MAX;
    q.max_connections = 100_000;
    q.max_inflight_calls = 100_000;
    q.max_open_answers = 100_000;
    ClientClass::new(name, m).with_quotas(q)
}

/// Everything allowed, rate limiter running but never reached: capgate's own cost.
fn trivial_policy() -> Policy {
    Policy::from_classes(vec![roomy("bench", Matcher::Any).allow_all()])
}

/// A realistic policy: 10 classes, 50 allowlist entries, rate limits on (high enough not to
/// deny); the benchmark client matches the last class.
fn realistic_policy() -> Policy {
    let c = Catalog::builtin();
    let entries = [
        "Store.namespace",
        "Store.namespaces",
        "Reader.get",
        "Reader.list",
        "Namespace.readOnly",
    ];
    let mut classes = Vec::new();
    for i in 0..9u8 {
        let mut class = roomy(
            &format!("class{i}"),
            Matcher::Source(format!("10.{i}.0.0/16").parse().unwrap()),
        );
        for e in entries {
            class = class.allow(e, c).unwrap();
        }
        classes.push(class);
    }
    let mut last = roomy("bench", Matcher::Any);
    for e in [
        "Store.namespace",
        "Reader.*",
        "Namespace.put",
        "Namespace.sub",
    ] {
        last = last.allow(e, c).unwrap();
    }
    classes.push(last.allow("Echo.echo", c).unwrap());
    Policy::from_classes(classes)
}

fn start_capgate_server(policy: Policy) -> SocketAddr {
    let server = Server::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .workers(NonZeroUsize::new(1).unwrap())
        .policy(policy)
        .bootstrap_factory(|_| EchoService.client())
        .build()
        .unwrap();
    common::serve_on_thread(server)
}

async fn capgate_client(addr: SocketAddr) -> (Client, echo::Client) {
    let c = Client::connect(addr).await.unwrap();
    let e = c.bootstrap();
    (c, e)
}

async fn call(e: &echo::Client) {
    let mut req = e.echo_request();
    req.get().set_payload(PAYLOAD);
    let reply = req.send().promise.await.unwrap();
    assert_eq!(
        reply.get().unwrap().get_payload().unwrap().len(),
        PAYLOAD.len()
    );
}

/// Runs `total` calls of `one` with `inflight` of them outstanding at any time.
async fn run_with<F, Fut>(e: &echo::Client, total: u64, inflight: usize, one: F) -> Duration
where
    F: Fn(echo::Client) -> Fut + Clone + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let start = Instant::now();
    let left = Rc::new(std::cell::Cell::new(total));
    let workers: Vec<_> = (0..inflight)
        .map(|_| {
            let e = e.clone();
            let left = left.clone();
            let one = one.clone();
            tokio::task::spawn_local(async move {
                while left.get() > 0 {
                    left.set(left.get() - 1);
                    one(e.clone()).await;
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    start.elapsed()
}

/// Echo calls.
async fn run_calls(e: &echo::Client, total: u64, inflight: usize) -> Duration {
    run_with(e, total, inflight, |e| async move { call(&e).await }).await
}

/// `Echo.panic` calls, which the realistic policy does not allow: the guard answers them and
/// the handler (which would panic) never runs.
async fn run_denied(e: &echo::Client, total: u64, inflight: usize) -> Duration {
    run_with(e, total, inflight, |e| async move {
        assert!(e.panic_request().send().promise.await.is_err());
    })
    .await
}

struct Setup {
    rt: Runtime,
    local: LocalSet,
    raw: echo::Client,
    gate: echo::Client,
    _gate_conn: Client,
    policed: echo::Client,
    _policed_conn: Client,
    policed_addr: SocketAddr,
    raw_addr: SocketAddr,
    gate_addr: SocketAddr,
}

impl Setup {
    fn new() -> Self {
        let raw_addr = start_twoparty_server();
        let gate_addr = start_capgate_server(trivial_policy());
        let policed_addr = start_capgate_server(realistic_policy());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = LocalSet::new();
        let (raw, (gate_conn, gate), (policed_conn, policed)) = local.block_on(&rt, async {
            let raw = echo::Client {
                client: twoparty_connect(raw_addr).await,
            };
            let gate = capgate_client(gate_addr).await;
            let policed = capgate_client(policed_addr).await;
            call(&raw).await;
            call(&gate.1).await;
            call(&policed.1).await;
            (raw, gate, policed)
        });
        Self {
            rt,
            local,
            raw,
            gate,
            _gate_conn: gate_conn,
            policed,
            _policed_conn: policed_conn,
            policed_addr,
            raw_addr,
            gate_addr,
        }
    }

    fn systems(&self) -> [(&'static str, &echo::Client); 3] {
        [
            ("twoparty", &self.raw),
            ("capgate", &self.gate),
            ("capgate+policy", &self.policed),
        ]
    }

    fn run<F: std::future::Future>(&self, f: F) -> F::Output {
        self.local.block_on(&self.rt, f)
    }
}

fn criterion_benches(c: &mut Criterion, s: &Setup) {
    let mut g = c.benchmark_group("sequential_echo_64B");
    for (name, e) in s.systems() {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| s.run(run_calls(e, iters, 1)));
        });
    }
    g.finish();

    let mut g = c.benchmark_group("throughput_echo_64B");
    for inflight in [1usize, 16, 128] {
        let batch = 2_000u64;
        g.throughput(Throughput::Elements(batch));
        for (name, e) in s.systems() {
            g.bench_with_input(BenchmarkId::new(name, inflight), &inflight, |b, &k| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += s.run(run_calls(e, batch, k));
                    }
                    total
                });
            });
        }
    }
    g.finish();
}

/// Interleaved blocks so all see the same machine conditions.
fn latency_report(s: &Setup, blocks: usize, per_block: usize) {
    let systems = s.systems();
    let samples = s
        .run(interleaved_latency(systems.len(), blocks, per_block, |i| {
            call(systems[i].1)
        }))
        .all;
    println!(
        "\nsequential echo latency (64 B), {} calls each, interleaved:",
        samples[0].len()
    );
    for (label, p) in [("p50", 0.5), ("p99", 0.99)] {
        let v: Vec<f64> = samples.iter().map(|x| us(percentile(x, p))).collect();
        println!(
            "  {label}: twoparty {:6.1} us   capgate {:6.1} us ({:.2}x)   capgate+policy {:6.1} us ({:.2}x; policy cost {:+.1}%)",
            v[0], v[1], v[1] / v[0], v[2], v[2] / v[0], (v[2] / v[1] - 1.0) * 100.0
        );
    }
}

fn throughput_report(s: &Setup, calls: u64, rounds: usize) {
    println!(
        "\nthroughput (64 B echo, one connection), {rounds} interleaved rounds of {calls} calls, medians:"
    );
    for inflight in [1usize, 16, 128] {
        let mut rates: Vec<Vec<f64>> = vec![Vec::new(); 3];
        let mut ratios = Vec::new();
        let mut policy_cost = Vec::new();
        for _ in 0..rounds {
            let r: Vec<f64> = s
                .systems()
                .iter()
                .map(|(_, e)| calls as f64 / s.run(run_calls(e, calls, inflight)).as_secs_f64())
                .collect();
            ratios.push(r[1] / r[0]);
            policy_cost.push(r[2] / r[1]);
            for (i, x) in r.into_iter().enumerate() {
                rates[i].push(x);
            }
        }
        let (lo, hi) = range(&ratios);
        println!(
            "  {inflight:>3} in flight: twoparty {:>7.0}/s  capgate {:>7.0}/s  capgate+policy {:>7.0}/s  capgate/twoparty {:.2} (rounds {lo:.2}..{hi:.2})  policy/capgate {:.2}",
            median(&mut rates[0]),
            median(&mut rates[1]),
            median(&mut rates[2]),
            median(&mut ratios),
            median(&mut policy_cost),
        );
    }
    let st = s._gate_conn.stats();
    println!(
        "  capgate client: {} frames written in {} writes ({:.1} frames per write)",
        st.frames_out,
        st.writes,
        st.frames_out as f64 / st.writes.max(1) as f64
    );
}

/// Server CPU per call, allowed vs denied, on the realistic-policy server.
fn denial_cost_report(s: &Setup, calls: u64, rounds: usize) {
    let mut allowed = Vec::new();
    let mut denied = Vec::new();
    for _ in 0..rounds {
        let before = threads_cpu_ns("capgate-worker");
        s.run(run_calls(&s.policed, calls, 128));
        let mid = threads_cpu_ns("capgate-worker");
        s.run(run_denied(&s.policed, calls, 128));
        let after = threads_cpu_ns("capgate-worker");
        allowed.push((mid - before) as f64 / calls as f64 / 1000.0);
        denied.push((after - mid) as f64 / calls as f64 / 1000.0);
    }
    let (a, d) = (median(&mut allowed), median(&mut denied));
    println!(
        "\nserver CPU per call at 128 in flight (capgate+policy, median of {rounds}): allowed {a:.2} us, denied {d:.2} us, denied/allowed {:.2}",
        d / a
    );
}

/// A legitimate client's sequential latency, alone and while another client floods denied
/// calls (128 in flight, from its own thread) at the same server.
fn flood_report(s: &Setup, addr: SocketAddr, samples: usize) {
    let measure = |s: &Setup| {
        let mut v = Vec::with_capacity(samples);
        s.run(async {
            for _ in 0..samples {
                let t = Instant::now();
                call(&s.policed).await;
                v.push(t.elapsed());
            }
        });
        v.sort();
        v
    };
    let alone = measure(s);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooder = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            LocalSet::new().block_on(&rt, async move {
                let (_c, e) = capgate_client(addr).await;
                let mut denied = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    run_denied(&e, 1_000, 128).await;
                    denied += 1_000;
                }
                denied
            })
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let flooded = measure(s);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let denied = flooder.join().unwrap();
    let (a50, a99) = (us(percentile(&alone, 0.5)), us(percentile(&alone, 0.99)));
    let (f50, f99) = (
        us(percentile(&flooded, 0.5)),
        us(percentile(&flooded, 0.99)),
    );
    println!(
        "\nlegitimate client while another floods denied calls ({denied} denied meanwhile):\n  alone p50 {a50:.1} us p99 {a99:.1} us; flooded p50 {f50:.1} us p99 {f99:.1} us; p99 ratio {:.2}",
        f99 / a99
    );
}

fn rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: usize = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    kb * 1024
}

/// Server-side memory of idle connections: raw TCP peers (no client-side state in this
/// process) that bootstrap once and go quiet.
fn memory_report(s: &Setup, conns: usize) {
    use std::io::{Read, Write};
    let bootstrap = {
        let mut m = capnp::message::Builder::new_default();
        m.init_root::<capnp_rpc::rpc_capnp::message::Builder>()
            .init_bootstrap()
            .set_question_id(0);
        capnp::serialize::write_message_to_words(&m)
    };
    println!("\nidle memory per server-side connection ({conns} connections, after bootstrap):");
    let mut per = Vec::new();
    for (name, addr) in [("twoparty", s.raw_addr), ("capgate", s.gate_addr)] {
        let before = rss_bytes();
        let socks: Vec<_> = (0..conns)
            .map(|_| {
                let mut t = std::net::TcpStream::connect(addr).unwrap();
                t.write_all(&bootstrap).unwrap();
                let mut b = [0u8; 256];
                t.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let _ = t.read(&mut b).unwrap();
                t
            })
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        let bytes = rss_bytes().saturating_sub(before) / conns;
        per.push(bytes);
        println!("  {name}: {:.1} KiB", bytes as f64 / 1024.0);
        drop(socks);
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "  ratio capgate/twoparty {:.2}",
        per[1] as f64 / per[0].max(1) as f64
    );
}

fn main() {
    let quick = std::env::args().any(|a| a == "--test");
    let s = Setup::new();
    // For profilers: CAPGATE_PROFILE=capgate|twoparty runs 128-in-flight calls for 5 s.
    if let Ok(which) = std::env::var("CAPGATE_PROFILE") {
        let e = if which == "twoparty" { &s.raw } else { &s.gate };
        let start = Instant::now();
        let mut calls = 0u64;
        while start.elapsed() < Duration::from_secs(5) {
            let k = std::env::var("CAPGATE_PROFILE_INFLIGHT")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(128);
            s.run(run_calls(e, 10_000, k));
            calls += 10_000;
        }
        println!(
            "{which}: {:.0} calls/s",
            calls as f64 / start.elapsed().as_secs_f64()
        );
        return;
    }
    let mut c = Criterion::default()
        .configure_from_args()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    criterion_benches(&mut c, &s);
    c.final_summary();
    if quick {
        latency_report(&s, 2, 50);
        throughput_report(&s, 500, 1);
        denial_cost_report(&s, 500, 1);
        flood_report(&s, s.policed_addr, 200);
        memory_report(&s, 20);
    } else {
        latency_report(&s, 10, 2_000);
        throughput_report(&s, 10_000, 9);
        denial_cost_report(&s, 20_000, 5);
        flood_report(&s, s.policed_addr, 5_000);
        memory_report(&s, 500);
    }
}
