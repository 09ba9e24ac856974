//! The NBD wire format: constants and a codec for the fixed newstyle handshake, options and
//! their replies, requests (compact and extended) and replies (simple, structured and
//! extended).
//!
//! Everything here is a pure function on byte buffers: no I/O, no allocation beyond the
//! returned values. Decoders take untrusted input and return [`ProtoError`] on anything
//! malformed; they never panic (the fuzz-style tests feed them random bytes).

use thiserror::Error;

// ---- magics ---------------------------------------------------------------------------------

/// `NBDMAGIC`, first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation, also the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of an option reply.
pub const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a compact request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of an extended request.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of an extended reply chunk.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// ---- handshake flags ------------------------------------------------------------------------

/// Server handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: the 124 zero bytes after `NBD_OPT_EXPORT_NAME` may be omitted.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---- options --------------------------------------------------------------------------------

/// Choose an export and enter transmission (no option reply).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Abort negotiation.
pub const OPT_ABORT: u32 = 2;
/// List exports.
pub const OPT_LIST: u32 = 3;
/// Upgrade to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Describe an export.
pub const OPT_INFO: u32 = 6;
/// Describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Use extended headers (64-bit lengths).
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply: done.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of `NBD_OPT_LIST`.
pub const REP_SERVER: u32 = 2;
/// Option reply: one information item of `NBD_OPT_INFO`/`GO`.
pub const REP_INFO: u32 = 3;
/// Option reply: one metadata context.
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
/// Option unknown to the server.
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
/// Forbidden by policy.
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
/// Syntactically or semantically invalid.
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
/// Not supported on this platform.
pub const REP_ERR_PLATFORM: u32 = REP_ERR | 4;
/// TLS required first.
pub const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;
/// Export unknown.
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
/// Server shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
/// Client must ask for block sizes.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR | 8;
/// Option payload too big.
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;
/// Extended headers required.
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_ERR | 10;

/// Whether an option reply type is an error.
pub fn rep_is_err(rep: u32) -> bool {
    rep & REP_ERR != 0
}

/// Info item: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Info item: canonical name.
pub const INFO_NAME: u16 = 1;
/// Info item: description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Info item: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---- transmission flags ---------------------------------------------------------------------

/// Always set.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// The export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// `NBD_CMD_FLUSH` supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_CMD_FLAG_FUA` supported.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// Rotational media.
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
/// `NBD_CMD_TRIM` supported.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// `NBD_CMD_WRITE_ZEROES` supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_CMD_FLAG_DF` supported.
pub const TFLAG_SEND_DF: u16 = 1 << 7;
/// Several connections see one consistent export.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// `NBD_CMD_RESIZE` supported.
pub const TFLAG_SEND_RESIZE: u16 = 1 << 9;
/// `NBD_CMD_CACHE` supported.
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
/// `NBD_CMD_FLAG_FAST_ZERO` supported.
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;
/// `NBD_CMD_FLAG_PAYLOAD_LEN` on block status supported.
pub const TFLAG_BLOCK_STAT_PAYLOAD: u16 = 1 << 12;

// ---- commands -------------------------------------------------------------------------------

/// Read.
pub const CMD_READ: u16 = 0;
/// Write.
pub const CMD_WRITE: u16 = 1;
/// Disconnect.
pub const CMD_DISC: u16 = 2;
/// Flush.
pub const CMD_FLUSH: u16 = 3;
/// Trim (discard).
pub const CMD_TRIM: u16 = 4;
/// Prefetch.
pub const CMD_CACHE: u16 = 5;
/// Write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Block status.
pub const CMD_BLOCK_STATUS: u16 = 7;
/// Resize.
pub const CMD_RESIZE: u16 = 8;

/// Force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Write zeroes must not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Read reply must not be fragmented.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Block status: one extent per context.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Write zeroes must fail fast rather than write.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Extended header: length is a payload length.
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// Reply flag: last chunk.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk without payload.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Data chunk.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Hole chunk.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Block status chunk (32-bit descriptors).
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Block status chunk (64-bit descriptors).
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// Error chunk.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
/// Error chunk with an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

/// Whether a chunk type is an error.
pub fn reply_type_is_err(t: u16) -> bool {
    t & (1 << 15) != 0
}

// ---- errors and metadata --------------------------------------------------------------------

/// NBD errno values (the protocol's, which match Linux's).
pub mod errno {
    /// Operation not permitted.
    pub const EPERM: u32 = 1;
    /// I/O error.
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space.
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Not supported.
    pub const ENOTSUP: u32 = 95;
    /// Server shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// Map a host errno to the NBD errno a server sends (QEMU's `system_errno_to_nbd_errno`).
pub fn to_nbd_errno(e: i32) -> u32 {
    match e {
        0 => 0,
        libc::EPERM | libc::EROFS => errno::EPERM,
        libc::EIO => errno::EIO,
        libc::ENOMEM => errno::ENOMEM,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => errno::ENOSPC,
        libc::EOVERFLOW => errno::EOVERFLOW,
        libc::ENOTSUP => errno::ENOTSUP,
        libc::ESHUTDOWN => errno::ESHUTDOWN,
        _ => errno::EINVAL,
    }
}

/// Map an NBD errno from a reply to a host errno (unknown values become `EINVAL`, as the
/// protocol asks).
pub fn from_nbd_errno(e: u32) -> i32 {
    match e {
        errno::EPERM => libc::EPERM,
        errno::EIO => libc::EIO,
        errno::ENOMEM => libc::ENOMEM,
        errno::ENOSPC => libc::ENOSPC,
        errno::EOVERFLOW => libc::EOVERFLOW,
        errno::ENOTSUP => libc::ENOTSUP,
        errno::ESHUTDOWN => libc::ESHUTDOWN,
        _ => libc::EINVAL,
    }
}

/// `base:allocation`: the extent is a hole.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation`: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:*`: the extent is dirty.
pub const STATE_DIRTY: u32 = 1 << 0;

/// The standard allocation context.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
/// QEMU's allocation-depth context.
pub const CONTEXT_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";
/// Prefix of QEMU's dirty-bitmap contexts.
pub const CONTEXT_DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

/// Longest string (export name, description, context name) we accept or send.
pub const MAX_STRING: usize = 4096;
/// Largest read/write payload, as QEMU advertises (`NBD_MAX_BUFFER_SIZE`).
pub const MAX_BUFFER: u32 = 32 << 20;
/// Size of the zero padding after an `NBD_OPT_EXPORT_NAME` reply.
pub const EXPORT_NAME_PADDING: usize = 124;

/// Sizes of fixed-length messages.
pub const GREETING_LEN: usize = 18;
/// Option request header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Option reply header (magic, option, type, length).
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Compact request.
pub const REQUEST_LEN: usize = 28;
/// Extended request.
pub const EXTENDED_REQUEST_LEN: usize = 32;
/// Simple reply.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Structured reply chunk header.
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// Extended reply chunk header.
pub const EXTENDED_REPLY_LEN: usize = 32;

// ---- errors ---------------------------------------------------------------------------------

/// A malformed message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtoError {
    /// The buffer is shorter than the message.
    #[error("message truncated: need {need} bytes, have {have}")]
    Short {
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// A magic number is wrong.
    #[error("invalid magic {0:#x}")]
    BadMagic(u64),
    /// A field is out of range or inconsistent.
    #[error("{0}")]
    Invalid(&'static str),
}

/// Result of the codec.
pub type ProtoResult<T> = std::result::Result<T, ProtoError>;

// ---- a tiny cursor --------------------------------------------------------------------------

/// Reads big-endian fields from untrusted bytes.
#[derive(Debug)]
pub struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    /// A cursor at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> ProtoResult<&'a [u8]> {
        if self.remaining() < n {
            return Err(ProtoError::Short {
                need: self.pos.saturating_add(n),
                have: self.buf.len(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }

    fn array<const N: usize>(&mut self) -> ProtoResult<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    /// A big-endian u16.
    pub fn u16(&mut self) -> ProtoResult<u16> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    /// A big-endian u32.
    pub fn u32(&mut self) -> ProtoResult<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    /// A big-endian u64.
    pub fn u64(&mut self) -> ProtoResult<u64> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A string of `len` bytes, UTF-8, at most [`MAX_STRING`].
    pub fn string(&mut self, len: usize) -> ProtoResult<String> {
        if len > MAX_STRING {
            return Err(ProtoError::Invalid("string too long"));
        }
        let b = self.bytes(len)?;
        String::from_utf8(b.to_vec()).map_err(|_| ProtoError::Invalid("string is not UTF-8"))
    }

    /// A string prefixed by a 32-bit length.
    pub fn string32(&mut self) -> ProtoResult<String> {
        let len = self.u32()? as usize;
        self.string(len)
    }

    /// Fail unless every byte was consumed.
    pub fn finish(&self) -> ProtoResult<()> {
        if self.remaining() == 0 {
            Ok(())
        } else {
            Err(ProtoError::Invalid("trailing bytes"))
        }
    }
}

fn put_str32(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

// ---- handshake ------------------------------------------------------------------------------

/// The server's greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn encode_greeting(flags: u16) -> [u8; GREETING_LEN] {
    let mut b = [0u8; GREETING_LEN];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&flags.to_be_bytes());
    b
}

/// Parse the server's greeting; returns the handshake flags. Oldstyle servers are refused.
pub fn decode_greeting(b: &[u8]) -> ProtoResult<u16> {
    let mut c = Cursor::new(b);
    let m = c.u64()?;
    if m != NBDMAGIC {
        return Err(ProtoError::BadMagic(m));
    }
    let m = c.u64()?;
    if m != IHAVEOPT {
        return Err(ProtoError::BadMagic(m));
    }
    c.u16()
}

/// An option request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// `NBD_OPT_*`.
    pub option: u32,
    /// Length of the data that follows.
    pub len: u32,
}

/// Parse an option request header.
pub fn decode_option_header(b: &[u8]) -> ProtoResult<OptionHeader> {
    let mut c = Cursor::new(b);
    let m = c.u64()?;
    if m != IHAVEOPT {
        return Err(ProtoError::BadMagic(m));
    }
    Ok(OptionHeader {
        option: c.u32()?,
        len: c.u32()?,
    })
}

/// An option request with its data.
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(OPTION_HEADER_LEN + data.len());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// An option reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option replied to.
    pub option: u32,
    /// `NBD_REP_*`.
    pub reply: u32,
    /// Length of the data that follows.
    pub len: u32,
}

/// An option reply with its data.
pub fn encode_option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(OPTION_REPLY_HEADER_LEN + data.len());
    out.extend_from_slice(&REP_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// Parse an option reply header.
pub fn decode_option_reply_header(b: &[u8]) -> ProtoResult<OptionReplyHeader> {
    let mut c = Cursor::new(b);
    let m = c.u64()?;
    if m != REP_MAGIC {
        return Err(ProtoError::BadMagic(m));
    }
    Ok(OptionReplyHeader {
        option: c.u32()?,
        reply: c.u32()?,
        len: c.u32()?,
    })
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name.
    pub name: String,
    /// `NBD_INFO_*` items asked for.
    pub items: Vec<u16>,
}

/// Parse the data of `NBD_OPT_INFO`/`GO`.
pub fn decode_info_request(b: &[u8]) -> ProtoResult<InfoRequest> {
    let mut c = Cursor::new(b);
    let name = c.string32()?;
    let n = c.u16()? as usize;
    if c.remaining() != n * 2 {
        return Err(ProtoError::Invalid("bad info request count"));
    }
    let mut items = Vec::with_capacity(n);
    for _ in 0..n {
        items.push(c.u16()?);
    }
    Ok(InfoRequest { name, items })
}

/// Build the data of `NBD_OPT_INFO`/`GO`.
pub fn encode_info_request(r: &InfoRequest) -> Vec<u8> {
    let mut out = Vec::new();
    put_str32(&mut out, &r.name);
    out.extend_from_slice(&(r.items.len() as u16).to_be_bytes());
    for i in &r.items {
        out.extend_from_slice(&i.to_be_bytes());
    }
    out
}

/// One `NBD_REP_INFO` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    /// `NBD_INFO_EXPORT`.
    Export {
        /// Export size.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// `NBD_INFO_NAME`.
    Name(String),
    /// `NBD_INFO_DESCRIPTION`.
    Description(String),
    /// `NBD_INFO_BLOCK_SIZE`.
    BlockSize {
        /// Minimum block size.
        min: u32,
        /// Preferred block size.
        preferred: u32,
        /// Maximum payload size.
        max: u32,
    },
    /// An item we do not know.
    Unknown(u16),
}

/// The data of an `NBD_REP_INFO` reply.
pub fn encode_info(i: &Info) -> Vec<u8> {
    let mut out = Vec::new();
    match i {
        Info::Export { size, flags } => {
            out.extend_from_slice(&INFO_EXPORT.to_be_bytes());
            out.extend_from_slice(&size.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
        }
        Info::Name(s) => {
            out.extend_from_slice(&INFO_NAME.to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        Info::Description(s) => {
            out.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        Info::BlockSize {
            min,
            preferred,
            max,
        } => {
            out.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
            out.extend_from_slice(&min.to_be_bytes());
            out.extend_from_slice(&preferred.to_be_bytes());
            out.extend_from_slice(&max.to_be_bytes());
        }
        Info::Unknown(t) => out.extend_from_slice(&t.to_be_bytes()),
    }
    out
}

/// Parse the data of an `NBD_REP_INFO` reply.
pub fn decode_info(b: &[u8]) -> ProtoResult<Info> {
    let mut c = Cursor::new(b);
    let t = c.u16()?;
    let i = match t {
        INFO_EXPORT => Info::Export {
            size: c.u64()?,
            flags: c.u16()?,
        },
        INFO_NAME => {
            let n = c.remaining();
            Info::Name(c.string(n)?)
        }
        INFO_DESCRIPTION => {
            let n = c.remaining();
            Info::Description(c.string(n)?)
        }
        INFO_BLOCK_SIZE => Info::BlockSize {
            min: c.u32()?,
            preferred: c.u32()?,
            max: c.u32()?,
        },
        t => {
            c.rest();
            Info::Unknown(t)
        }
    };
    c.finish()?;
    Ok(i)
}

/// The data of an `NBD_REP_SERVER` reply (`NBD_OPT_LIST`).
pub fn encode_rep_server(name: &str, description: Option<&str>) -> Vec<u8> {
    let mut out = Vec::new();
    put_str32(&mut out, name);
    if let Some(d) = description {
        out.extend_from_slice(d.as_bytes());
    }
    out
}

/// Parse an `NBD_REP_SERVER` reply: name and (possibly empty) description.
pub fn decode_rep_server(b: &[u8]) -> ProtoResult<(String, String)> {
    let mut c = Cursor::new(b);
    let name = c.string32()?;
    let n = c.remaining();
    let desc = c.string(n)?;
    Ok((name, desc))
}

/// The data of `NBD_OPT_LIST_META_CONTEXT`/`SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// Export name.
    pub export: String,
    /// Queries (context names or namespace prefixes).
    pub queries: Vec<String>,
}

/// Parse the data of a meta-context option.
pub fn decode_meta_context_request(b: &[u8]) -> ProtoResult<MetaContextRequest> {
    let mut c = Cursor::new(b);
    let export = c.string32()?;
    let n = c.u32()? as usize;
    // Each query takes at least its 4-byte length.
    if n > c.remaining() / 4 {
        return Err(ProtoError::Invalid("bad meta context query count"));
    }
    let mut queries = Vec::with_capacity(n);
    for _ in 0..n {
        queries.push(c.string32()?);
    }
    c.finish()?;
    Ok(MetaContextRequest { export, queries })
}

/// Build the data of a meta-context option.
pub fn encode_meta_context_request(r: &MetaContextRequest) -> Vec<u8> {
    let mut out = Vec::new();
    put_str32(&mut out, &r.export);
    out.extend_from_slice(&(r.queries.len() as u32).to_be_bytes());
    for q in &r.queries {
        put_str32(&mut out, q);
    }
    out
}

/// The data of an `NBD_REP_META_CONTEXT` reply.
pub fn encode_rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out
}

/// Parse an `NBD_REP_META_CONTEXT` reply.
pub fn decode_rep_meta_context(b: &[u8]) -> ProtoResult<(u32, String)> {
    let mut c = Cursor::new(b);
    let id = c.u32()?;
    let n = c.remaining();
    Ok((id, c.string(n)?))
}

/// The server's answer to `NBD_OPT_EXPORT_NAME`: size, flags and (unless `no_zeroes`) padding.
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + EXPORT_NAME_PADDING);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.resize(10 + EXPORT_NAME_PADDING, 0);
    }
    out
}

// ---- requests -------------------------------------------------------------------------------

/// A transmission request (either header style).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// `NBD_CMD_FLAG_*`.
    pub flags: u16,
    /// `NBD_CMD_*`.
    pub kind: u16,
    /// Opaque cookie echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Length (32 bits unless extended headers are in use).
    pub len: u64,
}

/// Length of a request header in the given style.
pub fn request_len(extended: bool) -> usize {
    if extended {
        EXTENDED_REQUEST_LEN
    } else {
        REQUEST_LEN
    }
}

/// Encode a request header. Fails if `len` needs extended headers and they are not in use.
pub fn encode_request(r: &Request, extended: bool) -> ProtoResult<Vec<u8>> {
    let mut out = Vec::with_capacity(request_len(extended));
    let magic = if extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    out.extend_from_slice(&magic.to_be_bytes());
    out.extend_from_slice(&r.flags.to_be_bytes());
    out.extend_from_slice(&r.kind.to_be_bytes());
    out.extend_from_slice(&r.cookie.to_be_bytes());
    out.extend_from_slice(&r.offset.to_be_bytes());
    if extended {
        out.extend_from_slice(&r.len.to_be_bytes());
    } else {
        let len = u32::try_from(r.len).map_err(|_| ProtoError::Invalid("length over 32 bits"))?;
        out.extend_from_slice(&len.to_be_bytes());
    }
    Ok(out)
}

/// Parse a request header of the negotiated style (a wrong magic is an error: the client
/// must use the style that was negotiated).
pub fn decode_request(b: &[u8], extended: bool) -> ProtoResult<Request> {
    let mut c = Cursor::new(b);
    let magic = c.u32()?;
    let want = if extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    if magic != want {
        return Err(ProtoError::BadMagic(magic.into()));
    }
    let flags = c.u16()?;
    let kind = c.u16()?;
    let cookie = c.u64()?;
    let offset = c.u64()?;
    let len = if extended { c.u64()? } else { c.u32()?.into() };
    Ok(Request {
        flags,
        kind,
        cookie,
        offset,
        len,
    })
}

// ---- replies --------------------------------------------------------------------------------

/// A simple reply header.
pub fn encode_simple_reply(cookie: u64, error: u32) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// The header of a structured or extended reply chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// `NBD_REPLY_FLAG_*`.
    pub flags: u16,
    /// `NBD_REPLY_TYPE_*`.
    pub kind: u16,
    /// The request's cookie.
    pub cookie: u64,
    /// The request's offset (extended headers only; 0 in structured chunks).
    pub offset: u64,
    /// Payload length.
    pub len: u64,
}

/// Encode a chunk header (structured, or extended if `extended`).
pub fn encode_chunk_header(h: &ChunkHeader, extended: bool) -> ProtoResult<Vec<u8>> {
    let mut out = Vec::with_capacity(EXTENDED_REPLY_LEN);
    let magic = if extended {
        EXTENDED_REPLY_MAGIC
    } else {
        STRUCTURED_REPLY_MAGIC
    };
    out.extend_from_slice(&magic.to_be_bytes());
    out.extend_from_slice(&h.flags.to_be_bytes());
    out.extend_from_slice(&h.kind.to_be_bytes());
    out.extend_from_slice(&h.cookie.to_be_bytes());
    if extended {
        out.extend_from_slice(&h.offset.to_be_bytes());
        out.extend_from_slice(&h.len.to_be_bytes());
    } else {
        let len =
            u32::try_from(h.len).map_err(|_| ProtoError::Invalid("chunk length over 32 bits"))?;
        out.extend_from_slice(&len.to_be_bytes());
    }
    Ok(out)
}

/// A reply header of any style.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply (a read's data follows when `error` is 0).
    Simple {
        /// NBD errno.
        error: u32,
        /// The request's cookie.
        cookie: u64,
    },
    /// A structured or extended chunk (`len` bytes of payload follow).
    Chunk(ChunkHeader),
}

/// The length of the reply header that starts with `magic` (so a reader knows how much more
/// to read after the first 4 bytes).
pub fn reply_header_len(magic: u32) -> ProtoResult<usize> {
    match magic {
        SIMPLE_REPLY_MAGIC => Ok(SIMPLE_REPLY_LEN),
        STRUCTURED_REPLY_MAGIC => Ok(STRUCTURED_REPLY_LEN),
        EXTENDED_REPLY_MAGIC => Ok(EXTENDED_REPLY_LEN),
        m => Err(ProtoError::BadMagic(m.into())),
    }
}

/// Parse a complete reply header.
pub fn decode_reply_header(b: &[u8]) -> ProtoResult<ReplyHeader> {
    let mut c = Cursor::new(b);
    let magic = c.u32()?;
    match magic {
        SIMPLE_REPLY_MAGIC => {
            let error = c.u32()?;
            let cookie = c.u64()?;
            Ok(ReplyHeader::Simple { error, cookie })
        }
        STRUCTURED_REPLY_MAGIC | EXTENDED_REPLY_MAGIC => {
            let flags = c.u16()?;
            let kind = c.u16()?;
            let cookie = c.u64()?;
            let (offset, len) = if magic == EXTENDED_REPLY_MAGIC {
                (c.u64()?, c.u64()?)
            } else {
                (0, c.u32()?.into())
            };
            Ok(ReplyHeader::Chunk(ChunkHeader {
                flags,
                kind,
                cookie,
                offset,
                len,
            }))
        }
        m => Err(ProtoError::BadMagic(m.into())),
    }
}

/// The payload of an `NBD_REPLY_TYPE_OFFSET_HOLE` chunk.
pub fn encode_hole(offset: u64, len: u32) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..8].copy_from_slice(&offset.to_be_bytes());
    b[8..12].copy_from_slice(&len.to_be_bytes());
    b
}

/// Parse an `NBD_REPLY_TYPE_OFFSET_HOLE` payload.
pub fn decode_hole(b: &[u8]) -> ProtoResult<(u64, u32)> {
    let mut c = Cursor::new(b);
    let r = (c.u64()?, c.u32()?);
    c.finish()?;
    Ok(r)
}

/// The payload of an error chunk (`offset` makes it `NBD_REPLY_TYPE_ERROR_OFFSET`). Messages
/// longer than [`MAX_STRING`] are cut at a character boundary.
pub fn encode_error_chunk(error: u32, message: &str, offset: Option<u64>) -> Vec<u8> {
    let mut end = message.len().min(MAX_STRING);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let msg = &message.as_bytes()[..end];
    let mut out = Vec::with_capacity(6 + msg.len() + 8);
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    if let Some(o) = offset {
        out.extend_from_slice(&o.to_be_bytes());
    }
    out
}

/// Parse an error chunk payload of type `kind`: errno, message, offset.
pub fn decode_error_chunk(kind: u16, b: &[u8]) -> ProtoResult<(u32, String, Option<u64>)> {
    let mut c = Cursor::new(b);
    let error = c.u32()?;
    let n = c.u16()? as usize;
    let msg = String::from_utf8_lossy(c.bytes(n)?).into_owned();
    let offset = if kind == REPLY_TYPE_ERROR_OFFSET {
        Some(c.u64()?)
    } else {
        None
    };
    c.finish()?;
    if error == 0 {
        return Err(ProtoError::Invalid("error chunk with errno 0"));
    }
    Ok((error, msg, offset))
}

/// One block-status descriptor: a run of `len` bytes with `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    /// Run length.
    pub len: u64,
    /// Context-defined flags.
    pub flags: u64,
}

/// The payload of a block-status chunk for context `id` (`NBD_REPLY_TYPE_BLOCK_STATUS_EXT` if
/// `extended`, else `NBD_REPLY_TYPE_BLOCK_STATUS`, whose fields must fit 32 bits).
pub fn encode_block_status(id: u32, ds: &[Descriptor], extended: bool) -> ProtoResult<Vec<u8>> {
    let mut out = Vec::with_capacity(8 + ds.len() * 16);
    out.extend_from_slice(&id.to_be_bytes());
    if extended {
        out.extend_from_slice(&(ds.len() as u32).to_be_bytes());
        for d in ds {
            out.extend_from_slice(&d.len.to_be_bytes());
            out.extend_from_slice(&d.flags.to_be_bytes());
        }
    } else {
        for d in ds {
            let len =
                u32::try_from(d.len).map_err(|_| ProtoError::Invalid("extent over 32 bits"))?;
            let flags =
                u32::try_from(d.flags).map_err(|_| ProtoError::Invalid("flags over 32 bits"))?;
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
        }
    }
    Ok(out)
}

/// Parse a block-status chunk payload of type `kind`: context id and descriptors. Zero-length
/// descriptors and empty lists are refused.
pub fn decode_block_status(kind: u16, b: &[u8]) -> ProtoResult<(u32, Vec<Descriptor>)> {
    let mut c = Cursor::new(b);
    let id = c.u32()?;
    let mut ds = Vec::new();
    match kind {
        REPLY_TYPE_BLOCK_STATUS => {
            if c.remaining() == 0 || !c.remaining().is_multiple_of(8) {
                return Err(ProtoError::Invalid("bad block status payload length"));
            }
            while c.remaining() > 0 {
                let len = c.u32()?.into();
                let flags = c.u32()?.into();
                ds.push(Descriptor { len, flags });
            }
        }
        REPLY_TYPE_BLOCK_STATUS_EXT => {
            let n = c.u32()? as usize;
            if n == 0 || c.remaining() != n.saturating_mul(16) {
                return Err(ProtoError::Invalid("bad block status payload length"));
            }
            for _ in 0..n {
                let len = c.u64()?;
                let flags = c.u64()?;
                ds.push(Descriptor { len, flags });
            }
        }
        _ => return Err(ProtoError::Invalid("not a block status chunk")),
    }
    if ds.iter().any(|d| d.len == 0) {
        return Err(ProtoError::Invalid("zero-length block status extent"));
    }
    Ok((id, ds))
}

/// The payload of `NBD_CMD_BLOCK_STATUS` with `NBD_CMD_FLAG_PAYLOAD_LEN` (extended headers):
/// the effect length and the context ids to report.
pub fn encode_block_status_payload(effect_len: u64, ids: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + 4 * ids.len());
    out.extend_from_slice(&effect_len.to_be_bytes());
    for id in ids {
        out.extend_from_slice(&id.to_be_bytes());
    }
    out
}

/// Parse a block-status request payload: effect length and at least one context id.
pub fn decode_block_status_payload(b: &[u8]) -> ProtoResult<(u64, Vec<u32>)> {
    if b.len() < 12 || !(b.len() - 8).is_multiple_of(4) {
        return Err(ProtoError::Invalid("bad block status payload length"));
    }
    let mut c = Cursor::new(b);
    let len = c.u64()?;
    let mut ids = Vec::with_capacity(c.remaining() / 4);
    while c.remaining() > 0 {
        ids.push(c.u32()?);
    }
    Ok((len, ids))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_roundtrip_both_styles() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            cookie: 0x1122_3344_5566_7788,
            offset: 4096,
            len: 65536,
        };
        for ext in [false, true] {
            let b = encode_request(&r, ext).unwrap();
            assert_eq!(b.len(), request_len(ext));
            assert_eq!(decode_request(&b, ext).unwrap(), r);
            assert!(matches!(
                decode_request(&b, !ext),
                Err(ProtoError::BadMagic(_)) | Err(ProtoError::Short { .. })
            ));
        }
        let big = Request { len: 1 << 33, ..r };
        assert!(encode_request(&big, false).is_err());
    }

    #[test]
    fn options_roundtrip() {
        let info = InfoRequest {
            name: "exp".into(),
            items: vec![INFO_NAME, INFO_BLOCK_SIZE],
        };
        let data = encode_info_request(&info);
        assert_eq!(decode_info_request(&data).unwrap(), info);
        let m = MetaContextRequest {
            export: "e".into(),
            queries: vec!["base:allocation".into(), "qemu:".into()],
        };
        assert_eq!(
            decode_meta_context_request(&encode_meta_context_request(&m)).unwrap(),
            m
        );
        let o = encode_option(OPT_GO, &data);
        let h = decode_option_header(&o[..16]).unwrap();
        assert_eq!((h.option, h.len as usize), (OPT_GO, data.len()));
        for i in [
            Info::Export {
                size: 1 << 40,
                flags: 3,
            },
            Info::Name("x".into()),
            Info::Description("desc".into()),
            Info::BlockSize {
                min: 1,
                preferred: 4096,
                max: MAX_BUFFER,
            },
        ] {
            assert_eq!(decode_info(&encode_info(&i)).unwrap(), i);
        }
    }

    #[test]
    fn replies_roundtrip() {
        let h = ChunkHeader {
            flags: REPLY_FLAG_DONE,
            kind: REPLY_TYPE_OFFSET_DATA,
            cookie: 7,
            offset: 0,
            len: 100,
        };
        for ext in [false, true] {
            let b = encode_chunk_header(&h, ext).unwrap();
            let magic = u32::from_be_bytes(b[..4].try_into().unwrap());
            assert_eq!(reply_header_len(magic).unwrap(), b.len());
            assert_eq!(decode_reply_header(&b).unwrap(), ReplyHeader::Chunk(h));
        }
        let s = encode_simple_reply(9, errno::EIO);
        assert_eq!(
            decode_reply_header(&s).unwrap(),
            ReplyHeader::Simple {
                error: errno::EIO,
                cookie: 9
            }
        );
        let ds = [
            Descriptor {
                len: 4096,
                flags: 3,
            },
            Descriptor { len: 512, flags: 0 },
        ];
        for (ext, kind) in [
            (false, REPLY_TYPE_BLOCK_STATUS),
            (true, REPLY_TYPE_BLOCK_STATUS_EXT),
        ] {
            let p = encode_block_status(2, &ds, ext).unwrap();
            assert_eq!(decode_block_status(kind, &p).unwrap(), (2, ds.to_vec()));
        }
        let e = encode_error_chunk(errno::ENOSPC, "full", Some(12));
        assert_eq!(
            decode_error_chunk(REPLY_TYPE_ERROR_OFFSET, &e).unwrap(),
            (errno::ENOSPC, "full".to_string(), Some(12))
        );
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(to_nbd_errno(libc::EROFS), errno::EPERM);
        assert_eq!(to_nbd_errno(libc::EDQUOT), errno::ENOSPC);
        assert_eq!(to_nbd_errno(libc::ENOENT), errno::EINVAL);
        assert_eq!(from_nbd_errno(errno::ESHUTDOWN), libc::ESHUTDOWN);
        assert_eq!(from_nbd_errno(12345), libc::EINVAL);
    }
}
