//! `qemu-img map`: where each range of an image's guest view comes from, merged and
//! rendered exactly as qemu-img prints it (`img_map`, `get_block_status`,
//! `entry_mergeable` and `dump_map_entry` in QEMU's `qemu-img.c`).

use std::fmt::Write as _;

use strata_core::{Error, NodeRef, Result};

use crate::status::layer_status;

/// One run of the map (QEMU's `MapEntry`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Layer that provides the run: 0 = the image itself, 1 = its backing file, ...
    pub depth: u64,
    /// Allocated in the layer at `depth` (rather than read as zeroes for lack of one).
    pub present: bool,
    /// Reads as zeroes.
    pub zero: bool,
    /// Data is stored.
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset in `filename`, when the data lives at one linear place.
    pub offset: Option<u64>,
    /// The file that `offset` points into.
    pub filename: Option<String>,
}

impl MapEntry {
    /// QEMU's `entry_mergeable`: whether `next` continues `self` with the same flags.
    fn mergeable(&self, next: &MapEntry) -> bool {
        if self.length == 0 {
            return false;
        }
        if self.zero != next.zero
            || self.data != next.data
            || self.compressed != next.compressed
            || self.depth != next.depth
            || self.present != next.present
            || self.filename != next.filename
            || self.offset.is_some() != next.offset.is_some()
        {
            return false;
        }
        match (self.offset, next.offset) {
            (Some(a), Some(b)) => a + self.length == b,
            _ => true,
        }
    }
}

/// QEMU's `get_block_status` for `img_map`: walk down the chain until a layer reports data
/// or zeroes; a range that no layer reports at all has no flags and no offset.
async fn entry_at(top: &NodeRef, offset: u64, len: u64) -> Result<MapEntry> {
    let mut node = top.clone();
    let mut bytes = len;
    let mut depth = 0;
    loop {
        let ext = layer_status(&node, offset, bytes).await?;
        bytes = ext.len;
        let st = ext.status;
        if st.data || st.zero {
            let filename = match (st.host_offset, &ext.host_node) {
                (Some(_), Some(n)) => Some(n.filename()),
                _ => None,
            };
            return Ok(MapEntry {
                start: offset,
                length: bytes,
                depth,
                present: st.allocated,
                zero: st.zero,
                data: st.data,
                compressed: st.compressed,
                offset: st.host_offset,
                filename,
            });
        }
        match node.backing() {
            Some(b) => {
                node = b;
                depth += 1;
            }
            None => {
                return Ok(MapEntry {
                    start: offset,
                    length: bytes,
                    depth,
                    present: false,
                    zero: false,
                    data: false,
                    compressed: false,
                    offset: None,
                    filename: None,
                });
            }
        }
    }
}

/// Map `[start, start + max_length)` of `top` (clipped to its size), merging adjacent runs
/// as `qemu-img map --output=json` does.
pub async fn map_image(
    top: &NodeRef,
    start: u64,
    max_length: Option<u64>,
) -> Result<Vec<MapEntry>> {
    let size = top.size();
    let end = match max_length {
        Some(l) => start.saturating_add(l).min(size),
        None => size,
    };
    let mut out: Vec<MapEntry> = Vec::new();
    let mut offset = start;
    while offset < end {
        let next = entry_at(top, offset, end - offset)
            .await
            .map_err(|e| e.context("Could not read file metadata"))?;
        offset += next.length;
        match out.last_mut() {
            Some(cur) if cur.mergeable(&next) => cur.length += next.length,
            _ => out.push(next),
        }
    }
    Ok(out)
}

/// The JSON text of `qemu-img map --output=json`, trailing newline included.
pub fn render_json(entries: &[MapEntry]) -> String {
    let mut s = String::from("[");
    for (i, e) in entries.iter().enumerate() {
        let _ = write!(
            s,
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \
             \"data\": {}, \"compressed\": {}",
            e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
        );
        if let Some(o) = e.offset {
            let _ = write!(s, ", \"offset\": {o}");
        }
        s.push('}');
        if i + 1 < entries.len() {
            s.push_str(",\n");
        }
    }
    s.push_str("]\n");
    s
}

/// C's `%#-16x`: `0x`-prefixed hex (plain `0` for zero), left-aligned in 16 columns.
fn hex16(v: u64) -> String {
    let h = if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    };
    format!("{h:<16}")
}

/// The text of `qemu-img map` (human output): a header, then one line per data run.
///
/// Returns the text and, like qemu-img, an error once it meets data with no host offset
/// (compressed, encrypted or external clusters); the text holds what was printed before.
pub fn render_human(entries: &[MapEntry]) -> (String, Result<()>) {
    let mut s = format!(
        "{:<16}{:<16}{:<16}{}\n",
        "Offset", "Length", "Mapped to", "File"
    );
    // qemu-img folds 0, ZERO and ZERO|DATA together before merging; re-run its merge with
    // that rule. Only entries with data and no zero flag are printed, and those are never
    // folded, so merging the JSON runs again prints the same lines as merging raw ones.
    let mut cur: Option<MapEntry> = None;
    for e in entries
        .iter()
        .cloned()
        .chain(std::iter::once_with(|| MapEntry {
            start: 0,
            length: 0,
            depth: 0,
            present: false,
            zero: false,
            data: false,
            compressed: false,
            offset: None,
            filename: None,
        }))
    {
        let last = e.length == 0;
        let mut next = e;
        if let Some(c) = cur.as_mut() {
            if !last && c.mergeable(&next) {
                c.length += next.length;
                continue;
            }
            if c.data && c.offset.is_none() {
                let err =
                    Error::unsupported("File contains external, encrypted or compressed clusters.");
                return (s, Err(err));
            }
            if c.data && !c.zero {
                let _ = writeln!(
                    s,
                    "{}{}{}{}",
                    hex16(c.start),
                    hex16(c.length),
                    hex16(c.offset.unwrap_or(0)),
                    c.filename.as_deref().unwrap_or("")
                );
            }
            if !next.data || next.zero {
                next.data = false;
                next.zero = true;
            }
        }
        if last {
            break;
        }
        cur = Some(next);
    }
    (s, Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Layer, chain};

    const K: u64 = 1024;

    #[tokio::test]
    async fn json_and_human_of_a_scripted_chain() {
        let c = chain(&[
            Layer::new(2048 * K)
                .data(64 * K, 64 * K)
                .zero(128 * K, 64 * K),
            Layer::new(1024 * K)
                .data(0, 192 * K)
                .compressed(512 * K, 64 * K),
        ]);
        let entries = map_image(&c[0], 0, None).await.unwrap();
        let json = render_json(&entries);
        assert_eq!(
            json,
            "[{ \"start\": 0, \"length\": 65536, \"depth\": 1, \"present\": true, \"zero\": false, \"data\": true, \"compressed\": false, \"offset\": 0},\n\
             { \"start\": 65536, \"length\": 65536, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true, \"compressed\": false, \"offset\": 65536},\n\
             { \"start\": 131072, \"length\": 65536, \"depth\": 0, \"present\": true, \"zero\": true, \"data\": false, \"compressed\": false},\n\
             { \"start\": 196608, \"length\": 327680, \"depth\": 1, \"present\": false, \"zero\": true, \"data\": false, \"compressed\": false},\n\
             { \"start\": 524288, \"length\": 65536, \"depth\": 1, \"present\": true, \"zero\": false, \"data\": true, \"compressed\": true},\n\
             { \"start\": 589824, \"length\": 458752, \"depth\": 1, \"present\": false, \"zero\": true, \"data\": false, \"compressed\": false},\n\
             { \"start\": 1048576, \"length\": 1048576, \"depth\": 0, \"present\": false, \"zero\": true, \"data\": false, \"compressed\": false}]\n"
        );
        let (text, res) = render_human(&entries);
        assert_eq!(
            text,
            "Offset          Length          Mapped to       File\n\
             0               0x10000         0               layer1\n\
             0x10000         0x10000         0x10000         layer0\n"
        );
        assert_eq!(
            res.unwrap_err().message(),
            "File contains external, encrypted or compressed clusters."
        );
        let window = map_image(&c[0], 32 * K, Some(64 * K)).await.unwrap();
        assert_eq!(window.len(), 2);
        assert_eq!((window[0].start, window[0].length), (32 * K, 32 * K));
        assert_eq!((window[1].start, window[1].length), (64 * K, 32 * K));
    }

    #[test]
    fn hex_columns_follow_printf() {
        assert_eq!(hex16(0), "0               ");
        assert_eq!(hex16(0x10000), "0x10000         ");
    }
}
