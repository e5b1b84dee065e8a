//! The `file` protocol driver: a host file or block device.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::aligned::AlignedBuf;
use crate::blockdev::{Common, DriverKeys};
use crate::node::{
    check_range, total_len, write_zeroes_by_writing, BlockNode, BlockStatus, HostMapping,
};
use crate::options::Opts;
use crate::resize::{Prealloc, ResizeError};
use crate::{BlockError, Result, WriteTurn};

/// Alignment of buffers, offsets and lengths for `cache.direct` (O_DIRECT).
const DIRECT_ALIGN: usize = crate::aligned::ALIGN;

/// A host file opened for the block graph.
#[derive(Debug)]
pub struct FileNode {
    file: File,
    filename: String,
    /// Current size; grows when a format driver writes past the end.
    size: AtomicU64,
    read_only: bool,
    direct: bool,
    no_flush: bool,
    unmap: bool,
    /// With O_DIRECT, an unaligned write is a read-modify-write of whole
    /// blocks: it holds this exclusively, other writes hold it shared, so no
    /// write to a block lands between its read and its write (as QEMU
    /// serialises such requests).
    rmw: RwLock<()>,
}

impl FileNode {
    /// The options of a `file` (and `host_device`) node.
    pub const KEYS: DriverKeys = DriverKeys {
        keys: &["filename", "aio", "locking"],
        required: &["filename"],
        children: &[],
    };

    /// Opens a `file` node from its driver-specific options.
    pub fn open(o: &mut Opts, common: &Common, base_dir: Option<&Path>) -> Result<Self> {
        let filename = o.req_str("filename")?;
        for (key, allowed) in [
            ("aio", &["threads", "native", "io_uring"][..]),
            ("locking", &["auto", "on", "off"][..]),
        ] {
            if let Some(v) = o.str(key)? {
                if !allowed.contains(&v.as_str()) {
                    return Err(o.error(
                        key,
                        format!(
                            "invalid value '{v}' (expected one of {})",
                            allowed.join(", ")
                        ),
                    ));
                }
            }
        }
        let full = match base_dir {
            Some(dir) => dir.join(&filename),
            None => filename.clone().into(),
        };
        let open = |write: bool| {
            let mut oo = OpenOptions::new();
            oo.read(true).write(write);
            if common.cache_direct {
                oo.custom_flags(libc::O_DIRECT);
            }
            oo.open(&full)
        };
        let (file, read_only) = match open(!common.read_only) {
            Ok(f) => (f, common.read_only),
            Err(e)
                if common.auto_read_only
                    && !common.read_only
                    && e.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                (
                    open(false)
                        .map_err(|e| BlockError::io(format!("Could not open '{filename}'"), e))?,
                    true,
                )
            }
            Err(e) => return Err(BlockError::io(format!("Could not open '{filename}'"), e)),
        };
        let size = device_size(&file)
            .map_err(|e| BlockError::io(format!("reading the size of '{filename}'"), e))?;
        Ok(Self {
            file,
            filename,
            size: AtomicU64::new(size),
            read_only,
            direct: common.cache_direct,
            no_flush: common.cache_no_flush,
            unmap: common.discard_unmap,
            rmw: RwLock::new(()),
        })
    }

    /// Held (shared) by a write that replaces whole blocks, when O_DIRECT.
    fn block_write_guard(&self) -> Option<RwLockReadGuard<'_, ()>> {
        self.direct
            .then(|| self.rmw.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Held (exclusively) by an O_DIRECT read-modify-write.
    fn rmw_guard(&self) -> RwLockWriteGuard<'_, ()> {
        self.rmw.write().unwrap_or_else(|e| e.into_inner())
    }

    fn io_err(&self, what: &str, offset: u64, e: std::io::Error) -> BlockError {
        BlockError::io(format!("{what} '{}' at offset {offset}", self.filename), e)
    }

    /// Whether a scatter-gather request needs no O_DIRECT bounce: every
    /// buffer aligned, and so every buffer's file offset.
    fn all_aligned(&self, offset: u64, bufs: impl Iterator<Item = (usize, *const u8)>) -> bool {
        if !self.direct {
            return true;
        }
        let mut pos = offset;
        for (len, ptr) in bufs {
            if !self.aligned(pos, len, ptr) {
                return false;
            }
            pos += len as u64;
        }
        true
    }

    fn aligned(&self, offset: u64, len: usize, ptr: *const u8) -> bool {
        !self.direct
            || (offset.is_multiple_of(DIRECT_ALIGN as u64)
                && len.is_multiple_of(DIRECT_ALIGN)
                && (ptr as usize).is_multiple_of(DIRECT_ALIGN))
    }

    /// Reads the aligned blocks covering `len` bytes at `offset` into an
    /// aligned bounce buffer (zeros past the end of the file).
    fn read_direct_window(&self, offset: u64, len: usize) -> Result<DirectWindow> {
        let start = offset - offset % DIRECT_ALIGN as u64;
        let head = (offset - start) as usize;
        let span = (head + len).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        let mut buf = AlignedBuf::zeroed(span);
        let valid = read_up_to(&self.file, &mut buf, start)
            .map_err(|e| self.io_err("reading", offset, e))?;
        buf[valid..].fill(0);
        Ok(DirectWindow {
            buf,
            start,
            head,
            valid,
        })
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> std::io::Result<()> {
        let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate only reads its integer arguments; the fd is owned by
        // `self.file` and stays open for the duration of the call.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, l) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

/// Size of a regular file or block device. As in QEMU, a file's size is
/// rounded up to whole sectors; the bytes past its end read as zeros.
fn device_size(file: &File) -> std::io::Result<u64> {
    let meta = file.metadata()?;
    if meta.file_type().is_file() {
        return Ok(meta.len().next_multiple_of(crate::SECTOR_SIZE));
    }
    use std::io::{Seek, SeekFrom};
    let mut f = file;
    f.seek(SeekFrom::End(0))
}

/// Aligned blocks read for an unaligned O_DIRECT request.
struct DirectWindow {
    /// The window: whole blocks.
    buf: AlignedBuf,
    /// File offset of the window.
    start: u64,
    /// Offset of the request within the window.
    head: usize,
    /// Bytes that were in the file.
    valid: usize,
}

impl DirectWindow {
    fn window(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

impl BlockNode for FileNode {
    fn driver(&self) -> &'static str {
        "file"
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(&self.filename, self.size(), offset, buf.len() as u64)?;
        if self.aligned(offset, buf.len(), buf.as_ptr()) {
            let n = read_up_to(&self.file, buf, offset)
                .map_err(|e| self.io_err("reading", offset, e))?;
            // Past the end of a file whose length is not a whole number of sectors.
            buf[n..].fill(0);
            return Ok(());
        }
        let mut b = self.read_direct_window(offset, buf.len())?;
        let head = b.head;
        buf.copy_from_slice(&b.window()[head..head + buf.len()]);
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly(self.filename.clone()));
        }
        // Writing past the end grows the file, as QEMU's file protocol does
        // for format drivers; nodes above check their own (fixed) sizes.
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&end| end <= i64::MAX as u64)
            .ok_or_else(|| BlockError::OutOfRange {
                node: self.filename.clone(),
                offset,
                len: buf.len() as u64,
                size: self.size(),
            })?;
        if self.aligned(offset, buf.len(), buf.as_ptr()) {
            let _blocks = self.block_write_guard();
            self.file
                .write_all_at(buf, offset)
                .map_err(|e| self.io_err("writing", offset, e))?;
            self.size.fetch_max(end, Ordering::AcqRel);
            return Ok(());
        }
        // O_DIRECT with an unaligned request: read-modify-write whole blocks.
        let _rmw = self.rmw_guard();
        let mut b = self.read_direct_window(offset, buf.len())?;
        let (start, head, span) = (b.start, b.head, b.buf.len());
        let window = b.window();
        window[head..head + buf.len()].copy_from_slice(buf);
        // The file's tail may not be block aligned: write only what exists.
        let valid = b.valid.max(head + buf.len());
        let write_len = if valid == span {
            span
        } else {
            valid.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN
        };
        let window = b.window();
        self.file
            .write_all_at(&window[..write_len], start)
            .map_err(|e| self.io_err("writing", offset, e))?;
        // Whole blocks may have gone past the requested end: cut back.
        let size = self.size.fetch_max(end, Ordering::AcqRel).max(end);
        if start + write_len as u64 > size {
            self.file
                .set_len(size)
                .map_err(|e| self.io_err("truncating", offset, e))?;
        }
        Ok(())
    }

    fn read_vectored(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Result<()> {
        check_range(&self.filename, self.size(), offset, total_len(bufs))?;
        if !self.all_aligned(offset, bufs.iter().map(|b| (b.len(), b.as_ptr()))) {
            let mut pos = offset;
            for buf in bufs.iter_mut() {
                self.read_at(pos, buf)?;
                pos += buf.len() as u64;
            }
            return Ok(());
        }
        let mut done = 0usize;
        let n =
            preadv_all(&self.file, bufs, offset).map_err(|e| self.io_err("reading", offset, e))?;
        // Past the end of a file whose length is not a whole number of sectors.
        for buf in bufs.iter_mut() {
            let keep = n.saturating_sub(done).min(buf.len());
            buf[keep..].fill(0);
            done += buf.len();
        }
        Ok(())
    }

    /// A file's layout does not depend on the order of writes: the turn passes at once.
    fn write_in_turn(&self, offset: u64, bufs: &[&[u8]], turn: &dyn WriteTurn) -> Result<()> {
        turn.pass();
        self.write_vectored(offset, bufs)
    }

    fn write_vectored(&self, offset: u64, bufs: &[&[u8]]) -> Result<()> {
        let len = total_len(bufs);
        if self.read_only
            || !self.all_aligned(offset, bufs.iter().map(|b| (b.len(), b.as_ptr())))
            || offset
                .checked_add(len)
                .is_none_or(|end| end > i64::MAX as u64)
        {
            let mut pos = offset;
            for buf in bufs {
                self.write_at(pos, buf)?;
                pos += buf.len() as u64;
            }
            return Ok(());
        }
        let _blocks = self.block_write_guard();
        pwritev_all(&self.file, bufs, offset).map_err(|e| self.io_err("writing", offset, e))?;
        self.size.fetch_max(offset + len, Ordering::AcqRel);
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.no_flush || self.read_only {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|e| BlockError::io(format!("flushing '{}'", self.filename), e))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly(self.filename.clone()));
        }
        check_range(&self.filename, self.size(), offset, len)?;
        if !self.unmap || len == 0 {
            return Ok(());
        }
        // Discard is advisory: a file system without hole punching just keeps the data.
        let _blocks = self.block_write_guard();
        let _ = self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        );
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly(self.filename.clone()));
        }
        check_range(&self.filename, self.size(), offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let blocks = self.block_write_guard();
        if self
            .fallocate(
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
            .is_ok()
            || self
                .fallocate(
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                )
                .is_ok()
        {
            return Ok(());
        }
        drop(blocks);
        write_zeroes_by_writing(self, offset, len)
    }

    fn resize(&self, size: u64) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly(self.filename.clone()));
        }
        self.file.set_len(size).map_err(|e| {
            BlockError::io(format!("resizing '{}' to {size} bytes", self.filename), e)
        })?;
        self.size.store(size, Ordering::Release);
        Ok(())
    }

    /// As QEMU's file-posix truncate: `falloc` reserves the new bytes with
    /// `fallocate`, `full` writes zeros over them; `metadata` is refused.
    fn truncate(&self, size: u64, prealloc: Prealloc) -> Result<()> {
        if prealloc == Prealloc::Off {
            return self.resize(size);
        }
        if prealloc == Prealloc::Metadata {
            return Err(ResizeError::UnsupportedPrealloc(prealloc).into());
        }
        if self.read_only {
            return Err(BlockError::ReadOnly(self.filename.clone()));
        }
        let old = self
            .file
            .metadata()
            .map_err(|e| BlockError::io(format!("reading the size of '{}'", self.filename), e))?
            .len();
        if size < old {
            return Err(ResizeError::ShrinkPreallocated.into());
        }
        let len = size - old;
        // posix_fallocate's way (mode 0 extends the file); where the file
        // system cannot, both modes write zeros.
        if len > 0 && (prealloc == Prealloc::Full || self.fallocate(0, old, len).is_err()) {
            write_zeroes_by_writing(self, old, len)?;
        }
        self.size.store(size, Ordering::Release);
        Ok(())
    }

    fn filename(&self) -> Option<&str> {
        Some(&self.filename)
    }

    /// Holes (SEEK_HOLE) read as zeros, the rest is data; as QEMU's
    /// `raw_co_block_status`, everything is data when the file system cannot tell.
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        check_range("file", self.size(), offset, len)?;
        let (data, end) = extent_at(&self.file, offset).unwrap_or((true, u64::MAX));
        let status = if data {
            BlockStatus::data(len)
        } else {
            BlockStatus::zeros(len)
        };
        Ok(BlockStatus {
            len: end.saturating_sub(offset).min(len),
            host: Some(HostMapping {
                file: self.filename.clone(),
                offset,
            }),
            ..status
        })
    }

    fn allocated_size(&self) -> Option<u64> {
        self.file.metadata().ok().map(|m| m.blocks() * 512)
    }
}

/// The extent of `file` at `offset`, by SEEK_DATA and SEEK_HOLE: whether it
/// is data (else a hole) and where it ends (`u64::MAX` for the hole at the
/// end of the file); `None` when the file system cannot tell.
fn extent_at(file: &File, offset: u64) -> Option<(bool, u64)> {
    let fd = file.as_raw_fd();
    let start = libc::off_t::try_from(offset).ok()?;
    // SAFETY: lseek on a descriptor this node owns; it moves only the file
    // position, which the node's I/O (pread/pwrite) never uses.
    let data = unsafe { libc::lseek(fd, start, libc::SEEK_DATA) };
    if data < 0 {
        let trailing_hole = std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
        return trailing_hole.then_some((false, u64::MAX));
    }
    if data > start {
        return Some((false, data as u64));
    }
    if data < start {
        return None;
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
    (hole > start).then_some((true, hole as u64))
}

/// Reads as much as exists at `offset` (short at end of file).
fn read_up_to(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Most buffers one `preadv`/`pwritev` call takes (Linux's `IOV_MAX`).
const IOV_MAX: usize = 1024;

/// The iovecs of `bufs[first..]`, the first one starting `skip` bytes in.
fn iovecs(bufs: &[(*mut u8, usize)], first: usize, skip: usize) -> Vec<libc::iovec> {
    bufs[first..]
        .iter()
        .take(IOV_MAX)
        .enumerate()
        .map(|(i, &(ptr, len))| {
            let skip = if i == 0 { skip } else { 0 };
            libc::iovec {
                iov_base: ptr.wrapping_add(skip).cast(),
                iov_len: len - skip,
            }
        })
        .collect()
}

/// Moves the position (`first` buffer, `skip` bytes into it) on by `n` bytes.
fn advance(bufs: &[(*mut u8, usize)], first: &mut usize, skip: &mut usize, mut n: usize) {
    while n > 0 && *first < bufs.len() {
        let left = bufs[*first].1 - *skip;
        if n < left {
            *skip += n;
            return;
        }
        n -= left;
        *first += 1;
        *skip = 0;
    }
    while *first < bufs.len() && bufs[*first].1 == 0 {
        *first += 1;
    }
}

/// Runs `op` (`preadv` or `pwritev` at a file offset) over the buffers `raw` from
/// `offset` until every byte is done or `op` returns 0; returns the bytes done.
fn vectored(
    raw: &[(*mut u8, usize)],
    offset: u64,
    op: impl Fn(&[libc::iovec], libc::off_t) -> isize,
) -> std::io::Result<usize> {
    let (mut first, mut skip, mut done) = (0usize, 0usize, 0usize);
    advance(raw, &mut first, &mut skip, 0);
    while first < raw.len() {
        let iov = iovecs(raw, first, skip);
        match op(&iov, (offset + done as u64) as libc::off_t) {
            0 => break,
            n if n > 0 => {
                done += n as usize;
                advance(raw, &mut first, &mut skip, n as usize);
            }
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(done)
}

/// `preadv` until every buffer is full or the file ends; returns the bytes read.
fn preadv_all(file: &File, bufs: &mut [&mut [u8]], offset: u64) -> std::io::Result<usize> {
    let raw: Vec<(*mut u8, usize)> = bufs.iter_mut().map(|b| (b.as_mut_ptr(), b.len())).collect();
    vectored(&raw, offset, |iov, at| {
        // SAFETY: each iovec covers (the rest of) one of `bufs`, which are exclusively
        // borrowed for this call; `iov` outlives the call.
        unsafe { libc::preadv(file.as_raw_fd(), iov.as_ptr(), iov.len() as i32, at) }
    })
}

/// `pwritev` until every buffer is written.
fn pwritev_all(file: &File, bufs: &[&[u8]], offset: u64) -> std::io::Result<()> {
    let raw: Vec<(*mut u8, usize)> = bufs
        .iter()
        .map(|b| (b.as_ptr().cast_mut(), b.len()))
        .collect();
    let done = vectored(&raw, offset, |iov, at| {
        // SAFETY: each iovec covers (the rest of) one of `bufs`, borrowed for this call;
        // pwritev only reads through them.
        unsafe { libc::pwritev(file.as_raw_fd(), iov.as_ptr(), iov.len() as i32, at) }
    })?;
    if done < total_len(bufs) as usize {
        return Err(std::io::ErrorKind::WriteZero.into());
    }
    Ok(())
}

/// Creates (or truncates) a host file of `size` bytes, as `blockdev-create` of a `file` node.
pub fn create_file(path: &Path, size: u64) -> Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| BlockError::io(format!("Could not create '{}'", path.display()), e))?;
    f.set_len(size)
        .map_err(|e| BlockError::io(format!("Could not resize '{}'", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn open(path: &Path, extra: serde_json::Value, common: Common) -> Result<FileNode> {
        let mut v = json!({"filename": path.to_str().unwrap()});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let mut o = Opts::from_value("t", v).unwrap();
        let n = FileNode::open(&mut o, &common, None)?;
        o.finish()?;
        Ok(n)
    }

    #[test]
    fn read_write_zero_and_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        create_file(&p, 1 << 20).unwrap();
        let n = open(&p, json!({}), Common::default()).unwrap();
        assert_eq!(n.size(), 1 << 20);
        n.write_at(100, b"hello").unwrap();
        let mut b = [0u8; 5];
        n.read_at(100, &mut b).unwrap();
        assert_eq!(&b, b"hello");
        n.write_zeroes(0, 4096).unwrap();
        n.read_at(100, &mut b).unwrap();
        assert_eq!(b, [0; 5]);
        assert!(matches!(
            n.read_at((1 << 20) - 2, &mut b),
            Err(BlockError::OutOfRange { .. })
        ));
        assert!(n.write_at(u64::MAX - 1, b"xx").is_err());
    }

    #[test]
    fn block_status_follows_holes_and_data() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        create_file(&p, 1 << 20).unwrap();
        let n = open(&p, json!({}), Common::default()).unwrap();
        n.write_at(256 << 10, &[1u8; 64 << 10]).unwrap();
        let st = n.block_status(0, 1 << 20).unwrap();
        if st.data {
            eprintln!("no SEEK_HOLE on this file system; skipping");
            return;
        }
        assert!(st.zero && st.allocated && st.len <= 256 << 10);
        let st = n.block_status(256 << 10, 768 << 10).unwrap();
        assert!(st.data && !st.zero);
        assert_eq!(st.len, 64 << 10);
        let host = st.host.unwrap();
        assert_eq!(
            (host.offset, host.file),
            (256 << 10, p.display().to_string())
        );
        let st = n.block_status(320 << 10, 4096).unwrap();
        assert!(st.zero && st.len == 4096);
        assert!(n.block_status(1 << 20, 1).is_err());
    }

    #[test]
    fn direct_io_handles_unaligned_requests() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        create_file(&p, 3 * 4096 + 512).unwrap();
        let common = Common {
            cache_direct: true,
            ..Common::default()
        };
        let Ok(n) = open(&p, json!({}), common) else {
            eprintln!("O_DIRECT unsupported on this file system; skipping");
            return;
        };
        let data: Vec<u8> = (0..9000u32).map(|i| i as u8).collect();
        n.write_at(1000, &data).unwrap();
        n.write_at(3 * 4096 + 100, b"tail").unwrap();
        let mut back = vec![0u8; 9000];
        n.read_at(1000, &mut back).unwrap();
        assert_eq!(back, data);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 3 * 4096 + 512);
        let raw = std::fs::read(&p).unwrap();
        assert_eq!(&raw[1000..10000], &data[..]);
        assert_eq!(&raw[3 * 4096 + 100..3 * 4096 + 104], b"tail");
    }

    /// Concurrent O_DIRECT writes of different 512-byte pieces of the same
    /// 4 KiB blocks (each a read-modify-write of the block): none undoes
    /// another.
    #[test]
    fn direct_read_modify_writes_do_not_undo_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let blocks = 16u64;
        create_file(&p, blocks * 4096).unwrap();
        let common = Common {
            cache_direct: true,
            ..Common::default()
        };
        let Ok(n) = open(&p, json!({}), common) else {
            eprintln!("O_DIRECT unsupported on this file system; skipping");
            return;
        };
        for round in 1..=20u8 {
            std::thread::scope(|s| {
                for piece in 0..8u64 {
                    let n = &n;
                    s.spawn(move || {
                        for b in 0..blocks {
                            let v = [round ^ piece as u8; 512];
                            n.write_at(b * 4096 + piece * 512, &v).unwrap();
                        }
                    });
                }
            });
            let raw = std::fs::read(&p).unwrap();
            for (i, sector) in raw.chunks(512).enumerate() {
                let want = round ^ (i % 8) as u8;
                assert!(
                    sector.iter().all(|&x| x == want),
                    "round {round}: sector {i} lost its write"
                );
            }
        }
    }

    #[test]
    fn writes_past_the_end_grow_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        create_file(&p, 4096).unwrap();
        let n = open(&p, json!({}), Common::default()).unwrap();
        n.write_at(8192, b"grown").unwrap();
        assert_eq!(n.size(), 8197);
        let mut b = [1u8; 5];
        n.read_at(4096, &mut b).unwrap();
        assert_eq!(b, [0; 5]);
        n.resize(16384).unwrap();
        assert_eq!(
            (n.size(), std::fs::metadata(&p).unwrap().len()),
            (16384, 16384)
        );
        assert!(matches!(
            n.read_at(16380, &mut b),
            Err(BlockError::OutOfRange { .. })
        ));
        assert!(n.write_at(u64::MAX - 2, b"xx").is_err());
    }

    #[test]
    fn read_only_refuses_writes_and_missing_files_fail() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        create_file(&p, 4096).unwrap();
        let n = open(
            &p,
            json!({}),
            Common {
                read_only: true,
                ..Common::default()
            },
        )
        .unwrap();
        assert!(matches!(n.write_at(0, b"x"), Err(BlockError::ReadOnly(_))));
        let err = open(&dir.path().join("nope"), json!({}), Common::default()).unwrap_err();
        assert!(err.to_string().contains("Could not open"), "{err}");
        assert!(open(&p, json!({"aio": "bogus"}), Common::default()).is_err());
    }
}
