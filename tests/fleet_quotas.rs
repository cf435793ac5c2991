//! Fleet quotas over real sockets, with a real `redis-server` started by each test (Debian's
//! `redis-server` must be on PATH; CI installs it): rates and connection counts shared by
//! three servers, a crashed server's entries expiring, Redis killed and restarted, and a
//! Redis 300 ms away.

mod common;

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use capgate::bench_capnp::echo;
use capgate::demo::EchoService;
use capgate::{
    Client, ClientClass, ListenAddr, Matcher, Policy, QuotaStore, Quotas, RedisStoreConfig, Server,
    ServerStats, ShutdownHandle,
};
use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_capgate");

/// A `redis-server` on a free loopback port, in a temporary directory, without persistence;
/// killed when dropped.
struct RedisServer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// TLS only (`--tls-port`), with these certificate and key files.
    tls: Option<(PathBuf, PathBuf)>,
}

impl RedisServer {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("capgate-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut r = Self {
            port,
            dir,
            child: None,
            tls: None,
        };
        r.spawn();
        r
    }

    /// A TLS-only server with a throwaway CA's certificate for 127.0.0.1 and localhost.
    fn start_tls() -> (Self, Vec<u8>) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("capgate-redis-{}-{port}", std::process::id()));
        let certs = capgate::write_dev_certs(&dir, &[]).unwrap();
        let ca = std::fs::read(&certs.ca).unwrap();
        let mut r = Self {
            port,
            dir,
            child: None,
            tls: Some(certs.server),
        };
        r.spawn();
        (r, ca)
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new("redis-server");
        match &self.tls {
            None => cmd.args(["--port", &self.port.to_string()]),
            Some((cert, key)) => cmd
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .args(["--tls-auth-clients", "no", "--tls-cert-file"])
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key),
        };
        let child = cmd
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run redis-server ({e}): these tests need Debian's redis-server on \
                     PATH (apt-get install redis-server; .ci/run installs it)"
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.ping() {
            if self.tls.is_some() && std::net::TcpStream::connect(self.addr()).is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not start within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn ping(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(self.addr()) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills it (SIGKILL): no goodbye to the servers.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A synchronous connection for checks.
    fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An Echo server on its own thread, with a policy and a quota store.
struct EchoServer {
    addr: SocketAddr,
    stats: ServerStats,
    stop: ShutdownHandle,
}

impl EchoServer {
    fn start(policy: Policy, store: QuotaStore) -> Self {
        let server = Server::builder()
            .listen("127.0.0.1:0".parse().unwrap())
            .workers(NonZeroUsize::new(1).unwrap())
            .limits(quick_limits())
            .policy(policy)
            .quota_store(store)
            .bootstrap_factory(|_| EchoService.client())
            .build()
            .unwrap();
        let ListenAddr::Tcp(addr) = server.local_addrs()[0].clone() else {
            unreachable!()
        };
        let (stats, stop) = (server.stats(), server.shutdown_handle());
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(server.serve())
        });
        Self { addr, stats, stop }
    }

    fn wait_up(&self, want: bool, within: Duration) {
        let deadline = Instant::now() + within;
        while self.stats.quota_store_up() != Some(want) {
            assert!(
                Instant::now() < deadline,
                "quota store up = {want} not seen within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn metric(&self, name: &str) -> f64 {
        metric(&self.stats.metrics_text(), name)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.shutdown();
    }
}

/// The value of a metric line that starts with `name` (labels included), 0 if absent.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn redis_store(url: &str, fleet_size: u32, heartbeat: Duration) -> QuotaStore {
    let mut c = RedisStoreConfig::new(url).unwrap();
    c.fleet_size = NonZeroU32::new(fleet_size).unwrap();
    c.heartbeat_interval = heartbeat;
    QuotaStore::from(c)
}

fn policy(per_second: u32, burst: u32, max_connections: u32) -> Policy {
    let mut q = Quotas::default();
    q.calls_per_second = NonZeroU32::new(per_second).unwrap();
    q.burst = NonZeroU32::new(burst).unwrap();
    q.max_connections = max_connections;
    Policy::from_classes(vec![ClientClass::new("fleet", Matcher::Any)
        .allow_all()
        .with_quotas(q)])
}

/// One echo call: Ok(true) if served, Ok(false) if refused with `Overloaded`; anything else
/// (another error, no answer within 2 s) fails the test.
async fn call(e: &echo::Client) -> bool {
    let mut req = e.echo_request();
    req.get().set_payload(b"x");
    match tokio::time::timeout(Duration::from_secs(2), req.send().promise).await {
        Ok(Ok(_)) => true,
        Ok(Err(err)) if err.kind == capnp::ErrorKind::Overloaded => false,
        Ok(Err(err)) => panic!("a call failed with something else than Overloaded: {err}"),
        Err(_) => panic!("a call hung for 2 s"),
    }
}

async fn connect_all(addrs: &[SocketAddr]) -> (Vec<Client>, Vec<echo::Client>) {
    let mut clients = Vec::new();
    let mut caps = Vec::new();
    for a in addrs {
        let c = Client::connect(*a).await.unwrap();
        caps.push(c.bootstrap());
        clients.push(c);
    }
    (clients, caps)
}

/// Calls round robin over `caps` for `d` (one round of calls every `pace`), counting the
/// calls served; every call is served or `Overloaded`.
async fn spread_calls(caps: &[echo::Client], d: Duration, pace: Duration) -> (u32, u32) {
    let start = tokio::time::Instant::now();
    let (mut served, mut made) = (0, 0);
    let mut next = start;
    while start.elapsed() < d {
        for e in caps {
            made += 1;
            if call(e).await && start.elapsed() < d {
                served += 1;
            }
        }
        next += pace;
        tokio::time::sleep_until(next).await;
    }
    (served, made)
}

/// Sequential calls alternating between `a` and `b` (so both see the same machine), after a
/// warm-up until calls pass on both: each one's p99, and how many were `Overloaded`.
async fn p99_side_by_side(a: &echo::Client, b: &echo::Client, n: usize) -> [(Duration, usize); 2] {
    for e in [a, b] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !call(e).await {
            assert!(Instant::now() < deadline, "no call served within 10 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let mut times = [Vec::with_capacity(n), Vec::with_capacity(n)];
    let mut refused = [0, 0];
    for _ in 0..n {
        for (i, e) in [a, b].into_iter().enumerate() {
            let t = Instant::now();
            refused[i] += usize::from(!call(e).await);
            times[i].push(t.elapsed());
        }
    }
    [0, 1].map(|i| {
        times[i].sort();
        (times[i][n * 99 / 100], refused[i])
    })
}

#[test]
fn a_client_spread_over_three_servers_gets_its_rate_once_not_three_times() {
    let redis = RedisServer::start();
    // 50 calls/s, burst 10: over 10 s, 10 + 50 x 10 = 510 calls.
    let shared: Vec<EchoServer> = (0..3)
        .map(|_| {
            EchoServer::start(
                policy(50, 10, 64),
                redis_store(&redis.url(), 3, Duration::from_secs(1)),
            )
        })
        .collect();
    let alone: Vec<EchoServer> = (0..3)
        .map(|_| EchoServer::start(policy(50, 10, 64), QuotaStore::InProcess))
        .collect();
    for s in &shared {
        s.wait_up(true, Duration::from_secs(5));
        assert_eq!(s.metric("capgate_quota_store_up"), 1.0);
    }
    let target = 10.0 + 50.0 * 10.0;
    // Both fleets at once, each from its own thread: one connection per server, calls
    // round robin, about 600 rounds per second (far above the rate).
    let run = |servers: &[EchoServer]| {
        let addrs: Vec<_> = servers.iter().map(|s| s.addr).collect();
        std::thread::spawn(move || {
            local(async move {
                let (_clients, caps) = connect_all(&addrs).await;
                spread_calls(&caps, Duration::from_secs(10), Duration::from_micros(1500)).await
            })
        })
    };
    let (with_store, without) = (run(&shared), run(&alone));
    let (with_store, made) = with_store.join().unwrap();
    let (without, _) = without.join().unwrap();
    eprintln!(
        "served over 10 s: {with_store} with the Redis store ({made} calls made), {without} \
         without (burst + rate x 10 s = {target})"
    );
    let with_store = f64::from(with_store);
    assert!(
        (with_store - target).abs() <= 0.05 * target,
        "with the store: {with_store} served, not within 5% of {target}"
    );
    let ratio = f64::from(without) / target;
    assert!(
        (2.85..=3.05).contains(&ratio),
        "without the store: {without} served, {ratio:.2}x {target} (each server counts alone)"
    );
    let leases: f64 = shared
        .iter()
        .map(|s| s.metric("capgate_quota_store_leases_total"))
        .sum();
    assert!(leases > 50.0, "{leases} leases");
    let errors: f64 = shared
        .iter()
        .map(|s| s.metric("capgate_quota_store_errors_total"))
        .sum();
    assert_eq!(errors, 0.0);
}

#[test]
fn a_method_rate_holds_across_the_fleet_like_the_class_rate() {
    let redis = RedisServer::start();
    // The class allows 10,000 calls/s; the method rule on Echo.echo 50/s, burst 10: over 10 s,
    // 10 + 50 x 10 = 510 echo calls in total across the three servers.
    let method_policy = || {
        let rule = capgate::MethodQuota::new("Echo.echo", capgate::Catalog::builtin())
            .unwrap()
            .with_rate(NonZeroU32::new(50).unwrap(), NonZeroU32::new(10).unwrap());
        let class = policy(10_000, 1000, 64).classes()[0].as_ref().clone();
        Policy::from_classes(vec![class.with_method_quota(rule)])
    };
    let shared: Vec<EchoServer> = (0..3)
        .map(|_| {
            EchoServer::start(
                method_policy(),
                redis_store(&redis.url(), 3, Duration::from_secs(1)),
            )
        })
        .collect();
    for s in &shared {
        s.wait_up(true, Duration::from_secs(5));
    }
    let target = 10.0 + 50.0 * 10.0;
    let addrs: Vec<_> = shared.iter().map(|s| s.addr).collect();
    let (served, made) = local(async move {
        let (_clients, caps) = connect_all(&addrs).await;
        spread_calls(&caps, Duration::from_secs(10), Duration::from_micros(1500)).await
    });
    eprintln!("echo calls served over 10 s across 3 servers: {served} of {made} (target {target})");
    let served = f64::from(served);
    assert!(
        (served - target).abs() <= 0.05 * target,
        "{served} served, not within 5% of {target}"
    );
    let refused: u64 = shared
        .iter()
        .map(|s| s.stats.denials("fleet").method_rate)
        .sum();
    assert!(refused > 0, "the method rule refused nothing");
    let class_refused: u64 = shared.iter().map(|s| s.stats.denials("fleet").rate).sum();
    assert_eq!(
        class_refused, 0,
        "the class rate is far above: it refused nothing"
    );
}

/// A raw connection that bootstrapped (the server admitted it) and now idles; or the reason
/// it was refused.
fn open(addr: SocketAddr) -> Result<std::net::TcpStream, String> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(&rpc_bootstrap(0)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // A refusal is an Abort, then close; an admitted connection's first frame is the
    // bootstrap's Return.
    let reader = capnp::serialize::read_message(&mut s, Default::default()).unwrap();
    let msg: capnp_rpc::rpc_capnp::message::Reader = reader.get_root().unwrap();
    match msg.which().unwrap() {
        capnp_rpc::rpc_capnp::message::Abort(e) => {
            Err(e.unwrap().get_reason().unwrap().to_string().unwrap())
        }
        _ => Ok(s),
    }
}

/// Polls until a connection to `addr` is admitted; returns it and how long that took.
fn open_eventually(addr: SocketAddr, within: Duration) -> (std::net::TcpStream, Duration) {
    let start = Instant::now();
    loop {
        match open(addr) {
            Ok(s) => return (s, start.elapsed()),
            Err(why) => assert!(
                start.elapsed() < within,
                "still refused after {within:?}: {why}"
            ),
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[test]
fn max_connections_hold_across_the_fleet_and_a_killed_servers_entries_expire() {
    let redis = RedisServer::start();
    let heartbeat = Duration::from_millis(500);
    let expiry = heartbeat * 3;
    let (a, b) = (
        EchoServer::start(
            policy(1000, 100, 4),
            redis_store(&redis.url(), 3, heartbeat),
        ),
        EchoServer::start(
            policy(1000, 100, 4),
            redis_store(&redis.url(), 3, heartbeat),
        ),
    );
    // The third server is a `capgate serve` process, to be killed with SIGKILL.
    let dir = std::env::temp_dir().join(format!("capgate-fleet-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy_file = dir.join("policy.toml");
    std::fs::write(
        &policy_file,
        "[defaults]\nmax_connections = 4\n\n[[client]]\nname = \"fleet\"\nmatch = \"any\"\nallow = [\"*\"]\n",
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--service", "echo"])
        .args(["--quota-store", &redis.url(), "--quota-heartbeat", "500ms"])
        .arg("--policy")
        .arg(&policy_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let c = reported_addr(&mut child);
    a.wait_up(true, Duration::from_secs(5));
    b.wait_up(true, Duration::from_secs(5));
    let mut r = redis.conn();
    let deadline = Instant::now() + Duration::from_secs(5);
    while redis::cmd("ZCARD")
        .arg("capgate:servers")
        .query::<u32>(&mut r)
        .unwrap()
        < 3
    {
        assert!(
            Instant::now() < deadline,
            "the child never joined the fleet"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Two connections on the child, one on each of the others: 4, the maximum.
    let held_c = [open(c).unwrap(), open(c).unwrap()];
    let mut held_a = vec![open(a.addr).unwrap()];
    let _held_b = open(b.addr).unwrap();
    for addr in [a.addr, b.addr, c] {
        let why = open(addr).expect_err("a fifth connection across the fleet");
        assert!(
            why.contains("already has 4 connections across the fleet (max_connections = 4)"),
            "{why}"
        );
    }
    // One closes on a: another server admits one again.
    held_a.clear();
    let (again, _) = open_eventually(b.addr, Duration::from_secs(2));

    // The child dies without cleaning up: its two connections count until its entry expires
    // (3 heartbeats after its last one), then stop counting.
    child.kill().unwrap();
    let killed = Instant::now();
    child.wait().unwrap();
    drop(held_c);
    let why = open(a.addr).expect_err("the dead server's entries still count");
    assert!(why.contains("across the fleet"), "{why}");
    let (_late, _) = open_eventually(a.addr, expiry + Duration::from_secs(2));
    let after = killed.elapsed();
    eprintln!("a killed server's connections stopped counting {after:?} after SIGKILL (expiry {expiry:?})");
    assert!(after <= expiry + Duration::from_secs(2), "{after:?}");
    assert!(
        after >= expiry - heartbeat - Duration::from_millis(100),
        "{after:?}: too soon"
    );
    drop(again);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn redis_killed_mid_run_the_servers_fall_back_and_sharing_resumes_when_it_returns() {
    let mut redis = RedisServer::start();
    // fleet_size 1: during the outage each server allows the whole rate on its own, so the
    // fleet's total shows which mode it is in (1x shared, 3x on the fallback).
    let servers: Vec<EchoServer> = (0..3)
        .map(|_| {
            EchoServer::start(
                policy(50, 10, 64),
                redis_store(&redis.url(), 1, Duration::from_millis(200)),
            )
        })
        .collect();
    for s in &servers {
        s.wait_up(true, Duration::from_secs(5));
    }
    let addrs: Vec<_> = servers.iter().map(|s| s.addr).collect();
    let pace = Duration::from_micros(1500);
    let (shared, outage, resumed) = local(async {
        let (_clients, caps) = connect_all(&addrs).await;
        let (shared, _) = spread_calls(&caps, Duration::from_secs(2), pace).await;
        redis.kill();
        // Calls go on while the servers notice: none hangs, none fails with anything but
        // Overloaded (`call` checks both).
        let (_, _) = spread_calls(&caps, Duration::from_millis(500), pace).await;
        for s in &servers {
            s.wait_up(false, Duration::from_secs(3));
        }
        let (outage, _) = spread_calls(&caps, Duration::from_secs(2), pace).await;
        redis.spawn();
        for s in &servers {
            // Reconnecting backs off to at most 2 s between attempts.
            s.wait_up(true, Duration::from_secs(5));
        }
        let (resumed, _) = spread_calls(&caps, Duration::from_secs(2), pace).await;
        (shared, outage, resumed)
    });
    eprintln!("served in 2 s: {shared} shared, {outage} on the fallback, {resumed} shared again");
    // Shared: at most burst + 2 s x rate + 3 leases (3 each) = 119.
    assert!((95..=125).contains(&shared), "{shared} served while shared");
    // Fallback: each server its own 50/s (plus what its budget had left): about 3x.
    assert!(outage >= 250, "{outage} served on the fallback");
    assert!(
        (95..=125).contains(&resumed),
        "{resumed} served once sharing resumed"
    );
    for s in &servers {
        assert!(s.metric("capgate_quota_store_errors_total") >= 1.0);
        assert!(s.metric("capgate_quota_store_fallbacks_total{what=\"call\"}") >= 1.0);
        assert_eq!(s.metric("capgate_quota_store_up"), 1.0);
    }
}

#[test]
fn a_redis_300_ms_away_never_slows_a_call() {
    let redis = RedisServer::start();
    // 150 ms each way: every round trip to Redis takes 300 ms more.
    let (proxy_tx, proxy_rx) = std::sync::mpsc::channel();
    let target = redis.addr();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let p = capgate::demo::LatencyProxy::start(target, Duration::from_millis(150))
                .await
                .unwrap();
            proxy_tx.send(p.local_addr()).unwrap();
            std::future::pending::<()>().await;
        });
    });
    let slow_addr = proxy_rx.recv().unwrap();
    // A generous rate: the test is about latency, not refusals.
    let near = EchoServer::start(
        policy(100_000, 100_000, 64),
        redis_store(&redis.url(), 1, Duration::from_secs(1)),
    );
    let far = EchoServer::start(
        policy(100_000, 100_000, 64),
        redis_store(&format!("redis://{slow_addr}"), 1, Duration::from_secs(1)),
    );
    near.wait_up(true, Duration::from_secs(5));
    far.wait_up(true, Duration::from_secs(5));
    let [(near_p99, near_refused), (far_p99, far_refused)] = local(async {
        let (_c1, near_cap) = connect_all(&[near.addr]).await;
        let (_c2, far_cap) = connect_all(&[far.addr]).await;
        p99_side_by_side(&near_cap[0], &far_cap[0], 3000).await
    });
    eprintln!(
        "p99 of 3000 sequential calls each, interleaved: {near_p99:?} with Redis on loopback, \
         {far_p99:?} with Redis 300 ms away ({near_refused} and {far_refused} Overloaded)"
    );
    // A call that waited on Redis would take 300 ms.
    assert!(far_p99 < Duration::from_millis(150), "{far_p99:?}");
    assert!(
        far_p99 <= near_p99 * 3 + Duration::from_millis(10),
        "{far_p99:?} with the delay vs {near_p99:?} without"
    );
    // The far server did talk to Redis, slowly.
    let text = far.stats.metrics_text();
    let rounds = metric(&text, "capgate_quota_store_latency_seconds_count");
    let sum = metric(&text, "capgate_quota_store_latency_seconds_sum");
    assert!(
        rounds >= 1.0 && sum / rounds >= 0.25,
        "{rounds} rounds, {sum} s"
    );
    assert!(metric(&text, "capgate_quota_store_leases_total") >= 1.0);
}

#[test]
fn rediss_is_verified_against_the_given_ca() {
    let (redis, ca) = RedisServer::start_tls();
    let url = format!("rediss://127.0.0.1:{}", redis.port);
    let verified = EchoServer::start(
        policy(1000, 100, 64),
        RedisStoreConfig::with_tls_ca(&url, ca).unwrap().into(),
    );
    verified.wait_up(true, Duration::from_secs(5));
    // The system's roots do not know the throwaway CA: the handshake fails, the fallback
    // serves, and the errors are counted.
    let unverified = EchoServer::start(policy(1000, 100, 64), QuotaStore::redis(&url).unwrap());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(unverified.stats.quota_store_up(), Some(false));
    assert!(unverified.metric("capgate_quota_store_errors_total") >= 1.0);
    let served = local(async {
        let (_c, caps) = connect_all(&[verified.addr, unverified.addr]).await;
        let mut served = 0;
        for e in &caps {
            for _ in 0..20 {
                served += u32::from(call(e).await);
            }
        }
        served
    });
    assert_eq!(served, 40);
    assert!(verified.metric("capgate_quota_store_leases_total") >= 1.0);
}

#[test]
fn serve_with_redis_unreachable_at_start_keeps_serving_and_logs_it_once() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--service", "echo"])
        .args([
            "--quota-store",
            &format!("redis://127.0.0.1:{port}"),
            "--fleet-size",
            "2",
        ])
        .env("RUST_LOG", "warn,capgate=info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = reported_addr(&mut child);
    let served = local(async move {
        let (_c, caps) = connect_all(&[addr]).await;
        let mut served = 0;
        for _ in 0..200 {
            served += u32::from(call(&caps[0]).await);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        served
    });
    // Default quotas 2000/s, burst 200: on the fallback share (1/2) every call here passes.
    assert_eq!(served, 200);
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let unreachable = stderr.matches("quota store unreachable").count();
    assert_eq!(unreachable, 1, "logged {unreachable} times:\n{stderr}");
    assert!(stderr.contains("fallback = local"), "{stderr}");
    assert!(out.status.success(), "{stderr}");
    // A bad URL is refused at start.
    let out = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--quota-store",
            "http://x",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("quota store URL"));
}
