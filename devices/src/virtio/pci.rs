//! The virtio 1.x modern PCI transport (no legacy interface).

use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rayon::prelude::*;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::msix::{copy_out, Msix, MsixEntry, MSIX_ENTRY_SIZE};
use super::{
    Chain, ChainError, VirtioDevice, VirtioError, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER_OK,
    STATUS_FEATURES_OK, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1,
    VIRTIO_MSI_NO_VECTOR,
};
use crate::pci::{BarKind, BarRegion, PciConfiguration, PciDevice, PciIds};
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
const MAX_QUEUES: usize = ((MSIX_PBA_OFFSET - MSIX_TABLE_OFFSET) / MSIX_ENTRY_SIZE) as usize - 1;

const PCI_CAP_ID_VENDOR: u8 = 0x09;
const PCI_CAP_ID_MSIX: u8 = 0x11;
const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;

const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct QueueSlot {
    queue: Queue,
    vector: u16,
    broken: bool,
}

/// The part of a virtio PCI device that I/O threads use: the virtqueues,
/// negotiated features, ISR and MSI-X delivery. Each queue has its own lock,
/// so different queues are served in parallel.
pub struct VirtioQueues {
    device: Arc<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    queues: Vec<Mutex<QueueSlot>>,
    msix: Mutex<Msix>,
    isr: AtomicU8,
    status: AtomicU8,
    features: AtomicU64,
    config_vector: AtomicU16,
}

impl VirtioQueues {
    /// Serves every available request on queue `index` (after a
    /// notification) and interrupts the driver as the queue's suppression
    /// settings ask. Returns the number of requests completed. A protocol
    /// violation stops the queue and sets `DEVICE_NEEDS_RESET`; nothing the
    /// guest writes makes this panic.
    pub fn process_queue(&self, index: usize) -> usize {
        let status = self.status.load(Ordering::Acquire);
        if status & STATUS_DRIVER_OK == 0 || status & STATUS_DEVICE_NEEDS_RESET != 0 {
            return 0;
        }
        let Some(slot) = self.queues.get(index) else {
            return 0;
        };
        let mut slot = lock(slot);
        if slot.broken || !slot.queue.ready() {
            return 0;
        }
        let mut done = 0;
        let result = self.run_queue(&mut slot, &mut done);
        let notify = match result {
            Ok(()) => done > 0 && self.needs_notification(&mut slot.queue),
            Err(_) => {
                slot.broken = true;
                drop(slot);
                self.mark_broken();
                return done;
            }
        };
        if notify {
            self.isr.fetch_or(ISR_QUEUE, Ordering::AcqRel);
            let vector = slot.vector;
            drop(slot);
            lock(&self.msix).trigger(vector);
        }
        done
    }

    /// Serves the queue in batches: every request available at once is
    /// served concurrently (the driver may complete them in any order; it
    /// waits for completions before issuing dependent requests or flushes),
    /// so one queue with many requests in flight keeps several cores busy.
    fn run_queue(&self, slot: &mut QueueSlot, done: &mut usize) -> Result<(), ChainError> {
        let mem = &self.mem;
        let features = self.features.load(Ordering::Acquire);
        let bad = |_| ChainError::Malformed("rings outside guest memory");
        let size = slot.queue.size();
        loop {
            slot.queue.disable_notification(mem).map_err(bad)?;
            loop {
                let batch: Vec<Chain<'_>> = match slot.queue.iter(mem) {
                    Ok(it) => it.take(usize::from(size)).collect(),
                    Err(_) => return Err(ChainError::Malformed("available ring index")),
                };
                if batch.is_empty() {
                    break;
                }
                if batch.iter().any(|c| c.head_index() >= size) {
                    return Err(ChainError::Malformed("head index beyond the queue"));
                }
                let served: Vec<(u16, Result<u32, ChainError>)> = if batch.len() == 1 {
                    batch
                        .into_iter()
                        .map(|c| (c.head_index(), self.device.process_chain(mem, c, features)))
                        .collect()
                } else {
                    batch
                        .into_par_iter()
                        .map(|c| (c.head_index(), self.device.process_chain(mem, c, features)))
                        .collect()
                };
                for (head, result) in served {
                    let len = result?;
                    slot.queue.add_used(mem, head, len).map_err(bad)?;
                    *done += 1;
                }
            }
            if !slot.queue.enable_notification(mem).map_err(bad)? {
                return Ok(());
            }
        }
    }

    fn needs_notification(&self, queue: &mut Queue) -> bool {
        if queue.event_idx_enabled() {
            return queue.needs_notification(&self.mem).unwrap_or(true);
        }
        let flags: u16 = self
            .mem
            .read_obj(GuestAddress(queue.avail_ring()))
            .unwrap_or(0);
        u16::from_le(flags) & AVAIL_F_NO_INTERRUPT == 0
    }

    fn mark_broken(&self) {
        let old = self
            .status
            .fetch_or(STATUS_DEVICE_NEEDS_RESET, Ordering::AcqRel);
        if old & STATUS_DEVICE_NEEDS_RESET == 0 && old & STATUS_DRIVER_OK != 0 {
            self.isr.fetch_or(ISR_CONFIG, Ordering::AcqRel);
            lock(&self.msix).trigger(self.config_vector.load(Ordering::Acquire));
        }
    }

    /// The device status byte.
    pub fn status(&self) -> u8 {
        self.status.load(Ordering::Acquire)
    }

    /// The features the driver accepted.
    pub fn driver_features(&self) -> u64 {
        self.features.load(Ordering::Acquire)
    }

    /// Whether queue `index` was stopped for a protocol violation.
    pub fn queue_broken(&self, index: usize) -> bool {
        self.queues.get(index).is_some_and(|q| lock(q).broken)
    }

    /// MSI-X table entry `vector` as programmed (for KVM GSI routing).
    pub fn msix_entry(&self, vector: u16) -> Option<MsixEntry> {
        lock(&self.msix).entries.get(usize::from(vector)).copied()
    }

    /// Whether MSI-X is enabled and not function-masked.
    pub fn msix_enabled(&self) -> bool {
        let m = lock(&self.msix);
        m.enabled && !m.function_mask
    }

    fn reset(&self) {
        self.status.store(0, Ordering::Release);
        self.features.store(0, Ordering::Release);
        self.isr.store(0, Ordering::Release);
        self.config_vector
            .store(VIRTIO_MSI_NO_VECTOR, Ordering::Release);
        for q in &self.queues {
            let mut q = lock(q);
            q.queue.reset();
            q.vector = VIRTIO_MSI_NO_VECTOR;
            q.broken = false;
        }
        self.device.reset();
    }
}

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
    /// for anything the driver assigns, `num_queues + 1` in all.
    pub fn new(
        device: Arc<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupts: Vec<Arc<dyn Interrupt>>,
        bar_addr: u64,
    ) -> Result<Self, VirtioError> {
        let nq = usize::from(device.num_queues());
        if nq == 0 || nq > MAX_QUEUES {
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

        let mut queues = Vec::with_capacity(nq);
        for _ in 0..nq {
            let queue = Queue::new(qmax)
                .map_err(|e| VirtioError::InvalidConfig(format!("queue size {qmax}: {e}")))?;
            queues.push(Mutex::new(QueueSlot {
                queue,
                vector: VIRTIO_MSI_NO_VECTOR,
                broken: false,
            }));
        }
        let offered = device.features()
            | 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_F_RING_INDIRECT_DESC
            | 1 << VIRTIO_F_RING_EVENT_IDX;
        Ok(Self {
            config,
            msix_cap,
            offered,
            shared: Arc::new(VirtioQueues {
                device,
                mem,
                queues,
                msix: Mutex::new(Msix::new(interrupts)),
                isr: AtomicU8::new(0),
                status: AtomicU8::new(0),
                features: AtomicU64::new(0),
                config_vector: AtomicU16::new(VIRTIO_MSI_NO_VECTOR),
            }),
            device_feature_select: 0,
            driver_feature_select: 0,
            queue_select: 0,
        })
    }

    /// The queues, for the I/O threads.
    pub fn queues(&self) -> Arc<VirtioQueues> {
        self.shared.clone()
    }

    /// Serves queue `index`; see [`VirtioQueues::process_queue`].
    pub fn process_queue(&self, index: usize) -> usize {
        self.shared.process_queue(index)
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
            let q = lock(q);
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
                let mut q = lock(q);
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
                let mut q = lock(q);
                q.queue.set_event_idx(event_idx);
                if q.queue.ready() && !q.queue.is_valid(&s.mem) {
                    q.broken = true;
                    new |= STATUS_DEVICE_NEEDS_RESET;
                }
            }
        }
        s.status.store(new, Ordering::Release);
    }

    fn msix_control_changed(&mut self) {
        let ctrl = self.config.read_reg(self.msix_cap / 4) >> 16;
        let enabled = ctrl & (1 << 15) != 0;
        let masked = ctrl & (1 << 14) != 0;
        lock(&self.shared.msix).set_control(enabled, masked);
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
                // Normally an ioeventfd catches this; without one, serve the
                // queue here.
                let q = (o - NOTIFY_OFFSET) / u64::from(NOTIFY_OFF_MULTIPLIER);
                self.shared.process_queue(q as usize);
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                lock(&self.shared.msix).write_table(o - MSIX_TABLE_OFFSET, data)
            }
            _ => {}
        }
    }
}
