//! Resizing nodes as QEMU's `bdrv_co_truncate` does: the preallocation modes
//! of the new bytes and the refusals, worded as QEMU words them.

/// How the bytes a resize adds are allocated (QEMU's `PreallocMode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Prealloc {
    /// Nothing is allocated: the new bytes are a hole.
    #[default]
    Off,
    /// qcow2: L2 tables and data clusters are allocated, not written.
    Metadata,
    /// Host blocks are reserved (`fallocate`), not written.
    Falloc,
    /// The new bytes are written (zeros).
    Full,
}

impl Prealloc {
    /// Parses QEMU's name of a mode (`off`, `metadata`, `falloc`, `full`).
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "off" => Self::Off,
            "metadata" => Self::Metadata,
            "falloc" => Self::Falloc,
            "full" => Self::Full,
            _ => return None,
        })
    }

    /// QEMU's name of the mode.
    pub fn name(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Metadata => "metadata",
            Self::Falloc => "falloc",
            Self::Full => "full",
        }
    }
}

/// Why a resize was refused (QEMU's messages).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResizeError {
    /// qcow2 sizes are whole sectors.
    #[error("The new size must be a multiple of 512")]
    Unaligned,
    /// Version 2 images do not record the size of their snapshots.
    #[error("Can't resize a v2 image which has snapshots")]
    V2Snapshots,
    /// Shrinking with a preallocation mode other than `off`.
    #[error("Preallocation can't be used for shrinking an image")]
    ShrinkPreallocated,
    /// The driver cannot preallocate this way.
    #[error("Unsupported preallocation mode: {}", .0.name())]
    UnsupportedPrealloc(Prealloc),
    /// A `raw` node with an explicit `size` option.
    #[error("Cannot resize fixed-size raw disks")]
    FixedSizeRaw,
    /// The size plus the driver's own offset overflows.
    #[error("The requested size is too large")]
    TooLarge,
    /// The L1 table would exceed QEMU's limit (32 MiB).
    #[error("Failed to grow the L1 table: File too large")]
    L1TooLarge,
}
