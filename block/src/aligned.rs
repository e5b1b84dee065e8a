//! Zeroed byte buffers whose first byte is aligned to [`ALIGN`], so that an
//! O_DIRECT file can take them as they are and nodes above a file can pass
//! them down without copying them into another buffer.

use std::ops::{Deref, DerefMut};

/// The alignment: the largest logical block size of O_DIRECT files.
pub const ALIGN: usize = 4096;

/// `len` zeroed bytes starting at an [`ALIGN`]-aligned address. The
/// default is an empty buffer that allocates nothing.
#[derive(Default)]
pub struct AlignedBuf {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// A buffer of `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        let buf = vec![0u8; len + ALIGN - 1];
        let start = buf.as_ptr().align_offset(ALIGN).min(ALIGN - 1);
        AlignedBuf { buf, start, len }
    }

    /// How many bytes the buffer can hold ([`AlignedBuf::set_len`]'s bound).
    pub fn capacity(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Makes the buffer `len` bytes long (at most its capacity); bytes that
    /// come into view keep what they held.
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.capacity(),
            "AlignedBuf::set_len past its capacity"
        );
        self.len = len;
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_zeroed_and_resizable_within_capacity() {
        for len in [0, 1, 511, 4096, 1 << 20] {
            let mut b = AlignedBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert!((b.as_ptr() as usize).is_multiple_of(ALIGN));
            assert!(b.iter().all(|&x| x == 0));
            assert!(b.capacity() >= len);
            b.set_len(len / 2);
            assert_eq!(b.len(), len / 2);
        }
    }

    #[test]
    #[should_panic(expected = "past its capacity")]
    fn set_len_past_capacity_panics() {
        let mut b = AlignedBuf::zeroed(16);
        let cap = b.capacity();
        b.set_len(cap + 1);
    }
}
