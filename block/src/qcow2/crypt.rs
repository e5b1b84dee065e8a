//! Encrypted qcow2 images: QEMU's built-in LUKS encryption
//! (`encrypt.format=luks`, crypt method 2: a LUKS1 header in clusters named
//! by the full disk encryption header extension, data clusters encrypted
//! with its volume key, IVs from the *host* offset) and, read only, the
//! legacy AES-CBC encryption (`encrypt.format=aes`, crypt method 1: the
//! passphrase is the key, IVs from the *guest* offset), as QEMU's
//! `qcow2_co_encdec` (with `crypt_physical_offset`) computes them.
//!
//! Only guest data is encrypted: metadata, compressed clusters (QEMU does
//! not encrypt them either) and the LUKS header are not.

use std::sync::Arc;

use serde_json::{json, Map, Value};
use zeroize::Zeroizing;

use super::error::Qcow2Error;
use super::header::{Header, EXT_CRYPTO};
use super::node::Qcow2Node;
use crate::aligned::AlignedBuf;
use crate::luks::crypto_pool::for_each_piece;
use crate::luks::node::{parse_v1, unlock_v1, v1_info_data};
use crate::luks::{
    new_sector_cipher, CipherAlg, CipherMode, CipherSpec, HashAlg, IvGenAlg, LuksHeader,
    SectorCipher, DEFAULT_KDF_ITERATIONS_LIMIT,
};
use crate::sector_locks::SectorLocks;
use crate::sg::SgSlices;
use crate::{BlockError, Result, SECTOR_SIZE};

/// `crypt_method` of legacy AES-CBC encryption.
pub const CRYPT_AES: u32 = 1;
/// `crypt_method` of LUKS encryption.
pub const CRYPT_LUKS: u32 = 2;

/// Bytes encrypted or decrypted per bounce (bounds the memory of a request).
const CHUNK: usize = 1 << 20;

/// How an encrypted image is opened (the `encrypt.*` options).
#[derive(Clone, Default)]
pub struct EncryptOpen {
    /// `encrypt.format` (`luks` or `aes`), checked against the header.
    pub format: Option<String>,
    /// The passphrase of `encrypt.key-secret`.
    pub passphrase: Option<Arc<Zeroizing<Vec<u8>>>>,
    /// Opened for metadata only: nothing is unlocked.
    pub no_io: bool,
    /// PBKDF2 iterations an unlock may cost at most.
    pub kdf_limit: Option<u64>,
    /// Legacy AES-CBC images may be opened (qemu-img's tools, not the VMM).
    pub legacy_aes: bool,
}

impl std::fmt::Debug for EncryptOpen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptOpen")
            .field("format", &self.format)
            .field(
                "passphrase",
                &self.passphrase.as_ref().map(|_| "<redacted>"),
            )
            .field("no_io", &self.no_io)
            .finish()
    }
}

/// The encryption of an open image.
pub struct Crypto {
    method: u32,
    /// The LUKS header (method 2).
    luks: Option<LuksHeader>,
    /// `None` when opened for metadata only.
    cipher: Option<Box<dyn SectorCipher>>,
    /// Held by each read-modify-write of a partial sector (host sectors).
    rmw_locks: SectorLocks,
}

/// The name of a crypt method as QEMU's `encrypt.format` spells it.
fn format_name(method: u32) -> &'static str {
    if method == CRYPT_AES {
        "aes"
    } else {
        "luks"
    }
}

/// The offset and length of the LUKS header, from the header extension.
pub fn crypto_header_range(h: &Header) -> Option<(u64, u64)> {
    let ext = h.extension(EXT_CRYPTO)?;
    if ext.len() < 16 {
        return None;
    }
    let off = u64::from_be_bytes(ext[0..8].try_into().ok()?);
    let len = u64::from_be_bytes(ext[8..16].try_into().ok()?);
    Some((off, len))
}

/// The legacy AES-CBC cipher: AES-128 keyed with the passphrase's first 16
/// bytes (zero padded), plain64 IVs (QEMU's `qcrypto_block_qcow`).
fn aes_cipher(passphrase: &[u8]) -> Result<Box<dyn SectorCipher>> {
    let mut key = Zeroizing::new(vec![0u8; 16]);
    let n = passphrase.len().min(16);
    key[..n].copy_from_slice(&passphrase[..n]);
    let spec = CipherSpec {
        alg: CipherAlg::Aes128,
        mode: CipherMode::Cbc,
        ivgen: IvGenAlg::Plain64,
        ivgen_hash: None,
        hash: HashAlg::Sha256,
    };
    Ok(new_sector_cipher(&spec, &key)?)
}

impl Crypto {
    /// Sets up the encryption of the image with header `h` (`read` reads
    /// the image file); `None` for a plain image.
    pub fn open(
        h: &Header,
        file_len: u64,
        read: &dyn Fn(u64, &mut [u8]) -> Result<()>,
        o: &EncryptOpen,
    ) -> Result<Option<Crypto>> {
        let method = h.crypt_method;
        if method == 0 {
            if let Some(f) = &o.format {
                return Err(BlockError::option(
                    "",
                    format!("No encryption in image header, but options specified format '{f}'"),
                ));
            }
            return Ok(None);
        }
        if let Some(f) = o.format.as_deref().filter(|f| *f != format_name(method)) {
            return Err(BlockError::option(
                "",
                format!(
                    "Header reported '{}' encryption format but options specify '{f}'",
                    format_name(method)
                ),
            ));
        }
        // The header extension first: an image without one is refused
        // whatever the options.
        let range = match method {
            CRYPT_LUKS => Some(crypto_header_range(h).ok_or_else(|| {
                Qcow2Error::corrupt(
                    "encrypted image (crypt method 2) lacks the full disk encryption header extension",
                )
            })?),
            _ => None,
        };
        if method == CRYPT_AES && !o.legacy_aes {
            return Err(Qcow2Error::LegacyAes.into());
        }
        let passphrase = match (&o.passphrase, o.no_io) {
            (_, true) => None,
            (Some(p), false) => Some(p.clone()),
            (None, false) => {
                // QEMU's words; they name the key already.
                return Err(BlockError::option(
                    "",
                    "Parameter 'encrypt.key-secret' is required for cipher",
                ));
            }
        };
        if method == CRYPT_AES {
            let cipher = passphrase.map(|p| aes_cipher(&p)).transpose()?;
            return Ok(Some(Crypto {
                method,
                luks: None,
                cipher,
                rmw_locks: SectorLocks::default(),
            }));
        }
        let Some((off, len)) = range else {
            return Ok(None);
        };
        let cs = h.cluster_size();
        if off % cs != 0 || off < cs || off.checked_add(len).is_none_or(|e| e > file_len) {
            return Err(Qcow2Error::corrupt(format!(
                "encryption header at offset {off:#x} ({len} bytes) is not inside the image"
            ))
            .into());
        }
        let read_hdr = |at: u64, out: &mut [u8]| -> Result<()> {
            if at.saturating_add(out.len() as u64) > len {
                return Err(Qcow2Error::corrupt(format!(
                    "Request for data outside of extension header: {at} + {} > {len}",
                    out.len()
                ))
                .into());
            }
            read(off + at, out)
        };
        let header = parse_v1(&read_hdr, len, false)?;
        let kdf_limit = o.kdf_limit.unwrap_or(DEFAULT_KDF_ITERATIONS_LIMIT);
        let cipher = match passphrase {
            Some(p) => Some(unlock_v1(&header, &read_hdr, &p, kdf_limit)?),
            None => None,
        };
        Ok(Some(Crypto {
            method,
            luks: Some(header),
            cipher,
            rmw_locks: SectorLocks::default(),
        }))
    }

    /// Whether writes are possible (legacy AES images are read only).
    pub fn writable(&self) -> bool {
        self.method == CRYPT_LUKS
    }

    /// The `encrypt` block of the image's `format-specific` info.
    pub fn info(&self) -> Value {
        let Some(h) = &self.luks else {
            return json!({"format": "aes"});
        };
        let mut out = Map::new();
        for (k, v) in v1_info_data(h, false) {
            if k == "cipher-mode" {
                out.insert("format".into(), json!("luks"));
            }
            out.insert(k, v);
        }
        Value::Object(out)
    }

    fn cipher(&self) -> Result<&dyn SectorCipher> {
        self.cipher.as_deref().ok_or_else(|| {
            BlockError::NotSupported(
                "qcow2 image was opened without its key: no data I/O possible".into(),
            )
        })
    }

    /// The IV sector of the data byte at `host` (guest offset `guest`).
    fn iv_sector(&self, host: u64, guest: u64) -> u64 {
        if self.method == CRYPT_AES {
            guest / SECTOR_SIZE
        } else {
            host / SECTOR_SIZE
        }
    }
}

impl Qcow2Node {
    /// Reads guest data at host offset `host` (guest offset `guest`),
    /// decrypting it on an encrypted image.
    pub(super) fn data_read(&self, host: u64, guest: u64, buf: &mut [u8]) -> Result<()> {
        let Some(c) = &self.crypto else {
            return self.storage.read_at(host, buf);
        };
        let cipher = c.cipher()?;
        let mut done = 0;
        while done < buf.len() {
            let h = host + done as u64;
            let start = h - h % SECTOR_SIZE;
            let want = (buf.len() - done).min(CHUNK);
            let end = (h + want as u64).next_multiple_of(SECTOR_SIZE);
            let mut b = AlignedBuf::zeroed((end - start) as usize);
            self.storage.read_at(start, &mut b)?;
            let first = c.iv_sector(start, guest + done as u64 - (h - start));
            for_each_piece(vec![(first, &mut b[..])], SECTOR_SIZE as usize, |s, p| {
                cipher.decrypt(s, p)
            });
            let skip = (h - start) as usize;
            buf[done..done + want].copy_from_slice(&b[skip..skip + want]);
            done += want;
        }
        Ok(())
    }

    /// [`Self::data_read`] into a scatter-gather list.
    pub(super) fn data_read_vectored(
        &self,
        host: u64,
        guest: u64,
        parts: &mut [&mut [u8]],
    ) -> Result<()> {
        if self.crypto.is_none() {
            return self.storage.read_vectored(host, parts);
        }
        let mut at = 0u64;
        for p in parts.iter_mut() {
            self.data_read(host + at, guest + at, p)?;
            at += p.len() as u64;
        }
        Ok(())
    }

    /// Writes guest data at host offset `host`, encrypting it on an
    /// encrypted image (partial sectors are read, decrypted and merged).
    pub(super) fn data_write_vectored(&self, host: u64, bufs: &[&[u8]]) -> Result<()> {
        let Some(c) = &self.crypto else {
            return self.storage.write_vectored(host, bufs);
        };
        let cipher = c.cipher()?;
        if !c.writable() {
            return Err(BlockError::ReadOnly("qcow2 (AES encrypted)".into()));
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut src = SgSlices::new(bufs);
        let mut done = 0;
        while done < total {
            let h = host + done as u64;
            let start = h - h % SECTOR_SIZE;
            let n = (total - done).min(CHUNK);
            let end = (h + n as u64).next_multiple_of(SECTOR_SIZE);
            let mut b = AlignedBuf::zeroed((end - start) as usize);
            let skip = (h - start) as usize;
            let partial = skip != 0 || (h + n as u64) != end;
            let _rmw = partial.then(|| {
                c.rmw_locks
                    .lock(&[start / SECTOR_SIZE, (end - SECTOR_SIZE) / SECTOR_SIZE])
            });
            if partial {
                // Read-modify-write of the partial first and last sectors.
                let last = (end - SECTOR_SIZE) as usize - start as usize;
                self.data_read(start, 0, &mut b[..SECTOR_SIZE as usize])?;
                if last != 0 {
                    self.data_read(end - SECTOR_SIZE, 0, &mut b[last..])?;
                }
            }
            let mut at = skip;
            for part in src.take(n) {
                b[at..at + part.len()].copy_from_slice(part);
                at += part.len();
            }
            let first = c.iv_sector(start, 0);
            for_each_piece(vec![(first, &mut b[..])], SECTOR_SIZE as usize, |s, p| {
                cipher.encrypt(s, p)
            });
            self.storage.write_at(start, &b)?;
            done += n;
        }
        Ok(())
    }

    /// Whether the image is encrypted.
    pub fn encrypted(&self) -> bool {
        self.crypto.is_some()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use zeroize::Zeroizing;

    use super::super::create::{create, CreateOptions, EncryptCreate};
    use super::super::node::{Backing, Qcow2Node, Qcow2Options};
    use super::EncryptOpen;
    use crate::blockdev::Common;
    use crate::node::BlockNode;

    fn key(p: &str) -> Arc<Zeroizing<Vec<u8>>> {
        Arc::new(Zeroizing::new(p.as_bytes().to_vec()))
    }

    fn open(path: &std::path::Path, pass: Option<&str>, no_io: bool) -> crate::Result<Qcow2Node> {
        let common = Common::default();
        let mut fo = crate::options::Opts::from_value(
            "file",
            serde_json::json!({"filename": path.to_str().unwrap()}),
        )
        .unwrap();
        let file: crate::NodeRef =
            Arc::new(crate::file::FileNode::open(&mut fo, &common, None).unwrap());
        let o = Qcow2Options {
            host_path: Some(path.to_path_buf()),
            read_only: no_io,
            encrypt: EncryptOpen {
                passphrase: pass.map(key),
                no_io,
                ..EncryptOpen::default()
            },
            ..Qcow2Options::default()
        };
        Qcow2Node::open_image(file, Backing::Disabled, &o)
    }

    /// Unaligned writes (read-modify-write of partial sectors), copy-on-write
    /// into new clusters and in-place rewrites read back as written, also
    /// after reopening; nothing is stored in plain text; a wrong key is
    /// refused by kind; metadata opens need no key.
    #[test]
    fn unaligned_writes_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("e.qcow2");
        let luks = crate::luks::CreateOptions {
            iter_time_ms: 10,
            ..Default::default()
        };
        let opts = CreateOptions {
            cluster_size: 4096,
            encrypt: Some(EncryptCreate {
                luks,
                passphrase: key("pw"),
            }),
            ..CreateOptions::default()
        };
        let size = 1u64 << 20;
        create(&img, Some(size), &opts).unwrap();
        let mut model = vec![0u8; size as usize];
        {
            let n = open(&img, Some("pw"), false).unwrap();
            for (i, &(off, len)) in [
                (3u64, 1000usize),
                (4090, 20),
                (10_000, 70_000),
                (5, 3),
                (8191, 2),
            ]
            .iter()
            .enumerate()
            {
                let data: Vec<u8> = (0..len).map(|j| (j as u8) ^ (0x41 + i as u8)).collect();
                n.write_at(off, &data).unwrap();
                model[off as usize..off as usize + len].copy_from_slice(&data);
                let mut back = vec![0u8; len + 7];
                let at = off.saturating_sub(3);
                n.read_at(at, &mut back).unwrap();
                assert_eq!(back[..], model[at as usize..at as usize + len + 7]);
            }
            n.flush().unwrap();
        }
        let n = open(&img, Some("pw"), false).unwrap();
        let mut all = vec![0u8; size as usize];
        n.read_at(0, &mut all).unwrap();
        assert!(all == model, "data differs after reopening");
        let raw = std::fs::read(&img).unwrap();
        let needle: Vec<u8> = (0..64).map(|j| (j as u8) ^ 0x43).collect();
        assert!(!raw.windows(64).any(|w| w == needle), "plain text on disk");
        let wrong = open(&img, Some("nope"), false)
            .err()
            .expect("wrong key opens");
        assert!(
            matches!(
                wrong,
                crate::BlockError::Luks(crate::luks::LuksError::WrongPassphrase)
            ),
            "{wrong}"
        );
        let meta = open(&img, None, true).unwrap();
        assert!(meta.encrypted());
        assert_eq!(meta.info()["data"]["encrypt"]["format"], "luks");
        assert!(meta.read_at(0, &mut [0u8; 512]).is_err());
    }
}
