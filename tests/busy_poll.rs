//! `Limits::busy_poll`: connections poll instead of sleeping after each write, for a bounded
//! time, without holding up anything else on their thread.

mod common;

use std::time::{Duration, Instant};

use capgate::store_capnp::{namespace, store};
use capgate::{Client, Limits};
use common::*;

fn open(s: &store::Client, name: &str) -> namespace::Client {
    let mut req = s.namespace_request();
    req.get().set_name(name);
    req.send().pipeline.get_ns()
}

async fn put_get(s: &store::Client, key: &str) -> Vec<u8> {
    let n = open(s, "busy");
    let mut put = n.put_request();
    put.get().set_key(key);
    put.get().set_value(key.as_bytes());
    put.send().promise.await.expect("put answered");
    let mut get = capgate::cast::<capgate::store_capnp::reader::Client>(&n).get_request();
    get.get().set_key(key);
    let reply = get.send().promise.await.expect("get answered");
    reply.get().unwrap().get_value().unwrap().to_vec()
}

/// CPU time used so far by each thread of this process (ns), by thread id.
fn threads_cpu_ns() -> std::collections::HashMap<String, u64> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter_map(|t| {
            let ns = std::fs::read_to_string(t.path().join("schedstat"))
                .ok()?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()?;
            Some((t.file_name().to_string_lossy().into_owned(), ns))
        })
        .collect()
}

/// CPU time the threads of this process used since `before` (threads that ended meanwhile,
/// e.g. another test's, are left out rather than counted negative).
fn cpu_since(before: &std::collections::HashMap<String, u64>) -> Duration {
    let ns = threads_cpu_ns()
        .into_iter()
        .map(|(tid, ns)| ns.saturating_sub(before.get(&tid).copied().unwrap_or(0)))
        .sum();
    Duration::from_nanos(ns)
}

/// Both tests measure time or CPU that the other's polling threads would take.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn busy(time: Duration) -> Limits {
    let mut l = Limits::default();
    l.busy_poll = time;
    l
}

#[test]
fn busy_polling_connections_serve_calls_and_go_quiet_when_idle() {
    let _serial = serial();
    let server = TestServer::start(busy(Duration::from_millis(20)));
    let addr = server.tcp;
    local(async move {
        let c = Client::builder()
            .busy_poll(Duration::from_millis(20))
            .connect(addr)
            .await
            .unwrap();
        let s: store::Client = c.bootstrap();
        for i in 0..50 {
            let key = format!("k{i}");
            assert_eq!(put_get(&s, &key).await, key.as_bytes());
        }
        // Both ends polled after each of those writes; 20 ms after the last one they must
        // have stopped. Polling on through the next 500 ms would cost about that much CPU
        // per polling thread (the client's and the server worker's).
        tokio::time::sleep(Duration::from_millis(100)).await;
        let cpu = threads_cpu_ns();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let idle_cpu = cpu_since(&cpu);
        assert!(
            idle_cpu < Duration::from_millis(150),
            "the process used {idle_cpu:?} of CPU while idle for 500 ms"
        );
        // And the connection still works afterwards.
        assert_eq!(put_get(&s, "after").await, b"after");
    });
}

#[test]
fn a_polling_connection_does_not_hold_up_others_on_its_worker() {
    let _serial = serial();
    // One worker, polling for up to 10 s after each write.
    let server = TestServer::start_custom(busy(Duration::from_secs(10)), None, None, |b| {
        b.workers(std::num::NonZeroUsize::new(1).unwrap())
    });
    let addr = server.tcp;
    local(async move {
        // A's call leaves the worker polling for A's next request (which never comes).
        let (_a, sa) = store_client(addr).await;
        assert_eq!(put_get(&sa, "a").await, b"a");
        // B, on the same worker, is served meanwhile: 20 calls in well under the 10 s that
        // a thread held by A's polling would make even the first one wait (half of it
        // leaves a loaded machine room).
        let (_b, sb) = store_client(addr).await;
        let t = Instant::now();
        for i in 0..20 {
            let key = format!("b{i}");
            assert_eq!(put_get(&sb, &key).await, key.as_bytes());
        }
        let took = t.elapsed();
        assert!(
            took < Duration::from_secs(5),
            "20 calls of another client took {took:?}"
        );
    });
    assert_served(addr);
}
