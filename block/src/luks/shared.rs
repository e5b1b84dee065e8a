//! One detached LUKS header shared by several `luks` nodes: parsed and
//! unlocked once, the volume key and the payload cipher held once.
//!
//! The block graph keeps a [`SharedHeaders`] registry keyed by the header
//! node's node-name (and checked against the node itself, so that a header
//! node removed and added again under the same name is not mistaken for the
//! old one). The registry holds weak references only: the [`Unlocked`] volume
//! lives as long as a luks node uses it ([`HeaderUse`]), and its key is
//! zeroized when the last one is dropped (`blockdev-del` of the last disk).
//!
//! Secrets: a luks node naming a header that is already unlocked reuses the
//! unlock only when its `key-secret` has the same id *and* the same bytes as
//! a secret that already unlocked it (compared through a salted SHA-256 tag,
//! so no passphrase is kept). Any other secret runs its own key derivation
//! (the passphrase check is the KDF), and must yield the very volume key
//! held, or the node fails with QEMU's "Invalid password, cannot unlock any
//! keyslot".

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use sha2::{Digest, Sha256};

use super::cipher::SectorCipher;
use super::error::{random_bytes, LuksError};
use super::keyslot::MasterKey;
use super::luks2::Luks2Header;
use super::LuksHeader;
use crate::node::NodeRef;

/// The parsed header of either version.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Meta {
    /// LUKS1.
    V1(LuksHeader),
    /// LUKS2.
    V2(Box<Luks2Header>),
}

/// A salted digest of (secret id, passphrase) that unlocked a volume.
type SecretTag = [u8; 32];

/// A header node's unlocked volume: the parsed header, the volume key, the
/// payload cipher built from it, the secrets that opened it and the luks
/// nodes that use it.
pub(crate) struct Unlocked {
    header_node: NodeRef,
    header_name: String,
    pub(crate) meta: Arc<Meta>,
    /// Zeroized when the last user is dropped.
    key: MasterKey,
    pub(crate) cipher: Arc<dyn SectorCipher>,
    salt: [u8; 32],
    secrets: Mutex<Vec<SecretTag>>,
    /// Node-names of the luks nodes using the header, in the order they came.
    users: Mutex<Vec<String>>,
}

/// Locks `m`; a poisoned lock still holds a usable list of names.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Equality of byte strings in time independent of where they differ.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Unlocked {
    fn tag(&self, secret_id: &str, passphrase: &[u8]) -> SecretTag {
        let mut h = Sha256::new();
        h.update(self.salt);
        h.update((secret_id.len() as u64).to_le_bytes());
        h.update(secret_id.as_bytes());
        h.update(passphrase);
        h.finalize().into()
    }

    /// Whether secret `secret_id` with these bytes already unlocked the volume.
    pub(crate) fn knows_secret(&self, secret_id: &str, passphrase: &[u8]) -> bool {
        let tag = self.tag(secret_id, passphrase);
        lock(&self.secrets).iter().any(|t| ct_eq(t, &tag))
    }

    /// Accepts `key`, derived by another secret, if it is the volume key held
    /// (else QEMU's wrong-passphrase error), and remembers the secret.
    pub(crate) fn accept(
        &self,
        secret_id: &str,
        passphrase: &[u8],
        key: &MasterKey,
    ) -> Result<(), LuksError> {
        if !ct_eq(key, &self.key) {
            return Err(LuksError::WrongPassphrase);
        }
        let tag = self.tag(secret_id, passphrase);
        lock(&self.secrets).push(tag);
        Ok(())
    }

    /// The luks nodes using the header.
    pub(crate) fn users(&self) -> Vec<String> {
        lock(&self.users).clone()
    }

    /// Refuses a write to the header while more than one luks node uses it.
    pub(crate) fn check_exclusive(&self) -> Result<(), LuksError> {
        let users = self.users();
        if users.len() > 1 {
            return Err(LuksError::HeaderShared {
                header: self.header_name.clone(),
                users,
            });
        }
        Ok(())
    }
}

/// Where a luks node being opened finds the header's shared unlock: the
/// graph's registry, the header node's name and the luks node's own name.
#[derive(Clone)]
pub struct HeaderSlot {
    /// The graph's registry.
    pub registry: Arc<SharedHeaders>,
    /// The node-name of the header node.
    pub header: String,
    /// The node-name of the luks node.
    pub user: String,
}

/// The unlocked detached headers of a block graph, by header node-name.
#[derive(Default)]
pub struct SharedHeaders {
    by_header: Mutex<BTreeMap<String, Weak<Unlocked>>>,
}

impl SharedHeaders {
    /// The live unlock of header `name`, if it is still that `node`.
    pub(crate) fn lookup(&self, name: &str, node: &NodeRef) -> Option<Arc<Unlocked>> {
        let mut map = lock(&self.by_header);
        map.retain(|_, w| w.strong_count() > 0);
        map.get(name)
            .and_then(Weak::upgrade)
            .filter(|u| Arc::ptr_eq(&u.header_node, node))
    }

    /// Registers a fresh unlock of header `name` (`node`). Should another
    /// open have registered one meanwhile, that one is kept and returned if
    /// `key` is its key.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn insert(
        &self,
        name: &str,
        node: NodeRef,
        meta: Arc<Meta>,
        key: MasterKey,
        cipher: Arc<dyn SectorCipher>,
        secret_id: &str,
        passphrase: &[u8],
    ) -> Result<Arc<Unlocked>, LuksError> {
        let mut salt = [0u8; 32];
        random_bytes(&mut salt)?;
        let mut map = lock(&self.by_header);
        if let Some(old) = map
            .get(name)
            .and_then(Weak::upgrade)
            .filter(|u| Arc::ptr_eq(&u.header_node, &node))
        {
            old.accept(secret_id, passphrase, &key)?;
            return Ok(old);
        }
        let unlocked = Arc::new(Unlocked {
            header_node: node,
            header_name: name.to_string(),
            meta,
            key,
            cipher,
            salt,
            secrets: Mutex::new(Vec::new()),
            users: Mutex::new(Vec::new()),
        });
        let tag = unlocked.tag(secret_id, passphrase);
        lock(&unlocked.secrets).push(tag);
        map.insert(name.to_string(), Arc::downgrade(&unlocked));
        Ok(unlocked)
    }

    /// The luks nodes using header `name` (none when it is not unlocked).
    pub fn users(&self, name: &str) -> Vec<String> {
        lock(&self.by_header)
            .get(name)
            .and_then(Weak::upgrade)
            .map(|u| u.users())
            .unwrap_or_default()
    }

    /// Refuses a write to header `name` (amend, a resize that rewrites it)
    /// while more than one luks node uses it ([`LuksError::HeaderShared`]).
    pub fn check_writable(&self, name: &str) -> Result<(), LuksError> {
        let unlocked = lock(&self.by_header).get(name).and_then(Weak::upgrade);
        match unlocked {
            Some(u) => u.check_exclusive(),
            None => Ok(()),
        }
    }

    /// How many unlocked headers are alive (their keys not yet zeroized).
    pub fn live(&self) -> usize {
        lock(&self.by_header)
            .values()
            .filter(|w| w.strong_count() > 0)
            .count()
    }
}

/// A luks node's use of a shared header: counted among its users until dropped.
pub(crate) struct HeaderUse {
    pub(crate) unlocked: Arc<Unlocked>,
    user: String,
}

impl HeaderUse {
    /// Records `user` as a user of `unlocked`.
    pub(crate) fn new(unlocked: Arc<Unlocked>, user: &str) -> Self {
        lock(&unlocked.users).push(user.to_string());
        HeaderUse {
            unlocked,
            user: user.to_string(),
        }
    }
}

impl Drop for HeaderUse {
    fn drop(&mut self) {
        let mut users = lock(&self.unlocked.users);
        if let Some(i) = users.iter().position(|u| *u == self.user) {
            users.remove(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::process::{Command, Stdio};

    use serde_json::{json, Value};

    use crate::blockdev::{BackingFiles, OpenContext};
    use crate::luks::cipher::new_sector_cipher_sized;
    use crate::luks::create::{create_with_iterations, CreateOptions, PbkdfIterations};
    use crate::luks::header::LuksHeader;
    use crate::luks::keyslot::{seal, tests::have_tool};
    use crate::luks::node::KDF_RUNS;
    use crate::secret::SecretStore;
    use crate::{BlockGraph, ErrorKind};

    const PASS: &str = "hunter2";
    const OTHER: &str = "correct horse";
    const MIB: usize = 1 << 20;

    fn kdf_runs() -> u64 {
        KDF_RUNS.with(|n| n.get())
    }

    struct Fixture {
        dir: tempfile::TempDir,
        secrets: SecretStore,
    }

    impl Fixture {
        /// Secrets `s0` and `s0b` (the same passphrase), `s1` (the header's
        /// other slot) and `bad`; payload files `p0.img`..`p3.img`.
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            for i in 0..4 {
                std::fs::write(dir.path().join(format!("p{i}.img")), vec![0u8; MIB]).unwrap();
            }
            let mut secrets = SecretStore::new();
            for (id, data) in [("s0", PASS), ("s0b", PASS), ("s1", OTHER), ("bad", "nope")] {
                secrets
                    .add(
                        "objects",
                        json!({"qom-type": "secret", "id": id, "data": data}),
                        None,
                    )
                    .unwrap();
            }
            Fixture { dir, secrets }
        }

        fn ctx(&self) -> OpenContext<'_> {
            OpenContext {
                secrets: &self.secrets,
                base_dir: Some(self.dir.path()),
                no_io: false,
                read_only: false,
                backing_files: BackingFiles::Contained,
                legacy_aes: false,
            }
        }

        fn path(&self, f: &str) -> std::path::PathBuf {
            self.dir.path().join(f)
        }

        /// A graph with file node `hdr` over `hdr.img`.
        fn graph(&self) -> BlockGraph {
            let mut g = BlockGraph::new();
            g.add(
                "b",
                json!({"node-name": "hdr", "driver": "file", "filename": "hdr.img"}),
                &self.ctx(),
                false,
            )
            .unwrap();
            g
        }

        fn add_luks(
            &self,
            g: &mut BlockGraph,
            name: &str,
            payload: &str,
            secret: &str,
        ) -> crate::Result<String> {
            g.add(
                "b",
                luks_args(name, payload, json!("hdr"), secret),
                &self.ctx(),
                false,
            )
        }
    }

    fn luks_args(name: &str, payload: &str, header: Value, secret: &str) -> Value {
        json!({"node-name": name, "driver": "luks", "key-secret": secret,
               "file": {"driver": "file", "filename": payload}, "header": header})
    }

    /// A detached LUKS1 header: slot 0 opens with [`PASS`], slot 1 with
    /// [`OTHER`]. Returns the header image and the volume key.
    fn luks1_header() -> (Vec<u8>, Vec<u8>) {
        let opts = CreateOptions {
            detached_header: true,
            ..CreateOptions::default()
        };
        let fast = PbkdfIterations {
            master_key: 1000,
            slot: 1000,
        };
        let vol = create_with_iterations(&opts, PASS.as_bytes(), fast).unwrap();
        let mut header = vol.header.clone();
        header.slots[1].salt = [3u8; 32];
        header.slots[1].iterations = 1000;
        let material = seal(
            &header.spec,
            &vol.master_key,
            OTHER.as_bytes(),
            &header.slots[1],
        )
        .unwrap();
        header.slots[1].active = true;
        let mut image = vol.header_image.clone();
        image[..LuksHeader::SIZE].copy_from_slice(&header.to_bytes());
        let at = header.slots[1].key_offset() as usize;
        image[at..at + material.len()].copy_from_slice(&material);
        (image, vol.master_key.to_vec())
    }

    /// The payload file `f` decrypted with `key` (LUKS1's aes-256-xts-plain64).
    fn decrypt_file(path: &Path, key: &[u8], sector: usize, len: usize) -> Vec<u8> {
        let spec = CreateOptions::default().spec;
        let mut data = std::fs::read(path).unwrap()[..len].to_vec();
        let c = new_sector_cipher_sized(&spec, key, sector).unwrap();
        c.decrypt(0, &mut data);
        data
    }

    /// Two, then three luks nodes over one LUKS1 header node: one KDF run
    /// for one secret, the same volume key, writes through each encrypted
    /// with it; a write to the shared header is refused naming the users;
    /// removing one disk leaves the others working; the unlock goes with
    /// the last.
    #[test]
    fn luks1_header_unlocked_once_for_two_disks() {
        let f = Fixture::new();
        let (image, key) = luks1_header();
        std::fs::write(f.path("hdr.img"), &image).unwrap();
        let mut g = f.graph();
        let before = kdf_runs();
        f.add_luks(&mut g, "d0", "p0.img", "s0").unwrap();
        assert_eq!(kdf_runs() - before, 1);
        f.add_luks(&mut g, "d1", "p1.img", "s0").unwrap();
        assert_eq!(kdf_runs() - before, 1, "the same secret reuses the unlock");
        assert_eq!(g.luks_headers().live(), 1);
        assert_eq!(g.luks_headers().users("hdr"), ["d0", "d1"]);

        // Another secret id with the same bytes, and another slot's
        // passphrase: their own KDF run each, the same volume.
        f.add_luks(&mut g, "d2", "p2.img", "s0b").unwrap();
        assert_eq!(kdf_runs() - before, 2);
        f.add_luks(&mut g, "d3", "p3.img", "s1").unwrap();
        assert_eq!(kdf_runs() - before, 3);
        // A wrong one fails as QEMU says, and is not counted a user.
        let e = f.add_luks(&mut g, "dx", "p3.img", "bad").unwrap_err();
        assert_eq!(
            e.to_string(),
            "b: Invalid password, cannot unlock any keyslot"
        );
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
        assert!(g.get("dx").is_none());
        assert_eq!(g.luks_headers().users("hdr"), ["d0", "d1", "d2", "d3"]);
        assert_eq!(g.luks_headers().live(), 1);

        // Writes through each; each reads its own back.
        let disks = ["d0", "d1", "d2", "d3"];
        for (i, d) in disks.iter().enumerate() {
            let n = g.get(d).unwrap();
            n.write_at(0, &vec![i as u8 + 1; 65536]).unwrap();
            n.write_at(65536, &[0xee; 4096]).unwrap();
        }
        for (i, d) in disks.iter().enumerate() {
            let mut buf = vec![0u8; 65536];
            g.get(d).unwrap().read_at(0, &mut buf).unwrap();
            assert!(buf.iter().all(|&b| b == i as u8 + 1), "{d}");
            let plain = decrypt_file(&f.path(&format!("p{i}.img")), &key, 512, 65536);
            assert_eq!(plain, buf, "{d} is encrypted with the header's volume key");
        }
        // The caveat: the same plaintext at the same offset, the same ciphertext.
        let at =
            |i: usize| std::fs::read(f.path(&format!("p{i}.img"))).unwrap()[65536..69632].to_vec();
        assert_eq!(at(0), at(1));
        assert_ne!(
            std::fs::read(f.path("p0.img")).unwrap()[..512],
            std::fs::read(f.path("p1.img")).unwrap()[..512]
        );

        // No writes to the header while it is shared.
        let e = g.luks_headers().check_writable("hdr").unwrap_err();
        assert_eq!(
            e.to_string(),
            "The LUKS header node 'hdr' is shared by the luks nodes 'd0', 'd1', 'd2', 'd3': \
             it cannot be written while more than one node uses it"
        );
        assert_eq!(crate::BlockError::from(e).kind(), ErrorKind::InUse);
        // ... nor can the header node go.
        assert!(g.remove("hdr").is_err());

        // blockdev-del of some disks: the others still work.
        for d in ["d1", "d2", "d0"] {
            g.remove(d).unwrap();
        }
        assert_eq!(g.luks_headers().users("hdr"), ["d3"]);
        g.luks_headers().check_writable("hdr").unwrap();
        let d3 = g.get("d3").unwrap();
        d3.write_at(512, &[9u8; 512]).unwrap();
        let mut buf = [0u8; 1024];
        d3.read_at(0, &mut buf).unwrap();
        assert!(buf[..512].iter().all(|&b| b == 4) && buf[512..].iter().all(|&b| b == 9));
        drop(d3);
        g.remove("d3").unwrap();
        assert_eq!(
            g.luks_headers().live(),
            0,
            "the key went with the last disk"
        );
        g.remove("hdr").unwrap();

        // A header unlocked again after that is a fresh KDF run.
        let mut g = f.graph();
        let before = kdf_runs();
        f.add_luks(&mut g, "e0", "p0.img", "s0").unwrap();
        assert_eq!(kdf_runs() - before, 1);
        let mut buf = vec![0u8; 512];
        g.get("e0").unwrap().read_at(0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 1));
    }

    /// Nodes opened in a staging copy (QMP blockdev-add) share the unlock
    /// too; an inline header (its own node) does not, yet reads the same
    /// volume; a node left unmerged is no user.
    #[test]
    fn staged_and_inline_headers() {
        let f = Fixture::new();
        let (image, _) = luks1_header();
        std::fs::write(f.path("hdr.img"), &image).unwrap();
        let mut g = f.graph();
        let before = kdf_runs();
        f.add_luks(&mut g, "d0", "p0.img", "s0").unwrap();
        g.get("d0").unwrap().write_at(0, &[7u8; 4096]).unwrap();
        let mut s = g.stage();
        s.add(
            "b",
            luks_args("d1", "p0.img", json!("hdr"), "s0"),
            &f.ctx(),
            false,
        )
        .unwrap();
        g.merge(s).unwrap();
        assert_eq!(kdf_runs() - before, 1);
        assert_eq!(g.luks_headers().users("hdr"), ["d0", "d1"]);
        {
            let mut s = g.stage();
            s.add(
                "b",
                luks_args("d2", "p1.img", json!("hdr"), "s0"),
                &f.ctx(),
                false,
            )
            .unwrap();
            assert_eq!(g.luks_headers().users("hdr"), ["d0", "d1", "d2"]);
        }
        assert_eq!(
            g.luks_headers().users("hdr"),
            ["d0", "d1"],
            "dropped unmerged"
        );
        let inline = json!({"driver": "file", "filename": "hdr.img"});
        g.add(
            "b",
            luks_args("d3", "p0.img", inline, "s0"),
            &f.ctx(),
            false,
        )
        .unwrap();
        assert_eq!(kdf_runs() - before, 2);
        assert_eq!(g.luks_headers().live(), 2);
        let mut buf = [0u8; 4096];
        g.get("d3").unwrap().read_at(0, &mut buf).unwrap();
        assert_eq!(buf, [7u8; 4096]);
    }

    /// Not about sharing, but this fixture has the 4096-byte sectors it needs:
    /// 512-byte writes from many threads into different bytes of the same
    /// sectors (what a guest with 512-byte blocks does) all land; each
    /// read-modify-write of a sector holds that sector's lock.
    #[test]
    fn partial_sector_writes_from_many_threads_all_land() {
        let f = Fixture::new();
        let mut b = crate::luks::luks2::tests::build(false);
        b.json["segments"]["0"]["offset"] = json!("0");
        std::fs::write(f.path("hdr.img"), crate::luks::luks2::tests::image(&b)).unwrap();
        let mut g = f.graph();
        f.add_luks(&mut g, "d0", "p0.img", "s0").unwrap();
        let disk = g.get("d0").unwrap();
        const THREADS: u64 = 8;
        const SECTORS: u64 = 4;
        for round in 0..20u8 {
            std::thread::scope(|s| {
                for t in 0..THREADS {
                    let disk = disk.clone();
                    s.spawn(move || {
                        for sector in 0..SECTORS {
                            let block = sector * 8 + t;
                            disk.write_at(block * 512, &[round ^ (block as u8 + 1); 512])
                                .unwrap();
                        }
                    });
                }
            });
            let mut back = vec![0u8; (SECTORS * 4096) as usize];
            disk.read_at(0, &mut back).unwrap();
            for (block, got) in back.chunks(512).enumerate() {
                assert!(
                    got.iter().all(|&x| x == round ^ (block as u8 + 1)),
                    "round {round}: block {block} lost its write"
                );
            }
        }
    }

    /// The same for a LUKS2 header (4096-byte sectors): one KDF run, a
    /// resize that would rewrite the header's fixed segment size is refused
    /// while it is shared.
    #[test]
    fn luks2_header_unlocked_once_for_two_disks() {
        let f = Fixture::new();
        let mut b = crate::luks::luks2::tests::build(false);
        b.json["segments"]["0"]["offset"] = json!("0");
        std::fs::write(f.path("hdr.img"), crate::luks::luks2::tests::image(&b)).unwrap();
        let mut g = f.graph();
        let before = kdf_runs();
        f.add_luks(&mut g, "d0", "p0.img", "s0").unwrap();
        f.add_luks(&mut g, "d1", "p1.img", "s0").unwrap();
        assert_eq!(kdf_runs() - before, 1);
        assert_eq!(g.luks_headers().users("hdr"), ["d0", "d1"]);
        for (i, d) in ["d0", "d1"].iter().enumerate() {
            let n = g.get(d).unwrap();
            n.write_at(0, &vec![0x30 + i as u8; 8192]).unwrap();
            let plain = decrypt_file(&f.path(&format!("p{i}.img")), &b.key, 4096, 8192);
            assert!(plain.iter().all(|&x| x == 0x30 + i as u8), "{d}");
        }
        g.remove("d0").unwrap();
        let mut buf = [0u8; 4096];
        g.get("d1").unwrap().read_at(0, &mut buf).unwrap();
        assert_eq!(buf, [0x31; 4096]);

        // A fixed segment size: resizing would rewrite the header.
        g.remove("d1").unwrap();
        g.remove("hdr").unwrap();
        b.json["segments"]["0"]["size"] = json!("65536");
        std::fs::write(f.path("hdr.img"), crate::luks::luks2::tests::image(&b)).unwrap();
        let mut g = f.graph();
        f.add_luks(&mut g, "d0", "p0.img", "s0").unwrap();
        f.add_luks(&mut g, "d1", "p1.img", "s0").unwrap();
        let e = g.get("d0").unwrap().resize(1 << 20).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InUse, "{e}");
        assert!(
            e.to_string()
                .contains("'hdr' is shared by the luks nodes 'd0', 'd1'"),
            "{e}"
        );
        g.remove("d1").unwrap();
        let e = g.get("d0").unwrap().resize(1 << 20).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotSupported, "{e}");
    }

    /// QEMU, with two read-only luks nodes over one header node, reads what
    /// cryptvm wrote through its two luks nodes sharing that header.
    #[test]
    fn qemu_reads_both_disks_through_one_header_node() {
        if !have_tool("qemu-system-x86_64") {
            return;
        }
        let f = Fixture::new();
        let (image, _) = luks1_header();
        std::fs::write(f.path("hdr.img"), &image).unwrap();
        {
            let mut g = f.graph();
            f.add_luks(&mut g, "d0", "p0.img", "s0").unwrap();
            f.add_luks(&mut g, "d1", "p1.img", "s1").unwrap();
            g.get("d0").unwrap().write_at(0, &[0xaa; 65536]).unwrap();
            g.get("d1").unwrap().write_at(0, &[0xbb; 65536]).unwrap();
            g.get("d1").unwrap().flush().unwrap();
            g.get("d0").unwrap().flush().unwrap();
        }
        let p = |s: &str| f.path(s).display().to_string();
        let file = |name: &str, path: String| {
            json!({"node-name": name, "driver": "file", "filename": path, "read-only": true})
                .to_string()
        };
        let luks = |name: &str, payload: &str| {
            json!({"node-name": name, "driver": "luks", "file": payload, "header": "hdr",
                   "key-secret": "sec", "read-only": true})
            .to_string()
        };
        let mut child = Command::new("qemu-system-x86_64")
            .args([
                "-machine",
                "none",
                "-nodefaults",
                "-display",
                "none",
                "-qmp",
                "stdio",
            ])
            .args(["-object", &format!("secret,id=sec,data={PASS}")])
            .args(["-blockdev", &file("hdr", p("hdr.img"))])
            .args(["-blockdev", &file("f0", p("p0.img"))])
            .args(["-blockdev", &file("f1", p("p1.img"))])
            .args(["-blockdev", &luks("l0", "f0")])
            .args(["-blockdev", &luks("l1", "f1")])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let hmp = |cmd: &str| {
            json!({"execute": "human-monitor-command", "arguments": {"command-line": cmd}})
                .to_string()
        };
        let input = [
            json!({"execute": "qmp_capabilities"}).to_string(),
            hmp("qemu-io l0 \"read -P 0xaa 0 64k\""),
            hmp("qemu-io l1 \"read -P 0xbb 0 64k\""),
            hmp("qemu-io l1 \"read -P 0xaa 0 64k\""),
            json!({"execute": "quit"}).to_string(),
        ]
        .join("\n");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        // HMP's qemu-io prints to QEMU's stdout, before the command's reply.
        let mut replies: Vec<String> = Vec::new();
        let mut printed = String::new();
        for line in stdout.lines() {
            match serde_json::from_str::<Value>(line) {
                Ok(v) if v.get("return").is_some() || v.get("error").is_some() => {
                    replies.push(std::mem::take(&mut printed) + &v.to_string())
                }
                Ok(_) => {}
                Err(_) => printed += &format!("{line}\n"),
            }
        }
        assert_eq!(
            replies.len(),
            5,
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = |i: usize| replies[i].clone();
        // (A failed pattern check prints the "read" line too.)
        for i in [1, 2] {
            let t = text(i);
            assert!(t.contains("read 65536/65536 bytes"), "{t}");
            assert!(!t.contains("Pattern verification failed"), "{t}");
        }
        assert!(
            text(3).contains("Pattern verification failed"),
            "{}",
            text(3)
        );
    }
}
