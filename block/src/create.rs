//! QEMU's `blockdev-create`: its `BlockdevCreateOptions` (qapi/block-core.json) typed
//! and checked member by member as QEMU's QAPI visitor checks them ([`CreateOptions::parse`]),
//! and the creation itself on open nodes ([`run`]), with the same code as
//! `cryptvm img create` ([`crate::file::create_file`], [`crate::qcow2::create_on`],
//! [`crate::luks::create`] and [`crate::luks::write_volume`]).

use std::path::Path;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::blockdev::Common;
use crate::luks::{CipherAlg, CipherMode, HashAlg, IvGenAlg};
use crate::options::Opts;
use crate::qcow2::header::CompressionType;
use crate::{qcow2, BlockError, NodeRef, SecretStore};

/// A `BlockdevRef`: a node's name, or the options of a node to open for the job.
#[derive(Clone, Debug, PartialEq)]
pub enum BlockdevRef {
    /// An existing node.
    Name(String),
    /// Inline node options (cryptvm opens `file` nodes this way).
    Inline(Map<String, Value>),
}

/// `BlockdevCreateOptionsFile`.
#[derive(Clone, Debug)]
pub struct FileCreate {
    /// `filename`.
    pub filename: String,
    /// `size`.
    pub size: u64,
    /// `preallocation` (cryptvm: `off` only).
    pub preallocation: String,
    /// Options QEMU has and cryptvm refuses when the job runs (`nocow` true,
    /// a non-zero `extent-size-hint`): accepted, they would do nothing.
    pub unsupported: Option<&'static str>,
}

/// `BlockdevCreateOptionsQcow2`.
#[derive(Clone, Debug)]
pub struct Qcow2Create {
    /// `file`.
    pub file: BlockdevRef,
    /// `size`.
    pub size: u64,
    /// The image options.
    pub opts: qcow2::CreateOptions,
    /// Options QEMU has and cryptvm refuses when the job runs (`data-file`, `encrypt`).
    pub unsupported: Option<&'static str>,
}

/// `BlockdevCreateOptionsLUKS`.
#[derive(Clone, Debug)]
pub struct LuksCreate {
    /// `file`: the payload (and the header unless `header` is given).
    pub file: Option<BlockdevRef>,
    /// `header`: a detached header node (QEMU 9.0+).
    pub header: Option<BlockdevRef>,
    /// `size`: the payload size.
    pub size: u64,
    /// `key-secret`.
    pub key_secret: String,
    /// Cipher and PBKDF choices.
    pub opts: crate::luks::CreateOptions,
    /// `preallocation` (cryptvm: `off` only).
    pub preallocation: String,
}

/// `BlockdevCreateOptions`, one per supported `driver`.
#[derive(Clone, Debug)]
pub enum CreateOptions {
    /// `driver: file`.
    File(FileCreate),
    /// `driver: qcow2`.
    Qcow2(Qcow2Create),
    /// `driver: luks`.
    Luks(LuksCreate),
}

/// Why `options` were refused, worded as QEMU's visitor words it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OptionsError {
    /// A required member is absent.
    #[error("Parameter '{0}' is missing")]
    Missing(String),
    /// A member nobody asked for.
    #[error("Parameter '{0}' is unexpected")]
    Unexpected(String),
    /// A member of the wrong JSON type.
    #[error("Invalid parameter type for '{name}', expected: {expected}")]
    WrongType {
        /// Its full name (`options.size`).
        name: String,
        /// The QAPI type.
        expected: &'static str,
    },
    /// A number member that is not an unsigned 64-bit integer.
    #[error("Parameter '{0}' expects uint64")]
    NotUint64(String),
    /// A driver QEMU knows that has no create options (`raw`, ...).
    #[error("Driver does not support blockdev-create")]
    NoCreate,
    /// An enum member with an unknown value (QEMU names the member without its path).
    #[error("Parameter '{name}' does not accept value '{value}'")]
    BadValue {
        /// The member's own name.
        name: &'static str,
        /// The value given.
        value: String,
    },
}

/// Why a creation job failed, worded as QEMU's job error.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// No node of that name.
    #[error("Cannot find device='{0}' nor node-name='{0}'")]
    NodeNotFound(String),
    /// Something QEMU can do and cryptvm cannot.
    #[error("{0}")]
    Unsupported(String),
    /// The block layer failed.
    #[error("{}", qemu_message(.0))]
    Block(#[from] BlockError),
}

/// `e` as QEMU words it: an OS error as `strerror` says it (no "(os error N)"), a qcow2
/// error without the driver prefix.
fn qemu_message(e: &BlockError) -> String {
    fn strip(s: String) -> String {
        match s.rfind(" (os error ") {
            Some(i) if s.ends_with(')') => s[..i].to_string(),
            _ => s,
        }
    }
    match e {
        BlockError::Io { what, source } => format!("{what}: {}", strip(source.to_string())),
        BlockError::Qcow2 { source, .. } => source.to_string(),
        other => strip(other.to_string()),
    }
}

/// Reads `options` member by member, as QEMU's visitor does.
struct Members<'a> {
    map: &'a Map<String, Value>,
    known: Vec<&'static str>,
}

impl<'a> Members<'a> {
    fn full(name: &str) -> String {
        format!("options.{name}")
    }

    fn get(&mut self, name: &'static str) -> Option<&'a Value> {
        self.known.push(name);
        self.map.get(name)
    }

    fn required(&mut self, name: &'static str) -> Result<&'a Value, OptionsError> {
        self.get(name)
            .ok_or_else(|| OptionsError::Missing(Self::full(name)))
    }

    fn string(&mut self, name: &'static str) -> Result<Option<String>, OptionsError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(OptionsError::WrongType {
                name: Self::full(name),
                expected: "string",
            }),
        }
    }

    fn uint(v: &Value, name: &str) -> Result<u64, OptionsError> {
        v.as_u64()
            .ok_or_else(|| OptionsError::NotUint64(Self::full(name)))
    }

    fn opt_uint(&mut self, name: &'static str) -> Result<Option<u64>, OptionsError> {
        self.get(name).map(|v| Self::uint(v, name)).transpose()
    }

    fn int(&mut self, name: &'static str) -> Result<Option<i64>, OptionsError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v.as_i64().map(Some).ok_or_else(|| OptionsError::WrongType {
                name: Self::full(name),
                expected: "integer",
            }),
        }
    }

    fn boolean(&mut self, name: &'static str) -> Result<Option<bool>, OptionsError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(OptionsError::WrongType {
                name: Self::full(name),
                expected: "boolean",
            }),
        }
    }

    /// An enum member: one of `values`.
    fn choice(
        &mut self,
        name: &'static str,
        values: &[&str],
    ) -> Result<Option<String>, OptionsError> {
        match self.string(name)? {
            Some(v) if !values.contains(&v.as_str()) => {
                Err(OptionsError::BadValue { name, value: v })
            }
            v => Ok(v),
        }
    }

    /// An enum member parsed by `parse`.
    fn parsed<T, E>(
        &mut self,
        name: &'static str,
        parse: impl Fn(&str) -> Result<T, E>,
    ) -> Result<Option<T>, OptionsError> {
        match self.string(name)? {
            None => Ok(None),
            Some(v) => parse(&v)
                .map(Some)
                .map_err(|_| OptionsError::BadValue { name, value: v }),
        }
    }

    fn blockdev_ref(&mut self, name: &'static str) -> Result<Option<BlockdevRef>, OptionsError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(BlockdevRef::Name(s.clone()))),
            Some(Value::Object(m)) => Ok(Some(BlockdevRef::Inline(m.clone()))),
            Some(_) => Err(OptionsError::WrongType {
                name: Self::full(name),
                expected: "BlockdevRef",
            }),
        }
    }

    /// The first member (in `order`) nobody asked for.
    fn finish<'k>(self, order: impl IntoIterator<Item = &'k str>) -> Result<(), OptionsError> {
        match order.into_iter().find(|k| !self.known.contains(k)) {
            Some(k) => Err(OptionsError::Unexpected(Self::full(k))),
            None => Ok(()),
        }
    }
}

const PREALLOC: &[&str] = &["off", "metadata", "falloc", "full"];

impl CreateOptions {
    /// Types `options` (blockdev-create's member); `order` is the order in which its
    /// keys are checked for unexpected ones (QEMU's QDict order).
    pub fn parse<'k>(
        options: &Map<String, Value>,
        order: impl IntoIterator<Item = &'k str>,
    ) -> Result<Self, OptionsError> {
        let mut m = Members {
            map: options,
            known: Vec::new(),
        };
        let driver = match m.required("driver")? {
            Value::String(s) => s.clone(),
            _ => {
                return Err(OptionsError::WrongType {
                    name: "options.driver".into(),
                    expected: "string",
                })
            }
        };
        let parsed = match driver.as_str() {
            "file" => Self::File(file_options(&mut m)?),
            "qcow2" => Self::Qcow2(qcow2_options(&mut m)?),
            "luks" => Self::Luks(luks_options(&mut m)?),
            _ if BLOCKDEV_DRIVERS.contains(&driver.as_str()) => {
                // A driver QEMU knows without create options (raw, ...): no member
                // beyond `driver` is expected.
                m.finish(order)?;
                return Err(OptionsError::NoCreate);
            }
            _ => {
                return Err(OptionsError::BadValue {
                    name: "driver",
                    value: driver,
                })
            }
        };
        m.finish(order)?;
        Ok(parsed)
    }
}

/// QEMU's `BlockdevDriver` values cryptvm has no create options for.
const BLOCKDEV_DRIVERS: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkreplay",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "snapshot-access",
    "ftp",
    "ftps",
    "gluster",
    "host_cdrom",
    "host_device",
    "http",
    "https",
    "io_uring",
    "iscsi",
    "nbd",
    "nfs",
    "null-aio",
    "null-co",
    "nvme",
    "nvme-io_uring",
    "parallels",
    "preallocate",
    "qcow",
    "qed",
    "quorum",
    "raw",
    "rbd",
    "replication",
    "ssh",
    "throttle",
    "vdi",
    "vhdx",
    "virtio-blk-vfio-pci",
    "virtio-blk-vhost-user",
    "virtio-blk-vhost-vdpa",
    "vmdk",
    "vpc",
    "vvfat",
];

fn file_options(m: &mut Members<'_>) -> Result<FileCreate, OptionsError> {
    let filename = match m.required("filename")? {
        Value::String(s) => s.clone(),
        _ => {
            return Err(OptionsError::WrongType {
                name: "options.filename".into(),
                expected: "string",
            })
        }
    };
    let size = Members::uint(m.required("size")?, "size")?;
    let preallocation = m.choice("preallocation", PREALLOC)?.unwrap_or("off".into());
    let mut unsupported = None;
    if m.boolean("nocow")?.unwrap_or(false) {
        unsupported = Some("nocow");
    }
    if m.opt_uint("extent-size-hint")?.unwrap_or(0) != 0 {
        unsupported = unsupported.or(Some("extent-size-hint"));
    }
    Ok(FileCreate {
        filename,
        size,
        preallocation,
        unsupported,
    })
}

fn qcow2_options(m: &mut Members<'_>) -> Result<Qcow2Create, OptionsError> {
    let file = m
        .blockdev_ref("file")?
        .ok_or_else(|| OptionsError::Missing("options.file".into()))?;
    let mut unsupported = None;
    if m.blockdev_ref("data-file")?.is_some() {
        unsupported = Some("data-file");
    }
    m.boolean("data-file-raw")?;
    let extended_l2 = m.boolean("extended-l2")?.unwrap_or(false);
    let size = Members::uint(m.required("size")?, "size")?;
    let mut opts = qcow2::CreateOptions::default();
    if let Some(v) = m.choice("version", &["v2", "v3"])? {
        opts.v3 = v == "v3";
    }
    if let Some(cs) = m.opt_uint("cluster-size")? {
        opts.cluster_size = cs;
    }
    if m.get("encrypt").is_some() {
        unsupported = unsupported.or(Some("encrypt"));
    }
    opts.backing_file = m.string("backing-file")?;
    opts.backing_fmt = m.string("backing-fmt")?;
    opts.lazy_refcounts = m.boolean("lazy-refcounts")?.unwrap_or(false);
    if let Some(p) = m.choice("preallocation", PREALLOC)? {
        opts.preallocation = match p.as_str() {
            "off" => qcow2::Preallocation::Off,
            "metadata" => qcow2::Preallocation::Metadata,
            _ => {
                unsupported = unsupported.or(Some("preallocation"));
                qcow2::Preallocation::Off
            }
        };
    }
    if let Some(b) = m.opt_uint("refcount-bits")? {
        opts.refcount_bits = u32::try_from(b).unwrap_or(u32::MAX);
    }
    if let Some(t) = m.choice("compression-type", &["zlib", "zstd"])? {
        opts.compression_type = if t == "zstd" {
            CompressionType::Zstd
        } else {
            CompressionType::Zlib
        };
    }
    if extended_l2 {
        unsupported = unsupported.or(Some("extended-l2"));
    }
    Ok(Qcow2Create {
        file,
        size,
        opts,
        unsupported,
    })
}

fn luks_options(m: &mut Members<'_>) -> Result<LuksCreate, OptionsError> {
    let mut opts = crate::luks::CreateOptions::default();
    let key_secret = m.string("key-secret")?;
    if let Some(a) = m.parsed("cipher-alg", CipherAlg::from_name)? {
        opts.spec.alg = a;
    }
    if let Some(a) = m.parsed("cipher-mode", CipherMode::from_name)? {
        opts.spec.mode = a;
    }
    if let Some(a) = m.parsed("ivgen-alg", IvGenAlg::from_name)? {
        opts.spec.ivgen = a;
    }
    opts.spec.ivgen_hash = m.parsed("ivgen-hash-alg", HashAlg::from_name)?;
    if opts.spec.ivgen == IvGenAlg::Essiv && opts.spec.ivgen_hash.is_none() {
        opts.spec.ivgen_hash = Some(HashAlg::Sha256);
    }
    if let Some(h) = m.parsed("hash-alg", HashAlg::from_name)? {
        opts.spec.hash = h;
    }
    if let Some(ms) = m.int("iter-time")? {
        opts.iter_time_ms = u64::try_from(ms).unwrap_or(0).max(1);
    }
    let file = m.blockdev_ref("file")?;
    let header = m.blockdev_ref("header")?;
    let size = Members::uint(m.required("size")?, "size")?;
    let preallocation = m.choice("preallocation", PREALLOC)?.unwrap_or("off".into());
    opts.detached_header = header.is_some();
    Ok(LuksCreate {
        file,
        header,
        size,
        preallocation,
        // QEMU checks it when the job runs.
        key_secret: key_secret.unwrap_or_default(),
        opts,
    })
}

/// Opens the node `r` names (`lookup` finds named nodes), or the inline node it
/// describes (a `file` node, opened for the job only).
fn resolve(
    r: &BlockdevRef,
    lookup: &dyn Fn(&str) -> Option<NodeRef>,
) -> Result<NodeRef, CreateError> {
    match r {
        BlockdevRef::Name(name) => lookup(name).ok_or_else(|| CreateError::NodeNotFound(name.clone())),
        BlockdevRef::Inline(map) if map.get("driver").and_then(Value::as_str) == Some("file") => {
            let mut map = map.clone();
            map.remove("driver");
            map.remove("node-name");
            let mut o = Opts::new("file", map);
            let node = crate::file::FileNode::open(&mut o, &Common::default(), None)?;
            o.finish()?;
            Ok(Arc::new(node))
        }
        BlockdevRef::Inline(_) => Err(CreateError::Unsupported(
            "cryptvm opens only 'file' nodes inline in blockdev-create; blockdev-add the node first".into(),
        )),
    }
}

/// Runs the creation `options` describe, as QEMU's `blockdev-create` job does; nodes
/// are found by `lookup`, `key-secret` in `secrets`.
pub fn run(
    options: &CreateOptions,
    lookup: &dyn Fn(&str) -> Option<NodeRef>,
    secrets: &SecretStore,
) -> Result<(), CreateError> {
    match options {
        CreateOptions::File(f) => {
            check_preallocation(&f.preallocation)?;
            if let Some(what) = f.unsupported {
                return Err(CreateError::Unsupported(format!(
                    "file '{what}' is not supported by cryptvm's blockdev-create"
                )));
            }
            crate::file::create_file(Path::new(&f.filename), f.size)?;
            Ok(())
        }
        CreateOptions::Qcow2(q) => {
            if let Some(what) = q.unsupported {
                return Err(CreateError::Unsupported(format!(
                    "qcow2 '{what}' is not supported by cryptvm's blockdev-create"
                )));
            }
            let node = resolve(&q.file, lookup)?;
            qcow2::create_on(node, q.size, &q.opts)?;
            Ok(())
        }
        CreateOptions::Luks(l) => {
            check_preallocation(&l.preallocation)?;
            if l.key_secret.is_empty() {
                return Err(CreateError::Unsupported(
                    "Parameter 'key-secret' is required for cipher".into(),
                ));
            }
            let header_ref = l.header.as_ref().or(l.file.as_ref()).ok_or_else(|| {
                CreateError::Unsupported(
                    "Either the parameter 'header' or 'file' must be specified".into(),
                )
            })?;
            let header = resolve(header_ref, lookup)?;
            let data = match (&l.header, &l.file) {
                (Some(_), Some(f)) => Some(resolve(f, lookup)?),
                _ => None,
            };
            let passphrase = secrets
                .passphrase(&l.key_secret)
                .map_err(BlockError::from)?;
            let volume = crate::luks::create(&l.opts, &passphrase).map_err(BlockError::from)?;
            match data {
                None if l.header.is_some() => crate::luks::write_volume(&*header, &volume, 0)?,
                None => crate::luks::write_volume(&*header, &volume, l.size)?,
                Some(data) => {
                    crate::luks::write_volume(&*header, &volume, 0)?;
                    data.resize(0)?;
                    data.resize(l.size)?;
                }
            }
            Ok(())
        }
    }
}

/// Only `preallocation: off` is implemented here; anything else is refused with
/// QEMU's words for a mode its driver does not support.
fn check_preallocation(mode: &str) -> Result<(), CreateError> {
    if mode == "off" {
        return Ok(());
    }
    Err(CreateError::Unsupported(format!(
        "Unsupported preallocation mode '{mode}'"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<CreateOptions, OptionsError> {
        let m = v.as_object().unwrap().clone();
        let order: Vec<String> = m.keys().cloned().collect();
        CreateOptions::parse(&m, order.iter().map(String::as_str))
    }

    #[test]
    fn qemu_texts_for_bad_options() {
        let cases = [
            (
                json!({"driver": "foo"}),
                "Parameter 'driver' does not accept value 'foo'",
            ),
            (
                json!({"driver": "file"}),
                "Parameter 'options.filename' is missing",
            ),
            (
                json!({"driver": "file", "filename": "x"}),
                "Parameter 'options.size' is missing",
            ),
            (
                json!({"driver": "file", "filename": "x", "size": "1"}),
                "Parameter 'options.size' expects uint64",
            ),
            (
                json!({"driver": "file", "filename": "x", "size": 1, "bogus": 1}),
                "Parameter 'options.bogus' is unexpected",
            ),
            (
                json!({"driver": "raw", "file": "x"}),
                "Parameter 'options.file' is unexpected",
            ),
            (
                json!({"driver": "qcow2", "file": "x"}),
                "Parameter 'options.size' is missing",
            ),
            (
                json!({"driver": "qcow2", "size": 1}),
                "Parameter 'options.file' is missing",
            ),
            (
                json!({"driver": "qcow2", "size": 1, "file": "x", "version": "v9"}),
                "Parameter 'version' does not accept value 'v9'",
            ),
            (
                json!({"driver": "qcow2", "size": 1, "file": "x", "cluster-size": "a"}),
                "Parameter 'options.cluster-size' expects uint64",
            ),
        ];
        for (v, want) in cases {
            assert_eq!(parse(v.clone()).unwrap_err().to_string(), want, "{v}");
        }
    }

    /// Options QEMU implements and cryptvm does not are refused when the job runs,
    /// never accepted and ignored; nothing is created.
    #[test]
    fn unimplemented_options_are_refused_not_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let name = path.to_str().unwrap();
        let secrets = SecretStore::default();
        let cases = [
            (
                json!({"driver": "file", "filename": name, "size": 0, "nocow": true}),
                "file 'nocow' is not supported by cryptvm's blockdev-create",
            ),
            (
                json!({"driver": "file", "filename": name, "size": 0, "extent-size-hint": 1048576}),
                "file 'extent-size-hint' is not supported by cryptvm's blockdev-create",
            ),
            (
                json!({"driver": "file", "filename": name, "size": 0, "preallocation": "full"}),
                "Unsupported preallocation mode 'full'",
            ),
            (
                json!({"driver": "luks", "file": "x", "size": 0, "key-secret": "s", "preallocation": "falloc"}),
                "Unsupported preallocation mode 'falloc'",
            ),
        ];
        for (v, want) in cases {
            let o = parse(v.clone()).unwrap();
            assert_eq!(
                run(&o, &|_| None, &secrets).unwrap_err().to_string(),
                want,
                "{v}"
            );
            assert!(!path.exists(), "{v} created the file");
        }
        // The values that mean "nothing to do" stay accepted.
        let plain = parse(json!({"driver": "file", "filename": name, "size": 0, "nocow": false, "extent-size-hint": 0})).unwrap();
        run(&plain, &|_| None, &secrets).unwrap();
        assert!(path.exists());
    }

    #[test]
    fn qcow2_on_a_file_node_and_node_errors() {
        let dir = std::env::temp_dir().join(format!("bdc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.qcow2");
        let secrets = SecretStore::default();
        let f = parse(json!({"driver": "file", "filename": path.to_str().unwrap(), "size": 0}))
            .unwrap();
        run(&f, &|_| None, &secrets).unwrap();
        let q = parse(json!({"driver": "qcow2", "file": {"driver": "file", "filename": path.to_str().unwrap()}, "size": 1048576})).unwrap();
        run(&q, &|_| None, &secrets).unwrap();
        let node = qcow2::Qcow2Node::open_path(&path, true).unwrap();
        assert_eq!(crate::BlockNode::size(&node), 1048576);
        let bad = parse(json!({"driver": "qcow2", "file": "nope", "size": 1048576})).unwrap();
        assert_eq!(
            run(&bad, &|_| None, &secrets).unwrap_err().to_string(),
            "Cannot find device='nope' nor node-name='nope'"
        );
        let odd = parse(json!({"driver": "qcow2", "file": {"driver": "file", "filename": path.to_str().unwrap()}, "size": 1000})).unwrap();
        assert_eq!(
            run(&odd, &|_| None, &secrets).unwrap_err().to_string(),
            "Image size must be a multiple of 512 bytes"
        );
        let missing =
            parse(json!({"driver": "file", "filename": "/nonexistent-dir/x", "size": 1})).unwrap();
        assert_eq!(
            run(&missing, &|_| None, &secrets).unwrap_err().to_string(),
            "Could not create '/nonexistent-dir/x': No such file or directory"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
