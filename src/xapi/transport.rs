//! XML-RPC over HTTP/1.1: hyper's connection-level client over tokio-rustls.
//!
//! XenAPI calls from one session are few and mostly sequential, so instead of a pooled client
//! (hyper-util's legacy client plus hyper-rustls) this keeps at most one idle kept-alive
//! connection per endpoint and opens another when a concurrent call finds it busy. That
//! gives direct control of the TLS server name (an IP address works: rustls checks IP SANs,
//! and XAPI's certificates carry the host's IPs), of timeouts, and of when a request may be
//! retried on a fresh connection: only when hyper hands it back unsent.

use super::XapiError;
use crate::http_body::{read_bounded, BodyError};
use crate::tls::{self, Trust};
use bytes::Bytes;
use cbtstream_proto::xmlrpc::{decode_xenapi, encode_call, Value, XenApiError};
use http_body_util::Full;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONTENT_TYPE, HOST, USER_AGENT};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Responses above this size decode in a blocking task, off the async workers.
const BLOCKING_DECODE_ABOVE: usize = 1 << 20;

/// How to reach XenAPI.
#[derive(Debug, Clone)]
pub struct XapiOptions {
    /// How the server certificate is checked (`--xapi-ca`, `--xapi-pin`, `--xapi-insecure`).
    pub trust: Trust,
    /// Allow an `http://` URL (`--xapi-allow-plaintext`). Without it only https is used.
    pub allow_plaintext: bool,
    /// TCP connect plus TLS handshake.
    pub connect_timeout: Duration,
    /// One whole call, connect included. `VDI.snapshot` and `VDI.list_changed_blocks` are
    /// synchronous calls that can take minutes on a busy SR.
    pub request_timeout: Duration,
    /// Responses larger than this are refused before decoding. The largest expected is a
    /// `list_changed_blocks` bitmap: about 43 MB of base64 for a 16 TiB disk.
    pub max_response_bytes: u64,
}

impl XapiOptions {
    pub fn new(trust: Trust) -> XapiOptions {
        XapiOptions {
            trust,
            allow_plaintext: false,
            connect_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(600),
            max_response_bytes: 256 << 20,
        }
    }
}

/// Where XenAPI listens: scheme, host, port and path of the URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub tls: bool,
    /// A DNS name or an IP address, without IPv6 brackets.
    pub host: String,
    pub port: u16,
    /// The request path, `/` unless the URL gave one.
    pub path: String,
}

impl Endpoint {
    /// `https://host[:port][/path]`, `http://...`, or a bare `host[:port]` (https).
    /// User info (`user@`) and query strings are refused: they would end up in logs.
    pub fn parse(url: &str) -> Result<Endpoint, XapiError> {
        let url = url.trim();
        let bad = |why: &str| XapiError::Url(format!("{:?}: {why}", without_userinfo(url)));
        let full = if url.contains("://") {
            url.to_owned()
        } else {
            format!("https://{url}")
        };
        let uri: hyper::Uri = full.parse().map_err(|_| bad("not a URL"))?;
        let tls = match uri.scheme_str() {
            Some(s) if s.eq_ignore_ascii_case("https") => true,
            Some(s) if s.eq_ignore_ascii_case("http") => false,
            _ => return Err(bad("the scheme must be https:// (or http://)")),
        };
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("credentials in the URL are not supported"));
        }
        if uri.query().is_some() {
            return Err(bad("a query string is not supported"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let path = match uri.path() {
            "" => "/".to_owned(),
            p => p.to_owned(),
        };
        Ok(Endpoint {
            tls,
            host: host.to_owned(),
            port,
            path,
        })
    }

    /// The endpoint of the pool master named by `HOST_IS_SLAVE [master]`: same scheme, port
    /// and path, the master's host. XAPI sends a bare address (IPv4, IPv6 or a name, never
    /// a port); `host:port` and `[v6]:port` are accepted too, for simulators and NAT.
    pub fn redirect(&self, master: &str) -> Result<Endpoint, XapiError> {
        let m = master.trim();
        let bad =
            |why: &str| XapiError::Url(format!("master address {m:?} from HOST_IS_SLAVE: {why}"));
        let (host, port) = if let Some(rest) = m.strip_prefix('[') {
            let (h, after) = rest.split_once(']').ok_or_else(|| bad("unclosed ["))?;
            let port = match after {
                "" => self.port,
                p => p
                    .strip_prefix(':')
                    .and_then(|p| p.parse().ok())
                    .ok_or_else(|| bad("bad port"))?,
            };
            (h, port)
        } else if m.matches(':').count() > 1 {
            (m, self.port) // a bare IPv6 address
        } else if let Some((h, p)) = m.split_once(':') {
            (h, p.parse().map_err(|_| bad("bad port"))?)
        } else {
            (m, self.port)
        };
        if host.is_empty()
            || host
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || "/@?#[]".contains(c))
        {
            return Err(bad("not a host name or address"));
        }
        Ok(Endpoint {
            tls: self.tls,
            host: host.to_owned(),
            port,
            path: self.path.clone(),
        })
    }

    /// `host:port` with IPv6 in brackets (the `Host` header omits a default port).
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let default = if self.tls { 443 } else { 80 };
        if self.port == default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// For messages: always with the port.
    pub fn label(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}{}", self.authority(), self.path)
    }
}

/// The URL for an error message, with any `user:password@` replaced by `***@`.
fn without_userinfo(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) => {
            let sep = if scheme.is_empty() { "" } else { "://" };
            format!("{scheme}{sep}***{}", &rest[at..])
        }
        None => url.to_owned(),
    }
}

type Sender = SendRequest<Full<Bytes>>;

/// A connection's byte stream: TLS over TCP, or plain TCP when plaintext was allowed.
pub(crate) trait HandlerIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> HandlerIo for T {}
pub(crate) type HandlerStream = Box<dyn HandlerIo>;

/// One endpoint; cheap to clone (shared idle connection).
#[derive(Clone)]
pub(crate) struct Transport {
    inner: Arc<Inner>,
}

struct Inner {
    endpoint: Endpoint,
    label: String,
    authority: String,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    opts: XapiOptions,
    idle: Mutex<Option<Sender>>,
}

impl Transport {
    /// Checks the plaintext policy and builds the TLS configuration; connects lazily.
    pub(crate) fn new(endpoint: Endpoint, opts: &XapiOptions) -> Result<Transport, XapiError> {
        let config = if endpoint.tls {
            Some(tls::client_config(&opts.trust)?)
        } else {
            None
        };
        Transport::build(endpoint, opts, config)
    }

    /// Another endpoint (the pool master) with the same options, and the same TLS
    /// configuration when both are https.
    pub(crate) fn with_endpoint(&self, endpoint: Endpoint) -> Result<Transport, XapiError> {
        let i = &self.inner;
        let config = match (&i.tls, endpoint.tls) {
            (Some((c, _)), true) => Some(c.clone()),
            (None, true) => Some(tls::client_config(&i.opts.trust)?),
            (_, false) => None,
        };
        Transport::build(endpoint, &i.opts, config)
    }

    fn build(
        endpoint: Endpoint,
        opts: &XapiOptions,
        config: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Transport, XapiError> {
        let label = endpoint.label();
        let tls = match config {
            Some(c) => Some((c, tls::server_name(&endpoint.host)?)),
            None if opts.allow_plaintext => {
                tracing::warn!("XenAPI over plaintext http:// to {label}: the password and session travel unencrypted");
                None
            }
            None => return Err(XapiError::PlaintextRefused(label)),
        };
        Ok(Transport {
            inner: Arc::new(Inner {
                authority: endpoint.authority(),
                endpoint,
                label,
                tls,
                opts: opts.clone(),
                idle: Mutex::new(None),
            }),
        })
    }

    pub(crate) fn endpoint(&self) -> &Endpoint {
        &self.inner.endpoint
    }

    pub(crate) fn options(&self) -> &XapiOptions {
        &self.inner.opts
    }

    /// One XML-RPC call: the decoded `Value` of a XenAPI success, or the failure.
    /// Parameters are never logged (they hold the password or the session reference).
    pub(crate) async fn call(&self, method: &str, params: &[Value]) -> Result<Value, XapiError> {
        let i = &self.inner;
        tracing::debug!(method, host = %i.label, "XenAPI call");
        let body = Bytes::from(encode_call(method, params));
        let bytes = tokio::time::timeout(i.opts.request_timeout, self.round_trip(method, body))
            .await
            .map_err(|_| XapiError::Timeout {
                addr: i.label.clone(),
                what: method.to_owned(),
                after: i.opts.request_timeout,
            })??;
        let decoded = if bytes.len() > BLOCKING_DECODE_ABOVE {
            tokio::task::spawn_blocking(move || decode_xenapi(&bytes))
                .await
                .map_err(|_| XapiError::protocol(method, "the decoding task failed"))?
        } else {
            decode_xenapi(&bytes)
        };
        decoded.map_err(|e| match e {
            XenApiError::Rpc(source) => XapiError::Decode {
                method: method.to_owned(),
                source,
            },
            XenApiError::Envelope(why) => XapiError::protocol(method, why),
            failure @ XenApiError::Failure { .. } => XapiError::Failure {
                method: method.to_owned(),
                failure,
            },
        })
    }

    /// Send the request and read the whole (capped) response body.
    async fn round_trip(&self, method: &str, body: Bytes) -> Result<Bytes, XapiError> {
        let i = &self.inner;
        let idle = i.idle.lock().ok().and_then(|mut g| g.take());
        let (mut sender, reused) = match idle {
            Some(s) if !s.is_closed() && s.is_ready() => (s, true),
            _ => (self.connect().await?, false),
        };
        let req = self.request(method, body)?;
        let resp = match sender.try_send_request(req).await {
            Ok(r) => r,
            // A kept-alive connection the server had closed, found before our request went
            // out (hyper hands it back): safe to send on a fresh connection.
            Err(mut e) if reused && e.message().is_some() => {
                tracing::debug!(
                    "idle XenAPI connection to {} was closed; reconnecting",
                    i.label
                );
                let req = e
                    .take_message()
                    .ok_or_else(|| XapiError::protocol(method, "hyper lost the request"))?;
                sender = self.connect().await?;
                sender
                    .send_request(req)
                    .await
                    .map_err(|e| self.transport(e))?
            }
            Err(e) => return Err(self.transport(e.into_error())),
        };
        if resp.status() != StatusCode::OK {
            // XAPI answers every call with 200; anything else is a proxy, a wrong port or
            // a request XAPI could not parse. The connection is dropped, not reused.
            return Err(XapiError::Http {
                addr: i.label.clone(),
                method: method.to_owned(),
                status: resp.status().as_u16(),
            });
        }
        let too_large = || XapiError::TooLarge {
            method: method.to_owned(),
            limit: i.opts.max_response_bytes,
        };
        let bytes = read_bounded(resp, i.opts.max_response_bytes)
            .await
            .map_err(|e| match e {
                BodyError::Http(e) => self.transport(e),
                BodyError::TooLarge => too_large(),
                BodyError::Other(e) => {
                    XapiError::protocol(method, format!("reading the body: {e}"))
                }
            })?;
        // The exchange is complete: the connection can carry the next call.
        if let Ok(mut g) = i.idle.lock() {
            if g.is_none() {
                *g = Some(sender);
            }
        }
        Ok(bytes)
    }

    /// `GET target` (a path and query, e.g. `/export_raw_vdi?...`) with the session in a
    /// cookie, on a connection of its own, as XenServer's HTTP handlers want (each serves
    /// one request, then closes): the response head once it is 200, with its body still to
    /// read. `what` names the request in errors.
    pub(crate) async fn get(
        &self,
        what: &str,
        target: &str,
        session: &super::Secret,
    ) -> Result<hyper::Response<hyper::body::Incoming>, XapiError> {
        let i = &self.inner;
        let mut sender = self.connect().await?;
        let req = Request::get(target)
            .header(HOST, i.authority.as_str())
            .header(
                hyper::header::COOKIE,
                format!("session_id={}", session.expose()),
            )
            .header(USER_AGENT, concat!("cbtstream/", env!("CARGO_PKG_VERSION")))
            .body(Full::new(Bytes::new()))
            .map_err(|_| XapiError::protocol(what, "building the request"))?;
        let resp = tokio::time::timeout(i.opts.request_timeout, sender.send_request(req))
            .await
            .map_err(|_| XapiError::Timeout {
                addr: i.label.clone(),
                what: what.to_owned(),
                after: i.opts.request_timeout,
            })?
            .map_err(|e| self.transport(e))?;
        if resp.status() != StatusCode::OK {
            return Err(XapiError::Http {
                addr: i.label.clone(),
                method: what.to_owned(),
                status: resp.status().as_u16(),
            });
        }
        Ok(resp)
    }

    fn request(&self, method: &str, body: Bytes) -> Result<Request<Full<Bytes>>, XapiError> {
        Request::post(self.inner.endpoint.path.as_str())
            .header(HOST, self.inner.authority.as_str())
            .header(CONTENT_TYPE, "text/xml")
            .header(USER_AGENT, concat!("cbtstream/", env!("CARGO_PKG_VERSION")))
            .body(Full::new(body))
            .map_err(|e| XapiError::protocol(method, format!("building the request: {e}")))
    }

    fn transport(&self, source: hyper::Error) -> XapiError {
        XapiError::Transport {
            addr: self.inner.label.clone(),
            source,
        }
    }

    /// TCP, TLS, and the HTTP/1.1 connection task, within the connect timeout.
    async fn connect(&self) -> Result<Sender, XapiError> {
        self.handler_connection().await
    }

    /// A fresh connection to the same endpoint with the same TLS trust, within the connect
    /// timeout (hyper's HTTP/1 handshake does no I/O). XML-RPC keeps one idle; a request to
    /// a XenServer HTTP handler (`/export_raw_vdi`, ...) takes one of its own, as those
    /// handlers close the connection when they are done.
    pub(crate) async fn handler_connection<B>(&self) -> Result<SendRequest<B>, XapiError>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let io = self.handler_stream().await?;
        self.handshake(TokioIo::new(io)).await
    }

    /// The bare byte stream (TLS or, when allowed, TCP) of a fresh connection, within the
    /// connect timeout, for a handler whose framing HTTP clients cannot produce (the body
    /// of `/import_raw_vdi` must not use any Transfer-Encoding and goes out only after the
    /// server's response head).
    pub(crate) async fn handler_stream(&self) -> Result<HandlerStream, XapiError> {
        let i = &self.inner;
        tokio::time::timeout(i.opts.connect_timeout, self.open_stream())
            .await
            .map_err(|_| XapiError::Timeout {
                addr: i.label.clone(),
                what: "connecting".to_owned(),
                after: i.opts.connect_timeout,
            })?
    }

    /// TCP, then TLS unless plaintext was allowed and asked for.
    async fn open_stream(&self) -> Result<HandlerStream, XapiError> {
        let i = &self.inner;
        let ep = &i.endpoint;
        let tcp = TcpStream::connect((ep.host.as_str(), ep.port))
            .await
            .map_err(|source| XapiError::Connect {
                addr: i.label.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        match &i.tls {
            Some((config, name)) => {
                let stream = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| XapiError::Tls {
                        addr: i.label.clone(),
                        reason: tls::describe_io_error(&e),
                    })?;
                Ok(Box::new(stream))
            }
            None => Ok(Box::new(tcp)),
        }
    }

    async fn handshake<T, B>(&self, io: T) -> Result<SendRequest<B>, XapiError>
    where
        T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| self.transport(e))?;
        let label = self.inner.label.clone();
        // Drives the connection until it closes: when the sender is dropped, the server
        // closes it, or a request times out.
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("XenAPI connection to {label} ended: {e}");
            }
        });
        Ok(sender)
    }
}
