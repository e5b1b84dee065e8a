//! ACPI PCI hotplug, the device manager's half. The register block
//! (`devices::acpi::PciHotplug`) only records what the guest does: its eject
//! callback runs on the vCPU that wrote B0EJ and just queues the slot. The
//! teardown (BARs, doorbells, queue threads, flush, `DEVICE_DELETED`) runs on
//! the `hotplug` thread started here, never on a vCPU and never holding a
//! lock a vCPU needs while it waits.

use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::thread::JoinHandle;

use devices::acpi::{Ged, PciHotplug, GED_EVENT_PCI_HOTPLUG, PCIHP_LEN};
use devices::Bus;

use super::{lock, HotplugNotifier, Machine};
use crate::arch::x86_64::layout;

/// Slot bits in the hotplug registers plus the GED interrupt.
struct AcpiHotplug {
    pcihp: Arc<Mutex<PciHotplug>>,
    ged: Arc<Mutex<Ged>>,
}

impl AcpiHotplug {
    fn notify(&self) {
        if let Err(e) = lock(&self.ged).notify(GED_EVENT_PCI_HOTPLUG) {
            eprintln!("cryptvm: raising the PCI hotplug interrupt: {e}");
        }
    }
}

impl HotplugNotifier for AcpiHotplug {
    fn plugged(&self, slot: u8) {
        lock(&self.pcihp).plug(slot);
        self.notify();
    }

    fn unplug_requested(&self, slot: u8) {
        lock(&self.pcihp).request_unplug(slot);
        self.notify();
    }
}

/// What the teardown thread is asked to do.
enum Request {
    /// The guest ejected this slot.
    Ejected(u8),
    /// The machine is shutting down.
    Stop,
}

/// The `hotplug` thread and the queue the vCPUs feed it through.
pub(super) struct Teardown {
    requests: Sender<Request>,
    thread: JoinHandle<()>,
}

impl Teardown {
    /// Asks the thread to finish what is queued, then waits for it.
    pub(super) fn stop(self) {
        let _ = self.requests.send(Request::Stop);
        let _ = self.thread.join();
    }
}

/// Places the hotplug register block on `mmio` at [`layout::PCIHP_START`],
/// starts the teardown thread for `machine`, and returns the notifier that
/// tells the guest about slots (through `ged`).
pub(super) fn start(
    machine: Weak<Machine>,
    mmio: &RwLock<Bus>,
    ged: Arc<Mutex<Ged>>,
) -> std::io::Result<(Arc<dyn HotplugNotifier>, Teardown)> {
    let (requests, queue) = channel();
    let from_vcpu = requests.clone();
    let pcihp = Arc::new(Mutex::new(PciHotplug::new(Box::new(move |slot| {
        // Only record: a vCPU must not wait for the teardown.
        let _ = from_vcpu.send(Request::Ejected(slot));
    }))));
    mmio.write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(layout::PCIHP_START, PCIHP_LEN, pcihp.clone())
        .map_err(|e| std::io::Error::other(format!("placing the PCI hotplug registers: {e}")))?;
    let thread = std::thread::Builder::new()
        .name("hotplug".into())
        .spawn(move || {
            crate::seccomp::thread_start(crate::seccomp::ThreadKind::Hotplug);
            for request in queue {
                match request {
                    Request::Ejected(slot) => match machine.upgrade() {
                        Some(machine) => machine.eject(slot),
                        None => break,
                    },
                    Request::Stop => break,
                }
            }
        })?;
    let notifier = Arc::new(AcpiHotplug { pcihp, ged });
    Ok((notifier, Teardown { requests, thread }))
}
