use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;

use capgate::load::{self, LoadConfig, Method, Progress, Target};
use capgate::{parse_bytes, parse_duration, Client};

#[derive(Args)]
pub(crate) struct LoadArgs {
    /// Server TCP address, e.g. 127.0.0.1:4000.
    #[arg(long, required_unless_present = "unix", conflicts_with = "unix")]
    connect: Option<SocketAddr>,
    /// Server Unix socket path.
    #[arg(long)]
    unix: Option<PathBuf>,
    /// Connections to open.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Calls in flight per connection.
    #[arg(long, default_value_t = 16)]
    inflight: usize,
    /// How long to run, e.g. "10s".
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    duration: Duration,
    /// The call to make.
    #[arg(long, value_enum, default_value_t = Method::Get)]
    method: Method,
    /// Payload size for echo and put, e.g. "64 B" or "1 MiB".
    #[arg(long, value_parser = parse_bytes, default_value = "64 B")]
    payload: usize,
    /// Client threads (default: available cores, at most one per connection).
    #[arg(long)]
    threads: Option<usize>,
    /// Connect with TLS, trusting this CA (PEM).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mTLS.
    #[arg(long, requires = "tls_key", requires = "tls_ca")]
    tls_cert: Option<PathBuf>,
    /// Key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Name the server certificate must be valid for (default: the address's IP).
    #[arg(long, requires = "tls_ca")]
    server_name: Option<String>,
    /// After each write, poll the socket this long instead of sleeping, e.g. "200us"
    /// (lower latency for more CPU; see `capgate serve --busy-poll`).
    #[arg(long, value_parser = parse_duration)]
    busy_poll: Option<Duration>,
    /// While calls await answers, poll the socket this long after each write (adaptive:
    /// backs off while answers come later than that), e.g. "100us" (the default); "0s"
    /// turns it off.
    #[arg(long, value_parser = parse_duration)]
    answer_poll: Option<Duration>,
    /// Never draw a progress bar (it is drawn only when stderr is a terminal).
    #[arg(long)]
    no_progress: bool,
}

pub(crate) fn run(args: LoadArgs) -> Result<(), String> {
    let target = match (&args.connect, &args.unix) {
        (Some(a), _) => Target::Tcp(*a),
        (None, Some(p)) => Target::Unix(p.clone()),
        (None, None) => return Err("give --connect ADDR or --unix PATH".into()),
    };
    let mut client = Client::builder();
    if let Some(t) = args.busy_poll {
        client = client.busy_poll(t);
    }
    if let Some(t) = args.answer_poll {
        client = client.answer_poll(t);
    }
    if let Some(ca) = &args.tls_ca {
        let identity = args.tls_cert.as_deref().zip(args.tls_key.as_deref());
        let cfg = capgate::tls::client_config(ca, identity).map_err(|e| e.to_string())?;
        let name = match (&args.server_name, &args.connect) {
            (Some(n), _) => n.clone(),
            (None, Some(a)) => a.ip().to_string(),
            (None, None) => return Err("TLS needs --connect (TCP)".into()),
        };
        client = client.tls(cfg, &name).map_err(|e| e.to_string())?;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let config = LoadConfig {
        target: target.clone(),
        connections: args.connections,
        inflight: args.inflight,
        duration: args.duration,
        method: args.method,
        payload: args.payload,
        threads: args
            .threads
            .unwrap_or(cores)
            .clamp(1, args.connections.max(1)),
        client,
    };
    println!(
        "capgate load: {target}, method {:?}, {} connection(s) x {} in flight, {} client thread(s), {:?}",
        config.method,
        config.connections,
        config.inflight,
        config.threads,
        config.duration
    );
    let progress = Arc::new(Progress::default());
    let show = !args.no_progress && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let bar = show.then(|| {
        let bar = indicatif::ProgressBar::new(config.duration.as_millis() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {elapsed_precise} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let ticker = bar.clone().map(|bar| {
        let progress = progress.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut last = (Instant::now(), 0u64);
            while !bar.is_finished() {
                std::thread::sleep(Duration::from_millis(200));
                let done = progress.done.load(Ordering::Relaxed);
                let now = Instant::now();
                let rate = (done - last.1) as f64 / (now - last.0).as_secs_f64();
                last = (now, done);
                bar.set_position(start.elapsed().as_millis() as u64);
                bar.set_message(format!(
                    "{done} calls, {rate:.0}/s, {} failed",
                    progress.failed.load(Ordering::Relaxed)
                ));
            }
        })
    });
    let result = load::run(&config, progress);
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if let Some(t) = ticker {
        let _ = t.join();
    }
    let report = result.map_err(|e| e.to_string())?;
    print!("{report}");
    if report.ok == 0 {
        return Err("no call succeeded".into());
    }
    Ok(())
}
