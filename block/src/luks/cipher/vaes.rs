//! AES-XTS over whole 512-byte sectors with VAES and VPCLMULQDQ on 512-bit
//! vectors (AVX-512): the only module of the cipher code with `unsafe`
//! (the loads and stores through the buffer pointers, and calling the
//! `#[target_feature]` functions once the CPU is known to have them).
//!
//! A vector holds four blocks, so a sector is eight vectors, all in flight
//! through the rounds together. The tweak costs no extra pass: the input is
//! XORed with the tweak and round key 0 in one three-way XOR, and the last
//! round uses (last round key ^ tweak), which AESENCLAST/AESDECLAST XOR in
//! anyway. The tweak of block `i` is `T * x^i` (`i < 32`), computed from the
//! sector tweak `T` with shifts and one carry-less multiply by the reduction
//! polynomial per vector. The sector tweaks `T` (the IVs encrypted with the
//! second key) are computed for up to 32 sectors at once.
//!
//! The key schedule is FIPS-197 key expansion with SubWord done by
//! AESENCLAST (no table lookups); the decryption schedule is the equivalent
//! inverse cipher's (AESIMC of the middle round keys).

use std::arch::x86_64::*;

use zeroize::{Zeroize, ZeroizeOnDrop};

/// Bytes in a sector.
const SECTOR: usize = 512;
/// Sectors whose tweaks are computed together.
const BATCH: usize = 32;

/// Whether this CPU has every instruction the kernel uses.
pub(super) fn supported() -> bool {
    is_x86_feature_detected!("aes")
        && is_x86_feature_detected!("sse4.1")
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("vaes")
        && is_x86_feature_detected!("vpclmulqdq")
}

/// Up to 15 round keys, each a little-endian 128-bit number (byte 0 of the
/// round key is the low byte).
#[derive(Zeroize, ZeroizeOnDrop)]
struct Schedule([u128; 15]);

/// XTS-AES (128, 192 or 256-bit keys), keyed. Only built when the CPU has
/// the instructions ([`supported`]): holding one is the proof that the
/// `#[target_feature]` functions below may run.
pub(super) struct XtsAes {
    /// Data key, encryption round keys.
    enc: Schedule,
    /// Data key, equivalent inverse cipher round keys (in decryption order).
    dec: Schedule,
    /// Tweak key, encryption round keys.
    tweak: Schedule,
    /// 10, 12 or 14.
    rounds: usize,
}

impl XtsAes {
    /// XTS from the data key and the tweak key (16, 24 or 32 bytes each,
    /// the same length), or `None` when the CPU lacks VAES/AVX-512 or the
    /// key lengths do not fit.
    pub(super) fn new(data_key: &[u8], tweak_key: &[u8]) -> Option<Self> {
        if !matches!(data_key.len(), 16 | 24 | 32)
            || tweak_key.len() != data_key.len()
            || !supported()
        {
            return None;
        }
        // SAFETY: supported() found AES-NI and SSE4.1 on this CPU.
        let (enc, dec, rounds) = unsafe { expand(data_key) };
        // SAFETY: as above.
        let (tweak, _, _) = unsafe { expand(tweak_key) };
        Some(XtsAes {
            enc,
            dec,
            tweak,
            rounds,
        })
    }

    /// Encrypts (or decrypts) `buf` in place: sector `i` of `buf` has the
    /// IV `ivs[i]` (a little-endian number, before the tweak key).
    ///
    /// # Panics
    /// If `buf` is not `ivs.len()` sectors long.
    pub(super) fn apply_in_place(&self, ivs: &[u128], buf: &mut [u8], encrypt: bool) {
        assert_eq!(buf.len(), ivs.len() * SECTOR, "XTS buffer and IV count");
        let p = buf.as_mut_ptr();
        // SAFETY: `p` is valid for reads and writes of `buf.len()` bytes,
        // which is `ivs.len()` sectors, and source and destination are the
        // same; `self` exists, so the CPU has the instructions.
        unsafe { self.run(ivs, p.cast_const(), p, encrypt) }
    }

    /// Encrypts (or decrypts) `src` into `dst`, as
    /// [`XtsAes::apply_in_place`] does in place.
    ///
    /// # Panics
    /// If `src` or `dst` is not `ivs.len()` sectors long.
    pub(super) fn apply_to(&self, ivs: &[u128], src: &[u8], dst: &mut [u8], encrypt: bool) {
        assert_eq!(src.len(), ivs.len() * SECTOR, "XTS source and IV count");
        assert_eq!(dst.len(), src.len(), "XTS source and destination lengths");
        // SAFETY: `src` is valid for reads and `dst` for writes of
        // `ivs.len()` sectors, and a shared and a mutable borrow never
        // overlap; `self` exists, so the CPU has the instructions.
        unsafe { self.run(ivs, src.as_ptr(), dst.as_mut_ptr(), encrypt) }
    }

    /// # Safety
    /// `src` must be valid for reads and `dst` for writes of `ivs.len()`
    /// sectors, and the two must be equal or not overlap; the CPU must have
    /// the instructions of [`supported`].
    unsafe fn run(&self, ivs: &[u128], src: *const u8, dst: *mut u8, encrypt: bool) {
        // SAFETY: the caller's contract is the kernels'.
        unsafe {
            match (self.rounds, encrypt) {
                (10, true) => xts::<10, true>(self, ivs, src, dst),
                (10, false) => xts::<10, false>(self, ivs, src, dst),
                (12, true) => xts::<12, true>(self, ivs, src, dst),
                (12, false) => xts::<12, false>(self, ivs, src, dst),
                (14, true) => xts::<14, true>(self, ivs, src, dst),
                (14, false) => xts::<14, false>(self, ivs, src, dst),
                _ => unreachable!("AES has 10, 12 or 14 rounds"),
            }
        }
    }

    /// Plain AES of one block with the data key's schedules (tests compare
    /// the key expansion with the `aes` crate through this).
    #[cfg(test)]
    pub(super) fn aes_block(&self, block: u128, encrypt: bool) -> u128 {
        // SAFETY: `self` exists, so the CPU has AES-NI and SSE4.1.
        unsafe { aes_block(self, block, encrypt) }
    }
}

/// A little-endian 128-bit number as a vector (byte 0 = low byte).
#[target_feature(enable = "sse2")]
fn to_m128(x: u128) -> __m128i {
    _mm_set_epi64x((x >> 64) as u64 as i64, x as u64 as i64)
}

/// The inverse of [`to_m128`].
#[target_feature(enable = "sse4.1")]
fn from_m128(v: __m128i) -> u128 {
    let lo = _mm_cvtsi128_si64(v) as u64;
    let hi = _mm_extract_epi64::<1>(v) as u64;
    (u128::from(hi) << 64) | u128::from(lo)
}

/// SubWord of FIPS-197: the S-box on each byte of `w`. AESENCLAST with a
/// zero key is SubBytes then ShiftRows; with all four columns equal,
/// ShiftRows changes nothing.
#[target_feature(enable = "aes")]
fn sub_word(w: u32) -> u32 {
    let v = _mm_set1_epi32(w as i32);
    _mm_cvtsi128_si32(_mm_aesenclast_si128(v, _mm_setzero_si128())) as u32
}

/// FIPS-197 key expansion of a 16, 24 or 32-byte key: the encryption and
/// decryption schedules and the number of rounds.
#[target_feature(enable = "aes,sse4.1")]
fn expand(key: &[u8]) -> (Schedule, Schedule, usize) {
    let nk = key.len() / 4;
    let rounds = nk + 6;
    let mut w = [0u32; 60];
    for (word, bytes) in w.iter_mut().zip(key.chunks_exact(4)) {
        *word = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    }
    let mut rcon = 1u32;
    for i in nk..4 * (rounds + 1) {
        let mut t = w[i - 1];
        if i % nk == 0 {
            // RotWord moves byte 0 to the top: a right rotation of the
            // little-endian word.
            t = sub_word(t.rotate_right(8)) ^ rcon;
            rcon = (rcon << 1) ^ if rcon & 0x80 != 0 { 0x11b } else { 0 };
        } else if nk > 6 && i % nk == 4 {
            t = sub_word(t);
        }
        w[i] = w[i - nk] ^ t;
    }
    let mut enc = Schedule([0; 15]);
    for (r, k) in enc.0.iter_mut().enumerate().take(rounds + 1) {
        *k = (0..4).fold(0u128, |acc, j| acc | u128::from(w[4 * r + j]) << (32 * j));
    }
    w.zeroize();
    let mut dec = Schedule([0; 15]);
    dec.0[0] = enc.0[rounds];
    for r in 1..rounds {
        dec.0[r] = from_m128(_mm_aesimc_si128(to_m128(enc.0[rounds - r])));
    }
    dec.0[rounds] = enc.0[0];
    (enc, dec, rounds)
}

/// Plain AES of one block (see [`XtsAes::aes_block`]).
#[cfg(test)]
#[target_feature(enable = "aes,sse4.1")]
fn aes_block(x: &XtsAes, block: u128, encrypt: bool) -> u128 {
    let s = if encrypt { &x.enc } else { &x.dec };
    let mut v = _mm_xor_si128(to_m128(block), to_m128(s.0[0]));
    for r in 1..x.rounds {
        v = if encrypt {
            _mm_aesenc_si128(v, to_m128(s.0[r]))
        } else {
            _mm_aesdec_si128(v, to_m128(s.0[r]))
        };
    }
    v = if encrypt {
        _mm_aesenclast_si128(v, to_m128(s.0[x.rounds]))
    } else {
        _mm_aesdeclast_si128(v, to_m128(s.0[x.rounds]))
    };
    from_m128(v)
}

/// Round keys, each in all four lanes.
type Keys = [__m512i; 15];

/// The round keys of `s`, broadcast.
#[target_feature(enable = "avx512f")]
fn broadcast(s: &Schedule) -> Keys {
    let mut k = [_mm512_setzero_si512(); 15];
    for (v, &rk) in k.iter_mut().zip(&s.0) {
        *v = _mm512_broadcast_i32x4(to_m128(rk));
    }
    k
}

/// Encrypts `N` vectors with `R` rounds.
#[inline]
#[target_feature(enable = "avx512f,vaes")]
fn encrypt_n<const R: usize, const N: usize>(x: &mut [__m512i; N], k: &Keys) {
    for v in x.iter_mut() {
        *v = _mm512_xor_si512(*v, k[0]);
    }
    for key in &k[1..R] {
        for v in x.iter_mut() {
            *v = _mm512_aesenc_epi128(*v, *key);
        }
    }
    for v in x.iter_mut() {
        *v = _mm512_aesenclast_epi128(*v, k[R]);
    }
}

/// The sector tweaks of `ivs` (at most [`BATCH`]): `E(iv)` with the tweak
/// key, four sectors per vector (lane `j` of vector `i` is sector `4i + j`).
#[inline]
#[target_feature(enable = "avx512f,vaes")]
fn sector_tweaks<const R: usize>(tk: &Keys, ivs: &[u128]) -> [__m512i; BATCH / 4] {
    let mut t = [_mm512_setzero_si512(); BATCH / 4];
    for (v, four) in t.iter_mut().zip(ivs.chunks(4)) {
        let mut q = [0i64; 8];
        for (j, iv) in four.iter().enumerate() {
            q[2 * j] = *iv as u64 as i64;
            q[2 * j + 1] = (*iv >> 64) as u64 as i64;
        }
        *v = _mm512_set_epi64(q[7], q[6], q[5], q[4], q[3], q[2], q[1], q[0]);
    }
    let used = ivs.len().div_ceil(4);
    if used > 2 {
        // Eight vectors interleaved; unused lanes encrypt zeros.
        encrypt_n::<R, { BATCH / 4 }>(&mut t, tk);
    } else {
        for v in &mut t[..used] {
            let mut one = [*v];
            encrypt_n::<R, 1>(&mut one, tk);
            *v = one[0];
        }
    }
    t
}

/// Lane `j` of `v` in all four lanes.
#[inline]
#[target_feature(enable = "avx512f")]
fn lane(v: __m512i, j: usize) -> __m512i {
    let lo = 2 * j as i64;
    let hi = lo + 1;
    _mm512_permutexvar_epi64(_mm512_set_epi64(hi, lo, hi, lo, hi, lo, hi, lo), v)
}

/// The tweaks of blocks `4i .. 4i + 4` of a sector whose tweak `T` is in
/// every lane of `t`: lane `j` is `T * x^(4i + j)` in GF(2^128) (XTS's
/// little-endian convention, polynomial x^128 + x^7 + x^2 + x + 1).
///
/// For a shift `n < 64`, the top `n` bits of the low half move into the
/// high half, and the top `n` bits of the high half (times x^128) reduce to
/// a carry-less product with 0x87, which fits the low half (`n + 7 < 64`).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
fn block_tweaks(t: __m512i, i: usize) -> __m512i {
    let n = 4 * i as i64;
    let left = _mm512_set_epi64(n + 3, n + 3, n + 2, n + 2, n + 1, n + 1, n, n);
    let right = _mm512_sub_epi64(_mm512_set1_epi64(64), left);
    // Per 64-bit half: the bits shifted out (a shift by 64 gives 0).
    let out = _mm512_srlv_epi64(t, right);
    let shifted = _mm512_sllv_epi64(t, left);
    let into_high = _mm512_bslli_epi128::<8>(out);
    let reduced = _mm512_clmulepi64_epi128::<0x01>(out, _mm512_set1_epi64(0x87));
    _mm512_ternarylogic_epi64::<0x96>(shifted, into_high, reduced)
}

/// XTS over `ivs.len()` sectors from `src` to `dst`.
///
/// # Safety
/// As [`XtsAes::run`].
#[target_feature(enable = "avx512f,avx512bw,vaes,vpclmulqdq")]
unsafe fn xts<const R: usize, const ENC: bool>(
    x: &XtsAes,
    ivs: &[u128],
    src: *const u8,
    dst: *mut u8,
) {
    let k = broadcast(if ENC { &x.enc } else { &x.dec });
    let tk = broadcast(&x.tweak);
    for (c, chunk) in ivs.chunks(BATCH).enumerate() {
        let t = sector_tweaks::<R>(&tk, chunk);
        for s in 0..chunk.len() {
            let tweak = lane(t[s / 4], s % 4);
            let at = (c * BATCH + s) * SECTOR;
            // SAFETY: sector `c * BATCH + s` is one of the `ivs.len()`
            // sectors the caller vouches for.
            unsafe { sector::<R, ENC>(&k, tweak, src.add(at), dst.add(at)) };
        }
    }
}

/// `[e(0), e(1), .., e(7)]` for the expression `e(i)`: the eight vectors
/// of a sector, written out so that they stay in registers.
macro_rules! per_vector {
    ($i:ident => $e:expr) => {
        per_vector!(@ $i => $e; 0 1 2 3 4 5 6 7)
    };
    (@ $i:ident => $e:expr; $($n:literal)*) => {
        [$({ let $i = $n; $e }),*]
    };
}

/// XTS of one sector: eight vectors through the rounds together.
///
/// # Safety
/// `src` must be valid for reads and `dst` for writes of [`SECTOR`] bytes,
/// equal or not overlapping.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,vaes,vpclmulqdq")]
unsafe fn sector<const R: usize, const ENC: bool>(
    k: &Keys,
    tweak: __m512i,
    src: *const u8,
    dst: *mut u8,
) {
    let tw = per_vector!(i => block_tweaks(tweak, i));
    // SAFETY: bytes 64i .. 64i + 64 of the sector are readable.
    let data = per_vector!(i => unsafe { _mm512_loadu_si512(src.add(64 * i).cast()) });
    let mut x = per_vector!(i => _mm512_ternarylogic_epi64::<0x96>(data[i], tw[i], k[0]));
    let last = per_vector!(i => _mm512_xor_si512(tw[i], k[R]));
    for key in &k[1..R] {
        for v in x.iter_mut() {
            *v = if ENC {
                _mm512_aesenc_epi128(*v, *key)
            } else {
                _mm512_aesdec_epi128(*v, *key)
            };
        }
    }
    for (i, (v, l)) in x.iter().zip(&last).enumerate() {
        let out = if ENC {
            _mm512_aesenclast_epi128(*v, *l)
        } else {
            _mm512_aesdeclast_epi128(*v, *l)
        };
        // SAFETY: bytes 64i .. 64i + 64 of the sector are writable; the
        // source bytes were all read above.
        unsafe { _mm512_storeu_si512(dst.add(64 * i).cast(), out) };
    }
}
