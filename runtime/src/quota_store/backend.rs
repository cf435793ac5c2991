//! What the background task and a store backend say to each other: the operations of a
//! round, their replies, and the errors (a backend is Redis, or an in-memory fake in tests).

use std::future::Future;

use super::lease::Grant;
use super::metrics::ErrorKind;

/// One operation of a round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    /// Marks this server live until `now + expiry` and drops servers that are not. Replies
    /// whether it was live already (if not, its entries may be gone: rewrite them).
    Heartbeat,
    /// Replaces all of this server's connection entries with these counts.
    Resync(Vec<(String, u32)>),
    /// Sets this server's count of `key` to `mine`, first admitting up to `admit` more
    /// connections if the live servers' counts leave room under `max`.
    Conns {
        key: String,
        mine: u32,
        admit: u32,
        max: u32,
    },
    /// Takes up to `n` tokens from the budget `key` (GCRA of `per_second` and `burst`).
    Lease {
        key: String,
        per_second: u32,
        burst: u32,
        n: u32,
    },
    /// Removes this server's entries (clean shutdown).
    Leave,
}

/// The store's answer to one [`Op`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Reply {
    /// To `Heartbeat`: whether this server was live already.
    Alive(bool),
    /// To `Resync` and `Leave`.
    Done,
    /// To `Conns`: connections admitted, and the live count of the other servers.
    Conns { accepted: u32, others: u32 },
    /// To `Lease`.
    Lease(Grant),
}

/// A failed round or operation.
#[derive(Debug)]
pub(crate) struct StoreError {
    pub(crate) kind: ErrorKind,
    pub(crate) detail: String,
}

impl StoreError {
    pub(crate) fn new(kind: ErrorKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
        }
    }

    pub(crate) fn reply(detail: impl Into<String>) -> Self {
        Self::new(ErrorKind::Reply, detail)
    }
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

/// What a round's replies come back as: per operation, in order; `Err` for the round as a
/// whole when it failed (connection lost): the store is down.
pub(crate) type RoundResult = Result<Vec<Result<Reply, StoreError>>, StoreError>;

/// A store the background task can talk to (Redis, or a fake one in tests).
pub(crate) trait Backend: Send + 'static {
    /// Connects (again); ready for rounds when it returns `Ok`.
    fn connect(&mut self) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Runs `ops` in order, in one round trip.
    fn round(&mut self, ops: &[Op]) -> impl Future<Output = RoundResult> + Send;
    /// Where the store is, for logs (no secrets).
    fn describe(&self) -> String;
}
