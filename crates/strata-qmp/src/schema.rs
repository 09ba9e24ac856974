//! The QAPI schema of qemu-storage-daemon 10.0.2 (its `query-qmp-schema` output, embedded)
//! and the two input visitors built on it:
//!
//! - JSON mode ([`Schema::validate_command_args`]): QEMU's QObject input visitor, with its
//!   exact error texts, run on QMP command arguments before dispatch;
//! - keyval mode ([`Schema::convert_keyval`]): QEMU's keyval input visitor, which turns a
//!   tree of strings from a command-line option ([`crate::keyval`]) into typed JSON.
//!
//! Introspection masks type names and integer widths, so two small tables restore what the
//! visitors need: the real names of the alternates (printed in type errors) and the width
//! of the integer members that are not plain `int` (from `qapi/*.json`, checked against
//! the daemon where it matters).

use crate::error::QmpError;
use serde_json::{Map, Number, Value};
use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

/// The checked-in introspection document.
pub const QSD_SCHEMA_JSON: &str = include_str!("../schema/qsd-10.0.2.json");

/// Strata's additions to the qsd schema (new optional members, enum values, types and
/// commands; see `docs/EXTENSIONS.md`). They are accepted by both visitors but left out of
/// `query-qmp-schema`, which stays byte-for-byte qsd's so that introspecting clients see
/// exactly the daemon they expect.
pub const STRATA_EXTENSIONS_JSON: &str = include_str!("../schema/strata-extensions.json");

/// The width and kind of a QAPI integer type (introspection shows all of them as `int`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntKind {
    /// `int8`.
    I8,
    /// `int16`.
    I16,
    /// `int32`.
    I32,
    /// `int` / `int64`.
    I64,
    /// `uint8`.
    U8,
    /// `uint16`.
    U16,
    /// `uint32`.
    U32,
    /// `uint64`.
    U64,
    /// `size` (a uint64 that keyval input accepts with k/M/G/T/P/E suffixes).
    Size,
}

/// Real names of the alternates (masked name → QAPI name).
const ALTERNATE_NAMES: &[(&str, &str)] = &[
    ("109", "BlockDirtyBitmapOrStr"),
    ("153", "StrOrNull"),
    ("228", "BlockdevRef"),
    ("238", "BlockdevRefOrNull"),
    ("239", "Qcow2OverlapChecks"),
];

/// Integer members that are not `int64` (masked object name, member, kind).
const INT_KINDS: &[(&str, &str, IntKind)] = {
    use IntKind::*;
    &[
        // drive-backup / blockdev-backup x-perf (BackupPerf)
        ("101", "min-cluster-size", Size),
        // drive-mirror, block-dirty-bitmap-add, blockdev-mirror
        ("23", "granularity", U32),
        ("24", "granularity", U32),
        ("28", "granularity", U32),
        // blkdebug
        ("114", "max-transfer", I32),
        ("114", "opt-write-zero", I32),
        ("114", "max-write-zero", I32),
        ("114", "opt-discard", I32),
        ("114", "max-discard", I32),
        // blklogwrites
        ("115", "log-sector-size", U32),
        ("115", "log-super-update-interval", U64),
        // copy-before-write
        ("119", "cbw-timeout", U32),
        ("119", "min-cluster-size", Size),
        // nbd
        ("130", "reconnect-delay", U32),
        ("130", "open-timeout", U32),
        // null-aio / null-co
        ("132", "latency-ns", U64),
        // blockdev-create options
        ("249", "size", Size),
        ("249", "extent-size-hint", Size),
        ("250", "size", Size),
        ("251", "size", Size),
        ("252", "size", Size),
        ("253", "size", Size),
        ("253", "cluster-size", Size),
        ("254", "size", Size),
        ("255", "size", Size),
        ("255", "cluster-size", Size),
        ("256", "size", Size),
        ("256", "cluster-size", Size),
        ("257", "size", Size),
        ("257", "cluster-size", Size),
        ("258", "size", Size),
        ("259", "size", Size),
        ("260", "size", Size),
        ("260", "log-size", Size),
        ("260", "block-size", Size),
        ("261", "size", Size),
        ("262", "size", Size),
        // block-set-write-threshold
        ("52", "write-threshold", U64),
        // nbd-server-start
        ("60", "handshake-max-seconds", U32),
        ("60", "max-connections", U32),
        // block-export-add: vhost-user-blk, vduse-blk
        ("159", "logical-block-size", Size),
        ("159", "num-queues", U16),
        ("161", "num-queues", U16),
        ("161", "queue-size", U16),
        ("161", "logical-block-size", Size),
        // object-add
        ("177", "node", U16),
        ("178", "node", U16),
        ("184", "compare_timeout", U64),
        ("184", "expired_scan_cycle", U32),
        ("184", "max_queue_size", U32),
        ("185", "queues", U32),
        ("185", "throttle-bps", U64),
        ("185", "throttle-ops", U64),
        ("186", "queues", U32),
        ("186", "throttle-bps", U64),
        ("186", "throttle-ops", U64),
        ("188", "interval", U32),
        ("189", "maxlen", U32),
        ("199", "prealloc-threads", U32),
        ("199", "size", Size),
        ("200", "prealloc-threads", U32),
        ("200", "size", Size),
        ("200", "align", Size),
        ("200", "offset", Size),
        ("201", "prealloc-threads", U32),
        ("201", "size", Size),
        ("201", "hugetlbsize", Size),
        ("202", "prealloc-threads", U32),
        ("202", "size", Size),
        ("203", "prealloc-threads", U32),
        ("203", "size", Size),
        ("210", "serial", I32),
        ("211", "cbitpos", U32),
        ("211", "reduced-phys-bits", U32),
        ("211", "policy", U32),
        ("211", "handle", U32),
        ("212", "cbitpos", U32),
        ("212", "reduced-phys-bits", U32),
        ("212", "policy", U64),
    ]
};

/// Which input visitor semantics to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// QMP JSON input: values must already have the right JSON type.
    Json,
    /// keyval input: scalars are strings converted by the schema type.
    Keyval,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Builtin {
    Str,
    Any,
    Int,
    Bool,
    Null,
    Number,
}

#[derive(Debug, Clone)]
struct Member {
    name: String,
    ty: String,
    optional: bool,
}

#[derive(Debug, Clone)]
enum Ty {
    Builtin(Builtin),
    Object {
        members: Vec<Member>,
        tag: Option<String>,
        variants: Vec<(String, String)>,
    },
    Enum(Vec<String>),
    Array(String),
    Alternate(Vec<String>),
}

/// A QAPI schema (introspection form) with QEMU's input visitors.
#[derive(Debug)]
pub struct Schema {
    entries: Vec<Value>,
    types: HashMap<String, Ty>,
    /// Command name → (arg-type, ret-type), in schema order.
    commands: Vec<(String, String, String)>,
    /// Event name → arg-type, in schema order.
    events: Vec<(String, String)>,
    int_kinds: HashMap<(String, String), IntKind>,
    alt_names: HashMap<String, String>,
}

/// Extra types used by command-line options that have no QMP command (not introspected).
const LOCAL_TYPES: &str = r#"[
 {"name": "MonitorOptions", "meta-type": "object", "members": [
   {"name": "id", "default": null, "type": "str"},
   {"name": "mode", "default": null, "type": "MonitorMode"},
   {"name": "chardev", "type": "str"},
   {"name": "pretty", "default": null, "type": "bool"}]},
 {"name": "MonitorMode", "meta-type": "enum", "values": ["readline", "control"]}
]"#;

impl Schema {
    /// The embedded qemu-storage-daemon 10.0.2 schema (parsed once).
    pub fn qsd() -> &'static Schema {
        static S: OnceLock<Schema> = OnceLock::new();
        S.get_or_init(|| {
            let mut s = Schema::from_json(QSD_SCHEMA_JSON).expect("embedded schema is valid");
            s.apply_extensions(STRATA_EXTENSIONS_JSON)
                .expect("embedded extensions are valid");
            s
        })
    }

    /// Applies an extensions document: `{"types": [SchemaInfo...], "commands": [{"name",
    /// "arg-type", "ret-type"}...], "members": [{"command", "name", "type"}...],
    /// "enum-values": [{"command", "member", "values": [...]}...]}`. Added members are
    /// always optional, so every qsd request stays valid and means the same.
    pub fn apply_extensions(&mut self, text: &str) -> Result<(), String> {
        let doc: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let list = |key: &str| -> Vec<Value> {
            doc.get(key)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        };
        let field = |v: &Value, key: &str| -> Result<String, String> {
            v.get(key)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| format!("extension entry without {key}: {v}"))
        };
        for t in list("types") {
            self.add_entry(&t)?;
        }
        for c in list("commands") {
            let mut c = c.clone();
            c["meta-type"] = Value::from("command");
            self.add_entry(&c)?;
        }
        for m in list("members") {
            let command = field(&m, "command")?;
            let member = Member {
                name: field(&m, "name")?,
                ty: field(&m, "type")?,
                optional: true,
            };
            let mut arg = self.own_arg_type(&command)?;
            // `"variant": "nbd"`: a member of the union branch for that tag value.
            if let Some(tag_value) = m.get("variant").and_then(Value::as_str) {
                arg = match self.types.get(&arg) {
                    Some(Ty::Object { variants, .. }) => variants
                        .iter()
                        .find(|(v, _)| v == tag_value)
                        .map(|(_, t)| t.clone())
                        .ok_or_else(|| format!("{command} has no variant {tag_value}"))?,
                    _ => return Err(format!("{command}'s arguments are not a union")),
                };
            }
            match self.types.get_mut(&arg) {
                Some(Ty::Object { members, .. }) => members.push(member),
                _ => return Err(format!("{command}'s arguments are not an object")),
            }
        }
        for e in list("enum-values") {
            let command = field(&e, "command")?;
            let member = field(&e, "member")?;
            let ty = self
                .member_type(&command, &member)
                .ok_or_else(|| format!("extension for unknown member {command}.{member}"))?;
            let values = e.get("values").and_then(Value::as_array).cloned();
            match self.types.get_mut(&ty) {
                Some(Ty::Enum(known)) => known.extend(
                    values
                        .unwrap_or_default()
                        .iter()
                        .filter_map(|v| v.as_str().map(str::to_string)),
                ),
                _ => return Err(format!("{command}.{member} is not an enum")),
            }
        }
        Ok(())
    }

    /// `command`'s argument type, made its own first if other commands share it (QEMU's
    /// introspection gives every command without arguments the same empty object), so an
    /// extension member reaches this command only.
    fn own_arg_type(&mut self, command: &str) -> Result<String, String> {
        let arg = self
            .command_arg_type(command)
            .ok_or_else(|| format!("extension for unknown command {command}"))?
            .to_string();
        if self.commands.iter().filter(|c| c.1 == arg).count() < 2 {
            return Ok(arg);
        }
        let ty = self
            .types
            .get(&arg)
            .cloned()
            .ok_or_else(|| format!("{command}'s argument type {arg} is unknown"))?;
        let own = format!("x-args-{command}");
        self.types.insert(own.clone(), ty);
        for c in self.commands.iter_mut().filter(|c| c.0 == command) {
            c.1 = own.clone();
        }
        Ok(own)
    }

    /// The type name of member `member` of `command`'s arguments.
    fn member_type(&self, command: &str, member: &str) -> Option<String> {
        match self.types.get(self.command_arg_type(command)?)? {
            Ty::Object { members, .. } => members
                .iter()
                .find(|m| m.name == member)
                .map(|m| m.ty.clone()),
            _ => None,
        }
    }

    /// Builds a schema from an introspection document (a JSON array of SchemaInfo).
    pub fn from_json(text: &str) -> Result<Schema, String> {
        let entries: Vec<Value> = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let local: Vec<Value> = serde_json::from_str(LOCAL_TYPES).map_err(|e| e.to_string())?;
        let mut s = Schema {
            entries: Vec::new(),
            types: HashMap::new(),
            commands: Vec::new(),
            events: Vec::new(),
            int_kinds: INT_KINDS
                .iter()
                .map(|(t, m, k)| ((t.to_string(), m.to_string()), *k))
                .collect(),
            alt_names: ALTERNATE_NAMES
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        };
        for e in entries.iter().chain(local.iter()) {
            s.add_entry(e)?;
        }
        s.entries = entries;
        Ok(s)
    }

    fn add_entry(&mut self, e: &Value) -> Result<(), String> {
        let get = |k: &str| e.get(k).and_then(Value::as_str).map(str::to_string);
        let name = get("name").ok_or("entry without name")?;
        let meta = get("meta-type").ok_or("entry without meta-type")?;
        let ty = match meta.as_str() {
            "command" => {
                let arg = get("arg-type").ok_or("command without arg-type")?;
                let ret = get("ret-type").ok_or("command without ret-type")?;
                self.commands.push((name, arg, ret));
                return Ok(());
            }
            "event" => {
                let arg = get("arg-type").ok_or("event without arg-type")?;
                self.events.push((name, arg));
                return Ok(());
            }
            "builtin" => Ty::Builtin(match get("json-type").as_deref() {
                Some("string") => Builtin::Str,
                Some("value") => Builtin::Any,
                Some("int") => Builtin::Int,
                Some("boolean") => Builtin::Bool,
                Some("null") => Builtin::Null,
                Some("number") => Builtin::Number,
                other => return Err(format!("unknown json-type {other:?}")),
            }),
            "enum" => Ty::Enum(
                e.get("values")
                    .and_then(Value::as_array)
                    .ok_or("enum without values")?
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect(),
            ),
            "array" => Ty::Array(get("element-type").ok_or("array without element-type")?),
            "alternate" => Ty::Alternate(
                e.get("members")
                    .and_then(Value::as_array)
                    .ok_or("alternate without members")?
                    .iter()
                    .filter_map(|m| m.get("type").and_then(Value::as_str).map(str::to_string))
                    .collect(),
            ),
            "object" => {
                let members = e
                    .get("members")
                    .and_then(Value::as_array)
                    .ok_or("object without members")?
                    .iter()
                    .map(|m| {
                        Ok(Member {
                            name: m
                                .get("name")
                                .and_then(Value::as_str)
                                .ok_or("member without name")?
                                .to_string(),
                            ty: m
                                .get("type")
                                .and_then(Value::as_str)
                                .ok_or("member without type")?
                                .to_string(),
                            optional: m.get("default").is_some(),
                        })
                    })
                    .collect::<Result<Vec<_>, String>>()?;
                let variants = e
                    .get("variants")
                    .and_then(Value::as_array)
                    .map(|vs| {
                        vs.iter()
                            .filter_map(|v| {
                                Some((
                                    v.get("case")?.as_str()?.to_string(),
                                    v.get("type")?.as_str()?.to_string(),
                                ))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                Ty::Object {
                    members,
                    tag: get("tag"),
                    variants,
                }
            }
            other => return Err(format!("unknown meta-type {other}")),
        };
        self.types.insert(name, ty);
        Ok(())
    }

    /// All command names, in schema order.
    pub fn command_names(&self) -> Vec<&str> {
        self.commands.iter().map(|c| c.0.as_str()).collect()
    }

    /// All event names, in schema order.
    pub fn event_names(&self) -> Vec<&str> {
        self.events.iter().map(|e| e.0.as_str()).collect()
    }

    /// Whether the schema defines `command`.
    pub fn has_command(&self, command: &str) -> bool {
        self.commands.iter().any(|c| c.0 == command)
    }

    /// The (masked) name of a command's argument type.
    pub fn command_arg_type(&self, command: &str) -> Option<&str> {
        self.commands
            .iter()
            .find(|c| c.0 == command)
            .map(|c| c.1.as_str())
    }

    /// The order in which `query-commands` lists commands: qsd registers them in schema
    /// order and lists the most recently registered first, so this is the reverse schema
    /// order. Commands unknown to the schema come first, in the order given.
    pub fn query_commands_order<'a>(&self, supported: &[&'a str]) -> Vec<&'a str> {
        let pos = |c: &str| self.commands.iter().position(|x| x.0 == c);
        let mut unknown: Vec<&str> = supported
            .iter()
            .copied()
            .filter(|c| pos(c).is_none())
            .collect();
        let mut known: Vec<(usize, &str)> = supported
            .iter()
            .filter_map(|c| pos(c).map(|p| (p, *c)))
            .collect();
        known.sort_by_key(|k| std::cmp::Reverse(k.0));
        known.dedup_by_key(|k| k.0);
        unknown.extend(known.into_iter().map(|k| k.1));
        unknown
    }

    /// The `query-qmp-schema` answer restricted to `supported_commands`, all events and
    /// every type reachable from them, in the original order.
    pub fn introspect(&self, supported_commands: &[&str]) -> Value {
        let mut keep: HashSet<&str> = HashSet::new();
        let mut stack: Vec<&str> = Vec::new();
        for (name, arg, ret) in &self.commands {
            if supported_commands.contains(&name.as_str()) {
                keep.insert(name);
                stack.push(arg);
                stack.push(ret);
            }
        }
        for (name, arg) in &self.events {
            keep.insert(name);
            stack.push(arg);
        }
        while let Some(t) = stack.pop() {
            if !keep.insert(t) {
                continue;
            }
            match self.types.get(t) {
                Some(Ty::Object {
                    members, variants, ..
                }) => {
                    stack.extend(members.iter().map(|m| m.ty.as_str()));
                    stack.extend(variants.iter().map(|v| v.1.as_str()));
                }
                Some(Ty::Array(e)) => stack.push(e),
                Some(Ty::Alternate(ms)) => stack.extend(ms.iter().map(String::as_str)),
                _ => {}
            }
        }
        Value::Array(
            self.entries
                .iter()
                .filter(|e| {
                    e.get("name")
                        .and_then(Value::as_str)
                        .is_some_and(|n| keep.contains(n))
                })
                .cloned()
                .collect(),
        )
    }

    /// Validates QMP command arguments like QEMU's QObject input visitor does before a
    /// command runs, with QEMU's error texts. Returns the arguments as a JSON object.
    /// An unknown command is `CommandNotFound` "The command %s has not been found".
    pub fn validate_command_args(
        &self,
        command: &str,
        args: &Map<String, Value>,
    ) -> Result<Value, QmpError> {
        let arg_type = self
            .command_arg_type(command)
            .ok_or_else(|| QmpError::command_not_found(command))?;
        self.visit_members(Mode::Json, arg_type, args, "")?;
        Ok(Value::Object(args.clone()))
    }

    /// Validates a JSON value against a named (masked) type in JSON mode, `name` being
    /// the top-level parameter name used in error messages.
    pub fn validate_value(
        &self,
        type_name: &str,
        name: &str,
        value: &Value,
    ) -> Result<Value, QmpError> {
        self.visit(Mode::Json, type_name, value, Some(name), name, IntKind::I64)
    }

    /// Converts a keyval tree (objects, arrays, string leaves; see
    /// [`crate::keyval::parse`]) into typed JSON for the object type `type_name` (a masked
    /// schema name, or `MonitorOptions`), like QEMU's keyval input visitor. Errors carry
    /// QEMU's texts, e.g. "Parameter 'read-only' expects 'on' or 'off'".
    pub fn convert_keyval(&self, type_name: &str, tree: &Value) -> Result<Value, QmpError> {
        match tree {
            Value::Object(m) => {
                if !matches!(self.types.get(type_name), Some(Ty::Object { .. })) {
                    return Err(QmpError::generic(format!(
                        "unknown object type {type_name}"
                    )));
                }
                Ok(Value::Object(self.visit_members(
                    Mode::Keyval,
                    type_name,
                    m,
                    "",
                )?))
            }
            _ => Err(QmpError::invalid_parameter_type("null", "object")),
        }
    }

    /// [`Schema::convert_keyval`] for a command's argument type (e.g. `blockdev-add` for
    /// `--blockdev`, `block-export-add` for `--export`, `nbd-server-start` for
    /// `--nbd-server`, `object-add` for `--object`).
    pub fn convert_keyval_command_args(
        &self,
        command: &str,
        tree: &Value,
    ) -> Result<Value, QmpError> {
        let arg_type = self
            .command_arg_type(command)
            .ok_or_else(|| QmpError::command_not_found(command))?;
        self.convert_keyval(arg_type, tree)
    }

    fn int_kind(&self, object: &str, member: &str) -> IntKind {
        self.int_kinds
            .get(&(object.to_string(), member.to_string()))
            .copied()
            .unwrap_or(IntKind::I64)
    }

    fn type_word(&self, ty: &str) -> String {
        match self.types.get(ty) {
            Some(Ty::Builtin(b)) => match b {
                Builtin::Str => "string",
                Builtin::Any => "any",
                Builtin::Int => "integer",
                Builtin::Bool => "boolean",
                Builtin::Null => "null",
                Builtin::Number => "number",
            }
            .into(),
            Some(Ty::Enum(_)) => "string".into(),
            Some(Ty::Object { .. }) => "object".into(),
            Some(Ty::Array(_)) => "array".into(),
            Some(Ty::Alternate(_)) => self
                .alt_names
                .get(ty)
                .cloned()
                .unwrap_or_else(|| ty.to_string()),
            None => ty.to_string(),
        }
    }

    /// Visits the members of object type `ty` (base, then the variant selected by the
    /// tag), then rejects leftover keys. Returns the converted members.
    fn visit_members(
        &self,
        mode: Mode,
        ty: &str,
        input: &Map<String, Value>,
        prefix: &str,
    ) -> Result<Map<String, Value>, QmpError> {
        let mut out = Map::new();
        let mut seen: Vec<&str> = Vec::new();
        self.visit_members_inner(mode, ty, input, prefix, &mut out, &mut seen)?;
        // Reported in QEMU's hash-table order, not the input's.
        if let Some(k) = crate::unexpected::first_unexpected(input, &seen) {
            return Err(QmpError::unexpected_parameter(&join(prefix, k)));
        }
        Ok(out)
    }

    fn visit_members_inner<'i>(
        &self,
        mode: Mode,
        ty: &str,
        input: &'i Map<String, Value>,
        prefix: &str,
        out: &mut Map<String, Value>,
        seen: &mut Vec<&'i str>,
    ) -> Result<(), QmpError> {
        let Some(Ty::Object {
            members,
            tag,
            variants,
        }) = self.types.get(ty)
        else {
            return Ok(());
        };
        for m in members {
            let full = join(prefix, &m.name);
            match input.get_key_value(&m.name) {
                None if m.optional => {}
                None => return Err(QmpError::missing_parameter(&full)),
                Some((k, v)) => {
                    seen.push(k.as_str());
                    let kind = self.int_kind(ty, &m.name);
                    let cv = self.visit(mode, &m.ty, v, Some(&m.name), &full, kind)?;
                    out.insert(m.name.clone(), cv);
                }
            }
        }
        if let Some(tag) = tag
            && let Some(Value::String(case)) = out.get(tag)
            && let Some((_, vty)) = variants.iter().find(|(c, _)| c == case)
        {
            let vty = vty.clone();
            self.visit_members_inner(mode, &vty, input, prefix, out, seen)?;
        }
        Ok(())
    }

    fn visit(
        &self,
        mode: Mode,
        ty: &str,
        v: &Value,
        name: Option<&str>,
        full: &str,
        kind: IntKind,
    ) -> Result<Value, QmpError> {
        let short = name.unwrap_or("null");
        let Some(t) = self.types.get(ty) else {
            return Err(QmpError::generic(format!("Unknown type {ty}")));
        };
        match t {
            Ty::Builtin(Builtin::Any) => Ok(v.clone()),
            Ty::Builtin(Builtin::Str) => match v {
                Value::String(_) => Ok(v.clone()),
                _ => Err(QmpError::invalid_parameter_type(full, "string")),
            },
            Ty::Builtin(Builtin::Null) => match (mode, v) {
                (_, Value::Null) => Ok(Value::Null),
                (Mode::Keyval, Value::String(s)) if s.is_empty() => Ok(Value::Null),
                _ => Err(QmpError::invalid_parameter_type(full, "null")),
            },
            Ty::Builtin(Builtin::Bool) => match (mode, v) {
                (Mode::Json, Value::Bool(_)) => Ok(v.clone()),
                (Mode::Json, _) => Err(QmpError::invalid_parameter_type(full, "boolean")),
                (Mode::Keyval, Value::String(s)) => match s.as_str() {
                    "on" | "yes" | "true" | "y" => Ok(Value::Bool(true)),
                    "off" | "no" | "false" | "n" => Ok(Value::Bool(false)),
                    _ => Err(QmpError::invalid_parameter_value(full, "'on' or 'off'")),
                },
                (Mode::Keyval, _) => Err(QmpError::invalid_parameter_type(full, "boolean")),
            },
            Ty::Builtin(Builtin::Number) => match (mode, v) {
                (Mode::Json, Value::Number(_)) => Ok(v.clone()),
                (Mode::Json, _) => Err(QmpError::invalid_parameter_type(full, "number")),
                (Mode::Keyval, Value::String(s)) => s
                    .trim_start()
                    .parse::<f64>()
                    .ok()
                    .filter(|f| f.is_finite())
                    .and_then(Number::from_f64)
                    .map(Value::Number)
                    .ok_or_else(|| QmpError::invalid_parameter_value(full, "number")),
                (Mode::Keyval, _) => Err(QmpError::invalid_parameter_type(full, "number")),
            },
            Ty::Builtin(Builtin::Int) => self.visit_int(mode, v, short, full, kind),
            Ty::Enum(values) => match v {
                Value::String(s) => {
                    if values.iter().any(|x| x == s) {
                        Ok(v.clone())
                    } else {
                        Err(QmpError::bad_enum_value(short, s))
                    }
                }
                _ => Err(QmpError::invalid_parameter_type(full, "string")),
            },
            Ty::Array(elem) => match v {
                Value::Array(items) => {
                    let mut out = Vec::with_capacity(items.len());
                    for (i, item) in items.iter().enumerate() {
                        // The keyval visitor names list elements "list.0".
                        let f = match mode {
                            Mode::Json => format!("{full}[{i}]"),
                            Mode::Keyval => format!("{full}.{i}"),
                        };
                        out.push(self.visit(mode, elem, item, None, &f, kind)?);
                    }
                    Ok(Value::Array(out))
                }
                _ => Err(QmpError::invalid_parameter_type(full, "array")),
            },
            Ty::Object { .. } => match v {
                Value::Object(m) => {
                    let out = self.visit_members(mode, ty, m, full)?;
                    Ok(match mode {
                        Mode::Json => v.clone(),
                        Mode::Keyval => Value::Object(out),
                    })
                }
                _ => Err(QmpError::invalid_parameter_type(full, "object")),
            },
            Ty::Alternate(branches) => {
                let fits = |b: &String| -> bool {
                    let bt = self.types.get(b.as_str());
                    match v {
                        Value::String(_) => {
                            matches!(bt, Some(Ty::Builtin(Builtin::Str)) | Some(Ty::Enum(_)))
                        }
                        Value::Object(_) => matches!(bt, Some(Ty::Object { .. })),
                        Value::Array(_) => matches!(bt, Some(Ty::Array(_))),
                        Value::Null => matches!(bt, Some(Ty::Builtin(Builtin::Null))),
                        Value::Bool(_) => matches!(bt, Some(Ty::Builtin(Builtin::Bool))),
                        Value::Number(_) => matches!(
                            bt,
                            Some(Ty::Builtin(Builtin::Int)) | Some(Ty::Builtin(Builtin::Number))
                        ),
                    }
                };
                match branches.iter().find(|b| fits(b)) {
                    Some(b) => self.visit(mode, b, v, name, full, kind),
                    None => Err(QmpError::invalid_parameter_type(short, &self.type_word(ty))),
                }
            }
        }
    }

    fn visit_int(
        &self,
        mode: Mode,
        v: &Value,
        short: &str,
        full: &str,
        kind: IntKind,
    ) -> Result<Value, QmpError> {
        use IntKind::*;
        let signed_range = |k: IntKind| match k {
            I8 => Some((i64::from(i8::MIN), i64::from(i8::MAX), "int8_t")),
            I16 => Some((i64::from(i16::MIN), i64::from(i16::MAX), "int16_t")),
            I32 => Some((i64::from(i32::MIN), i64::from(i32::MAX), "int32_t")),
            _ => None,
        };
        let unsigned_max = |k: IntKind| match k {
            U8 => Some((u64::from(u8::MAX), "uint8_t")),
            U16 => Some((u64::from(u16::MAX), "uint16_t")),
            U32 => Some((u64::from(u32::MAX), "uint32_t")),
            _ => None,
        };
        match kind {
            I8 | I16 | I32 | I64 => {
                let i = match (mode, v) {
                    (Mode::Json, Value::Number(n)) => n.as_i64(),
                    (Mode::Keyval, Value::String(s)) => Some(
                        parse_i64(s)
                            .ok_or_else(|| QmpError::invalid_parameter_value(full, "integer"))?,
                    ),
                    _ => None,
                };
                let i = i.ok_or_else(|| QmpError::invalid_parameter_type(full, "integer"))?;
                if let Some((lo, hi, word)) = signed_range(kind)
                    && !(lo..=hi).contains(&i)
                {
                    return Err(QmpError::invalid_parameter_value(short, word));
                }
                Ok(Value::Number(i.into()))
            }
            U8 | U16 | U32 | U64 | Size => {
                let u = match (mode, v) {
                    (Mode::Json, Value::Number(n)) => {
                        n.as_u64().or_else(|| n.as_i64().map(|i| i as u64))
                    }
                    (Mode::Json, _) => None,
                    (Mode::Keyval, Value::String(s)) if kind == Size => Some(
                        parse_size(s)
                            .ok_or_else(|| QmpError::invalid_parameter_value(full, "size"))?,
                    ),
                    (Mode::Keyval, Value::String(s)) => Some(
                        parse_u64(s)
                            .ok_or_else(|| QmpError::invalid_parameter_value(full, "integer"))?,
                    ),
                    (Mode::Keyval, _) => {
                        return Err(QmpError::invalid_parameter_type(full, "integer"));
                    }
                };
                let u = u.ok_or_else(|| QmpError::invalid_parameter_value(full, "uint64"))?;
                if let Some((max, word)) = unsigned_max(kind)
                    && u > max
                {
                    return Err(QmpError::invalid_parameter_value(short, word));
                }
                Ok(Value::Number(u.into()))
            }
        }
    }
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Splits C `strtol(…, 0)` style input into (negative, radix, digits).
fn int_parts(s: &str) -> Option<(bool, u32, &str)> {
    let s = s.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (neg, s) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let (radix, digits) = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        (16, h)
    } else if s.len() > 1 && s.starts_with('0') {
        (8, &s[1..])
    } else {
        (10, s)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    Some((neg, radix, digits))
}

/// QEMU's `qemu_strtoi64(s, NULL, 0, …)`: whole string, base prefix, range-checked.
pub fn parse_i64(s: &str) -> Option<i64> {
    let (neg, radix, digits) = int_parts(s)?;
    let mag = u64::from_str_radix(digits, radix).ok()?;
    if neg {
        if mag <= i64::MAX as u64 + 1 {
            Some((mag as i64).wrapping_neg())
        } else {
            None
        }
    } else {
        i64::try_from(mag).ok()
    }
}

/// QEMU's `qemu_strtou64(s, NULL, 0, …)`: like `strtoull`, a leading '-' negates modulo
/// 2^64 (so "-1" is 18446744073709551615).
pub fn parse_u64(s: &str) -> Option<u64> {
    let (neg, radix, digits) = int_parts(s)?;
    let mag = u64::from_str_radix(digits, radix).ok()?;
    Some(if neg { mag.wrapping_neg() } else { mag })
}

/// QEMU's `qemu_strtosz`: a non-negative number (decimal with optional fraction, or hex)
/// with an optional suffix B/K/M/G/T/P/E (case-insensitive, binary multiples).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim_start();
    let (num, rest, hex) = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        let end = h.find(|c: char| !c.is_ascii_hexdigit()).unwrap_or(h.len());
        (&h[..end], &h[end..], true)
    } else {
        let end = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        (&s[..end], &s[end..], false)
    };
    let mult: u64 = match rest {
        "" => 1,
        "b" | "B" if !hex => 1,
        "k" | "K" => 1 << 10,
        "m" | "M" => 1 << 20,
        "g" | "G" => 1 << 30,
        "t" | "T" => 1 << 40,
        "p" | "P" => 1 << 50,
        "e" | "E" if !hex => 1 << 60,
        _ => return None,
    };
    if num.is_empty() {
        return None;
    }
    if hex {
        return u64::from_str_radix(num, 16).ok()?.checked_mul(mult);
    }
    match num.split_once('.') {
        None => num.parse::<u64>().ok()?.checked_mul(mult),
        Some((int, frac)) => {
            if frac.contains('.')
                || frac.is_empty()
                || (mult == 1 && frac.bytes().any(|b| b != b'0'))
            {
                return None;
            }
            let f: f64 = format!("{}.{frac}", if int.is_empty() { "0" } else { int })
                .parse()
                .ok()?;
            let v = f * mult as f64;
            if v >= 18_446_744_073_709_551_616.0 {
                return None;
            }
            Some(v as u64)
        }
    }
}

#[cfg(test)]
mod tests;
