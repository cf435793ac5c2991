//! The systems compared: their servers (started on threads or as child processes) and
//! clients, on one echo workload.

use super::*;

#[tarpc::service]
pub(crate) trait TarpcEcho {
    async fn echo(payload: ByteBuf) -> ByteBuf;
}

#[derive(Clone)]
pub(crate) struct TarpcEchoServer;

impl TarpcEcho for TarpcEchoServer {
    async fn echo(self, _: tarpc::context::Context, payload: ByteBuf) -> ByteBuf {
        payload
    }
}

pub(crate) const MAX_FRAME: usize = 64 << 20;

// ---------------------------------------------------------------------------------------
// Servers. Each runs on `threads` threads of its own; one connection always lands on one.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Sys {
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
    pub(crate) fn name(self) -> &'static str {
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

pub(crate) fn current_thread_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Raw capnp-rpc twoparty over buffered streams, connections dealt round-robin to
/// `threads` threads (each a current-thread runtime with a LocalSet).
pub(crate) fn start_twoparty(threads: usize, store: bool) -> SocketAddr {
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
pub(crate) fn bench_policy() -> Policy {
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

pub(crate) fn capgate_limits() -> capgate::Limits {
    let mut l = capgate::Limits::default();
    l.max_connections = 100_000;
    l.max_message_bytes = MAX_FRAME;
    l.max_outgoing_bytes = 256 << 20;
    l
}

/// capgate with the policy on, `workers` worker threads.
pub(crate) fn start_capgate(
    workers: usize,
    store: bool,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> SocketAddr {
    start_capgate_with(workers, store, tls, capgate_limits())
}

/// The busy-polling budget of the `capgate busy-poll` runs.
pub(crate) const BUSY_POLL: Duration = Duration::from_micros(200);

pub(crate) fn busy_limits() -> Limits {
    let mut l = capgate_limits();
    l.busy_poll = BUSY_POLL;
    l
}

/// capgate as it was before adaptive polling: every wait for the peer sleeps at once.
pub(crate) fn no_poll_limits() -> Limits {
    let mut l = capgate_limits();
    l.answer_poll = Duration::ZERO;
    l.call_poll = Duration::ZERO;
    l
}

pub(crate) fn start_capgate_with(
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

pub(crate) fn tarpc_framing() -> tarpc::tokio_util::codec::length_delimited::Builder {
    let mut b = LengthDelimitedCodec::builder();
    b.max_frame_length(MAX_FRAME);
    b
}

/// tarpc on a tokio runtime with `threads` worker threads, TCP_NODELAY like the others.
pub(crate) fn start_tarpc(threads: usize) -> SocketAddr {
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
pub(crate) fn start_tcp_pingpong() -> SocketAddr {
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
pub(crate) enum Conn {
    Twoparty(echo::Client),
    // The `Client` keeps the connection open.
    Capgate(#[allow(dead_code)] Client, echo::Client),
    Tarpc(TarpcEchoClient),
    Handle(ClientHandle),
}

pub(crate) async fn connect(sys: Sys, addr: SocketAddr) -> Conn {
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

pub(crate) async fn capnp_echo(e: &echo::Client, payload: &[u8]) -> Result<usize, capnp::Error> {
    let mut req = e.echo_request();
    req.get().set_payload(payload);
    let reply = req.send().promise.await?;
    Ok(reply.get()?.get_payload()?.len())
}

impl Conn {
    pub(crate) async fn echo(&self, payload: &Rc<Vec<u8>>) {
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
pub(crate) async fn run_calls(
    conn: &Conn,
    total: u64,
    inflight: usize,
    payload: &Rc<Vec<u8>>,
) -> Duration {
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
