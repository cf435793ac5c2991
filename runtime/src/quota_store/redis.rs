//! The Redis quota store: one multiplexed connection per server (redis-rs, tokio), three Lua
//! scripts, every round one pipeline.
//!
//! Keys (prefix `capgate` by default):
//!
//! - `capgate:servers`: sorted set of live servers, score = when each lapses (Redis time, ms).
//! - `capgate:conns:<server>`: hash, client key -> that server's connections of the client;
//!   expires with the server's entry (both refreshed by its heartbeat).
//! - `capgate:rate:<class>/<client>[/<method>]`: a budget's GCRA state (theoretical arrival
//!   time, µs), expiring once the budget is full again.
//!
//! All times are Redis's (`TIME`), so the servers' clocks need not agree. The scripts read
//! other servers' hashes by name, which a standalone Redis (or one primary) allows; Redis
//! Cluster is not supported. Redis is not trusted: every reply is checked for its shape and
//! range, and one that is off is an error (counted, logged at most every 10 s), never a panic.

use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use ::redis::{AsyncConnectionConfig, Value};
use prometheus_client::metrics::counter::Counter;

use super::backend::{Backend, Op, Reply, RoundResult, StoreError};
use super::lease::{Grant, EPOCH_SECS};
use super::metrics::ErrorKind;
use super::RedisStoreConfig;

/// Marks this server live for `expiry` ms, drops lapsed servers, refreshes the expiry of its
/// counts. Returns 1 if it was live already.
const HEARTBEAT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = tonumber(ARGV[2])
local was = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + expiry, ARGV[1])
if redis.call('PTTL', KEYS[1]) < expiry then redis.call('PEXPIRE', KEYS[1], expiry) end
redis.call('PEXPIRE', KEYS[2], expiry)
if was and was > now then return 1 end
return 0
";

/// Sets this server's count of a client (`ARGV[3]`) to `ARGV[4]`, first admitting up to `ARGV[5]`
/// connections while the live servers' counts stay within `ARGV[6]`. Returns
/// `{admitted, other servers' count}`.
const CONNS: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local mine = tonumber(ARGV[4])
local admit = tonumber(ARGV[5])
local others = 0
if admit > 0 then
  local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
  for i = 1, #live do
    if live[i] ~= ARGV[1] then
      local c = tonumber(redis.call('HGET', ARGV[2] .. live[i], ARGV[3]))
      if c and c > 0 then others = others + c end
    end
  end
end
local accepted = tonumber(ARGV[6]) - others - mine
if accepted > admit then accepted = admit end
if accepted < 0 then accepted = 0 end
mine = mine + accepted
if mine > 0 then
  redis.call('HSET', KEYS[2], ARGV[3], mine)
  redis.call('PEXPIRE', KEYS[2], ARGV[7])
else
  redis.call('HDEL', KEYS[2], ARGV[3])
end
return {accepted, others}
";

/// GCRA: takes up to `ARGV[3]` tokens from a budget of `ARGV[1]` per second with burst `ARGV[2]`.
/// Returns `{granted, 0}`, or `{0, µs until the request would be granted whole}`. The same
/// arithmetic as `Gcra::lease` in `lease.rs` (times in µs since `EPOCH_SECS`).
const LEASE: &str = r"
local t = redis.call('TIME')
local now = (tonumber(t[1]) - tonumber(ARGV[4])) * 1000000 + tonumber(t[2])
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local interval = 1000000 / rate
local capacity = burst * interval
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then tat = now end
local avail = math.floor((capacity - (tat - now)) / interval)
if avail > n then avail = n end
if avail >= 1 then
  tat = tat + avail * interval
  redis.call('SET', KEYS[1], string.format('%.3f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
  return {avail, 0}
end
local want = n
if want > burst then want = burst end
local wait = math.ceil(tat - capacity + want * interval - now)
if wait < 1 then wait = 1 end
return {0, wait}
";

/// Counts per `HSET` when this server's entries are rewritten.
const RESYNC_CHUNK: usize = 256;

/// The Redis side of a server's quota store.
pub(crate) struct RedisBackend {
    client: ::redis::Client,
    conn: Option<MultiplexedConnection>,
    command_timeout: Duration,
    server_id: String,
    servers_key: String,
    my_conns_key: String,
    conns_prefix: String,
    rate_prefix: String,
    expiry_ms: u64,
    heartbeat: ::redis::Script,
    conns: ::redis::Script,
    lease: ::redis::Script,
    addr: String,
    commands: Counter,
}

impl RedisBackend {
    pub(crate) fn new(config: &RedisStoreConfig, server_id: &str, commands: Counter) -> Self {
        let p = &config.key_prefix;
        Self {
            client: config.client.clone(),
            conn: None,
            command_timeout: config.command_timeout,
            server_id: server_id.to_string(),
            servers_key: format!("{p}:servers"),
            my_conns_key: format!("{p}:conns:{server_id}"),
            conns_prefix: format!("{p}:conns:"),
            rate_prefix: format!("{p}:rate:"),
            expiry_ms: config.expiry().as_millis().max(1) as u64,
            heartbeat: ::redis::Script::new(HEARTBEAT),
            conns: ::redis::Script::new(CONNS),
            lease: ::redis::Script::new(LEASE),
            addr: config.addr(),
            commands,
        }
    }

    /// Loads the scripts (after connecting, or when Redis lost them).
    async fn load_scripts(&mut self, conn: &mut MultiplexedConnection) -> Result<(), StoreError> {
        let mut pipe = ::redis::pipe();
        for code in [HEARTBEAT, CONNS, LEASE] {
            pipe.cmd("SCRIPT").arg("LOAD").arg(code);
        }
        self.commands.inc_by(3);
        let shas: Vec<Value> = pipe.query_async(conn).await.map_err(round_error)?;
        let want = [
            self.heartbeat.get_hash(),
            self.conns.get_hash(),
            self.lease.get_hash(),
        ];
        let ok = shas.len() == want.len()
            && shas
                .iter()
                .zip(want)
                .all(|(got, want)| text(got).is_some_and(|g| g.eq_ignore_ascii_case(want)));
        if ok {
            Ok(())
        } else {
            Err(StoreError::reply(format!(
                "SCRIPT LOAD answered {shas:?}, not the scripts' SHA1 digests"
            )))
        }
    }

    fn build(&self, ops: &[Op]) -> (::redis::Pipeline, Vec<usize>) {
        let mut pipe = ::redis::pipe();
        pipe.ignore_errors();
        let mut shape = Vec::with_capacity(ops.len());
        for op in ops {
            let before = pipe.len();
            match op {
                Op::Heartbeat => {
                    pipe.cmd("EVALSHA")
                        .arg(self.heartbeat.get_hash())
                        .arg(2)
                        .arg(&self.servers_key)
                        .arg(&self.my_conns_key)
                        .arg(&self.server_id)
                        .arg(self.expiry_ms);
                }
                Op::Resync(counts) => {
                    pipe.cmd("DEL").arg(&self.my_conns_key);
                    for chunk in counts.chunks(RESYNC_CHUNK) {
                        let cmd = pipe.cmd("HSET").arg(&self.my_conns_key);
                        for (k, n) in chunk {
                            cmd.arg(k).arg(*n);
                        }
                    }
                    pipe.cmd("PEXPIRE")
                        .arg(&self.my_conns_key)
                        .arg(self.expiry_ms);
                }
                Op::Conns {
                    key,
                    mine,
                    admit,
                    max,
                } => {
                    pipe.cmd("EVALSHA")
                        .arg(self.conns.get_hash())
                        .arg(2)
                        .arg(&self.servers_key)
                        .arg(&self.my_conns_key)
                        .arg(&self.server_id)
                        .arg(&self.conns_prefix)
                        .arg(key)
                        .arg(*mine)
                        .arg(*admit)
                        .arg(*max)
                        .arg(self.expiry_ms);
                }
                Op::Lease {
                    key,
                    per_second,
                    burst,
                    n,
                } => {
                    pipe.cmd("EVALSHA")
                        .arg(self.lease.get_hash())
                        .arg(1)
                        .arg(format!("{}{key}", self.rate_prefix))
                        .arg(*per_second)
                        .arg(*burst)
                        .arg(*n)
                        .arg(EPOCH_SECS);
                }
                Op::Leave => {
                    pipe.cmd("ZREM").arg(&self.servers_key).arg(&self.server_id);
                    pipe.cmd("DEL").arg(&self.my_conns_key);
                }
            }
            shape.push(pipe.len() - before);
        }
        (pipe, shape)
    }
}

impl Backend for RedisBackend {
    async fn connect(&mut self) -> Result<(), StoreError> {
        self.conn = None;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.command_timeout))
            .set_response_timeout(Some(self.command_timeout));
        let mut conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| StoreError::new(ErrorKind::Unreachable, e.to_string()))?;
        self.load_scripts(&mut conn).await?;
        self.conn = Some(conn);
        Ok(())
    }

    async fn round(&mut self, ops: &[Op]) -> RoundResult {
        let Some(mut conn) = self.conn.clone() else {
            return Err(StoreError::new(ErrorKind::Unreachable, "not connected"));
        };
        let (pipe, shape) = self.build(ops);
        self.commands.inc_by(pipe.len() as u64);
        let values: Vec<Value> = match pipe.query_async(&mut conn).await {
            Ok(v) => v,
            Err(e) => {
                self.conn = None;
                return Err(round_error(e));
            }
        };
        if values.len() != pipe.len() {
            self.conn = None;
            return Err(StoreError::reply(format!(
                "{} replies to {} commands",
                values.len(),
                pipe.len()
            )));
        }
        let mut values = values.into_iter();
        let mut replies = Vec::with_capacity(ops.len());
        let mut lost_scripts = false;
        for (op, n) in ops.iter().zip(shape) {
            let vs: Vec<Value> = values.by_ref().take(n).collect();
            lost_scripts |= vs.iter().any(is_noscript);
            replies.push(parse(op, &vs));
        }
        if lost_scripts {
            // Redis restarted or flushed its script cache: load them for the next round.
            if let Err(e) = self.load_scripts(&mut conn).await {
                self.conn = None;
                return Err(e);
            }
        }
        Ok(replies)
    }

    fn describe(&self) -> String {
        self.addr.clone()
    }
}

fn round_error(e: ::redis::RedisError) -> StoreError {
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else {
        ErrorKind::Unreachable
    };
    StoreError::new(kind, e.to_string())
}

fn is_noscript(v: &Value) -> bool {
    matches!(v, Value::ServerError(e) if e.code() == "NOSCRIPT")
}

fn text(v: &Value) -> Option<&str> {
    match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

/// An integer reply in `0..=max`.
fn int(v: &Value, max: u64) -> Result<u64, StoreError> {
    match v {
        Value::Int(i) if *i >= 0 && (*i as u64) <= max => Ok(*i as u64),
        other => Err(StoreError::reply(format!(
            "expected an integer in 0..={max}, got {}",
            shown(other)
        ))),
    }
}

/// A reply for a log line: its kind and at most 120 characters of it.
fn shown(v: &Value) -> String {
    let mut s = format!("{v:?}");
    if s.len() > 120 {
        let mut end = 120;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}

fn pair(vs: &[Value], max_a: u64, max_b: u64) -> Result<(u64, u64), StoreError> {
    match vs {
        [Value::Array(items)] if items.len() == 2 => {
            Ok((int(&items[0], max_a)?, int(&items[1], max_b)?))
        }
        [other] => Err(StoreError::reply(format!(
            "expected a pair of integers, got {}",
            shown(other)
        ))),
        _ => Err(StoreError::reply("wrong number of replies")),
    }
}

/// The reply to `op` from its commands' replies. Anything unexpected is an error.
pub(crate) fn parse(op: &Op, vs: &[Value]) -> Result<Reply, StoreError> {
    if let Some(Value::ServerError(e)) = vs.iter().find(|v| matches!(v, Value::ServerError(_))) {
        return Err(StoreError::reply(format!("Redis error: {e}")));
    }
    match op {
        Op::Heartbeat => match vs {
            [v] => Ok(Reply::Alive(int(v, 1)? == 1)),
            _ => Err(StoreError::reply("wrong number of replies")),
        },
        Op::Resync(_) | Op::Leave => {
            for v in vs {
                int(v, u64::MAX >> 1)?;
            }
            Ok(Reply::Done)
        }
        Op::Conns { .. } => {
            let (accepted, others) = pair(vs, u64::from(u32::MAX), u64::from(u32::MAX))?;
            Ok(Reply::Conns {
                accepted: accepted as u32,
                others: others as u32,
            })
        }
        Op::Lease { .. } => {
            let (granted, wait_us) = pair(vs, u64::from(u32::MAX), u64::MAX >> 1)?;
            Ok(Reply::Lease(Grant {
                granted: granted as u32,
                wait: Duration::from_micros(wait_us),
            }))
        }
    }
}

#[cfg(test)]
mod tests;
