//! A hostile NBD server: a normal fixed-newstyle handshake, then READs answered in one
//! scripted wrong way ([`Misbehaviour`]) on **every** connection, so that a client's retries
//! and reconnects meet the same fault again and the export must end in failure.
//!
//! Handshake: greeting `FIXED_NEWSTYLE | NO_ZEROES`; `GO` → `INFO_EXPORT` (flags
//! `HAS_FLAGS | READ_ONLY | CAN_MULTI_CONN`) + ACK; `EXPORT_NAME` → the classic reply;
//! `STRUCTURED_REPLY` → ACK when the misbehaviour needs structured replies
//! ([`Misbehaviour::structured`]), else `ERR_UNSUP`; `EXTENDED_HEADERS`, `SET_META_CONTEXT`
//! and everything else → `ERR_UNSUP`. Plaintext, except for
//! [`Misbehaviour::WrongCertificate`]: FORCEDTLS with a certificate of a fresh test PKI that
//! no client trusts. All wire encoding goes through `cbtstream_proto::nbd::server`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::{Buf, BytesMut};
use cbtstream_proto::nbd::consts::*;
use cbtstream_proto::nbd::server::{
    encode_chunk_header, encode_export_name_reply, encode_greeting, encode_option_reply,
    encode_simple_reply, error_payload, info_block_size, info_export, parse_client_flags,
};
use cbtstream_proto::nbd::transmission::{parse_request, Request};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

use crate::certs::TestPki;
use crate::xen_nbd::{read_option, send_option_reply};

/// Transmission flags of the export.
pub const EXPORT_FLAGS: u16 = TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_CAN_MULTI_CONN;

/// A magic number that is none of the NBD reply magics.
pub const GARBAGE_MAGIC: u32 = 0xbadc_0ffe;

/// The message of the ERROR chunk sent by [`Misbehaviour::ErrorChunk`].
pub const ERROR_MESSAGE: &str = "hostile server: injected I/O error";

/// How the server misbehaves (on every connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misbehaviour {
    /// The 18-byte greeting starts with garbage instead of `NBDMAGIC`.
    BadGreetingMagic,
    /// (simple replies) Each READ is answered with a 16-byte header whose magic is garbage.
    BadReplyMagic,
    /// (simple replies) Each READ is answered, with its data, under a cookie never sent.
    UnknownCookie,
    /// (simple replies) A successful header, then a quarter of the data, then close.
    SimplePayloadShort,
    /// (structured) One DONE OFFSET_DATA chunk 4 KiB longer than the request.
    ChunkLonger,
    /// (structured) Two OFFSET_DATA chunks that overlap by 4 KiB, the second with DONE.
    ChunkOverlap,
    /// (structured) The first quarter and the second half of the request, then DONE.
    ChunkGap,
    /// (structured) All the data in one chunk without the DONE flag, then silence.
    MissingDone,
    /// (structured) An OFFSET_DATA chunk header claiming 4 GiB - 1 bytes of payload.
    HugeLength,
    /// (structured) An ERROR chunk (EIO, [`ERROR_MESSAGE`]) with DONE, for every READ.
    ErrorChunk,
    /// (structured) A DONE OFFSET_DATA chunk header and half its payload, then silence.
    StallMidReply,
    /// (structured) A DONE OFFSET_DATA chunk header and half its payload, then close.
    DisconnectMidReply,
    /// TLS required, with a certificate of a fresh test CA (not the one the client trusts).
    WrongCertificate,
    /// (structured, `base:allocation` offered) Not a fault the client must refuse: every
    /// BLOCK_STATUS reply ends with an extent of 4 GiB - 1 bytes, past the request and past
    /// the end of the export (allowed by the protocol for the last extent). The image's
    /// data up to its last non-zero byte (rounded up to 4 KiB) is reported as data, the rest
    /// as zero (`HOLE | ZERO`). READs are answered correctly.
    BlockStatusPastRange,
    /// Not a transmission fault: the export's size is advertised as 2^62 bytes (the image's
    /// real bytes are served; reads past them get EINVAL). Not in [`Misbehaviour::ALL`],
    /// whose faults all break reads: this one must be refused before anything is read.
    HugeSize,
    /// Not a fault either: the first connection advertises no block-size limits, every later
    /// one a maximum of 32 KiB ([`SMALL_MAX_BLOCK`]), answering a longer READ with EINVAL.
    /// READs are answered correctly (simple replies); the first connection waits 20 ms
    /// before each answer, so that the later ones get reads to do. Not in
    /// [`Misbehaviour::ALL`].
    ShrinkingMaxBlock,
}

/// The maximum block size the later connections of [`Misbehaviour::ShrinkingMaxBlock`]
/// advertise.
pub const SMALL_MAX_BLOCK: u32 = 32 * 1024;

impl Misbehaviour {
    pub const ALL: [Misbehaviour; 14] = [
        Misbehaviour::BadGreetingMagic,
        Misbehaviour::BadReplyMagic,
        Misbehaviour::UnknownCookie,
        Misbehaviour::SimplePayloadShort,
        Misbehaviour::ChunkLonger,
        Misbehaviour::ChunkOverlap,
        Misbehaviour::ChunkGap,
        Misbehaviour::MissingDone,
        Misbehaviour::HugeLength,
        Misbehaviour::ErrorChunk,
        Misbehaviour::StallMidReply,
        Misbehaviour::DisconnectMidReply,
        Misbehaviour::WrongCertificate,
        Misbehaviour::BlockStatusPastRange,
    ];

    /// Whether the server ACKs `NBD_OPT_STRUCTURED_REPLY` for this misbehaviour.
    pub fn structured(self) -> bool {
        use Misbehaviour::*;
        matches!(
            self,
            ChunkLonger
                | ChunkOverlap
                | ChunkGap
                | MissingDone
                | HugeLength
                | ErrorChunk
                | StallMidReply
                | DisconnectMidReply
                | BlockStatusPastRange
        )
    }

    /// Whether the server requires TLS (STARTTLS) for this misbehaviour.
    pub fn tls(self) -> bool {
        self == Misbehaviour::WrongCertificate
    }
}

/// The meta context id the server gives `base:allocation`.
pub const CONTEXT_ID: u32 = 7;

/// Counters shared by all connections of one server.
#[derive(Debug, Default)]
pub struct HostileStats {
    connections: AtomicU64,
    requests: AtomicU64,
    misbehaved: AtomicU64,
    limited_reads: AtomicU64,
}

impl HostileStats {
    /// TCP connections accepted.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
    /// Transmission requests received (all commands, all connections).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
    /// Times the scripted fault was sent (a bad greeting, a bad reply...).
    pub fn misbehaved(&self) -> u64 {
        self.misbehaved.load(Ordering::SeqCst)
    }
    /// READs answered on a connection that advertised [`SMALL_MAX_BLOCK`].
    pub fn limited_reads(&self) -> u64 {
        self.limited_reads.load(Ordering::SeqCst)
    }
}

struct Shared {
    image: Vec<u8>,
    /// Where the image's data ends: past its last non-zero byte, rounded up to 4 KiB.
    data_end: u64,
    script: Misbehaviour,
    acceptor: Option<TlsAcceptor>,
    stats: Arc<HostileStats>,
}

/// A running hostile server on 127.0.0.1. Dropping it stops it and aborts every connection.
pub struct HostileServer {
    pub port: u16,
    pub addr: SocketAddr,
    pub script: Misbehaviour,
    pub stats: Arc<HostileStats>,
    task: JoinHandle<()>,
    /// The untrusted PKI of [`Misbehaviour::WrongCertificate`] (kept for its directory).
    _pki: Option<(tempfile::TempDir, TestPki)>,
}

impl std::fmt::Debug for HostileServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostileServer")
            .field("addr", &self.addr)
            .field("script", &self.script)
            .finish_non_exhaustive()
    }
}

impl HostileServer {
    /// Serve `image` (its length is the export size) misbehaving as `script`, on the current
    /// tokio runtime.
    pub async fn start(image: Vec<u8>, script: Misbehaviour) -> Result<Self> {
        let pki = if script.tls() {
            let tmp = tempfile::tempdir()?;
            let pki = TestPki::generate(tmp.path())?;
            Some((tmp, pki))
        } else {
            None
        };
        let acceptor = match &pki {
            Some((_, pki)) => Some(TlsAcceptor::from(pki.server_config()?)),
            None => None,
        };
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .context("binding 127.0.0.1")?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(HostileStats::default());
        let data_end = image
            .iter()
            .rposition(|&b| b != 0)
            .map_or(0, |i| (i as u64 + 1).next_multiple_of(4096))
            .min(image.len() as u64);
        let shared = Arc::new(Shared {
            image,
            data_end,
            script,
            acceptor,
            stats: stats.clone(),
        });
        let task = tokio::spawn(accept_loop(listener, shared));
        Ok(HostileServer {
            port: addr.port(),
            addr,
            script,
            stats,
            task,
            _pki: pki,
        })
    }

    /// Serve the file at `path`.
    pub async fn start_file(path: &Path, script: Misbehaviour) -> Result<Self> {
        let image = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Self::start(image, script).await
    }

    /// `nbd://127.0.0.1:PORT/NAME`, or `nbds://` for [`Misbehaviour::WrongCertificate`].
    pub fn uri(&self, export_name: &str) -> String {
        format!(
            "{}://{}:{}/{}",
            if self.script.tls() { "nbds" } else { "nbd" },
            self.addr.ip(),
            self.port,
            export_name
        )
    }
}

impl Drop for HostileServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    // Dropping the JoinSet (when this task is aborted) aborts every connection.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            res = listener.accept() => {
                let Ok((tcp, _)) = res else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let index = shared.stats.connections.fetch_add(1, Ordering::SeqCst);
                let sh = shared.clone();
                conns.spawn(async move {
                    let _ = serve_connection(tcp, &sh, index).await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Read and discard until the peer closes: "silence" that still notices the client leaving.
async fn drain<S: AsyncRead + Unpin>(s: &mut S) {
    let mut tmp = [0u8; 4096];
    while let Ok(n) = s.read(&mut tmp).await {
        if n == 0 {
            break;
        }
    }
}

/// `index` counts the server's connections from 0.
async fn serve_connection(mut tcp: TcpStream, sh: &Arc<Shared>, index: u64) -> Result<()> {
    let limited = sh.script == Misbehaviour::ShrinkingMaxBlock && index > 0;
    let _ = tcp.set_nodelay(true);
    let mut out = Vec::with_capacity(18);
    encode_greeting(&mut out, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    if sh.script == Misbehaviour::BadGreetingMagic {
        out[..8].copy_from_slice(b"HOSTILE!");
        sh.stats.misbehaved.fetch_add(1, Ordering::SeqCst);
    }
    tcp.write_all(&out).await?;
    if sh.script == Misbehaviour::BadGreetingMagic {
        drain(&mut tcp).await;
        return Ok(());
    }
    let mut flags = [0u8; 4];
    tcp.read_exact(&mut flags).await?;
    let no_zeroes = parse_client_flags(&flags).unwrap_or(0) & FLAG_C_NO_ZEROES != 0;
    let Some(acceptor) = &sh.acceptor else {
        return options_and_serve(tcp, sh, no_zeroes, false, limited).await;
    };
    loop {
        let opt = read_option(&mut tcp).await?;
        match opt.option {
            OPT_STARTTLS => {
                send_option_reply(&mut tcp, opt.option, REP_ACK).await?;
                break;
            }
            OPT_EXPORT_NAME | OPT_ABORT => return Ok(()),
            other => send_option_reply(&mut tcp, other, REP_ERR_TLS_REQD).await?,
        }
    }
    sh.stats.misbehaved.fetch_add(1, Ordering::SeqCst);
    let tls = acceptor.accept(tcp).await?;
    options_and_serve(tls, sh, no_zeroes, true, limited).await
}

async fn options_and_serve<S>(
    mut s: S,
    sh: &Arc<Shared>,
    no_zeroes: bool,
    is_tls: bool,
    limited: bool,
) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let size = if sh.script == Misbehaviour::HugeSize {
        1 << 62
    } else {
        sh.image.len() as u64
    };
    let mut structured = false;
    loop {
        let opt = read_option(&mut s).await?;
        let typ = match opt.option {
            OPT_GO => {
                let mut out = Vec::new();
                encode_option_reply(&mut out, OPT_GO, REP_INFO, &info_export(size, EXPORT_FLAGS));
                if limited {
                    let info = info_block_size(512, 4096, SMALL_MAX_BLOCK);
                    encode_option_reply(&mut out, OPT_GO, REP_INFO, &info);
                }
                encode_option_reply(&mut out, OPT_GO, REP_ACK, &[]);
                s.write_all(&out).await?;
                s.flush().await?;
                break;
            }
            OPT_EXPORT_NAME => {
                let mut out = Vec::new();
                encode_export_name_reply(&mut out, size, EXPORT_FLAGS, no_zeroes);
                s.write_all(&out).await?;
                s.flush().await?;
                break;
            }
            OPT_ABORT => {
                send_option_reply(&mut s, opt.option, REP_ACK).await?;
                let _ = s.shutdown().await;
                return Ok(());
            }
            OPT_STRUCTURED_REPLY if sh.script.structured() => {
                structured = true;
                REP_ACK
            }
            OPT_SET_META_CONTEXT if sh.script == Misbehaviour::BlockStatusPastRange => {
                let mut ctx = CONTEXT_ID.to_be_bytes().to_vec();
                ctx.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
                let mut out = Vec::new();
                encode_option_reply(&mut out, opt.option, REP_META_CONTEXT, &ctx);
                s.write_all(&out).await?;
                REP_ACK
            }
            OPT_STARTTLS if is_tls => REP_ERR_INVALID,
            OPT_STARTTLS => REP_ERR_POLICY,
            _ => REP_ERR_UNSUP,
        };
        send_option_reply(&mut s, opt.option, typ).await?;
    }
    transmission(s, sh, structured, limited).await
}

/// What to do with the connection after answering one request.
enum Then {
    /// Go on reading and answering requests.
    Continue,
    /// Send nothing more; wait for the client to leave.
    Silence,
    /// Close the connection.
    Close,
}

async fn transmission<S>(mut s: S, sh: &Arc<Shared>, structured: bool, limited: bool) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut out: Vec<u8> = Vec::new();
    loop {
        let req = loop {
            if let Some((req, n)) = parse_request(&buf, false)? {
                buf.advance(n);
                break req;
            }
            if s.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        };
        sh.stats.requests.fetch_add(1, Ordering::SeqCst);
        out.clear();
        let then = match req.cmd {
            CMD_DISC => {
                let _ = s.shutdown().await;
                return Ok(());
            }
            CMD_BLOCK_STATUS
                if sh.script == Misbehaviour::BlockStatusPastRange
                    && req.offset < sh.image.len() as u64 =>
            {
                sh.stats.misbehaved.fetch_add(1, Ordering::SeqCst);
                // Descriptors: (length, flags). The last one runs 4 GiB past the request.
                let mut extents = Vec::new();
                if req.offset < sh.data_end {
                    extents.push(((sh.data_end - req.offset) as u32, 0u32));
                }
                extents.push((u32::MAX, STATE_HOLE | STATE_ZERO));
                let mut p = CONTEXT_ID.to_be_bytes().to_vec();
                for (len, flags) in extents {
                    p.extend_from_slice(&len.to_be_bytes());
                    p.extend_from_slice(&flags.to_be_bytes());
                }
                encode_chunk_header(
                    &mut out,
                    None,
                    REPLY_FLAG_DONE,
                    CHUNK_BLOCK_STATUS,
                    req.cookie,
                    p.len() as u64,
                );
                out.extend_from_slice(&p);
                Then::Continue
            }
            CMD_READ
                if req
                    .offset
                    .checked_add(req.length)
                    .is_some_and(|e| e <= sh.image.len() as u64)
                    && !(limited && req.length > u64::from(SMALL_MAX_BLOCK)) =>
            {
                match sh.script {
                    Misbehaviour::BlockStatusPastRange => {}
                    Misbehaviour::ShrinkingMaxBlock if limited => {
                        sh.stats.limited_reads.fetch_add(1, Ordering::SeqCst);
                    }
                    Misbehaviour::ShrinkingMaxBlock => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    _ => {
                        sh.stats.misbehaved.fetch_add(1, Ordering::SeqCst);
                    }
                }
                misbehave(&mut out, sh, &req)
            }
            _ => {
                // Not a READ we can serve: a plain EINVAL, in the negotiated reply format.
                if structured {
                    let p = error_payload(EINVAL, "hostile server: bad request", None);
                    encode_chunk_header(
                        &mut out,
                        None,
                        REPLY_FLAG_DONE,
                        CHUNK_ERROR,
                        req.cookie,
                        p.len() as u64,
                    );
                    out.extend_from_slice(&p);
                } else {
                    encode_simple_reply(&mut out, req.cookie, EINVAL);
                }
                Then::Continue
            }
        };
        s.write_all(&out).await?;
        s.flush().await?;
        match then {
            Then::Continue => {}
            Then::Silence => {
                drain(&mut s).await;
                return Ok(());
            }
            Then::Close => {
                let _ = s.shutdown().await;
                return Ok(());
            }
        }
    }
}

/// An OFFSET_DATA chunk of `data` at `offset`.
fn data_chunk(out: &mut Vec<u8>, cookie: u64, offset: u64, data: &[u8], done: bool) {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    encode_chunk_header(
        out,
        None,
        flags,
        CHUNK_OFFSET_DATA,
        cookie,
        8 + data.len() as u64,
    );
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(data);
}

/// Append the scripted (wrong) answer to the READ `req` (in range of the image) to `out`.
fn misbehave(out: &mut Vec<u8>, sh: &Shared, req: &Request) -> Then {
    let (off, len) = (req.offset, req.length as usize);
    let data = &sh.image[off as usize..off as usize + len];
    let cookie = req.cookie;
    let half = len / 2;
    match sh.script {
        Misbehaviour::BadReplyMagic => {
            out.extend_from_slice(&GARBAGE_MAGIC.to_be_bytes());
            out.extend_from_slice(&0u32.to_be_bytes());
            out.extend_from_slice(&cookie.to_be_bytes());
            out.extend_from_slice(data);
            Then::Silence
        }
        Misbehaviour::UnknownCookie => {
            encode_simple_reply(out, cookie ^ 0x5a5a_0000_0000_0000, 0);
            out.extend_from_slice(data);
            Then::Silence
        }
        Misbehaviour::SimplePayloadShort => {
            encode_simple_reply(out, cookie, 0);
            out.extend_from_slice(&data[..len / 4]);
            Then::Close
        }
        Misbehaviour::ChunkLonger => {
            let mut longer = data.to_vec();
            longer.resize(len + 4096, 0);
            data_chunk(out, cookie, off, &longer, true);
            Then::Silence
        }
        Misbehaviour::ChunkOverlap => {
            let first = (half + 4096).min(len);
            data_chunk(out, cookie, off, &data[..first], false);
            data_chunk(out, cookie, off + half as u64, &data[half..], true);
            Then::Continue
        }
        Misbehaviour::ChunkGap => {
            data_chunk(out, cookie, off, &data[..len / 4], false);
            data_chunk(out, cookie, off + half as u64, &data[half..], true);
            Then::Continue
        }
        Misbehaviour::MissingDone => {
            data_chunk(out, cookie, off, data, false);
            Then::Continue
        }
        Misbehaviour::HugeLength => {
            encode_chunk_header(
                out,
                None,
                REPLY_FLAG_DONE,
                CHUNK_OFFSET_DATA,
                cookie,
                u64::from(u32::MAX),
            );
            out.extend_from_slice(&off.to_be_bytes());
            out.extend_from_slice(data);
            Then::Silence
        }
        Misbehaviour::ErrorChunk => {
            let p = error_payload(EIO, ERROR_MESSAGE, None);
            encode_chunk_header(
                out,
                None,
                REPLY_FLAG_DONE,
                CHUNK_ERROR,
                cookie,
                p.len() as u64,
            );
            out.extend_from_slice(&p);
            Then::Continue
        }
        Misbehaviour::StallMidReply | Misbehaviour::DisconnectMidReply => {
            encode_chunk_header(
                out,
                None,
                REPLY_FLAG_DONE,
                CHUNK_OFFSET_DATA,
                cookie,
                8 + len as u64,
            );
            out.extend_from_slice(&off.to_be_bytes());
            out.extend_from_slice(&data[..half]);
            if sh.script == Misbehaviour::StallMidReply {
                Then::Silence
            } else {
                Then::Close
            }
        }
        Misbehaviour::BlockStatusPastRange => {
            data_chunk(out, cookie, off, data, true);
            Then::Continue
        }
        // Answered correctly: these misbehave elsewhere (BadGreetingMagic and
        // WrongCertificate in the handshake, which never gets here).
        Misbehaviour::BadGreetingMagic
        | Misbehaviour::WrongCertificate
        | Misbehaviour::HugeSize
        | Misbehaviour::ShrinkingMaxBlock => {
            encode_simple_reply(out, cookie, 0);
            out.extend_from_slice(data);
            Then::Continue
        }
    }
}
