//! Answer and call polling (`Limits::answer_poll`, `Limits::call_poll`, on by default):
//! after a write, a connection polls briefly while an answer (or the peer's next call) is
//! due, and backs off when what it waits for comes later than its budget. Both ends are
//! capgate connections over a Unix socket pair, the server on its own thread.

mod common;

use std::time::Duration;

use capgate::{Client, Limits};
use common::*;

/// Default limits, polling whatever else runs on the machine (other tests, in parallel):
/// see `polling_stands_aside_while_the_machine_is_busy` for the default.
fn polling() -> Limits {
    let mut l = Limits::default();
    l.poll_when_busy = true;
    l
}

/// An `Echo` that answers after `delay`.
struct SlowEcho(Duration);

impl capgate::bench_capnp::echo::Server for SlowEcho {
    async fn echo(
        self: capnp::capability::Rc<Self>,
        params: capgate::bench_capnp::echo::EchoParams,
        mut results: capgate::bench_capnp::echo::EchoResults,
    ) -> Result<(), capnp::Error> {
        tokio::time::sleep(self.0).await;
        let payload = params.get()?.get_payload()?;
        results.get().set_payload(payload);
        Ok(())
    }
}

/// Serves `SlowEcho(delay)` with `limits` on one end of a Unix socket pair, on its own
/// thread; returns the other end, and the server connection's counters once the peer
/// leaves.
fn serve_echo_pair(
    limits: Limits,
    delay: Duration,
) -> (
    std::os::unix::net::UnixStream,
    std::thread::JoinHandle<capgate::ConnectionStats>,
) {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    theirs.set_nonblocking(true).unwrap();
    let server = std::thread::spawn(move || {
        local(async move {
            let s = tokio::net::UnixStream::from_std(ours).unwrap();
            let (r, w) = s.into_split();
            // One connection on its own, not a `Server`: its counters are what is checked.
            let (network, control) = capgate_runtime::fuzzing::new_network(
                r,
                w,
                capgate::Side::Server,
                limits,
                capgate_runtime::fuzzing::Guard::allow_all(),
            );
            let echo: capgate::bench_capnp::echo::Client = capnp_rpc::new_client(SlowEcho(delay));
            let rpc = capnp_rpc::RpcSystem::new(Box::new(network), Some(echo.client));
            let _ = rpc.await;
            control.stats()
        })
    });
    (theirs, server)
}

/// `calls` echo calls one after another, then the client's counters.
async fn sequential_echoes(
    builder: capgate::ClientBuilder,
    socket: std::os::unix::net::UnixStream,
    calls: usize,
) -> capgate::ConnectionStats {
    let s = tokio::net::UnixStream::from_std(socket).unwrap();
    let (r, w) = s.into_split();
    let c = builder.from_stream(r, w);
    let echo: capgate::bench_capnp::echo::Client = c.bootstrap();
    for i in 0..calls {
        let mut req = echo.echo_request();
        req.get().set_payload(&[i as u8; 8]);
        let reply = req.send().promise.await.expect("echo answered");
        assert_eq!(reply.get().unwrap().get_payload().unwrap(), &[i as u8; 8]);
    }
    let stats = c.stats();
    drop(echo);
    c.shutdown().await.ok();
    stats
}

#[test]
fn a_client_polls_for_answers_that_come_quickly() {
    // A budget no echo round trip comes near, even on a loaded machine.
    let (socket, server) = serve_echo_pair(polling(), Duration::ZERO);
    let calls = 200;
    let stats = local(sequential_echoes(
        Client::builder()
            .limits(polling())
            .answer_poll(Duration::from_secs(1)),
        socket,
        calls,
    ));
    let server = server.join().unwrap();
    // One poll after each call was written (the first may find the bootstrap pending); a
    // poll that misses after all (a thread held off its core for a second) makes the client
    // pass up at most `MAX_POLL_BACKOFF` (64) chances.
    let misses = (stats.polls - stats.poll_hits) as usize;
    assert!(
        stats.polls as usize + 64 * misses >= calls - 1,
        "the client polled {} times for {calls} calls: {stats:?}",
        stats.polls
    );
    assert!(
        stats.poll_hits * 10 >= stats.polls * 9,
        "only {} of {} polls saw the answer",
        stats.poll_hits,
        stats.polls
    );
    // The server answered and (by default) polled for the next call.
    assert!(
        server.polls > 0,
        "the server never polled for the next call: {server:?}"
    );
}

#[test]
fn answer_polling_backs_off_when_answers_are_slower_than_its_budget() {
    // Answers take 3 ms; the client polls for at most 100 µs (the default).
    let (socket, server) = serve_echo_pair(polling(), Duration::from_millis(3));
    let calls = 200;
    let stats = local(sequential_echoes(
        Client::builder().limits(polling()),
        socket,
        calls,
    ));
    server.join().unwrap();
    // With every poll missing: polls after 1, 2, 4, ... 64 skipped writes, 7 polls for the
    // first 127 calls, then one per 65: 9 for 200 calls (two more allowed for the
    // bootstrap's round trip); without backoff, one per call. A poll still sees an answer
    // when the thread loses its core for longer than the answer takes (a loaded machine
    // does that; the bootstrap's answer comes at once): a hit halves the backoff, which
    // costs at most two more polls.
    assert!(
        (7..=11 + 2 * stats.poll_hits).contains(&stats.polls),
        "the client polled {} times for {calls} slow calls: {stats:?}",
        stats.polls
    );
}

#[test]
fn polling_can_be_turned_off() {
    let mut limits = polling();
    limits.call_poll = Duration::ZERO;
    let (socket, server) = serve_echo_pair(limits, Duration::ZERO);
    let stats = local(sequential_echoes(
        Client::builder()
            .limits(polling())
            .answer_poll(Duration::ZERO),
        socket,
        50,
    ));
    let server = server.join().unwrap();
    assert_eq!((stats.polls, server.polls), (0, 0));
    assert!(stats.frames_out >= 50 && server.frames_out >= 50);
}

#[test]
fn polling_stands_aside_while_the_machine_is_busy() {
    // More threads that always want a core than there are cores: polling would take time
    // from them, so with the default limits nobody polls.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spinners: Vec<_> = (0..=cores)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(10));
    let (socket, server) = serve_echo_pair(Limits::default(), Duration::ZERO);
    let stats = local(sequential_echoes(Client::builder(), socket, 50));
    let server = server.join().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in spinners {
        s.join().unwrap();
    }
    assert_eq!((stats.polls, server.polls), (0, 0), "{stats:?} {server:?}");
    assert!(stats.frames_out >= 50 && server.frames_out >= 50);
}
