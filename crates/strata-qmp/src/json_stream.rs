//! Incremental JSON stream parser: splits a byte stream into top-level JSON values the way
//! QEMU's `json-lexer.c` / `json-streamer.c` / `json-parser.c` do.
//!
//! QEMU extensions and quirks reproduced here: single-quoted strings and the `\'` escape;
//! lexer errors produce "JSON parse error, stray '<token>'" and put the lexer into recovery
//! (input is skipped up to a structural character or an ASCII control character); the
//! nesting depth (1024), token count and total token size are capped; parse errors read
//! "JSON parse error, <detail>". A number or keyword at the very end of the input is only
//! complete once the next byte arrives, exactly as in QEMU.

use serde_json::{Map, Number, Value};

/// Maximum combined depth of open braces and brackets (QEMU's `MAX_NESTING`).
pub const MAX_NESTING: usize = 1024;
/// Maximum number of tokens in one top-level value (QEMU's `MAX_TOKEN_COUNT`).
pub const MAX_TOKEN_COUNT: usize = 2 << 20;
/// Maximum total size in bytes of one top-level value's tokens (QEMU's `MAX_TOKEN_SIZE`).
pub const MAX_TOKEN_SIZE: usize = 64 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Colon,
    Comma,
    Integer,
    Float,
    Keyword,
    String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Start,
    Recovery,
    /// Inside a string; the quote byte.
    Str(u8),
    /// After a backslash inside a string.
    StrEscape(u8),
    /// After '-'.
    Minus,
    /// After a leading '0'.
    Zero,
    /// In the integer digits.
    NonZero,
    /// After '.'.
    Dot,
    /// In the fraction digits.
    Frac,
    /// After 'e'/'E'.
    Exp,
    /// After the exponent's sign.
    ExpSign,
    /// In the exponent digits.
    ExpDigits,
    Keyword,
}

/// The outcome of one top-level value: the value, or the error text QEMU would report.
pub type StreamItem = Result<Value, String>;

/// Splits incoming bytes into top-level JSON values.
#[derive(Debug)]
pub struct JsonStream {
    state: State,
    token: Vec<u8>,
    tokens: Vec<(Tok, Vec<u8>)>,
    brace: i64,
    bracket: i64,
    token_size: usize,
}

impl Default for JsonStream {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonStream {
    /// A parser in its initial state.
    pub fn new() -> Self {
        JsonStream {
            state: State::Start,
            token: Vec::new(),
            tokens: Vec::new(),
            brace: 0,
            bracket: 0,
            token_size: 0,
        }
    }

    /// Feeds bytes; every completed top-level value (or error) is appended to `out`.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<StreamItem>) {
        for &b in data {
            self.byte(b, out);
        }
    }

    /// Signals end of input: a pending number or keyword is completed and whatever
    /// tokens are left are parsed (QEMU's `JSON_END_OF_INPUT`).
    pub fn finish(&mut self, out: &mut Vec<StreamItem>) {
        match self.state {
            State::Zero | State::NonZero => self.complete(Tok::Integer, out),
            State::Frac | State::ExpDigits => self.complete(Tok::Float, out),
            State::Keyword => self.complete(Tok::Keyword, out),
            _ => {}
        }
        self.state = State::Start;
        self.token.clear();
        if !self.tokens.is_empty() {
            let r = parse_tokens(&self.tokens);
            self.reset_tokens();
            out.push(r);
        }
    }

    fn reset_tokens(&mut self) {
        self.tokens.clear();
        self.brace = 0;
        self.bracket = 0;
        self.token_size = 0;
    }

    fn byte(&mut self, b: u8, out: &mut Vec<StreamItem>) {
        // Each byte is processed at most twice (once as lookahead after a token ends).
        let mut again = true;
        while again {
            again = false;
            match self.state {
                State::Recovery => {
                    if (b < 0x20 && b != b'\t')
                        || b >= 0xFE
                        || matches!(b, b'[' | b']' | b'{' | b'}' | b':' | b',')
                    {
                        self.state = State::Start;
                        again = true;
                    }
                }
                State::Start => {
                    self.token.clear();
                    match b {
                        b' ' | b'\t' | b'\r' | b'\n' => {}
                        b'{' => self.single(b, Tok::LCurly, out),
                        b'}' => self.single(b, Tok::RCurly, out),
                        b'[' => self.single(b, Tok::LSquare, out),
                        b']' => self.single(b, Tok::RSquare, out),
                        b':' => self.single(b, Tok::Colon, out),
                        b',' => self.single(b, Tok::Comma, out),
                        b'"' | b'\'' => {
                            self.token.push(b);
                            self.state = State::Str(b);
                        }
                        b'-' => {
                            self.token.push(b);
                            self.state = State::Minus;
                        }
                        b'0' => {
                            self.token.push(b);
                            self.state = State::Zero;
                        }
                        b'1'..=b'9' => {
                            self.token.push(b);
                            self.state = State::NonZero;
                        }
                        b'a'..=b'z' => {
                            self.token.push(b);
                            self.state = State::Keyword;
                        }
                        _ => {
                            self.token.push(b);
                            self.error(out);
                        }
                    }
                }
                State::Str(q) => {
                    self.token.push(b);
                    if b == q {
                        self.state = State::Start;
                        self.complete(Tok::String, out);
                    } else if b == b'\\' {
                        self.state = State::StrEscape(q);
                    } else if !(0x20..0xFE).contains(&b) {
                        self.error(out);
                    }
                }
                State::StrEscape(q) => {
                    self.token.push(b);
                    if !(0x20..0xFE).contains(&b) {
                        self.error(out);
                    } else {
                        self.state = State::Str(q);
                    }
                }
                State::Minus => self.num_step(
                    b,
                    |b| match b {
                        b'0' => Some(State::Zero),
                        b'1'..=b'9' => Some(State::NonZero),
                        _ => None,
                    },
                    None,
                    out,
                ),
                State::Zero => self.num_step(
                    b,
                    |b| match b {
                        b'.' => Some(State::Dot),
                        b'e' | b'E' => Some(State::Exp),
                        _ => None,
                    },
                    Some(Tok::Integer),
                    out,
                ),
                State::NonZero => self.num_step(
                    b,
                    |b| match b {
                        b'0'..=b'9' => Some(State::NonZero),
                        b'.' => Some(State::Dot),
                        b'e' | b'E' => Some(State::Exp),
                        _ => None,
                    },
                    Some(Tok::Integer),
                    out,
                ),
                State::Dot => self.num_step(
                    b,
                    |b| match b {
                        b'0'..=b'9' => Some(State::Frac),
                        _ => None,
                    },
                    None,
                    out,
                ),
                State::Frac => self.num_step(
                    b,
                    |b| match b {
                        b'0'..=b'9' => Some(State::Frac),
                        b'e' | b'E' => Some(State::Exp),
                        _ => None,
                    },
                    Some(Tok::Float),
                    out,
                ),
                State::Exp => self.num_step(
                    b,
                    |b| match b {
                        b'0'..=b'9' => Some(State::ExpDigits),
                        b'+' | b'-' => Some(State::ExpSign),
                        _ => None,
                    },
                    None,
                    out,
                ),
                State::ExpSign => self.num_step(
                    b,
                    |b| match b {
                        b'0'..=b'9' => Some(State::ExpDigits),
                        _ => None,
                    },
                    None,
                    out,
                ),
                State::ExpDigits => self.num_step(
                    b,
                    |b| match b {
                        b'0'..=b'9' => Some(State::ExpDigits),
                        _ => None,
                    },
                    Some(Tok::Float),
                    out,
                ),
                State::Keyword => {
                    if b.is_ascii_lowercase() {
                        self.token.push(b);
                    } else {
                        self.state = State::Start;
                        self.complete(Tok::Keyword, out);
                        again = true;
                    }
                }
            }
        }
    }

    /// One step of the number automaton: `next` gives the following state for `b`;
    /// if there is none, the token ends here when `terminal` is set (and `b` is then
    /// processed again from the start state) or is an error otherwise. Numbers are
    /// terminated by anything that cannot continue them except further digits or
    /// letters, which make the whole token an error (QEMU: "stray '01'").
    fn num_step(
        &mut self,
        b: u8,
        next: impl Fn(u8) -> Option<State>,
        terminal: Option<Tok>,
        out: &mut Vec<StreamItem>,
    ) {
        if let Some(s) = next(b) {
            self.token.push(b);
            self.state = s;
            return;
        }
        match terminal {
            Some(tok) if !b.is_ascii_digit() => {
                self.state = State::Start;
                self.complete(tok, out);
                self.byte(b, out);
            }
            _ => {
                self.token.push(b);
                self.error(out);
            }
        }
    }

    fn single(&mut self, b: u8, tok: Tok, out: &mut Vec<StreamItem>) {
        self.token.push(b);
        self.complete(tok, out);
    }

    fn error(&mut self, out: &mut Vec<StreamItem>) {
        let text = String::from_utf8_lossy(&self.token).into_owned();
        self.token.clear();
        self.state = State::Recovery;
        self.reset_tokens();
        out.push(Err(format!("JSON parse error, stray '{text}'")));
    }

    fn complete(&mut self, tok: Tok, out: &mut Vec<StreamItem>) {
        let text = std::mem::take(&mut self.token);
        match tok {
            Tok::LCurly => self.brace += 1,
            Tok::RCurly => self.brace -= 1,
            Tok::LSquare => self.bracket += 1,
            Tok::RSquare => self.bracket -= 1,
            _ => {}
        }
        let limit = if self.token_size + text.len() + 1 > MAX_TOKEN_SIZE {
            Some("JSON token size limit exceeded")
        } else if self.tokens.len() + 1 > MAX_TOKEN_COUNT {
            Some("JSON token count limit exceeded")
        } else if self.brace + self.bracket > MAX_NESTING as i64 {
            Some("JSON nesting depth limit exceeded")
        } else {
            None
        };
        if let Some(msg) = limit {
            self.reset_tokens();
            out.push(Err(msg.to_string()));
            return;
        }
        self.token_size += text.len();
        self.tokens.push((tok, text));
        if (self.brace > 0 || self.bracket > 0) && self.brace >= 0 && self.bracket >= 0 {
            return;
        }
        let r = parse_tokens(&self.tokens);
        self.reset_tokens();
        out.push(r);
    }
}

/// Parses one complete JSON text (e.g. a command-line option value) with QEMU's rules.
/// Trailing data after the first value is "Expecting at most one JSON value"; no value at
/// all is "Expecting a JSON value".
pub fn parse_one(text: &str) -> Result<Value, String> {
    let mut s = JsonStream::new();
    let mut out = Vec::new();
    s.feed(text.as_bytes(), &mut out);
    s.finish(&mut out);
    let mut it = out.into_iter();
    match (it.next(), it.next()) {
        (None, _) => Err("Expecting a JSON value".into()),
        (Some(Err(e)), _) => Err(e),
        (Some(Ok(_)), Some(_)) => Err("Expecting at most one JSON value".into()),
        (Some(Ok(v)), None) => Ok(v),
    }
}

struct Parser<'a> {
    toks: &'a [(Tok, Vec<u8>)],
    pos: usize,
    err: Option<String>,
}

fn parse_tokens(toks: &[(Tok, Vec<u8>)]) -> Result<Value, String> {
    let mut p = Parser {
        toks,
        pos: 0,
        err: None,
    };
    let v = p.value();
    match (v, p.err) {
        (_, Some(e)) => Err(format!("JSON parse error, {e}")),
        (Some(v), None) => Ok(v),
        (None, None) => Err("JSON parse error, expecting value".into()),
    }
}

impl Parser<'_> {
    fn peek(&self) -> Option<Tok> {
        self.toks.get(self.pos).map(|t| t.0)
    }

    fn pop(&mut self) -> Option<Tok> {
        let t = self.peek();
        if t.is_some() {
            self.pos += 1;
        }
        t
    }

    fn fail(&mut self, msg: impl Into<String>) {
        if self.err.is_none() {
            self.err = Some(msg.into());
        }
    }

    // Recursion depth is bounded by MAX_NESTING, enforced by the streamer.
    fn value(&mut self) -> Option<Value> {
        let Some(tok) = self.peek() else {
            self.fail("premature EOI");
            return None;
        };
        match tok {
            Tok::LCurly => self.object(),
            Tok::LSquare => self.array(),
            Tok::Integer | Tok::Float | Tok::String => self.literal(),
            Tok::Keyword => {
                let text = self.toks[self.pos].1.clone();
                self.pos += 1;
                match &text[..] {
                    b"true" => Some(Value::Bool(true)),
                    b"false" => Some(Value::Bool(false)),
                    b"null" => Some(Value::Null),
                    _ => {
                        self.fail(format!(
                            "invalid keyword '{}'",
                            String::from_utf8_lossy(&text)
                        ));
                        None
                    }
                }
            }
            _ => {
                self.fail("expecting value");
                None
            }
        }
    }

    fn pair(&mut self, map: &mut Map<String, Value>) -> bool {
        if self.peek().is_none() {
            self.fail("premature EOI");
            return false;
        }
        let key = match self.value() {
            Some(Value::String(k)) => k,
            _ => {
                self.fail("key is not a string in object");
                return false;
            }
        };
        match self.pop() {
            None => {
                self.fail("premature EOI");
                return false;
            }
            Some(Tok::Colon) => {}
            Some(_) => {
                self.fail("missing : in object pair");
                return false;
            }
        }
        let Some(v) = self.value() else {
            self.fail("Missing value in dict");
            return false;
        };
        if map.contains_key(&key) {
            self.fail("duplicate key");
            return false;
        }
        map.insert(key, v);
        true
    }

    fn object(&mut self) -> Option<Value> {
        self.pos += 1;
        let mut map = Map::new();
        match self.peek() {
            None => {
                self.fail("premature EOI");
                return None;
            }
            Some(Tok::RCurly) => {
                self.pos += 1;
                return Some(Value::Object(map));
            }
            Some(_) => {}
        }
        if !self.pair(&mut map) {
            return None;
        }
        loop {
            match self.pop() {
                None => {
                    self.fail("premature EOI");
                    return None;
                }
                Some(Tok::RCurly) => return Some(Value::Object(map)),
                Some(Tok::Comma) => {
                    if !self.pair(&mut map) {
                        return None;
                    }
                }
                Some(_) => {
                    self.fail("expected separator in dict");
                    return None;
                }
            }
        }
    }

    fn array(&mut self) -> Option<Value> {
        self.pos += 1;
        let mut list = Vec::new();
        match self.peek() {
            None => {
                self.fail("premature EOI");
                return None;
            }
            Some(Tok::RSquare) => {
                self.pos += 1;
                return Some(Value::Array(list));
            }
            Some(_) => {}
        }
        let Some(v) = self.value() else {
            self.fail("expecting value");
            return None;
        };
        list.push(v);
        loop {
            match self.pop() {
                None => {
                    self.fail("premature EOI");
                    return None;
                }
                Some(Tok::RSquare) => return Some(Value::Array(list)),
                Some(Tok::Comma) => {
                    let Some(v) = self.value() else {
                        self.fail("expecting value");
                        return None;
                    };
                    list.push(v);
                }
                Some(_) => {
                    self.fail("expected separator in list");
                    return None;
                }
            }
        }
    }

    fn literal(&mut self) -> Option<Value> {
        let (tok, text) = &self.toks[self.pos];
        self.pos += 1;
        let text = &text[..];
        match tok {
            Tok::String => match parse_string(text) {
                Ok(s) => Some(Value::String(s)),
                Err(e) => {
                    self.fail(e);
                    None
                }
            },
            Tok::Integer => {
                let s = std::str::from_utf8(text).unwrap_or("0");
                if let Ok(i) = s.parse::<i64>() {
                    Some(Value::Number(i.into()))
                } else if let Ok(u) = s.parse::<u64>() {
                    Some(Value::Number(u.into()))
                } else {
                    Some(float_value(s))
                }
            }
            _ => Some(float_value(std::str::from_utf8(text).unwrap_or("0"))),
        }
    }
}

/// A JSON number from a float literal. Infinity (QEMU prints `inf`, which is not JSON)
/// saturates to the largest finite double.
fn float_value(s: &str) -> Value {
    let f: f64 = s.parse().unwrap_or(0.0);
    let f = if f.is_infinite() {
        f64::MAX.copysign(f)
    } else {
        f
    };
    Number::from_f64(f).map_or(Value::Null, Value::Number)
}

fn hex4(b: &[u8]) -> Option<u32> {
    if b.len() < 4 {
        return None;
    }
    let s = std::str::from_utf8(&b[..4]).ok()?;
    if !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

/// Decodes a string token (including its quotes) like QEMU's `parse_string`.
fn parse_string(tok: &[u8]) -> Result<String, String> {
    let quote = tok[0];
    let body = &tok[1..tok.len() - 1];
    debug_assert_eq!(tok[tok.len() - 1], quote);
    let mut out = String::new();
    let mut i = 0;
    while i < body.len() {
        let c = body[i];
        if c == b'\\' {
            let beg = i;
            i += 1;
            let e = body.get(i).copied().unwrap_or(0);
            i += 1;
            match e {
                b'"' => out.push('"'),
                b'\'' => out.push('\''),
                b'\\' => out.push('\\'),
                b'/' => out.push('/'),
                b'b' => out.push('\u{8}'),
                b'f' => out.push('\u{c}'),
                b'n' => out.push('\n'),
                b'r' => out.push('\r'),
                b't' => out.push('\t'),
                b'u' => {
                    let mut cp = hex4(&body[i.min(body.len())..])
                        .map(i64::from)
                        .unwrap_or(-1);
                    i += 4;
                    if (0xD800..=0xDBFF).contains(&cp)
                        && body.get(i) == Some(&b'\\')
                        && body.get(i + 1) == Some(&b'u')
                    {
                        let lead = cp;
                        cp = -1;
                        if let Some(t) = body.get(i + 2..).and_then(hex4)
                            && (0xDC00..=0xDFFF).contains(&t)
                        {
                            cp = 0x10000 + ((lead & 0x3FF) << 10) + i64::from(t & 0x3FF);
                            i += 6;
                        }
                    }
                    match u32::try_from(cp).ok().and_then(char::from_u32) {
                        Some(ch) => out.push(ch),
                        None => {
                            let end = i.min(body.len());
                            return Err(format!(
                                "{} is not a valid Unicode character",
                                String::from_utf8_lossy(&body[beg..end])
                            ));
                        }
                    }
                }
                _ => return Err("invalid escape sequence in string".into()),
            }
        } else if c < 0x80 {
            out.push(c as char);
            i += 1;
        } else {
            let len = match c {
                0xC2..=0xDF => 2,
                0xE0..=0xEF => 3,
                0xF0..=0xF4 => 4,
                _ => return Err("invalid UTF-8 sequence in string".into()),
            };
            match body
                .get(i..i + len)
                .and_then(|s| std::str::from_utf8(s).ok())
            {
                Some(s) => out.push_str(s),
                None => return Err("invalid UTF-8 sequence in string".into()),
            }
            i += len;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(input: &[u8]) -> Vec<StreamItem> {
        let mut s = JsonStream::new();
        let mut out = Vec::new();
        s.feed(input, &mut out);
        out
    }

    fn errs(input: &str) -> Vec<String> {
        run(input.as_bytes())
            .into_iter()
            .map(|r| match r {
                Ok(v) => format!("OK {v}"),
                Err(e) => e,
            })
            .collect()
    }

    // Expected texts observed from qemu-storage-daemon 10.0.2.
    #[test]
    fn qemu_error_texts() {
        assert_eq!(errs("}"), ["JSON parse error, expecting value"]);
        assert_eq!(errs("]"), ["JSON parse error, expecting value"]);
        assert_eq!(
            errs(r#"{"a" 1}"#),
            ["JSON parse error, missing : in object pair"]
        );
        assert_eq!(errs(r#"{"a":1,}"#), ["JSON parse error, expecting value"]);
        assert_eq!(errs("[1,]"), ["JSON parse error, expecting value"]);
        assert_eq!(errs("@"), ["JSON parse error, stray '@'"]);
        assert_eq!(
            errs(r#"{"a":tru}"#),
            ["JSON parse error, invalid keyword 'tru'"]
        );
        assert_eq!(
            errs("{\"a\":\"abc\x01\"}\n"),
            [
                "JSON parse error, stray '\"abc\u{1}'",
                "JSON parse error, expecting value"
            ]
        );
        assert_eq!(
            errs(r#"{"a":"\u00zz"}"#),
            ["JSON parse error, \\u00zz is not a valid Unicode character"]
        );
        assert_eq!(
            errs(r#"{"a":"\q"}"#),
            ["JSON parse error, invalid escape sequence in string"]
        );
        assert_eq!(
            errs("{1:2}"),
            ["JSON parse error, key is not a string in object"]
        );
        assert_eq!(
            errs(r#"{"a":1 "b":2}"#),
            ["JSON parse error, expected separator in dict"]
        );
        assert_eq!(
            errs(r#"{"a":true,"a":2}"#),
            ["JSON parse error, duplicate key"]
        );
        assert_eq!(
            errs(r#"{"id":0x10}"#),
            ["JSON parse error, expected separator in dict"]
        );
        assert_eq!(
            errs(r#"{"id":01}"#),
            [
                "JSON parse error, stray '01'",
                "JSON parse error, expecting value"
            ]
        );
        assert_eq!(errs(r#"{"id":-}"#), ["JSON parse error, stray '-}'"]);
        assert_eq!(
            errs("{\"execute\":\x01\"q\"}"),
            [
                "JSON parse error, stray '\u{1}'",
                "JSON parse error, expecting value"
            ]
        );
        assert_eq!(
            errs("{\"execute\": @ \"q\"}"),
            [
                "JSON parse error, stray '@'",
                "JSON parse error, expecting value"
            ]
        );
        assert_eq!(
            errs("{\"id\":\"\t\"}"),
            [
                "JSON parse error, stray '\"\t'",
                "JSON parse error, expecting value"
            ]
        );
        assert!(errs(" \t\r\n").is_empty());
    }

    #[test]
    fn values_and_extensions() {
        assert_eq!(errs(r#"{'a':'it\'s'}"#), [r#"OK {"a":"it's"}"#]);
        assert_eq!(errs(r#"{'a':'x"y'}"#), [r#"OK {"a":"x\"y"}"#]);
        assert_eq!(
            errs(r#"{"a":1}{"b":[2]}"#),
            [r#"OK {"a":1}"#, r#"OK {"b":[2]}"#]
        );
        // A number at the end of input waits for its terminator.
        assert!(errs("123").is_empty());
        assert_eq!(errs("123 "), ["OK 123"]);
        assert_eq!(errs("null\"x\""), ["OK null", "OK \"x\""]);
        assert_eq!(errs(r#"["\ud83d\ude00\u00e9"]"#), ["OK [\"😀é\"]"]);
        assert_eq!(
            errs("[1.5e3,-0,18446744073709551615]"),
            ["OK [1500.0,0,18446744073709551615]"]
        );
        assert_eq!(
            errs("[12345678901234567890123]"),
            ["OK [1.2345678901234568e+22]"]
        );
        assert_eq!(errs("[1e400]"), ["OK [1.7976931348623157e+308]"]);
    }

    #[test]
    fn nesting_limit() {
        let mut s = "[".repeat(1100);
        s.push_str(&"]".repeat(1100));
        let out = errs(&s);
        assert_eq!(out[0], "JSON nesting depth limit exceeded");
        assert!(out[1].starts_with("OK [["));
        // The token that crosses the limit is dropped too: 75 brackets remain open.
        assert_eq!(out.len(), 2 + 1100 - 75);
        assert!(
            out[2..]
                .iter()
                .all(|e| e == "JSON parse error, expecting value")
        );
        let ok = format!("{}{}", "[".repeat(1024), "]".repeat(1024));
        assert_eq!(errs(&ok).len(), 1);
        assert!(errs(&ok)[0].starts_with("OK"));
    }

    #[test]
    fn finish_and_parse_one() {
        assert_eq!(parse_one(r#"{"driver":"file"}"#).unwrap()["driver"], "file");
        assert_eq!(
            parse_one(r#"{"driver":"#).unwrap_err(),
            "JSON parse error, premature EOI"
        );
        assert_eq!(
            parse_one(r#"{"driver":"file"}x"#).unwrap_err(),
            "Expecting at most one JSON value"
        );
        assert_eq!(parse_one("12").unwrap(), 12);
    }

    #[test]
    fn invalid_utf8() {
        assert_eq!(
            run(b"[\"\xff\"]"),
            vec![
                Err("JSON parse error, stray '\"\u{fffd}'".to_string()),
                Err("JSON parse error, expecting value".to_string())
            ]
        );
        assert_eq!(
            run(b"[\"\xc3\"]"),
            vec![Err(
                "JSON parse error, invalid UTF-8 sequence in string".to_string()
            )]
        );
    }

    proptest::proptest! {
        #[test]
        fn never_panics(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let mut s = JsonStream::new();
            let mut out = Vec::new();
            s.feed(&data, &mut out);
            s.finish(&mut out);
        }

        #[test]
        fn never_panics_jsonish(data in "[\\[\\]{}:,\"'\\\\a-z0-9.eE+\\- \\x01]{0,200}") {
            let mut s = JsonStream::new();
            let mut out = Vec::new();
            s.feed(data.as_bytes(), &mut out);
            s.finish(&mut out);
        }
    }
}
