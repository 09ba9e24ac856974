//! The `blkdebug` filter (QEMU's `block/blkdebug.c`): error injection driven by the events a
//! format driver announces on its file child ([`BlockNode::debug_event`]).
//!
//! Semantics, as in QEMU 10:
//! - the node has a state, 1 at creation; the `none` event fires once when it is created;
//! - when an event fires, every rule for it whose `state` matches the current state (or is
//!   0, "any") acts: `set-state` rules set the state the node has after the event, and
//!   `inject-error` rules become *active* (the first one that acts replaces the rules active
//!   so far; later ones join it);
//! - every request (read, write, write-zeroes, discard, flush, block-status) is checked
//!   against the active rules: the first whose `iotype` matches and whose `sector` lies in
//!   the request (or is unset) fails it with `errno`. Active rules stay active (each later
//!   matching request fails too) until another event activates other rules; a `once` rule
//!   is removed for good after its first hit. Without `immediately` the failure is
//!   reported after a yield to the executor (QEMU completes it from a bottom half), with it
//!   at once;
//! - writes to the node announce `pwritev` / `pwritev_zero` before and `pwritev_done`
//!   after, on the node itself, as QEMU's generic write path does for every node.

use std::path::Path;

use crate::forward_to_child;
use parking_lot::Mutex;
use serde_json::Value;
use strata_core::error::strerror;
use strata_core::{
    BlockNode, BoxFuture, DebugEvent, Error, Extent, IoBuf, NodeRef, Result, WriteFlags, ZeroFlags,
};

/// QEMU's `BlkdebugIOType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlkdebugIoType {
    /// `read`
    Read,
    /// `write`
    Write,
    /// `write-zeroes`
    WriteZeroes,
    /// `discard`
    Discard,
    /// `flush`
    Flush,
    /// `block-status`
    BlockStatus,
}

impl BlkdebugIoType {
    /// Parse the QAPI spelling.
    pub fn parse(s: &str) -> Option<BlkdebugIoType> {
        Some(match s {
            "read" => BlkdebugIoType::Read,
            "write" => BlkdebugIoType::Write,
            "write-zeroes" => BlkdebugIoType::WriteZeroes,
            "discard" => BlkdebugIoType::Discard,
            "flush" => BlkdebugIoType::Flush,
            "block-status" => BlkdebugIoType::BlockStatus,
            _ => return None,
        })
    }

    fn bit(self) -> u64 {
        1 << (self as u32)
    }

    /// The types a rule without `iotype` applies to (all but block-status).
    const DEFAULT_MASK: u64 = 0b1_1111;
}

/// An `inject-error` rule (`BlkdebugInjectErrorOptions`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectErrorRule {
    /// The event that activates the rule.
    pub event: DebugEvent,
    /// The state the node must be in when the event fires; 0 = any.
    pub state: i64,
    /// The request type that fails; `None` = read, write, write-zeroes, discard and flush.
    pub iotype: Option<BlkdebugIoType>,
    /// The errno to fail with (default EIO).
    pub errno: i32,
    /// Only requests touching this 512-byte sector fail; `None` = any request.
    pub sector: Option<u64>,
    /// Remove the rule after its first hit.
    pub once: bool,
    /// Fail without first yielding to the executor.
    pub immediately: bool,
}

/// A `set-state` rule (`BlkdebugSetStateOptions`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetStateRule {
    /// The event that triggers the rule.
    pub event: DebugEvent,
    /// The state the node must be in; 0 = any.
    pub state: i64,
    /// The state after the event.
    pub new_state: i64,
}

/// Options of the `blkdebug` driver (the QMP members other than `image`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlkdebugOptions {
    /// `config`: the rules file whose rules were read into the lists below.
    pub config: Option<String>,
    /// `align`: request alignment the node reports (0 = the image's).
    pub align: u64,
    /// `max-transfer`: largest read/write (0 = no limit).
    pub max_transfer: u64,
    /// `opt-write-zero`.
    pub opt_write_zero: u64,
    /// `max-write-zero`.
    pub max_write_zero: u64,
    /// `opt-discard`.
    pub opt_discard: u64,
    /// `max-discard`.
    pub max_discard: u64,
    /// `inject-error` rules (config file first, then the options).
    pub inject_error: Vec<InjectErrorRule>,
    /// `set-state` rules (config file first, then the options).
    pub set_state: Vec<SetStateRule>,
}

/// Options that every blockdev-add object may carry, or that are handled elsewhere.
const GENERIC_KEYS: &[&str] = &[
    "driver",
    "node-name",
    "image",
    "discard",
    "cache",
    "active",
    "read-only",
    "auto-read-only",
    "force-share",
    "detect-zeroes",
    "take-child-perms",
    "unshare-child-perms",
];

fn bad_type(name: &str, want: &str) -> Error {
    Error::invalid(format!(
        "Invalid parameter type for '{name}', expected: {want}"
    ))
}

fn json_int(v: &Value, name: &str) -> Result<i64> {
    v.as_i64()
        .or_else(|| v.as_u64().map(|u| u as i64))
        .ok_or_else(|| bad_type(name, "integer"))
}

fn json_bool(v: &Value, name: &str) -> Result<bool> {
    v.as_bool().ok_or_else(|| bad_type(name, "boolean"))
}

/// A non-negative size member.
fn json_size(v: &Value, name: &str) -> Result<u64> {
    let n = json_int(v, name)?;
    u64::try_from(n).map_err(|_| {
        Error::invalid(format!(
            "Parameter '{name}' expects a non-negative number below 2^64"
        ))
    })
}

/// Options of one rule section, as strings (config file) or JSON values.
trait RuleSource {
    fn keys(&self) -> Vec<String>;
    fn int(&self, key: &str, what: &str) -> Result<Option<i64>>;
    fn boolean(&self, key: &str, what: &str) -> Result<Option<bool>>;
    fn string(&self, key: &str, what: &str) -> Result<Option<String>>;
    /// The error for an unknown enum value.
    fn bad_enum(&self, what: &str, value: &str) -> Error;
    /// The error for a missing member.
    fn missing(&self, what: &str) -> Error;
}

/// A JSON rule object; `prefix` is e.g. `inject-error[0]`.
struct JsonRule<'a> {
    obj: &'a serde_json::Map<String, Value>,
    prefix: String,
}

impl RuleSource for JsonRule<'_> {
    fn keys(&self) -> Vec<String> {
        self.obj.keys().cloned().collect()
    }
    fn int(&self, key: &str, what: &str) -> Result<Option<i64>> {
        self.obj.get(key).map(|v| json_int(v, what)).transpose()
    }
    fn boolean(&self, key: &str, what: &str) -> Result<Option<bool>> {
        self.obj.get(key).map(|v| json_bool(v, what)).transpose()
    }
    fn string(&self, key: &str, what: &str) -> Result<Option<String>> {
        self.obj
            .get(key)
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad_type(what, "string"))
            })
            .transpose()
    }
    fn bad_enum(&self, what: &str, value: &str) -> Error {
        Error::invalid(format!(
            "Parameter '{what}' does not accept value '{value}'"
        ))
    }
    fn missing(&self, what: &str) -> Error {
        Error::invalid(format!("Parameter '{what}' is missing"))
    }
}

/// A config-file section: `key = "value"` pairs, parsed as QemuOpts does.
struct IniRule {
    pairs: Vec<(String, String)>,
}

/// QEMU's number parsing for QemuOpts (`qemu_strtou64`, base 0).
fn parse_number(s: &str) -> Option<i64> {
    let (neg, t) = match s.strip_prefix('-') {
        Some(t) => (true, t),
        None => (false, s),
    };
    let v = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()?
    } else if t.len() > 1 && t.starts_with('0') {
        u64::from_str_radix(&t[1..], 8).ok()?
    } else {
        t.parse::<u64>().ok()?
    };
    Some(if neg {
        (v as i64).wrapping_neg()
    } else {
        v as i64
    })
}

impl IniRule {
    fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

impl RuleSource for IniRule {
    fn keys(&self) -> Vec<String> {
        self.pairs.iter().map(|(k, _)| k.clone()).collect()
    }
    fn int(&self, key: &str, _what: &str) -> Result<Option<i64>> {
        self.get(key)
            .map(|v| {
                parse_number(v)
                    .ok_or_else(|| Error::invalid(format!("Parameter '{key}' expects a number")))
            })
            .transpose()
    }
    fn boolean(&self, key: &str, _what: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| match v {
                "on" | "yes" | "true" | "y" => Ok(true),
                "off" | "no" | "false" | "n" => Ok(false),
                _ => Err(Error::invalid(format!(
                    "Parameter '{key}' expects 'on' or 'off'"
                ))),
            })
            .transpose()
    }
    fn string(&self, key: &str, _what: &str) -> Result<Option<String>> {
        Ok(self.get(key).map(str::to_string))
    }
    fn bad_enum(&self, _what: &str, value: &str) -> Error {
        Error::invalid(format!("invalid parameter value: {value}"))
    }
    fn missing(&self, what: &str) -> Error {
        if what.ends_with("event") {
            Error::invalid("Missing event name for rule")
        } else {
            // QemuOpts defaults a missing new_state to 0.
            Error::invalid(format!("Parameter '{what}' is missing"))
        }
    }
}

fn check_keys(src: &dyn RuleSource, allowed: &[&str], json_prefix: Option<&str>) -> Result<()> {
    for k in src.keys() {
        if !allowed.contains(&k.as_str()) {
            return Err(Error::invalid(match json_prefix {
                Some(p) => format!("Parameter '{p}.{k}' is unexpected"),
                None => format!("Invalid parameter '{k}'"),
            }));
        }
    }
    Ok(())
}

fn parse_event(src: &dyn RuleSource, prefix: &str) -> Result<DebugEvent> {
    let what = format!("{prefix}event");
    let name = src
        .string("event", &what)?
        .ok_or_else(|| src.missing(&what))?;
    DebugEvent::parse(&name).ok_or_else(|| src.bad_enum(&what, &name))
}

fn parse_inject(src: &dyn RuleSource, prefix: &str) -> Result<InjectErrorRule> {
    let event = parse_event(src, prefix)?;
    let w = |k: &str| format!("{prefix}{k}");
    let iotype = match src.string("iotype", &w("iotype"))? {
        Some(s) => Some(BlkdebugIoType::parse(&s).ok_or_else(|| src.bad_enum(&w("iotype"), &s))?),
        None => None,
    };
    let sector = src.int("sector", &w("sector"))?.unwrap_or(-1);
    Ok(InjectErrorRule {
        event,
        state: src.int("state", &w("state"))?.unwrap_or(0),
        iotype,
        errno: src
            .int("errno", &w("errno"))?
            .unwrap_or(i64::from(libc::EIO)) as i32,
        sector: (sector != -1).then_some(sector as u64),
        once: src.boolean("once", &w("once"))?.unwrap_or(false),
        immediately: src
            .boolean("immediately", &w("immediately"))?
            .unwrap_or(false),
    })
}

fn parse_set_state(src: &dyn RuleSource, prefix: &str, ini: bool) -> Result<SetStateRule> {
    let event = parse_event(src, prefix)?;
    let what = format!("{prefix}new_state");
    let new_state = match src.int("new_state", &what)? {
        Some(n) => n,
        None if ini => 0,
        None => return Err(src.missing(&what)),
    };
    Ok(SetStateRule {
        event,
        state: src.int("state", &format!("{prefix}state"))?.unwrap_or(0),
        new_state,
    })
}

const INJECT_KEYS: &[&str] = &[
    "event",
    "state",
    "iotype",
    "errno",
    "sector",
    "once",
    "immediately",
];
const SET_STATE_KEYS: &[&str] = &["event", "state", "new_state"];

impl BlkdebugOptions {
    /// Parse the QMP `BlockdevOptionsBlkdebug` object (`image` and the generic blockdev
    /// members are ignored here: the caller opens the image). A `config` file is read and
    /// its rules come before the inline ones.
    pub fn from_json(v: &Value) -> Result<BlkdebugOptions> {
        let obj = v.as_object().ok_or_else(|| bad_type("options", "object"))?;
        let mut o = BlkdebugOptions::default();
        for (k, val) in obj {
            match k.as_str() {
                "config" => {
                    let s = val.as_str().ok_or_else(|| bad_type("config", "string"))?;
                    o.config = Some(s.to_string());
                }
                "align" => o.align = json_size(val, k)?,
                "max-transfer" => o.max_transfer = json_size(val, k)?,
                "opt-write-zero" => o.opt_write_zero = json_size(val, k)?,
                "max-write-zero" => o.max_write_zero = json_size(val, k)?,
                "opt-discard" => o.opt_discard = json_size(val, k)?,
                "max-discard" => o.max_discard = json_size(val, k)?,
                "inject-error" | "set-state" => {}
                k if GENERIC_KEYS.contains(&k) => {}
                k => return Err(Error::invalid(format!("Parameter '{k}' is unexpected"))),
            }
        }
        if let Some(path) = o.config.clone() {
            let (inject, set) = Self::read_config(Path::new(&path))?;
            o.inject_error = inject;
            o.set_state = set;
        }
        for (key, inject) in [("inject-error", true), ("set-state", false)] {
            let Some(list) = obj.get(key) else {
                continue;
            };
            let list = list.as_array().ok_or_else(|| bad_type(key, "array"))?;
            for (i, item) in list.iter().enumerate() {
                let prefix = format!("{key}[{i}]");
                let rule = JsonRule {
                    obj: item
                        .as_object()
                        .ok_or_else(|| bad_type(&prefix, "object"))?,
                    prefix: prefix.clone(),
                };
                let p = format!("{}.", rule.prefix);
                if inject {
                    check_keys(&rule, INJECT_KEYS, Some(&prefix))?;
                    o.inject_error.push(parse_inject(&rule, &p)?);
                } else {
                    check_keys(&rule, SET_STATE_KEYS, Some(&prefix))?;
                    o.set_state.push(parse_set_state(&rule, &p, false)?);
                }
            }
        }
        Ok(o)
    }

    /// Read the rules of a config file.
    pub fn read_config(path: &Path) -> Result<(Vec<InjectErrorRule>, Vec<SetStateRule>)> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::from_errno(
                e.raw_os_error().unwrap_or(libc::EIO),
                "Could not read blkdebug config file",
            )
        })?;
        Self::parse_config(&text)
    }

    /// Parse the text of a config file (QEMU's `qemu_config_parse` format):
    ///
    /// ```text
    /// [inject-error]
    /// event = "l2_update"
    /// errno = "28"
    ///
    /// [set-state]
    /// event = "write_aio"
    /// new_state = "2"
    /// ```
    pub fn parse_config(text: &str) -> Result<(Vec<InjectErrorRule>, Vec<SetStateRule>)> {
        let mut sections: Vec<(String, IniRule)> = Vec::new();
        for raw in text.lines() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(rest) = line.strip_prefix('[') {
                let Some(inner) = rest.strip_suffix(']') else {
                    return Err(Error::invalid("parse error"));
                };
                // `[group "id"]` or `[group]`.
                let group = inner.split_whitespace().next().unwrap_or("");
                if group.is_empty() {
                    return Err(Error::invalid("parse error"));
                }
                if group != "inject-error" && group != "set-state" {
                    return Err(Error::invalid(format!(
                        "There is no option group '{group}'"
                    )));
                }
                sections.push((group.to_string(), IniRule { pairs: Vec::new() }));
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                return Err(Error::invalid("parse error"));
            };
            let k = k.trim();
            let v = v.trim();
            let Some(v) = v
                .strip_prefix('"')
                .and_then(|v| v.split_once('"'))
                .map(|(v, _)| v)
            else {
                return Err(Error::invalid("parse error"));
            };
            if k.is_empty() || k.contains(char::is_whitespace) {
                return Err(Error::invalid("parse error"));
            }
            let Some((_, sec)) = sections.last_mut() else {
                return Err(Error::invalid("no group defined"));
            };
            sec.pairs.push((k.to_string(), v.to_string()));
        }
        let mut inject = Vec::new();
        let mut set = Vec::new();
        for (group, sec) in &sections {
            if group == "inject-error" {
                check_keys(sec, INJECT_KEYS, None)?;
                inject.push(parse_inject(sec, "")?);
            } else {
                check_keys(sec, SET_STATE_KEYS, None)?;
                set.push(parse_set_state(sec, "", true)?);
            }
        }
        Ok((inject, set))
    }
}

/// What a rule does.
#[derive(Debug, Clone)]
enum Action {
    Inject {
        mask: u64,
        errno: i32,
        offset: Option<u64>,
        once: bool,
        immediately: bool,
    },
    SetState {
        new_state: i64,
    },
}

#[derive(Debug, Clone)]
struct Rule {
    id: u64,
    event: DebugEvent,
    state: i64,
    action: Action,
}

#[derive(Debug)]
struct State {
    state: i64,
    /// All rules, in the order QEMU's per-event lists hold them (newest first).
    rules: Vec<Rule>,
    /// Ids of the active inject-error rules, first match first.
    active: Vec<u64>,
    /// Requests failed by an inject-error rule so far, by [`BlkdebugIoType`].
    injected: [u64; 6],
}

/// A `blkdebug` node over `image`.
#[derive(Debug)]
pub struct BlkdebugNode {
    image: NodeRef,
    opts: BlkdebugOptions,
    align: u64,
    state: Mutex<State>,
}

impl BlkdebugNode {
    /// A blkdebug node over `image` with `opts`, checking the limits as QEMU does (and with
    /// its texts). The state starts at 1 and the `none` event fires.
    pub fn new(image: NodeRef, opts: BlkdebugOptions) -> Result<BlkdebugNode> {
        let a = opts.align;
        if a != 0 && (a >= i32::MAX as u64 || !a.is_power_of_two()) {
            return Err(Error::invalid(format!(
                "Cannot meet constraints with align {a}"
            )));
        }
        let align = a.max(image.request_alignment()).max(1);
        let check = |v: u64, name: &str, unit: u64| -> Result<()> {
            if v != 0 && (v >= i32::MAX as u64 || !v.is_multiple_of(unit)) {
                return Err(Error::invalid(format!(
                    "Cannot meet constraints with {name} {v}"
                )));
            }
            Ok(())
        };
        check(opts.max_transfer, "max-transfer", align)?;
        check(opts.opt_write_zero, "opt-write-zero", align)?;
        check(
            opts.max_write_zero,
            "max-write-zero",
            opts.opt_write_zero.max(align),
        )?;
        check(opts.opt_discard, "opt-discard", align)?;
        check(opts.max_discard, "max-discard", opts.opt_discard.max(align))?;

        // QEMU adds inject-error rules, then set-state rules, each at the head of its
        // event's list.
        let mut rules = Vec::new();
        let mut id = 0;
        for r in &opts.inject_error {
            id += 1;
            rules.push(Rule {
                id,
                event: r.event,
                state: r.state,
                action: Action::Inject {
                    mask: r.iotype.map_or(BlkdebugIoType::DEFAULT_MASK, |t| t.bit()),
                    errno: r.errno,
                    offset: r.sector.map(|s| s.saturating_mul(512)),
                    once: r.once,
                    immediately: r.immediately,
                },
            });
        }
        for r in &opts.set_state {
            id += 1;
            rules.push(Rule {
                id,
                event: r.event,
                state: r.state,
                action: Action::SetState {
                    new_state: r.new_state,
                },
            });
        }
        rules.reverse();
        let node = BlkdebugNode {
            image,
            opts,
            align,
            state: Mutex::new(State {
                state: 1,
                rules,
                active: Vec::new(),
                injected: [0; 6],
            }),
        };
        node.event(DebugEvent::None);
        Ok(node)
    }

    /// The options the node was created with.
    pub fn options(&self) -> &BlkdebugOptions {
        &self.opts
    }

    /// The current state.
    pub fn state(&self) -> i64 {
        self.state.lock().state
    }

    /// How many requests of type `iotype` an inject-error rule has failed so far (for
    /// tests that must know whether a fault was actually delivered).
    pub fn injected(&self, iotype: BlkdebugIoType) -> u64 {
        self.state.lock().injected[iotype as usize]
    }

    /// QEMU's `blkdebug_co_debug_event`.
    fn event(&self, ev: DebugEvent) {
        let mut guard = self.state.lock();
        let s = &mut *guard;
        let mut new_state = s.state;
        let mut injects = 0;
        for r in s.rules.iter().filter(|r| r.event == ev) {
            if r.state != 0 && r.state != s.state {
                continue;
            }
            match r.action {
                Action::Inject { .. } => {
                    injects += 1;
                    if injects == 1 {
                        s.active.clear();
                    }
                    s.active.insert(0, r.id);
                }
                Action::SetState { new_state: n } => new_state = n,
            }
        }
        s.state = new_state;
    }

    /// QEMU's `rule_check`: fail the request if an active rule matches it.
    async fn rule_check(&self, offset: u64, bytes: u64, iotype: BlkdebugIoType) -> Result<()> {
        let (errno, immediately) = {
            let mut guard = self.state.lock();
            let s = &mut *guard;
            let hit = s.active.iter().copied().find_map(|id| {
                let r = s.rules.iter().find(|r| r.id == id)?;
                let Action::Inject {
                    mask,
                    errno,
                    offset: at,
                    once,
                    immediately,
                } = r.action
                else {
                    return None;
                };
                let in_range =
                    at.is_none_or(|at| bytes != 0 && at >= offset && at - offset < bytes);
                (in_range && mask & iotype.bit() != 0).then_some((id, errno, once, immediately))
            });
            let Some((id, errno, once, immediately)) = hit else {
                return Ok(());
            };
            if errno == 0 {
                return Ok(());
            }
            if once {
                s.active.retain(|&a| a != id);
                s.rules.retain(|r| r.id != id);
            }
            s.injected[iotype as usize] += 1;
            (errno, immediately)
        };
        if !immediately {
            tokio::task::yield_now().await;
        }
        let kind = Error::from_errno(errno, "").kind();
        Err(Error::new(kind, strerror(errno)))
    }

    fn check_aligned(&self, offset: u64, len: u64) -> Result<()> {
        if !offset.is_multiple_of(self.align) || !len.is_multiple_of(self.align) {
            return Err(Error::invalid(format!(
                "blkdebug: request at {offset} of {len} bytes is not aligned to {}",
                self.align
            )));
        }
        Ok(())
    }

    fn check_max(&self, len: u64, max: u64, what: &str) -> Result<()> {
        if max != 0 && len > max {
            return Err(Error::invalid(format!(
                "blkdebug: {what} of {len} bytes exceeds the limit of {max}"
            )));
        }
        Ok(())
    }
}

impl BlockNode for BlkdebugNode {
    fn driver(&self) -> &'static str {
        "blkdebug"
    }

    forward_to_child!(image => size, read_only, truncate, file, allocated_size, close, as_any);

    fn filename(&self) -> String {
        format!(
            "blkdebug:{}:{}",
            self.opts.config.as_deref().unwrap_or(""),
            self.image.filename()
        )
    }

    fn request_alignment(&self) -> u64 {
        self.align
    }

    fn read(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, IoBuf> {
        Box::pin(async move {
            let len = buf.len() as u64;
            self.check_aligned(offset, len)?;
            self.check_max(len, self.opts.max_transfer, "read")?;
            self.rule_check(offset, len, BlkdebugIoType::Read).await?;
            self.image.read(offset, buf).await
        })
    }

    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFuture<'_, IoBuf> {
        Box::pin(async move {
            let len = buf.len() as u64;
            self.check_aligned(offset, len)?;
            self.check_max(len, self.opts.max_transfer, "write")?;
            self.event(DebugEvent::Pwritev);
            let r = async {
                self.rule_check(offset, len, BlkdebugIoType::Write).await?;
                self.image.write(offset, buf, flags).await
            }
            .await;
            self.event(DebugEvent::PwritevDone);
            r
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.check_aligned(offset, len)?;
            self.check_max(len, self.opts.max_write_zero, "write-zeroes")?;
            self.event(DebugEvent::PwritevZero);
            let r = async {
                self.rule_check(offset, len, BlkdebugIoType::WriteZeroes)
                    .await?;
                self.image.write_zeroes(offset, len, flags).await
            }
            .await;
            self.event(DebugEvent::PwritevDone);
            r
        })
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.check_aligned(offset, len)?;
            self.check_max(len, self.opts.max_discard, "discard")?;
            self.rule_check(offset, len, BlkdebugIoType::Discard)
                .await?;
            self.image.discard(offset, len).await
        })
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.rule_check(0, 0, BlkdebugIoType::Flush).await?;
            self.image.flush().await
        })
    }

    /// The image's answer, after the block-status rules had their say.
    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Extent> {
        Box::pin(async move {
            self.rule_check(offset, len, BlkdebugIoType::BlockStatus)
                .await?;
            self.image.block_status(offset, len).await
        })
    }

    /// Events stop here (QEMU delivers an event to the first node that handles it).
    fn debug_event(&self, event: DebugEvent) {
        self.event(event);
    }
}
