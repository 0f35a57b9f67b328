//! The client side of the fixed newstyle handshake, as a state machine that never touches a
//! socket. The driver loop is:
//!
//! ```text
//! loop {
//!     match hs.step(&mut inbuf)? {
//!         Step::Send(bytes) => write them,
//!         Step::NeedBytes => read more into inbuf (at EOF: return hs.eof()),
//!         Step::StartTls => wrap the stream in TLS, then hs.tls_established(),
//!         Step::Done(n) => break n,
//!     }
//! }
//! ```
//!
//! Order of options: STARTTLS first (when TLS is wanted; an error reply ends the handshake,
//! never a downgrade), then everything stateful after TLS: EXTENDED_HEADERS (falling back to
//! STRUCTURED_REPLY), SET_META_CONTEXT `base:allocation`, and GO asking for the block size.
//! A server that answers GO with ERR_UNSUP (XenServer's `xapi-nbd`) gets EXPORT_NAME.

use super::consts::*;
use super::{sanitize_message, NbdError};
use crate::reader::Reader;
use bytes::{Buf, BytesMut};

/// Longest option reply we accept. Replies to the options we send are tiny (an INFO with a
/// description is at most a few KiB); anything larger is a broken or hostile server.
pub const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Longest export name the protocol allows.
pub const MAX_EXPORT_NAME: usize = 4096;

/// What the client asks for. Its `Debug` hides the export name (it can carry a token).
#[derive(Clone)]
pub struct HandshakeConfig {
    pub export_name: String,
    pub tls: bool,
    pub extended_headers: bool,
    pub structured_replies: bool,
    pub meta_context: bool,
}

impl HandshakeConfig {
    pub fn new(export_name: impl Into<String>, tls: bool) -> Self {
        HandshakeConfig {
            export_name: export_name.into(),
            tls,
            extended_headers: true,
            structured_replies: true,
            meta_context: true,
        }
    }
}

impl std::fmt::Debug for HandshakeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandshakeConfig")
            .field("export_name", &super::REDACTED)
            .field("tls", &self.tls)
            .field("extended_headers", &self.extended_headers)
            .field("structured_replies", &self.structured_replies)
            .field("meta_context", &self.meta_context)
            .finish()
    }
}

/// What the handshake settled on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub size: u64,
    pub transmission_flags: u16,
    pub structured: bool,
    pub extended: bool,
    /// The id of the `base:allocation` context, if the server selected it.
    pub meta_context: Option<u32>,
    /// The block-size constraints (min, preferred, max payload), if the server sent them.
    pub block_size: Option<(u32, u32, u32)>,
    /// True when the server refused GO and EXPORT_NAME was used (XenServer).
    pub via_export_name: bool,
}

impl Negotiated {
    pub fn read_only(&self) -> bool {
        self.transmission_flags & TFLAG_READ_ONLY != 0
    }
    pub fn can_multi_conn(&self) -> bool {
        self.transmission_flags & TFLAG_CAN_MULTI_CONN != 0
    }
    /// The smallest request granularity the client must honour: the advertised minimum, and
    /// never below 512 bytes (XenServer rejects reads that are not 512-aligned).
    pub fn alignment(&self) -> u64 {
        self.block_size
            .map_or(512, |(min, _, _)| u64::from(min).max(512))
    }
    /// The largest READ the client may send: the advertised maximum, capped at 32 MiB.
    pub fn max_request(&self) -> u64 {
        let cap = super::MAX_REQUEST_LEN;
        self.block_size
            .map_or(cap, |(_, _, max)| u64::from(max).min(cap))
    }
}

/// What the driver must do next. `Debug` shows only the length of bytes to send: they can
/// hold the export name.
pub enum Step {
    Send(Vec<u8>),
    NeedBytes,
    StartTls,
    Done(Negotiated),
}

impl std::fmt::Debug for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Send(bytes) => write!(f, "Send({} bytes)", bytes.len()),
            Step::NeedBytes => f.write_str("NeedBytes"),
            Step::StartTls => f.write_str("StartTls"),
            Step::Done(n) => f.debug_tuple("Done").field(n).finish(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Greeting,
    AwaitStartTls,
    TlsPending,
    AwaitExtendedHeaders,
    AwaitStructured,
    AwaitMetaContext,
    AwaitGo,
    AwaitExportName,
    Done,
}

/// The client handshake state machine. `Debug` hides the export name and the pending
/// output (which can hold it).
pub struct ClientHandshake {
    cfg: HandshakeConfig,
    state: State,
    out: Vec<u8>,
    no_zeroes: bool,
    structured: bool,
    extended: bool,
    meta_context: Option<u32>,
    block_size: Option<(u32, u32, u32)>,
    export: Option<(u64, u16)>,
}

impl std::fmt::Debug for ClientHandshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientHandshake")
            .field("cfg", &self.cfg)
            .field("state", &self.state)
            .field("out", &format_args!("{} bytes", self.out.len()))
            .field("no_zeroes", &self.no_zeroes)
            .field("structured", &self.structured)
            .field("extended", &self.extended)
            .field("meta_context", &self.meta_context)
            .field("block_size", &self.block_size)
            .field("export", &self.export)
            .finish()
    }
}

struct OptionReply<'a> {
    option: u32,
    typ: u32,
    data: &'a [u8],
}

fn encode_option(out: &mut Vec<u8>, option: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

fn name_field(out: &mut Vec<u8>, name: &str) {
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
}

impl ClientHandshake {
    pub fn new(cfg: HandshakeConfig) -> Result<Self, NbdError> {
        if cfg.export_name.len() > MAX_EXPORT_NAME {
            return Err(NbdError::ExportNameTooLong(cfg.export_name.len()));
        }
        Ok(ClientHandshake {
            cfg,
            state: State::Greeting,
            out: Vec::new(),
            no_zeroes: false,
            structured: false,
            extended: false,
            meta_context: None,
            block_size: None,
            export: None,
        })
    }

    /// Call after the TLS session is up (only after [`Step::StartTls`]).
    pub fn tls_established(&mut self) {
        if self.state == State::TlsPending {
            self.begin_options();
        }
    }

    /// The error to report when the server closes the connection while we wait for bytes.
    pub fn eof(&self) -> NbdError {
        match self.state {
            State::Greeting => NbdError::ClosedBeforeGreeting,
            State::AwaitExportName => {
                NbdError::ExportRefused("the server closed the connection after the export name: unknown export or invalid session".into())
            }
            State::AwaitStartTls => NbdError::ClosedInHandshake("after STARTTLS"),
            _ => NbdError::ClosedInHandshake("during option negotiation"),
        }
    }

    /// Advance as far as the buffered input allows.
    pub fn step(&mut self, input: &mut BytesMut) -> Result<Step, NbdError> {
        loop {
            if !self.out.is_empty() {
                return Ok(Step::Send(std::mem::take(&mut self.out)));
            }
            match self.state {
                State::Greeting => {
                    if input.len() < 18 {
                        return Ok(Step::NeedBytes);
                    }
                    let mut r = Reader::new(&input[..18]);
                    let magic = r.u64_be().map_err(|_| NbdError::BadGreeting)?;
                    let opt = r.u64_be().map_err(|_| NbdError::BadGreeting)?;
                    let flags = r.u16_be().map_err(|_| NbdError::BadGreeting)?;
                    input.advance(18);
                    if magic != NBDMAGIC || opt != IHAVEOPT {
                        return Err(NbdError::BadGreeting);
                    }
                    if flags & FLAG_FIXED_NEWSTYLE == 0 {
                        return Err(NbdError::NotFixedNewstyle);
                    }
                    self.no_zeroes = flags & FLAG_NO_ZEROES != 0;
                    let mut cflags = FLAG_C_FIXED_NEWSTYLE;
                    if self.no_zeroes {
                        cflags |= FLAG_C_NO_ZEROES;
                    }
                    self.out.extend_from_slice(&cflags.to_be_bytes());
                    if self.cfg.tls {
                        encode_option(&mut self.out, OPT_STARTTLS, &[]);
                        self.state = State::AwaitStartTls;
                    } else {
                        self.begin_options();
                    }
                }
                State::TlsPending => return Ok(Step::StartTls),
                State::Done => {
                    return Err(NbdError::MalformedOptionReply("handshake already finished"))
                }
                State::AwaitExportName => {
                    let need = if self.no_zeroes { 10 } else { 134 };
                    if input.len() < need {
                        return Ok(Step::NeedBytes);
                    }
                    let mut r = Reader::new(&input[..10]);
                    let size = r
                        .u64_be()
                        .map_err(|_| NbdError::ClosedInHandshake("export"))?;
                    let flags = r
                        .u16_be()
                        .map_err(|_| NbdError::ClosedInHandshake("export"))?;
                    input.advance(need);
                    self.export = Some((size, flags));
                    return self.finish(true);
                }
                _ => {
                    let Some(total) = option_reply_len(input)? else {
                        return Ok(Step::NeedBytes);
                    };
                    let frame = input.split_to(total);
                    let reply = parse_option_reply(&frame)?;
                    if let Some(done) = self.on_option_reply(reply)? {
                        return Ok(done);
                    }
                }
            }
        }
    }

    fn begin_options(&mut self) {
        if self.cfg.extended_headers {
            encode_option(&mut self.out, OPT_EXTENDED_HEADERS, &[]);
            self.state = State::AwaitExtendedHeaders;
        } else if self.cfg.structured_replies {
            encode_option(&mut self.out, OPT_STRUCTURED_REPLY, &[]);
            self.state = State::AwaitStructured;
        } else {
            self.send_go();
        }
    }

    fn after_structured(&mut self) {
        if self.structured && self.cfg.meta_context {
            let mut data = Vec::new();
            name_field(&mut data, &self.cfg.export_name);
            data.extend_from_slice(&1u32.to_be_bytes());
            name_field(&mut data, META_BASE_ALLOCATION);
            encode_option(&mut self.out, OPT_SET_META_CONTEXT, &data);
            self.state = State::AwaitMetaContext;
        } else {
            self.send_go();
        }
    }

    fn send_go(&mut self) {
        let mut data = Vec::new();
        name_field(&mut data, &self.cfg.export_name);
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        encode_option(&mut self.out, OPT_GO, &data);
        self.state = State::AwaitGo;
    }

    fn send_export_name(&mut self) {
        encode_option(
            &mut self.out,
            OPT_EXPORT_NAME,
            self.cfg.export_name.as_bytes(),
        );
        self.state = State::AwaitExportName;
    }

    fn expected_option(&self) -> u32 {
        match self.state {
            State::AwaitStartTls => OPT_STARTTLS,
            State::AwaitExtendedHeaders => OPT_EXTENDED_HEADERS,
            State::AwaitStructured => OPT_STRUCTURED_REPLY,
            State::AwaitMetaContext => OPT_SET_META_CONTEXT,
            _ => OPT_GO,
        }
    }

    fn on_option_reply(&mut self, reply: OptionReply<'_>) -> Result<Option<Step>, NbdError> {
        let expected = self.expected_option();
        if reply.option != expected {
            return Err(NbdError::WrongOptionEcho {
                expected,
                got: reply.option,
            });
        }
        let is_error = reply.typ & REP_FLAG_ERROR != 0;
        if is_error && reply.typ == REP_ERR_TLS_REQD && !self.cfg.tls {
            return Err(NbdError::TlsRequired);
        }
        let unexpected = || NbdError::UnexpectedOptionReply {
            option: reply.option,
            typ: reply.typ,
        };
        match self.state {
            State::AwaitStartTls => match reply.typ {
                REP_ACK => {
                    self.state = State::TlsPending;
                    return Ok(Some(Step::StartTls));
                }
                t if t & REP_FLAG_ERROR != 0 => {
                    return Err(NbdError::TlsNotSupported(option_reply_name(t)))
                }
                _ => return Err(unexpected()),
            },
            State::AwaitExtendedHeaders => match reply.typ {
                REP_ACK => {
                    self.extended = true;
                    self.structured = true;
                    self.after_structured();
                }
                _ if is_error => {
                    if self.cfg.structured_replies {
                        encode_option(&mut self.out, OPT_STRUCTURED_REPLY, &[]);
                        self.state = State::AwaitStructured;
                    } else {
                        self.send_go();
                    }
                }
                _ => return Err(unexpected()),
            },
            State::AwaitStructured => match reply.typ {
                REP_ACK => {
                    self.structured = true;
                    self.after_structured();
                }
                _ if is_error => self.send_go(),
                _ => return Err(unexpected()),
            },
            State::AwaitMetaContext => match reply.typ {
                REP_META_CONTEXT => {
                    let mut r = Reader::new(reply.data);
                    let id = r
                        .u32_be()
                        .map_err(|_| NbdError::MalformedOptionReply("META_CONTEXT too short"))?;
                    if r.rest() == META_BASE_ALLOCATION.as_bytes() {
                        self.meta_context = Some(id);
                    }
                }
                REP_ACK => self.send_go(),
                _ if is_error => {
                    self.meta_context = None;
                    self.send_go();
                }
                _ => return Err(unexpected()),
            },
            State::AwaitGo => match reply.typ {
                REP_INFO => self.on_info(reply.data)?,
                REP_ACK => return self.finish(false).map(Some),
                REP_ERR_UNSUP if !self.extended => {
                    // XenServer: GO is unknown there, EXPORT_NAME is all it takes.
                    self.block_size = None;
                    self.export = None;
                    self.send_export_name();
                }
                REP_ERR_UNKNOWN => {
                    return Err(NbdError::ExportRefused("unknown export".into()));
                }
                t if t & REP_FLAG_ERROR != 0 => {
                    let msg = sanitize_message(reply.data, 200);
                    let mut why = option_reply_name(t);
                    if !msg.is_empty() {
                        why = format!("{why}: {msg}");
                    }
                    return Err(NbdError::ExportRefused(why));
                }
                _ => return Err(unexpected()),
            },
            _ => return Err(unexpected()),
        }
        Ok(None)
    }

    fn on_info(&mut self, data: &[u8]) -> Result<(), NbdError> {
        let mut r = Reader::new(data);
        let short = |_| NbdError::MalformedOptionReply("INFO too short");
        let typ = r.u16_be().map_err(short)?;
        match typ {
            INFO_EXPORT => {
                if data.len() != 12 {
                    return Err(NbdError::MalformedOptionReply(
                        "INFO_EXPORT length is not 12",
                    ));
                }
                let size = r.u64_be().map_err(short)?;
                let flags = r.u16_be().map_err(short)?;
                self.export = Some((size, flags));
            }
            INFO_BLOCK_SIZE => {
                if data.len() != 14 {
                    return Err(NbdError::MalformedOptionReply(
                        "INFO_BLOCK_SIZE length is not 14",
                    ));
                }
                let min = r.u32_be().map_err(short)?;
                let pref = r.u32_be().map_err(short)?;
                let max = r.u32_be().map_err(short)?;
                let valid = min.is_power_of_two()
                    && min <= 65536
                    && pref.is_power_of_two()
                    && pref >= min
                    && max >= min
                    && max % min == 0;
                if !valid {
                    return Err(NbdError::MalformedOptionReply(
                        "invalid block size constraints",
                    ));
                }
                self.block_size = Some((min, pref, max));
            }
            _ => {} // Unknown info types must be ignored.
        }
        Ok(())
    }

    fn finish(&mut self, via_export_name: bool) -> Result<Step, NbdError> {
        let Some((size, flags)) = self.export else {
            return Err(NbdError::MalformedOptionReply(
                "GO acknowledged without INFO_EXPORT",
            ));
        };
        if size > i64::MAX as u64 {
            return Err(NbdError::BadExport {
                size,
                why: "larger than 2^63-1",
            });
        }
        self.state = State::Done;
        Ok(Step::Done(Negotiated {
            size,
            transmission_flags: flags,
            structured: self.structured,
            extended: self.extended,
            meta_context: if self.structured {
                self.meta_context
            } else {
                None
            },
            block_size: self.block_size,
            via_export_name,
        }))
    }
}

/// The total length of the option reply at the front of `input`, once it is all there.
fn option_reply_len(input: &[u8]) -> Result<Option<usize>, NbdError> {
    if input.len() < 20 {
        return Ok(None);
    }
    let mut r = Reader::new(&input[..20]);
    let magic = r
        .u64_be()
        .map_err(|_| NbdError::MalformedOptionReply("short"))?;
    if magic != OPTION_REPLY_MAGIC {
        return Err(NbdError::BadOptionReplyMagic(magic));
    }
    let _ = r.take(8);
    let len = r
        .u32_be()
        .map_err(|_| NbdError::MalformedOptionReply("short"))?;
    if len > MAX_OPTION_REPLY {
        return Err(NbdError::OptionReplyTooLong(len));
    }
    let total = 20 + len as usize;
    Ok((input.len() >= total).then_some(total))
}

fn parse_option_reply(frame: &[u8]) -> Result<OptionReply<'_>, NbdError> {
    let mut r = Reader::new(frame);
    let short = |_| NbdError::MalformedOptionReply("short");
    let _magic = r.u64_be().map_err(short)?;
    let option = r.u32_be().map_err(short)?;
    let typ = r.u32_be().map_err(short)?;
    let _len = r.u32_be().map_err(short)?;
    Ok(OptionReply {
        option,
        typ,
        data: r.rest(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::server::*;
    use crate::nbd::REDACTED;
    use proptest::prelude::*;

    /// Drive the client against canned server bytes; returns what it sent and the outcome.
    fn drive(cfg: HandshakeConfig, server: &[u8]) -> (Vec<u8>, Result<Negotiated, NbdError>) {
        let mut hs = ClientHandshake::new(cfg).unwrap();
        let mut sent = Vec::new();
        let mut buf = BytesMut::new();
        let mut input = server.chunks(7);
        loop {
            match hs.step(&mut buf) {
                Ok(Step::Send(b)) => sent.extend_from_slice(&b),
                Ok(Step::StartTls) => hs.tls_established(),
                Ok(Step::NeedBytes) => match input.next() {
                    Some(c) => buf.extend_from_slice(c),
                    None => return (sent, Err(hs.eof())),
                },
                Ok(Step::Done(n)) => return (sent, Ok(n)),
                Err(e) => return (sent, Err(e)),
            }
        }
    }

    /// The options the client sent, in order.
    fn options(sent: &[u8]) -> Vec<u32> {
        let mut rest = &sent[4..]; // client flags
        let mut opts = Vec::new();
        while let Ok(Some((o, n))) = parse_client_option(rest) {
            opts.push(o.option);
            rest = &rest[n..];
        }
        opts
    }

    #[test]
    fn debug_output_never_shows_the_export_name() {
        let secret = "session-token-0123456789";
        let mut cfg = HandshakeConfig::new(secret, false);
        cfg.extended_headers = false;
        cfg.structured_replies = false;
        cfg.meta_context = false;
        let mut seen = vec![format!("{cfg:?}")];
        let mut hs = ClientHandshake::new(cfg).unwrap();
        let mut greeting = Vec::new();
        encode_greeting(&mut greeting, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        let mut buf = BytesMut::from(&greeting[..]);
        // Greeting in; the options out, GO (with the name) among them.
        let mut sent = Vec::new();
        while let Ok(step) = hs.step(&mut buf) {
            seen.push(format!("{step:?} {hs:?} {hs:#?}"));
            match step {
                Step::Send(b) => sent.extend_from_slice(&b),
                _ => break,
            }
        }
        assert!(sent.windows(secret.len()).any(|w| w == secret.as_bytes()));
        for text in &seen {
            assert!(!text.contains(secret), "{text}");
        }
        assert!(seen[0].contains(REDACTED));
    }

    #[test]
    fn qemu_like_server_with_extended_headers() {
        let mut s = Vec::new();
        encode_greeting(&mut s, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        encode_option_reply(&mut s, OPT_STARTTLS, REP_ACK, &[]);
        encode_option_reply(&mut s, OPT_EXTENDED_HEADERS, REP_ACK, &[]);
        let mut ctx = 0u32.to_be_bytes().to_vec();
        ctx.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
        encode_option_reply(&mut s, OPT_SET_META_CONTEXT, REP_META_CONTEXT, &ctx);
        encode_option_reply(&mut s, OPT_SET_META_CONTEXT, REP_ACK, &[]);
        encode_option_reply(
            &mut s,
            OPT_GO,
            REP_INFO,
            &info_block_size(1, 4096, 32 << 20),
        );
        encode_option_reply(&mut s, OPT_GO, REP_INFO, &info_export(1 << 30, 0x158f));
        encode_option_reply(&mut s, OPT_GO, REP_ACK, &[]);
        let (sent, n) = drive(HandshakeConfig::new("disk", true), &s);
        let n = n.unwrap();
        assert_eq!(
            options(&sent),
            vec![
                OPT_STARTTLS,
                OPT_EXTENDED_HEADERS,
                OPT_SET_META_CONTEXT,
                OPT_GO
            ]
        );
        assert_eq!(
            u32::from_be_bytes(sent[..4].try_into().unwrap()),
            FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES
        );
        assert!(n.extended && n.structured && !n.via_export_name);
        assert_eq!(
            (n.size, n.meta_context, n.block_size),
            (1 << 30, Some(0), Some((1, 4096, 32 << 20)))
        );
        assert!(n.can_multi_conn() && n.read_only());
        assert_eq!((n.alignment(), n.max_request()), (512, 32 << 20));
    }

    #[test]
    fn xenserver_like_server_falls_back_to_export_name() {
        let mut s = Vec::new();
        encode_greeting(&mut s, FLAG_FIXED_NEWSTYLE);
        encode_option_reply(&mut s, OPT_STARTTLS, REP_ACK, &[]);
        encode_option_reply(&mut s, OPT_EXTENDED_HEADERS, REP_ERR_UNSUP, &[]);
        encode_option_reply(&mut s, OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, &[]);
        encode_option_reply(&mut s, OPT_GO, REP_ERR_UNSUP, &[]);
        encode_export_name_reply(&mut s, 10 << 20, 0x0003, false);
        let (sent, n) = drive(HandshakeConfig::new("/uuid?session_id=x", true), &s);
        let n = n.unwrap();
        assert_eq!(
            options(&sent),
            vec![
                OPT_STARTTLS,
                OPT_EXTENDED_HEADERS,
                OPT_STRUCTURED_REPLY,
                OPT_GO,
                OPT_EXPORT_NAME
            ]
        );
        assert!(!n.structured && !n.extended && n.via_export_name && n.meta_context.is_none());
        assert_eq!((n.size, n.transmission_flags), (10 << 20, 3));
        // The export name went out last, with no zero-padding reply expected beyond 134 bytes.
        assert!(sent.ends_with(b"/uuid?session_id=x"));
    }

    #[test]
    fn refusals_are_typed() {
        // A plaintext server refuses STARTTLS: no downgrade.
        let mut s = Vec::new();
        encode_greeting(&mut s, FLAG_FIXED_NEWSTYLE);
        encode_option_reply(&mut s, OPT_STARTTLS, REP_ERR_POLICY, &[]);
        assert!(matches!(
            drive(HandshakeConfig::new("d", true), &s).1,
            Err(NbdError::TlsNotSupported(_))
        ));
        // A TLS-only server answers a plaintext client with TLS_REQD.
        let mut s = Vec::new();
        encode_greeting(&mut s, FLAG_FIXED_NEWSTYLE);
        encode_option_reply(&mut s, OPT_EXTENDED_HEADERS, REP_ERR_TLS_REQD, &[]);
        assert_eq!(
            drive(HandshakeConfig::new("d", false), &s).1,
            Err(NbdError::TlsRequired)
        );
        // Closed before the greeting: the connection limit.
        assert_eq!(
            drive(HandshakeConfig::new("d", true), &[]).1,
            Err(NbdError::ClosedBeforeGreeting)
        );
        // Unknown export on GO.
        let mut s = Vec::new();
        encode_greeting(&mut s, FLAG_FIXED_NEWSTYLE);
        encode_option_reply(&mut s, OPT_EXTENDED_HEADERS, REP_ERR_UNSUP, &[]);
        encode_option_reply(&mut s, OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, &[]);
        encode_option_reply(&mut s, OPT_GO, REP_ERR_UNKNOWN, &[]);
        assert!(matches!(
            drive(HandshakeConfig::new("d", false), &s).1,
            Err(NbdError::ExportRefused(_))
        ));
        // An oversized option reply is refused before it is buffered.
        let mut s = Vec::new();
        encode_greeting(&mut s, FLAG_FIXED_NEWSTYLE);
        s.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        s.extend_from_slice(&OPT_STARTTLS.to_be_bytes());
        s.extend_from_slice(&REP_ACK.to_be_bytes());
        s.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            drive(HandshakeConfig::new("d", true), &s).1,
            Err(NbdError::OptionReplyTooLong(u32::MAX))
        );
        // Not NBD at all.
        assert_eq!(
            drive(
                HandshakeConfig::new("d", true),
                b"HTTP/1.1 400 Bad Request\r\n\r\n"
            )
            .1,
            Err(NbdError::BadGreeting)
        );
    }

    proptest! {
        #[test]
        fn never_panics_on_server_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512), tls in any::<bool>()) {
            let mut s = Vec::new();
            encode_greeting(&mut s, FLAG_FIXED_NEWSTYLE);
            s.extend_from_slice(&bytes);
            let _ = drive(HandshakeConfig::new("d", tls), &s);
            let _ = drive(HandshakeConfig::new("d", tls), &bytes);
        }
    }
}
