//! capgate vs raw capnp-rpc `twoparty` vs tarpc (bincode), with raw TCP ping-pong as the
//! floor: the same echo workload, one process, one run, interleaved so every system sees
//! the same machine conditions. See `benches/README.md` for what each report measures.
//!
//! `cargo bench --bench compare` (about 2 minutes), `-- --test` for the CI smoke run.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::rc::Rc;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use capgate::bench_capnp::echo;
use capgate::demo::{EchoService, Store};
use capgate::store_capnp::{namespace, store};
use capgate::{Client, ClientClass, ClientHandle, Limits, ListenAddr, Matcher, Policy, Server};
use capnp_rpc::{rpc_twoparty_capnp::Side, RpcSystem};
use futures::StreamExt;
use serde_bytes::ByteBuf;
use tarpc::tokio_serde::formats::Bincode;
use tarpc::tokio_util::codec::LengthDelimitedCodec;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::task::LocalSet;

// `ByteBuf` (serde_bytes) so bincode copies the payload as one block, not byte by byte.
mod common;
use common::{median, threads_cpu_ns, twoparty_connect, twoparty_network};

#[tarpc::service]
trait TarpcEcho {
    async fn echo(payload: ByteBuf) -> ByteBuf;
}

#[derive(Clone)]
struct TarpcEchoServer;

impl TarpcEcho for TarpcEchoServer {
    async fn echo(self, _: tarpc::context::Context, payload: ByteBuf) -> ByteBuf {
        payload
    }
}

const MAX_FRAME: usize = 64 << 20;

// ---------------------------------------------------------------------------------------
// Servers. Each runs on `threads` threads of its own; one connection always lands on one.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Sys {
    Twoparty,
    Capgate,
    Tarpc,
    /// capgate through the `Send + Clone` `ClientHandle` (client side only).
    Handle,
    /// capgate with busy-polling on both sides (`Limits::busy_poll`).
    Busy,
    /// capgate with adaptive polling off on both sides (`answer_poll`, `call_poll` = 0).
    NoPoll,
}

impl Sys {
    fn name(self) -> &'static str {
        match self {
            Sys::Twoparty => "twoparty",
            Sys::Capgate => "capgate",
            Sys::Tarpc => "tarpc",
            Sys::Handle => "capgate handle",
            Sys::Busy => "capgate busy-poll",
            Sys::NoPoll => "capgate no-poll",
        }
    }
}

fn current_thread_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Raw capnp-rpc twoparty over buffered streams, connections dealt round-robin to
/// `threads` threads (each a current-thread runtime with a LocalSet).
fn start_twoparty(threads: usize, store: bool) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut senders = Vec::new();
    for _ in 0..threads {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<std::net::TcpStream>();
        senders.push(tx);
        std::thread::Builder::new()
            .name("twoparty-server".into())
            .spawn(move || {
                let store_impl = Store::new();
                LocalSet::new().block_on(&current_thread_rt(), async move {
                    while let Some(s) = rx.recv().await {
                        s.set_nonblocking(true).unwrap();
                        let s = tokio::net::TcpStream::from_std(s).unwrap();
                        let network = twoparty_network(s, Side::Server);
                        let bootstrap = if store {
                            store_impl.client().client
                        } else {
                            EchoService.client().client
                        };
                        tokio::task::spawn_local(RpcSystem::new(network, Some(bootstrap)));
                    }
                });
            })
            .unwrap();
    }
    std::thread::spawn(move || {
        for (i, s) in listener.incoming().enumerate() {
            let _ = senders[i % senders.len()].send(s.unwrap());
        }
    });
    addr
}

/// A policy that allows the workload and stays out of its way (quotas far above it).
fn bench_policy() -> Policy {
    let mut q = common::roomy_quotas();
    q.max_message_bytes = Some(MAX_FRAME);
    q.max_inflight_bytes = 1 << 30;
    let c = capgate::Catalog::builtin();
    let class = ClientClass::new("bench", Matcher::Any)
        .with_quotas(q)
        .allow("Echo.echo", c)
        .and_then(|k| k.allow("Store.*", c))
        .and_then(|k| k.allow("Namespace.*", c))
        .and_then(|k| k.allow("Reader.*", c))
        .unwrap();
    Policy::from_classes(vec![class])
}

fn capgate_limits() -> capgate::Limits {
    let mut l = capgate::Limits::default();
    l.max_connections = 100_000;
    l.max_message_bytes = MAX_FRAME;
    l.max_outgoing_bytes = 256 << 20;
    l
}

/// capgate with the policy on, `workers` worker threads.
fn start_capgate(
    workers: usize,
    store: bool,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> SocketAddr {
    start_capgate_with(workers, store, tls, capgate_limits())
}

/// The busy-polling budget of the `capgate busy-poll` runs.
const BUSY_POLL: Duration = Duration::from_micros(200);

fn busy_limits() -> Limits {
    let mut l = capgate_limits();
    l.busy_poll = BUSY_POLL;
    l
}

/// capgate as it was before adaptive polling: every wait for the peer sleeps at once.
fn no_poll_limits() -> Limits {
    let mut l = capgate_limits();
    l.answer_poll = Duration::ZERO;
    l.call_poll = Duration::ZERO;
    l
}

fn start_capgate_with(
    workers: usize,
    store: bool,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: Limits,
) -> SocketAddr {
    let store_impl = Store::new();
    let mut b = Server::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .workers(NonZeroUsize::new(workers).unwrap())
        .limits(limits)
        .policy(bench_policy());
    b = if store {
        b.bootstrap_factory(move |_| store_impl.client())
    } else {
        b.bootstrap_factory(|_| EchoService.client())
    };
    if let Some(t) = tls {
        b = b.tls(t);
    }
    let server = b.build().unwrap();
    let ListenAddr::Tcp(addr) = server.local_addrs()[0].clone() else {
        unreachable!()
    };
    std::thread::spawn(move || current_thread_rt().block_on(server.serve()));
    addr
}

fn tarpc_framing() -> tarpc::tokio_util::codec::length_delimited::Builder {
    let mut b = LengthDelimitedCodec::builder();
    b.max_frame_length(MAX_FRAME);
    b
}

/// tarpc on a tokio runtime with `threads` worker threads, TCP_NODELAY like the others.
fn start_tarpc(threads: usize) -> SocketAddr {
    use tarpc::server::{BaseChannel, Channel};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("tarpc-server")
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let (s, _) = listener.accept().await.unwrap();
                s.set_nodelay(true).unwrap();
                let transport =
                    tarpc::serde_transport::new(tarpc_framing().new_framed(s), Bincode::default());
                tokio::spawn(
                    BaseChannel::with_defaults(transport)
                        .execute(TarpcEchoServer.serve())
                        .for_each(|f| async move {
                            tokio::spawn(f);
                        }),
                );
            }
        });
    });
    addr
}

/// Raw tokio TCP 8-byte ping-pong server, one thread.
fn start_tcp_pingpong() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        current_thread_rt().block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                s.set_nodelay(true).unwrap();
                tokio::spawn(async move {
                    let mut b = [0u8; 8];
                    while s.read_exact(&mut b).await.is_ok() {
                        if s.write_all(&b).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
    });
    addr
}

// ---------------------------------------------------------------------------------------
// Clients.

#[derive(Clone)]
enum Conn {
    Twoparty(echo::Client),
    // The `Client` keeps the connection open.
    Capgate(#[allow(dead_code)] Client, echo::Client),
    Tarpc(TarpcEchoClient),
    Handle(ClientHandle),
}

async fn connect(sys: Sys, addr: SocketAddr) -> Conn {
    match sys {
        Sys::Twoparty => Conn::Twoparty(echo::Client {
            client: twoparty_connect(addr).await,
        }),
        Sys::Capgate | Sys::Busy | Sys::NoPoll => {
            let limits = match sys {
                Sys::Busy => busy_limits(),
                Sys::NoPoll => no_poll_limits(),
                _ => capgate_limits(),
            };
            let c = Client::builder()
                .limits(limits)
                .connect(addr)
                .await
                .unwrap();
            let e = c.bootstrap();
            Conn::Capgate(c, e)
        }
        Sys::Tarpc => {
            let s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.set_nodelay(true).unwrap();
            let t = tarpc::serde_transport::new(tarpc_framing().new_framed(s), Bincode::default());
            let mut config = tarpc::client::Config::default();
            config.max_in_flight_requests = 100_000;
            Conn::Tarpc(TarpcEchoClient::new(config, t).spawn())
        }
        Sys::Handle => Conn::Handle(
            Client::builder()
                .limits(capgate_limits())
                .connect_handle(addr)
                .await
                .unwrap(),
        ),
    }
}

async fn capnp_echo(e: &echo::Client, payload: &[u8]) -> Result<usize, capnp::Error> {
    let mut req = e.echo_request();
    req.get().set_payload(payload);
    let reply = req.send().promise.await?;
    Ok(reply.get()?.get_payload()?.len())
}

impl Conn {
    async fn echo(&self, payload: &Rc<Vec<u8>>) {
        let n = match self {
            Conn::Twoparty(e) | Conn::Capgate(_, e) => capnp_echo(e, payload).await.unwrap(),
            Conn::Tarpc(c) => {
                let mut ctx = tarpc::context::current();
                ctx.deadline = Instant::now() + Duration::from_secs(60);
                c.echo(ctx, ByteBuf::from(payload.to_vec()))
                    .await
                    .unwrap()
                    .len()
            }
            Conn::Handle(h) => {
                // What a multi-threaded application does: the payload crosses threads.
                let p = payload.to_vec();
                h.call(move |e: echo::Client| async move { capnp_echo(&e, &p).await })
                    .await
                    .unwrap()
            }
        };
        assert_eq!(n, payload.len());
    }
}

/// `total` echo calls with `inflight` outstanding at any time; returns the elapsed time.
async fn run_calls(conn: &Conn, total: u64, inflight: usize, payload: &Rc<Vec<u8>>) -> Duration {
    let start = Instant::now();
    let left = Rc::new(std::cell::Cell::new(total));
    let tasks: Vec<_> = (0..inflight)
        .map(|_| {
            let (c, left, p) = (conn.clone(), left.clone(), payload.clone());
            tokio::task::spawn_local(async move {
                while left.get() > 0 {
                    left.set(left.get() - 1);
                    c.echo(&p).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    start.elapsed()
}

// ---------------------------------------------------------------------------------------
// Statistics.

fn pct(sorted: &[Duration], q: f64) -> f64 {
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)].as_secs_f64() * 1e6
}

fn range(v: &[f64]) -> (f64, f64) {
    (
        v.iter().cloned().fold(f64::MAX, f64::min),
        v.iter().cloned().fold(f64::MIN, f64::max),
    )
}

struct Bench {
    rt: tokio::runtime::Runtime,
    local: LocalSet,
    quick: bool,
}

impl Bench {
    fn run<F: std::future::Future>(&self, f: F) -> F::Output {
        self.local.block_on(&self.rt, f)
    }
}

// ---------------------------------------------------------------------------------------
// Reports.

/// Sequential latency, 64 B (8 B for raw TCP), interleaved blocks.
fn latency_report(b: &Bench, tcp: SocketAddr, conns: &[(Sys, Conn)]) {
    let (blocks, per) = if b.quick { (2, 50) } else { (10, 2_000) };
    let payload = Rc::new(vec![42u8; 64]);
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); conns.len() + 1];
    // CPU time of the whole process (client and server threads) per system.
    let mut cpu_ns = vec![0u64; conns.len() + 1];
    b.run(async {
        let mut s = tokio::net::TcpStream::connect(tcp).await.unwrap();
        s.set_nodelay(true).unwrap();
        let mut buf = [7u8; 8];
        for _ in 0..blocks {
            let cpu = threads_cpu_ns("");
            for _ in 0..per {
                let t = Instant::now();
                s.write_all(&buf).await.unwrap();
                s.read_exact(&mut buf).await.unwrap();
                samples[0].push(t.elapsed());
            }
            cpu_ns[0] += threads_cpu_ns("") - cpu;
            for (i, (_, c)) in conns.iter().enumerate() {
                let cpu = threads_cpu_ns("");
                for _ in 0..per {
                    let t = Instant::now();
                    c.echo(&payload).await;
                    samples[i + 1].push(t.elapsed());
                }
                cpu_ns[i + 1] += threads_cpu_ns("") - cpu;
            }
        }
    });
    for v in &mut samples {
        v.sort();
    }
    println!(
        "\n== sequential latency, one call at a time ({} calls each, interleaved; raw TCP: 8 B ping-pong, others: 64 B echo)",
        samples[0].len()
    );
    let names: Vec<&str> = std::iter::once("raw TCP")
        .chain(conns.iter().map(|(s, _)| s.name()))
        .collect();
    let capgate = names.iter().position(|n| *n == "capgate").unwrap();
    let twoparty = names.iter().position(|n| *n == "twoparty").unwrap();
    for (i, name) in names.iter().enumerate() {
        println!(
            "  {name:<17} p50 {:7.1} us  p90 {:7.1} us  p99 {:7.1} us  CPU/call {:6.1} us",
            pct(&samples[i], 0.5),
            pct(&samples[i], 0.9),
            pct(&samples[i], 0.99),
            cpu_ns[i] as f64 / samples[i].len() as f64 / 1e3,
        );
    }
    let p = |i: usize| pct(&samples[i], 0.5);
    println!(
        "  ratios (p50): capgate/raw TCP {:.2} (target <= 1.6)  capgate/twoparty {:.2} (target <= 0.9)  capgate/tarpc {:.2}  handle/capgate {:.2}",
        p(capgate) / p(0),
        p(capgate) / p(twoparty),
        p(capgate) / p(names.iter().position(|n| *n == "tarpc").unwrap()),
        p(names.iter().position(|n| *n == "capgate handle").unwrap()) / p(capgate),
    );
    let busy = names
        .iter()
        .position(|n| *n == "capgate busy-poll")
        .unwrap();
    println!(
        "  busy-poll ({} us after each write, both sides): /raw TCP {:.2}  /twoparty {:.2}  /capgate {:.2}; CPU per call x{:.2} of capgate's",
        BUSY_POLL.as_micros(),
        p(busy) / p(0),
        p(busy) / p(twoparty),
        p(busy) / p(capgate),
        cpu_ns[busy] as f64 / cpu_ns[capgate] as f64,
    );
    let no_poll = names.iter().position(|n| *n == "capgate no-poll").unwrap();
    println!(
        "  no-poll (answer_poll and call_poll off, both sides): /raw TCP {:.2}  /twoparty {:.2}  capgate/no-poll {:.2}; capgate's CPU per call x{:.2} of no-poll's",
        p(no_poll) / p(0),
        p(no_poll) / p(twoparty),
        p(capgate) / p(no_poll),
        cpu_ns[capgate] as f64 / cpu_ns[no_poll] as f64,
    );
}

/// What adaptive polling costs and gains when the client does something else between
/// calls: sequential calls separated by a pause in which the client thread either sleeps
/// (waits for something else) or computes (spins), capgate as configured by default vs with
/// polling off. CPU per call is that of every thread of the process, the pauses included:
/// read the difference.
fn polling_report(b: &Bench, conns: &[(Sys, Conn)]) {
    let find = |sys: Sys| &conns.iter().find(|(s, _)| *s == sys).unwrap().1;
    let (capgate, no_poll) = (find(Sys::Capgate), find(Sys::NoPoll));
    let (blocks, per) = if b.quick { (1, 20) } else { (10, 200) };
    let payload = Rc::new(vec![42u8; 64]);
    println!(
        "\n== adaptive polling: sequential 64 B echo, the client sleeping or computing between calls ({} calls each, interleaved blocks; CPU: whole process per call)",
        blocks * per
    );
    for (pause_us, spin) in [
        (0u64, false),
        (20, false),
        (100, false),
        (1000, false),
        (20, true),
        (100, true),
        (1000, true),
    ] {
        let pause = Duration::from_micros(pause_us);
        // [capgate, no-poll]: latencies, CPU ns
        let mut samples = [Vec::new(), Vec::new()];
        let mut cpu = [0u64; 2];
        let mut paused = Duration::ZERO;
        b.run(async {
            for _ in 0..blocks {
                for (i, c) in [capgate, no_poll].into_iter().enumerate() {
                    let before = threads_cpu_ns("");
                    for _ in 0..per {
                        let t = Instant::now();
                        if spin {
                            while t.elapsed() < pause {
                                std::hint::spin_loop();
                            }
                        } else if !pause.is_zero() {
                            std::thread::sleep(pause);
                        }
                        paused += t.elapsed();
                        let t = Instant::now();
                        c.echo(&payload).await;
                        samples[i].push(t.elapsed());
                    }
                    cpu[i] += threads_cpu_ns("") - before;
                }
            }
        });
        let calls = (blocks * per) as f64;
        let cpu_us: Vec<f64> = cpu.iter().map(|&ns| ns as f64 / calls / 1e3).collect();
        for v in &mut samples {
            v.sort();
        }
        let (p0, p1) = (pct(&samples[0], 0.5), pct(&samples[1], 0.5));
        let label = if pause.is_zero() {
            "no pause".to_string()
        } else {
            format!(
                "{} {pause_us:>4} us ({:.0})",
                if spin { "compute" } else { "sleep  " },
                paused.as_secs_f64() * 1e6 / (2.0 * calls)
            )
        };
        println!(
            "  {label:<24} p50 capgate {p0:6.1} us  no-poll {p1:6.1} us ({:.2}x)   CPU/call capgate {:6.1} us  no-poll {:6.1} us ({:+.1} us)",
            p0 / p1,
            cpu_us[0],
            cpu_us[1],
            cpu_us[0] - cpu_us[1],
        );
    }
}

/// Calls per second on one connection at 1/16/128 in flight, interleaved rounds.
fn throughput_report(b: &Bench, conns: &[(Sys, Conn)]) {
    let (calls, rounds) = if b.quick { (300u64, 1) } else { (10_000, 11) };
    let payload = Rc::new(vec![42u8; 64]);
    println!(
        "\n== throughput, one connection, 64 B echo ({rounds} interleaved rounds of {calls} calls; medians, calls/s)"
    );
    for inflight in [1usize, 16, 128] {
        let mut rates = vec![Vec::new(); conns.len()];
        // CPU time of the whole process (client and server threads), per system.
        let mut cpu_ns = vec![0u64; conns.len()];
        let mut vs_twoparty = Vec::new();
        for _ in 0..rounds {
            let r: Vec<f64> = conns
                .iter()
                .zip(cpu_ns.iter_mut())
                .map(|((_, c), cpu)| {
                    let before = threads_cpu_ns("");
                    let t = b.run(run_calls(c, calls, inflight, &payload));
                    *cpu += threads_cpu_ns("") - before;
                    calls as f64 / t.as_secs_f64()
                })
                .collect();
            vs_twoparty.push(r[1] / r[0]);
            for (i, x) in r.into_iter().enumerate() {
                rates[i].push(x);
            }
        }
        let m: Vec<f64> = rates.iter_mut().map(|v| median(v)).collect();
        let (lo, hi) = range(&vs_twoparty);
        let cells: Vec<String> = conns
            .iter()
            .zip(&m)
            .map(|((s, _), r)| format!("{} {:>7.0}", s.name(), r))
            .collect();
        println!(
            "  {inflight:>3} in flight: {}\n              capgate/twoparty {:.2} (rounds {lo:.2}..{hi:.2})  capgate/tarpc {:.2}  handle/capgate {:.2}  busy-poll/capgate {:.2}",
            cells.join("  "),
            median(&mut vs_twoparty),
            m[1] / m[2],
            m[3] / m[1],
            m[4] / m[1],
        );
        let per_call: Vec<f64> = cpu_ns
            .iter()
            .map(|&ns| ns as f64 / 1e3 / (calls * rounds) as f64)
            .collect();
        println!(
            "              CPU per call (all threads, us): {}  capgate/twoparty {:.2}",
            conns
                .iter()
                .zip(&per_call)
                .map(|((s, _), c)| format!("{} {c:.1}", s.name()))
                .collect::<Vec<_>>()
                .join("  "),
            per_call[1] / per_call[0],
        );
    }
}

/// The thread-name prefix of each system's server threads.
fn server_threads(sys: Sys) -> &'static str {
    match sys {
        Sys::Twoparty => "twoparty-server",
        Sys::Tarpc => "tarpc-server",
        Sys::Capgate | Sys::Handle | Sys::Busy | Sys::NoPoll => "capgate-worker",
    }
}

/// Calls per second, and server CPU per call (us).
fn multi_conn_rate(
    sys: Sys,
    addr: SocketAddr,
    conns: usize,
    inflight: usize,
    total: u64,
) -> (f64, f64) {
    let threads = 2.min(conns);
    let barrier = Arc::new(Barrier::new(threads + 1));
    let per_thread = total / threads as u64;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let barrier = barrier.clone();
            let mine = (t..conns).step_by(threads).count();
            std::thread::spawn(move || {
                LocalSet::new().block_on(&current_thread_rt(), async move {
                    let payload = Rc::new(vec![42u8; 64]);
                    let mut cs = Vec::new();
                    for _ in 0..mine {
                        let c = connect(sys, addr).await;
                        c.echo(&payload).await;
                        cs.push(c);
                    }
                    barrier.wait();
                    let per_conn = per_thread / mine as u64;
                    let runs: Vec<_> = cs
                        .iter()
                        .map(|c| run_calls(c, per_conn, inflight, &payload))
                        .collect();
                    futures::future::join_all(runs).await;
                    per_conn * mine as u64
                })
            })
        })
        .collect();
    barrier.wait();
    let cpu = threads_cpu_ns(server_threads(sys));
    let start = Instant::now();
    let done: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    let rate = done as f64 / start.elapsed().as_secs_f64();
    let cpu = threads_cpu_ns(server_threads(sys)) - cpu;
    (rate, cpu as f64 / done as f64 / 1000.0)
}

/// Many connections, servers with 2 threads (and capgate with 1 worker, for the worker
/// effect), two client threads.
fn multi_conn_report(b: &Bench, servers: &[(&str, Sys, SocketAddr)]) {
    let (total, rounds) = if b.quick { (2_000u64, 1) } else { (40_000, 5) };
    println!(
        "\n== throughput, many connections x 16 in flight, 64 B echo (2 client threads; {rounds} interleaved rounds of {total} calls; medians, calls/s)"
    );
    for conns in [4usize, 16] {
        let mut rates = vec![Vec::new(); servers.len()];
        let mut cpu = vec![Vec::new(); servers.len()];
        for _ in 0..rounds {
            for (i, (_, sys, addr)) in servers.iter().enumerate() {
                let (r, c) = multi_conn_rate(*sys, *addr, conns, 16, total);
                rates[i].push(r);
                cpu[i].push(c);
            }
        }
        let m: Vec<f64> = rates.iter_mut().map(|v| median(v)).collect();
        let c: Vec<f64> = cpu.iter_mut().map(|v| median(v)).collect();
        let cells: Vec<String> = servers
            .iter()
            .zip(&m)
            .map(|((n, _, _), r)| format!("{n} {r:>7.0}"))
            .collect();
        let cpu_cells: Vec<String> = servers
            .iter()
            .zip(&c)
            .map(|((n, _, _), c)| format!("{n} {c:.1} us"))
            .collect();
        println!(
            "  16 x {conns:>2}: {}\n           capgate/twoparty {:.2}  capgate/tarpc {:.2}  capgate 2 workers / 1 worker {:.2}\n           server CPU per call: {}  (2 workers / 1 worker {:.2}: 1.0 means no contention between workers)",
            cells.join("  "),
            m[1] / m[0],
            m[1] / m[2],
            m[1] / m[3],
            cpu_cells.join("  "),
            c[1] / c[3],
        );
    }
}

/// Large payloads on one connection: bytes per second.
fn payload_report(b: &Bench, conns: &[(Sys, Conn)]) {
    println!("\n== large payloads, one connection (interleaved rounds; medians, MiB/s of payload echoed)");
    for (size, inflight, calls) in [(64usize << 10, 16usize, 2_000u64), (1 << 20, 4, 200)] {
        let (calls, rounds) = if b.quick { (calls / 20, 1) } else { (calls, 5) };
        let payload = Rc::new(vec![42u8; size]);
        let mut rates = vec![Vec::new(); conns.len()];
        for _ in 0..rounds {
            for (i, (_, c)) in conns.iter().enumerate() {
                let t = b.run(run_calls(c, calls, inflight, &payload));
                rates[i].push(calls as f64 * size as f64 / t.as_secs_f64() / (1 << 20) as f64);
            }
        }
        let m: Vec<f64> = rates.iter_mut().map(|v| median(v)).collect();
        let cells: Vec<String> = conns
            .iter()
            .zip(&m)
            .map(|((s, _), r)| format!("{} {:>6.0}", s.name(), r))
            .collect();
        println!(
            "  {:>4} KiB x {inflight:>2} in flight: {}   capgate/twoparty {:.2}  capgate/tarpc {:.2}",
            size >> 10,
            cells.join("  "),
            m[1] / m[0],
            m[1] / m[2],
        );
    }
}

fn open(s: &store::Client, name: &str) -> namespace::Client {
    let mut req = s.namespace_request();
    req.get().set_name(name);
    req.send().pipeline.get_ns()
}

fn sub(n: &namespace::Client, name: &str) -> namespace::Client {
    let mut req = n.sub_request();
    req.get().set_name(name);
    req.send().pipeline.get_ns()
}

/// `store.namespace("a").sub("b").sub("c").sub("d").get("k")`: 5 calls, one await.
async fn chain(s: &store::Client) {
    let d = sub(&sub(&sub(&open(s, "a"), "b"), "c"), "d");
    let mut req = capgate::cast::<capgate::store_capnp::reader::Client>(&d).get_request();
    req.get().set_key("k");
    let r = req.send().promise.await.unwrap();
    assert!(!r.get().unwrap().get_found());
}

/// One call (the round-trip baseline through the same relay).
async fn one_call(s: &store::Client) {
    let r = s.namespaces_request().send().promise.await.unwrap();
    r.get().unwrap().get_names().unwrap();
}

/// A 5-call pipelined chain through a relay adding 2 ms each way. The round trip it is
/// measured against is raw TCP ping-pong through the same relay (timer granularity makes the
/// relay's real round trip a little over the nominal 4 ms).
fn pipeline_report(b: &Bench, tcp: SocketAddr) {
    let one_way = Duration::from_millis(2);
    let samples = if b.quick { 3 } else { 25 };
    let raw = start_twoparty(1, true);
    let gate = start_capgate(1, true, None);
    b.run(async {
        let proxy = capgate::demo::LatencyProxy::start(tcp, one_way).await.unwrap();
        let mut s = tokio::net::TcpStream::connect(proxy.local_addr()).await.unwrap();
        s.set_nodelay(true).unwrap();
        let mut rtt = Vec::new();
        let mut buf = [1u8; 8];
        for _ in 0..samples + 1 {
            let t = Instant::now();
            s.write_all(&buf).await.unwrap();
            s.read_exact(&mut buf).await.unwrap();
            rtt.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let rtt = median(&mut rtt[1..]);
        let mut rows = Vec::new();
        for (name, addr) in [("twoparty", raw), ("capgate", gate)] {
            let proxy = capgate::demo::LatencyProxy::start(addr, one_way).await.unwrap();
            let (s, conn): (store::Client, Option<Client>) = if name == "twoparty" {
                let client = twoparty_connect(proxy.local_addr()).await;
                (store::Client { client }, None)
            } else {
                let c = Client::connect(proxy.local_addr()).await.unwrap();
                (c.bootstrap(), Some(c))
            };
            one_call(&s).await;
            let (mut one, mut ch) = (Vec::new(), Vec::new());
            for _ in 0..samples {
                let t = Instant::now();
                one_call(&s).await;
                one.push(t.elapsed().as_secs_f64() * 1e3);
                let t = Instant::now();
                chain(&s).await;
                ch.push(t.elapsed().as_secs_f64() * 1e3);
            }
            rows.push((name, median(&mut one), median(&mut ch)));
            drop(conn);
        }
        println!(
            "\n== pipelined 5-call chain through a 2 ms one-way relay (medians of {samples}); raw TCP round trip through the relay: {rtt:.2} ms"
        );
        for (name, one, ch) in rows {
            println!(
                "  {name:<9} one call {one:.2} ms  5-call chain {ch:.2} ms  chain/RTT {:.2} (target <= 1.15)  chain/one call {:.2}",
                ch / rtt,
                ch / one
            );
        }
        println!("  (tarpc has no promise pipelining: the same chain costs 5 round trips)");
    });
}

// ---------------------------------------------------------------------------------------
// Idle memory, measured in a child process that only serves.

const CHILD_ENV: &str = "CAPGATE_BENCH_SERVE";

/// In the child: serve `what`, print the address, exit when stdin closes.
fn child_serve(what: &str) {
    let addr = match what {
        "twoparty" => start_twoparty(1, false),
        "capgate" => start_capgate(1, false, None),
        "tarpc" => start_tarpc(1),
        tls => {
            let dir = std::path::PathBuf::from(tls.strip_prefix("capgate-tls:").unwrap());
            let cfg = capgate::tls::server_config(
                &dir.join("server.pem"),
                &dir.join("server.key"),
                None,
                false,
            )
            .unwrap();
            start_capgate(1, false, Some(cfg))
        }
    };
    println!("{addr}");
    let mut s = String::new();
    let _ = std::io::stdin().read_line(&mut s);
}

fn child_rss(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<usize>().ok())
        .unwrap_or(0)
        * 1024
}

fn memory_report(b: &Bench) {
    use std::io::BufRead;
    let n = if b.quick { 30 } else { 500 };
    let dir = std::env::temp_dir().join(format!("capgate-bench-compare-{}", std::process::id()));
    let certs = capgate::write_dev_certs(&dir, &[]).unwrap();
    let client_tls = capgate::tls::client_config(&certs.ca, None).unwrap();
    println!("\n== idle memory per connection, server process only ({n} connections, each after one call)");
    let mut rows = Vec::new();
    for what in ["twoparty", "capgate", "tarpc", "capgate-tls"] {
        let arg = if what == "capgate-tls" {
            format!("capgate-tls:{}", dir.display())
        } else {
            what.to_string()
        };
        // CAPGATE_BENCH_CHILD_WRAP runs the child under a tool, e.g. "valgrind --tool=massif".
        let wrap = std::env::var("CAPGATE_BENCH_CHILD_WRAP").unwrap_or_default();
        let mut words = wrap.split_whitespace();
        let mut child = match words.next() {
            Some(tool) => {
                let mut c = std::process::Command::new(tool);
                c.args(words).arg(std::env::current_exe().unwrap());
                c
            }
            None => std::process::Command::new(std::env::current_exe().unwrap()),
        };
        let mut child = child
            .env(CHILD_ENV, arg)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr: SocketAddr = line.trim().parse().unwrap();
        let pid = child.id();
        let per = b.run(async {
            let connect_one = || async {
                match what {
                    "twoparty" => connect(Sys::Twoparty, addr).await,
                    "capgate" => connect(Sys::Capgate, addr).await,
                    "tarpc" => connect(Sys::Tarpc, addr).await,
                    _ => {
                        let c = Client::builder()
                            .tls(client_tls.clone(), "localhost")
                            .unwrap()
                            .connect(addr)
                            .await
                            .unwrap();
                        let e = c.bootstrap();
                        Conn::Capgate(c, e)
                    }
                }
            };
            let payload = Rc::new(vec![1u8; 64]);
            // Warm up: lazily initialised state is not per connection.
            let warm = connect_one().await;
            warm.echo(&payload).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            let before = child_rss(pid);
            let mut held = Vec::new();
            for _ in 0..n {
                let c = connect_one().await;
                c.echo(&payload).await;
                held.push(c);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            let per = child_rss(pid).saturating_sub(before) as f64 / n as f64;
            drop(held);
            per
        });
        drop(child.stdin.take());
        let _ = child.wait();
        println!("  {what:<12} {:6.1} KiB ({:.0} bytes)", per / 1024.0, per);
        rows.push(per);
    }
    println!(
        "  capgate/twoparty {:.2}  capgate/tarpc {:.2}  capgate plaintext {:.0} bytes (target <= 8192)  TLS adds {:.1} KiB",
        rows[1] / rows[0],
        rows[1] / rows[2],
        rows[1],
        (rows[3] - rows[1]) / 1024.0
    );
    let _ = std::fs::remove_dir_all(dir);
}

fn main() {
    if let Ok(what) = std::env::var(CHILD_ENV) {
        child_serve(&what);
        return;
    }
    let quick = std::env::args().any(|a| a == "--test");
    let only: Option<String> = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-') && a != "compare");
    let want = |r: &str| only.as_deref().is_none_or(|o| o == r);
    let b = Bench {
        rt: current_thread_rt(),
        local: LocalSet::new(),
        quick,
    };
    let tcp = start_tcp_pingpong();
    let single = [
        (Sys::Twoparty, start_twoparty(1, false)),
        (Sys::Capgate, start_capgate(1, false, None)),
        (Sys::Tarpc, start_tarpc(1)),
    ];
    let busy = start_capgate_with(1, false, None, busy_limits());
    let no_poll = start_capgate_with(1, false, None, no_poll_limits());
    let mut conns: Vec<(Sys, Conn)> = b.run(async {
        let mut v = Vec::new();
        for (sys, addr) in single {
            v.push((sys, connect(sys, addr).await));
        }
        v.push((Sys::Handle, connect(Sys::Handle, single[1].1).await));
        v.push((Sys::Busy, connect(Sys::Busy, busy).await));
        v.push((Sys::NoPoll, connect(Sys::NoPoll, no_poll).await));
        v
    });
    let payload = Rc::new(vec![0u8; 64]);
    b.run(async {
        for (_, c) in &conns {
            c.echo(&payload).await;
        }
    });
    println!(
        "capgate benchmark suite: {} cores, servers: 1 thread per system for one connection, 2 for many",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if want("latency") {
        latency_report(&b, tcp, &conns);
    }
    if want("polling") {
        polling_report(&b, &conns);
    }
    // The reports below compare the systems as they are configured by default.
    conns.retain(|(s, _)| *s != Sys::NoPoll);
    if want("throughput") {
        throughput_report(&b, &conns);
    }
    if want("payload") {
        // Not the handle (1 MiB through a closure measures the channel, not RPC), nor
        // busy-polling (a latency option).
        conns.retain(|(s, _)| !matches!(s, Sys::Handle | Sys::Busy));
        payload_report(&b, &conns);
    }
    if want("connections") {
        let servers = [
            ("twoparty", Sys::Twoparty, start_twoparty(2, false)),
            ("capgate", Sys::Capgate, start_capgate(2, false, None)),
            ("tarpc", Sys::Tarpc, start_tarpc(2)),
            (
                "capgate-1-worker",
                Sys::Capgate,
                start_capgate(1, false, None),
            ),
        ];
        multi_conn_report(&b, &servers);
    }
    if want("pipeline") {
        pipeline_report(&b, tcp);
    }
    if want("memory") {
        memory_report(&b);
    }
}
