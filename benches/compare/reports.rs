//! The reports: latency, polling, throughput, many connections, payload sizes, pipelining.

use super::*;

// ---------------------------------------------------------------------------------------
// Reports.

/// Sequential latency, 64 B (8 B for raw TCP), interleaved blocks.
pub(crate) fn latency_report(b: &Bench, tcp: SocketAddr, conns: &[(Sys, Conn)]) {
    let (blocks, per) = if b.quick { (2, 50) } else { (10, 2_000) };
    let payload = Rc::new(vec![42u8; 64]);
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); conns.len() + 1];
    // CPU time of the whole process (client and server threads) per system.
    let mut cpu_ns = vec![0u64; conns.len() + 1];
    b.run(async {
        let mut s = tokio::net::TcpStream::connect(tcp).await.unwrap();
        s.set_nodelay(true).unwrap();
        let mut buf = [7u8; 8];
        for _ in 0..blocks {
            let cpu = threads_cpu_ns("");
            for _ in 0..per {
                let t = Instant::now();
                s.write_all(&buf).await.unwrap();
                s.read_exact(&mut buf).await.unwrap();
                samples[0].push(t.elapsed());
            }
            cpu_ns[0] += threads_cpu_ns("") - cpu;
            for (i, (_, c)) in conns.iter().enumerate() {
                let cpu = threads_cpu_ns("");
                for _ in 0..per {
                    let t = Instant::now();
                    c.echo(&payload).await;
                    samples[i + 1].push(t.elapsed());
                }
                cpu_ns[i + 1] += threads_cpu_ns("") - cpu;
            }
        }
    });
    for v in &mut samples {
        v.sort();
    }
    println!(
        "\n== sequential latency, one call at a time ({} calls each, interleaved; raw TCP: 8 B ping-pong, others: 64 B echo)",
        samples[0].len()
    );
    let names: Vec<&str> = std::iter::once("raw TCP")
        .chain(conns.iter().map(|(s, _)| s.name()))
        .collect();
    let capgate = names.iter().position(|n| *n == "capgate").unwrap();
    let twoparty = names.iter().position(|n| *n == "twoparty").unwrap();
    for (i, name) in names.iter().enumerate() {
        println!(
            "  {name:<17} p50 {:7.1} us  p90 {:7.1} us  p99 {:7.1} us  CPU/call {:6.1} us",
            pct(&samples[i], 0.5),
            pct(&samples[i], 0.9),
            pct(&samples[i], 0.99),
            cpu_ns[i] as f64 / samples[i].len() as f64 / 1e3,
        );
    }
    let p = |i: usize| pct(&samples[i], 0.5);
    println!(
        "  ratios (p50): capgate/raw TCP {:.2} (target <= 1.6)  capgate/twoparty {:.2} (target <= 0.9)  capgate/tarpc {:.2}  handle/capgate {:.2}",
        p(capgate) / p(0),
        p(capgate) / p(twoparty),
        p(capgate) / p(names.iter().position(|n| *n == "tarpc").unwrap()),
        p(names.iter().position(|n| *n == "capgate handle").unwrap()) / p(capgate),
    );
    let busy = names
        .iter()
        .position(|n| *n == "capgate busy-poll")
        .unwrap();
    println!(
        "  busy-poll ({} us after each write, both sides): /raw TCP {:.2}  /twoparty {:.2}  /capgate {:.2}; CPU per call x{:.2} of capgate's",
        BUSY_POLL.as_micros(),
        p(busy) / p(0),
        p(busy) / p(twoparty),
        p(busy) / p(capgate),
        cpu_ns[busy] as f64 / cpu_ns[capgate] as f64,
    );
    let no_poll = names.iter().position(|n| *n == "capgate no-poll").unwrap();
    println!(
        "  no-poll (answer_poll and call_poll off, both sides): /raw TCP {:.2}  /twoparty {:.2}  capgate/no-poll {:.2}; capgate's CPU per call x{:.2} of no-poll's",
        p(no_poll) / p(0),
        p(no_poll) / p(twoparty),
        p(capgate) / p(no_poll),
        cpu_ns[capgate] as f64 / cpu_ns[no_poll] as f64,
    );
}

/// What adaptive polling costs and gains when the client does something else between
/// calls: sequential calls separated by a pause in which the client thread either sleeps
/// (waits for something else) or computes (spins), capgate as configured by default vs with
/// polling off. CPU per call is that of every thread of the process, the pauses included:
/// read the difference.
pub(crate) fn polling_report(b: &Bench, conns: &[(Sys, Conn)]) {
    let find = |sys: Sys| &conns.iter().find(|(s, _)| *s == sys).unwrap().1;
    let (capgate, no_poll) = (find(Sys::Capgate), find(Sys::NoPoll));
    let (blocks, per) = if b.quick { (1, 20) } else { (10, 200) };
    let payload = Rc::new(vec![42u8; 64]);
    println!(
        "\n== adaptive polling: sequential 64 B echo, the client sleeping or computing between calls ({} calls each, interleaved blocks; CPU: whole process per call)",
        blocks * per
    );
    for (pause_us, spin) in [
        (0u64, false),
        (20, false),
        (100, false),
        (1000, false),
        (20, true),
        (100, true),
        (1000, true),
    ] {
        let pause = Duration::from_micros(pause_us);
        // [capgate, no-poll]: latencies, CPU ns
        let mut samples = [Vec::new(), Vec::new()];
        let mut cpu = [0u64; 2];
        let mut paused = Duration::ZERO;
        b.run(async {
            for _ in 0..blocks {
                for (i, c) in [capgate, no_poll].into_iter().enumerate() {
                    let before = threads_cpu_ns("");
                    for _ in 0..per {
                        let t = Instant::now();
                        if spin {
                            while t.elapsed() < pause {
                                std::hint::spin_loop();
                            }
                        } else if !pause.is_zero() {
                            std::thread::sleep(pause);
                        }
                        paused += t.elapsed();
                        let t = Instant::now();
                        c.echo(&payload).await;
                        samples[i].push(t.elapsed());
                    }
                    cpu[i] += threads_cpu_ns("") - before;
                }
            }
        });
        let calls = (blocks * per) as f64;
        let cpu_us: Vec<f64> = cpu.iter().map(|&ns| ns as f64 / calls / 1e3).collect();
        for v in &mut samples {
            v.sort();
        }
        let (p0, p1) = (pct(&samples[0], 0.5), pct(&samples[1], 0.5));
        let label = if pause.is_zero() {
            "no pause".to_string()
        } else {
            format!(
                "{} {pause_us:>4} us ({:.0})",
                if spin { "compute" } else { "sleep  " },
                paused.as_secs_f64() * 1e6 / (2.0 * calls)
            )
        };
        println!(
            "  {label:<24} p50 capgate {p0:6.1} us  no-poll {p1:6.1} us ({:.2}x)   CPU/call capgate {:6.1} us  no-poll {:6.1} us ({:+.1} us)",
            p0 / p1,
            cpu_us[0],
            cpu_us[1],
            cpu_us[0] - cpu_us[1],
        );
    }
}

/// Calls per second on one connection at 1/16/128 in flight, interleaved rounds.
pub(crate) fn throughput_report(b: &Bench, conns: &[(Sys, Conn)]) {
    let (calls, rounds) = if b.quick { (300u64, 1) } else { (10_000, 11) };
    let payload = Rc::new(vec![42u8; 64]);
    println!(
        "\n== throughput, one connection, 64 B echo ({rounds} interleaved rounds of {calls} calls; medians, calls/s)"
    );
    for inflight in [1usize, 16, 128] {
        let mut rates = vec![Vec::new(); conns.len()];
        // CPU time of the whole process (client and server threads), per system.
        let mut cpu_ns = vec![0u64; conns.len()];
        let mut vs_twoparty = Vec::new();
        for _ in 0..rounds {
            let r: Vec<f64> = conns
                .iter()
                .zip(cpu_ns.iter_mut())
                .map(|((_, c), cpu)| {
                    let before = threads_cpu_ns("");
                    let t = b.run(run_calls(c, calls, inflight, &payload));
                    *cpu += threads_cpu_ns("") - before;
                    calls as f64 / t.as_secs_f64()
                })
                .collect();
            vs_twoparty.push(r[1] / r[0]);
            for (i, x) in r.into_iter().enumerate() {
                rates[i].push(x);
            }
        }
        let m: Vec<f64> = rates.iter_mut().map(|v| median(v)).collect();
        let (lo, hi) = range(&vs_twoparty);
        let cells: Vec<String> = conns
            .iter()
            .zip(&m)
            .map(|((s, _), r)| format!("{} {:>7.0}", s.name(), r))
            .collect();
        println!(
            "  {inflight:>3} in flight: {}\n              capgate/twoparty {:.2} (rounds {lo:.2}..{hi:.2})  capgate/tarpc {:.2}  handle/capgate {:.2}  busy-poll/capgate {:.2}",
            cells.join("  "),
            median(&mut vs_twoparty),
            m[1] / m[2],
            m[3] / m[1],
            m[4] / m[1],
        );
        let per_call: Vec<f64> = cpu_ns
            .iter()
            .map(|&ns| ns as f64 / 1e3 / (calls * rounds) as f64)
            .collect();
        println!(
            "              CPU per call (all threads, us): {}  capgate/twoparty {:.2}",
            conns
                .iter()
                .zip(&per_call)
                .map(|((s, _), c)| format!("{} {c:.1}", s.name()))
                .collect::<Vec<_>>()
                .join("  "),
            per_call[1] / per_call[0],
        );
    }
}

/// The thread-name prefix of each system's server threads.
pub(crate) fn server_threads(sys: Sys) -> &'static str {
    match sys {
        Sys::Twoparty => "twoparty-server",
        Sys::Tarpc => "tarpc-server",
        Sys::Capgate | Sys::Handle | Sys::Busy | Sys::NoPoll => "capgate-worker",
    }
}

/// Calls per second, and server CPU per call (us).
pub(crate) fn multi_conn_rate(
    sys: Sys,
    addr: SocketAddr,
    conns: usize,
    inflight: usize,
    total: u64,
) -> (f64, f64) {
    let threads = 2.min(conns);
    let barrier = Arc::new(Barrier::new(threads + 1));
    let per_thread = total / threads as u64;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let barrier = barrier.clone();
            let mine = (t..conns).step_by(threads).count();
            std::thread::spawn(move || {
                LocalSet::new().block_on(&current_thread_rt(), async move {
                    let payload = Rc::new(vec![42u8; 64]);
                    let mut cs = Vec::new();
                    for _ in 0..mine {
                        let c = connect(sys, addr).await;
                        c.echo(&payload).await;
                        cs.push(c);
                    }
                    barrier.wait();
                    let per_conn = per_thread / mine as u64;
                    let runs: Vec<_> = cs
                        .iter()
                        .map(|c| run_calls(c, per_conn, inflight, &payload))
                        .collect();
                    futures::future::join_all(runs).await;
                    per_conn * mine as u64
                })
            })
        })
        .collect();
    barrier.wait();
    let cpu = threads_cpu_ns(server_threads(sys));
    let start = Instant::now();
    let done: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    let rate = done as f64 / start.elapsed().as_secs_f64();
    let cpu = threads_cpu_ns(server_threads(sys)) - cpu;
    (rate, cpu as f64 / done as f64 / 1000.0)
}

/// Many connections, servers with 2 threads (and capgate with 1 worker, for the worker
/// effect), two client threads.
pub(crate) fn multi_conn_report(b: &Bench, servers: &[(&str, Sys, SocketAddr)]) {
    let (total, rounds) = if b.quick { (2_000u64, 1) } else { (40_000, 5) };
    println!(
        "\n== throughput, many connections x 16 in flight, 64 B echo (2 client threads; {rounds} interleaved rounds of {total} calls; medians, calls/s)"
    );
    for conns in [4usize, 16] {
        let mut rates = vec![Vec::new(); servers.len()];
        let mut cpu = vec![Vec::new(); servers.len()];
        for _ in 0..rounds {
            for (i, (_, sys, addr)) in servers.iter().enumerate() {
                let (r, c) = multi_conn_rate(*sys, *addr, conns, 16, total);
                rates[i].push(r);
                cpu[i].push(c);
            }
        }
        let m: Vec<f64> = rates.iter_mut().map(|v| median(v)).collect();
        let c: Vec<f64> = cpu.iter_mut().map(|v| median(v)).collect();
        let cells: Vec<String> = servers
            .iter()
            .zip(&m)
            .map(|((n, _, _), r)| format!("{n} {r:>7.0}"))
            .collect();
        let cpu_cells: Vec<String> = servers
            .iter()
            .zip(&c)
            .map(|((n, _, _), c)| format!("{n} {c:.1} us"))
            .collect();
        println!(
            "  16 x {conns:>2}: {}\n           capgate/twoparty {:.2}  capgate/tarpc {:.2}  capgate 2 workers / 1 worker {:.2}\n           server CPU per call: {}  (2 workers / 1 worker {:.2}: 1.0 means no contention between workers)",
            cells.join("  "),
            m[1] / m[0],
            m[1] / m[2],
            m[1] / m[3],
            cpu_cells.join("  "),
            c[1] / c[3],
        );
    }
}

/// Large payloads on one connection: bytes per second.
pub(crate) fn payload_report(b: &Bench, conns: &[(Sys, Conn)]) {
    println!("\n== large payloads, one connection (interleaved rounds; medians, MiB/s of payload echoed)");
    for (size, inflight, calls) in [(64usize << 10, 16usize, 2_000u64), (1 << 20, 4, 200)] {
        let (calls, rounds) = if b.quick { (calls / 20, 1) } else { (calls, 5) };
        let payload = Rc::new(vec![42u8; size]);
        let mut rates = vec![Vec::new(); conns.len()];
        for _ in 0..rounds {
            for (i, (_, c)) in conns.iter().enumerate() {
                let t = b.run(run_calls(c, calls, inflight, &payload));
                rates[i].push(calls as f64 * size as f64 / t.as_secs_f64() / (1 << 20) as f64);
            }
        }
        let m: Vec<f64> = rates.iter_mut().map(|v| median(v)).collect();
        let cells: Vec<String> = conns
            .iter()
            .zip(&m)
            .map(|((s, _), r)| format!("{} {:>6.0}", s.name(), r))
            .collect();
        println!(
            "  {:>4} KiB x {inflight:>2} in flight: {}   capgate/twoparty {:.2}  capgate/tarpc {:.2}",
            size >> 10,
            cells.join("  "),
            m[1] / m[0],
            m[1] / m[2],
        );
    }
}

pub(crate) fn open(s: &store::Client, name: &str) -> namespace::Client {
    let mut req = s.namespace_request();
    req.get().set_name(name);
    req.send().pipeline.get_ns()
}

pub(crate) fn sub(n: &namespace::Client, name: &str) -> namespace::Client {
    let mut req = n.sub_request();
    req.get().set_name(name);
    req.send().pipeline.get_ns()
}

/// `store.namespace("a").sub("b").sub("c").sub("d").get("k")`: 5 calls, one await.
pub(crate) async fn chain(s: &store::Client) {
    let d = sub(&sub(&sub(&open(s, "a"), "b"), "c"), "d");
    let mut req = capgate::cast::<capgate::store_capnp::reader::Client>(&d).get_request();
    req.get().set_key("k");
    let r = req.send().promise.await.unwrap();
    assert!(!r.get().unwrap().get_found());
}

/// One call (the round-trip baseline through the same relay).
pub(crate) async fn one_call(s: &store::Client) {
    let r = s.namespaces_request().send().promise.await.unwrap();
    r.get().unwrap().get_names().unwrap();
}

/// A 5-call pipelined chain through a relay adding 2 ms each way. The round trip it is
/// measured against is raw TCP ping-pong through the same relay (timer granularity makes the
/// relay's real round trip a little over the nominal 4 ms).
pub(crate) fn pipeline_report(b: &Bench, tcp: SocketAddr) {
    let one_way = Duration::from_millis(2);
    let samples = if b.quick { 3 } else { 25 };
    let raw = start_twoparty(1, true);
    let gate = start_capgate(1, true, None);
    b.run(async {
        let proxy = capgate::demo::LatencyProxy::start(tcp, one_way).await.unwrap();
        let mut s = tokio::net::TcpStream::connect(proxy.local_addr()).await.unwrap();
        s.set_nodelay(true).unwrap();
        let mut rtt = Vec::new();
        let mut buf = [1u8; 8];
        for _ in 0..samples + 1 {
            let t = Instant::now();
            s.write_all(&buf).await.unwrap();
            s.read_exact(&mut buf).await.unwrap();
            rtt.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let rtt = median(&mut rtt[1..]);
        let mut rows = Vec::new();
        for (name, addr) in [("twoparty", raw), ("capgate", gate)] {
            let proxy = capgate::demo::LatencyProxy::start(addr, one_way).await.unwrap();
            let (s, conn): (store::Client, Option<Client>) = if name == "twoparty" {
                let client = twoparty_connect(proxy.local_addr()).await;
                (store::Client { client }, None)
            } else {
                let c = Client::connect(proxy.local_addr()).await.unwrap();
                (c.bootstrap(), Some(c))
            };
            one_call(&s).await;
            let (mut one, mut ch) = (Vec::new(), Vec::new());
            for _ in 0..samples {
                let t = Instant::now();
                one_call(&s).await;
                one.push(t.elapsed().as_secs_f64() * 1e3);
                let t = Instant::now();
                chain(&s).await;
                ch.push(t.elapsed().as_secs_f64() * 1e3);
            }
            rows.push((name, median(&mut one), median(&mut ch)));
            drop(conn);
        }
        println!(
            "\n== pipelined 5-call chain through a 2 ms one-way relay (medians of {samples}); raw TCP round trip through the relay: {rtt:.2} ms"
        );
        for (name, one, ch) in rows {
            println!(
                "  {name:<9} one call {one:.2} ms  5-call chain {ch:.2} ms  chain/RTT {:.2} (target <= 1.15)  chain/one call {:.2}",
                ch / rtt,
                ch / one
            );
        }
        println!("  (tarpc has no promise pipelining: the same chain costs 5 round trips)");
    });
}

// ---------------------------------------------------------------------------------------
// Idle memory, measured in a child process that only serves.
