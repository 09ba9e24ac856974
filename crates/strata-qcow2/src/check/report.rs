//! The result of a check and its rendering, exactly as `qemu-img check` prints it.

/// Counters of one check pass (QEMU's `BdrvCheckResult`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Internal errors (I/O, out of memory) that prevented parts of the check.
    pub check_errors: u64,
    /// Inconsistencies that may corrupt data.
    pub corruptions: u64,
    /// Clusters with a refcount but no reference.
    pub leaks: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// End of the last used cluster.
    pub image_end_offset: u64,
    /// Clusters of the virtual disk.
    pub total_clusters: u64,
    /// Clusters the active L1 table maps to host clusters.
    pub allocated_clusters: u64,
    /// Allocated clusters not contiguous with their predecessor.
    pub fragmented_clusters: u64,
    /// Compressed clusters.
    pub compressed_clusters: u64,
}

/// What `qemu-img check` reports about a qcow2 image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// The final counters (after a repair: of the double check, with the fixed counts of the
    /// repair pass, as qemu-img shows them).
    pub counts: Counts,
    /// `(leaks_fixed, corruptions_fixed)` when a repair pass fixed something: qemu-img then
    /// prints the "inconsistencies were found and repaired" block and checks again.
    pub repaired: Option<(u64, u64)>,
    /// The diagnostic lines qemu-img writes to stderr, in order, without newlines.
    pub messages: Vec<String>,
    /// Set when the check itself failed (`Check failed: <reason>`); nothing else is printed.
    pub failure: Option<String>,
}

impl CheckReport {
    /// qemu-img's exit status: 1 for a failed check or internal errors, 2 for corruptions,
    /// 3 for leaks only, 0 when clean.
    pub fn exit_code(&self) -> i32 {
        if self.failure.is_some() || self.counts.check_errors > 0 {
            1
        } else if self.counts.corruptions > 0 {
            2
        } else if self.counts.leaks > 0 {
            3
        } else {
            0
        }
    }

    /// The last stderr line qemu-img adds for a failed check (`Check failed[: reason]`).
    pub fn failure_line(&self) -> Option<String> {
        match &self.failure {
            Some(r) => Some(format!("Check failed: {r}")),
            None if self.counts.check_errors > 0 => Some("Check failed".into()),
            None => None,
        }
    }

    fn repaired_block(&self) -> String {
        match self.repaired {
            Some((leaks, corruptions)) => format!(
                "The following inconsistencies were found and repaired:\n\n    {leaks} leaked \
                 clusters\n    {corruptions} corruptions\n\nDouble checking the fixed image now...\n"
            ),
            None => String::new(),
        }
    }

    /// Standard output of `qemu-img check` (human format).
    pub fn render_human(&self) -> String {
        let mut s = self.repaired_block();
        if self.failure.is_some() {
            return s;
        }
        let c = &self.counts;
        if c.corruptions == 0 && c.leaks == 0 && c.check_errors == 0 {
            s.push_str("No errors were found on the image.\n");
        } else {
            if c.corruptions > 0 {
                s.push_str(&format!(
                    "\n{} errors were found on the image.\nData may be corrupted, or further \
                     writes to the image may corrupt it.\n",
                    c.corruptions
                ));
            }
            if c.leaks > 0 {
                s.push_str(&format!(
                    "\n{} leaked clusters were found on the image.\nThis means waste of disk \
                     space, but no harm to data.\n",
                    c.leaks
                ));
            }
            if c.check_errors > 0 {
                s.push_str(&format!(
                    "\n{} internal errors have occurred during the check.\n",
                    c.check_errors
                ));
            }
        }
        if c.total_clusters != 0 && c.allocated_clusters != 0 {
            let alloc = c.allocated_clusters as f64;
            s.push_str(&format!(
                "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
                c.allocated_clusters,
                c.total_clusters,
                alloc * 100.0 / c.total_clusters as f64,
                c.fragmented_clusters as f64 * 100.0 / alloc,
                c.compressed_clusters as f64 * 100.0 / alloc
            ));
        }
        if c.image_end_offset != 0 {
            s.push_str(&format!("Image end offset: {}\n", c.image_end_offset));
        }
        s
    }

    /// Standard output of `qemu-img check --output=json` for `filename`. Fields appear in
    /// QEMU's QDict hash order; optional ones only when non-zero, as QEMU's `has_*` flags do.
    pub fn render_json(&self, filename: &str) -> String {
        if self.failure.is_some() {
            return String::new();
        }
        let c = &self.counts;
        let num =
            |k: &str, v: u64, always: bool| (always || v != 0).then(|| format!("\"{k}\": {v}"));
        let fields = [
            num("image-end-offset", c.image_end_offset, false),
            num("compressed-clusters", c.compressed_clusters, false),
            num("total-clusters", c.total_clusters, false),
            num("corruptions", c.corruptions, false),
            num("corruptions-fixed", c.corruptions_fixed, false),
            num("check-errors", c.check_errors, true),
            num("leaks", c.leaks, false),
            num("leaks-fixed", c.leaks_fixed, false),
            num("allocated-clusters", c.allocated_clusters, false),
            Some(format!("\"filename\": {}", json_string(filename))),
            Some("\"format\": \"qcow2\"".to_string()),
            num("fragmented-clusters", c.fragmented_clusters, false),
        ];
        let body: Vec<String> = fields
            .into_iter()
            .flatten()
            .map(|f| format!("    {f}"))
            .collect();
        // (The "repaired" block is printed in human format only.)
        format!("{{\n{}\n}}\n", body.join(",\n"))
    }

    /// Standard error of `qemu-img check` (the diagnostic lines, then the failure line).
    pub fn render_stderr(&self) -> String {
        let mut s = String::new();
        for m in &self.messages {
            s.push_str(m);
            s.push('\n');
        }
        if let Some(l) = self.failure_line() {
            s.push_str(&format!("qemu-img: {l}\n"));
        }
        s
    }
}

/// A JSON string literal, escaped as QEMU's JSON writer does.
fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (c as u32) >= 0x7f => {
                let mut buf = [0u16; 2];
                for u in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{u:04X}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_image_text() {
        let r = CheckReport {
            counts: Counts {
                total_clusters: 65536,
                allocated_clusters: 65,
                image_end_offset: 393216,
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(
            r.render_human(),
            "No errors were found on the image.\n65/65536 = 0.10% allocated, 0.00% fragmented, \
             0.00% compressed clusters\nImage end offset: 393216\n"
        );
        assert_eq!(r.exit_code(), 0);
        assert_eq!(
            r.render_json("a\"b"),
            "{\n    \"image-end-offset\": 393216,\n    \"total-clusters\": 65536,\n    \
             \"check-errors\": 0,\n    \"allocated-clusters\": 65,\n    \"filename\": \
             \"a\\\"b\",\n    \"format\": \"qcow2\"\n}\n"
        );
    }
}
