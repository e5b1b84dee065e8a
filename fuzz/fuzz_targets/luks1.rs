//! Arbitrary bytes as a LUKS1 header, opened through the block graph as a `luks`
//! node (over a `raw` node) with the passphrase `fuzz`, which the seeds were made
//! with (`fuzz/seeds.sh`). The KDF cost is clamped with the node's
//! `kdf-iterations-limit` so no header makes unlocking slow. If it unlocks, a few
//! sectors are read, written and read back (they must round-trip).
//!
//! Input: one byte of flags (bit 0: the header is detached, the payload is a
//! separate 64 KiB node), then the header image.
#![no_main]

use std::sync::Arc;

use block::blockdev::{BackingFiles, OpenContext};
use block::{BlockGraph, NodeRef, SecretStore};
use cryptvm_fuzz::{Input, MemNode};
use libfuzzer_sys::fuzz_target;
use serde_json::json;

/// PBKDF2 iterations allowed over all active slots: a seed's slot costs 2000
/// (1000 for the slot, 1000 for the master-key digest).
const KDF_LIMIT: u64 = 20_000;

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let flags = input.u8();
    let image = input.rest().to_vec();
    let mut secrets = SecretStore::new();
    secrets
        .add(
            "fuzz",
            json!({"qom-type": "secret", "id": "sec0", "data": "fuzz"}),
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
    let detached = flags & 1 != 0;
    let img: NodeRef = Arc::new(MemNode::new(image, 0, false));
    graph.insert_node("img", img).expect("img");
    let mut args = json!({
        "node-name": "disk",
        "driver": "luks",
        "file": {"driver": "raw", "file": "img"},
        "key-secret": "sec0",
        "kdf-iterations-limit": KDF_LIMIT,
    });
    if detached {
        let payload: NodeRef = Arc::new(MemNode::new(vec![0; 64 << 10], 0, false));
        graph.insert_node("payload", payload).expect("payload");
        args["header"] = args["file"].take();
        args["file"] = json!("payload");
    }
    if graph.add("fuzz", args, &ctx, false).is_err() {
        return;
    }
    let disk = graph.get("disk").expect("disk");
    let sectors = (disk.size() / 512).min(8);
    if sectors == 0 {
        return;
    }
    let len = (sectors * 512) as usize;
    let mut before = vec![0u8; len];
    if disk.read_at(0, &mut before).is_err() {
        return;
    }
    let pattern: Vec<u8> = (0..len).map(|i| (i % 251) as u8 ^ flags).collect();
    if disk.write_at(0, &pattern).is_ok() {
        let mut after = vec![0u8; len];
        disk.read_at(0, &mut after).expect("read back");
        assert_eq!(after, pattern, "a written sector read back differently");
    }
});
