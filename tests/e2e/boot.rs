//! End-to-end: the test guest (Debian's cloud kernel and a busybox initramfs, built by
//! resources/guest/build.sh) boots to its init with 1 and 2 vCPUs, from the bzImage and
//! from the ELF vmlinux, sees its CPUs and an ACPI-enabled IOAPIC, prints its marker,
//! and powers off; the VMM then exits 0. A guest that writes 5 to an isa-debug-exit
//! port instead ends the VMM with status 11.
//!
//! Each case runs twice: under QEMU 10 (`-enable-kvm -M pc`), the reference that proves
//! the guest and the harness, and under `cryptvm run`, the product. On this project's
//! machines each boot runs nested inside the QEMU TCG test host (see harness.rs): about
//! 12 s of wall time each.
//!
//! `CRYPTVM_E2E_VMM=qemu` makes the product cases boot with QEMU too (to exercise them
//! before cryptvm can boot: `cargo test -p vmm --test e2e_boot -- --include-ignored`);
//! `CRYPTVM_E2E_MODE=direct|nested` overrides the calibrated mode.

#[path = "harness.rs"]
mod harness;

use harness::{Kernel, Mode, Outcome, Scenario, Vmm};
use std::time::Duration;

/// Whether to skip (printing why): a tool the harness needs is missing, outside CI.
fn skip() -> bool {
    match harness::skip_reason() {
        Some(reason) => {
            eprintln!("skipped: {reason}");
            true
        }
        None => false,
    }
}

/// Boots the guest and checks everything the issue's "done when" asks of a boot.
fn boot(vmm: Vmm, kernel: Kernel, cpus: u32) {
    if skip() {
        return;
    }
    let name = format!(
        "boot-{}-{}-{cpus}cpu",
        match vmm {
            Vmm::Qemu => "qemu",
            Vmm::Cryptvm => "cryptvm",
        },
        match kernel {
            Kernel::BzImage => "bzimage",
            Kernel::Elf => "elf",
        }
    );
    let out = Scenario::new(&name)
        .vmm(vmm)
        .kernel(kernel)
        .cpus(cpus)
        .run();
    check_boot(&out, cpus);
}

#[track_caller]
fn check_boot(out: &Outcome, cpus: u32) {
    let marker = out
        .marker()
        .unwrap_or_else(|| panic!("the guest printed no CRYPTVM-GUEST-UP marker:\n{out}"));
    assert_eq!(marker.get("cpus"), cpus.to_string(), "CPUs seen:\n{out}");
    let online = if cpus == 1 {
        "0".to_string()
    } else {
        format!("0-{}", cpus - 1)
    };
    assert_eq!(marker.get("online"), online, "CPUs online:\n{out}");
    assert_eq!(marker.get("acpi"), "yes", "ACPI tables:\n{out}");
    assert_eq!(marker.get("madt"), "yes", "MADT:\n{out}");
    assert_eq!(
        marker.get("ioapic_acpi"),
        "yes",
        "IOAPIC from the MADT, ACPI routing through it:\n{out}"
    );
    assert!(
        marker.get("ioapic").parse::<u32>().unwrap_or(0) > 0,
        "interrupts through the IOAPIC:\n{out}"
    );
    assert_eq!(marker.get("virtio"), "6", "virtio modules loaded:\n{out}");
    assert_eq!(out.scenario_rc(), Some(0), "scenario status:\n{out}");
    assert!(out.powered_off(), "the guest did not power off:\n{out}");
    assert_eq!(out.exit_code, Some(0), "VMM exit code:\n{out}");
}

/// A scenario for `vmm` with an isa-debug-exit device at port 0xf4, or None when the
/// test cannot run here.
fn with_debug_exit(vmm: Vmm, name: &str) -> Option<Scenario> {
    if skip() {
        return None;
    }
    if vmm == Vmm::Qemu && harness::default_mode() == Mode::Nested {
        // Seen in the TCG test host: with QEMU as the L2 VMM the guest's user-mode `outb`
        // faults (SIGSEGV) although ioperm (or iopl) succeeded; under cryptvm it works.
        eprintln!(
            "skipped: QEMU's guest cannot do port I/O from user mode in the nested test host"
        );
        return None;
    }
    Some(
        Scenario::new(name)
            .vmm(vmm)
            .vmm_args(["--device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]),
    )
}

/// The guest writes 5 to an `isa-debug-exit` port (`blkio outb`: its kernel has no
/// /dev/port): the VMM exits with (5 << 1) | 1 = 11, as QEMU does.
fn debug_exit(vmm: Vmm, name: &str) {
    let Some(scenario) = with_debug_exit(vmm, name) else {
        return;
    };
    let out = scenario
        .guest_script(
            "blkio outb 0xf4 5 || echo CRYPTVM-TEST outb failed rc=$?\nsleep 60\nexit 1\n",
        )
        .run();
    assert!(
        !out.l2_console.contains("CRYPTVM-TEST outb failed"),
        "the guest could not write the port:\n{out}"
    );
    assert_eq!(out.exit_code, Some(11), "VMM exit code:\n{out}");
    assert!(!out.powered_off(), "the guest powered off instead:\n{out}");
}

/// The test guest's init reports a failed scenario through isa-debug-exit
/// (`cryptvm.debug_exit=0xf4`): a scenario that exits 3 makes the VMM exit (3 << 1) | 1.
fn failed_scenario_sets_the_exit_status(vmm: Vmm, name: &str) {
    let Some(scenario) = with_debug_exit(vmm, name) else {
        return;
    };
    let out = scenario
        .cmdline("cryptvm.debug_exit=0xf4")
        .guest_script("echo CRYPTVM-TEST failing on purpose\nexit 3\n")
        .run();
    assert_eq!(out.scenario_rc(), Some(3), "scenario status:\n{out}");
    assert!(
        !out.l2_console.contains("isa-debug-exit write"),
        "the guest could not write the port:\n{out}"
    );
    assert_eq!(out.exit_code, Some(7), "VMM exit code:\n{out}");
    assert!(!out.powered_off(), "the guest powered off instead:\n{out}");
}

/// QEMU 10, the reference: proves the guest, the test host and the harness.
mod qemu {
    use super::*;

    #[test]
    fn bzimage_1_cpu() {
        boot(Vmm::Qemu, Kernel::BzImage, 1);
    }

    #[test]
    fn bzimage_2_cpus() {
        boot(Vmm::Qemu, Kernel::BzImage, 2);
    }

    #[test]
    fn elf_1_cpu() {
        boot(Vmm::Qemu, Kernel::Elf, 1);
    }

    #[test]
    fn elf_2_cpus() {
        boot(Vmm::Qemu, Kernel::Elf, 2);
    }

    #[test]
    fn isa_debug_exit_sets_the_exit_status() {
        debug_exit(Vmm::Qemu, "debug-exit-qemu");
    }

    #[test]
    fn failed_scenario_sets_the_exit_status() {
        super::failed_scenario_sets_the_exit_status(Vmm::Qemu, "failed-scenario-qemu");
    }

    /// A scenario script from the test runs in the guest, and its exit status and output
    /// come back; files the run script leaves in L1's /out come back too.
    #[test]
    fn guest_script_runs() {
        if skip() {
            return;
        }
        let out = Scenario::new("script-qemu")
            .vmm(Vmm::Qemu)
            .guest_script("echo CRYPTVM-TEST hello from $(uname -m)\nexit 3\n")
            .run();
        assert!(
            out.l2_console.contains("CRYPTVM-TEST hello from x86_64"),
            "script output:\n{out}"
        );
        assert_eq!(out.scenario_rc(), Some(3), "scenario status:\n{out}");
        assert_eq!(out.exit_code, Some(0), "VMM exit code:\n{out}");
        assert!(out.out_files.contains_key("l2-console.txt"), "{out}");
    }
}

/// `cryptvm run`, the product (`CRYPTVM_E2E_VMM=qemu` swaps in QEMU).
mod cryptvm {
    use super::*;

    fn vmm() -> Vmm {
        Vmm::from_env_or(Vmm::Cryptvm)
    }

    #[test]
    fn bzimage_1_cpu() {
        boot(vmm(), Kernel::BzImage, 1);
    }

    #[test]
    fn bzimage_2_cpus() {
        boot(vmm(), Kernel::BzImage, 2);
    }

    #[test]
    fn elf_1_cpu() {
        boot(vmm(), Kernel::Elf, 1);
    }

    #[test]
    fn elf_2_cpus() {
        boot(vmm(), Kernel::Elf, 2);
    }

    #[test]
    fn isa_debug_exit_sets_the_exit_status() {
        debug_exit(vmm(), "debug-exit-cryptvm");
    }

    #[test]
    fn failed_scenario_sets_the_exit_status() {
        super::failed_scenario_sets_the_exit_status(vmm(), "failed-scenario-cryptvm");
    }

    /// A guest whose scenario hangs is stopped at `--timeout`: exit status 124 and one
    /// line on stderr (docs/run.md), however long the guest would have gone on. QEMU has
    /// no such option: cryptvm only.
    #[test]
    fn hung_guest_ends_at_the_timeout() {
        if skip() {
            return;
        }
        const LIMIT_S: u64 = 40;
        let out = Scenario::new("hung-guest")
            .vmm(Vmm::Cryptvm)
            .vmm_args(["--timeout", &LIMIT_S.to_string()])
            .guest_script("echo CRYPTVM-TEST hanging\nwhile :; do sleep 1; done\n")
            .timeout(Duration::from_secs(LIMIT_S + 150))
            .run();
        assert!(
            out.l2_console.contains("CRYPTVM-TEST hanging"),
            "the guest never reached its scenario within {LIMIT_S} s:\n{out}"
        );
        assert_eq!(out.scenario_rc(), None, "the scenario ended:\n{out}");
        assert_eq!(out.exit_code, Some(124), "VMM exit code:\n{out}");
        assert!(
            out.vmm_stderr
                .contains("cryptvm: --timeout: the guest still ran after"),
            "stderr:\n{out}"
        );
    }
}

/// The harness's own parts that need no VM.
mod harness_parts {
    use super::harness::*;

    #[test]
    fn newc_archive_is_what_cpio_reads() {
        let archive = newc_archive(&[("scenario.sh", b"echo hi\n", 0o100755)]);
        assert_eq!(archive.len() % 512, 0);
        assert!(archive.starts_with(b"070701"));
        let Some(cpio) = harness_cpio() else {
            eprintln!("cpio is not installed: skipping the cross-check");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new(cpio)
            .args(["-i", "--quiet", "--no-absolute-filenames"])
            .current_dir(dir.path())
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&archive).unwrap();
        assert!(child.wait().unwrap().success());
        assert_eq!(
            std::fs::read(dir.path().join("scenario.sh")).unwrap(),
            b"echo hi\n"
        );
    }

    fn harness_cpio() -> Option<std::path::PathBuf> {
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .map(|d| d.join("cpio"))
            .find(|p| p.is_file())
    }

    #[test]
    fn scenario_status_survives_the_kernel_writing_on_its_line() {
        assert_eq!(scenario_rc_in("x\nCRYPTVM-SCENARIO-END rc=7\r\n"), Some(7));
        let interleaved = "CRYPTVM-SCENARIO-END rc=0[   14.161533] reboot: Power down\n";
        assert_eq!(scenario_rc_in(interleaved), Some(0));
        assert_eq!(scenario_rc_in("CRYPTVM-SCENARIO-END rc=\n"), None);
        assert_eq!(scenario_rc_in("CRYPTVM-GUEST-UP cpus=1\n"), None);
    }

    #[test]
    fn shell_join_quotes() {
        let argv = ["a".to_string(), "b c".to_string(), "it's".to_string()];
        assert_eq!(shell_join(&argv), r"a 'b c' 'it'\''s'");
    }
}
