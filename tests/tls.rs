//! TLS and client-certificate identity over real sockets: classes matched by certificate,
//! refusals during the handshake (no certificate, foreign CA, expired), a client that never
//! finishes its handshake, and plaintext sent to a TLS port.

mod common;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use capgate::store_capnp::store;
use capgate::{Catalog, Client, ClientClass, DevCa, Matcher, Policy, Quotas};
use common::*;
use time::Duration as Days;

struct Certs {
    dir: PathBuf,
}

impl Certs {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "capgate-tls-{}-{}",
            std::process::id(),
            std::thread::current()
                .name()
                .unwrap_or("t")
                .replace(':', "_")
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = DevCa::new("test CA").unwrap();
        let foreign = DevCa::new("foreign CA").unwrap();
        let day = Days::days(1);
        let write = |name: &str, (cert, key): (String, String)| {
            std::fs::write(dir.join(format!("{name}.pem")), cert).unwrap();
            std::fs::write(dir.join(format!("{name}.key")), key).unwrap();
        };
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        write(
            "server",
            ca.leaf("localhost", &["localhost", "127.0.0.1"], true, -day, day)
                .unwrap(),
        );
        write(
            "reader",
            ca.leaf("reader", &["reader.example"], false, -day, day)
                .unwrap(),
        );
        write(
            "admin",
            ca.leaf("admin", &["admin.example"], false, -day, day)
                .unwrap(),
        );
        write(
            "expired",
            ca.leaf("admin", &["admin.example"], false, -day * 3, -day)
                .unwrap(),
        );
        write(
            "foreign",
            foreign
                .leaf("admin", &["admin.example"], false, -day, day)
                .unwrap(),
        );
        Self { dir }
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.join(f)
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn policy() -> Policy {
    let c = Catalog::builtin();
    Policy::from_classes(vec![
        ClientClass::new("reader", Matcher::CertCn("reader".into()))
            .allow("Store.namespace", c)
            .unwrap()
            .allow("Reader.*", c)
            .unwrap(),
        ClientClass::new("admin", Matcher::CertSan("admin.example".into()))
            .allow_all()
            .with_quotas(Quotas::default()),
    ])
}

fn start(certs: &Certs, limits: capgate::Limits) -> TestServer {
    let config = capgate::tls::server_config(
        &certs.path("server.pem"),
        &certs.path("server.key"),
        Some(&certs.path("ca.pem")),
        true,
    )
    .unwrap();
    TestServer::start_custom(limits, None, Some(policy()), |b| b.tls(config))
}

async fn tls_client(
    certs: &Certs,
    addr: std::net::SocketAddr,
    who: Option<&str>,
) -> Result<Client, capgate::Error> {
    let (cert, key);
    let identity = match who {
        Some(w) => {
            cert = certs.path(&format!("{w}.pem"));
            key = certs.path(&format!("{w}.key"));
            Some((cert.as_path(), key.as_path()))
        }
        None => None,
    };
    let config = capgate::tls::client_config(&certs.path("ca.pem"), identity)?;
    Client::builder()
        .tls(config, "localhost")?
        .connect(addr)
        .await
}

async fn put(c: &Client) -> Result<(), capnp::Error> {
    let s: store::Client = c.bootstrap();
    let mut req = s.namespace_request();
    req.get().set_name("tls");
    let mut p = req.send().pipeline.get_ns().put_request();
    p.get().set_key("k");
    p.get().set_value(b"v");
    p.send().promise.await.map(|_| ())
}

/// The connection did not get served: the handshake or the first call failed.
async fn refused(certs: &Certs, addr: std::net::SocketAddr, who: Option<&str>) -> String {
    match tls_client(certs, addr, who).await {
        Err(e) => e.to_string(),
        Ok(c) => {
            let s: store::Client = c.bootstrap();
            match s.namespaces_request().send().promise.await {
                Ok(_) => panic!("{who:?} was served"),
                Err(e) => e.to_string(),
            }
        }
    }
}

#[test]
fn client_certificates_select_the_class() {
    let certs = Certs::new();
    let server = start(&certs, quick_limits());
    local(async {
        let reader = tls_client(&certs, server.tcp, Some("reader"))
            .await
            .unwrap();
        let e = put(&reader).await.expect_err("reader may not put");
        assert!(
            e.extra
                .contains("permission denied: Namespace.put is not allowed for client \"reader\""),
            "{e}"
        );
        let admin = tls_client(&certs, server.tcp, Some("admin")).await.unwrap();
        put(&admin).await.expect("admin may put");
    });
    server.stop().unwrap();
}

#[test]
fn no_certificate_foreign_ca_and_expired_certificates_are_refused() {
    let certs = Certs::new();
    let server = start(&certs, quick_limits());
    local(async {
        for (who, alert) in [
            (None, "CertificateRequired"),
            (Some("foreign"), "UnknownCA"),
            (Some("expired"), "CertificateExpired"),
        ] {
            let why = refused(&certs, server.tcp, who).await;
            assert!(
                why.contains(&format!("received fatal alert: {alert}")),
                "{who:?}: {why}"
            );
        }
        // Others are served meanwhile.
        let admin = tls_client(&certs, server.tcp, Some("admin")).await.unwrap();
        put(&admin).await.unwrap();
    });
    server.stop().unwrap();
}

#[test]
fn a_client_that_never_finishes_its_handshake_is_closed_at_the_timeout() {
    let certs = Certs::new();
    let mut limits = quick_limits();
    limits.tls_handshake_timeout = Duration::from_millis(300);
    let server = start(&certs, limits);
    let mut slow = std::net::TcpStream::connect(server.tcp).unwrap();
    let started = Instant::now();
    // Meanwhile a real client is served.
    local(async {
        let admin = tls_client(&certs, server.tcp, Some("admin")).await.unwrap();
        put(&admin).await.unwrap();
    });
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 64];
    let r = slow.read(&mut b);
    assert!(matches!(r, Ok(0)) || r.is_err(), "closed: {r:?}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "closed after {waited:?}"
    );
    server.stop().unwrap();
}

#[test]
fn plaintext_to_a_tls_port_gets_a_clean_close() {
    let certs = Certs::new();
    let server = start(&certs, quick_limits());
    let mut s = std::net::TcpStream::connect(server.tcp).unwrap();
    s.write_all(&rpc_bootstrap(0)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let r = s.read_to_end(&mut buf);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "closed promptly, no hang"
    );
    assert!(
        r.is_ok() || matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{r:?}"
    );
    // At most a TLS alert record (content type 21), never an rpc answer.
    assert!(buf.is_empty() || buf[0] == 21, "{buf:?}");
    server.stop().unwrap();
}

#[test]
fn the_bootstrap_factory_sees_the_certificate_identity() {
    use std::sync::{Arc, Mutex};
    let certs = Certs::new();
    let seen: Arc<Mutex<Vec<capgate::PeerInfo>>> = Arc::default();
    let record = seen.clone();
    let data = capgate::demo::Store::new();
    let config = capgate::tls::server_config(
        &certs.path("server.pem"),
        &certs.path("server.key"),
        Some(&certs.path("ca.pem")),
        true,
    )
    .unwrap();
    let server = capgate::Server::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .tls(config)
        .policy(policy())
        .bootstrap_factory(move |peer: &capgate::PeerInfo| {
            record.lock().unwrap().push(peer.clone());
            data.client()
        })
        .build()
        .unwrap();
    let capgate::ListenAddr::Tcp(addr) = server.local_addrs()[0].clone() else {
        unreachable!()
    };
    let stop = server.shutdown_handle();
    let t = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(server.serve())
    });
    local(async {
        let c = tls_client(&certs, addr, Some("reader")).await.unwrap();
        let s: store::Client = c.bootstrap();
        // The reader class may not list namespaces; the call only has to reach the server.
        let e = s
            .namespaces_request()
            .send()
            .promise
            .await
            .err()
            .expect("denied");
        assert!(e.extra.contains("permission denied"), "{e}");
    });
    stop.shutdown();
    t.join().unwrap().unwrap();
    let seen = seen.lock().unwrap();
    let id = seen[0]
        .tls
        .as_ref()
        .expect("a verified certificate identity");
    assert_eq!(id.common_names, ["reader"]);
    assert_eq!(id.subject_alt_names, ["reader.example"]);
    assert_eq!(id.spki_sha256.len(), 64);
    let shown = seen[0].to_string();
    assert!(shown.ends_with("(cn=reader)"), "{shown}");
}
