//! The bootstrap factory runs per connection and sees who connected.

mod common;

use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};

use capgate::demo::Store;
use capgate::store_capnp::store;
use capgate::{Client, ListenAddr, PeerAddr, PeerInfo, Server};
use common::local;

#[test]
fn bootstrap_factory_sees_tcp_address_and_unix_uid() {
    let dir = std::env::temp_dir().join(format!("capgate-peer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("peer.sock");
    let seen: Arc<Mutex<Vec<(PeerInfo, String)>>> = Arc::default();
    let data = Store::new();
    let record = seen.clone();
    let server = Server::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .listen_unix(&path)
        .bootstrap_factory(move |peer: &PeerInfo| {
            let thread = std::thread::current().name().unwrap_or("?").to_string();
            record.lock().unwrap().push((peer.clone(), thread));
            data.client()
        })
        .build()
        .unwrap();
    let ListenAddr::Tcp(addr) = server.local_addrs()[0].clone() else {
        unreachable!()
    };
    let handle = server.shutdown_handle();
    let thread = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(server.serve())
    });
    let local_addr = local(async {
        let sock = tokio::net::TcpStream::connect(addr).await.unwrap();
        let local_addr = sock.local_addr().unwrap();
        let (r, w) = sock.into_split();
        let c = Client::builder().from_stream(r, w);
        let s: store::Client = c.bootstrap();
        s.namespaces_request().send().promise.await.unwrap();
        let u = Client::connect_unix(&path).await.unwrap();
        let s: store::Client = u.bootstrap();
        s.namespaces_request().send().promise.await.unwrap();
        local_addr
    });
    let my_uid = std::fs::metadata(&dir).unwrap().uid();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].0.addr, PeerAddr::Tcp(local_addr));
    assert!(
        matches!(seen[1].0.addr, PeerAddr::Unix { uid, .. } if uid == my_uid),
        "{seen:?}"
    );
    assert_ne!(seen[0].0.connection_id, seen[1].0.connection_id);
    for (_, thread) in &seen {
        assert!(
            thread.starts_with("capgate-worker-"),
            "factory ran on {thread}"
        );
    }
    handle.shutdown();
    thread.join().unwrap().unwrap();
    let _ = std::fs::remove_dir_all(dir);
}
