//! The stdio transport: a parent spawns `capgate serve --stdio` and talks Cap'n Proto over
//! the child's stdin/stdout; closing stdin ends the child cleanly.

mod common;

use std::process::Command;
use std::time::Duration;

use capgate::store_capnp::{reader, store};
use capgate::{cast, Client};
use common::local;

#[test]
fn spawn_serve_stdio_run_the_store_and_close_stdin() {
    local(async {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_capgate"));
        cmd.args(["serve", "--stdio"]);
        let (client, mut child) = Client::builder().spawn(cmd).unwrap();
        let s: store::Client = client.bootstrap();
        let mut req = s.namespace_request();
        req.get().set_name("stdio");
        let ns = req.send().pipeline.get_ns();
        let mut put = ns.put_request();
        put.get().set_key("k");
        put.get().set_value(b"over a pipe");
        put.send().promise.await.unwrap();
        let mut get = cast::<reader::Client>(&ns).get_request();
        get.get().set_key("k");
        let reply = get.send().promise.await.unwrap();
        assert_eq!(reply.get().unwrap().get_value().unwrap(), b"over a pipe");
        let mut bad = s.namespace_request();
        bad.get().set_name("");
        let e = bad
            .send()
            .promise
            .await
            .err()
            .expect("remote exception over stdio");
        assert!(e.extra.contains("invalid namespace name"), "{e}");

        drop((s, ns));
        client.shutdown().await.ok();
        let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .expect("the child exits once its stdin closes")
            .unwrap();
        assert!(status.success(), "{status}");
    });
}
