//! ACPI tables for a hardware-reduced x86_64 machine: RSDP, XSDT, FADT,
//! MADT, MCFG and a DSDT with the PCI host bridge and its ACPI hotplug slots,
//! COM1, the power button and the Generic Event Device (see `devices::acpi`
//! for the GED and PCI hotplug registers).
//!
//! ```no_run
//! # use vm_memory::{GuestAddress, GuestMemoryMmap};
//! use vmm::arch::x86_64::acpi::{create_acpi_tables, AcpiLayout};
//! # let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
//! let layout = AcpiLayout {
//!     cpus: 2,
//!     ecam_base: 0xe000_0000,
//!     ecam_size: 0x1000_0000,
//!     mmio32: 0xc000_0000..0xe000_0000,
//!     mmio64: 0x1_0000_0000..0x11_0000_0000,
//!     ged_base: 0xfeb0_0000,
//!     pcihp_base: 0xfeb0_0100,
//!     ged_irq: 5,
//!     serial_irq: 4,
//!     tables_base: 0xe_0000,
//! };
//! let rsdp = create_acpi_tables(&mem, &layout)?; // boot_params.acpi_rsdp_addr
//! # Ok::<(), vmm::arch::x86_64::acpi::AcpiError>(())
//! ```
//!
//! Interrupt contract with the VMM: the MADT describes one IOAPIC at
//! [`IOAPIC_ADDR`] with GSI base 0 and no interrupt source overrides, as
//! Firecracker does: KVM's default routing puts the in-kernel PIT on IOAPIC
//! pin 0, and ISA IRQs (COM1's 4) are identity mapped, edge triggered,
//! active high. There is no SCI: the FADT is hardware-reduced,
//! and events arrive through the GED's interrupt instead.

mod dsdt;
#[cfg(test)]
mod tests;

use std::ops::Range;

use acpi_tables::fadt::{FADTBuilder, Flags, FADT};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use devices::acpi::{
    GED_LEN, GED_RESET, GED_RESET_VALUE, GED_SLEEP_CONTROL, GED_SLEEP_STATUS, PCIHP_LEN,
    SLEEP_TYPE_S5,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

/// Where the platform devices the tables describe live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiLayout {
    /// vCPUs (APIC IDs 0..cpus-1), at least 1.
    pub cpus: u8,
    /// PCI ECAM base (segment 0, bus 0), 1 MiB aligned.
    pub ecam_base: u64,
    /// ECAM size: 1 MiB per bus, 1 to 256 buses.
    pub ecam_size: u64,
    /// 32-bit PCI MMIO window (below 4 GiB).
    pub mmio32: Range<u64>,
    /// 64-bit PCI MMIO window (may be empty).
    pub mmio64: Range<u64>,
    /// MMIO base of the GED register block (`devices::acpi::GED_LEN` bytes, below 4 GiB).
    pub ged_base: u64,
    /// MMIO base of the PCI hotplug register block (`devices::acpi::PCIHP_LEN`
    /// bytes, below 4 GiB, not overlapping the GED).
    pub pcihp_base: u64,
    /// GSI of the GED interrupt (edge triggered, active high).
    pub ged_irq: u32,
    /// GSI of COM1.
    pub serial_irq: u32,
    /// Guest address of the tables, RSDP first (16-byte aligned).
    pub tables_base: u64,
}

impl AcpiLayout {
    /// The last PCI bus the ECAM covers.
    fn last_bus(&self) -> u8 {
        ((self.ecam_size >> 20).clamp(1, 256) - 1) as u8
    }

    fn check(&self) -> Result<(), AcpiError> {
        let bad = |why: &str| Err(AcpiError::Layout(why.to_string()));
        const MIB: u64 = 1 << 20;
        const FOUR_GIB: u64 = 1 << 32;
        if self.cpus == 0 {
            return bad("no vCPUs");
        }
        if self.tables_base & 0xf != 0 {
            return bad(&format!(
                "tables base {:#x} is not 16-byte aligned (the RSDP must be)",
                self.tables_base
            ));
        }
        if self.ecam_base & (MIB - 1) != 0
            || self.ecam_size & (MIB - 1) != 0
            || !(MIB..=256 * MIB).contains(&self.ecam_size)
            || self.ecam_base.checked_add(self.ecam_size).is_none()
        {
            return bad(&format!(
                "ECAM {:#x}+{:#x} is not whole 1 MiB buses (1 to 256)",
                self.ecam_base, self.ecam_size
            ));
        }
        if self.mmio32.is_empty() || self.mmio32.end > FOUR_GIB {
            return bad(&format!(
                "MMIO32 window {:#x?} is empty or above 4 GiB",
                self.mmio32
            ));
        }
        if self.mmio64.start > self.mmio64.end {
            return bad(&format!("MMIO64 window {:#x?} is reversed", self.mmio64));
        }
        if self.ged_base.saturating_add(GED_LEN) > FOUR_GIB {
            return bad(&format!("GED base {:#x} is above 4 GiB", self.ged_base));
        }
        if self.pcihp_base.saturating_add(PCIHP_LEN) > FOUR_GIB {
            return bad(&format!(
                "PCI hotplug base {:#x} is above 4 GiB",
                self.pcihp_base
            ));
        }
        if self.pcihp_base < self.ged_base + GED_LEN && self.ged_base < self.pcihp_base + PCIHP_LEN
        {
            return bad(&format!(
                "PCI hotplug registers at {:#x} overlap the GED at {:#x}",
                self.pcihp_base, self.ged_base
            ));
        }
        Ok(())
    }
}

/// Why the tables could not be built.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The layout cannot be described.
    #[error("invalid ACPI layout: {0}")]
    Layout(String),
    /// A table did not fit in guest memory.
    #[error("writing the ACPI {table} table at {addr:#x}")]
    Write {
        /// Table signature.
        table: &'static str,
        /// Guest address.
        addr: u64,
        /// The memory error.
        #[source]
        source: GuestMemoryError,
    },
}

/// IOAPIC MMIO base (KVM's in-kernel IOAPIC).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// The value the guest writes to the FADT's reset register.
pub const RESET_VALUE: u8 = GED_RESET_VALUE;

const OEM_ID: [u8; 6] = *b"CRYPTV";
const OEM_REVISION: u32 = 1;
/// "CRYPTVM " as the FADT's hypervisor vendor identity.
const HYPERVISOR_VENDOR: [u8; 8] = *b"CRYPTVM ";

/// MADT flag: the machine also has dual 8259 PICs (KVM's in-kernel irqchip).
const MADT_PCAT_COMPAT: u32 = 1;
const MADT_LOCAL_APIC: u8 = 0;
const MADT_IO_APIC: u8 = 1;
const MADT_LOCAL_APIC_NMI: u8 = 4;
/// MADT local APIC flags: enabled.
const MADT_ENABLED: u32 = 1;

/// FADT IA-PC boot architecture flags: no VGA, do not enable ASPM, no CMOS
/// RTC. "Legacy devices" and "8042" stay clear: the i8042 model is there
/// only for the reset line, and Linux then leaves the keyboard alone.
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_PCIE_ASPM_CONTROLS: u16 = 1 << 4;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// Builds the tables and writes them at `layout.tables_base`: RSDP, XSDT,
/// FADT, MADT, MCFG, DSDT, each 16-byte aligned. Returns the RSDP address.
pub fn create_acpi_tables(
    mem: &GuestMemoryMmap,
    layout: &AcpiLayout,
) -> Result<GuestAddress, AcpiError> {
    layout.check()?;
    let madt = madt(layout);
    let mcfg = mcfg(layout);
    let dsdt = dsdt(layout);

    let rsdp_addr = layout.tables_base;
    let xsdt_addr = align16(rsdp_addr + Rsdp::len() as u64);
    let xsdt_len = 36 + 8 * 3;
    let fadt_addr = align16(xsdt_addr + xsdt_len);
    let madt_addr = align16(fadt_addr + FADT::len() as u64);
    let mcfg_addr = align16(madt_addr + madt.len() as u64);
    let dsdt_addr = align16(mcfg_addr + mcfg.len() as u64);
    let fadt = fadt(layout, dsdt_addr);

    let mut xsdt = XSDT::new(OEM_ID, *b"CVMXSDT ", OEM_REVISION);
    for addr in [fadt_addr, madt_addr, mcfg_addr] {
        xsdt.add_entry(addr);
    }
    let xsdt = to_bytes(&xsdt);
    debug_assert_eq!(xsdt.len() as u64, xsdt_len);
    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));

    for (table, addr, bytes) in [
        ("RSDP", rsdp_addr, &rsdp),
        ("XSDT", xsdt_addr, &xsdt),
        ("FACP", fadt_addr, &fadt),
        ("APIC", madt_addr, &madt),
        ("MCFG", mcfg_addr, &mcfg),
        ("DSDT", dsdt_addr, &dsdt),
    ] {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|source| AcpiError::Write {
                table,
                addr,
                source,
            })?;
    }
    Ok(GuestAddress(rsdp_addr))
}

fn align16(addr: u64) -> u64 {
    addr.next_multiple_of(16)
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    table.to_aml_bytes(&mut v);
    v
}

/// A byte-wide system-memory register in the GED block.
fn ged_register(layout: &AcpiLayout, offset: u64) -> GAS {
    GAS::new(
        AddressSpace::SystemMemory,
        8,
        0,
        AccessSize::ByteAccess,
        layout.ged_base + offset,
    )
}

fn fadt(layout: &AcpiLayout, dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, *b"CVMFACP ", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.reset_reg = ged_register(layout, GED_RESET);
    fadt.reset_value = GED_RESET_VALUE;
    fadt.sleep_control_reg = ged_register(layout, GED_SLEEP_CONTROL);
    fadt.sleep_status_reg = ged_register(layout, GED_SLEEP_STATUS);
    fadt.iapc_boot_arch =
        (IAPC_VGA_NOT_PRESENT | IAPC_PCIE_ASPM_CONTROLS | IAPC_CMOS_RTC_NOT_PRESENT).into();
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR).into();
    to_bytes(&fadt.finalize())
}

fn madt(layout: &AcpiLayout) -> Vec<u8> {
    let mut madt = Sdt::new(*b"APIC", 44, 5, OEM_ID, *b"CVMMADT ", OEM_REVISION);
    madt.write_u32(36, LAPIC_ADDR);
    madt.write_u32(40, MADT_PCAT_COMPAT);
    for cpu in 0..layout.cpus {
        // Processor UID and APIC ID are both the vCPU index.
        let mut entry = vec![MADT_LOCAL_APIC, 8, cpu, cpu];
        entry.extend_from_slice(&MADT_ENABLED.to_le_bytes());
        madt.append_slice(&entry);
    }
    let mut ioapic = vec![MADT_IO_APIC, 12, 0, 0];
    ioapic.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    madt.append_slice(&ioapic);
    // NMI on LINT1 of every processor (UID 0xff), bus-conforming.
    madt.append_slice(&[MADT_LOCAL_APIC_NMI, 6, 0xff, 0, 0, 1]);
    madt.as_slice().to_vec()
}

fn mcfg(layout: &AcpiLayout) -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, *b"CVMMCFG ", OEM_REVISION);
    mcfg.add_ecam(layout.ecam_base, 0, 0, layout.last_bus());
    to_bytes(&mcfg)
}

fn dsdt(layout: &AcpiLayout) -> Vec<u8> {
    // Revision 2: 64-bit AML integers.
    let mut dsdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, *b"CVMDSDT ", OEM_REVISION);
    dsdt.append_slice(&dsdt::dsdt_aml(layout));
    dsdt.as_slice().to_vec()
}
