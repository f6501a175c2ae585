//! Recognising broker redeliveries of messages that are already in the journal.
//!
//! After a crash between "journal synced" and "PUBACK reached the broker", the broker resends
//! the whole committed-but-unacknowledged group first, with DUP=1, the same packet ids and the
//! same bytes. Those must be acknowledged and dropped, not committed a second time. By packet
//! id only messages flagged DUP are checked: a fresh publish with identical bytes is a new
//! reading.
//!
//! Some brokers resend with a new packet id and DUP=0 (aedes does, tests/other_broker.rs).
//! Readings that carry their own timestamps have an identity of their own (series, event time,
//! value: [`crate::model::JournalEntry::identity`]), and the first messages of every connection
//! — the only ones that can be redeliveries — are also looked up by it
//! (`mqtt.dedup_by_identity`).

use crate::model::DedupKey;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// The keys of the most recently committed messages, bounded to `cap` entries (FIFO).
///
/// Every committed message is inserted, but only redeliveries (DUP=1, rare: after a
/// reconnect) are looked up. So inserting is just a ring-buffer push, and the hash index is
/// built on the first lookup and kept up to date only while lookups keep coming; it is
/// dropped again once `cap` inserts went by without one. (A hash map updated on every insert
/// cost ~7 % of the daemon's CPU during a backlog drain: three SipHash lookups per message
/// in a table of `2 × max_unacked + commit_max` keys.)
#[derive(Debug)]
pub struct RecentCommits<K = DedupKey> {
    cap: usize,
    order: VecDeque<K>,
    index: Option<HashMap<K, u32>>,
    inserts_since_lookup: usize,
}

impl<K: Copy + Eq + Hash> RecentCommits<K> {
    /// `cap` must cover everything the broker could still consider unacknowledged:
    /// edgeferry's own unacknowledged bound plus one commit group, with margin.
    pub fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            order: VecDeque::with_capacity(cap.min(1 << 16)),
            index: None,
            inserts_since_lookup: 0,
        }
    }

    /// Seeds from the journal's tail after a restart, oldest first.
    pub fn seed(&mut self, keys: impl IntoIterator<Item = K>) {
        for k in keys {
            self.insert(k);
        }
    }

    /// Remembers a committed message, forgetting the oldest beyond the bound.
    pub fn insert(&mut self, k: K) {
        if self.order.len() == self.cap
            && let Some(old) = self.order.pop_front()
            && let Some(index) = self.index.as_mut()
            && let Some(c) = index.get_mut(&old)
        {
            *c -= 1;
            if *c == 0 {
                index.remove(&old);
            }
        }
        self.order.push_back(k);
        if let Some(index) = self.index.as_mut() {
            *index.entry(k).or_insert(0) += 1;
            self.inserts_since_lookup += 1;
            if self.inserts_since_lookup > self.cap {
                // The redelivery burst is long over: back to plain pushes.
                self.index = None;
            }
        }
    }

    /// Was a message with this key committed recently?
    pub fn contains(&mut self, k: &K) -> bool {
        self.inserts_since_lookup = 0;
        let order = &self.order;
        self.index
            .get_or_insert_with(|| {
                let mut index = HashMap::with_capacity(order.len());
                for k in order {
                    *index.entry(*k).or_insert(0) += 1;
                }
                index
            })
            .contains_key(k)
    }

    /// How many keys it remembers at most.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Number of remembered keys.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// True when nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_the_last_cap_keys_only() {
        let mut r = RecentCommits::new(3);
        let k = |i: u16| DedupKey::new(i, "t", b"p");
        for i in 0..5 {
            r.insert(k(i));
        }
        assert_eq!(r.len(), 3);
        assert!(!r.contains(&k(0)) && !r.contains(&k(1)));
        assert!(r.contains(&k(2)) && r.contains(&k(3)) && r.contains(&k(4)));
    }

    #[test]
    fn a_key_seen_twice_survives_until_both_copies_age_out() {
        let mut r = RecentCommits::new(2);
        let a = DedupKey::new(1, "t", b"p");
        let b = DedupKey::new(2, "t", b"p");
        r.insert(a);
        r.insert(a);
        r.insert(b);
        assert!(
            r.contains(&a),
            "the second copy of a is still inside the window"
        );
        r.insert(b);
        assert!(!r.contains(&a));
    }

    #[test]
    fn the_index_follows_inserts_and_evictions_after_a_lookup_and_is_dropped_later() {
        let mut r = RecentCommits::new(3);
        let k = |i: u16| DedupKey::new(i, "t", b"p");
        r.insert(k(0));
        r.insert(k(1));
        assert!(r.contains(&k(0)), "index built from the ring");
        r.insert(k(2));
        r.insert(k(3)); // evicts k(0) from ring and index
        assert!(!r.contains(&k(0)));
        assert!(r.contains(&k(3)));
        for i in 4..10 {
            r.insert(k(i));
        }
        assert!(
            r.index.is_none(),
            "dropped after cap inserts without a lookup"
        );
        assert!(!r.contains(&k(6)) && r.contains(&k(7)) && r.contains(&k(9)));
    }
}
