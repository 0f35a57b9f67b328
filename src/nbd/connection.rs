//! One NBD connection: a writer task that batches requests into as few TLS records and
//! syscalls as it can, and a reader task that matches replies to requests by cookie and
//! reads READ payloads straight into the request's buffer. It is one of the engine's
//! [`SourceConnection`]s.

use super::{Address, ConnError, RequestError};
use crate::engine::source::{self, Completion, Reply, SourceConnection, SourceError};
use crate::tls;
use bytes::{Buf, BufMut, BytesMut};
use cbtstream_proto::nbd::consts::*;
use cbtstream_proto::nbd::{
    encode_request, ClientHandshake, Event, HandshakeConfig, NbdError, Negotiated, Outcome,
    Outstanding, Replies, Request, Step,
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

struct Pending {
    cmd: u16,
    offset: u64,
    len: u64,
    tag: u64,
    /// The READ's buffer: its length is how far it is filled.
    buf: BytesMut,
    reply_to: mpsc::UnboundedSender<Completion>,
}

impl Pending {
    fn complete(self, result: Result<Reply, RequestError>) {
        let _ = self.reply_to.send(Completion {
            tag: self.tag,
            result: result.map_err(source::RequestError::from),
        });
    }
}

impl From<RequestError> for source::RequestError {
    fn from(e: RequestError) -> Self {
        match e {
            RequestError::Server(e) => source::RequestError::Server(SourceError::new(e)),
            RequestError::Connection(e) => source::RequestError::Connection(e.into()),
        }
    }
}

impl From<ConnError> for SourceError {
    fn from(e: ConnError) -> Self {
        // XenServer closes a connection over its limit before the greeting.
        if matches!(e, ConnError::Protocol(NbdError::ClosedBeforeGreeting)) {
            SourceError::connection_limit(e)
        } else {
            SourceError::new(e)
        }
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
    /// The shortest option round trip of the handshake: the path's round-trip time, to size
    /// the reads in flight.
    pub rtt: Option<Duration>,
    submit: mpsc::UnboundedSender<Submit>,
    pending: Arc<Mutex<PendingMap>>,
    reader: JoinHandle<()>,
    writer: Option<JoinHandle<()>>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
        if let Some(w) = &self.writer {
            w.abort();
        }
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
        let (stream, negotiated, rtt) =
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
            rtt,
            submit,
            pending,
            reader,
            writer: Some(writer),
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
        // Reserve only: the reader appends the payload, so the buffer is never zeroed first.
        buf.clear();
        buf.reserve(len as usize);
        self.send(Pending {
            cmd: CMD_READ,
            offset,
            len,
            tag,
            buf,
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
            buf: BytesMut::new(),
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
        if let Some(writer) = self.writer.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
        }
    }
}

impl SourceConnection for Connection {
    fn size(&self) -> u64 {
        self.negotiated.size
    }

    fn max_request(&self) -> u64 {
        self.negotiated.max_request()
    }

    fn alignment(&self) -> u64 {
        self.negotiated.alignment()
    }

    fn has_block_status(&self) -> bool {
        self.negotiated.meta_context.is_some()
    }

    fn multi_conn_safe(&self) -> bool {
        self.negotiated.can_multi_conn() || self.negotiated.read_only()
    }

    fn max_inflight(&self) -> usize {
        usize::MAX
    }

    fn rtt(&self) -> Option<Duration> {
        self.rtt
    }

    fn read(
        &self,
        tag: u64,
        offset: u64,
        len: u64,
        buf: BytesMut,
        reply_to: mpsc::UnboundedSender<Completion>,
    ) {
        Connection::read(self, tag, offset, len, buf, reply_to)
    }

    fn block_status(
        &self,
        tag: u64,
        offset: u64,
        len: u64,
        reply_to: mpsc::UnboundedSender<Completion>,
    ) {
        Connection::block_status(self, tag, offset, len, reply_to)
    }

    fn close(self: Box<Self>) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(Connection::close(*self))
    }
}

/// Run the handshake, upgrading to TLS when the state machine says so. Also returns the
/// shortest time from sending an option to the first bytes of its reply.
async fn handshake(
    mut stream: Box<dyn Io>,
    opts: &ConnectOptions,
) -> Result<(Box<dyn Io>, Negotiated, Option<Duration>), ConnError> {
    let mut sent_at: Option<std::time::Instant> = None;
    let mut rtt: Option<Duration> = None;
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
                sent_at = Some(std::time::Instant::now());
            }
            Step::NeedBytes => match stream.read_buf(&mut buf).await {
                Ok(0) => return Err(hs.eof().into()),
                Ok(_) => {
                    if let Some(t) = sent_at.take() {
                        let d = t.elapsed();
                        rtt = Some(rtt.map_or(d, |r| r.min(d)));
                    }
                }
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
                let conn = tls.get_ref().1;
                tracing::debug!(
                    version = ?conn.protocol_version(),
                    suite = ?conn.negotiated_cipher_suite().map(|s| s.suite()),
                    "TLS established"
                );
                stream = Box::new(tls);
                sent_at = None;
                hs.tls_established();
            }
            Step::Done(n) => {
                if !buf.is_empty() {
                    return Err(ConnError::Protocol(NbdError::MalformedOptionReply(
                        "unexpected bytes after the handshake",
                    )));
                }
                return Ok((stream, n, rtt));
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
        replies: Replies::new(&negotiated),
        active: HashMap::new(),
        pending: pending.clone(),
    };
    let err = match reader.run().await {
        Ok(()) => ConnError::Closed,
        Err(e) => e,
    };
    for (_, p) in reader.active.drain() {
        p.complete(Err(RequestError::Connection(err.clone())));
    }
    fail_all(&pending, err);
}

/// Moves reply bytes from the stream to where `Replies` says they go.
struct ReplyReader {
    rd: ReadHalf<Box<dyn Io>>,
    /// Bytes read but not consumed yet.
    buf: BytesMut,
    replies: Replies,
    /// Requests whose reply has started (known to `replies`).
    active: HashMap<u64, Pending>,
    pending: Arc<Mutex<PendingMap>>,
}

impl ReplyReader {
    async fn run(&mut self) -> Result<(), ConnError> {
        loop {
            match self.replies.poll(&mut self.buf)? {
                Event::NeedBytes(n) => self.fill(n).await?,
                Event::NeedRequest(cookie) => {
                    let p = self.take_pending(cookie)?;
                    let req = Outstanding {
                        cmd: p.cmd,
                        offset: p.offset,
                        length: p.len,
                    };
                    // Kept before `begin` can fail, so that the exit path fails it too.
                    self.active.insert(cookie, p);
                    self.replies.begin(cookie, req)?;
                }
                Event::Data { cookie, range } => {
                    let mut buf = std::mem::take(&mut self.active_mut(cookie)?.buf);
                    let res = self.place(&mut buf, range).await;
                    self.active_mut(cookie)?.buf = buf;
                    res?;
                }
                Event::Hole { cookie, range } => {
                    let buf = &mut self.active_mut(cookie)?.buf;
                    // Zero what is already filled (it may hold a pooled buffer's old bytes),
                    // then extend with zeroes.
                    let filled = range.end.min(buf.len());
                    if range.start < filled {
                        buf[range.start..filled].fill(0);
                    }
                    if buf.len() < range.end {
                        buf.resize(range.end, 0);
                    }
                }
                Event::Done { cookie, outcome } => self.complete(cookie, outcome)?,
            }
        }
    }

    fn active_mut(&mut self, cookie: u64) -> Result<&mut Pending, ConnError> {
        self.active
            .get_mut(&cookie)
            .ok_or(ConnError::Protocol(NbdError::UnknownCookie(cookie)))
    }

    fn complete(&mut self, cookie: u64, outcome: Outcome) -> Result<(), ConnError> {
        let mut p = self
            .active
            .remove(&cookie)
            .ok_or(ConnError::Protocol(NbdError::UnknownCookie(cookie)))?;
        let result = match outcome {
            Outcome::Read => {
                if p.buf.len() as u64 != p.len {
                    let covered = p.buf.len() as u64;
                    let expected = p.len;
                    self.active.insert(cookie, p);
                    return Err(NbdError::Incomplete { covered, expected }.into());
                }
                Ok(Reply::Read(std::mem::take(&mut p.buf)))
            }
            Outcome::BlockStatus(extents) => Ok(Reply::BlockStatus(extents)),
            Outcome::Failed(e) => Err(RequestError::Server(e)),
        };
        p.complete(result);
        Ok(())
    }

    async fn fill(&mut self, n: usize) -> Result<(), ConnError> {
        while self.buf.len() < n {
            self.buf.reserve(n - self.buf.len());
            if self.rd.read_buf(&mut self.buf).await? == 0 {
                return Err(ConnError::Eof);
            }
        }
        Ok(())
    }

    /// Put the next `range.len()` payload bytes at `range` of a request's buffer. The
    /// buffer's length is how far it is filled: data that continues it (the usual case: one
    /// chunk, or chunks in order) is appended straight from the stream into the buffer's
    /// spare capacity, with no zeroing and no intermediate copy; data past it leaves a zeroed
    /// gap; data inside it (an earlier chunk arriving late) is written in place. `Replies`
    /// has already rejected overlaps, so a range starting inside the filled part also ends
    /// inside it.
    async fn place(
        &mut self,
        buf: &mut BytesMut,
        range: std::ops::Range<usize>,
    ) -> Result<(), ConnError> {
        if range.start < buf.len() {
            let start = range.start as u64;
            let dst = buf
                .get_mut(range)
                .ok_or(ConnError::Protocol(NbdError::Overlap(start)))?;
            return self.read_into(dst).await;
        }
        if range.start > buf.len() {
            buf.resize(range.start, 0);
        }
        let n = range.end - range.start;
        let have = self.buf.len().min(n);
        buf.extend_from_slice(&self.buf[..have]);
        self.buf.advance(have);
        let mut rest = n - have;
        buf.reserve(rest);
        while rest > 0 {
            let got = self.rd.read_buf(&mut (&mut *buf).limit(rest)).await?;
            if got == 0 {
                return Err(ConnError::Eof);
            }
            rest -= got;
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
}

#[cfg(test)]
mod tests {
    //! The client against a scripted server on a Unix socket: structured replies whose
    //! chunks arrive out of order, with holes, and chunks that overlap.
    use super::*;
    use cbtstream_proto::nbd::server::*;
    use cbtstream_proto::nbd::transmission::parse_request;
    use tokio::net::UnixListener;

    async fn read_some(s: &mut tokio::net::UnixStream, buf: &mut Vec<u8>) {
        let mut tmp = [0u8; 4096];
        let n = s.read(&mut tmp).await.unwrap();
        assert!(n > 0, "client closed");
        buf.extend_from_slice(&tmp[..n]);
    }

    /// Plaintext handshake: structured replies yes, extended headers and meta context no.
    async fn serve_handshake(s: &mut tokio::net::UnixStream, size: u64) -> Vec<u8> {
        let mut out = Vec::new();
        encode_greeting(&mut out, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        s.write_all(&out).await.unwrap();
        let mut buf = Vec::new();
        while buf.len() < 4 {
            read_some(s, &mut buf).await;
        }
        buf.drain(..4);
        loop {
            let (opt, n) = loop {
                if let Some(x) = parse_client_option(&buf).unwrap() {
                    break x;
                }
                read_some(s, &mut buf).await;
            };
            buf.drain(..n);
            let mut out = Vec::new();
            match opt.option {
                OPT_STRUCTURED_REPLY => encode_option_reply(&mut out, opt.option, REP_ACK, &[]),
                OPT_GO => {
                    encode_option_reply(&mut out, opt.option, REP_INFO, &info_export(size, 0x0003));
                    encode_option_reply(&mut out, opt.option, REP_ACK, &[]);
                    s.write_all(&out).await.unwrap();
                    return buf;
                }
                _ => encode_option_reply(&mut out, opt.option, REP_ERR_UNSUP, &[]),
            }
            s.write_all(&out).await.unwrap();
        }
    }

    fn data_chunk(out: &mut Vec<u8>, cookie: u64, offset: u64, byte: u8, len: usize, done: bool) {
        let flags = if done { REPLY_FLAG_DONE } else { 0 };
        encode_chunk_header(out, None, flags, CHUNK_OFFSET_DATA, cookie, 8 + len as u64);
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend(std::iter::repeat_n(byte, len));
    }

    fn hole_chunk(out: &mut Vec<u8>, cookie: u64, offset: u64, len: u32) {
        encode_chunk_header(out, None, 0, CHUNK_OFFSET_HOLE, cookie, 12);
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
    }

    /// What the engine learns from an NBD error: the same text, and whether the server is at
    /// its connection limit (XenServer closes a 17th connection before the greeting).
    #[test]
    fn the_engine_sees_the_nbd_error_and_the_connection_limit() {
        let limit = ConnError::Protocol(NbdError::ClosedBeforeGreeting);
        let e = SourceError::from(limit.clone());
        assert!(e.is_connection_limit());
        assert_eq!(e.to_string(), limit.to_string());
        assert!(!SourceError::from(ConnError::Eof).is_connection_limit());
    }

    #[tokio::test]
    async fn chunks_out_of_order_with_holes_and_overlaps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nbd.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = serve_handshake(&mut s, 1 << 20).await;
            // Two reads: the first answered out of order with a hole, the second with
            // chunks that overlap.
            let mut reqs = Vec::new();
            while reqs.len() < 2 {
                match parse_request(&buf, false).unwrap() {
                    Some((r, n)) => {
                        buf.drain(..n);
                        reqs.push(r);
                    }
                    None => read_some(&mut s, &mut buf).await,
                }
            }
            let (a, b) = (reqs[0], reqs[1]);
            let mut out = Vec::new();
            data_chunk(&mut out, a.cookie, 8192, b'C', 4096, false);
            hole_chunk(&mut out, a.cookie, 4096, 4096);
            data_chunk(&mut out, a.cookie, 0, b'A', 4096, true);
            data_chunk(&mut out, b.cookie, 0, b'X', 4096, false);
            data_chunk(&mut out, b.cookie, 2048, b'Y', 4096, true);
            s.write_all(&out).await.unwrap();
            let _ = s.read(&mut [0u8; 64]).await;
        });
        let opts = ConnectOptions {
            address: Address::Unix(path),
            export: "e".into(),
            tls: None,
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(5),
            extended_headers: true,
            meta_context: true,
        };
        let conn = Connection::connect(&opts).await.unwrap();
        assert!(conn.negotiated.structured && !conn.negotiated.extended);
        // The handshake's option round trips give the path's round trip (for the pipeline).
        assert!(conn.rtt.is_some_and(|r| r < Duration::from_secs(5)));
        let (tx, mut rx) = mpsc::unbounded_channel();
        // A pooled buffer with stale contents: holes must still read as zeroes.
        let mut stale = BytesMut::new();
        stale.extend_from_slice(&[0xee; 20000]);
        conn.read(1, 0, 12288, stale, tx.clone());
        conn.read(2, 0, 8192, BytesMut::new(), tx.clone());
        let first = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        let Ok(Reply::Read(data)) = first.result else {
            panic!("first read failed")
        };
        assert_eq!(first.tag, 1);
        assert!(data[..4096].iter().all(|&b| b == b'A'));
        assert!(data[4096..8192].iter().all(|&b| b == 0));
        assert!(data[8192..].iter().all(|&b| b == b'C'));
        let second = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(second.tag, 2);
        let overlap = match &second.result {
            Err(source::RequestError::Connection(e)) => e.downcast_ref::<ConnError>(),
            _ => None,
        };
        assert!(
            matches!(overlap, Some(ConnError::Protocol(NbdError::Overlap(_)))),
            "expected an overlap error, got {:?}",
            second.result.map(|_| ())
        );
        drop(conn);
        server.abort();
    }
}
