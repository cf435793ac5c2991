use std::io::Write;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;

use clap::Args;

use capgate::demo::Store;
use capgate::Server;

use super::LimitArgs;

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// Serve one connection on stdin/stdout (for a parent process that spawned this one);
    /// exits when stdin closes.
    #[arg(long, conflicts_with_all = ["listen", "unix"])]
    stdio: bool,
    /// The bootstrap capability: the demo `Store`, or `Echo` (returns its payload; for
    /// `capgate load --method echo` and benchmarks).
    #[arg(long, value_enum, default_value_t = Service::Store)]
    service: Service,
    #[command(flatten)]
    common: ServerArgs,
}

/// What `serve` and `gateway` share: listeners, TLS, policy, metrics, quota store, limits.
#[derive(Args)]
pub(crate) struct ServerArgs {
    /// TCP address to listen on (repeatable), e.g. 127.0.0.1:4000 or 127.0.0.1:0.
    #[arg(long)]
    listen: Vec<SocketAddr>,
    /// Unix socket path to listen on (repeatable).
    #[arg(long)]
    unix: Vec<PathBuf>,
    /// Worker threads (default: available cores).
    #[arg(long)]
    workers: Option<NonZeroUsize>,
    /// Policy file (client classes, allowlists, quotas). Reloaded on SIGHUP and when the file
    /// changes; a file with errors is rejected and the policy in force kept. Without it every client may call
    /// every method, with the default quotas.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Serve TLS on the TCP listeners with this certificate chain (PEM).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Verify client certificates against this CA (PEM); their identity reaches the policy.
    #[arg(long, requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    /// Refuse TLS clients without a valid certificate from --client-ca.
    #[arg(long, requires = "client_ca")]
    require_client_cert: bool,
    /// Serve Prometheus metrics over HTTP on this address, e.g. 127.0.0.1:9100.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Allow plaintext TCP listeners on non-loopback addresses.
    #[arg(long)]
    insecure_plaintext: bool,
    /// Time a TLS client has to complete its handshake, e.g. "10s".
    #[arg(long, value_parser = capgate::parse_duration)]
    tls_handshake_timeout: Option<std::time::Duration>,
    #[command(flatten)]
    quota: QuotaStoreArgs,
    #[command(flatten)]
    limits: LimitArgs,
}

/// The shared quota store (see the README's "Fleet quotas").
#[derive(Args)]
pub(crate) struct QuotaStoreArgs {
    /// Share each client's rate (calls_per_second, burst) and connection count
    /// (max_connections) with the other servers using the same Redis:
    /// redis://[user:password@]host:port[/db], or rediss://... for TLS. Without it each
    /// server counts its clients alone.
    #[arg(long, value_name = "URL")]
    quota_store: Option<String>,
    /// CA certificate (PEM) that a rediss:// --quota-store is verified against (default: the
    /// system's roots).
    #[arg(long, requires = "quota_store")]
    quota_store_ca: Option<PathBuf>,
    /// While the quota store is unreachable: `local` (each server allows the quotas divided
    /// by --fleet-size) or `deny` (new connections refused, calls Overloaded once the tokens
    /// held are spent).
    #[arg(long, requires = "quota_store", default_value = "local")]
    quota_fallback: capgate::Fallback,
    /// How many servers share the quota store: the fallback share is the quotas divided by
    /// it, and it bounds the lease size (burst / fleet size). Default 1.
    #[arg(long, requires = "quota_store")]
    fleet_size: Option<std::num::NonZeroU32>,
    /// How often this server refreshes its entries in the quota store, e.g. "1s" (the
    /// default); a server that stops refreshing stops counting after 3 of them.
    #[arg(long, requires = "quota_store", value_parser = capgate::parse_duration)]
    quota_heartbeat: Option<std::time::Duration>,
}

impl QuotaStoreArgs {
    /// The store the flags ask for (in-process without --quota-store).
    pub(crate) fn store(&self) -> Result<capgate::QuotaStore, String> {
        let Some(url) = &self.quota_store else {
            return Ok(capgate::QuotaStore::InProcess);
        };
        let mut config = match &self.quota_store_ca {
            Some(ca) => {
                let pem = std::fs::read(ca)
                    .map_err(|e| format!("reading --quota-store-ca {}: {e}", ca.display()))?;
                capgate::RedisStoreConfig::with_tls_ca(url, pem)
            }
            None => capgate::RedisStoreConfig::new(url),
        }
        .map_err(|e| e.to_string())?;
        config.fallback = self.quota_fallback;
        if let Some(n) = self.fleet_size {
            config.fleet_size = n;
        }
        if let Some(h) = self.quota_heartbeat {
            config.heartbeat_interval = h;
        }
        Ok(config.into())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Service {
    /// The demo key/value Store (schema/store.capnp).
    Store,
    /// The Echo service (schema/bench.capnp).
    Echo,
}

pub(crate) fn run(args: ServeArgs) -> Result<(), String> {
    let common = &args.common;
    if common.listen.is_empty() && common.unix.is_empty() && !args.stdio {
        return Err(
            "nothing to listen on: pass --listen ADDR and/or --unix PATH, or --stdio".into(),
        );
    }
    let mut builder = Server::builder();
    builder = match args.service {
        Service::Store => {
            // Each client (source IP, Unix uid or certificate) has its share of the store.
            let store = Store::new();
            builder.bootstrap_factory(move |peer| store.client_for_peer(peer))
        }
        Service::Echo => builder.bootstrap_factory(|_peer| capgate::demo::EchoService.client()),
    };
    let server = common.build(builder, capgate::Catalog::builtin())?;
    if args.stdio {
        return common.serve_stdio(server);
    }
    common.serve(server)
}

impl ServerArgs {
    pub(crate) fn has_listener(&self) -> bool {
        !self.listen.is_empty() || !self.unix.is_empty()
    }

    /// Checks the listeners, then configures `builder` with every shared option and binds.
    /// The policy is checked against `catalog`.
    pub(crate) fn build(
        &self,
        mut builder: capgate::ServerBuilder,
        catalog: &capgate::Catalog,
    ) -> Result<Server, String> {
        if self.tls_cert.is_none() && !self.insecure_plaintext {
            if let Some(a) = self.listen.iter().find(|a| !a.ip().is_loopback()) {
                return Err(format!(
                    "refusing to serve plaintext on {a}: it is not a loopback address, so anyone \
                     on the network could read and alter the traffic. Serve TLS \
                     (--tls-cert/--tls-key, see `capgate dev-certs`) or pass \
                     --insecure-plaintext if the network is trusted"
                ));
            }
        }
        let mut limits = self.limits.limits();
        if let Some(t) = self.tls_handshake_timeout {
            limits.tls_handshake_timeout = t;
        }
        builder = builder
            .limits(limits)
            .quota_store(self.quota.store()?)
            .catalog(catalog.clone());
        for a in &self.listen {
            builder = builder.listen(*a);
        }
        for p in &self.unix {
            builder = builder.listen_unix(p);
        }
        if let Some(n) = self.workers {
            builder = builder.workers(n);
        }
        if let Some(m) = self.metrics {
            builder = builder.metrics(m);
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            let config = capgate::tls::server_config(
                cert,
                key,
                self.client_ca.as_deref(),
                self.require_client_cert,
            )
            .map_err(|e| e.to_string())?;
            builder = builder.tls(config);
        }
        if let Some(path) = &self.policy {
            let policy = capgate::Policy::load(path, catalog).map_err(|e| {
                eprintln!("{e}");
                format!("policy {} rejected: fix the errors above", path.display())
            })?;
            builder = builder.policy(policy);
        }
        builder.build().map_err(|e| e.to_string())
    }

    /// Serves one connection on stdin/stdout until stdin closes or SIGTERM / Ctrl-C,
    /// reloading the policy on SIGHUP and file changes. Logs go to stderr, as always.
    pub(crate) fn serve_stdio(&self, server: Server) -> Result<(), String> {
        let policy_path = self.policy.clone();
        super::block_on_local(async move {
            spawn_controls(policy_path, &server);
            server
                .serve_stream(tokio::io::stdin(), tokio::io::stdout(), "stdio")
                .await;
        })
    }

    /// Prints one `listening on` line per listener, then serves until SIGTERM / Ctrl-C,
    /// reloading the policy on SIGHUP and file changes.
    pub(crate) fn serve(&self, server: Server) -> Result<(), String> {
        {
            let mut out = std::io::stdout().lock();
            for a in server.local_addrs() {
                let _ = writeln!(out, "listening on {a}");
            }
            if let Some(m) = server.metrics_addr() {
                tracing::info!("metrics on http://{m}/metrics");
            }
            let _ = out.flush();
        }
        let policy_path = self.policy.clone();
        super::block_on_local(async move {
            spawn_controls(policy_path, &server);
            server.serve().await
        })?
        .map_err(|e| e.to_string())
    }
}

/// Inside the local set: shuts `server` down on SIGTERM / Ctrl-C, and reloads its policy
/// from `policy_path` on SIGHUP and file changes.
fn spawn_controls(policy_path: Option<PathBuf>, server: &Server) {
    let handle = server.shutdown_handle();
    let policy = server.policy_handle();
    tokio::task::spawn_local(async move {
        wait_for_signal().await;
        tracing::info!("shutting down: no new connections, finishing in-flight calls");
        handle.shutdown();
    });
    if let Some(path) = policy_path {
        tokio::task::spawn_local(reload_on_sighup(path, policy));
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(cause = %e, "cannot watch SIGTERM; only Ctrl-C stops the server");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// How often the policy file's modification time is checked.
const POLICY_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// Reloads the policy on SIGHUP and when the file changes (its modification time or size,
/// polled every second). A file with errors is rejected and logged; the policy in force stays.
async fn reload_on_sighup(path: PathBuf, handle: capgate::PolicyHandle) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(cause = %e, "cannot watch SIGHUP; reloading on file changes only");
            None
        }
    };
    let stamp = |p: &PathBuf| {
        std::fs::metadata(p)
            .ok()
            .map(|m| (m.modified().ok(), m.len()))
    };
    let mut seen = stamp(&path);
    loop {
        let hangup = async {
            match hup.as_mut() {
                Some(h) => h.recv().await.is_some(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            got = hangup => {
                if !got {
                    hup = None;
                    continue;
                }
                tracing::info!(path = %path.display(), "SIGHUP: reloading the policy");
            }
            () = tokio::time::sleep(POLICY_POLL) => {
                let now = stamp(&path);
                if now == seen {
                    continue;
                }
                seen = now;
                tracing::info!(path = %path.display(), "policy file changed: reloading");
            }
        }
        let _ = capgate::reload_policy(&path, &handle);
    }
}
