//! The HTTPS front: XML-RPC over `POST /` (also `/RPC2` and `/xmlrpc`), as XAPI serves it,
//! and the disk and metadata handlers of `http_disk` on the same listener.
//!
//! Every XenAPI answer is HTTP 200 with a `Status` struct; only a request that is not
//! XML-RPC at all gets an HTTP 500 with an XML-RPC `<fault>` (research notes 5.1). Other
//! paths answer 404, other methods 405, bodies over [`MAX_BODY`] 413.

use std::convert::Infallible;
use std::sync::Arc;

use cbtstream_proto::xmlrpc::{
    decode_call, encode_fault, encode_xenapi_failure, encode_xenapi_success,
};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::api::dispatch;
use crate::http_disk;
use crate::http_raw::{is_disk_path, read_head, Prefixed, HEAD_TIMEOUT};
use crate::state::Shared;

/// Largest accepted request body. `sim.write` carries base64 guest data; 64 MiB of XML is
/// far more than any real XenAPI call sends.
pub(crate) const MAX_BODY: usize = 64 << 20;

/// Which host this listener plays.
pub(crate) enum Role {
    /// The pool master: the real API.
    Master(Arc<Shared>),
    /// A pool member (supporter): every call, login included, answers
    /// `HOST_IS_SLAVE [master address]`.
    Slave { master: String },
}

/// Serves HTTPS on `listener` until the returned task is aborted (which also aborts every
/// connection).
pub(crate) fn spawn(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    role: Arc<Role>,
) -> JoinHandle<()> {
    cbtstream_testkit::tls_accept::serve_tls(listener, acceptor, move |tls| {
        serve_connection(tls, role.clone())
    })
}

/// The disk handlers take a connection whose first request is theirs; everything else goes
/// to hyper (the bytes already read replayed first).
async fn serve_connection(mut tls: TlsStream<TcpStream>, role: Arc<Role>) {
    let mut prefix = Vec::new();
    if let Role::Master(shared) = &*role {
        let Ok(Ok((head, buf))) = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut tls)).await
        else {
            return;
        };
        if let Some((head, used)) = head {
            if is_disk_path(&head.path) {
                let pending = buf.get(used..).unwrap_or_default();
                return http_disk::serve(shared.clone(), head, pending, &mut tls).await;
            }
        }
        prefix = buf;
    }
    let svc = service_fn(move |req| handle(req, role.clone()));
    let _ = http1::Builder::new()
        .serve_connection(TokioIo::new(Prefixed::new(prefix, tls)), svc)
        .await;
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, "text/plain".parse().expect("static header"));
    r
}

fn xml(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, "text/xml".parse().expect("static header"));
    r
}

async fn handle(
    req: Request<Incoming>,
    role: Arc<Role>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if !matches!(req.uri().path(), "/" | "/RPC2" | "/xmlrpc") {
        return Ok(plain(StatusCode::NOT_FOUND, "not found\n"));
    }
    if req.method() != Method::POST {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "XML-RPC needs POST\n");
        r.headers_mut()
            .insert(ALLOW, "POST".parse().expect("static header"));
        return Ok(r);
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Ok(plain(StatusCode::PAYLOAD_TOO_LARGE, "request too large\n"));
        }
        Err(_) => {
            return Ok(plain(
                StatusCode::BAD_REQUEST,
                "could not read the request\n",
            ))
        }
    };
    let (method, params) = match decode_call(&body) {
        Ok(c) => c,
        // The decoder's messages never quote string values, so this leaks nothing.
        Err(e) => {
            return Ok(xml(
                StatusCode::INTERNAL_SERVER_ERROR,
                encode_fault(-1, &format!("Could not parse the XML-RPC request: {e}")),
            ))
        }
    };
    let shared = match &*role {
        Role::Slave { master } => {
            return Ok(xml(
                StatusCode::OK,
                encode_xenapi_failure("HOST_IS_SLAVE", &[master]),
            ))
        }
        Role::Master(shared) => shared.clone(),
    };
    // Calls may block (image copies, data_destroy's wait), so they run off the reactor.
    let res = tokio::task::spawn_blocking(move || dispatch(&shared, &method, &params)).await;
    Ok(match res {
        Ok(Ok(v)) => xml(StatusCode::OK, encode_xenapi_success(&v)),
        Ok(Err(f)) => xml(StatusCode::OK, encode_xenapi_failure(&f.code, &f.args)),
        Err(_) => xml(
            StatusCode::OK,
            encode_xenapi_failure("INTERNAL_ERROR", &["the simulator failed on this call"]),
        ),
    })
}
