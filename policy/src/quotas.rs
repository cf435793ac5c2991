use std::num::NonZeroU32;
use std::time::Duration;

/// Per-class limits. Counters are per connection except `calls_per_second`/`burst` and
/// `max_connections`, which are per client (one identity within the class) across all its
/// connections.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Quotas {
    /// Largest incoming message, in bytes. `None` (the default): the server's
    /// `Limits::max_message_bytes` (4 MiB unless the builder or `--max-message-bytes` says
    /// otherwise). A value set here wins over the server's for this class.
    pub max_message_bytes: Option<usize>,
    /// Calls delivered and neither returned nor finished, per connection. Default 128.
    pub max_inflight_calls: u32,
    /// Bytes of incoming messages still held by the server, per connection. Default 16 MiB.
    pub max_inflight_bytes: usize,
    /// Answer-table entries the peer has opened (cancelled calls count), per connection.
    /// Default 1024.
    pub max_open_answers: u32,
    /// Capabilities the peer holds from us, per connection. Default 10,000.
    pub max_exports: u32,
    /// Capabilities one incoming message (a Call's params, a Return's results) may carry in
    /// its cap table; more aborts the connection. Default 1024. Stops one frame from fanning
    /// out into a reply per capability (a denied call releases each one) or into thousands
    /// of import-table entries.
    pub max_caps_per_message: u32,
    /// Bytes queued for one client across all its connections (each also capped by the
    /// server's `max_outgoing_bytes`). Default 64 MiB. Beyond it the client's connection
    /// holding the most unread bytes is cut off: a client cannot multiply the per-connection
    /// budget by opening connections that do not read.
    pub max_client_outgoing_bytes: usize,
    /// Sustained call rate per client (GCRA). Default 2000.
    pub calls_per_second: NonZeroU32,
    /// Calls a client may make at once above the rate. Default 200.
    pub burst: NonZeroU32,
    /// Connections per client. Default 64.
    pub max_connections: u32,
    /// Connections of all clients of the class together. Default 4096.
    pub max_class_connections: u32,
    /// Idle connections are closed after this long. `None` (the default): the server's
    /// `Limits::idle_timeout` (5 min unless the builder or `--idle-timeout` says otherwise).
    /// A value set here wins over the server's for this class.
    pub idle_timeout: Option<Duration>,
}

impl Default for Quotas {
    fn default() -> Self {
        Self {
            max_message_bytes: None,
            max_inflight_calls: 128,
            max_inflight_bytes: 16 << 20,
            max_open_answers: 1024,
            max_exports: 10_000,
            max_caps_per_message: 1024,
            max_client_outgoing_bytes: 64 << 20,
            calls_per_second: NonZeroU32::new(2000).unwrap_or(NonZeroU32::MIN),
            burst: NonZeroU32::new(200).unwrap_or(NonZeroU32::MIN),
            max_connections: 64,
            max_class_connections: 4096,
            idle_timeout: None,
        }
    }
}
