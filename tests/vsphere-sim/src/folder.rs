//! The datastore file service: `GET|HEAD /folder/<path>?dcPath=<datacenter>&dsName=<datastore>`
//! with one byte range per request.
//!
//! Authentication, any of: the session cookie `vmware_soap_session` (a logged-in session's
//! token), a generic service ticket in the cookie `vmware_cgi_ticket` (single use, for the
//! exact URL and HTTP method it was acquired for), or HTTP basic auth (which opens a session
//! and sets the cookie). Files served: each disk's descriptor `<vm>/<vm>.vmdk` and flat extent
//! `<vm>/<vm>-flat.vmdk`. The flat extent answers 500 while the VM writes to it (no snapshot:
//! the running VM holds its lock); delta links answer 500 while written, 501 once frozen (the
//! simulator's deltas are not in a VMware sparse format).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use base64::Engine;
use http_body_util::BodyExt;
use hyper::body::{Bytes, Frame, Incoming, SizeHint};
use hyper::header::{HeaderValue, ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::mpsc;

use crate::http::{text, Body};
use crate::state::{Session, Shared, State};
use crate::vim::new_secret;
use cbtstream_testkit::tls_accept::percent_decode;

const CHUNK: u64 = 1 << 20;
const SESSION_COOKIE: &str = "vmware_soap_session";
const TICKET_COOKIE: &str = "vmware_cgi_ticket";

fn cookie(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.headers()
        .get_all(hyper::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"').to_owned())
}

enum Auth {
    Ok,
    /// Basic auth opened this session: set its cookie.
    NewSession(String),
    Refused,
}

fn authenticate(st: &mut State, req: &Request<Incoming>) -> Auth {
    let takes_api_token = st.folder_takes_api_token;
    if cookie(req, SESSION_COOKIE).is_some_and(|t| {
        st.sessions
            .get(&t)
            .is_some_and(|s| s.by_file_service || takes_api_token)
    }) {
        return Auth::Ok;
    }
    if let Some(id) = cookie(req, TICKET_COOKIE) {
        let want = if req.method() == Method::HEAD {
            "httpHead"
        } else {
            "httpGet"
        };
        let target = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("");
        let valid = st
            .tickets
            .get(&id)
            .is_some_and(|t| t.path_and_query == target && t.method == want);
        if valid {
            st.tickets.remove(&id);
            return Auth::Ok;
        }
    }
    let basic = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|b| String::from_utf8(b).ok());
    if let Some((user, pass)) = basic.as_deref().and_then(|s| s.split_once(':')) {
        if user == st.user && pass == st.password {
            let token = new_secret();
            st.sessions.insert(
                token.clone(),
                Session {
                    user: user.to_owned(),
                    key: uuid::Uuid::new_v4().to_string(),
                    login_time: crate::json::now(),
                    by_file_service: true,
                },
            );
            st.count("folder basic auth");
            return Auth::NewSession(token);
        }
    }
    Auth::Refused
}

/// What a datastore path names.
enum Target {
    Descriptor(String),
    Data(PathBuf, u64),
    /// 500: the running VM holds the file's lock.
    Locked,
    /// 501: a frozen delta link, not served by the simulator.
    FrozenDelta,
}

fn descriptor_text(capacity: u64, flat_name: &str, uuid: &str) -> String {
    format!(
        "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID=fffffffe\nparentCID=ffffffff\n\
         createType=\"vmfs\"\n\n# Extent description\nRW {} VMFS \"{flat_name}\"\n\n\
         # The Disk Data Base\n#DDB\n\nddb.adapterType = \"lsilogic\"\nddb.thinProvisioned = \"1\"\n\
         ddb.uuid = \"{uuid}\"\nddb.virtualHWVersion = \"19\"\n",
        capacity / 512
    )
}

fn lookup(st: &State, ds_name: &str, path: &str) -> Option<Target> {
    if ds_name != st.datastores[0].name {
        return None;
    }
    for vm in &st.vms {
        for d in &vm.disks {
            let top = d.layers.len() - 1;
            for (i, layer) in d.layers.iter().enumerate() {
                let stem = layer.descriptor.trim_end_matches(".vmdk");
                if i == 0 {
                    let flat = format!("{stem}-flat.vmdk");
                    let flat_name = flat.rsplit('/').next().unwrap_or(&flat).to_owned();
                    if path == layer.descriptor {
                        return Some(Target::Descriptor(descriptor_text(
                            d.capacity, &flat_name, &d.uuid,
                        )));
                    }
                    if path == flat {
                        return Some(if top == 0 {
                            Target::Locked
                        } else {
                            Target::Data(layer.path.clone(), d.capacity)
                        });
                    }
                } else if path == layer.descriptor || path == format!("{stem}-sesparse.vmdk") {
                    return Some(if i == top {
                        Target::Locked
                    } else {
                        Target::FrozenDelta
                    });
                }
            }
        }
    }
    None
}

/// A single `bytes=` range of a `size`-byte file: `Ok(None)` serve it whole (no Range, or
/// one the server may ignore: several ranges, bad syntax), `Err(())` unsatisfiable.
pub fn parse_range(header: Option<&str>, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        let Ok(n) = b.parse::<u64>() else {
            return Ok(None);
        };
        if n == 0 || size == 0 {
            return Err(());
        }
        return Ok(Some((size.saturating_sub(n), size - 1)));
    }
    let Ok(start) = a.parse::<u64>() else {
        return Ok(None);
    };
    let end = match b {
        "" => u64::MAX,
        b => match b.parse::<u64>() {
            Ok(e) if e >= start => e,
            _ => return Ok(None),
        },
    };
    if start >= size {
        return Err(());
    }
    Ok(Some((start, end.min(size - 1))))
}

/// Streams `len` bytes of a file from `offset`, read in 1 MiB chunks off the reactor.
struct FileBody {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    remaining: u64,
}

impl hyper::body::Body for FileBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(b))) => {
                self.remaining = self.remaining.saturating_sub(b.len() as u64);
                Poll::Ready(Some(Ok(Frame::data(b))))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

fn file_body(path: PathBuf, offset: u64, len: u64) -> Body {
    let (tx, rx) = mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        };
        let mut pos = offset;
        while pos < offset + len {
            let n = CHUNK.min(offset + len - pos) as usize;
            let mut buf = vec![0u8; n];
            let res = file.read_exact_at(&mut buf, pos).map(|_| Bytes::from(buf));
            let failed = res.is_err();
            if tx.blocking_send(res).is_err() || failed {
                return;
            }
            pos += n as u64;
        }
    });
    FileBody { rx, remaining: len }.boxed()
}

pub async fn serve(req: Request<Incoming>, shared: &Arc<Shared>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "the simulator's file service is read-only: GET and HEAD",
        );
    }
    let head = req.method() == Method::HEAD;
    let (auth, target) = {
        let mut st = shared.lock();
        st.count("GET /folder");
        let auth = authenticate(&mut st, &req);
        if let Auth::Refused = auth {
            let mut r = text(StatusCode::UNAUTHORIZED, "authentication required");
            r.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"VMware HTTP server\""),
            );
            return r;
        }
        let raw_path = req.uri().path().trim_start_matches("/folder/");
        let Some(path) = percent_decode(raw_path) else {
            return text(StatusCode::BAD_REQUEST, "bad percent-encoding in the path");
        };
        let mut dc = None;
        let mut ds = None;
        for kv in req.uri().query().unwrap_or("").split('&') {
            match kv.split_once('=') {
                Some(("dcPath", v)) => dc = percent_decode(v),
                Some(("dsName", v)) => ds = percent_decode(v),
                _ => {}
            }
        }
        let target = match (dc, ds) {
            (Some(dc), Some(ds)) if dc == st.dc_path() => lookup(&st, &ds, &path),
            _ => None,
        };
        (auth, target)
    };
    shared.wait_unheld("GET /folder").await;
    let mut resp = match target {
        None => text(StatusCode::NOT_FOUND, "no such file on the datastore"),
        Some(Target::Locked) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the file is locked: the running virtual machine writes it",
        ),
        Some(Target::FrozenDelta) => text(
            StatusCode::NOT_IMPLEMENTED,
            "the simulator does not serve delta disk links",
        ),
        Some(Target::Descriptor(t)) => ranged(&req, t.len() as u64, head, |s, l| {
            let b = Bytes::from(t.into_bytes()).slice(s as usize..(s + l) as usize);
            http_body_util::Full::new(b).map_err(|n| match n {}).boxed()
        }),
        Some(Target::Data(path, size)) => ranged(&req, size, head, |s, l| file_body(path, s, l)),
    };
    if let Auth::NewSession(token) = auth {
        let c = format!("{SESSION_COOKIE}=\"{token}\"; Path=/; HttpOnly; Secure");
        if let Ok(v) = HeaderValue::from_str(&c) {
            resp.headers_mut().insert(hyper::header::SET_COOKIE, v);
        }
    }
    resp
}

fn ranged(
    req: &Request<Incoming>,
    size: u64,
    head: bool,
    body: impl FnOnce(u64, u64) -> Body,
) -> Response<Body> {
    let range = req
        .headers()
        .get(hyper::header::RANGE)
        .and_then(|v| v.to_str().ok());
    let (status, start, len) = match parse_range(range, size) {
        Ok(None) => (StatusCode::OK, 0, size),
        Ok(Some((s, e))) => (StatusCode::PARTIAL_CONTENT, s, e - s + 1),
        Err(()) => {
            let mut r = text(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable");
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                r.headers_mut().insert(CONTENT_RANGE, v);
            }
            return r;
        }
    };
    let b = if head {
        http_body_util::Empty::new().map_err(|n| match n {}).boxed()
    } else {
        body(start, len)
    };
    let mut r = Response::new(b);
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(CONTENT_LENGTH, HeaderValue::from(len));
    if status == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{size}", start + len - 1)) {
            h.insert(CONTENT_RANGE, v);
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10), Ok(None));
        assert_eq!(parse_range(Some("bytes=2-4"), 10), Ok(Some((2, 4))));
        assert_eq!(parse_range(Some("bytes=2-"), 10), Ok(Some((2, 9))));
        assert_eq!(parse_range(Some("bytes=8-100"), 10), Ok(Some((8, 9))));
        assert_eq!(parse_range(Some("bytes=-3"), 10), Ok(Some((7, 9))));
        assert_eq!(parse_range(Some("bytes=10-12"), 10), Err(()));
        assert_eq!(parse_range(Some("bytes=0-1,4-5"), 10), Ok(None));
        assert_eq!(parse_range(Some("bytes=5-2"), 10), Ok(None));
        assert_eq!(parse_range(Some("items=1-2"), 10), Ok(None));
    }
}
