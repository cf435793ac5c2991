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

#[test]
fn spawn_gateway_stdio_relays_to_the_upstream_with_the_policy_and_closes_with_stdin() {
    use common::store_scenario::{get, open, put};
    use common::upstream::{TwopartyUpstream, Where};

    let up = TwopartyUpstream::start(capgate::demo::Store::new());
    let Where::Tcp(addr) = up.at.clone() else {
        unreachable!("a TCP upstream")
    };
    let dir = std::env::temp_dir().join(format!("capgate-gw-stdio-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("policy.toml");
    std::fs::write(
        &policy,
        "[[client]]\nname = \"writer\"\nmatch = \"any\"\n\
         allow = [\"Store.namespace\", \"Namespace.put\", \"Reader.*\"]\n",
    )
    .unwrap();
    local(async {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_capgate"));
        cmd.args(["gateway", "--stdio", "--upstream"])
            .arg(format!("tcp://{addr}"))
            .arg("--policy")
            .arg(&policy);
        let (client, mut child) = Client::builder().spawn(cmd).unwrap();
        let s: store::Client = client.bootstrap();
        let ns = open(&s, "through-stdio");
        put(&ns, "k", b"relayed").await;
        let r = cast::<reader::Client>(&ns);
        assert_eq!(get(&r, "k").await.as_deref(), Some(&b"relayed"[..]));
        // The value is in the upstream's store: the gateway relayed the call, it did not
        // answer it.
        assert_eq!(up.store.usage().entries, 1);
        let mut sub = ns.sub_request();
        sub.get().set_name("x");
        let e = sub
            .send()
            .promise
            .await
            .err()
            .expect("Namespace.sub is not in the allowlist");
        assert_eq!(
            e.extra,
            "remote exception: permission denied: Namespace.sub is not allowed for client \"writer\""
        );

        drop((s, ns, r));
        client.shutdown().await.ok();
        let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .expect("the gateway exits once its stdin closes")
            .unwrap();
        assert!(status.success(), "{status}");
    });
    let _ = std::fs::remove_dir_all(dir);
}
