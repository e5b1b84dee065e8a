//! `cryptvm img rebase`: changes the backing file of an image as
//! `qemu-img rebase` does. Unsafe mode (`-u`) only rewrites the reference;
//! safe mode first copies into the image every cluster where the old and the
//! new backing chain read differently, so that its content stays the same.

use std::io::Write;
use std::path::Path;

use block::{BlockError, ErrorKind, NodeRef};
use serde_json::Value;

use super::image::{image_options, load_objects, open, strerror, OpenMode};
use super::{Args, ImgError, Result};

/// Bytes compared per step (qemu-img's `IO_BUF_SIZE`).
const IO_BUF_SIZE: u64 = 2 << 20;

/// Format names qemu-img 10 knows (`-F` is checked against them).
const QEMU_FORMATS: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "file",
    "ftp",
    "ftps",
    "host_cdrom",
    "host_device",
    "http",
    "https",
    "luks",
    "nbd",
    "null-aio",
    "null-co",
    "nvme",
    "parallels",
    "preallocate",
    "qcow",
    "qcow2",
    "qed",
    "quorum",
    "raw",
    "replication",
    "snapshot-access",
    "throttle",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
    "vvfat",
];

/// Runs `img rebase [options] -b BACKING FILENAME`; 0 on success, 1 otherwise.
pub fn run(argv: &[String]) -> Result<u8> {
    let a = Args::parse(argv, "qUupc", "fFbtT")?;
    let unsafe_mode = a.short_flags.contains(&'u');
    let compress = a.short_flags.contains(&'c');
    let progress = a.progress && !a.quiet;
    let backing = a
        .short
        .iter()
        .rev()
        .find(|(c, _)| *c == 'b')
        .map(|(_, v)| v.clone());
    let [spec] = a.positional.as_slice() else {
        return Ok(usage_error("Expecting one image file name"));
    };
    if !unsafe_mode && backing.is_none() {
        return Ok(usage_error(
            "Must specify backing file (-b) or use unsafe mode (-u)",
        ));
    }
    let secrets = load_objects(&a.objects)?;
    if progress {
        show_progress(0.0);
    }
    check_format(spec, a.format.as_deref())?;
    let mut opts = image_options(spec, a.image_opts, a.format.as_deref())?;
    let has_backing_option = opts.get("driver").and_then(Value::as_str) == Some("qcow2");
    if unsafe_mode && has_backing_option {
        // As qemu-img: the old backing file is not opened, so that a moved or
        // renamed one can be named again.
        opts.entry("backing").or_insert(Value::Null);
    }
    let image = open(
        opts,
        &secrets,
        OpenMode {
            read_only: false,
            no_io: false,
            cache: a.cache,
        },
    )
    .map_err(|e| qemu_open_error(e).opening(spec))?;
    let top = image.node;
    if let Some(f) = &a.format2 {
        if !QEMU_FORMATS.contains(&f.as_str()) {
            return Err(ImgError::Msg(format!("Invalid format name: '{f}'")));
        }
    }
    let new_name = backing.as_deref().filter(|b| !b.is_empty());
    if !unsafe_mode {
        if compress {
            return Err(ImgError::Msg(
                "Compressed writes are not supported: rebase without -c".into(),
            ));
        }
        let old = backing_of(&top);
        let new = match new_name {
            None => None,
            Some(name) => {
                let path = resolve(&top, name);
                let opts = image_options(&path, false, a.format2.as_deref())
                    .and_then(|o| {
                        open(
                            o,
                            &secrets,
                            OpenMode {
                                read_only: true,
                                no_io: false,
                                cache: a.src_cache,
                            },
                        )
                    })
                    .map_err(|e| {
                        ImgError::Msg(format!(
                            "Could not open new backing file '{name}': {}",
                            inner(e)
                        ))
                    })?;
                Some(opts.node)
            }
        };
        copy_differences(&top, old.as_ref(), new.as_ref())?;
    }
    change_backing(&top, backing.as_deref(), new_name, a.format2.as_deref())?;
    top.flush()?;
    if progress {
        show_progress(100.0);
        println!();
    }
    Ok(0)
}

/// Rewrites the header; errors as qemu-img words them.
fn change_backing(
    top: &NodeRef,
    given: Option<&str>,
    name: Option<&str>,
    format: Option<&str>,
) -> Result<()> {
    let shown = given.unwrap_or("(null)");
    if name.is_some() && format.is_none() {
        return Err(ImgError::Msg(format!(
            "Could not change the backing file to '{shown}': backing format must be specified"
        )));
    }
    top.change_backing_file(name, format).map_err(|e| {
        let why = match &e {
            BlockError::Qcow2 {
                source: block::qcow2::Qcow2Error::HeaderFull,
                ..
            } => {
                return ImgError::Msg(format!(
                "Could not change the backing file to '{shown}': No space left in the file header"
            ))
            }
            BlockError::Io { source, .. } => strerror(source),
            other if other.kind() == ErrorKind::NotSupported => "Operation not supported".into(),
            other => other.to_string(),
        };
        ImgError::Msg(format!(
            "Could not change the backing file to '{shown}': {why}"
        ))
    })
}

/// For every cluster the image does not allocate itself, where the old and
/// the new backing chain read differently: the old content, written into the
/// image (whole clusters, as qemu-img 10 does to avoid partial copy-on-write).
fn copy_differences(top: &NodeRef, old: Option<&NodeRef>, new: Option<&NodeRef>) -> Result<()> {
    let size = top.size();
    let old_size = old.map_or(0, |n| n.size());
    let new_size = new.map_or(0, |n| n.size());
    let cluster = cluster_size(top);
    let mut buf_old = vec![0u8; IO_BUF_SIZE as usize];
    let mut buf_new = vec![0u8; IO_BUF_SIZE as usize];
    let mut offset = 0;
    while offset < size {
        let want = IO_BUF_SIZE.min(size - offset);
        let st = top.block_status(offset, want).map_err(|e| {
            ImgError::Msg(format!(
                "error while reading image metadata: {}",
                describe(&e)
            ))
        })?;
        let mut n = st.len.clamp(1, want);
        if st.allocated {
            offset += n;
            continue;
        }
        // Whole clusters where possible: a run that ends inside a cluster is
        // cut back to the cluster boundary (the rest comes next round).
        let end = offset + n;
        if end < size && end % cluster != 0 && end - end % cluster > offset {
            n = end - end % cluster - offset;
        }
        read_side(old, old_size, offset, &mut buf_old[..n as usize])
            .map_err(|_| ImgError::Msg("error while reading from old backing file".into()))?;
        read_side(new, new_size, offset, &mut buf_new[..n as usize])
            .map_err(|_| ImgError::Msg("error while reading from new backing file".into()))?;
        let mut at = 0u64;
        while at < n {
            let c_end = ((offset + at) / cluster + 1) * cluster - offset;
            let len = c_end.min(n) - at;
            let (s, e) = (at as usize, (at + len) as usize);
            if buf_old[s..e] != buf_new[s..e] {
                // Zero clusters need a backing node to make sense: without
                // one open, zeros are written as data.
                let r = if offset + at >= old_size && old.is_some() {
                    top.write_zeroes(offset + at, len)
                } else {
                    top.write_at(offset + at, &buf_old[s..e])
                };
                r.map_err(|e| {
                    ImgError::Msg(format!(
                        "Error while writing to COW image: {}",
                        describe(&e)
                    ))
                })?;
            }
            at += len;
        }
        offset += n;
    }
    Ok(())
}

/// Reads `buf` at `offset` from one side of the comparison: zeros beyond the
/// end of its chain (or when there is none).
fn read_side(node: Option<&NodeRef>, size: u64, offset: u64, buf: &mut [u8]) -> block::Result<()> {
    buf.fill(0);
    let Some(node) = node else {
        return Ok(());
    };
    if offset >= size {
        return Ok(());
    }
    let n = (size - offset).min(buf.len() as u64) as usize;
    node.read_at(offset, &mut buf[..n])
}

/// A failed open of a backing file in qemu-img's words.
pub(crate) fn qemu_open_error(e: ImgError) -> ImgError {
    match e {
        ImgError::Block(BlockError::Backing { path, source }) => match *source {
            BlockError::Io { source, .. } => ImgError::Msg(format!(
                "Could not open backing file: Could not open '{path}': {}",
                strerror(&source)
            )),
            other => ImgError::Block(BlockError::Backing {
                path,
                source: Box::new(other),
            }),
        },
        other => other,
    }
}

/// `-f FMT` naming no driver: qemu-img's refusal.
pub(crate) fn check_format(spec: &str, format: Option<&str>) -> Result<()> {
    match format {
        Some(f) if block::blockdev::driver_keys(f).is_none() => {
            Err(ImgError::Msg(format!("Unknown driver '{f}'")).opening(spec))
        }
        _ => Ok(()),
    }
}

/// The backing node of `node`, if it has one open.
pub(crate) fn backing_of(node: &NodeRef) -> Option<NodeRef> {
    node.children()
        .into_iter()
        .find(|(role, _)| *role == "backing")
        .map(|(_, n)| n)
}

/// The host file name of a format node (its `file` child's).
pub(crate) fn file_name(node: &NodeRef) -> Option<String> {
    if let Some(f) = node.filename() {
        return Some(f.to_string());
    }
    node.children()
        .into_iter()
        .find(|(role, _)| *role == "file")
        .and_then(|(_, n)| n.filename().map(str::to_string))
}

/// The cluster size of a qcow2 node (64 KiB when it says none).
fn cluster_size(node: &NodeRef) -> u64 {
    node.image_info()
        .get("cluster-size")
        .and_then(Value::as_u64)
        .filter(|&c| c.is_power_of_two())
        .unwrap_or(65536)
}

/// A backing file name as QEMU resolves it: relative to the overlay's folder.
fn resolve(top: &NodeRef, name: &str) -> String {
    if Path::new(name).is_absolute() {
        return name.to_string();
    }
    match file_name(top)
        .as_deref()
        .map(Path::new)
        .and_then(Path::parent)
    {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(name).to_string_lossy().into_owned(),
        _ => name.to_string(),
    }
}

/// The reason of a failed open, without the outer "Could not open" that
/// [`ImgError::opening`] adds.
fn inner(e: ImgError) -> String {
    match e {
        ImgError::Open { source, .. } => source.to_string(),
        ImgError::Block(BlockError::Io { what, source }) => {
            format!("{what}: {}", strerror(&source))
        }
        other => other.to_string(),
    }
}

/// An I/O error in strerror's words, others as they are.
pub(crate) fn describe(e: &BlockError) -> String {
    match e {
        BlockError::Io { source, .. } => strerror(source),
        other => other.to_string(),
    }
}

/// qemu-img's progress line.
pub(crate) fn show_progress(pct: f64) {
    print!("    ({pct:.2}/100%)\r");
    let _ = std::io::stdout().flush();
}

/// Prints a command-line error as qemu-img does (two lines); exit status 1.
fn usage_error(msg: &str) -> u8 {
    super::error_line(format_args!("{msg}"));
    eprintln!("Try '{} rebase --help' for more info", super::invoked());
    1
}
