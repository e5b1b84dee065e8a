//! The DSDT's AML: the PCI host bridge, motherboard resources, COM1, the
//! power button, the GED and the `\_S5_` sleep package.
//!
//! Namespace (ASL):
//!
//! ```text
//! Name (\_S5, Package () { 5, 0 })        // SLP_TYP for the GED's sleep control register
//! Device (\_SB.PCI0)                      // PNP0A08 / PNP0A03, _SEG 0, _BBN 0, _UID 0
//!     _CRS: buses 0..n, IO 0xCF8/8, IO 0-0xCF7 and 0xD00-0xFFFF windows, MMIO32, MMIO64
//!     _OSC: grants SHPC hotplug, PME, AER, PCIe capability; never native PCIe hotplug
//!     Method (PCNT) {}                    // PCI hotplug hook, filled by the hotplug issue
//! Device (\_SB.MBRD)                      // PNP0C02: ECAM and GED registers are taken
//! Device (\_SB.COM1)                      // PNP0501 at 0x3F8, IRQ serial_irq
//! Device (\_SB.PWRB)                      // PNP0C0C power button
//! Device (\_SB.GED)                       // ACPI0013, Interrupt (ged_irq)
//!     OperationRegion (GDST, SystemMemory, ged_base, GED_LEN) { GEVT, 32 }
//!     Method (_EVT, 1, Serialized) {
//!         Local0 = GEVT                   // read clears the pending bits
//!         If (Local0 & 1) { Notify (\_SB.PWRB, 0x80) }
//!         If (Local0 & 2) { \_SB.PCI0.PCNT () }
//!     }
//! ```

use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, Arg, CreateDWordField, Device, EISAName, Else,
    Equal, Field, FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule, If, Interrupt,
    Local, Memory32Fixed, Method, MethodCall, Name, NotEqual, Notify, OpRegion, OpRegionSpace,
    Package, Path, ResourceTemplate, Return, Store, Uuid, IO,
};
use acpi_tables::Aml;
use devices::acpi::{GED_EVENT_PCI_HOTPLUG, GED_EVENT_POWER_BUTTON, GED_LEN};
use devices::pci::{PCI_CONFIG_IO_BASE, PCI_CONFIG_IO_LEN};

use super::{AcpiLayout, SLEEP_TYPE_S5};

/// The PCI Express/PCI host bridge _OSC UUID.
const PCI_OSC_UUID: &str = "33DB4D5B-1FF7-401C-9657-7441C03DD766";
/// _OSC control bits granted: SHPC hotplug, PME, AER, PCIe capability
/// structure. Bit 0 (native PCIe hotplug) stays with the firmware, so the
/// guest uses ACPI hotplug (acpiphp) through the GED.
const OSC_GRANTED_CONTROLS: u32 = 0x1e;
/// _OSC status (CDW1) bits.
const OSC_UNRECOGNIZED_UUID: u32 = 1 << 2;
const OSC_UNRECOGNIZED_REVISION: u32 = 1 << 3;
const OSC_CAPABILITIES_MASKED: u32 = 1 << 4;

/// AML for the whole DSDT body (without the table header).
pub(super) fn dsdt_aml(layout: &AcpiLayout) -> Vec<u8> {
    let mut aml = Vec::new();
    let s5 = Package::new(vec![&SLEEP_TYPE_S5, &aml::ZERO]);
    Name::new("_S5_".into(), &s5).to_aml_bytes(&mut aml);
    pci_host_bridge(layout, &mut aml);
    motherboard_resources(layout, &mut aml);
    serial(layout, &mut aml);
    Device::new(
        "_SB_.PWRB".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0C0C")),
            &Name::new("_UID".into(), &aml::ZERO),
        ],
    )
    .to_aml_bytes(&mut aml);
    ged(layout, &mut aml);
    aml
}

fn pci_host_bridge(layout: &AcpiLayout, sink: &mut Vec<u8>) {
    let last_bus = layout.last_bus();
    let bus_range = AddressSpace::new_bus_number(0u16, u16::from(last_bus));
    let cfg_ports = IO::new(
        PCI_CONFIG_IO_BASE as u16,
        PCI_CONFIG_IO_BASE as u16,
        1,
        PCI_CONFIG_IO_LEN as u8,
    );
    let io_low = AddressSpace::new_io(0u16, (PCI_CONFIG_IO_BASE - 1) as u16, None);
    let io_high = AddressSpace::new_io(0x0d00u16, 0xffffu16, None);
    // The MMIO32 window is checked to lie below 4 GiB by AcpiLayout::check.
    let mmio32 = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        layout.mmio32.start as u32,
        (layout.mmio32.end - 1) as u32,
        None,
    );
    let mmio64 = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        layout.mmio64.start,
        layout.mmio64.end.wrapping_sub(1),
        None,
    );
    let mut resources: Vec<&dyn Aml> = vec![&bus_range, &cfg_ports, &io_low, &io_high, &mmio32];
    if !layout.mmio64.is_empty() {
        resources.push(&mmio64);
    }
    let crs = ResourceTemplate::new(resources);
    let osc_body = osc_body();
    let osc = Method::new("_OSC".into(), 4, false, vec![&osc_body]);
    // Hook for PCI hotplug: the hotplug issue replaces this empty method with
    // one that notifies the slots whose state changed (acpiphp rescans).
    let pcnt = Method::new("PCNT".into(), 0, true, vec![]);
    Device::new(
        "_SB_.PCI0".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0A08")),
            &Name::new("_CID".into(), &EISAName::new("PNP0A03")),
            &Name::new("_ADR".into(), &aml::ZERO),
            &Name::new("_SEG".into(), &aml::ZERO),
            &Name::new("_UID".into(), &aml::ZERO),
            &Name::new("_BBN".into(), &aml::ZERO),
            &Name::new("_CRS".into(), &crs),
            &osc,
            &pcnt,
        ],
    )
    .to_aml_bytes(sink);
}

/// The body of `_OSC` for the host bridge:
///
/// ```text
/// Method (_OSC, 4) {
///     CreateDWordField (Arg3, 0, CDW1)
///     If (Arg0 == ToUUID ("33DB4D5B-...")) {
///         CreateDWordField (Arg3, 8, CDW3)
///         Local0 = CDW3 & 0x1E
///         If (Arg1 != 1) { CDW1 |= 0x08 }
///         If (CDW3 != Local0) { CDW1 |= 0x10 }
///         CDW3 = Local0
///     } Else { CDW1 |= 0x04 }
///     Return (Arg3)
/// }
/// ```
fn osc_body() -> RawAml {
    let mut body = Vec::new();
    let cdw1 = Path::new("CDW1");
    let cdw3 = Path::new("CDW3");
    CreateDWordField::new(&cdw1, &Arg(3), &0u8).to_aml_bytes(&mut body);
    let uuid = Uuid::new(PCI_OSC_UUID);
    let is_pci = Equal::new(&Arg(0), &uuid);
    let create_cdw3 = CreateDWordField::new(&cdw3, &Arg(3), &8u8);
    let granted = aml::And::new(&Local(0), &cdw3, &OSC_GRANTED_CONTROLS);
    let bad_rev = NotEqual::new(&Arg(1), &aml::ONE);
    let set_bad_rev = aml::Or::new(&cdw1, &cdw1, &OSC_UNRECOGNIZED_REVISION);
    let masked = NotEqual::new(&cdw3, &Local(0));
    let set_masked = aml::Or::new(&cdw1, &cdw1, &OSC_CAPABILITIES_MASKED);
    let store = Store::new(&cdw3, &Local(0));
    let if_bad_rev = If::new(&bad_rev, vec![&set_bad_rev]);
    let if_masked = If::new(&masked, vec![&set_masked]);
    If::new(
        &is_pci,
        vec![&create_cdw3, &granted, &if_bad_rev, &if_masked, &store],
    )
    .to_aml_bytes(&mut body);
    let set_bad_uuid = aml::Or::new(&cdw1, &cdw1, &OSC_UNRECOGNIZED_UUID);
    Else::new(vec![&set_bad_uuid]).to_aml_bytes(&mut body);
    Return::new(&Arg(3)).to_aml_bytes(&mut body);
    RawAml(body)
}

/// Pre-encoded AML bytes (for bodies whose parts borrow each other).
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

/// `PNP0C02` claims the ECAM and GED register ranges so that the guest
/// neither allocates over them nor rejects the MCFG area as unreserved.
fn motherboard_resources(layout: &AcpiLayout, sink: &mut Vec<u8>) {
    let ecam = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        layout.ecam_base,
        layout.ecam_base + layout.ecam_size - 1,
        None,
    );
    let ged = Memory32Fixed::new(true, layout.ged_base as u32, GED_LEN as u32);
    let crs = ResourceTemplate::new(vec![&ecam, &ged]);
    Device::new(
        "_SB_.MBRD".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0C02")),
            &Name::new("_UID".into(), &aml::ZERO),
            &Name::new("_CRS".into(), &crs),
        ],
    )
    .to_aml_bytes(sink);
}

fn serial(layout: &AcpiLayout, sink: &mut Vec<u8>) {
    let ports = IO::new(0x3f8, 0x3f8, 0, 8);
    let irq = Interrupt::new(true, true, false, false, layout.serial_irq);
    let crs = ResourceTemplate::new(vec![&ports, &irq]);
    Device::new(
        "_SB_.COM1".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0501")),
            &Name::new("_UID".into(), &aml::ZERO),
            &Name::new("_CRS".into(), &crs),
        ],
    )
    .to_aml_bytes(sink);
}

fn ged(layout: &AcpiLayout, sink: &mut Vec<u8>) {
    let irq = Interrupt::new(true, true, false, false, layout.ged_irq);
    let crs = ResourceTemplate::new(vec![&irq]);
    let base = layout.ged_base;
    let region = OpRegion::new("GDST".into(), OpRegionSpace::SystemMemory, &base, &GED_LEN);
    let field = Field::new(
        "GDST".into(),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![FieldEntry::Named(*b"GEVT", 32)],
    );
    let gevt = Path::new("GEVT");
    let read = Store::new(&Local(0), &gevt);
    let pwrb = Path::new("\\_SB_.PWRB");
    let power_bit = aml::And::new(&Local(1), &Local(0), &GED_EVENT_POWER_BUTTON);
    let is_power = Equal::new(&Local(1), &GED_EVENT_POWER_BUTTON);
    let notify = Notify::new(&pwrb, &0x80u8);
    let if_power = If::new(&is_power, vec![&notify]);
    let pci_bit = aml::And::new(&Local(1), &Local(0), &GED_EVENT_PCI_HOTPLUG);
    let is_pci = Equal::new(&Local(1), &GED_EVENT_PCI_HOTPLUG);
    let pcnt = MethodCall::new("\\_SB_.PCI0.PCNT".into(), vec![]);
    let if_pci = If::new(&is_pci, vec![&pcnt]);
    let evt = Method::new(
        "_EVT".into(),
        1,
        true,
        vec![&read, &power_bit, &if_power, &pci_bit, &if_pci],
    );
    Device::new(
        "_SB_.GED_".into(),
        vec![
            &Name::new("_HID".into(), &"ACPI0013"),
            &Name::new("_UID".into(), &aml::ZERO),
            &Name::new("_CRS".into(), &crs),
            &region,
            &field,
            &evt,
        ],
    )
    .to_aml_bytes(sink);
}
