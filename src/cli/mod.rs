//! Command-line interface.

mod demo;
mod gateway;
mod load;
mod policy;
mod serve;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use capgate::{parse_bytes, parse_duration, Limits};

#[derive(Parser)]
#[command(
    name = "capgate",
    version,
    about = "Capability-secured Cap'n Proto RPC"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the demo Store until Ctrl-C / SIGTERM (then shut down gracefully).
    Serve(Box<serve::ServeArgs>),
    /// Put the guard in front of an existing Cap'n Proto server (any language): every
    /// client connection is relayed to its own upstream connection, with the policy, quotas
    /// and limits of `serve`.
    Gateway(Box<gateway::GatewayArgs>),
    /// Run a server and a client in one process and print a short report: pipelining,
    /// a callback, a remote exception, an oversized message refused.
    Demo(demo::DemoArgs),
    /// Load a server: N connections x K calls in flight for a duration; prints throughput
    /// and latency percentiles (p50/p90/p99/p999).
    Load(Box<load::LoadArgs>),
    /// Check, explain or audit a policy file.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Write a throwaway CA, a server certificate for localhost and client certificates
    /// (`reader`, `admin`) into DIR, and print the flags that use them.
    DevCerts {
        /// Output directory (created if missing).
        dir: std::path::PathBuf,
    },
}

/// Connection limits, settable on the command line (defaults: see `capgate::Limits`).
#[derive(Args, Clone, Debug)]
pub(crate) struct LimitArgs {
    /// Largest incoming message, e.g. "4 MiB".
    #[arg(long, value_parser = parse_bytes)]
    max_message_bytes: Option<usize>,
    /// Most segments in one incoming message.
    #[arg(long)]
    max_segments: Option<u32>,
    /// Time for a started message to arrive completely, e.g. "30s".
    #[arg(long, value_parser = parse_duration)]
    frame_timeout: Option<Duration>,
    /// Close connections idle (no traffic, no calls in flight) this long, e.g. "5 min".
    #[arg(long, value_parser = parse_duration)]
    idle_timeout: Option<Duration>,
    /// Most bytes queued for a peer that does not read, e.g. "16 MiB".
    #[arg(long, value_parser = parse_bytes)]
    max_outgoing_bytes: Option<usize>,
    /// Most bytes queued for all peers together; beyond it the connection holding the most
    /// is cut off, e.g. "512 MiB".
    #[arg(long, value_parser = parse_bytes)]
    max_total_outgoing_bytes: Option<usize>,
    /// Time one write to a peer may stall, e.g. "30s".
    #[arg(long, value_parser = parse_duration)]
    write_timeout: Option<Duration>,
    /// On shutdown, time in-flight calls get to finish, e.g. "10s".
    #[arg(long, value_parser = parse_duration)]
    shutdown_timeout: Option<Duration>,
    /// After each write, poll the socket this long instead of sleeping, e.g. "200us": lower
    /// latency for more CPU (default: off).
    #[arg(long, value_parser = parse_duration)]
    busy_poll: Option<Duration>,
    /// After answering a client's calls, poll its socket this long for its next call
    /// (adaptive: backs off while calls come later than that), e.g. "25us" (the default);
    /// "0s" turns it off.
    #[arg(long, value_parser = parse_duration)]
    call_poll: Option<Duration>,
}

impl LimitArgs {
    pub(crate) fn limits(&self) -> Limits {
        let mut l = Limits::default();
        if let Some(v) = self.max_message_bytes {
            l.max_message_bytes = v;
        }
        if let Some(v) = self.max_segments {
            l.max_segments = v;
        }
        if let Some(v) = self.frame_timeout {
            l.frame_timeout = v;
        }
        if let Some(v) = self.idle_timeout {
            l.idle_timeout = v;
        }
        if let Some(v) = self.max_outgoing_bytes {
            l.max_outgoing_bytes = v;
        }
        if let Some(v) = self.max_total_outgoing_bytes {
            l.max_total_outgoing_bytes = v;
        }
        if let Some(v) = self.write_timeout {
            l.write_timeout = v;
        }
        if let Some(v) = self.shutdown_timeout {
            l.shutdown_timeout = v;
        }
        if let Some(v) = self.busy_poll {
            l.busy_poll = v;
        }
        if let Some(v) = self.call_poll {
            l.call_poll = v;
        }
        l
    }
}

pub(crate) fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,capgate=info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Serve(args) => succeeded(serve::run(*args)),
        Command::Gateway(args) => succeeded(gateway::run(*args)),
        Command::Demo(args) => succeeded(demo::run(args)),
        Command::Load(args) => succeeded(load::run(*args)),
        Command::Policy(cmd) => policy::run(cmd),
        Command::DevCerts { dir } => succeeded(dev_certs(&dir)),
    };
    match result {
        Ok(status) => status,
        Err(e) => {
            eprintln!("capgate: {}", e.message);
            ExitCode::from(e.status)
        }
    }
}

/// Why a command failed, and the exit status that says so (1 unless the command documents
/// others, as `policy audit` does).
pub(crate) struct Failure {
    message: String,
    status: u8,
}

impl Failure {
    pub(crate) fn new(message: String, status: u8) -> Self {
        Self { message, status }
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Self { message, status: 1 }
    }
}

/// A command with no exit status of its own: 0 or 1.
fn succeeded(r: Result<(), String>) -> Result<ExitCode, Failure> {
    r.map(|()| ExitCode::SUCCESS).map_err(Failure::from)
}

/// A single-threaded runtime with a `LocalSet`, as capnp-rpc clients need.
pub(crate) fn block_on_local<F: std::future::Future>(f: F) -> Result<F::Output, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    Ok(tokio::task::LocalSet::new().block_on(&rt, f))
}

fn dev_certs(dir: &std::path::Path) -> Result<(), String> {
    let c = capgate::write_dev_certs(dir, &["reader", "admin"])
        .map_err(|e| format!("writing certificates to {}: {e}", dir.display()))?;
    println!(
        "wrote a throwaway CA, a server certificate and client certificates to {}",
        dir.display()
    );
    println!();
    println!("serve (mTLS, client certificates required):");
    println!(
        "  capgate serve --listen 127.0.0.1:4443 --tls-cert {} --tls-key {} --client-ca {} --require-client-cert --policy POLICY",
        c.server.0.display(),
        c.server.1.display(),
        c.ca.display()
    );
    println!();
    println!("match clients in the policy by certificate:");
    for (name, cert, key) in &c.clients {
        println!(
            "  match = {{ cert_cn = \"{name}\" }}   # client uses {} and {}",
            cert.display(),
            key.display()
        );
    }
    println!();
    println!("Rust client: capgate::tls::client_config(ca, Some((cert, key))) with server name \"localhost\" or \"127.0.0.1\"; CA: {}", c.ca.display());
    Ok(())
}
