//! MSI delivery through KVM: each MSI-X vector of a device gets its own GSI,
//! an irqfd on it, and a KVM GSI route carrying the message the guest
//! programmed. Raising the vector is one eventfd write; KVM injects it.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, so [`MsiRouter`] keeps
//! KVM's default irqchip routes (PIC and IOAPIC pins, GSIs 0..24) in every
//! table it installs.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use devices::Interrupt;

/// GSIs of the IOAPIC pins; MSI vectors get GSIs from here up.
const IOAPIC_PINS: u32 = 24;
/// KVM's limit on routing entries (`KVM_MAX_IRQ_ROUTES`).
const MAX_ROUTES: usize = 4096;

/// Errors from setting up MSI vectors.
#[derive(Debug, thiserror::Error)]
pub enum MsiError {
    /// Every GSI KVM can route is taken.
    #[error("no free GSI for an MSI vector")]
    NoGsi,
    /// An eventfd could not be created.
    #[error("creating an eventfd for an MSI vector: {0}")]
    EventFd(#[source] io::Error),
    /// A KVM ioctl failed.
    #[error("{what} for GSI {gsi}: {source}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// The GSI.
        gsi: u32,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// The VM's GSI routing table: the default irqchip routes plus one MSI route
/// per allocated vector.
pub struct MsiRouter {
    vm: Arc<VmFd>,
    /// Allocated GSIs and the message each routes to (None until programmed).
    msi: Mutex<BTreeMap<u32, Option<(u64, u32)>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MsiRouter {
    /// A router for `vm` (whose irqchip exists).
    pub fn new(vm: Arc<VmFd>) -> Arc<Self> {
        Arc::new(Self {
            vm,
            msi: Mutex::new(BTreeMap::new()),
        })
    }

    /// A new MSI vector: a free GSI with an irqfd on it. The route is
    /// installed once the guest programs the vector's message.
    pub fn allocate(self: &Arc<Self>) -> Result<Arc<MsiVector>, MsiError> {
        let gsi = {
            let mut msi = lock(&self.msi);
            let gsi = (IOAPIC_PINS..)
                .take(MAX_ROUTES - IOAPIC_PINS as usize - 16)
                .find(|g| !msi.contains_key(g))
                .ok_or(MsiError::NoGsi)?;
            msi.insert(gsi, None);
            gsi
        };
        let release = |e| {
            lock(&self.msi).remove(&gsi);
            e
        };
        let evt = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(MsiError::EventFd)
            .map_err(release)?;
        self.vm
            .register_irqfd(&evt, gsi)
            .map_err(|source| MsiError::Kvm {
                what: "registering an irqfd",
                gsi,
                source,
            })
            .map_err(release)?;
        Ok(Arc::new(MsiVector {
            gsi,
            evt,
            router: self.clone(),
        }))
    }

    fn set_route(&self, gsi: u32, address: u64, data: u32) -> io::Result<()> {
        let mut msi = lock(&self.msi);
        if let Some(slot) = msi.get_mut(&gsi) {
            *slot = Some((address, data));
        }
        self.install(&msi)
    }

    fn release(&self, gsi: u32) {
        let mut msi = lock(&self.msi);
        if msi.remove(&gsi).flatten().is_some() {
            let _ = self.install(&msi);
        }
    }

    /// Installs the whole table (KVM replaces, not merges).
    fn install(&self, msi: &BTreeMap<u32, Option<(u64, u32)>>) -> io::Result<()> {
        let mut entries = default_routes();
        for (&gsi, message) in msi {
            if let Some((address, data)) = *message {
                entries.push(msi_route(gsi, address, data));
            }
        }
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| io::Error::other(format!("GSI routing table: {e:?}")))?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}

/// KVM's default routes (`kvm_setup_default_irq_routing`): GSIs 0..16 to the
/// PIC and the IOAPIC, 16..24 to the IOAPIC.
fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let mut routes = Vec::new();
    for gsi in 0..IOAPIC_PINS {
        if gsi < 16 {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            routes.push(irqchip_route(gsi, chip, gsi % 8));
        }
        routes.push(irqchip_route(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    routes
}

fn irqchip_route(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = irqchip;
    e.u.irqchip.pin = pin;
    e
}

fn msi_route(gsi: u32, address: u64, data: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi.address_lo = address as u32;
    e.u.msi.address_hi = (address >> 32) as u32;
    e.u.msi.data = data;
    e
}

/// One MSI vector: raising it writes its irqfd. Dropping it removes the
/// irqfd and the route.
pub struct MsiVector {
    gsi: u32,
    evt: EventFd,
    router: Arc<MsiRouter>,
}

impl MsiVector {
    /// The vector's GSI.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }
}

impl Interrupt for MsiVector {
    fn trigger(&self) -> io::Result<()> {
        self.evt.write(1)
    }

    fn update_msi(&self, address: u64, data: u32) -> io::Result<()> {
        self.router.set_route(self.gsi, address, data)
    }
}

impl Drop for MsiVector {
    fn drop(&mut self) {
        let _ = self.router.vm.unregister_irqfd(&self.evt, self.gsi);
        self.router.release(self.gsi);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_match_kvm() {
        let routes = default_routes();
        // 16 PIC routes + 24 IOAPIC routes.
        assert_eq!(routes.len(), 40);
        let ioapic: Vec<_> = routes
            .iter()
            .filter(|r| {
                // SAFETY: irqchip_route only writes the irqchip variant.
                let chip = unsafe { r.u.irqchip.irqchip };
                chip == KVM_IRQCHIP_IOAPIC
            })
            .map(|r| r.gsi)
            .collect();
        assert_eq!(ioapic, (0..24).collect::<Vec<_>>());
    }

    #[test]
    fn msi_route_splits_the_address() {
        let r = msi_route(30, 0x1_fee0_1000, 0x4041);
        assert_eq!(r.type_, KVM_IRQ_ROUTING_MSI);
        // SAFETY: msi_route writes the msi variant.
        let m = unsafe { r.u.msi };
        assert_eq!(
            (m.address_lo, m.address_hi, m.data),
            (0xfee0_1000, 1, 0x4041)
        );
    }

    #[test]
    fn vectors_on_kvm_get_distinct_gsis_and_free_them() {
        let Ok(kvm) = crate::vstate::vm::open_kvm() else {
            return; // no KVM on this machine: the routing unit tests above still ran
        };
        let vm = kvm.create_vm().expect("create VM");
        vm.create_irq_chip().expect("irqchip");
        let router = MsiRouter::new(Arc::new(vm));
        let a = router.allocate().expect("vector a");
        let b = router.allocate().expect("vector b");
        assert_eq!((a.gsi(), b.gsi()), (24, 25));
        a.update_msi(0xfee0_0000, 0x41).expect("route a");
        b.update_msi(0xfee0_0000, 0x42).expect("route b");
        a.trigger().expect("trigger");
        drop(a);
        let c = router.allocate().expect("vector c");
        assert_eq!(c.gsi(), 24, "a freed GSI is reused");
    }
}
