//! A disk read as one file of an HTTPS server, by byte ranges: how the vSphere datastore
//! file service serves a frozen disk (`GET /folder/<path>-flat.vmdk?dcPath=..&dsName=..`
//! with `Range: bytes=a-b`, authenticated by a session or service-ticket cookie).
//!
//! Each engine connection is one kept-alive HTTP/1.1 connection over TLS (hyper, with the
//! [`Trust`] rules of [`crate::tls`]). HTTP/1.1 answers one request at a time, so "many
//! ranges in flight" means several connections: the engine's connection count. A connection
//! holds two reads, one on the wire and the next ready to go, so it never waits for the
//! engine between two answers.
//!
//! Every answer is checked: `206` with a `Content-Range` naming exactly the bytes asked for
//! and a body of exactly that length, copied straight into the engine's buffer (never more
//! than asked is kept). What the engine retries:
//! * another status (a `5xx`, a `404`): the server's error; the connection stays in use
//!   when the error's body is short, and the read is retried after a delay;
//! * a lost connection, a `200` (the server ignored `Range`), a wrong `Content-Range`, a
//!   body shorter or longer than asked: the connection is dropped, the read retried on a
//!   new one;
//! * `401`/`403` ("not authorized"): as a lost connection, and the next connection first
//!   asks [`RenewHeaders`] for fresh headers (a new session cookie) when there is one.
//!
//! The request headers (the cookie) are secrets: they never reach a log, an error or a
//! `Debug` output. Errors name the server by `host:port` and the read by its offset; the
//! URL's path and query are not quoted either.

use crate::engine::connector::Connecting;
use crate::engine::source::{Completion, Reply, RequestError, SourceConnection, SourceError};
use crate::engine::Connector;
use crate::tls::{self, Trust};
use bytes::{Bytes, BytesMut};
use cbtstream_proto::http_range::{check_content_range, decimal, range_header, RangeError};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::header::{CONTENT_LENGTH, CONTENT_RANGE, HOST, RANGE, USER_AGENT};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The longest read one request asks for.
const MAX_REQUEST: u64 = 32 << 20;

/// Reads a connection holds: one on the wire, one ready to send.
const QUEUED_READS: usize = 2;

/// The body of an error answer read to keep the connection, at most; a longer one closes it.
const ERROR_BODY_LIMIT: usize = 64 << 10;

/// Headers sent with every request (the session cookie). Secret: `Debug` shows the names
/// only, and the values are marked sensitive for hyper.
#[derive(Clone, Default)]
pub struct RequestHeaders(HeaderMap);

impl RequestHeaders {
    pub fn new() -> RequestHeaders {
        RequestHeaders::default()
    }

    /// Add a header. An invalid name or value is refused without quoting the value.
    pub fn insert(&mut self, name: &str, value: &str) -> Result<(), HttpRangeError> {
        let bad = |why| HttpRangeError::Header {
            name: name
                .chars()
                .filter(char::is_ascii_graphic)
                .take(64)
                .collect(),
            why,
        };
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| bad("not a header name"))?;
        let mut value = HeaderValue::from_str(value)
            .map_err(|_| bad("the value holds characters a header cannot carry"))?;
        value.set_sensitive(true);
        self.0.append(name, value);
        Ok(())
    }

    /// A `Cookie` header: `vmware_soap_session=...` or `vmware_cgi_ticket=...`.
    pub fn cookie(value: &str) -> Result<RequestHeaders, HttpRangeError> {
        let mut h = RequestHeaders::new();
        h.insert("cookie", value)?;
        Ok(h)
    }
}

impl fmt::Debug for RequestHeaders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// Fresh request headers after the server refused the current ones (a new session cookie).
pub trait RenewHeaders: Send + Sync {
    fn renew(
        &self,
    ) -> Pin<Box<dyn Future<Output = Result<RequestHeaders, RenewError>> + Send + '_>>;
}

/// Why renewing failed; its text must not hold a secret.
pub type RenewError = Box<dyn std::error::Error + Send + Sync>;

/// How to reach the file.
#[derive(Debug, Clone)]
pub struct HttpRangeOptions {
    /// `https://host[:port]/path?query`. Only https: the headers carry a session.
    pub url: String,
    pub trust: Trust,
    /// The name the certificate must be for; the URL's host when `None`.
    pub server_name: Option<String>,
    pub headers: RequestHeaders,
    /// The file's size, when the caller knows it; else learnt with `HEAD`.
    pub size: Option<u64>,
    /// TCP connect and TLS handshake (and the `HEAD`).
    pub connect_timeout: Duration,
}

impl HttpRangeOptions {
    pub fn new(url: impl Into<String>, trust: Trust, headers: RequestHeaders) -> Self {
        HttpRangeOptions {
            url: url.into(),
            trust,
            server_name: None,
            headers,
            size: None,
            connect_timeout: Duration::from_secs(30),
        }
    }
}

/// A read, for messages.
#[derive(Debug, Clone, Copy)]
pub struct Span {
    pub offset: u64,
    pub len: u64,
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the read of {} bytes at offset {}",
            self.len, self.offset
        )
    }
}

/// Why the HTTPS range source failed. Never holds a header value or the URL's path.
#[derive(Debug, thiserror::Error)]
pub enum HttpRangeError {
    #[error("invalid URL: {0}")]
    Url(&'static str),
    #[error("invalid request header {name:?}: {why}")]
    Header { name: String, why: &'static str },
    #[error("TLS setup for {addr}: {why}")]
    TlsConfig { addr: String, why: String },
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("connect to {addr} timed out after {after:?}")]
    ConnectTimeout { addr: String, after: Duration },
    #[error("TLS handshake with {addr} failed: {why}")]
    Tls { addr: String, why: String },
    #[error("HTTP exchange with {addr} failed: {source}")]
    Http { addr: String, source: hyper::Error },
    #[error(
        "{addr} answered {what} with HTTP {status}: not authorized (the session cookie or \
         ticket was refused, or has expired)"
    )]
    NotAuthorized {
        addr: String,
        what: String,
        status: u16,
    },
    #[error("{addr} answered {what} with HTTP {status}")]
    Status {
        addr: String,
        what: String,
        status: u16,
    },
    #[error("{addr} answered {span} with 200 and the whole file: it ignores Range")]
    NotPartial { addr: String, span: Span },
    #[error("{addr} answered {span} without a Content-Range")]
    NoContentRange { addr: String, span: Span },
    #[error("{addr}, {span}: {source}")]
    ContentRange {
        addr: String,
        span: Span,
        source: RangeError,
    },
    #[error("{addr}, {span}: Content-Length is not the {} bytes asked for", span.len)]
    Length { addr: String, span: Span },
    #[error("{addr}, {span}: the body ended after {got} bytes")]
    Short { addr: String, span: Span, got: u64 },
    #[error("{addr}, {span}: the body is longer than asked for")]
    Long { addr: String, span: Span },
    #[error("{addr} gave no usable Content-Length for the file's size (HEAD)")]
    NoSize { addr: String },
    #[error("renewing the request headers failed: {0}")]
    Renew(String),
    #[error("the connection to {0} was shut down")]
    Closed(String),
}

/// Where the file is, and how to connect: shared by every connection.
struct Endpoint {
    host: String,
    port: u16,
    /// `host:port`, for messages.
    addr: String,
    /// The `Host` header.
    authority: String,
    /// The path and query.
    target: Uri,
    tls: (Arc<rustls::ClientConfig>, ServerName<'static>),
    connect_timeout: Duration,
}

impl Endpoint {
    fn new(opts: &HttpRangeOptions) -> Result<Endpoint, HttpRangeError> {
        let uri: Uri = opts
            .url
            .trim()
            .parse()
            .map_err(|_| HttpRangeError::Url("not a URL"))?;
        if !uri
            .scheme_str()
            .is_some_and(|s| s.eq_ignore_ascii_case("https"))
        {
            return Err(HttpRangeError::Url(
                "the scheme must be https:// (the requests carry a session cookie)",
            ));
        }
        let authority = uri.authority().ok_or(HttpRangeError::Url("no host"))?;
        if authority.as_str().contains('@') {
            return Err(HttpRangeError::Url(
                "credentials in the URL are not supported",
            ));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err(HttpRangeError::Url("no host"));
        }
        let port = authority.port_u16().unwrap_or(443);
        let addr = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let target: Uri = uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .parse()
            .map_err(|_| HttpRangeError::Url("bad path"))?;
        let tls_error = |e: tls::TlsError| HttpRangeError::TlsConfig {
            addr: addr.clone(),
            why: e.to_string(),
        };
        let config = tls::client_config(&opts.trust).map_err(tls_error)?;
        let name =
            tls::server_name(opts.server_name.as_deref().unwrap_or(host)).map_err(tls_error)?;
        Ok(Endpoint {
            host: host.to_owned(),
            port,
            authority: authority.as_str().to_owned(),
            addr,
            target,
            tls: (config, name),
            connect_timeout: opts.connect_timeout,
        })
    }

    /// TCP, TLS and the HTTP/1.1 connection task, within the connect timeout. Also returns
    /// how long the TCP connect took: about one round trip.
    async fn connect(&self) -> Result<(Sender, Duration), HttpRangeError> {
        tokio::time::timeout(self.connect_timeout, self.open())
            .await
            .map_err(|_| HttpRangeError::ConnectTimeout {
                addr: self.addr.clone(),
                after: self.connect_timeout,
            })?
    }

    async fn open(&self) -> Result<(Sender, Duration), HttpRangeError> {
        let started = Instant::now();
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|source| HttpRangeError::Connect {
                addr: self.addr.clone(),
                source,
            })?;
        let rtt = started.elapsed();
        let _ = tcp.set_nodelay(true);
        let (config, name) = &self.tls;
        let stream = tokio_rustls::TlsConnector::from(config.clone())
            .connect(name.clone(), tcp)
            .await
            .map_err(|e| HttpRangeError::Tls {
                addr: self.addr.clone(),
                why: tls::describe_io_error(&e),
            })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| self.http(source))?;
        let addr = self.addr.clone();
        // Drives the connection until it closes: the sender is dropped, or the server closes.
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("HTTPS range connection to {addr} ended: {e}");
            }
        });
        tracing::debug!(server = %self.addr, "HTTPS range connection open");
        Ok((sender, rtt))
    }

    fn http(&self, source: hyper::Error) -> HttpRangeError {
        HttpRangeError::Http {
            addr: self.addr.clone(),
            source,
        }
    }

    fn request(&self, method: Method, headers: &HeaderMap) -> Request<Empty<Bytes>> {
        let mut req = Request::new(Empty::new());
        *req.method_mut() = method;
        *req.uri_mut() = self.target.clone();
        let h = req.headers_mut();
        h.extend(headers.iter().map(|(k, v)| (k.clone(), v.clone())));
        if let Ok(host) = HeaderValue::from_str(&self.authority) {
            h.insert(HOST, host);
        }
        h.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("cbtstream/", env!("CARGO_PKG_VERSION"))),
        );
        req
    }

    /// The file's size, from the `Content-Length` of a `HEAD`.
    async fn head_size(
        &self,
        sender: &mut Sender,
        headers: &HeaderMap,
    ) -> Result<u64, HttpRangeError> {
        let exchange = async {
            sender.ready().await.map_err(|e| self.http(e))?;
            sender
                .send_request(self.request(Method::HEAD, headers))
                .await
                .map_err(|e| self.http(e))
        };
        let resp = tokio::time::timeout(self.connect_timeout, exchange)
            .await
            .map_err(|_| HttpRangeError::ConnectTimeout {
                addr: self.addr.clone(),
                after: self.connect_timeout,
            })??;
        let status = resp.status();
        let what = "the size request (HEAD)".to_owned();
        let addr = self.addr.clone();
        if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            let status = status.as_u16();
            return Err(HttpRangeError::NotAuthorized { addr, what, status });
        }
        if status != StatusCode::OK {
            let status = status.as_u16();
            return Err(HttpRangeError::Status { addr, what, status });
        }
        resp.headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| decimal(v.as_bytes()))
            .ok_or(HttpRangeError::NoSize { addr })
    }
}

type Sender = SendRequest<Empty<Bytes>>;

/// The request headers in use, and how often they were renewed.
struct Headers {
    map: Arc<HeaderMap>,
    generation: u64,
    /// The server refused this generation: renew before the next connection.
    refused: bool,
}

/// What every connection of one file shares.
struct Shared {
    endpoint: Endpoint,
    size: u64,
    headers: Mutex<Headers>,
}

impl Shared {
    fn headers(&self) -> std::sync::MutexGuard<'_, Headers> {
        self.headers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection using headers of `generation` was refused.
    fn refused(&self, generation: u64) {
        let mut h = self.headers();
        if h.generation == generation {
            h.refused = true;
        }
    }
}

/// The connector of one file: opens connections, renewing the headers when the server
/// refused them.
pub struct HttpRange {
    shared: Arc<Shared>,
    renew: Option<Arc<dyn RenewHeaders>>,
    /// Held while renewing, so that connections opening at once renew only once.
    renewing: tokio::sync::Mutex<()>,
}

impl HttpRange {
    /// Check the options, open the first connection and learn the size (unless given).
    /// `renew` gives fresh headers when the server refuses the current ones.
    pub async fn open(
        opts: HttpRangeOptions,
        renew: Option<Arc<dyn RenewHeaders>>,
    ) -> Result<(Arc<HttpRange>, Box<dyn SourceConnection>), HttpRangeError> {
        let endpoint = Endpoint::new(&opts)?;
        let headers = Arc::new(opts.headers.0);
        let (mut sender, rtt) = endpoint.connect().await?;
        let size = match opts.size {
            Some(size) => size,
            None => endpoint.head_size(&mut sender, &headers).await?,
        };
        let shared = Arc::new(Shared {
            endpoint,
            size,
            headers: Mutex::new(Headers {
                map: headers.clone(),
                generation: 0,
                refused: false,
            }),
        });
        let first = RangeConnection::start(shared.clone(), sender, rtt, headers, 0);
        let source = HttpRange {
            shared,
            renew,
            renewing: tokio::sync::Mutex::new(()),
        };
        Ok((Arc::new(source), Box::new(first)))
    }

    /// The headers to open a connection with: renewed first when the server refused them.
    async fn current_headers(&self) -> Result<(Arc<HeaderMap>, u64), HttpRangeError> {
        let current = |h: &Headers| (h.map.clone(), h.generation, h.refused);
        let (map, generation, refused) = current(&self.shared.headers());
        let Some(renew) = self.renew.as_ref().filter(|_| refused) else {
            return Ok((map, generation));
        };
        let _one_at_a_time = self.renewing.lock().await;
        let (map, generation, refused) = current(&self.shared.headers());
        if !refused {
            // Another connection renewed them meanwhile.
            return Ok((map, generation));
        }
        tracing::info!(server = %self.shared.endpoint.addr, "the request headers were refused; renewing them");
        let fresh = renew
            .renew()
            .await
            .map_err(|e| HttpRangeError::Renew(e.to_string()))?;
        let map = Arc::new(fresh.0);
        *self.shared.headers() = Headers {
            map: map.clone(),
            generation: generation + 1,
            refused: false,
        };
        Ok((map, generation + 1))
    }

    async fn open_connection(&self) -> Result<RangeConnection, HttpRangeError> {
        let (headers, generation) = self.current_headers().await?;
        let (sender, rtt) = self.shared.endpoint.connect().await?;
        Ok(RangeConnection::start(
            self.shared.clone(),
            sender,
            rtt,
            headers,
            generation,
        ))
    }

    /// The file's size in bytes.
    pub fn size(&self) -> u64 {
        self.shared.size
    }
}

impl Connector for HttpRange {
    fn connect(&self) -> Connecting<'_> {
        Box::pin(async move {
            let conn = self.open_connection().await.map_err(SourceError::new)?;
            Ok(Box::new(conn) as Box<dyn SourceConnection>)
        })
    }

    fn server(&self) -> &'static str {
        "the HTTPS server"
    }
}

/// One read to make.
struct Get {
    tag: u64,
    span: Span,
    buf: BytesMut,
    reply_to: mpsc::UnboundedSender<Completion>,
}

/// One kept-alive connection: a task sends the queued reads one after another.
struct RangeConnection {
    shared: Arc<Shared>,
    rtt: Duration,
    queue: mpsc::UnboundedSender<Get>,
    task: JoinHandle<()>,
}

impl Drop for RangeConnection {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RangeConnection {
    fn start(
        shared: Arc<Shared>,
        sender: Sender,
        rtt: Duration,
        headers: Arc<HeaderMap>,
        generation: u64,
    ) -> RangeConnection {
        let (queue, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(serve(shared.clone(), sender, headers, generation, rx));
        RangeConnection {
            shared,
            rtt,
            queue,
            task,
        }
    }
}

impl SourceConnection for RangeConnection {
    fn size(&self) -> u64 {
        self.shared.size
    }

    fn max_request(&self) -> u64 {
        MAX_REQUEST
    }

    fn alignment(&self) -> u64 {
        1
    }

    fn has_block_status(&self) -> bool {
        false
    }

    /// The file is a frozen disk: every connection reads the same bytes.
    fn multi_conn_safe(&self) -> bool {
        true
    }

    fn max_inflight(&self) -> usize {
        QUEUED_READS
    }

    fn rtt(&self) -> Option<Duration> {
        Some(self.rtt)
    }

    fn read(
        &self,
        tag: u64,
        offset: u64,
        len: u64,
        buf: BytesMut,
        reply_to: mpsc::UnboundedSender<Completion>,
    ) {
        let span = Span { offset, len };
        if let Err(mpsc::error::SendError(get)) = self.queue.send(Get {
            tag,
            span,
            buf,
            reply_to,
        }) {
            let closed = HttpRangeError::Closed(self.shared.endpoint.addr.clone());
            let result = Err(RequestError::Connection(SourceError::new(closed)));
            let _ = get.reply_to.send(Completion { tag, result });
        }
    }

    fn block_status(
        &self,
        tag: u64,
        offset: u64,
        len: u64,
        reply_to: mpsc::UnboundedSender<Completion>,
    ) {
        // Never asked (no block status); answered anyway, as "not known".
        let what = format!("a block status of {len} bytes at offset {offset}");
        let e = HttpRangeError::Status {
            addr: self.shared.endpoint.addr.clone(),
            what,
            status: 501,
        };
        let result = Err(RequestError::Server(SourceError::new(e)));
        let _ = reply_to.send(Completion { tag, result });
    }

    /// HTTP has no goodbye: let the queued reads finish, then drop the connection (rustls
    /// sends close_notify).
    fn close(self: Box<Self>) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(async move {
            let mut this = self;
            let (closed, _) = mpsc::unbounded_channel();
            this.queue = closed;
            let task = &mut this.task;
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        })
    }
}

/// Send the queued reads one after another. A read that leaves the connection unusable
/// fails with the reads queued behind it, and ends the task.
async fn serve(
    shared: Arc<Shared>,
    mut sender: Sender,
    headers: Arc<HeaderMap>,
    generation: u64,
    mut queue: mpsc::UnboundedReceiver<Get>,
) {
    while let Some(get) = queue.recv().await {
        let result = get_range(&shared, &mut sender, &headers, get.span, get.buf).await;
        let broken = match &result {
            Err(RequestError::Connection(e)) => Some(e.clone()),
            _ => None,
        };
        let _ = get.reply_to.send(Completion {
            tag: get.tag,
            result,
        });
        let Some(e) = broken else { continue };
        if matches!(e.downcast_ref(), Some(HttpRangeError::NotAuthorized { .. })) {
            shared.refused(generation);
        }
        queue.close();
        while let Ok(get) = queue.try_recv() {
            let result = Err(RequestError::Connection(e.clone()));
            let _ = get.reply_to.send(Completion {
                tag: get.tag,
                result,
            });
        }
        return;
    }
}

/// One ranged GET, its answer checked, its body copied into `buf`.
async fn get_range(
    shared: &Shared,
    sender: &mut Sender,
    headers: &HeaderMap,
    span: Span,
    mut buf: BytesMut,
) -> Result<Reply, RequestError> {
    let ep = &shared.endpoint;
    let broken = |e: HttpRangeError| RequestError::Connection(SourceError::new(e));
    let addr = || ep.addr.clone();
    sender.ready().await.map_err(|e| broken(ep.http(e)))?;
    let mut req = ep.request(Method::GET, headers);
    if let Ok(range) = HeaderValue::from_str(&range_header(span.offset, span.len)) {
        req.headers_mut().insert(RANGE, range);
    }
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| broken(ep.http(e)))?;
    match resp.status() {
        StatusCode::PARTIAL_CONTENT => {}
        StatusCode::OK => return Err(broken(HttpRangeError::NotPartial { addr: addr(), span })),
        s @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
            return Err(broken(HttpRangeError::NotAuthorized {
                addr: addr(),
                what: span.to_string(),
                status: s.as_u16(),
            }))
        }
        s => {
            let e = HttpRangeError::Status {
                addr: addr(),
                what: span.to_string(),
                status: s.as_u16(),
            };
            // The server's error for this read: worth retrying, on this connection if its
            // body ends soon.
            let kept = drain(resp.into_body()).await;
            let e = SourceError::new(e);
            return Err(if kept {
                RequestError::Server(e)
            } else {
                RequestError::Connection(e)
            });
        }
    }
    let Some(range) = resp.headers().get(CONTENT_RANGE) else {
        return Err(broken(HttpRangeError::NoContentRange {
            addr: addr(),
            span,
        }));
    };
    check_content_range(range.as_bytes(), span.offset, span.len, shared.size).map_err(
        |source| {
            broken(HttpRangeError::ContentRange {
                addr: addr(),
                span,
                source,
            })
        },
    )?;
    if let Some(n) = resp.headers().get(CONTENT_LENGTH) {
        if decimal(n.as_bytes()) != Some(span.len) {
            return Err(broken(HttpRangeError::Length { addr: addr(), span }));
        }
    }
    let len = usize::try_from(span.len).unwrap_or(usize::MAX);
    buf.clear();
    buf.reserve(len);
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| broken(ep.http(e)))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        if data.len() > len - buf.len() {
            return Err(broken(HttpRangeError::Long { addr: addr(), span }));
        }
        buf.extend_from_slice(&data);
    }
    if buf.len() != len {
        let got = buf.len() as u64;
        return Err(broken(HttpRangeError::Short {
            addr: addr(),
            span,
            got,
        }));
    }
    Ok(Reply::Read(buf))
}

/// Read an error answer's body to its end, if it is short: then the connection can carry
/// the next request.
async fn drain(mut body: hyper::body::Incoming) -> bool {
    let mut left = ERROR_BODY_LIMIT;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { return false };
        if let Some(data) = frame.data_ref() {
            if data.len() > left {
                return false;
            }
            left -= data.len();
        }
    }
    true
}
