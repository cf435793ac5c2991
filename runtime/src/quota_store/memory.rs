//! A fake store for tests: the Redis store's semantics in memory, on tokio's clock (paused in
//! tests), with faults to inject (down, slow, garbage replies).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::backend::{Backend, Op, Reply, RoundResult, StoreError};
use super::lease::Gcra;
use super::metrics::ErrorKind;

/// What the fake store holds, shared by every server's backend.
pub(crate) struct FakeStore {
    state: Mutex<State>,
    base: Instant,
}

#[derive(Default)]
struct State {
    /// Server -> when it lapses (ms since `base`).
    servers: HashMap<String, u64>,
    /// Server -> client key -> count, and when the hash lapses.
    conns: HashMap<String, (HashMap<String, u32>, u64)>,
    rates: HashMap<String, Gcra>,
    down: bool,
    latency: Duration,
    garbage: bool,
    connects: u64,
    rounds: u64,
}

impl FakeStore {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::default(),
            base: Instant::now(),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    pub(crate) fn set_down(&self, down: bool) {
        self.with(|s| s.down = down);
    }

    pub(crate) fn set_latency(&self, d: Duration) {
        self.with(|s| s.latency = d);
    }

    pub(crate) fn set_garbage(&self, garbage: bool) {
        self.with(|s| s.garbage = garbage);
    }

    pub(crate) fn connects(&self) -> u64 {
        self.with(|s| s.connects)
    }

    pub(crate) fn rounds(&self) -> u64 {
        self.with(|s| s.rounds)
    }

    /// Connections of `key` counted over the live servers now.
    pub(crate) fn live_count(&self, key: &str) -> u32 {
        let now = self.now_ms();
        self.with(|s| {
            s.servers
                .iter()
                .filter(|(_, lapse)| **lapse > now)
                .filter_map(|(id, _)| s.conns.get(id))
                .filter(|(_, lapse)| *lapse > now)
                .filter_map(|(m, _)| m.get(key))
                .sum()
        })
    }

    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    /// A backend for one server.
    pub(crate) fn backend(self: &Arc<Self>, id: &str, expiry: Duration) -> FakeBackend {
        FakeBackend {
            store: self.clone(),
            id: id.to_string(),
            expiry_ms: expiry.as_millis() as u64,
            connected: false,
        }
    }
}

/// One server's connection to the fake store.
pub(crate) struct FakeBackend {
    store: Arc<FakeStore>,
    id: String,
    expiry_ms: u64,
    connected: bool,
}

impl FakeBackend {
    fn op(&self, s: &mut State, op: &Op) -> Result<Reply, StoreError> {
        if s.garbage {
            return Err(StoreError::reply("garbage"));
        }
        let now = self.store.now_ms();
        let now_us = self.store.base.elapsed().as_micros() as f64;
        s.servers.retain(|_, lapse| *lapse > now);
        s.conns.retain(|_, (_, lapse)| *lapse > now);
        match op {
            Op::Heartbeat => {
                let was = s.servers.insert(self.id.clone(), now + self.expiry_ms);
                if let Some((_, lapse)) = s.conns.get_mut(&self.id) {
                    *lapse = now + self.expiry_ms;
                }
                Ok(Reply::Alive(was.is_some()))
            }
            Op::Resync(counts) => {
                let m = counts.iter().cloned().collect();
                s.conns.insert(self.id.clone(), (m, now + self.expiry_ms));
                Ok(Reply::Done)
            }
            Op::Conns {
                key,
                mine,
                admit,
                max,
            } => {
                let mut others = 0;
                if *admit > 0 {
                    for id in s.servers.keys().filter(|id| **id != self.id) {
                        if let Some((m, _)) = s.conns.get(id) {
                            others += m.get(key).copied().unwrap_or(0);
                        }
                    }
                }
                let accepted = (i64::from(*max) - i64::from(others) - i64::from(*mine))
                    .clamp(0, i64::from(*admit)) as u32;
                let e = s
                    .conns
                    .entry(self.id.clone())
                    .or_insert_with(|| (HashMap::new(), 0));
                e.1 = now + self.expiry_ms;
                if mine + accepted > 0 {
                    e.0.insert(key.clone(), mine + accepted);
                } else {
                    e.0.remove(key);
                }
                Ok(Reply::Conns { accepted, others })
            }
            Op::Lease {
                key,
                per_second,
                burst,
                n,
            } => Ok(Reply::Lease(s.rates.entry(key.clone()).or_default().lease(
                now_us,
                *per_second,
                *burst,
                *n,
            ))),
            Op::Leave => {
                s.servers.remove(&self.id);
                s.conns.remove(&self.id);
                Ok(Reply::Done)
            }
        }
    }
}

impl Backend for FakeBackend {
    async fn connect(&mut self) -> Result<(), StoreError> {
        let (down, latency) = self.store.with(|s| {
            s.connects += 1;
            (s.down, s.latency)
        });
        tokio::time::sleep(latency).await;
        if down {
            return Err(StoreError::new(
                ErrorKind::Unreachable,
                "connection refused",
            ));
        }
        self.connected = true;
        Ok(())
    }

    async fn round(&mut self, ops: &[Op]) -> RoundResult {
        let latency = self.store.with(|s| s.latency);
        // Half the latency each way: the ops run at the store in the middle.
        tokio::time::sleep(latency / 2).await;
        let replies = self.store.with(|s| {
            s.rounds += 1;
            if s.down || !self.connected {
                return None;
            }
            Some(ops.iter().map(|op| self.op(s, op)).collect::<Vec<_>>())
        });
        let Some(replies) = replies else {
            self.connected = false;
            return Err(StoreError::new(ErrorKind::Unreachable, "connection reset"));
        };
        tokio::time::sleep(latency / 2).await;
        Ok(replies)
    }

    fn describe(&self) -> String {
        "fake".into()
    }
}
