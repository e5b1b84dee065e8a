//! cryptvm's block layer: a graph of block nodes built from QMP `blockdev-add`
//! arguments, the `file`, `raw` and `luks` drivers, and the secrets that unlock
//! encrypted nodes. Nothing here knows about KVM.

pub mod aligned;
pub mod blockdev;
pub mod create;
pub mod error;
pub mod file;
pub mod graph;
pub mod info;
pub mod keyval;
pub mod luks;
pub mod node;
pub mod options;
pub mod qcow2;
pub mod raw;
pub mod resize;
pub mod secret;
pub mod sector_locks;
pub mod sg;
pub mod snapshot;
pub mod threads;
pub mod write_turn;

pub use error::{BlockError, ErrorKind, GraphError, Result};
pub use graph::BlockGraph;
pub use node::{BlockNode, BlockStatus, HostMapping, NodeRef};
pub use resize::{Prealloc, ResizeError};
pub use secret::SecretStore;
pub use write_turn::{WaitOnly, WriteTurn};

/// Size of the sectors that the LUKS payload and guest-visible disks use.
pub const SECTOR_SIZE: u64 = 512;
