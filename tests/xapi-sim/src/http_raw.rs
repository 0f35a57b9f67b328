//! Plain HTTP/1.x on a TLS connection for the disk and metadata handlers, which need what
//! hyper does not give: a response head sent before the request body is read, and bodies
//! ended by closing the connection, as xapi's own HTTP server does.
//!
//! The listener reads each connection's first request head itself ([`read_head`]); a disk
//! path goes to `http_disk`, anything else to hyper through [`Prefixed`].

use cbtstream_testkit::tls_accept::percent_decode;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// The longest request head accepted (xapi's limit is similar).
const MAX_HEAD: usize = 16 << 10;
/// A client must send its request head within this.
pub(crate) const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// A request body that stalls this long fails the import (the client is gone).
const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The paths served here rather than by hyper.
pub(crate) fn is_disk_path(path: &str) -> bool {
    matches!(
        path.trim_end_matches('/'),
        "/export_raw_vdi" | "/import_raw_vdi" | "/export_metadata" | "/import_metadata"
    )
}

/// A parsed request head. No `Debug`: the query and the headers carry session refs and
/// passwords.
pub(crate) struct Head {
    pub method: String,
    /// Without the query and without a trailing `/` (XO sends `/import_raw_vdi/?...`).
    pub path: String,
    /// Query parameters, percent-decoded, in order.
    pub query: Vec<(String, String)>,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    /// HTTP/1.0 or HTTP/1.1 as sent.
    pub version: String,
}

impl Head {
    /// A query parameter, else a cookie of that name (xapi looks in both).
    pub(crate) fn param(&self, name: &str) -> Option<&str> {
        self.query_param(name).or_else(|| self.cookie(name))
    }

    pub(crate) fn query_param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the parameter is present at all (xapi tests `chunked` by presence).
    pub(crate) fn has_param(&self, name: &str) -> bool {
        self.param(name).is_some()
    }

    /// Only the literal `true` counts, as in xapi's import handlers.
    pub(crate) fn flag(&self, name: &str) -> bool {
        self.query_param(name) == Some("true")
    }

    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn cookie(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == "cookie")
            .flat_map(|(_, v)| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }

    /// `Content-Length`, if present and a number.
    pub(crate) fn content_length(&self) -> Option<u64> {
        self.header("content-length")?.trim().parse().ok()
    }
}

/// Reads one request head. `Ok(None)`: the connection closed or sent something that is not
/// an HTTP request head within [`MAX_HEAD`] bytes; the bytes read are returned either way so
/// they can be handed on.
pub(crate) async fn read_head<S: AsyncRead + Unpin>(
    s: &mut S,
) -> io::Result<(Option<(Head, usize)>, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        if let Some(end) = find_head_end(&buf) {
            return Ok((parse_head(&buf[..end]).map(|h| (h, end + 4)), buf));
        }
        if buf.len() >= MAX_HEAD {
            return Ok((None, buf));
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok((None, buf));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn find_head_end(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n")
}

fn parse_head(b: &[u8]) -> Option<Head> {
    let text = std::str::from_utf8(b).ok()?;
    let mut lines = text.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, target, version) = (first.next()?, first.next()?, first.next()?);
    if first.next().is_some() || !version.starts_with("HTTP/1.") {
        return None;
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let path = match path.trim_end_matches('/') {
        "" => "/",
        p => p,
    };
    let query = query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            Some((percent_decode(k)?, percent_decode(v)?))
        })
        .collect::<Option<Vec<_>>>()?;
    let headers = lines
        .map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Head {
        method: method.to_owned(),
        path: path.to_owned(),
        query,
        headers,
        version: version.to_owned(),
    })
}

/// A connection whose first bytes were already read: they are replayed before the stream.
pub(crate) struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub(crate) fn new(prefix: Vec<u8>, inner: S) -> Self {
        Prefixed {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An HTTP error page shaped like those of xapi's `http_svr.ml`, with `Connection: close`.
pub(crate) fn error_page(version: &str, status: u16, extra_headers: &[(&str, &str)]) -> Vec<u8> {
    let (reason, text) = match status {
        400 => ("Bad Request", "The HTTP request was malformed."),
        401 => (
            "Unauthorised",
            "Please log in with a username and password.",
        ),
        403 => ("Forbidden", "Access is denied."),
        404 => (
            "Not Found",
            "The requested URL was not found on this server.",
        ),
        _ => (
            "Internal Error",
            "An unexpected error occurred; please wait a while and try again. If the problem \
             persists, please contact your support representative.",
        ),
    };
    let body = format!(
        "<html><body><h1>HTTP {status} {}</h1>{text}</body></html>",
        reason.to_lowercase()
    );
    let mut head = format!(
        "{version} {status} {reason}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in extra_headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    head.push_str(&body);
    head.into_bytes()
}

/// Writes `bytes` and closes the sending side; errors are the client's problem (it left).
pub(crate) async fn send_and_close<S: AsyncWrite + Unpin>(s: &mut S, bytes: &[u8]) {
    let _ = s.write_all(bytes).await;
    let _ = s.shutdown().await;
}

/// The request body: the bytes read with the head first, then the stream.
pub(crate) struct Body<'a, S> {
    pub pending: &'a [u8],
    pub s: &'a mut S,
}

impl<S: AsyncRead + Unpin> Body<'_, S> {
    /// Reads up to `out.len()` bytes; 0 at the end of the stream.
    pub(crate) async fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if !self.pending.is_empty() {
            let n = self.pending.len().min(out.len());
            out[..n].copy_from_slice(&self.pending[..n]);
            self.pending = &self.pending[n..];
            return Ok(n);
        }
        tokio::time::timeout(BODY_IDLE_TIMEOUT, self.s.read(out))
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
    }

    /// Fills `out`; `UnexpectedEof` if the stream ends first.
    pub(crate) async fn read_exact(&mut self, out: &mut [u8]) -> io::Result<()> {
        let mut got = 0;
        while got < out.len() {
            let n = self.read(&mut out[got..]).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            got += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads() {
        let h = parse_head(
            b"PUT /import_raw_vdi/?session_id=OpaqueRef%3Aab&vdi=x&chunked&vdi:a=b HTTP/1.1\r\nContent-Length: 12\r\nCookie: task_id=t1; other=2",
        )
        .unwrap();
        assert_eq!(h.method, "PUT");
        assert_eq!(h.path, "/import_raw_vdi");
        assert_eq!(h.param("session_id"), Some("OpaqueRef:ab"));
        assert!(h.has_param("chunked"));
        assert_eq!(h.param("vdi:a"), Some("b"));
        assert_eq!(h.param("task_id"), Some("t1"));
        assert_eq!(h.query_param("task_id"), None);
        assert_eq!(h.content_length(), Some(12));
        assert!(parse_head(b"GET / HTTP/2").is_none());
        assert!(parse_head(b"GET /?a=%zz HTTP/1.1").is_none());
        assert!(parse_head(b"GET / HTTP/1.1\r\nno colon").is_none());
        assert!(parse_head(&[0xff, b' ', b'/', b' ']).is_none());
    }
}
