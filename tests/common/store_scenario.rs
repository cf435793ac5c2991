//! The demo Store's end-to-end scenario, shared by the direct and the gateway tests.

use std::time::{Duration, Instant};

use capgate::store_capnp::{namespace, reader, store, watcher};
use capgate::{cast, Client};
use capnp::capability::Rc;
use tokio::sync::mpsc;

pub struct ChannelWatcher(pub mpsc::UnboundedSender<(String, Vec<u8>, bool)>);

impl watcher::Server for ChannelWatcher {
    async fn changed(
        self: Rc<Self>,
        params: watcher::ChangedParams,
        _: watcher::ChangedResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let _ = self.0.send((
            p.get_key()?.to_string()?,
            p.get_value()?.to_vec(),
            p.get_deleted(),
        ));
        Ok(())
    }
}

pub fn open(s: &store::Client, name: &str) -> namespace::Client {
    let mut req = s.namespace_request();
    req.get().set_name(name);
    req.send().pipeline.get_ns()
}

pub async fn put(ns: &namespace::Client, key: &str, value: &[u8]) {
    let mut req = ns.put_request();
    req.get().set_key(key);
    req.get().set_value(value);
    req.send().promise.await.expect("put");
}

pub async fn get(r: &reader::Client, key: &str) -> Option<Vec<u8>> {
    let mut req = r.get_request();
    req.get().set_key(key);
    let reply = req.send().promise.await.expect("get");
    let r = reply.get().unwrap();
    r.get_found().then(|| r.get_value().unwrap().to_vec())
}

pub async fn list(r: &reader::Client, prefix: &str) -> Vec<String> {
    let mut req = r.list_request();
    req.get().set_prefix(prefix);
    let reply = req.send().promise.await.expect("list");
    reply
        .get()
        .unwrap()
        .get_keys()
        .unwrap()
        .iter()
        .map(|k| k.unwrap().to_string().unwrap())
        .collect()
}

pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Every Store method, a callback, an exception and Release, over one connection.
pub async fn scenario(client: Client, server_store: &capgate::demo::Store) {
    let s: store::Client = client.bootstrap();

    // Store.namespace / Namespace.put / Reader.get (inherited, on a Namespace) / list.
    let ns = open(&s, "fruit");
    put(&ns, "apple", b"red").await;
    put(&ns, "apricot", b"orange").await;
    put(&ns, "banana", b"yellow").await;
    let as_reader: reader::Client = cast(&ns);
    assert_eq!(get(&as_reader, "apple").await, Some(b"red".to_vec()));
    assert_eq!(get(&as_reader, "cherry").await, None);
    assert_eq!(list(&as_reader, "ap").await, ["apple", "apricot"]);

    // Store.namespaces.
    let reply = s.namespaces_request().send().promise.await.unwrap();
    let names: Vec<String> = reply
        .get()
        .unwrap()
        .get_names()
        .unwrap()
        .iter()
        .map(|n| n.unwrap().to_string().unwrap())
        .collect();
    assert!(names.contains(&"fruit".to_string()), "{names:?}");

    // Namespace.delete.
    let mut del = ns.delete_request();
    del.get().set_key("banana");
    assert!(del
        .send()
        .promise
        .await
        .unwrap()
        .get()
        .unwrap()
        .get_existed());
    let mut del = ns.delete_request();
    del.get().set_key("banana");
    assert!(!del
        .send()
        .promise
        .await
        .unwrap()
        .get()
        .unwrap()
        .get_existed());

    // Namespace.sub: nested and distinct from the parent.
    let mut sub = ns.sub_request();
    sub.get().set_name("tropical");
    let tropical = sub.send().pipeline.get_ns();
    put(&tropical, "mango", b"sweet").await;
    assert_eq!(
        get(&cast(&tropical), "mango").await,
        Some(b"sweet".to_vec())
    );
    assert_eq!(get(&as_reader, "mango").await, None);

    // Namespace.readOnly: reads work; the Reader is not a Namespace.
    let ro = ns.read_only_request().send().pipeline.get_reader();
    assert_eq!(get(&ro, "apricot").await, Some(b"orange".to_vec()));
    let pretend: namespace::Client = cast(&ro);
    let mut sneaky = pretend.put_request();
    sneaky.get().set_key("apple");
    sneaky.get().set_value(b"green");
    let e = sneaky
        .send()
        .promise
        .await
        .err()
        .expect("a Reader has no put");
    assert_eq!(e.kind, capnp::ErrorKind::Unimplemented, "{e}");
    assert_eq!(get(&as_reader, "apple").await, Some(b"red".to_vec()));

    // Namespace.watch: the server calls our Watcher; cancel stops it.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut w = ns.watch_request();
    w.get()
        .set_watcher(capnp_rpc::new_client(ChannelWatcher(tx)));
    let subscription = w
        .send()
        .promise
        .await
        .unwrap()
        .get()
        .unwrap()
        .get_subscription()
        .unwrap();
    put(&ns, "fig", b"purple").await;
    let change = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(change, ("fig".into(), b"purple".to_vec(), false));
    let mut del = ns.delete_request();
    del.get().set_key("fig");
    del.send().promise.await.unwrap();
    let change = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(change, ("fig".into(), Vec::new(), true));
    subscription.cancel_request().send().promise.await.unwrap();
    put(&ns, "grape", b"green").await;
    // The watcher was released by the server after cancel: the channel closes, no event.
    let after = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
    assert!(matches!(after, Ok(None)), "no call after cancel: {after:?}");

    // Namespace.wait: a long poll answered by a later put.
    let mut wait = ns.wait_request();
    wait.get().set_key("kiwi");
    let waiting = wait.send().promise;
    tokio::time::sleep(Duration::from_millis(50)).await;
    put(&ns, "kiwi", b"brown").await;
    let got = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.get().unwrap().get_value().unwrap(), b"brown");

    // Exceptions carry the server's text.
    let bad = open(&s, "");
    let e = bad
        .put_request()
        .send()
        .promise
        .await
        .err()
        .expect("empty name");
    assert_eq!(e.kind, capnp::ErrorKind::Failed);
    assert!(
        e.to_string()
            .contains("invalid namespace name: it must not be empty"),
        "{e}"
    );

    // Release: caps we drop are freed on the server.
    assert!(server_store.live_objects().namespaces >= 2);
    assert_eq!(server_store.live_objects().readers, 1);
    drop((ns, as_reader, tropical, ro, pretend, subscription, bad));
    wait_until("namespace and reader caps to be released", || {
        let l = server_store.live_objects();
        l.namespaces == 0 && l.readers == 0 && l.subscriptions == 0 && l.watchers == 0
    })
    .await;
    drop(s);
    client.shutdown().await.ok();
    wait_until("the bootstrap to be released", || {
        server_store.live_objects().stores == 0
    })
    .await;
}

/// `Store.namespace("a")`, then `sub("b")`, `sub("c")` on it, pipelined: the Reader of a/b/c
/// before any answer came back.
pub fn chain(s: &store::Client) -> reader::Client {
    let a = open(s, "a");
    let mut b = a.sub_request();
    b.get().set_name("b");
    let b = b.send().pipeline.get_ns();
    let mut c = b.sub_request();
    c.get().set_name("c");
    cast(&c.send().pipeline.get_ns())
}

/// Creates and drops `churn` namespace capabilities (every Release must reach the exports
/// mirror), then holds more until a call fails: how many were held, and the failure.
pub async fn churn_then_hoard(s: &store::Client, churn: usize) -> (usize, capnp::Error) {
    for i in 0..churn {
        let mut req = s.namespace_request();
        req.get().set_name(format!("n{}", i % 20));
        let reply = req.send().promise.await.expect("under max_exports");
        drop(reply.get().unwrap().get_ns().unwrap());
    }
    let mut held = Vec::new();
    loop {
        assert!(held.len() < 10_000, "max_exports never enforced");
        let mut req = s.namespace_request();
        req.get().set_name(format!("h{}", held.len()));
        match req.send().promise.await {
            Ok(r) => held.push(r.get().unwrap().get_ns().unwrap()),
            Err(e) => return (held.len(), e),
        }
    }
}

/// Seeds `a/b/c` with `k`, then times one pipelined chain ending in `Reader.get("k")`.
pub async fn time_pipelined_chain(s: &store::Client) -> Duration {
    // Resolve the bootstrap and seed the key.
    s.namespaces_request().send().promise.await.unwrap();
    let seeded: namespace::Client = cast(&chain(s));
    put(&seeded, "k", b"v").await;
    let start = Instant::now();
    let mut get = chain(s).get_request();
    get.get().set_key("k");
    let reply = get.send().promise.await.unwrap();
    let pipelined = start.elapsed();
    assert_eq!(reply.get().unwrap().get_value().unwrap(), b"v");
    pipelined
}
