//! Helpers shared by the benchmarks (each bench includes this module).

// Each bench uses a part of them.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use capnp_rpc::{rpc_twoparty_capnp::Side, twoparty, RpcSystem};
use futures::AsyncReadExt;
use tokio_util::compat::TokioAsyncReadCompatExt;

/// Raw capnp-rpc's `twoparty` network over a TCP stream, buffered both ways, with TCP_NODELAY:
/// the baseline's set-up on either side.
pub(crate) fn twoparty_network(
    stream: tokio::net::TcpStream,
    side: Side,
) -> Box<dyn capnp_rpc::VatNetwork<Side>> {
    stream.set_nodelay(true).unwrap();
    let (r, w) = stream.compat().split();
    Box::new(twoparty::VatNetwork::new(
        futures::io::BufReader::new(r),
        futures::io::BufWriter::new(w),
        side,
        Default::default(),
    ))
}

/// Connects a raw capnp-rpc twoparty client and returns the server's bootstrap capability.
/// Call inside a LocalSet.
pub(crate) async fn twoparty_connect(addr: SocketAddr) -> capnp::capability::Client {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut rpc = RpcSystem::new(twoparty_network(stream, Side::Client), None);
    let client = rpc.bootstrap(Side::Server);
    tokio::task::spawn_local(rpc);
    client
}

/// Resident set size of process `pid`, in bytes (0 if it cannot be read).
pub(crate) fn process_rss(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<usize>().ok())
        .unwrap_or(0)
        * 1024
}

/// The median (sorts `v`).
pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The `p` quantile (0..=1) of sorted durations.
pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// A duration in µs.
pub(crate) fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// The smallest and the largest of `v`.
pub(crate) fn range(v: &[f64]) -> (f64, f64) {
    (
        v.iter().cloned().fold(f64::MAX, f64::min),
        v.iter().cloned().fold(f64::MIN, f64::max),
    )
}

/// Sequential latencies of several systems, measured in interleaved blocks so that all see
/// the same machine conditions.
pub(crate) struct Interleaved {
    /// Each system's latencies, sorted.
    pub(crate) all: Vec<Vec<Duration>>,
    /// Each block's p50 of each system, in µs (`block_p50[block][system]`).
    pub(crate) block_p50: Vec<Vec<f64>>,
}

/// `blocks` times, `per_block` sequential calls of each of `systems` systems in turn;
/// `call(i)` makes one call of system `i`. Call inside a LocalSet.
pub(crate) async fn interleaved_latency<F, Fut>(
    systems: usize,
    blocks: usize,
    per_block: usize,
    mut call: F,
) -> Interleaved
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future,
{
    let mut all: Vec<Vec<Duration>> = vec![Vec::new(); systems];
    let mut block_p50 = Vec::with_capacity(blocks);
    for _ in 0..blocks {
        let mut p50s = Vec::with_capacity(systems);
        for (i, samples) in all.iter_mut().enumerate() {
            let mut block = Vec::with_capacity(per_block);
            for _ in 0..per_block {
                let t = Instant::now();
                call(i).await;
                block.push(t.elapsed());
            }
            block.sort();
            p50s.push(us(percentile(&block, 0.5)));
            samples.extend(block);
        }
        block_p50.push(p50s);
    }
    for v in &mut all {
        v.sort();
    }
    Interleaved { all, block_p50 }
}

/// Runs `conns` connections x `inflight` calls each, spread over `threads` client threads,
/// until `total` calls are done; returns calls per second (connection set-up not timed).
/// CPU time (ns) used so far by this process's threads whose name starts with `prefix`.
pub(crate) fn threads_cpu_ns(prefix: &str) -> u64 {
    let mut total = 0;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for t in tasks.flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if comm.starts_with(prefix) {
                let stat = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
                total += stat
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    total
}

/// Runs a built capgate server on a thread of its own; returns its TCP address.
#[allow(dead_code)] // `compare` starts its servers its own way
pub(crate) fn serve_on_thread(server: capgate::Server) -> std::net::SocketAddr {
    let capgate::ListenAddr::Tcp(addr) = server.local_addrs()[0].clone() else {
        unreachable!("benchmark servers listen on TCP")
    };
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(server.serve())
    });
    addr
}

/// One echo call with a 64-byte payload.
pub(crate) async fn echo_call(e: &capgate::bench_capnp::echo::Client) {
    let mut req = e.echo_request();
    req.get().set_payload(&[42u8; 64]);
    req.send().promise.await.unwrap();
}

/// Median of `n` sequential calls, in µs.
pub(crate) async fn sequential_p50(e: &capgate::bench_capnp::echo::Client, n: usize) -> f64 {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = std::time::Instant::now();
        echo_call(e).await;
        v.push(t.elapsed().as_secs_f64() * 1e6);
    }
    median(&mut v)
}

/// Calls per second with 128 in flight.
pub(crate) async fn throughput(e: &capgate::bench_capnp::echo::Client, total: usize) -> f64 {
    use futures::stream::{FuturesUnordered, StreamExt};
    let t = std::time::Instant::now();
    let mut pending = FuturesUnordered::new();
    let mut sent = 0;
    while sent < total.min(128) {
        pending.push(echo_call(e));
        sent += 1;
    }
    while pending.next().await.is_some() {
        if sent < total {
            pending.push(echo_call(e));
            sent += 1;
        }
    }
    total as f64 / t.elapsed().as_secs_f64()
}

/// Quotas far above any benchmark's load, so the policy stays out of its way.
pub(crate) fn roomy_quotas() -> capgate::Quotas {
    let mut q = capgate::Quotas::default();
    q.calls_per_second = std::num::NonZeroU32::MAX;
    q.burst = std::num::NonZeroU32::MAX;
    q.max_connections = 100_000;
    q.max_class_connections = 100_000;
    q.max_inflight_calls = 100_000;
    q.max_open_answers = 100_000;
    q
}

/// Sequential p50 and 128-in-flight throughput of echo servers, in interleaved rounds (so
/// they see the same machine); prints one line per server and returns the ratios of the
/// second to the first (sequential p50, throughput).
pub(crate) fn side_by_side(
    servers: &[(&str, SocketAddr)],
    rounds: usize,
    seq: usize,
    total: usize,
) -> (f64, f64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&rt, async {
        let mut clients = Vec::new();
        for (_, addr) in servers {
            let c = capgate::Client::connect(*addr).await.unwrap();
            let e: capgate::bench_capnp::echo::Client = c.bootstrap();
            echo_call(&e).await;
            clients.push((c, e));
        }
        let mut lat = vec![Vec::new(); servers.len()];
        let mut thr = vec![Vec::new(); servers.len()];
        for _ in 0..rounds {
            for (k, (_, e)) in clients.iter().enumerate() {
                lat[k].push(sequential_p50(e, seq).await);
                thr[k].push(throughput(e, total).await);
            }
        }
        for (k, (name, _)) in servers.iter().enumerate() {
            println!(
                "{name:9} sequential p50 {:.1} µs (rounds {:?}), 128 in flight {:.0} calls/s (rounds, k/s {:?})",
                median(&mut lat[k].clone()),
                lat[k].iter().map(|v| v.round()).collect::<Vec<_>>(),
                median(&mut thr[k].clone()),
                thr[k].iter().map(|v| (v / 1000.0).round()).collect::<Vec<_>>(),
            );
        }
        let ratio = |v: &[Vec<f64>]| median(&mut v[1].clone()) / median(&mut v[0].clone());
        (ratio(&lat), ratio(&thr))
    })
}
