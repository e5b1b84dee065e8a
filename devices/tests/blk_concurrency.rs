//! virtio-blk over the mission stack (luks with a detached header over
//! qcow2 over a file) driven by a simulated guest driver with many requests
//! in flight on several queues, at 1, 4, 16 and 64 request workers (more
//! than this machine's cores): reads, writes, flushes, discards and
//! write-zeroes of 512 B to 4 MiB, at sector- and cluster-unaligned offsets,
//! in guest buffers split at unaligned places. Every completed read is
//! checked against a reference of the disk, the whole disk is read back
//! after each round, and at the end `qemu-img check` and `qemu-img compare`
//! (when installed; required under CI) check the images themselves.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{
    make_images, open_stack, ring, Device, Images, Rng, F_NEXT, F_WRITE, PASSPHRASE, RINGS,
};
use devices::virtio::block::{
    BlockConfig, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use devices::virtio::VirtioQueues;
use devices::WorkerPool;
use serde_json::json;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const QUEUES: usize = 2;
const QSIZE: u16 = 128;
/// Requests each queue keeps in flight.
const IN_FLIGHT: usize = 12;
/// Descriptors a request may use: header, up to 6 data pieces, status.
const DESCS_PER_SLOT: u16 = 8;
/// Each queue owns one region of the disk.
const REGION: u64 = 24 << 20;
const DISK: u64 = QUEUES as u64 * REGION;
const MAX_REQ: u64 = 4 << 20;
/// Guest memory: rings, then per queue and slot a data area.
const SLOT_AREA: u64 = MAX_REQ + 0x1_0000;
const MEM: u64 = RINGS + QUEUES as u64 * IN_FLIGHT as u64 * SLOT_AREA;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Read,
    Write,
    Flush,
    Discard,
    Zeroes,
}

/// A request in flight.
struct Pending {
    kind: Kind,
    /// Byte offset on the disk and length.
    offset: u64,
    len: u64,
    /// Guest buffers of the data.
    segs: Vec<(u64, u64)>,
    /// What a write wrote.
    data: Vec<u8>,
    status: u64,
}

/// One queue's driver: its region of the disk, its slots, its reference.
struct Driver<'a> {
    mem: &'a GuestMemoryMmap,
    queues: &'a VirtioQueues,
    q: usize,
    rng: Rng,
    reference: Vec<u8>,
    slots: Vec<Option<Pending>>,
    avail_idx: u16,
    used_seen: u16,
}

impl<'a> Driver<'a> {
    fn region_start(&self) -> u64 {
        self.q as u64 * REGION
    }

    fn overlaps_in_flight(&self, offset: u64, len: u64) -> bool {
        self.slots
            .iter()
            .flatten()
            .any(|p| p.len > 0 && offset < p.offset + p.len && p.offset < offset + len)
    }

    fn put_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = ring(self.q).0 + 16 * u64::from(i);
        self.mem.write_obj(addr, GuestAddress(d)).unwrap();
        self.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(d + 14)).unwrap();
    }

    fn random_request(&mut self, slot: usize) -> Option<Pending> {
        let kind = match self.rng.below(100) {
            0..=39 => Kind::Read,
            40..=79 => Kind::Write,
            80..=84 => Kind::Flush,
            85..=91 => Kind::Discard,
            _ => Kind::Zeroes,
        };
        if kind == Kind::Flush {
            return Some(Pending {
                kind,
                offset: 0,
                len: 0,
                segs: Vec::new(),
                data: Vec::new(),
                status: self.slot_base(slot) + MAX_REQ + 0x100,
            });
        }
        // 512 B .. 4 MiB, mostly small; sector- or cluster-aligned offsets.
        let sectors = match self.rng.below(10) {
            0..=5 => 1 + self.rng.below(128),
            6..=8 => 1 + self.rng.below(1024),
            _ => 1 + self.rng.below(MAX_REQ / 512),
        };
        let len = sectors * 512;
        let align = if self.rng.below(2) == 0 { 512 } else { 65536 };
        let room = REGION - len;
        let offset = self.region_start() + (self.rng.below(room / 512) * 512) / align * align;
        if self.overlaps_in_flight(offset, len) {
            return None;
        }
        let base = self.slot_base(slot);
        let mut segs = Vec::new();
        if matches!(kind, Kind::Read | Kind::Write) {
            // Up to 6 pieces, cut at sector or arbitrary byte boundaries,
            // with gaps between them in guest memory.
            let pieces = 1 + self.rng.below(6);
            let mut cuts: Vec<u64> = (1..pieces)
                .map(|_| {
                    let c = 1 + self.rng.below(len - 1);
                    if self.rng.below(2) == 0 {
                        c / 512 * 512
                    } else {
                        c
                    }
                })
                .filter(|&c| c > 0 && c < len)
                .collect();
            cuts.sort_unstable();
            cuts.dedup();
            let mut at = base + self.rng.below(64);
            let mut prev = 0;
            for c in cuts.into_iter().chain([len]) {
                segs.push((at, c - prev));
                at += c - prev + self.rng.below(64);
                prev = c;
            }
        }
        let data = if kind == Kind::Write {
            let seed = self.rng.next();
            let data: Vec<u8> = (0..len)
                .map(|i| (seed.wrapping_add(i.wrapping_mul(0x9e37_79b9)) >> 24) as u8)
                .collect();
            let mut pos = 0usize;
            for &(addr, n) in &segs {
                self.mem
                    .write_slice(&data[pos..pos + n as usize], GuestAddress(addr))
                    .unwrap();
                pos += n as usize;
            }
            data
        } else {
            Vec::new()
        };
        Some(Pending {
            kind,
            offset,
            len,
            segs,
            data,
            status: base + MAX_REQ + 0x100,
        })
    }

    fn slot_base(&self, slot: usize) -> u64 {
        RINGS + (self.q * IN_FLIGHT + slot) as u64 * SLOT_AREA
    }

    /// Puts the request of `slot` on the ring.
    fn submit(&mut self, slot: usize, p: &Pending) {
        let first = slot as u16 * DESCS_PER_SLOT;
        let hdr = self.slot_base(slot) + MAX_REQ;
        let ty = match p.kind {
            Kind::Read => VIRTIO_BLK_T_IN,
            Kind::Write => VIRTIO_BLK_T_OUT,
            Kind::Flush => VIRTIO_BLK_T_FLUSH,
            Kind::Discard => VIRTIO_BLK_T_DISCARD,
            Kind::Zeroes => VIRTIO_BLK_T_WRITE_ZEROES,
        };
        self.mem.write_obj(ty, GuestAddress(hdr)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(hdr + 4)).unwrap();
        self.mem
            .write_obj(p.offset / 512, GuestAddress(hdr + 8))
            .unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(p.status)).unwrap();
        let mut descs: Vec<(u64, u32, u16)> = vec![(hdr, 16, 0)];
        match p.kind {
            Kind::Read | Kind::Write => {
                let flags = if p.kind == Kind::Read { F_WRITE } else { 0 };
                descs.extend(p.segs.iter().map(|&(a, n)| (a, n as u32, flags)));
            }
            Kind::Discard | Kind::Zeroes => {
                let seg = hdr + 0x20;
                self.mem
                    .write_obj(p.offset / 512, GuestAddress(seg))
                    .unwrap();
                self.mem
                    .write_obj((p.len / 512) as u32, GuestAddress(seg + 8))
                    .unwrap();
                self.mem.write_obj(0u32, GuestAddress(seg + 12)).unwrap();
                descs.push((seg, 16, 0));
            }
            Kind::Flush => {}
        }
        descs.push((p.status, 1, F_WRITE));
        assert!(descs.len() <= usize::from(DESCS_PER_SLOT));
        let n = descs.len() as u16;
        for (k, &(addr, len, flags)) in descs.iter().enumerate() {
            let i = first + k as u16;
            let last = k as u16 + 1 == n;
            self.put_desc(i, addr, len, flags | if last { 0 } else { F_NEXT }, i + 1);
        }
        let avail = ring(self.q).1;
        let entry = avail + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        self.mem.write_obj(first, GuestAddress(entry)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .store(self.avail_idx, GuestAddress(avail + 2), Ordering::Release)
            .unwrap();
    }

    fn complete(&mut self, slot: usize, used_len: u32) {
        let p = self.slots[slot].take().expect("a slot in flight");
        let status: u8 = self.mem.read_obj(GuestAddress(p.status)).unwrap();
        assert_eq!(
            status, 0,
            "queue {}: {:?} at {} +{} failed",
            self.q, p.kind, p.offset, p.len
        );
        let start = p.offset.saturating_sub(self.region_start()) as usize;
        let r = start..start + p.len as usize;
        match p.kind {
            Kind::Read => {
                assert_eq!(used_len as u64, p.len + 1, "used length of a read");
                let mut pos = r.start;
                for &(addr, n) in &p.segs {
                    let mut got = vec![0u8; n as usize];
                    self.mem.read_slice(&mut got, GuestAddress(addr)).unwrap();
                    assert!(
                        got == self.reference[pos..pos + n as usize],
                        "queue {}: read at {} +{} differs from what was written",
                        self.q,
                        p.offset,
                        p.len
                    );
                    pos += n as usize;
                }
            }
            Kind::Write => self.reference[r].copy_from_slice(&p.data),
            // luks does not pass discards down (as QEMU): the data stays.
            Kind::Discard | Kind::Flush => {}
            Kind::Zeroes => self.reference[r].fill(0),
        }
        if p.kind != Kind::Read {
            assert_eq!(used_len, 1, "used length");
        }
    }

    /// Runs `requests` random requests with up to IN_FLIGHT in flight.
    fn run(&mut self, requests: usize) {
        let mut submitted = 0;
        let mut last_progress = Instant::now();
        while submitted < requests || self.slots.iter().any(Option::is_some) {
            let mut kicked = false;
            for slot in 0..IN_FLIGHT {
                if submitted >= requests || self.slots[slot].is_some() {
                    continue;
                }
                if let Some(p) = self.random_request(slot) {
                    self.submit(slot, &p);
                    self.slots[slot] = Some(p);
                    submitted += 1;
                    kicked = true;
                }
            }
            if kicked {
                let _ = self.queues.kick_eventfd(self.q).unwrap().write(1);
            }
            self.reap(&mut last_progress);
        }
    }

    /// Takes the completed requests off the used ring.
    fn reap(&mut self, last_progress: &mut Instant) {
        let used = ring(self.q).2;
        let idx: u16 = self
            .mem
            .load(GuestAddress(used + 2), Ordering::Acquire)
            .unwrap();
        if idx == self.used_seen {
            assert!(
                last_progress.elapsed() < Duration::from_secs(120),
                "queue {}: no completion for 120 s ({} in flight): the device hangs",
                self.q,
                self.slots.iter().flatten().count()
            );
            std::thread::sleep(Duration::from_micros(100));
            return;
        }
        *last_progress = Instant::now();
        while self.used_seen != idx {
            let e = used + 4 + 8 * u64::from(self.used_seen % QSIZE);
            let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap();
            let slot = (id / u32::from(DESCS_PER_SLOT)) as usize;
            assert_eq!(id % u32::from(DESCS_PER_SLOT), 0, "used id is a head");
            self.complete(slot, len);
            self.used_seen = self.used_seen.wrapping_add(1);
        }
    }

    /// Writes zeros over the whole region (what the reference starts as:
    /// unwritten luks sectors read as the decryption of zeros).
    fn zero_all(&mut self) {
        self.sweep(Kind::Zeroes);
    }

    /// Reads the whole region back through the device and compares it.
    fn verify_all(&mut self) {
        self.sweep(Kind::Read);
    }

    /// One request of `kind` after the other over the whole region.
    fn sweep(&mut self, kind: Kind) {
        let mut off = 0;
        while off < REGION {
            let len = MAX_REQ.min(REGION - off);
            let segs = if kind == Kind::Read {
                vec![(self.slot_base(0), len)]
            } else {
                Vec::new()
            };
            let p = Pending {
                kind,
                offset: self.region_start() + off,
                len,
                segs,
                data: Vec::new(),
                status: self.slot_base(0) + MAX_REQ + 0x100,
            };
            self.submit(0, &p);
            self.slots[0] = Some(p);
            let _ = self.queues.kick_eventfd(self.q).unwrap().write(1);
            let mut t = Instant::now();
            while self.slots[0].is_some() {
                self.reap(&mut t);
            }
            off += len;
        }
    }
}

fn qemu_img() -> Option<&'static str> {
    let found = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some("qemu-img");
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "qemu-img is required under CI"
    );
    eprintln!("note: qemu-img not installed; the peer checks are skipped");
    None
}

/// `qemu-img check` of the payload and `qemu-img compare` of the luks
/// stack against the reference.
fn check_with_qemu(images: &Images, reference: &[u8], dir: &Path) {
    let Some(qemu_img) = qemu_img() else { return };
    let out = Command::new(qemu_img)
        .args(["check", "-f", "qcow2"])
        .arg(&images.payload)
        .output()
        .expect("qemu-img check");
    assert!(
        out.status.success(),
        "qemu-img check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let raw = dir.join("reference.raw");
    std::fs::write(&raw, reference).expect("reference");
    let stack = format!(
        "json:{}",
        json!({"driver": "luks", "key-secret": "sec0",
               "file": {"driver": "qcow2", "file": {"driver": "file",
                        "filename": images.payload.to_str().unwrap()}},
               "header": {"driver": "file", "filename": images.header.to_str().unwrap()}})
    );
    let out = Command::new(qemu_img)
        .args(["compare", "--object"])
        .arg(format!(
            "secret,id=sec0,data={}",
            std::str::from_utf8(PASSPHRASE).unwrap()
        ))
        .args(["-f", "raw"])
        .arg(&raw)
        .arg(&stack)
        .output()
        .expect("qemu-img compare");
    assert!(
        out.status.success(),
        "qemu-img compare: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn concurrent_requests_at_1_4_16_and_64_workers() {
    let images = make_images(DISK, true);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).expect("memory");
    let (graph, node) = open_stack(&images);
    let mut references: Vec<Vec<u8>> = vec![vec![0u8; REGION as usize]; QUEUES];
    let requests = std::env::var("CRYPTVM_CONCURRENCY_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150);
    for (round, workers) in [1usize, 4, 16, 64].into_iter().enumerate() {
        let cfg = BlockConfig {
            num_queues: QUEUES as u16,
            queue_size: QSIZE,
            ..BlockConfig::default()
        };
        let pool = WorkerPool::new(workers, "ctest").expect("workers");
        let device = Device::new(&mem, node.clone(), cfg, pool);
        let queues = device.queues.clone();
        std::thread::scope(|s| {
            for (q, reference) in references.iter_mut().enumerate() {
                let mem = &mem;
                let queues = &*queues;
                s.spawn(move || {
                    let mut d = Driver {
                        mem,
                        queues,
                        q,
                        rng: Rng(0x5eed_0000 + (round * 16 + q) as u64 * 7919),
                        reference: std::mem::take(reference),
                        slots: (0..IN_FLIGHT).map(|_| None).collect(),
                        avail_idx: 0,
                        used_seen: 0,
                    };
                    if round == 0 {
                        d.zero_all();
                    }
                    d.run(requests);
                    d.verify_all();
                    *reference = std::mem::take(&mut d.reference);
                });
            }
        });
        assert_eq!(
            device.queues.status() & devices::virtio::STATUS_DEVICE_NEEDS_RESET,
            0,
            "{workers} workers: the device failed"
        );
        drop(device);
        eprintln!("{workers} workers: {requests} requests on each of {QUEUES} queues verified");
    }
    drop(node);
    drop(graph);
    let whole: Vec<u8> = references.concat();
    check_with_qemu(&images, &whole, images.header.parent().unwrap());
}
