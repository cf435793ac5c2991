//! The accept loop survives running out of file descriptors (EMFILE): it logs, backs off and
//! serves again once descriptors are free. The server runs as a child process whose
//! descriptor limit is lowered with `prlimit`.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use capgate::store_capnp::store;
use common::{local, reported_addr};

#[test]
fn accept_loop_survives_emfile_and_serves_again() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_capgate"))
        .args(["serve", "--listen", "127.0.0.1:0", "--workers", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = reported_addr(&mut child);
    let limited = Command::new("prlimit")
        .arg(format!("--pid={}", child.id()))
        .arg("--nofile=48:48")
        .status()
        .unwrap();
    assert!(limited.success(), "prlimit failed");

    // Far more connections than the child has descriptors for.
    let held: Vec<_> = (0..120)
        .filter_map(|_| std::net::TcpStream::connect(addr).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the server is still running"
    );
    let mut stderr = child.stderr.take().unwrap();
    drop(held);

    // Once descriptors are free again, new connections are served.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let served = local(async {
            let Ok(c) = capgate::Client::connect(addr).await else {
                return false;
            };
            let s: store::Client = c.bootstrap();
            tokio::time::timeout(
                Duration::from_secs(2),
                s.namespaces_request().send().promise,
            )
            .await
            .is_ok_and(|r| r.is_ok())
        });
        if served {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not served again after descriptors were freed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    let mut log = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut log).unwrap();
    assert!(
        log.contains("accept failed; retrying"),
        "EMFILE was hit and logged: {log}"
    );
    assert!(log.contains("Too many open files"), "{log}");
    assert!(status.success(), "{status}");
}
