//! Entry points shared by the fuzz targets (`/fuzz`) and the corpus replay test: each takes
//! arbitrary bytes and must return without panicking, hanging or allocating without bound.

use serde_json::Value;

use crate::json_stream::{JsonStream, StreamItem};
use crate::keyval::{self, OptionArg};
use crate::schema::Schema;

/// Feeds `data` to the QMP stream parser in two chunks (split at byte 0's value, so chunk
/// boundaries are fuzzed too) and validates every parsed `{"execute": NAME, "arguments": {..}}`
/// against the qsd schema, as the monitor does before dispatch.
pub fn qmp_json(data: &[u8]) {
    let (split, rest) = match data {
        [b, rest @ ..] => (usize::from(*b), rest),
        [] => return,
    };
    let split = split.min(rest.len());
    let mut stream = JsonStream::new();
    let mut out: Vec<StreamItem> = Vec::new();
    stream.feed(&rest[..split], &mut out);
    stream.feed(&rest[split..], &mut out);
    stream.finish(&mut out);
    let schema = Schema::qsd();
    for item in out.iter().flatten() {
        let Value::Object(req) = item else { continue };
        let Some(Value::String(cmd)) = req.get("execute") else {
            continue;
        };
        let empty = serde_json::Map::new();
        let args = match req.get("arguments") {
            Some(Value::Object(a)) => a,
            _ => &empty,
        };
        let _ = schema.validate_command_args(cmd, args);
    }
}

/// The commands whose argument types take command-line option strings in `stratad`, with
/// the implied key each option uses (see `stratad`'s `cli.rs`).
const OPTION_COMMANDS: [(&str, Option<&str>); 5] = [
    ("blockdev-add", None),
    ("block-export-add", None),
    ("nbd-server-start", None),
    ("object-add", Some("qom-type")),
    ("blockdev-add", Some("driver")),
];

/// Parses `data[1..]` (as UTF-8) as an option string the way `stratad`'s command line
/// does: byte 0 picks the option; JSON is validated, keyval converted against the schema.
/// The `--chardev` QemuOpts parser is run on it too.
pub fn keyval(data: &[u8]) {
    let [pick, rest @ ..] = data else { return };
    let Ok(arg) = std::str::from_utf8(rest) else {
        return;
    };
    let (command, implied) = OPTION_COMMANDS[usize::from(*pick) % OPTION_COMMANDS.len()];
    let schema = Schema::qsd();
    match keyval::parse_option_arg(arg, implied) {
        Ok(OptionArg::Json(m)) => {
            let _ = schema.validate_command_args(command, &m);
        }
        Ok(OptionArg::Keyval(tree)) => {
            let _ = schema.convert_keyval_command_args(command, &tree);
        }
        Err(_) => {}
    }
    let _ = keyval::parse_chardev(arg);
    let _ = keyval::parse_with_help(arg, Some("chardev"));
}
