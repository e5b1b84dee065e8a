//! The guest physical address map (x86_64), in the spirit of Cloud Hypervisor's
//! `arch/src/x86_64/layout.rs` and Firecracker's `arch/x86_64/layout.rs`.
//!
//! ```text
//! 0x0000_0000  RAM (low)           real-mode IVT/BDA, boot GDT/IDT, PVH start info,
//!                                  zero page, boot stack, page tables, command line
//! 0x0009_fc00  reserved            EBDA
//! 0x000a_0000  (RAM, not in e820)  VGA / option ROM hole
//! 0x000e_0000  reserved            ACPI tables, RSDP first
//! 0x0010_0000  RAM                 kernel, initramfs (top of low RAM)
//! 0xc000_0000  MMIO32 window       PCI BARs (32-bit)                 } 32-bit
//! 0xe000_0000  PCI ECAM            256 buses x 1 MiB                  } PCI hole
//! 0xfeb0_0000  ACPI GED            16 bytes                           }
//! 0xfeb0_0100  ACPI PCI hotplug    16 bytes (PCIU, PCID, B0EJ, PSEG)  }
//! 0xfec0_0000  IOAPIC                                                 }
//! 0xfee0_0000  LAPIC                                                  }
//! 0xfffb_c000  KVM identity map page, TSS (3 pages)                  }
//! 0x1_0000_0000 RAM (high)         the RAM beyond 3 GiB, if any
//! align_up(end of RAM, 1 GiB): MMIO64 window (64 GiB) for 64-bit BARs
//! ```

use std::ops::Range;

use devices::acpi::{GED_LEN, PCIHP_LEN};

/// 1 MiB: start of RAM for the kernel.
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// 4 GiB.
pub const FOUR_GIB: u64 = 1 << 32;
/// End of low RAM: the 32-bit PCI hole starts here.
pub const MEM_32BIT_GAP_START: u64 = 0xc000_0000;
/// Size of the 32-bit hole (up to 4 GiB).
pub const MEM_32BIT_GAP_SIZE: u64 = FOUR_GIB - MEM_32BIT_GAP_START;

/// Boot GDT (Firecracker's `BOOT_GDT_OFFSET`).
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT (empty).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initramfs), right after the start info.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map (up to 128 entries fit before 0x7000 + 0x800).
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Linux `boot_params` ("zero page"); used instead of the PVH structures, never with them.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the BSP.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables: PML4, PDPT, then [`BOOT_PD_COUNT`] page directories.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// First page directory (2 MiB pages).
pub const PDE_START: u64 = 0xb000;
/// Page directories: the first 4 GiB are identity mapped.
pub const BOOT_PD_COUNT: u64 = 4;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Room for the command line (Linux's x86 `COMMAND_LINE_SIZE` is 2048).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Extended BIOS data area: reserved in the e820 map.
pub const EBDA_START: u64 = 0x9_fc00;
/// End of the real-mode RAM (the VGA hole starts here).
pub const EBDA_END: u64 = 0xa_0000;
/// ACPI tables, RSDP first (`tables_base` of [`crate::arch::x86_64::acpi`]).
pub const ACPI_TABLES_START: u64 = 0xe_0000;
/// Room for the ACPI tables (up to 1 MiB).
pub const ACPI_TABLES_SIZE: u64 = HIGH_RAM_START - ACPI_TABLES_START;

/// 32-bit MMIO window for PCI BARs.
pub const MMIO32_START: u64 = MEM_32BIT_GAP_START;
/// Size of the 32-bit MMIO window.
pub const MMIO32_SIZE: u64 = 0x2000_0000;
/// PCI ECAM (MCFG) base.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
/// ECAM size: bus 0 only (32 devices x 8 functions x 4 KiB), the one bus
/// there is. The MCFG's last bus is where Linux stops probing for peer host
/// bridges (`pcibios_fixup_peer_bridges`): with 256 buses it reads 8192
/// vendor IDs through port I/O at boot, ~1.3 s in the nested test host.
pub const PCI_ECAM_SIZE: u64 = 0x10_0000;
/// ACPI Generic Event Device registers.
pub const GED_START: u64 = 0xfeb0_0000;
/// ACPI PCI hotplug registers (`devices::acpi::PciHotplug`, [`PCIHP_LEN`] bytes).
pub const PCIHP_START: u64 = GED_START + 0x100;
/// IOAPIC registers (KVM's in-kernel IOAPIC).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's identity-map page (`KVM_SET_IDENTITY_MAP_ADDR`, Intel without unrestricted guest).
pub const KVM_IDENTITY_MAP_START: u64 = 0xfffb_c000;
/// KVM's TSS (`KVM_SET_TSS_ADDR`, 3 pages).
pub const KVM_TSS_START: u64 = 0xfffb_d000;

/// Size of the 64-bit MMIO window.
pub const MMIO64_SIZE: u64 = 64 << 30;

/// Legacy serial console (COM1) port base and length.
pub const SERIAL_PORT: u64 = 0x3f8;
/// COM1's IRQ (GSI).
pub const SERIAL_IRQ: u32 = 4;
/// i8042 controller ports 0x60..0x65 (0x64 is command/status).
pub const I8042_PORT: u64 = 0x60;
/// PCI configuration mechanism #1 (0xcf8 address, 0xcfc data).
pub const PCI_CONFIG_IO_PORT: u64 = 0xcf8;
/// Its length.
pub const PCI_CONFIG_IO_SIZE: u64 = 8;
/// The GED's interrupt (GSI on the IOAPIC).
pub const GED_IRQ: u32 = 5;

/// e820 types.
pub const E820_RAM: u32 = 1;
/// Reserved memory.
pub const E820_RESERVED: u32 = 2;

/// One e820 map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The RAM of a guest with `memory` bytes: `(start, size)` ranges.
pub fn ram_ranges(memory: u64) -> Vec<(u64, u64)> {
    let low = memory.min(MEM_32BIT_GAP_START);
    let mut ranges = vec![(0, low)];
    if memory > low {
        ranges.push((FOUR_GIB, memory - low));
    }
    ranges
}

/// End (exclusive) of the RAM below 4 GiB.
pub fn low_ram_end(memory: u64) -> u64 {
    memory.min(MEM_32BIT_GAP_START)
}

/// End (exclusive) of all RAM.
pub fn ram_end(memory: u64) -> u64 {
    ram_ranges(memory)
        .last()
        .map_or(0, |&(start, size)| start + size)
}

/// The 32-bit MMIO window for PCI BARs.
pub fn mmio32_window() -> Range<u64> {
    MMIO32_START..MMIO32_START + MMIO32_SIZE
}

/// The 64-bit MMIO window: above RAM and above 4 GiB, 1 GiB aligned.
pub fn mmio64_window(memory: u64) -> Range<u64> {
    let start = ram_end(memory).max(FOUR_GIB).next_multiple_of(1 << 30);
    start..start + MMIO64_SIZE
}

/// The e820 map of a guest with `memory` bytes of RAM.
pub fn e820_map(memory: u64) -> Vec<E820Entry> {
    let low = low_ram_end(memory);
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: EBDA_END - EBDA_START,
            kind: E820_RESERVED,
        },
        E820Entry {
            addr: ACPI_TABLES_START,
            size: ACPI_TABLES_SIZE,
            kind: E820_RESERVED,
        },
    ];
    if low > HIGH_RAM_START {
        map.push(E820Entry {
            addr: HIGH_RAM_START,
            size: low - HIGH_RAM_START,
            kind: E820_RAM,
        });
    }
    // Linux uses MMCONFIG only when the ECAM is reserved in e820 (or by ACPI resources).
    map.push(E820Entry {
        addr: PCI_ECAM_START,
        size: PCI_ECAM_SIZE,
        kind: E820_RESERVED,
    });
    if memory > low {
        map.push(E820Entry {
            addr: FOUR_GIB,
            size: memory - low,
            kind: E820_RAM,
        });
    }
    map
}

// The fixed parts of the map do not overlap.
const _: () = {
    assert!(MMIO32_START + MMIO32_SIZE <= PCI_ECAM_START);
    assert!(PCI_ECAM_START + PCI_ECAM_SIZE <= GED_START);
    assert!(GED_START + GED_LEN <= PCIHP_START);
    assert!(PCIHP_START + PCIHP_LEN <= IOAPIC_START && IOAPIC_START < APIC_START);
    assert!(APIC_START + 0x10_0000 <= KVM_IDENTITY_MAP_START);
    assert!(PDE_START + BOOT_PD_COUNT * 0x1000 <= CMDLINE_START);
    assert!(ZERO_PAGE_START + 0x1000 <= BOOT_STACK_POINTER + 0x10);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_do_not_overlap() {
        for memory in [2 << 20, 512 << 20, 3 << 30, 5 << 30] {
            let ranges = ram_ranges(memory);
            assert_eq!(ranges.iter().map(|r| r.1).sum::<u64>(), memory);
            let mmio64 = mmio64_window(memory);
            assert!(mmio64.start >= ram_end(memory) && mmio64.start >= FOUR_GIB);
            let e820 = e820_map(memory);
            for w in e820.windows(2) {
                assert!(w[0].addr + w[0].size <= w[1].addr, "{e820:x?}");
            }
        }
        assert_eq!(ram_ranges(5 << 30), vec![(0, 3 << 30), (FOUR_GIB, 2 << 30)]);
    }
}
