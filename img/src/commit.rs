//! `cryptvm img commit`: writes the data an image (and the images between it
//! and the base) allocates into its backing file, or into `-b base` further
//! down the chain, as `qemu-img commit` does; without `-d` (and without
//! `-b`) the image is emptied afterwards.

use std::path::Path;
use std::time::{Duration, Instant};

use block::NodeRef;

use super::image::{image_options, load_objects, open, OpenMode};
use super::rebase::{
    backing_of, check_format, describe, file_name, qemu_open_error, show_progress,
};
use super::size::strtosz;
use super::{Args, ImgError, Result};

/// Bytes copied per step.
const CHUNK: u64 = 2 << 20;

/// Runs `img commit [options] FILENAME`; 0 on success, 1 otherwise.
pub fn run(argv: &[String]) -> Result<u8> {
    let a = Args::parse(argv, "qdp", "fbtr")?;
    let mut drop = a.short_flags.contains(&'d');
    let base = a
        .short
        .iter()
        .rev()
        .find(|(c, _)| *c == 'b')
        .map(|(_, v)| v.clone());
    // As qemu-img: -b implies -d.
    drop |= base.is_some();
    let rate = match a.short.iter().rev().find(|(c, _)| *c == 'r') {
        None => 0,
        Some((_, v)) => match strtosz(v) {
            Ok(n) if n <= i64::MAX as u64 => n,
            _ => {
                return Err(ImgError::Msg(format!(
                    "Invalid rate limit specified: '{v}'."
                )))
            }
        },
    };
    let progress = a.progress && !a.quiet;
    let [spec] = a.positional.as_slice() else {
        super::error_line("Expecting one image file name");
        eprintln!("Try '{} commit --help' for more info", super::invoked());
        return Ok(1);
    };
    let secrets = load_objects(&a.objects)?;
    check_format(spec, a.format.as_deref())?;
    let opts = image_options(spec, a.image_opts, a.format.as_deref())?;
    let top = open(
        opts,
        &secrets,
        OpenMode {
            read_only: false,
            no_io: false,
            cache: a.cache,
        },
    )
    .map_err(|e| qemu_open_error(e).opening(spec))?
    .node;
    if progress {
        show_progress(0.0);
    }
    let chain = chain_of(&top);
    let base_idx = match &base {
        Some(b) => find_in_chain(&chain, b).ok_or_else(|| {
            ImgError::Msg(format!(
                "Did not find '{b}' in the backing chain of '{spec}'"
            ))
        })?,
        None if chain.len() > 1 => 1,
        None => return Err(ImgError::Msg("Image does not have a backing file".into())),
    };
    // The base is written: open it again, writable (the chain holds it read-only).
    let base_node = &chain[base_idx];
    let base_file = file_name(base_node)
        .ok_or_else(|| ImgError::Msg("the base image has no file name".into()))?;
    let base_opts = image_options(&base_file, false, Some(base_node.driver()))?;
    let target = open(
        base_opts,
        &secrets,
        OpenMode {
            read_only: false,
            no_io: false,
            cache: a.cache,
        },
    )
    .map_err(|e| e.opening(&base_file))?
    .node;
    copy_down(&top, &chain[..base_idx], &target, rate)?;
    target.flush()?;
    if !drop {
        top.make_empty()
            .and_then(|()| top.flush())
            .map_err(|e| ImgError::Msg(format!("Could not empty {spec}: {}", describe(&e))))?;
    }
    if progress {
        show_progress(100.0);
        println!();
    }
    if !a.quiet {
        println!("Image committed.");
    }
    Ok(0)
}

/// The image and its backing nodes, top first.
fn chain_of(top: &NodeRef) -> Vec<NodeRef> {
    let mut chain = vec![top.clone()];
    while let Some(b) = chain.last().and_then(backing_of) {
        chain.push(b);
    }
    chain
}

/// Index of the backing image named `name` (as given in an overlay's
/// header, or the same file), below the top (QEMU's `bdrv_find_backing_image`).
fn find_in_chain(chain: &[NodeRef], name: &str) -> Option<usize> {
    let wanted = std::fs::canonicalize(name).ok();
    (1..chain.len()).find(|&i| {
        let named = chain[i - 1]
            .image_info()
            .get("backing-filename")
            .and_then(|v| v.as_str())
            .is_some_and(|b| b == name);
        let same_file = match (&wanted, file_name(&chain[i])) {
            (Some(w), Some(f)) => std::fs::canonicalize(Path::new(&f)).ok().as_ref() == Some(w),
            _ => false,
        };
        named || same_file
    })
}

/// Copies every range some layer of `above` allocates into `base`, reading
/// through the top (which sees the newest data).
fn copy_down(top: &NodeRef, above: &[NodeRef], base: &NodeRef, rate: u64) -> Result<()> {
    let size = top.size();
    if base.size() < size {
        // As QEMU's commit job: the base grows to the top's size.
        base.resize(size)
            .map_err(|e| ImgError::Msg(format!("Could not resize base: {}", describe(&e))))?;
    }
    let started = Instant::now();
    let mut copied = 0u64;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut offset = 0;
    while offset < size {
        let want = CHUNK.min(size - offset);
        let (allocated, n) = allocated_above(above, offset, want)?;
        if allocated {
            let b = &mut buf[..n as usize];
            top.read_at(offset, b).map_err(|source| ImgError::Copy {
                what: "reading",
                offset,
                source,
            })?;
            let r = if b.iter().all(|&x| x == 0) {
                base.write_zeroes(offset, n)
            } else {
                base.write_at(offset, b)
            };
            r.map_err(|source| ImgError::Copy {
                what: "writing",
                offset,
                source,
            })?;
            copied += n;
            throttle(started, copied, rate);
        }
        offset += n;
    }
    Ok(())
}

/// Whether any of `layers` allocates the bytes at `offset`, and for how many
/// of the next `len` bytes that holds.
fn allocated_above(layers: &[NodeRef], offset: u64, len: u64) -> Result<(bool, u64)> {
    let mut n = len;
    for layer in layers {
        if offset >= layer.size() {
            continue;
        }
        let l = n.min(layer.size() - offset);
        let st = layer.block_status(offset, l)?;
        let run = st.len.clamp(1, l);
        if st.allocated {
            return Ok((true, run));
        }
        n = n.min(run);
    }
    Ok((false, n))
}

/// Sleeps so that at most `rate` bytes per second are copied (0: no limit).
fn throttle(started: Instant, copied: u64, rate: u64) {
    if rate == 0 {
        return;
    }
    let due = Duration::from_secs_f64(copied as f64 / rate as f64);
    if let Some(wait) = due.checked_sub(started.elapsed()) {
        std::thread::sleep(wait);
    }
}
