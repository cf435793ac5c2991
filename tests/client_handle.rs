//! `ClientHandle`: the `Send + Clone` client, used from a multi-threaded tokio runtime.

mod common;

use std::time::{Duration, Instant};

use capgate::store_capnp::{namespace, store};
use capgate::{ClientHandle, Error, Limits};
use common::*;

fn open(s: &store::Client, name: &str) -> namespace::Client {
    let mut req = s.namespace_request();
    req.get().set_name(name);
    req.send().pipeline.get_ns()
}

async fn put_get(s: store::Client, ns: String, key: String) -> Result<Vec<u8>, capnp::Error> {
    let n = open(&s, &ns);
    let mut put = n.put_request();
    put.get().set_key(&key);
    put.get().set_value(key.as_bytes());
    put.send().promise.await?;
    let mut get = capgate::cast::<capgate::store_capnp::reader::Client>(&n).get_request();
    get.get().set_key(&key);
    let reply = get.send().promise.await?;
    Ok(reply.get()?.get_value()?.to_vec())
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Everything allowed, with a call rate far above what these tests make (the default quota,
/// 2000 calls/s with a burst of 200, would answer some of their bursts with Overloaded).
fn roomy() -> capgate::Policy {
    let mut q = capgate::Quotas::default();
    q.calls_per_second = std::num::NonZeroU32::new(1_000_000).unwrap();
    q.burst = std::num::NonZeroU32::new(100_000).unwrap();
    capgate::Policy::from_classes(vec![capgate::ClientClass::new(
        "all",
        capgate::Matcher::Any,
    )
    .allow_all()
    .with_quotas(q)])
}

#[test]
fn handle_serves_tasks_on_every_thread_of_a_multi_threaded_runtime() {
    let server = TestServer::start_policy(Limits::default(), roomy());
    let addr = server.tcp;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let handle = ClientHandle::connect(addr).await.expect("connect");
        let mut tasks = Vec::new();
        for t in 0..8 {
            let h = handle.clone();
            // tokio::spawn requires Send futures: the handle makes that possible.
            tasks.push(tokio::spawn(async move {
                for i in 0..20 {
                    let key = format!("k{t}-{i}");
                    let expect = key.clone().into_bytes();
                    let got = h
                        .call(move |s: store::Client| put_get(s, format!("ns{t}"), key))
                        .await
                        .expect("call through the handle");
                    assert_eq!(got, expect);
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        let stats = handle.stats().await.unwrap();
        assert!(stats.frames_out >= 8 * 20 * 2, "{stats:?}");
        // Everything written is there, seen from a second handle (a second connection).
        let other = ClientHandle::connect(addr).await.unwrap();
        let counts = other
            .call(|s: store::Client| async move {
                let mut counts = Vec::new();
                for t in 0..8 {
                    let mut req = capgate::cast::<capgate::store_capnp::reader::Client>(&open(
                        &s,
                        &format!("ns{t}"),
                    ))
                    .list_request();
                    req.get().set_prefix("k");
                    counts.push(req.send().promise.await?.get()?.get_keys()?.len());
                }
                Ok(counts)
            })
            .await
            .unwrap();
        assert_eq!(counts, vec![20; 8]);
    });
}

#[test]
fn errors_panics_and_shutdown_are_reported() {
    let server = TestServer::start(Limits::default());
    let addr = server.tcp;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let handle = ClientHandle::connect(addr).await.unwrap();

        // A server-side exception comes back as Error::Rpc with its text.
        let err = handle
            .call(|s: store::Client| async move {
                let mut req = s.namespace_request();
                req.get().set_name("");
                req.send().promise.await.map(|_| ())
            })
            .await
            .expect_err("empty namespace name is refused");
        assert!(matches!(err, Error::Rpc(_)), "{err:?}");
        assert!(err.to_string().contains("name"), "{err}");

        // A panic in the job costs only that job.
        let err = handle
            .run(|_c| async move {
                if std::hint::black_box(true) {
                    panic!("job panics on purpose");
                }
            })
            .await
            .expect_err("panicked job has no result");
        assert!(err.to_string().contains("without a result"), "{err}");
        let v = handle
            .call(|s: store::Client| put_get(s, "after".into(), "k".into()))
            .await
            .expect("the connection still works after a job panicked");
        assert_eq!(v, b"k");

        // shutdown closes the connection for every clone.
        let other = handle.clone();
        handle.shutdown().await.unwrap();
        let err = other
            .call(|s: store::Client| put_get(s, "x".into(), "k".into()))
            .await
            .expect_err("closed");
        assert!(matches!(err, Error::Rpc(_)), "{err:?}");
    });
    wait_until("the server to see the connection close", || {
        server.stats().open_connections() == 0
    });
}

#[test]
fn dropping_the_last_handle_closes_the_connection() {
    let server = TestServer::start(Limits::default());
    let addr = server.tcp;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let handle = rt.block_on(ClientHandle::connect(addr)).unwrap();
    let clone = handle.clone();
    rt.block_on(clone.call(|s: store::Client| put_get(s, "a".into(), "k".into())))
        .unwrap();
    wait_until("one open connection", || {
        server.stats().open_connections() == 1
    });
    drop(handle);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        server.stats().open_connections(),
        1,
        "a clone still holds it"
    );
    drop(clone);
    wait_until("the server to see the connection close", || {
        server.stats().open_connections() == 0
    });
    // Other clients are served as before.
    assert_served(server.tcp);
}

#[test]
fn connect_failure_is_reported_with_the_address() {
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = unused.local_addr().unwrap();
    drop(unused);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let err = rt
        .block_on(ClientHandle::connect(addr))
        .expect_err("refused");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}
