//! One NBD connection: a writer task that batches requests into as few TLS records and
//! syscalls as it can, and a reader task that matches replies to requests by cookie and
//! reads READ payloads straight into the request's buffer.

use super::{Address, ConnError, RequestError};
use crate::tls;
use bytes::{Buf, BytesMut};
use cbtstream_proto::nbd::consts::*;
use cbtstream_proto::nbd::transmission::parse_offset_data_prefix;
use cbtstream_proto::nbd::{
    encode_request, parse_chunk_payload, parse_reply_header, BlockStatusExtent, Chunk,
    ClientHandshake, HandshakeConfig, NbdError, Negotiated, ReadAssembly, ReplyHeader, Request,
    ServerError, Step,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Any byte stream we can run NBD over.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// Everything needed to open a connection.
#[derive(Clone)]
pub struct ConnectOptions {
    pub address: Address,
    /// The export name. Secret: never logged or put in an error.
    pub export: String,
    /// TLS config and server name; None for plaintext.
    pub tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    )>,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    /// Try NBD_OPT_EXTENDED_HEADERS (and fall back when refused).
    pub extended_headers: bool,
    /// Ask for the base:allocation meta context.
    pub meta_context: bool,
}

impl ConnectOptions {
    pub fn address_label(&self) -> String {
        match &self.address {
            Address::Tcp { host, port } => format!("{host}:{port}"),
            Address::Unix(p) => p.display().to_string(),
        }
    }
}

/// A finished request.
#[derive(Debug)]
pub enum Reply {
    Read(BytesMut),
    BlockStatus(Vec<BlockStatusExtent>),
}

/// What the connection sends back to the submitter: its tag and the outcome.
pub struct Completion {
    pub tag: u64,
    pub result: Result<Reply, RequestError>,
}

struct Pending {
    cmd: u16,
    offset: u64,
    len: u64,
    tag: u64,
    buf: Option<BytesMut>,
    assembly: ReadAssembly,
    extents: Vec<BlockStatusExtent>,
    reply_to: mpsc::UnboundedSender<Completion>,
}

impl Pending {
    fn complete(self, result: Result<Reply, RequestError>) {
        let _ = self.reply_to.send(Completion {
            tag: self.tag,
            result,
        });
    }
}

#[derive(Default)]
struct PendingMap {
    map: HashMap<u64, Pending>,
    /// Set once the reader has died; later submissions fail at once.
    dead: Option<ConnError>,
}

enum Submit {
    Request(Pending),
    Disconnect,
}

/// An open, negotiated connection.
pub struct Connection {
    pub negotiated: Negotiated,
    submit: mpsc::UnboundedSender<Submit>,
    pending: Arc<Mutex<PendingMap>>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

impl Connection {
    /// Connect, run the handshake (with STARTTLS when TLS is configured), and start the
    /// reader and writer tasks.
    pub async fn connect(opts: &ConnectOptions) -> Result<Connection, ConnError> {
        let label = opts.address_label();
        let stream: Box<dyn Io> = match &opts.address {
            Address::Tcp { host, port } => {
                let s = tokio::time::timeout(
                    opts.connect_timeout,
                    tokio::net::TcpStream::connect((host.as_str(), *port)),
                )
                .await
                .map_err(|_| ConnError::ConnectTimeout(label.clone()))?
                .map_err(|e| ConnError::Connect {
                    addr: label.clone(),
                    source: Arc::new(e),
                })?;
                let _ = s.set_nodelay(true);
                Box::new(s)
            }
            Address::Unix(path) => {
                let s = tokio::time::timeout(
                    opts.connect_timeout,
                    tokio::net::UnixStream::connect(path),
                )
                .await
                .map_err(|_| ConnError::ConnectTimeout(label.clone()))?
                .map_err(|e| ConnError::Connect {
                    addr: label.clone(),
                    source: Arc::new(e),
                })?;
                Box::new(s)
            }
        };
        let (stream, negotiated) =
            tokio::time::timeout(opts.handshake_timeout, handshake(stream, opts))
                .await
                .map_err(|_| ConnError::HandshakeTimeout(label.clone()))??;
        tracing::debug!(
            server = %label,
            size = negotiated.size,
            flags = format_args!("{:#x}", negotiated.transmission_flags),
            structured = negotiated.structured,
            extended = negotiated.extended,
            block_status = negotiated.meta_context.is_some(),
            export_name_fallback = negotiated.via_export_name,
            "NBD connection negotiated"
        );
        let (rd, wr) = tokio::io::split(stream);
        let pending = Arc::new(Mutex::new(PendingMap::default()));
        let (submit, submit_rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(reader_task(rd, negotiated.clone(), pending.clone()));
        let writer = tokio::spawn(writer_task(
            wr,
            negotiated.extended,
            submit_rx,
            pending.clone(),
        ));
        Ok(Connection {
            negotiated,
            submit,
            pending,
            reader,
            writer,
        })
    }

    /// Queue a READ of `len` bytes at `offset` into `buf` (resized to `len`). The outcome
    /// comes back on `reply_to` with `tag`.
    pub fn read(
        &self,
        tag: u64,
        offset: u64,
        len: u64,
        mut buf: BytesMut,
        reply_to: mpsc::UnboundedSender<Completion>,
    ) {
        buf.clear();
        buf.resize(len as usize, 0);
        self.send(Pending {
            cmd: CMD_READ,
            offset,
            len,
            tag,
            buf: Some(buf),
            assembly: ReadAssembly::new(offset, len),
            extents: Vec::new(),
            reply_to,
        });
    }

    /// Queue a BLOCK_STATUS for `base:allocation` (needs a negotiated meta context).
    pub fn block_status(
        &self,
        tag: u64,
        offset: u64,
        len: u64,
        reply_to: mpsc::UnboundedSender<Completion>,
    ) {
        self.send(Pending {
            cmd: CMD_BLOCK_STATUS,
            offset,
            len,
            tag,
            buf: None,
            assembly: ReadAssembly::new(offset, len),
            extents: Vec::new(),
            reply_to,
        });
    }

    fn send(&self, p: Pending) {
        if let Err(mpsc::error::SendError(Submit::Request(p))) =
            self.submit.send(Submit::Request(p))
        {
            let err = self
                .pending
                .lock()
                .map(|g| g.dead.clone())
                .ok()
                .flatten()
                .unwrap_or(ConnError::Closed);
            p.complete(Err(RequestError::Connection(err)));
        }
    }

    /// Send NBD_CMD_DISC and close TLS cleanly, waiting briefly for the writer to finish.
    pub async fn close(mut self) {
        let _ = self.submit.send(Submit::Disconnect);
        let writer = std::mem::replace(&mut self.writer, tokio::spawn(async {}));
        let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    }
}

/// Run the handshake, upgrading to TLS when the state machine says so.
async fn handshake(
    mut stream: Box<dyn Io>,
    opts: &ConnectOptions,
) -> Result<(Box<dyn Io>, Negotiated), ConnError> {
    let mut cfg = HandshakeConfig::new(opts.export.clone(), opts.tls.is_some());
    cfg.extended_headers = opts.extended_headers;
    cfg.meta_context = opts.meta_context;
    let mut hs = ClientHandshake::new(cfg)?;
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        match hs.step(&mut buf)? {
            Step::Send(bytes) => {
                stream.write_all(&bytes).await?;
                stream.flush().await?;
            }
            Step::NeedBytes => match stream.read_buf(&mut buf).await {
                Ok(0) => return Err(hs.eof().into()),
                Ok(_) => {}
                // A TLS peer that closes without close_notify.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Err(hs.eof().into())
                }
                Err(e) => return Err(e.into()),
            },
            Step::StartTls => {
                let Some((config, name)) = &opts.tls else {
                    return Err(ConnError::Protocol(NbdError::TlsNotSupported(
                        "unexpected".into(),
                    )));
                };
                if !buf.is_empty() {
                    return Err(ConnError::Protocol(NbdError::MalformedOptionReply(
                        "server sent data before the TLS handshake",
                    )));
                }
                let connector = tokio_rustls::TlsConnector::from(config.clone());
                let tls =
                    connector
                        .connect(name.clone(), stream)
                        .await
                        .map_err(|e| ConnError::Tls {
                            addr: opts.address_label(),
                            why: tls::describe_io_error(&e),
                        })?;
                stream = Box::new(tls);
                hs.tls_established();
            }
            Step::Done(n) => {
                if !buf.is_empty() {
                    return Err(ConnError::Protocol(NbdError::MalformedOptionReply(
                        "unexpected bytes after the handshake",
                    )));
                }
                return Ok((stream, n));
            }
        }
    }
}

async fn writer_task(
    mut wr: WriteHalf<Box<dyn Io>>,
    extended: bool,
    mut rx: mpsc::UnboundedReceiver<Submit>,
    pending: Arc<Mutex<PendingMap>>,
) {
    let mut next_cookie: u64 = 1;
    let mut out = Vec::with_capacity(64 * 32);
    while let Some(first) = rx.recv().await {
        out.clear();
        let mut disconnect = false;
        let mut item = Some(first);
        // Batch everything already queued into one write.
        while let Some(s) = item.take() {
            match s {
                Submit::Disconnect => {
                    let req = Request {
                        cmd: CMD_DISC,
                        flags: 0,
                        cookie: 0,
                        offset: 0,
                        length: 0,
                    };
                    let _ = encode_request(&mut out, extended, &req);
                    disconnect = true;
                    break;
                }
                Submit::Request(p) => {
                    let cookie = next_cookie;
                    next_cookie = next_cookie.wrapping_add(1);
                    let req = Request {
                        cmd: p.cmd,
                        flags: 0,
                        cookie,
                        offset: p.offset,
                        length: p.len,
                    };
                    let mut guard = match pending.lock() {
                        Ok(g) => g,
                        Err(_) => return,
                    };
                    if let Some(err) = guard.dead.clone() {
                        drop(guard);
                        p.complete(Err(RequestError::Connection(err)));
                    } else if let Err(e) = encode_request(&mut out, extended, &req) {
                        drop(guard);
                        p.complete(Err(RequestError::Connection(ConnError::Protocol(e))));
                    } else {
                        guard.map.insert(cookie, p);
                    }
                }
            }
            if out.len() < 64 * 1024 {
                item = rx.try_recv().ok();
            }
        }
        let res = async {
            wr.write_all(&out).await?;
            wr.flush().await
        }
        .await;
        if let Err(e) = res {
            fail_all(&pending, ConnError::from(e));
            return;
        }
        if disconnect {
            let _ = wr.shutdown().await;
            return;
        }
    }
}

fn fail_all(pending: &Mutex<PendingMap>, err: ConnError) {
    let drained: Vec<Pending> = match pending.lock() {
        Ok(mut g) => {
            g.dead.get_or_insert(err.clone());
            g.map.drain().map(|(_, p)| p).collect()
        }
        Err(_) => return,
    };
    for p in drained {
        p.complete(Err(RequestError::Connection(err.clone())));
    }
}

async fn reader_task(
    rd: ReadHalf<Box<dyn Io>>,
    negotiated: Negotiated,
    pending: Arc<Mutex<PendingMap>>,
) {
    let mut reader = ReplyReader {
        rd,
        buf: BytesMut::with_capacity(256 * 1024),
        negotiated,
        active: HashMap::new(),
        pending: pending.clone(),
    };
    let err = match reader.run().await {
        Ok(()) => ConnError::Closed,
        Err(e) => e,
    };
    for (_, (_, p)) in reader.active.drain() {
        p.complete(Err(RequestError::Connection(err.clone())));
    }
    fail_all(&pending, err);
}

struct ReplyReader {
    rd: ReadHalf<Box<dyn Io>>,
    buf: BytesMut,
    negotiated: Negotiated,
    /// Requests whose structured reply has started.
    active: HashMap<u64, (u64, Pending)>,
    pending: Arc<Mutex<PendingMap>>,
}

impl ReplyReader {
    async fn fill(&mut self, n: usize) -> Result<(), ConnError> {
        while self.buf.len() < n {
            self.buf.reserve(n - self.buf.len());
            if self.rd.read_buf(&mut self.buf).await? == 0 {
                return Err(ConnError::Eof);
            }
        }
        Ok(())
    }

    /// Copy exactly `dst.len()` payload bytes: first what is buffered, then straight from
    /// the stream into `dst`, with no intermediate buffer.
    async fn read_into(&mut self, dst: &mut [u8]) -> Result<(), ConnError> {
        let have = self.buf.len().min(dst.len());
        dst[..have].copy_from_slice(&self.buf[..have]);
        self.buf.advance(have);
        if have < dst.len() {
            self.rd.read_exact(&mut dst[have..]).await?;
        }
        Ok(())
    }

    fn take_pending(&mut self, cookie: u64) -> Result<Pending, ConnError> {
        let mut g = self.pending.lock().map_err(|_| ConnError::Closed)?;
        g.map
            .remove(&cookie)
            .ok_or(ConnError::Protocol(NbdError::UnknownCookie(cookie)))
    }

    async fn run(&mut self) -> Result<(), ConnError> {
        let (structured, extended) = (self.negotiated.structured, self.negotiated.extended);
        loop {
            let (header, hlen) = loop {
                if let Some(h) = parse_reply_header(&self.buf, structured, extended)? {
                    break h;
                }
                if self.rd.read_buf(&mut self.buf).await? == 0 {
                    // A clean close between replies with nothing outstanding is not an error.
                    return Err(ConnError::Eof);
                }
            };
            self.buf.advance(hlen);
            match header {
                ReplyHeader::Simple { cookie, error } => {
                    if self.active.contains_key(&cookie) {
                        return Err(NbdError::AfterDone(cookie).into());
                    }
                    let mut p = self.take_pending(cookie)?;
                    if error != 0 {
                        p.complete(Err(RequestError::Server(ServerError {
                            code: error,
                            message: None,
                            offset: None,
                        })));
                        continue;
                    }
                    if p.cmd != CMD_READ || structured {
                        // A successful simple reply to BLOCK_STATUS, or to READ once structured
                        // replies are on, is a protocol violation.
                        return Err(NbdError::UnexpectedSimpleReply.into());
                    }
                    let mut buf = p.buf.take().unwrap_or_default();
                    self.read_into(&mut buf[..]).await?;
                    p.complete(Ok(Reply::Read(buf)));
                }
                ReplyHeader::Chunk {
                    flags,
                    typ,
                    cookie,
                    offset,
                    length,
                } => {
                    let (_, mut p) = match self.active.remove(&cookie) {
                        Some(a) => a,
                        None => (cookie, self.take_pending(cookie)?),
                    };
                    if let Some(o) = offset {
                        if o != p.offset {
                            return Err(NbdError::HeaderOffsetMismatch {
                                expected: p.offset,
                                got: o,
                            }
                            .into());
                        }
                    }
                    self.chunk(&mut p, typ, length).await?;
                    if flags & REPLY_FLAG_DONE != 0 {
                        self.finish(p)?;
                    } else {
                        self.active.insert(cookie, (cookie, p));
                    }
                }
            }
        }
    }

    async fn chunk(&mut self, p: &mut Pending, typ: u16, length: u64) -> Result<(), ConnError> {
        if typ == CHUNK_OFFSET_DATA {
            if p.cmd != CMD_READ {
                return Err(NbdError::UnexpectedChunk("OFFSET_DATA").into());
            }
            if length < 9 {
                return Err(NbdError::MalformedChunk {
                    kind: "OFFSET_DATA",
                    why: "shorter than 9 bytes",
                }
                .into());
            }
            self.fill(8).await?;
            let (off, dlen) = parse_offset_data_prefix(length, &self.buf[..8])?;
            self.buf.advance(8);
            let range = p.assembly.cover(off, dlen)?;
            let mut buf = p.buf.take().unwrap_or_default();
            let res = self.read_into(&mut buf[range]).await;
            p.buf = Some(buf);
            return res;
        }
        // Every other chunk is small (block status is bounded by MAX_CHUNK_PAYLOAD, checked
        // in the header): buffer it whole and parse it.
        let len = length as usize;
        self.fill(len).await?;
        let payload = self.buf.split_to(len);
        match parse_chunk_payload(typ, &payload, self.negotiated.extended)? {
            Chunk::None => {}
            Chunk::OffsetHole { offset, length } => {
                if p.cmd != CMD_READ {
                    return Err(NbdError::UnexpectedChunk("OFFSET_HOLE").into());
                }
                let range = p.assembly.cover(offset, length)?;
                if let Some(buf) = p.buf.as_mut() {
                    buf[range].fill(0);
                }
            }
            Chunk::BlockStatus { context, extents } => {
                if p.cmd != CMD_BLOCK_STATUS || Some(context) != self.negotiated.meta_context {
                    return Err(NbdError::UnexpectedChunk("BLOCK_STATUS").into());
                }
                if !p.extents.is_empty() {
                    return Err(NbdError::UnexpectedChunk("second BLOCK_STATUS").into());
                }
                p.extents = extents;
            }
            Chunk::Error(e) => p.assembly.fail(e),
        }
        Ok(())
    }

    fn finish(&mut self, mut p: Pending) -> Result<(), ConnError> {
        if p.cmd == CMD_BLOCK_STATUS {
            if let Err(Ok(e)) = p.assembly.finish() {
                p.complete(Err(RequestError::Server(e)));
            } else if p.extents.is_empty() {
                return Err(NbdError::Incomplete {
                    covered: 0,
                    expected: p.len,
                }
                .into());
            } else {
                let ext = std::mem::take(&mut p.extents);
                p.complete(Ok(Reply::BlockStatus(ext)));
            }
            return Ok(());
        }
        match p.assembly.finish() {
            Ok(()) => {
                let buf = p.buf.take().unwrap_or_default();
                p.complete(Ok(Reply::Read(buf)));
                Ok(())
            }
            Err(Ok(server)) => {
                p.complete(Err(RequestError::Server(server)));
                Ok(())
            }
            Err(Err(proto)) => Err(proto.into()),
        }
    }
}
