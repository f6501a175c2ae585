//! Recognising broker redeliveries of messages that are already in the journal.
//!
//! After a crash between "journal synced" and "PUBACK reached the broker", the broker resends
//! the whole committed-but-unacknowledged group first, with DUP=1, the same packet ids and the
//! same bytes. Those must be acknowledged and dropped, not committed a second time. Only
//! messages flagged DUP are ever checked: a fresh publish with identical bytes is a new reading.

use crate::store::journal::DedupKey;
use std::collections::{HashMap, VecDeque};

/// The keys of the most recently committed messages, bounded to `cap` entries (FIFO).
#[derive(Debug)]
pub struct RecentCommits {
    cap: usize,
    order: VecDeque<DedupKey>,
    counts: HashMap<DedupKey, u32>,
}

impl RecentCommits {
    /// `cap` must cover everything the broker could still consider unacknowledged:
    /// edgeferry's own unacknowledged bound plus one commit group, with margin.
    pub fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            order: VecDeque::with_capacity(cap.min(1 << 16)),
            counts: HashMap::with_capacity(cap.min(1 << 16)),
        }
    }

    /// Seeds from the journal's tail after a restart, oldest first.
    pub fn seed(&mut self, keys: impl IntoIterator<Item = DedupKey>) {
        for k in keys {
            self.insert(k);
        }
    }

    /// Remembers a committed message, forgetting the oldest beyond the bound.
    pub fn insert(&mut self, k: DedupKey) {
        if self.order.len() == self.cap
            && let Some(old) = self.order.pop_front()
            && let Some(c) = self.counts.get_mut(&old)
        {
            *c -= 1;
            if *c == 0 {
                self.counts.remove(&old);
            }
        }
        self.order.push_back(k);
        *self.counts.entry(k).or_insert(0) += 1;
    }

    /// Was a message with this key committed recently?
    pub fn contains(&self, k: &DedupKey) -> bool {
        self.counts.contains_key(k)
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
}
