//! The NBD wire protocol (fixed newstyle handshake and transmission), sans I/O.
//!
//! Sources: the NBD protocol document (`doc/proto.md` of the NBD project) including the
//! extended-headers extension, and the observed behaviour of qemu-nbd, nbdkit and
//! XenServer's `xapi-nbd`.
//!
//! * [`handshake`]: the client side of option negotiation as a state machine.
//! * [`transmission`]: requests, reply headers, structured chunks, and [`ReadAssembly`], which
//!   checks that the chunks of one READ cover it exactly once.
//! * [`replies`]: the client's reply state machine ([`Replies`]): every check on what the
//!   server answers, for the async driver to follow.
//! * [`server`]: encoders for the server side, used by test servers.

pub mod consts;
pub mod handshake;
pub mod replies;
pub mod server;
pub mod transmission;

pub use handshake::{ClientHandshake, HandshakeConfig, Negotiated, Step};
pub use replies::{Event, Outcome, Outstanding, Replies};
pub use transmission::{
    encode_request, parse_chunk_payload, parse_reply_header, BlockStatusExtent, Chunk,
    ReadAssembly, ReplyHeader, Request, MAX_CHUNK_PAYLOAD, MAX_REQUEST_LEN,
};

/// What `Debug` prints in place of an export name.
pub const REDACTED: &str = "***";

/// What went wrong talking NBD. Messages never contain the export name: it can carry a
/// session token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NbdError {
    #[error("not an NBD server: bad greeting magic")]
    BadGreeting,
    #[error("server does not support the fixed newstyle handshake")]
    NotFixedNewstyle,
    #[error("server does not support TLS (option STARTTLS answered {0}); refusing to continue without TLS")]
    TlsNotSupported(String),
    #[error("server requires TLS; use an nbds:// URI")]
    TlsRequired,
    #[error("bad option reply magic {0:#x}")]
    BadOptionReplyMagic(u64),
    #[error("option reply for option {got}, expected {expected}")]
    WrongOptionEcho { expected: u32, got: u32 },
    #[error("option reply too long: {0} bytes")]
    OptionReplyTooLong(u32),
    #[error("malformed option reply: {0}")]
    MalformedOptionReply(&'static str),
    #[error("unexpected option reply type {typ:#x} to option {option}")]
    UnexpectedOptionReply { option: u32, typ: u32 },
    #[error("the server refused the export ({0})")]
    ExportRefused(String),
    #[error(
        "the server closed the connection before its greeting (it may be at its connection limit)"
    )]
    ClosedBeforeGreeting,
    #[error("export name is {0} bytes long; the limit is 4096")]
    ExportNameTooLong(usize),
    #[error("the server closed the connection during the handshake ({0})")]
    ClosedInHandshake(&'static str),
    #[error("the export size {size} is not usable: {why}")]
    BadExport { size: u64, why: &'static str },
    #[error("bad reply magic {0:#x}: lost synchronisation with the server")]
    BadReplyMagic(u32),
    #[error("reply with unknown cookie {0:#x}")]
    UnknownCookie(u64),
    #[error("simple reply received but structured replies were negotiated")]
    UnexpectedSimpleReply,
    #[error("structured reply received but it was not negotiated")]
    UnexpectedStructuredReply,
    #[error("reply chunk payload of {0} bytes exceeds the limit")]
    ChunkTooLong(u64),
    #[error("malformed {kind} chunk: {why}")]
    MalformedChunk {
        kind: &'static str,
        why: &'static str,
    },
    #[error("unknown reply chunk type {0:#x}")]
    UnknownChunkType(u16),
    #[error("chunk type {0} not valid for this request")]
    UnexpectedChunk(&'static str),
    #[error("read reply covers [{start:#x}, {end:#x}) outside the request [{req_start:#x}, {req_end:#x})")]
    OutOfRange {
        start: u64,
        end: u64,
        req_start: u64,
        req_end: u64,
    },
    #[error("read reply chunks overlap at {0:#x}")]
    Overlap(u64),
    #[error("read reply ended with {covered} of {expected} bytes covered")]
    Incomplete { covered: u64, expected: u64 },
    #[error("reply after the final chunk of request {0:#x}")]
    AfterDone(u64),
    #[error(
        "extended reply header offset {got:#x} does not match the request offset {expected:#x}"
    )]
    HeaderOffsetMismatch { expected: u64, got: u64 },
    #[error("request length {0} is not allowed (READ: 1..={max}; BLOCK_STATUS: 1..=2^32-1; no end past 2^64)", max = MAX_REQUEST_LEN)]
    BadRequestLength(u64),
    #[error("command {0} is not one the client sends")]
    UnsupportedCommand(u16),
    #[error("cookie {0:#x} is already in use")]
    DuplicateCookie(u64),
}

/// An error the server reported for one request (it does not break the connection).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("server error {} ({}){}", .code, consts::errno_name(.code), match .message { Some(m) => format!(": {m}"), None => String::new() })]
pub struct ServerError {
    pub code: u32,
    pub message: Option<String>,
    pub offset: Option<u64>,
}

/// Keep at most `max` printable ASCII characters of a peer-supplied message, so a hostile
/// server cannot inject control characters or huge strings into our logs.
pub fn sanitize_message(raw: &[u8], max: usize) -> String {
    let mut s: String = raw
        .iter()
        .take(max)
        .map(|&b| {
            if (0x20..0x7f).contains(&b) {
                b as char
            } else {
                '?'
            }
        })
        .collect();
    if raw.len() > max {
        s.push_str("...");
    }
    s
}
