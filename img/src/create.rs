//! `cryptvm img create`: new raw, luks (LUKS1 or, with `luks-version=2`,
//! LUKS2; attached or detached header) and qcow2 images.

use std::path::Path;

use block::luks::luks2::create as luks2;
use block::luks::{create, CipherAlg, CipherMode, CipherSpec, CreateOptions, HashAlg, IvGenAlg};
use block::options::{parse_size, Opts};
use block::qcow2;
use block::{keyval, BlockError, SecretStore};

use super::image::load_objects;
use super::options_help;
use super::{Args, ImgError, Result};

/// Runs `img create`.
pub fn run(argv: &[String]) -> Result<u8> {
    let a = Args::parse(argv, "qu", "fFbo")?;
    let secrets = load_objects(&a.objects)?;
    let format = a.format.clone().unwrap_or_else(|| "raw".into());
    if options_help::wanted(&a.options) {
        return options_help::print(&format, !a.positional.is_empty());
    }
    let (filename, size_arg) = match a.positional.as_slice() {
        [f] => (f.clone(), None),
        [f, s] => (f.clone(), Some(s.clone())),
        [] => return Err(ImgError::Msg("Expecting image file name".into())),
        _ => {
            return Err(ImgError::Msg(
                "Unexpected argument: too many positional arguments".into(),
            ))
        }
    };
    let options_text = a.joined_options();
    let map = keyval::parse(&options_text, None)
        .map_err(|e| ImgError::Msg(format!("Invalid options: {e}")))?;
    let mut o = Opts::new("-o", map);
    let size = match (size_arg, o.u64("size")?) {
        (Some(s), _) => Some(parse_size(&s).ok_or_else(|| {
            ImgError::Msg(format!(
                "Invalid image size specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes. ('{s}')"
            ))
        })?),
        (None, s) => s,
    };
    let path = Path::new(&filename);
    match format.as_str() {
        "raw" => {
            check_preallocation(&mut o)?;
            o.finish()?;
            let size =
                size.ok_or_else(|| ImgError::Msg("Image creation needs a size parameter".into()))?;
            announce(&a, &filename, &format, size, &options_text);
            // qemu-img rounds raw images up to whole sectors.
            block::file::create_file(path, size.next_multiple_of(block::SECTOR_SIZE))?;
        }
        "luks" => {
            let (opts, key_secret) = luks_options(&mut o)?;
            check_preallocation(&mut o)?;
            o.finish()?;
            create_luks(path, &opts, &key_secret, size, &secrets, &a, &options_text)?;
        }
        "qcow2" => {
            // Options given with -o, as given (qemu-img echoes some verbatim).
            let given = |key: &str| {
                options_text
                    .rsplit(',')
                    .filter_map(|kv| kv.split_once('='))
                    .find(|(k, _)| *k == key)
                    .map(|(_, v)| v.to_string())
            };
            let encrypt = qcow2_encrypt_options(&mut o, &filename, &secrets)?;
            let mut opts = qcow2::CreateOptions::from_opts(&mut o)?;
            o.finish()?;
            opts.encrypt = encrypt;
            // qemu-img's -b BACKING and -F BACKING_FMT.
            if let Some((_, b)) = a.short.iter().find(|(c, _)| *c == 'b') {
                opts.backing_file = Some(b.clone());
            }
            if let Some(f) = &a.format2 {
                opts.backing_fmt = Some(f.clone());
            }
            let size = match size {
                Some(s) => s,
                None => backing_size(path, &opts, &secrets)?,
            };
            let unsafe_backing = a.short_flags.contains(&'u');
            if let Some(backing) = opts.backing_file.as_ref().filter(|_| !unsafe_backing) {
                if opts.backing_fmt.is_none() {
                    return Err(ImgError::Msg(format!(
                        "{filename}: Backing file specified without backing format"
                    )));
                }
                // As qemu-img (without -u): the backing file must open.
                backing_size(path, &opts, &secrets).map_err(|e| {
                    ImgError::Msg(format!(
                        "{filename}: could not open backing image '{backing}': {e}"
                    ))
                })?;
            }
            if !a.quiet {
                let mut line = qcow2_formatting_line(&filename, size, &opts, &given);
                if opts.encrypt.is_some() {
                    // As qemu-img: the encrypt.* options first, in its list's order.
                    let mut enc = String::new();
                    for key in [
                        "encrypt.format",
                        "encrypt.key-secret",
                        "encrypt.cipher-alg",
                        "encrypt.cipher-mode",
                        "encrypt.ivgen-alg",
                        "encrypt.ivgen-hash-alg",
                        "encrypt.hash-alg",
                        "encrypt.iter-time",
                    ] {
                        if let Some(v) = given(key) {
                            enc += &format!(" {key}={v}");
                        }
                    }
                    line = line.replacen(" fmt=qcow2", &format!(" fmt=qcow2{enc}"), 1);
                }
                println!("{line}");
            }
            qcow2::create(path, Some(size), &opts)?;
        }
        other => {
            return Err(ImgError::Msg(format!(
                "Unknown file format '{other}' (supported: raw, luks, qcow2)"
            )))
        }
    }
    Ok(0)
}

fn check_preallocation(o: &mut Opts) -> Result<()> {
    match o.str("preallocation")?.as_deref() {
        None | Some("off") => Ok(()),
        Some(other) => Err(o
            .error(
                "preallocation",
                format!("unsupported preallocation mode '{other}' (only 'off')"),
            )
            .into()),
    }
}

/// qcow2's `encryption` and `encrypt.*` creation options: the built-in LUKS
/// encryption of `encrypt.format=luks` (legacy AES images are never made).
pub(crate) fn qcow2_encrypt_options(
    o: &mut Opts,
    filename: &str,
    secrets: &SecretStore,
) -> Result<Option<qcow2::create::EncryptCreate>> {
    let legacy = o.bool("encryption")?.unwrap_or(false);
    let Some(v) = o.take("encrypt") else {
        if legacy {
            return Err(ImgError::Msg(format!(
                "{filename}: Parameter 'encrypt.key-secret' is required for cipher"
            )));
        }
        return Ok(None);
    };
    let mut e = Opts::new(
        "encrypt",
        match v {
            serde_json::Value::Object(m) => m,
            _ => return Err(o.error("encrypt", "expected encrypt.* options").into()),
        },
    );
    let format = e.str("format")?;
    let aes = match (format.as_deref(), legacy) {
        (Some("luks"), false) => false,
        (Some("aes") | None, true) | (Some("aes"), false) => true,
        (Some("luks"), true) => {
            return Err(ImgError::Msg(format!(
                "{filename}: encrypt.format=luks and encryption=on are mutually exclusive"
            )))
        }
        (Some(other), _) => {
            return Err(ImgError::Msg(format!(
                "{filename}: Parameter 'encrypt.format' does not accept value '{other}'"
            )))
        }
        (None, false) => {
            return Err(ImgError::Msg(format!(
                "{filename}: encrypt.* options need encrypt.format=luks"
            )))
        }
    };
    if e.get("key-secret").is_none() {
        return Err(ImgError::Msg(format!(
            "{filename}: Parameter 'encrypt.key-secret' is required for cipher"
        )));
    }
    if aes {
        return Err(ImgError::Msg(format!(
            "{filename}: creating qcow2 images with the insecure legacy AES-CBC encryption (encrypt.format=aes) is not supported; use encrypt.format=luks"
        )));
    }
    for key in ["detached-header", "luks-version"]
        .into_iter()
        .chain(LUKS2_ONLY)
    {
        if e.get(key).is_some() {
            return Err(ImgError::Msg(format!(
                "{filename}: Invalid parameter 'encrypt.{key}'"
            )));
        }
    }
    let (luks, key_secret) = match luks_options(&mut e)? {
        (LuksCreate::V1(luks), k) => (luks, k),
        (LuksCreate::V2(_), _) => {
            return Err(ImgError::Msg(format!(
                "{filename}: qcow2 encryption is LUKS1 only"
            )))
        }
    };
    e.finish()?;
    validate_spec(&luks.spec)?;
    let passphrase = secrets.passphrase(&key_secret).map_err(BlockError::from)?;
    Ok(Some(qcow2::create::EncryptCreate {
        luks,
        passphrase: std::sync::Arc::new(passphrase),
    }))
}

/// What `-o` asks a new luks image to be.
#[derive(Clone, Debug)]
pub enum LuksCreate {
    /// LUKS1, as QEMU makes it (the default).
    V1(CreateOptions),
    /// LUKS2, as cryptsetup makes it (`luks-version=2`).
    V2(luks2::CreateOptions),
}

impl LuksCreate {
    /// Whether the header goes to a file of its own.
    pub fn detached_header(&self) -> bool {
        match self {
            LuksCreate::V1(o) => o.detached_header,
            LuksCreate::V2(o) => o.detached_header,
        }
    }

    fn spec(&self) -> &CipherSpec {
        match self {
            LuksCreate::V1(o) => &o.spec,
            LuksCreate::V2(o) => &o.spec,
        }
    }
}

/// Options only LUKS2 has.
const LUKS2_ONLY: [&str; 4] = ["pbkdf", "pbkdf-memory", "pbkdf-parallel", "sector-size"];
/// Options only Argon2 has.
const ARGON2_ONLY: [&str; 2] = ["pbkdf-memory", "pbkdf-parallel"];

/// qemu-img's `-o` options for luks, and cryptvm's LUKS2 ones
/// (`luks-version`, `pbkdf`, `pbkdf-memory`, `pbkdf-parallel`,
/// `sector-size`): returns the create options and `key-secret`.
pub fn luks_options(o: &mut Opts) -> Result<(LuksCreate, String)> {
    let version = match o.str("luks-version")?.as_deref() {
        None | Some("1") => 1,
        Some("2") => 2,
        Some(v) => {
            return Err(o
                .error("luks-version", format!("'{v}' is not 1 or 2"))
                .into())
        }
    };
    let mut v1 = CreateOptions::default();
    let key_secret = o.str("key-secret")?;
    let named = |o: &mut Opts, key: &str| -> Result<Option<String>> { Ok(o.str(key)?) };
    if let Some(v) = named(o, "cipher-alg")? {
        v1.spec.alg = CipherAlg::from_name(&v).map_err(|e| o.error("cipher-alg", e.to_string()))?;
    }
    if let Some(v) = named(o, "cipher-mode")? {
        v1.spec.mode =
            CipherMode::from_name(&v).map_err(|e| o.error("cipher-mode", e.to_string()))?;
    }
    if let Some(v) = named(o, "ivgen-alg")? {
        v1.spec.ivgen = IvGenAlg::from_name(&v).map_err(|e| o.error("ivgen-alg", e.to_string()))?;
    }
    if let Some(v) = named(o, "ivgen-hash-alg")? {
        v1.spec.ivgen_hash =
            Some(HashAlg::from_name(&v).map_err(|e| o.error("ivgen-hash-alg", e.to_string()))?);
    }
    if v1.spec.ivgen == IvGenAlg::Essiv && v1.spec.ivgen_hash.is_none() {
        v1.spec.ivgen_hash = Some(HashAlg::Sha256);
    }
    if let Some(v) = named(o, "hash-alg")? {
        v1.spec.hash = HashAlg::from_name(&v).map_err(|e| o.error("hash-alg", e.to_string()))?;
    }
    let iter_time = o.u64("iter-time")?;
    if iter_time == Some(0) {
        return Err(o
            .error("iter-time", "must be at least 1 millisecond")
            .into());
    }
    v1.detached_header = o.bool("detached-header")?.unwrap_or(false);
    let opts = if version == 1 {
        if let Some(key) = LUKS2_ONLY.iter().find(|k| o.get(k).is_some()) {
            return Err(o
                .error(key, "is a LUKS2 option: it needs luks-version=2")
                .into());
        }
        if let Some(ms) = iter_time {
            v1.iter_time_ms = ms;
        }
        LuksCreate::V1(v1)
    } else {
        let mut v2 = luks2::CreateOptions {
            spec: v1.spec,
            detached_header: v1.detached_header,
            ..luks2::CreateOptions::default()
        };
        if let Some(ms) = iter_time {
            v2.iter_time_ms = ms;
        }
        if let Some(p) = named(o, "pbkdf")? {
            v2.pbkdf = luks2::Pbkdf::from_name(&p).ok_or_else(|| {
                o.error("pbkdf", format!("'{p}' is not argon2id, argon2i or pbkdf2"))
            })?;
        }
        if v2.pbkdf == luks2::Pbkdf::Pbkdf2 {
            if let Some(key) = ARGON2_ONLY.iter().find(|k| o.get(k).is_some()) {
                return Err(o
                    .error(key, "applies only to pbkdf=argon2id or argon2i")
                    .into());
            }
        }
        let u32_opt = |o: &mut Opts, key: &str| -> Result<Option<u32>> {
            match o.u64(key)? {
                None => Ok(None),
                Some(v) => u32::try_from(v)
                    .map(Some)
                    .map_err(|_| o.error(key, format!("{v} is too large")).into()),
            }
        };
        if let Some(n) = u32_opt(o, "pbkdf-parallel")? {
            if !(1..=luks2::MAX_PARALLEL).contains(&n) {
                return Err(o
                    .error(
                        "pbkdf-parallel",
                        format!("{n} is not 1 to {}", luks2::MAX_PARALLEL),
                    )
                    .into());
            }
            v2.parallel = n;
        }
        if let Some(kib) = u32_opt(o, "pbkdf-memory")? {
            let least = luks2::MIN_MEMORY_KIB.max(8 * v2.parallel);
            let most = block::luks::luks2::json::MAX_ARGON2_MEMORY_KIB;
            if kib < least || u64::from(kib) > most {
                return Err(o
                    .error(
                        "pbkdf-memory",
                        format!("{kib} KiB is not {least} to {most} KiB"),
                    )
                    .into());
            }
            v2.memory_kib = kib;
        }
        if let Some(n) = u32_opt(o, "sector-size")? {
            if !matches!(n, 512 | 1024 | 2048 | 4096) {
                return Err(o
                    .error("sector-size", format!("{n} is not 512, 1024, 2048 or 4096"))
                    .into());
            }
            v2.sector_size = n;
        }
        v2.validate()?;
        LuksCreate::V2(v2)
    };
    let key_secret = key_secret
        .ok_or_else(|| ImgError::Msg("Parameter 'key-secret' is required for cipher".into()))?;
    Ok((opts, key_secret))
}

/// A made volume: what to write at offset 0 of the header node, the
/// header node's length without payload.
struct Made {
    image: Vec<u8>,
    header_len: u64,
}

/// Writes `made` as the new file `path`, sized for `payload` bytes after its header.
fn write_new_luks(path: &Path, made: &Made, payload: u64) -> Result<()> {
    block::file::create_file(path, 0)?;
    let name = path
        .to_str()
        .ok_or_else(|| ImgError::Msg(format!("'{}': the path is not UTF-8", path.display())))?;
    let mut o = Opts::from_value("file", serde_json::json!({ "filename": name }))?;
    let node = block::file::FileNode::open(&mut o, &block::blockdev::Common::default(), None)?;
    block::luks::write_header_image(&node, &made.image, made.header_len, payload)?;
    Ok(())
}

/// Formats a new luks image at `path`; with a detached header `path` gets
/// only the header and key material. Nothing is left behind when it fails.
pub fn create_luks(
    path: &Path,
    opts: &LuksCreate,
    key_secret: &str,
    size: Option<u64>,
    secrets: &SecretStore,
    a: &Args,
    options_text: &str,
) -> Result<()> {
    let passphrase = secrets.passphrase(key_secret).map_err(BlockError::from)?;
    let sector = match opts {
        LuksCreate::V1(_) => block::SECTOR_SIZE,
        LuksCreate::V2(o) => u64::from(o.sector_size),
    };
    let payload = match (opts.detached_header(), size) {
        (true, Some(s)) if s > 0 => {
            return Err(ImgError::Msg(
                "a size makes no sense with detached-header=true: the file holds only the header; create the payload separately".into(),
            ))
        }
        (true, _) => 0,
        (false, Some(s)) => s.next_multiple_of(sector),
        (false, None) => return Err(ImgError::Msg("Image creation needs a size parameter".into())),
    };
    validate_spec(opts.spec())?;
    let made = match opts {
        LuksCreate::V1(o) => {
            let v = create(o, &passphrase)?;
            let header_len = v.header_image.len() as u64;
            Made {
                image: v.header_image,
                header_len,
            }
        }
        LuksCreate::V2(o) => {
            let v = luks2::create(o, &passphrase)?;
            Made {
                image: v.header_image,
                header_len: v.header_len,
            }
        }
    };
    announce(
        a,
        &path.display().to_string(),
        "luks",
        payload,
        options_text,
    );
    // The same writer as QMP's blockdev-create of a luks image.
    let written = write_new_luks(path, &made, payload);
    if written.is_err() {
        // As qemu-img: no half-written image stays behind.
        let _ = std::fs::remove_file(path);
    }
    written
}

/// The size of the backing image named in `opts`, resolved next to `path`.
fn backing_size(path: &Path, opts: &qcow2::CreateOptions, secrets: &SecretStore) -> Result<u64> {
    let Some(backing) = &opts.backing_file else {
        return Err(ImgError::Msg(
            "Image creation needs a size parameter".into(),
        ));
    };
    let full = match path.parent() {
        Some(dir) if !Path::new(backing).is_absolute() => dir.join(backing),
        _ => Path::new(backing).to_path_buf(),
    };
    let name = full.to_string_lossy().into_owned();
    let opts_map = super::image::image_options(&name, false, opts.backing_fmt.as_deref())?;
    let image = super::image::open(
        opts_map,
        secrets,
        super::image::OpenMode {
            read_only: true,
            no_io: true,
            cache: None,
        },
    )?;
    Ok(image.node.size())
}

/// The `Formatting ...` line qemu-img prints for a new qcow2 image.
fn qcow2_formatting_line(
    filename: &str,
    size: u64,
    o: &qcow2::CreateOptions,
    given: &dyn Fn(&str) -> Option<String>,
) -> String {
    let on_off = |b: bool| if b { "on" } else { "off" };
    let mut line = format!(
        "Formatting '{filename}', fmt=qcow2 cluster_size={} extended_l2=off",
        o.cluster_size
    );
    if given("preallocation").is_some() {
        let p = match o.preallocation {
            qcow2::Preallocation::Off => "off",
            qcow2::Preallocation::Metadata => "metadata",
        };
        line += &format!(" preallocation={p}");
    }
    line += &format!(
        " compression_type={} size={size}",
        o.compression_type.name()
    );
    if let Some(compat) = given("compat") {
        line += &format!(" compat={compat}");
    }
    if let Some(b) = &o.backing_file {
        line += &format!(" backing_file={b}");
    }
    if let Some(f) = &o.backing_fmt {
        line += &format!(" backing_fmt={f}");
    }
    line += &format!(
        " lazy_refcounts={} refcount_bits={}",
        on_off(o.lazy_refcounts),
        o.refcount_bits
    );
    line
}

/// Builds a throwaway cipher to reject impossible combinations before any file is touched.
fn validate_spec(spec: &CipherSpec) -> Result<()> {
    let key = vec![0u8; spec.key_bytes()];
    block::luks::new_sector_cipher(spec, &key)?;
    Ok(())
}

fn announce(a: &Args, filename: &str, format: &str, size: u64, options_text: &str) {
    if a.quiet {
        return;
    }
    let mut line = format!("Formatting '{filename}', fmt={format} size={size}");
    for opt in options_text
        .split(',')
        .filter(|s| !s.is_empty() && !s.starts_with("size="))
    {
        line.push(' ');
        line.push_str(opt);
    }
    println!("{line}");
}
