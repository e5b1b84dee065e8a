//! Arbitrary bytes as a LUKS2 header: both binary headers, their checksums and
//! the JSON metadata go through `Luks2Header::read`; a header that parses is
//! unlocked with the passphrase `fuzz` (the seeds' one, `fuzz/seeds.sh`) when its
//! key derivation is cheap (PBKDF2 iterations clamped, Argon2 at most 64 MiB and
//! 4 passes), so no input makes a run slow or large.
//!
//! Input: one byte of flags (bit 0: the header is detached), then the header image.
#![no_main]

use block::luks::luks2::{keyslot, Kdf, Luks2Header};
use cryptvm_fuzz::Input;
use libfuzzer_sys::fuzz_target;

/// PBKDF2 iterations allowed over all tried slots.
const KDF_LIMIT: u64 = 20_000;

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let flags = input.u8();
    let image = input.rest();
    let mut read = |off: u64, buf: &mut [u8]| -> std::io::Result<()> {
        let start = usize::try_from(off).map_err(std::io::Error::other)?;
        let src = image
            .get(start..start.saturating_add(buf.len()))
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    };
    let size = image.len() as u64;
    let Ok(header) = Luks2Header::read(&mut read, size, flags & 1 != 0) else {
        return;
    };
    let cheap = header.meta.keyslots.values().all(|k| match k.kdf {
        Kdf::Pbkdf2 { .. } => true,
        Kdf::Argon2 {
            time, memory_kib, ..
        } => time <= 4 && memory_kib <= 64 << 10,
    });
    if cheap {
        let _ = keyslot::unlock(&header.meta, b"fuzz", &mut read, size, KDF_LIMIT);
    }
});
