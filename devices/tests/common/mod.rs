//! What the virtio-blk integration tests share: the mission stack's images
//! (a detached LUKS header and a qcow2 or raw payload), and a virtio-blk-pci
//! device set up as Linux sets it up, with its rings at fixed guest
//! addresses.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use block::blockdev::{BackingFiles, OpenContext};
use block::luks::{create_with_iterations, CreateOptions, PbkdfIterations};
use block::{BlockGraph, SecretStore};
use devices::pci::PciDevice;
use devices::virtio::block::{BlockConfig, VirtioBlock};
use devices::virtio::{
    VirtioPciDevice, VirtioQueues, MSIX_TABLE_OFFSET, STATUS_ACKNOWLEDGE, STATUS_DRIVER,
    STATUS_DRIVER_OK, STATUS_FEATURES_OK, VIRTIO_F_RING_EVENT_IDX,
};
use devices::{BusDevice, Interrupt, WorkerPool};
use serde_json::json;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const PASSPHRASE: &[u8] = b"concurrency";
pub const BAR: u64 = 0xe000_0000;
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;
/// Guest memory below this holds the rings (queue sizes up to 256).
pub const RINGS: u64 = 0x10_0000;

/// An interrupt line that counts.
pub struct Counter(pub AtomicUsize);

impl Interrupt for Counter {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// A small deterministic generator (xorshift64*).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The images: a detached LUKS header and a qcow2 payload.
pub struct Images {
    pub dir: tempfile::TempDir,
    pub header: PathBuf,
    pub payload: PathBuf,
}

/// A detached header and a payload of `size` bytes: qcow2, or a sparse raw file.
pub fn make_images(size: u64, qcow2: bool) -> Images {
    let dir = tempfile::tempdir().expect("tempdir");
    let header = dir.path().join("disk.header");
    let payload = dir
        .path()
        .join(if qcow2 { "disk.qcow2" } else { "disk.raw" });
    let vol = create_with_iterations(
        &CreateOptions {
            detached_header: true,
            ..CreateOptions::default()
        },
        PASSPHRASE,
        PbkdfIterations {
            master_key: 1000,
            slot: 1000,
        },
    )
    .expect("luks header");
    std::fs::write(&header, &vol.header_image).expect("write header");
    if qcow2 {
        block::qcow2::create(
            &payload,
            Some(size),
            &block::qcow2::CreateOptions::default(),
        )
        .expect("qcow2");
    } else {
        std::fs::File::create(&payload)
            .and_then(|f| f.set_len(size))
            .expect("raw payload");
    }
    Images {
        dir,
        header,
        payload,
    }
}

/// Opens the mission stack as the config file would; returns the top node.
pub fn open_stack(images: &Images) -> (BlockGraph, block::NodeRef) {
    let mut secrets = SecretStore::new();
    secrets
        .add(
            "objects[0]",
            json!({"qom-type": "secret", "id": "sec0", "data": std::str::from_utf8(PASSPHRASE).unwrap()}),
            None,
        )
        .expect("secret");
    let ctx = OpenContext {
        secrets: &secrets,
        base_dir: None,
        no_io: false,
        read_only: false,
        backing_files: BackingFiles::Contained,
        legacy_aes: false,
    };
    let mut graph = BlockGraph::new();
    for args in [
        json!({"node-name": "hdr", "driver": "raw",
               "file": {"driver": "file", "filename": images.header.to_str().unwrap()}}),
        json!({"node-name": "payload",
               "driver": if images.payload.extension().is_some_and(|e| e == "qcow2") { "qcow2" } else { "raw" },
               "file": {"driver": "file", "filename": images.payload.to_str().unwrap()}}),
        json!({"node-name": "disk0", "driver": "luks", "file": "payload", "header": "hdr",
               "key-secret": "sec0"}),
    ] {
        graph
            .add("blockdevs", args, &ctx, false)
            .expect("blockdev-add");
    }
    let node = graph.get("disk0").expect("disk0");
    (graph, node)
}

/// The device over `node` with `workers` request workers, set up as Linux
/// sets it up (MSI-X, EVENT_IDX, every queue enabled).
pub struct Device {
    pub dev: VirtioPciDevice,
    pub queues: Arc<VirtioQueues>,
    pub irqs: Vec<Arc<Counter>>,
    pub pool: Arc<WorkerPool>,
}

/// Descriptor table, available and used ring of queue `q`.
pub fn ring(q: usize) -> (u64, u64, u64) {
    let base = 0x1000 + q as u64 * 0x4000;
    (base, base + 0x1000, base + 0x2000)
}

impl Device {
    /// The device over `node` with `cfg`, its requests run by `pool`.
    pub fn new(
        mem: &GuestMemoryMmap,
        node: block::NodeRef,
        cfg: BlockConfig,
        pool: Arc<WorkerPool>,
    ) -> Device {
        let queues_n = usize::from(cfg.num_queues);
        let qsize = cfg.queue_size;
        assert!(qsize <= 256, "rings are laid out for queues of up to 256");
        let blk = Arc::new(VirtioBlock::new(node, cfg).expect("virtio-blk"));
        let irqs: Vec<Arc<Counter>> = (0..=queues_n)
            .map(|_| Arc::new(Counter(AtomicUsize::new(0))))
            .collect();
        let ints: Vec<Arc<dyn Interrupt>> = irqs
            .iter()
            .map(|c| c.clone() as Arc<dyn Interrupt>)
            .collect();
        let mut dev =
            VirtioPciDevice::new(blk, mem.clone(), ints, BAR, &pool, "ctest").expect("device");
        let bar_w = |dev: &mut VirtioPciDevice, off: u64, v: u64, len: usize| {
            BusDevice::write(dev, off, &v.to_le_bytes()[..len]);
        };
        dev.write_config(1, 0, &6u32.to_le_bytes());
        // MSI-X on (capability found by walking the list).
        let mut p = {
            let mut d = [0u8; 4];
            dev.read_config(0x34 / 4, 0, &mut d);
            (d[0] & 0xfc) as usize
        };
        while p != 0 {
            let mut d = [0u8; 4];
            dev.read_config(p / 4, 0, &mut d);
            if d[0] == 0x11 {
                dev.write_config(p / 4, 0, &(1u32 << 31).to_le_bytes());
            }
            p = d[1] as usize;
        }
        for v in 0..=queues_n as u64 {
            let e = MSIX_TABLE_OFFSET + v * 16;
            bar_w(&mut dev, e, 0xfee0_0000, 4);
            bar_w(&mut dev, e + 8, 0x30 + v, 4);
            bar_w(&mut dev, e + 12, 0, 4);
        }
        bar_w(&mut dev, 0x14, 0, 1);
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER;
        bar_w(&mut dev, 0x14, u64::from(s), 1);
        let mut offered = 0u64;
        for sel in 0..2 {
            bar_w(&mut dev, 0, sel, 4);
            let mut d = [0u8; 4];
            BusDevice::read(&mut dev, 4, &mut d);
            offered |= u64::from(u32::from_le_bytes(d)) << (32 * sel);
        }
        assert!(offered & 1 << VIRTIO_F_RING_EVENT_IDX != 0);
        for sel in 0..2 {
            bar_w(&mut dev, 8, sel, 4);
            bar_w(&mut dev, 0xc, offered >> (32 * sel) & 0xffff_ffff, 4);
        }
        bar_w(&mut dev, 0x14, u64::from(s | STATUS_FEATURES_OK), 1);
        bar_w(&mut dev, 0x10, 0, 2);
        for q in 0..queues_n {
            let (desc, avail, used) = ring(q);
            for addr in [desc, avail, used] {
                mem.write_slice(&[0u8; 0x1000], GuestAddress(addr)).unwrap();
            }
            bar_w(&mut dev, 0x16, q as u64, 2);
            bar_w(&mut dev, 0x18, u64::from(qsize), 2);
            bar_w(&mut dev, 0x1a, q as u64 + 1, 2);
            bar_w(&mut dev, 0x20, desc, 8);
            bar_w(&mut dev, 0x28, avail, 8);
            bar_w(&mut dev, 0x30, used, 8);
            bar_w(&mut dev, 0x1c, 1, 2);
        }
        bar_w(
            &mut dev,
            0x14,
            u64::from(s | STATUS_FEATURES_OK | STATUS_DRIVER_OK),
            1,
        );
        let queues = dev.queues();
        Device {
            dev,
            queues,
            irqs,
            pool,
        }
    }
}

/// Writes descriptor `i` of table `table`.
pub fn put_desc(
    mem: &GuestMemoryMmap,
    table: u64,
    i: u16,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) {
    let d = table + 16 * u64::from(i);
    mem.write_obj(addr, GuestAddress(d)).unwrap();
    mem.write_obj(len, GuestAddress(d + 8)).unwrap();
    mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
    mem.write_obj(next, GuestAddress(d + 14)).unwrap();
}

/// Makes the chain at `head` available on queue `q` (of `qsize`), bumping
/// the driver's `avail_idx`.
pub fn publish(mem: &GuestMemoryMmap, q: usize, qsize: u16, avail_idx: &mut u16, head: u16) {
    let avail = ring(q).1;
    let entry = avail + 4 + 2 * u64::from(*avail_idx % qsize);
    mem.write_obj(head, GuestAddress(entry)).unwrap();
    *avail_idx = avail_idx.wrapping_add(1);
    mem.store(*avail_idx, GuestAddress(avail + 2), Ordering::Release)
        .unwrap();
}

/// The used ring's index of queue `q`.
pub fn used_idx(mem: &GuestMemoryMmap, q: usize) -> u16 {
    mem.load(GuestAddress(ring(q).2 + 2), Ordering::Acquire)
        .unwrap()
}

/// Writes a virtio-blk request header.
pub fn write_header(mem: &GuestMemoryMmap, at: u64, ty: u32, sector: u64) {
    mem.write_obj(ty, GuestAddress(at)).unwrap();
    mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
    mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
}
