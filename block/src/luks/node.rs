//! The `luks` block driver: decrypts reads and encrypts writes of its `file`
//! child, with the LUKS header either at the start of `file` or in a separate
//! `header` node (a detached header).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};

use super::bounce::{Bounce, CHUNK};
use super::crypto_pool::for_each_piece;
use super::luks2::{self, Luks2Header};
use super::shared::{HeaderSlot, HeaderUse, Meta};
use super::{
    new_sector_cipher, new_sector_cipher_sized, unlock_within, IvGenAlg, LuksError, LuksHeader,
    MasterKey, SectorCipher, DEFAULT_KDF_ITERATIONS_LIMIT,
};
use crate::blockdev::{DriverKeys, OpenContext};
use crate::node::{check_range, total_len, write_zeroes_by_writing, BlockNode, NodeRef};
use crate::options::Opts;
use crate::resize::{Prealloc, ResizeError};
use crate::sector_locks::SectorLocks;
use crate::sg::{SgCursor, Split};
use crate::{BlockError, Result, WaitOnly, WriteTurn, SECTOR_SIZE};

/// Reads and checks a LUKS1 header (and that its key material fits in the
/// `len` bytes `read` can read): the first step of opening a volume, shared
/// by the `luks` driver and qcow2's built-in LUKS encryption.
pub fn parse_v1(
    read: &dyn Fn(u64, &mut [u8]) -> Result<()>,
    len: u64,
    detached: bool,
) -> Result<LuksHeader> {
    let mut buf = vec![0u8; LuksHeader::SIZE];
    let avail = len.min(LuksHeader::SIZE as u64) as usize;
    read(0, &mut buf[..avail])?;
    let header = LuksHeader::parse(&buf[..avail], detached)?;
    let header_len = header.key_material_end();
    if len < header_len {
        return Err(LuksError::corrupt(format!(
            "LUKS header is truncated: its key material ends at byte {header_len}, but the header is only {len} bytes"
        ))
        .into());
    }
    Ok(header)
}

/// Unlocks a key slot of `header` with `passphrase` (`read` reads the
/// header's bytes) and builds the payload cipher (512-byte sectors).
pub fn unlock_v1(
    header: &LuksHeader,
    read: &dyn Fn(u64, &mut [u8]) -> Result<()>,
    passphrase: &[u8],
    kdf_limit: u64,
) -> Result<Box<dyn SectorCipher>> {
    let mut read_io =
        |off: u64, out: &mut [u8]| read(off, out).map_err(|e| std::io::Error::other(e.to_string()));
    let master_key = unlock_within(header, passphrase, &mut read_io, kdf_limit)?;
    Ok(new_sector_cipher(&header.spec, &master_key)?)
}

/// The `data` of a LUKS1 volume's `format-specific` info, as QEMU's
/// `QCryptoBlockInfoLUKS` (also the `encrypt` block of an encrypted qcow2).
pub fn v1_info_data(h: &LuksHeader, detached: bool) -> serde_json::Map<String, Value> {
    let slots: Vec<Value> = h
        .slots
        .iter()
        .map(|s| {
            let key_offset = u64::from(s.key_offset_sectors) * SECTOR_SIZE;
            if s.active {
                json!({"active": true, "iters": s.iterations, "key-offset": key_offset, "stripes": s.stripes})
            } else {
                json!({"active": false, "key-offset": key_offset})
            }
        })
        .collect();
    let mut data = serde_json::Map::new();
    data.insert("ivgen-alg".into(), json!(h.spec.ivgen.name()));
    data.insert("detached-header".into(), json!(detached));
    data.insert("hash-alg".into(), json!(h.spec.hash.name()));
    data.insert("cipher-alg".into(), json!(h.spec.alg.name()));
    data.insert("uuid".into(), json!(h.uuid));
    // As QEMU: the IV hash is shown for ESSIV only (dm-crypt ignores it otherwise).
    if let (IvGenAlg::Essiv, Some(ivhash)) = (h.spec.ivgen, h.spec.ivgen_hash) {
        data.insert("ivgen-hash-alg".into(), json!(ivhash.name()));
    }
    data.insert("cipher-mode".into(), json!(h.spec.mode.name()));
    data.insert("slots".into(), Value::Array(slots));
    data.insert("payload-offset".into(), json!(h.payload_offset()));
    data.insert("master-key-iters".into(), json!(h.mk_iterations));
    data
}

#[cfg(test)]
thread_local! {
    /// Key derivations run by `LuksNode` opens on this thread (a test hook:
    /// the shared header tests count them).
    pub(crate) static KDF_RUNS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Where a volume's encryption sectors lie in its payload.
struct Geometry {
    sector: u64,
    iv_tweak: u64,
    payload_offset: u64,
    size: u64,
}

/// An unlocked (or, for metadata queries, merely parsed) LUKS volume.
pub struct LuksNode {
    payload: NodeRef,
    header_node: Option<NodeRef>,
    /// The parsed header; shared with the other luks nodes of a shared
    /// detached header.
    meta: Arc<Meta>,
    /// Bytes of an encryption sector (the unit of the IV): 512 for LUKS1,
    /// the segment's `sector_size` for LUKS2. Also the node's block size:
    /// requests not aligned to it are read-modify-written.
    sector: u64,
    /// Added to the IV's sector number (LUKS2 `iv_tweak`).
    iv_tweak: u64,
    /// `None` when opened without I/O (metadata only).
    cipher: Option<Arc<dyn SectorCipher>>,
    /// This node's use of a detached header other luks nodes may share.
    shared: Option<HeaderUse>,
    payload_offset: u64,
    /// Whole sectors of payload; changes on resize.
    size: AtomicU64,
    read_only: bool,
    /// Held by each read-modify-write of a partial sector.
    rmw_locks: SectorLocks,
}

impl LuksNode {
    /// The options of a `luks` node (`key-secret` is needed unless the node
    /// is opened for its metadata only).
    pub const KEYS: DriverKeys = DriverKeys {
        keys: &["file", "header", "key-secret", "kdf-iterations-limit"],
        required: &["file"],
        children: &["file", "header"],
    };

    /// Opens a `luks` node: parses and checks the header, unlocks a key slot
    /// with `key-secret`, and builds the payload cipher.
    ///
    /// With `slot` (a detached header node of a block graph), the header is
    /// parsed and unlocked once for every luks node naming it: see
    /// [`crate::luks::shared`].
    pub fn open(
        o: &mut Opts,
        payload: NodeRef,
        header_node: Option<NodeRef>,
        read_only: bool,
        ctx: &OpenContext<'_>,
        slot: Option<HeaderSlot>,
    ) -> Result<Self> {
        let key_secret = o.str("key-secret")?;
        let kdf_limit = o
            .u64("kdf-iterations-limit")?
            .unwrap_or(DEFAULT_KDF_ITERATIONS_LIMIT);
        // As QEMU: the key and its secret first, then the header. Opened for its
        // metadata only (`img info`), nothing is unlocked, so neither is looked up.
        let secret = if ctx.no_io {
            None
        } else {
            // The message names the key already (QEMU's words): it is about the
            // node's options as a whole.
            let id = key_secret.ok_or_else(|| {
                BlockError::option(o.path(), "Parameter 'key-secret' is required for cipher")
            })?;
            let passphrase = ctx
                .secrets
                .passphrase(&id)
                .map_err(|e| o.error("key-secret", e.to_string()))?;
            Some((id, passphrase))
        };
        let header_src: NodeRef = header_node.clone().unwrap_or_else(|| payload.clone());
        let detached = header_node.is_some();
        // A header unlocked already for another luks node.
        let slot = slot.filter(|_| detached && secret.is_some());
        let known = slot
            .as_ref()
            .and_then(|s| s.registry.lookup(&s.header, &header_src));
        let meta = match &known {
            Some(u) => u.meta.clone(),
            None => Arc::new(read_meta(&header_src, detached)?),
        };
        let geo = geometry(&meta, &payload)?;
        let mut node = Self {
            payload,
            header_node,
            meta: meta.clone(),
            sector: geo.sector,
            iv_tweak: geo.iv_tweak,
            cipher: None,
            shared: None,
            payload_offset: geo.payload_offset,
            size: AtomicU64::new(geo.size),
            read_only,
            rmw_locks: SectorLocks::default(),
        };
        let Some((secret_id, passphrase)) = secret else {
            return Ok(node);
        };
        let user = slot.as_ref().map(|s| s.user.clone()).unwrap_or_default();
        let unlocked = match (known, slot) {
            (Some(u), _) if u.knows_secret(&secret_id, &passphrase) => u,
            (Some(u), _) => {
                // Another secret: its own KDF run, which must give the same key.
                let key = unlock_meta(&meta, &header_src, &passphrase, kdf_limit)?;
                u.accept(&secret_id, &passphrase, &key)?;
                u
            }
            (None, Some(s)) => {
                let key = unlock_meta(&meta, &header_src, &passphrase, kdf_limit)?;
                let cipher: Arc<dyn SectorCipher> = Arc::from(cipher_for(&meta, &key)?);
                s.registry.insert(
                    &s.header,
                    header_src.clone(),
                    meta,
                    key,
                    cipher,
                    &secret_id,
                    &passphrase,
                )?
            }
            (None, None) => {
                let key = unlock_meta(&meta, &header_src, &passphrase, kdf_limit)?;
                node.cipher = Some(Arc::from(cipher_for(&meta, &key)?));
                return Ok(node);
            }
        };
        node.cipher = Some(unlocked.cipher.clone());
        node.meta = unlocked.meta.clone();
        node.shared = Some(HeaderUse::new(unlocked, &user));
        Ok(node)
    }

    /// Refuses a write to this node's header (amend, a resize that rewrites
    /// it) while another luks node shares it ([`LuksError::HeaderShared`]).
    pub fn check_header_writable(&self) -> Result<()> {
        match &self.shared {
            Some(u) => Ok(u.unlocked.check_exclusive()?),
            None => Ok(()),
        }
    }

    /// The node-names of the luks nodes sharing this node's detached header
    /// (this one included); empty when the header is not shared.
    pub fn header_users(&self) -> Vec<String> {
        self.shared
            .as_ref()
            .map(|u| u.unlocked.users())
            .unwrap_or_default()
    }

    /// `info()` of a LUKS2 volume: the format version, the segment and the
    /// key slots (no salts, digests or keys).
    fn info_luks2(&self, h: &Luks2Header) -> Value {
        let m = &h.meta;
        let seg = &m.segment;
        let slots: Vec<Value> = m
            .keyslots
            .iter()
            .map(|(n, k)| {
                let mut kdf = serde_json::Map::new();
                kdf.insert("type".into(), json!(k.kdf.name()));
                match &k.kdf {
                    luks2::Kdf::Pbkdf2 {
                        hash, iterations, ..
                    } => {
                        kdf.insert("hash".into(), json!(hash.name()));
                        kdf.insert("iterations".into(), json!(iterations));
                    }
                    luks2::Kdf::Argon2 {
                        time,
                        memory_kib,
                        cpus,
                        ..
                    } => {
                        kdf.insert("time".into(), json!(time));
                        kdf.insert("memory".into(), json!(memory_kib));
                        kdf.insert("cpus".into(), json!(cpus));
                    }
                }
                json!({
                    "id": n,
                    "key-size": k.key_size,
                    "priority": k.priority,
                    "kdf": kdf,
                    "stripes": k.stripes,
                    "af-hash": k.af_hash.name(),
                    "area-offset": k.area_offset,
                    "area-size": k.area_size,
                    "area-encryption": k.area_encryption,
                })
            })
            .collect();
        let mut data = serde_json::Map::new();
        data.insert("version".into(), json!(2));
        data.insert("detached-header".into(), json!(self.header_node.is_some()));
        data.insert("uuid".into(), json!(h.header.uuid));
        data.insert("label".into(), json!(h.header.label));
        data.insert("seqid".into(), json!(h.header.seqid));
        data.insert("header-size".into(), json!(h.header.hdr_size));
        data.insert("cipher-alg".into(), json!(seg.spec.alg.name()));
        data.insert("cipher-mode".into(), json!(seg.spec.mode.name()));
        data.insert("ivgen-alg".into(), json!(seg.spec.ivgen.name()));
        if let (IvGenAlg::Essiv, Some(ivhash)) = (seg.spec.ivgen, seg.spec.ivgen_hash) {
            data.insert("ivgen-hash-alg".into(), json!(ivhash.name()));
        }
        data.insert("sector-size".into(), json!(seg.sector_size));
        data.insert("iv-tweak".into(), json!(seg.iv_tweak));
        data.insert("payload-offset".into(), json!(seg.offset));
        data.insert("slots".into(), Value::Array(slots));
        json!({"type": "luks", "data": data})
    }

    /// The IV sector number of the encryption sector at byte `offset` of the volume.
    fn iv_sector(&self, offset: u64) -> u64 {
        (offset / self.sector).wrapping_add(self.iv_tweak)
    }

    fn cipher(&self) -> Result<&dyn SectorCipher> {
        self.cipher.as_deref().ok_or_else(|| {
            BlockError::NotSupported("luks node was opened without a key: no I/O possible".into())
        })
    }

    /// Decrypts whole sectors in place: each job is `(payload sector of its
    /// first byte, buffer)`; large totals on the crypto threads.
    fn decrypt(&self, jobs: Vec<(u64, &mut [u8])>) -> Result<()> {
        let cipher = self.cipher()?;
        for_each_piece(jobs, self.sector as usize, |s, b| cipher.decrypt(s, b));
        Ok(())
    }

    fn encrypt(&self, first_sector: u64, buf: &mut [u8]) -> Result<()> {
        let cipher = self.cipher()?;
        for_each_piece(
            vec![(first_sector, buf)],
            self.sector as usize,
            |s, b: &mut [u8]| cipher.encrypt(s, b),
        );
        Ok(())
    }

    /// Fills `dst` (whole sectors, payload sector `first_sector` first) with
    /// the ciphertext of the next `dst.len()` bytes of `src`. Source pieces
    /// that cover whole sectors are encrypted straight into `dst`; runs of
    /// pieces that split sectors are copied, then encrypted in place.
    fn encrypt_from(&self, first_sector: u64, src: &mut Gather<'_>, dst: &mut [u8]) -> Result<()> {
        let cipher = self.cipher()?;
        let sector_len = self.sector as usize;
        let mut jobs: Vec<(u64, Encrypt<'_>)> = Vec::new();
        let mut sector = first_sector;
        let mut rest = dst;
        // Bytes of a run being copied, at the front of `rest`.
        let mut run = 0usize;
        while rest.len() > run {
            let piece = src.next_piece(rest.len() - run);
            if run == 0 && piece.len().is_multiple_of(sector_len) {
                let (d, r) = rest.split_at_mut(piece.len());
                jobs.push((sector, Encrypt::From(piece, d)));
                sector += (piece.len() / sector_len) as u64;
                rest = r;
                continue;
            }
            rest[run..run + piece.len()].copy_from_slice(piece);
            run += piece.len();
            if run.is_multiple_of(sector_len) {
                let (d, r) = rest.split_at_mut(run);
                jobs.push((sector, Encrypt::InPlace(d)));
                sector += (run / sector_len) as u64;
                rest = r;
                run = 0;
            }
        }
        for_each_piece(jobs, sector_len, |s, job| match job {
            Encrypt::From(src, dst) => cipher.encrypt_to(s, src, dst),
            Encrypt::InPlace(buf) => cipher.encrypt(s, buf),
        });
        Ok(())
    }

    /// Reads and decrypts whole sectors at an aligned offset, in place.
    fn read_sectors(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Result<()> {
        self.cipher()?;
        self.payload
            .read_vectored(self.payload_offset + offset, bufs)?;
        let mut sector = self.iv_sector(offset);
        let mut jobs = Vec::with_capacity(bufs.len());
        for buf in bufs.iter_mut() {
            let n = buf.len() as u64 / self.sector;
            jobs.push((sector, &mut buf[..]));
            sector = sector.wrapping_add(n);
        }
        self.decrypt(jobs)
    }

    /// Reads any range into `bufs` through a bounce buffer, [`CHUNK`] bytes
    /// of covering sectors at a time.
    fn read_bounced(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Result<()> {
        let end = offset + total_len(bufs);
        let mut out = SgCursor::new(bufs);
        let mut pos = offset;
        while pos < end {
            let start = pos - pos % self.sector;
            let stop = end.min(start + CHUNK as u64);
            let covering = (stop.next_multiple_of(self.sector) - start) as usize;
            let mut bounce = Bounce::take(covering);
            self.read_sectors(start, &mut [&mut bounce[..]])?;
            let mut at = (pos - start) as usize;
            for piece in out.take((stop - pos) as usize) {
                piece.copy_from_slice(&bounce[at..at + piece.len()]);
                at += piece.len();
            }
            pos = stop;
        }
        Ok(())
    }

    /// Encrypts into a bounce buffer of at most [`CHUNK`] bytes at a time
    /// and writes each piece: memory per request is bounded whatever its
    /// size or layout. Partial sectors at either end are read, patched and
    /// written back. With a `turn`, each payload write is in turn; only the
    /// last one passes it.
    fn write_pieces(
        &self,
        offset: u64,
        bufs: &[&[u8]],
        turn: Option<&dyn WriteTurn>,
    ) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly("luks".into()));
        }
        check_range("luks", self.size(), offset, total_len(bufs))?;
        let end = offset + total_len(bufs);
        self.cipher()?;
        let mut src = Gather::new(bufs);
        let mut pos = offset;
        let sector = self.sector;
        let head = pos % sector;
        if head != 0 && pos < end {
            let n = (sector - head).min(end - pos);
            let last = pos + n == end;
            self.write_partial_sector(pos, n as usize, &mut src, turn, last)?;
            pos += n;
        }
        while end - pos >= sector {
            let n = ((end - pos) / sector * sector).min(CHUNK as u64) as usize;
            let mut bounce = Bounce::take(n);
            self.encrypt_from(self.iv_sector(pos), &mut src, &mut bounce)?;
            let last = pos + n as u64 == end;
            self.write_payload(pos, &bounce, turn, last)?;
            pos += n as u64;
        }
        if pos < end {
            let n = (end - pos) as usize;
            self.write_partial_sector(pos, n, &mut src, turn, true)?;
        }
        Ok(())
    }

    /// Writes ciphertext at `offset` of the volume, in `turn` if there is
    /// one; only the `last` piece of a request passes it.
    fn write_payload(
        &self,
        offset: u64,
        data: &[u8],
        turn: Option<&dyn WriteTurn>,
        last: bool,
    ) -> Result<()> {
        let at = self.payload_offset + offset;
        match turn {
            None => self.payload.write_at(at, data),
            Some(t) if last => self.payload.write_in_turn(at, &[data], t),
            Some(t) => self.payload.write_in_turn(at, &[data], &WaitOnly(t)),
        }
    }

    /// Writes the part of one sector at `offset` (unaligned, `len` bytes
    /// within the sector) from `src`: read, decrypt, patch, encrypt, write,
    /// holding the sector's lock throughout.
    fn write_partial_sector(
        &self,
        offset: u64,
        len: usize,
        src: &mut Gather<'_>,
        turn: Option<&dyn WriteTurn>,
        last: bool,
    ) -> Result<()> {
        let start = offset - offset % self.sector;
        let at = (offset - start) as usize;
        // In turn before the sector's lock: the write whose turn comes first
        // may need the same lock for its own last sector.
        if let Some(t) = turn {
            t.wait()?;
        }
        let _rmw = self.rmw_locks.lock(&[start / self.sector]);
        let mut sector = Bounce::take(self.sector as usize);
        self.read_sectors(start, &mut [&mut sector[..]])?;
        src.copy_to(&mut sector[at..at + len]);
        self.encrypt(self.iv_sector(start), &mut sector)?;
        self.write_payload(start, &sector, turn, last)
    }
}

/// Reads and checks the header of either version from `header_src`.
fn read_meta(header_src: &NodeRef, detached: bool) -> Result<Meta> {
    let mut first = [0u8; 8];
    let avail = header_src.size().min(8) as usize;
    header_src.read_at(0, &mut first[..avail])?;
    if luks2::is_luks2(&first[..avail]) {
        let node_size = header_src.size();
        let mut read = |off: u64, out: &mut [u8]| {
            header_src
                .read_at(off, out)
                .map_err(|e| std::io::Error::other(e.to_string()))
        };
        let header = Luks2Header::read(&mut read, node_size, detached).map_err(LuksError::from)?;
        return Ok(Meta::V2(Box::new(header)));
    }
    let read = |off: u64, out: &mut [u8]| header_src.read_at(off, out);
    Ok(Meta::V1(parse_v1(&read, header_src.size(), detached)?))
}

/// Where the volume of `meta` lies in `payload`.
fn geometry(meta: &Meta, payload: &NodeRef) -> Result<Geometry> {
    let header = match meta {
        Meta::V1(h) => h,
        Meta::V2(h) => return geometry_luks2(h, payload),
    };
    // With a detached header, the payload offset (usually 0) locates the
    // data within `file`, as cryptsetup --header --offset does.
    let payload_offset = header.payload_offset();
    let size = payload.size().checked_sub(payload_offset).ok_or_else(|| {
        BlockError::from(LuksError::Corrupt(format!(
            "payload offset {payload_offset} is beyond the end of the image ({} bytes)",
            payload.size()
        )))
    })?;
    Ok(Geometry {
        sector: SECTOR_SIZE,
        iv_tweak: 0,
        payload_offset,
        size: size - size % SECTOR_SIZE,
    })
}

/// [`geometry`] of a LUKS2 volume: its segment.
fn geometry_luks2(header: &Luks2Header, payload: &NodeRef) -> Result<Geometry> {
    let seg = &header.meta.segment;
    let sector = u64::from(seg.sector_size);
    let payload_offset = seg.offset;
    let avail = payload.size().checked_sub(payload_offset).ok_or_else(|| {
        BlockError::from(LuksError::from(luks2::Luks2Error::field(
            "segments.0.offset",
            format!(
                "{payload_offset} is beyond the end of the image ({} bytes)",
                payload.size()
            ),
        )))
    })?;
    let size = match seg.size {
        None => avail - avail % sector,
        Some(size) if size <= avail => size,
        Some(size) => {
            return Err(LuksError::from(luks2::Luks2Error::field(
                "segments.0.size",
                format!(
                    "{size} bytes at {payload_offset} go beyond the end of the image ({} bytes)",
                    payload.size()
                ),
            ))
            .into())
        }
    };
    Ok(Geometry {
        sector,
        iv_tweak: seg.iv_tweak,
        payload_offset,
        size,
    })
}

/// Runs the key derivation: the volume key of `meta` that `passphrase`
/// opens, from the key material in `header_src`.
fn unlock_meta(
    meta: &Meta,
    header_src: &NodeRef,
    passphrase: &[u8],
    kdf_limit: u64,
) -> Result<MasterKey> {
    #[cfg(test)]
    KDF_RUNS.with(|n| n.set(n.get() + 1));
    let node_size = header_src.size();
    let mut read = |off: u64, out: &mut [u8]| {
        header_src
            .read_at(off, out)
            .map_err(|e| std::io::Error::other(e.to_string()))
    };
    Ok(match meta {
        Meta::V1(h) => unlock_within(h, passphrase, &mut read, kdf_limit)?,
        Meta::V2(h) => {
            luks2::keyslot::unlock(&h.meta, passphrase, &mut read, node_size, kdf_limit)?.0
        }
    })
}

/// The payload cipher of `meta` with volume key `key`.
fn cipher_for(meta: &Meta, key: &MasterKey) -> Result<Box<dyn SectorCipher>> {
    Ok(match meta {
        Meta::V1(h) => new_sector_cipher(&h.spec, key)?,
        Meta::V2(h) => {
            let seg = &h.meta.segment;
            new_sector_cipher_sized(&seg.spec, key, seg.sector_size as usize)?
        }
    })
}

/// Copies consecutive bytes out of a scatter-gather list.
struct Gather<'a> {
    bufs: &'a [&'a [u8]],
    index: usize,
    at: usize,
}

impl<'a> Gather<'a> {
    fn new(bufs: &'a [&'a [u8]]) -> Self {
        Gather {
            bufs,
            index: 0,
            at: 0,
        }
    }

    /// The next bytes, at most `max`, from one buffer of the list.
    fn next_piece(&mut self, max: usize) -> &'a [u8] {
        while self.at == self.bufs[self.index].len() {
            self.index += 1;
            self.at = 0;
        }
        let buf: &'a [u8] = self.bufs[self.index];
        let n = (buf.len() - self.at).min(max);
        let piece = &buf[self.at..self.at + n];
        self.at += n;
        piece
    }

    /// Fills `dst` with the next `dst.len()` bytes.
    fn copy_to(&mut self, mut dst: &mut [u8]) {
        while !dst.is_empty() {
            let piece = self.next_piece(dst.len());
            dst[..piece.len()].copy_from_slice(piece);
            dst = &mut dst[piece.len()..];
        }
    }
}

/// A piece of a write's encryption: straight from the caller's buffer into
/// the bounce buffer, or in place in the bounce buffer.
enum Encrypt<'a> {
    From(&'a [u8], &'a mut [u8]),
    InPlace(&'a mut [u8]),
}

impl Split for Encrypt<'_> {
    fn len(&self) -> usize {
        match self {
            Encrypt::From(_, dst) | Encrypt::InPlace(dst) => dst.len(),
        }
    }

    fn split_at(self, at: usize) -> (Self, Self) {
        match self {
            Encrypt::From(src, dst) => {
                let (s0, s1) = src.split_at(at);
                let (d0, d1) = dst.split_at_mut(at);
                (Encrypt::From(s0, d0), Encrypt::From(s1, d1))
            }
            Encrypt::InPlace(buf) => {
                let (b0, b1) = buf.split_at_mut(at);
                (Encrypt::InPlace(b0), Encrypt::InPlace(b1))
            }
        }
    }
}

/// Whether a request covers whole `sector`-byte sectors only (empty requests do).
fn is_sector_aligned(offset: u64, len: usize, sector: u64) -> bool {
    offset.is_multiple_of(sector) && (len as u64).is_multiple_of(sector)
}

impl BlockNode for LuksNode {
    fn driver(&self) -> &'static str {
        "luks"
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn block_size(&self) -> u64 {
        self.sector
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_vectored(offset, &mut [buf])
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.write_vectored(offset, &[buf])
    }

    /// Whole sectors in whole-sector buffers are read and decrypted in
    /// place (one payload request, the decryption on the crypto threads);
    /// anything else goes through a bounded bounce buffer.
    fn read_vectored(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Result<()> {
        check_range("luks", self.size(), offset, total_len(bufs))?;
        self.cipher()?;
        let s = self.sector;
        if is_sector_aligned(offset, 0, s) && bufs.iter().all(|b| is_sector_aligned(0, b.len(), s))
        {
            return self.read_sectors(offset, bufs);
        }
        self.read_bounced(offset, bufs)
    }

    /// See [`LuksNode::write_pieces`].
    fn write_vectored(&self, offset: u64, bufs: &[&[u8]]) -> Result<()> {
        self.write_pieces(offset, bufs, None)
    }

    /// Each piece is encrypted before its payload write waits for the turn,
    /// so that the cipher works while earlier writes allocate and write.
    fn write_in_turn(&self, offset: u64, bufs: &[&[u8]], turn: &dyn WriteTurn) -> Result<()> {
        let written = self.write_pieces(offset, bufs, Some(turn));
        turn.pass();
        written
    }

    fn flush(&self) -> Result<()> {
        self.payload.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // As QEMU's luks driver: discards are not passed down, so that the
        // payload does not reveal which sectors are in use.
        check_range("luks", self.size(), offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        // Zeros must be encrypted like any other data.
        write_zeroes_by_writing(self, offset, len)
    }

    fn resize(&self, size: u64) -> Result<()> {
        self.truncate(size, Prealloc::Off)
    }

    /// As QEMU's crypto driver: the payload's node is resized to the payload
    /// offset plus `size` (not rounded); the volume holds its whole sectors.
    fn truncate(&self, size: u64, prealloc: Prealloc) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly("luks".into()));
        }
        if let Meta::V2(h) = &*self.meta {
            if h.meta.segment.size.is_some() {
                // Resizing it would rewrite the segment in the header.
                self.check_header_writable()?;
                return Err(BlockError::NotSupported(
                    "LUKS2 volume with a fixed segment size cannot be resized".into(),
                ));
            }
        }
        let end = self
            .payload_offset
            .checked_add(size)
            .filter(|&e| e <= i64::MAX as u64)
            .ok_or(ResizeError::TooLarge)?;
        self.payload.truncate(end, prealloc)?;
        self.size
            .store(size - size % self.sector, Ordering::Release);
        Ok(())
    }

    fn info(&self) -> Value {
        let h = match &*self.meta {
            Meta::V1(h) => h,
            Meta::V2(h) => return self.info_luks2(h),
        };
        let data = v1_info_data(h, self.header_node.is_some());
        json!({"type": "luks", "data": data})
    }

    fn children(&self) -> Vec<(&'static str, NodeRef)> {
        let mut c = Vec::new();
        if let Some(h) = &self.header_node {
            c.push(("header", h.clone()));
        }
        c.push(("file", self.payload.clone()));
        c
    }
}
