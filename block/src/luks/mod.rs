//! LUKS1 encrypted volumes: the on-disk format (header, key slots,
//! anti-forensic split), the ciphers, and the `luks` block driver.
//!
//! Follows the LUKS 1.2 on-disk format spec, cryptsetup and QEMU's
//! `crypto/block-luks.c`, including QEMU's detached header layout.

mod af;
mod bounce;
mod cipher;
mod create;
pub mod crypto_pool;
mod error;
mod guarded;
mod hash;
mod header;
mod keyslot;
pub mod luks2;
pub mod node;
pub mod shared;

pub use cipher::{
    new_sector_cipher, new_sector_cipher_sized, CipherAlg, CipherMode, CipherSpec, IvGenAlg,
    SectorCipher,
};
pub use create::{
    create, create_with_iterations, payload_offset, write_header_image, write_volume,
    CreateOptions, NewVolume, PbkdfIterations,
};
pub use error::LuksError;
pub use hash::HashAlg;
pub use header::{KeySlot, LuksHeader};
pub use keyslot::{unlock, unlock_within, MasterKey, DEFAULT_KDF_ITERATIONS_LIMIT};
pub use shared::{HeaderSlot, SharedHeaders};
