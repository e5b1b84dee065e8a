//! The hash algorithms LUKS1 uses for PBKDF2-HMAC, the anti-forensic
//! splitter's diffusion, and ESSIV.

use digest::Digest;
use zeroize::Zeroize;

use super::error::LuksError;

/// Largest digest of any [`HashAlg`] (SHA-512), in bytes.
pub(crate) const MAX_DIGEST_LEN: usize = 64;

/// A hash algorithm, named as in LUKS headers and QEMU (`"sha256"`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashAlg {
    /// SHA-1 (20-byte digest).
    Sha1,
    /// SHA-224 (28-byte digest).
    Sha224,
    /// SHA-256 (32-byte digest).
    Sha256,
    /// SHA-384 (48-byte digest).
    Sha384,
    /// SHA-512 (64-byte digest).
    Sha512,
    /// RIPEMD-160 (20-byte digest).
    Ripemd160,
}

/// Runs `$body` with `$d` bound to the RustCrypto hash type of `$alg`.
macro_rules! with_hash {
    ($alg:expr, $d:ident => $body:expr) => {
        match $alg {
            HashAlg::Sha1 => {
                type $d = sha1::Sha1;
                $body
            }
            HashAlg::Sha224 => {
                type $d = sha2::Sha224;
                $body
            }
            HashAlg::Sha256 => {
                type $d = sha2::Sha256;
                $body
            }
            HashAlg::Sha384 => {
                type $d = sha2::Sha384;
                $body
            }
            HashAlg::Sha512 => {
                type $d = sha2::Sha512;
                $body
            }
            HashAlg::Ripemd160 => {
                type $d = ripemd::Ripemd160;
                $body
            }
        }
    };
}

impl HashAlg {
    /// Every supported algorithm.
    pub const ALL: [HashAlg; 6] = [
        HashAlg::Sha1,
        HashAlg::Sha224,
        HashAlg::Sha256,
        HashAlg::Sha384,
        HashAlg::Sha512,
        HashAlg::Ripemd160,
    ];

    /// Parses a LUKS/QEMU hash name such as `"sha256"` (case-sensitive, as
    /// QEMU and cryptsetup write them).
    pub fn from_name(name: &str) -> Result<Self, LuksError> {
        Self::ALL
            .into_iter()
            .find(|h| h.name() == name)
            .ok_or_else(|| LuksError::unsupported(format!("Hash algorithm {name} not supported")))
    }

    /// The LUKS/QEMU name, e.g. `"sha256"`.
    pub fn name(self) -> &'static str {
        match self {
            HashAlg::Sha1 => "sha1",
            HashAlg::Sha224 => "sha224",
            HashAlg::Sha256 => "sha256",
            HashAlg::Sha384 => "sha384",
            HashAlg::Sha512 => "sha512",
            HashAlg::Ripemd160 => "ripemd160",
        }
    }

    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            HashAlg::Sha1 | HashAlg::Ripemd160 => 20,
            HashAlg::Sha224 => 28,
            HashAlg::Sha256 => 32,
            HashAlg::Sha384 => 48,
            HashAlg::Sha512 => 64,
        }
    }

    /// The digest of `data`.
    pub fn digest(self, data: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; self.digest_len()];
        self.digest_parts_into(&[data], &mut out);
        out
    }

    /// Hashes the concatenation of `parts` into `out[..digest_len()]`,
    /// without allocating; `out` must be at least [`Self::digest_len`] long
    /// (a [`MAX_DIGEST_LEN`] buffer always is).
    pub(crate) fn digest_parts_into(self, parts: &[&[u8]], out: &mut [u8]) {
        with_hash!(self, D => digest_parts::<D>(parts, out))
    }

    /// PBKDF2 with HMAC over this hash: derives `out.len()` bytes from
    /// `password` and `salt` with `iterations` rounds (0 behaves as 1).
    pub fn pbkdf2(self, password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
        with_hash!(self, D => pbkdf2::pbkdf2_hmac::<D>(password, salt, iterations, out))
    }
}

fn digest_parts<D: Digest>(parts: &[&[u8]], out: &mut [u8]) {
    let mut hasher = D::new();
    for part in parts {
        hasher.update(part);
    }
    let mut result = hasher.finalize();
    out[..result.len()].copy_from_slice(&result);
    result.as_mut_slice().zeroize();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn names_round_trip() {
        for h in HashAlg::ALL {
            assert_eq!(HashAlg::from_name(h.name()).unwrap(), h);
            assert!(h.digest_len() <= MAX_DIGEST_LEN);
        }
        assert_eq!(
            HashAlg::from_name("md5").unwrap_err().to_string(),
            "Hash algorithm md5 not supported"
        );
        assert!(HashAlg::from_name("SHA256").is_err());
        assert!(HashAlg::from_name("").is_err());
    }

    #[test]
    fn digest_known_answers() {
        let cases = [
            (HashAlg::Sha1, "a9993e364706816aba3e25717850c26c9cd0d89d"),
            (
                HashAlg::Sha224,
                "23097d223405d8228642a477bda255b32aadbce4bda0b3f7e36c9da7",
            ),
            (
                HashAlg::Sha256,
                "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            ),
            (
                HashAlg::Sha384,
                "cb00753f45a35e8bb5a03d699ac65007272c32ab0eded1631a8b605a43ff5bed\
                 8086072ba1e7cc2358baeca134c825a7",
            ),
            (
                HashAlg::Sha512,
                "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a\
                 2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
            ),
            (
                HashAlg::Ripemd160,
                "8eb208f7e05d987a9b044a8e98c6b087f15a0bfc",
            ),
        ];
        for (h, want) in cases {
            let d = h.digest(b"abc");
            assert_eq!(d.len(), h.digest_len());
            assert_eq!(hex(&d), want, "{}", h.name());
            let mut buf = [0u8; MAX_DIGEST_LEN];
            h.digest_parts_into(&[b"a", b"", b"bc"], &mut buf);
            assert_eq!(&buf[..h.digest_len()], &d[..]);
        }
    }

    /// RFC 6070 test vectors for PBKDF2-HMAC-SHA1.
    #[test]
    fn pbkdf2_sha1_rfc6070() {
        let cases: [(&[u8], &[u8], u32, &str); 5] = [
            (
                b"password",
                b"salt",
                1,
                "0c60c80f961f0e71f3a9b524af6012062fe037a6",
            ),
            (
                b"password",
                b"salt",
                2,
                "ea6c014dc72d6f8ccd1ed92ace1d41f0d8de8957",
            ),
            (
                b"password",
                b"salt",
                4096,
                "4b007901b765489abead49d926f721d065a429c1",
            ),
            (
                b"passwordPASSWORDpassword",
                b"saltSALTsaltSALTsaltSALTsaltSALTsalt",
                4096,
                "3d2eec4fe41c849b80c8d83662c0e44a8b291a964cf2f07038",
            ),
            (
                b"pass\0word",
                b"sa\0lt",
                4096,
                "56fa6aa75548099dcc37d7f03425e0c3",
            ),
        ];
        for (p, s, c, want) in cases {
            let mut out = vec![0u8; want.len() / 2];
            HashAlg::Sha1.pbkdf2(p, s, c, &mut out);
            assert_eq!(hex(&out), want);
        }
    }

    /// PBKDF2 for the other hashes, 40 bytes (more than one block for the
    /// 20/28/32-byte digests), checked against Python's hashlib.pbkdf2_hmac.
    #[test]
    fn pbkdf2_other_hashes() {
        let cases = [
            (
                HashAlg::Sha224,
                "93200ffa96c5776d38fa10abdf8f5bfc0054b9718513df472d2331d2d1e66a3f97b510224f700ce7",
            ),
            (
                HashAlg::Sha256,
                "ae4d0c95af6b46d32d0adff928f06dd02a303f8ef3c251dfd6e2d85a95474c43830651afcb5c862f",
            ),
            (
                HashAlg::Sha384,
                "54f775c6d790f21930459162fc535dbf04a939185127016a04176a0730c6f1f4fb48832ad1261baa",
            ),
            (
                HashAlg::Sha512,
                "e1d9c16aa681708a45f5c7c4e215ceb66e011a2e9f0040713f18aefdb866d53cf76cab2868a39b9f",
            ),
            (
                HashAlg::Ripemd160,
                "768dcc27b7bfdef794a1ff9d935090fcf598555e66913180b9ce363c615e9ed953b95fd07169be53",
            ),
        ];
        for (h, want) in cases {
            let mut out = [0u8; 40];
            h.pbkdf2(b"password", b"salt", 2, &mut out);
            assert_eq!(hex(&out), want, "{}", h.name());
        }
    }
}
