//! Scatter-gather requests (`read_vectored`/`write_vectored`, what virtio-blk
//! uses) give exactly the bytes of the same request made contiguously, on
//! every driver stack the VMM serves: file, raw with an offset, qcow2 (with
//! backing, zero and unallocated clusters), luks over file and over qcow2
//! with a detached header, and O_DIRECT files.

use std::path::Path;

use block::blockdev::{BackingFiles, OpenContext};
use block::{BlockGraph, NodeRef, SecretStore};
use serde_json::{json, Value};

/// Deterministic pseudo-random numbers.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

const SIZE: u64 = 4 << 20;

fn open(dir: &Path, secrets: &SecretStore, args: Value) -> NodeRef {
    let mut graph = BlockGraph::new();
    let ctx = OpenContext {
        secrets,
        base_dir: Some(dir),
        no_io: false,
        read_only: false,
        backing_files: BackingFiles::Contained,
        legacy_aes: false,
    };
    let name = graph.add("t", args, &ctx, true).expect("open");
    graph.get(&name).expect("node")
}

/// Splits `len` bytes into random pieces; sector multiples when `aligned`.
fn pieces(rng: &mut Rng, len: usize, aligned: bool) -> Vec<usize> {
    let mut out = Vec::new();
    let mut left = len;
    while left > 0 {
        let mut n = 1 + rng.below(left.min(20_000) as u64) as usize;
        if aligned {
            n = n.next_multiple_of(512).min(left);
        }
        out.push(n);
        left -= n;
    }
    out
}

/// Random vectored writes and reads checked against contiguous reads and a model.
fn exercise(node: &NodeRef, seed: u64, aligned: bool) {
    let mut rng = Rng(seed);
    let mut model = vec![0u8; SIZE as usize];
    node.read_at(0, &mut model).expect("initial read");
    for round in 0..60 {
        let mut off = rng.below(SIZE - 300_000);
        let mut len = 1 + rng.below(300_000) as usize;
        if aligned {
            off -= off % 512;
            len = len.next_multiple_of(512);
        }
        let sizes = pieces(&mut rng, len, aligned);
        if round % 2 == 0 {
            let data = rng.bytes(len);
            let mut bufs: Vec<&[u8]> = Vec::new();
            let mut at = 0;
            for n in &sizes {
                bufs.push(&data[at..at + n]);
                at += n;
            }
            node.write_vectored(off, &bufs).expect("write_vectored");
            model[off as usize..off as usize + len].copy_from_slice(&data);
        }
        let mut storage: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0xee; n]).collect();
        let mut bufs: Vec<&mut [u8]> = storage.iter_mut().map(|v| &mut v[..]).collect();
        node.read_vectored(off, &mut bufs).expect("read_vectored");
        let got: Vec<u8> = storage.concat();
        let mut contiguous = vec![0u8; len];
        node.read_at(off, &mut contiguous).expect("read_at");
        assert!(
            got == contiguous,
            "round {round}: vectored read differs from read_at"
        );
        assert!(
            got[..] == model[off as usize..off as usize + len],
            "round {round}: data differs from the model"
        );
    }
    // Past the end is refused without touching anything.
    let end = node.size();
    let mut before = vec![0u8; 1024];
    node.read_at(end - 1024, &mut before).unwrap();
    let mut a = vec![0u8; 512];
    let mut b = vec![0u8; 1024];
    let mut bufs: Vec<&mut [u8]> = vec![&mut a, &mut b];
    assert!(node.read_vectored(end - 1024, &mut bufs).is_err());
    if node.driver() != "file" {
        // (A file node grows instead, as QEMU's file protocol does for format drivers.)
        assert!(node
            .write_vectored(end - 1024, &[&[1u8; 512], &[2u8; 1024]])
            .is_err());
        let mut after = vec![0u8; 1024];
        node.read_at(end - 1024, &mut after).unwrap();
        assert!(before == after, "a refused write changed data");
    }
}

fn raw_file(dir: &Path, name: &str, seed: u64) {
    let mut rng = Rng(seed);
    std::fs::write(dir.join(name), rng.bytes(SIZE as usize + 8192)).unwrap();
}

fn qcow2_file(dir: &Path, name: &str, backing: Option<&str>) {
    let mut o = block::qcow2::CreateOptions {
        cluster_size: 4096,
        ..Default::default()
    };
    if let Some(b) = backing {
        o.backing_file = Some(b.into());
        o.backing_fmt = Some("raw".into());
    }
    block::qcow2::create(&dir.join(name), Some(SIZE), &o).unwrap();
}

fn luks_header(dir: &Path, name: &str, detached: bool) {
    let opts = block::luks::CreateOptions {
        detached_header: detached,
        iter_time_ms: 10,
        ..Default::default()
    };
    let vol = block::luks::create(&opts, b"pw").unwrap();
    std::fs::write(dir.join(name), &vol.header_image).unwrap();
}

fn secrets() -> SecretStore {
    let mut s = SecretStore::new();
    s.add(
        "o",
        json!({"qom-type": "secret", "id": "s", "data": "pw"}),
        None,
    )
    .unwrap();
    s
}

#[test]
fn file_and_raw() {
    let d = tempfile::tempdir().unwrap();
    raw_file(d.path(), "a.raw", 1);
    let s = SecretStore::new();
    let file = open(d.path(), &s, json!({"driver": "file", "filename": "a.raw"}));
    exercise(&file, 2, false);
    let raw = open(
        d.path(),
        &s,
        json!({"driver": "raw", "offset": 4096, "size": SIZE,
               "file": {"driver": "file", "filename": "a.raw"}}),
    );
    exercise(&raw, 3, false);
}

#[test]
fn direct_file() {
    let d = tempfile::tempdir().unwrap();
    raw_file(d.path(), "a.raw", 4);
    let s = SecretStore::new();
    let node = open(
        d.path(),
        &s,
        json!({"driver": "file", "filename": "a.raw", "cache": {"direct": true}}),
    );
    exercise(&node, 5, true);
}

#[test]
fn qcow2_with_backing() {
    let d = tempfile::tempdir().unwrap();
    raw_file(d.path(), "base.raw", 6);
    qcow2_file(d.path(), "top.qcow2", Some("base.raw"));
    let s = SecretStore::new();
    let node = open(
        d.path(),
        &s,
        json!({"driver": "qcow2", "file": {"driver": "file", "filename": "top.qcow2"}}),
    );
    node.write_zeroes(65536, 3 * 4096).unwrap();
    exercise(&node, 7, false);
}

#[test]
fn luks_attached_over_file() {
    let d = tempfile::tempdir().unwrap();
    luks_header(d.path(), "a.luks", false);
    let f = std::fs::OpenOptions::new()
        .append(true)
        .open(d.path().join("a.luks"))
        .unwrap();
    f.set_len(f.metadata().unwrap().len() + SIZE).unwrap();
    let s = secrets();
    let node = open(
        d.path(),
        &s,
        json!({"driver": "luks", "key-secret": "s",
               "file": {"driver": "file", "filename": "a.luks"}}),
    );
    exercise(&node, 8, true);
    exercise(&node, 9, false);
}

#[test]
fn luks_detached_over_qcow2() {
    let d = tempfile::tempdir().unwrap();
    luks_header(d.path(), "h.img", true);
    qcow2_file(d.path(), "p.qcow2", None);
    let s = secrets();
    let node = open(
        d.path(),
        &s,
        json!({"driver": "luks", "key-secret": "s",
               "header": {"driver": "file", "filename": "h.img"},
               "file": {"driver": "qcow2", "file": {"driver": "file", "filename": "p.qcow2"}}}),
    );
    exercise(&node, 10, true);
    exercise(&node, 11, false);
}
