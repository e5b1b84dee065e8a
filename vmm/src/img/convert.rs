//! `cryptvm img convert`: copy an image into a new or existing one, decrypting
//! and encrypting on the way. Reading (and decrypting) runs on its own thread,
//! one chunk ahead of writing (and encrypting).

use std::io::Write;
use std::path::Path;
use std::sync::mpsc;

use block::options::Opts;
use block::{keyval, NodeRef};
use serde_json::json;

use super::create::{create_luks, luks_options};
use super::image::{image_options, load_objects, open, OpenMode};
use super::{Args, ImgError, Result};

/// Bytes copied per request, as qemu-img's default buffer.
const CHUNK: usize = 2 << 20;

/// Runs `img convert`.
pub fn run(argv: &[String]) -> Result<u8> {
    let a = Args::parse(argv, "pqnUcC", "fOotTlSWmrB")?;
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
        },
    )?;
    let src_size = source.node.size();
    let out_fmt = a.output_format.clone().unwrap_or_else(|| "raw".into());

    let (target, zero_init) = if a.no_create {
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
                },
            )?,
            false,
        )
    } else {
        let options_text = a.joined_options();
        let map = keyval::parse(&options_text, None)
            .map_err(|e| ImgError::Msg(format!("Invalid options: {e}")))?;
        let mut o = Opts::new("-o", map);
        let path = Path::new(dst);
        match out_fmt.as_str() {
            "raw" => {
                o.finish()?;
                block::file::create_file(path, src_size)?;
                let opts = json!({"driver": "raw", "file": {"driver": "file", "filename": dst}});
                let opened = open_new(opts, &secrets)?;
                (opened, true)
            }
            "qcow2" => {
                let opts = block::qcow2::CreateOptions::from_opts(&mut o)?;
                o.finish()?;
                block::qcow2::create(path, Some(src_size), &opts)?;
                let target =
                    json!({"driver": "qcow2", "file": {"driver": "file", "filename": dst}});
                let opened = open_new(target, &secrets)?;
                // A new qcow2 image reads as zeros unless it has a backing file.
                (opened, opts.backing_file.is_none())
            }
            "luks" => {
                let (opts, key_secret) = luks_options(&mut o)?;
                o.finish()?;
                if opts.detached_header {
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
                let opened = open_new(target, &secrets)?;
                (opened, false)
            }
            other => {
                return Err(ImgError::Msg(format!(
                    "Unknown file format '{other}' (supported: raw, luks, qcow2)"
                )))
            }
        }
    };
    if target.node.size() < src_size {
        return Err(ImgError::Msg(format!(
            "Target image is smaller than the source ({} < {src_size} bytes)",
            target.node.size()
        )));
    }
    copy(
        &source.node,
        &target.node,
        src_size,
        zero_init,
        a.progress && !a.quiet,
    )?;
    Ok(0)
}

/// Copies `size` bytes; chunks of zeros are skipped when the target reads
/// as zeros already.
fn copy(src: &NodeRef, dst: &NodeRef, size: u64, zero_init: bool, progress: bool) -> Result<()> {
    let chunks = size.div_ceil(CHUNK as u64);
    let (full_tx, full_rx) = mpsc::sync_channel::<block::Result<(u64, Vec<u8>)>>(2);
    let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
    for _ in 0..3 {
        empty_tx.send(vec![0u8; CHUNK]).expect("receiver alive");
    }
    std::thread::scope(|s| -> Result<()> {
        s.spawn(move || {
            for i in 0..chunks {
                let Ok(mut buf) = empty_rx.recv() else { return };
                let offset = i * CHUNK as u64;
                let len = (size - offset).min(CHUNK as u64) as usize;
                let r = src.read_at(offset, &mut buf[..len]).map(|()| (offset, buf));
                let failed = r.is_err();
                if full_tx.send(r).is_err() || failed {
                    return;
                }
            }
        });
        let mut shown = -1.0;
        for _ in 0..chunks {
            let (offset, buf) = full_rx
                .recv()
                .map_err(|_| ImgError::Msg("reader stopped".into()))??;
            let len = (size - offset).min(CHUNK as u64) as usize;
            let data = &buf[..len];
            if !(zero_init && data.iter().all(|&b| b == 0)) {
                dst.write_at(offset, data)?;
            }
            let _ = empty_tx.send(buf);
            if progress {
                let pct = (offset + len as u64) as f64 * 100.0 / size as f64;
                if pct - shown >= 1.0 || offset + len as u64 == size {
                    shown = pct;
                    print!("    ({pct:.2}/100%)\r");
                    let _ = std::io::stdout().flush();
                }
            }
        }
        drop(empty_tx);
        Ok(())
    })?;
    if progress {
        if size == 0 {
            print!("    (100.00/100%)\r");
        }
        println!();
    }
    dst.flush()?;
    Ok(())
}

/// Opens a target image just created, for writing.
fn open_new(
    options: serde_json::Value,
    secrets: &block::SecretStore,
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
        },
    )
}
