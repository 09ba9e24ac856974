//! `qemu-img measure -O qcow2`: how big a new qcow2 image would be.
//!
//! The arithmetic follows QEMU's `qcow2_measure` / `qcow2_calc_prealloc_size`: the fully
//! allocated size is a header cluster, L2 tables for every cluster, L1 clusters for those,
//! refcount blocks and table found as a fixed point, plus the data; the required size is the
//! same minus the data clusters that the input leaves unallocated or zero.

use strata_core::{Error, Prealloc, Result};

/// Size of an L1 entry.
const L1E_SIZE: u64 = 8;
/// Largest L1 table QEMU accepts (`QCOW_MAX_L1_SIZE`).
const MAX_L1_SIZE: u64 = 32 << 20;
/// Size of a bitmap directory entry without name or extra data.
const BITMAP_DIR_ENTRY_SIZE: u64 = 24;
/// Size of a bitmap table entry.
const BITMAP_TABLE_ENTRY_SIZE: u64 = 8;

/// The creation options `measure` looks at (`-o cluster_size=...,refcount_bits=...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeasureOptions {
    /// `--size`, when given (ignored for the sizes when an input image is measured).
    pub size: Option<u64>,
    /// `cluster_size` (default 65536).
    pub cluster_size: u64,
    /// `refcount_bits` (default 16).
    pub refcount_bits: u64,
    /// `extended_l2`.
    pub extended_l2: bool,
    /// `compat=1.1` (version 3, the default) rather than `0.10`.
    pub v3: bool,
    /// `preallocation`.
    pub prealloc: Prealloc,
    /// Whether `backing_file` is set: every input cluster then counts as required.
    pub has_backing_file: bool,
}

impl Default for MeasureOptions {
    fn default() -> Self {
        MeasureOptions {
            size: None,
            cluster_size: 65536,
            refcount_bits: 16,
            extended_l2: false,
            v3: true,
            prealloc: Prealloc::Off,
            has_backing_file: false,
        }
    }
}

/// A persistent dirty bitmap of the input image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputBitmap {
    /// Length of its name in bytes.
    pub name_len: u64,
    /// Its granularity in bytes.
    pub granularity: u64,
}

/// What `measure` needs to know about an input image.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MeasureInput {
    /// The input's virtual size.
    pub size: u64,
    /// Ranges `(offset, len)` that hold data (allocated and not known zero), in ascending
    /// order, as block status reports them.
    pub data_extents: Vec<(u64, u64)>,
    /// The input's persistent bitmaps, or `None` when its format cannot hold any (then no
    /// bitmaps size is reported).
    pub bitmaps: Option<Vec<InputBitmap>>,
}

/// The answer, as `qemu-img measure` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement {
    /// Bytes needed for the image as it would be written.
    pub required: u64,
    /// Bytes needed if every cluster were allocated.
    pub fully_allocated: u64,
    /// Bytes for persistent bitmaps, when both formats support them.
    pub bitmaps: Option<u64>,
}

impl Measurement {
    /// Human output, exactly as `qemu-img measure` prints it.
    pub fn to_human(&self) -> String {
        let mut s = format!(
            "required size: {}\nfully allocated size: {}\n",
            self.required, self.fully_allocated
        );
        if let Some(b) = self.bitmaps {
            s.push_str(&format!("bitmaps size: {b}\n"));
        }
        s
    }

    /// `--output=json`, in qemu-img's field order and layout.
    pub fn to_json(&self) -> String {
        let mut fields = Vec::new();
        if let Some(b) = self.bitmaps {
            fields.push(format!("    \"bitmaps\": {b}"));
        }
        fields.push(format!("    \"required\": {}", self.required));
        fields.push(format!("    \"fully-allocated\": {}", self.fully_allocated));
        format!("{{\n{}\n}}\n", fields.join(",\n"))
    }
}

fn too_large() -> Error {
    Error::invalid("The image size is too large (try using a larger cluster size)")
}

fn div_round_up(a: u64, b: u64) -> Result<u64> {
    Ok(a.checked_add(b - 1).ok_or_else(too_large)? / b)
}

fn round_up(a: u64, b: u64) -> Result<u64> {
    div_round_up(a, b)?.checked_mul(b).ok_or_else(too_large)
}

/// Validate the options as QEMU's option parsers do, with their messages.
fn validate(opts: &MeasureOptions) -> Result<()> {
    let cs = opts.cluster_size;
    if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
        return Err(Error::invalid(
            "Cluster size must be a power of two between 512 and 2048k",
        ));
    }
    if opts.extended_l2 && cs < 16384 {
        return Err(Error::invalid(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
        ));
    }
    if opts.extended_l2 && !opts.v3 {
        return Err(Error::invalid(
            "Extended L2 entries are only supported with compatibility level 1.1 and above \
             (use compat=1.1 or greater)",
        ));
    }
    let rb = opts.refcount_bits;
    if rb > 64 || !rb.is_power_of_two() {
        return Err(Error::invalid(
            "Refcount width must be a power of two and may not exceed 64 bits",
        ));
    }
    if !opts.v3 && rb != 16 {
        return Err(Error::invalid(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above \
             (use compat=1.1 or greater)",
        ));
    }
    Ok(())
}

/// Bytes of refcount blocks and table needed to count `clusters` clusters plus themselves
/// (QEMU's `qcow2_refcount_metadata_size`, without the generous increase).
pub fn refcount_metadata_size(
    clusters: u64,
    cluster_size: u64,
    refcount_order: u32,
) -> Result<u64> {
    let per_table_cluster = cluster_size / 8;
    let per_block = (cluster_size * 8) >> refcount_order;
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    // The fixed point where no more refcount clusters are needed to count themselves.
    loop {
        let last = n;
        let counted = clusters
            .checked_add(table)
            .and_then(|x| x.checked_add(blocks))
            .ok_or_else(too_large)?;
        blocks = div_round_up(counted, per_block)?;
        table = div_round_up(blocks, per_table_cluster)?;
        n = clusters + blocks + table;
        if n == last {
            break;
        }
    }
    (blocks + table)
        .checked_mul(cluster_size)
        .ok_or_else(too_large)
}

/// Bytes of a fully allocated image of `size` bytes (QEMU's `qcow2_calc_prealloc_size`).
pub fn prealloc_size(
    size: u64,
    cluster_size: u64,
    refcount_bits: u64,
    extended_l2: bool,
) -> Result<u64> {
    let l2e_size: u64 = if extended_l2 { 16 } else { 8 };
    let aligned = round_up(size, cluster_size)?;
    // Header: one cluster.
    let mut meta = cluster_size;
    // L2 tables, for every cluster.
    let nl2e = round_up(aligned / cluster_size, cluster_size / l2e_size)?;
    meta += nl2e * l2e_size;
    // L1 table, whole clusters of it.
    let nl1e = round_up(nl2e * l2e_size / cluster_size, cluster_size / L1E_SIZE)?;
    meta = meta.checked_add(nl1e * L1E_SIZE).ok_or_else(too_large)?;
    let clusters = meta.checked_add(aligned).ok_or_else(too_large)? / cluster_size;
    meta = meta
        .checked_add(refcount_metadata_size(
            clusters,
            cluster_size,
            refcount_bits.trailing_zeros(),
        )?)
        .ok_or_else(too_large)?;
    meta.checked_add(aligned).ok_or_else(too_large)
}

/// Bytes of data clusters the input's data extents occupy once copied: each extent is
/// widened to whole clusters, and a cluster is counted once (the block-status walk of
/// `qcow2_measure`).
fn required_data(data_extents: &[(u64, u64)], cluster_size: u64) -> Result<u64> {
    let mut cursor = 0u64;
    let mut required = 0u64;
    for &(off, len) in data_extents {
        let end = off.checked_add(len).ok_or_else(too_large)?;
        if end <= cursor || len == 0 {
            continue;
        }
        let start = off.max(cursor);
        let stop = round_up(end, cluster_size)?;
        required = required
            .checked_add(stop - (start - start % cluster_size))
            .ok_or_else(too_large)?;
        cursor = stop;
    }
    Ok(required)
}

/// Bytes for the input's persistent bitmaps: each bitmap fully allocated, its table, and the
/// bitmap directory, all in whole clusters.
fn bitmaps_size(input: &MeasureInput, bitmaps: &[InputBitmap], cluster_size: u64) -> Result<u64> {
    let mut total = 0u64;
    let mut dir = 0u64;
    for bm in bitmaps {
        if bm.granularity == 0 {
            return Err(Error::invalid("bitmap granularity must not be zero"));
        }
        let bytes = div_round_up(div_round_up(input.size, bm.granularity)?, 8)?;
        let clusters = div_round_up(bytes, cluster_size)?;
        total = total
            .checked_add(clusters * cluster_size)
            .and_then(|t| {
                t.checked_add(round_up(clusters * BITMAP_TABLE_ENTRY_SIZE, cluster_size).ok()?)
            })
            .ok_or_else(too_large)?;
        dir = dir
            .checked_add(round_up(BITMAP_DIR_ENTRY_SIZE + bm.name_len, 8)?)
            .ok_or_else(too_large)?;
    }
    total
        .checked_add(round_up(dir, cluster_size)?)
        .ok_or_else(too_large)
}

/// `qemu-img measure -O qcow2`: with `input` for an existing image, or only `opts.size`.
pub fn measure(opts: &MeasureOptions, input: Option<&MeasureInput>) -> Result<Measurement> {
    validate(opts)?;
    let cs = opts.cluster_size;
    let l2e_size: u64 = if opts.extended_l2 { 16 } else { 8 };
    let mut virtual_size = round_up(opts.size.unwrap_or(0), cs)?;
    let l2_tables = div_round_up(virtual_size / cs, cs / l2e_size)?;
    if l2_tables
        .checked_mul(L1E_SIZE)
        .is_none_or(|b| b > MAX_L1_SIZE)
    {
        return Err(too_large());
    }
    let mut required = 0;
    if let Some(inp) = input {
        virtual_size = round_up(inp.size, cs)?;
        required = if opts.has_backing_file {
            // The new image's backing file may share nothing with the input: count it all.
            virtual_size
        } else {
            required_data(&inp.data_extents, cs)?.min(virtual_size)
        };
    }
    if matches!(opts.prealloc, Prealloc::Full | Prealloc::Falloc) {
        required = virtual_size;
    }
    let fully_allocated = prealloc_size(virtual_size, cs, opts.refcount_bits, opts.extended_l2)?;
    let bitmaps = match input {
        Some(inp) if opts.v3 => match &inp.bitmaps {
            Some(b) => Some(bitmaps_size(inp, b, cs)?),
            None => None,
        },
        _ => None,
    };
    Ok(Measurement {
        required: fully_allocated - virtual_size + required,
        fully_allocated,
        bitmaps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_gigabyte_default() {
        let opts = MeasureOptions {
            size: Some(1 << 30),
            ..Default::default()
        };
        let m = measure(&opts, None).unwrap();
        assert_eq!(m.required, 393216);
        assert_eq!(m.fully_allocated, 1074135040);
        assert_eq!(
            m.to_json(),
            "{\n    \"required\": 393216,\n    \"fully-allocated\": 1074135040\n}\n"
        );
    }

    #[test]
    fn data_extents_are_widened_to_clusters_once() {
        let cs = 65536;
        let ext = [
            (0, 100),
            (100, 10),
            (65536 * 3 + 5, 1),
            (65536 * 3 + 70, 65536),
        ];
        assert_eq!(required_data(&ext, cs).unwrap(), 65536 * 3);
    }

    #[test]
    fn hostile_sizes_are_errors() {
        let opts = MeasureOptions {
            size: Some(u64::MAX),
            ..Default::default()
        };
        assert!(measure(&opts, None).is_err());
        let input = MeasureInput {
            size: u64::MAX - 10,
            data_extents: vec![(u64::MAX - 100, 50)],
            bitmaps: Some(vec![InputBitmap {
                name_len: 3,
                granularity: 0,
            }]),
        };
        assert!(measure(&MeasureOptions::default(), Some(&input)).is_err());
    }
}
