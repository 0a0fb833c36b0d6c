//! One shard of the key index by hash: the table the request path reads to find a key.
//!
//! A general-purpose hash map keeps its header, its control bytes and its slots apart, so a
//! lookup on a cold key waits on three cache lines (four with the shard's own header) before
//! it reaches the entry. Here a shard is one allocation of slots, each holding the first
//! eight bytes of its key's SHA-256 beside the pointer to the entry: a lookup reads the
//! slot's line, then the entry's. The digest is already uniform, so those eight bytes are the
//! slot's hash and index as they are, and a slot whose bytes differ is skipped without
//! reading its entry. Open addressing with linear probing, at most three quarters full,
//! and deletion by shifting back (no tombstones), so a table never degrades with churn.
//!
//! Slots are shared between snapshots through their `Arc`; a change copies the one shard it
//! touches, as the sharded index around it expects.

use std::sync::Arc;

use super::key_index::{KeyEntry, KeyHash};

/// A slot: the key's tag (the first eight bytes of its digest) and its entry.
#[derive(Debug, Clone, Default)]
struct Slot {
    tag: u64,
    entry: Option<Arc<KeyEntry>>,
}

/// The smallest table a shard with keys gets.
const MIN_SLOTS: usize = 8;

/// A shard's table. Cloning shares the slots.
#[derive(Debug, Clone, Default)]
pub struct HashShard {
    slots: Arc<[Slot]>,
    len: usize,
}

fn tag(hash: &KeyHash) -> u64 {
    let [b0, b1, b2, b3, b4, b5, b6, b7, ..] = hash.0;
    u64::from_le_bytes([b0, b1, b2, b3, b4, b5, b6, b7])
}

/// The slots a table of `len` keys needs: a power of two, at most three quarters full.
fn capacity_for(len: usize) -> usize {
    len.saturating_mul(4)
        .div_ceil(3)
        .max(MIN_SLOTS)
        .checked_next_power_of_two()
        .unwrap_or(usize::MAX)
}

impl HashShard {
    /// The mask that turns a tag into a slot index (the table's size is a power of two).
    fn mask(&self) -> usize {
        self.slots.len().saturating_sub(1)
    }

    /// Where a tag's probe starts: its low bits (`as` keeps exactly those).
    #[allow(clippy::cast_possible_truncation)]
    fn home(&self, tag: u64) -> usize {
        tag as usize & self.mask()
    }

    /// The entry whose digest is `hash`.
    pub fn get(&self, hash: &KeyHash) -> Option<&Arc<KeyEntry>> {
        self.find(hash)
            .and_then(|i| self.slots.get(i)?.entry.as_ref())
    }

    /// The index of the slot holding `hash`.
    fn find(&self, hash: &KeyHash) -> Option<usize> {
        let tag = tag(hash);
        let mut i = self.home(tag);
        // At most three quarters full, so an empty slot ends every probe; the bound is for
        // the reader, not the table.
        for _ in 0..self.slots.len() {
            let slot = self.slots.get(i)?;
            let entry = slot.entry.as_ref()?;
            if slot.tag == tag && entry.hash == *hash {
                return Some(i);
            }
            i = i.wrapping_add(1) & self.mask();
        }
        None
    }

    /// Whether the two share their slots: no change came between them.
    pub fn shares_with(&self, other: &HashShard) -> bool {
        Arc::ptr_eq(&self.slots, &other.slots)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<KeyEntry>> + Clone {
        self.slots.iter().filter_map(|s| s.entry.as_ref())
    }

    /// Makes room for `len` keys in all, so that a whole build does not grow by doubling.
    pub fn reserve(&mut self, len: usize) {
        let wanted = capacity_for(len);
        if wanted > self.slots.len() {
            self.resize(wanted);
        }
    }

    fn resize(&mut self, size: usize) {
        let old = std::mem::replace(&mut self.slots, vec![Slot::default(); size].into());
        let slots = Arc::make_mut(&mut self.slots);
        let mask = size.saturating_sub(1);
        for slot in old.iter().filter(|s| s.entry.is_some()) {
            #[allow(clippy::cast_possible_truncation)]
            let mut i = slot.tag as usize & mask;
            while slots.get(i).is_some_and(|s| s.entry.is_some()) {
                i = i.wrapping_add(1) & mask;
            }
            if let Some(free) = slots.get_mut(i) {
                *free = slot.clone();
            }
        }
    }

    /// Puts `entry` in, replacing the entry with the same digest; returns the one replaced.
    /// Copies the slots first if another snapshot shares them.
    pub fn replace(&mut self, entry: Arc<KeyEntry>) -> Option<Arc<KeyEntry>> {
        if let Some(i) = self.find(&entry.hash) {
            let slot = Arc::make_mut(&mut self.slots).get_mut(i)?;
            return slot.entry.replace(entry);
        }
        if capacity_for(self.len.saturating_add(1)) > self.slots.len() {
            self.resize(capacity_for(self.len.saturating_add(1)));
        }
        let tag = tag(&entry.hash);
        let (mut i, mask) = (self.home(tag), self.mask());
        let slots = Arc::make_mut(&mut self.slots);
        while slots.get(i).is_some_and(|s| s.entry.is_some()) {
            i = i.wrapping_add(1) & mask;
        }
        if let Some(free) = slots.get_mut(i) {
            *free = Slot {
                tag,
                entry: Some(entry),
            };
            self.len = self.len.saturating_add(1);
        }
        None
    }

    /// Takes out the entry with this digest. The slots after it in its run shift back into
    /// the gap, so every remaining key is still found from its home slot.
    pub fn take(&mut self, hash: &KeyHash) -> Option<Arc<KeyEntry>> {
        let mut gap = self.find(hash)?;
        let mask = self.mask();
        let slots = Arc::make_mut(&mut self.slots);
        let taken = slots.get_mut(gap)?.entry.take();
        let mut next = gap;
        loop {
            next = next.wrapping_add(1) & mask;
            let Some(slot) = slots.get(next).filter(|s| s.entry.is_some()) else {
                break;
            };
            #[allow(clippy::cast_possible_truncation)]
            let home = slot.tag as usize & mask;
            // The slot may move into the gap unless its home lies after the gap, up to it
            // (cyclically): then it would be moved before where its probe starts.
            let distance_to_slot = next.wrapping_sub(home) & mask;
            let distance_to_gap = next.wrapping_sub(gap) & mask;
            if distance_to_slot >= distance_to_gap {
                let moved = std::mem::take(slots.get_mut(next)?);
                *slots.get_mut(gap)? = moved;
                gap = next;
            }
        }
        if taken.is_some() {
            self.len = self.len.saturating_sub(1);
        }
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::key_index::tests::entry;
    use std::collections::HashMap;

    fn digest(n: u32) -> KeyHash {
        KeyHash(crate::keys::format::hash(&format!("key {n}")))
    }

    /// A digest whose tag lands in slot `home` of any table up to 256 slots, to force runs
    /// that wrap around and cross each other.
    fn digest_at(n: u32, home: u8) -> KeyHash {
        let mut d = digest(n);
        d.0[0] = home;
        d
    }

    #[test]
    fn the_table_agrees_with_a_map_through_any_churn() {
        let mut shard = HashShard::default();
        let mut model: HashMap<[u8; 32], String> = HashMap::new();
        // A small fixed pseudo-random sequence: inserts, replacements and removals, with
        // many keys crowded onto a few home slots (the last ones wrap around the table).
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for step in 0..20_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Independent bits for the key, its home and the operation.
            let n = u32::try_from((x >> 8) % 300).unwrap();
            let home = [0u8, 1, 5, 6, 7, 255][usize::try_from((x >> 24) % 6).unwrap()];
            let hash = digest_at(n, home);
            let id = format!("id{n}-{home}");
            if (x >> 40).is_multiple_of(3) {
                let taken = shard.take(&hash).map(|e| e.id.to_string());
                assert_eq!(taken, model.remove(&hash.0), "step {step}");
            } else {
                let mut e = entry(0, &id, false);
                e.hash = hash;
                let replaced = shard.replace(Arc::new(e)).map(|e| e.id.to_string());
                assert_eq!(replaced, model.insert(hash.0, id), "step {step}");
            }
            assert_eq!(shard.len, model.len());
            if step % 97 == 0 {
                for (h, id) in &model {
                    assert_eq!(
                        shard.get(&KeyHash(*h)).map(|e| e.id.to_string()),
                        Some(id.clone())
                    );
                }
                assert_eq!(shard.iter().count(), model.len());
            }
        }
        assert!(shard.slots.len() >= model.len() * 4 / 3);
    }

    #[test]
    fn a_change_copies_the_slots_only_when_they_are_shared() {
        let mut shard = HashShard::default();
        for n in 0..100 {
            shard.replace(Arc::new(entry(n, &format!("id{n}"), false)));
        }
        let before = shard.clone();
        assert!(Arc::ptr_eq(&before.slots, &shard.slots));
        assert!(shard.take(&digest(7)).is_some());
        assert!(!Arc::ptr_eq(&before.slots, &shard.slots));
        assert!(before.get(&digest(7)).is_some() && shard.get(&digest(7)).is_none());
        assert_eq!((before.len, shard.len), (100, 99));
        // An unknown digest is refused, even one that shares a key's tag.
        let mut near = digest(8);
        near.0[31] ^= 1;
        assert!(shard.get(&near).is_none());
    }

    #[test]
    fn reserve_sizes_for_three_quarters_at_most() {
        let mut shard = HashShard::default();
        assert!(shard.get(&digest(1)).is_none());
        shard.reserve(244);
        assert_eq!(shard.slots.len(), 512);
        assert_eq!(capacity_for(0), MIN_SLOTS);
        assert_eq!(capacity_for(6), 8);
        assert_eq!(capacity_for(7), 16);
    }
}
