//! `cryptvm img measure`: the file size a new raw, qcow2 or luks image needs
//! (`img_measure` of qemu-img.c, with the drivers' `bdrv_measure` arithmetic:
//! `raw_measure`, `qcow2_measure`, `block_crypto_measure`).

use block::luks::{CipherAlg, CipherMode, CreateOptions as LuksOptions, HashAlg, IvGenAlg};
use block::qcow2::measure::{measure as qcow2_measure, MeasureOptions};
use block::{NodeRef, SecretStore};

use super::image::{image_options, load_objects, open, OpenMode};
use super::qopts::{Kind, OptError, QOpts};
use super::{Args, ImgError, Result};

/// Options of the file protocol that every format's list includes.
const FILE_OPTS: &[(&str, Kind)] = &[
    ("size", Kind::Size),
    ("preallocation", Kind::Str),
    ("nocow", Kind::Bool),
    ("extent_size_hint", Kind::Size),
];

/// The luks creation options (with a prefix for qcow2's `encrypt.`).
const LUKS_OPTS: &[(&str, Kind)] = &[
    ("key-secret", Kind::Str),
    ("cipher-alg", Kind::Str),
    ("cipher-mode", Kind::Str),
    ("ivgen-alg", Kind::Str),
    ("ivgen-hash-alg", Kind::Str),
    ("hash-alg", Kind::Str),
    ("iter-time", Kind::Number),
    ("detached-header", Kind::Bool),
];

/// qcow2's creation options (without `encrypt.*`).
const QCOW2_OPTS: &[(&str, Kind)] = &[
    ("compat", Kind::Str),
    ("backing_file", Kind::Str),
    ("backing_fmt", Kind::Str),
    ("data_file", Kind::Str),
    ("data_file_raw", Kind::Bool),
    ("encryption", Kind::Bool),
    ("encrypt.format", Kind::Str),
    ("cluster_size", Kind::Size),
    ("extended_l2", Kind::Bool),
    ("lazy_refcounts", Kind::Bool),
    ("refcount_bits", Kind::Number),
    ("compression_type", Kind::Str),
];

/// One line of qemu-img's stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Line {
    /// An `error_report` line: printed after the program name.
    Error(String),
    /// A hint or a continuation line: printed as it is.
    Hint(String),
}

/// A failure already worded as qemu-img's stderr lines.
#[derive(Debug, Default)]
pub(crate) struct Lines(pub Vec<Line>);

impl From<ImgError> for Lines {
    fn from(e: ImgError) -> Self {
        Lines(vec![Line::Error(e.to_string().replace('\n', " "))])
    }
}

impl From<super::ArgError> for Lines {
    fn from(e: super::ArgError) -> Self {
        Lines(vec![
            Line::Error(e.0),
            Line::Hint("Try 'cryptvm img --help' for more info".into()),
        ])
    }
}

impl From<String> for Lines {
    fn from(s: String) -> Self {
        Lines(vec![Line::Error(s)])
    }
}

impl From<&str> for Lines {
    fn from(s: &str) -> Self {
        Lines(vec![Line::Error(s.to_string())])
    }
}

impl Lines {
    /// An option parse error: its first line an error, the rest continuation lines.
    pub(crate) fn option(e: &OptError) -> Self {
        let text = e.to_string();
        let mut lines = text.lines();
        let mut v = vec![Line::Error(lines.next().unwrap_or_default().to_string())];
        v.extend(lines.map(|l| Line::Hint(l.to_string())));
        Lines(v)
    }

    /// Adds a line.
    pub(crate) fn with(mut self, line: Line) -> Self {
        self.0.push(line);
        self
    }

    /// Prints the lines to stderr; returns qemu-img's failure status, 1.
    pub(crate) fn print(&self) -> u8 {
        for l in &self.0 {
            match l {
                Line::Error(t) => eprintln!("cryptvm img: {t}"),
                Line::Hint(t) => eprintln!("{t}"),
            }
        }
        1
    }
}

/// A failed open of the image `name` in qemu-img's words (a qcow2 error of
/// the top node without the driver's name).
pub(crate) fn opening(e: ImgError, name: &str) -> Lines {
    match e {
        ImgError::Block(block::BlockError::Qcow2 { node: None, source }) => {
            format!("Could not open '{name}': {source}").into()
        }
        other => other.opening(name).into(),
    }
}

/// Runs `img measure`.
pub fn run(argv: &[String]) -> Result<u8> {
    Ok(match measure(argv) {
        Ok(()) => 0,
        Err(lines) => lines.print(),
    })
}

fn measure(argv: &[String]) -> Result<(), Lines> {
    let a = Args::parse(argv, "U", "fOol")?;
    let secrets = load_objects(&a.objects)?;
    let snapshot = a.short.iter().any(|(c, _)| *c == 'l');
    let mut size = None;
    for (k, v) in &a.extra {
        if k == "size" {
            size = Some(super::dd::cvtnum("image size", v, 0, i64::MAX as u64)?);
        }
    }
    let filename = match a.positional.as_slice() {
        [] => None,
        [f] => Some(f.clone()),
        _ => return Err(String::from("At most one filename argument is allowed.").into()),
    };
    if filename.is_none() && (a.image_opts || a.format.is_some() || snapshot) {
        return Err(String::from("--image-opts, -f, and -l require a filename argument.").into());
    }
    if filename.is_some() && size.is_some() {
        return Err(String::from("--size N cannot be used together with a filename.").into());
    }
    if filename.is_none() && size.is_none() {
        return Err(String::from("Either --size N or one filename must be specified.").into());
    }
    let source = match &filename {
        Some(name) => {
            let opts = image_options(name, a.image_opts, a.format.as_deref())?;
            let image = open(
                opts,
                &secrets,
                OpenMode {
                    read_only: true,
                    no_io: false,
                    cache: None,
                },
            )
            .map_err(|e| opening(e, name))?;
            if snapshot {
                return Err(String::from(
                    "Failed to load snapshot: -l (measuring an internal snapshot) is not supported",
                )
                .into());
            }
            Some(image.node)
        }
        None => None,
    };
    let out_fmt = a.output_format.clone().unwrap_or_else(|| "raw".into());
    let options = a.joined_options();
    let list: Vec<(String, Kind)> = match out_fmt.as_str() {
        "raw" => owned(FILE_OPTS),
        "luks" => owned(LUKS_OPTS)
            .into_iter()
            .chain(owned(FILE_OPTS))
            .collect(),
        "qcow2" => owned(QCOW2_OPTS)
            .into_iter()
            .chain(LUKS_OPTS.iter().map(|(k, t)| (format!("encrypt.{k}"), *t)))
            .chain(owned(FILE_OPTS))
            .collect(),
        other => return Err(format!("Unknown file format '{other}'").into()),
    };
    let list_ref: Vec<(&str, Kind)> = list.iter().map(|(k, t)| (k.as_str(), *t)).collect();
    let o = QOpts::parse(&options, &list_ref).map_err(|e| {
        Lines::option(&e).with(Line::Error(format!(
            "Invalid options for file format '{out_fmt}'"
        )))
    })?;
    let size = size.or_else(|| o.size("size")).unwrap_or(0);
    let (required, fully, bitmaps) = match out_fmt.as_str() {
        "raw" => {
            let r = match &source {
                Some(s) => s.size(),
                None => size.next_multiple_of(512),
            };
            (r, r, None)
        }
        "luks" => {
            let header = luks_header_len(&o, "", &secrets)?;
            let size = source.as_ref().map_or(size, |s| s.size());
            (header + size, header + size, None)
        }
        _ => qcow2(&o, size, source.as_ref(), &secrets)?,
    };
    if a.json {
        println!("{{");
        if let Some(b) = bitmaps {
            println!("    \"bitmaps\": {b},");
        }
        println!("    \"required\": {required},");
        println!("    \"fully-allocated\": {fully}");
        println!("}}");
    } else {
        println!("required size: {required}");
        println!("fully allocated size: {fully}");
        if let Some(b) = bitmaps {
            println!("bitmaps size: {b}");
        }
    }
    Ok(())
}

fn owned(list: &[(&str, Kind)]) -> Vec<(String, Kind)> {
    list.iter().map(|(k, t)| (k.to_string(), *t)).collect()
}

/// `qcow2_measure`: the options, then the arithmetic.
fn qcow2(
    o: &QOpts,
    size: u64,
    source: Option<&NodeRef>,
    secrets: &SecretStore,
) -> Result<(u64, u64, Option<u64>), Lines> {
    let extended_l2 = o.bool("extended_l2").unwrap_or(false);
    let cluster_size = o.size("cluster_size").unwrap_or(65536);
    if !cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&cluster_size) {
        return Err(
            String::from("Cluster size must be a power of two between 512 and 2048k").into(),
        );
    }
    if extended_l2 && cluster_size < 16384 {
        return Err(String::from(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
        )
        .into());
    }
    let v3 = match o.get("compat") {
        None | Some("1.1") | Some("v3") => true,
        Some("0.10") | Some("v2") => false,
        Some(other) => return Err(format!("Invalid compatibility level: '{other}'").into()),
    };
    let refcount_bits = o.number("refcount_bits").unwrap_or(16);
    if !refcount_bits.is_power_of_two() || refcount_bits > 64 {
        return Err(String::from(
            "Refcount width must be a power of two and may not exceed 64 bits",
        )
        .into());
    }
    if !v3 && refcount_bits != 16 {
        return Err(String::from("Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)").into());
    }
    let full_prealloc = match o.get("preallocation") {
        None | Some("off") | Some("metadata") => false,
        Some("falloc") | Some("full") => true,
        Some(other) => return Err(format!("invalid parameter value: {other}").into()),
    };
    let luks_header_len = match o.get("encrypt.format") {
        Some("luks") => Some(luks_header_len(o, "encrypt.", secrets)?),
        _ => None,
    };
    let m = MeasureOptions {
        cluster_size,
        refcount_order: refcount_bits.trailing_zeros(),
        extended_l2,
        full_prealloc,
        has_backing_file: o.has("backing_file"),
        luks_header_len,
        size,
    };
    let info = qcow2_measure(&m, source.map(|s| &**s as &dyn block::BlockNode))
        .map_err(|e| Lines::from(e.to_string()))?;
    let bitmaps = match source {
        Some(s) if v3 && s.driver() == "qcow2" => Some(bitmaps_size(s)?),
        _ => None,
    };
    Ok((info.required, info.fully_allocated, bitmaps))
}

/// `qcow2_get_persistent_dirty_bitmap_size`: 0 without bitmaps; measuring
/// persistent bitmaps is not implemented.
fn bitmaps_size(node: &NodeRef) -> Result<u64, Lines> {
    let file = node
        .children()
        .into_iter()
        .find(|(role, _)| *role == "file")
        .map(|(_, n)| n);
    let Some(file) = file else { return Ok(0) };
    let mut head = vec![0u8; 512];
    file.read_at(0, &mut head).map_err(ImgError::from)?;
    let bits =
        block::qcow2::Header::peek_cluster_bits(&head).map_err(|e| Lines::from(e.to_string()))?;
    let mut cluster = vec![0u8; (1usize << bits).min(file.size() as usize)];
    file.read_at(0, &mut cluster).map_err(ImgError::from)?;
    let h = block::qcow2::Header::parse(&cluster).map_err(|e| Lines::from(e.to_string()))?;
    if h.extension(block::qcow2::header::EXT_BITMAPS).is_some() {
        return Err(String::from(
            "measuring an image with persistent dirty bitmaps is not supported",
        )
        .into());
    }
    Ok(0)
}

/// The LUKS header bytes of the creation options under `prefix`
/// (`qcrypto_block_calculate_payload_offset`), with QEMU's checks.
fn luks_header_len(o: &QOpts, prefix: &str, secrets: &SecretStore) -> Result<u64, Lines> {
    let key = |k: &str| format!("{prefix}{k}");
    if o.has(&key("detached-header")) {
        return Err(format!("Parameter '{}' is unexpected", key("detached-header")).into());
    }
    let bad = |k: &str, v: &str| {
        Lines::from(format!(
            "Parameter '{}' does not accept value '{v}'",
            key(k)
        ))
    };
    let mut opts = LuksOptions::default();
    if let Some(v) = o.get(&key("cipher-alg")) {
        opts.spec.alg = CipherAlg::from_name(v).map_err(|_| bad("cipher-alg", v))?;
    }
    if let Some(v) = o.get(&key("cipher-mode")) {
        opts.spec.mode = CipherMode::from_name(v).map_err(|_| bad("cipher-mode", v))?;
    }
    if let Some(v) = o.get(&key("ivgen-alg")) {
        opts.spec.ivgen = IvGenAlg::from_name(v).map_err(|_| bad("ivgen-alg", v))?;
    }
    if let Some(v) = o.get(&key("ivgen-hash-alg")) {
        opts.spec.ivgen_hash = Some(HashAlg::from_name(v).map_err(|_| bad("ivgen-hash-alg", v))?);
    }
    if let Some(v) = o.get(&key("hash-alg")) {
        opts.spec.hash = HashAlg::from_name(v).map_err(|_| bad("hash-alg", v))?;
    }
    if opts.spec.ivgen == IvGenAlg::Essiv && opts.spec.ivgen_hash.is_none() {
        opts.spec.ivgen_hash = Some(HashAlg::Sha256);
    }
    let Some(secret) = o.get(&key("key-secret")) else {
        return Err(format!("Parameter '{}' is required for cipher", key("key-secret")).into());
    };
    secrets
        .passphrase(secret)
        .map_err(|e| Lines::from(e.to_string()))?;
    block::luks::payload_offset(&opts).map_err(|e| Lines::from(e.to_string()))
}
