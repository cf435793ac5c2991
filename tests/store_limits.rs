//! The demo Store's own limits, end to end over TCP: memory linear in namespace depth, the
//! store-wide byte bound, each client's share, and removing namespaces to give it back.

mod common;

use std::net::SocketAddr;
use std::num::NonZeroU32;

use capgate::demo::{
    Store, StoreLimits, StoreUsage, ENTRY_OVERHEAD_BYTES, NAMESPACE_OVERHEAD_BYTES,
};
use capgate::store_capnp::{namespace, reader, store, watcher};
use capgate::{cast, Client, PeerAddr, PeerInfo};
use capnp::capability::Rc;
use common::*;
use tokio::sync::mpsc;

async fn namespace(s: &store::Client, name: &str) -> Result<namespace::Client, capnp::Error> {
    let mut req = s.namespace_request();
    req.get().set_name(name);
    req.send().promise.await?.get()?.get_ns()
}

async fn sub(ns: &namespace::Client, name: &str) -> Result<namespace::Client, capnp::Error> {
    let mut req = ns.sub_request();
    req.get().set_name(name);
    req.send().promise.await?.get()?.get_ns()
}

async fn put(ns: &namespace::Client, key: &str, value: &[u8]) -> Result<(), capnp::Error> {
    let mut req = ns.put_request();
    req.get().set_key(key);
    req.get().set_value(value);
    req.send().promise.await?;
    Ok(())
}

async fn delete(ns: &namespace::Client, key: &str) -> Result<bool, capnp::Error> {
    let mut req = ns.delete_request();
    req.get().set_key(key);
    Ok(req.send().promise.await?.get()?.get_existed())
}

async fn get(r: &reader::Client, key: &str) -> Result<Option<Vec<u8>>, capnp::Error> {
    let mut req = r.get_request();
    req.get().set_key(key);
    let reply = req.send().promise.await?;
    let r = reply.get()?;
    Ok(r.get_found().then(|| r.get_value().unwrap().to_vec()))
}

async fn remove(s: &store::Client, name: &str) -> Result<bool, capnp::Error> {
    let mut req = s.remove_request();
    req.get().set_name(name);
    Ok(req.send().promise.await?.get()?.get_existed())
}

async fn remove_sub(ns: &namespace::Client, name: &str) -> Result<bool, capnp::Error> {
    let mut req = ns.remove_request();
    req.get().set_name(name);
    Ok(req.send().promise.await?.get()?.get_existed())
}

async fn names(s: &store::Client) -> Vec<String> {
    let reply = s.namespaces_request().send().promise.await.unwrap();
    let names = reply.get().unwrap().get_names().unwrap();
    names
        .iter()
        .map(|n| n.unwrap().to_string().unwrap())
        .collect()
}

struct ChannelWatcher(mpsc::UnboundedSender<String>);

impl watcher::Server for ChannelWatcher {
    async fn changed(
        self: Rc<Self>,
        params: watcher::ChangedParams,
        _: watcher::ChangedResults,
    ) -> Result<(), capnp::Error> {
        let _ = self.0.send(params.get()?.get_key()?.to_string()?);
        Ok(())
    }
}

/// Every method, and a call rate no test here reaches: the store's limits are under test.
fn unthrottled() -> capgate::Policy {
    let mut q = capgate::Quotas::default();
    q.calls_per_second = NonZeroU32::new(1_000_000).unwrap();
    q.burst = NonZeroU32::new(1_000_000).unwrap();
    capgate::Policy::from_classes(vec![capgate::ClientClass::new(
        "everyone",
        capgate::Matcher::Any,
    )
    .allow_all()
    .with_quotas(q)])
}

fn serve(store: &Store) -> TestServer {
    TestServer::start_store(quick_limits(), Some(unthrottled()), store.clone())
}

#[track_caller]
fn removed(r: Result<impl Sized, capnp::Error>) {
    let e = r.err().expect("refused");
    assert_eq!(e.kind, capnp::ErrorKind::Failed, "{e}");
    assert!(
        e.to_string().contains(
            "namespace no longer exists: it was removed (Store.remove or Namespace.remove)"
        ),
        "{e}"
    );
}

#[track_caller]
fn overloaded(r: Result<impl Sized, capnp::Error>, text: &str) {
    let e = r.err().expect("refused");
    assert_eq!(e.kind, capnp::ErrorKind::Overloaded, "{e}");
    assert!(e.to_string().contains(text), "{e}");
}

#[test]
fn memory_is_linear_in_namespace_depth() {
    // The issue's chain: 700 nested `sub()` calls with 256-byte names. Keyed by full path, the
    // store held 700 * 701 / 2 names of 256 bytes (63 MB) and RSS grew by 140 MiB.
    const DEPTH: usize = 700;
    const NAME: usize = 256;
    let store = Store::new();
    let server = serve(&store);
    local(async {
        let (_c, s) = store_client(server.tcp).await;
        let mut ns = namespace(&s, &"r".repeat(NAME)).await.unwrap();
        let mut held = vec![ns.clone()];
        let rss_before = rss_bytes();
        let bytes_before = store.usage().bytes;
        let mut per_hundred = Vec::new();
        for level in 1..=DEPTH {
            ns = sub(&ns, &format!("{level:0>NAME$}")).await.unwrap();
            held.push(ns.clone());
            if level % 100 == 0 {
                per_hundred.push(store.usage().bytes);
            }
        }
        let rss_growth = rss_bytes().saturating_sub(rss_before);
        let grown = store.usage().bytes - bytes_before;

        // Every level costs the same: its name and a record, whatever its depth.
        let per_level = NAME + NAMESPACE_OVERHEAD_BYTES;
        assert_eq!(grown, DEPTH * per_level);
        for w in per_hundred.windows(2) {
            assert_eq!(w[1] - w[0], 100 * per_level, "{per_hundred:?}");
        }
        assert_eq!(store.usage().namespaces, DEPTH + 1);
        let quadratic = NAME * DEPTH * (DEPTH + 1) / 2;
        assert!(grown * 100 < quadratic, "{grown} bytes for the chain");
        // Generous: the store's share is 0.4 MB; the rest is the 700 live capabilities.
        assert!(
            rss_growth < 16 << 20,
            "RSS grew {:.1} MiB for the chain",
            rss_growth as f64 / (1 << 20) as f64
        );

        // The deepest namespace works like any other.
        put(&ns, "k", b"deep").await.unwrap();
        drop(held);
    });
    server.stop().unwrap();
}

#[test]
fn a_put_over_max_bytes_is_overloaded_and_deleting_gives_the_bytes_back() {
    let mut limits = StoreLimits::default();
    limits.max_bytes = 4096;
    let store = Store::with_limits(limits);
    let server = serve(&store);
    local(async {
        let (_c, s) = store_client(server.tcp).await;
        let ns = namespace(&s, "n").await.unwrap();
        let ns_bytes = 1 + NAMESPACE_OVERHEAD_BYTES;
        put(&ns, "a", &[1; 3300]).await.unwrap();
        let a_bytes = 1 + 3300 + ENTRY_OVERHEAD_BYTES;
        assert_eq!(
            store.usage(),
            StoreUsage {
                namespaces: 1,
                entries: 1,
                bytes: ns_bytes + a_bytes
            }
        );

        overloaded(
            put(&ns, "b", &[2; 1000]).await,
            &format!(
                "the store holds {} bytes and this needs {} more, over its max_bytes limit of \
                 4096 bytes (keys, values and namespace names); delete keys or remove \
                 namespaces, or raise StoreLimits::max_bytes",
                ns_bytes + a_bytes,
                1 + 1000 + ENTRY_OVERHEAD_BYTES
            ),
        );
        // Namespaces are charged too.
        overloaded(sub(&ns, &"x".repeat(256)).await, "max_bytes limit of 4096");
        assert_eq!(store.usage().entries, 1);

        // Replacing a value gives the old one's bytes back first.
        put(&ns, "a", &[3; 3500]).await.unwrap();
        assert_eq!(
            store.usage().bytes,
            ns_bytes + 1 + 3500 + ENTRY_OVERHEAD_BYTES
        );
        assert!(delete(&ns, "a").await.unwrap());
        assert_eq!(store.usage().bytes, ns_bytes);
        put(&ns, "b", &[2; 1000]).await.unwrap();
    });
    server.stop().unwrap();
}

/// A client connecting from `source` (any 127.0.0.0/8 address is this host's loopback), and
/// the owner the server charges it as.
async fn connect_from(source: &str, server: SocketAddr) -> (Client, store::Client, String) {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let stream = sock.connect(server).await.unwrap();
    let addr = PeerAddr::Tcp(stream.local_addr().unwrap());
    let (r, w) = stream.into_split();
    let client = Client::builder().from_stream(r, w);
    let s = client.bootstrap();
    (client, s, Store::owner_of(&PeerInfo::new(0, addr)))
}

#[test]
fn one_client_filling_its_share_leaves_the_others_room() {
    let mut limits = StoreLimits::default();
    limits.max_namespaces = 5;
    limits.max_namespaces_per_client = 3;
    limits.max_entries_per_client = 2;
    limits.max_bytes_per_client = 4000;
    let store = Store::with_limits(limits);
    let server = serve(&store);
    local(async {
        let (_ca, a, a_name) = connect_from("127.0.0.1", server.tcp).await;
        let (_cb, b, b_name) = connect_from("127.0.0.2", server.tcp).await;
        assert_ne!(a_name, b_name);

        // A fills its share of namespaces; opening existing ones costs nothing.
        let a1 = namespace(&a, "a1").await.unwrap();
        let a2 = namespace(&a, "a2").await.unwrap();
        sub(&a2, "x").await.unwrap();
        overloaded(
            namespace(&a, "a3").await,
            &format!(
                "client {a_name} holds 3 namespaces, its max_namespaces_per_client limit; \
                 remove some (Store.remove, Namespace.remove) or raise \
                 StoreLimits::max_namespaces_per_client"
            ),
        );
        overloaded(sub(&a1, "y").await, "max_namespaces_per_client");
        namespace(&a, "a1").await.unwrap();
        sub(&a2, "x").await.unwrap();
        assert_eq!(store.client_usage(&a_name).namespaces, 3);

        // B still has room, up to the store-wide limit.
        let b1 = namespace(&b, "b1").await.unwrap();
        sub(&b1, "z").await.unwrap();
        overloaded(
            namespace(&b, "b2").await,
            "the store holds 5 namespaces, its max_namespaces limit",
        );
        assert_eq!(store.client_usage(&b_name).namespaces, 2);

        // Keys are charged to the client that writes them, wherever they are.
        let a_in_b1 = namespace(&a, "b1").await.unwrap();
        put(&a_in_b1, "k1", b"a").await.unwrap();
        put(&a_in_b1, "k2", b"a").await.unwrap();
        overloaded(
            put(&a_in_b1, "k3", b"a").await,
            &format!("client {a_name} holds 2 keys, its max_entries_per_client limit"),
        );
        put(&b1, "k3", b"b").await.unwrap();
        // Replacing B's key would make it A's: over A's share, and B keeps it.
        overloaded(put(&a_in_b1, "k3", b"a").await, "max_entries_per_client");
        assert_eq!(store.client_usage(&a_name).entries, 2);
        assert_eq!(store.client_usage(&b_name).entries, 1);
        // B replacing A's key takes it over: A's share gets it back.
        put(&b1, "k2", b"b").await.unwrap();
        assert_eq!(store.client_usage(&a_name).entries, 1);
        assert_eq!(store.client_usage(&b_name).entries, 2);

        assert!(delete(&b1, "k3").await.unwrap());

        // Bytes: A's share is full long before the store is.
        let held = (2 + 2 + 1) + 3 * NAMESPACE_OVERHEAD_BYTES + (2 + 1) + ENTRY_OVERHEAD_BYTES;
        assert_eq!(store.client_usage(&a_name).bytes, held);
        overloaded(
            put(&a1, "big", &[0u8; 3500]).await,
            &format!(
                "client {a_name} holds {held} bytes and this needs {} more, over its \
                 max_bytes_per_client limit of 4000 bytes",
                3 + 3500 + ENTRY_OVERHEAD_BYTES
            ),
        );
        put(&b1, "big", &[0u8; 3000]).await.unwrap();
        assert!(delete(&b1, "big").await.unwrap());
        assert!(delete(&a_in_b1, "k1").await.unwrap());
        assert_eq!(store.client_usage(&a_name).entries, 0);
    });
    server.stop().unwrap();
}

#[test]
fn removing_a_namespace_removes_all_below_it_and_gives_back_the_charge() {
    let mut limits = StoreLimits::default();
    limits.max_namespaces_per_client = 3;
    let store = Store::with_limits(limits);
    let server = serve(&store);
    local(async {
        let (_ca, a, a_name) = connect_from("127.0.0.1", server.tcp).await;
        let (_cb, b, b_name) = connect_from("127.0.0.2", server.tcp).await;
        let top = namespace(&a, "top").await.unwrap();
        let mid = sub(&top, "mid").await.unwrap();
        let low = sub(&mid, "low").await.unwrap();
        overloaded(namespace(&a, "more").await, "max_namespaces_per_client");
        put(&top, "k", b"1").await.unwrap();
        put(&low, "k", b"3").await.unwrap();
        // B's keys in A's namespaces are B's charge, and go with them.
        let b_mid = sub(&namespace(&b, "top").await.unwrap(), "mid")
            .await
            .unwrap();
        put(&b_mid, "b", b"2").await.unwrap();
        let kept = namespace(&b, "kept").await.unwrap();
        put(&kept, "k", b"kept").await.unwrap();
        let b_before = store.client_usage(&b_name);
        let kept_usage = StoreUsage {
            namespaces: 1,
            entries: 1,
            bytes: 4 + NAMESPACE_OVERHEAD_BYTES + 1 + 4 + ENTRY_OVERHEAD_BYTES,
        };
        assert_eq!(b_before.namespaces, 1);
        assert_eq!(b_before.entries, 2);

        // Live things on the namespaces about to go.
        let reader = mid.read_only_request().send().pipeline.get_reader();
        assert_eq!(get(&reader, "b").await.unwrap(), Some(b"2".to_vec()));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut w = mid.watch_request();
        w.get()
            .set_watcher(capnp_rpc::new_client(ChannelWatcher(tx)));
        let _subscription = w.send().promise.await.unwrap();
        let mut wait = low.wait_request();
        wait.get().set_key("never");
        let waiting = wait.send().promise;
        put(&mid, "seen", b"").await.unwrap();
        assert_eq!(rx.recv().await.as_deref(), Some("seen"));
        assert_eq!(store.live_objects().watchers, 1);

        assert!(remove(&b, "top").await.unwrap());
        assert!(!remove(&b, "top").await.unwrap());
        assert_eq!(names(&a).await, ["kept"]);

        // Everything below went with it: the store and both clients got their charge back.
        assert_eq!(store.usage(), kept_usage);
        assert_eq!(store.client_usage(&a_name), StoreUsage::default());
        assert_eq!(store.client_usage(&b_name), kept_usage);
        // The long poll and the watcher end; calls on the removed namespaces fail clearly
        // rather than bring them back.
        removed(waiting.await);
        assert_eq!(rx.recv().await, None, "the watcher was dropped");
        removed(put(&mid, "k", b"again").await);
        removed(put(&b_mid, "k", b"again").await);
        removed(get(&reader, "b").await);
        removed(get(&cast(&low), "k").await);
        removed(sub(&low, "deeper").await);
        removed(delete(&top, "k").await);
        removed(remove_sub(&top, "mid").await);
        let mut w = low.watch_request();
        let (tx, _rx) = mpsc::unbounded_channel();
        w.get()
            .set_watcher(capnp_rpc::new_client(ChannelWatcher(tx)));
        removed(w.send().promise.await);
        removed(
            mid.read_only_request()
                .send()
                .pipeline
                .get_reader()
                .list_request()
                .send()
                .promise
                .await,
        );
        assert_eq!(store.usage(), kept_usage);

        // A has its share back. A namespace of the same name is a new, empty one; the old
        // capabilities do not reach it.
        let top2 = namespace(&a, "top").await.unwrap();
        let mid2 = sub(&top2, "mid").await.unwrap();
        sub(&mid2, "low").await.unwrap();
        assert_eq!(get(&cast(&top2), "k").await.unwrap(), None);
        removed(get(&cast(&top), "k").await);

        // Namespace.remove: a child and what is below it, not the namespace itself.
        assert!(remove_sub(&top2, "mid").await.unwrap());
        assert!(!remove_sub(&top2, "mid").await.unwrap());
        assert_eq!(store.client_usage(&a_name).namespaces, 1);
        removed(sub(&mid2, "low").await);
        put(&top2, "k", b"still here").await.unwrap();
        assert_eq!(store.usage().namespaces, 2);
    });
    server.stop().unwrap();
}
