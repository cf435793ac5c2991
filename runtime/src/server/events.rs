//! Server-wide events (graceful shutdown, policy reload) fanned out to the connections of
//! one thread. One follower per worker watches the server's channels; each connection holds
//! a slot with its waker instead of two channel receivers and their pending futures (about
//! 300 bytes less per idle connection).

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};

use tokio::sync::watch;

use crate::Policy;

/// What a connection is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Event {
    /// The server is shutting down: drain and close. Sticky: every later wait says it again.
    Stop,
    /// The policy was replaced: re-match the connection against the one in force now.
    PolicyChanged,
}

/// The events of one thread's connections.
#[derive(Default)]
pub(super) struct Events {
    stop: Cell<bool>,
    /// Bumped on every policy change.
    epoch: Cell<u64>,
    waiters: RefCell<Waiters>,
}

/// Wakers by slot; freed slots are reused, so the table is as large as the most
/// connections open at once.
#[derive(Default)]
struct Waiters {
    slots: Vec<Option<Waker>>,
    free: Vec<usize>,
}

impl Events {
    /// Follows the server's shutdown and policy channels until shutdown, waking this
    /// thread's connections on each event. Run once per thread, beside its connections.
    pub(super) async fn follow(
        &self,
        mut stop: watch::Receiver<bool>,
        mut policy: watch::Receiver<Arc<Policy>>,
    ) {
        let mut reloads = true;
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => {
                    self.stop.set(true);
                    self.wake_all();
                    return;
                }
                changed = policy.changed(), if reloads => match changed {
                    Ok(()) => {
                        policy.borrow_and_update();
                        self.epoch.set(self.epoch.get() + 1);
                        self.wake_all();
                    }
                    // The policy can no longer change; shutdown still can.
                    Err(_) => reloads = false,
                },
            }
        }
    }

    /// Marks shutdown and wakes every subscriber (for a server without a follower).
    #[cfg(test)]
    fn stop_now(&self) {
        self.stop.set(true);
        self.wake_all();
    }

    /// A subscription starting now: it reports later events only (and shutdown if it has
    /// begun already).
    pub(super) fn subscribe(self: &Rc<Self>) -> Subscription {
        let mut w = self.waiters.borrow_mut();
        let slot = match w.free.pop() {
            Some(s) => s,
            None => {
                w.slots.push(None);
                w.slots.len() - 1
            }
        };
        Subscription {
            events: self.clone(),
            slot,
            epoch: self.epoch.get(),
        }
    }

    fn wake_all(&self) {
        // Taken out first: a woken task may subscribe or unsubscribe.
        let wakers: Vec<Waker> = self
            .waiters
            .borrow_mut()
            .slots
            .iter_mut()
            .filter_map(Option::take)
            .collect();
        for w in wakers {
            w.wake();
        }
    }
}

/// One connection's place in [`Events`].
pub(super) struct Subscription {
    events: Rc<Events>,
    slot: usize,
    epoch: u64,
}

impl Subscription {
    /// Waits for the next event.
    pub(super) async fn next(&mut self) -> Event {
        poll_fn(|cx| {
            let events = &self.events;
            if events.stop.get() {
                return Poll::Ready(Event::Stop);
            }
            let now = events.epoch.get();
            if now != self.epoch {
                self.epoch = now;
                return Poll::Ready(Event::PolicyChanged);
            }
            let mut w = events.waiters.borrow_mut();
            match &mut w.slots[self.slot] {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                slot => *slot = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
        .await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut w = self.events.waiters.borrow_mut();
        w.slots[self.slot] = None;
        w.free.push(self.slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use std::time::Duration;

    fn policy() -> Arc<Policy> {
        Arc::new(Policy::allow_all())
    }

    #[tokio::test]
    async fn reloads_and_shutdown_wake_every_waiting_subscriber() {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let events = Rc::new(Events::default());
                let (stop_tx, stop_rx) = watch::channel(false);
                let (policy_tx, policy_rx) = watch::channel(policy());
                let follower = {
                    let events = events.clone();
                    tokio::task::spawn_local(async move { events.follow(stop_rx, policy_rx).await })
                };
                // Two connections waiting for their next event, in tasks of their own.
                let waiting = |mut s: Subscription| {
                    tokio::task::spawn_local(async move {
                        let first = s.next().await;
                        (first, s)
                    })
                };
                let a = waiting(events.subscribe());
                let b = waiting(events.subscribe());
                tokio::time::sleep(Duration::from_millis(20)).await;
                assert!(
                    !a.is_finished() && !b.is_finished(),
                    "nothing has happened yet"
                );
                policy_tx.send_replace(policy());
                let (ea, mut a) = tokio::time::timeout(Duration::from_secs(5), a)
                    .await
                    .unwrap()
                    .unwrap();
                let (eb, b) = tokio::time::timeout(Duration::from_secs(5), b)
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!((ea, eb), (Event::PolicyChanged, Event::PolicyChanged));
                // Reported once per change; a later subscriber does not see earlier ones.
                assert!(a.next().now_or_never().is_none());
                let c = waiting(events.subscribe());
                stop_tx.send_replace(true);
                let (ec, _c) = tokio::time::timeout(Duration::from_secs(5), c)
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(ec, Event::Stop);
                assert_eq!(a.next().await, Event::Stop);
                assert_eq!(a.next().await, Event::Stop, "shutdown is sticky");
                tokio::time::timeout(Duration::from_secs(5), follower)
                    .await
                    .unwrap()
                    .unwrap();
                // A slot is reused once its subscription ends.
                let slot = b.slot;
                drop(b);
                assert_eq!(events.subscribe().slot, slot);
            })
            .await;
    }

    #[tokio::test]
    async fn a_subscriber_after_shutdown_stops_at_once() {
        let events = Rc::new(Events::default());
        events.stop_now();
        assert_eq!(events.subscribe().next().now_or_never(), Some(Event::Stop));
    }
}
