//! The `qcow2` block driver node: opening (options, validation, backing
//! file, dirty-image repair) and the `BlockNode` interface.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock};

use serde_json::{json, Value};

use super::check::{self, Repair};
use super::crypt::{Crypto, EncryptOpen};
use super::error::Qcow2Error;
use super::header::{CompressionType, Header, INCOMPAT_DIRTY, INCOMPAT_EXTL2};
use super::layout::{check_features, check_layout, is_marked_corrupt};
use super::meta::Meta;
use super::storage::Storage;
use crate::blockdev::{BackingFiles, Common, DriverKeys, OpenContext};
use crate::node::{check_range, total_len, BlockNode, BlockStatus, NodeRef};
use crate::options::Opts;
use crate::{BlockError, Result, WriteTurn};

/// QEMU's default upper bound of the L2 cache (32 MiB).
pub const DEFAULT_L2_CACHE_MAX: u64 = 32 << 20;
/// Least refcount cache, in clusters (QEMU's default).
pub const MIN_REFCOUNT_CACHE_CLUSTERS: u64 = 4;
/// Least L2 cache, in clusters.
pub const MIN_L2_CACHE_CLUSTERS: u64 = 2;
/// Longest backing chain opened automatically.
const MAX_BACKING_DEPTH: u32 = 64;

/// Which backing node a qcow2 node gets.
pub enum Backing {
    /// The one the image header names (opened read-only), or none.
    Auto,
    /// None, whatever the header says (`"backing": null`).
    Disabled,
    /// This node.
    Node(NodeRef),
}

/// How to open an image (the driver options, typed).
#[derive(Clone, Debug, Default)]
pub struct Qcow2Options {
    /// Refuse writes.
    pub read_only: bool,
    /// `lazy-refcounts`; default: the image's compatible bit.
    pub lazy_refcounts: Option<bool>,
    /// `cache-size` in bytes.
    pub cache_size: Option<u64>,
    /// `l2-cache-size` in bytes.
    pub l2_cache_size: Option<u64>,
    /// `refcount-cache-size` in bytes.
    pub refcount_cache_size: Option<u64>,
    /// Host path of the image file, so that it can grow and relative
    /// backing names resolve against its folder.
    pub host_path: Option<PathBuf>,
    /// Folder for relative names when the host path is unknown.
    pub base_dir: Option<PathBuf>,
    /// Common options given to automatically opened backing files.
    pub common: Common,
    /// Which backing files the header may name.
    pub backing_files: BackingFiles,
    /// The `encrypt.*` options of an encrypted image.
    pub encrypt: EncryptOpen,
}

/// An open qcow2 image.
///
/// Lock order: `io_lock`, then `meta`, then the nodes below; `alloc_done`
/// is waited on with `meta` (see `write.rs`).
pub struct Qcow2Node {
    pub(super) meta: Mutex<Meta>,
    /// Data I/O holds it shared (a request takes it once, for its whole
    /// duration); freeing clusters, flush and check hold it exclusively.
    pub(super) io_lock: RwLock<()>,
    /// Signalled when an allocation in flight is linked or abandoned.
    pub(super) alloc_done: Condvar,
    /// How many times a write waited for another's allocation.
    pub(super) alloc_waits: AtomicU64,
    pub(super) storage: Arc<Storage>,
    pub(super) backing: Option<NodeRef>,
    /// The guest size; changes on resize.
    pub(super) size: AtomicU64,
    pub(super) cluster_bits: u32,
    pub(super) read_only: bool,
    pub(super) corrupt: bool,
    pub(super) compression: CompressionType,
    pub(super) extl2: bool,
    pub(super) version: u32,
    /// Autoclear bits cleared (first write done).
    pub(super) prepared: AtomicBool,
    /// Whether the metadata looks preallocated (`img map` status), once known.
    pub(super) prealloc: OnceLock<bool>,
    /// The encryption of an encrypted image.
    pub(super) crypto: Option<Crypto>,
    info: Value,
}

/// Byte sizes of the L2 and refcount caches by QEMU's rules.
fn cache_sizes(h: &Header, o: &Qcow2Options) -> std::result::Result<(u64, u64), Qcow2Error> {
    let cs = h.cluster_size();
    let entry = if h.incompatible & INCOMPAT_EXTL2 != 0 {
        16
    } else {
        8
    };
    let max_l2 = (h.size.div_ceil(cs) * entry).next_multiple_of(cs);
    let min_rc = MIN_REFCOUNT_CACHE_CLUSTERS * cs;
    let (l2, rc) = match (o.cache_size, o.l2_cache_size, o.refcount_cache_size) {
        (Some(_), Some(_), Some(_)) => return Err(Qcow2Error::Invalid(
            "l2-cache-size, refcount-cache-size, and cache-size may not be set at the same time"
                .into(),
        )),
        (Some(c), Some(l2), None) => {
            if l2 > c {
                return Err(Qcow2Error::Invalid(
                    "l2-cache-size may not exceed cache-size".into(),
                ));
            }
            (l2, c - l2)
        }
        (Some(c), None, Some(rc)) => {
            if rc > c {
                return Err(Qcow2Error::Invalid(
                    "refcount-cache-size may not exceed cache-size".into(),
                ));
            }
            (c - rc, rc)
        }
        (Some(c), None, None) => {
            if c >= max_l2 + min_rc {
                (max_l2, c - max_l2)
            } else {
                (c.saturating_sub(min_rc), min_rc)
            }
        }
        (None, l2, rc) => (
            l2.unwrap_or(max_l2.min(DEFAULT_L2_CACHE_MAX)),
            rc.unwrap_or(min_rc),
        ),
    };
    Ok((
        (l2 / cs).max(MIN_L2_CACHE_CLUSTERS),
        (rc / cs).max(MIN_REFCOUNT_CACHE_CLUSTERS),
    ))
}

/// Reads and validates the header of the image in `storage`.
pub(super) fn read_header(storage: &Storage) -> Result<Header> {
    let len = storage.len();
    let mut first = vec![0u8; len.min(512) as usize];
    storage.read_at(0, &mut first)?;
    let bits = Header::peek_cluster_bits(&first)?;
    let mut buf = vec![0u8; len.min(1 << bits) as usize];
    storage.read_at(0, &mut buf)?;
    Ok(Header::parse(&buf)?)
}

impl Qcow2Node {
    /// The options of a `qcow2` node (some accepted for compatibility with
    /// QEMU only, `data-file` and `encrypt` to be refused by name).
    pub const KEYS: DriverKeys = DriverKeys {
        keys: &[
            "file",
            "backing",
            "lazy-refcounts",
            "cache-size",
            "l2-cache-size",
            "refcount-cache-size",
            "l2-cache-entry-size",
            "cache-clean-interval",
            "pass-discard-request",
            "pass-discard-snapshot",
            "pass-discard-other",
            "discard-no-unref",
            "overlap-check",
            "data-file",
            "encrypt",
        ],
        required: &["file"],
        children: &["file", "backing"],
    };

    /// Opens a `qcow2` node from `blockdev-add` options.
    pub fn open(
        o: &mut Opts,
        file: NodeRef,
        backing: Backing,
        common: &Common,
        ctx: &OpenContext<'_>,
    ) -> Result<Self> {
        let lazy_refcounts = o.bool("lazy-refcounts")?;
        let cache_size = o.u64("cache-size")?;
        let l2_cache_size = o.u64("l2-cache-size")?;
        let refcount_cache_size = o.u64("refcount-cache-size")?;
        // Accepted for compatibility with QEMU; they tune nothing here.
        o.u64("l2-cache-entry-size")?;
        o.u64("cache-clean-interval")?;
        for key in [
            "pass-discard-request",
            "pass-discard-snapshot",
            "pass-discard-other",
            "discard-no-unref",
        ] {
            o.bool(key)?;
        }
        o.take("overlap-check");
        if o.take("data-file").is_some() {
            return Err(o.error("data-file", "external data files are not supported"));
        }
        let encrypt = match o.take("encrypt") {
            None => EncryptOpen::default(),
            Some(v) => {
                let mut eo = Opts::from_value(o.key_path("encrypt"), v)?;
                let format = eo.str("format")?;
                let key_secret = eo.str("key-secret")?;
                eo.finish()?;
                let passphrase = match key_secret {
                    Some(id) if !ctx.no_io => Some(std::sync::Arc::new(
                        ctx.secrets
                            .passphrase(&id)
                            .map_err(|e| o.error("encrypt.key-secret", e.to_string()))?,
                    )),
                    _ => None,
                };
                EncryptOpen {
                    format,
                    passphrase,
                    no_io: ctx.no_io,
                    kdf_limit: None,
                    legacy_aes: ctx.legacy_aes,
                }
            }
        };
        let encrypt = EncryptOpen {
            no_io: ctx.no_io,
            legacy_aes: ctx.legacy_aes,
            ..encrypt
        };
        // Metadata-only opens (img info) leave the backing chain closed, as
        // qemu-img info does: a missing backing file is no error there.
        let backing = match backing {
            Backing::Auto if ctx.no_io => Backing::Disabled,
            other => other,
        };
        let host_path = host_path_of(&file, ctx.base_dir);
        let opts = Qcow2Options {
            read_only: common.read_only,
            lazy_refcounts,
            cache_size,
            l2_cache_size,
            refcount_cache_size,
            host_path,
            base_dir: ctx.base_dir.map(Path::to_path_buf),
            backing_files: ctx.backing_files,
            common: common.clone(),
            encrypt,
        };
        Self::open_image(file, backing, &opts).map_err(|e| match e {
            // Name the node's key path, if it has one (not for a top-level image).
            BlockError::Qcow2 { node: None, source } if !o.path().is_empty() => BlockError::Qcow2 {
                node: Some(o.path().to_string()),
                source,
            },
            other => other,
        })
    }

    /// Opens the image in `file` with typed options.
    pub fn open_image(file: NodeRef, backing: Backing, o: &Qcow2Options) -> Result<Self> {
        Self::open_depth(file, backing, o, 0)
    }

    fn open_depth(file: NodeRef, backing: Backing, o: &Qcow2Options, depth: u32) -> Result<Self> {
        let writable_req = !o.read_only;
        let probe = Storage::new(file.clone())?;
        let header = read_header(&probe)?;
        check_features(&header)?;
        let storage = Arc::new(Storage::new(file.clone())?);
        check_layout(&header, storage.len())?;
        let corrupt = is_marked_corrupt(&header);
        let extl2 = header.incompatible & INCOMPAT_EXTL2 != 0;
        if extl2 && writable_req {
            return Err(Qcow2Error::Unsupported(
                "writing images with extended L2 entries (subclusters) is not supported; open them read-only".into(),
            )
            .into());
        }
        let crypto = {
            let read = |off: u64, out: &mut [u8]| storage.read_at(off, out);
            Crypto::open(&header, storage.len(), &read, &o.encrypt)?
        };
        let writable = writable_req
            && !corrupt
            && !file.read_only()
            && crypto.as_ref().is_none_or(Crypto::writable);
        let compression = header.compression_type()?;
        let (l2_entries, rc_entries) = cache_sizes(&header, o)?;
        let lazy = o
            .lazy_refcounts
            .unwrap_or(header.compatible & super::header::COMPAT_LAZY_REFCOUNTS != 0);
        if lazy && header.version < 3 {
            return Err(Qcow2Error::Invalid(
                "lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level"
                    .into(),
            )
            .into());
        }
        let backing = match backing {
            Backing::Disabled => None,
            Backing::Node(n) => Some(n),
            Backing::Auto => match &header.backing_file {
                None => None,
                Some(name) => Some(open_backing_file(
                    name,
                    header.backing_format().as_deref(),
                    o,
                    depth,
                )?),
            },
        };
        let version = header.version;
        let size = header.size;
        let cluster_bits = header.cluster_bits;
        let dirty = header.incompatible & INCOMPAT_DIRTY != 0;
        let mut meta = Meta::load(
            storage.clone(),
            header,
            l2_entries as usize,
            rc_entries as usize,
            writable,
            lazy,
        )?;
        if writable {
            meta.check_reftable_unique()?;
        }
        if writable && dirty {
            // Refcounts may be stale: rebuild them before any allocation. A dry run
            // first: an image the rebuild cannot make whole is refused untouched.
            let dry = check::check_meta(&mut meta, Repair::None)?;
            if dry.unrepairable > 0 {
                return Err(Qcow2Error::corrupt(format!(
                    "the dirty image has {} errors that repairing its refcounts cannot \
                     fix; nothing was written ('qemu-img check' lists them)",
                    dry.unrepairable
                ))
                .into());
            }
            let report = check::check_meta(&mut meta, Repair::All)?;
            if !report.is_clean() {
                return Err(Qcow2Error::corrupt(format!(
                    "repairing the refcounts of a dirty image left {} errors, {} leaks \
                     and {} check errors",
                    report.corruptions, report.leaks, report.check_errors
                ))
                .into());
            }
            meta.flush_all()?;
            let bits = meta.header.incompatible & !INCOMPAT_DIRTY;
            meta.set_incompatible(bits)?;
        }
        let mut info = info_value(&meta.header, compression, corrupt);
        if let (Some(c), Some(data)) = (&crypto, info["data"].as_object_mut()) {
            // As qemu-img: after the refcount width, before the corrupt bit.
            let mut out = serde_json::Map::new();
            for (k, v) in std::mem::take(data) {
                if k == "corrupt" {
                    out.insert("encrypt".into(), c.info());
                }
                out.insert(k, v);
            }
            if !out.contains_key("encrypt") {
                out.insert("encrypt".into(), c.info());
            }
            *data = out;
        }
        let prepared = meta.prepared;
        Ok(Self {
            meta: Mutex::new(meta),
            io_lock: RwLock::new(()),
            alloc_done: Condvar::new(),
            alloc_waits: AtomicU64::new(0),
            storage,
            backing,
            size: AtomicU64::new(size),
            cluster_bits,
            read_only: !writable,
            corrupt,
            compression,
            extl2,
            version,
            prepared: AtomicBool::new(prepared),
            prealloc: OnceLock::new(),
            crypto,
            info,
        })
    }

    /// Opens the image at `path` (a `file` node under it, backing file from
    /// the header), for tools and tests.
    pub fn open_path(path: &Path, read_only: bool) -> Result<Self> {
        let common = Common {
            read_only,
            ..Common::default()
        };
        let file = open_file_node(path, &common)?;
        let o = Qcow2Options {
            read_only,
            host_path: Some(path.to_path_buf()),
            common,
            ..Qcow2Options::default()
        };
        Self::open_image(file, Backing::Auto, &o)
    }

    pub(super) fn lock_meta(&self) -> Result<MutexGuard<'_, Meta>> {
        self.meta
            .lock()
            .map_err(|_| BlockError::Poisoned("qcow2: metadata lock"))
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The backing node, if any.
    pub fn backing(&self) -> Option<&NodeRef> {
        self.backing.as_ref()
    }

    /// The header as currently on disk.
    pub fn header(&self) -> Result<Header> {
        Ok(self.lock_meta()?.header.clone())
    }

    /// Runs the consistency check on the open image (after writing back
    /// cached metadata); repairs need a writable node.
    pub fn check(&self, repair: Repair) -> Result<check::CheckReport> {
        let _io = self
            .io_lock
            .write()
            .map_err(|_| BlockError::Poisoned("qcow2: I/O lock"))?;
        let mut m = self.lock_meta()?;
        if m.writable {
            m.flush_all()?;
        } else if repair != Repair::None {
            return Err(BlockError::ReadOnly("qcow2".into()));
        }
        let report = check::check_meta(&mut m, repair)?;
        if m.writable {
            m.flush_all()?;
        }
        Ok(report)
    }

    /// Writes back everything and clears the dirty bit (lazy refcounts).
    pub fn close(&self) -> Result<()> {
        let _io = self
            .io_lock
            .write()
            .map_err(|_| BlockError::Poisoned("qcow2: I/O lock"))?;
        let mut m = self.lock_meta()?;
        m.flush_all()?;
        m.mark_clean()
    }
}

impl Drop for Qcow2Node {
    fn drop(&mut self) {
        if !self.read_only {
            let _ = self.close();
        }
    }
}

/// The `format-specific` info `qemu-img info` shows for qcow2.
fn info_value(h: &Header, compression: CompressionType, corrupt: bool) -> Value {
    if h.version < 3 {
        return json!({"type": "qcow2", "data": {
            "compat": "0.10",
            "compression-type": compression.name(),
            "refcount-bits": h.refcount_bits(),
        }});
    }
    json!({"type": "qcow2", "data": {
        "compat": "1.1",
        "compression-type": compression.name(),
        "lazy-refcounts": h.compatible & super::header::COMPAT_LAZY_REFCOUNTS != 0,
        "refcount-bits": h.refcount_bits(),
        "corrupt": corrupt,
        "extended-l2": h.incompatible & INCOMPAT_EXTL2 != 0,
    }})
}

/// The host path of a `file` child.
fn host_path_of(file: &NodeRef, base_dir: Option<&Path>) -> Option<PathBuf> {
    if file.driver() != "file" {
        return None;
    }
    let name = Path::new(file.filename()?);
    Some(match base_dir {
        Some(d) if name.is_relative() => d.join(name),
        _ => name.to_path_buf(),
    })
}

fn open_file_node(path: &Path, common: &Common) -> Result<NodeRef> {
    let name = path.to_str().ok_or_else(|| {
        BlockError::option("filename", format!("'{}' is not UTF-8", path.display()))
    })?;
    let mut fo = Opts::from_value("file", json!({ "filename": name }))?;
    let node = crate::file::FileNode::open(&mut fo, common, None)?;
    fo.finish()?;
    Ok(Arc::new(node))
}

/// Refuses a backing file the policy does not allow: outside the image's
/// folder tree (`Contained`), or not a regular file (a FIFO would block
/// the opening thread; a device is a host disk) unless `Any` allows a
/// block device.
fn check_backing_file(path: &Path, folder: Option<&Path>, policy: BackingFiles) -> Result<()> {
    let refuse = |msg: String| -> Result<()> { Err(Qcow2Error::Unsupported(msg).into()) };
    let real = std::fs::canonicalize(path).map_err(|e| BlockError::io("resolving", e))?;
    let meta = std::fs::metadata(&real).map_err(|e| BlockError::io("reading its status", e))?;
    let kind = meta.file_type();
    match policy {
        BackingFiles::Any => {
            if path.is_absolute() {
                eprintln!(
                    "warning: following the absolute backing file name '{}'",
                    path.display()
                );
            }
            if !kind.is_file() && !std::os::unix::fs::FileTypeExt::is_block_device(&kind) {
                return refuse("not a regular file or block device".into());
            }
        }
        BackingFiles::Contained => {
            if !kind.is_file() {
                return refuse("not a regular file".into());
            }
            let inside = match folder.map(std::fs::canonicalize) {
                Some(Ok(dir)) => real.starts_with(dir),
                _ => false,
            };
            if !inside {
                return refuse(
                    "outside the image's folder: backing files named by an image are only \
                     followed inside it; name the backing node with the \"backing\" option \
                     to use another"
                        .into(),
                );
            }
        }
    }
    Ok(())
}

/// Opens the backing file named in a header, read-only, relative to the
/// image's folder; the format comes from the header or is probed.
fn open_backing_file(
    name: &str,
    format: Option<&str>,
    parent: &Qcow2Options,
    depth: u32,
) -> Result<NodeRef> {
    if depth >= MAX_BACKING_DEPTH {
        return Err(Qcow2Error::Unsupported(format!(
            "backing chain is deeper than {MAX_BACKING_DEPTH} images (a loop?)"
        ))
        .into());
    }
    if name.starts_with("json:") {
        return Err(Qcow2Error::Unsupported(format!(
            "backing file name '{name}' (json: names are not supported; give 'backing' explicitly)"
        ))
        .into());
    }
    let rel = Path::new(name);
    let folder = match (&parent.host_path, &parent.base_dir) {
        (Some(p), _) => Some(p.parent().unwrap_or(Path::new(".")).to_path_buf()),
        (None, Some(d)) => Some(d.clone()),
        (None, None) => None,
    };
    let path = match &folder {
        Some(dir) if rel.is_relative() => dir.join(rel),
        _ => rel.to_path_buf(),
    };
    check_backing_file(&path, folder.as_deref(), parent.backing_files).map_err(|e| {
        BlockError::Backing {
            path: path.display().to_string(),
            source: Box::new(e),
        }
    })?;
    let common = Common {
        read_only: true,
        auto_read_only: false,
        ..parent.common.clone()
    };
    let backing_error = |e: BlockError| BlockError::Backing {
        path: path.display().to_string(),
        source: Box::new(e),
    };
    let file = open_file_node(&path, &common).map_err(backing_error)?;
    let format = match format {
        Some(f) => f.to_string(),
        None => probe_format(&file)?,
    };
    match format.as_str() {
        "qcow2" => {
            let o = Qcow2Options {
                read_only: true,
                lazy_refcounts: None,
                host_path: Some(path.clone()),
                common,
                encrypt: EncryptOpen {
                    no_io: parent.encrypt.no_io,
                    ..EncryptOpen::default()
                },
                ..parent.clone()
            };
            let node = Qcow2Node::open_depth(file, Backing::Auto, &o, depth + 1)
                .map_err(backing_error)?;
            Ok(Arc::new(node))
        }
        "raw" => {
            let mut ro = Opts::from_value("backing", json!({}))?;
            Ok(Arc::new(crate::raw::RawNode::open(&mut ro, file, true)?))
        }
        other => Err(Qcow2Error::Unsupported(format!(
            "backing file '{}' has format '{other}', which cannot be opened automatically; give 'backing' explicitly",
            path.display()
        ))
        .into()),
    }
}

/// qcow2 if the magic says so, raw otherwise (luks is refused: it needs a key).
fn probe_format(file: &NodeRef) -> Result<String> {
    let mut magic = [0u8; 6];
    let n = file.size().min(6) as usize;
    file.read_at(0, &mut magic[..n])?;
    Ok(if magic[..4] == super::header::MAGIC.to_be_bytes() {
        "qcow2".into()
    } else if magic == *b"LUKS\xba\xbe" {
        "luks".into()
    } else {
        "raw".into()
    })
}

impl BlockNode for Qcow2Node {
    fn driver(&self) -> &'static str {
        "qcow2"
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range("qcow2", self.size(), offset, buf.len() as u64)?;
        self.do_read(offset, buf)
    }

    fn read_vectored(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Result<()> {
        check_range("qcow2", self.size(), offset, total_len(bufs))?;
        self.do_read_vectored(offset, bufs)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.check_writable()?;
        check_range("qcow2", self.size(), offset, buf.len() as u64)?;
        self.do_write_vectored(offset, &[buf], None)
    }

    fn write_vectored(&self, offset: u64, bufs: &[&[u8]]) -> Result<()> {
        self.check_writable()?;
        check_range("qcow2", self.size(), offset, total_len(bufs))?;
        self.do_write_vectored(offset, bufs, None)
    }

    fn write_in_turn(&self, offset: u64, bufs: &[&[u8]], turn: &dyn WriteTurn) -> Result<()> {
        let checked = self
            .check_writable()
            .and_then(|()| check_range("qcow2", self.size(), offset, total_len(bufs)));
        if let Err(e) = checked {
            turn.pass();
            return Err(e);
        }
        self.do_write_vectored(offset, bufs, Some(turn))
    }

    fn compressed_write_unit(&self) -> Option<u64> {
        // Compressed clusters are never encrypted: none on encrypted images.
        self.crypto.is_none().then(|| self.cluster_size())
    }

    fn write_compressed(
        &self,
        offset: u64,
        buf: &[u8],
        turn: Option<&dyn WriteTurn>,
    ) -> Result<()> {
        let checked = self
            .check_writable()
            .and_then(|()| check_range("qcow2", self.size(), offset, buf.len() as u64));
        let checked = checked.and_then(|()| match self.crypto {
            Some(_) => Err(Qcow2Error::Unsupported(
                "compressed writes to encrypted images are not supported".into(),
            )
            .into()),
            None => Ok(()),
        });
        let written = checked.and_then(|()| self.do_write_compressed(offset, buf, turn));
        // Every path passes the turn (a pass after a pass does nothing).
        if let Some(t) = turn {
            t.pass();
        }
        written
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let _io = self
            .io_lock
            .write()
            .map_err(|_| BlockError::Poisoned("qcow2: I/O lock"))?;
        self.lock_meta()?.flush_all()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        check_range("qcow2", self.size(), offset, len)?;
        self.do_discard(offset, len, false)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        check_range("qcow2", self.size(), offset, len)?;
        self.do_discard(offset, len, true)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        check_range("qcow2", self.size(), offset, len)?;
        self.do_block_status(offset, len)
    }

    fn change_backing_file(&self, name: Option<&str>, format: Option<&str>) -> Result<()> {
        self.do_change_backing(name, format)
    }

    fn make_empty(&self) -> Result<()> {
        self.do_make_empty()
    }

    fn resize(&self, size: u64) -> Result<()> {
        self.do_truncate(size, crate::resize::Prealloc::Off)
    }

    fn truncate(&self, size: u64, prealloc: crate::resize::Prealloc) -> Result<()> {
        self.do_truncate(size, prealloc)
    }

    fn snapshot_list(&self) -> Result<Vec<crate::snapshot::SnapshotInfo>> {
        self.do_snapshot_list()
    }

    fn snapshot_create(&self, name: &str, date_sec: u32, date_nsec: u32) -> Result<()> {
        self.do_snapshot_create(name, date_sec, date_nsec)
    }

    fn snapshot_goto(&self, which: &str) -> Result<()> {
        self.do_snapshot_goto(which)
    }

    fn snapshot_delete(&self, id: &str, name: &str) -> Result<()> {
        self.do_snapshot_delete(id, name)
    }

    fn snapshot_load_tmp(&self, which: crate::snapshot::SnapshotRef<'_>) -> Result<()> {
        self.do_snapshot_load_tmp(which)
    }

    fn info(&self) -> Value {
        self.info.clone()
    }

    fn image_info(&self) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert("cluster-size".into(), json!(self.cluster_size()));
        if let Ok(meta) = self.lock_meta() {
            let h = &meta.header;
            if let Some(name) = &h.backing_file {
                let full = if Path::new(name).is_absolute() {
                    name.clone()
                } else {
                    let image = self.storage.child().filename().unwrap_or("");
                    match Path::new(image).parent() {
                        Some(d) if !d.as_os_str().is_empty() => {
                            d.join(name).to_string_lossy().into_owned()
                        }
                        _ => name.clone(),
                    }
                };
                if let Some(fmt) = h.backing_format() {
                    m.insert("backing-filename-format".into(), json!(fmt));
                }
                m.insert("full-backing-filename".into(), json!(full));
                m.insert("backing-filename".into(), json!(name));
            }
            if h.incompatible & INCOMPAT_DIRTY != 0 {
                m.insert("dirty-flag".into(), json!(true));
            }
            // Internal snapshots, listed as qemu-img info lists them.
            if let Ok(list) = super::snapshot::read_snapshots(&self.storage, h) {
                if !list.is_empty() {
                    let list: Vec<Value> = list.iter().map(|sn| sn.to_json()).collect();
                    m.insert("snapshots".into(), Value::Array(list));
                }
            }
        }
        m
    }

    fn children(&self) -> Vec<(&'static str, NodeRef)> {
        let mut c = vec![("file", self.storage.child().clone())];
        if let Some(b) = &self.backing {
            c.push(("backing", b.clone()));
        }
        c
    }

    fn allocated_size(&self) -> Option<u64> {
        self.storage.child().allocated_size()
    }
}

impl Qcow2Node {
    /// Refuses writes to a corrupt or read-only image.
    pub(super) fn check_writable(&self) -> Result<()> {
        if self.corrupt {
            return Err(Qcow2Error::CorruptReadOnly.into());
        }
        if self.read_only {
            return Err(BlockError::ReadOnly("qcow2".into()));
        }
        // The header is prepared for changes (autoclear bits, dirty bit) by
        // the I/O paths once a request has passed its checks.
        Ok(())
    }
}
