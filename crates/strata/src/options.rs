//! `-o key=value,key2=value` option strings, parsed as QEMU's `qemu_opts_do_parse` does
//! (`,,` is a literal comma, a bare `key` means `key=on` and `nokey` means `key=off`), checked
//! against a format's create-option table, printed back as qemu-img's "Formatting" line does,
//! and listed by `-o help`.

use crate::cli::Fail;
use crate::units::{NumError, parse_size, parse_u64};

/// The type of an option value (QEMU's `QemuOptType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptType {
    /// Any string.
    Str,
    /// on/off (also yes/no, true/false).
    Bool,
    /// A plain number.
    Number,
    /// A size with optional suffix.
    Size,
}

/// One create option (QEMU's `QemuOptDesc`).
#[derive(Debug, Clone, Copy)]
pub struct OptDesc {
    /// Option name, as typed after `-o`.
    pub name: &'static str,
    /// Value type.
    pub ty: OptType,
    /// Help text for `-o help`.
    pub help: &'static str,
    /// Default shown in the "Formatting" line when the option is not given.
    pub default: Option<&'static str>,
}

const fn d(
    name: &'static str,
    ty: OptType,
    help: &'static str,
    default: Option<&'static str>,
) -> OptDesc {
    OptDesc {
        name,
        ty,
        help,
        default,
    }
}

use OptType::{Bool, Number, Size, Str};

/// qcow2's create options, in QEMU's order (which is the order of the "Formatting" line).
const QCOW2_OPTS: &[OptDesc] = &[
    d(
        "encryption",
        Bool,
        "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
        None,
    ),
    d(
        "encrypt.format",
        Str,
        "Encrypt the image, format choices: 'aes', 'luks'",
        None,
    ),
    d(
        "encrypt.key-secret",
        Str,
        "ID of secret providing qcow AES key or LUKS passphrase",
        None,
    ),
    d(
        "encrypt.cipher-alg",
        Str,
        "Name of encryption cipher algorithm",
        None,
    ),
    d(
        "encrypt.cipher-mode",
        Str,
        "Name of encryption cipher mode",
        None,
    ),
    d(
        "encrypt.ivgen-alg",
        Str,
        "Name of IV generator algorithm",
        None,
    ),
    d(
        "encrypt.ivgen-hash-alg",
        Str,
        "Name of IV generator hash algorithm",
        None,
    ),
    d(
        "encrypt.hash-alg",
        Str,
        "Name of encryption hash algorithm",
        None,
    ),
    d(
        "encrypt.iter-time",
        Number,
        "Time to spend in PBKDF in milliseconds",
        None,
    ),
    d("cluster_size", Size, "qcow2 cluster size", Some("65536")),
    d("extended_l2", Bool, "Extended L2 tables", Some("off")),
    d(
        "preallocation",
        Str,
        "Preallocation mode (allowed values: off, metadata, falloc, full)",
        None,
    ),
    d(
        "compression_type",
        Str,
        "Compression method used for image cluster compression",
        Some("zlib"),
    ),
    d("size", Size, "Virtual disk size", None),
    d(
        "compat",
        Str,
        "Compatibility level (v2 [0.10] or v3 [1.1])",
        None,
    ),
    d("backing_file", Str, "File name of a base image", None),
    d("backing_fmt", Str, "Image format of the base image", None),
    d("data_file", Str, "File name of an external data file", None),
    d(
        "data_file_raw",
        Bool,
        "The external data file must stay valid as a raw image",
        None,
    ),
    d(
        "lazy_refcounts",
        Bool,
        "Postpone refcount updates",
        Some("off"),
    ),
    d(
        "refcount_bits",
        Number,
        "Width of a reference count entry in bits",
        Some("16"),
    ),
];

/// raw's own create options.
const RAW_OPTS: &[OptDesc] = &[d("size", Size, "Virtual disk size", None)];

/// The `file` protocol's create options (appended after the format's, duplicates skipped).
const FILE_OPTS: &[OptDesc] = &[
    d("size", Size, "Virtual disk size", None),
    d(
        "preallocation",
        Str,
        "Preallocation mode (allowed values: off, falloc, full)",
        None,
    ),
    d(
        "nocow",
        Bool,
        "Turn off copy-on-write (valid only on btrfs)",
        None,
    ),
    d(
        "extent_size_hint",
        Size,
        "Extent size hint for the image file, 0 to disable",
        None,
    ),
];

/// qcow2's amend options (QEMU's `qcow2_amend_opts`), in QEMU's order.
const QCOW2_AMEND_OPTS: &[OptDesc] = &[
    d("size", Size, "Virtual disk size", None),
    d(
        "compat",
        Str,
        "Compatibility level (v2 [0.10] or v3 [1.1])",
        None,
    ),
    d("backing_file", Str, "File name of a base image", None),
    d("backing_fmt", Str, "Image format of the base image", None),
    d("data_file", Str, "File name of an external data file", None),
    d(
        "data_file_raw",
        Bool,
        "The external data file must stay valid as a raw image",
        None,
    ),
    d(
        "encrypt.iter-time",
        Number,
        "Time to spend in PBKDF in milliseconds",
        None,
    ),
    d(
        "encrypt.keyslot",
        Number,
        "Select a single keyslot to modify explicitly",
        None,
    ),
    d(
        "encrypt.new-secret",
        Str,
        "New secret to set in the matching keyslots. Empty string to erase",
        None,
    ),
    d(
        "encrypt.old-secret",
        Str,
        "Select all keyslots that match this password",
        None,
    ),
    d(
        "encrypt.state",
        Str,
        "Select new state of affected keyslots (active/inactive)",
        None,
    ),
    d("lazy_refcounts", Bool, "Postpone refcount updates", None),
    d(
        "refcount_bits",
        Number,
        "Width of a reference count entry in bits",
        None,
    ),
];

/// A format's amend options, if it supports amendment.
pub fn amend_opts(fmt: &str) -> Option<&'static [OptDesc]> {
    match fmt {
        "qcow2" => Some(QCOW2_AMEND_OPTS),
        _ => None,
    }
}

/// The formats this tool can create.
pub fn is_known_format(fmt: &str) -> bool {
    matches!(fmt, "qcow2" | "raw")
}

/// A format's create options (without the protocol's).
pub fn format_opts(fmt: &str) -> Option<&'static [OptDesc]> {
    match fmt {
        "qcow2" => Some(QCOW2_OPTS),
        "raw" => Some(RAW_OPTS),
        _ => None,
    }
}

/// The format's options followed by the `file` protocol's, without duplicates
/// (QEMU's `qemu_opts_append`).
pub fn create_opts(fmt: &str) -> Vec<OptDesc> {
    let mut v: Vec<OptDesc> = format_opts(fmt).unwrap_or(&[]).to_vec();
    for o in FILE_OPTS {
        if !v.iter().any(|x| x.name == o.name) {
            v.push(*o);
        }
    }
    v
}

/// Split an option string into `(key, value)` pairs. `,,` is a literal comma; a key without
/// `=` is a short-form boolean (`key` → `on`, `nokey` → `off`) or `help`/`?`.
pub fn split(list: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = list;
    while !rest.is_empty() {
        // The key ends at '=' or ','; keys cannot contain escaped commas.
        let kend = rest.find(['=', ',']).unwrap_or(rest.len());
        let key = &rest[..kend];
        if rest[kend..].starts_with('=') {
            let (value, after) = take_value(&rest[kend + 1..]);
            out.push((key.to_string(), value));
            rest = after;
        } else {
            let (k, v) = if key == "help" || key == "?" {
                (key, "on")
            } else if let Some(k) = key.strip_prefix("no") {
                (k, "off")
            } else {
                (key, "on")
            };
            out.push((k.to_string(), v.to_string()));
            rest = rest[kend..].strip_prefix(',').unwrap_or(&rest[kend..]);
        }
    }
    out
}

/// A value up to the next single comma; `,,` stands for ','.
fn take_value(s: &str) -> (String, &str) {
    let mut value = String::new();
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b',' {
            if bytes.get(i + 1) == Some(&b',') {
                value.push(',');
                i += 2;
                continue;
            }
            return (value, &s[i + 1..]);
        }
        let ch = s[i..].chars().next().unwrap_or(',');
        value.push(ch);
        i += ch.len_utf8();
    }
    (value, "")
}

/// qemu-img's `is_valid_option_list`: one `-o` argument may be joined to others with ','.
pub fn is_valid_option_list(list: &str) -> bool {
    if list.is_empty() || list.starts_with(',') {
        return false;
    }
    let trailing = list.len() - list.trim_end_matches(',').len();
    trailing.is_multiple_of(2)
}

/// qemu-img's `accumulate_options`: join repeated `-o` arguments with ','.
pub fn accumulate(lists: &[String]) -> Result<Option<String>, Fail> {
    let mut acc: Option<String> = None;
    for l in lists {
        if !is_valid_option_list(l) {
            return Err(Fail::msg(format!("Invalid option list: {l}")));
        }
        acc = Some(match acc {
            None => l.clone(),
            Some(a) => format!("{a},{l}"),
        });
    }
    Ok(acc)
}

/// Whether the option string asks for help (`help` or `?` as a key).
pub fn has_help(list: &str) -> bool {
    split(list).iter().any(|(k, _)| k == "help" || k == "?")
}

/// A typed option value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptValue {
    /// A string, as given.
    Str(String),
    /// A boolean, with the spelling the user typed (QEMU prints it back verbatim).
    Bool(bool, String),
    /// A number or a size, normalised to bytes.
    Num(u64),
}

impl OptValue {
    /// The text the "Formatting" line prints.
    fn display(&self) -> String {
        match self {
            OptValue::Str(s) => s.replace(',', ",,"),
            OptValue::Bool(_, s) => s.clone(),
            OptValue::Num(n) => n.to_string(),
        }
    }
}

/// Options parsed against a table (QEMU's `QemuOpts`): the last value of a key wins.
#[derive(Debug, Clone)]
pub struct Opts {
    desc: Vec<OptDesc>,
    values: Vec<(&'static str, OptValue)>,
}

/// Parse a bool as QEMU's `qapi_bool_parse`.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

impl Opts {
    /// Empty options for table `desc`.
    pub fn new(desc: Vec<OptDesc>) -> Opts {
        Opts {
            desc,
            values: Vec::new(),
        }
    }

    /// Parse `list` into these options, with QEMU's error texts.
    pub fn parse(&mut self, list: &str) -> Result<(), String> {
        for (k, v) in split(list) {
            self.set(&k, &v)?;
        }
        Ok(())
    }

    /// Set one option from its text form.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let Some(desc) = self.desc.iter().find(|d| d.name == key).copied() else {
            return Err(format!("Invalid parameter '{key}'"));
        };
        let v = match desc.ty {
            Str => OptValue::Str(value.to_string()),
            Bool => match parse_bool(value) {
                Some(b) => OptValue::Bool(b, value.to_string()),
                None => return Err(format!("Parameter '{key}' expects 'on' or 'off'")),
            },
            Number => match parse_u64(value) {
                Ok(n) => OptValue::Num(n),
                Err(_) => return Err(format!("Parameter '{key}' expects a number")),
            },
            Size => match parse_size(value) {
                Ok(n) => OptValue::Num(n),
                Err(NumError::Invalid) | Err(NumError::Range) => {
                    return Err(format!(
                        "Parameter '{key}' expects a non-negative number below 2^64\n\
                         Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
                         and exabytes, respectively."
                    ));
                }
            },
        };
        self.values.retain(|(k, _)| *k != desc.name);
        self.values.push((desc.name, v));
        Ok(())
    }

    /// Set a number (like `qemu_opt_set_number`).
    pub fn set_number(&mut self, key: &'static str, n: u64) {
        self.values.retain(|(k, _)| *k != key);
        self.values.push((key, OptValue::Num(n)));
    }

    /// Whether the table knows `key`.
    pub fn knows(&self, key: &str) -> bool {
        self.desc.iter().any(|d| d.name == key)
    }

    /// Whether `key` was set.
    pub fn has(&self, key: &str) -> bool {
        self.values.iter().any(|(k, _)| *k == key)
    }

    fn get(&self, key: &str) -> Option<&OptValue> {
        self.values.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// A string option's value (any option's text for non-strings).
    pub fn get_str(&self, key: &str) -> Option<String> {
        self.get(key).map(|v| match v {
            OptValue::Str(s) => s.clone(),
            other => other.display(),
        })
    }

    /// A boolean option.
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        match self.get(key) {
            Some(OptValue::Bool(b, _)) => Some(*b),
            _ => None,
        }
    }

    /// A number or size option.
    pub fn get_num(&self, key: &str) -> Option<u64> {
        match self.get(key) {
            Some(OptValue::Num(n)) => Some(*n),
            _ => None,
        }
    }

    /// The set keys, in the order they were given.
    pub fn keys(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.values.iter().map(|(k, _)| *k)
    }

    /// QEMU's `qemu_opts_print(opts, " ")`: every option that is set or has a default, in
    /// table order.
    pub fn print(&self) -> String {
        let mut parts = Vec::new();
        for d in &self.desc {
            let text = match self.get(d.name) {
                Some(v) => v.display(),
                None => match d.default {
                    Some(def) => def.to_string(),
                    None => continue,
                },
            };
            parts.push(format!("{}={}", d.name, text));
        }
        parts.join(" ")
    }
}

/// qemu-img's `-o help` text for `fmt` (`with_protocol` when a filename was given).
pub fn help_text(fmt: &str, with_protocol: bool) -> String {
    let mut desc: Vec<OptDesc> = if with_protocol {
        create_opts(fmt)
    } else {
        format_opts(fmt).unwrap_or(&[]).to_vec()
    };
    desc.sort_by(|a, b| a.name.cmp(b.name));
    let mut out = if with_protocol {
        "Supported options:\n".to_string()
    } else {
        format!("Supported {fmt} options:\n")
    };
    for d in &desc {
        out.push_str(&help_line(d));
    }
    if !with_protocol {
        out.push_str(
            "\nThe protocol level may support further options.\n\
             Specify the target filename to include those options.\n",
        );
    }
    out
}

/// One line of `qemu_opts_print_help`.
pub fn help_line(d: &OptDesc) -> String {
    let ty = match d.ty {
        Str => "<str>",
        Bool => "<bool (on/off)>",
        Number => "<num>",
        Size => "<size>",
    };
    format!("  {:<22} - {}\n", format!("{}={}", d.name, ty), d.help)
}

/// `-o help` for amend: "Amend options for 'qcow2':" and the amendable options.
pub fn amend_help_text(fmt: &str) -> String {
    let mut desc: Vec<OptDesc> = amend_opts(fmt).unwrap_or(&[]).to_vec();
    desc.sort_by(|a, b| a.name.cmp(b.name));
    let mut out = format!("Amend options for '{fmt}':\n");
    for d in &desc {
        out.push_str(&help_line(d));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_escapes_and_short_bools() {
        assert_eq!(
            split("backing_file=a,,x,backing_fmt=qcow2,lazy_refcounts,noextended_l2"),
            vec![
                ("backing_file".into(), "a,x".into()),
                ("backing_fmt".into(), "qcow2".into()),
                ("lazy_refcounts".into(), "on".into()),
                ("extended_l2".into(), "off".into()),
            ]
        );
        assert!(has_help("cluster_size=64k,help"));
        assert!(has_help("?"));
        assert!(!has_help("cluster_size=64k"));
    }

    #[test]
    fn option_lists_join_like_qemu() {
        assert!(!is_valid_option_list(""));
        assert!(!is_valid_option_list(",x"));
        assert!(!is_valid_option_list("x,"));
        assert!(is_valid_option_list("x,,"));
        assert_eq!(
            accumulate(&["compat=1.1".into(), "lazy_refcounts=on".into()]).unwrap(),
            Some("compat=1.1,lazy_refcounts=on".into())
        );
        assert_eq!(
            accumulate(&["".into()]).unwrap_err().message(),
            Some("Invalid option list: ")
        );
    }

    /// The "Formatting" lines below are what qemu-img 10.0.2 printed for the same options.
    #[test]
    fn formatting_line_matches_qemu() {
        let mut o = Opts::new(create_opts("qcow2"));
        o.parse("cluster_size=128k,lazy_refcounts=true,extended_l2=yes,compat=v3")
            .unwrap();
        o.set_number("size", 1048576);
        assert_eq!(
            o.print(),
            "cluster_size=131072 extended_l2=yes compression_type=zlib size=1048576 compat=v3 lazy_refcounts=true refcount_bits=16"
        );

        let mut o = Opts::new(create_opts("qcow2"));
        o.parse("preallocation=metadata,data_file=e.data").unwrap();
        o.set_number("size", 1048576);
        assert_eq!(
            o.print(),
            "cluster_size=65536 extended_l2=off preallocation=metadata compression_type=zlib size=1048576 data_file=e.data lazy_refcounts=off refcount_bits=16"
        );

        let mut o = Opts::new(create_opts("qcow2"));
        o.parse("backing_file=a.qcow2,,x,backing_fmt=qcow2,nocow=on,extent_size_hint=2M")
            .unwrap();
        o.set_number("size", 1048576);
        assert_eq!(
            o.print(),
            "cluster_size=65536 extended_l2=off compression_type=zlib size=1048576 backing_file=a.qcow2,,x backing_fmt=qcow2 lazy_refcounts=off refcount_bits=16 nocow=on extent_size_hint=2097152"
        );

        let mut o = Opts::new(create_opts("raw"));
        o.parse("preallocation=full").unwrap();
        o.set_number("size", 1048576);
        assert_eq!(o.print(), "size=1048576 preallocation=full");
    }

    #[test]
    fn errors_match_qemu() {
        let mut o = Opts::new(create_opts("qcow2"));
        assert_eq!(o.parse("foo=bar").unwrap_err(), "Invalid parameter 'foo'");
        assert_eq!(
            o.parse("lazy_refcounts=maybe").unwrap_err(),
            "Parameter 'lazy_refcounts' expects 'on' or 'off'"
        );
        assert_eq!(
            o.parse("refcount_bits=abc").unwrap_err(),
            "Parameter 'refcount_bits' expects a number"
        );
        let mut r = Opts::new(create_opts("raw"));
        assert_eq!(
            r.parse("cluster_size=4k").unwrap_err(),
            "Invalid parameter 'cluster_size'"
        );
    }

    #[test]
    fn help_matches_qemu() {
        let h = help_text("raw", false);
        assert_eq!(
            h,
            "Supported raw options:\n  size=<size>            - Virtual disk size\n\n\
             The protocol level may support further options.\n\
             Specify the target filename to include those options.\n"
        );
        let h = help_text("qcow2", true);
        assert!(h.starts_with(
            "Supported options:\n  backing_file=<str>     - File name of a base image\n"
        ));
        assert!(h.contains(
            "  data_file_raw=<bool (on/off)> - The external data file must stay valid as a raw image\n"
        ));
        assert!(h.ends_with("  size=<size>            - Virtual disk size\n"));
    }
}
