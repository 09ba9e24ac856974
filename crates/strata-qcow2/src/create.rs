//! Image creation, laid out as `qemu-img create -f qcow2` does: header in cluster 0, the
//! refcount table in cluster 1, its first refcount block in cluster 2, then the L1 table
//! (allocated by growing the empty image to its size, exactly as QEMU does).

use strata_core::{Error, NodeRef, Prealloc, Result};

use crate::header::{
    CompressionType, Header, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS, V2_HEADER_LENGTH,
    V3_HEADER_LENGTH, autoclear, compat, incompat,
};
use crate::node::{OpenOptions, Qcow2};
use crate::refcount;

/// Options of `qemu-img create -f qcow2` (names as QEMU's `-o` options).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size in bytes.
    pub size: u64,
    /// Cluster size (`cluster_size`), default 65536.
    pub cluster_size: u64,
    /// `compat=1.1` (v3, the default); `false` for `compat=0.10` (v2).
    pub compat_v3: bool,
    /// Refcount width (`refcount_bits`), default 16.
    pub refcount_bits: u32,
    /// Extended L2 entries with subclusters (`extended_l2`).
    pub extended_l2: bool,
    /// Lazy refcounts (`lazy_refcounts`).
    pub lazy_refcounts: bool,
    /// Compression type of compressed clusters (`compression_type`).
    pub compression_type: CompressionType,
    /// Preallocation mode (`preallocation`).
    pub preallocation: Prealloc,
    /// Backing file name (`backing_file`).
    pub backing_file: Option<String>,
    /// Backing file format (`backing_fmt`).
    pub backing_format: Option<String>,
    /// External data file name (`data_file`); the node is passed to [`create`].
    pub data_file: Option<String>,
    /// The data file is a consistent raw image (`data_file_raw`).
    pub data_file_raw: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            compat_v3: true,
            refcount_bits: 16,
            extended_l2: false,
            lazy_refcounts: false,
            compression_type: CompressionType::Zlib,
            preallocation: Prealloc::Off,
            backing_file: None,
            backing_format: None,
            data_file: None,
            data_file_raw: false,
        }
    }
}

const V3_HINT: &str = "(use version=v3 or greater)";

/// Check the options the way QEMU's `qcow2_co_create` does, with its error texts.
pub fn validate(opts: &CreateOptions) -> Result<()> {
    let cs = opts.cluster_size;
    if !cs.is_power_of_two() || !(1 << MIN_CLUSTER_BITS..=1 << MAX_CLUSTER_BITS).contains(&cs) {
        return Err(Error::invalid(
            "Cluster size must be a power of two between 512 and 2048k",
        ));
    }
    if !opts.refcount_bits.is_power_of_two() || opts.refcount_bits > 64 {
        return Err(Error::invalid(
            "Refcount width must be a power of two and may not exceed 64 bits",
        ));
    }
    if !opts.compat_v3 {
        if opts.lazy_refcounts {
            return Err(Error::invalid(format!(
                "Lazy refcounts only supported with compatibility level 1.1 and above {V3_HINT}"
            )));
        }
        if opts.refcount_bits != 16 {
            return Err(Error::invalid(format!(
                "Different refcount widths than 16 bits require compatibility level 1.1 or above {V3_HINT}"
            )));
        }
        if opts.data_file.is_some() {
            return Err(Error::invalid(format!(
                "External data files are only supported with compatibility level 1.1 and above {V3_HINT}"
            )));
        }
        if opts.compression_type != CompressionType::Zlib {
            return Err(Error::invalid(format!(
                "Non-zlib compression type is only supported with compatibility level 1.1 and above {V3_HINT}"
            )));
        }
        if opts.extended_l2 {
            return Err(Error::invalid(format!(
                "Extended L2 entries are only supported with compatibility level 1.1 and above {V3_HINT}"
            )));
        }
    }
    if opts.extended_l2 && cs < 16384 {
        return Err(Error::invalid(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
        ));
    }
    if opts.data_file_raw && opts.data_file.is_none() {
        return Err(Error::invalid("data-file-raw requires data-file"));
    }
    if opts.data_file_raw && opts.backing_file.is_some() {
        return Err(Error::invalid(
            "Backing file and data-file-raw cannot be used at the same time",
        ));
    }
    if opts.backing_file.is_some() && opts.preallocation != Prealloc::Off && !opts.extended_l2 {
        return Err(Error::invalid(
            "Backing file and preallocation can only be used at the same time if extended_l2 is on",
        ));
    }
    if opts.backing_format.is_some() && opts.backing_file.is_none() {
        return Err(Error::invalid(
            "Backing format cannot be used without backing file",
        ));
    }
    let h = empty_header(opts);
    let l1 = h.l1_entries_for_size(opts.size);
    if l1 > i32::MAX as u64 || l1 * 8 > crate::header::MAX_L1_SIZE_BYTES {
        return Err(Error::invalid(
            "The image size is too large for file format 'qcow2' (try using a larger cluster size)",
        ));
    }
    Ok(())
}

fn empty_header(opts: &CreateOptions) -> Header {
    let cluster_bits = opts.cluster_size.trailing_zeros();
    let mut incompatible = 0;
    if opts.extended_l2 {
        incompatible |= incompat::EXTL2;
    }
    if opts.data_file.is_some() {
        incompatible |= incompat::DATA_FILE;
    }
    if opts.compression_type != CompressionType::Zlib {
        incompatible |= incompat::COMPRESSION;
    }
    Header {
        version: if opts.compat_v3 { 3 } else { 2 },
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size: 0,
        crypt_method: 0,
        l1_size: 0,
        l1_table_offset: 0,
        refcount_table_offset: opts.cluster_size,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: incompatible,
        compatible_features: if opts.lazy_refcounts {
            compat::LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear_features: 0,
        refcount_order: opts.refcount_bits.max(1).trailing_zeros(),
        header_length: if opts.compat_v3 {
            V3_HEADER_LENGTH
        } else {
            V2_HEADER_LENGTH
        },
        compression_type: opts.compression_type,
        unknown_header_fields: Vec::new(),
        backing_file: None,
        backing_format: None,
        data_file: opts.data_file.clone(),
        feature_names: Vec::new(),
        bitmaps: None,
        crypto_header: None,
        unknown_extensions: Vec::new(),
    }
}

/// Create a qcow2 image in `file` (its previous content is discarded). `data_file` is the
/// external data file node when `opts.data_file` is set.
pub async fn create(
    file: &NodeRef,
    opts: &CreateOptions,
    data_file: Option<&NodeRef>,
) -> Result<()> {
    validate(opts)?;
    if opts.data_file.is_some() != data_file.is_some() {
        return Err(Error::invalid(if opts.data_file.is_some() {
            "The data file node must be given for an image with a data file"
        } else {
            "A data file node was given but no data file name"
        }));
    }
    let cs = opts.cluster_size;
    let h = empty_header(opts);
    file.truncate(0, Prealloc::Off).await?;
    let header = h.serialize(cs)?;
    let mut tables = vec![0u8; 2 * cs as usize];
    tables[..8].copy_from_slice(&(2 * cs).to_be_bytes());
    for i in 0..3 {
        refcount::set(&mut tables[cs as usize..], opts.refcount_bits, i, 1);
    }
    let mut all = header;
    all.extend_from_slice(&tables);
    file.write(0, strata_core::IoBuf::from_slice(&all), Default::default())
        .await?;
    if let Some(df) = data_file {
        df.truncate(0, Prealloc::Off).await?;
    }

    let q = Qcow2::open(
        file.clone(),
        &OpenOptions::default(),
        None,
        data_file.cloned(),
    )
    .await?;
    // A raw data file needs L2 entries pointing at it from the start.
    let prealloc = if opts.data_file_raw && opts.preallocation == Prealloc::Off {
        Prealloc::Metadata
    } else {
        opts.preallocation
    };
    // Like the block layer, sizes are rounded up to whole 512-byte sectors.
    let size = opts.size.next_multiple_of(512);
    q.resize(size, prealloc).await?;
    if let Some(df) = data_file
        && df.size() < size
    {
        df.truncate(size, Prealloc::Off).await?;
    }
    {
        let mut m = q.meta.lock().await;
        let mut changed = false;
        if opts.data_file_raw {
            m.h.autoclear_features |= autoclear::DATA_FILE_RAW;
            changed = true;
        }
        if let Some(b) = &opts.backing_file {
            m.h.backing_file = Some(b.clone());
            m.h.backing_format = opts.backing_format.clone();
            changed = true;
        }
        if changed {
            m.write_header().await?;
            m.sync().await?;
        }
    }
    q.close_image().await
}
