//! Log lines whose rate a peer controls (refused connections, failed handshakes, connections
//! closed with an error) are written at most once per second per kind, with the count of
//! those left out: log volume must not follow an attacker's connect rate.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(1);

#[derive(Default)]
pub(crate) struct LogThrottle {
    kinds: Mutex<HashMap<&'static str, Window>>,
}

struct Window {
    logged_at: Instant,
    suppressed: u64,
}

impl LogThrottle {
    /// `Some(n)` when an event of `kind` at `now` is to be logged, `n` being how many of its
    /// kind were left out since the last one logged; `None` to leave it out.
    pub(crate) fn admit(&self, kind: &'static str, now: Instant) -> Option<u64> {
        let mut kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        match kinds.get_mut(kind) {
            Some(w) if now.saturating_duration_since(w.logged_at) < WINDOW => {
                w.suppressed += 1;
                None
            }
            Some(w) => {
                let n = std::mem::take(&mut w.suppressed);
                w.logged_at = now;
                Some(n)
            }
            None => {
                kinds.insert(
                    kind,
                    Window {
                        logged_at: now,
                        suppressed: 0,
                    },
                );
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_kind_per_second_with_the_count_left_out() {
        let t = LogThrottle::default();
        let t0 = Instant::now();
        assert_eq!(t.admit("refused", t0), Some(0));
        for i in 1..=999u64 {
            assert_eq!(
                t.admit("refused", t0 + Duration::from_micros(i * 900)),
                None
            );
        }
        assert_eq!(t.admit("tls", t0), Some(0), "kinds are counted apart");
        assert_eq!(t.admit("refused", t0 + WINDOW), Some(999));
        assert_eq!(t.admit("refused", t0 + 3 * WINDOW), Some(0));
    }
}
