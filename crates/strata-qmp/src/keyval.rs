//! Command-line option strings: QEMU's keyval syntax (`util/keyval.c`), the JSON form
//! of option values, and QemuOpts-style `--chardev` strings.
//!
//! keyval: `key=value` pairs separated by `,` (`,,` is a literal comma), dotted keys
//! nest, numeric key fragments make lists, the first pair may omit its key (the
//! *implied key*), and a later duplicate key wins. The result is a tree of JSON objects,
//! arrays and string leaves, which [`crate::schema::Schema::convert_keyval`] types.

use crate::json_stream;
use serde_json::{Map, Value};

/// The parsed argument of a command-line option.
#[derive(Debug, Clone, PartialEq)]
pub enum OptionArg {
    /// The value started with `{`: a JSON object, validated in JSON mode.
    Json(Map<String, Value>),
    /// A keyval tree with string leaves, converted in keyval mode.
    Keyval(Value),
}

/// Parses an option argument the way qsd's `qobject_input_visitor_new_str` does: JSON if
/// it starts with `{`, keyval (with `implied_key`) otherwise.
pub fn parse_option_arg(arg: &str, implied_key: Option<&str>) -> Result<OptionArg, String> {
    if arg.starts_with('{') {
        match json_stream::parse_one(arg)? {
            Value::Object(m) => Ok(OptionArg::Json(m)),
            _ => Err("Expecting a JSON object".into()),
        }
    } else {
        parse(arg, implied_key).map(OptionArg::Keyval)
    }
}

/// Parses a keyval string; `help`/`?` is rejected as an invalid parameter.
pub fn parse(params: &str, implied_key: Option<&str>) -> Result<Value, String> {
    let (v, help) = parse_with_help(params, implied_key)?;
    if help {
        return Err("Invalid parameter 'help'".into());
    }
    Ok(v)
}

/// Parses a keyval string; also reports whether a `help` (or `?`) parameter was given.
pub fn parse_with_help(params: &str, implied_key: Option<&str>) -> Result<(Value, bool), String> {
    let mut root = Map::new();
    let mut help = false;
    let mut rest = params;
    let mut implied = implied_key;
    while !rest.is_empty() {
        rest = parse_one(&mut root, rest, implied, &mut help)?;
        implied = None;
    }
    let v = listify(Value::Object(root), &mut Vec::new())?;
    Ok((v, help))
}

/// Length of a QAPI name at the start of `s` (QEMU's `parse_qapi_name(s, false)`).
fn qapi_name_len(s: &[u8]) -> usize {
    let mut p = 0;
    if s.first() == Some(&b'_') {
        // Downstream prefix __RFQDN_
        p = 1;
        if s.get(p) != Some(&b'_') {
            return 0;
        }
        p += 1;
        while p < s.len() && (s[p].is_ascii_alphanumeric() || s[p] == b'-' || s[p] == b'.') {
            p += 1;
        }
        if s.get(p) != Some(&b'_') {
            return 0;
        }
        p += 1;
    }
    if !s.get(p).is_some_and(u8::is_ascii_alphabetic) {
        return 0;
    }
    p += 1;
    while p < s.len() && (s[p].is_ascii_alphanumeric() || s[p] == b'-' || s[p] == b'_') {
        p += 1;
    }
    p
}

/// QEMU's `key_to_index`: a decimal index (≤ INT_MAX) at the start of `s`, and its length.
fn key_to_index(s: &[u8]) -> Option<(usize, usize)> {
    let n = s.iter().take_while(|b| b.is_ascii_digit()).count();
    if n == 0 {
        return None;
    }
    let v: u64 = std::str::from_utf8(&s[..n]).ok()?.parse().ok()?;
    if v > i32::MAX as u64 {
        return None;
    }
    Some((v as usize, n))
}

fn parse_one<'a>(
    root: &mut Map<String, Value>,
    params: &'a str,
    implied_key: Option<&str>,
    help: &mut bool,
) -> Result<&'a str, String> {
    let pb = params.as_bytes();
    let len = pb
        .iter()
        .position(|&b| b == b'=' || b == b',')
        .unwrap_or(pb.len());
    let mut key: &str = params;
    let mut key_len = len;
    let mut implied_val_end = None;
    if len > 0 && pb.get(len) != Some(&b'=') {
        let word = &params[..len];
        if word == "help" || word == "?" {
            *help = true;
            let mut s = &params[len..];
            if let Some(r) = s.strip_prefix(',') {
                s = r;
            }
            return Ok(s);
        }
        if let Some(ik) = implied_key {
            key = ik;
            key_len = ik.len();
            implied_val_end = Some(len);
        }
    }
    let kb = &key.as_bytes()[..key_len];
    // Walk the key fragments.
    let mut frags: Vec<&str> = Vec::new();
    let mut pos = 0;
    loop {
        let s = &kb[pos..];
        let flen = match key_to_index(s) {
            Some((_, n)) if pos != 0 => n,
            _ => qapi_name_len(s),
        };
        if flen == 0 || (flen < s.len() && s[flen] != b'.') {
            return Err(format!("Invalid parameter '{}'", &key[..key_len]));
        }
        if flen >= 128 {
            let frag = if pos != 0 || flen != kb.len() {
                " fragment"
            } else {
                ""
            };
            return Err(format!(
                "Parameter{frag} '{}' is too long",
                &key[pos..pos + flen]
            ));
        }
        frags.push(&key[pos..pos + flen]);
        // Strata's own cap (QEMU has none): the tree is built, listified, converted and
        // dropped recursively, so an unbounded key would overflow the stack.
        if frags.len() > json_stream::MAX_NESTING {
            return Err(format!(
                "Parameter '{}' is nested too deeply",
                &key[..key_len]
            ));
        }
        pos += flen;
        if pos >= kb.len() {
            break;
        }
        pos += 1; // '.'
        if pos >= kb.len() {
            return Err(format!("Invalid parameter '{}'", &key[..key_len]));
        }
    }
    let (val, rest) = if let Some(end) = implied_val_end {
        let v = params[..end].to_string();
        let mut r = &params[end..];
        if let Some(x) = r.strip_prefix(',') {
            r = x;
        }
        (v, r)
    } else {
        if pb.get(len) != Some(&b'=') {
            return Err(format!(
                "Expected '=' after parameter '{}'",
                &key[..key_len]
            ));
        }
        let mut v = Vec::new();
        let mut i = len + 1;
        while i < pb.len() {
            if pb[i] == b',' {
                i += 1;
                if pb.get(i) != Some(&b',') {
                    break;
                }
            }
            v.push(pb[i]);
            i += 1;
        }
        (
            String::from_utf8_lossy(&v).into_owned(),
            &params[i.min(params.len())..],
        )
    };
    // Insert, creating intermediate objects.
    let full_key = &key[..key_len];
    let mut cur = root;
    let mut consumed = 0;
    for (n, frag) in frags.iter().enumerate() {
        consumed += frag.len() + usize::from(n > 0);
        let last = n + 1 == frags.len();
        if last {
            if let Some(old) = cur.get(*frag)
                && !old.is_string()
            {
                return Err(format!("Parameters '{full_key}.*' used inconsistently"));
            }
            cur.insert(frag.to_string(), Value::String(val));
            break;
        }
        let entry = cur
            .entry(frag.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        match entry {
            Value::Object(m) => cur = m,
            _ => {
                return Err(format!(
                    "Parameters '{}.*' used inconsistently",
                    &full_key[..consumed]
                ));
            }
        }
    }
    Ok(rest)
}

/// QEMU's `keyval_listify`: objects whose keys are all indexes become lists.
fn listify(v: Value, path: &mut Vec<String>) -> Result<Value, String> {
    let Value::Object(m) = v else { return Ok(v) };
    let mut has_index = false;
    let mut has_member = false;
    let mut out = Map::new();
    for (k, val) in m {
        if key_to_index(k.as_bytes()).is_some() {
            has_index = true;
        } else {
            has_member = true;
        }
        path.push(k.clone());
        let val = listify(val, path)?;
        path.pop();
        out.insert(k, val);
    }
    let prefix: String = path.iter().map(|p| format!("{p}.")).collect();
    if has_index && has_member {
        return Err(format!("Parameters '{prefix}*' used inconsistently"));
    }
    if !has_index {
        return Ok(Value::Object(out));
    }
    let nelt = out.len();
    let mut elt: Vec<Option<Value>> = vec![None; nelt];
    let mut max_index: i64 = -1;
    for (k, val) in out {
        let idx = key_to_index(k.as_bytes()).map_or(0, |x| x.0);
        max_index = max_index.max(idx as i64);
        if idx < nelt {
            elt[idx] = Some(val);
        }
    }
    let count = (nelt + 1).min((max_index + 1) as usize);
    let mut list = Vec::with_capacity(count);
    for i in 0..count {
        match elt.get_mut(i).and_then(Option::take) {
            Some(v) => list.push(v),
            None => return Err(format!("Parameter '{prefix}{i}' missing")),
        }
    }
    Ok(Value::Array(list))
}

/// The kind of value a `--chardev` (QemuOpts) parameter takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OptKind {
    Str,
    Bool,
    Number,
    Size,
}

/// `qemu_chardev_opts`: the parameters `--chardev` accepts and their types.
const CHARDEV_OPTS: &[(&str, OptKind)] = &[
    ("backend", OptKind::Str),
    ("path", OptKind::Str),
    ("host", OptKind::Str),
    ("port", OptKind::Str),
    ("fd", OptKind::Str),
    ("localaddr", OptKind::Str),
    ("localport", OptKind::Str),
    ("to", OptKind::Number),
    ("ipv4", OptKind::Bool),
    ("ipv6", OptKind::Bool),
    ("wait", OptKind::Bool),
    ("server", OptKind::Bool),
    ("delay", OptKind::Bool),
    ("nodelay", OptKind::Bool),
    ("reconnect", OptKind::Number),
    ("reconnect-ms", OptKind::Number),
    ("telnet", OptKind::Bool),
    ("tn3270", OptKind::Bool),
    ("tls-creds", OptKind::Str),
    ("tls-authz", OptKind::Str),
    ("websocket", OptKind::Bool),
    ("width", OptKind::Number),
    ("height", OptKind::Number),
    ("cols", OptKind::Number),
    ("rows", OptKind::Number),
    ("mux", OptKind::Bool),
    ("signal", OptKind::Bool),
    ("name", OptKind::Str),
    ("debug", OptKind::Number),
    ("size", OptKind::Size),
    ("chardev", OptKind::Str),
    ("append", OptKind::Bool),
    ("logfile", OptKind::Str),
    ("logappend", OptKind::Bool),
    ("mouse", OptKind::Bool),
    ("clipboard", OptKind::Bool),
    ("abstract", OptKind::Bool),
    ("tight", OptKind::Bool),
    ("input-path", OptKind::Str),
];

/// A parsed `--chardev` argument.
#[derive(Debug, Clone, PartialEq)]
pub struct ChardevOpts {
    /// The `id=` parameter.
    pub id: Option<String>,
    /// The backend (implied first parameter, e.g. `socket`).
    pub backend: Option<String>,
    /// The other parameters, typed: booleans as JSON booleans, numbers and sizes as
    /// JSON numbers, everything else as strings. Later duplicates win.
    pub opts: Map<String, Value>,
}

/// Parses a QemuOpts string as `--chardev` does (`qemu_opts_parse_noisily` with the
/// implied key `backend`): `,,` escapes a comma, `id` is special, a bare boolean name
/// means `on` and `no<name>` means `off`. Errors use QEMU's texts, e.g.
/// "Invalid parameter 'foo'", "Parameter 'server' expects 'on' or 'off'",
/// "chardev: no id specified".
pub fn parse_chardev(arg: &str) -> Result<ChardevOpts, String> {
    let mut out = ChardevOpts {
        id: None,
        backend: None,
        opts: Map::new(),
    };
    let b = arg.as_bytes();
    let mut i = 0;
    let mut first = true;
    while i < b.len() {
        // Read "name[=value]" with ",," escapes in the value.
        let name_end = b[i..]
            .iter()
            .position(|&c| c == b'=' || c == b',')
            .map_or(b.len(), |p| i + p);
        let name = &arg[i..name_end];
        let (name, value) = if b.get(name_end) == Some(&b'=') {
            let mut v = Vec::new();
            let mut j = name_end + 1;
            while j < b.len() {
                if b[j] == b',' {
                    if b.get(j + 1) == Some(&b',') {
                        v.push(b',');
                        j += 2;
                        continue;
                    }
                    break;
                }
                v.push(b[j]);
                j += 1;
            }
            i = j + 1;
            (name.to_string(), String::from_utf8_lossy(&v).into_owned())
        } else {
            i = name_end + 1;
            if first {
                ("backend".to_string(), name.to_string())
            } else if let Some(base) = name.strip_prefix("no")
                && CHARDEV_OPTS.contains(&(base, OptKind::Bool))
            {
                (base.to_string(), "off".to_string())
            } else {
                (name.to_string(), "on".to_string())
            }
        };
        first = false;
        if name == "id" {
            out.id = Some(value);
            continue;
        }
        let Some((_, kind)) = CHARDEV_OPTS.iter().find(|(n, _)| *n == name) else {
            return Err(format!("Invalid parameter '{name}'"));
        };
        let v = match kind {
            OptKind::Str => Value::String(value),
            OptKind::Bool => match value.as_str() {
                "on" | "yes" | "true" | "y" => Value::Bool(true),
                "off" | "no" | "false" | "n" => Value::Bool(false),
                _ => return Err(format!("Parameter '{name}' expects 'on' or 'off'")),
            },
            OptKind::Number => match crate::schema::parse_u64(&value) {
                Some(n) => Value::Number(n.into()),
                None => return Err(format!("Parameter '{name}' expects a number")),
            },
            OptKind::Size => match crate::schema::parse_size(&value) {
                Some(n) => Value::Number(n.into()),
                None => {
                    return Err(format!(
                        "Parameter '{name}' expects a non-negative number below 2^64"
                    ));
                }
            },
        };
        if name == "backend" {
            out.backend = v.as_str().map(str::to_string);
        } else {
            out.opts.insert(name, v);
        }
    }
    if out.id.is_none() {
        return Err("chardev: no id specified".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn basic_and_nested() {
        assert_eq!(
            parse(
                "driver=qcow2,node-name=n,file.driver=file,file.filename=x,read-only=on",
                None
            )
            .unwrap(),
            json!({"driver":"qcow2","node-name":"n","file":{"driver":"file","filename":"x"},"read-only":"on"})
        );
        assert_eq!(
            parse("file,node-name=a", Some("driver")).unwrap(),
            json!({"driver":"file","node-name":"a"})
        );
        assert_eq!(
            parse("a=x,,y,b=2", None).unwrap(),
            json!({"a":"x,y","b":"2"})
        );
        assert_eq!(parse("a=1,a=2", None).unwrap(), json!({"a":"2"}));
        assert_eq!(
            parse("c.0=x,c.1.d=y", None).unwrap(),
            json!({"c":["x",{"d":"y"}]})
        );
        assert_eq!(parse("", None).unwrap(), json!({}));
        assert_eq!(parse("a=", None).unwrap(), json!({"a":""}));
        assert!(parse_with_help("help", Some("qom-type")).unwrap().1);
        assert_eq!(
            parse_with_help("iothread,help", Some("qom-type")).unwrap(),
            (json!({"qom-type":"iothread"}), true)
        );
    }

    // Texts observed from `qemu-storage-daemon --blockdev ...`.
    #[test]
    fn qemu_error_texts() {
        assert_eq!(
            parse("driver=file,node-name", Some("driver")).unwrap_err(),
            "Expected '=' after parameter 'node-name'"
        );
        assert_eq!(
            parse("node-name", None).unwrap_err(),
            "Expected '=' after parameter 'node-name'"
        );
        assert_eq!(
            parse("a..b=1", None).unwrap_err(),
            "Invalid parameter 'a..b'"
        );
        assert_eq!(parse("x=1,=1", None).unwrap_err(), "Invalid parameter ''");
        assert_eq!(
            parse("a.0=1,a.x=2", None).unwrap_err(),
            "Parameters 'a.*' used inconsistently"
        );
        assert_eq!(
            parse("cache=1,cache.direct=on", None).unwrap_err(),
            "Parameters 'cache.*' used inconsistently"
        );
        assert_eq!(
            parse("cache.direct=on,cache=1", None).unwrap_err(),
            "Parameters 'cache.*' used inconsistently"
        );
        assert_eq!(
            parse("children.0=x,children.2=y", None).unwrap_err(),
            "Parameter 'children.1' missing"
        );
        assert_eq!(parse("0=x", None).unwrap_err(), "Invalid parameter '0'");
        assert_eq!(parse("a.", None).unwrap_err(), "Invalid parameter 'a.'");
        let long = "a".repeat(130);
        assert_eq!(
            parse(&format!("{long}=1"), None).unwrap_err(),
            format!("Parameter '{long}' is too long")
        );
        // ',,' inside an implied value is not an escape: the value ends at the first ','.
        assert_eq!(
            parse("file,,node-name=a", Some("driver")).unwrap_err(),
            "Invalid parameter ''"
        );
    }

    #[test]
    fn option_arg() {
        assert!(matches!(
            parse_option_arg("{\"driver\":\"file\"}", Some("driver")),
            Ok(OptionArg::Json(_))
        ));
        assert_eq!(
            parse_option_arg("{\"driver\":", None).unwrap_err(),
            "JSON parse error, premature EOI"
        );
        assert_eq!(
            parse_option_arg("{\"driver\":\"file\"}x", None).unwrap_err(),
            "Expecting at most one JSON value"
        );
    }

    #[test]
    fn chardev() {
        let c = parse_chardev("socket,id=c,path=/tmp/q,,x,server=on,wait=off").unwrap();
        assert_eq!(c.id.as_deref(), Some("c"));
        assert_eq!(c.backend.as_deref(), Some("socket"));
        assert_eq!(
            c.opts,
            json!({"path":"/tmp/q,x","server":true,"wait":false})
                .as_object()
                .unwrap()
                .clone()
        );
        let c = parse_chardev("socket,id=c,path=p,server,nowait").unwrap();
        assert_eq!(c.opts["server"], true);
        assert_eq!(c.opts["wait"], false);
        assert_eq!(
            parse_chardev("socket,id=x,path=/p,server=maybe").unwrap_err(),
            "Parameter 'server' expects 'on' or 'off'"
        );
        assert_eq!(
            parse_chardev("socket,path=/p").unwrap_err(),
            "chardev: no id specified"
        );
        assert_eq!(
            parse_chardev("socket,id=x,path=/p,foo=1").unwrap_err(),
            "Invalid parameter 'foo'"
        );
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in "[a-z0-9=,.{}_?\\-]{0,60}", t in "\\PC{0,40}") {
            let _ = parse(&s, Some("driver"));
            let _ = parse(&t, None);
            let _ = parse_option_arg(&t, Some("type"));
            let _ = parse_chardev(&s);
            let _ = parse_chardev(&t);
        }
    }
}
