//! Starting the writeback of a target's host files early, while a copy is
//! still running, so that the disk writes as the copy goes instead of all at
//! the final flush. A hint only: durability still comes from that flush.

use std::fs::File;
use std::os::unix::io::AsRawFd;

use block::NodeRef;

/// The host files under `node` (its protocol nodes), each opened for the hint.
/// Files that cannot be opened are left out: nothing depends on the hint.
pub fn host_files(node: &NodeRef) -> Vec<File> {
    let mut names = Vec::new();
    collect(node, &mut names);
    names.sort();
    names.dedup();
    names
        .into_iter()
        .filter_map(|n| File::open(n).ok())
        .collect()
}

fn collect(node: &NodeRef, names: &mut Vec<String>) {
    if let Some(f) = node.filename() {
        names.push(f.to_string());
    }
    for (_, child) in node.children() {
        collect(&child, names);
    }
}

/// Asks the kernel to start writing `file`'s dirty pages to its device,
/// without waiting for them.
pub fn start(file: &File) {
    // SAFETY: sync_file_range only reads its integer arguments; the fd is
    // owned by `file`, which outlives the call. Errors (a file system without
    // writeback, such as tmpfs) change nothing and are ignored.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}
