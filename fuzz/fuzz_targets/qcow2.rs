//! An arbitrary image opened as qcow2, read-write, over an in-memory file node
//! (growing to at most 64 MiB) with an in-memory backing node; then up to 16
//! reads, writes, write-zeroes, discards and flushes driven by the input; then
//! `check` with repair (`-r all`) and `close`. Nothing may panic, hang or allocate
//! without bound. (One `check` per run: it compares every entry of every refcount
//! block, 32768 of them per block, which dominates a run.)
//!
//! Input: one byte `n`, then `n % 17` operations of 8 bytes (kind, offset in 512-byte
//! units as a u32, length in 512-byte units as a u16, pattern byte), then the image.
#![no_main]

use std::sync::Arc;

use block::qcow2::{Backing, Qcow2Node, Qcow2Options, Repair};
use block::{BlockNode, NodeRef};
use cryptvm_fuzz::{Input, MemNode};
use libfuzzer_sys::fuzz_target;

/// Largest the image file may grow.
const FILE_CAP: usize = 64 << 20;
/// Longest single request, in 512-byte units (1 MiB).
const MAX_UNITS: u64 = 2048;

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let n = usize::from(input.u8()) % 17;
    let ops: Vec<[u8; 8]> = (0..n)
        .map(|_| {
            let mut op = [0u8; 8];
            let t = input.take(8);
            op[..t.len()].copy_from_slice(t);
            op
        })
        .collect();
    let image = input.rest().to_vec();
    let file: NodeRef = Arc::new(MemNode::new(image, FILE_CAP, false));
    let backing: NodeRef = Arc::new(MemNode::new(vec![0x5a; 1 << 20], 1 << 20, true));
    let opts = Qcow2Options::default();
    let Ok(node) = Qcow2Node::open_image(file, Backing::Node(backing), &opts) else {
        return;
    };
    let size = node.size();
    for op in ops {
        let mut o = Input(&op);
        let kind = o.u8();
        let mut offset = u64::from(o.u32()) * 512;
        let len = (u64::from(o.u16()) % (MAX_UNITS + 1)) * 512 + u64::from(kind >> 7);
        let pattern = o.u8();
        // Half the time, count from the end of the disk (its last clusters).
        if kind & 0x40 != 0 {
            offset = size.saturating_sub(offset);
        }
        match kind % 8 {
            0 | 1 => {
                let mut buf = vec![0u8; len as usize];
                let _ = node.read_at(offset, &mut buf);
            }
            2 | 3 => {
                let buf = vec![pattern; len as usize];
                let _ = node.write_at(offset, &buf);
            }
            4 => {
                let _ = node.write_zeroes(offset, len * 8);
            }
            5 => {
                let _ = node.discard(offset, len * 8);
            }
            _ => {
                let _ = node.flush();
            }
        }
    }
    let _ = node.check(Repair::All);
    let _ = node.close();
});
