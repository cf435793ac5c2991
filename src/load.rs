//! Load generator: many connections, many calls in flight, latency percentiles.
//!
//! Connections are dealt round-robin to client threads (each a current-thread runtime, as
//! capnp-rpc clients need); every connection keeps `inflight` calls outstanding until the
//! duration is over. Latencies go into one HDR histogram per thread, merged at the end.
//! Failed calls are counted by error text, not fatal: a rate-limited or overloaded server
//! shows up in the report.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::bench_capnp::echo;
use crate::store_capnp::{namespace, reader, store};
use crate::{Client, ClientBuilder, Error};

/// Where to connect.
#[derive(Clone, Debug)]
pub enum Target {
    /// TCP (TLS if [`LoadConfig::client`] has it, see [`ClientBuilder::tls`]).
    Tcp(SocketAddr),
    /// A Unix socket.
    Unix(PathBuf),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Tcp(a) => write!(f, "tcp://{a}"),
            Target::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// The call each request makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    /// `Echo.echo(payload)` (a server whose bootstrap is `Echo`, e.g. `capgate serve --service echo`).
    Echo,
    /// `Store.namespace("load")` pipelined into `Reader.get(key)`: two calls, one round trip.
    Get,
    /// `Store.namespace("load")` pipelined into `Namespace.put(key, payload)`.
    Put,
    /// `Store.namespaces()`.
    Namespaces,
}

/// What to run.
#[derive(Clone)]
pub struct LoadConfig {
    /// Server address.
    pub target: Target,
    /// Connections to open.
    pub connections: usize,
    /// Calls outstanding per connection.
    pub inflight: usize,
    /// How long to keep calling (connection set-up is not included).
    pub duration: Duration,
    /// The call.
    pub method: Method,
    /// Payload bytes (`echo`, `put`).
    pub payload: usize,
    /// Client threads.
    pub threads: usize,
    /// Client settings (TLS, limits).
    pub client: ClientBuilder,
}

/// The outcome of a run.
pub struct LoadReport {
    /// Calls that returned successfully.
    pub ok: u64,
    /// Failed calls, by error text.
    pub failed: BTreeMap<String, u64>,
    /// Time from the first call to the last answer.
    pub elapsed: Duration,
    /// Latency of successful calls, in nanoseconds.
    pub latency_ns: Histogram<u64>,
}

impl LoadReport {
    /// Successful calls per second.
    pub fn throughput(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Total failed calls.
    pub fn failed_total(&self) -> u64 {
        self.failed.values().sum()
    }

    /// The latency at quantile `q` (0..=1) of successful calls.
    pub fn latency(&self, q: f64) -> Duration {
        Duration::from_nanos(self.latency_ns.value_at_quantile(q))
    }
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        writeln!(
            f,
            "calls       {} ok, {} failed in {:.2} s",
            self.ok,
            self.failed_total(),
            self.elapsed.as_secs_f64()
        )?;
        writeln!(f, "throughput  {:.0} calls/s", self.throughput())?;
        if self.ok > 0 {
            writeln!(
                f,
                "latency     p50 {:.1} us  p90 {:.1} us  p99 {:.1} us  p999 {:.1} us  max {:.1} us",
                us(self.latency(0.5)),
                us(self.latency(0.9)),
                us(self.latency(0.99)),
                us(self.latency(0.999)),
                us(Duration::from_nanos(self.latency_ns.max())),
            )?;
        }
        let mut failures: Vec<_> = self.failed.iter().collect();
        failures.sort_by(|a, b| b.1.cmp(a.1));
        for (text, n) in failures.iter().take(5) {
            writeln!(f, "failed      {n} x {text}")?;
        }
        if failures.len() > 5 {
            writeln!(f, "failed      ... and {} other errors", failures.len() - 5)?;
        }
        Ok(())
    }
}

/// Live counters for a progress display.
#[derive(Default)]
pub struct Progress {
    /// Calls answered so far (ok or failed).
    pub done: AtomicU64,
    /// Failed so far.
    pub failed: AtomicU64,
}

/// How long after the run's end an outstanding call may still be answered.
const ANSWER_GRACE: Duration = Duration::from_secs(5);

fn new_histogram() -> Histogram<u64> {
    // 1 ns .. 1 hour, 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid histogram bounds")
}

struct ThreadResult {
    ok: u64,
    failed: BTreeMap<String, u64>,
    latency: Histogram<u64>,
}

impl ThreadResult {
    fn new() -> Self {
        Self {
            ok: 0,
            failed: BTreeMap::new(),
            latency: new_histogram(),
        }
    }

    /// Adds `other`'s counts and latencies to these.
    fn merge(&mut self, other: ThreadResult) {
        self.ok += other.ok;
        for (k, v) in other.failed {
            *self.failed.entry(k).or_default() += v;
        }
        let _ = self.latency.add(&other.latency);
    }
}

/// Runs the load; `progress` is updated as calls complete. Fails if a connection cannot be
/// made (no calls are made then).
pub fn run(config: &LoadConfig, progress: Arc<Progress>) -> Result<LoadReport, Error> {
    if config.connections == 0 || config.inflight == 0 {
        return Err(Error::Config(
            "--connections and --inflight must be at least 1".into(),
        ));
    }
    let threads = config.threads.clamp(1, config.connections);
    let ready = Arc::new(std::sync::Barrier::new(threads + 1));
    let failed_setup = Arc::new(AtomicBool::new(false));
    let start_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let mut handles = Vec::new();
    for t in 0..threads {
        let mine = (t..config.connections).step_by(threads).count();
        let (config, ready, failed_setup, start_at, progress) = (
            config.clone(),
            ready.clone(),
            failed_setup.clone(),
            start_at.clone(),
            progress.clone(),
        );
        let h = std::thread::Builder::new()
            .name(format!("capgate-load-{t}"))
            .spawn(move || -> Result<ThreadResult, Error> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|source| Error::Io {
                        context: "starting a client runtime".into(),
                        source,
                    })?;
                tokio::task::LocalSet::new().block_on(&rt, async move {
                    let mut clients = Vec::new();
                    let mut err = None;
                    for _ in 0..mine {
                        match connect(&config).await {
                            Ok(c) => clients.push(c),
                            Err(e) => {
                                err = Some(e);
                                failed_setup.store(true, Ordering::SeqCst);
                                break;
                            }
                        }
                    }
                    // Everyone waits here, so a failed connection never leaves the others
                    // blocked; the run is then called off.
                    ready.wait();
                    if let Some(e) = err {
                        return Err(e);
                    }
                    if failed_setup.load(Ordering::SeqCst) {
                        return Ok(ThreadResult::new());
                    }
                    let start = start_at.lock().map(|s| *s).ok().flatten();
                    let deadline = start.unwrap_or_else(Instant::now) + config.duration;
                    Ok(drive(&config, &clients, deadline, &progress).await)
                })
            })
            .map_err(|source| Error::Io {
                context: "starting a client thread".into(),
                source,
            })?;
        handles.push(h);
    }
    // Connections are up (or failed): start the clock for everyone at once.
    if let Ok(mut s) = start_at.lock() {
        *s = Some(Instant::now());
    }
    ready.wait();
    let start = Instant::now();
    let mut total = ThreadResult::new();
    let mut first_error = None;
    for h in handles {
        match h.join() {
            Ok(Ok(r)) => total.merge(r),
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(_) => {
                first_error.get_or_insert(Error::Config("a client thread panicked".into()));
            }
        }
    }
    let elapsed = start.elapsed();
    match first_error {
        Some(e) => Err(e),
        None => Ok(LoadReport {
            ok: total.ok,
            failed: total.failed,
            elapsed,
            latency_ns: total.latency,
        }),
    }
}

async fn connect(config: &LoadConfig) -> Result<Client, Error> {
    let b = config.client.clone();
    match &config.target {
        Target::Tcp(a) => b.connect(*a).await,
        Target::Unix(p) => b.connect_unix(p).await,
    }
}

/// Keeps `inflight` calls outstanding on every connection until `deadline`.
async fn drive(
    config: &LoadConfig,
    clients: &[Client],
    deadline: Instant,
    progress: &Arc<Progress>,
) -> ThreadResult {
    let payload: std::rc::Rc<[u8]> = vec![0x5a; config.payload].into();
    let mut tasks = Vec::new();
    for client in clients {
        for i in 0..config.inflight {
            let (client, payload, progress) = (client.clone(), payload.clone(), progress.clone());
            let method = config.method;
            let key = format!("k{}", i % 64);
            tasks.push(tokio::task::spawn_local(async move {
                let mut r = ThreadResult::new();
                // A call still unanswered this long after the end is abandoned, so a server
                // that stops answering cannot keep the run going.
                let give_up = tokio::time::Instant::from_std(deadline + ANSWER_GRACE);
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let outcome = match tokio::time::timeout_at(
                        give_up,
                        call(&client, method, &key, &payload),
                    )
                    .await
                    {
                        Ok(r) => r,
                        Err(_) => Err(capnp::Error::disconnected(format!(
                            "no answer within {} s after the run ended",
                            ANSWER_GRACE.as_secs()
                        ))),
                    };
                    let took = t.elapsed();
                    progress.done.fetch_add(1, Ordering::Relaxed);
                    match outcome {
                        Ok(()) => {
                            r.ok += 1;
                            let _ = r.latency.record(took.as_nanos().max(1) as u64);
                        }
                        Err(e) => {
                            progress.failed.fetch_add(1, Ordering::Relaxed);
                            *r.failed.entry(e.to_string()).or_default() += 1;
                            if e.kind == capnp::ErrorKind::Disconnected {
                                break;
                            }
                        }
                    }
                }
                r
            }));
        }
    }
    let mut total = ThreadResult::new();
    for t in tasks {
        if let Ok(r) = t.await {
            total.merge(r);
        }
    }
    total
}

fn namespace(s: &store::Client) -> namespace::Client {
    let mut req = s.namespace_request();
    req.get().set_name("load");
    req.send().pipeline.get_ns()
}

async fn call(
    client: &Client,
    method: Method,
    key: &str,
    payload: &[u8],
) -> Result<(), capnp::Error> {
    match method {
        Method::Echo => {
            let e: echo::Client = client.bootstrap();
            let mut req = e.echo_request();
            req.get().set_payload(payload);
            let reply = req.send().promise.await?;
            let n = reply.get()?.get_payload()?.len();
            if n != payload.len() {
                return Err(capnp::Error::failed(format!(
                    "echo returned {n} bytes for {}",
                    payload.len()
                )));
            }
        }
        Method::Get => {
            let ns = namespace(&client.bootstrap());
            let mut req = crate::cast::<reader::Client>(&ns).get_request();
            req.get().set_key(key);
            req.send().promise.await?.get()?;
        }
        Method::Put => {
            let ns = namespace(&client.bootstrap());
            let mut req = ns.put_request();
            req.get().set_key(key);
            req.get().set_value(payload);
            req.send().promise.await?;
        }
        Method::Namespaces => {
            let s: store::Client = client.bootstrap();
            s.namespaces_request().send().promise.await?.get()?;
        }
    }
    Ok(())
}
