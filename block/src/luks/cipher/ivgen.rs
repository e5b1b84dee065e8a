//! IV generators: the IV of a sector from its sector number, as QEMU's
//! `crypto/ivgen-*.c` and dm-crypt compute them.

use cipher::generic_array::GenericArray;
use cipher::BlockEncrypt;

/// Encrypts single blocks in place; object safe, for the ESSIV cipher
/// (whose key size may differ from the payload cipher's).
pub(crate) trait BlockEncryptor: Send + Sync {
    /// Encrypts `block` in place; `block` is exactly one cipher block long.
    fn encrypt_one(&self, block: &mut [u8]);
}

impl<C: BlockEncrypt + Send + Sync> BlockEncryptor for C {
    fn encrypt_one(&self, block: &mut [u8]) {
        self.encrypt_block(GenericArray::from_mut_slice(block));
    }
}

/// An IV generator keyed (for ESSIV) once at construction.
pub(crate) enum IvGen {
    /// Sector number truncated to 32 bits, little-endian.
    Plain,
    /// Sector number, 64 bits little-endian.
    Plain64,
    /// `plain64` encrypted with the ESSIV cipher.
    Essiv(Box<dyn BlockEncryptor>),
}

impl IvGen {
    /// Writes the IV of `sector` to `iv`, which is one block of the payload
    /// cipher long (8 or 16 bytes): the sector number, zero padded.
    pub(crate) fn generate(&self, sector: u64, iv: &mut [u8]) {
        iv.fill(0);
        match self {
            IvGen::Plain => {
                // Truncation to 32 bits is what "plain" means.
                let short = (sector & 0xffff_ffff) as u32;
                iv[..4].copy_from_slice(&short.to_le_bytes());
            }
            IvGen::Plain64 => iv[..8].copy_from_slice(&sector.to_le_bytes()),
            IvGen::Essiv(cipher) => {
                iv[..8].copy_from_slice(&sector.to_le_bytes());
                cipher.encrypt_one(iv);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cipher::KeyInit;

    #[test]
    fn plain_truncates_to_32_bits() {
        let mut iv = [0xffu8; 16];
        IvGen::Plain.generate(0x1_2345_6789, &mut iv);
        assert_eq!(
            iv,
            [0x89, 0x67, 0x45, 0x23, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        let mut iv8 = [0xffu8; 8];
        IvGen::Plain.generate(5, &mut iv8);
        assert_eq!(iv8, [5, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn plain64_is_little_endian() {
        let mut iv = [0xffu8; 16];
        IvGen::Plain64.generate(0x0102_0304_0506_0708, &mut iv);
        assert_eq!(iv, [8, 7, 6, 5, 4, 3, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn essiv_encrypts_plain64() {
        let key = [7u8; 32];
        let essiv = IvGen::Essiv(Box::new(aes::Aes256::new_from_slice(&key).unwrap()));
        let mut iv = [0u8; 16];
        essiv.generate(42, &mut iv);
        let mut want = GenericArray::clone_from_slice(&[0u8; 16]);
        want[0] = 42;
        aes::Aes256::new_from_slice(&key)
            .unwrap()
            .encrypt_block(&mut want);
        assert_eq!(&iv[..], &want[..]);
    }
}
