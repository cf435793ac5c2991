//! What the background task does with each reply of a round: apply grants, admissions and
//! counts, or handle the errors (a bad reply to one operation, a failed round).

use tokio::time::Instant;

use super::*;

impl<B: Backend> Driver<B> {
    /// Applies one operation's reply.
    pub(super) fn apply(&mut self, item: Item, reply: Result<Reply, StoreError>, now: Instant) {
        match (item, reply) {
            (Item::Heartbeat, Ok(Reply::Alive(alive))) => {
                if !alive {
                    // Its entries lapsed (Redis was flushed or restarted, or this server
                    // was cut off longer than the expiry): write them all now.
                    self.needs_resync = true;
                    self.next_heartbeat = now;
                }
            }
            (Item::Resync, Ok(Reply::Done)) => {}
            (
                Item::Conns {
                    conns,
                    mine,
                    admits,
                },
                Ok(Reply::Conns { accepted, others }),
            ) if accepted as usize <= admits.len() => {
                let total = others.saturating_add(mine).saturating_add(accepted);
                let mut recount = false;
                for (i, a) in admits.into_iter().enumerate() {
                    let admit = (i as u32) < accepted;
                    // A waiter that gave up was decided by the fallback: the count the store
                    // has may be off by it.
                    recount |= !a.decide(&self.fleet, Some(admit), total) && admit;
                }
                if recount {
                    mark_dirty(&self.fleet, &conns);
                }
            }
            (Item::Lease { rate, n }, Ok(Reply::Lease(g)))
                if g.granted <= n && g.wait <= MAX_WAIT =>
            {
                rate.degraded
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                if g.granted > 0 {
                    self.fleet.metrics.leases.inc();
                    self.fleet.metrics.leased_calls.inc_by(u64::from(g.granted));
                } else {
                    *super::super::lock(&rate.not_before) = Some(now + g.wait);
                }
                rate.bucket.grant(g.granted);
            }
            (item, reply) => {
                let e = match reply {
                    Err(e) => e,
                    Ok(r) => StoreError::reply(format!("unexpected reply {r:?}")),
                };
                self.op_error(item, &e, now);
            }
        }
    }

    /// One operation failed (the others stand): count it, let the fallback decide, try
    /// again later.
    pub(super) fn op_error(&mut self, item: Item, e: &StoreError, now: Instant) {
        self.fleet.metrics.error(e.kind);
        let what = match item {
            Item::Heartbeat => {
                self.needs_resync = true;
                "heartbeat"
            }
            Item::Resync => {
                self.needs_resync = true;
                "rewriting this server's connection counts"
            }
            Item::Conns { admits, .. } => {
                for a in admits {
                    a.decide(&self.fleet, None, 0);
                }
                self.needs_resync = true;
                "connection count"
            }
            Item::Lease { rate, .. } => {
                *super::super::lock(&rate.not_before) = Some(now + RETRY_AFTER_ERROR);
                rate.degraded
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                rate.bucket.grant(0);
                "lease"
            }
        };
        let quiet = self
            .last_error_log
            .is_some_and(|t| now.duration_since(t) < ERROR_LOG_PERIOD);
        if quiet {
            self.errors_not_logged += 1;
        } else {
            tracing::warn!(
                store = %self.backend.describe(),
                cause = %e,
                left_out = self.errors_not_logged,
                "quota store: bad reply to a {what}; the fallback decides for it \
                 (left_out: bad replies not logged in the {ERROR_LOG_PERIOD:?} before)"
            );
            self.last_error_log = Some(now);
            self.errors_not_logged = 0;
        }
    }

    /// The round failed as a whole: the store is down.
    pub(super) fn fail_round(&mut self, items: Vec<Item>, e: StoreError) {
        self.fail_items(items);
        self.connected = false;
        self.needs_resync = true;
        self.down(&e);
    }

    /// Gives every item back undecided.
    pub(super) fn fail_items(&mut self, items: Vec<Item>) {
        for item in items {
            match item {
                Item::Conns { admits, .. } => {
                    for a in admits {
                        a.decide(&self.fleet, None, 0);
                    }
                }
                Item::Lease { rate, .. } => rate.bucket.grant(0),
                Item::Heartbeat | Item::Resync => {}
            }
        }
    }

    /// Everything queued is given back undecided (the fallback decides while the store is
    /// down; calls queue nothing meanwhile).
    pub(super) fn refuse(&mut self, w: Work) {
        match w {
            Work::Lease(r) => r.bucket.grant(0),
            Work::Admit(a) => {
                a.decide(&self.fleet, None, 0);
            }
            // Written by the rewrite once the store is back.
            Work::Dirty(c) => c.take_dirty(),
        }
    }

    pub(super) fn refuse_pending(&mut self) {
        for r in std::mem::take(&mut self.leases) {
            r.bucket.grant(0);
        }
        for Reverse(d) in std::mem::take(&mut self.deferred) {
            d.rate.bucket.grant(0);
        }
        for a in std::mem::take(&mut self.admits) {
            a.decide(&self.fleet, None, 0);
        }
        for c in std::mem::take(&mut self.dirty) {
            c.take_dirty();
        }
    }
}
