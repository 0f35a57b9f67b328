//! Where the file of an HTTPS range source is, and how to reach it: the URL checked, TCP
//! and TLS (the [`Trust`] rules of [`crate::tls`]) and hyper's HTTP/1.1 connection, the
//! requests, and the `HEAD` that learns the file's size.

use super::http_range::{HttpRangeError, HttpRangeOptions};
use crate::https::OpenError;
use crate::tls;
use bytes::Bytes;
use cbtstream_proto::http_range::decimal;
use http_body_util::Empty;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderMap, HeaderValue, CONTENT_LENGTH, HOST, USER_AGENT};
use hyper::{Method, Request, StatusCode, Uri};
use rustls::pki_types::ServerName;
use std::sync::Arc;
use std::time::Duration;

/// One HTTP/1.1 connection's request side.
pub(super) type Sender = SendRequest<Empty<Bytes>>;

/// Where the file is, and how to connect: shared by every connection.
pub(super) struct Endpoint {
    host: String,
    port: u16,
    /// `host:port`, for messages.
    pub(super) addr: String,
    /// The `Host` header.
    authority: String,
    /// The path and query.
    target: Uri,
    tls: (Arc<rustls::ClientConfig>, ServerName<'static>),
    connect_timeout: Duration,
}

impl Endpoint {
    pub(super) fn new(opts: &HttpRangeOptions) -> Result<Endpoint, HttpRangeError> {
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
    pub(super) async fn connect(&self) -> Result<(Sender, Duration), HttpRangeError> {
        tokio::time::timeout(self.connect_timeout, self.open())
            .await
            .map_err(|_| HttpRangeError::ConnectTimeout {
                addr: self.addr.clone(),
                after: self.connect_timeout,
            })?
    }

    async fn open(&self) -> Result<(Sender, Duration), HttpRangeError> {
        let (config, name) = &self.tls;
        let opened = crate::https::open(
            &self.host,
            self.port,
            config.clone(),
            name.clone(),
            &self.addr,
        )
        .await;
        let addr = self.addr.clone();
        let (sender, rtt) = opened.map_err(|e| match e {
            OpenError::Connect(source) => HttpRangeError::Connect { addr, source },
            OpenError::Tls(why) => HttpRangeError::Tls { addr, why },
            OpenError::Http(source) => self.http(source),
        })?;
        tracing::debug!(server = %self.addr, "HTTPS range connection open");
        Ok((sender, rtt))
    }

    pub(super) fn http(&self, source: hyper::Error) -> HttpRangeError {
        HttpRangeError::Http {
            addr: self.addr.clone(),
            source,
        }
    }

    pub(super) fn request(&self, method: Method, headers: &HeaderMap) -> Request<Empty<Bytes>> {
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

    /// A `HEAD` of the file, answered `200` (`401`/`403`: not authorized; else the status).
    pub(super) async fn head(
        &self,
        sender: &mut Sender,
        headers: &HeaderMap,
        what: &str,
    ) -> Result<hyper::Response<hyper::body::Incoming>, HttpRangeError> {
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
        let (what, addr) = (what.to_owned(), self.addr.clone());
        if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            let status = status.as_u16();
            return Err(HttpRangeError::NotAuthorized { addr, what, status });
        }
        if status != StatusCode::OK {
            let status = status.as_u16();
            return Err(HttpRangeError::Status { addr, what, status });
        }
        Ok(resp)
    }

    /// The file's size, from the `Content-Length` of a `HEAD`.
    pub(super) async fn head_size(
        &self,
        sender: &mut Sender,
        headers: &HeaderMap,
    ) -> Result<u64, HttpRangeError> {
        let resp = self
            .head(sender, headers, "the size request (HEAD)")
            .await?;
        resp.headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| decimal(v.as_bytes()))
            .ok_or_else(|| HttpRangeError::NoSize {
                addr: self.addr.clone(),
            })
    }
}
