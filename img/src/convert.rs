//! `cryptvm img convert`: copy an image into a new or existing one, decrypting
//! and encrypting on the way, with qemu-img's options and semantics (see
//! `copy` for how the copy runs).
//!
//! `-B BACKING` (or `-o backing_file=`, which `-B` overrides) gives the new
//! target a backing file (its format from `-F`, else `-o backing_fmt=`, one
//! of them required); with `-n` it only says that the existing target has
//! one. Either way only what the source's top image allocates is copied:
//! the rest is left unallocated, to be read from the target's backing file,
//! which should read as the source's.

use std::path::Path;

use block::keyval;
use block::options::{parse_size, Opts};
use serde_json::json;

use super::cache::CacheMode;
use super::copy::{default_workers, Copy, KeepBacking, MAX_WORKERS};
use super::create::{create_luks, luks_options};
use super::image::{image_options, load_objects, open, OpenMode};
use super::options_help;
use super::rebase::{backing_of, qemu_open_error};
use super::sparse::{Sparse, DEFAULT_MIN_SPARSE, MAX_MIN_SPARSE};
use super::{Args, ImgError, Result};

/// Runs `img convert`.
pub fn run(argv: &[String]) -> Result<u8> {
    let a = Args::parse(argv, "pqnUcCW", "fOotTlSmrBF")?;
    if options_help::wanted(&a.options) {
        let format = a.output_format.as_deref().unwrap_or("raw");
        return options_help::print(format, a.positional.len() >= 2);
    }
    let tuning = Tuning::from_args(&a)?;
    // `-B`: the last one given, as qemu-img's getopt loop keeps.
    let backing_arg = a
        .short
        .iter()
        .rev()
        .find(|(c, _)| *c == 'B')
        .map(|(_, v)| v.clone());
    if backing_arg.is_some() && a.positional.len() > 2 {
        return Err(ImgError::Msg(
            "Having a backing file for the target makes no sense when concatenating multiple input images".into(),
        ));
    }
    let [src, dst] = a.positional.as_slice() else {
        return Err(ImgError::Msg(
            "Expecting a source and a target image name".into(),
        ));
    };
    if a.target_image_opts && !a.no_create {
        return Err(ImgError::Msg(
            "--target-image-opts requires use of -n flag".into(),
        ));
    }
    let secrets = load_objects(&a.objects)?;
    let source = open(
        image_options(src, a.image_opts, a.format.as_deref())?,
        &secrets,
        OpenMode {
            read_only: true,
            no_io: false,
            cache: a.src_cache,
        },
    )
    .map_err(|e| e.opening(src))?;
    if let Some((_, param)) = a.short.iter().rev().find(|(c, _)| *c == 'l') {
        load_snapshot(&source.node, param)?;
    }
    let src_size = source.node.size();
    let out_fmt = a.output_format.clone().unwrap_or_else(|| "raw".into());

    let (target, zero_init, target_has_backing) = if a.no_create {
        let opts = if a.target_image_opts {
            image_options(dst, true, None)?
        } else {
            image_options(dst, false, Some(&out_fmt))?
        };
        (
            open(
                opts,
                &secrets,
                OpenMode {
                    read_only: false,
                    no_io: false,
                    cache: a.cache,
                },
            )
            .map_err(|e| e.opening(dst))?,
            false,
            backing_arg.is_some(),
        )
    } else {
        let options_text = a.joined_options();
        let map = keyval::parse(&options_text, None)
            .map_err(|e| ImgError::Msg(format!("Invalid options: {e}")))?;
        let mut o = Opts::new("-o", map);
        let path = Path::new(dst);
        if tuning.compressed {
            check_compression(&out_fmt, &o)?;
        }
        match out_fmt.as_str() {
            "raw" => {
                o.finish()?;
                no_backing_for("raw", &backing_arg)?;
                block::file::create_file(path, src_size)?;
                let opts = json!({"driver": "raw", "file": {"driver": "file", "filename": dst}});
                let opened = open_new(opts, &secrets, a.cache)?;
                (opened, true, false)
            }
            "qcow2" => {
                let mut opts = block::qcow2::CreateOptions::from_opts(&mut o)?;
                o.finish()?;
                // -B and -F override -o backing_file and backing_fmt.
                if let Some(b) = &backing_arg {
                    opts.backing_file = Some(b.clone());
                }
                if let Some(f) = &a.format2 {
                    opts.backing_fmt = Some(f.clone());
                }
                if opts.backing_fmt.is_some() && opts.backing_file.is_none() {
                    return Err(ImgError::Msg(format!(
                        "{dst}: error while converting qcow2: Backing format cannot be used without backing file"
                    )));
                }
                if opts.backing_file.is_some() && opts.backing_fmt.is_none() {
                    return Err(ImgError::Msg(
                        "Use of backing file requires explicit backing format".into(),
                    ));
                }
                block::qcow2::create(path, Some(src_size), &opts)?;
                let target =
                    json!({"driver": "qcow2", "file": {"driver": "file", "filename": dst}});
                let opened = open_new(target, &secrets, a.cache)
                    .map_err(|e| qemu_open_error(e).opening(dst))?;
                // A new qcow2 image reads as zeros unless it has a backing file.
                let has_backing = opts.backing_file.is_some();
                (opened, !has_backing, has_backing)
            }
            "luks" => {
                // Before the key-secret check, as qemu-img.
                no_backing_for("luks", &backing_arg)?;
                let (opts, key_secret) = luks_options(&mut o)?;
                o.finish()?;
                if opts.detached_header() {
                    return Err(ImgError::Msg(
                        "convert cannot create a detached header; create it with 'img create', then use -n --target-image-opts".into(),
                    ));
                }
                create_luks(
                    path,
                    &opts,
                    &key_secret,
                    Some(src_size),
                    &secrets,
                    &Args {
                        quiet: true,
                        ..Args::default()
                    },
                    "",
                )?;
                let target = json!({"driver": "luks", "key-secret": key_secret, "file": {"driver": "file", "filename": dst}});
                let opened = open_new(target, &secrets, a.cache)?;
                (opened, false, false)
            }
            other => {
                return Err(ImgError::Msg(format!(
                    "Unknown file format '{other}' (supported: raw, luks, qcow2)"
                )))
            }
        }
    };
    let compress = if tuning.compressed {
        Some(
            target
                .node
                .compressed_write_unit()
                .ok_or_else(not_compressible)?,
        )
    } else {
        None
    };
    if target.node.size() < src_size {
        return Err(ImgError::Msg(format!(
            "Target image is smaller than the source ({} < {src_size} bytes)",
            target.node.size()
        )));
    }
    Copy {
        src: &source.node,
        dst: &target.node,
        size: src_size,
        workers: tuning.workers,
        in_order: tuning.in_order,
        sparse: tuning.sparse,
        zero_init,
        compress,
        progress: a.progress && !a.quiet,
        backing: target_has_backing.then(|| KeepBacking {
            source_backing_size: backing_of(&source.node).map(|b| b.size()),
            // Known for a new target only, as in qemu-img.
            target_backing_size: (!a.no_create)
                .then(|| backing_of(&target.node).map(|b| b.size()))
                .flatten(),
        }),
    }
    .run()?;
    Ok(0)
}

/// Refuses `-B` for a target format without backing files.
fn no_backing_for(format: &str, backing: &Option<String>) -> Result<()> {
    match backing {
        Some(_) => Err(ImgError::Msg(format!(
            "Backing file not supported for file format '{format}'"
        ))),
        None => Ok(()),
    }
}

fn not_compressible() -> ImgError {
    ImgError::Msg("Compression not supported for this file format".into())
}

/// qemu-img's checks of `-c` against the new target's format and options.
fn check_compression(format: &str, o: &Opts) -> Result<()> {
    if format != "qcow2" {
        return Err(not_compressible());
    }
    if o.get("encryption").is_some() || o.get("encrypt").is_some() {
        return Err(ImgError::Msg(
            "Compression and encryption not supported at the same time".into(),
        ));
    }
    if o.get("preallocation")
        .is_some_and(|p| p.as_str() != Some("off"))
    {
        return Err(ImgError::Msg(
            "Compression and preallocation not supported at the same time".into(),
        ));
    }
    Ok(())
}

/// `-l`: reads the source's internal snapshot `param` names (an ID or a
/// name, or `snapshot.id=...,snapshot.name=...`) instead of its active
/// image, as qemu-img's `bdrv_snapshot_load_tmp`.
fn load_snapshot(node: &block::NodeRef, param: &str) -> Result<()> {
    use block::snapshot::{SnapshotError, SnapshotRef};
    let (mut id, mut name) = (None, None);
    let which = if param.starts_with("snapshot.") {
        let map = keyval::parse(param, None)
            .map_err(|_| ImgError::Msg(format!("Failed in parsing snapshot param '{param}'")))?;
        let Some(serde_json::Value::Object(sn)) = map.get("snapshot") else {
            return Err(ImgError::Msg(format!(
                "Failed in parsing snapshot param '{param}'"
            )));
        };
        for (k, v) in sn {
            let v = v.as_str().map(str::to_string);
            match k.as_str() {
                "id" => id = v,
                "name" => name = v,
                _ => {
                    super::error_line(format_args!("Invalid parameter 'snapshot.{k}'"));
                    return Err(ImgError::Msg(format!(
                        "Failed in parsing snapshot param '{param}'"
                    )));
                }
            }
        }
        SnapshotRef::IdAndName {
            id: id.as_deref(),
            name: name.as_deref(),
        }
    } else {
        SnapshotRef::IdOrName(param)
    };
    node.snapshot_load_tmp(which).map_err(|e| {
        let why = match e {
            block::BlockError::Snapshot(SnapshotError::NotFound) => "Can't find snapshot".into(),
            block::BlockError::Snapshot(SnapshotError::NotSupported) => format!(
                "Block format '{}' used by device '' does not support temporarily loading internal snapshots",
                node.driver()
            ),
            block::BlockError::Snapshot(SnapshotError::BadL1(_)) => e.to_string(),
            other => other.to_string(),
        };
        ImgError::Msg(format!("Failed to load snapshot: {why}"))
    })
}

/// How the copy runs: qemu-img's `-c`, `-m`, `-W` and `-S`.
struct Tuning {
    /// `-c`.
    compressed: bool,
    workers: usize,
    in_order: bool,
    sparse: Sparse,
}

impl Tuning {
    /// Reads `-c`, `-m`, `-W` and `-S`; refuses the options this tool does not
    /// implement rather than ignoring them. `-C` (copy offloading) is taken:
    /// qemu-img falls back to reading and writing where it is unavailable,
    /// and here it always is. `-U` needs nothing: images are not locked.
    fn from_args(a: &Args) -> Result<Self> {
        let unsupported = |what: &str| Err(ImgError::Msg(format!("{what} is not supported")));
        let mut t = Tuning {
            compressed: a.short_flags.contains(&'c'),
            workers: default_workers(),
            in_order: !a.short_flags.contains(&'W'),
            sparse: Sparse::new(DEFAULT_MIN_SPARSE).expect("valid default"),
        };
        for (opt, v) in &a.short {
            match opt {
                'm' => {
                    let n: usize = v.parse().map_err(|_| {
                        ImgError::Msg(format!("Invalid number of coroutines specified: '{v}'."))
                    })?;
                    if !(1..=MAX_WORKERS).contains(&n) {
                        return Err(ImgError::Msg(format!(
                            "Invalid number of coroutines specified. Must be between 1 and {MAX_WORKERS}."
                        )));
                    }
                    t.workers = n;
                }
                'S' => {
                    let bytes = parse_size(v).ok_or_else(|| {
                        ImgError::Msg(format!(
                            "Invalid buffer size for sparse output specified: '{v}'."
                        ))
                    })?;
                    t.sparse = Sparse::new(bytes).ok_or_else(|| {
                        ImgError::Msg(format!(
                            "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to {MAX_MIN_SPARSE}. Select 0 to disable sparse detection (fully allocates output)."
                        ))
                    })?;
                }
                // Handled with the target (`run`).
                'B' => {}
                // Handled once the source is open (`load_snapshot`).
                'l' => {}
                'r' => return unsupported("A rate limit (-r)"),
                other => return Err(ImgError::Msg(format!("invalid option -- '{other}'"))),
            }
        }
        Ok(t)
    }
}

/// Opens a target image just created, for writing.
fn open_new(
    options: serde_json::Value,
    secrets: &block::SecretStore,
    cache: Option<CacheMode>,
) -> Result<super::image::Image> {
    let serde_json::Value::Object(map) = options else {
        return Err(ImgError::Msg("target options must be an object".into()));
    };
    open(
        map,
        secrets,
        OpenMode {
            read_only: false,
            no_io: false,
            cache,
        },
    )
}
