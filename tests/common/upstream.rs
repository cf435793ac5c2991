//! Upstreams for the gateway tests: a plain capnp-rust `twoparty` server (no capgate) serving
//! the demo Store, that can be stopped (every connection dropped) and started again on the
//! same address; and the gateway in front of it.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use capgate::demo::Store;
use capgate::{Limits, ListenAddr, Server, ShutdownHandle, Upstream};
use capnp_rpc::{rpc_twoparty_capnp::Side, twoparty, RpcSystem};
use futures::AsyncReadExt;
use tokio_util::compat::TokioAsyncReadCompatExt;

/// Where a test upstream listens.
#[derive(Clone, Debug)]
pub enum Where {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// A plain capnp-rust server: no capgate between its socket and its RpcSystem.
pub struct TwopartyUpstream {
    pub at: Where,
    pub store: Store,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TwopartyUpstream {
    /// On 127.0.0.1, a free port.
    pub fn start(store: Store) -> Self {
        Self::start_at(Where::Tcp("127.0.0.1:0".parse().unwrap()), store)
    }

    /// On `at` (a Unix path or a TCP address; a stale socket file is replaced).
    pub fn start_at(at: Where, store: Store) -> Self {
        enum L {
            Tcp(std::net::TcpListener),
            Unix(std::os::unix::net::UnixListener),
        }
        let (listener, at) = match at {
            Where::Tcp(a) => {
                let l = std::net::TcpListener::bind(a).unwrap();
                let a = l.local_addr().unwrap();
                (L::Tcp(l), Where::Tcp(a))
            }
            Where::Unix(p) => {
                let _ = std::fs::remove_file(&p);
                (
                    L::Unix(std::os::unix::net::UnixListener::bind(&p).unwrap()),
                    Where::Unix(p),
                )
            }
        };
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let served = store.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            tokio::task::LocalSet::new().block_on(&rt, async move {
                let serve = |r: Box<dyn futures::AsyncRead + Unpin>,
                             w: Box<dyn futures::AsyncWrite + Unpin>| {
                    let network = twoparty::VatNetwork::new(
                        futures::io::BufReader::new(r),
                        futures::io::BufWriter::new(w),
                        Side::Server,
                        Default::default(),
                    );
                    let rpc = RpcSystem::new(Box::new(network), Some(served.client().client));
                    tokio::task::spawn_local(rpc);
                };
                match listener {
                    L::Tcp(l) => {
                        l.set_nonblocking(true).unwrap();
                        let l = tokio::net::TcpListener::from_std(l).unwrap();
                        loop {
                            tokio::select! {
                                _ = &mut stopped => break,
                                a = l.accept() => if let Ok((s, _)) = a {
                                    s.set_nodelay(true).unwrap();
                                    let (r, w) = s.compat().split();
                                    serve(Box::new(r), Box::new(w));
                                }
                            }
                        }
                    }
                    L::Unix(l) => {
                        l.set_nonblocking(true).unwrap();
                        let l = tokio::net::UnixListener::from_std(l).unwrap();
                        loop {
                            tokio::select! {
                                _ = &mut stopped => break,
                                a = l.accept() => if let Ok((s, _)) = a {
                                    let (r, w) = s.compat().split();
                                    serve(Box::new(r), Box::new(w));
                                }
                            }
                        }
                    }
                }
            });
            // Dropping the LocalSet dropped every connection: their sockets are closed.
        });
        Self {
            at,
            store,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn upstream(&self) -> Upstream {
        match &self.at {
            Where::Tcp(a) => Upstream::tcp(a.to_string()),
            Where::Unix(p) => Upstream::unix(p),
        }
    }

    /// Stops listening and drops every connection (as if the process died).
    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !t.is_finished() {
                assert!(
                    Instant::now() < deadline,
                    "upstream did not stop within 20 s"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            t.join().unwrap();
        }
    }
}

impl Drop for TwopartyUpstream {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A gateway on 127.0.0.1:0 relaying to `upstream`.
pub struct TestGateway {
    pub addr: SocketAddr,
    shutdown: ShutdownHandle,
    pub policy: capgate::PolicyHandle,
    pub stats: capgate::ServerStats,
    pub metrics: Option<SocketAddr>,
    thread: Option<std::thread::JoinHandle<Result<(), capgate::Error>>>,
}

impl TestGateway {
    pub fn start(upstream: Upstream, limits: Limits, policy: Option<capgate::Policy>) -> Self {
        Self::start_custom(upstream, limits, policy, |b| b)
    }

    pub fn start_custom(
        upstream: Upstream,
        limits: Limits,
        policy: Option<capgate::Policy>,
        customize: impl FnOnce(capgate::ServerBuilder) -> capgate::ServerBuilder,
    ) -> Self {
        let mut b = capgate::Gateway::builder()
            .upstream(upstream)
            .listen("127.0.0.1:0".parse().unwrap())
            .workers(NonZeroUsize::new(2).unwrap())
            .limits(limits);
        if let Some(p) = policy {
            b = b.policy(p);
        }
        let server: Server = customize(b).build().expect("gateway builds");
        let ListenAddr::Tcp(addr) = server.local_addrs()[0].clone() else {
            unreachable!()
        };
        let shutdown = server.shutdown_handle();
        let policy = server.policy_handle();
        let stats = server.stats();
        let metrics = server.metrics_addr();
        let thread = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(server.serve())
        });
        Self {
            addr,
            shutdown,
            policy,
            stats,
            metrics,
            thread: Some(thread),
        }
    }

    pub fn stop(mut self) -> Result<(), capgate::Error> {
        self.shutdown.shutdown();
        let t = self.thread.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !t.is_finished() {
            assert!(
                Instant::now() < deadline,
                "gateway did not stop within 20 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        t.join().expect("gateway thread did not panic")
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.shutdown.shutdown();
    }
}

/// A TCP relay that counts the bytes it carries toward `target` (what an upstream saw).
pub struct CountingProxy {
    pub addr: SocketAddr,
    pub to_upstream: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl CountingProxy {
    pub fn start(target: SocketAddr) -> Self {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let to_upstream = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let count = to_upstream.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { return };
                let Ok(mut u) = std::net::TcpStream::connect(target) else {
                    continue;
                };
                let (mut c2, mut u2) = (c.try_clone().unwrap(), u.try_clone().unwrap());
                let count = count.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 || u.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        count.fetch_add(n as u64, Ordering::SeqCst);
                    }
                    let _ = u.shutdown(std::net::Shutdown::Write);
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut u2, &mut c2);
                    let _ = c2.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Self { addr, to_upstream }
    }

    pub fn carried(&self) -> u64 {
        self.to_upstream.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A hostile upstream: each connection it accepts is handed to `behave` on its own thread.
pub fn hostile_upstream(
    behave: impl Fn(std::net::TcpStream) + Send + Sync + 'static,
) -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let behave = std::sync::Arc::new(behave);
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let behave = behave.clone();
            std::thread::spawn(move || behave(c));
        }
    });
    addr
}
