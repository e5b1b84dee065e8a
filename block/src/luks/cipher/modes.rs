//! ECB, CBC and CTR sector ciphers, generic over the block cipher so that
//! each combination is monomorphized; none allocates per sector.

use cipher::generic_array::{ArrayLength, GenericArray};
use cipher::inout::InOutBuf;
use cipher::{Block, BlockDecrypt, BlockEncrypt, BlockSizeUser, Unsigned};
use zeroize::Zeroize;

use super::ivgen::IvGen;
use super::{check_len, check_len_of, sector_number, SectorCipher, SECTOR_SIZE};

/// Views `buf` as whole blocks of `N` bytes (a trailing partial block is
/// left out; sector buffers have none).
pub(super) fn as_blocks<N: ArrayLength<u8>>(buf: &mut [u8]) -> &mut [GenericArray<u8, N>] {
    let (blocks, _tail) = InOutBuf::from(buf).into_chunks::<N>();
    blocks.into_out()
}

/// `dst ^= src`, over the shorter of the two.
pub(super) fn xor_in_place(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d ^= s;
    }
}

/// Fills `out` with the consecutive counter blocks `iv`, `iv + 1`, ...
/// (`iv.len()`-byte big-endian numbers, wrapping around; 8 or 16 bytes).
fn fill_counters(iv: &[u8], out: &mut [u8]) {
    if let Ok(bytes) = <[u8; 16]>::try_from(iv) {
        let start = u128::from_be_bytes(bytes);
        for (i, chunk) in (0u128..).zip(out.chunks_exact_mut(16)) {
            chunk.copy_from_slice(&start.wrapping_add(i).to_be_bytes());
        }
    } else if let Ok(bytes) = <[u8; 8]>::try_from(iv) {
        let start = u64::from_be_bytes(bytes);
        for (i, chunk) in (0u64..).zip(out.chunks_exact_mut(8)) {
            chunk.copy_from_slice(&start.wrapping_add(i).to_be_bytes());
        }
    } else {
        unreachable!("block ciphers here have 8 or 16-byte blocks");
    }
}

/// Electronic codebook: every block on its own, no IV.
pub(super) struct Ecb<C> {
    cipher: C,
}

impl<C> Ecb<C> {
    pub(super) fn new(cipher: C) -> Self {
        Ecb { cipher }
    }
}

impl<C: BlockEncrypt + BlockDecrypt + Send + Sync> SectorCipher for Ecb<C> {
    fn encrypt(&self, _first_sector: u64, buf: &mut [u8]) {
        check_len(buf);
        self.cipher.encrypt_blocks(as_blocks::<C::BlockSize>(buf));
    }

    fn decrypt(&self, _first_sector: u64, buf: &mut [u8]) {
        check_len(buf);
        self.cipher.decrypt_blocks(as_blocks::<C::BlockSize>(buf));
    }
}

/// Cipher block chaining, restarted at every sector with that sector's IV.
pub(super) struct Cbc<C> {
    cipher: C,
    ivgen: IvGen,
    /// Bytes per sector (one IV each): 512, or up to 4096 for LUKS2.
    sector: usize,
}

impl<C> Cbc<C> {
    pub(super) fn new(cipher: C, ivgen: IvGen) -> Self {
        Cbc::with_sector(cipher, ivgen, SECTOR_SIZE)
    }

    /// CBC over sectors of `sector` bytes (a multiple of 512), the chain
    /// running over the whole sector.
    pub(super) fn with_sector(cipher: C, ivgen: IvGen, sector: usize) -> Self {
        Cbc {
            cipher,
            ivgen,
            sector,
        }
    }
}

impl<C: BlockEncrypt + BlockDecrypt + Send + Sync> SectorCipher for Cbc<C> {
    fn encrypt(&self, first_sector: u64, buf: &mut [u8]) {
        check_len_of(buf, self.sector);
        let mut chain = Block::<C>::default();
        for (i, sector) in buf.chunks_exact_mut(self.sector).enumerate() {
            let n = sector_number(first_sector, i);
            self.ivgen.generate(n, &mut chain);
            for block in as_blocks::<C::BlockSize>(sector) {
                xor_in_place(block, &chain);
                self.cipher.encrypt_block(block);
                chain.copy_from_slice(block);
            }
        }
    }

    fn decrypt(&self, first_sector: u64, buf: &mut [u8]) {
        check_len_of(buf, self.sector);
        let bs = C::BlockSize::USIZE;
        let mut iv = Block::<C>::default();
        let mut ciphertext = [0u8; SECTOR_SIZE];
        for (i, sector) in buf.chunks_exact_mut(self.sector).enumerate() {
            let n = sector_number(first_sector, i);
            self.ivgen.generate(n, &mut iv);
            // In 512-byte parts; `iv` carries the last ciphertext block of
            // one part into the next.
            for part in sector.chunks_exact_mut(SECTOR_SIZE) {
                ciphertext.copy_from_slice(part);
                // Blocks decrypt independently (and in parallel where the
                // cipher can); then each is XORed with the previous ciphertext.
                self.cipher.decrypt_blocks(as_blocks::<C::BlockSize>(part));
                let (first, rest) = part.split_at_mut(bs);
                xor_in_place(first, &iv);
                xor_in_place(rest, &ciphertext[..SECTOR_SIZE - bs]);
                iv.copy_from_slice(&ciphertext[SECTOR_SIZE - bs..]);
            }
        }
    }
}

/// Counter mode: the sector's IV is the first counter block; the counter is
/// incremented as one big-endian number over the whole block (as dm-crypt's
/// and QEMU's `ctr` do).
pub(super) struct Ctr<C> {
    cipher: C,
    ivgen: IvGen,
}

impl<C> Ctr<C> {
    pub(super) fn new(cipher: C, ivgen: IvGen) -> Self {
        Ctr { cipher, ivgen }
    }
}

impl<C: BlockEncrypt + BlockSizeUser + Send + Sync> Ctr<C> {
    fn apply(&self, first_sector: u64, buf: &mut [u8]) {
        check_len(buf);
        let mut counter = Block::<C>::default();
        let mut keystream = [0u8; SECTOR_SIZE];
        for (i, sector) in buf.chunks_exact_mut(SECTOR_SIZE).enumerate() {
            let n = sector_number(first_sector, i);
            self.ivgen.generate(n, &mut counter);
            fill_counters(&counter, &mut keystream);
            self.cipher
                .encrypt_blocks(as_blocks::<C::BlockSize>(&mut keystream));
            xor_in_place(sector, &keystream);
        }
        // The keystream would decrypt what was just processed (e.g. a key
        // slot's key material): leave none of it on the stack.
        keystream.zeroize();
    }
}

impl<C: BlockEncrypt + BlockSizeUser + Send + Sync> SectorCipher for Ctr<C> {
    fn encrypt(&self, first_sector: u64, buf: &mut [u8]) {
        self.apply(first_sector, buf);
    }

    fn decrypt(&self, first_sector: u64, buf: &mut [u8]) {
        self.apply(first_sector, buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_carry_and_wrap() {
        let mut out = [0u8; 48];
        let mut iv = [0u8; 16];
        iv[14..].copy_from_slice(&[0xff, 0xff]);
        fill_counters(&iv, &mut out);
        assert_eq!(&out[14..16], &[0xff, 0xff]);
        assert_eq!(&out[29..32], &[1, 0, 0]);
        assert_eq!(&out[45..48], &[1, 0, 1]);
        let mut out = [0u8; 16];
        fill_counters(&[0xff; 8], &mut out);
        assert_eq!(out[..8], [0xff; 8]);
        assert_eq!(out[8..], [0; 8]);
    }

    #[test]
    fn as_blocks_views_whole_blocks() {
        let mut buf = [0u8; 40];
        assert_eq!(as_blocks::<cipher::consts::U16>(&mut buf).len(), 2);
        assert_eq!(as_blocks::<cipher::consts::U8>(&mut buf).len(), 5);
    }
}
