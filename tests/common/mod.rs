//! Shared helpers for capgate's end-to-end tests: a server on its own thread, clients on a
//! LocalSet, raw-socket peers, and process memory readings.
#![allow(dead_code, unreachable_pub, missing_docs)]

pub mod store_scenario;
pub mod upstream;

use std::future::Future;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use capgate::demo::{EchoService, Store};
use capgate::store_capnp::store;
use capgate::{Client, Limits, ListenAddr, Server, ShutdownHandle};

/// A running server: its addresses, its store, and a way to stop it.
pub struct TestServer {
    pub tcp: SocketAddr,
    pub unix: Option<PathBuf>,
    pub store: Store,
    shutdown: ShutdownHandle,
    policy: capgate::PolicyHandle,
    stats: capgate::ServerStats,
    metrics_addr: Option<std::net::SocketAddr>,
    thread: Option<std::thread::JoinHandle<Result<(), capgate::Error>>>,
}

impl TestServer {
    pub fn start(limits: Limits) -> Self {
        Self::start_with(limits, None)
    }

    /// Starts a server on 127.0.0.1:0 enforcing `policy`.
    pub fn start_policy(limits: Limits, policy: capgate::Policy) -> Self {
        Self::start_full(limits, None, Some(policy))
    }

    /// Starts a server on 127.0.0.1:0 (and a Unix socket if `unix` is given) serving the
    /// Store, or the Echo service for peers whose connection id is even when `echo` is set.
    pub fn start_with(limits: Limits, unix: Option<PathBuf>) -> Self {
        Self::start_full(limits, unix, None)
    }

    fn start_full(limits: Limits, unix: Option<PathBuf>, policy: Option<capgate::Policy>) -> Self {
        Self::start_custom(limits, unix, policy, |b| b)
    }

    /// Like the others, with a last say on the builder (TLS, ...).
    pub fn start_custom(
        limits: Limits,
        unix: Option<PathBuf>,
        policy: Option<capgate::Policy>,
        customize: impl FnOnce(capgate::ServerBuilder) -> capgate::ServerBuilder,
    ) -> Self {
        Self::start_inner(limits, unix, policy, Store::new(), false, customize)
    }

    /// Starts a server on 127.0.0.1:0 serving `store` (made with the limits under test),
    /// each client charged for its own share (`Store::client_for_peer`).
    pub fn start_store(limits: Limits, policy: Option<capgate::Policy>, store: Store) -> Self {
        Self::start_inner(limits, None, policy, store, true, |b| b)
    }

    fn start_inner(
        limits: Limits,
        unix: Option<PathBuf>,
        policy: Option<capgate::Policy>,
        store: Store,
        per_peer: bool,
        customize: impl FnOnce(capgate::ServerBuilder) -> capgate::ServerBuilder,
    ) -> Self {
        let factory_store = store.clone();
        let mut builder = Server::builder()
            .listen("127.0.0.1:0".parse().unwrap())
            .workers(NonZeroUsize::new(2).unwrap())
            .limits(limits)
            .bootstrap_factory(move |peer| {
                if per_peer {
                    factory_store.client_for_peer(peer)
                } else {
                    factory_store.client()
                }
            });
        builder = customize(builder);
        if let Some(p) = &unix {
            builder = builder.listen_unix(p);
        }
        if let Some(p) = policy {
            builder = builder.policy(p);
        }
        let server = builder.build().expect("server builds");
        let tcp = match server.local_addrs()[0] {
            ListenAddr::Tcp(a) => a,
            _ => unreachable!(),
        };
        let shutdown = server.shutdown_handle();
        let policy = server.policy_handle();
        let stats = server.stats();
        let metrics_addr = server.metrics_addr();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(server.serve())
        });
        Self {
            tcp,
            unix,
            store,
            shutdown,
            policy,
            stats,
            metrics_addr,
            thread: Some(thread),
        }
    }

    /// Starts a server whose bootstrap is the Echo service.
    pub fn start_echo(limits: Limits) -> (SocketAddr, ShutdownHandle) {
        let server = Server::builder()
            .listen("127.0.0.1:0".parse().unwrap())
            .workers(NonZeroUsize::new(1).unwrap())
            .limits(limits)
            .bootstrap_factory(|_| EchoService.client())
            .build()
            .unwrap();
        let ListenAddr::Tcp(addr) = server.local_addrs()[0].clone() else {
            unreachable!()
        };
        let handle = server.shutdown_handle();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(server.serve())
        });
        (addr, handle)
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    pub fn policy_handle(&self) -> capgate::PolicyHandle {
        self.policy.clone()
    }

    pub fn stats(&self) -> capgate::ServerStats {
        self.stats.clone()
    }

    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics_addr
    }

    /// Stops the server and waits (bounded) for it to finish.
    pub fn stop(mut self) -> Result<(), capgate::Error> {
        self.shutdown.shutdown();
        let t = self.thread.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !t.is_finished() {
            assert!(Instant::now() < deadline, "server did not stop within 20 s");
            std::thread::sleep(Duration::from_millis(10));
        }
        t.join().expect("server thread did not panic")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.shutdown();
    }
}

/// Runs `f` on a fresh current-thread runtime inside a LocalSet (as capnp-rpc needs), with a
/// 60 s bound so a broken test fails instead of hanging.
pub fn local<F: Future>(f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&rt, async {
        tokio::time::timeout(Duration::from_secs(60), f)
            .await
            .expect("test body finished within 60 s")
    })
}

/// Connects a capgate client and returns the Store bootstrap.
pub async fn store_client(addr: SocketAddr) -> (Client, store::Client) {
    let c = Client::connect(addr).await.expect("connects");
    let s = c.bootstrap();
    (c, s)
}

/// From a separate thread: a fresh client makes a Store call and gets the right answer.
/// Proves the server keeps serving others while something hostile goes on.
pub fn assert_served(addr: SocketAddr) {
    let handle = std::thread::spawn(move || {
        local(async move {
            let (_c, s) = store_client(addr).await;
            let mut req = s.namespace_request();
            req.get().set_name("health");
            let ns = req.send().pipeline.get_ns();
            let mut put = ns.put_request();
            put.get().set_key("k");
            put.get().set_value(b"v");
            put.send().promise.await.expect("put served");
            let reply = s.namespaces_request().send().promise.await.expect("served");
            let names: Vec<String> = reply
                .get()
                .unwrap()
                .get_names()
                .unwrap()
                .iter()
                .map(|n| n.unwrap().to_string().unwrap())
                .collect();
            assert!(names.contains(&"health".to_string()), "{names:?}");
        })
    });
    handle.join().expect("another client was served normally");
}

/// Resident set size of this process, in bytes.
pub fn rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS in /proc/self/status");
    let kb: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// What a raw peer observed after sending something.
#[derive(Debug)]
pub struct Outcome {
    /// The `Abort` reason the server sent, if any.
    pub abort: Option<String>,
    /// Other rpc message kinds received, by name.
    pub others: Vec<String>,
    /// The server closed the connection.
    pub closed: bool,
    /// When the close (or the bound) happened, measured from the call.
    pub elapsed: Duration,
}

/// Reads frames from a raw connection until the server closes it or `bound` passes.
pub fn observe(stream: &mut std::net::TcpStream, bound: Duration) -> Outcome {
    use capnp_rpc::rpc_capnp::message;
    let start = Instant::now();
    let mut out = Outcome {
        abort: None,
        others: Vec::new(),
        closed: false,
        elapsed: Duration::ZERO,
    };
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    while start.elapsed() < bound {
        stream
            .set_read_timeout(Some(
                bound
                    .saturating_sub(start.elapsed())
                    .max(Duration::from_millis(1)),
            ))
            .unwrap();
        match stream.read(&mut buf) {
            Ok(0) => {
                out.closed = true;
                break;
            }
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                break
            }
            Err(_) => {
                out.closed = true;
                break;
            }
        }
    }
    out.elapsed = start.elapsed();
    // Decoded by capnp's own reader, not capgate's: what any peer would make of the bytes.
    let mut input = &received[..];
    while !input.is_empty() {
        let reader =
            match capnp::serialize::read_message_from_flat_slice(&mut input, Default::default()) {
                Ok(r) => r,
                // The bound fell within a frame.
                Err(e)
                    if matches!(
                        e.kind,
                        capnp::ErrorKind::MessageEndsPrematurely(..)
                            | capnp::ErrorKind::PrematureEndOfFile
                    ) =>
                {
                    break
                }
                Err(e) => panic!("server frames are valid: {e}"),
            };
        let msg: message::Reader = reader.get_root().unwrap();
        match msg.which().unwrap() {
            message::Abort(e) => {
                out.abort = Some(e.unwrap().get_reason().unwrap().to_string().unwrap())
            }
            message::Unimplemented(_) => out.others.push("unimplemented".into()),
            message::Return(_) => out.others.push("return".into()),
            _ => out.others.push("other".into()),
        }
    }
    out
}

/// Opens a raw TCP connection and sends `bytes`.
pub fn raw_send(addr: SocketAddr, bytes: &[u8]) -> std::net::TcpStream {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(bytes).unwrap();
    s
}

/// A segment table: `count_field` (segments minus one) and the sizes, padded to a word.
pub fn header(count_field: u32, sizes: &[u32]) -> Vec<u8> {
    let mut v = count_field.to_le_bytes().to_vec();
    for s in sizes {
        v.extend_from_slice(&s.to_le_bytes());
    }
    if v.len() % 8 != 0 {
        v.extend_from_slice(&[0; 4]);
    }
    v
}

/// Limits with short timeouts so deadline tests finish quickly.
pub fn quick_limits() -> Limits {
    let mut l = Limits::default();
    l.frame_timeout = Duration::from_millis(500);
    l.linger_timeout = Duration::from_millis(200);
    l
}

/// A framed rpc `Bootstrap` message.
pub fn rpc_bootstrap(question_id: u32) -> Vec<u8> {
    let mut m = capnp::message::Builder::new_default();
    m.init_root::<capnp_rpc::rpc_capnp::message::Builder>()
        .init_bootstrap()
        .set_question_id(question_id);
    frame(&m)
}

/// A framed `Echo.echo` call on the bootstrap answer (question 0), as capnp-rust sends it.
pub fn rpc_echo_call(question_id: u32, payload_bytes: u32) -> Vec<u8> {
    use capgate::bench_capnp::echo;
    use capnp::traits::HasTypeId;
    let mut m = capnp::message::Builder::new_default();
    {
        let mut call = m
            .init_root::<capnp_rpc::rpc_capnp::message::Builder>()
            .init_call();
        call.set_question_id(question_id);
        call.set_interface_id(echo::Client::TYPE_ID);
        call.set_method_id(0);
        call.reborrow()
            .init_target()
            .init_promised_answer()
            .set_question_id(0);
        let params = call.init_params();
        params
            .get_content()
            .init_as::<echo::echo_params::Builder>()
            .init_payload(payload_bytes);
    }
    frame(&m)
}

pub fn frame(m: &capnp::message::Builder<capnp::message::HeapAllocator>) -> Vec<u8> {
    capnp::serialize::write_message_to_words(m)
}

/// Every method allowed, with room for many connections per client.
pub fn permissive_policy(max_connections: u32) -> capgate::Policy {
    let mut q = capgate::Quotas::default();
    q.max_connections = max_connections;
    capgate::Policy::from_classes(vec![capgate::ClientClass::new(
        "everyone",
        capgate::Matcher::Any,
    )
    .allow_all()
    .with_quotas(q)])
}

/// A framed rpc message built by `f`.
pub fn rpc_message(f: impl FnOnce(capnp_rpc::rpc_capnp::message::Builder)) -> Vec<u8> {
    let mut m = capnp::message::Builder::new_default();
    f(m.init_root());
    frame(&m)
}

/// The TCP address a `capgate serve` child reports on its first stdout line.
pub fn reported_addr(child: &mut std::process::Child) -> SocketAddr {
    use std::io::BufRead;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout is piped"))
        .read_line(&mut line)
        .unwrap();
    line.trim()
        .strip_prefix("listening on tcp://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap()
}

/// A blocking TCP connection from a chosen loopback source address.
pub fn connect_from(addr: std::net::SocketAddr, source: &str) -> std::net::TcpStream {
    // std cannot bind before connecting; tokio can, then hand the socket over.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
        let s = sock.connect(addr).await.unwrap();
        let s = s.into_std().unwrap();
        s.set_nonblocking(false).unwrap();
        s
    })
}
