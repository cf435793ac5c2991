//! TLS vs plaintext, capgate on both sides, side by side in one run: sequential latency,
//! throughput at 16 and 128 in flight, and memory per idle connection.
//!
//! `cargo bench --bench tls` (add `-- --test` for a smoke run).

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use capgate::bench_capnp::echo;
use capgate::demo::EchoService;
use capgate::{Client, ClientClass, Matcher, Policy, Server};

mod common;
use tokio::task::LocalSet;

fn policy() -> Policy {
    Policy::from_classes(vec![ClientClass::new("bench", Matcher::Any)
        .allow_all()
        .with_quotas(common::roomy_quotas())])
}

fn start(tls: Option<Arc<rustls::ServerConfig>>) -> SocketAddr {
    let mut b = Server::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .workers(NonZeroUsize::new(1).unwrap())
        .policy(policy())
        .bootstrap_factory(|_| EchoService.client());
    if let Some(t) = tls {
        b = b.tls(t);
    }
    let mut limits = capgate::Limits::default();
    limits.max_connections = 100_000;
    let server = b.limits(limits).build().unwrap();
    common::serve_on_thread(server)
}

async fn call(e: &echo::Client) {
    let mut req = e.echo_request();
    req.get().set_payload(&[7u8; 64]);
    req.send().promise.await.unwrap();
}

async fn run_calls(e: &echo::Client, total: u64, inflight: usize) -> Duration {
    let start = Instant::now();
    let left = Rc::new(std::cell::Cell::new(total));
    let tasks: Vec<_> = (0..inflight)
        .map(|_| {
            let (e, left) = (e.clone(), left.clone());
            tokio::task::spawn_local(async move {
                while left.get() > 0 {
                    left.set(left.get() - 1);
                    call(&e).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    start.elapsed()
}

fn rss() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<usize>().ok())
        .unwrap_or(0)
        * 1024
}

fn main() {
    let quick = std::env::args().any(|a| a == "--test");
    let dir = std::env::temp_dir().join(format!("capgate-bench-tls-{}", std::process::id()));
    let certs = capgate::write_dev_certs(&dir, &["bench"]).unwrap();
    let server_tls =
        capgate::tls::server_config(&certs.server.0, &certs.server.1, None, false).unwrap();
    let client_tls = capgate::tls::client_config(&certs.ca, None).unwrap();
    let plain_addr = start(None);
    let tls_addr = start(Some(server_tls));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = LocalSet::new();
    local.block_on(&rt, async {
        let plain = Client::connect(plain_addr).await.unwrap();
        let tls = Client::builder().tls(client_tls.clone(), "localhost").unwrap().connect(tls_addr).await.unwrap();
        let (p, t): (echo::Client, echo::Client) = (plain.bootstrap(), tls.bootstrap());
        call(&p).await;
        call(&t).await;

        let (blocks, per) = if quick { (2, 50) } else { (10, 2000) };
        let (mut lp, mut lt) = (Vec::new(), Vec::new());
        for _ in 0..blocks {
            for (e, v) in [(&p, &mut lp), (&t, &mut lt)] {
                for _ in 0..per {
                    let s = Instant::now();
                    call(e).await;
                    v.push(s.elapsed());
                }
            }
        }
        lp.sort();
        lt.sort();
        let pct = |v: &[Duration], q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)].as_secs_f64() * 1e6;
        println!("sequential echo (64 B), {} calls each, interleaved:", lp.len());
        for (label, q) in [("p50", 0.5), ("p99", 0.99)] {
            println!(
                "  {label}: plaintext {:6.1} us   TLS {:6.1} us   TLS/plaintext {:.2}",
                pct(&lp, q),
                pct(&lt, q),
                pct(&lt, q) / pct(&lp, q)
            );
        }
        let calls = if quick { 500 } else { 10_000 };
        let rounds = if quick { 1 } else { 7 };
        println!("throughput (64 B echo, one connection), {rounds} interleaved rounds of {calls}, medians:");
        for inflight in [16usize, 128] {
            let (mut rp, mut rt_) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                rp.push(calls as f64 / run_calls(&p, calls, inflight).await.as_secs_f64());
                rt_.push(calls as f64 / run_calls(&t, calls, inflight).await.as_secs_f64());
            }
            rp.sort_by(f64::total_cmp);
            rt_.sort_by(f64::total_cmp);
            let (a, b) = (rp[rp.len() / 2], rt_[rt_.len() / 2]);
            println!("  {inflight:>3} in flight: plaintext {a:>8.0}/s   TLS {b:>8.0}/s   TLS/plaintext {:.2}", b / a);
        }

        let n = if quick { 20 } else { 300 };
        println!("memory per idle connection, both ends in this process ({n} connections, after one call):");
        for (name, addr, tls_cfg) in [("plaintext", plain_addr, None), ("TLS", tls_addr, Some(client_tls.clone()))] {
            let before = rss();
            let mut held = Vec::new();
            for _ in 0..n {
                let b = Client::builder();
                let c = match &tls_cfg {
                    Some(cfg) => b.tls(cfg.clone(), "localhost").unwrap().connect(addr).await.unwrap(),
                    None => b.connect(addr).await.unwrap(),
                };
                let e: echo::Client = c.bootstrap();
                call(&e).await;
                held.push((c, e));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            println!("  {name}: {:.1} KiB", rss().saturating_sub(before) as f64 / n as f64 / 1024.0);
            drop(held);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let _ = std::fs::remove_dir_all(dir);
}
