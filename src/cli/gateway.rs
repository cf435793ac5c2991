//! `capgate gateway`: the guard in front of an existing Cap'n Proto server.

use std::path::PathBuf;

use clap::Args;

use super::policy::SchemaArgs;
use super::serve::ServerArgs;

#[derive(Args)]
pub(crate) struct GatewayArgs {
    /// The server to relay to: tcp://HOST:PORT or unix:PATH. Each client connection gets
    /// its own upstream connection.
    #[arg(long, value_name = "ADDR")]
    upstream: String,
    /// Speak TLS to a tcp:// upstream, verifying its certificate against this CA (PEM).
    #[arg(long, value_name = "PEM")]
    upstream_ca: Option<PathBuf>,
    /// The name the upstream's certificate must be valid for (default: the upstream's host).
    #[arg(long, requires = "upstream_ca", value_name = "NAME")]
    upstream_server_name: Option<String>,
    /// Time to connect to the upstream (and complete TLS with it), e.g. "5s" (the default).
    /// A client whose upstream cannot be reached in time gets an Abort naming it.
    #[arg(long, value_parser = capgate::parse_duration, value_name = "TIME")]
    upstream_connect_timeout: Option<std::time::Duration>,
    /// Relay one connection on stdin/stdout (for a parent process that spawned this one);
    /// exits when stdin closes.
    #[arg(long, conflicts_with_all = ["listen", "unix"])]
    stdio: bool,
    #[command(flatten)]
    schema: SchemaArgs,
    #[command(flatten)]
    common: ServerArgs,
}

pub(crate) fn run(args: GatewayArgs) -> Result<(), String> {
    let mut upstream = capgate::Upstream::parse(&args.upstream).map_err(|e| e.to_string())?;
    if let Some(ca) = &args.upstream_ca {
        let name = match &args.upstream_server_name {
            Some(n) => n.clone(),
            None => upstream
                .host()
                .ok_or("--upstream-ca needs a tcp:// upstream")?
                .to_string(),
        };
        let config = capgate::tls::client_config(ca, None).map_err(|e| e.to_string())?;
        upstream = upstream.tls(config, &name).map_err(|e| e.to_string())?;
    }
    if let Some(t) = args.upstream_connect_timeout {
        upstream = upstream.connect_timeout(t);
    }
    let catalog = args.schema.catalog()?;
    if !args.common.has_listener() && !args.stdio {
        return Err(
            "nothing to listen on: pass --listen ADDR and/or --unix PATH, or --stdio".into(),
        );
    }
    tracing::info!(
        upstream = upstream.name(),
        "gateway: relaying every connection"
    );
    let server = args
        .common
        .build(capgate::Gateway::builder().upstream(upstream), &catalog)?;
    if args.stdio {
        return args.common.serve_stdio(server);
    }
    args.common.serve(server)
}
