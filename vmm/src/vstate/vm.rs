//! A KVM virtual machine: in-kernel irqchip and PIT, guest RAM, the port and MMIO buses
//! with the platform devices (serial console, i8042, ACPI GED, PCI configuration access),
//! and vCPU threads. [`Vm::run`] runs the guest until it powers off, resets or fails
//! ([`Vm::run_for`]: or its time is up).

use std::ffi::CString;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, Once, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use devices::acpi::{Ged, PowerEvent, GED_LEN};
use devices::i8042::I8042;
use devices::pci::{PciConfigIo, PciConfigMmio, PciRoot};
use devices::serial::Serial;
use devices::{Bus, Interrupt};

use crate::arch::x86_64::layout;
use crate::event_loop::{EventLoop, StdinInput, Subscriber};
use crate::seccomp::ThreadKind;
pub use crate::vstate::exit::{ExitReason, ExitState};
use crate::vstate::memory::{self, GuestMemoryMmap};
use crate::vstate::msi::MsiRouter;
use crate::vstate::vcpu::{self, EntryPoint, Vcpu};

/// Environment variable naming the KVM device (default `/dev/kvm`); tests point it at a
/// missing file to check the "no KVM" error.
pub const KVM_DEVICE_ENV: &str = "CRYPTVM_KVM_DEVICE";
/// The KVM device when [`KVM_DEVICE_ENV`] is not set.
pub const DEFAULT_KVM_DEVICE: &str = "/dev/kvm";

/// Why the VM could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The KVM device could not be opened.
    #[error("no KVM: opening '{path}': {source}")]
    NoKvm {
        /// The device path.
        path: String,
        /// The open error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A KVM VM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// vCPU set-up.
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    /// Anything else (message says what).
    #[error("{0}")]
    Other(String),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// An interrupt line delivered through a KVM irqfd (`KVM_IRQFD` on a GSI).
pub struct IrqFd {
    evt: EventFd,
}

impl Interrupt for IrqFd {
    fn trigger(&self) -> std::io::Result<()> {
        self.evt.write(1)
    }
}

/// What a VM is made of.
pub struct VmParams {
    /// vCPUs (1 to 32).
    pub cpus: u8,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Where the guest's serial output goes.
    pub serial_out: Box<dyn Write + Send>,
    /// Feed the host's stdin to the serial port (only when it is a terminal).
    pub serial_input: bool,
}

/// A KVM VM with its memory and platform devices, ready to boot.
pub struct Vm {
    fd: Arc<VmFd>,
    kvm: Kvm,
    memory: GuestMemoryMmap,
    memory_size: u64,
    cpus: u8,
    pio_bus: Arc<RwLock<Bus>>,
    mmio_bus: Arc<RwLock<Bus>>,
    exit: Arc<ExitState>,
    serial: Arc<Mutex<Serial>>,
    serial_input: bool,
    ged: Arc<Mutex<Ged>>,
    pci_root: Arc<Mutex<PciRoot>>,
    router: Arc<MsiRouter>,
}

/// Opens the KVM device named by [`KVM_DEVICE_ENV`] (default `/dev/kvm`).
pub fn open_kvm() -> Result<Kvm, VmError> {
    let path = std::env::var(KVM_DEVICE_ENV).unwrap_or_else(|_| DEFAULT_KVM_DEVICE.to_string());
    let c_path = CString::new(path.clone())
        .map_err(|_| VmError::Other(format!("{KVM_DEVICE_ENV}: path contains a NUL byte")))?;
    Kvm::new_with_path(&c_path).map_err(|source| VmError::NoKvm { path, source })
}

impl Vm {
    /// Creates the VM: KVM, irqchip, PIT, memory and platform devices.
    pub fn new(params: VmParams) -> Result<Vm, VmError> {
        if params.cpus == 0 || params.cpus > crate::config::MAX_CPUS {
            return Err(VmError::Other(format!(
                "{} vCPUs: a VM has 1 to {} vCPUs",
                params.cpus,
                crate::config::MAX_CPUS
            )));
        }
        let kvm = open_kvm()?;
        let fd = kvm.create_vm().map_err(kvm_err("creating the KVM VM"))?;
        fd.set_identity_map_address(layout::KVM_IDENTITY_MAP_START)
            .map_err(kvm_err("setting the identity map address"))?;
        fd.set_tss_address(layout::KVM_TSS_START as usize)
            .map_err(kvm_err("setting the TSS address"))?;
        fd.create_irq_chip()
            .map_err(kvm_err("creating the in-kernel irqchip"))?;
        fd.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm_err("creating the in-kernel PIT"))?;

        let memory = memory::create_guest_memory(params.memory)?;
        memory::register_memory(&fd, &memory)?;

        let exit = Arc::new(ExitState::new().map_err(|e| VmError::Other(format!("eventfd: {e}")))?);
        let mut pio = Bus::new();
        let mut mmio = Bus::new();
        let bus_err = |e: devices::bus::BusError| VmError::Other(format!("placing a device: {e}"));

        let serial_irq = irqfd(&fd, layout::SERIAL_IRQ)?;
        let serial = Arc::new(Mutex::new(Serial::new(serial_irq, params.serial_out)));
        pio.insert(layout::SERIAL_PORT, 8, serial.clone())
            .map_err(bus_err)?;

        let reset_exit = exit.clone();
        let i8042 = I8042::new(Box::new(move || reset_exit.request(ExitReason::Reset)));
        pio.insert(layout::I8042_PORT, 5, Arc::new(Mutex::new(i8042)))
            .map_err(bus_err)?;

        let power_exit = exit.clone();
        let ged = Arc::new(Mutex::new(Ged::new(
            irqfd(&fd, layout::GED_IRQ)?,
            Box::new(move |event| {
                power_exit.request(match event {
                    PowerEvent::Shutdown => ExitReason::PowerOff,
                    PowerEvent::Reboot => ExitReason::Reset,
                })
            }),
        )));
        mmio.insert(layout::GED_START, GED_LEN, ged.clone())
            .map_err(bus_err)?;

        let pci_root = Arc::new(Mutex::new(PciRoot::new()));
        pio.insert(
            layout::PCI_CONFIG_IO_PORT,
            layout::PCI_CONFIG_IO_SIZE,
            Arc::new(Mutex::new(PciConfigIo::new(pci_root.clone()))),
        )
        .map_err(bus_err)?;
        mmio.insert(
            layout::PCI_ECAM_START,
            layout::PCI_ECAM_SIZE,
            Arc::new(Mutex::new(PciConfigMmio::new(pci_root.clone()))),
        )
        .map_err(bus_err)?;

        let fd = Arc::new(fd);
        let mmio_bus = Arc::new(RwLock::new(mmio));
        let router = MsiRouter::new(fd.clone());

        Ok(Vm {
            fd,
            kvm,
            memory,
            memory_size: params.memory,
            cpus: params.cpus,
            pio_bus: Arc::new(RwLock::new(pio)),
            mmio_bus,
            exit,
            serial,
            serial_input: params.serial_input,
            ged,
            pci_root,
            router,
        })
    }

    /// MSI routing for device interrupts.
    pub fn msi_router(&self) -> &Arc<MsiRouter> {
        &self.router
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Guest RAM size in bytes.
    pub fn memory_size(&self) -> u64 {
        self.memory_size
    }

    /// Number of vCPUs.
    pub fn cpus(&self) -> u8 {
        self.cpus
    }

    /// The KVM VM (for irqfds, ioeventfds and memory slots of devices).
    pub fn fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    /// The port I/O bus.
    pub fn pio_bus(&self) -> &Arc<RwLock<Bus>> {
        &self.pio_bus
    }

    /// The MMIO bus.
    pub fn mmio_bus(&self) -> &Arc<RwLock<Bus>> {
        &self.mmio_bus
    }

    /// The ACPI GED (power button, hotplug notifications).
    pub fn ged(&self) -> &Arc<Mutex<Ged>> {
        &self.ged
    }

    /// The PCI bus 0.
    pub fn pci_root(&self) -> &Arc<Mutex<PciRoot>> {
        &self.pci_root
    }

    /// The serial console device.
    pub fn serial(&self) -> &Arc<Mutex<Serial>> {
        &self.serial
    }

    /// The exit state: devices and the control plane call `request` on it.
    pub fn exit_state(&self) -> &Arc<ExitState> {
        &self.exit
    }

    /// A new interrupt line on `gsi` (a KVM irqfd).
    pub fn interrupt(&self, gsi: u32) -> Result<Arc<dyn Interrupt>, VmError> {
        irqfd(&self.fd, gsi)
    }

    /// Creates and configures the vCPUs (the first one starts at `entry`), starts the event
    /// loop and the vCPU threads, and waits until the guest stops or the VMM fails.
    pub fn run(&self, entry: EntryPoint) -> Result<ExitReason, VmError> {
        self.run_with(entry, Vec::new(), None)
    }

    /// [`Vm::run`], the guest stopped with [`ExitReason::Timeout`] once it has run for
    /// `limit` (when given).
    pub fn run_for(
        &self,
        entry: EntryPoint,
        limit: Option<Duration>,
    ) -> Result<ExitReason, VmError> {
        self.run_with(entry, Vec::new(), limit)
    }

    /// [`Vm::run_for`] with more event-loop subscribers (QMP, virtio devices).
    pub fn run_with(
        &self,
        entry: EntryPoint,
        mut subscribers: Vec<Subscriber>,
        limit: Option<Duration>,
    ) -> Result<ExitReason, VmError> {
        vcpu::write_boot_tables(&self.memory, matches!(entry, EntryPoint::Linux64 { .. }))
            .map_err(VmError::Other)?;
        let supported = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("reading KVM's supported CPUID"))?;
        let mut supported = supported;
        if self.kvm.check_extension(Cap::TscDeadlineTimer) {
            // KVM emulates the TSC-deadline LAPIC timer but leaves the CPUID bit to the
            // VMM (as QEMU and Firecracker set it): cheaper timer programming.
            crate::vstate::cpuid::set_tsc_deadline(&mut supported);
        }
        let mut vcpus = Vec::with_capacity(usize::from(self.cpus));
        for id in 0..self.cpus {
            let fd = self
                .fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("creating a vCPU"))?;
            vcpu::configure_vcpu(&fd, id, self.cpus, &supported, (id == 0).then_some(entry))?;
            vcpus.push(Vcpu {
                id,
                fd,
                pio: self.pio_bus.clone(),
                mmio: self.mmio_bus.clone(),
                exit: self.exit.clone(),
                _memory: self.memory.clone(),
            });
        }
        install_kick_handler()?;

        if self.serial_input {
            subscribers.push(Box::new(StdinInput::new(self.serial.clone())));
        }
        let event_loop = EventLoop::start(subscribers)
            .map_err(|e| VmError::Other(format!("starting the event loop: {e}")))?;

        // Each vCPU installs its seccomp filter, then waits until this thread
        // has installed its own: the guest runs only once every filter is in.
        let gate = Arc::new(Gate::default());
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        for vcpu in vcpus {
            let name = format!("vcpu{}", vcpu.id);
            let gate = gate.clone();
            match std::thread::Builder::new().name(name).spawn(move || {
                crate::seccomp::thread_start(ThreadKind::Vcpu);
                gate.wait();
                vcpu.run()
            }) {
                Ok(t) => threads.push(t),
                Err(e) => {
                    self.exit.fail(format!("starting a vCPU thread: {e}"));
                    break;
                }
            }
        }
        if let Err(e) = crate::seccomp::apply_current(ThreadKind::Main) {
            self.exit.fail(e.to_string());
        }
        gate.open();
        let outcome = self.exit.wait(limit);
        stop_vcpus(threads);
        event_loop.stop();
        outcome.map_err(VmError::Other)
    }
}

/// A gate the vCPU threads wait at until it opens.
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    opened: Condvar,
}

impl Gate {
    fn wait(&self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        while !*open {
            open = self.opened.wait(open).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn open(&self) {
        *self.open.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.opened.notify_all();
    }
}

fn irqfd(vm: &VmFd, gsi: u32) -> Result<Arc<dyn Interrupt>, VmError> {
    let evt =
        EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Other(format!("eventfd: {e}")))?;
    vm.register_irqfd(&evt, gsi)
        .map_err(kvm_err("registering an irqfd"))?;
    Ok(Arc::new(IrqFd { evt }))
}

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: the signal only makes KVM_RUN return EINTR.
}

fn install_kick_handler() -> Result<(), VmError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), kick_handler)
            .map_err(|e| VmError::Other(format!("installing the vCPU kick signal handler: {e}")));
    });
    result
}

/// Kicks the vCPU threads out of `KVM_RUN` until they have all seen the stop flag.
/// A kick can land just before a thread enters `KVM_RUN`, so kick until each one ends.
fn stop_vcpus(threads: Vec<JoinHandle<()>>) {
    let mut waited = Duration::ZERO;
    while threads.iter().any(|t| !t.is_finished()) {
        for t in threads.iter().filter(|t| !t.is_finished()) {
            let _ = t.kill(kick_signal());
        }
        std::thread::sleep(Duration::from_millis(1));
        waited += Duration::from_millis(1);
        if waited > Duration::from_secs(10) {
            eprintln!("cryptvm: a vCPU thread does not stop; leaving it");
            return;
        }
    }
    for t in threads {
        let _ = t.join();
    }
}
