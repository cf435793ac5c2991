//! The capgate Rust client through the gateway to upstreams that are not capnp-rust: a
//! pycapnp server (tests/interop/store_server.py, Python over Cap'n Proto C++) and a C++
//! server built here from Debian's libcapnp-dev (tests/interop/cxx/store_server.c++). Every
//! Store method, the upstream calling the client's Watcher, the upstream's exception text,
//! Release reaching the upstream, a denial it never sees, and the exports mirror under churn.
//!
//! Needs `.venv/bin/python` with pycapnp, `capnp`, `g++` and libcapnp-dev (`scripts/test` and
//! `.ci/run` provide them).

mod common;

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use capgate::store_capnp::{reader, store};
use capgate::{cast, Catalog, Client, ClientClass, Matcher, Policy, Quotas, Upstream};
use common::store_scenario::{churn_then_hoard, get, open, put, wait_until, ChannelWatcher};
use common::upstream::TestGateway;
use common::*;
use tokio::sync::mpsc;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A foreign upstream process and what it printed (one line per call, `live ...` counts).
struct Foreign {
    child: Child,
    addr: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Foreign {
    fn start(mut cmd: Command) -> Self {
        let mut child = cmd
            .args(["tcp", "127.0.0.1", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the upstream starts");
        let out = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                    if let Some(a) = line.strip_prefix("listening on tcp://") {
                        let _ = tx.send(a.parse::<SocketAddr>().unwrap());
                    }
                    lines.lock().unwrap().push(line);
                }
            });
        }
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the upstream reports its address within 30 s");
        Self { child, addr, lines }
    }

    fn python() -> Self {
        let mut cmd = Command::new(root().join(".venv/bin/python"));
        cmd.arg(root().join("tests/interop/store_server.py"));
        Self::start(cmd)
    }

    fn cxx() -> Self {
        Self::start(Command::new(cxx_server()))
    }

    /// Lines printed so far (a mark for [`Foreign::saw_since`]).
    fn mark(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    fn saw_since(&self, mark: usize, needle: &str) -> bool {
        self.lines.lock().unwrap()[mark..]
            .iter()
            .any(|l| l.contains(needle))
    }

    fn last_live(&self) -> Option<String> {
        let lines = self.lines.lock().unwrap();
        lines.iter().rev().find(|l| l.starts_with("live ")).cloned()
    }

    fn upstream(&self) -> Upstream {
        Upstream::tcp(self.addr.to_string())
    }
}

impl Drop for Foreign {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Builds the C++ upstream once per test run.
fn cxx_server() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let out = std::env::temp_dir().join(format!("capgate-cxx-{}", std::process::id()));
            std::fs::create_dir_all(&out).unwrap();
            let ok = Command::new("capnp")
                .arg("compile")
                .arg(format!("-oc++:{}", out.display()))
                .arg(format!("--src-prefix={}", root().join("schema").display()))
                .arg(root().join("schema/store.capnp"))
                .status()
                .expect("capnp (Debian capnproto) is installed");
            assert!(ok.success(), "capnp compile failed");
            let flags = Command::new("pkg-config")
                .args(["--cflags", "--libs", "capnp-rpc"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_else(|| "-lcapnp-rpc -lcapnp -lkj-async -lkj -pthread".into());
            let bin = out.join("store_server");
            let ok = Command::new("g++")
                .args(["-std=c++17", "-O1"])
                .arg(format!("-I{}", out.display()))
                .arg("-o")
                .arg(&bin)
                .arg(root().join("tests/interop/cxx/store_server.c++"))
                .arg(out.join("store.capnp.c++"))
                .args(flags.split_whitespace())
                .status()
                .expect("g++ is installed");
            assert!(
                ok.success(),
                "building the C++ upstream failed (libcapnp-dev installed?)"
            );
            bin
        })
        .clone()
}

fn roomy(name: &str, allow: &[&str], max_exports: u32) -> ClientClass {
    let mut q = Quotas::default();
    q.calls_per_second = std::num::NonZeroU32::MAX;
    q.burst = std::num::NonZeroU32::MAX;
    q.max_exports = max_exports;
    let mut c = ClientClass::new(name, Matcher::Any).with_quotas(q);
    for a in allow {
        c = c.allow(a, Catalog::builtin()).unwrap();
    }
    c
}

async fn scenario(gw: SocketAddr, up: &Foreign) {
    let c = Client::connect(gw).await.unwrap();
    let s: store::Client = c.bootstrap();
    let ns = open(&s, "fruit");
    put(&ns, "apple", b"red").await;
    put(&ns, "apricot", b"orange").await;
    let r: reader::Client = cast(&ns);
    assert_eq!(get(&r, "apple").await, Some(b"red".to_vec()));
    assert_eq!(get(&r, "cherry").await, None);
    let mut list = r.list_request();
    list.get().set_prefix("ap");
    let reply = list.send().promise.await.unwrap();
    assert_eq!(reply.get().unwrap().get_keys().unwrap().len(), 2);

    // A pipelined chain: namespace -> sub -> sub -> get, sent before any answer.
    let mut b = ns.sub_request();
    b.get().set_name("b");
    let mut c2 = b.send().pipeline.get_ns().sub_request();
    c2.get().set_name("c");
    let deep = c2.send().pipeline.get_ns();
    put(&deep, "k", b"v").await;
    assert_eq!(get(&cast(&deep), "k").await, Some(b"v".to_vec()));

    let ro = ns.read_only_request().send().pipeline.get_reader();
    assert_eq!(get(&ro, "apricot").await, Some(b"orange".to_vec()));

    // The upstream calls the client's Watcher through the gateway.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut w = ns.watch_request();
    w.get()
        .set_watcher(capnp_rpc::new_client(ChannelWatcher(tx)));
    let sub = w
        .send()
        .promise
        .await
        .unwrap()
        .get()
        .unwrap()
        .get_subscription()
        .unwrap();
    put(&ns, "fig", b"purple").await;
    let change = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the callback arrives")
        .expect("a change");
    assert_eq!(change.0, "fig");

    // The upstream's exception text reaches the client.
    let bad = open(&s, "");
    let e = bad
        .put_request()
        .send()
        .promise
        .await
        .err()
        .expect("empty name");
    assert!(
        e.extra
            .contains("invalid namespace name: it must not be empty"),
        "{e}"
    );

    // Release reaches the upstream: everything dropped, its live count falls to the store.
    drop((ns, r, deep, ro, sub, bad));
    wait_until("the upstream to free what the client dropped", || {
        up.last_live().is_some_and(|l| {
            l.contains("namespaces=0")
                && l.contains("readers=0")
                && l.contains("subscriptions=0")
                && l.contains("watchers=0")
        })
    })
    .await;
    drop(s);
    c.shutdown().await.ok();
}

async fn denial(gw: SocketAddr, up: &Foreign) {
    let mark = up.mark();
    let c = Client::connect(gw).await.unwrap();
    let s: store::Client = c.bootstrap();
    let ns = open(&s, "deny");
    let mut p = ns.put_request();
    p.get().set_key("secret");
    p.get().set_value(b"v");
    let e = p.send().promise.await.err().expect("denied");
    assert_eq!(
        e.extra,
        "remote exception: permission denied: Namespace.put is not allowed for client \"reader\""
    );
    assert_eq!(get(&cast(&ns), "secret").await, None);
    // The upstream's lines are read on another thread: wait for the allowed call's. Had the
    // denied put reached it, its line would come before (same connection, sent first).
    wait_until("the allowed call's line from the upstream", || {
        up.saw_since(mark, "call Reader.get")
    })
    .await;
    assert!(
        !up.saw_since(mark, "call Namespace.put"),
        "the denied call never did"
    );
}

async fn churn(gw: SocketAddr) {
    let c = Client::connect(gw).await.unwrap();
    let s: store::Client = c.bootstrap();
    let (held, e) = churn_then_hoard(&s, 2000).await;
    assert!(
        e.extra.contains("max_exports = 100 exceeded")
            && e.extra.contains("capabilities from upstream ")
            && e.extra.contains(" through this gateway"),
        "{e}"
    );
    assert!((98..=101).contains(&held), "{held} held");
}

fn run_all(up: Foreign) {
    let all = TestGateway::start(up.upstream(), quick_limits(), None);
    local(scenario(all.addr, &up));
    all.stop().unwrap();
    let reader = Policy::from_classes(vec![roomy(
        "reader",
        &["Store.namespace", "Reader.*"],
        10_000,
    )]);
    let gw = TestGateway::start(up.upstream(), quick_limits(), Some(reader));
    local(denial(gw.addr, &up));
    gw.stop().unwrap();
    let tight = Policy::from_classes(vec![roomy("tight", &["*"], 100)]);
    let gw = TestGateway::start(up.upstream(), quick_limits(), Some(tight));
    local(churn(gw.addr));
    assert_served_by(&up);
    gw.stop().unwrap();
}

/// The upstream still serves (a fresh client straight to it through a new gateway).
fn assert_served_by(up: &Foreign) {
    let gw = TestGateway::start(up.upstream(), quick_limits(), None);
    local(async {
        let c = Client::connect(gw.addr).await.unwrap();
        let s: store::Client = c.bootstrap();
        s.namespaces_request().send().promise.await.unwrap();
    });
    gw.stop().unwrap();
}

#[test]
fn a_pycapnp_upstream_through_the_gateway() {
    run_all(Foreign::python());
}

#[test]
fn a_cxx_upstream_through_the_gateway() {
    run_all(Foreign::cxx());
}
