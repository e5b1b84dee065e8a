//! The LUKS1 anti-forensic information splitter (AFsplitter): spreads a
//! key over `stripes` times its length, so that the key cannot be recovered
//! unless all of the (large) area is, and erasing any part destroys it.
//!
//! Follows the LUKS1 on-disk format spec and cryptsetup's `lib/luks1/af.c`
//! (which QEMU's `crypto/afsplit.c` mirrors): the stripes are XORed one
//! after the other into an accumulator that is "diffused" after each by
//! hashing it in digest-sized pieces, each prefixed with its index as a
//! 4-byte big-endian number (the last piece may be shorter).

use zeroize::Zeroizing;

use super::error::{random_bytes, LuksError};
use super::hash::{HashAlg, MAX_DIGEST_LEN};

/// Length of the split form of a `key_len`-byte key with `stripes` stripes,
/// or an error when it is zero or does not fit in memory.
pub(crate) fn split_len(key_len: usize, stripes: u32) -> Result<usize, LuksError> {
    let stripes = usize::try_from(stripes).ok().filter(|&s| s > 0);
    stripes
        .zip(Some(key_len).filter(|&k| k > 0))
        .and_then(|(s, k)| s.checked_mul(k))
        .ok_or_else(|| {
            LuksError::InvalidArgument(format!(
                "Invalid anti-forensic split of a {key_len}-byte key into {stripes:?} stripes"
            ))
        })
}

/// Splits `key` into `out[..key.len() * stripes]`, with random stripes
/// from the operating system.
pub(crate) fn split(
    hash: HashAlg,
    key: &[u8],
    stripes: u32,
    out: &mut [u8],
) -> Result<(), LuksError> {
    let len = split_len(key.len(), stripes)?;
    if out.len() < len {
        return Err(LuksError::InvalidArgument(format!(
            "Anti-forensic split needs {len} bytes, buffer has {}",
            out.len()
        )));
    }
    let (random, last) = out[..len].split_at_mut(len - key.len());
    random_bytes(random)?;
    let mut acc = accumulate(hash, random, key.len());
    xor_in_place(&mut acc, key);
    last.copy_from_slice(&acc);
    Ok(())
}

/// Recovers the `key_len`-byte key from its split form
/// `split[..key_len * stripes]`.
pub(crate) fn merge(
    hash: HashAlg,
    split: &[u8],
    stripes: u32,
    key_len: usize,
) -> Result<Zeroizing<Vec<u8>>, LuksError> {
    let len = split_len(key_len, stripes)?;
    if split.len() < len {
        return Err(LuksError::InvalidArgument(format!(
            "Anti-forensic merge needs {len} bytes, got {}",
            split.len()
        )));
    }
    let (stripes_but_last, last) = split[..len].split_at(len - key_len);
    let mut key = accumulate(hash, stripes_but_last, key_len);
    xor_in_place(&mut key, last);
    Ok(key)
}

/// XORs each `block_len` piece of `stripes` into an accumulator, diffusing
/// it after each.
fn accumulate(hash: HashAlg, stripes: &[u8], block_len: usize) -> Zeroizing<Vec<u8>> {
    let mut acc = Zeroizing::new(vec![0u8; block_len]);
    for stripe in stripes.chunks_exact(block_len) {
        xor_in_place(&mut acc, stripe);
        diffuse(hash, &mut acc);
    }
    acc
}

/// Replaces each digest-sized piece `p_i` of `block` with
/// `H(be32(i) || p_i)`, truncated to the piece's length.
fn diffuse(hash: HashAlg, block: &mut [u8]) {
    let mut digest = Zeroizing::new([0u8; MAX_DIGEST_LEN]);
    for (i, piece) in (0u32..).zip(block.chunks_mut(hash.digest_len())) {
        hash.digest_parts_into(&[&i.to_be_bytes(), piece], &mut digest[..]);
        let n = piece.len();
        piece.copy_from_slice(&digest[..n]);
    }
}

fn xor_in_place(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d ^= s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_all_hashes_and_lengths() {
        for hash in HashAlg::ALL {
            for key_len in [16usize, 24, 32, 64, 65, 100] {
                let key: Vec<u8> = (0..key_len).map(|i| (i * 7 + 3) as u8).collect();
                for stripes in [1u32, 2, 4000] {
                    let mut out = vec![0u8; key_len * stripes as usize + 3];
                    split(hash, &key, stripes, &mut out).unwrap();
                    let back = merge(hash, &out, stripes, key_len).unwrap();
                    assert_eq!(&back[..], &key[..], "{} {key_len} {stripes}", hash.name());
                    if stripes > 1 {
                        // Any damage to the split key destroys the key.
                        out[0] ^= 1;
                        let bad = merge(hash, &out, stripes, key_len).unwrap();
                        assert_ne!(&bad[..], &key[..]);
                    }
                }
            }
        }
    }

    #[test]
    fn one_stripe_is_the_key() {
        let key = [9u8; 32];
        let mut out = [0u8; 32];
        split(HashAlg::Sha256, &key, 1, &mut out).unwrap();
        assert_eq!(out, key);
    }

    /// Two stripes, checked by hand: key = s1 ^ diffuse(s0).
    #[test]
    fn diffusion_known_answer() {
        let hash = HashAlg::Sha1;
        // 45 bytes: two whole SHA-1 pieces and a 5-byte tail.
        let s0: Vec<u8> = (0..45u8).collect();
        let s1 = vec![0u8; 45];
        let mut split_key = s0.clone();
        split_key.extend_from_slice(&s1);
        let key = merge(hash, &split_key, 2, 45).unwrap();
        let mut want = Vec::new();
        for (i, piece) in s0.chunks(20).enumerate() {
            let mut input = (i as u32).to_be_bytes().to_vec();
            input.extend_from_slice(piece);
            want.extend_from_slice(&hash.digest(&input)[..piece.len()]);
        }
        assert_eq!(&key[..], &want[..]);
    }

    #[test]
    fn bad_sizes_are_errors() {
        let mut out = [0u8; 10];
        assert!(split(HashAlg::Sha1, &[1; 4], 3, &mut out).is_err());
        assert!(split(HashAlg::Sha1, &[1; 4], 0, &mut out).is_err());
        assert!(split(HashAlg::Sha1, &[], 2, &mut out).is_err());
        assert!(merge(HashAlg::Sha1, &out, 3, 4).is_err());
        assert!(merge(HashAlg::Sha1, &out, 0, 4).is_err());
        assert!(merge(HashAlg::Sha1, &out, u32::MAX, usize::MAX).is_err());
    }
}
