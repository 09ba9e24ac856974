//! JSON output exactly as QEMU's `json-writer.c` produces it: `", "` and `": "`
//! separators, non-ASCII and control characters as upper-case `\uXXXX` escapes
//! (surrogate pairs beyond the BMP), doubles as `%.17g`; and the pretty form
//! (4-space indentation, empty containers as `{` newline `}`).

use serde_json::{Number, Value};
use std::fmt::Write as _;

/// Serializes `v` like QEMU (compact or pretty). Lines are separated by `\n`; the
/// monitor turns them into `\r\n` on the wire.
pub fn to_qemu_json(v: &Value, pretty: bool) -> String {
    let mut s = String::new();
    write_value(&mut s, v, pretty, 0);
    s
}

fn indent(s: &mut String, pretty: bool, level: usize) {
    if pretty {
        s.push('\n');
        for _ in 0..level {
            s.push_str("    ");
        }
    }
}

fn write_value(s: &mut String, v: &Value, pretty: bool, level: usize) {
    match v {
        Value::Null => s.push_str("null"),
        Value::Bool(b) => s.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => write_number(s, n),
        Value::String(t) => write_string(s, t),
        Value::Array(a) => {
            s.push('[');
            for (i, e) in a.iter().enumerate() {
                if i > 0 {
                    s.push(',');
                    if !pretty {
                        s.push(' ');
                    }
                }
                indent(s, pretty, level + 1);
                write_value(s, e, pretty, level + 1);
            }
            indent(s, pretty, level);
            s.push(']');
        }
        Value::Object(m) => {
            s.push('{');
            for (i, (k, e)) in m.iter().enumerate() {
                if i > 0 {
                    s.push(',');
                    if !pretty {
                        s.push(' ');
                    }
                }
                indent(s, pretty, level + 1);
                write_string(s, k);
                s.push_str(": ");
                write_value(s, e, pretty, level + 1);
            }
            indent(s, pretty, level);
            s.push('}');
        }
    }
}

fn write_number(s: &mut String, n: &Number) {
    if let Some(i) = n.as_i64() {
        let _ = write!(s, "{i}");
    } else if let Some(u) = n.as_u64() {
        let _ = write!(s, "{u}");
    } else {
        s.push_str(&format_g17(n.as_f64().unwrap_or(0.0)));
    }
}

/// C's `printf("%.17g", f)`.
pub fn format_g17(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if f == 0.0 {
        return if f.is_sign_negative() {
            "-0".into()
        } else {
            "0".into()
        };
    }
    let e = format!("{f:.16e}");
    let (mant, exp) = e.split_once('e').unwrap_or((&e, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..17).contains(&exp) {
        let prec = (16 - exp).max(0) as usize;
        let fixed = format!("{f:.prec$}");
        trim_zeros(&fixed)
    } else {
        let m = trim_zeros(mant);
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{m}e{sign}{:02}", exp.abs())
    }
}

fn trim_zeros(s: &str) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s.to_string()
    }
}

fn write_string(s: &mut String, t: &str) {
    s.push('"');
    for c in t.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\u{8}' => s.push_str("\\b"),
            '\u{c}' => s.push_str("\\f"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\t' => s.push_str("\\t"),
            c if (c as u32) > 0xFFFF => {
                let v = c as u32 - 0x10000;
                let _ = write!(
                    s,
                    "\\u{:04X}\\u{:04X}",
                    0xD800 + (v >> 10),
                    0xDC00 + (v & 0x3FF)
                );
            }
            c if (c as u32) < 0x20 || (c as u32) >= 0x7F => {
                let _ = write!(s, "\\u{:04X}", c as u32);
            }
            c => s.push(c),
        }
    }
    s.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn compact_like_qemu() {
        let v = json!({"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "id": {"a": [1]}});
        assert_eq!(
            to_qemu_json(&v, false),
            r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "id": {"a": [1]}}"#
        );
        assert_eq!(
            to_qemu_json(&json!("é😀\u{7f}/\"\t"), false),
            r#""\u00E9\uD83D\uDE00\u007F/\"\t""#
        );
        assert_eq!(
            to_qemu_json(&json!([1500.0, 1.2345678901234568e22, 0.5, -1e-7]), false),
            "[1500, 1.2345678901234568e+22, 0.5, -9.9999999999999995e-08]"
        );
        assert_eq!(
            to_qemu_json(&json!({"a": {}, "b": []}), false),
            r#"{"a": {}, "b": []}"#
        );
    }

    // Observed with `--monitor chardev=c,pretty=on` (before the \n -> \r\n conversion).
    #[test]
    fn pretty_like_qemu() {
        let v = json!({"return": {}, "id": [1, {"a": []}, {}]});
        assert_eq!(
            to_qemu_json(&v, true),
            "{\n    \"return\": {\n    },\n    \"id\": [\n        1,\n        {\n            \"a\": [\n            ]\n        },\n        {\n        }\n    ]\n}"
        );
    }
}
