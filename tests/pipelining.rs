//! Promise pipelining is real: a 4-call chain costs about one round trip, measured through a
//! relay that adds 10 ms each way (RTT >= 20 ms, far above scheduling noise).

mod common;

use std::time::{Duration, Instant};

use capgate::demo::LatencyProxy;
use capgate::store_capnp::{namespace, reader, store};
use capgate::{cast, Client};
use common::*;

const ONE_WAY: Duration = Duration::from_millis(10);
const RTT: Duration = Duration::from_millis(20);

fn chain(s: &store::Client) -> reader::Client {
    let mut a = s.namespace_request();
    a.get().set_name("a");
    let a = a.send().pipeline.get_ns();
    let mut b = a.sub_request();
    b.get().set_name("b");
    let b = b.send().pipeline.get_ns();
    let mut c = b.sub_request();
    c.get().set_name("c");
    cast(&c.send().pipeline.get_ns())
}

async fn resolved_sub(ns: &namespace::Client, name: &str) -> namespace::Client {
    let mut req = ns.sub_request();
    req.get().set_name(name);
    req.send()
        .promise
        .await
        .unwrap()
        .get()
        .unwrap()
        .get_ns()
        .unwrap()
}

#[test]
fn four_call_chain_costs_one_round_trip_pipelined_and_four_awaited() {
    let server = TestServer::start(quick_limits());
    local(async {
        let proxy = LatencyProxy::start(server.tcp, ONE_WAY).await.unwrap();
        let client = Client::connect(proxy.local_addr()).await.unwrap();
        let s: store::Client = client.bootstrap();
        // Resolve the bootstrap and seed the key.
        s.namespaces_request().send().promise.await.unwrap();
        let seeded: namespace::Client = cast(&chain(&s));
        let mut put = seeded.put_request();
        put.get().set_key("k");
        put.get().set_value(b"v");
        put.send().promise.await.unwrap();

        let start = Instant::now();
        let mut get = chain(&s).get_request();
        get.get().set_key("k");
        let reply = get.send().promise.await.unwrap();
        let pipelined = start.elapsed();
        assert_eq!(reply.get().unwrap().get_value().unwrap(), b"v");

        let start = Instant::now();
        let mut a = s.namespace_request();
        a.get().set_name("a");
        let a = a
            .send()
            .promise
            .await
            .unwrap()
            .get()
            .unwrap()
            .get_ns()
            .unwrap();
        let b = resolved_sub(&a, "b").await;
        let c = resolved_sub(&b, "c").await;
        let mut get = cast::<reader::Client>(&c).get_request();
        get.get().set_key("k");
        let reply = get.send().promise.await.unwrap();
        let awaited = start.elapsed();
        assert_eq!(reply.get().unwrap().get_value().unwrap(), b"v");

        assert!(
            pipelined < 2 * RTT,
            "pipelined chain took {pipelined:?} (RTT {RTT:?})"
        );
        assert!(awaited >= 4 * RTT, "awaited chain took only {awaited:?}");
        println!("pipelined {pipelined:?}, awaited {awaited:?}, RTT {RTT:?}");
    });
    server.stop().unwrap();
}
