//! Helpers shared by the benchmarks (each bench includes this module).

use std::net::SocketAddr;

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

/// The median (sorts `v`).
pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
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
