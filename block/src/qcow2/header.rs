//! The qcow2 header: parsing with validation of every field that later
//! drives an allocation or an offset, header extensions (kept byte for byte),
//! the feature name table, and serialisation for new images.

use super::error::Qcow2Error;

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Length of a version 2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Least length of a version 3 header.
pub const V3_HEADER_LEN: u32 = 104;
/// Header length QEMU writes for version 3 (with the compression type field).
pub const V3_HEADER_LEN_QEMU: u32 = 112;
/// Smallest cluster size exponent (512 B).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster size exponent (2 MiB, QEMU's limit).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Longest backing file name.
pub const MAX_BACKING_NAME: u32 = 1023;

/// Header extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Header extension: bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension: full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Incompatible feature: refcounts may be stale (lazy refcounts).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature: metadata is corrupt, do not write.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature: guest data lives in an external file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature: the compression type field is not zlib.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature: extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Incompatible features this driver knows.
pub const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
/// Compatible feature: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear feature: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;

/// Byte offsets of the header fields that are rewritten in place.
pub mod field {
    /// `l1_size` (u32) followed by `l1_table_offset` (u64).
    pub const L1_SIZE: u64 = 36;
    /// `refcount_table_offset` (u64) followed by `refcount_table_clusters` (u32).
    pub const REFCOUNT_TABLE_OFFSET: u64 = 48;
    /// `incompatible_features` (u64).
    pub const INCOMPATIBLE: u64 = 72;
    /// `autoclear_features` (u64).
    pub const AUTOCLEAR: u64 = 88;
    /// `size` (u64).
    pub const SIZE: u64 = 24;
}

/// How compressed clusters are compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (type 0).
    Zlib,
    /// Zstandard (type 1).
    Zstd,
}

impl CompressionType {
    /// The name `qemu-img info` shows.
    pub fn name(self) -> &'static str {
        match self {
            Self::Zlib => "zlib",
            Self::Zstd => "zstd",
        }
    }
}

/// One header extension, as stored (without its padding).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extension {
    /// Extension type.
    pub kind: u32,
    /// Extension data.
    pub data: Vec<u8>,
}

/// A parsed qcow2 header.
#[derive(Clone, Debug)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Where the backing file name is stored (0: none).
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Entries of the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible: u64,
    /// Compatible feature bits.
    pub compatible: u64,
    /// Autoclear feature bits.
    pub autoclear: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Header length (72 for version 2).
    pub header_length: u32,
    /// Bytes 104..header_length (compression type and unknown fields), kept as they are.
    pub tail: Vec<u8>,
    /// Header extensions in file order, without the end marker.
    pub extensions: Vec<Extension>,
    /// The backing file name.
    pub backing_file: Option<String>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

impl Header {
    /// Reads `cluster_bits` from the first bytes of a file, validated, so
    /// that the caller knows how much to read for [`Header::parse`].
    pub fn peek_cluster_bits(buf: &[u8]) -> Result<u32, Qcow2Error> {
        if buf.len() < V2_HEADER_LEN as usize || be32(buf, 0) != MAGIC {
            return Err(Qcow2Error::BadMagic);
        }
        let version = be32(buf, 4);
        if !(2..=3).contains(&version) {
            return Err(Qcow2Error::Unsupported(format!(
                "Unsupported qcow2 version {version}"
            )));
        }
        let bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
            return Err(Qcow2Error::Unsupported(format!(
                "Unsupported cluster size: 2^{bits} (cluster_bits must be {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS})"
            )));
        }
        Ok(bits)
    }

    /// Parses the header and its extensions from the start of the first
    /// cluster (`buf` holds at most one cluster: less if the file is shorter).
    pub fn parse(buf: &[u8]) -> Result<Self, Qcow2Error> {
        let cluster_bits = Self::peek_cluster_bits(buf)?;
        let cluster_size = 1usize << cluster_bits;
        let buf = &buf[..buf.len().min(cluster_size)];
        let version = be32(buf, 4);
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            tail: Vec::new(),
            extensions: Vec::new(),
            backing_file: None,
        };
        if version >= 3 {
            if buf.len() < V3_HEADER_LEN as usize {
                return Err(Qcow2Error::corrupt("version 3 header is truncated"));
            }
            h.incompatible = be64(buf, 72);
            h.compatible = be64(buf, 80);
            h.autoclear = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < V3_HEADER_LEN || !h.header_length.is_multiple_of(8) {
                return Err(Qcow2Error::corrupt(format!(
                    "invalid header length {} (must be a multiple of 8 and at least {V3_HEADER_LEN})",
                    h.header_length
                )));
            }
            if h.header_length as usize > buf.len() {
                return Err(Qcow2Error::corrupt(format!(
                    "header length {} exceeds the first cluster or the file",
                    h.header_length
                )));
            }
            h.tail = buf[V3_HEADER_LEN as usize..h.header_length as usize].to_vec();
            if h.refcount_order > 6 {
                return Err(Qcow2Error::corrupt(format!(
                    "refcount_order {} is too large (at most 6)",
                    h.refcount_order
                )));
            }
        }
        h.parse_extensions(buf)?;
        h.parse_backing_name(buf)?;
        Ok(h)
    }

    fn parse_extensions(&mut self, buf: &[u8]) -> Result<(), Qcow2Error> {
        let end = if self.backing_file_offset != 0 {
            (self.backing_file_offset as usize).min(buf.len())
        } else {
            buf.len()
        };
        let mut at = self.header_length as usize;
        loop {
            if at + 8 > end {
                // No end marker before the end of the area: treat as the end
                // (as QEMU does when the area is exhausted).
                return Ok(());
            }
            let kind = be32(buf, at);
            let len = be32(buf, at + 4) as usize;
            at += 8;
            if kind == 0 {
                return Ok(());
            }
            if len > end - at {
                return Err(Qcow2Error::corrupt(format!(
                    "header extension {kind:#010x} is too large ({len} bytes)"
                )));
            }
            if self.extensions.iter().any(|e| e.kind == kind) {
                return Err(Qcow2Error::corrupt(format!(
                    "header extension {kind:#010x} appears twice"
                )));
            }
            self.extensions.push(Extension {
                kind,
                data: buf[at..at + len].to_vec(),
            });
            at += len.next_multiple_of(8);
        }
    }

    fn parse_backing_name(&mut self, buf: &[u8]) -> Result<(), Qcow2Error> {
        if self.backing_file_offset == 0 {
            return Ok(());
        }
        if self.backing_file_size > MAX_BACKING_NAME {
            return Err(Qcow2Error::corrupt(format!(
                "backing file name is too long ({} bytes)",
                self.backing_file_size
            )));
        }
        let start = self.backing_file_offset;
        let end = start + u64::from(self.backing_file_size);
        if end > buf.len() as u64 {
            return Err(Qcow2Error::corrupt(format!(
                "backing file name at offset {start} is outside the first cluster"
            )));
        }
        let name = &buf[start as usize..end as usize];
        self.backing_file = Some(String::from_utf8_lossy(name).into_owned());
        Ok(())
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// The data of extension `kind`, if present.
    pub fn extension(&self, kind: u32) -> Option<&[u8]> {
        self.extensions
            .iter()
            .find(|e| e.kind == kind)
            .map(|e| e.data.as_slice())
    }

    /// The backing file format from the backing format extension.
    pub fn backing_format(&self) -> Option<String> {
        self.extension(EXT_BACKING_FORMAT)
            .map(|d| String::from_utf8_lossy(d).into_owned())
    }

    /// The compression type (zlib unless the compression bit says otherwise).
    pub fn compression_type(&self) -> Result<CompressionType, Qcow2Error> {
        let field = self.tail.first().copied().unwrap_or(0);
        let bit = self.incompatible & INCOMPAT_COMPRESSION != 0;
        match (bit, field) {
            (false, 0) => Ok(CompressionType::Zlib),
            (false, n) => Err(Qcow2Error::corrupt(format!(
                "compression type {n} is set without the compression type feature bit"
            ))),
            (true, 0) => Err(Qcow2Error::corrupt(
                "the compression type feature bit is set but the compression type is zlib",
            )),
            (true, 1) => Ok(CompressionType::Zstd),
            (true, n) => Err(Qcow2Error::Unsupported(format!(
                "Unknown compression type {n}"
            ))),
        }
    }

    /// Names of the set bits in `mask` of feature table `kind` (0
    /// incompatible, 1 compatible, 2 autoclear), from the feature name table
    /// where it names them.
    pub fn feature_names(&self, kind: u8, mask: u64) -> Vec<String> {
        let table = self.extension(EXT_FEATURE_TABLE).unwrap_or(&[]);
        (0..64)
            .filter(|bit| mask & (1u64 << bit) != 0)
            .map(|bit| {
                table
                    .chunks_exact(48)
                    .find(|e| e[0] == kind && u32::from(e[1]) == bit)
                    .map(|e| {
                        let name = &e[2..];
                        let len = name.iter().position(|&c| c == 0).unwrap_or(name.len());
                        String::from_utf8_lossy(&name[..len]).into_owned()
                    })
                    .unwrap_or_else(|| format!("Unknown incompatible feature: {:x}", 1u64 << bit))
            })
            .collect()
    }

    /// The header bytes: fields, tail, extensions, end marker and backing
    /// file name (which is placed right after the extensions).
    pub fn serialize(&mut self) -> Result<Vec<u8>, Qcow2Error> {
        let mut b = Vec::with_capacity(1024);
        let hdr_len = if self.version >= 3 {
            self.header_length
        } else {
            V2_HEADER_LEN
        };
        b.extend_from_slice(&MAGIC.to_be_bytes());
        b.extend_from_slice(&self.version.to_be_bytes());
        b.extend_from_slice(&[0u8; 12]); // backing name offset/size, filled below
        b.extend_from_slice(&self.cluster_bits.to_be_bytes());
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(&self.crypt_method.to_be_bytes());
        b.extend_from_slice(&self.l1_size.to_be_bytes());
        b.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        b.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version >= 3 {
            b.extend_from_slice(&self.incompatible.to_be_bytes());
            b.extend_from_slice(&self.compatible.to_be_bytes());
            b.extend_from_slice(&self.autoclear.to_be_bytes());
            b.extend_from_slice(&self.refcount_order.to_be_bytes());
            b.extend_from_slice(&hdr_len.to_be_bytes());
            let mut tail = self.tail.clone();
            tail.resize((hdr_len - V3_HEADER_LEN) as usize, 0);
            b.extend_from_slice(&tail);
        }
        for e in &self.extensions {
            b.extend_from_slice(&e.kind.to_be_bytes());
            b.extend_from_slice(&(e.data.len() as u32).to_be_bytes());
            b.extend_from_slice(&e.data);
            b.resize(b.len().next_multiple_of(8), 0);
        }
        b.extend_from_slice(&[0u8; 8]);
        match &self.backing_file {
            Some(name) => {
                if name.len() > MAX_BACKING_NAME as usize {
                    return Err(Qcow2Error::Invalid(format!(
                        "backing file name is too long ({} bytes, at most {MAX_BACKING_NAME})",
                        name.len()
                    )));
                }
                self.backing_file_offset = b.len() as u64;
                self.backing_file_size = name.len() as u32;
                b.extend_from_slice(name.as_bytes());
            }
            None => {
                self.backing_file_offset = 0;
                self.backing_file_size = 0;
            }
        }
        b[8..16].copy_from_slice(&self.backing_file_offset.to_be_bytes());
        b[16..20].copy_from_slice(&self.backing_file_size.to_be_bytes());
        if b.len() as u64 > self.cluster_size() {
            return Err(Qcow2Error::Invalid(
                "the header and its extensions do not fit in the first cluster".into(),
            ));
        }
        Ok(b)
    }
}

/// The feature name table QEMU writes into new version 3 images.
pub fn qemu_feature_table() -> Vec<u8> {
    const FEATURES: &[(u8, u8, &str)] = &[
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ];
    let mut t = Vec::with_capacity(FEATURES.len() * 48);
    for (kind, bit, name) in FEATURES {
        let mut e = [0u8; 48];
        e[0] = *kind;
        e[1] = *bit;
        e[2..2 + name.len()].copy_from_slice(name.as_bytes());
        t.extend_from_slice(&e);
    }
    t
}
