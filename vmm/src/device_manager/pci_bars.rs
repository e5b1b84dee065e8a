//! Where the memory BAR of each PCI device is mapped: its range on the MMIO
//! bus and the KVM ioeventfds of its queue notification addresses. Follows
//! the guest when it moves a BAR (Linux reassigns BARs of hot-plugged
//! devices), so notifications keep reaching the I/O threads.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

use devices::pci::BarRegion;
use devices::{Bus, SharedDevice};

/// Why a BAR could not be mapped.
#[derive(Debug, thiserror::Error)]
pub enum BarError {
    /// The range is taken on the MMIO bus.
    #[error("placing the BAR at {addr:#x}: {source}")]
    Bus {
        /// BAR address.
        addr: u64,
        /// The bus error.
        #[source]
        source: devices::bus::BusError,
    },
    /// KVM refused an ioeventfd.
    #[error("registering the ioeventfd at {addr:#x}: {source}")]
    IoEvent {
        /// Notification address.
        addr: u64,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// No free room for the BAR in the window.
    #[error("no room for a {size:#x}-byte BAR in the PCI MMIO window")]
    NoRoom {
        /// BAR size.
        size: u64,
    },
}

/// A doorbell: an eventfd KVM signals when the guest writes `offset` in the BAR.
#[derive(Clone)]
pub struct Doorbell {
    /// Offset in the BAR.
    pub offset: u64,
    /// The eventfd an I/O thread waits on.
    pub evt: Arc<EventFd>,
}

struct Mapping {
    addr: u64,
    size: u64,
    device: SharedDevice,
    doorbells: Vec<Doorbell>,
    /// False while the guest has the BAR somewhere it could not be mapped.
    attached: bool,
}

/// The BAR mappings of every PCI device, by slot.
pub struct PciBars {
    vm: Arc<VmFd>,
    mmio: Arc<RwLock<Bus>>,
    slots: Mutex<BTreeMap<u8, Mapping>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PciBars {
    /// No mappings yet; devices go on `mmio`, doorbells into `vm`.
    pub fn new(vm: Arc<VmFd>, mmio: Arc<RwLock<Bus>>) -> Arc<Self> {
        Arc::new(Self {
            vm,
            mmio,
            slots: Mutex::new(BTreeMap::new()),
        })
    }

    /// The lowest `size`-aligned free address for a `size`-byte BAR in
    /// `window`.
    pub fn allocate(&self, window: std::ops::Range<u64>, size: u64) -> Result<u64, BarError> {
        let bus = self.mmio.read().unwrap_or_else(|e| e.into_inner());
        let mut addr = window.start.next_multiple_of(size);
        while addr.checked_add(size).is_some_and(|end| end <= window.end) {
            if bus.is_free(addr, size) {
                return Ok(addr);
            }
            addr += size;
        }
        Err(BarError::NoRoom { size })
    }

    /// Maps `device`'s BAR of `size` bytes at `addr` for `slot`, with its
    /// doorbells. Nothing stays mapped on failure.
    pub fn map(
        &self,
        slot: u8,
        addr: u64,
        size: u64,
        device: SharedDevice,
        doorbells: Vec<Doorbell>,
    ) -> Result<(), BarError> {
        let mut mapping = Mapping {
            addr,
            size,
            device,
            doorbells,
            attached: false,
        };
        self.attach(&mut mapping)?;
        lock(&self.slots).insert(slot, mapping);
        Ok(())
    }

    /// Unmaps `slot`'s BAR and its doorbells.
    pub fn unmap(&self, slot: u8) {
        if let Some(mut m) = lock(&self.slots).remove(&slot) {
            self.detach(&mut m);
        }
    }

    /// The guest moved `slot`'s BAR from `old` to `new` (called by `PciRoot`).
    /// If the new place is taken the BAR stays unmapped until it moves again.
    pub fn moved(&self, slot: u8, old: &BarRegion, new: &BarRegion) {
        let mut slots = lock(&self.slots);
        let Some(m) = slots.get_mut(&slot) else {
            return;
        };
        if m.addr != old.addr || m.size != new.size {
            return;
        }
        self.detach(m);
        m.addr = new.addr;
        if let Err(e) = self.attach(m) {
            eprintln!("cryptvm: PCI slot {slot}: guest moved a BAR: {e}");
        }
    }

    fn attach(&self, m: &mut Mapping) -> Result<(), BarError> {
        self.mmio
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(m.addr, m.size, m.device.clone())
            .map_err(|source| BarError::Bus {
                addr: m.addr,
                source,
            })?;
        for (i, d) in m.doorbells.iter().enumerate() {
            let at = IoEventAddress::Mmio(m.addr + d.offset);
            if let Err(source) = self.vm.register_ioevent(&d.evt, &at, NoDatamatch) {
                for done in &m.doorbells[..i] {
                    let at = IoEventAddress::Mmio(m.addr + done.offset);
                    let _ = self.vm.unregister_ioevent(&done.evt, &at, NoDatamatch);
                }
                self.remove_from_bus(m.addr);
                return Err(BarError::IoEvent {
                    addr: m.addr + d.offset,
                    source,
                });
            }
        }
        m.attached = true;
        Ok(())
    }

    fn detach(&self, m: &mut Mapping) {
        if !std::mem::take(&mut m.attached) {
            return;
        }
        for d in &m.doorbells {
            let at = IoEventAddress::Mmio(m.addr + d.offset);
            let _ = self.vm.unregister_ioevent(&d.evt, &at, NoDatamatch);
        }
        self.remove_from_bus(m.addr);
    }

    fn remove_from_bus(&self, addr: u64) {
        self.mmio
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(addr);
    }
}
