//! Output the way qemu-img prints it: `size_to_str` ("1.26 MiB"), QEMU's pretty JSON and its
//! human dump of QAPI dictionaries.
//!
//! qemu-img builds a QObject tree with the QAPI visitor and prints it; the key order in a
//! QDict is that of QEMU's hash table (512 buckets, `tdb_hash`, new entries at the head of a
//! bucket), not insertion order. [`QDict`] reproduces that order, so our JSON matches
//! byte for byte for any set of keys.

use std::fmt::Write as _;

/// A QObject value.
#[derive(Debug, Clone, PartialEq)]
pub enum QObj {
    /// A signed integer (QAPI `int`).
    Int(i64),
    /// An unsigned integer (QAPI `uint64`/`size`).
    UInt(u64),
    /// A boolean.
    Bool(bool),
    /// A string.
    Str(String),
    /// A list.
    List(Vec<QObj>),
    /// A dictionary.
    Dict(QDict),
}

/// A QDict: keeps entries in insertion order and iterates in QEMU's order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QDict {
    entries: Vec<(String, QObj)>,
}

/// Number of buckets of QEMU's QDict (`QDICT_BUCKET_MAX`).
const QDICT_BUCKETS: u32 = 512;

/// QEMU's `tdb_hash` of a QDict key.
fn tdb_hash(key: &str) -> u32 {
    let mut value = 0x238F_13AFu32.wrapping_mul(key.len() as u32);
    for (i, &c) in key.as_bytes().iter().enumerate() {
        value = value.wrapping_add(u32::from(c) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345)
}

impl QDict {
    /// An empty dictionary.
    pub fn new() -> QDict {
        QDict::default()
    }

    /// Add `key` (QAPI visits fields in schema order; call in that order).
    pub fn put(&mut self, key: &str, value: QObj) -> &mut Self {
        self.entries.push((key.to_string(), value));
        self
    }

    /// Add `key` only when `value` is `Some`.
    pub fn put_opt(&mut self, key: &str, value: Option<QObj>) -> &mut Self {
        if let Some(v) = value {
            self.put(key, v);
        }
        self
    }

    /// Whether the dictionary has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries in QEMU's iteration order: by bucket, and newest first within a bucket.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &QObj)> {
        let mut idx: Vec<(u32, std::cmp::Reverse<usize>)> = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (tdb_hash(k) % QDICT_BUCKETS, std::cmp::Reverse(i)))
            .collect();
        idx.sort();
        idx.into_iter().map(move |(_, std::cmp::Reverse(i))| {
            let (k, v) = &self.entries[i];
            (k.as_str(), v)
        })
    }
}

impl QObj {
    /// A string value.
    pub fn str(s: impl Into<String>) -> QObj {
        QObj::Str(s.into())
    }
}

/// QEMU's `qobject_to_json_pretty`, without the trailing newline.
pub fn to_json_pretty(obj: &QObj) -> String {
    let mut out = String::new();
    json(obj, 0, &mut out);
    out
}

fn newline(out: &mut String, indent: usize) {
    out.push('\n');
    out.extend(std::iter::repeat_n(' ', indent * 4));
}

fn json(obj: &QObj, indent: usize, out: &mut String) {
    match obj {
        QObj::Int(v) => {
            let _ = write!(out, "{v}");
        }
        QObj::UInt(v) => {
            let _ = write!(out, "{v}");
        }
        QObj::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        QObj::Str(s) => json_str(s, out),
        QObj::List(items) => {
            out.push('[');
            let mut sep = "";
            for item in items {
                out.push_str(sep);
                newline(out, indent + 1);
                json(item, indent + 1, out);
                sep = ",";
            }
            newline(out, indent);
            out.push(']');
        }
        QObj::Dict(d) => {
            out.push('{');
            let mut sep = "";
            for (k, v) in d.iter() {
                out.push_str(sep);
                newline(out, indent + 1);
                json_str(k, out);
                out.push_str(": ");
                json(v, indent + 1, out);
                sep = ",";
            }
            newline(out, indent);
            out.push('}');
        }
    }
}

/// QEMU's `to_json_str`: escapes control characters and everything outside printable ASCII.
fn json_str(s: &str, out: &mut String) {
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
                    let _ = write!(out, "\\u{unit:04X}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// QEMU's `dump_qobject` (block/qapi.c): the human form of format-specific information.
pub fn dump_human(obj: &QObj, indent: usize, out: &mut String) {
    match obj {
        QObj::Int(v) => {
            let _ = write!(out, "{v}");
        }
        QObj::UInt(v) => {
            let _ = write!(out, "{v}");
        }
        QObj::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        QObj::Str(s) => out.push_str(s),
        QObj::List(items) => {
            for (i, item) in items.iter().enumerate() {
                let composite = matches!(item, QObj::List(_) | QObj::Dict(_));
                let _ = write!(
                    out,
                    "{:w$}[{i}]:{}",
                    "",
                    if composite { '\n' } else { ' ' },
                    w = indent * 4
                );
                dump_human(item, indent + 1, out);
                if !composite {
                    out.push('\n');
                }
            }
        }
        QObj::Dict(d) => {
            for (k, v) in d.iter() {
                let composite = matches!(v, QObj::List(_) | QObj::Dict(_));
                let _ = write!(
                    out,
                    "{:w$}{}:{}",
                    "",
                    k.replace('-', " "),
                    if composite { '\n' } else { ' ' },
                    w = indent * 4
                );
                dump_human(v, indent + 1, out);
                if !composite {
                    out.push('\n');
                }
            }
        }
    }
}

/// QEMU's `size_to_str`: "0 B", "196 KiB", "1.42 MiB", "1 GiB".
pub fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // frexp(val / (1000/1024)) gives the exponent e with 2^(e-1) <= x < 2^e.
    let x = val as f64 / (1000.0 / 1024.0);
    let e = if x == 0.0 {
        0
    } else {
        x.log2().floor() as i32 + 1
    };
    let i = ((e - 1) / 10).clamp(0, 6) as usize;
    let div = (1u64 << (i * 10)) as f64;
    format!("{} {}B", format_g3(val as f64 / div), SUFFIXES[i])
}

/// C's `%0.3g`.
pub fn format_g3(v: f64) -> String {
    format_g(v, 3)
}

/// C's `%.{prec}g` for finite non-negative values.
pub fn format_g(v: f64, prec: usize) -> String {
    if v == 0.0 {
        return "0".to_string();
    }
    let sci = format!("{:.*e}", prec - 1, v);
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if exp < -4 || exp >= prec as i32 {
        let mant = strip_zeros(mant);
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mant}e{sign}{:02}", exp.abs())
    } else {
        let decimals = (prec as i32 - 1 - exp).max(0) as usize;
        strip_zeros(&format!("{v:.decimals$}")).to_string()
    }
}

fn strip_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_like_qemu() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(512), "512 B");
        assert_eq!(size_to_str(200704), "196 KiB");
        assert_eq!(size_to_str(197120), "192 KiB");
        assert_eq!(size_to_str(1486848), "1.42 MiB");
        assert_eq!(size_to_str(2032128), "1.94 MiB");
        assert_eq!(size_to_str(1073741824), "1 GiB");
        assert_eq!(size_to_str(10485760), "10 MiB");
        assert_eq!(size_to_str(1024), "1 KiB");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(999), "999 B");
    }

    #[test]
    fn g_format() {
        assert_eq!(format_g3(1.0), "1");
        assert_eq!(format_g3(1.5), "1.5");
        assert_eq!(format_g3(999.7), "1e+03");
        assert_eq!(format_g3(0.9765625), "0.977");
    }

    #[test]
    fn qdict_order_matches_qemu() {
        let mut d = QDict::new();
        for k in [
            "id",
            "name",
            "vm-state-size",
            "date-sec",
            "date-nsec",
            "vm-clock-sec",
            "vm-clock-nsec",
            "icount",
        ] {
            d.put(k, QObj::Int(0));
        }
        let keys: Vec<_> = d.iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "icount",
                "vm-clock-nsec",
                "name",
                "date-sec",
                "date-nsec",
                "vm-clock-sec",
                "id",
                "vm-state-size"
            ]
        );
    }

    #[test]
    fn pretty_json_like_qemu() {
        let mut data = QDict::new();
        data.put("type", QObj::str("file"));
        data.put("data", QObj::Dict(QDict::new()));
        let mut top = QDict::new();
        top.put("children", QObj::List(vec![]));
        top.put("format-specific", QObj::Dict(data));
        let s = to_json_pretty(&QObj::Dict(top));
        assert_eq!(
            s,
            "{\n    \"children\": [\n    ],\n    \"format-specific\": {\n        \"type\": \"file\",\n        \"data\": {\n        }\n    }\n}"
        );
    }

    #[test]
    fn json_escapes() {
        let mut s = String::new();
        json_str("a\"b\\c\u{1}é", &mut s);
        assert_eq!(s, "\"a\\\"b\\\\c\\u0001\\u00E9\"");
    }
}
