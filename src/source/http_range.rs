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

use super::endpoint::Endpoint;
use super::range_connection::RangeConnection;
use crate::engine::connector::Connecting;
use crate::engine::source::{SourceConnection, SourceError};
use crate::engine::Connector;
use crate::tls::Trust;
use cbtstream_proto::http_range::RangeError;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
    #[error("an HTTPS range source cannot tell data from holes (asked about {len} bytes at offset {offset})")]
    NoBlockStatus { offset: u64, len: u64 },
}
/// The request headers in use, and how often they were renewed.
pub(super) struct Headers {
    map: Arc<HeaderMap>,
    generation: u64,
    /// The server refused this generation: renew before the next connection.
    refused: bool,
}

/// What every connection of one file shares.
pub(super) struct Shared {
    pub(super) endpoint: Endpoint,
    pub(super) size: u64,
    headers: Mutex<Headers>,
}

impl Shared {
    fn headers(&self) -> std::sync::MutexGuard<'_, Headers> {
        self.headers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection using headers of `generation` was refused.
    pub(super) fn refused(&self, generation: u64) {
        let mut h = self.headers();
        if h.generation == generation {
            h.refused = true;
        }
    }
}

/// `HEAD` of the file with `opts.headers` (a credential, say) on a connection of its own:
/// the `name=value` of each `Set-Cookie` of the answer, for a server that opens a session
/// on a credential and names it in a cookie. The values are secrets.
pub async fn head_cookies(opts: &HttpRangeOptions) -> Result<Vec<String>, HttpRangeError> {
    let endpoint = Endpoint::new(opts)?;
    let (mut sender, _) = endpoint.connect().await?;
    let resp = endpoint
        .head(&mut sender, &opts.headers.0, "the login request (HEAD)")
        .await?;
    Ok(resp
        .headers()
        .get_all(hyper::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next())
        .map(|pair| pair.trim().to_owned())
        .collect())
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
