//! The virtio 1.x modern PCI transport (no legacy interface).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;

use super::msix::{copy_out, Msix, MSIX_ENTRY_SIZE};
use super::queues::{lock, FaultReporter, VirtioQueues};
use crate::pci::{BarKind, BarRegion, PciConfiguration, PciDevice, PciIds};
use crate::virtio::{
    VirtioDevice, VirtioError, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
    VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1, VIRTIO_MSI_NO_VECTOR,
};
use crate::workers::WorkerPool;
use crate::{BusDevice, Interrupt};

/// PCI vendor ID of virtio devices.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// The BAR holding every virtio structure and the MSI-X table (64-bit memory).
pub const VIRTIO_PCI_BAR: usize = 0;
/// Offset of the common configuration structure in the BAR.
pub const COMMON_CFG_OFFSET: u64 = 0x0000;
/// Offset of the ISR status byte in the BAR.
pub const ISR_OFFSET: u64 = 0x1000;
/// Offset of the device-specific configuration in the BAR.
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
/// Offset of the notification area in the BAR (queue `n` at `n * NOTIFY_OFF_MULTIPLIER`).
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Offset of the MSI-X table in the BAR.
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
/// Offset of the MSI-X pending bit array in the BAR.
pub const MSIX_PBA_OFFSET: u64 = 0x6000;
/// Size of the BAR.
pub const BAR_SIZE: u64 = 0x8000;
/// Bytes between the notification addresses of consecutive queues.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;

const REGION_SIZE: u64 = 0x1000;
const COMMON_CFG_LEN: usize = 0x38;
/// The most queues a device may have on this transport: one MSI-X vector
/// each, plus the configuration vector, in the BAR's MSI-X table.
pub const MAX_QUEUES: u16 = ((MSIX_PBA_OFFSET - MSIX_TABLE_OFFSET) / MSIX_ENTRY_SIZE) as u16 - 1;

const PCI_CAP_ID_VENDOR: u8 = 0x09;
const PCI_CAP_ID_MSIX: u8 = 0x11;
const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;

/// A virtio device on PCI: configuration space with the virtio and MSI-X
/// capabilities, and the BAR (as a [`BusDevice`] at the BAR's address).
pub struct VirtioPciDevice {
    config: PciConfiguration,
    msix_cap: usize,
    offered: u64,
    shared: Arc<VirtioQueues>,
    device_feature_select: u32,
    driver_feature_select: u32,
    queue_select: u16,
}

impl VirtioPciDevice {
    /// Wraps `device` with its BAR at `bar_addr` (aligned to [`BAR_SIZE`]),
    /// guest memory `mem` and one interrupt per MSI-X vector: vector 0..n
    /// for anything the driver assigns, `num_queues + 1` in all. Starts one
    /// queue thread per queue, named `{label}-q{n}`; requests run on `pool`.
    pub fn new(
        device: Arc<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupts: Vec<Arc<dyn Interrupt>>,
        bar_addr: u64,
        pool: &Arc<WorkerPool>,
        label: &str,
    ) -> Result<Self, VirtioError> {
        let nq = usize::from(device.num_queues());
        if nq == 0 || nq > usize::from(MAX_QUEUES) {
            return Err(VirtioError::InvalidConfig(format!(
                "{nq} queues (1..={MAX_QUEUES} supported)"
            )));
        }
        let qmax = device.queue_max_size();
        if interrupts.len() != nq + 1 {
            return Err(VirtioError::Interrupts {
                got: interrupts.len(),
                want: nq + 1,
            });
        }
        let class = match device.device_type() {
            2 => 0x01_80_00, // mass storage, other
            1 => 0x02_00_00, // network
            _ => 0xff_00_00,
        };
        let ids = PciIds {
            vendor: VIRTIO_PCI_VENDOR_ID,
            device: 0x1040 + device.device_type(),
            revision: 1,
            class,
            subsystem_vendor: VIRTIO_PCI_VENDOR_ID,
            subsystem: device.device_type(),
        };
        let mut config = PciConfiguration::new(ids, 0);
        config.add_bar(VIRTIO_PCI_BAR, BarKind::Memory64, BAR_SIZE, bar_addr, false)?;

        let nvec = interrupts.len();
        let bir = VIRTIO_PCI_BAR as u32;
        let mut msix_cap_bytes = vec![PCI_CAP_ID_MSIX, 0];
        msix_cap_bytes.extend_from_slice(&((nvec - 1) as u16).to_le_bytes());
        msix_cap_bytes.extend_from_slice(&(MSIX_TABLE_OFFSET as u32 | bir).to_le_bytes());
        msix_cap_bytes.extend_from_slice(&(MSIX_PBA_OFFSET as u32 | bir).to_le_bytes());
        let msix_cap = config.add_capability(&msix_cap_bytes, &[0, 0, 0, 0xc0])?;
        for (ty, offset, len) in [
            (VIRTIO_PCI_CAP_COMMON_CFG, COMMON_CFG_OFFSET, REGION_SIZE),
            (VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, REGION_SIZE),
            (VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_CFG_OFFSET, REGION_SIZE),
            (VIRTIO_PCI_CAP_NOTIFY_CFG, NOTIFY_OFFSET, REGION_SIZE),
        ] {
            let cap_len: u8 = if ty == VIRTIO_PCI_CAP_NOTIFY_CFG {
                20
            } else {
                16
            };
            let mut cap = vec![PCI_CAP_ID_VENDOR, 0, cap_len, ty, bir as u8, 0, 0, 0];
            cap.extend_from_slice(&(offset as u32).to_le_bytes());
            cap.extend_from_slice(&(len as u32).to_le_bytes());
            if ty == VIRTIO_PCI_CAP_NOTIFY_CFG {
                cap.extend_from_slice(&NOTIFY_OFF_MULTIPLIER.to_le_bytes());
            }
            config.add_capability(&cap, &[])?;
        }

        let offered = device.features()
            | 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_F_RING_INDIRECT_DESC
            | 1 << VIRTIO_F_RING_EVENT_IDX;
        let io = |what: &'static str| move |source| VirtioError::Io { what, source };
        let shared = Arc::new(
            VirtioQueues::new(device, mem, Msix::new(interrupts), qmax, pool, label)
                .map_err(io("creating the queues"))?,
        );
        shared.start().map_err(io("starting the queue threads"))?;
        Ok(Self {
            config,
            msix_cap,
            offered,
            shared,
            device_feature_select: 0,
            driver_feature_select: 0,
            queue_select: 0,
        })
    }

    /// The queues (shared with the queue threads and the workers).
    pub fn queues(&self) -> Arc<VirtioQueues> {
        self.shared.clone()
    }

    /// Where device failures are reported (default: stderr).
    pub fn set_fault_reporter(&self, reporter: FaultReporter) {
        self.shared.set_fault_reporter(reporter);
    }

    /// The features offered to the driver.
    pub fn offered_features(&self) -> u64 {
        self.offered
    }

    /// Offset of queue `index`'s notification address within the BAR (where
    /// the VMM registers its ioeventfd).
    pub fn notify_offset(index: u16) -> u64 {
        NOTIFY_OFFSET + u64::from(index) * u64::from(NOTIFY_OFF_MULTIPLIER)
    }

    fn common_read(&self, offset: u64, data: &mut [u8]) {
        let s = &self.shared;
        let mut b = [0u8; COMMON_CFG_LEN];
        let put = |b: &mut [u8; COMMON_CFG_LEN], at: usize, v: &[u8]| {
            b[at..at + v.len()].copy_from_slice(v)
        };
        put(&mut b, 0x00, &self.device_feature_select.to_le_bytes());
        let word = |f: u64, sel: u32| if sel < 2 { (f >> (32 * sel)) as u32 } else { 0 };
        put(
            &mut b,
            0x04,
            &word(self.offered, self.device_feature_select).to_le_bytes(),
        );
        put(&mut b, 0x08, &self.driver_feature_select.to_le_bytes());
        let df = s.features.load(Ordering::Acquire);
        put(
            &mut b,
            0x0c,
            &word(df, self.driver_feature_select).to_le_bytes(),
        );
        put(
            &mut b,
            0x10,
            &s.config_vector.load(Ordering::Acquire).to_le_bytes(),
        );
        put(&mut b, 0x12, &(s.queues.len() as u16).to_le_bytes());
        b[0x14] = s.status.load(Ordering::Acquire);
        b[0x15] = 0; // config_generation: the configuration never changes under the driver
        put(&mut b, 0x16, &self.queue_select.to_le_bytes());
        if let Some(q) = s.queues.get(usize::from(self.queue_select)) {
            let q = lock(&q.slot);
            put(&mut b, 0x18, &q.queue.size().to_le_bytes());
            put(&mut b, 0x1a, &q.vector.to_le_bytes());
            put(&mut b, 0x1c, &u16::from(q.queue.ready()).to_le_bytes());
            put(&mut b, 0x1e, &self.queue_select.to_le_bytes());
            put(&mut b, 0x20, &q.queue.desc_table().to_le_bytes());
            put(&mut b, 0x28, &q.queue.avail_ring().to_le_bytes());
            put(&mut b, 0x30, &q.queue.used_ring().to_le_bytes());
        }
        copy_out(&b, offset as usize, data);
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let mut v = [0u8; 8];
        let n = data.len().min(8);
        v[..n].copy_from_slice(&data[..n]);
        let v = u64::from_le_bytes(v);
        let s = self.shared.clone();
        let nvec = lock(&s.msix).len();
        let vector = |v: u64| {
            if (v as usize) < nvec {
                v as u16
            } else {
                VIRTIO_MSI_NO_VECTOR
            }
        };
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = v as u32,
            (0x08, 4) => self.driver_feature_select = v as u32,
            (0x0c, 4) => {
                let sel = self.driver_feature_select;
                if sel < 2 && s.status.load(Ordering::Acquire) & STATUS_FEATURES_OK == 0 {
                    let shift = 32 * sel;
                    let old = s.features.load(Ordering::Acquire);
                    let new = (old & !(0xffff_ffffu64 << shift)) | (v & 0xffff_ffff) << shift;
                    s.features.store(new, Ordering::Release);
                }
            }
            (0x10, 2) => s.config_vector.store(vector(v), Ordering::Release),
            (0x14, 1) => self.write_status(v as u8),
            (0x16, 2) => self.queue_select = v as u16,
            (0x18..=0x37, _) => {
                let Some(q) = s.queues.get(usize::from(self.queue_select)) else {
                    return;
                };
                let mut q = lock(&q.slot);
                if offset == 0x1a && data.len() == 2 {
                    q.vector = vector(v);
                    return;
                }
                if q.queue.ready() {
                    return; // no changes to a live queue
                }
                let (lo, hi) = (Some(v as u32), Some((v >> 32) as u32));
                match (offset, data.len()) {
                    (0x18, 2) => q.queue.set_size(v as u16),
                    (0x1c, 2) if v == 1 => q.queue.set_ready(true),
                    (0x20, 8) => q.queue.set_desc_table_address(lo, hi),
                    (0x20, 4) => q.queue.set_desc_table_address(lo, None),
                    (0x24, 4) => q.queue.set_desc_table_address(None, lo),
                    (0x28, 8) => q.queue.set_avail_ring_address(lo, hi),
                    (0x28, 4) => q.queue.set_avail_ring_address(lo, None),
                    (0x2c, 4) => q.queue.set_avail_ring_address(None, lo),
                    (0x30, 8) => q.queue.set_used_ring_address(lo, hi),
                    (0x30, 4) => q.queue.set_used_ring_address(lo, None),
                    (0x34, 4) => q.queue.set_used_ring_address(None, lo),
                    _ => {}
                }
            }
            _ => {}
        }
    }

    fn write_status(&mut self, value: u8) {
        let s = self.shared.clone();
        if value == 0 {
            s.reset();
            self.device_feature_select = 0;
            self.driver_feature_select = 0;
            self.queue_select = 0;
            return;
        }
        let old = s.status.load(Ordering::Acquire);
        let mut new = value | (old & STATUS_DEVICE_NEEDS_RESET);
        if new & STATUS_FEATURES_OK != 0 && old & STATUS_FEATURES_OK == 0 {
            let f = s.features.load(Ordering::Acquire);
            if f & !self.offered != 0 || f & (1 << VIRTIO_F_VERSION_1) == 0 {
                new &= !STATUS_FEATURES_OK;
            }
        }
        if new & STATUS_DRIVER_OK != 0 && new & STATUS_FEATURES_OK == 0 {
            new &= !STATUS_DRIVER_OK;
        }
        let activate = new & STATUS_DRIVER_OK != 0 && old & STATUS_DRIVER_OK == 0;
        if activate {
            let event_idx =
                s.features.load(Ordering::Acquire) & (1 << VIRTIO_F_RING_EVENT_IDX) != 0;
            for q in &s.queues {
                let mut q = lock(&q.slot);
                q.queue.set_event_idx(event_idx);
                if q.queue.ready() && !q.queue.is_valid(&s.mem) {
                    q.broken = true;
                    new |= STATUS_DEVICE_NEEDS_RESET;
                }
            }
        }
        s.status.store(new, Ordering::Release);
        if activate {
            // Requests the driver queued before DRIVER_OK are served now.
            for q in 0..s.queues.len() {
                if let Some(kick) = s.kick_eventfd(q) {
                    let _ = kick.write(1);
                }
            }
        }
    }

    fn msix_control_changed(&mut self) {
        let ctrl = self.config.read_reg(self.msix_cap / 4) >> 16;
        let enabled = ctrl & (1 << 15) != 0;
        let masked = ctrl & (1 << 14) != 0;
        lock(&self.shared.msix).set_control(enabled, masked);
    }
}

impl Drop for VirtioPciDevice {
    fn drop(&mut self) {
        self.shared.shutdown();
    }
}

impl PciDevice for VirtioPciDevice {
    fn read_config(&mut self, reg: usize, offset: u64, data: &mut [u8]) {
        self.config.read(reg, offset, data);
    }

    fn write_config(&mut self, reg: usize, offset: u64, data: &[u8]) {
        self.config.write(reg, offset, data);
        if reg == self.msix_cap / 4 {
            self.msix_control_changed();
        }
    }

    fn bar_regions(&self) -> Vec<BarRegion> {
        self.config.bar_regions()
    }
}

impl BusDevice for VirtioPciDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            o if o < COMMON_CFG_OFFSET + REGION_SIZE => self.common_read(o, data),
            ISR_OFFSET => {
                if let Some(b) = data.first_mut() {
                    *b = self.shared.isr.swap(0, Ordering::AcqRel);
                }
            }
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + REGION_SIZE).contains(&o) => {
                self.shared.device.read_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                lock(&self.shared.msix).read_table(o - MSIX_TABLE_OFFSET, data)
            }
            o if (MSIX_PBA_OFFSET..BAR_SIZE).contains(&o) => {
                lock(&self.shared.msix).read_pba(o - MSIX_PBA_OFFSET, data)
            }
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON_CFG_OFFSET + REGION_SIZE => self.common_write(o, data),
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + REGION_SIZE).contains(&o) => {
                self.shared.device.write_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + REGION_SIZE).contains(&o) => {
                // Normally an ioeventfd catches this; without one, wake the
                // queue's thread (requests never run on a vCPU).
                let q = (o - NOTIFY_OFFSET) / u64::from(NOTIFY_OFF_MULTIPLIER);
                if let Some(kick) = usize::try_from(q)
                    .ok()
                    .and_then(|q| self.shared.kick_eventfd(q))
                {
                    let _ = kick.write(1);
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                lock(&self.shared.msix).write_table(o - MSIX_TABLE_OFFSET, data)
            }
            _ => {}
        }
    }
}
