//! One precedence rule for the settings both `Limits` (builder, CLI flags) and a class's
//! quotas have (`max_message_bytes`, `idle_timeout`): built-in default < builder/CLI < a value
//! the class sets. One test per setting, over real sockets.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use capgate::store_capnp::{namespace, store};
use capgate::{ClientClass, Matcher, Policy, Quotas};
use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_capgate");

fn put_request(
    s: &store::Client,
    bytes: usize,
) -> capnp::capability::Promise<
    capnp::capability::Response<namespace::put_results::Owned>,
    capnp::Error,
> {
    let mut req = s.namespace_request();
    req.get().set_name("p");
    let ns = req.send().pipeline.get_ns();
    let mut put = ns.put_request();
    put.get().set_key("k");
    put.get().set_value(&vec![7u8; bytes]);
    put.send().promise
}

/// `capgate serve --max-message-bytes "2 KiB" --policy P` and a 10 KB put: refused unless
/// the class sets its own `max_message_bytes`.
fn serve_and_put(class_line: &str) -> Result<(), capnp::Error> {
    let dir = std::env::temp_dir().join(format!(
        "capgate-precedence-{}-{}",
        std::process::id(),
        class_line.len()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("p.toml");
    std::fs::write(
        &policy,
        format!("[[client]]\nname = \"all\"\nmatch = \"any\"\nallow = [\"*\"]\n{class_line}\n"),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--max-message-bytes",
            "2 KiB",
            "--policy",
        ])
        .arg(&policy)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = reported_addr(&mut child);
    let result = local(async move {
        let (_c, s) = store_client(addr).await;
        put_request(&s, 10_000).await.map(|_| ())
    });
    let _ = child.kill();
    let _ = child.wait();
    result
}

#[test]
fn max_message_bytes_flag_applies_unless_the_class_sets_its_own() {
    let e = serve_and_put("").expect_err("the flag's 2 KiB applies to a class that is silent");
    assert!(
        e.to_string()
            .contains("exceeds max_message_bytes = 2048 bytes (2 KiB)"),
        "{e}"
    );
    serve_and_put("max_message_bytes = \"64 KiB\"").expect("the class's own value wins");
}

fn idle_server(class_idle: Option<Duration>) -> TestServer {
    let mut limits = quick_limits();
    limits.idle_timeout = Duration::from_millis(300);
    let mut q = Quotas::default();
    q.idle_timeout = class_idle;
    let policy = Policy::from_classes(vec![ClientClass::new("all", Matcher::Any)
        .allow_all()
        .with_quotas(q)]);
    TestServer::start_policy(limits, policy)
}

#[test]
fn idle_timeout_of_the_builder_applies_unless_the_class_sets_its_own() {
    // The class is silent: the builder's 300 ms applies.
    let server = idle_server(None);
    local(async {
        let (c, s) = store_client(server.tcp).await;
        s.namespaces_request().send().promise.await.unwrap();
        let e = tokio::time::timeout(Duration::from_secs(20), c.closed())
            .await
            .expect("closed within 20 s")
            .expect_err("closed with a reason");
        assert!(
            e.to_string()
                .contains("connection idle for 300 ms (idle_timeout)"),
            "{e}"
        );
    });
    server.stop().unwrap();
    // The class sets 1 min: quiet for 1.5 s (five of the builder's periods), still open.
    let server = idle_server(Some(Duration::from_secs(60)));
    local(async {
        let (c, s) = store_client(server.tcp).await;
        s.namespaces_request().send().promise.await.unwrap();
        let quiet = Instant::now();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(quiet.elapsed() >= Duration::from_millis(1500));
        s.namespaces_request()
            .send()
            .promise
            .await
            .expect("the class's 1 min wins: the connection is still open");
        drop(c);
    });
    server.stop().unwrap();
}
