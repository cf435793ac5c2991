//! Every way a connection closes, in one enum: rendered once (`Display`) to the text the peer
//! receives in its `Abort`, kept structured for logs and metrics (`label`).

use std::time::Duration;

use crate::framing::FrameError;
use crate::limits::fmt_bytes;

/// Why a connection was closed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AbortReason {
    /// A frame broke a frame limit (size, segments, empty).
    #[error("capgate: {0}")]
    Frame(#[from] FrameError),
    /// A frame was started and not completed within `frame_timeout`.
    #[error(
        "capgate: frame not completed within {} (frame_timeout); {} of it had arrived",
        fmt_duration(*limit),
        fmt_bytes(*received as u64)
    )]
    FrameTimeout {
        /// The configured `frame_timeout`.
        limit: Duration,
        /// Bytes of the frame that had arrived.
        received: usize,
    },
    /// No frame in either direction and no call in flight for `idle_timeout`.
    #[error(
        "capgate: connection idle for {} (idle_timeout): no frames in either direction and no \
         calls in flight",
        fmt_duration(*limit)
    )]
    Idle {
        /// The configured `idle_timeout`.
        limit: Duration,
    },
    /// The peer closed its side in the middle of a frame.
    #[error("capgate: the peer closed the connection in the middle of a frame")]
    ClosedMidFrame,
    /// Reading from the peer failed.
    #[error("capgate: read failed: {0}")]
    ReadFailed(String),
    /// A write to the peer made no progress for `write_timeout`.
    #[error(
        "capgate: a write to the peer stalled for {limit:?} (write_timeout); the connection is \
         cut off"
    )]
    WriteTimeout {
        /// The configured `write_timeout`.
        limit: Duration,
    },
    /// A Call or Bootstrap reused a question id still open (guard rule 4).
    #[error(
        "capgate: protocol violation: question id {id} reused while its previous use is still \
         open ({state})"
    )]
    QuestionReused {
        /// The question id.
        id: u32,
        /// What the previous use is doing.
        state: &'static str,
    },
    /// The peer keeps more answers open than twice `max_open_answers` (plus slack).
    #[error(
        "capgate: max_open_answers = {limit} exceeded: the peer keeps {open} answers open \
         without sending Finish (client \"{class}\")"
    )]
    OpenAnswers {
        /// The class quota.
        limit: u32,
        /// Answers open.
        open: usize,
        /// The client class.
        class: String,
    },
    /// A Call's params or a Return's results carry more capabilities than allowed.
    #[error(
        "capgate: max_caps_per_message = {limit} exceeded: a {what} carries {count} capabilities \
         in its cap table (client \"{class}\"); raise max_caps_per_message in the policy if that \
         many are meant"
    )]
    TooManyCaps {
        /// `Call` or `Return`.
        what: &'static str,
        /// Capabilities in the cap table.
        count: u32,
        /// The class quota.
        limit: u32,
        /// The client class.
        class: String,
    },
    /// The peer holds more capabilities from us than `max_exports`.
    #[error(
        "capgate: max_exports = {limit} exceeded: the peer holds {held} capabilities from {} \
         (client \"{class}\"); release capabilities you no longer use",
        exports_source(.upstream.as_deref())
    )]
    Exports {
        /// The class quota.
        limit: u32,
        /// Capabilities held.
        held: usize,
        /// The client class.
        class: String,
        /// The upstream they come from, through the gateway (`None`: from this server).
        upstream: Option<String>,
    },
    /// The peer does not read what we send: an outgoing byte budget was exceeded.
    #[error("{}", outgoing_text(scope, *queued, *limit, *held))]
    NotReading {
        /// Which budget.
        scope: BudgetScope,
        /// Bytes queued in that scope.
        queued: usize,
        /// The budget.
        limit: usize,
        /// Bytes this connection held when it was picked (the largest holder).
        held: usize,
    },
    /// The peer sent an `Abort` (its reason cut and escaped for logs).
    #[error("the peer aborted the connection: {reason}")]
    PeerAborted {
        /// What the peer called it.
        kind: capnp::ErrorKind,
        /// Its reason, at most 512 characters, control characters escaped.
        reason: String,
    },
    /// A policy reload left no class that matches this connection.
    #[error(
        "capgate: the policy was reloaded and no client class of it ({policy}) matches {peer} \
         any more"
    )]
    NoClassMatches {
        /// Where the policy came from.
        policy: String,
        /// The peer's address.
        peer: String,
    },
    /// The server is shutting down.
    #[error("capgate: the server is shutting down")]
    Shutdown,
    /// The local side closed the connection (a client dropped, ...).
    #[error("capgate: {0}")]
    Closed(&'static str),
    /// A gateway could not reach its upstream for this connection.
    #[error("capgate: upstream {upstream} unreachable: {error}")]
    UpstreamUnreachable {
        /// The upstream's address (`tcp://...`, `unix:...`).
        upstream: String,
        /// What connecting said (or the connect timeout).
        error: String,
    },
    /// A gateway's upstream closed its connection (between frames).
    #[error("capgate: upstream {upstream} closed the connection")]
    UpstreamClosed {
        /// The upstream's address.
        upstream: String,
    },
    /// A gateway's upstream sent an `Abort` (its reason cut and escaped).
    #[error("capgate: upstream {upstream} aborted the connection: {reason}")]
    UpstreamAborted {
        /// The upstream's address.
        upstream: String,
        /// What the upstream called it.
        kind: capnp::ErrorKind,
        /// Its reason, at most 512 characters, control characters escaped.
        reason: String,
    },
    /// A gateway's connection to its upstream broke a rule (a frame limit, a deadline, a
    /// message the gateway does not relay) or failed.
    #[error("capgate: upstream {upstream}: {}", strip_prefix(reason))]
    Upstream {
        /// The upstream's address.
        upstream: String,
        /// What happened on the upstream's side.
        reason: Box<AbortReason>,
    },
    /// A message the gateway cannot account for, so does not relay (Level-3 forms:
    /// provide, accept, join, third-party capabilities and answers).
    #[error("capgate: {what} is not supported through the gateway (Level 3 RPC or unknown)")]
    Unsupported {
        /// The message form.
        what: String,
    },
}

/// An upstream-side reason without its own `capgate: ` (the gateway's text carries one).
fn strip_prefix(reason: &AbortReason) -> String {
    let text = reason.to_string();
    match text.strip_prefix("capgate: ") {
        Some(rest) => rest.to_string(),
        None => text,
    }
}

/// Which outgoing budget a peer that does not read exceeded.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BudgetScope {
    /// The connection's own `max_outgoing_bytes`.
    Connection,
    /// `max_client_outgoing_bytes` of this client (named) across its connections.
    Client(String),
    /// The server's `max_total_outgoing_bytes`.
    Server,
}

fn outgoing_text(scope: &BudgetScope, queued: usize, limit: usize, held: usize) -> String {
    let (queued, limit, held) = (
        fmt_bytes(queued as u64),
        fmt_bytes(limit as u64),
        fmt_bytes(held as u64),
    );
    match scope {
        BudgetScope::Connection => format!(
            "capgate: peer is not reading: {queued} queued for it would exceed \
             max_outgoing_bytes = {limit}; the connection is cut off"
        ),
        BudgetScope::Client(who) => format!(
            "capgate: peer is not reading: client {who} has {queued} queued across its \
             connections, over max_client_outgoing_bytes = {limit}; its connection holding the \
             most ({held}) is cut off"
        ),
        BudgetScope::Server => format!(
            "capgate: peer is not reading: the server has {queued} queued for its peers, over \
             max_total_outgoing_bytes = {limit}; the connection holding the most ({held}) is cut \
             off"
        ),
    }
}

impl AbortReason {
    /// The reason as the gateway gives it, when the accounting of `upstream`'s messages
    /// found it: the capabilities of a `max_exports` abort are the upstream's.
    pub(crate) fn relayed_from(self, upstream: &str) -> Self {
        match self {
            AbortReason::Exports {
                limit, held, class, ..
            } => AbortReason::Exports {
                limit,
                held,
                class,
                upstream: Some(upstream.to_string()),
            },
            other => other,
        }
    }

    /// The kind of the `Abort` the peer receives.
    pub fn kind(&self) -> capnp::ErrorKind {
        match self {
            AbortReason::Idle { .. }
            | AbortReason::ClosedMidFrame
            | AbortReason::ReadFailed(_)
            | AbortReason::Shutdown
            | AbortReason::Closed(_)
            | AbortReason::UpstreamUnreachable { .. }
            | AbortReason::UpstreamClosed { .. } => capnp::ErrorKind::Disconnected,
            AbortReason::PeerAborted { kind, .. } | AbortReason::UpstreamAborted { kind, .. } => {
                *kind
            }
            AbortReason::Upstream { reason, .. } => match reason.kind() {
                capnp::ErrorKind::Overloaded => capnp::ErrorKind::Overloaded,
                _ => capnp::ErrorKind::Disconnected,
            },
            _ => capnp::ErrorKind::Failed,
        }
    }

    /// A short stable name for metrics and logs (`capgate_aborts_total{reason}`).
    pub fn label(&self) -> &'static str {
        match self {
            AbortReason::Frame(_) => "frame_limit",
            AbortReason::FrameTimeout { .. } => "frame_timeout",
            AbortReason::Idle { .. } => "idle_timeout",
            AbortReason::ClosedMidFrame => "closed_mid_frame",
            AbortReason::ReadFailed(_) => "read_failed",
            AbortReason::WriteTimeout { .. } => "write_timeout",
            AbortReason::QuestionReused { .. } => "question_reused",
            AbortReason::OpenAnswers { .. } => "max_open_answers",
            AbortReason::TooManyCaps { .. } => "max_caps_per_message",
            AbortReason::Exports { .. } => "max_exports",
            AbortReason::NotReading { .. } => "not_reading",
            AbortReason::PeerAborted { .. } => "peer_aborted",
            AbortReason::NoClassMatches { .. } => "no_class_matches",
            AbortReason::Shutdown => "shutdown",
            AbortReason::Closed(_) => "closed",
            AbortReason::UpstreamUnreachable { .. } => "upstream_unreachable",
            AbortReason::UpstreamClosed { .. } => "upstream_closed",
            AbortReason::UpstreamAborted { .. } => "upstream_aborted",
            AbortReason::Upstream { .. } => "upstream_fault",
            AbortReason::Unsupported { .. } => "unsupported_message",
        }
    }

    /// Whether a framing rule (limit or deadline) closed the connection.
    pub fn is_framing(&self) -> bool {
        matches!(
            self,
            AbortReason::Frame(_) | AbortReason::FrameTimeout { .. }
        )
    }

    /// The error capnp-rpc sends in its `Abort` (and its callers see).
    pub fn to_error(&self) -> capnp::Error {
        capnp::Error {
            kind: self.kind(),
            extra: self.to_string(),
        }
    }
}

impl From<AbortReason> for capnp::Error {
    fn from(r: AbortReason) -> Self {
        r.to_error()
    }
}

/// `5 s`, or `500 ms` for durations that are not whole seconds.
fn fmt_duration(d: Duration) -> String {
    if d.as_millis() % 1000 == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// Who the capabilities of a `max_exports` abort come from, as its text says.
fn exports_source(upstream: Option<&str>) -> String {
    match upstream {
        None => "this server".to_string(),
        Some(u) => format!("upstream {u} through this gateway"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_are_the_ones_peers_have_always_seen() {
        assert_eq!(
            AbortReason::FrameTimeout {
                limit: Duration::from_millis(500),
                received: 8
            }
            .to_string(),
            "capgate: frame not completed within 500 ms (frame_timeout); 8 bytes of it had arrived"
        );
        assert_eq!(
            AbortReason::Idle {
                limit: Duration::from_secs(300)
            }
            .to_string(),
            "capgate: connection idle for 300 s (idle_timeout): no frames in either direction \
             and no calls in flight"
        );
        assert_eq!(
            AbortReason::NotReading {
                scope: BudgetScope::Connection,
                queued: 2 << 20,
                limit: 1 << 20,
                held: 0
            }
            .to_string(),
            "capgate: peer is not reading: 2097152 bytes (2 MiB) queued for it would exceed \
             max_outgoing_bytes = 1048576 bytes (1 MiB); the connection is cut off"
        );
        let e = AbortReason::Frame(FrameError::Empty).to_error();
        assert_eq!(e.kind, capnp::ErrorKind::Failed);
        assert_eq!(
            e.extra,
            "capgate: frame rejected: message has no content (all segments are empty)"
        );
        assert_eq!(AbortReason::Shutdown.kind(), capnp::ErrorKind::Disconnected);
    }
}
