//! A node's filename as QEMU reports it (`query-named-block-nodes` `file`, `image.filename`,
//! `backing_file`): QEMU's `bdrv_refresh_filename` (block.c).
//!
//! A node gets a plain filename when opening that name alone (with the node's format)
//! would build the same tree: a protocol node's own name (`/path`, `null-co://`), a format
//! node's protocol child's name. Otherwise its name is `json:` and its "full open options"
//! as QEMU prints a `QDict`:
//!
//! - the node's *strong* options (`driver`, `filename`, and per driver the options that
//!   change the data: raw's `offset`/`size`, null's `size`/`read-zeroes`, throttle's
//!   `throttle-group`, blkdebug's rules...), looked up in the flattened options (`a.b`);
//! - every child's full open options as a nested object under the child's role — the
//!   backing child only when the backing was *overridden* (the image header would not
//!   have opened that node: an explicit `backing` given by node name or inline options,
//!   unless its filename is exactly the header's string), and `"backing": null` when a
//!   header's backing file was suppressed;
//! - members in QDict hash order ([`strata_job::qdict::qemu_order`]), `", "` and `": "`
//!   separators, non-ASCII escaped as `\uXXXX`; truncated to QEMU's `PATH_MAX` with `...`.
//!
//! Strong options make the name `json:` (so do an overridden backing and any filter); only
//! `driver` and `filename` do not. Drivers with their own `bdrv_refresh_filename`:
//! null (`null-co://` without strong options), blkdebug (`blkdebug:CONFIG:IMAGE`),
//! copy-before-write and snapshot-access (their `file` child's name), the jobs' implicit
//! filters (their child's name and options).

use std::collections::HashMap;

use serde_json::{Map, Value};
use strata_core::{BlockNode, NodeRef};
use strata_job::qdict::qemu_order;
use strata_qcow2::Qcow2;

use crate::graph::{Graph, NodeKind, NodeRec};
use crate::link::driver_of;
use crate::open::path_combine;

/// Recorded in a qcow2 node's options when its backing was opened from the image header
/// (QEMU's "implicit backing"): the header's backing file name at open. QEMU then takes the
/// opened backing node's filename as the header's (`auto_backing_file`), so the backing
/// does not count as overridden until a job rewrites the header.
pub const BACKING_FROM_HEADER: &str = "x-strata-backing-from-header";

/// `sizeof(bs->filename)`.
const PATH_MAX: usize = 4096;

/// What `bdrv_refresh_filename` leaves in a node.
#[derive(Debug, Clone, Default)]
struct Refreshed {
    /// `exact_filename`: empty when the node cannot be named by a plain filename.
    exact: String,
    /// `filename`: `exact`, or `json:{...}`.
    filename: String,
    /// `full_open_options`, in insertion order.
    full: Map<String, Value>,
    /// The driver opens by protocol (`bdrv_file_open` / `protocol_name`).
    protocol: bool,
}

/// The filename QEMU reports for the node `name` (empty for an unknown node).
pub fn node_filename(g: &Graph, name: &str) -> String {
    refresh(g, name, &mut HashMap::new()).filename
}

fn refresh(g: &Graph, name: &str, memo: &mut HashMap<String, Refreshed>) -> Refreshed {
    if let Some(r) = memo.get(name) {
        return r.clone();
    }
    // A placeholder first: a cycle (which the graph does not allow) cannot recurse forever.
    memo.insert(name.to_string(), Refreshed::default());
    let r = match g.node(name) {
        Some(rec) => compute(g, rec, memo),
        None => Refreshed::default(),
    };
    memo.insert(name.to_string(), r.clone());
    r
}

/// The strong runtime options of a driver besides `driver` and `filename`; a trailing dot
/// makes a prefix.
fn strong_options(driver: &str) -> &'static [&'static str] {
    match driver {
        "raw" => &["offset", "size"],
        "null-co" | "null-aio" => &["size", "read-zeroes"],
        "throttle" => &["throttle-group"],
        "qcow2" => &["encrypt.key-secret"],
        "blkdebug" => &[
            "config",
            "inject-error.",
            "set-state.",
            "align",
            "max-transfer",
            "opt-write-zero",
            "max-write-zero",
            "opt-discard",
            "max-discard",
        ],
        _ => &[],
    }
}

/// Drivers QEMU marks `is_filter`: their filename is never their child's.
fn is_filter(driver: &str) -> bool {
    matches!(
        driver,
        "throttle"
            | "copy-on-read"
            | "copy-before-write"
            | "snapshot-access"
            | "blkdebug"
            | "mirror_top"
            | "commit_top"
            | "compress"
            | "preallocate"
    )
}

/// QEMU's child role names where Strata's differ (the jobs' filters hold their child as
/// `backing` in QEMU).
fn qemu_role<'a>(driver: &str, role: &'a str) -> &'a str {
    match (driver, role) {
        ("mirror_top" | "commit_top", "file") => "backing",
        _ => role,
    }
}

/// A filter a job inserted without a `filter-node-name` (QEMU's `bs->implicit`): it takes
/// its child's filename and options as they are.
fn is_implicit(rec: &NodeRec, driver: &str) -> bool {
    rec.auto_named
        && rec.kind == NodeKind::Filter
        && match driver {
            "mirror_top" | "commit_top" | "copy-before-write" => true,
            // block-stream's filter names its bottom node; blockdev-add's rarely does.
            "copy-on-read" => rec.options.get("bottom").is_some(),
            _ => false,
        }
}

fn compute(g: &Graph, rec: &NodeRec, memo: &mut HashMap<String, Refreshed>) -> Refreshed {
    let driver = rec
        .options
        .get("driver")
        .and_then(Value::as_str)
        .unwrap_or_else(|| rec.node.driver_link().driver())
        .to_string();
    // Children first, oldest first (as they were attached).
    let edges: Vec<(String, String)> = g
        .children_of(&rec.name)
        .map(|e| (e.role.clone(), e.child.clone()))
        .collect();
    let kids: Vec<(String, Refreshed)> = edges
        .into_iter()
        .map(|(role, child)| (role, refresh(g, &child, memo)))
        .collect();
    let child = |role: &str| kids.iter().find(|(r, _)| r == role).map(|(_, c)| c);
    let protocol = rec.kind == NodeKind::Protocol || driver == "blkdebug";

    if is_implicit(rec, &driver)
        && let Some(c) = child("file")
    {
        return c.clone();
    }

    // append_strong_runtime_options
    let opts = rec.options.as_object().cloned().unwrap_or_default();
    let flat = flatten(&opts);
    let mut full = Map::new();
    let mut strong = false;
    for &key in ["driver", "filename"].iter().chain(strong_options(&driver)) {
        let mut given = false;
        if key.ends_with('.') {
            // In the order QEMU walks the node's options QDict.
            for (k, v) in &qemu_order(flat.clone()) {
                if k.starts_with(key) {
                    full.insert(k.clone(), v.clone());
                    given = true;
                }
            }
        } else if let Some(v) = flat.get(key) {
            full.insert(key.to_string(), v.clone());
            given = true;
        }
        strong |= given && key != "driver" && key != "filename";
    }
    if !full.contains_key("driver") {
        full.insert("driver".into(), Value::String(driver.clone()));
    }

    let backing = child("backing");
    let overridden = backing_overridden(rec, backing);
    let generate_json = strong || overridden;

    // The children, most recently attached first (QEMU's list order).
    for (role, c) in kids.iter().rev() {
        if role == "backing" && !overridden {
            continue;
        }
        full.insert(
            qemu_role(&driver, role).to_string(),
            Value::Object(c.full.clone()),
        );
    }
    if overridden && backing.is_none() {
        full.insert("backing".into(), Value::Null);
    }

    let exact = match driver.as_str() {
        "file" | "host_device" => flat
            .get("filename")
            .and_then(Value::as_str)
            .map_or_else(|| rec.node.filename(), str::to_string),
        "null-co" | "null-aio" => {
            if full
                .keys()
                .all(|k| matches!(k.as_str(), "driver" | "filename" | "latency-ns"))
            {
                format!("{driver}://")
            } else {
                String::new()
            }
        }
        "blkdebug" => match child("image") {
            Some(img)
                if !img.exact.is_empty()
                    && full.keys().all(|k| {
                        matches!(k.as_str(), "config" | "image" | "x-image" | "driver")
                    }) =>
            {
                let config = flat.get("config").and_then(Value::as_str).unwrap_or("");
                format!("blkdebug:{config}:{}", img.exact)
            }
            _ => String::new(),
        },
        "copy-before-write" | "snapshot-access" | "mirror_top" | "commit_top" => child("file")
            .map(|c| c.filename.clone())
            .unwrap_or_default(),
        // Protocol drivers from outside this crate (nbd) name themselves.
        _ if rec.kind == NodeKind::Protocol => rec.node.filename(),
        // A format over a protocol node, opened as the file's name alone would open it.
        _ => match child("file") {
            Some(f)
                if !f.exact.is_empty() && f.protocol && !is_filter(&driver) && !generate_json =>
            {
                f.exact.clone()
            }
            _ => String::new(),
        },
    };
    let filename = if exact.is_empty() {
        json_filename(&full)
    } else {
        exact.clone()
    };
    Refreshed {
        exact,
        filename,
        full,
        protocol,
    }
}

/// QEMU's `bdrv_backing_overridden`: the backing is not what the header names. The header's
/// name counts as the opened backing's filename when the backing was opened from it
/// (QEMU's `auto_backing_file`), until the header is rewritten.
fn backing_overridden(rec: &NodeRec, backing: Option<&Refreshed>) -> bool {
    let node: NodeRef = rec.node.clone();
    let driver = driver_of(&node);
    let Some(q) = driver.as_any().downcast_ref::<Qcow2>() else {
        return false;
    };
    let header = q.header().backing_file.unwrap_or_default();
    let auto = match rec.options.get(BACKING_FROM_HEADER).and_then(Value::as_str) {
        Some(h) if !h.is_empty() && h == header => path_combine(&rec.node.filename(), h),
        _ => header,
    };
    match backing {
        Some(b) => auto != b.filename,
        None => !auto.is_empty(),
    }
}

/// QEMU's `qdict_flatten`: nested objects and lists become `a.b` / `a.0` members; empty
/// ones stay as they are.
fn flatten(o: &Map<String, Value>) -> Map<String, Value> {
    fn walk(prefix: &str, v: &Value, out: &mut Map<String, Value>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, v) in m {
                    walk(&format!("{prefix}.{k}"), v, out);
                }
            }
            Value::Array(a) if !a.is_empty() => {
                for (i, v) in a.iter().enumerate() {
                    walk(&format!("{prefix}.{i}"), v, out);
                }
            }
            _ => {
                out.insert(prefix.to_string(), v.clone());
            }
        }
    }
    let mut out = Map::new();
    for (k, v) in o {
        walk(k, v, &mut out);
    }
    out
}

/// `json:` and the options, cut to QEMU's `PATH_MAX` with `...` when longer.
fn json_filename(full: &Map<String, Value>) -> String {
    let mut s = String::from("json:");
    to_json(&Value::Object(full.clone()), &mut s);
    if s.len() >= PATH_MAX {
        // Only ASCII is left after escaping.
        s.truncate(PATH_MAX - 4);
        s.push_str("...");
    }
    s
}

/// QEMU's `qobject_to_json` (not pretty).
fn to_json(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => quote(s, out),
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                to_json(x, out);
            }
            out.push(']');
        }
        Value::Object(m) => {
            out.push('{');
            for (i, (k, x)) in qemu_order(m.clone()).iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                quote(k, out);
                out.push_str(": ");
                to_json(x, out);
            }
            out.push('}');
        }
    }
}

/// A JSON string as QEMU writes it: control characters, DEL and everything beyond ASCII as
/// `\uXXXX` (surrogate pairs beyond the BMP).
fn quote(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || (c as u32) >= 0x7f => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04X}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockdev::{Objects, blockdev_add};
    use crate::drivers::throttle::{ThrottleGroup, ThrottleLimits};
    use serde_json::json;
    use std::process::Command;

    fn qemu_img(args: &[&str]) {
        let st = Command::new("qemu-img")
            .args(args)
            .status()
            .expect("qemu-img is installed");
        assert!(st.success(), "qemu-img {args:?}");
    }

    async fn add(g: &mut Graph, objects: &Objects, v: Value) {
        let o = v.as_object().unwrap().clone();
        blockdev_add(g, objects, &o).await.unwrap();
    }

    /// Expected strings as qemu-storage-daemon 10.0.2 printed them (`query-named-block-nodes`
    /// `file`) for the same options, with its temp dir replaced by `$D`.
    #[tokio::test]
    async fn matches_qemu_storage_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        let p = |n: &str| format!("{d}/{n}");
        qemu_img(&["create", "-q", "-f", "qcow2", &p("base.qcow2"), "4M"]);
        for (img, b) in [("mid.qcow2", "base.qcow2"), ("top.qcow2", "mid.qcow2")] {
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                b,
                "-F",
                "qcow2",
                &p(img),
            ]);
        }
        let abs = p("base.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &abs,
            "-F",
            "qcow2",
            &p("abs.qcow2"),
        ]);
        for n in ["h1", "h2", "c1", "t1"] {
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                &p(&format!("{n}-base.qcow2")),
                "4M",
            ]);
            for (img, b) in [("mid", "base"), ("top", "mid")] {
                qemu_img(&[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-b",
                    &format!("{n}-{b}.qcow2"),
                    "-F",
                    "qcow2",
                    &p(&format!("{n}-{img}.qcow2")),
                ]);
            }
        }
        qemu_img(&["create", "-q", "-f", "raw", &p("raw.img"), "4M"]);
        qemu_img(&["create", "-q", "-f", "raw", &p("raw2.img"), "4M"]);

        let mut objects = Objects::default();
        objects.throttle_groups.insert(
            "tg0".into(),
            ThrottleGroup::new("tg0", ThrottleLimits::from_json(&json!({})).unwrap()),
        );
        let mut g = Graph::default();
        let file = |n: &str| json!({"driver": "file", "filename": p(n)});
        let adds = [
            json!({"driver": "qcow2", "node-name": "base", "file": file("base.qcow2"), "backing": null}),
            json!({"driver": "qcow2", "node-name": "mid", "file": file("mid.qcow2"), "backing": "base"}),
            json!({"driver": "file", "node-name": "topf", "filename": p("top.qcow2")}),
            json!({"driver": "qcow2", "node-name": "top", "file": "topf", "backing": null}),
            json!({"driver": "qcow2", "node-name": "absb", "file": file("abs.qcow2"), "backing": "base"}),
            json!({"driver": "qcow2", "node-name": "hdr", "file": file("h1-top.qcow2")}),
            json!({"driver": "raw", "node-name": "raw1", "offset": 65536, "size": 1048576,
                   "file": file("raw.img")}),
            json!({"driver": "raw", "node-name": "raw2",
                   "file": {"driver": "file", "filename": p("raw2.img"), "node-name": "rawf2"}}),
            json!({"driver": "null-co", "node-name": "null1", "size": 1048576}),
            json!({"driver": "null-co", "node-name": "null2"}),
            json!({"driver": "null-co", "node-name": "null3", "read-zeroes": true, "size": 4096}),
            json!({"driver": "null-co", "node-name": "null4", "latency-ns": 5}),
            json!({"driver": "null-aio", "node-name": "na"}),
            json!({"driver": "throttle", "node-name": "thr", "throttle-group": "tg0", "file": "rawf2"}),
            json!({"driver": "copy-on-read", "node-name": "cor", "file": "absb"}),
            json!({"driver": "raw", "node-name": "rawq", "file": "base"}),
            json!({"driver": "qcow2", "node-name": "onraw", "backing": null,
                   "file": {"driver": "raw", "file": file("h2-top.qcow2")}}),
            json!({"driver": "qcow2", "node-name": "inl", "file": file("c1-top.qcow2"),
                   "backing": {"driver": "qcow2", "file": file("c1-mid.qcow2")}}),
            json!({"driver": "blkdebug", "node-name": "bd", "image": file("t1-base.qcow2")}),
            json!({"driver": "blkdebug", "node-name": "bd2", "align": 4096,
                   "inject-error": [{"event": "read_aio", "errno": 5}],
                   "image": {"driver": "null-co", "size": 1048576}}),
            json!({"driver": "blkdebug", "node-name": "bd3", "image": {"driver": "null-co"}}),
        ];
        for a in adds {
            add(&mut g, &objects, a).await;
        }
        let ff = |n: &str| format!(r#"{{"driver": "file", "filename": "{}"}}"#, p(n));
        let base_full = format!(r#"{{"driver": "qcow2", "file": {}}}"#, ff("base.qcow2"));
        let want = [
            ("base", p("base.qcow2")),
            (
                "mid",
                format!(
                    r#"json:{{"backing": {base_full}, "driver": "qcow2", "file": {}}}"#,
                    ff("mid.qcow2")
                ),
            ),
            (
                "top",
                format!(
                    r#"json:{{"backing": null, "driver": "qcow2", "file": {}}}"#,
                    ff("top.qcow2")
                ),
            ),
            ("topf", p("top.qcow2")),
            ("absb", p("abs.qcow2")),
            ("hdr", p("h1-top.qcow2")),
            (
                "raw1",
                format!(
                    r#"json:{{"offset": 65536, "driver": "raw", "size": 1048576, "file": {}}}"#,
                    ff("raw.img")
                ),
            ),
            ("raw2", p("raw2.img")),
            ("null1", r#"json:{"driver": "null-co", "size": 1048576}"#.into()),
            ("null2", "null-co://".into()),
            (
                "null3",
                r#"json:{"read-zeroes": true, "driver": "null-co", "size": 4096}"#.into(),
            ),
            ("null4", "null-co://".into()),
            ("na", "null-aio://".into()),
            (
                "thr",
                format!(
                    r#"json:{{"throttle-group": "tg0", "driver": "throttle", "file": {}}}"#,
                    ff("raw2.img")
                ),
            ),
            (
                "cor",
                format!(
                    r#"json:{{"driver": "copy-on-read", "file": {{"driver": "qcow2", "file": {}}}}}"#,
                    ff("abs.qcow2")
                ),
            ),
            ("rawq", format!(r#"json:{{"driver": "raw", "file": {base_full}}}"#)),
            (
                "onraw",
                format!(
                    r#"json:{{"backing": null, "driver": "qcow2", "file": {{"driver": "raw", "file": {}}}}}"#,
                    ff("h2-top.qcow2")
                ),
            ),
            (
                "inl",
                format!(
                    r#"json:{{"backing": {{"driver": "qcow2", "file": {}}}, "driver": "qcow2", "file": {}}}"#,
                    ff("c1-mid.qcow2"),
                    ff("c1-top.qcow2")
                ),
            ),
            ("bd", format!("blkdebug::{}", p("t1-base.qcow2"))),
            (
                "bd2",
                r#"json:{"image": {"driver": "null-co", "size": 1048576}, "driver": "blkdebug", "inject-error.0.event": "read_aio", "inject-error.0.errno": 5, "align": 4096}"#
                    .into(),
            ),
            ("bd3", "blkdebug::null-co://".into()),
        ];
        for (node, s) in want {
            assert_eq!(node_filename(&g, node), s, "node {node}");
        }
        // The chain opened from the header names plain files.
        let mid = g.chain_below("hdr").unwrap();
        assert_eq!(node_filename(&g, &mid), p("h1-mid.qcow2"));
        let base = g.chain_below(&mid).unwrap();
        assert_eq!(node_filename(&g, &base), p("h1-base.qcow2"));
        assert_eq!(node_filename(&g, "nope"), "");
    }

    #[test]
    fn json_text_like_qemu() {
        let mut s = String::new();
        to_json(&json!({"a\"\\\n\u{7f}é😀": [1, -2, {}, []]}), &mut s);
        assert_eq!(s, r#"{"a\"\\\n\u007F\u00E9\uD83D\uDE00": [1, -2, {}, []]}"#);
        let long = Map::from_iter([("filename".to_string(), json!("x".repeat(5000)))]);
        let f = json_filename(&long);
        assert_eq!(f.len(), PATH_MAX - 1);
        assert!(f.starts_with(r#"json:{"filename": "xxx"#) && f.ends_with("x..."));
    }

    #[test]
    fn flatten_like_qdict_flatten() {
        let o = json!({"a": {"b": 1, "c": [true, {"d": "e"}]}, "f": {}, "g": []});
        let flat = flatten(o.as_object().unwrap());
        assert_eq!(
            Value::Object(flat),
            json!({"a.b": 1, "a.c.0": true, "a.c.1.d": "e", "f": {}, "g": []})
        );
    }
}
