//! XTS (IEEE 1619) over whole 512-byte sectors, for 16-byte block ciphers.
//!
//! The sector's IV (from the IV generator) is the tweak. Sectors are whole
//! blocks: no ciphertext stealing.
//!
//! This is the generic implementation, over any block cipher: all 32 block
//! tweaks of a sector are computed first, so that the data blocks go
//! through the cipher's multi-block path (8 blocks at a time with AES-NI).
//! AES-XTS has a faster one where the CPU has VAES/AVX-512 (`xts_vaes.rs`).

use cipher::consts::U16;
use cipher::{Block, BlockDecrypt, BlockEncrypt, BlockSizeUser};

use super::ivgen::IvGen;
use super::modes::as_blocks;
use super::{check_len_of, sector_number, SectorCipher, SECTOR_SIZE};

/// Blocks in a sector.
const BLOCKS: usize = SECTOR_SIZE / 16;

/// The tweaks of one sector, as little-endian 128-bit numbers.
type Tweaks = [u128; BLOCKS];

/// XTS with `data` encrypting the blocks and `tweak` encrypting the IV.
pub(super) struct Xts<C> {
    data: C,
    tweak: C,
    ivgen: IvGen,
    /// Bytes per sector (one IV each): 512, or up to 4096 for LUKS2.
    sector: usize,
}

impl<C> Xts<C>
where
    C: BlockEncrypt + BlockDecrypt + BlockSizeUser<BlockSize = U16> + Send + Sync,
{
    /// XTS from the two halves of the key, already keyed.
    pub(super) fn new(data: C, tweak: C, ivgen: IvGen) -> Self {
        Xts::with_sector(data, tweak, ivgen, SECTOR_SIZE)
    }

    /// XTS over sectors of `sector` bytes (a multiple of 512): the tweak of
    /// a sector runs on over all its blocks, as dm-crypt's with LUKS2
    /// sector sizes.
    pub(super) fn with_sector(data: C, tweak: C, ivgen: IvGen, sector: usize) -> Self {
        Xts {
            data,
            tweak,
            ivgen,
            sector,
        }
    }

    /// The first tweak of sector `n`: `E_tweak(IV)`.
    fn first_tweak(&self, n: u64) -> u128 {
        let mut t = Block::<C>::default();
        self.ivgen.generate(n, &mut t);
        self.tweak.encrypt_block(&mut t);
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&t);
        u128::from_le_bytes(bytes)
    }

    /// The next [`BLOCKS`] tweaks from `x` (`x * x^i`); returns the one after.
    fn tweaks(mut x: u128, out: &mut Tweaks) -> u128 {
        for slot in out.iter_mut() {
            *slot = x;
            x = mul_x(x);
        }
        x
    }

    fn process(&self, first_sector: u64, buf: &mut [u8], encrypt: bool) {
        check_len_of(buf, self.sector);
        let mut tweaks: Tweaks = [0; BLOCKS];
        for (i, sector) in buf.chunks_exact_mut(self.sector).enumerate() {
            let mut x = self.first_tweak(sector_number(first_sector, i));
            for part in sector.chunks_exact_mut(SECTOR_SIZE) {
                x = Self::tweaks(x, &mut tweaks);
                xor_tweaks(part, &tweaks);
                let blocks = as_blocks::<U16>(part);
                if encrypt {
                    self.data.encrypt_blocks(blocks);
                } else {
                    self.data.decrypt_blocks(blocks);
                }
                xor_tweaks(part, &tweaks);
            }
        }
    }
}

/// Multiplies by the primitive element x in GF(2^128) (polynomial
/// x^128 + x^7 + x^2 + x + 1, little-endian), without branching on the value.
fn mul_x(x: u128) -> u128 {
    (x << 1) ^ ((x >> 127) * 0x87)
}

/// XORs each 16-byte block of `sector` with its tweak.
fn xor_tweaks(sector: &mut [u8], tweaks: &Tweaks) {
    for (chunk, t) in sector.chunks_exact_mut(16).zip(tweaks) {
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u128::from_le_bytes(bytes) ^ t).to_le_bytes());
    }
}

impl<C> SectorCipher for Xts<C>
where
    C: BlockEncrypt + BlockDecrypt + BlockSizeUser<BlockSize = U16> + Send + Sync,
{
    fn encrypt(&self, first_sector: u64, buf: &mut [u8]) {
        self.process(first_sector, buf, true);
    }

    fn decrypt(&self, first_sector: u64, buf: &mut [u8]) {
        self.process(first_sector, buf, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mul_x_carries_into_low_byte() {
        assert_eq!(mul_x(1), 2);
        assert_eq!(mul_x(1 << 127), 0x87);
        assert_eq!(mul_x((1 << 127) | 1), 0x85);
    }
}
