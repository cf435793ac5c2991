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
#[path = "../common/mod.rs"]
mod common;
use common::{median, threads_cpu_ns, twoparty_connect, twoparty_network};

mod memory;
mod reports;
mod systems;
use memory::*;
use reports::*;
use systems::*;

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
