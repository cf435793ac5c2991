//! Log volume must not follow an attacker's connect rate: `capgate serve` refusing hundreds
//! of connections writes about one line per second for them, with the count of those left
//! out, while a client its policy admits is still served.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{connect_from, reported_addr};

const BIN: &str = env!("CARGO_BIN_EXE_capgate");

#[test]
fn refused_connections_are_logged_in_summary() {
    let dir = std::env::temp_dir().join(format!("capgate-logs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("p.toml");
    // Only 127.0.0.2 matches a class: every connection from 127.0.0.1 is refused.
    std::fs::write(
        &policy,
        "[[client]]\nname = \"two\"\nmatch = { source = \"127.0.0.2/32\" }\nallow = [\"*\"]\n",
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--policy"])
        .arg(&policy)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = reported_addr(&mut child);
    let start = Instant::now();
    let refusals = 300;
    for _ in 0..refusals {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // The refusal (an Abort) arrives, then the close.
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        assert!(!buf.is_empty(), "refused with a reason");
    }
    // A last refusal a second later is logged, with the count of those left out before it.
    std::thread::sleep(Duration::from_millis(1100));
    let mut last = std::net::TcpStream::connect(addr).unwrap();
    last.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = last.read_to_end(&mut Vec::new());
    let seconds = start.elapsed().as_secs();
    // Meanwhile a client the policy admits is answered (its bootstrap is).
    let mut ok = connect_from(addr, "127.0.0.2");
    std::io::Write::write_all(&mut ok, &common::rpc_bootstrap(0)).unwrap();
    ok.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 8];
    ok.read_exact(&mut b).expect("an admitted client is served");
    drop(ok);
    stop(&mut child);
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("connection refused"))
        .collect();
    // One line per second (plus the first), not one per refusal.
    assert!(
        !lines.is_empty() && lines.len() as u64 <= seconds + 2,
        "{} refusal lines in {seconds} s:\n{}",
        lines.len(),
        lines.join("\n")
    );
    // Nothing is lost: the lines and the counts of those left out add up to every refusal.
    let left_out: u64 = lines
        .iter()
        .filter_map(|l| l.split("left_out=").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(
        left_out + lines.len() as u64,
        refusals + 1,
        "{left_out} left out in {} lines",
        lines.len()
    );
}

/// Stops the server with SIGTERM (through `kill`, no unsafe code) and waits, bounded.
fn stop(child: &mut std::process::Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "server exits after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}
