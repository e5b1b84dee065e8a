//! Key material in pages of its own: left out of core dumps (`MADV_DONTDUMP`), kept
//! out of swap where the limits allow (`mlock`, best effort) and zeroed before the
//! pages are unmapped. The sector ciphers' key schedules live here for as long as a
//! LUKS node is open.

use std::ops::Deref;
use std::ptr::NonNull;

use zeroize::Zeroize;

/// A `T` in its own private anonymous mapping; see the module documentation.
pub(crate) struct Guarded<T> {
    ptr: NonNull<T>,
    len: usize,
}

// SAFETY: a `Guarded<T>` owns its `T` as a `Box<T>` would; it is Send/Sync exactly
// when `T` is.
unsafe impl<T: Send> Send for Guarded<T> {}
// SAFETY: as above; `&Guarded<T>` only gives out `&T`.
unsafe impl<T: Sync> Sync for Guarded<T> {}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
}

impl<T> Guarded<T> {
    /// Moves `value` into fresh pages marked as described above. Aborts, as a failed
    /// heap allocation does, when no memory can be mapped.
    pub(crate) fn new(value: T) -> Self {
        let page = page_size();
        assert!(
            std::mem::align_of::<T>() <= page,
            "over-aligned key material"
        );
        let len = std::mem::size_of::<T>().max(1).next_multiple_of(page);
        // SAFETY: a new anonymous mapping at an address the kernel chooses.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            let layout = std::alloc::Layout::from_size_align(len, page)
                .unwrap_or_else(|_| std::alloc::Layout::new::<T>());
            std::alloc::handle_alloc_error(layout);
        }
        // SAFETY: `raw` is the mapping just made, `len` bytes long. Both calls are
        // advice: without them the memory is ordinary memory, no less correct.
        unsafe {
            libc::madvise(raw, len, libc::MADV_DONTDUMP);
            libc::mlock(raw, len);
        }
        let ptr = raw.cast::<T>();
        // SAFETY: the mapping is page-aligned (so aligned for `T`, checked above),
        // writable and at least `size_of::<T>()` bytes long.
        unsafe { ptr.write(value) };
        Self {
            // SAFETY: mmap never returns null on success.
            ptr: unsafe { NonNull::new_unchecked(ptr) },
            len,
        }
    }

    /// The start of the pages (for tests that look them up in /proc/self/smaps).
    #[cfg(test)]
    pub(crate) fn address(&self) -> usize {
        self.ptr.as_ptr() as usize
    }
}

impl<T> Deref for Guarded<T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: `ptr` holds a live `T` until `drop`.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> Drop for Guarded<T> {
    fn drop(&mut self) {
        let raw = self.ptr.as_ptr();
        // SAFETY: `raw` holds a live `T`, dropped once here; afterwards its bytes
        // (the whole mapping, `len` bytes, ours alone) are zeroed and unmapped.
        unsafe {
            std::ptr::drop_in_place(raw);
            std::slice::from_raw_parts_mut(raw.cast::<u8>(), self.len).zeroize();
            libc::munlock(raw.cast(), self.len);
            libc::munmap(raw.cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The VmFlags line of the /proc/self/smaps entry that contains `addr`.
    fn vm_flags(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((a, b)) = range.split_once('-') {
                    if let (Ok(a), Ok(b)) =
                        (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                    {
                        inside = (a..b).contains(&addr);
                        continue;
                    }
                }
            }
            if inside {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return flags.trim().to_string();
                }
            }
        }
        panic!("no mapping contains {addr:#x}");
    }

    #[test]
    fn key_material_is_left_out_of_core_dumps_and_dropped_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static DROPS: AtomicUsize = AtomicUsize::new(0);
        struct Key([u8; 64]);
        impl Drop for Key {
            fn drop(&mut self) {
                DROPS.fetch_add(1, Ordering::SeqCst);
            }
        }
        let g = Guarded::new(Key([0x5a; 64]));
        assert_eq!(g.0, [0x5a; 64]);
        let flags = vm_flags(g.address());
        assert!(
            flags.split_whitespace().any(|f| f == "dd"),
            "VmFlags: {flags}"
        );
        drop(g);
        assert_eq!(DROPS.load(Ordering::SeqCst), 1);
    }
}
