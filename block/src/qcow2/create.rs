//! Creating new qcow2 images laid out as `qemu-img create -f qcow2` lays
//! them out: header, refcount table, one refcount block, L1 table (grown by
//! the allocator), and with `preallocation=metadata` L2 tables and data
//! clusters allocated in QEMU's order.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use super::error::Qcow2Error;
use super::header::{
    field, qemu_feature_table, CompressionType, Extension, Header, COMPAT_LAZY_REFCOUNTS,
    EXT_BACKING_FORMAT, EXT_CRYPTO, EXT_FEATURE_TABLE, INCOMPAT_COMPRESSION, V2_HEADER_LEN,
    V3_HEADER_LEN, V3_HEADER_LEN_QEMU,
};
use super::meta::{Meta, OFLAG_COPIED};
use super::node::{Qcow2Node, DEFAULT_L2_CACHE_MAX};
use super::storage::Storage;
use crate::blockdev::Common;
use crate::options::Opts;
use crate::{BlockError, Result};

/// `preallocation`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Preallocation {
    /// Nothing beyond the L1 table.
    #[default]
    Off,
    /// L2 tables and data clusters allocated (not written).
    Metadata,
}

/// Options of a new image (qemu-img's `-o` names).
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// `cluster_size` (512 B .. 2 MiB, a power of two).
    pub cluster_size: u64,
    /// `compat`: true for 1.1 (version 3), false for 0.10 (version 2).
    pub v3: bool,
    /// `backing_file`.
    pub backing_file: Option<String>,
    /// `backing_fmt`.
    pub backing_fmt: Option<String>,
    /// `lazy_refcounts`.
    pub lazy_refcounts: bool,
    /// `refcount_bits` (1, 2, 4, ..., 64).
    pub refcount_bits: u32,
    /// `preallocation`.
    pub preallocation: Preallocation,
    /// `compression_type`.
    pub compression_type: CompressionType,
    /// `encrypt.format=luks` and the other `encrypt.*` options.
    pub encrypt: Option<EncryptCreate>,
}

/// The built-in LUKS encryption of a new image.
#[derive(Clone)]
pub struct EncryptCreate {
    /// Cipher, hash, PBKDF2 time (`encrypt.cipher-alg`, ...).
    pub luks: crate::luks::CreateOptions,
    /// The passphrase of `encrypt.key-secret`.
    pub passphrase: std::sync::Arc<zeroize::Zeroizing<Vec<u8>>>,
}

impl std::fmt::Debug for EncryptCreate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptCreate")
            .field("luks", &self.luks)
            .field("passphrase", &"<redacted>")
            .finish()
    }
}

impl Default for CreateOptions {
    /// QEMU's defaults: 64 KiB clusters, compat 1.1, 16-bit refcounts.
    fn default() -> Self {
        Self {
            cluster_size: 65536,
            v3: true,
            backing_file: None,
            backing_fmt: None,
            lazy_refcounts: false,
            refcount_bits: 16,
            preallocation: Preallocation::Off,
            compression_type: CompressionType::Zlib,
            encrypt: None,
        }
    }
}

impl CreateOptions {
    /// Takes qemu-img's qcow2 creation options out of `o` (keys it does not
    /// know are left for the caller's `finish`).
    pub fn from_opts(o: &mut Opts) -> Result<Self> {
        let mut c = Self::default();
        if let Some(cs) = o.u64("cluster_size")? {
            c.cluster_size = cs;
        }
        if let Some(v) = o.str("compat")? {
            c.v3 = match v.as_str() {
                "0.10" | "v2" => false,
                "1.1" | "v3" => true,
                _ => return Err(o.error("compat", format!("Invalid compatibility level: '{v}'"))),
            };
        }
        c.backing_file = o.str("backing_file")?;
        c.backing_fmt = o.str("backing_fmt")?;
        c.lazy_refcounts = o.bool("lazy_refcounts")?.unwrap_or(false);
        if let Some(b) = o.u64("refcount_bits")? {
            c.refcount_bits = u32::try_from(b).unwrap_or(u32::MAX);
        }
        if let Some(p) = o.str("preallocation")? {
            c.preallocation = match p.as_str() {
                "off" => Preallocation::Off,
                "metadata" => Preallocation::Metadata,
                _ => {
                    return Err(o.error(
                        "preallocation",
                        format!("unsupported preallocation mode '{p}' (off or metadata)"),
                    ))
                }
            };
        }
        if let Some(t) = o.str("compression_type")? {
            c.compression_type = match t.as_str() {
                "zlib" => CompressionType::Zlib,
                "zstd" => CompressionType::Zstd,
                // QEMU's QAPI enum error.
                _ => {
                    return Err(Qcow2Error::Invalid(format!(
                        "Parameter 'compression-type' does not accept value '{t}'"
                    ))
                    .into())
                }
            };
        }
        if o.bool("extended_l2")?.unwrap_or(false) {
            return Err(o.error("extended_l2", "extended L2 entries are not supported"));
        }
        if o.take("data_file").is_some() {
            return Err(o.error("data_file", "external data files are not supported"));
        }
        if o.take("encryption").is_some() || o.take("encrypt").is_some() {
            return Err(o.error(
                "encrypt",
                "qcow2 encryption is not supported; put a luks node over the qcow2 node",
            ));
        }
        Ok(c)
    }

    fn validate(&self) -> Result<u32, Qcow2Error> {
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
            return Err(Qcow2Error::Invalid(
                "Cluster size must be a power of two between 512 and 2048k".into(),
            ));
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return Err(Qcow2Error::Invalid(
                "Refcount width must be a power of two and may not exceed 64 bits".into(),
            ));
        }
        if !self.v3 && self.refcount_bits != 16 {
            return Err(Qcow2Error::Invalid(
                "Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)".into(),
            ));
        }
        if !self.v3 && self.lazy_refcounts {
            return Err(Qcow2Error::Invalid(
                "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)".into(),
            ));
        }
        if !self.v3 && self.compression_type != CompressionType::Zlib {
            return Err(Qcow2Error::Invalid(
                "Non-zlib compression type is only supported with compatibility level 1.1 and above (use compat=1.1 or greater)".into(),
            ));
        }
        if self.backing_fmt.is_some() && self.backing_file.is_none() {
            return Err(Qcow2Error::Invalid(
                "Backing format cannot be used without backing file".into(),
            ));
        }
        Ok(cs.trailing_zeros())
    }
}

/// Creates the qcow2 image `path` of `size` bytes (rounded up to 512 B; taken
/// from the backing file when `None`).
pub fn create(path: &Path, size: Option<u64>, opts: &CreateOptions) -> Result<()> {
    let cluster_bits = opts.validate()?;
    let size = match size {
        Some(s) => s,
        None => backing_size(path, opts)?,
    };
    let size = size
        .checked_next_multiple_of(512)
        .filter(|&s| s <= i64::MAX as u64)
        .ok_or_else(|| Qcow2Error::Invalid(format!("Image size {size} is too large")))?;
    let mut h = new_header(cluster_bits, opts);
    let header_bytes = match h.serialize() {
        Ok(b) => b,
        Err(_) => {
            // As QEMU: the feature name table is optional and left out
            // when it does not fit in the first cluster.
            h.extensions.retain(|e| e.kind != EXT_FEATURE_TABLE);
            h.serialize()?
        }
    };

    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| BlockError::io(format!("Could not create '{}'", path.display()), e))?;
    drop(file);
    let common = Common::default();
    let mut fo = Opts::from_value(
        "file",
        serde_json::json!({ "filename": path.to_str().ok_or_else(|| Qcow2Error::Invalid("the path is not UTF-8".into()))? }),
    )?;
    let node: crate::NodeRef = Arc::new(crate::file::FileNode::open(&mut fo, &common, None)?);
    format(node, cluster_bits, h, &header_bytes, size, opts)
}

/// Formats the open node `node` (QEMU's `blockdev-create` of a qcow2 image on a file
/// node): its old contents are dropped (it is resized to 0 first), `size` must be a
/// multiple of 512 bytes (QEMU's check; `qemu-img create` rounds up before).
pub fn create_on(node: crate::NodeRef, size: u64, opts: &CreateOptions) -> Result<()> {
    if !size.is_multiple_of(512) {
        return Err(
            Qcow2Error::Invalid("Image size must be a multiple of 512 bytes".into()).into(),
        );
    }
    let cluster_bits = opts.validate()?;
    if size > i64::MAX as u64 {
        return Err(Qcow2Error::Invalid(format!("Image size {size} is too large")).into());
    }
    let mut h = new_header(cluster_bits, opts);
    let header_bytes = match h.serialize() {
        Ok(b) => b,
        Err(_) => {
            h.extensions.retain(|e| e.kind != EXT_FEATURE_TABLE);
            h.serialize()?
        }
    };
    node.resize(0)?;
    format(node, cluster_bits, h, &header_bytes, size, opts)
}

/// Writes a new image to the empty `node`: header, refcount table (cluster 1) and one
/// refcount block (cluster 2), then grows the L1 table and preallocates through the
/// normal allocator.
fn format(
    node: crate::NodeRef,
    cluster_bits: u32,
    h: Header,
    header_bytes: &[u8],
    size: u64,
    opts: &CreateOptions,
) -> Result<()> {
    let cs = 1u64 << cluster_bits;
    let mut first = vec![0u8; 3 * cs as usize];
    first[..header_bytes.len()].copy_from_slice(header_bytes);
    first[cs as usize..cs as usize + 8].copy_from_slice(&(2 * cs).to_be_bytes());
    let rb = &mut first[2 * cs as usize..];
    for c in 0..3 {
        super::cache::set_refcount(rb, h.refcount_order, c, 1);
    }
    node.write_at(0, &first)?;
    let storage = Arc::new(Storage::new(node)?);
    let header = super::node::read_header(&storage)?;
    let l2_entries = cs / 8;
    let l1_entries = size.div_ceil(cs * l2_entries);
    let mut m = Meta::load(
        storage.clone(),
        header,
        ((DEFAULT_L2_CACHE_MAX / cs) as usize).min(64),
        4,
        true,
        false,
    )?;
    m.grow_l1(l1_entries)?;
    if let Some(e) = &opts.encrypt {
        set_up_encryption(&mut m, e)?;
    }
    m.write_header_field(field::SIZE, &size.to_be_bytes())?;
    m.header.size = size;
    if opts.preallocation == Preallocation::Metadata {
        preallocate(&mut m, size)?;
    }
    m.flush_all()
}

/// Makes the LUKS volume of a new image: its header and key material in
/// new clusters, named by the header extension (QEMU's
/// `qcow2_set_up_encryption`).
fn set_up_encryption(m: &mut Meta, e: &EncryptCreate) -> Result<()> {
    let volume = crate::luks::create(&e.luks, &e.passphrase)?;
    let cs = m.cs;
    let len = volume.header_image.len() as u64;
    let host = m.alloc_clusters(len.div_ceil(cs))?;
    m.storage.write_at(host, &volume.header_image)?;
    m.storage.extend_to(host + len.div_ceil(cs) * cs)?;
    let bits = m.header.cluster_bits;
    m.overlap
        .set_range(super::overlap::MetaKind::CryptoHeader, host, len, bits);
    let mut h = m.header.clone();
    for ext in h.extensions.iter_mut().filter(|x| x.kind == EXT_CRYPTO) {
        ext.data = [host.to_be_bytes(), len.to_be_bytes()].concat();
    }
    let mut bytes = h.serialize()?;
    bytes.resize(cs as usize, 0);
    m.storage.write_at(0, &bytes)?;
    m.storage.flush()?;
    m.header = h;
    Ok(())
}

fn new_header(cluster_bits: u32, opts: &CreateOptions) -> Header {
    let cs = 1u64 << cluster_bits;
    let mut extensions = Vec::new();
    if let Some(fmt) = &opts.backing_fmt {
        extensions.push(Extension {
            kind: EXT_BACKING_FORMAT,
            data: fmt.as_bytes().to_vec(),
        });
    }
    if opts.encrypt.is_some() {
        // Filled in once the LUKS header's clusters are allocated.
        extensions.push(Extension {
            kind: EXT_CRYPTO,
            data: vec![0; 16],
        });
    }
    // As QEMU: the feature name table (392 bytes) only for clusters over 4 KiB.
    if opts.v3 && cs > 4096 {
        extensions.push(Extension {
            kind: EXT_FEATURE_TABLE,
            data: qemu_feature_table(),
        });
    }
    let zstd = opts.compression_type == CompressionType::Zstd;
    let mut tail = vec![0u8; (V3_HEADER_LEN_QEMU - V3_HEADER_LEN) as usize];
    if zstd {
        tail[0] = 1;
    }
    Header {
        version: if opts.v3 { 3 } else { 2 },
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size: 0,
        crypt_method: if opts.encrypt.is_some() {
            super::crypt::CRYPT_LUKS
        } else {
            0
        },
        l1_size: 0,
        l1_table_offset: 0,
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible: if zstd { INCOMPAT_COMPRESSION } else { 0 },
        compatible: if opts.lazy_refcounts {
            COMPAT_LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear: 0,
        refcount_order: opts.refcount_bits.trailing_zeros(),
        header_length: if opts.v3 {
            V3_HEADER_LEN_QEMU
        } else {
            V2_HEADER_LEN
        },
        tail: if opts.v3 { tail } else { Vec::new() },
        extensions,
        backing_file: opts.backing_file.clone(),
    }
}

/// Allocates L2 tables and data clusters for the whole disk, in QEMU's order.
fn preallocate(m: &mut Meta, size: u64) -> Result<()> {
    let cs = m.cs;
    let total = size.div_ceil(cs);
    let per_call = ((i32::MAX as u64) / cs).max(1);
    let mut gc = 0;
    let mut end = 0;
    while gc < total {
        let l1_idx = gc / m.l2_entries;
        m.writable_l2(l1_idx as usize)?;
        let table_end = ((l1_idx + 1) * m.l2_entries).min(total);
        let n = (table_end - gc).min(per_call);
        let host = m.alloc_clusters(n)?;
        for i in 0..n {
            m.set_l2_entry(gc + i, (host + i * cs) | OFLAG_COPIED)?;
        }
        end = end.max(host + n * cs);
        gc += n;
    }
    m.flush_all()?;
    m.storage.extend_to(end)
}

/// The size of the backing file, for images created without a size.
fn backing_size(path: &Path, opts: &CreateOptions) -> Result<u64> {
    let name = opts
        .backing_file
        .as_deref()
        .ok_or_else(|| Qcow2Error::Invalid("Image creation needs a size parameter".into()))?;
    let rel = Path::new(name);
    let full = if rel.is_absolute() {
        rel.to_path_buf()
    } else {
        path.parent().unwrap_or(Path::new(".")).join(rel)
    };
    match opts.backing_fmt.as_deref() {
        Some("qcow2") | None if is_qcow2(&full) => {
            Ok(crate::BlockNode::size(&Qcow2Node::open_path(&full, true)?))
        }
        Some("raw") | None => std::fs::metadata(&full).map(|m| m.len()).map_err(|e| {
            BlockError::io(
                format!("Could not open backing file '{}'", full.display()),
                e,
            )
        }),
        Some(other) => Err(Qcow2Error::Invalid(format!(
            "cannot read the size of a '{other}' backing file; give a size"
        ))
        .into()),
    }
}

fn is_qcow2(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|f| f.read_exact_at(&mut magic, 0))
        .is_ok()
        && magic == super::header::MAGIC.to_be_bytes()
}
