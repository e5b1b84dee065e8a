//! Guest clusters with an allocation in flight: host clusters are allocated
//! for them and their data is being written, but their L2 entries do not
//! point there yet (QEMU's `cluster_allocs` list of `QCowL2Meta`). A write
//! that touches one of them waits until the allocation is linked, then maps
//! again and finds the cluster allocated.

use std::collections::BTreeMap;

/// Disjoint ranges of guest clusters, `first -> end` (exclusive).
#[derive(Debug, Default)]
pub struct InFlight {
    ranges: BTreeMap<u64, u64>,
}

impl InFlight {
    /// Whether any guest cluster of `[first, end)` has an allocation in flight.
    pub fn overlaps(&self, first: u64, end: u64) -> bool {
        // The ranges are disjoint: only the last one starting before `end`
        // can reach past `first`.
        self.ranges
            .range(..end)
            .next_back()
            .is_some_and(|(_, &e)| e > first)
    }

    /// Registers `[first, end)`, which must not overlap a registered range.
    pub fn insert(&mut self, first: u64, end: u64) {
        debug_assert!(first < end && !self.overlaps(first, end));
        self.ranges.insert(first, end);
    }

    /// Ends the registration of the range starting at `first`.
    pub fn remove(&mut self, first: u64) {
        self.ranges.remove(&first);
    }

    /// Whether nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::InFlight;

    #[test]
    fn overlap_of_cluster_ranges() {
        let mut f = InFlight::default();
        assert!(!f.overlaps(0, u64::MAX));
        f.insert(10, 12);
        f.insert(20, 21);
        f.insert(12, 13);
        for (first, end, want) in [
            (0, 10, false),
            (0, 11, true),
            (11, 12, true),
            (13, 20, false),
            (13, 21, true),
            (20, 21, true),
            (21, 100, false),
            (5, 30, true),
        ] {
            assert_eq!(f.overlaps(first, end), want, "[{first}, {end})");
        }
        f.remove(10);
        assert!(!f.overlaps(10, 12));
        assert!(f.overlaps(12, 13));
        f.remove(12);
        f.remove(20);
        assert!(f.is_empty());
    }
}
