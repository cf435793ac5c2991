//! The background task against the fake store, on tokio's paused clock: leases shared by
//! several servers, admissions across the fleet, expiry, outages, slow and garbage replies.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::super::memory::{FakeBackend, FakeStore};
use super::super::{Admission, Fallback, Fleet, QuotaKey, RedisStoreConfig, StoreMetrics};
use super::{Driver, MAX_BACKOFF};
use crate::{ClientKey, RateLimit};

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap()
}

fn config(fleet_size: u32) -> RedisStoreConfig {
    let mut c = RedisStoreConfig::new("redis://127.0.0.1:1").unwrap();
    c.fleet_size = nz(fleet_size);
    c.heartbeat_interval = Duration::from_millis(100);
    c
}

/// One server of the fleet: its shared side, and a stop for its task (dropped: the task is
/// aborted, as if the server crashed).
struct Node {
    fleet: Arc<Fleet>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Driver<FakeBackend>>,
}

fn node(store: &Arc<FakeStore>, id: &str, config: &RedisStoreConfig) -> Node {
    let (fleet, rx) = Fleet::new(config, StoreMetrics::default());
    let backend = store.backend(id, config.expiry());
    let mut driver = Driver::new(fleet.clone(), backend, rx, config);
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(async move {
        driver.run(stopped).await;
        driver
    });
    Node { fleet, stop, task }
}

async fn until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn client() -> ClientKey {
    ClientKey::Ip("192.0.2.1".parse().unwrap())
}

#[tokio::test(start_paused = true)]
async fn three_servers_share_one_budget_within_the_bound() {
    let store = FakeStore::new();
    store.set_latency(Duration::from_micros(400));
    let c = config(3);
    let nodes: Vec<Node> = (0..3).map(|i| node(&store, &format!("s{i}"), &c)).collect();
    for n in &nodes {
        until("store up", Duration::from_secs(1), || n.fleet.is_up()).await;
    }
    let key = QuotaKey::client("c", client());
    let rates: Vec<_> = nodes
        .iter()
        .map(|n| n.fleet.rate(&key, nz(50), nz(10)))
        .collect();
    // A call every millisecond, round robin, for 10 s.
    let start = Instant::now();
    let mut allowed = 0;
    for i in 0..10_000u32 {
        tokio::time::sleep_until(start + Duration::from_millis(u64::from(i))).await;
        allowed += u32::from(rates[i as usize % 3].try_call());
    }
    // burst + rate x 10 s = 510; the bound adds 3 leases of 3.
    assert!((485..=519).contains(&allowed), "{allowed} allowed");
    let leases = nodes
        .iter()
        .map(|n| n.fleet.metrics.leases.get())
        .sum::<u64>();
    assert!(leases > 100, "{leases} leases");
    // Redis commands per call: a lease per top-up (about L/2 = 1-3 calls), plus refusals.
    let rounds = store.rounds();
    assert!(rounds < 2000, "{rounds} rounds for {allowed} calls");
}

#[tokio::test(start_paused = true)]
async fn connections_are_counted_across_the_fleet_and_given_back() {
    let store = FakeStore::new();
    let c = config(2);
    let (a, b) = (node(&store, "a", &c), node(&store, "b", &c));
    until("up", Duration::from_secs(1), || {
        a.fleet.is_up() && b.fleet.is_up()
    })
    .await;
    let key = QuotaKey::client("c", client());
    let mut held = Vec::new();
    for (i, f) in [&a.fleet, &b.fleet, &a.fleet].into_iter().enumerate() {
        match f.admit(f.conns(&key), 3, "x").await {
            Admission::Admitted(s) => held.push(s),
            Admission::Refused(r) => panic!("connection {i} refused: {r}"),
        }
    }
    match b.fleet.admit(b.fleet.conns(&key), 3, "client x").await {
        Admission::Refused(r) => assert!(
            r.contains("client x already has 3 connections across the fleet (max_connections = 3)"),
            "{r}"
        ),
        Admission::Admitted(_) => panic!("a fourth connection across the fleet"),
    }
    assert_eq!(store.live_count(&key.store_key()), 3);
    held.pop();
    until("count given back", Duration::from_secs(1), || {
        store.live_count(&key.store_key()) == 2
    })
    .await;
    assert!(matches!(
        b.fleet.admit(b.fleet.conns(&key), 3, "x").await,
        Admission::Admitted(_)
    ));
}

#[tokio::test(start_paused = true)]
async fn a_crashed_servers_connections_stop_counting_after_three_heartbeats() {
    let store = FakeStore::new();
    let c = config(2);
    let (a, b) = (node(&store, "a", &c), node(&store, "b", &c));
    until("up", Duration::from_secs(1), || {
        a.fleet.is_up() && b.fleet.is_up()
    })
    .await;
    let key = QuotaKey::client("c", client());
    let mut held = Vec::new();
    for _ in 0..2 {
        match a.fleet.admit(a.fleet.conns(&key), 2, "x").await {
            Admission::Admitted(s) => held.push(s),
            Admission::Refused(r) => panic!("{r}"),
        }
    }
    // Server a dies without a word: its task stops, its entries stay.
    a.task.abort();
    let died = Instant::now();
    std::mem::forget(held);
    assert!(matches!(
        b.fleet.admit(b.fleet.conns(&key), 2, "x").await,
        Admission::Refused(_)
    ));
    loop {
        if let Admission::Admitted(_) = b.fleet.admit(b.fleet.conns(&key), 2, "x").await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(died.elapsed() < Duration::from_secs(2), "still counted");
    }
    let after = died.elapsed();
    assert!(
        after > c.expiry() - c.heartbeat_interval
            && after <= c.expiry() + Duration::from_millis(50),
        "stopped counting after {after:?} (expiry {:?})",
        c.expiry()
    );
}

#[tokio::test(start_paused = true)]
async fn a_store_down_at_start_falls_back_reconnects_with_backoff_and_sharing_resumes() {
    let store = FakeStore::new();
    store.set_down(true);
    let c = config(2);
    let a = node(&store, "a", &c);
    let key = QuotaKey::client("c", client());
    let rate = a.fleet.rate(&key, nz(1000), nz(100));
    // Down: the fallback share decides (500/s, burst 50), at once.
    let passed = (0..200).filter(|_| rate.try_call()).count();
    assert!(
        (40..=60).contains(&passed),
        "{passed} calls passed on the fallback"
    );
    // Connections: up to max / fleet_size on this server.
    let conns = a.fleet.conns(&key);
    let first = a.fleet.admit(conns.clone(), 4, "x").await;
    let second = a.fleet.admit(conns.clone(), 4, "x").await;
    assert!(matches!(first, Admission::Admitted(_)) && matches!(second, Admission::Admitted(_)));
    match a.fleet.admit(conns.clone(), 4, "x").await {
        Admission::Refused(r) => assert!(r.contains("local share"), "{r}"),
        Admission::Admitted(_) => panic!("beyond the local share"),
    }
    // Ten seconds down: attempts back off (50 ms doubling to 2 s), not a retry per call.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let attempts = store.connects();
    assert!((6..=12).contains(&attempts), "{attempts} attempts in 10 s");
    assert_eq!(a.fleet.metrics.errors("unreachable"), attempts);
    assert_eq!(a.fleet.metrics.up.get(), 0);
    // Back: sharing resumes within one backoff, and the connections admitted meanwhile are
    // written to the store.
    store.set_down(false);
    until("up again", MAX_BACKOFF + Duration::from_millis(100), || {
        a.fleet.is_up()
    })
    .await;
    assert_eq!(a.fleet.metrics.up.get(), 1);
    until("counts rewritten", Duration::from_secs(1), || {
        store.live_count(&key.store_key()) == 2
    })
    .await;
    drop((first, second));
}

#[tokio::test(start_paused = true)]
async fn a_slow_store_never_holds_a_call_and_admission_waits_at_most_its_timeout() {
    let store = FakeStore::new();
    let c = config(1);
    let a = node(&store, "a", &c);
    until("up", Duration::from_secs(1), || a.fleet.is_up()).await;
    store.set_latency(Duration::from_millis(300));
    let key = QuotaKey::client("c", client());
    let started = Instant::now();
    let admitted = a.fleet.admit(a.fleet.conns(&key), 4, "x").await;
    assert!(
        matches!(admitted, Admission::Admitted(_)),
        "the fallback admits"
    );
    assert_eq!(started.elapsed(), c.admission_timeout);
    assert_eq!(a.fleet.metrics.admission_timeouts.get(), 1);
    // Calls are synchronous: the lease comes 300 ms later and calls go on meanwhile.
    let rate = a.fleet.rate(&key, nz(10_000), nz(1000));
    assert!(!rate.try_call(), "nothing leased yet");
    until("leased", Duration::from_secs(2), || rate.try_call()).await;
    // The store counted the connection the fallback admitted.
    until("counted", Duration::from_secs(2), || {
        store.live_count(&key.store_key()) == 1
    })
    .await;
    drop(admitted);
}

#[tokio::test(start_paused = true)]
async fn garbage_replies_are_errors_and_the_fallback_decides() {
    let store = FakeStore::new();
    let mut c = config(2);
    c.fallback = Fallback::Deny;
    let a = node(&store, "a", &c);
    until("up", Duration::from_secs(1), || a.fleet.is_up()).await;
    store.set_garbage(true);
    until("down on a bad heartbeat", Duration::from_secs(1), || {
        !a.fleet.is_up()
    })
    .await;
    assert!(a.fleet.metrics.errors("reply") >= 1);
    let key = QuotaKey::client("c", client());
    match a.fleet.admit(a.fleet.conns(&key), 4, "x").await {
        Admission::Refused(r) => assert!(r.contains("fallback = deny"), "{r}"),
        Admission::Admitted(_) => panic!("deny admits nothing while the store is bad"),
    }
    let rate = a.fleet.rate(&key, nz(1000), nz(100));
    assert!(!rate.try_call(), "deny: no tokens, no calls");
    store.set_garbage(false);
    until("up again", MAX_BACKOFF * 2, || a.fleet.is_up()).await;
    until("calls pass again", Duration::from_secs(1), || {
        rate.try_call()
    })
    .await;
    let _ = a.stop.send(true);
    let _ = a.task.await;
}

#[tokio::test(start_paused = true)]
async fn a_clean_stop_removes_the_servers_entries_at_once() {
    let store = FakeStore::new();
    let c = config(1);
    let a = node(&store, "a", &c);
    until("up", Duration::from_secs(1), || a.fleet.is_up()).await;
    let key = QuotaKey::client("c", client());
    let slot = a.fleet.admit(a.fleet.conns(&key), 4, "x").await;
    assert_eq!(store.live_count(&key.store_key()), 1);
    let _ = a.stop.send(true);
    let _ = a.task.await;
    assert_eq!(store.live_count(&key.store_key()), 0);
    drop(slot);
}
