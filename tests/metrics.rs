//! The Prometheus endpoint after a scripted scenario: exact counter values.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use capgate::store_capnp::{reader, store};
use capgate::{cast, Catalog, Client, ClientClass, Matcher, Policy};
use common::*;

fn scrape(addr: std::net::SocketAddr) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    out
}

fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

#[test]
fn metrics_count_connections_calls_denials_and_frame_aborts() {
    let c = Catalog::builtin();
    let policy = Policy::from_classes(vec![ClientClass::new("reader", Matcher::Any)
        .allow("Store.namespace", c)
        .unwrap()
        .allow("Reader.*", c)
        .unwrap()]);
    let server = TestServer::start_custom(quick_limits(), None, Some(policy), |b| {
        b.metrics("127.0.0.1:0".parse().unwrap())
    });
    let maddr = server.metrics_addr().expect("metrics endpoint");
    local(async {
        let client = Client::connect(server.tcp).await.unwrap();
        let s: store::Client = client.bootstrap();
        let mut n = s.namespace_request();
        n.get().set_name("m");
        let ns = n.send().pipeline.get_ns();
        let mut g = cast::<reader::Client>(&ns).get_request();
        g.get().set_key("k");
        g.send().promise.await.unwrap();
        let mut p = ns.put_request();
        p.get().set_key("k");
        p.send().promise.await.err().expect("denied");

        let text = scrape(maddr);
        assert_eq!(
            value(
                &text,
                r#"capgate_calls_total{class="reader",method="Store.namespace"}"#
            ),
            1.0
        );
        assert_eq!(
            value(
                &text,
                r#"capgate_calls_total{class="reader",method="Reader.get"}"#
            ),
            1.0
        );
        assert_eq!(
            value(
                &text,
                r#"capgate_denials_total{class="reader",reason="permission"}"#
            ),
            1.0
        );
        assert_eq!(value(&text, r#"capgate_connections{class="reader"}"#), 1.0);
        assert_eq!(value(&text, "capgate_inflight_calls"), 0.0);
        assert_eq!(value(&text, "capgate_frame_aborts_total"), 0.0);
        assert_eq!(value(&text, "capgate_tls_handshake_failures_total"), 0.0);
        assert!(value(&text, "capgate_received_bytes_total") > 0.0);
        assert!(value(&text, "capgate_sent_bytes_total") > 0.0);

        // A hostile frame: one frame-limit abort.
        let mut raw = raw_send(server.tcp, &header(0, &[1 << 31]));
        observe(&mut raw, Duration::from_secs(5));
        drop(client);
    });
    std::thread::sleep(Duration::from_millis(200));
    let text = scrape(maddr);
    assert_eq!(value(&text, "capgate_frame_aborts_total"), 1.0);
    assert_eq!(value(&text, r#"capgate_connections{class="reader"}"#), 0.0);
    server.stop().unwrap();
}
