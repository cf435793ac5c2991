//! Every resource limit a capgate connection enforces, in one place.

use std::time::Duration;

/// Limits applied to each connection, on the server and on the client side.
///
/// Every field is a cap that stops a specific attack if kept; the defaults are chosen so that
/// ordinary Cap'n Proto peers (capnp-rust, pycapnp, C++) never meet them.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Largest incoming frame (segment table + segments), in bytes. Default 4 MiB.
    ///
    /// Checked against the segment table *before* any allocation: a frame that claims more is
    /// refused with an `Abort` naming the claimed size. Stops a peer from making the server
    /// allocate what it merely claims. Raise it to carry larger payloads in one call.
    pub max_message_bytes: usize,
    /// Most segments one incoming frame may have. Default 64.
    ///
    /// Writers emit a handful of segments even for large messages (capnp-rust and C++ grow
    /// segments geometrically); thousands of tiny segments only serve to inflate the segment
    /// table and per-segment bookkeeping. The C++ reader refuses 512 or more.
    pub max_segments: u32,
    /// Time allowed for a frame to arrive completely once its first byte has arrived. Default
    /// 30 s. Stops a slow-loris peer from pinning a partly received frame forever.
    pub frame_timeout: Duration,
    /// A connection with no traffic in either direction and no incoming calls in flight for
    /// this long is closed (checked once per period: closing happens between one and two
    /// periods after the last traffic). Default 5 min. Stops idle sockets from accumulating.
    pub idle_timeout: Duration,
    /// Most bytes queued for a peer that has not read them yet (including messages being
    /// written). Default 16 MiB. A peer that stops reading is cut off instead of growing
    /// server memory without bound.
    pub max_outgoing_bytes: usize,
    /// Most bytes queued for all peers of the server together (each connection also within
    /// `max_outgoing_bytes`, each client within its class's `max_client_outgoing_bytes`).
    /// Default 512 MiB. Beyond it the connection holding the most unread bytes is cut off:
    /// many peers that stop reading cannot together pin more than this.
    pub max_total_outgoing_bytes: usize,
    /// Time one socket write may stall before the peer is considered gone. Default 30 s.
    pub write_timeout: Duration,
    /// Nesting limit passed to the Cap'n Proto reader for incoming messages. Default 64.
    pub nesting_limit: i32,
    /// Traversal limit for incoming messages, as a multiple of the frame's own size in words
    /// (the reader can never read more than this many words per message). Default 8.
    /// Stops amplification through overlapping pointers.
    pub traversal_factor: usize,
    /// On graceful shutdown, how long in-flight calls may run before connections are closed
    /// anyway. Default 10 s.
    pub shutdown_timeout: Duration,
    /// Connections open at once across the server; the next is refused with the reason.
    /// Default 10,000. Per-client and per-class limits are in the policy's quotas.
    pub max_connections: usize,
    /// Time a TLS client has to complete its handshake. Default 10 s. Stops clients that
    /// open TCP connections and never finish the handshake from holding them.
    pub tls_handshake_timeout: Duration,
    /// After a connection is closed with an error, how long the server keeps reading (and
    /// discarding) what the peer still sends, so the peer receives the `Abort` reason instead
    /// of a TCP reset. Bounded by time and by `max_message_bytes + 64 KiB`. Default 1 s.
    pub linger_timeout: Duration,
    /// Not a limit but a latency/CPU trade: after each write, keep polling the socket (without
    /// sleeping in the kernel) for up to this long while the peer's answer is due. Default 0:
    /// off.
    ///
    /// A sleeping thread takes tens of microseconds to wake when bytes arrive (more on virtual
    /// machines); a polling one sees them at once. Turn it on for latency-sensitive
    /// request/response traffic with few connections per thread, on cores you can spare: each
    /// write costs up to this much CPU time. The polling stops as soon as bytes arrive or
    /// something is queued to send, so it never delays other work on the thread.
    pub busy_poll: Duration,
    /// Busy polling only while an answer is due: after a write, while calls this side sent
    /// still await their answers, poll the socket for up to this long instead of sleeping.
    /// Default 100 µs. Zero turns it off. ([`Limits::busy_poll`], when set, polls after
    /// every write and takes precedence.)
    ///
    /// This is what a client waiting on its server does (and a server waiting on a
    /// callback). It adapts: a poll that sees no answer within this time makes the next
    /// ones wait out 1, 2, 4, ... up to 64 writes, and a poll that sees one halves that, so
    /// answers that take longer than this (a slow method, a far server) cost about one
    /// wasted poll per 64 calls, and quick answers are seen without the wake-up delay. A
    /// server's answers to its clients never wait on it: see [`Limits::call_poll`].
    pub answer_poll: Duration,
    /// The server's side of the same: after answering calls, poll up to this long for the
    /// peer's next call (a client making calls one after another sends it within
    /// microseconds). Default 25 µs; zero turns it off. Adapts like `answer_poll`, and on
    /// a thread only one connection polls at a time (that keeps the thread awake for all
    /// of its connections), so a busy worker spends nearly nothing on it.
    pub call_poll: Duration,
    /// Polling (all three kinds above) stands aside while the machine has more runnable
    /// threads than this process has cores (Linux: the running count in `/proc/loadavg`,
    /// read at most every 5 ms per thread): a polling thread would then take time from one
    /// with work, in this process or another. Default false. Set it to poll regardless, e.g.
    /// for threads pinned to cores of their own.
    pub poll_when_busy: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 4 << 20,
            max_segments: 64,
            frame_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(300),
            max_outgoing_bytes: 16 << 20,
            max_total_outgoing_bytes: 512 << 20,
            write_timeout: Duration::from_secs(30),
            nesting_limit: 64,
            traversal_factor: 8,
            shutdown_timeout: Duration::from_secs(10),
            linger_timeout: Duration::from_secs(1),
            tls_handshake_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            busy_poll: Duration::ZERO,
            answer_poll: Duration::from_micros(100),
            call_poll: Duration::from_micros(25),
            poll_when_busy: false,
        }
    }
}

impl Limits {
    /// The framing limits of this configuration.
    pub(crate) fn frame_limits(&self) -> crate::FrameLimits {
        crate::FrameLimits {
            max_message_bytes: self.max_message_bytes,
            max_segments: self.max_segments,
        }
    }
}

/// Formats a byte count for error messages: `4194304 bytes (4 MiB)`.
pub(crate) fn fmt_bytes(n: u64) -> String {
    const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (unit, size) in UNITS {
        if n >= size {
            let whole = n / size;
            return if n % size == 0 {
                format!("{n} bytes ({whole} {unit})")
            } else {
                format!("{n} bytes ({:.1} {unit})", n as f64 / size as f64)
            };
        }
    }
    format!("{n} bytes")
}
