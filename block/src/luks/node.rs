//! The `luks` block driver: decrypts reads and encrypts writes of its `file`
//! child, with the LUKS header either at the start of `file` or in a separate
//! `header` node (a detached header).

use std::cell::RefCell;

use rayon::prelude::*;
use serde_json::{json, Value};

use super::{new_sector_cipher, unlock, IvGenAlg, LuksError, LuksHeader, SectorCipher};
use crate::blockdev::OpenContext;
use crate::node::{check_range, total_len, write_zeroes_by_writing, BlockNode, NodeRef};
use crate::options::Opts;
use crate::{BlockError, Result, SECTOR_SIZE};

/// Requests at least this large are encrypted by several threads at once.
const PARALLEL_MIN: usize = 128 * 1024;
/// Bytes each parallel task encrypts.
const PARALLEL_CHUNK: usize = 64 * 1024;

thread_local! {
    /// Per-thread bounce buffer for encrypting writes, reused across requests.
    static BOUNCE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// An unlocked (or, for metadata queries, merely parsed) LUKS volume.
pub struct LuksNode {
    payload: NodeRef,
    header_node: Option<NodeRef>,
    header: LuksHeader,
    /// `None` when opened without I/O (metadata only).
    cipher: Option<Box<dyn SectorCipher>>,
    payload_offset: u64,
    size: u64,
    read_only: bool,
}

impl LuksNode {
    /// Opens a `luks` node: parses and checks the header, unlocks a key slot
    /// with `key-secret`, and builds the payload cipher.
    pub fn open(
        o: &mut Opts,
        payload: NodeRef,
        header_node: Option<NodeRef>,
        read_only: bool,
        ctx: &OpenContext<'_>,
    ) -> Result<Self> {
        let key_secret = o.str("key-secret")?;
        let header_src: &NodeRef = header_node.as_ref().unwrap_or(&payload);
        let detached = header_node.is_some();
        let mut buf = vec![0u8; LuksHeader::SIZE];
        let avail = header_src.size().min(LuksHeader::SIZE as u64) as usize;
        header_src.read_at(0, &mut buf[..avail])?;
        let header = LuksHeader::parse(&buf[..avail], detached)?;
        let header_len = header.key_material_end();
        if header_src.size() < header_len {
            return Err(LuksError::corrupt(format!(
                "LUKS header is truncated: its key material ends at byte {header_len}, but the header is only {} bytes",
                header_src.size()
            ))
            .into());
        }
        // With a detached header, the payload offset (usually 0) locates the
        // data within `file`, as cryptsetup --header --offset does.
        let payload_offset = header.payload_offset();
        let size = payload.size().checked_sub(payload_offset).ok_or_else(|| {
            BlockError::from(LuksError::Corrupt(format!(
                "payload offset {payload_offset} is beyond the end of the image ({} bytes)",
                payload.size()
            )))
        })?;
        let size = size - size % SECTOR_SIZE;

        let cipher = if ctx.no_io && key_secret.is_none() {
            None
        } else {
            let id = key_secret.ok_or_else(|| {
                o.error(
                    "key-secret",
                    "Parameter 'key-secret' is required for cipher",
                )
            })?;
            let passphrase = ctx
                .secrets
                .passphrase(&id)
                .map_err(|e| o.error("key-secret", e.to_string()))?;
            let mut read = |off: u64, out: &mut [u8]| {
                header_src
                    .read_at(off, out)
                    .map_err(|e| std::io::Error::other(e.to_string()))
            };
            let master_key = unlock(&header, &passphrase, &mut read)?;
            Some(new_sector_cipher(&header.spec, &master_key)?)
        };
        Ok(Self {
            payload,
            header_node,
            header,
            cipher,
            payload_offset,
            size,
            read_only,
        })
    }

    fn cipher(&self) -> Result<&dyn SectorCipher> {
        self.cipher.as_deref().ok_or_else(|| {
            BlockError::Graph("luks node was opened without a key: no I/O possible".into())
        })
    }

    /// Decrypts whole sectors in place; `first_sector` is the payload sector of `buf[0]`.
    fn decrypt(&self, first_sector: u64, buf: &mut [u8]) -> Result<()> {
        let cipher = self.cipher()?;
        run_parallel(buf, first_sector, |s, b| cipher.decrypt(s, b));
        Ok(())
    }

    fn encrypt(&self, first_sector: u64, buf: &mut [u8]) -> Result<()> {
        let cipher = self.cipher()?;
        run_parallel(buf, first_sector, |s, b| cipher.encrypt(s, b));
        Ok(())
    }

    /// Encrypts whole sectors of `src` into `dst`, as [`Self::encrypt`].
    fn encrypt_to(&self, first_sector: u64, src: &[u8], dst: &mut [u8]) -> Result<()> {
        let cipher = self.cipher()?;
        if src.len() < PARALLEL_MIN {
            cipher.encrypt_to(first_sector, src, dst);
            return Ok(());
        }
        let per_chunk = (PARALLEL_CHUNK as u64) / SECTOR_SIZE;
        dst.par_chunks_mut(PARALLEL_CHUNK)
            .zip(src.par_chunks(PARALLEL_CHUNK))
            .enumerate()
            .for_each(|(i, (d, s))| cipher.encrypt_to(first_sector + i as u64 * per_chunk, s, d));
        Ok(())
    }

    /// Reads and decrypts whole sectors starting at an aligned offset.
    fn read_sectors(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.payload.read_at(self.payload_offset + offset, buf)?;
        self.decrypt(offset / SECTOR_SIZE, buf)
    }

    /// Reads and decrypts the whole sectors covering `len` bytes at
    /// `offset`; returns them and where `offset` falls in them.
    fn read_covering(&self, offset: u64, len: usize) -> Result<(Vec<u8>, usize)> {
        let start = offset - offset % SECTOR_SIZE;
        let end = (offset + len as u64).next_multiple_of(SECTOR_SIZE);
        let mut covering = vec![0u8; (end - start) as usize];
        self.read_sectors(start, &mut covering)?;
        Ok((covering, (offset - start) as usize))
    }

    /// Encrypts a copy of whole sectors and writes it at an aligned offset.
    fn write_sectors(&self, offset: u64, data: &[u8]) -> Result<()> {
        BOUNCE.with(|bounce| {
            let mut bounce = bounce.borrow_mut();
            // Encrypted straight from `data`: no copy first (resizing fills
            // only what the buffer grows by).
            bounce.resize(data.len(), 0);
            self.encrypt_to(offset / SECTOR_SIZE, data, &mut bounce)?;
            let result = self.payload.write_at(self.payload_offset + offset, &bounce);
            if bounce.capacity() > 8 << 20 {
                *bounce = Vec::new();
            }
            result
        })
    }
}

/// Whether a request covers whole sectors only (empty requests do).
fn is_sector_aligned(offset: u64, len: usize) -> bool {
    offset.is_multiple_of(SECTOR_SIZE) && (len as u64).is_multiple_of(SECTOR_SIZE)
}

/// Runs `f` over sector-aligned chunks of `buf`, on several threads when it is large.
fn run_parallel(buf: &mut [u8], first_sector: u64, f: impl Fn(u64, &mut [u8]) + Sync) {
    if buf.len() < PARALLEL_MIN {
        f(first_sector, buf);
        return;
    }
    let per_chunk = (PARALLEL_CHUNK as u64) / SECTOR_SIZE;
    buf.par_chunks_mut(PARALLEL_CHUNK)
        .enumerate()
        .for_each(|(i, chunk)| f(first_sector + i as u64 * per_chunk, chunk));
}

impl BlockNode for LuksNode {
    fn driver(&self) -> &'static str {
        "luks"
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range("luks", self.size, offset, buf.len() as u64)?;
        if is_sector_aligned(offset, buf.len()) {
            return self.read_sectors(offset, buf);
        }
        let (covering, head) = self.read_covering(offset, buf.len())?;
        buf.copy_from_slice(&covering[head..head + buf.len()]);
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly("luks".into()));
        }
        check_range("luks", self.size, offset, buf.len() as u64)?;
        if is_sector_aligned(offset, buf.len()) {
            return self.write_sectors(offset, buf);
        }
        // Partial sectors: read-modify-write the covering sectors.
        let (mut covering, head) = self.read_covering(offset, buf.len())?;
        covering[head..head + buf.len()].copy_from_slice(buf);
        self.write_sectors(offset - head as u64, &covering)
    }

    fn read_vectored(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Result<()> {
        let len = total_len(bufs);
        check_range("luks", self.size, offset, len)?;
        if !is_sector_aligned(offset, 0) || bufs.iter().any(|b| !is_sector_aligned(0, b.len())) {
            let mut pos = offset;
            for buf in bufs.iter_mut() {
                self.read_at(pos, buf)?;
                pos += buf.len() as u64;
            }
            return Ok(());
        }
        let cipher = self.cipher()?;
        self.payload
            .read_vectored(self.payload_offset + offset, bufs)?;
        // One pass over the whole list: every buffer decrypted in place, on
        // several threads when the request is large.
        let mut sector = offset / SECTOR_SIZE;
        let mut jobs: Vec<(u64, &mut [u8])> = Vec::with_capacity(bufs.len());
        for buf in bufs.iter_mut() {
            let n = buf.len() as u64 / SECTOR_SIZE;
            jobs.push((sector, &mut buf[..]));
            sector += n;
        }
        if len >= PARALLEL_MIN as u64 {
            jobs.into_par_iter()
                .for_each(|(s, b)| run_parallel(b, s, |s, b| cipher.decrypt(s, b)));
        } else {
            jobs.into_iter().for_each(|(s, b)| cipher.decrypt(s, b));
        }
        Ok(())
    }

    fn write_vectored(&self, offset: u64, bufs: &[&[u8]]) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly("luks".into()));
        }
        let len = total_len(bufs);
        check_range("luks", self.size, offset, len)?;
        if !is_sector_aligned(offset, len as usize) {
            let mut pos = offset;
            for buf in bufs {
                self.write_at(pos, buf)?;
                pos += buf.len() as u64;
            }
            return Ok(());
        }
        // Gather into the bounce buffer (encryption needs a copy anyway),
        // encrypt it in parallel and write it with one request.
        BOUNCE.with(|bounce| {
            let mut bounce = bounce.borrow_mut();
            bounce.clear();
            for buf in bufs {
                bounce.extend_from_slice(buf);
            }
            self.encrypt(offset / SECTOR_SIZE, &mut bounce)?;
            let result = self.payload.write_at(self.payload_offset + offset, &bounce);
            if bounce.capacity() > 8 << 20 {
                *bounce = Vec::new();
            }
            result
        })
    }

    fn flush(&self) -> Result<()> {
        self.payload.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // As QEMU's luks driver: discards are not passed down, so that the
        // payload does not reveal which sectors are in use.
        check_range("luks", self.size, offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        // Zeros must be encrypted like any other data.
        write_zeroes_by_writing(self, offset, len)
    }

    fn info(&self) -> Value {
        let h = &self.header;
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
        data.insert("detached-header".into(), json!(self.header_node.is_some()));
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
