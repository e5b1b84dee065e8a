//! The DSDT's AML: the PCI host bridge with its ACPI hotplug slots,
//! motherboard resources, COM1, the power button, the GED and the `\_S5_`
//! sleep package.
//!
//! Namespace (ASL):
//!
//! ```text
//! Name (\_S5, Package () { 5, 0 })        // SLP_TYP for the GED's sleep control register
//! Device (\_SB.PCI0)                      // PNP0A08 / PNP0A03, _SEG 0, _BBN 0, _UID 0
//!     _CRS: buses 0..n, IO 0xCF8/8, IO 0-0xCF7 and 0xD00-0xFFFF windows, MMIO32, MMIO64
//!     _OSC: grants SHPC hotplug, PME, AER, PCIe capability; never native PCIe hotplug,
//!           so Linux uses ACPI hotplug (acpiphp) for the slots below
//!     Mutex (BLCK, 0)                     // serialises PCNT and PCEJ on the registers
//!     OperationRegion (PCST, SystemMemory, pcihp_base, PCIHP_LEN)
//!     Field (PCST, DWordAcc, NoLock, WriteAsZeros) { PCIU, 32, PCID, 32, B0EJ, 32, PSEG, 32 }
//!     Method (PCEJ, 1, Serialized) {      // eject slot Arg0
//!         Acquire (BLCK, 0xFFFF)
//!         PSEG = 0                        // segment 0
//!         B0EJ = 1 << Arg0                // the VMM's acknowledgement of an unplug
//!         Release (BLCK)
//!         Return (0)
//!     }
//!     Device (S01) .. Device (S1F)        // one per hotpluggable slot n = 1..31 (hex names)
//!         Name (_SUN, n)
//!         Name (_ADR, n << 16)            // device n, function 0
//!         Method (_EJ0, 1, Serialized) { \_SB.PCI0.PCEJ (_SUN) }
//!     Method (DVNT, 2, Serialized) {      // notify Arg1 to every slot whose bit is in Arg0
//!         Local0 = Arg0 & 0x02  If (Local0 == 0x02) { Notify (S01, Arg1) }
//!         ...                             // up to S1F, bit 31
//!     }
//!     Method (PCNT, 0, Serialized) {      // called by the GED for GED_EVENT_PCI_HOTPLUG
//!         Acquire (BLCK, 0xFFFF)
//!         PSEG = 0
//!         DVNT (PCIU, 1)                  // device check: acpiphp scans the slot
//!         DVNT (PCID, 3)                  // eject request: acpiphp unbinds, calls _EJ0
//!         Release (BLCK)
//!     }
//! Device (\_SB.MBRD)                      // PNP0C02: ECAM, GED and PCI hotplug registers are taken
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
    self, Acquire, AddressSpace, AddressSpaceCacheable, Arg, CreateDWordField, Device, EISAName,
    Else, Equal, Field, FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule, If, Interrupt,
    Local, Memory32Fixed, Method, MethodCall, Name, NotEqual, Notify, OpRegion, OpRegionSpace,
    Package, Path, Release, ResourceTemplate, Return, ShiftLeft, Store, Uuid, IO,
};
use acpi_tables::Aml;
use devices::acpi::{
    GED_EVENT_PCI_HOTPLUG, GED_EVENT_POWER_BUTTON, GED_LEN, PCIHP_LEN, PCIHP_SLOTS,
};
use devices::pci::{PCI_CONFIG_IO_BASE, PCI_CONFIG_IO_LEN};

use super::{AcpiLayout, SLEEP_TYPE_S5};

/// Notify value: device check (re-enumerate the slot).
const NOTIFY_DEVICE_CHECK: u8 = 1;
/// Notify value: eject request.
const NOTIFY_EJECT_REQUEST: u8 = 3;
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
    let hotplug = pci_hotplug(layout);
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
            &hotplug,
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

/// The AML name of the device for `slot`: `S01_` .. `S1F_` (iasl prints `S01`).
fn slot_name(slot: u8) -> String {
    format!("S{slot:02X}_")
}

/// The PCI hotplug objects inside `\_SB_.PCI0` (see the module docs): the
/// register block, `PCEJ`, one device per slot in [`PCIHP_SLOTS`], `DVNT`
/// and `PCNT`, as Cloud Hypervisor and QEMU's PIIX4 describe them. Linux's
/// acpiphp takes every child of the host bridge with `_ADR` and `_EJ0` for
/// a hotplug slot.
fn pci_hotplug(layout: &AcpiLayout) -> RawAml {
    let mut aml = Vec::new();
    aml::Mutex::new("BLCK".into(), 0).to_aml_bytes(&mut aml);
    let base = layout.pcihp_base;
    OpRegion::new(
        "PCST".into(),
        OpRegionSpace::SystemMemory,
        &base,
        &PCIHP_LEN,
    )
    .to_aml_bytes(&mut aml);
    Field::new(
        "PCST".into(),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![
            FieldEntry::Named(*b"PCIU", 32),
            FieldEntry::Named(*b"PCID", 32),
            FieldEntry::Named(*b"B0EJ", 32),
            FieldEntry::Named(*b"PSEG", 32),
        ],
    )
    .to_aml_bytes(&mut aml);

    let pseg = Path::new("PSEG");
    let segment_0 = Store::new(&pseg, &aml::ZERO);
    let acquire = Acquire::new("BLCK".into(), 0xffff);
    let release = Release::new("BLCK".into());
    let b0ej = Path::new("B0EJ");
    let eject = ShiftLeft::new(&b0ej, &aml::ONE, &Arg(0));
    let ret = Return::new(&aml::ZERO);
    Method::new(
        "PCEJ".into(),
        1,
        true,
        vec![&acquire, &segment_0, &eject, &release, &ret],
    )
    .to_aml_bytes(&mut aml);

    let sun = Path::new("_SUN");
    let pcej = MethodCall::new("\\_SB_.PCI0.PCEJ".into(), vec![&sun]);
    let ej0 = Method::new("_EJ0".into(), 1, true, vec![&pcej]);
    let mut dvnt = Vec::new();
    for slot in PCIHP_SLOTS {
        let name = slot_name(slot);
        let adr = u32::from(slot) << 16;
        Device::new(
            name.as_str().into(),
            vec![
                &Name::new("_SUN".into(), &slot),
                &Name::new("_ADR".into(), &adr),
                &ej0,
            ],
        )
        .to_aml_bytes(&mut aml);
        // Local0 = Arg0 & (1 << slot); If (Local0 == (1 << slot)) { Notify (Sxx, Arg1) }
        let mask = 1u32 << slot;
        aml::And::new(&Local(0), &Arg(0), &mask).to_aml_bytes(&mut dvnt);
        let device = Path::new(&name);
        let notify = Notify::new(&device, &Arg(1));
        If::new(&Equal::new(&Local(0), &mask), vec![&notify]).to_aml_bytes(&mut dvnt);
    }
    Method::new("DVNT".into(), 2, true, vec![&RawAml(dvnt)]).to_aml_bytes(&mut aml);

    let pciu = Path::new("PCIU");
    let pcid = Path::new("PCID");
    let device_check = MethodCall::new("DVNT".into(), vec![&pciu, &NOTIFY_DEVICE_CHECK]);
    let eject_request = MethodCall::new("DVNT".into(), vec![&pcid, &NOTIFY_EJECT_REQUEST]);
    Method::new(
        "PCNT".into(),
        0,
        true,
        vec![
            &acquire,
            &segment_0,
            &device_check,
            &eject_request,
            &release,
        ],
    )
    .to_aml_bytes(&mut aml);
    RawAml(aml)
}

/// Pre-encoded AML bytes (for bodies whose parts borrow each other).
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

/// `PNP0C02` claims the ECAM, GED and PCI hotplug register ranges so that
/// the guest neither allocates over them nor rejects the MCFG area as
/// unreserved.
fn motherboard_resources(layout: &AcpiLayout, sink: &mut Vec<u8>) {
    let ecam = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        layout.ecam_base,
        layout.ecam_base + layout.ecam_size - 1,
        None,
    );
    // Both blocks are checked to lie below 4 GiB by AcpiLayout::check.
    let ged = Memory32Fixed::new(true, layout.ged_base as u32, GED_LEN as u32);
    let pcihp = Memory32Fixed::new(true, layout.pcihp_base as u32, PCIHP_LEN as u32);
    let crs = ResourceTemplate::new(vec![&ecam, &ged, &pcihp]);
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
