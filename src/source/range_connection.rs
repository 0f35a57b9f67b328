//! One connection of the HTTPS range source: a task sends the queued reads one after
//! another on a kept-alive HTTP/1.1 connection, checks each answer and copies its body into
//! the engine's buffer.

use super::endpoint::Sender;
use super::http_range::{HttpRangeError, Shared, Span};
use crate::engine::source::{Completion, Reply, RequestError, SourceConnection, SourceError};
use bytes::BytesMut;
use cbtstream_proto::http_range::{check_content_range, decimal, range_header};
use http_body_util::BodyExt;
use hyper::header::{HeaderMap, HeaderValue, CONTENT_LENGTH, CONTENT_RANGE, RANGE};
use hyper::{Method, StatusCode};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The longest read one request asks for.
const MAX_REQUEST: u64 = 32 << 20;

/// Reads a connection holds: one on the wire, one ready to send.
const QUEUED_READS: usize = 2;

/// The body of an error answer read to keep the connection, at most; a longer one closes it.
const ERROR_BODY_LIMIT: usize = 64 << 10;

/// One read to make.
struct Get {
    tag: u64,
    span: Span,
    buf: BytesMut,
    reply_to: mpsc::UnboundedSender<Completion>,
}

/// One kept-alive connection: a task sends the queued reads one after another.
pub(super) struct RangeConnection {
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
    pub(super) fn start(
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
        let e = HttpRangeError::NoBlockStatus { offset, len };
        let result = Err(RequestError::Server(SourceError::new(e)));
        let _ = reply_to.send(Completion { tag, result });
    }

    /// HTTP has no goodbye: once the queue is closed the task ends and drops the request
    /// side, and hyper shuts the TLS stream down (close_notify).
    fn close(self: Box<Self>) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(async move {
            let mut this = self;
            // Drop the real queue sender now (`this` stays alive to await its task).
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
