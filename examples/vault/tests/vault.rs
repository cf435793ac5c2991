//! The example over real sockets: a schema capgate never saw at build time, a policy naming
//! its interfaces, and the guard enforcing it.

use std::net::SocketAddr;

use capgate::{cast, Client};
use capgate_example_vault::vault_capnp::{box_, vault};

fn start() -> SocketAddr {
    let catalog = capgate_example_vault::catalog();
    let policy = capgate_example_vault::policy(&catalog).expect("policy.toml is valid");
    let server = capgate_example_vault::server("127.0.0.1:0".parse().unwrap(), policy).unwrap();
    let capgate::ListenAddr::Tcp(addr) = server.local_addrs()[0].clone() else {
        unreachable!()
    };
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(server.serve())
    });
    addr
}

fn local<F: std::future::Future>(f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&rt, async {
        tokio::time::timeout(std::time::Duration::from_secs(60), f)
            .await
            .expect("within 60 s")
    })
}

async fn connect_from(source: &str, addr: SocketAddr) -> Client {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let (r, w) = sock.connect(addr).await.unwrap().into_split();
    Client::builder().from_stream(r, w)
}

#[test]
fn the_policy_names_the_services_own_interfaces() {
    let addr = start();
    local(async {
        // The admin class stores; the reader class fetches it through the inherited method.
        let admin = Client::connect(addr).await.unwrap();
        let v: vault::Client = admin.bootstrap();
        let as_box: box_::Client = cast(&v);
        let mut put = as_box.store_request();
        put.get().set_key("k");
        put.get().set_value(b"v");
        put.send().promise.await.expect("admin may store");

        let reader = connect_from("127.0.0.2", addr).await;
        let v: vault::Client = reader.bootstrap();
        let as_box: box_::Client = cast(&v);
        let mut fetch = as_box.fetch_request();
        fetch.get().set_key("k");
        let reply = fetch
            .send()
            .promise
            .await
            .expect("Box.fetch covers Vault.fetch");
        assert_eq!(reply.get().unwrap().get_value().unwrap(), b"v");

        // Allowed: a box opened from the vault.
        let mut open = v.open_request();
        open.get().set_name("a");
        let b = open.send().pipeline.get_box();
        let mut fetch = b.fetch_request();
        fetch.get().set_key("nothing");
        assert!(!fetch
            .send()
            .promise
            .await
            .unwrap()
            .get()
            .unwrap()
            .get_found());

        // Denied, with the names of the user's schema.
        let mut store = b.store_request();
        store.get().set_key("k");
        let e = store
            .send()
            .promise
            .await
            .err()
            .expect("reader may not store");
        assert_eq!(
            e.extra,
            "remote exception: permission denied: Box.store is not allowed for client \"reader\""
        );
        // Pipelined on a denied call: denied the same way, naming the first denial.
        let wipe = v.admin_request().send().pipeline.get_admin().wipe_request();
        let e = wipe.send().promise.await.err().expect("denied");
        assert_eq!(
            e.extra,
            "remote exception: permission denied: Vault.admin is not allowed for client \"reader\""
        );
        // The nested interface is named by its scope; the admin may wipe.
        let v: vault::Client = admin.bootstrap();
        let wiped = v
            .admin_request()
            .send()
            .pipeline
            .get_admin()
            .wipe_request()
            .send()
            .promise
            .await
            .expect("admin may wipe");
        assert_eq!(wiped.get().unwrap().get_removed(), 1);
    });
}

#[test]
fn policy_names_are_checked_against_the_users_catalog() {
    let catalog = capgate_example_vault::catalog();
    let e = capgate::Policy::parse(
        "p.toml",
        "[[client]]\nname = \"a\"\nmatch = \"any\"\nallow = [\"Vault.Admin.wype\", \"Vault.Admn.*\"]\n",
        &catalog,
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        e,
        "p.toml:4:10: interface `Vault.Admin` has no method `wype` (did you mean `Vault.Admin.wipe`?)\n\
         p.toml:4:30: unknown interface `Vault.Admn` (did you mean `Vault.Admin`?)"
    );
}
