//! Reply parsing, and the scripts against a real `redis-server`.

use super::*;

fn lease() -> Op {
    Op::Lease {
        key: "k".into(),
        per_second: 1,
        burst: 1,
        n: 1,
    }
}

#[test]
fn garbage_replies_are_errors_not_panics() {
    let cases = [
        vec![],
        vec![Value::Nil],
        vec![Value::Int(-1)],
        vec![Value::Array(vec![Value::Int(1)])],
        vec![Value::Array(vec![
            Value::Int(1),
            Value::BulkString(b"x".to_vec()),
        ])],
        vec![Value::Array(vec![Value::Int(i64::MAX), Value::Int(0)])],
        vec![Value::Array(vec![Value::Int(1), Value::Int(-5)])],
        vec![Value::Double(1.0)],
        vec![Value::Array(vec![Value::Int(1), Value::Int(0)]), Value::Nil],
    ];
    for c in &cases {
        assert!(parse(&lease(), c).is_err(), "{c:?}");
        assert!(parse(&Op::Heartbeat, c).is_err(), "{c:?}");
        assert!(
            parse(
                &Op::Conns {
                    key: "k".into(),
                    mine: 0,
                    admit: 1,
                    max: 1
                },
                c
            )
            .is_err(),
            "{c:?}"
        );
    }
    assert!(parse(&Op::Heartbeat, &[Value::Int(2)]).is_err());
    assert!(parse(&Op::Leave, &[Value::Okay]).is_err());
    assert_eq!(
        parse(
            &lease(),
            &[Value::Array(vec![Value::Int(3), Value::Int(0)])]
        )
        .unwrap(),
        Reply::Lease(Grant {
            granted: 3,
            wait: Duration::ZERO
        })
    );
    assert_eq!(
        parse(&Op::Heartbeat, &[Value::Int(1)]).unwrap(),
        Reply::Alive(true)
    );
}

/// A `redis-server` on a free loopback port, without persistence; killed when dropped.
/// (Debian's `redis-server` must be on PATH: CI installs it.)
struct TestRedis {
    port: u16,
    child: std::process::Child,
}

impl TestRedis {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
            .arg("--dir")
            .arg(std::env::temp_dir())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run redis-server ({e}): this test needs Debian's redis-server on \
                     PATH (apt-get install redis-server; .ci/run installs it)"
                )
            });
        let r = Self { port, child };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        r
    }

    fn config(&self) -> RedisStoreConfig {
        RedisStoreConfig::new(&format!("redis://127.0.0.1:{}", self.port)).unwrap()
    }

    fn set(&self, key: &str, value: &str) {
        let mut c = ::redis::Client::open(format!("redis://127.0.0.1:{}", self.port))
            .unwrap()
            .get_connection()
            .unwrap();
        let _: () = ::redis::cmd("SET")
            .arg(key)
            .arg(value)
            .query(&mut c)
            .unwrap();
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lease_of(key: &str, n: u32) -> Op {
    Op::Lease {
        key: key.into(),
        per_second: 50,
        burst: 10,
        n,
    }
}

#[tokio::test]
async fn the_scripts_do_what_the_model_does_on_a_real_redis() {
    use super::super::lease::Gcra;
    let redis = TestRedis::start();
    let config = redis.config();
    let mut a = RedisBackend::new(&config, "a", Counter::default());
    let mut b = RedisBackend::new(&config, "b", Counter::default());
    a.connect().await.unwrap();
    b.connect().await.unwrap();

    // GCRA, 50/s with a burst of 10: the same grants as the Rust model, in one pipeline
    // (microseconds apart).
    let ops: Vec<Op> = (0..4).map(|_| lease_of("c/ip:192.0.2.1", 4)).collect();
    let replies = a.round(&ops).await.unwrap();
    let mut model = Gcra::default();
    for r in replies {
        let Ok(Reply::Lease(g)) = r else {
            panic!("{r:?}")
        };
        let m = model.lease(0.0, 50, 10, 4);
        assert_eq!(g.granted, m.granted);
        // The model's wait is exact; Redis's clock moved on a few microseconds.
        assert!(
            m.wait.saturating_sub(g.wait) < Duration::from_millis(5),
            "{g:?} vs {m:?}"
        );
    }

    // Connection counts: a heartbeat makes each server live (and says it was not before).
    for s in [&mut a, &mut b] {
        let r = s.round(&[Op::Heartbeat]).await.unwrap();
        assert!(matches!(r[0], Ok(Reply::Alive(false))), "{r:?}");
    }
    let conns = |mine, admit| Op::Conns {
        key: "c/ip:192.0.2.1".into(),
        mine,
        admit,
        max: 3,
    };
    let r = a.round(&[conns(0, 2)]).await.unwrap();
    assert!(
        matches!(
            r[0],
            Ok(Reply::Conns {
                accepted: 2,
                others: 0
            })
        ),
        "{r:?}"
    );
    let r = b.round(&[conns(0, 2)]).await.unwrap();
    assert!(
        matches!(
            r[0],
            Ok(Reply::Conns {
                accepted: 1,
                others: 2
            })
        ),
        "{r:?}"
    );
    // Counts are absolute: a sets its count to 1 (a connection closed), b finds room again.
    a.round(&[conns(1, 0)]).await.unwrap();
    let r = b.round(&[conns(1, 1)]).await.unwrap();
    assert!(
        matches!(
            r[0],
            Ok(Reply::Conns {
                accepted: 1,
                others: 1
            })
        ),
        "{r:?}"
    );
    // A rewrite replaces all of a's entries; leaving removes them.
    a.round(&[Op::Resync(vec![("c/ip:192.0.2.1".into(), 0)])])
        .await
        .unwrap();
    let r = b.round(&[conns(2, 1)]).await.unwrap();
    assert!(
        matches!(
            r[0],
            Ok(Reply::Conns {
                accepted: 1,
                others: 0
            })
        ),
        "{r:?}"
    );
    let r = a.round(&[Op::Heartbeat, Op::Leave]).await.unwrap();
    assert!(matches!(r[0], Ok(Reply::Alive(true))), "{r:?}");

    // Garbage where capgate's keys are: a budget's state that is not a number counts as a
    // full budget; a key of the wrong type is an error reply, not a panic.
    redis.set("capgate:rate:x", "not a number");
    let r = a.round(&[lease_of("x", 4)]).await.unwrap();
    assert!(
        matches!(r[0], Ok(Reply::Lease(Grant { granted: 4, .. }))),
        "{r:?}"
    );
    redis.set("capgate:servers", "not a sorted set");
    let r = a
        .round(&[Op::Heartbeat, conns(0, 1), lease_of("y", 1)])
        .await
        .unwrap();
    assert!(r[0].is_err() && r[1].is_err(), "{r:?}");
    assert!(
        matches!(r[2], Ok(Reply::Lease(_))),
        "the others stand: {r:?}"
    );
}
