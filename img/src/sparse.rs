//! qemu-img convert's sparse detection (`-S`): splitting a buffer read from
//! the source into runs of data and runs of zeros, sector by sector, with
//! qemu-img's rules for short zero runs and alignment.

use block::SECTOR_SIZE;

const SECTOR: usize = SECTOR_SIZE as usize;

/// qemu-img's default `-S`: 4 KiB of zeros make a hole.
pub const DEFAULT_MIN_SPARSE: u64 = 4096;
/// Largest `-S` qemu-img takes (its largest buffer, 16 MiB).
pub const MAX_MIN_SPARSE: u64 = 16 << 20;

/// When a zero run becomes a hole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sparse {
    /// Least zero sectors after data that make a hole; 0: no detection.
    min: u64,
    /// Hole boundaries are kept on multiples of this many sectors.
    alignment: u64,
}

impl Sparse {
    /// From `-S BYTES` (a multiple of 512 up to 16 MiB; 0 turns detection off).
    pub fn new(min_sparse_bytes: u64) -> Option<Self> {
        if !min_sparse_bytes.is_multiple_of(SECTOR_SIZE) || min_sparse_bytes > MAX_MIN_SPARSE {
            return None;
        }
        let min = min_sparse_bytes / SECTOR_SIZE;
        // qemu-img: MAX(pow2floor(min_sparse), target request alignment in
        // sectors), and every target here takes whole sectors.
        let alignment = if min == 0 { 1 } else { 1 << min.ilog2() };
        Some(Self { min, alignment })
    }

    /// Whether zero runs are looked for at all (`-S 0` says no).
    pub fn enabled(&self) -> bool {
        self.min > 0
    }

    /// The first run of `buf`, which starts at byte `offset` of the image:
    /// whether it is data (else zeros) and its length in bytes. A zero run
    /// shorter than `-S` between data counts as data, as in qemu-img
    /// (`is_allocated_sectors_min`); a zero run at the start of `buf` is a
    /// hole whatever its length. Without detection the whole buffer is data.
    pub fn next_run(&self, buf: &[u8], offset: u64) -> (bool, usize) {
        if !self.enabled() || buf.is_empty() {
            return (true, buf.len());
        }
        let n = buf.len().div_ceil(SECTOR);
        let sector = offset / SECTOR_SIZE;
        let min = self.min.min(n as u64) as usize;
        let (data, first) = self.same_run(buf, n, sector);
        if !data {
            return (false, (first * SECTOR).min(buf.len()));
        }
        let mut used = first;
        let mut checked = first;
        while checked < n {
            let (data, len) = self.same_run(
                &buf[checked * SECTOR..],
                n - checked,
                sector + checked as u64,
            );
            checked += len;
            if data {
                used = checked;
            } else if len >= min {
                break;
            }
        }
        (true, (used * SECTOR).min(buf.len()))
    }

    /// All runs of `buf` (at byte `offset` of the image) as (data, length),
    /// in order, into `runs`.
    pub fn runs(&self, buf: &[u8], offset: u64, runs: &mut Vec<(bool, usize)>) {
        runs.clear();
        let mut pos = 0;
        while pos < buf.len() {
            let (data, n) = self.next_run(&buf[pos..], offset + pos as u64);
            runs.push((data, n));
            pos += n;
        }
    }

    /// qemu-img's `is_allocated_sectors`: the run of sectors at the start of
    /// `buf` (`n` sectors, the first at image sector `sector`) that are all
    /// zero or all not, with its end moved to an alignment boundary.
    fn same_run(&self, buf: &[u8], n: usize, sector: u64) -> (bool, usize) {
        let zero = is_zero(sector_at(buf, 0));
        let mut i = 1;
        while i < n && is_zero(sector_at(buf, i)) == zero {
            i += 1;
        }
        if i == n {
            return (!zero, i);
        }
        let mut data = !zero;
        let tail = ((sector + i as u64) % self.alignment) as usize;
        if tail != 0 {
            // A zero run ending inside an alignment block that data follows:
            // the data's read-modify-write would rewrite it anyway.
            if !data && i <= tail {
                data = true;
            }
            if data {
                i = (i + self.alignment as usize - tail).min(n);
            } else {
                i -= tail;
            }
        }
        (data, i)
    }
}

/// Sector `i` of `buf` (the last one may be short).
fn sector_at(buf: &[u8], i: usize) -> &[u8] {
    &buf[i * SECTOR..((i + 1) * SECTOR).min(buf.len())]
}

/// Whether every byte is zero; word-wide so that it vectorises.
pub fn is_zero(buf: &[u8]) -> bool {
    // Data mostly shows in its first bytes already.
    if let Some(head) = buf.first_chunk::<16>() {
        if u128::from_ne_bytes(*head) != 0 {
            return false;
        }
    }
    let mut chunks = buf.chunks_exact(64);
    chunks.all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
        && chunks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A buffer from a picture: one character per sector, `d` data, `.` zeros.
    fn sectors(picture: &str) -> Vec<u8> {
        picture
            .bytes()
            .flat_map(|c| {
                let mut s = [0u8; SECTOR];
                if c == b'd' {
                    s[SECTOR / 2] = 0x5a;
                }
                s
            })
            .collect()
    }

    /// Every run of `picture` as (data, sectors), as qemu-img's write loop walks them.
    fn runs(sparse: Sparse, picture: &str, first_sector: u64) -> Vec<(bool, usize)> {
        let mut out = Vec::new();
        sparse.runs(&sectors(picture), first_sector * 512, &mut out);
        out.iter()
            .map(|&(data, len)| {
                assert!(
                    len > 0 && len % SECTOR == 0,
                    "{picture}: run of {len} bytes"
                );
                (data, len / SECTOR)
            })
            .collect()
    }

    #[test]
    fn options_as_qemu_img_takes_them() {
        assert_eq!(
            Sparse::new(4096),
            Some(Sparse {
                min: 8,
                alignment: 8
            })
        );
        assert_eq!(
            Sparse::new(12 << 10),
            Some(Sparse {
                min: 24,
                alignment: 16
            })
        );
        assert_eq!(
            Sparse::new(512),
            Some(Sparse {
                min: 1,
                alignment: 1
            })
        );
        assert!(!Sparse::new(0).unwrap().enabled());
        assert!(Sparse::new(16 << 20).is_some());
        assert_eq!(Sparse::new(100), None);
        assert_eq!(Sparse::new((16 << 20) + 512), None);
    }

    #[test]
    fn zero_runs_of_at_least_min_sparse_are_holes() {
        let s = Sparse::new(4096).unwrap();
        // 8 zero sectors, aligned, between data: a hole.
        assert_eq!(
            runs(s, "dddddddd........dddddddd", 0),
            [(true, 8), (false, 8), (true, 8)]
        );
        // Shorter zero runs between data stay data.
        assert_eq!(runs(s, "dddddddd.......ddddddddd", 0), [(true, 24)]);
        // All zeros, all data.
        assert_eq!(runs(s, "................", 0), [(false, 16)]);
        assert_eq!(runs(s, "dddddddddddddddd", 0), [(true, 16)]);
        // A leading zero run is a hole whatever its length, cut to the
        // alignment; the sectors before the boundary go with the data.
        assert_eq!(runs(s, "..........dddddd", 0), [(false, 8), (true, 8)]);
        assert_eq!(runs(s, "...ddddd........", 0), [(true, 8), (false, 8)]);
    }

    #[test]
    fn hole_boundaries_follow_the_image_alignment() {
        let s = Sparse::new(4096).unwrap();
        // The buffer starts 4 sectors into an alignment block: data is
        // extended to the boundary, the hole starts there.
        assert_eq!(
            runs(s, "dd..............dddd", 4),
            [(true, 4), (false, 8), (true, 8)]
        );
        // A zero run too short to reach a boundary goes with the data.
        assert_eq!(runs(s, "..dddddd", 4), [(true, 8)]);
    }

    #[test]
    fn detection_off_and_short_buffers() {
        let off = Sparse::new(0).unwrap();
        assert_eq!(off.next_run(&[0u8; 4096], 0), (true, 4096));
        let s = Sparse::new(4096).unwrap();
        // A short last sector (an image size that is no multiple of 512).
        assert_eq!(s.next_run(&[0u8; 700], 0), (false, 700));
        let mut b = vec![0u8; 700];
        b[699] = 1;
        assert_eq!(s.next_run(&b, 0), (true, 700));
        assert_eq!(s.next_run(&[], 0), (true, 0));
    }

    #[test]
    fn zero_test() {
        assert!(is_zero(&[0u8; 4096]));
        assert!(is_zero(&[]));
        for at in [0, 63, 64, 4000, 4095] {
            let mut b = vec![0u8; 4096];
            b[at] = 1;
            assert!(!is_zero(&b), "byte {at}");
        }
    }
}
