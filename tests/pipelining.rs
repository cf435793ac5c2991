//! Promise pipelining is real: a 4-call chain costs about one round trip, measured through a
//! relay that adds 10 ms each way (RTT >= 20 ms, far above scheduling noise).

mod common;

use std::time::{Duration, Instant};

use capgate::demo::LatencyProxy;
use capgate::store_capnp::{namespace, reader, store};
use capgate::{cast, Client};
use common::store_scenario::time_pipelined_chain;
use common::*;

const ONE_WAY: Duration = Duration::from_millis(10);
const RTT: Duration = Duration::from_millis(20);

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
        let pipelined = time_pipelined_chain(&s).await;

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
