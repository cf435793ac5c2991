use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use capnp::capability::Rc;
use clap::Args;
use tokio::sync::mpsc;

use capgate::demo::{LatencyProxy, Store};
use capgate::store_capnp::{namespace, reader, store, watcher};
use capgate::{Client, Limits, Server};

#[derive(Args)]
pub(crate) struct DemoArgs {
    /// One-way latency injected between client and server for the pipelining comparison.
    #[arg(long, default_value = "2ms", value_parser = capgate::parse_duration)]
    latency: Duration,
}

pub(crate) fn run(args: DemoArgs) -> Result<(), String> {
    super::block_on_local(demo(args.latency))?
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

async fn demo(one_way: Duration) -> Result<(), String> {
    let limits = Limits::default();
    let store = Store::new();
    let factory_store = store.clone();
    let server = Server::builder()
        .listen("127.0.0.1:0".parse().map_err(err)?)
        .workers(NonZeroUsize::new(2).unwrap_or(NonZeroUsize::MIN))
        .limits(limits.clone())
        .policy(demo_policy()?)
        .bootstrap_factory(move |peer| factory_store.client_for_peer(peer))
        .build()
        .map_err(err)?;
    let addr = match server.local_addrs().first() {
        Some(capgate::ListenAddr::Tcp(a)) => *a,
        _ => return Err("the demo server has no TCP address".into()),
    };
    let shutdown = server.shutdown_handle();
    let serving = tokio::task::spawn_local(server.serve());
    let proxy = LatencyProxy::start(addr, one_way).await.map_err(err)?;

    println!("capgate demo");
    println!("  server: tcp://{addr}, 2 worker threads, demo Store service");
    println!(
        "  client: through a latency relay adding {} each way",
        ms(one_way),
    );
    println!();

    let client = Client::connect(proxy.local_addr()).await.map_err(err)?;
    let s: store::Client = client.bootstrap();
    // Resolve the bootstrap capability and seed the data the chain reads.
    s.namespaces_request().send().promise.await.map_err(err)?;
    {
        let mut put = open(&s, &["a", "b", "c"]).put_request();
        put.get().set_key("k");
        put.get().set_value(b"hello, pipelined world");
        put.send().promise.await.map_err(err)?;
    }

    // What one round trip through the relay really costs (timer granularity adds to it).
    let mut samples = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        s.namespaces_request().send().promise.await.map_err(err)?;
        samples.push(start.elapsed());
    }
    samples.sort();
    let rtt = samples[samples.len() / 2];

    println!("1. Promise pipelining: store.namespace(\"a\").sub(\"b\").sub(\"c\").get(\"k\")");
    let start = Instant::now();
    let value = {
        let mut get = capgate::cast::<reader::Client>(&open(&s, &["a", "b", "c"])).get_request();
        get.get().set_key("k");
        let reply = get.send().promise.await.map_err(err)?;
        String::from_utf8_lossy(reply.get().map_err(err)?.get_value().map_err(err)?).into_owned()
    };
    let pipelined = start.elapsed();
    let start = Instant::now();
    {
        let mut req = s.namespace_request();
        req.get().set_name("a");
        let a = req
            .send()
            .promise
            .await
            .map_err(err)?
            .get()
            .map_err(err)?
            .get_ns()
            .map_err(err)?;
        let b = sub(&a, "b").await?;
        let c = sub(&b, "c").await?;
        let mut get = capgate::cast::<reader::Client>(&c).get_request();
        get.get().set_key("k");
        get.send().promise.await.map_err(err)?;
    }
    let awaited = start.elapsed();
    println!("   one call (measured round trip)  : {:>8}", ms(rtt));
    println!(
        "   pipelined, 4 calls sent at once : {:>8}  = {:.1} round trips",
        ms(pipelined),
        pipelined.as_secs_f64() / rtt.as_secs_f64()
    );
    println!(
        "   awaited, one call at a time     : {:>8}  = {:.1} round trips",
        ms(awaited),
        awaited.as_secs_f64() / rtt.as_secs_f64()
    );
    println!(
        "   value {value:?}; pipelining was {:.1}x faster",
        awaited.as_secs_f64() / pipelined.as_secs_f64()
    );
    println!();

    println!("2. Callback: the server calls a Watcher implemented by this client");
    let ns = open(&s, &["a"]);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut watch = ns.watch_request();
    watch
        .get()
        .set_watcher(capnp_rpc::new_client(PrintWatcher(tx)));
    let subscription = watch
        .send()
        .promise
        .await
        .map_err(err)?
        .get()
        .map_err(err)?
        .get_subscription()
        .map_err(err)?;
    let mut put = ns.put_request();
    put.get().set_key("greeting");
    put.get().set_value(b"hi");
    put.send().promise.await.map_err(err)?;
    match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
        Ok(Some(line)) => println!("   Watcher.changed called by the server: {line}"),
        _ => return Err("the watcher was not called within 5 s".into()),
    }
    subscription
        .cancel_request()
        .send()
        .promise
        .await
        .map_err(err)?;
    println!("   subscription cancelled");
    println!();

    println!("3. Remote exception: store.namespace(\"\")");
    let mut bad = s.namespace_request();
    bad.get().set_name("");
    match bad.send().promise.await {
        Ok(_) => return Err("an empty namespace name was accepted".into()),
        Err(e) => println!("   error ({:?}): {}", e.kind, e.extra),
    }
    println!();

    println!(
        "4. Oversized message: put of a 5 MiB value (max_message_bytes = {} MiB), direct connection",
        limits.max_message_bytes >> 20
    );
    let big_client = Client::connect(addr).await.map_err(err)?;
    let big_store: store::Client = big_client.bootstrap();
    let mut put = open(&big_store, &["a"]).put_request();
    put.get().set_key("big");
    put.get().set_value(&vec![7u8; 5 << 20]);
    match put.send().promise.await {
        Ok(_) => return Err("the oversized message was accepted".into()),
        Err(e) => println!("   call failed ({:?}): {}", e.kind, e.extra),
    }
    match tokio::time::timeout(Duration::from_secs(5), big_client.closed()).await {
        Ok(Err(e)) => println!("   connection closed: {}", e.extra),
        Ok(Ok(())) => println!("   connection closed (no reason received)"),
        Err(_) => return Err("the offending connection was not closed".into()),
    }
    let start = Instant::now();
    let fresh = Client::connect(addr).await.map_err(err)?;
    let fresh_store: store::Client = fresh.bootstrap();
    let names = fresh_store
        .namespaces_request()
        .send()
        .promise
        .await
        .map_err(err)?;
    let names: Vec<String> = names
        .get()
        .map_err(err)?
        .get_names()
        .map_err(err)?
        .iter()
        .filter_map(|n| n.ok()?.to_string().ok())
        .collect();
    println!(
        "   a new connection is served at once: namespaces() = {names:?} in {}",
        ms(start.elapsed())
    );
    println!();
    println!("5. Release: capabilities the client drops are freed on the server");
    println!("   live on the server now       : {}", live(&store));
    drop((s, ns, subscription, fresh_store, big_store));
    let _ = client.shutdown().await;
    let _ = fresh.shutdown().await;
    let deadline = Instant::now() + Duration::from_secs(2);
    while store.live_objects() != Default::default() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("   after the clients disconnect : {}", live(&store));
    println!();
    policy_section(addr).await?;
    shutdown.shutdown();
    serving.await.map_err(err)?.map_err(err)?;
    Ok(())
}

/// Two classes: clients from 127.0.0.2 are readers with a small rate; everyone else may call
/// every method with the default quotas.
fn demo_policy() -> Result<capgate::Policy, String> {
    use capgate::{Catalog, ClientClass, Matcher, Quotas};
    let c = Catalog::builtin();
    let mut q = Quotas::default();
    q.calls_per_second = std::num::NonZeroU32::new(5).unwrap_or(std::num::NonZeroU32::MIN);
    q.burst = q.calls_per_second;
    let reader = ClientClass::new(
        "reader",
        Matcher::Source("127.0.0.2/32".parse().map_err(err)?),
    )
    .allow("Store.namespace", c)
    .and_then(|k| k.allow("Reader.*", c))
    .map_err(err)?
    .with_quotas(q);
    Ok(capgate::Policy::from_classes(vec![
        reader,
        ClientClass::new("demo", Matcher::Any).allow_all(),
    ]))
}

/// A client of the restricted class: a call outside its allowlist, then a burst over its rate.
async fn policy_section(addr: std::net::SocketAddr) -> Result<(), String> {
    println!("6. Policy: a client from 127.0.0.2 is in class \"reader\" (Store.namespace, Reader.*; 5 calls/s, burst 5)");
    let sock = tokio::net::TcpSocket::new_v4().map_err(err)?;
    sock.bind("127.0.0.2:0".parse().map_err(err)?)
        .map_err(err)?;
    let (r, w) = sock.connect(addr).await.map_err(err)?.into_split();
    let reader_client = Client::builder().from_stream(r, w);
    let s: store::Client = reader_client.bootstrap();
    let ns = open(&s, &["a"]);
    let mut put = ns.put_request();
    put.get().set_key("k");
    put.get().set_value(b"v");
    match put.send().promise.await {
        Ok(_) => return Err("the reader class was allowed to put".into()),
        Err(e) => println!("   Namespace.put  -> {:?}: {}", e.kind, e.extra),
    }
    // Ten gets at once: the burst of 5 passes (the put and namespace above spent two), the
    // rest are refused at once, not queued.
    let gets: Vec<_> = (0..10)
        .map(|_| {
            let mut get = capgate::cast::<reader::Client>(&ns).get_request();
            get.get().set_key("k");
            get.send().promise
        })
        .collect();
    let (mut ok, mut overloaded, mut text) = (0, 0, String::new());
    for g in gets {
        match g.await {
            Ok(_) => ok += 1,
            Err(e) if e.kind == capnp::ErrorKind::Overloaded => {
                overloaded += 1;
                text = e.extra;
            }
            Err(e) => return Err(format!("unexpected error: {e}")),
        }
    }
    println!("   10 x Reader.get at once -> {ok} answered, {overloaded} Overloaded: {text}");
    let _ = reader_client.shutdown().await;
    Ok(())
}

/// The pipelined chain: every call goes out before any answer comes back.
fn open(s: &store::Client, path: &[&str]) -> namespace::Client {
    let mut req = s.namespace_request();
    req.get().set_name(path[0]);
    let mut ns = req.send().pipeline.get_ns();
    for name in &path[1..] {
        let mut req = ns.sub_request();
        req.get().set_name(*name);
        ns = req.send().pipeline.get_ns();
    }
    ns
}

async fn sub(ns: &namespace::Client, name: &str) -> Result<namespace::Client, String> {
    let mut req = ns.sub_request();
    req.get().set_name(name);
    let reply = req.send().promise.await.map_err(err)?;
    reply.get().map_err(err)?.get_ns().map_err(err)
}

fn live(store: &Store) -> String {
    let l = store.live_objects();
    format!(
        "{} Store, {} Namespace, {} Reader, {} Subscription, {} Watcher",
        l.stores, l.namespaces, l.readers, l.subscriptions, l.watchers
    )
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

struct PrintWatcher(mpsc::UnboundedSender<String>);

impl watcher::Server for PrintWatcher {
    async fn changed(
        self: Rc<Self>,
        params: watcher::ChangedParams,
        _: watcher::ChangedResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let line = format!(
            "key {:?} = {:?} (deleted: {})",
            p.get_key()?.to_str().unwrap_or("<invalid utf-8>"),
            String::from_utf8_lossy(p.get_value()?),
            p.get_deleted()
        );
        let _ = self.0.send(line);
        Ok(())
    }
}
