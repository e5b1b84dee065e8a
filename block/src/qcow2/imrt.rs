//! The in-memory refcount table of a check (QEMU's "IMRT"): one counter per
//! host cluster, counted from the metadata, then compared with the stored
//! refcounts, and the source of the refcount blocks a rebuild writes.

use super::cache::set_refcount;

/// Reference counts per host cluster, as a check counts them.
pub struct Imrt {
    counts: Vec<u32>,
    /// Largest count the image's refcount width (and this table) can hold.
    max: u64,
}

impl Imrt {
    /// A table of `clusters` zero counts for an image whose refcounts hold at
    /// most `max_refcount`.
    pub fn new(clusters: u64, max_refcount: u64) -> Self {
        Self {
            counts: vec![0; clusters as usize],
            max: max_refcount.min(u64::from(u32::MAX)),
        }
    }

    /// Clusters covered (the file's, plus any the check or a rebuild added).
    pub fn len(&self) -> u64 {
        self.counts.len() as u64
    }

    /// The count of cluster `c` (0 past the end).
    pub fn get(&self, c: u64) -> u64 {
        self.counts.get(c as usize).map_or(0, |&v| u64::from(v))
    }

    /// Covers at least `clusters` clusters.
    pub fn grow(&mut self, clusters: u64) {
        if clusters > self.len() {
            self.counts.resize(clusters as usize, 0);
        }
    }

    /// Adds one reference to cluster `c` (growing the table to cover it);
    /// false if its count is already the largest the image can store.
    pub fn inc(&mut self, c: u64) -> bool {
        self.grow(c + 1);
        let v = &mut self.counts[c as usize];
        if u64::from(*v) >= self.max {
            return false;
        }
        *v += 1;
        true
    }

    /// Forgets every count (a recount after a rebuild).
    pub fn clear(&mut self) {
        self.counts.fill(0);
    }

    /// Takes `n` contiguous clusters that count no references, at or after
    /// `*first_free` (growing the table past its end when no gap is large
    /// enough), gives each one reference and returns the first one's index.
    /// `*first_free` moves to the first gap seen, as in QEMU's
    /// `alloc_clusters_imrt`, so that repeated calls lay clusters out as QEMU does.
    pub fn alloc(&mut self, n: u64, first_free: &mut u64) -> u64 {
        let mut cluster = *first_free;
        let mut run = 0;
        let mut first_gap = true;
        while cluster < self.len() && run < n {
            if self.get(cluster) == 0 {
                run += 1;
                if first_gap {
                    *first_free = cluster;
                    first_gap = false;
                }
            } else {
                run = 0;
            }
            cluster += 1;
        }
        if run < n {
            self.grow(cluster + n - run);
        }
        let start = cluster - run;
        for c in start..start + n {
            self.counts[c as usize] = 1;
        }
        start
    }

    /// Refcount block `index` (of `entries` refcounts of width `order`, in a
    /// cluster of `cluster_size` bytes) holding these counts.
    pub fn refblock(&self, index: u64, entries: u64, order: u32, cluster_size: u64) -> Vec<u8> {
        let mut block = vec![0u8; cluster_size as usize];
        let first = index * entries;
        for i in 0..entries {
            let v = self.get(first + i);
            if v != 0 {
                set_refcount(&mut block, order, i as usize, v);
            }
        }
        block
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_takes_the_first_large_enough_gap_or_grows() {
        let mut t = Imrt::new(6, 0xffff);
        for c in [0, 1, 3] {
            assert!(t.inc(c));
        }
        let mut first_free = 0;
        // Gap at 2 is too small for two clusters; 4..6 fits.
        assert_eq!(t.alloc(2, &mut first_free), 4);
        assert_eq!(first_free, 2);
        assert_eq!(t.alloc(1, &mut first_free), 2);
        // No gap left: the table grows.
        assert_eq!(t.alloc(3, &mut first_free), 6);
        assert_eq!(t.len(), 9);
    }

    #[test]
    fn counts_stop_at_the_refcount_width() {
        let mut t = Imrt::new(1, 1);
        assert!(t.inc(0));
        assert!(!t.inc(0));
        assert_eq!(t.get(0), 1);
    }
}
