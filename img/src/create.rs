//! `cryptvm img create`: new raw and luks images (attached or detached header).

use std::path::Path;

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
            let mut opts = qcow2::CreateOptions::from_opts(&mut o)?;
            o.finish()?;
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
                println!("{}", qcow2_formatting_line(&filename, size, &opts, &given));
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

/// qemu-img's `-o` options for luks: returns the create options and `key-secret`.
pub fn luks_options(o: &mut Opts) -> Result<(CreateOptions, String)> {
    let mut opts = CreateOptions::default();
    let key_secret = o.str("key-secret")?;
    let named = |o: &mut Opts, key: &str| -> Result<Option<String>> { Ok(o.str(key)?) };
    if let Some(v) = named(o, "cipher-alg")? {
        opts.spec.alg =
            CipherAlg::from_name(&v).map_err(|e| o.error("cipher-alg", e.to_string()))?;
    }
    if let Some(v) = named(o, "cipher-mode")? {
        opts.spec.mode =
            CipherMode::from_name(&v).map_err(|e| o.error("cipher-mode", e.to_string()))?;
    }
    if let Some(v) = named(o, "ivgen-alg")? {
        opts.spec.ivgen =
            IvGenAlg::from_name(&v).map_err(|e| o.error("ivgen-alg", e.to_string()))?;
    }
    if let Some(v) = named(o, "ivgen-hash-alg")? {
        opts.spec.ivgen_hash =
            Some(HashAlg::from_name(&v).map_err(|e| o.error("ivgen-hash-alg", e.to_string()))?);
    }
    if opts.spec.ivgen == IvGenAlg::Essiv && opts.spec.ivgen_hash.is_none() {
        opts.spec.ivgen_hash = Some(HashAlg::Sha256);
    }
    if let Some(v) = named(o, "hash-alg")? {
        opts.spec.hash = HashAlg::from_name(&v).map_err(|e| o.error("hash-alg", e.to_string()))?;
    }
    if let Some(ms) = o.u64("iter-time")? {
        if ms == 0 {
            return Err(o
                .error("iter-time", "must be at least 1 millisecond")
                .into());
        }
        opts.iter_time_ms = ms;
    }
    opts.detached_header = o.bool("detached-header")?.unwrap_or(false);
    let key_secret = key_secret
        .ok_or_else(|| ImgError::Msg("Parameter 'key-secret' is required for cipher".into()))?;
    Ok((opts, key_secret))
}

/// Formats a new luks image at `path`; with a detached header `path` gets
/// only the header and key material.
pub fn create_luks(
    path: &Path,
    opts: &CreateOptions,
    key_secret: &str,
    size: Option<u64>,
    secrets: &SecretStore,
    a: &Args,
    options_text: &str,
) -> Result<()> {
    let passphrase = secrets.passphrase(key_secret).map_err(BlockError::from)?;
    let payload = match (opts.detached_header, size) {
        (true, Some(s)) if s > 0 => {
            return Err(ImgError::Msg(
                "a size makes no sense with detached-header=true: the file holds only the header; create the payload separately".into(),
            ))
        }
        (true, _) => 0,
        (false, Some(s)) => s.next_multiple_of(block::SECTOR_SIZE),
        (false, None) => return Err(ImgError::Msg("Image creation needs a size parameter".into())),
    };
    validate_spec(&opts.spec)?;
    let volume = create(opts, &passphrase)?;
    announce(
        a,
        &path.display().to_string(),
        "luks",
        payload,
        options_text,
    );
    // The same writer as QMP's blockdev-create of a luks image.
    block::file::create_file(path, 0)?;
    let name = path
        .to_str()
        .ok_or_else(|| ImgError::Msg(format!("'{}': the path is not UTF-8", path.display())))?;
    let mut o = Opts::from_value("file", serde_json::json!({ "filename": name }))?;
    let node = block::file::FileNode::open(&mut o, &block::blockdev::Common::default(), None)?;
    block::luks::write_volume(&node, &volume, payload)?;
    Ok(())
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
