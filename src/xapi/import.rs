//! `PUT /import_raw_vdi?vdi=<ref>&format=raw&chunked=true`: data written into a VDI in
//! vhd-tool's chunked framing (docs/XENSERVER.md section 11).
//!
//! The body is `{offset u64 LE, length u32 LE, data}` records, offsets and lengths multiples
//! of 512, ended by 12 zero bytes. XAPI refuses any `Transfer-Encoding` and ignores
//! `Content-Length` in this mode, so the request has neither and the body simply follows the
//! head on the connection. XAPI answers `200` before it reads the body and vhd-tool's client
//! waits for that answer before it sends anything: so does this one, over a bare TLS stream
//! (an HTTP client library would add `Transfer-Encoding: chunked`). The outcome is the task
//! named by the `task-id` header of the answer.

use super::transport::HandlerStream;
use super::{Ref, XapiError, XapiSession};
use cbtstream_proto::xmlrpc::XenApiError;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const METHOD: &str = "PUT /import_raw_vdi";
/// The response head is a few hundred bytes; more is not XAPI.
const MAX_HEAD: usize = 16 << 10;
/// What the server may send after the body (a 500 page at most) is read and dropped up to this.
const MAX_TAIL: u64 = 1 << 20;
/// Largest chunk of zeroes sent in one record.
const ZERO_PIECE: usize = 4 << 20;
/// vhd-tool reads a chunk's length as a signed 32-bit number and writes whole sectors.
const MAX_CHUNK: usize = (1 << 31) - 512;
const SECTOR: u64 = 512;

/// An upload in progress. Dropping it without [`RawUpload::finish`] closes the connection
/// without the end marker: XAPI fails the import (`VDI_IO_ERROR`).
pub struct RawUpload {
    io: HandlerStream,
    task: Option<Ref>,
    addr: String,
    zeros: Vec<u8>,
    /// Bytes of chunk data sent.
    pub sent: u64,
}

/// Why a chunk cannot be sent as it is.
fn misaligned(offset: u64, len: usize) -> Option<String> {
    if !offset.is_multiple_of(SECTOR) || !(len as u64).is_multiple_of(SECTOR) {
        Some(format!(
            "the range at offset {offset} of {len} bytes is not whole 512-byte sectors, \
             which is all import_raw_vdi can write"
        ))
    } else if len == 0 || len > MAX_CHUNK {
        Some(format!("a chunk of {len} bytes at offset {offset}"))
    } else {
        None
    }
}

impl XapiSession {
    /// Starts the upload into `vdi`; returns once XAPI answered `200`.
    pub async fn import_raw_chunked(&self, vdi: &Ref) -> Result<RawUpload, XapiError> {
        let target = format!("/import_raw_vdi?vdi={vdi}&format=raw&chunked=true");
        let (io, task, addr) = self.handler_put(METHOD, &target, None).await?;
        Ok(RawUpload {
            io,
            task,
            addr,
            zeros: Vec::new(),
            sent: 0,
        })
    }
}

impl XapiSession {
    /// `PUT target` to one of XenServer's HTTP handlers on a connection of its own: the head
    /// (the session in a cookie rather than the query: URLs end up in proxy logs; a
    /// `Content-Length` only when given), then the server's answer, which XAPI sends before
    /// it reads the body. Returns the stream, ready for the body, the task named by the
    /// answer, and the server's label for errors.
    pub(super) async fn handler_put(
        &self,
        method: &str,
        target: &str,
        content_length: Option<u64>,
    ) -> Result<(HandlerStream, Option<Ref>, String), XapiError> {
        let (session, transport) = self.for_handler().await;
        let addr = transport.endpoint().label();
        let timeout = transport.options().request_timeout;
        let mut io = transport.handler_stream().await?;
        let length = content_length
            .map(|n| format!("Content-Length: {n}\r\n"))
            .unwrap_or_default();
        let head = format!(
            "PUT {target} HTTP/1.1\r\nHost: {host}\r\nCookie: session_id={session}\r\n\
             User-Agent: cbtstream/{version}\r\n{length}Connection: close\r\n\r\n",
            host = transport.endpoint().authority(),
            session = session.expose(),
            version = env!("CARGO_PKG_VERSION"),
        );
        let io_error = |what: &str, source| XapiError::Io {
            addr: addr.clone(),
            what: format!("{method}: {what}"),
            source,
        };
        io.write_all(head.as_bytes())
            .await
            .map_err(|e| io_error("sending the request", e))?;
        io.flush()
            .await
            .map_err(|e| io_error("sending the request", e))?;
        let answer = tokio::time::timeout(timeout, read_head(&mut io))
            .await
            .map_err(|_| XapiError::Timeout {
                addr: addr.clone(),
                what: method.to_owned(),
                after: timeout,
            })?
            .map_err(|e| io_error("reading the answer", e))?;
        let (status, task) = parse_head(&answer).map_err(|why| XapiError::protocol(method, why))?;
        if status != 200 {
            return Err(XapiError::Http {
                addr,
                method: method.to_owned(),
                status,
            });
        }
        Ok((io, task, addr))
    }
}

/// Reads up to the end of the response head (never past it: the connection stays usable).
async fn read_head(io: &mut HandlerStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_HEAD {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("the response head is longer than {MAX_HEAD} bytes"),
            ));
        }
        if io.read(&mut byte).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
    }
    Ok(head)
}

/// The status and the `task-id` header of a response head. Never quotes the bytes.
fn parse_head(head: &[u8]) -> Result<(u16, Option<Ref>), String> {
    let text = std::str::from_utf8(head).map_err(|_| "the response head is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let status = parts.next().and_then(|s| s.parse::<u16>().ok());
    let (true, Some(status)) = (version.starts_with("HTTP/1."), status) else {
        return Err("the answer is not an HTTP/1 status line".into());
    };
    let task = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("task-id"))
        .and_then(|(_, v)| Ref::parse(v.trim().to_owned()));
    Ok((status, task))
}

impl RawUpload {
    fn io_error(&self, what: &str, source: std::io::Error) -> XapiError {
        XapiError::Io {
            addr: self.addr.clone(),
            what: format!("{METHOD}: {what}"),
            source,
        }
    }

    /// Sends `data` to be written at `offset`.
    pub async fn chunk(&mut self, offset: u64, data: &[u8]) -> Result<(), XapiError> {
        if let Some(why) = misaligned(offset, data.len()) {
            return Err(XapiError::protocol(METHOD, why));
        }
        let mut head = [0u8; 12];
        head[..8].copy_from_slice(&offset.to_le_bytes());
        head[8..].copy_from_slice(&(data.len() as u32).to_le_bytes());
        let sent = async {
            self.io.write_all(&head).await?;
            self.io.write_all(data).await
        }
        .await;
        sent.map_err(|e| self.io_error("sending data", e))?;
        self.sent += data.len() as u64;
        Ok(())
    }

    /// Sends zeroes for `[offset, offset + len)`, in chunks of at most [`ZERO_PIECE`].
    pub async fn zeros(&mut self, offset: u64, len: u64) -> Result<(), XapiError> {
        if self.zeros.is_empty() {
            self.zeros = vec![0; ZERO_PIECE];
        }
        let zeros = std::mem::take(&mut self.zeros);
        let mut done = 0;
        let mut result = Ok(());
        while done < len && result.is_ok() {
            let n = (len - done).min(ZERO_PIECE as u64) as usize;
            result = self.chunk(offset + done, &zeros[..n]).await;
            done += n as u64;
        }
        self.zeros = zeros;
        result
    }

    /// Sends the end marker, reads what the server sends until it closes, and waits for
    /// the import's task: `Ok` only when it succeeded.
    pub async fn finish(mut self, session: &XapiSession) -> Result<(), XapiError> {
        let ended = async {
            self.io.write_all(&[0u8; 12]).await?;
            self.io.flush().await
        }
        .await;
        if let Err(e) = ended {
            let error = self.io_error("sending the end marker", e);
            return Err(self.explain(session, error).await);
        }
        let mut tail = (&mut self.io).take(MAX_TAIL);
        // The server closes once the data is written; a TLS stream cut without close_notify
        // is fine here, the task says how it went.
        let _ = tokio::io::copy(&mut tail, &mut tokio::io::sink()).await;
        let wait = session.for_handler().await.1.options().request_timeout;
        match self.task_outcome(session, wait).await? {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The error to report for an upload that failed with `error`: when the connection
    /// failed, the task's failure if the host recorded one (it closed the connection
    /// because of it).
    pub async fn explain(&self, session: &XapiSession, error: XapiError) -> XapiError {
        if !matches!(error, XapiError::Io { .. }) {
            return error;
        }
        match self.task_outcome(session, Duration::from_secs(5)).await {
            Ok(Some(task_error)) => task_error,
            _ => error,
        }
    }

    /// Waits up to `wait` for the task to end: `None` on success, the failure otherwise.
    async fn task_outcome(
        &self,
        session: &XapiSession,
        wait: Duration,
    ) -> Result<Option<XapiError>, XapiError> {
        task_outcome(session, self.task.as_ref(), &self.addr, METHOD, wait).await
    }
}

/// Waits up to `wait` for the task of a handler request (`method`) to end: `None` on
/// success, the failure otherwise.
pub(super) async fn task_outcome(
    session: &XapiSession,
    task: Option<&Ref>,
    addr: &str,
    method: &str,
    wait: Duration,
) -> Result<Option<XapiError>, XapiError> {
    let Some(task) = task else {
        return Err(XapiError::protocol(
            method,
            "the answer named no task (task-id header), so the outcome is unknown",
        ));
    };
    let deadline = tokio::time::Instant::now() + wait;
    let mut delay = Duration::from_millis(20);
    loop {
        match session.task_get_status(task).await?.as_str() {
            "success" => return Ok(None),
            "pending" | "cancelling" if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            "pending" | "cancelling" => {
                return Err(XapiError::Timeout {
                    addr: addr.to_owned(),
                    what: format!("{method} (waiting for its task)"),
                    after: wait,
                })
            }
            _ => {
                let mut info = session.task_get_error_info(task).await?;
                let code = if info.is_empty() {
                    "the request failed without an error code".to_owned()
                } else {
                    info.remove(0)
                };
                return Ok(Some(XapiError::Failure {
                    method: method.to_owned(),
                    failure: XenApiError::Failure { code, args: info },
                }));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_heads() {
        let ok = b"HTTP/1.1 200 OK\r\nConnection: close\r\ntask-id:OpaqueRef:t1\r\n\r\n";
        let (status, task) = parse_head(ok).unwrap();
        assert_eq!(status, 200);
        assert_eq!(task.unwrap().as_str(), "OpaqueRef:t1");
        assert_eq!(
            parse_head(b"HTTP/1.0 404 Not Found\r\n\r\n").unwrap(),
            (404, None)
        );
        for bad in [
            &b"SSH-2.0\r\n\r\n"[..],
            b"HTTP/1.1 abc\r\n\r\n",
            b"\xff\r\n\r\n",
            b"",
        ] {
            assert!(parse_head(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn chunks_must_be_whole_sectors() {
        assert_eq!(misaligned(512, 4096), None);
        assert!(misaligned(100, 512).unwrap().contains("512-byte sectors"));
        assert!(misaligned(0, 100).is_some());
        assert!(misaligned(0, 0).is_some());
        assert!(misaligned(0, MAX_CHUNK + 512).is_some());
    }
}
