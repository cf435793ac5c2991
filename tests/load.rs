//! `capgate load`: the load generator against real servers over loopback TCP.

mod common;

use std::num::NonZeroU32;
use std::process::Command;

use capgate::store_capnp::store;
use capgate::{Client, ClientClass, Limits, Matcher, Policy, Quotas};
use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_capgate");

fn class(name: &str, m: Matcher, calls_per_second: u32, burst: u32) -> ClientClass {
    let mut q = Quotas::default();
    q.calls_per_second = NonZeroU32::new(calls_per_second).unwrap();
    q.burst = NonZeroU32::new(burst).unwrap();
    ClientClass::new(name, m).allow_all().with_quotas(q)
}

fn load(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .arg("load")
        .args(args)
        .output()
        .expect("runs capgate load");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The number before " ok," on the "calls" line.
fn ok_calls(stdout: &str) -> u64 {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("calls"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no calls line in:\n{stdout}"))
}

#[test]
fn load_reports_throughput_and_percentiles() {
    let policy = Policy::from_classes(vec![class("all", Matcher::Any, 1_000_000, 100_000)]);
    let server = TestServer::start_policy(Limits::default(), policy);
    let addr = server.tcp.to_string();
    let (ok, out, err) = load(&[
        "--connect",
        &addr,
        "--method",
        "put",
        "--payload",
        "16 B",
        "--connections",
        "2",
        "--inflight",
        "4",
        "--duration",
        "1s",
    ]);
    assert!(ok, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("2 connection(s) x 4 in flight"), "{out}");
    assert!(out.contains(" ok, 0 failed"), "{out}");
    assert!(ok_calls(&out) > 100, "{out}");
    for p in ["throughput", "p50", "p90", "p99", "p999", "max"] {
        assert!(out.contains(p), "missing {p} in:\n{out}");
    }
    // The puts really happened.
    let found = local(async move {
        let (_c, s) = store_client(server.tcp).await;
        let mut req = s.namespace_request();
        req.get().set_name("load");
        let ns = req.send().pipeline.get_ns();
        let mut get = capgate::cast::<capgate::store_capnp::reader::Client>(&ns).get_request();
        get.get().set_key("k0");
        let reply = get.send().promise.await.unwrap();
        let r = reply.get().unwrap();
        (r.get_found(), r.get_value().unwrap().len())
    });
    assert_eq!(found, (true, 16));
}

#[test]
fn rate_limited_load_is_reported_per_error_while_other_clients_are_served() {
    // 127.0.0.1 is rate limited; every other source (here 127.0.0.2) is not.
    let policy = Policy::from_classes(vec![
        class(
            "limited",
            Matcher::Source("127.0.0.1/32".parse().unwrap()),
            50,
            10,
        ),
        class("others", Matcher::Any, 1_000_000, 100_000),
    ]);
    let server = TestServer::start_policy(Limits::default(), policy);
    let addr = server.tcp;
    let (ok, out, err) = load(&[
        "--connect",
        &addr.to_string(),
        "--method",
        "namespaces",
        "--inflight",
        "8",
        "--duration",
        "1s",
    ]);
    assert!(ok, "some calls succeed: stdout:\n{out}\nstderr:\n{err}");
    let served = ok_calls(&out);
    // 10 at once, then 50/s for about a second.
    assert!(
        (10..=90).contains(&served),
        "{served} calls got through:\n{out}"
    );
    assert!(
        out.contains("Store.namespaces refused: calls_per_second = 50 with burst = 10 exceeded"),
        "{out}"
    );
    // Another client, from another loopback address, is served at full speed meanwhile.
    let n = local(async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let stream = socket.connect(addr).await.unwrap();
        let (r, w) = stream.into_split();
        let c = Client::builder().from_stream(r, w);
        let s: store::Client = c.bootstrap();
        let mut n = 0;
        for _ in 0..200 {
            s.namespaces_request().send().promise.await.expect("served");
            n += 1;
        }
        n
    });
    assert_eq!(n, 200);
}

#[test]
fn load_against_nothing_fails_with_the_address() {
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = unused.local_addr().unwrap().to_string();
    drop(unused);
    let (ok, out, err) = load(&["--connect", &addr, "--duration", "1s"]);
    assert!(!ok, "{out}");
    assert!(err.contains(&addr) && err.contains("connecting"), "{err}");
}

#[test]
fn readme_flow_serve_echo_with_the_example_policy_then_load() {
    let policy = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/load-policy.toml");
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--service",
            "echo",
            "--policy",
            policy,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr = reported_addr(&mut child).to_string();
    let (ok, out, err) = load(&[
        "--connect",
        &addr,
        "--method",
        "echo",
        "--payload",
        "1 KiB",
        "--connections",
        "4",
        "--inflight",
        "8",
        "--duration",
        "1s",
    ]);
    let _ = child.kill();
    let _ = child.wait();
    assert!(ok, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains(" ok, 0 failed"), "{out}");
    assert!(ok_calls(&out) > 100, "{out}");
}

#[test]
fn a_server_that_never_answers_cannot_keep_the_run_going() {
    // Accepts and reads, never writes: every call stays unanswered.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().take(4).flatten() {
            let mut r = s.try_clone().unwrap();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while matches!(std::io::Read::read(&mut r, &mut buf), Ok(n) if n > 0) {}
            });
            held.push(s);
        }
        std::thread::sleep(std::time::Duration::from_secs(30));
    });
    let start = std::time::Instant::now();
    let (ok, out, err) = load(&["--connect", &addr, "--inflight", "4", "--duration", "1s"]);
    let took = start.elapsed();
    assert!(!ok, "{out}");
    assert!(
        took < std::time::Duration::from_secs(15),
        "the run took {took:?}"
    );
    assert!(
        out.contains("no answer within 5 s after the run ended"),
        "stdout:\n{out}\nstderr:\n{err}"
    );
    assert!(err.contains("no call succeeded"), "{err}");
}
