//! The KVM plumbing on this machine's `/dev/kvm`, with tiny hand-assembled guests (a Linux
//! guest cannot boot on the CI machines' software KVM in useful time; see
//! ../shared/docs/environment.md). The guests write to the serial port and poke unmapped
//! ports and MMIO, then reset through the i8042 or power off through the ACPI GED.
//!
//! Expected values are the bytes the guest code writes, computed here.

#[path = "../common/mod.rs"]
mod common;

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm::arch::x86_64::layout;
use vmm::vstate::vcpu::EntryPoint;
use vmm::vstate::vm::{ExitReason, Vm, VmParams};

/// What every guest prints: "Hello\n", then an unmapped port's read (0xff), then an
/// unmapped MMIO read (low byte 0xff).
const EXPECTED: &[u8] = b"Hello\n\xff\xff";

/// How the guest ends.
#[derive(Clone, Copy)]
enum Tail {
    /// `out 0x64, 0xfe`: i8042 CPU reset.
    Reset,
    /// Write SLP_EN | SLP_TYP=S5 to the GED sleep control register.
    PowerOff,
}

/// Code valid both in 64-bit mode and in 32-bit protected mode (PVH entry).
fn guest_code(tail: Tail) -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for b in b"Hello\n" {
        c.extend([0xb0, *b, 0xee]); // mov al, b; out dx, al
    }
    c.extend([0xe4, 0x99, 0xee]); // in al, 0x99; out dx, al
    c.extend([0xbb, 0x00, 0x00, 0x00, 0xc0]); // mov ebx, 0xc0000000 (MMIO32, nothing there)
    c.extend([0x8b, 0x03, 0xee]); // mov eax, [rbx]; out dx, al
    match tail {
        Tail::Reset => c.extend([0xb0, 0xfe, 0xe6, 0x64]), // mov al, 0xfe; out 0x64, al
        Tail::PowerOff => {
            let ctl = (layout::GED_START + devices::acpi::GED_SLEEP_CONTROL) as u32;
            c.push(0xb8); // mov eax, GED sleep control
            c.extend(ctl.to_le_bytes());
            let value = devices::acpi::SLEEP_CONTROL_SLP_EN | (devices::acpi::SLEEP_TYPE_S5 << 2);
            c.extend([0xc6, 0x00, value]); // mov byte [rax], value
        }
    }
    c.extend([0xf4, 0xeb, 0xfd]); // 1: hlt; jmp 1b
    c
}

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs `code` at 1 MiB in long mode on a fresh VM; returns the exit and serial output.
fn run_tiny(cpus: u8, code: &[u8]) -> (ExitReason, Vec<u8>, Duration) {
    let out = Buf::default();
    let vm = Vm::new(VmParams {
        cpus,
        memory: 16 << 20,
        serial_out: Box::new(out.clone()),
        serial_input: false,
    })
    .expect("creating the VM");
    vm.memory()
        .write_slice(code, GuestAddress(layout::HIGH_RAM_START))
        .unwrap();
    let start = Instant::now();
    let reason = vm
        .run(EntryPoint::Linux64 {
            entry: layout::HIGH_RAM_START,
            boot_params: layout::ZERO_PAGE_START,
        })
        .expect("running the VM");
    let elapsed = start.elapsed();
    let bytes = out.0.lock().unwrap().clone();
    (reason, bytes, elapsed)
}

#[test]
fn serial_then_i8042_reset() {
    let (reason, out, elapsed) = run_tiny(1, &guest_code(Tail::Reset));
    assert_eq!(reason, ExitReason::Reset);
    assert_eq!(
        out,
        EXPECTED,
        "serial output {:?}",
        String::from_utf8_lossy(&out)
    );
    assert!(elapsed < Duration::from_secs(20), "took {elapsed:?}");
}

#[test]
fn two_vcpus_and_ged_power_off() {
    // The AP waits for INIT/SIPI inside KVM; stopping the VM must kick it out of KVM_RUN.
    let (reason, out, _) = run_tiny(2, &guest_code(Tail::PowerOff));
    assert_eq!(reason, ExitReason::PowerOff);
    assert_eq!(out, EXPECTED);
}

#[test]
fn many_vcpus_start_and_stop() {
    let (reason, out, _) = run_tiny(8, &guest_code(Tail::Reset));
    assert_eq!(reason, ExitReason::Reset);
    assert_eq!(out, EXPECTED);
}

#[test]
fn calibration_reports_a_speed() {
    let speed = vmm::kvm_speed().expect("calibrating");
    eprintln!("KVM speed: {speed:.3e} guest instructions/s");
    assert!(speed > 1e4, "{speed}");
}

// ---------------------------------------------------------------------------------------
// The same guests as "kernels" through `cryptvm run`: ELF (64-bit entry), ELF with a PVH
// note (32-bit entry), and bzImage (64-bit entry at load + 0x200).
// ---------------------------------------------------------------------------------------

const LOAD: u64 = 0x100_0000;

/// A minimal ELF64 executable: one PT_LOAD of `code` at `LOAD`, entry there, and a
/// XEN_ELFNOTE_PHYS32_ENTRY note when `pvh`.
fn elf_kernel(code: &[u8], pvh: bool) -> Vec<u8> {
    let mut note = Vec::new();
    if pvh {
        note.extend(4u32.to_le_bytes());
        note.extend(4u32.to_le_bytes());
        note.extend(18u32.to_le_bytes());
        note.extend(b"Xen\0");
        note.extend((LOAD as u32).to_le_bytes());
    }
    let phnum: u16 = if pvh { 2 } else { 1 };
    let data = 64 + 56 * u64::from(phnum);
    let mut f = Vec::new();
    f.extend(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    f.extend(2u16.to_le_bytes());
    f.extend(62u16.to_le_bytes());
    f.extend(1u32.to_le_bytes());
    f.extend(LOAD.to_le_bytes());
    f.extend(64u64.to_le_bytes());
    f.extend(0u64.to_le_bytes());
    f.extend(0u32.to_le_bytes());
    f.extend(64u16.to_le_bytes());
    f.extend(56u16.to_le_bytes());
    f.extend(phnum.to_le_bytes());
    f.extend([0u8; 6]);
    let phdr = |f: &mut Vec<u8>, ty: u32, off: u64, addr: u64, len: u64| {
        f.extend(ty.to_le_bytes());
        f.extend(5u32.to_le_bytes());
        for v in [off, addr, addr, len, len, 8] {
            f.extend(v.to_le_bytes());
        }
    };
    phdr(&mut f, 1, data, LOAD, code.len() as u64);
    if pvh {
        phdr(&mut f, 4, data + code.len() as u64, 0, note.len() as u64);
    }
    f.extend(code);
    f.extend(note);
    f
}

/// A minimal bzImage: one setup sector after the boot sector, then the protected-mode
/// part whose 64-bit entry (offset 0x200) is `code`.
fn bzimage_kernel(code: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 1024];
    f[0x1f1] = 1; // setup_sects
    f[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    f[0x202..0x206].copy_from_slice(b"HdrS");
    f[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    f[0x211] = 1; // LOADED_HIGH
    f[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    f[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    f[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes()); // kernel_alignment
    f[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes()); // cmdline_size
    f[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes()); // pref_address
    f[0x260..0x264].copy_from_slice(&0x10_0000u32.to_le_bytes()); // init_size
    f.extend(vec![0xf4; 0x200]);
    f.extend(code);
    f
}

fn run_kernel(dir: &Path, kernel: &[u8], extra: &[&str]) -> common::Run {
    std::fs::write(dir.join("kernel"), kernel).unwrap();
    std::fs::write(dir.join("initrd"), vec![0x42u8; 64 << 10]).unwrap();
    let mut args = vec![
        "run", "--kernel", "kernel", "--initrd", "initrd", "--memory", "64M",
    ];
    args.extend(extra);
    common::cryptvm(dir, args)
}

#[test]
fn cli_runs_an_elf_kernel_to_reset() {
    let dir = tempfile::tempdir().unwrap();
    let r = run_kernel(
        dir.path(),
        &elf_kernel(&guest_code(Tail::Reset), false),
        &[],
    )
    .ok();
    assert_eq!(
        r.stdout.as_bytes(),
        String::from_utf8_lossy(EXPECTED).as_bytes(),
        "{r}"
    );
    // This machine's software KVM adds its one warning (vmm/src/vstate/hw_virt.rs).
    assert!(
        common::without_slow_kvm_warning(&r.stderr).is_empty(),
        "{r}"
    );
}

/// On a CPU without VT-x/AMD-V (this project's machines: a software KVM) `cryptvm run`
/// says once, before the guest starts, that guests will be slow and what to run
/// instead; with hardware virtualisation it says nothing.
#[test]
fn cli_warns_once_when_kvm_has_no_hardware_virtualisation() {
    let dir = tempfile::tempdir().unwrap();
    let r = run_kernel(
        dir.path(),
        &elf_kernel(&guest_code(Tail::Reset), false),
        &[],
    )
    .ok();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let hardware = cpuinfo
        .lines()
        .filter(|l| l.split(':').next().is_some_and(|k| k.trim() == "flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    let warnings = r.stderr.matches("no hardware virtualisation").count();
    assert_eq!(warnings, usize::from(!hardware), "{r}");
    if !hardware {
        assert!(r.stderr.contains("resources/scripts/boot-guest.sh"), "{r}");
    }
}

#[test]
fn cli_runs_a_pvh_kernel_to_power_off_with_serial_to_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let r = run_kernel(
        dir.path(),
        &elf_kernel(&guest_code(Tail::PowerOff), true),
        &["--cpus", "2", "--serial", "file:console.log"],
    )
    .ok();
    assert!(r.stdout.is_empty(), "{r}");
    assert_eq!(
        std::fs::read(dir.path().join("console.log")).unwrap(),
        EXPECTED
    );
}

#[test]
fn cli_runs_a_bzimage_from_a_config_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("guest")).unwrap();
    std::fs::write(
        dir.path().join("guest/bz"),
        bzimage_kernel(&guest_code(Tail::Reset)),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("guest/vm.json"),
        r#"{"machine": {"cpus": 1, "memory": "32M"},
            "boot": {"kernel": "bz", "cmdline": "console=ttyS0"},
            "serial": "file:out.log"}"#,
    )
    .unwrap();
    common::cryptvm(dir.path(), ["run", "--config", "guest/vm.json"]).ok();
    assert_eq!(
        std::fs::read(dir.path().join("guest/out.log")).unwrap(),
        EXPECTED
    );
}

/// `--serial-max-size` caps what the guest writes to a serial console file: the rest is
/// dropped, said once in the file and on stderr, and the guest runs on (issue 12).
#[test]
fn serial_file_output_stops_at_its_size_limit() {
    let dir = tempfile::tempdir().unwrap();
    let r = run_kernel(
        dir.path(),
        &elf_kernel(&guest_code(Tail::PowerOff), true),
        &["--serial", "file:console.log", "--serial-max-size", "4"],
    )
    .ok();
    let log = String::from_utf8(std::fs::read(dir.path().join("console.log")).unwrap()).unwrap();
    assert_eq!(
        log, "Hell\n[cryptvm: guest output stopped here: serial-max-size is 4 bytes]\n",
        "{r}"
    );
    assert!(r.stderr.contains("serial-max-size limit"), "{r}");
    let bad = run_kernel(
        dir.path(),
        &elf_kernel(&guest_code(Tail::PowerOff), true),
        &["--serial", "file:console.log", "--serial-max-size", "lots"],
    );
    bad.clean_error(1, &["--serial-max-size", "'lots' is not a size"]);
}
