//! `cryptvm run`: build a VM from a [`VmConfig`], boot its kernel, run it until the guest
//! powers off or resets (exit status 0), writes V to an `isa-debug-exit` port (status
//! `(V << 1) | 1`), runs past `--timeout` ([`TIMEOUT_STATUS`]) or the VMM fails (one line
//! on stderr, status 1).

use std::fs::{File, OpenOptions};
use std::io::IsTerminal;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use devices::WorkerPool;
use serde_json::json;
use vm_memory::GuestAddress;

use crate::arch::x86_64::acpi::AcpiLayout;
use crate::arch::x86_64::boot::{self, BootSpec};
use crate::arch::x86_64::layout;
use crate::cli::capped_output::CappedOutput;
use crate::cli::terminal::RawMode;
use crate::config::coldplug::ColdPlug;
use crate::config::{SerialConfig, VmConfig};
use crate::control::vm_control::VmControl;
use crate::control::Action;
use crate::device_manager::{Machine, MachineParams};
use crate::qmp::{EventBus, QmpServer};
use crate::vstate::vm::{ExitReason, Vm, VmParams};

const USAGE: &str =
    "usage: cryptvm run [--config vm.json] [--kernel PATH] [--initrd PATH] [--cmdline STR]
                   [--cpus N] [--memory SIZE] [--object OPTS]... [--blockdev OPTS]...
                   [--device OPTS]... [--qmp PATH] [--serial stdio|file:PATH]
                   [--serial-max-size SIZE] [--io-workers N] [--seccomp on|off|log]
                   [--timeout SECS]
Boots the kernel and runs the guest until it powers off or reboots (exit status 0).
A guest write of V to an isa-debug-exit device's port (--device
isa-debug-exit,iobase=0xf4,iosize=0x04) ends it with status (V << 1) | 1, as QEMU.
--timeout SECS stops the guest after SECS seconds: exit status 124.
The KVM device is /dev/kvm, or the path in $CRYPTVM_KVM_DEVICE.
--seccomp (default on) filters the system calls of every VMM thread: on ends the
process at a forbidden call, log only has the kernel log it (docs/security.md).";

/// The exit status of a run stopped by `--timeout`, as timeout(1)'s: even, so that it is
/// never an `isa-debug-exit` status (those are odd).
pub const TIMEOUT_STATUS: u8 = 124;

/// Entry point of `cryptvm run ARGS`; returns the exit status.
pub fn main(args: &[String]) -> u8 {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return 0;
    }
    // Before any secret is read: no core dump may carry keys or guest RAM.
    if let Err(e) = crate::core_dumps::forbid() {
        eprintln!("cryptvm: making the process non-dumpable: {e}");
        return 1;
    }
    let config = match VmConfig::from_args(args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("cryptvm: {e}");
            return 1;
        }
    };
    match run_config(&config) {
        Ok(ExitReason::Shutdown) => {
            // A triple fault resets a real PC (and `reboot=t` relies on it), but it is
            // also how a crashed guest ends: say so.
            eprintln!(
                "cryptvm: the guest triple-faulted (KVM_EXIT_SHUTDOWN); stopping as for a reset"
            );
            0
        }
        Ok(ExitReason::DebugExit(value)) => devices::debug_exit::exit_status(value),
        Ok(ExitReason::Timeout) => {
            let secs = config.timeout.unwrap_or(Duration::ZERO).as_secs_f64();
            eprintln!("cryptvm: --timeout: the guest still ran after {secs} s; stopped it");
            TIMEOUT_STATUS
        }
        Ok(_) => 0,
        Err(msg) => {
            eprintln!("cryptvm: {msg}");
            1
        }
    }
}

fn check_readable(what: &str, path: &Path) -> Result<(), String> {
    File::open(path)
        .map(drop)
        .map_err(|e| format!("opening {what} '{}': {e}", path.display()))
}

/// Builds, boots and runs the VM `config` describes. The whole config is checked
/// ([`VmConfig::cold_plug`]) before anything is opened, `/dev/kvm` included.
pub fn run_config(config: &VmConfig) -> Result<ExitReason, String> {
    let plan = config.cold_plug().map_err(|e| e.to_string())?;
    let kernel = config
        .kernel
        .as_ref()
        .ok_or("no kernel given (--kernel PATH or boot.kernel in the config file)")?;
    check_readable("kernel", kernel)?;
    if let Some(initrd) = &config.initrd {
        check_readable("initramfs", initrd)?;
    }
    let (serial_out, serial_input): (Box<dyn Write + Send>, bool) = match &config.serial {
        SerialConfig::Stdio => (Box::new(std::io::stdout()), std::io::stdin().is_terminal()),
        SerialConfig::File(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("opening serial output '{}': {e}", path.display()))?;
            (
                Box::new(CappedOutput::new(file, config.serial_max_size)),
                false,
            )
        }
    };
    // Before any thread starts: every thread installs its filter first thing.
    crate::seccomp::init(config.seccomp).map_err(|e| e.to_string())?;
    let vm = Vm::new(VmParams {
        cpus: config.cpus,
        memory: config.memory,
        serial_out,
        serial_input,
    })
    .map_err(|e| e.to_string())?;

    for planned in &plan.debug_exits {
        crate::device_manager::debug_exit::place(
            vm.pio_bus(),
            vm.exit_state().clone(),
            &planned.props,
        )
        .map_err(|e| format!("{}: {e}", planned.path))?;
    }
    let events = EventBus::new();
    let (machine, control) = build_machine(&vm, config, &plan, &events)?;

    let rsdp = create_acpi_tables(&vm)?;
    let spec = BootSpec {
        kernel: kernel.clone(),
        initrd: config.initrd.clone(),
        cmdline: config.cmdline().to_string(),
    };
    let entry =
        boot::load_guest(vm.memory(), vm.memory_size(), &spec, rsdp).map_err(|e| e.to_string())?;

    let raw = if serial_input {
        RawMode::enter().map_err(|e| format!("setting the terminal to raw mode: {e}"))?
    } else {
        None
    };
    let qmp = match &config.qmp {
        Some(address) => {
            Some(QmpServer::start(address, control, events.clone()).map_err(|e| e.to_string())?)
        }
        None => None,
    };
    // Once everything is set up: a configuration error stays the only line.
    if let Some(warning) = crate::vstate::hw_virt::slow_kvm_warning() {
        eprintln!("cryptvm: {warning}");
    }
    let result = vm.run_for(entry, config.timeout).map_err(|e| e.to_string());
    drop(raw);
    if let Some(server) = qmp {
        let reason = match result {
            Ok(ExitReason::Reset) => Some((true, "guest-reset")),
            Ok(ExitReason::PowerOff | ExitReason::Shutdown | ExitReason::DebugExit(_)) => {
                Some((true, "guest-shutdown"))
            }
            // What QEMU says when timeout(1)'s signal stops it.
            Ok(ExitReason::Timeout) => Some((false, "host-signal")),
            Ok(ExitReason::Quit) | Err(_) => None, // `quit` announced itself
        };
        if let Some((guest, reason)) = reason {
            events.emit("SHUTDOWN", json!({"guest": guest, "reason": reason}));
        }
        server.stop();
    }
    machine.shutdown();
    result
}

/// The machine and its control: the config's secrets, block nodes and disks added by
/// running the checked `plan`'s actions as QMP's are run ([`VmControl::execute`]), hot
/// plug enabled for what comes later. The machine's events go to `events`.
fn build_machine(
    vm: &Vm,
    config: &VmConfig,
    plan: &ColdPlug,
    events: &Arc<EventBus>,
) -> Result<(Arc<Machine>, Arc<VmControl>), String> {
    let workers = WorkerPool::new(config.io_workers(), "io-w")
        .map_err(|e| format!("starting the I/O workers: {e}"))?;
    let machine = Machine::new(MachineParams::for_vm(vm, workers));
    let sink = events.clone();
    machine.set_event_sink(Arc::new(move |event, data| sink.emit(event, data)));
    let control = Arc::new(VmControl::new(
        machine.clone(),
        vm.ged().clone(),
        vm.exit_state().clone(),
        events.clone(),
    ));
    for action in plan.actions() {
        // The block layer's errors about an object or a node name the entry already
        // (`BlockError::at`); a device's are prefixed with it.
        let prefix = match &action {
            Action::DeviceAdd(d) => Some(d.path.clone()),
            _ => None,
        };
        control.execute(action).map_err(|e| match &prefix {
            Some(entry) => format!("{entry}: {e}"),
            None => e.to_string(),
        })?;
    }
    machine
        .enable_hotplug(vm.mmio_bus(), vm.ged().clone())
        .map_err(|e| format!("starting PCI hotplug: {e}"))?;
    Ok((machine, control))
}

/// Where the ACPI tables describe the machine's devices and windows for `vm`.
pub fn acpi_layout(vm: &Vm) -> AcpiLayout {
    AcpiLayout {
        cpus: vm.cpus(),
        ecam_base: layout::PCI_ECAM_START,
        ecam_size: layout::PCI_ECAM_SIZE,
        mmio32: layout::mmio32_window(),
        mmio64: layout::mmio64_window(vm.memory_size()),
        ged_base: layout::GED_START,
        pcihp_base: layout::PCIHP_START,
        ged_irq: layout::GED_IRQ,
        serial_irq: layout::SERIAL_IRQ,
        tables_base: layout::ACPI_TABLES_START,
    }
}

/// Writes the ACPI tables (`vmm::arch::x86_64::acpi`) into guest memory; returns the RSDP address for
/// `boot_params.acpi_rsdp_addr` / PVH `rsdp_paddr`.
fn create_acpi_tables(vm: &Vm) -> Result<Option<GuestAddress>, String> {
    crate::arch::x86_64::acpi::create_acpi_tables(vm.memory(), &acpi_layout(vm))
        .map(Some)
        .map_err(|e| format!("writing the ACPI tables: {e}"))
}
