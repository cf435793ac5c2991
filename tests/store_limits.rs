//! The demo Store's own limits, end to end over TCP: memory linear in namespace depth, the
//! store-wide byte bound.

mod common;

use std::num::NonZeroU32;

use capgate::demo::{
    Store, StoreLimits, StoreUsage, ENTRY_OVERHEAD_BYTES, NAMESPACE_OVERHEAD_BYTES,
};
use capgate::store_capnp::{namespace, store};
use common::*;

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
        // Generous: the store's share is 0.35 MB; the rest is the 700 live capabilities.
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
                 4096 bytes (keys, values and namespace names); delete keys or raise \
                 StoreLimits::max_bytes",
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
