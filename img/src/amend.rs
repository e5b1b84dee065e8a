//! `cryptvm img amend`: changes the options of an existing qcow2 image that
//! need no data rewritten (`img_amend` of qemu-img.c and
//! `qcow2_amend_options` of block/qcow2.c): `lazy_refcounts`, `compat`
//! (0.10 -> 1.1, and 1.1 -> 0.10 when no cluster needs expanding) and `size`;
//! other changes are refused with qemu-img's messages.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use block::qcow2::header::{
    qemu_feature_table, Extension, Header, COMPAT_LAZY_REFCOUNTS, EXT_BITMAPS, EXT_FEATURE_TABLE,
    INCOMPAT_COMPRESSION, INCOMPAT_DIRTY,
};
use block::NodeRef;

use super::image::{image_options, load_objects, open, OpenMode};
use super::measure::{Line, Lines};
use super::qopts::{Kind, QOpts};
use super::{Args, ImgError, Result};

/// qcow2's amend options with their help texts, sorted as qemu-img prints them.
const AMEND_OPTS: &[(&str, Kind, &str)] = &[
    ("backing_file", Kind::Str, "File name of a base image"),
    ("backing_fmt", Kind::Str, "Image format of the base image"),
    (
        "compat",
        Kind::Str,
        "Compatibility level (v2 [0.10] or v3 [1.1])",
    ),
    ("data_file", Kind::Str, "File name of an external data file"),
    (
        "data_file_raw",
        Kind::Bool,
        "The external data file must stay valid as a raw image",
    ),
    (
        "encrypt.iter-time",
        Kind::Number,
        "Time to spend in PBKDF in milliseconds",
    ),
    (
        "encrypt.keyslot",
        Kind::Number,
        "Select a single keyslot to modify explicitly",
    ),
    (
        "encrypt.new-secret",
        Kind::Str,
        "New secret to set in the matching keyslots. Empty string to erase",
    ),
    (
        "encrypt.old-secret",
        Kind::Str,
        "Select all keyslots that match this password",
    ),
    (
        "encrypt.state",
        Kind::Str,
        "Select new state of affected keyslots (active/inactive)",
    ),
    ("lazy_refcounts", Kind::Bool, "Postpone refcount updates"),
    (
        "refcount_bits",
        Kind::Number,
        "Width of a reference count entry in bits",
    ),
    ("size", Kind::Size, "Virtual disk size"),
];

/// qcow2's creation-only options (for the "only supported for image creation" hint).
const CREATE_ONLY: &[(&str, Kind)] = &[
    ("encryption", Kind::Bool),
    ("encrypt.format", Kind::Str),
    ("encrypt.key-secret", Kind::Str),
    ("encrypt.cipher-alg", Kind::Str),
    ("encrypt.cipher-mode", Kind::Str),
    ("encrypt.ivgen-alg", Kind::Str),
    ("encrypt.ivgen-hash-alg", Kind::Str),
    ("encrypt.hash-alg", Kind::Str),
    ("cluster_size", Kind::Size),
    ("extended_l2", Kind::Bool),
    ("preallocation", Kind::Str),
    ("compression_type", Kind::Str),
];

/// Runs `img amend`.
pub fn run(argv: &[String]) -> Result<u8> {
    Ok(match amend(argv) {
        Ok(code) => code,
        Err(lines) => lines.print(),
    })
}

fn has_help(options: &str) -> bool {
    options.split(',').any(|item| item == "help" || item == "?")
}

/// `print_amend_option_help`.
fn print_help(fmt: &str) -> Result<u8, Lines> {
    match fmt {
        "qcow2" => {
            println!("Amend options for 'qcow2':");
            for (name, kind, help) in AMEND_OPTS {
                let t = match kind {
                    Kind::Str => "str",
                    Kind::Bool => "bool (on/off)",
                    Kind::Number => "num",
                    Kind::Size => "size",
                };
                println!("  {:<22} - {help}", format!("{name}=<{t}>"));
            }
            Ok(0)
        }
        "luks" => Err(luks_refusal()),
        "raw" | "file" => {
            Err(format!("Format driver '{fmt}' does not support option amendment").into())
        }
        other => Err(format!("Unknown file format '{other}'").into()),
    }
}

/// Whether `name` is a file starting with the LUKS magic.
fn is_luks_file(name: &str) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 6];
    std::fs::File::open(name)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"LUKS\xba\xbe"
}

fn luks_refusal() -> Lines {
    "amending luks key slots is not supported by cryptvm img (use cryptsetup on the image)".into()
}

fn amend(argv: &[String]) -> Result<u8, Lines> {
    let a = Args::parse(argv, "pq", "oft")?;
    // --force only matters to luks key slot changes, which are refused.
    if a.options.is_empty() {
        return Err(Lines::from("Must specify options (-o)")
            .with(Line::Hint("Try 'cryptvm img --help' for more info".into())));
    }
    let options = a.joined_options();
    let progress = a.progress && !a.quiet;
    let secrets = load_objects(&a.objects)?;
    if let (Some(fmt), true) = (&a.format, has_help(&options)) {
        return print_help(fmt);
    }
    let [filename] = a.positional.as_slice() else {
        return Err("Expecting one image file name".into());
    };
    if a.format.as_deref() == Some("luks") || is_luks_file(filename) {
        return Err(luks_refusal());
    }
    let probed = a.format.is_none() && !a.image_opts && !filename.starts_with("json:");
    let image = open(
        image_options(filename, a.image_opts, a.format.as_deref())?,
        &secrets,
        OpenMode {
            read_only: false,
            no_io: false,
            cache: a.cache,
        },
    )
    .map_err(|e| super::measure::opening(e, filename))?;
    let node = image.node;
    let fmt = node.driver();
    if probed && fmt == "raw" {
        eprintln!("{}", super::resize::probed_raw_warning(filename));
    }
    if has_help(&options) {
        return print_help(fmt);
    }
    match fmt {
        "qcow2" => {}
        "luks" => return Err(luks_refusal()),
        other => {
            return Err(format!("Format driver '{other}' does not support option amendment").into())
        }
    }
    let list: Vec<(&str, Kind)> = AMEND_OPTS.iter().map(|(n, k, _)| (*n, *k)).collect();
    let o = match QOpts::parse(&options, &list) {
        Ok(o) => o,
        Err(e) => {
            let mut all = list.clone();
            all.extend_from_slice(CREATE_ONLY);
            let mut lines = Lines::option(&e);
            if QOpts::parse(&options, &all).is_ok() {
                lines = lines.with(Line::Hint(
                    "This option is only supported for image creation".into(),
                ));
            }
            return Err(lines);
        }
    };
    if progress {
        print_progress(0.0, false);
    }
    let plan = qcow2_amend(&node, &o)?;
    // The node may keep its own copy of the header: write ours once it is closed.
    drop(node);
    if let Some((path, bytes)) = plan {
        let fail = |e: std::io::Error| {
            Lines::from(format!(
                "Failed to update the image header: {}",
                super::image::strerror(&e)
            ))
        };
        let f = OpenOptions::new().write(true).open(&path).map_err(fail)?;
        f.write_all_at(&bytes, 0)
            .and_then(|()| f.sync_all())
            .map_err(fail)?;
    }
    if progress {
        print_progress(100.0, true);
    }
    Ok(0)
}

/// qemu-img's progress line.
fn print_progress(percent: f64, last: bool) {
    print!("    ({percent:.2}/100%)\r");
    if last {
        println!();
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
}

/// The image file node under a qcow2 node.
fn file_of(node: &NodeRef) -> Result<NodeRef, Lines> {
    node.children()
        .into_iter()
        .find(|(role, _)| *role == "file")
        .map(|(_, n)| n)
        .ok_or_else(|| "the qcow2 node has no file".into())
}

fn read_header(file: &NodeRef) -> Result<Header, Lines> {
    let mut head = vec![0u8; 512];
    file.read_at(0, &mut head).map_err(ImgError::from)?;
    let bits = Header::peek_cluster_bits(&head).map_err(|e| Lines::from(e.to_string()))?;
    let len = (1u64 << bits).min(file.size());
    let mut cluster = vec![0u8; len as usize];
    file.read_at(0, &mut cluster).map_err(ImgError::from)?;
    Header::parse(&cluster).map_err(|e| Lines::from(e.to_string()))
}

/// A header to write: the image file's name and the first cluster.
type HeaderWrite = (String, Vec<u8>);

/// `qcow2_amend_options` for the changes that need no data rewritten; the
/// size is changed through the node, a new header is returned to be written.
fn qcow2_amend(node: &NodeRef, o: &QOpts) -> Result<Option<HeaderWrite>, Lines> {
    let file = file_of(node)?;
    let h = read_header(&file)?;
    let old_version = h.version;
    let mut new_version = old_version;
    let mut lazy = h.compatible & COMPAT_LAZY_REFCOUNTS != 0;
    let old_lazy = lazy;
    let mut refcount_bits = h.refcount_bits() as u64;
    let mut new_size = 0;
    for key in o.keys() {
        match key {
            "compat" => {
                new_version = match o.get(key) {
                    Some("0.10") | Some("v2") => 2,
                    Some("1.1") | Some("v3") => 3,
                    Some(other) => {
                        return Err(format!("Unknown compatibility level {other}").into())
                    }
                    None => new_version,
                }
            }
            "size" => new_size = o.size(key).unwrap_or(0),
            k if k.starts_with("encrypt.") => {
                return Err("Can't amend encryption options - encryption not present".into())
            }
            "lazy_refcounts" => lazy = o.bool(key).unwrap_or(lazy),
            "refcount_bits" => {
                refcount_bits = o.number(key).unwrap_or(refcount_bits);
                if refcount_bits == 0 || refcount_bits > 64 || !refcount_bits.is_power_of_two() {
                    return Err(
                        "Refcount width must be a power of two and may not exceed 64 bits".into(),
                    );
                }
            }
            "data_file" => {
                return Err(
                    "data-file can only be set for images that use an external data file".into(),
                )
            }
            "data_file_raw" if o.bool(key) == Some(true) => {
                return Err("data-file-raw cannot be set on existing images".into());
            }
            _ => {}
        }
    }
    if refcount_bits != h.refcount_bits() as u64 {
        if new_version < 3 && refcount_bits != 16 {
            return Err("Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)".into());
        }
        return Err("Changing the refcount width is not supported by cryptvm img".into());
    }
    if o.has("backing_file") || o.has("backing_fmt") {
        let same = o.get("backing_file") == h.backing_file.as_deref()
            && o.get("backing_fmt") == h.backing_format().as_deref();
        if !same {
            return Err(Lines::from("Cannot amend the backing file")
                .with(Line::Hint("You can use 'qemu-img rebase' instead.".into())));
        }
    }
    if lazy && !old_lazy && new_version < 3 {
        return Err("Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)".into());
    }
    if new_version != old_version && h.nb_snapshots > 0 {
        return Err(
            "Changing the compat level of an image with internal snapshots is not supported by cryptvm img"
                .into(),
        );
    }
    if h.incompatible & INCOMPAT_DIRTY != 0 && (new_version < old_version || lazy != old_lazy) {
        return Err(
            "The image is dirty: run 'qemu-img check -r all' on it before amending it".into(),
        );
    }
    if new_version < old_version {
        check_downgrade(node, &h)?;
    }
    if new_size != 0 && new_size != node.size() {
        node.truncate(new_size, block::Prealloc::Off)
            .map_err(ImgError::from)?;
    }
    node.flush().map_err(ImgError::from)?;
    if new_version == old_version && lazy == old_lazy {
        return Ok(None);
    }
    let path = file
        .filename()
        .map(str::to_string)
        .ok_or_else(|| Lines::from("the image file has no file name"))?;
    let mut h = h;
    if new_version > old_version {
        h.version = 3;
        h.incompatible = 0;
        h.compatible = 0;
        h.autoclear = 0;
        h.refcount_order = 4;
        h.header_length = block::qcow2::header::V3_HEADER_LEN_QEMU;
        h.tail = vec![0; (h.header_length - block::qcow2::header::V3_HEADER_LEN) as usize];
        if !h.extensions.iter().any(|e| e.kind == EXT_FEATURE_TABLE) {
            let at = h
                .extensions
                .iter()
                .position(|e| e.kind == EXT_BITMAPS)
                .unwrap_or(h.extensions.len());
            h.extensions.insert(
                at,
                Extension {
                    kind: EXT_FEATURE_TABLE,
                    data: qemu_feature_table(),
                },
            );
        }
    }
    if lazy {
        h.compatible |= COMPAT_LAZY_REFCOUNTS;
    } else {
        h.compatible &= !COMPAT_LAZY_REFCOUNTS;
    }
    if new_version < old_version {
        h.version = 2;
        h.compatible = 0;
        h.autoclear = 0;
        h.incompatible = 0;
        h.extensions.retain(|e| e.kind != EXT_FEATURE_TABLE);
    }
    let mut bytes = h.serialize().map_err(|e| Lines::from(e.to_string()))?;
    bytes.resize(h.cluster_size() as usize, 0);
    Ok(Some((path, bytes)))
}

/// The checks of `qcow2_downgrade`; zero clusters (which QEMU expands into
/// data clusters) make cryptvm refuse.
fn check_downgrade(node: &NodeRef, h: &Header) -> Result<(), Lines> {
    if h.refcount_order != 4 {
        return Err("compat=0.10 requires refcount_bits=16".into());
    }
    let compressed_type = h.incompatible & INCOMPAT_COMPRESSION != 0;
    let others = h.incompatible & !INCOMPAT_COMPRESSION & !INCOMPAT_DIRTY;
    if others != 0 {
        return Err(format!(
            "Cannot downgrade an image with incompatible features {others:#x} set"
        )
        .into());
    }
    if h.extension(EXT_BITMAPS).is_some() {
        return Err(
            "Downgrading an image with persistent bitmaps is not supported by cryptvm img".into(),
        );
    }
    let size = node.size();
    let mut offset = 0;
    while offset < size {
        let st = node
            .block_status(offset, size - offset)
            .map_err(|_| Lines::from("Failed to check block status"))?;
        if st.zero && st.allocated && !st.data {
            return Err("Cannot downgrade an image with zero clusters: expanding them is not supported by cryptvm img".into());
        }
        if st.compressed && compressed_type {
            return Err("Cannot downgrade an image with zstd compression type and existing compressed clusters".into());
        }
        offset += st.len.max(1);
    }
    Ok(())
}
