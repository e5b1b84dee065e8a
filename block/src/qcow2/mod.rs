//! The qcow2 format driver: versions 2 and 3, cluster sizes 512 B to 2 MiB,
//! refcount widths 1 to 64 bits, backing files, compressed clusters (zlib
//! and zstd, read and written), extended L2 entries (read), lazy refcounts, crash-safe
//! allocation, image creation and `qemu-img check`-style checking.
//!
//! Follows QEMU's `docs/interop/qcow2.txt`.

mod alloc;
mod backing_change;
mod cache;
pub mod check;
mod compress;
mod compress_write;
pub mod create;
pub mod crypt;
mod error;
pub mod header;
mod imrt;
mod inflight;
mod io;
mod layout;
pub mod measure;
mod meta;
pub mod node;
mod overlap;
mod rebuild;
mod resize;
mod snapshot;
mod snapshot_ops;
mod status;
mod storage;
#[cfg(test)]
mod tests;
mod write;

pub use check::{check, CheckReport, Repair};
pub use create::{create, create_on, CreateOptions, Preallocation};
pub use error::Qcow2Error;
pub use header::{CompressionType, Header};
pub use node::{Backing, Qcow2Node, Qcow2Options};
pub use snapshot::SnapshotInfo;
