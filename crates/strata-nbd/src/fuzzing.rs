//! Entry points shared by the fuzz target (`/fuzz`, `nbd_server`) and the corpus replay
//! test: arbitrary client bytes go through the real server connection code (handshake, then
//! the request loop), which must answer or disconnect, never panic or hang.

use std::sync::Arc;
use std::time::Duration;

use strata_core::NodeRef;
use strata_core::mem::MemNode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::proto::{self, MetaContextRequest, Request};
use crate::server::{self, DirtySource, ExportConfig, ServerOptions};

/// The export every session can reach.
pub const EXPORT: &str = "exp";
/// Its size.
pub const EXPORT_SIZE: usize = 1 << 20;

/// A fixed bitmap (every other 64 KiB dirty), so `qemu:dirty-bitmap:b0` exists.
struct StripedBitmap;

impl DirtySource for StripedBitmap {
    fn dirty_extents(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
        const GRAN: u64 = 65536;
        let end = offset.saturating_add(len);
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let next = (pos / GRAN + 1).saturating_mul(GRAN).min(end);
            out.push((next - pos, (pos / GRAN) % 2 == 1));
            pos = next;
        }
        out
    }
}

/// How the client bytes begin (byte 0 of the input, modulo 4): nothing added, or a valid
/// handshake prefix so the fuzzer reaches the transmission phase at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefix {
    /// The input is the whole client stream.
    Raw,
    /// Flags, `NBD_OPT_EXPORT_NAME` (old simple replies).
    ExportName,
    /// Flags, structured replies, meta contexts, `NBD_OPT_GO`.
    Structured,
    /// Flags, extended headers, meta contexts, `NBD_OPT_GO`.
    Extended,
}

impl Prefix {
    /// The prefix byte 0 of an input picks.
    pub fn from_byte(b: u8) -> Prefix {
        match b % 4 {
            0 => Prefix::Raw,
            1 => Prefix::ExportName,
            2 => Prefix::Structured,
            _ => Prefix::Extended,
        }
    }

    fn byte(self) -> u8 {
        match self {
            Prefix::Raw => 0,
            Prefix::ExportName => 1,
            Prefix::Structured => 2,
            Prefix::Extended => 3,
        }
    }

    /// The client bytes of this handshake prefix.
    pub fn bytes(self) -> Vec<u8> {
        let mut out = Vec::new();
        if self == Prefix::Raw {
            return out;
        }
        let flags = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;
        out.extend_from_slice(&flags.to_be_bytes());
        if self == Prefix::ExportName {
            out.extend(proto::encode_option(
                proto::OPT_EXPORT_NAME,
                EXPORT.as_bytes(),
            ));
            return out;
        }
        let header_opt = if self == Prefix::Extended {
            proto::OPT_EXTENDED_HEADERS
        } else {
            proto::OPT_STRUCTURED_REPLY
        };
        out.extend(proto::encode_option(header_opt, &[]));
        let meta = proto::encode_meta_context_request(&MetaContextRequest {
            export: EXPORT.into(),
            queries: vec![
                "base:allocation".into(),
                "qemu:dirty-bitmap:b0".into(),
                "qemu:allocation-depth".into(),
            ],
        });
        out.extend(proto::encode_option(proto::OPT_SET_META_CONTEXT, &meta));
        out.extend(proto::encode_option(proto::OPT_GO, &go_data()));
        out
    }
}

/// `NBD_OPT_GO` data for [`EXPORT`], asking for the block-size info.
fn go_data() -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(EXPORT.len() as u32).to_be_bytes());
    d.extend_from_slice(EXPORT.as_bytes());
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
    d
}

/// Runs one server connection on `data`: byte 0 picks the [`Prefix`], byte 1 the size of
/// the writes the client bytes are fed in (1..=256, so partial reads are exercised); the rest
/// is the client's traffic, after which the client closes its side. Panics if the session
/// does not end within 10 s or if the server breaks the greeting invariant.
pub fn server_session(data: &[u8]) {
    let _ = session_output(data);
}

/// [`server_session`], returning every byte the server sent.
pub fn session_output(data: &[u8]) -> Vec<u8> {
    let [prefix, chunk, rest @ ..] = data else {
        return Vec::new();
    };
    let mut client_bytes = Prefix::from_byte(*prefix).bytes();
    client_bytes.extend_from_slice(rest);
    let chunk = usize::from(*chunk) + 1;

    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return Vec::new();
    };
    let out = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), run(client_bytes, chunk)).await
    });
    let Ok(out) = out else {
        panic!("NBD server session did not end within 10 s");
    };
    // The server speaks first, whatever the client sends: the newstyle greeting.
    assert!(
        out.len() >= proto::GREETING_LEN,
        "no greeting: {} bytes",
        out.len()
    );
    assert!(
        proto::decode_greeting(&out[..proto::GREETING_LEN]).is_ok(),
        "bad greeting"
    );
    check_reply_framing(&out);
    out
}

/// The server's framing after the greeting: every option reply carries the option-reply
/// magic up to the `NBD_OPT_GO` acknowledgement; after it, once structured replies or
/// extended headers were agreed, every reply carries the magic its kind allows (no simple or
/// structured reply with extended headers, no extended one without) and its stated length.
/// A wrong magic means the server lost track of its own stream. Not walked: a stream after
/// `NBD_OPT_EXPORT_NAME` (its answer has no magic) or with simple replies only (a read's
/// payload length is not in its reply). A stream may end mid-reply (the client closed).
fn check_reply_framing(out: &[u8]) {
    let be32 = |at: usize| u32::from_be_bytes(out[at..at + 4].try_into().expect("4 bytes"));
    let be64 = |at: usize| u64::from_be_bytes(out[at..at + 8].try_into().expect("8 bytes"));
    let mut pos = proto::GREETING_LEN;
    let (mut structured, mut extended) = (false, false);
    loop {
        if pos + 20 > out.len() || be64(pos) != proto::REP_MAGIC {
            return;
        }
        let (opt, kind) = (be32(pos + 8), be32(pos + 12));
        pos += 20 + be32(pos + 16) as usize;
        if kind == proto::REP_ACK {
            match opt {
                proto::OPT_STRUCTURED_REPLY => structured = true,
                proto::OPT_EXTENDED_HEADERS => extended = true,
                proto::OPT_GO => break,
                _ => {}
            }
        }
    }
    if !(structured || extended) {
        return;
    }
    while pos + 4 <= out.len() {
        pos = match be32(pos) {
            proto::SIMPLE_REPLY_MAGIC if !extended => pos + 16,
            proto::STRUCTURED_REPLY_MAGIC if !extended => {
                if pos + 20 > out.len() {
                    return;
                }
                pos + 20 + be32(pos + 16) as usize
            }
            proto::EXTENDED_REPLY_MAGIC if extended => {
                if pos + 32 > out.len() {
                    return;
                }
                pos.saturating_add(32)
                    .saturating_add(usize::try_from(be64(pos + 24)).unwrap_or(usize::MAX))
            }
            m => panic!(
                "reply at byte {pos} has magic {m:#x} (structured {structured}, extended {extended})"
            ),
        };
    }
}

/// Feeds `client_bytes` in `chunk`-sized writes, closes, and returns all the server sent.
async fn run(client_bytes: Vec<u8>, chunk: usize) -> Vec<u8> {
    let mem: NodeRef = Arc::new(MemNode::with_data(vec![0; EXPORT_SIZE]));
    let cfg = ExportConfig {
        name: EXPORT.into(),
        description: Some("fuzz export".into()),
        node: mem,
        writable: true,
        bitmaps: vec![("b0".into(), Arc::new(StripedBitmap) as Arc<dyn DirtySource>)],
        allocation_depth: true,
        multi_conn: true,
    };
    let (client, server_end) = tokio::io::duplex(64 * 1024);
    let (mut crd, mut cwr) = tokio::io::split(client);
    let server = tokio::spawn(server::serve_detached(
        Box::new(server_end),
        vec![cfg],
        // No handshake time limit: the client always closes, so a handshake that outlives
        // that is a hang this session's own timeout must report, not one to hide.
        ServerOptions {
            handshake_max_seconds: 0,
            ..ServerOptions::default()
        },
    ));
    // Write and read concurrently: a server blocked on a full pipe must not stall the feed.
    let feed = async move {
        for c in client_bytes.chunks(chunk) {
            if cwr.write_all(c).await.is_err() {
                break;
            }
        }
        let _ = cwr.shutdown().await;
        cwr
    };
    let drain = async move {
        let mut out = Vec::new();
        let _ = crd.read_to_end(&mut out).await;
        out
    };
    let (_cwr, out) = tokio::join!(feed, drain);
    let _ = server.await;
    out
}

/// Seed sessions for the corpus: `(file name, input)`, each a valid session (input layout
/// as [`server_session`] reads it).
pub fn seed_sessions() -> Vec<(String, Vec<u8>)> {
    let mut seeds = Vec::new();
    let req = |kind: u16, flags: u16, offset: u64, len: u64, ext: bool| {
        proto::encode_request(
            &Request {
                flags,
                kind,
                cookie: 0x1000 + u64::from(kind),
                offset,
                len,
            },
            ext,
        )
        .unwrap_or_default()
    };
    for prefix in [Prefix::ExportName, Prefix::Structured, Prefix::Extended] {
        let ext = prefix == Prefix::Extended;
        let disc = req(proto::CMD_DISC, 0, 0, 0, ext);
        let mut cmds: Vec<(&str, Vec<u8>)> = vec![
            ("read", req(proto::CMD_READ, 0, 4096, 8192, ext)),
            ("write", {
                let mut w = req(proto::CMD_WRITE, proto::CMD_FLAG_FUA, 65536, 512, ext);
                w.extend(std::iter::repeat_n(0xa5, 512));
                w
            }),
            (
                "write_zeroes",
                req(proto::CMD_WRITE_ZEROES, 0, 0, 131072, ext),
            ),
            ("trim", req(proto::CMD_TRIM, 0, 0, 65536, ext)),
            ("flush", req(proto::CMD_FLUSH, 0, 0, 0, ext)),
            ("cache", req(proto::CMD_CACHE, 0, 0, 65536, ext)),
            (
                "block_status",
                req(proto::CMD_BLOCK_STATUS, 0, 0, EXPORT_SIZE as u64, ext),
            ),
            (
                "read_oob",
                req(proto::CMD_READ, 0, EXPORT_SIZE as u64 - 512, 4096, ext),
            ),
        ];
        if ext {
            let mut bs = req(
                proto::CMD_BLOCK_STATUS,
                proto::CMD_FLAG_PAYLOAD_LEN,
                0,
                8 + 4,
                ext,
            );
            bs.extend(proto::encode_block_status_payload(EXPORT_SIZE as u64, &[1]));
            cmds.push(("block_status_payload", bs));
        }
        let name = match prefix {
            Prefix::ExportName => "simple",
            Prefix::Structured => "structured",
            _ => "extended",
        };
        for (cmd, bytes) in cmds {
            let mut input = vec![prefix.byte(), 255];
            input.extend(bytes);
            input.extend(&disc);
            seeds.push((format!("{name}_{cmd}"), input));
        }
    }
    // Handshake-only sessions (raw prefix), one per option kind, then abort.
    let flags = (proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes();
    let meta = proto::encode_meta_context_request(&MetaContextRequest {
        export: EXPORT.into(),
        queries: vec!["qemu:".into()],
    });
    let options: Vec<(&str, u32, Vec<u8>)> = vec![
        ("list", proto::OPT_LIST, vec![]),
        ("info", proto::OPT_INFO, go_data()),
        ("list_meta", proto::OPT_LIST_META_CONTEXT, meta),
        ("starttls", proto::OPT_STARTTLS, vec![]),
        ("unknown", 0x55, b"junk".to_vec()),
    ];
    for (name, opt, data) in options {
        let mut input = vec![Prefix::Raw.byte(), 7];
        input.extend_from_slice(&flags);
        input.extend(proto::encode_option(opt, &data));
        input.extend(proto::encode_option(proto::OPT_ABORT, &[]));
        seeds.push((format!("opt_{name}"), input));
    }
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Greeting, structured replies and `NBD_OPT_GO` acknowledged, one simple reply, then
    /// four bytes of the reply that follows.
    fn stream(next_magic: u32) -> Vec<u8> {
        let mut out = proto::encode_greeting(proto::FLAG_FIXED_NEWSTYLE).to_vec();
        out.extend(proto::encode_option_reply(
            proto::OPT_STRUCTURED_REPLY,
            proto::REP_ACK,
            &[],
        ));
        out.extend(proto::encode_option_reply(
            proto::OPT_GO,
            proto::REP_ACK,
            &[],
        ));
        out.extend(proto::encode_simple_reply(7, 0));
        out.extend(next_magic.to_be_bytes());
        out
    }

    #[test]
    fn framing_check_walks_the_replies() {
        check_reply_framing(&stream(proto::STRUCTURED_REPLY_MAGIC));
    }

    #[test]
    #[should_panic(expected = "has magic 0x12345678")]
    fn framing_check_catches_a_bad_magic() {
        check_reply_framing(&stream(0x1234_5678));
    }

    #[test]
    #[should_panic(expected = "has magic 0x6e8a278c")]
    fn framing_check_catches_an_extended_reply_without_extended_headers() {
        check_reply_framing(&stream(proto::EXTENDED_REPLY_MAGIC));
    }
}
