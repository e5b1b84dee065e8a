//! virtio-blk requests from a hostile driver: the input is written into simulated
//! guest memory (64 KiB at 0, and 4 KiB at 0x20000 after a hole), where the
//! descriptor table (at 0), the available ring (0x1000) and the used ring (0x2000) of
//! one queue live; the chains on the available ring (loops, chains longer than the
//! queue, huge lengths, addresses outside memory or across the hole, indirect tables)
//! are served by the device's own chain collection and request code
//! (`devices::virtio::queues::serve_inline`, `VirtioBlock::process`) against an
//! in-memory disk of 256 KiB. Nothing may panic or hang.
//!
//! Input: one byte of flags (bits 0-2: queue size 2^(n+1), at most 256; bit 3:
//! EVENT_IDX; bit 4: read-only disk; bit 5: no discard/write-zeroes), a u16 of
//! available ring index, then the bytes of guest memory from address 0.
#![no_main]

use std::sync::Arc;

use cryptvm_fuzz::{Input, MemNode};
use devices::virtio::block::{BlockConfig, VirtioBlock};
use devices::virtio::queues::{serve_inline, RingLayout};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const LOW: usize = 64 << 10;
const HIGH: u64 = 0x2_0000;

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let flags = input.u8();
    let avail_idx = input.u16();
    let bytes = input.rest();
    let size = 2u16 << (flags & 7).min(7);
    let mem =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), LOW), (GuestAddress(HIGH), 4096)])
            .expect("guest memory");
    let low = &bytes[..bytes.len().min(LOW)];
    mem.write_slice(low, GuestAddress(0)).expect("fill");
    if bytes.len() > LOW {
        let high = &bytes[LOW..bytes.len().min(LOW + 4096)];
        mem.write_slice(high, GuestAddress(HIGH)).expect("fill");
    }
    // The driver's available index: as given, the ring's own bytes otherwise.
    if avail_idx != 0 {
        mem.write_obj(avail_idx, GuestAddress(0x1002))
            .expect("avail idx");
    }
    let disk = Arc::new(MemNode::new(vec![0xa5; 256 << 10], 0, flags & 0x10 != 0));
    let cfg = BlockConfig {
        queue_size: 256,
        serial: "fuzz-serial".into(),
        discard: flags & 0x20 == 0,
        write_zeroes: flags & 0x20 == 0,
        ..BlockConfig::default()
    };
    let blk = VirtioBlock::new(disk, cfg).expect("virtio-blk");
    let ring = RingLayout {
        size,
        desc: 0,
        avail: 0x1000,
        used: 0x2000,
        event_idx: flags & 8 != 0,
    };
    // Twice the queue: the available index may run far ahead of the ring.
    let _ = serve_inline(&blk, &mem, ring, 2 * usize::from(size));
});
