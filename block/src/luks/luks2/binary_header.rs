//! The two LUKS2 binary headers: 4096 bytes each, followed by the JSON
//! area, together `hdr_size` bytes; the primary at offset 0, the secondary
//! at `hdr_size`. Each copy carries a checksum over itself (its checksum
//! field zeroed) and its JSON area; the copy with the higher `seqid` among
//! the intact ones wins, as in cryptsetup's `LUKS2_disk_hdr_read`.

use super::error::Luks2Error;
use crate::luks::hash::HashAlg;

/// Bytes of a binary header.
pub const BIN_HDR_SIZE: usize = 4096;
/// Magic of the primary header.
pub const MAGIC_PRIMARY: [u8; 6] = *b"LUKS\xba\xbe";
/// Magic of the secondary header.
pub const MAGIC_SECONDARY: [u8; 6] = *b"SKUL\xba\xbe";
/// The header sizes (binary header plus JSON area) cryptsetup allows:
/// 16 KiB to 4 MiB, powers of two. They are also where a secondary header
/// is looked for when the primary is damaged.
pub const HDR_SIZES: [u64; 9] = [
    16 << 10,
    32 << 10,
    64 << 10,
    128 << 10,
    256 << 10,
    512 << 10,
    1 << 20,
    2 << 20,
    4 << 20,
];

/// Byte offsets of the fields.
mod off {
    pub const VERSION: usize = 6;
    pub const HDR_SIZE: usize = 8;
    pub const SEQID: usize = 16;
    pub const LABEL: usize = 24;
    pub const CHECKSUM_ALG: usize = 72;
    pub const UUID: usize = 168;
    pub const SUBSYSTEM: usize = 208;
    pub const HDR_OFFSET: usize = 256;
    pub const CSUM: usize = 448;
    pub const CSUM_LEN: usize = 64;
}

/// Which copy of the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Copy {
    /// At offset 0.
    Primary,
    /// At offset `hdr_size`.
    Secondary,
}

/// A checked binary header and its JSON text.
#[derive(Clone, Debug)]
pub struct HeaderCopy {
    /// Which copy this is.
    pub copy: Copy,
    /// Binary header plus JSON area, in bytes.
    pub hdr_size: u64,
    /// Sequence number (incremented on every metadata update).
    pub seqid: u64,
    /// The volume label.
    pub label: String,
    /// The volume UUID.
    pub uuid: String,
    /// The subsystem label.
    pub subsystem: String,
    /// The checksum algorithm, e.g. `"sha256"`.
    pub checksum_alg: String,
    /// The JSON text (the JSON area up to its first NUL).
    pub json: Vec<u8>,
}

/// Reads `buf.len()` bytes at an offset of the header node.
pub type ReadFn<'a> = dyn FnMut(u64, &mut [u8]) -> std::io::Result<()> + 'a;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

fn text(b: &[u8], at: usize, len: usize) -> String {
    let field = &b[at..at + len];
    let end = field.iter().position(|&c| c == 0).unwrap_or(len);
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// Whether the first bytes of a node are a LUKS header of version 2.
pub fn is_luks2(first: &[u8]) -> bool {
    first.len() >= 8 && first[..6] == MAGIC_PRIMARY && be16(first, off::VERSION) == 2
}

/// Reads and checks the copy at `offset` (0 for the primary); `node_size`
/// bounds what may be read.
fn read_copy(
    read: &mut ReadFn<'_>,
    node_size: u64,
    offset: u64,
    copy: Copy,
) -> Result<HeaderCopy, Luks2Error> {
    let which = match copy {
        Copy::Primary => "primary",
        Copy::Secondary => "secondary",
    };
    let bad =
        |m: String| Luks2Error::BadHeader(format!("{which} LUKS2 header at offset {offset}: {m}"));
    if offset + BIN_HDR_SIZE as u64 > node_size {
        return Err(bad(format!(
            "beyond the end of the header ({node_size} bytes)"
        )));
    }
    let mut bin = vec![0u8; BIN_HDR_SIZE];
    read(offset, &mut bin).map_err(|e| bad(format!("read failed: {e}")))?;
    let magic = match copy {
        Copy::Primary => MAGIC_PRIMARY,
        Copy::Secondary => MAGIC_SECONDARY,
    };
    if bin[..6] != magic {
        return Err(bad("bad magic".into()));
    }
    let version = be16(&bin, off::VERSION);
    if version != 2 {
        return Err(bad(format!("version {version}, expected 2")));
    }
    let hdr_size = be64(&bin, off::HDR_SIZE);
    if !HDR_SIZES.contains(&hdr_size) {
        return Err(bad(format!(
            "field 'hdr_size' is {hdr_size}, not a power of two from 16 KiB to 4 MiB"
        )));
    }
    let hdr_offset = be64(&bin, off::HDR_OFFSET);
    if hdr_offset != offset {
        return Err(bad(format!("field 'hdr_offset' is {hdr_offset}")));
    }
    if copy == Copy::Secondary && hdr_size != offset {
        return Err(bad(format!(
            "field 'hdr_size' is {hdr_size}, but the copy is at {offset}"
        )));
    }
    if offset + hdr_size > node_size {
        return Err(bad(format!(
            "its {hdr_size} bytes go beyond the end of the header ({node_size} bytes)"
        )));
    }
    let checksum_alg = text(&bin, off::CHECKSUM_ALG, 32);
    let hash = HashAlg::from_name(&checksum_alg)
        .map_err(|_| bad(format!("unsupported checksum algorithm '{checksum_alg}'")))?;
    // Bounded: hdr_size is at most 4 MiB.
    let mut json_area = vec![0u8; hdr_size as usize - BIN_HDR_SIZE];
    read(offset + BIN_HDR_SIZE as u64, &mut json_area)
        .map_err(|e| bad(format!("reading the JSON area failed: {e}")))?;
    let stored = bin[off::CSUM..off::CSUM + hash.digest_len()].to_vec();
    bin[off::CSUM..off::CSUM + off::CSUM_LEN].fill(0);
    if checksum(hash, &bin, &json_area) != stored {
        return Err(bad("checksum mismatch".into()));
    }
    let end = json_area
        .iter()
        .position(|&c| c == 0)
        .unwrap_or(json_area.len());
    json_area.truncate(end);
    Ok(HeaderCopy {
        copy,
        hdr_size,
        seqid: be64(&bin, off::SEQID),
        label: text(&bin, off::LABEL, 48),
        uuid: text(&bin, off::UUID, 40),
        subsystem: text(&bin, off::SUBSYSTEM, 48),
        checksum_alg,
        json: json_area,
    })
}

/// The checksum of a binary header (its checksum field zeroed) and its JSON area.
pub fn checksum(hash: HashAlg, bin: &[u8], json_area: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; hash.digest_len()];
    hash.digest_parts_into(&[bin, json_area], &mut out);
    out
}

/// Both intact copies (primary first), or why none is: the primary at 0;
/// the secondary at the primary's `hdr_size`, or, with a damaged primary,
/// at the first of [`HDR_SIZES`] that holds one (as cryptsetup looks for it).
pub fn read_copies(read: &mut ReadFn<'_>, node_size: u64) -> Result<Vec<HeaderCopy>, Luks2Error> {
    let primary = read_copy(read, node_size, 0, Copy::Primary);
    let secondary = match &primary {
        Ok(p) => read_copy(read, node_size, p.hdr_size, Copy::Secondary),
        Err(_) => {
            let mut found = Err(Luks2Error::BadHeader(
                "no secondary LUKS2 header found".into(),
            ));
            for &at in HDR_SIZES.iter() {
                if at + BIN_HDR_SIZE as u64 > node_size {
                    break;
                }
                let mut magic = [0u8; 6];
                if read(at, &mut magic).is_ok() && magic == MAGIC_SECONDARY {
                    found = read_copy(read, node_size, at, Copy::Secondary);
                    break;
                }
            }
            found
        }
    };
    match (primary, secondary) {
        (Err(p), Err(s)) => Err(Luks2Error::NoValidHeader {
            primary: p.to_string(),
            secondary: s.to_string(),
        }),
        (p, s) => Ok(p.into_iter().chain(s).collect()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A binary header and JSON area for `json`, at `offset`, checksummed.
    pub(crate) fn make_copy(json: &str, hdr_size: u64, offset: u64, seqid: u64) -> Vec<u8> {
        let mut b = vec![0u8; hdr_size as usize];
        let magic = if offset == 0 {
            MAGIC_PRIMARY
        } else {
            MAGIC_SECONDARY
        };
        b[..6].copy_from_slice(&magic);
        b[6..8].copy_from_slice(&2u16.to_be_bytes());
        b[8..16].copy_from_slice(&hdr_size.to_be_bytes());
        b[16..24].copy_from_slice(&seqid.to_be_bytes());
        b[72..78].copy_from_slice(b"sha256");
        b[168..172].copy_from_slice(b"uuid");
        b[256..264].copy_from_slice(&offset.to_be_bytes());
        b[4096..4096 + json.len()].copy_from_slice(json.as_bytes());
        let sum = checksum(HashAlg::Sha256, &b[..4096], &b[4096..]);
        b[448..448 + 32].copy_from_slice(&sum);
        b
    }

    fn reader(img: &[u8]) -> impl FnMut(u64, &mut [u8]) -> std::io::Result<()> + '_ {
        move |off, buf| {
            let off = off as usize;
            buf.copy_from_slice(&img[off..off + buf.len()]);
            Ok(())
        }
    }

    #[test]
    fn both_copies_and_fallback() {
        let mut img = make_copy("{}", 16384, 0, 5);
        img.extend(make_copy("{\"a\":1}", 16384, 16384, 5));
        let n = img.len() as u64;
        let copies = read_copies(&mut reader(&img), n).unwrap();
        assert_eq!(copies.len(), 2);
        assert_eq!(copies[0].json, b"{}");
        assert_eq!(copies[1].json, b"{\"a\":1}");
        img[100] ^= 1;
        let copies = read_copies(&mut reader(&img), n).unwrap();
        assert_eq!(copies.len(), 1);
        assert_eq!(copies[0].copy, Copy::Secondary);
        img[16384 + 5000] ^= 1;
        let e = read_copies(&mut reader(&img), n).unwrap_err();
        assert!(matches!(e, Luks2Error::NoValidHeader { .. }), "{e}");
        assert!(e.to_string().contains("checksum mismatch"), "{e}");
    }

    #[test]
    fn bad_sizes() {
        let mut img = make_copy("{}", 16384, 0, 1);
        img[8..16].copy_from_slice(&(1u64 << 40).to_be_bytes());
        let n = img.len() as u64;
        let e = read_copies(&mut reader(&img), n).unwrap_err();
        assert!(e.to_string().contains("hdr_size"), "{e}");
        let img = make_copy("{}", 16384, 0, 1);
        let e = read_copies(&mut reader(&img[..8192]), 8192).unwrap_err();
        assert!(e.to_string().contains("beyond the end"), "{e}");
    }
}
