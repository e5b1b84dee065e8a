//! Differential test of the qcow2 driver: thousands of random reads, writes,
//! discards and write-zeroes (1 B .. 4 MiB, unaligned) against cryptvm's qcow2
//! node and an in-memory reference. After each batch, `qemu-img check` must
//! find no errors and no leaks, and `qemu-img compare` must find the image
//! identical to the reference. Runs for cluster sizes 512 B, 64 KiB and
//! 2 MiB, compat v2 (0.10) and v3 (1.1), refcount widths 1 and 64, with and
//! without a backing file (copy-on-write).

#[path = "../common/mod.rs"]
mod common;

use std::path::Path;

use block::blockdev::{BackingFiles, OpenContext};
use block::{BlockGraph, NodeRef, SecretStore};
use common::{require, run};
use serde_json::json;

/// Virtual size of every test image.
const SIZE: usize = 24 << 20;
/// Operations per batch, and batches per configuration.
const BATCH: usize = 150;
const BATCHES: usize = 8;
/// Largest request.
const MAX_LEN: usize = 4 << 20;

/// A small deterministic generator (xorshift64*), so failures replay.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// A request length: mostly small, sometimes cluster-sized, sometimes huge.
    fn len(&mut self, cluster: usize) -> usize {
        match self.below(10) {
            0..=3 => 1 + self.below(4096) as usize,
            4..=6 => cluster * (1 + self.below(4) as usize) + self.below(3) as usize * 511,
            7 | 8 => 1 + self.below(256 << 10) as usize,
            _ => 1 + self.below(MAX_LEN as u64) as usize,
        }
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

struct Config {
    cluster: usize,
    compat: &'static str,
    refcount_bits: u32,
    backing: bool,
}

fn open_qcow2(path: &Path) -> NodeRef {
    let secrets = SecretStore::new();
    let ctx = OpenContext {
        secrets: &secrets,
        base_dir: None,
        no_io: false,
        read_only: false,
        backing_files: BackingFiles::Contained,
        legacy_aes: false,
    };
    let mut graph = BlockGraph::new();
    let opts = json!({
        "node-name": "disk", "driver": "qcow2", "discard": "unmap",
        "file": {"driver": "file", "filename": path.to_str().unwrap()}
    });
    graph.add("test", opts, &ctx, false).expect("open qcow2");
    graph.get("disk").unwrap()
}

fn check_against_peers(dir: &Path, image: &Path, reference: &[u8], what: &str) {
    let check = run(
        "qemu-img",
        ["check", "-f", "qcow2", image.to_str().unwrap()],
        Some(dir),
    );
    assert_eq!(
        check.status,
        Some(0),
        "{what}: qemu-img check is not clean:\n{check}"
    );
    let ref_path = dir.join("reference.raw");
    std::fs::write(&ref_path, reference).unwrap();
    let cmp = run(
        "qemu-img",
        [
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            image.to_str().unwrap(),
            ref_path.to_str().unwrap(),
        ],
        Some(dir),
    );
    assert_eq!(
        cmp.status,
        Some(0),
        "{what}: image differs from the reference:\n{cmp}"
    );
}

fn run_config(cfg: &Config, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("test.qcow2");
    let mut rng = Rng(seed);
    let mut reference = vec![0u8; SIZE];
    let mut create = vec![
        "create".to_string(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "-o".into(),
        format!(
            "cluster_size={},compat={},refcount_bits={}",
            cfg.cluster, cfg.compat, cfg.refcount_bits
        ),
    ];
    if cfg.backing {
        // A raw backing file with data everywhere: every partial write must copy from it.
        let backing = dir.path().join("backing.raw");
        rng.fill(&mut reference);
        std::fs::write(&backing, &reference).unwrap();
        create.extend(["-b".into(), "backing.raw".into(), "-F".into(), "raw".into()]);
    }
    create.extend([image.to_str().unwrap().to_string(), SIZE.to_string()]);
    run("qemu-img", &create, Some(dir.path())).ok();

    let what = format!(
        "cluster {} compat {} refcount_bits {} backing {} seed {seed:#x}",
        cfg.cluster, cfg.compat, cfg.refcount_bits, cfg.backing
    );
    let node = open_qcow2(&image);
    assert_eq!(node.size() as usize, SIZE, "{what}");
    let mut buf = vec![0u8; MAX_LEN];
    for batch in 0..BATCHES {
        for op in 0..BATCH {
            let len = rng.len(cfg.cluster).min(MAX_LEN).min(SIZE);
            let offset = rng.below((SIZE - len + 1) as u64) as usize;
            let range = offset..offset + len;
            let at = format!("{what}: batch {batch} op {op} [{offset}, +{len})");
            match rng.below(10) {
                0..=2 => {
                    node.read_at(offset as u64, &mut buf[..len])
                        .unwrap_or_else(|e| panic!("{at}: read: {e}"));
                    assert!(
                        buf[..len] == reference[range],
                        "{at}: read returned wrong data"
                    );
                }
                3..=6 => {
                    rng.fill(&mut buf[..len]);
                    node.write_at(offset as u64, &buf[..len])
                        .unwrap_or_else(|e| panic!("{at}: write: {e}"));
                    reference[range].copy_from_slice(&buf[..len]);
                }
                7 => {
                    node.write_zeroes(offset as u64, len as u64)
                        .unwrap_or_else(|e| panic!("{at}: write_zeroes: {e}"));
                    reference[range].fill(0);
                }
                8 => {
                    // A discarded byte reads back as its old value or as zero.
                    node.discard(offset as u64, len as u64)
                        .unwrap_or_else(|e| panic!("{at}: discard: {e}"));
                    node.read_at(offset as u64, &mut buf[..len])
                        .unwrap_or_else(|e| panic!("{at}: read: {e}"));
                    let bad = buf[..len]
                        .iter()
                        .zip(&reference[range.clone()])
                        .position(|(&got, &old)| got != old && got != 0);
                    assert!(
                        bad.is_none(),
                        "{at}: discarded byte {bad:?} is neither old data nor zero"
                    );
                    reference[range].copy_from_slice(&buf[..len]);
                }
                _ => node.flush().unwrap_or_else(|e| panic!("{at}: flush: {e}")),
            }
        }
        node.flush().unwrap();
        check_against_peers(
            dir.path(),
            &image,
            &reference,
            &format!("{what}: after batch {batch}"),
        );
    }
    // What was written survives closing and reopening.
    drop(node);
    let node = open_qcow2(&image);
    let mut all = vec![0u8; SIZE];
    node.read_at(0, &mut all).unwrap();
    assert!(all == reference, "{what}: reopened image differs");
}

fn configs(cluster: usize) -> Vec<Config> {
    // qemu-img allows refcount widths other than 16 only with compat 1.1.
    [
        ("0.10", 16, false),
        ("1.1", 1, true),
        ("1.1", 64, false),
        ("0.10", 16, true),
    ]
    .into_iter()
    .map(|(compat, refcount_bits, backing)| Config {
        cluster,
        compat,
        refcount_bits,
        backing,
    })
    .collect()
}

fn run_cluster_size(cluster: usize) {
    if !require(&["qemu-img"]) {
        return;
    }
    for (i, cfg) in configs(cluster).iter().enumerate() {
        run_config(
            cfg,
            0x9e37_79b9_7f4a_7c15 ^ (cluster as u64) << 8 ^ i as u64,
        );
    }
}

#[test]
fn differential_cluster_512() {
    run_cluster_size(512);
}

#[test]
fn differential_cluster_64k() {
    run_cluster_size(64 << 10);
}

#[test]
fn differential_cluster_2m() {
    run_cluster_size(2 << 20);
}
