//! A bounded LRU cache of cluster-sized metadata tables (L2 tables and
//! refcount blocks), keyed by host offset, with dirty tracking.

use std::collections::{BTreeMap, HashMap};

struct Entry {
    data: Vec<u8>,
    dirty: bool,
    used: u64,
}

/// Cached tables; never holds more than `capacity` entries.
pub struct TableCache {
    entries: HashMap<u64, Entry>,
    /// Last use tick -> offset, oldest first.
    order: BTreeMap<u64, u64>,
    capacity: usize,
    tick: u64,
}

impl TableCache {
    /// An empty cache holding at most `capacity` (at least 2) tables.
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            order: BTreeMap::new(),
            capacity: capacity.max(2),
            tick: 0,
        }
    }

    /// Whether `offset` is cached.
    pub fn contains(&self, offset: u64) -> bool {
        self.entries.contains_key(&offset)
    }

    /// The table at `offset`, marking it recently used.
    pub fn get(&mut self, offset: u64) -> Option<&[u8]> {
        self.touch(offset);
        self.entries.get(&offset).map(|e| e.data.as_slice())
    }

    fn touch(&mut self, offset: u64) {
        if let Some(e) = self.entries.get_mut(&offset) {
            self.tick += 1;
            self.order.remove(&e.used);
            e.used = self.tick;
            self.order.insert(self.tick, offset);
        }
    }

    /// The table at `offset` for modification; marks it dirty.
    pub fn get_mut(&mut self, offset: u64) -> Option<&mut [u8]> {
        self.touch(offset);
        self.entries.get_mut(&offset).map(|e| {
            e.dirty = true;
            e.data.as_mut_slice()
        })
    }

    /// The entry that must make room before a new one is inserted: the
    /// least recently used one, if the cache is full.
    pub fn victim(&self) -> Option<(u64, bool)> {
        if self.entries.len() < self.capacity {
            return None;
        }
        let (_, &off) = self.order.iter().next()?;
        self.entries.get(&off).map(|e| (off, e.dirty))
    }

    /// Inserts a table (the caller has made room with [`TableCache::victim`]).
    pub fn insert(&mut self, offset: u64, data: Vec<u8>, dirty: bool) {
        self.tick += 1;
        self.order.insert(self.tick, offset);
        let old = self.entries.insert(
            offset,
            Entry {
                data,
                dirty,
                used: self.tick,
            },
        );
        if let Some(old) = old {
            self.order.remove(&old.used);
        }
    }

    /// Removes a table, returning its data.
    pub fn remove(&mut self, offset: u64) -> Option<Vec<u8>> {
        let e = self.entries.remove(&offset)?;
        self.order.remove(&e.used);
        Some(e.data)
    }

    /// Offsets of dirty tables, sorted.
    pub fn dirty(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| e.dirty)
            .map(|(&o, _)| o)
            .collect();
        v.sort_unstable();
        v
    }

    /// Whether any table is dirty.
    pub fn any_dirty(&self) -> bool {
        self.entries.values().any(|e| e.dirty)
    }

    /// The data of a table to write back (does not clear the flag).
    pub fn peek(&self, offset: u64) -> Option<&[u8]> {
        self.entries.get(&offset).map(|e| e.data.as_slice())
    }

    /// Marks a table clean after it was written.
    pub fn mark_clean(&mut self, offset: u64) {
        if let Some(e) = self.entries.get_mut(&offset) {
            e.dirty = false;
        }
    }

    /// Drops every clean table.
    pub fn clear_clean(&mut self) {
        self.entries.retain(|_, e| e.dirty);
        let entries = &self.entries;
        self.order.retain(|_, off| entries.contains_key(off));
    }
}

/// Reads big-endian u64 number `i` of a table.
pub fn get_u64(t: &[u8], i: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&t[i * 8..i * 8 + 8]);
    u64::from_be_bytes(a)
}

/// Writes big-endian u64 number `i` of a table.
pub fn set_u64(t: &mut [u8], i: usize, v: u64) {
    t[i * 8..i * 8 + 8].copy_from_slice(&v.to_be_bytes());
}

/// Reads refcount entry `i` of a refcount block of width `1 << order` bits.
pub fn get_refcount(block: &[u8], order: u32, i: usize) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = i * bits;
            let byte = block[bit / 8];
            u64::from((byte >> (bit % 8)) & ((1u16 << bits) - 1) as u8)
        }
        3 => u64::from(block[i]),
        4 => u64::from(u16::from_be_bytes([block[2 * i], block[2 * i + 1]])),
        5 => {
            let mut a = [0u8; 4];
            a.copy_from_slice(&block[4 * i..4 * i + 4]);
            u64::from(u32::from_be_bytes(a))
        }
        _ => get_u64(block, i),
    }
}

/// Writes refcount entry `i` (the caller has checked that `v` fits).
pub fn set_refcount(block: &mut [u8], order: u32, i: usize, v: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = i * bits;
            let mask = (((1u16 << bits) - 1) as u8) << (bit % 8);
            let b = &mut block[bit / 8];
            *b = (*b & !mask) | (((v as u8) << (bit % 8)) & mask);
        }
        3 => block[i] = v as u8,
        4 => block[2 * i..2 * i + 2].copy_from_slice(&(v as u16).to_be_bytes()),
        5 => block[4 * i..4 * i + 4].copy_from_slice(&(v as u32).to_be_bytes()),
        _ => set_u64(block, i, v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_widths_round_trip() {
        for order in 0..=6u32 {
            let max = if order == 6 {
                u64::MAX
            } else {
                (1u64 << (1 << order)) - 1
            };
            let mut b = vec![0u8; 512];
            let n = (512 * 8) >> order;
            for i in 0..n {
                set_refcount(&mut b, order, i, (i as u64 * 7) & max);
            }
            for i in 0..n {
                assert_eq!(
                    get_refcount(&b, order, i),
                    (i as u64 * 7) & max,
                    "order {order}"
                );
            }
        }
        // Bit 0 is the least significant bit for sub-byte widths.
        let mut b = vec![0u8; 1];
        set_refcount(&mut b, 0, 0, 1);
        assert_eq!(b[0], 1);
    }

    #[test]
    fn lru_victim() {
        let mut c = TableCache::new(2);
        c.insert(0, vec![0], false);
        c.insert(8, vec![0], true);
        c.get(0);
        assert_eq!(c.victim(), Some((8, true)));
    }
}
