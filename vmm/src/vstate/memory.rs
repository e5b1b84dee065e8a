//! Guest RAM (vm-memory) and its KVM memory slots. One of the few modules with `unsafe`.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::arch::x86_64::layout;

/// Guest memory as the VMM sees it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Why guest memory could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Mapping the RAM failed.
    #[error("allocating {size} MiB of guest memory: {reason}")]
    Allocate {
        /// Size in MiB.
        size: u64,
        /// The vm-memory error.
        reason: String,
    },
    /// `KVM_SET_USER_MEMORY_REGION` failed.
    #[error("registering guest memory with KVM: {0}")]
    Register(#[source] kvm_ioctls::Error),
}

/// Host alignment of guest RAM: the transparent huge page size.
const HUGE_PAGE: usize = 2 << 20;

/// Maps `memory` bytes of guest RAM at the addresses [`layout::ram_ranges`] gives.
///
/// Each region is placed at a 2 MiB-aligned host address (as congruent to its guest
/// address as KVM needs to map it with huge pages) and marked `MADV_HUGEPAGE`, as QEMU
/// does: fewer nested page faults and TLB misses for the guest. The mappings live until
/// the process exits (devices' threads may hold the memory until the very end).
pub fn create_guest_memory(memory: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let fail = |reason: String| MemoryError::Allocate {
        size: memory >> 20,
        reason,
    };
    let mut regions = Vec::new();
    for (start, size) in layout::ram_ranges(memory) {
        let size = usize::try_from(size).map_err(|_| fail("too large".into()))?;
        let host = map_aligned(size).map_err(|e| fail(e.to_string()))?;
        // SAFETY: `host` is the start of a fresh private read-write mapping of `size`
        // bytes that is never unmapped (see above), so it stays valid for the region.
        let mapping = unsafe {
            vm_memory::mmap::MmapRegionBuilder::new(size)
                .with_raw_mmap_pointer(host)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
        }
        .build()
        .map_err(|e| fail(e.to_string()))?;
        let region = vm_memory::GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| fail("region wraps the address space".into()))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| fail(e.to_string()))
}

/// A private anonymous read-write mapping of `size` bytes at a 2 MiB-aligned address,
/// advised for transparent huge pages and left out of core dumps.
fn map_aligned(size: usize) -> std::io::Result<*mut u8> {
    let len = size
        .checked_add(HUGE_PAGE)
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::OutOfMemory))?;
    // SAFETY: a new anonymous mapping at an address the kernel chooses; no existing
    // memory is affected.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let base = raw as usize;
    let aligned = base.next_multiple_of(HUGE_PAGE);
    let head = aligned - base;
    let tail = len - head - size;
    // SAFETY: both ranges lie inside the mapping just made and outside the part kept.
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((aligned + size) as *mut libc::c_void, tail);
        }
        // Advice only: without THP the memory simply uses small pages.
        libc::madvise(aligned as *mut libc::c_void, size, libc::MADV_HUGEPAGE);
    }
    // The guest's plaintext stays out of core dumps (crate::core_dumps).
    // SAFETY: advice on the range kept above, which is ours.
    if unsafe { libc::madvise(aligned as *mut libc::c_void, size, libc::MADV_DONTDUMP) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(aligned as *mut u8)
}

/// Gives each region of `mem` to KVM as one memory slot.
pub fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| MemoryError::Allocate {
                size: region.len() >> 20,
                reason: e.to_string(),
            })?;
        let desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the host range [host, host+len) is a live mapping owned by `mem`, which the
        // VM keeps alive (it holds a clone) for as long as the VM fd exists; slots do not
        // overlap because the regions do not.
        unsafe { vm.set_user_memory_region(desc) }.map_err(MemoryError::Register)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn regions_are_huge_page_aligned_and_usable() {
        let mem = create_guest_memory((3 << 30) + (64 << 20)).expect("memory");
        assert_eq!(mem.num_regions(), 2, "RAM below and above the PCI hole");
        for region in mem.iter() {
            let host = region.get_host_address(MemoryRegionAddress(0)).unwrap() as usize;
            assert_eq!(host % HUGE_PAGE, 0, "host address {host:#x}");
        }
        let top = GuestAddress((4 << 30) + (64 << 20) - 8);
        assert_eq!(
            mem.read_obj::<u64>(top).unwrap(),
            0,
            "fresh RAM reads as zeros"
        );
        mem.write_obj(0x1234_5678u64, top).unwrap();
        assert_eq!(mem.read_obj::<u64>(top).unwrap(), 0x1234_5678);
        mem.write_obj(7u8, GuestAddress(0)).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0)).unwrap(), 7);
    }
}
