use std::num::NonZeroU32;
use std::time::Duration;

/// Per-class limits. Counters are per connection except `calls_per_second`/`burst` and
/// `max_connections`, which are per client (one identity within the class) across all its
/// connections.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Quotas {
    /// Largest incoming message, in bytes. Default 4 MiB.
    pub max_message_bytes: usize,
    /// Calls delivered and neither returned nor finished, per connection. Default 128.
    pub max_inflight_calls: u32,
    /// Bytes of incoming messages still held by the server, per connection. Default 16 MiB.
    pub max_inflight_bytes: usize,
    /// Answer-table entries the peer has opened (cancelled calls count), per connection.
    /// Default 1024.
    pub max_open_answers: u32,
    /// Capabilities the peer holds from us, per connection. Default 10,000.
    pub max_exports: u32,
    /// Sustained call rate per client (GCRA). Default 2000.
    pub calls_per_second: NonZeroU32,
    /// Calls a client may make at once above the rate. Default 200.
    pub burst: NonZeroU32,
    /// Connections per client. Default 64.
    pub max_connections: u32,
    /// Connections of all clients of the class together. Default 4096.
    pub max_class_connections: u32,
    /// Idle connections are closed after this long. Default 5 min.
    pub idle_timeout: Duration,
}

impl Default for Quotas {
    fn default() -> Self {
        Self {
            max_message_bytes: 4 << 20,
            max_inflight_calls: 128,
            max_inflight_bytes: 16 << 20,
            max_open_answers: 1024,
            max_exports: 10_000,
            calls_per_second: NonZeroU32::new(2000).unwrap_or(NonZeroU32::MIN),
            burst: NonZeroU32::new(200).unwrap_or(NonZeroU32::MIN),
            max_connections: 64,
            max_class_connections: 4096,
            idle_timeout: Duration::from_secs(300),
        }
    }
}
