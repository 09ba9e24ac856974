//! The qcow2 header (version 2 and 3) and its extensions: parsing with QEMU's validation and
//! error texts, and serialisation byte-compatible with what QEMU writes.
//!
//! The header lives in the first cluster of the image: the fixed fields, then (from
//! `header_length`) a list of extensions ended by a zero magic, then the backing file name.
//! [`Header::parse`] never panics on hostile input: every length and offset is checked, and
//! bytes missing past the end of the given slice read as zero (like a short host file).

use strata_core::{Error, ErrorKind, Result};

/// `"QFI\xfb"`.
pub const QCOW_MAGIC: u32 = 0x5146_49fb;

/// Length of the version 2 header.
pub const V2_HEADER_LENGTH: u32 = 72;
/// Smallest version 3 header (through `header_length`).
pub const V3_MIN_HEADER_LENGTH: u32 = 104;
/// The version 3 header QEMU writes: through `compression_type` plus padding to 8 bytes.
pub const V3_HEADER_LENGTH: u32 = 112;

/// Smallest cluster size: 512 bytes.
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster size QEMU supports: 2 MiB.
pub const MAX_CLUSTER_BITS: u32 = 21;

/// QEMU's limit on the active L1 table: 32 MiB of entries (`QCOW_MAX_L1_SIZE`).
pub const MAX_L1_SIZE_BYTES: u64 = 32 << 20;
/// QEMU's limit on the refcount table: 8 MiB (`QCOW_MAX_REFTABLE_SIZE`).
pub const MAX_REFTABLE_SIZE_BYTES: u64 = 8 << 20;
/// QEMU's limit on the number of internal snapshots (`QCOW_MAX_SNAPSHOTS`).
pub const MAX_SNAPSHOTS: u64 = 65536;
/// Size of the fixed part of a snapshot table entry.
pub const SNAPSHOT_HEADER_SIZE: u64 = 40;
/// QEMU's limit on the number of persistent bitmaps (`QCOW2_MAX_BITMAPS`).
pub const MAX_BITMAPS: u32 = 65535;
/// QEMU's limit on the bitmap directory size (`QCOW2_MAX_BITMAP_DIRECTORY_SIZE`).
pub const MAX_BITMAP_DIRECTORY_SIZE: u64 = 1024 * MAX_BITMAPS as u64;
/// Longest backing file name the spec allows.
pub const MAX_BACKING_FILE_NAME: u64 = 1023;
/// QEMU's buffer for the backing format name (`sizeof(bs->backing_format)`).
const BACKING_FORMAT_BUF: usize = 16;

/// Incompatible feature bits (`incompatible_features`).
pub mod incompat {
    /// Refcounts may be inconsistent (lazy refcounts in use).
    pub const DIRTY: u64 = 1 << 0;
    /// Metadata is known to be corrupt.
    pub const CORRUPT: u64 = 1 << 1;
    /// Data lives in an external data file.
    pub const DATA_FILE: u64 = 1 << 2;
    /// `compression_type` is not deflate.
    pub const COMPRESSION: u64 = 1 << 3;
    /// Extended L2 entries with subclusters.
    pub const EXTL2: u64 = 1 << 4;
    /// Every bit this implementation knows.
    pub const MASK: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION | EXTL2;
}

/// Compatible feature bits (`compatible_features`).
pub mod compat {
    /// Lazy refcount updates.
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
    /// Every bit this implementation knows.
    pub const MASK: u64 = LAZY_REFCOUNTS;
}

/// Auto-clear feature bits (`autoclear_features`).
pub mod autoclear {
    /// The bitmaps extension is consistent.
    pub const BITMAPS: u64 = 1 << 0;
    /// The external data file is a consistent raw image.
    pub const DATA_FILE_RAW: u64 = 1 << 1;
    /// Strata's own: every `in-use` bitmap's on-disk copy is a superset of the writes since
    /// it was stored (write-intent logging, `bitmap::intent`). The highest bit, away from
    /// those the qcow2 spec hands out; a program that does not know it clears it when it
    /// opens the image read-write, which withdraws the promise.
    pub const STRATA_WRITE_INTENT: u64 = 1 << 63;
    /// Strata's own: the generation extension ([`super::ext::STRATA_GENERATION`]) is up to
    /// date (see `identity`). Cleared by a program that opens the image read-write without
    /// knowing it, which makes the generation unknown.
    pub const STRATA_GENERATION_VALID: u64 = 1 << 62;
    /// Strata's own: a Strata session has written to the image and not yet closed it. Set
    /// with the generation before the first write, cleared by a clean close; found set at a
    /// read-write open, the last session ended uncleanly and the clusters it allocated but
    /// never referenced are freed (`check -r leaks`) before use.
    pub const STRATA_SESSION_OPEN: u64 = 1 << 61;
    /// Every bit this implementation knows.
    pub const MASK: u64 = BITMAPS
        | DATA_FILE_RAW
        | STRATA_WRITE_INTENT
        | STRATA_GENERATION_VALID
        | STRATA_SESSION_OPEN;
}

/// Header extension magics.
pub mod ext {
    /// End of the extension area.
    pub const END: u32 = 0;
    /// Backing file format name.
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    /// Feature name table.
    pub const FEATURE_TABLE: u32 = 0x6803_f857;
    /// Persistent bitmaps.
    pub const BITMAPS: u32 = 0x2385_2875;
    /// Full disk encryption header pointer.
    pub const CRYPTO_HEADER: u32 = 0x0537_be77;
    /// External data file name.
    pub const DATA_FILE: u32 = 0x4441_5441;
    /// Strata's own (`"STGN"`, kept among the unknown extensions): image id and write
    /// counter, 2 x u64 big-endian (see `identity`).
    pub const STRATA_GENERATION: u32 = 0x5354_474e;
    /// Strata's own (`"STBK"`, kept among the unknown extensions): the identity of the
    /// backing file recorded in an overlay, 32 bytes (see `identity`).
    pub const STRATA_BACKING_RECORD: u32 = 0x5354_424b;
}

/// Encryption methods (`crypt_method`).
pub mod crypt {
    /// No encryption.
    pub const NONE: u32 = 0;
    /// Legacy AES-CBC.
    pub const AES: u32 = 1;
    /// LUKS.
    pub const LUKS: u32 = 2;
}

/// The compression algorithm of compressed clusters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum CompressionType {
    /// Raw deflate (QEMU calls it "zlib"); the default and the only v2 choice.
    #[default]
    Zlib,
    /// Zstandard.
    Zstd,
}

impl CompressionType {
    /// The on-disk value.
    pub fn as_u8(self) -> u8 {
        match self {
            CompressionType::Zlib => 0,
            CompressionType::Zstd => 1,
        }
    }

    /// From the on-disk value.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(CompressionType::Zlib),
            1 => Some(CompressionType::Zstd),
            _ => None,
        }
    }

    /// QEMU's spelling (`zlib`, `zstd`).
    pub fn as_str(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }

    /// Parse QEMU's spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "zlib" => Some(CompressionType::Zlib),
            "zstd" => Some(CompressionType::Zstd),
            _ => None,
        }
    }
}

/// Which feature bitmap a feature-table entry names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureKind {
    /// `incompatible_features`.
    Incompatible,
    /// `compatible_features`.
    Compatible,
    /// `autoclear_features`.
    Autoclear,
    /// A type this implementation does not know (kept for display).
    Other(u8),
}

impl FeatureKind {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => FeatureKind::Incompatible,
            1 => FeatureKind::Compatible,
            2 => FeatureKind::Autoclear,
            x => FeatureKind::Other(x),
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            FeatureKind::Incompatible => 0,
            FeatureKind::Compatible => 1,
            FeatureKind::Autoclear => 2,
            FeatureKind::Other(x) => x,
        }
    }
}

/// One entry of the feature name table extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// The bitmap the bit belongs to.
    pub kind: FeatureKind,
    /// Bit number within that bitmap.
    pub bit: u8,
    /// Human-readable name (at most 46 bytes).
    pub name: String,
}

/// Size of one feature table entry.
const FEATURE_ENTRY_SIZE: usize = 48;

/// The feature table QEMU writes into every v3 image, in QEMU's order.
pub fn standard_feature_table() -> Vec<FeatureName> {
    let f = |kind, bit, name: &str| FeatureName {
        kind,
        bit,
        name: name.to_string(),
    };
    use FeatureKind::*;
    vec![
        f(Incompatible, 0, "dirty bit"),
        f(Incompatible, 1, "corrupt bit"),
        f(Incompatible, 2, "external data file"),
        f(Incompatible, 3, "compression type"),
        f(Incompatible, 4, "extended L2 entries"),
        f(Compatible, 0, "lazy refcounts"),
        f(Autoclear, 0, "bitmaps"),
        f(Autoclear, 1, "raw external data"),
    ]
}

/// The bitmaps extension: where the bitmap directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Number of bitmaps in the directory (at least 1).
    pub nb_bitmaps: u32,
    /// Size of the directory in bytes.
    pub bitmap_directory_size: u64,
    /// Cluster-aligned offset of the directory.
    pub bitmap_directory_offset: u64,
}

/// Length of the bitmaps extension data.
const BITMAPS_EXT_LEN: u32 = 24;

/// A header extension this implementation does not interpret, preserved verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownExtension {
    /// Extension type.
    pub magic: u32,
    /// Extension data (without padding).
    pub data: Vec<u8>,
}

/// A parsed qcow2 header with its extensions.
///
/// Field names follow the spec. `backing_file_offset`, `backing_file_size` and
/// `header_length` are as read; [`Header::serialize`] recomputes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name in the first cluster, 0 if none.
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Encryption method (see [`crypt`]).
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters the refcount table occupies.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// See [`incompat`]. Always 0 for v2.
    pub incompatible_features: u64,
    /// See [`compat`]. Always 0 for v2.
    pub compatible_features: u64,
    /// See [`autoclear`]. Always 0 for v2.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits (4 for v2).
    pub refcount_order: u32,
    /// Length of the header structure (72 for v2).
    pub header_length: u32,
    /// Compression algorithm for compressed clusters.
    pub compression_type: CompressionType,
    /// Header bytes past the fields we know (`[112, header_length)`), preserved.
    pub unknown_header_fields: Vec<u8>,
    /// Backing file name.
    pub backing_file: Option<String>,
    /// Backing file format (extension `0xe2792aca`).
    pub backing_format: Option<String>,
    /// External data file name (extension `0x44415441`).
    pub data_file: Option<String>,
    /// The feature name table as read (QEMU rewrites the standard one on every update).
    pub feature_names: Vec<FeatureName>,
    /// The bitmaps extension, when present and consistent (autoclear bit set).
    pub bitmaps: Option<BitmapsExt>,
    /// The full-disk-encryption header pointer `(offset, length)`, if present.
    pub crypto_header: Option<(u64, u64)>,
    /// Extensions not interpreted here, preserved in order.
    pub unknown_extensions: Vec<UnknownExtension>,
}

/// Bounds-checked big-endian reads; bytes past the slice read as zero.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn byte(&self, off: u64) -> u8 {
        usize::try_from(off)
            .ok()
            .and_then(|o| self.0.get(o))
            .copied()
            .unwrap_or(0)
    }

    fn slice(&self, off: u64, len: u64) -> Vec<u8> {
        (0..len).map(|i| self.byte(off.saturating_add(i))).collect()
    }

    fn be32(&self, off: u64) -> u32 {
        (0..4).fold(0u32, |acc, i| (acc << 8) | u32::from(self.byte(off + i)))
    }

    fn be64(&self, off: u64) -> u64 {
        (0..8).fold(0u64, |acc, i| (acc << 8) | u64::from(self.byte(off + i)))
    }
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::invalid(msg)
}

/// QEMU's `qcow2_validate_table`: the table fits the limit and starts on a cluster boundary.
pub fn validate_table(
    offset: u64,
    entries: u64,
    entry_len: u64,
    max_size_bytes: u64,
    cluster_size: u64,
    name: &str,
) -> Result<()> {
    if entries > max_size_bytes / entry_len {
        return Err(invalid(format!("{name} too large")));
    }
    let bytes = entries * entry_len;
    if u64::MAX - bytes < offset || offset & (cluster_size - 1) != 0 {
        return Err(invalid(format!("{name} offset invalid")));
    }
    Ok(())
}

/// The error for unknown incompatible feature bits, in QEMU's words, naming features from the
/// image's own feature table where it has them.
pub fn unsupported_features_error(table: &[FeatureName], mut mask: u64) -> Error {
    let mut names: Vec<String> = Vec::new();
    for f in table {
        if f.name.is_empty() {
            break;
        }
        if f.kind == FeatureKind::Incompatible && f.bit < 64 && mask & (1u64 << f.bit) != 0 {
            names.push(f.name.chars().take(46).collect());
            mask &= !(1u64 << f.bit);
        }
    }
    if mask != 0 {
        names.push(format!("Unknown incompatible feature: {mask:x}"));
    }
    Error::new(
        ErrorKind::Unsupported,
        format!("Unsupported qcow2 feature(s): {}", names.join(", ")),
    )
}

fn string_from(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

impl Header {
    /// Parse and validate a header from the start of an image (normally its first cluster;
    /// missing bytes read as zero). Errors name the bad field, in QEMU's words where QEMU has
    /// them.
    pub fn parse(bytes: &[u8]) -> Result<Header> {
        let b = Bytes(bytes);
        if b.be32(0) != QCOW_MAGIC {
            return Err(invalid("Image is not in qcow2 format"));
        }
        let version = b.be32(4);
        if !(2..=3).contains(&version) {
            return Err(Error::unsupported(format!(
                "Unsupported qcow2 version {version}"
            )));
        }
        let cluster_bits = b.be32(20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(invalid(format!(
                "Unsupported cluster size: 2^{cluster_bits}"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: b.be64(8),
            backing_file_size: b.be32(16),
            cluster_bits,
            size: b.be64(24),
            crypt_method: b.be32(32),
            l1_size: b.be32(36),
            l1_table_offset: b.be64(40),
            refcount_table_offset: b.be64(48),
            refcount_table_clusters: b.be32(56),
            nb_snapshots: b.be32(60),
            snapshots_offset: b.be64(64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LENGTH,
            compression_type: CompressionType::Zlib,
            unknown_header_fields: Vec::new(),
            backing_file: None,
            backing_format: None,
            data_file: None,
            feature_names: Vec::new(),
            bitmaps: None,
            crypto_header: None,
            unknown_extensions: Vec::new(),
        };
        let mut raw_compression = 0u8;
        if version == 3 {
            h.incompatible_features = b.be64(72);
            h.compatible_features = b.be64(80);
            h.autoclear_features = b.be64(88);
            h.refcount_order = b.be32(96);
            h.header_length = b.be32(100);
            if h.header_length < V3_MIN_HEADER_LENGTH {
                return Err(invalid("qcow2 header too short"));
            }
        }
        if u64::from(h.header_length) > cluster_size {
            return Err(invalid("qcow2 header exceeds cluster size"));
        }
        if h.header_length > 104 {
            raw_compression = b.byte(104);
        }
        if h.header_length > V3_HEADER_LENGTH {
            h.unknown_header_fields = b.slice(
                u64::from(V3_HEADER_LENGTH),
                u64::from(h.header_length - V3_HEADER_LENGTH),
            );
        }
        if h.backing_file_offset > cluster_size {
            return Err(invalid("Invalid backing file offset"));
        }
        let ext_end = if h.backing_file_offset != 0 {
            h.backing_file_offset
        } else {
            cluster_size
        };

        // Extensions come first so the unsupported-feature error can use the feature table.
        let ext_result = h.parse_extensions(&b, u64::from(h.header_length), ext_end);
        let unknown = h.incompatible_features & !incompat::MASK;
        if unknown != 0 {
            return Err(unsupported_features_error(&h.feature_names, unknown));
        }
        ext_result?;

        if h.refcount_order > 6 {
            return Err(invalid(
                "Reference count entry width too large; may not exceed 64 bits",
            ));
        }
        if h.crypt_method > crypt::LUKS {
            return Err(invalid(format!(
                "Unsupported encryption method: {}",
                h.crypt_method
            )));
        }
        h.compression_type = CompressionType::from_u8(raw_compression).ok_or_else(|| {
            Error::unsupported(format!(
                "qcow2: unknown compression type: {raw_compression}"
            ))
        })?;
        let has_bit = h.incompatible_features & incompat::COMPRESSION != 0;
        if h.compression_type == CompressionType::Zlib && has_bit {
            return Err(invalid(
                "qcow2: Compression type incompatible feature bit must not be set",
            ));
        }
        if h.compression_type != CompressionType::Zlib && !has_bit {
            return Err(invalid(
                "qcow2: Compression type incompatible feature bit must be set",
            ));
        }
        if h.incompatible_features & incompat::EXTL2 != 0 && cluster_bits < 14 {
            return Err(invalid(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            ));
        }
        if h.incompatible_features & incompat::DATA_FILE == 0 {
            if h.autoclear_features & autoclear::DATA_FILE_RAW != 0 {
                return Err(invalid("data-file-raw requires a data file"));
            }
            if h.data_file.is_some() {
                // QEMU ignores the name then; so do we, but keep it out of the way.
                h.data_file = None;
            }
        }

        if h.backing_file_offset != 0 {
            let len = u64::from(h.backing_file_size);
            if len > MAX_BACKING_FILE_NAME.min(cluster_size - h.backing_file_offset) {
                return Err(invalid("Backing file name too long"));
            }
            h.backing_file = Some(string_from(&b.slice(h.backing_file_offset, len)));
        }

        let max_reftable_clusters = MAX_REFTABLE_SIZE_BYTES >> cluster_bits;
        if u64::from(h.refcount_table_clusters) > max_reftable_clusters {
            return Err(invalid("Reference count table too large"));
        }
        if h.refcount_table_clusters == 0 {
            return Err(invalid("Image does not contain a reference count table"));
        }
        validate_table(
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters),
            cluster_size,
            MAX_REFTABLE_SIZE_BYTES,
            cluster_size,
            "Reference count table",
        )?;
        validate_table(
            h.snapshots_offset,
            u64::from(h.nb_snapshots),
            SNAPSHOT_HEADER_SIZE,
            SNAPSHOT_HEADER_SIZE * MAX_SNAPSHOTS,
            cluster_size,
            "Snapshot table",
        )?;
        validate_table(
            h.l1_table_offset,
            u64::from(h.l1_size),
            8,
            MAX_L1_SIZE_BYTES,
            cluster_size,
            "Active L1 table",
        )?;
        let l1_needed = h.l1_entries_for_size(h.size);
        if l1_needed > i32::MAX as u64 {
            return Err(invalid("Image is too big"));
        }
        if u64::from(h.l1_size) < l1_needed {
            return Err(invalid("L1 table is too small"));
        }
        Ok(h)
    }

    /// Walk the extension area `[start, end)` (QEMU's `qcow2_read_extensions`).
    fn parse_extensions(&mut self, b: &Bytes<'_>, start: u64, end: u64) -> Result<()> {
        let cluster_size = self.cluster_size();
        let mut offset = start;
        while offset < end {
            let magic = b.be32(offset);
            let len = b.be32(offset + 4);
            offset += 8;
            if offset > end || u64::from(len) > end - offset {
                return Err(invalid("Header extension too large"));
            }
            let data = b.slice(offset, u64::from(len));
            match magic {
                ext::END => return Ok(()),
                ext::BACKING_FORMAT => {
                    if data.len() >= BACKING_FORMAT_BUF {
                        return Err(invalid(format!(
                            "ERROR: ext_backing_format: len={len} too large (>={BACKING_FORMAT_BUF})"
                        )));
                    }
                    self.backing_format = Some(string_from(&data));
                }
                ext::FEATURE_TABLE => {
                    self.feature_names = data
                        .chunks_exact(FEATURE_ENTRY_SIZE)
                        .map(|e| {
                            let name = &e[2..];
                            let n = name.iter().position(|&c| c == 0).unwrap_or(name.len());
                            FeatureName {
                                kind: FeatureKind::from_u8(e[0]),
                                bit: e[1],
                                name: string_from(&name[..n]),
                            }
                        })
                        .collect();
                }
                ext::CRYPTO_HEADER => {
                    if self.crypt_method != crypt::LUKS {
                        return Err(invalid(
                            "CRYPTO header extension only expected with LUKS encryption method",
                        ));
                    }
                    if len != 16 {
                        return Err(invalid(format!(
                            "CRYPTO header extension size {len} but expected size 16"
                        )));
                    }
                    let d = Bytes(&data);
                    self.crypto_header = Some((d.be64(0), d.be64(8)));
                }
                ext::BITMAPS => {
                    if len != BITMAPS_EXT_LEN {
                        return Err(invalid("bitmaps_ext: Invalid extension length"));
                    }
                    // Without the autoclear bit a program lacking bitmap support changed
                    // the image: the extension is stale and QEMU ignores (and drops) it.
                    if self.autoclear_features & autoclear::BITMAPS != 0 {
                        let d = Bytes(&data);
                        let nb_bitmaps = d.be32(0);
                        if d.be32(4) != 0 {
                            return Err(invalid("bitmaps_ext: Reserved field is not zero"));
                        }
                        if nb_bitmaps > MAX_BITMAPS {
                            return Err(invalid(format!(
                                "bitmaps_ext: Image has {nb_bitmaps} bitmaps, exceeding the QEMU supported maximum of {MAX_BITMAPS}"
                            )));
                        }
                        if nb_bitmaps == 0 {
                            return Err(invalid("found bitmaps extension with zero bitmaps"));
                        }
                        let dir_offset = d.be64(16);
                        if dir_offset & (cluster_size - 1) != 0 {
                            return Err(invalid("bitmaps_ext: invalid bitmap directory offset"));
                        }
                        let dir_size = d.be64(8);
                        if dir_size > MAX_BITMAP_DIRECTORY_SIZE {
                            return Err(invalid(format!(
                                "bitmaps_ext: bitmap directory size ({dir_size}) exceeds the maximum supported size ({MAX_BITMAP_DIRECTORY_SIZE})"
                            )));
                        }
                        self.bitmaps = Some(BitmapsExt {
                            nb_bitmaps,
                            bitmap_directory_size: dir_size,
                            bitmap_directory_offset: dir_offset,
                        });
                    }
                }
                ext::DATA_FILE => self.data_file = Some(string_from(&data)),
                _ => self
                    .unknown_extensions
                    .push(UnknownExtension { magic, data }),
            }
            offset += u64::from(len).next_multiple_of(8);
        }
        Ok(())
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Whether L2 entries are extended (128 bits with a subcluster bitmap).
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & incompat::EXTL2 != 0
    }

    /// Size of one L2 entry in bytes (8, or 16 with extended L2).
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() { 16 } else { 8 }
    }

    /// Entries in one L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }

    /// Refcount width in bits (1..=64).
    pub fn refcount_bits(&self) -> u32 {
        1u32 << self.refcount_order.min(6)
    }

    /// Guest bytes one L2 table maps.
    pub fn l2_coverage(&self) -> u64 {
        self.cluster_size() * self.l2_entries()
    }

    /// L1 entries needed to map `size` guest bytes (QEMU's `size_to_l1`).
    pub fn l1_entries_for_size(&self, size: u64) -> u64 {
        size.div_ceil(self.l2_coverage())
    }

    /// Whether an external data file holds the guest data.
    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & incompat::DATA_FILE != 0
    }

    /// Whether the external data file is a consistent raw image.
    pub fn data_file_raw(&self) -> bool {
        self.autoclear_features & autoclear::DATA_FILE_RAW != 0
    }

    /// Whether lazy refcounts are enabled.
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & compat::LAZY_REFCOUNTS != 0
    }

    /// Whether the dirty bit is set.
    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & incompat::DIRTY != 0
    }

    /// Whether the corrupt bit is set.
    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features & incompat::CORRUPT != 0
    }

    /// The compat level string shown by `qemu-img info` (`"0.10"` or `"1.1"`).
    pub fn compat_str(&self) -> &'static str {
        if self.version == 2 { "0.10" } else { "1.1" }
    }

    /// The first cluster as QEMU's `qcow2_update_header` writes it: fixed header, preserved
    /// unknown header fields, extensions (backing format, data file, crypto, the standard
    /// feature table for v3 with clusters over 4k, bitmaps, unknown ones), the end marker and
    /// the backing file name, zero-padded to `cluster_size` bytes.
    ///
    /// `backing_file_offset`, `backing_file_size` and `header_length` are computed, not taken
    /// from `self`. Fails when it does not fit in one cluster.
    pub fn serialize(&self, cluster_size: u64) -> Result<Vec<u8>> {
        if !(2..=3).contains(&self.version) {
            return Err(invalid(format!(
                "Unsupported qcow2 version {}",
                self.version
            )));
        }
        let cap = usize::try_from(cluster_size)
            .ok()
            .filter(|&c| c <= 1 << MAX_CLUSTER_BITS)
            .ok_or_else(|| invalid("cluster size too large for a header"))?;
        let mut out: Vec<u8> = Vec::with_capacity(cap);
        let put32 = |o: &mut Vec<u8>, v: u32| o.extend_from_slice(&v.to_be_bytes());
        let put64 = |o: &mut Vec<u8>, v: u64| o.extend_from_slice(&v.to_be_bytes());
        out.extend_from_slice(&QCOW_MAGIC.to_be_bytes());
        put32(&mut out, self.version);
        put64(&mut out, 0); // backing_file_offset, patched below
        put32(&mut out, 0); // backing_file_size, patched below
        put32(&mut out, self.cluster_bits);
        put64(&mut out, self.size);
        put32(&mut out, self.crypt_method);
        put32(&mut out, self.l1_size);
        put64(&mut out, self.l1_table_offset);
        put64(&mut out, self.refcount_table_offset);
        put32(&mut out, self.refcount_table_clusters);
        put32(&mut out, self.nb_snapshots);
        put64(&mut out, self.snapshots_offset);
        if self.version == 3 {
            let header_length = V3_HEADER_LENGTH as usize + self.unknown_header_fields.len();
            put64(&mut out, self.incompatible_features);
            put64(&mut out, self.compatible_features);
            put64(&mut out, self.autoclear_features);
            put32(&mut out, self.refcount_order);
            put32(&mut out, header_length as u32);
            out.push(self.compression_type.as_u8());
            out.extend_from_slice(&[0; 7]);
            out.extend_from_slice(&self.unknown_header_fields);
        }
        let put_ext = |o: &mut Vec<u8>, magic: u32, data: &[u8]| {
            o.extend_from_slice(&magic.to_be_bytes());
            o.extend_from_slice(&(data.len() as u32).to_be_bytes());
            o.extend_from_slice(data);
            o.resize(o.len().next_multiple_of(8), 0);
        };
        if self.backing_file.is_some()
            && let Some(fmt) = &self.backing_format
        {
            put_ext(&mut out, ext::BACKING_FORMAT, fmt.as_bytes());
        }
        if self.has_data_file()
            && let Some(name) = &self.data_file
        {
            put_ext(&mut out, ext::DATA_FILE, name.as_bytes());
        }
        if let Some((off, len)) = self.crypto_header {
            let mut d = off.to_be_bytes().to_vec();
            d.extend_from_slice(&len.to_be_bytes());
            put_ext(&mut out, ext::CRYPTO_HEADER, &d);
        }
        for u in &self.unknown_extensions {
            if u.data.len() > cap {
                return Err(Error::from_errno(
                    libc::ENOSPC,
                    "Header extension too large",
                ));
            }
            put_ext(&mut out, u.magic, &u.data);
        }
        // QEMU omits the table for clusters of 4k and less: it would leave too little room
        // for the backing file name.
        if self.version == 3 && cluster_size > 4096 {
            let mut d = Vec::new();
            for f in standard_feature_table() {
                let mut e = [0u8; FEATURE_ENTRY_SIZE];
                e[0] = f.kind.as_u8();
                e[1] = f.bit;
                e[2..2 + f.name.len()].copy_from_slice(f.name.as_bytes());
                d.extend_from_slice(&e);
            }
            put_ext(&mut out, ext::FEATURE_TABLE, &d);
        }
        if let Some(bm) = &self.bitmaps {
            let mut d = Vec::with_capacity(24);
            d.extend_from_slice(&bm.nb_bitmaps.to_be_bytes());
            d.extend_from_slice(&[0; 4]);
            d.extend_from_slice(&bm.bitmap_directory_size.to_be_bytes());
            d.extend_from_slice(&bm.bitmap_directory_offset.to_be_bytes());
            put_ext(&mut out, ext::BITMAPS, &d);
        }
        put_ext(&mut out, ext::END, &[]);
        if let Some(name) = &self.backing_file {
            if name.len() as u64 > MAX_BACKING_FILE_NAME {
                return Err(invalid("Backing file name too long"));
            }
            let off = out.len() as u64;
            out[8..16].copy_from_slice(&off.to_be_bytes());
            out[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            out.extend_from_slice(name.as_bytes());
        }
        if out.len() > cap {
            return Err(Error::from_errno(
                libc::ENOSPC,
                "Could not update qcow2 header",
            ));
        }
        out.resize(cap, 0);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v3(cluster_bits: u32) -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits,
            size: 10 << 20,
            crypt_method: 0,
            l1_size: 1,
            l1_table_offset: 3 << cluster_bits,
            refcount_table_offset: 1 << cluster_bits,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LENGTH,
            compression_type: CompressionType::Zlib,
            unknown_header_fields: vec![],
            backing_file: None,
            backing_format: None,
            data_file: None,
            feature_names: vec![],
            bitmaps: None,
            crypto_header: None,
            unknown_extensions: vec![],
        }
    }

    #[test]
    fn roundtrip_with_extensions() {
        let mut h = v3(16);
        h.backing_file = Some("base.qcow2".into());
        h.backing_format = Some("qcow2".into());
        h.incompatible_features = incompat::DATA_FILE | incompat::COMPRESSION | incompat::EXTL2;
        h.compression_type = CompressionType::Zstd;
        h.data_file = Some("d.raw".into());
        h.unknown_extensions.push(UnknownExtension {
            magic: 0x1234_5678,
            data: vec![1, 2, 3],
        });
        let bytes = h.serialize(65536).unwrap();
        assert_eq!(bytes.len(), 65536);
        let p = Header::parse(&bytes).unwrap();
        assert_eq!(p.backing_file.as_deref(), Some("base.qcow2"));
        assert_eq!(p.backing_format.as_deref(), Some("qcow2"));
        assert_eq!(p.data_file.as_deref(), Some("d.raw"));
        assert_eq!(p.compression_type, CompressionType::Zstd);
        assert_eq!(p.unknown_extensions, h.unknown_extensions);
        assert_eq!(p.feature_names, standard_feature_table());
        assert_eq!(p.l2_entries(), 4096);
        assert_eq!(p.serialize(65536).unwrap(), bytes);
    }

    #[test]
    fn v2_roundtrip() {
        let mut h = v3(16);
        h.version = 2;
        h.header_length = V2_HEADER_LENGTH;
        let bytes = h.serialize(65536).unwrap();
        assert!(bytes[72..].iter().all(|&b| b == 0));
        let p = Header::parse(&bytes).unwrap();
        assert_eq!(p.refcount_bits(), 16);
        assert_eq!(p.compat_str(), "0.10");
    }

    #[test]
    fn hostile_headers_fail_cleanly() {
        let good = v3(16).serialize(65536).unwrap();
        let set32 =
            |b: &mut Vec<u8>, o: usize, v: u32| b[o..o + 4].copy_from_slice(&v.to_be_bytes());
        let set64 =
            |b: &mut Vec<u8>, o: usize, v: u64| b[o..o + 8].copy_from_slice(&v.to_be_bytes());
        type Mutation<'a> = Box<dyn Fn(&mut Vec<u8>) + 'a>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|b| set32(b, 0, 0)), "Image is not in qcow2 format"),
            (Box::new(|b| set32(b, 4, 4)), "Unsupported qcow2 version 4"),
            (
                Box::new(|b| set32(b, 20, 22)),
                "Unsupported cluster size: 2^22",
            ),
            (Box::new(|b| set32(b, 100, 96)), "qcow2 header too short"),
            (
                Box::new(|b| set32(b, 96, 7)),
                "Reference count entry width too large; may not exceed 64 bits",
            ),
            (
                Box::new(|b| set64(b, 8, 70000)),
                "Invalid backing file offset",
            ),
            (
                Box::new(|b| set32(b, 56, 1000)),
                "Reference count table too large",
            ),
            (
                Box::new(|b| set32(b, 56, 0)),
                "Image does not contain a reference count table",
            ),
            (
                Box::new(|b| set64(b, 48, 1)),
                "Reference count table offset invalid",
            ),
            (
                Box::new(|b| set32(b, 36, u32::MAX)),
                "Active L1 table too large",
            ),
            (
                Box::new(|b| set64(b, 40, u64::MAX - 7)),
                "Active L1 table offset invalid",
            ),
            (Box::new(|b| set32(b, 36, 0)), "L1 table is too small"),
            (Box::new(|b| set64(b, 24, u64::MAX)), "Image is too big"),
            (
                Box::new(|b| set32(b, 60, 100_000)),
                "Snapshot table too large",
            ),
            (
                Box::new(|b| set64(b, 72, 1 << 40)),
                "Unsupported qcow2 feature(s): Unknown incompatible feature: 10000000000",
            ),
            (
                Box::new(|b| set64(b, 72, incompat::COMPRESSION)),
                "qcow2: Compression type incompatible feature bit must not be set",
            ),
            (
                Box::new(|b| b[104] = 9),
                "qcow2: unknown compression type: 9",
            ),
            (
                Box::new(|b| set64(b, 88, autoclear::DATA_FILE_RAW)),
                "data-file-raw requires a data file",
            ),
            (
                Box::new(|b| set32(b, 116, u32::MAX)),
                "Header extension too large",
            ),
            (
                Box::new(|b| set32(b, 32, 3)),
                "Unsupported encryption method: 3",
            ),
        ];
        for (mutate, msg) in cases {
            let mut b = good.clone();
            mutate(&mut b);
            let e = Header::parse(&b).unwrap_err();
            assert_eq!(e.message(), msg);
        }
        // Truncated input reads as zeroes: no panic, a clear error.
        assert!(Header::parse(&good[..3]).is_err());
        assert!(Header::parse(&[]).is_err());
    }

    #[test]
    fn unknown_features_are_named_from_the_table() {
        let h = v3(16);
        let mut b = h.serialize(65536).unwrap();
        b[72..80].copy_from_slice(&((1u64 << 5) | (1 << 9)).to_be_bytes());
        // Put a custom name for bit 5 into the feature table (its first entry).
        let table = 112 + 8;
        b[table] = 0;
        b[table + 1] = 5;
        b[table + 2..table + 48].fill(0);
        b[table + 2..table + 7].copy_from_slice(b"shiny");
        let e = Header::parse(&b).unwrap_err();
        assert_eq!(
            e.message(),
            "Unsupported qcow2 feature(s): shiny, Unknown incompatible feature: 200"
        );
        assert_eq!(e.kind(), ErrorKind::Unsupported);
    }

    #[test]
    fn fuzzish_never_panics() {
        let good = v3(9).serialize(512).unwrap();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            let mut b = good.clone();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x % b.len() as u64) as usize;
                b[i] = (x >> 32) as u8;
            }
            let _ = Header::parse(&b);
        }
    }
}
