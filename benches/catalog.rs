//! The guard with a user catalog of realistic size (50 interfaces, 400 methods, a policy of
//! 10 classes naming 40 methods each) against capgate's builtin catalog, side by side in one
//! run: sequential latency and throughput at 128 calls in flight on one connection, and the
//! time to load that catalog from its CodeGeneratorRequest.
//!
//! `cargo bench --bench catalog` (full), `cargo bench --bench catalog -- --test` (smoke).

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::time::Instant;

use capgate::bench_capnp::echo;
use capgate::demo::EchoService;
use capgate::{Catalog, ClientClass, Matcher, Policy, Server};
use capnp::schema_capnp::code_generator_request;
use capnp::traits::HasTypeId;

mod common;
use common::median;

const INTERFACES: u64 = 50;
const METHODS: u32 = 8;

/// A request with the Echo interface (its real id) and 49 others, 8 methods each, every
/// method's params and results an empty struct.
fn user_request() -> Vec<u8> {
    let mut m = capnp::message::Builder::new_default();
    {
        let r = m.init_root::<code_generator_request::Builder>();
        let mut nodes = r.init_nodes(INTERFACES as u32 + 1);
        const EMPTY: u64 = 0x8000_0000_0000_0001;
        let mut s = nodes.reborrow().get(0);
        s.set_id(EMPTY);
        s.set_display_name("app.capnp:Empty");
        s.init_struct();
        for k in 0..INTERFACES {
            let mut n = nodes.reborrow().get(k as u32 + 1);
            let (id, name) = if k == 0 {
                (echo::Client::TYPE_ID, "app.capnp:Echo".to_string())
            } else {
                (0x9000_0000_0000_0000 + k, format!("app.capnp:Service{k}"))
            };
            n.set_id(id);
            n.set_display_name(&name);
            let mut methods = n.init_interface().init_methods(METHODS);
            for j in 0..METHODS {
                let mut meth = methods.reborrow().get(j);
                meth.set_name(&match (k, j) {
                    (0, 0) => "echo".to_string(),
                    (0, 1) => "panic".to_string(),
                    _ => format!("method{j}"),
                });
                meth.set_param_struct_type(EMPTY);
                meth.set_result_struct_type(EMPTY);
            }
        }
    }
    let mut out = Vec::new();
    capnp::serialize::write_message(&mut out, &m).unwrap();
    out
}

fn roomy(name: &str, m: Matcher) -> ClientClass {
    ClientClass::new(name, m).with_quotas(common::roomy_quotas())
}

/// 10 classes of 40 methods each; the benchmark client matches the last, which allows
/// Echo.echo among its 40.
fn policy(catalog: &Catalog, user: bool) -> Policy {
    let mut classes = Vec::new();
    for i in 0..10u64 {
        let m = if i == 9 {
            Matcher::Any
        } else {
            Matcher::Source(format!("10.{i}.0.0/16").parse().unwrap())
        };
        let mut class = roomy(&format!("class{i}"), m)
            .allow("Echo.echo", catalog)
            .unwrap();
        if user {
            for e in 0..39u64 {
                let k = 1 + (i * 39 + e) % (INTERFACES - 1);
                let j = (i + e) % u64::from(METHODS);
                class = class
                    .allow(&format!("Service{k}.method{j}"), catalog)
                    .unwrap();
            }
        } else {
            for e in [
                "Store.namespace",
                "Reader.*",
                "Namespace.put",
                "Namespace.sub",
            ] {
                class = class.allow(e, catalog).unwrap();
            }
        }
        classes.push(class);
    }
    Policy::from_classes(classes)
}

fn start(catalog: Catalog, policy: Policy) -> SocketAddr {
    let server = Server::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .workers(NonZeroUsize::new(1).unwrap())
        .catalog(catalog)
        .policy(policy)
        .bootstrap_factory(|_| EchoService.client())
        .build()
        .unwrap();
    common::serve_on_thread(server)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--test");
    let (rounds, seq, total, loads) = if quick {
        (1, 50, 500, 5)
    } else {
        (9, 2_000, 20_000, 200)
    };
    let request = user_request();
    let mut load_us = Vec::new();
    for _ in 0..loads {
        let t = Instant::now();
        let c = Catalog::from_code_generator_request(&request).unwrap();
        load_us.push(t.elapsed().as_secs_f64() * 1e6);
        assert_eq!(c.interfaces().len(), INTERFACES as usize);
    }
    println!(
        "catalog load ({INTERFACES} interfaces, {} methods, {} bytes): median {:.0} µs",
        INTERFACES * u64::from(METHODS),
        request.len(),
        median(&mut load_us)
    );
    let user = Catalog::from_code_generator_request(&request).unwrap();
    let builtin = Catalog::builtin().clone();
    let servers = [
        ("builtin", start(builtin.clone(), policy(&builtin, false))),
        ("user", start(user.clone(), policy(&user, true))),
    ];
    let (lat, thr) = common::side_by_side(&servers, rounds, seq, total);
    println!("user/builtin: sequential p50 {lat:.2}, throughput {thr:.2}");
}
