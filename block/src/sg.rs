//! Scatter-gather lists: a request's data as several buffers (a guest's
//! descriptors), split into consecutive pieces as a driver maps it.

use std::collections::VecDeque;

/// A buffer (or a pair of them) that can be cut in two at a byte offset.
pub trait Split: Send + Sized {
    /// Bytes covered.
    fn len(&self) -> usize;
    /// Whether it covers nothing.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The first `at` bytes and the rest.
    fn split_at(self, at: usize) -> (Self, Self);
}

impl Split for &mut [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
    fn split_at(self, at: usize) -> (Self, Self) {
        self.split_at_mut(at)
    }
}

impl Split for &[u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
    fn split_at(self, at: usize) -> (Self, Self) {
        <[u8]>::split_at(self, at)
    }
}

/// Hands out consecutive pieces of a scatter-gather list of `B`s.
pub struct Cursor<B> {
    bufs: VecDeque<B>,
}

/// A cursor over buffers to fill.
pub type SgCursor<'a> = Cursor<&'a mut [u8]>;
/// A cursor over buffers to read from.
pub type SgSlices<'a> = Cursor<&'a [u8]>;

impl<'a> Cursor<&'a mut [u8]> {
    /// A cursor at the start of `bufs`.
    pub fn new(bufs: &'a mut [&mut [u8]]) -> Self {
        Self {
            bufs: bufs.iter_mut().map(|b| &mut **b).collect(),
        }
    }
}

impl<'a> Cursor<&'a [u8]> {
    /// A cursor at the start of `bufs`.
    pub fn new(bufs: &[&'a [u8]]) -> Self {
        Self {
            bufs: bufs.iter().copied().collect(),
        }
    }
}

impl<B: Split> Cursor<B> {
    /// The next `len` bytes, as pieces of the list (fewer when it ends).
    pub fn take(&mut self, mut len: usize) -> Vec<B> {
        let mut out = Vec::new();
        while len > 0 {
            let Some(front) = self.bufs.pop_front() else {
                break;
            };
            if front.len() <= len {
                len -= front.len();
                out.push(front);
            } else {
                let (head, tail) = front.split_at(len);
                out.push(head);
                self.bufs.push_front(tail);
                len = 0;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_follow_the_list() {
        let mut a = [1u8; 3];
        let mut b = [2u8; 5];
        let mut bufs: Vec<&mut [u8]> = vec![&mut a, &mut b];
        let mut c = SgCursor::new(&mut bufs);
        let lens = |v: &Vec<&mut [u8]>| v.iter().map(|s| s.len()).collect::<Vec<_>>();
        assert_eq!(lens(&c.take(2)), [2]);
        assert_eq!(lens(&c.take(4)), [1, 3]);
        let last = c.take(10);
        assert_eq!(lens(&last), [2]);
        assert_eq!(last[0], [2, 2]);
        assert!(c.take(1).is_empty());
    }

    #[test]
    fn read_only_pieces_follow_the_list() {
        let (a, b) = ([1u8; 3], [2u8; 5]);
        let mut c = SgSlices::new(&[&a, &b]);
        let lens = |v: &Vec<&[u8]>| v.iter().map(|s| s.len()).collect::<Vec<_>>();
        assert_eq!(lens(&c.take(2)), [2]);
        assert_eq!(lens(&c.take(4)), [1, 3]);
        assert_eq!(c.take(10), [&[2u8, 2][..]]);
        assert!(c.take(1).is_empty());
    }
}
