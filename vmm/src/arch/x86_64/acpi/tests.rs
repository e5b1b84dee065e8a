//! Reads the tables back from guest memory the way a guest would and checks
//! what it would rely on.

use super::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM_SIZE: usize = 2 << 20;

fn layout(cpus: u8) -> AcpiLayout {
    AcpiLayout {
        cpus,
        ecam_base: 0xe000_0000,
        ecam_size: 0x1000_0000,
        mmio32: 0xc000_0000..0xe000_0000,
        mmio64: 0x1_0000_0000..0x11_0000_0000,
        ged_base: 0xfeb0_0000,
        pcihp_base: 0xfeb0_0100,
        ged_irq: 5,
        serial_irq: 4,
        tables_base: 0xe_0000,
    }
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn bytes(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
}

/// Reads a whole system description table at `addr`, checking its checksum.
fn table(mem: &GuestMemoryMmap, addr: u64, signature: &[u8; 4]) -> Vec<u8> {
    let header = bytes(mem, addr, 36);
    assert_eq!(&header[..4], signature, "signature at {addr:#x}");
    let len = u32_at(&header, 4) as usize;
    assert!(len >= 36);
    let t = bytes(mem, addr, len);
    assert_eq!(
        sum(&t),
        0,
        "{} checksum",
        String::from_utf8_lossy(signature)
    );
    assert_eq!(&t[10..16], b"CRYPTV");
    t
}

/// All tables of a 2-vCPU machine, by signature, found through RSDP -> XSDT.
struct Tables {
    rsdp: u64,
    xsdt: Vec<u8>,
    fadt: Vec<u8>,
    madt: Vec<u8>,
    mcfg: Vec<u8>,
    dsdt: Vec<u8>,
    dsdt_addr: u64,
}

fn build(cpus: u8) -> Tables {
    let mem = memory();
    let l = layout(cpus);
    let rsdp = create_acpi_tables(&mem, &l).unwrap();
    assert_eq!(rsdp, GuestAddress(l.tables_base));
    let r = bytes(&mem, rsdp.0, 36);
    assert_eq!(&r[..8], b"RSD PTR ");
    assert_eq!(sum(&r[..20]), 0, "RSDP v1 checksum");
    assert_eq!(sum(&r), 0, "RSDP extended checksum");
    assert_eq!(r[15], 2, "revision");
    assert_eq!(u32_at(&r, 20), 36, "length");
    let xsdt_addr = u64_at(&r, 24);
    let xsdt = table(&mem, xsdt_addr, b"XSDT");
    let entries: Vec<u64> = xsdt[36..].chunks(8).map(|c| u64_at(c, 0)).collect();
    assert_eq!(entries.len(), 3);
    for &e in &entries {
        assert_eq!(e % 16, 0, "tables are 16-byte aligned");
        assert!(e > rsdp.0);
    }
    let fadt = table(&mem, entries[0], b"FACP");
    let madt = table(&mem, entries[1], b"APIC");
    let mcfg = table(&mem, entries[2], b"MCFG");
    let dsdt_addr = u64_at(&fadt, 140);
    let dsdt = table(&mem, dsdt_addr, b"DSDT");
    Tables {
        rsdp: rsdp.0,
        xsdt,
        fadt,
        madt,
        mcfg,
        dsdt,
        dsdt_addr,
    }
}

#[test]
fn rsdp_xsdt_chain() {
    let t = build(2);
    assert_eq!(t.rsdp % 16, 0);
    assert_eq!(t.xsdt.len(), 36 + 3 * 8);
    assert!(t.dsdt_addr > t.rsdp);
}

#[test]
fn fadt_is_hardware_reduced_with_ged_registers() {
    let t = build(1);
    let f = &t.fadt;
    assert_eq!(f.len(), 276);
    assert_eq!(f[8], 6, "major version");
    assert_eq!(f[131], 5, "minor version");
    assert_eq!(u32_at(f, 40), 0, "no 32-bit DSDT pointer");
    assert_eq!(u64_at(f, 140), t.dsdt_addr, "X_DSDT");
    let flags = u32_at(f, 112);
    assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
    let iapc = u16_at(f, 109);
    assert_eq!(iapc & 0b11, 0, "no legacy devices, no 8042");
    assert_ne!(iapc & (1 << 2), 0, "no VGA");
    assert_eq!(iapc & (1 << 3), 0, "MSI allowed");
    let ged = layout(1).ged_base;
    let gas = |off: usize| {
        (
            f[off],
            f[off + 1],
            f[off + 2],
            f[off + 3],
            u64_at(f, off + 4),
        )
    };
    // GAS: system memory, 8 bits, offset 0, byte access.
    assert_eq!(gas(116), (0, 8, 0, 1, ged + devices::acpi::GED_RESET));
    assert_eq!(f[128], devices::acpi::GED_RESET_VALUE);
    assert_eq!(
        gas(244),
        (0, 8, 0, 1, ged + devices::acpi::GED_SLEEP_CONTROL)
    );
    assert_eq!(
        gas(256),
        (0, 8, 0, 1, ged + devices::acpi::GED_SLEEP_STATUS)
    );
    assert_eq!(&f[268..276], b"CRYPTVM ");
}

#[test]
fn madt_lists_every_cpu_the_ioapic_and_overrides() {
    for cpus in [1u8, 2, 32] {
        let t = build(cpus);
        let m = &t.madt;
        assert_eq!(u32_at(m, 36), 0xfee0_0000);
        assert_eq!(u32_at(m, 40) & 1, 1, "PCAT_COMPAT");
        let mut off = 44;
        let (mut lapics, mut ioapics, mut overrides, mut nmis) = (Vec::new(), 0, 0, 0);
        while off < m.len() {
            let (kind, len) = (m[off], m[off + 1] as usize);
            assert!(len >= 2 && off + len <= m.len(), "entry at {off}");
            let e = &m[off..off + len];
            match kind {
                0 => {
                    assert_eq!(len, 8);
                    assert_eq!(e[2], e[3], "UID = APIC ID");
                    assert_eq!(u32_at(e, 4), 1, "enabled");
                    lapics.push(e[3]);
                }
                1 => {
                    assert_eq!(len, 12);
                    assert_eq!(u32_at(e, 4), 0xfec0_0000);
                    assert_eq!(u32_at(e, 8), 0, "GSI base");
                    ioapics += 1;
                }
                2 => {
                    assert_eq!(len, 10);
                    assert_eq!((e[2], e[3], u32_at(e, 4)), (0, 0, 2), "IRQ0 -> GSI2");
                    overrides += 1;
                }
                4 => {
                    assert_eq!(len, 6);
                    assert_eq!((e[2], e[5]), (0xff, 1), "all CPUs, LINT1");
                    nmis += 1;
                }
                k => panic!("unexpected MADT entry type {k}"),
            }
            off += len;
        }
        assert_eq!(off, m.len());
        assert_eq!(lapics, (0..cpus).collect::<Vec<_>>());
        // No overrides: KVM's default routing has the PIT on pin 0.
        assert_eq!((ioapics, overrides, nmis), (1, 0, 1));
        assert_eq!(lapics.len() + ioapics, usize::from(cpus) + 1);
    }
}

#[test]
fn mcfg_describes_the_ecam() {
    let t = build(1);
    let m = &t.mcfg;
    assert_eq!(m.len(), 44 + 16);
    assert_eq!(u64_at(m, 44), 0xe000_0000);
    assert_eq!(u16_at(m, 52), 0, "segment");
    assert_eq!((m[54], m[55]), (0, 255), "buses");

    let mem = memory();
    let mut l = layout(1);
    l.ecam_size = 16 << 20;
    create_acpi_tables(&mem, &l).unwrap();
    let xsdt = table(&mem, u64_at(&bytes(&mem, l.tables_base, 36), 24), b"XSDT");
    let mcfg = table(&mem, u64_at(&xsdt, 36 + 16), b"MCFG");
    assert_eq!((mcfg[54], mcfg[55]), (0, 15));
}

#[test]
fn dsdt_names_the_devices() {
    let t = build(2);
    let d = &t.dsdt;
    assert_eq!(d[8], 2, "revision 2: 64-bit integers");
    let has = |needle: &[u8]| d.windows(needle.len()).any(|w| w == needle);
    for name in [
        &b"_S5_"[..],
        b"PCI0",
        b"_OSC",
        b"PCNT",
        b"MBRD",
        b"COM1",
        b"PWRB",
        b"GED_",
        b"ACPI0013",
        b"_EVT",
        b"GEVT",
        b"BLCK",
        b"PCST",
        b"PCIU",
        b"PCID",
        b"B0EJ",
        b"PSEG",
        b"PCEJ",
        b"DVNT",
        b"_SUN",
        b"_EJ0",
        b"S01_",
        b"S1F_",
    ] {
        assert!(has(name), "{}", String::from_utf8_lossy(name));
    }
    // No slot device for the host bridge (slot 0) or past slot 31.
    assert!(!has(b"S00_") && !has(b"S20_"));
    // EISA IDs are encoded as dwords: PNP0A08 = 0x080ad041.
    assert!(has(&0x080a_d041u32.to_le_bytes()));
}

/// `OperationRegion (name, SystemMemory, base, len)` as AML bytes, with the
/// DWordConst base and ByteConst length these tables use.
fn system_memory_region(name: &[u8; 4], base: u32, len: u8) -> Vec<u8> {
    let mut v = vec![0x5b, 0x80];
    v.extend_from_slice(name);
    v.extend_from_slice(&[0x00, 0x0c]);
    v.extend_from_slice(&base.to_le_bytes());
    v.extend_from_slice(&[0x0a, len]);
    v
}

#[test]
fn pci_hotplug_region_follows_the_layout() {
    let mem = memory();
    let mut l = layout(1);
    l.pcihp_base = 0xfeb0_0200;
    create_acpi_tables(&mem, &l).unwrap();
    let xsdt = table(&mem, u64_at(&bytes(&mem, l.tables_base, 36), 24), b"XSDT");
    let fadt = table(&mem, u64_at(&xsdt, 36), b"FACP");
    let d = table(&mem, u64_at(&fadt, 140), b"DSDT");
    let has = |needle: &[u8]| d.windows(needle.len()).any(|w| w == needle);
    let len = devices::acpi::PCIHP_LEN as u8;
    assert!(has(&system_memory_region(b"PCST", 0xfeb0_0200, len)));
    assert!(!has(&system_memory_region(b"PCST", 0xfeb0_0100, len)));
    // Memory32Fixed (ReadWrite, base, PCIHP_LEN) in the motherboard resources.
    let mut fixed = vec![0x86, 0x09, 0x00, 0x01];
    fixed.extend_from_slice(&0xfeb0_0200u32.to_le_bytes());
    fixed.extend_from_slice(&u32::from(len).to_le_bytes());
    assert!(has(&fixed));
    // The GED's region is still where it was.
    assert!(has(&system_memory_region(
        b"GDST",
        0xfeb0_0000,
        devices::acpi::GED_LEN as u8
    )));
}

#[test]
fn bad_layouts_are_refused() {
    let mem = memory();
    type Spoil = fn(&mut AcpiLayout);
    let cases: [(&str, Spoil); 9] = [
        ("vCPUs", |l| l.cpus = 0),
        ("aligned", |l| l.tables_base += 8),
        ("ECAM", |l| l.ecam_size = 0x1234),
        ("ECAM", |l| l.ecam_size = 512 << 20),
        ("MMIO32", |l| l.mmio32 = 0xc000_0000..0x1_2000_0000),
        ("GED", |l| l.ged_base = 1 << 32),
        ("PCI hotplug", |l| l.pcihp_base = (1 << 32) - 8),
        ("overlap the GED", |l| l.pcihp_base = l.ged_base + 8),
        ("overlap the GED", |l| l.pcihp_base = l.ged_base - 8),
    ];
    for (why, f) in cases {
        let mut l = layout(1);
        f(&mut l);
        let e = create_acpi_tables(&mem, &l).unwrap_err();
        assert!(matches!(e, AcpiError::Layout(_)), "{e}");
        assert!(e.to_string().contains(why), "{e}");
    }
    let mut l = layout(1);
    l.tables_base = MEM_SIZE as u64 - 64;
    let e = create_acpi_tables(&mem, &l).unwrap_err();
    assert!(matches!(e, AcpiError::Write { .. }), "{e}");
}

#[test]
fn empty_mmio64_window_is_left_out() {
    let mem = memory();
    let mut l = layout(1);
    l.mmio64 = 0..0;
    create_acpi_tables(&mem, &l).unwrap();
    let full = build(1).dsdt;
    let xsdt = table(&mem, u64_at(&bytes(&mem, l.tables_base, 36), 24), b"XSDT");
    let fadt = table(&mem, u64_at(&xsdt, 36), b"FACP");
    let dsdt = table(&mem, u64_at(&fadt, 140), b"DSDT");
    // One QWordMemory descriptor (46 bytes) fewer.
    assert_eq!(full.len() - dsdt.len(), 46);
}

/// Disassembles and recompiles the DSDT with ACPICA's `iasl` to prove the
/// AML is well formed. Skipped (with a note) when `iasl` is not installed
/// (Debian: `apt-get install acpica-tools`).
#[test]
fn dsdt_disassembles_and_recompiles_with_iasl() {
    use std::process::Command;
    if Command::new("iasl").arg("-v").output().is_err() {
        eprintln!("note: iasl not found (acpica-tools); skipping the DSDT disassembly check");
        return;
    }
    let t = build(2);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dsdt.aml"), &t.dsdt).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new("iasl")
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "iasl {args:?} failed:\n{text}");
        text
    };
    run(&["-d", "dsdt.aml"]);
    let dsl = std::fs::read_to_string(dir.path().join("dsdt.dsl")).unwrap();
    for needle in [
        "Device (_SB.PCI0)",
        "EisaId (\"PNP0A08\")",
        "Method (_OSC, 4, NotSerialized)",
        "ToUUID (\"33db4d5b-1ff7-401c-9657-7441c03dd766\")",
        "WordBusNumber",
        "QWordMemory",
        "Name (_HID, \"ACPI0013\"",
        "Method (_EVT, 1, Serialized)",
        "Notify (\\_SB.PWRB, 0x80)",
        "\\_SB.PCI0.PCNT ()",
        "EisaId (\"PNP0501\")",
        "EisaId (\"PNP0C0C\")",
        "Name (_S5, Package",
        // PCI hotplug (Cloud Hypervisor / QEMU PIIX4 style).
        "Mutex (BLCK, 0x00)",
        "OperationRegion (PCST, SystemMemory, 0xFEB00100, 0x10)",
        "Field (PCST, DWordAcc, NoLock, WriteAsZeros)",
        "PCIU,   32, \n            PCID,   32, \n            B0EJ,   32, \n            PSEG,   32\n",
        "Method (PCEJ, 1, Serialized)",
        "Acquire (BLCK, 0xFFFF)",
        "B0EJ = (One << Arg0)",
        "Release (BLCK)",
        "Method (DVNT, 2, Serialized)",
        "Method (PCNT, 0, Serialized)",
        "PSEG = Zero\n            DVNT (PCIU, One)\n            DVNT (PCID, 0x03)\n",
        "0xFEB00100,         // Address Base",
    ] {
        assert!(dsl.contains(needle), "{needle} missing from:\n{dsl}");
    }
    assert!(!dsl.contains("External ("), "unresolved references:\n{dsl}");
    // One slot device per hotpluggable slot, each notified by DVNT.
    for slot in devices::acpi::PCIHP_SLOTS {
        let start = dsl
            .find(&format!("Device (S{slot:02X})\n"))
            .unwrap_or_else(|| panic!("no device for slot {slot}:\n{dsl}"));
        let end = start + dsl[start..].find("\n        }\n").unwrap();
        let device = &dsl[start..end];
        let sun = match slot {
            1 => "One".to_string(),
            n => format!("0x{n:02X}"),
        };
        for needle in [
            format!("Name (_SUN, {sun})"),
            format!("Name (_ADR, 0x{:08X})", u32::from(slot) << 16),
            "Method (_EJ0, 1, Serialized)".to_string(),
            "\\_SB.PCI0.PCEJ (_SUN)".to_string(),
        ] {
            assert!(device.contains(&needle), "{needle} missing from:\n{device}");
        }
        // iasl prints constants as byte, word or dword.
        let width = match slot {
            0..=7 => 2,
            8..=15 => 4,
            _ => 8,
        };
        let mask = format!("0x{:0width$X}", 1u32 << slot);
        let notify = format!(
            "Local0 = (Arg0 & {mask})\n            If ((Local0 == {mask}))\n            {{\n                Notify (S{slot:02X}, Arg1)"
        );
        assert!(dsl.contains(&notify), "{notify} missing from:\n{dsl}");
    }
    assert!(!dsl.contains("Device (S00)") && !dsl.contains("Device (S20)"));
    assert_eq!(dsl.matches("Method (_EJ0, 1, Serialized)").count(), 31);
    // Recompile the disassembly: errors here mean malformed AML, and the
    // only warning is the host bridge having both _HID and _ADR (as Cloud
    // Hypervisor's does).
    std::fs::write(dir.path().join("re.dsl"), &dsl).unwrap();
    let text = run(&["-p", "re", "re.dsl"]);
    assert!(text.contains("0 Errors"), "{text}");
    for line in text.lines().filter(|l| l.starts_with("Warning")) {
        assert!(line.starts_with("Warning  3073"), "{text}");
    }

    // iasl's decoding of the static tables agrees with what we meant.
    for (name, table, needles) in [
        (
            "facp",
            &t.fadt,
            &[
                "Hardware Reduced (V5) : 1",
                "Reset Register Supported (V2) : 1",
                "Address : 00000000FEB00004",
                "Value to cause reset : 01",
            ][..],
        ),
        ("apic", &t.madt, &["Local Apic ID : 01", "[I/O APIC]"][..]),
        ("mcfg", &t.mcfg, &["End Bus Number : FF"][..]),
    ] {
        std::fs::write(dir.path().join(format!("{name}.dat")), table).unwrap();
        run(&["-d", &format!("{name}.dat")]);
        let dsl = std::fs::read_to_string(dir.path().join(format!("{name}.dsl"))).unwrap();
        for needle in needles {
            assert!(dsl.contains(needle), "{needle} missing from:\n{dsl}");
        }
    }
}
