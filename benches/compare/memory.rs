//! Memory per connection, measured on child processes that serve one system each.

use super::*;

pub(crate) const CHILD_ENV: &str = "CAPGATE_BENCH_SERVE";

/// In the child: serve `what`, print the address, exit when stdin closes.
pub(crate) fn child_serve(what: &str) {
    let addr = match what {
        "twoparty" => start_twoparty(1, false),
        "capgate" => start_capgate(1, false, None),
        "tarpc" => start_tarpc(1),
        tls => {
            let dir = std::path::PathBuf::from(tls.strip_prefix("capgate-tls:").unwrap());
            let cfg = capgate::tls::server_config(
                &dir.join("server.pem"),
                &dir.join("server.key"),
                None,
                false,
            )
            .unwrap();
            start_capgate(1, false, Some(cfg))
        }
    };
    println!("{addr}");
    let mut s = String::new();
    let _ = std::io::stdin().read_line(&mut s);
}

pub(crate) fn memory_report(b: &Bench) {
    use std::io::BufRead;
    let n = if b.quick { 30 } else { 500 };
    let dir = std::env::temp_dir().join(format!("capgate-bench-compare-{}", std::process::id()));
    let certs = capgate::write_dev_certs(&dir, &[]).unwrap();
    let client_tls = capgate::tls::client_config(&certs.ca, None).unwrap();
    println!("\n== idle memory per connection, server process only ({n} connections, each after one call)");
    let mut rows = Vec::new();
    for what in ["twoparty", "capgate", "tarpc", "capgate-tls"] {
        let arg = if what == "capgate-tls" {
            format!("capgate-tls:{}", dir.display())
        } else {
            what.to_string()
        };
        // CAPGATE_BENCH_CHILD_WRAP runs the child under a tool, e.g. "valgrind --tool=massif".
        let wrap = std::env::var("CAPGATE_BENCH_CHILD_WRAP").unwrap_or_default();
        let mut words = wrap.split_whitespace();
        let mut child = match words.next() {
            Some(tool) => {
                let mut c = std::process::Command::new(tool);
                c.args(words).arg(std::env::current_exe().unwrap());
                c
            }
            None => std::process::Command::new(std::env::current_exe().unwrap()),
        };
        let mut child = child
            .env(CHILD_ENV, arg)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr: SocketAddr = line.trim().parse().unwrap();
        let pid = child.id();
        let per = b.run(async {
            let connect_one = || async {
                match what {
                    "twoparty" => connect(Sys::Twoparty, addr).await,
                    "capgate" => connect(Sys::Capgate, addr).await,
                    "tarpc" => connect(Sys::Tarpc, addr).await,
                    _ => {
                        let c = Client::builder()
                            .tls(client_tls.clone(), "localhost")
                            .unwrap()
                            .connect(addr)
                            .await
                            .unwrap();
                        let e = c.bootstrap();
                        Conn::Capgate(c, e)
                    }
                }
            };
            let payload = Rc::new(vec![1u8; 64]);
            // Warm up: lazily initialised state is not per connection.
            let warm = connect_one().await;
            warm.echo(&payload).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            let before = common::process_rss(pid);
            let mut held = Vec::new();
            for _ in 0..n {
                let c = connect_one().await;
                c.echo(&payload).await;
                held.push(c);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            let per = common::process_rss(pid).saturating_sub(before) as f64 / n as f64;
            drop(held);
            per
        });
        drop(child.stdin.take());
        let _ = child.wait();
        println!("  {what:<12} {:6.1} KiB ({:.0} bytes)", per / 1024.0, per);
        rows.push(per);
    }
    println!(
        "  capgate/twoparty {:.2}  capgate/tarpc {:.2}  capgate plaintext {:.0} bytes (target <= 8192)  TLS adds {:.1} KiB",
        rows[1] / rows[0],
        rows[1] / rows[2],
        rows[1],
        (rows[3] - rows[1]) / 1024.0
    );
    let _ = std::fs::remove_dir_all(dir);
}
