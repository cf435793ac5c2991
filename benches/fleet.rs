//! Fleet quotas: capgate with the Redis quota store vs the in-process store, side by side in
//! one run, same Echo service and quotas: sequential latency, 128-in-flight throughput, and
//! Redis commands per 1,000 calls at a steady rate.
//!
//! Starts its own `redis-server` (Debian's, on PATH) on a free loopback port.
//! `cargo bench --bench fleet` runs criterion, then interleaved reports with same-run ratios;
//! `cargo bench --bench fleet -- --test` is the quick smoke run.

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use capgate::bench_capnp::echo;
use capgate::demo::EchoService;
use capgate::{
    Client, ClientClass, Matcher, Policy, QuotaStore, Quotas, RedisStoreConfig, Server, ServerStats,
};
use criterion::{Criterion, Throughput};
use tokio::runtime::Runtime;
use tokio::task::LocalSet;

mod common;
use common::{interleaved_latency, median, percentile, range, serve_on_thread, us};

const PAYLOAD: &[u8] = &[42u8; 64];

/// A `redis-server` on a free loopback port, without persistence; killed when dropped.
struct RedisServer {
    port: u16,
    child: Child,
    dir: std::path::PathBuf,
}

impl RedisServer {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("capgate-bench-redis-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run redis-server ({e}): install Debian's redis-server")
            });
        let r = Self { port, child, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis::Client::open(r.url())
            .and_then(|c| c.get_connection())
            .is_err()
        {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        r
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Commands Redis has run so far (`INFO commandstats`), without `INFO` itself.
    fn commands(&self) -> u64 {
        let mut c = redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap();
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut c)
            .unwrap();
        info.lines()
            .filter(|l| l.starts_with("cmdstat_") && !l.starts_with("cmdstat_info:"))
            .filter_map(|l| {
                let calls = l.split("calls=").nth(1)?;
                calls.split(',').next()?.parse::<u64>().ok()
            })
            .sum()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn policy(per_second: u32, burst: u32) -> Policy {
    let mut q = Quotas::default();
    q.calls_per_second = NonZeroU32::new(per_second).unwrap();
    q.burst = NonZeroU32::new(burst).unwrap();
    q.max_inflight_calls = 256;
    Policy::from_classes(vec![ClientClass::new("bench", Matcher::Any)
        .allow_all()
        .with_quotas(q)])
}

fn start_server(policy: Policy, store: QuotaStore) -> (SocketAddr, ServerStats) {
    let server = Server::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .workers(NonZeroUsize::new(1).unwrap())
        .policy(policy)
        .quota_store(store)
        .bootstrap_factory(|_| EchoService.client())
        .build()
        .unwrap();
    let stats = server.stats();
    let addr = serve_on_thread(server);
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats.quota_store_up() == Some(false) {
        assert!(Instant::now() < deadline, "the quota store did not come up");
        std::thread::sleep(Duration::from_millis(10));
    }
    (addr, stats)
}

/// One echo call; true if served (false: `Overloaded`).
async fn call(e: &echo::Client) -> bool {
    let mut req = e.echo_request();
    req.get().set_payload(PAYLOAD);
    match req.send().promise.await {
        Ok(_) => true,
        Err(err) if err.kind == capnp::ErrorKind::Overloaded => false,
        Err(err) => panic!("{err}"),
    }
}

/// `total` calls with `inflight` outstanding; returns the time and the calls refused.
async fn run_calls(e: &echo::Client, total: u64, inflight: usize) -> (Duration, u64) {
    let start = Instant::now();
    let left = Rc::new(std::cell::Cell::new(total));
    let refused = Rc::new(std::cell::Cell::new(0u64));
    let workers: Vec<_> = (0..inflight)
        .map(|_| {
            let (e, left, refused) = (e.clone(), left.clone(), refused.clone());
            tokio::task::spawn_local(async move {
                while left.get() > 0 {
                    left.set(left.get() - 1);
                    if !call(&e).await {
                        refused.set(refused.get() + 1);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    (start.elapsed(), refused.get())
}

struct Setup {
    rt: Runtime,
    local: LocalSet,
    redis: RedisServer,
    systems: Vec<(&'static str, echo::Client, Client, ServerStats)>,
    /// The Redis store with the default quotas, for the commands-per-call report.
    steady: (echo::Client, Client, ServerStats),
}

impl Setup {
    fn new() -> Self {
        let redis = RedisServer::start();
        let store = || QuotaStore::from(RedisStoreConfig::new(&redis.url()).unwrap());
        // Quotas far above the load: what the call path costs, not refusals. A lease is 50 ms
        // of the rate (50,000 calls), so leases still happen during the throughput runs.
        let roomy = || policy(1_000_000, 100_000);
        let servers = [
            ("in-process", start_server(roomy(), QuotaStore::InProcess)),
            ("redis", start_server(roomy(), store())),
        ];
        let steady = start_server(
            Policy::from_classes(vec![ClientClass::new("default", Matcher::Any).allow_all()]),
            store(),
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = LocalSet::new();
        let (systems, steady) = local.block_on(&rt, async {
            let mut systems = Vec::new();
            for (name, (addr, stats)) in servers {
                let c = Client::connect(addr).await.unwrap();
                let e: echo::Client = c.bootstrap();
                let deadline = Instant::now() + Duration::from_secs(5);
                while !call(&e).await {
                    assert!(Instant::now() < deadline, "{name}: calls refused");
                }
                systems.push((name, e, c, stats));
            }
            let c = Client::connect(steady.0).await.unwrap();
            let e: echo::Client = c.bootstrap();
            (systems, (e, c, steady.1))
        });
        Self {
            rt,
            local,
            redis,
            systems,
            steady,
        }
    }

    fn run<F: std::future::Future>(&self, f: F) -> F::Output {
        self.local.block_on(&self.rt, f)
    }
}

fn criterion_benches(c: &mut Criterion, s: &Setup) {
    let mut g = c.benchmark_group("fleet_sequential_echo_64B");
    for (name, e, _, _) in &s.systems {
        g.bench_function(*name, |b| {
            b.iter_custom(|iters| s.run(run_calls(e, iters, 1)).0);
        });
    }
    g.finish();
    let mut g = c.benchmark_group("fleet_throughput_128_in_flight");
    let batch = 2_000u64;
    g.throughput(Throughput::Elements(batch));
    for (name, e, _, _) in &s.systems {
        g.bench_function(*name, |b| {
            b.iter_custom(|iters| (0..iters).map(|_| s.run(run_calls(e, batch, 128)).0).sum());
        });
    }
    g.finish();
}

/// Sequential calls in interleaved blocks: p50 and p99 of each, and the ratio of the blocks'
/// p50s (median and range).
fn latency_report(s: &Setup, blocks: usize, per_block: usize) {
    let lat = s.run(interleaved_latency(
        s.systems.len(),
        blocks,
        per_block,
        |i| call(&s.systems[i].1),
    ));
    let mut ratios: Vec<f64> = lat.block_p50.iter().map(|p| p[1] / p[0]).collect();
    println!("\nsequential echo (64 B), {blocks} interleaved blocks of {per_block} calls each:");
    for (all, (name, ..)) in lat.all.iter().zip(&s.systems) {
        println!(
            "  {name:>10}: p50 {:6.1} us  p99 {:6.1} us",
            us(percentile(all, 0.5)),
            us(percentile(all, 0.99))
        );
    }
    let (lo, hi) = range(&ratios);
    println!(
        "  p50 redis / in-process: {:.3} (blocks {lo:.3}..{hi:.3})",
        median(&mut ratios)
    );
}

/// 128 calls in flight on one connection, interleaved rounds: calls per second of each, and
/// the per-round ratio (median and range).
fn throughput_report(s: &Setup, calls: u64, rounds: usize) {
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); s.systems.len()];
    let mut ratios = Vec::new();
    let leases_before = s.systems[1].3.metrics_text();
    for _ in 0..rounds {
        let r: Vec<f64> = s
            .systems
            .iter()
            .map(|(name, e, _, _)| {
                let (t, refused) = s.run(run_calls(e, calls, 128));
                assert_eq!(refused, 0, "{name}: calls refused");
                calls as f64 / t.as_secs_f64()
            })
            .collect();
        ratios.push(r[1] / r[0]);
        for (i, x) in r.into_iter().enumerate() {
            rates[i].push(x);
        }
    }
    let leases = metric(
        &s.systems[1].3.metrics_text(),
        "capgate_quota_store_leases_total",
    ) - metric(&leases_before, "capgate_quota_store_leases_total");
    println!("\nthroughput, 128 in flight on one connection, {rounds} interleaved rounds of {calls} calls:");
    for (i, (name, ..)) in s.systems.iter().enumerate() {
        let (lo, hi) = range(&rates[i]);
        println!(
            "  {name:>10}: median {:>7.0}/s (rounds {lo:.0}..{hi:.0})",
            median(&mut rates[i])
        );
    }
    let (lo, hi) = range(&ratios);
    println!(
        "  redis / in-process: {:.3} (rounds {lo:.3}..{hi:.3}); {leases} leases taken by the redis server",
        median(&mut ratios)
    );
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A client calling at a steady `per_second` (under its quota of 2,000/s, burst 200: the
/// defaults) for `secs`: Redis commands per 1,000 calls, counted by the store and by Redis.
fn commands_report(s: &Setup, per_second: u32, secs: f64) {
    let (e, _, stats) = &s.steady;
    let before = (
        metric(&stats.metrics_text(), "capgate_quota_store_commands_total"),
        s.redis.commands(),
    );
    let calls = (f64::from(per_second) * secs) as u32;
    let served = s.run(async {
        let start = tokio::time::Instant::now();
        let gap = Duration::from_secs_f64(1.0 / f64::from(per_second));
        let mut served = 0u32;
        for i in 0..calls {
            tokio::time::sleep_until(start + gap * i).await;
            served += u32::from(call(e).await);
        }
        served
    });
    let after = (
        metric(&stats.metrics_text(), "capgate_quota_store_commands_total"),
        s.redis.commands(),
    );
    let per_k = |d: f64| d * 1000.0 / f64::from(calls);
    println!(
        "\nRedis commands per 1,000 calls at a steady {per_second}/s for {secs} s ({served} of {calls} served; quota 2000/s, burst 200, lease 100):"
    );
    println!(
        "  sent by the store {:.1}, run by Redis {:.1} (INFO commandstats: scripts count their inner commands too)",
        per_k(after.0 - before.0),
        per_k((after.1 - before.1) as f64)
    );
}

fn main() {
    let quick = std::env::args().any(|a| a == "--test");
    let s = Setup::new();
    let mut c = Criterion::default()
        .configure_from_args()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    criterion_benches(&mut c, &s);
    c.final_summary();
    if quick {
        latency_report(&s, 2, 50);
        throughput_report(&s, 500, 1);
        commands_report(&s, 1000, 0.3);
    } else {
        latency_report(&s, 10, 2_000);
        throughput_report(&s, 10_000, 11);
        commands_report(&s, 1000, 5.0);
        commands_report(&s, 1900, 5.0);
    }
}
