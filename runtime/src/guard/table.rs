//! A map from question id to answer state, tuned for the ids peers really use.
//!
//! Cap'n Proto peers (capnp-rpc, the C++ library, pycapnp) number their questions from 0 and
//! reuse the lowest freed id, so with `k` questions open every id is below about `k`. Those
//! ids live in a vector indexed by id: no hashing on the per-call path (SipHash on every
//! Call and Return was ~1.5% of a server's instructions). Any other id goes to a hash map,
//! so a peer choosing ids freely costs what it did before and no more.
//!
//! The vector only grows to cover ids below `max(2 * (open + 16), 256)`: a peer holding one
//! answer at id 4 000 000 does not get a 4-million-slot vector, and the vector's size stays
//! within a constant factor of the answers the peer holds open (which `max_open_answers`
//! bounds), or at most 256 slots (4 KiB). The floor is for pipelining clients: with 128 calls
//! in flight the client uses ids 0..128, while the server holds only the few it has received
//! and not yet answered; without the floor most of those ids went to the map.

use std::collections::HashMap;

/// Question id -> `V`.
#[derive(Debug)]
pub(super) struct IdTable<V> {
    dense: Vec<Option<V>>,
    sparse: HashMap<u32, V>,
    len: usize,
}

impl<V> Default for IdTable<V> {
    fn default() -> Self {
        Self {
            dense: Vec::new(),
            sparse: HashMap::new(),
            len: 0,
        }
    }
}

/// Ids below `max(2 * (open + DENSE_SLACK), DENSE_FLOOR)` may live in the vector.
const DENSE_SLACK: usize = 16;
const DENSE_FLOOR: usize = 256;

/// How far the vector may reach with `open` answers open.
fn dense_limit(open: usize) -> usize {
    (2 * (open + DENSE_SLACK)).max(DENSE_FLOOR)
}

impl<V> IdTable<V> {
    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn get(&self, id: u32) -> Option<&V> {
        match self.dense.get(id as usize) {
            Some(slot) => slot.as_ref(),
            None if self.sparse.is_empty() => None,
            None => self.sparse.get(&id),
        }
    }

    /// Sets `id` to `value`, replacing what it held.
    pub(super) fn insert(&mut self, id: u32, value: V) {
        let i = id as usize;
        if i >= self.dense.len() && i < dense_limit(self.len) {
            self.grow_to(i + 1);
        }
        let old = match self.dense.get_mut(i) {
            Some(slot) => slot.replace(value),
            None => self.sparse.insert(id, value),
        };
        if old.is_none() {
            self.len += 1;
        }
    }

    pub(super) fn remove(&mut self, id: u32) -> Option<V> {
        let old = match self.dense.get_mut(id as usize) {
            Some(slot) => slot.take(),
            None if self.sparse.is_empty() => None,
            None => self.sparse.remove(&id),
        };
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    /// Every value, in no particular order.
    pub(super) fn values(&self) -> impl Iterator<Item = &V> {
        self.dense.iter().flatten().chain(self.sparse.values())
    }

    /// Extends the vector to `len` slots (at least doubling it), moving the ids it now covers
    /// out of the map, so that every id has exactly one home.
    fn grow_to(&mut self, len: usize) {
        // `insert` grows only for `len <= dense_limit(self.len)`.
        let new = (self.dense.len() * 2).min(dense_limit(self.len)).max(len);
        self.dense.resize_with(new, || None);
        if !self.sparse.is_empty() {
            let moved: Vec<u32> = self
                .sparse
                .keys()
                .copied()
                .filter(|&k| (k as usize) < new)
                .collect();
            for k in moved {
                self.dense[k as usize] = self.sparse.remove(&k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn honest_ids_stay_in_the_vector() {
        let mut t = IdTable::default();
        for id in 0..200u32 {
            t.insert(id, id);
        }
        assert_eq!(t.len(), 200);
        assert!(t.sparse.is_empty(), "ids 0..200 went to the map");
        assert!(t.dense.len() <= dense_limit(200));
        for id in 0..200u32 {
            assert_eq!(t.remove(id), Some(id));
        }
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn a_far_id_does_not_grow_the_vector() {
        let mut t = IdTable::default();
        t.insert(4_000_000, 1u8);
        t.insert(u32::MAX, 2);
        assert!(t.dense.is_empty(), "{}", t.dense.len());
        assert_eq!(t.get(4_000_000), Some(&1));
        assert_eq!(t.get(u32::MAX), Some(&2));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn growing_moves_covered_ids_out_of_the_map() {
        let mut t = IdTable::default();
        t.insert(300, 300u32); // beyond the floor of 256 with nothing open: the map
        assert_eq!(t.sparse.len(), 1);
        // Doubling from 256 slots at id 256 (257 open, so up to 546 allowed) covers id 300.
        for id in 0..260 {
            t.insert(id, id);
        }
        assert!(t.dense.len() > 300, "{}", t.dense.len());
        assert!(t.sparse.is_empty());
        assert_eq!(t.get(300), Some(&300));
        assert_eq!(t.len(), 261);
    }

    /// A pipelining client numbers its questions up to its calls in flight, while the server
    /// holds only the few received and not yet answered: those ids stay in the vector.
    #[test]
    fn a_pipelining_clients_ids_stay_in_the_vector() {
        let mut t = IdTable::default();
        for round in 0..50u32 {
            // 128 in flight on the client; the server sees them 8 at a time.
            for batch in (0..128).step_by(8) {
                let ids = (batch..batch + 8).map(|i| (i * 37 + round) % 128);
                for id in ids.clone() {
                    t.insert(id, id);
                }
                for id in ids {
                    assert_eq!(t.remove(id), Some(id));
                }
            }
        }
        assert!(t.sparse.is_empty() && t.sparse.capacity() == 0);
        assert!(t.dense.len() < 2 * 128, "{}", t.dense.len());
    }

    proptest! {
        /// The table behaves exactly like a `HashMap` under any sequence of operations,
        /// ids small (the vector) and large (the map) mixed.
        #[test]
        fn matches_a_hash_map(ops in proptest::collection::vec(
            (0u8..3, prop_oneof![0u32..64, 0u32..1000, any::<u32>()], any::<u16>()), 0..400)
        ) {
            let mut t = IdTable::default();
            let mut model = HashMap::new();
            let mut peak = 0;
            for (op, id, v) in ops {
                peak = peak.max(model.len());
                match op {
                    0 => {
                        t.insert(id, v);
                        model.insert(id, v);
                    }
                    1 => prop_assert_eq!(t.remove(id), model.remove(&id)),
                    _ => prop_assert_eq!(t.get(id), model.get(&id)),
                }
                prop_assert_eq!(t.len(), model.len());
                // The vector stays within a constant factor of the most answers ever open.
                prop_assert!(t.dense.len() <= dense_limit(peak));
            }
            for (id, v) in &model {
                prop_assert_eq!(t.get(*id), Some(v));
            }
        }
    }
}
