//! A byte buffer for what a client sends (an `object-add` may carry a passphrase) that
//! leaves no copy behind: it is zeroed when cleared or dropped, and when it grows its
//! old allocation is zeroed before it is freed.

use std::ops::Deref;

use zeroize::Zeroize;

/// See the module documentation.
#[derive(Default)]
pub(crate) struct WipeBuf(Vec<u8>);

impl WipeBuf {
    /// Room for `extra` more bytes, moving (and wiping) the contents if need be.
    fn reserve(&mut self, extra: usize) {
        let need = self.0.len() + extra;
        if need <= self.0.capacity() {
            return;
        }
        let mut grown = Vec::with_capacity(need.max(2 * self.0.capacity()).max(64));
        grown.extend_from_slice(&self.0);
        let mut old = std::mem::replace(&mut self.0, grown);
        old.zeroize();
    }

    /// Appends `b`.
    pub(crate) fn push(&mut self, b: u8) {
        self.reserve(1);
        self.0.push(b);
    }

    /// Appends `bytes`.
    pub(crate) fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.reserve(bytes.len());
        self.0.extend_from_slice(bytes);
    }

    /// Empties the buffer, zeroing what it held.
    pub(crate) fn clear(&mut self) {
        self.0.as_mut_slice().zeroize();
        self.0.clear();
    }

    /// The allocation's size.
    pub(crate) fn capacity(&self) -> usize {
        self.0.capacity()
    }

    /// Gives back memory beyond `min` (the buffer is empty, so nothing is copied).
    pub(crate) fn shrink_to(&mut self, min: usize) {
        self.clear();
        self.0.shrink_to(min);
    }
}

impl Deref for WipeBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for WipeBuf {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_clears_and_keeps_the_bytes() {
        let mut b = WipeBuf::default();
        for i in 0..1000u32 {
            b.push(i as u8);
        }
        b.extend_from_slice(b"secret");
        assert_eq!(b.len(), 1006);
        assert_eq!(&b[1000..], b"secret");
        assert_eq!(b[999], (999u32 % 256) as u8);
        b.clear();
        assert!(b.is_empty());
        assert!(b.capacity() >= 1006);
    }
}
