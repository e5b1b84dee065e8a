//! Guest RAM (vm-memory) and its KVM memory slots. One of the few modules with `unsafe`.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::layout;

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

/// Maps `memory` bytes of guest RAM at the addresses [`layout::ram_ranges`] gives.
pub fn create_guest_memory(memory: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(memory)
        .into_iter()
        .map(|(start, size)| (GuestAddress(start), size as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| MemoryError::Allocate {
        size: memory >> 20,
        reason: e.to_string(),
    })
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
