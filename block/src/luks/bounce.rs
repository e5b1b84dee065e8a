//! Bounce buffers for encrypting writes: the ciphertext of at most
//! [`CHUNK`] bytes of one request at a time, whatever the request's size or
//! how the guest laid out its buffers. Buffers are reused (taken and given
//! back whole, so nothing is borrowed across a request) and at most
//! [`KEEP`] idle ones are kept.

use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

use crate::aligned::AlignedBuf;

/// The largest piece of a request encrypted at once.
pub const CHUNK: usize = 1 << 20;
/// Idle buffers kept for reuse.
const KEEP: usize = 16;

static FREE: Mutex<Vec<AlignedBuf>> = Mutex::new(Vec::new());

/// A buffer of `len` bytes (at most [`CHUNK`]), aligned so that the file
/// below can write it as it is; given back when dropped.
pub struct Bounce {
    buf: AlignedBuf,
}

impl Bounce {
    /// A buffer of `len` bytes; its contents are unspecified.
    pub fn take(len: usize) -> Bounce {
        assert!(len <= CHUNK, "bounce buffers hold at most {CHUNK} bytes");
        let reused = FREE.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut buf = reused.unwrap_or_else(|| AlignedBuf::zeroed(CHUNK));
        buf.set_len(len);
        Bounce { buf }
    }
}

impl Deref for Bounce {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf
    }
}

impl DerefMut for Bounce {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let mut free = FREE.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < KEEP {
            free.push(buf);
        }
    }
}
