//! AES-XTS through the VAES/AVX-512 kernel of `vaes.rs`, with any IV
//! generator: the IVs of up to 32 sectors are generated, then handed to the
//! kernel. Built only where the CPU has the instructions (see
//! [`XtsAes::new`]); elsewhere AES-XTS is the generic `xts.rs`.

use super::ivgen::IvGen;
use super::vaes::XtsAes;
use super::{check_len, check_same_len, sector_number, SectorCipher, SECTOR_SIZE};

/// AES-XTS through the VAES/AVX-512 kernel.
pub(super) struct FastXts {
    aes: XtsAes,
    ivgen: IvGen,
}

impl FastXts {
    /// The keyed kernel with the IV generator.
    pub(super) fn new(aes: XtsAes, ivgen: IvGen) -> Self {
        FastXts { aes, ivgen }
    }

    /// The IVs of the sectors from `first` on, one per entry of `ivs`.
    fn ivs(&self, first: u64, ivs: &mut [u128]) {
        let mut iv = [0u8; 16];
        for (i, slot) in ivs.iter_mut().enumerate() {
            self.ivgen.generate(sector_number(first, i), &mut iv);
            *slot = u128::from_le_bytes(iv);
        }
    }

    fn process(&self, first_sector: u64, buf: &mut [u8], encrypt: bool) {
        check_len(buf);
        let mut ivs = [0u128; IV_BATCH];
        for (i, chunk) in buf.chunks_mut(IV_BATCH * SECTOR_SIZE).enumerate() {
            let ivs = &mut ivs[..chunk.len() / SECTOR_SIZE];
            self.ivs(sector_number(first_sector, i * IV_BATCH), ivs);
            self.aes.apply_in_place(ivs, chunk, encrypt);
        }
    }
}

/// Sectors whose IVs [`FastXts`] generates at a time.
const IV_BATCH: usize = 32;

impl SectorCipher for FastXts {
    fn encrypt(&self, first_sector: u64, buf: &mut [u8]) {
        self.process(first_sector, buf, true);
    }

    fn decrypt(&self, first_sector: u64, buf: &mut [u8]) {
        self.process(first_sector, buf, false);
    }

    fn encrypt_to(&self, first_sector: u64, src: &[u8], dst: &mut [u8]) {
        check_len(src);
        check_same_len(src, dst);
        let mut ivs = [0u128; IV_BATCH];
        let step = IV_BATCH * SECTOR_SIZE;
        for (i, (s, d)) in src.chunks(step).zip(dst.chunks_mut(step)).enumerate() {
            let ivs = &mut ivs[..s.len() / SECTOR_SIZE];
            self.ivs(sector_number(first_sector, i * IV_BATCH), ivs);
            self.aes.apply_to(ivs, s, d, true);
        }
    }

    #[cfg(test)]
    fn implementation(&self) -> &'static str {
        "vaes"
    }
}
