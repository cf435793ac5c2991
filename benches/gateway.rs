//! The gateway's cost: a capnp-rust `twoparty` Echo upstream reached directly and through
//! `capgate gateway`, side by side in one run (capgate's client on both): sequential p50,
//! throughput at 128 calls in flight, the gateway's CPU per relayed call against the
//! upstream's, and the idle memory of a relayed pair.
//!
//! `cargo bench --bench gateway` (full), `cargo bench --bench gateway -- --test` (smoke).

use std::net::SocketAddr;
use std::num::NonZeroUsize;

use capgate::demo::EchoService;
use capgate::{ClientClass, Gateway, Matcher, Policy, Upstream};
use capnp_rpc::{rpc_twoparty_capnp::Side, RpcSystem};

mod common;

/// The upstream: one thread, plain capnp-rpc over buffered streams.
fn start_upstream() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::Builder::new()
        .name("gw-upstream".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            tokio::task::LocalSet::new().block_on(&rt, async move {
                let l = tokio::net::TcpListener::from_std(listener).unwrap();
                while let Ok((s, _)) = l.accept().await {
                    let network = common::twoparty_network(s, Side::Server);
                    let rpc = RpcSystem::new(network, Some(EchoService.client().client));
                    tokio::task::spawn_local(rpc);
                }
            });
        })
        .unwrap();
    addr
}

fn start_gateway(upstream: SocketAddr) -> SocketAddr {
    start_gateway_with(upstream, capgate::Limits::default())
}

fn start_gateway_with(upstream: SocketAddr, limits: capgate::Limits) -> SocketAddr {
    let policy = Policy::from_classes(vec![ClientClass::new("bench", Matcher::Any)
        .allow_all()
        .with_quotas(common::roomy_quotas())]);
    let server = Gateway::builder()
        .upstream(Upstream::tcp(upstream.to_string()))
        .listen("127.0.0.1:0".parse().unwrap())
        .workers(NonZeroUsize::new(1).unwrap())
        .limits(limits)
        .policy(policy)
        .build()
        .unwrap();
    common::serve_on_thread(server)
}

const CHILD_ENV: &str = "CAPGATE_BENCH_GATEWAY_CHILD";

/// RSS growth of a gateway in a process of its own per idle relayed pair: `n` connections
/// through it, each after one call.
fn idle_bytes_per_pair(upstream: SocketAddr, n: usize) -> f64 {
    use std::io::BufRead;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .env(CHILD_ENV, upstream.to_string())
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
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let per_pair = tokio::task::LocalSet::new().block_on(&rt, async {
        let mut held = Vec::new();
        let connect = |count: usize| {
            let mut batch = Vec::new();
            for _ in 0..count {
                batch.push(async move {
                    let c = capgate::Client::connect(addr).await.unwrap();
                    let e: capgate::bench_capnp::echo::Client = c.bootstrap();
                    common::echo_call(&e).await;
                    (c, e)
                });
            }
            batch
        };
        // A first batch settles the allocator's pools; the second is measured.
        for f in connect(n / 4) {
            held.push(f.await);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let before = common::process_rss(pid);
        for f in connect(n) {
            held.push(f.await);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let grown = common::process_rss(pid).saturating_sub(before);
        drop(held);
        grown as f64 / n as f64
    });
    drop(child.stdin.take());
    let _ = child.wait();
    per_pair
}

/// User and system CPU (clock ticks) of this process's threads named `prefix...`.
fn threads_ticks(prefix: &str) -> (u64, u64) {
    let mut total = (0, 0);
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for t in tasks.flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if !comm.starts_with(prefix) {
                continue;
            }
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            // Fields after the command's closing parenthesis: utime and stime are 12 and 13.
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<&str> = rest.split_whitespace().collect();
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            total.0 += num(11);
            total.1 += num(12);
        }
    }
    total
}

/// Per call over `total` calls at 128 in flight through the gateway: CPU (ns) of the
/// gateway's worker and of the upstream, and the user-space share of each.
fn cpu_per_call(gateway: SocketAddr, total: usize) -> (f64, f64, f64, f64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&rt, async {
        let c = capgate::Client::connect(gateway).await.unwrap();
        let e: capgate::bench_capnp::echo::Client = c.bootstrap();
        common::echo_call(&e).await;
        let (g0, u0) = (
            common::threads_cpu_ns("capgate-worker"),
            common::threads_cpu_ns("gw-upstream"),
        );
        let (gt0, ut0) = (
            threads_ticks("capgate-worker"),
            threads_ticks("gw-upstream"),
        );
        common::throughput(&e, total).await;
        let (g1, u1) = (
            common::threads_cpu_ns("capgate-worker"),
            common::threads_cpu_ns("gw-upstream"),
        );
        let (gt1, ut1) = (
            threads_ticks("capgate-worker"),
            threads_ticks("gw-upstream"),
        );
        let share = |a: (u64, u64), b: (u64, u64)| {
            let (user, sys) = (b.0 - a.0, b.1 - a.1);
            user as f64 / (user + sys).max(1) as f64
        };
        (
            (g1 - g0) as f64 / total as f64,
            (u1 - u0) as f64 / total as f64,
            share(gt0, gt1),
            share(ut0, ut1),
        )
    })
}

fn main() {
    if let Ok(upstream) = std::env::var(CHILD_ENV) {
        // The child: a gateway alone in its process, until stdin closes.
        let addr = start_gateway(upstream.parse().unwrap());
        println!("{addr}");
        let mut s = String::new();
        let _ = std::io::stdin().read_line(&mut s);
        return;
    }
    let quick = std::env::args().any(|a| a == "--test");
    if std::env::args().any(|a| a == "cpu") {
        // Only the 128-in-flight load through the gateway, for a profiler:
        // `cargo bench --bench gateway -- cpu`; `CAPGATE_BENCH_CALLS=N` sets the number of
        // calls (fewer under callgrind, which runs each thread about 50x slower).
        let calls = std::env::var("CAPGATE_BENCH_CALLS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200_000);
        let gateway = start_gateway(start_upstream());
        let (g, u, _, _) = cpu_per_call(gateway, calls);
        println!(
            "{calls} calls: gateway {:.1} µs, upstream {:.1} µs per call",
            g / 1000.0,
            u / 1000.0
        );
        return;
    }
    let upstream = start_upstream();
    let gateway = start_gateway(upstream);
    let mut quiet = capgate::Limits::default();
    quiet.call_poll = std::time::Duration::ZERO;
    quiet.answer_poll = std::time::Duration::ZERO;
    let no_poll = start_gateway_with(upstream, quiet);
    let (rounds, seq, total) = if quick {
        (1, 200, 2_000)
    } else {
        (7, 3_000, 60_000)
    };
    println!(
        "== direct to a twoparty upstream vs through the gateway, and through one without \
         adaptive polling ({rounds} rounds, interleaved)"
    );
    let (lat, thr) = common::side_by_side(
        &[
            ("direct", upstream),
            ("gateway", gateway),
            ("gw-nopoll", no_poll),
        ],
        rounds,
        seq,
        total,
    );
    println!("gateway/direct: sequential p50 {lat:.2}x, 128-in-flight throughput {thr:.2}x");
    let mut gw = Vec::new();
    let mut up = Vec::new();
    let mut shares = Vec::new();
    for _ in 0..rounds.max(3) {
        let (g, u, gs, us) = cpu_per_call(gateway, total);
        gw.push(g);
        up.push(u);
        shares.push((gs, us));
    }
    let (g, u) = (common::median(&mut gw), common::median(&mut up));
    println!(
        "CPU per relayed call: gateway {:.1} µs, upstream {:.1} µs: {:.2}x (rounds: gateway {:?} µs, upstream {:?} µs)",
        g / 1000.0,
        u / 1000.0,
        g / u,
        gw.iter().map(|v| (v / 100.0).round() / 10.0).collect::<Vec<_>>(),
        up.iter().map(|v| (v / 100.0).round() / 10.0).collect::<Vec<_>>(),
    );
    let mut gs: Vec<f64> = shares.iter().map(|s| s.0).collect();
    let mut us: Vec<f64> = shares.iter().map(|s| s.1).collect();
    let (gs, us) = (common::median(&mut gs), common::median(&mut us));
    println!(
        "  user-space share: gateway {:.0}%, upstream {:.0}%; user-space CPU per call: gateway {:.1} µs, upstream {:.1} µs: {:.2}x",
        gs * 100.0,
        us * 100.0,
        g * gs / 1000.0,
        u * us / 1000.0,
        (g * gs) / (u * us)
    );
    let n = if quick { 40 } else { 400 };
    let mut per_pair: Vec<f64> = (0..if quick { 1 } else { 3 })
        .map(|_| idle_bytes_per_pair(upstream, n))
        .collect();
    println!(
        "idle memory of the gateway's process per relayed pair ({n} pairs, each after one call): {:.1} KB (runs {:?} KB)",
        common::median(&mut per_pair.clone()) / 1000.0,
        per_pair.iter_mut().map(|v| (*v / 100.0).round() / 10.0).collect::<Vec<_>>(),
    );
}
