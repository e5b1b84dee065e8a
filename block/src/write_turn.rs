//! Writes whose allocations happen in turn while their data are written at
//! the same time: how `img convert` lays out a new image in source order (as
//! qemu-img's in-order writes do) without waiting for each write to end.
//!
//! A caller gives each write of a sequence a [`WriteTurn`] and calls
//! [`BlockNode::write_in_turn`](crate::BlockNode::write_in_turn); the node
//! that allocates (qcow2) waits for the turn before it allocates and passes
//! it on once it has, then writes the data. Nodes whose layout does not
//! depend on the order of writes (a file) pass the turn at once; nodes that
//! split a write into several child writes (luks) hand all but the last a
//! [`WaitOnly`]. By default a node does the whole write in turn.

use std::io;

use crate::{BlockError, Result};

/// The turn of one write in a sequence of writes that allocate in order.
pub trait WriteTurn: Sync {
    /// Blocks until the writes before this one have allocated what they need.
    /// An error means the sequence was abandoned (another write failed):
    /// the write must not go on.
    fn wait(&self) -> Result<()>;
    /// Lets the next write allocate: this one has made all its allocations.
    /// Calling it again does nothing.
    fn pass(&self);
}

/// A turn that waits but never passes: for every part of a write but its last.
pub struct WaitOnly<'a>(pub &'a dyn WriteTurn);

impl WriteTurn for WaitOnly<'_> {
    fn wait(&self) -> Result<()> {
        self.0.wait()
    }

    fn pass(&self) {}
}

/// The error of a write whose sequence was abandoned before its turn came.
pub fn abandoned() -> BlockError {
    BlockError::io(
        "waiting for the write's turn",
        io::Error::from_raw_os_error(libc::ECANCELED),
    )
}
