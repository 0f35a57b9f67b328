//! The HTTPS front: VI/JSON under `/sdk/vim25/{release}/` (its release negotiated with
//! `/api/vcenter/system?action=hello`), the datastore file service under `/folder/`, the test
//! API under `/sim/`. HTTP/1.1 with keep-alive; other paths 404.

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::state::Shared;
use crate::vim::{self, CallError, Reply, SESSION_HEADER};
use crate::{folder, simapi};

pub type Body = BoxBody<Bytes, std::io::Error>;

/// Largest accepted request body: `/sim/write` carries base64 guest data.
pub const MAX_BODY: usize = 64 << 20;

/// Releases the simulator answers under `/sdk/vim25/{release}/`: its own and 8.0.1.0, the
/// first with VI/JSON.
pub const RELEASES: [&str; 2] = ["8.0.1.0", "8.0.2.0"];

pub fn spawn(listener: TcpListener, acceptor: TlsAcceptor, shared: Arc<Shared>) -> JoinHandle<()> {
    cbtstream_testkit::tls_accept::serve_tls(listener, acceptor, move |tls| {
        let shared = shared.clone();
        async move {
            let svc = service_fn(move |req| handle(req, shared.clone()));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        }
    })
}

pub fn full(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

pub fn text(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    let mut m = msg.into();
    m.push('\n');
    full(status, "text/plain", m)
}

pub fn json(status: StatusCode, v: &Value) -> Response<Body> {
    full(status, "application/json", v.to_string())
}

pub fn no_content() -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::new()).map_err(|n| match n {}).boxed());
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

/// Reads a JSON request body (empty: `{}`).
pub async fn read_json(req: Request<Incoming>) -> Result<Value, Response<Body>> {
    let bytes = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(text(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large",
            ))
        }
        Err(_) => {
            return Err(text(
                StatusCode::BAD_REQUEST,
                "could not read the request body",
            ))
        }
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Object(Default::default()));
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        text(
            StatusCode::BAD_REQUEST,
            format!("the request body is not JSON: {e}"),
        )
    })
}

pub fn session_token(req: &Request<Incoming>) -> Option<String> {
    req.headers()
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

async fn handle(req: Request<Incoming>, shared: Arc<Shared>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let resp = if let Some(rest) = path.strip_prefix("/sdk/vim25/") {
        vi_json(req, &shared, rest).await
    } else if path == "/api/vcenter/system" {
        hello(req).await
    } else if path.starts_with("/folder/") {
        folder::serve(req, &shared).await
    } else if let Some(name) = path.strip_prefix("/sim/") {
        let name = name.to_owned();
        simapi::serve(req, &shared, &name).await
    } else {
        text(StatusCode::NOT_FOUND, "not found")
    };
    if shared.lock().log_calls {
        // The path names objects and methods only; tokens and bodies are never logged.
        let shown = if path.starts_with("/folder/") {
            "/folder/..."
        } else {
            &path
        };
        eprintln!(
            "vsphere-sim: {method} {shown} -> {}",
            resp.status().as_u16()
        );
    }
    Ok(resp)
}

/// `POST /api/vcenter/system?action=hello` `{"api_releases":[...]}` (vSphere Automation API,
/// since 8.0.2.0; no session): the first of the client's releases the simulator serves, or ""
/// when none is; an empty list, more than 128 ids or an id over 64 characters is a 400.
async fn hello(req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::POST || req.uri().query() != Some("action=hello") {
        return text(StatusCode::NOT_FOUND, "not found");
    }
    let body = match read_json(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let releases: Option<Vec<&str>> = body
        .get("api_releases")
        .and_then(Value::as_array)
        .filter(|list| (1..=128).contains(&list.len()))
        .and_then(|list| list.iter().map(Value::as_str).collect())
        .filter(|list: &Vec<&str>| list.iter().all(|r| r.len() <= 64));
    let Some(releases) = releases else {
        return json(
            StatusCode::BAD_REQUEST,
            &json!({"error_type": "INVALID_ARGUMENT", "messages": [{
                "id": "vcenter.system.hello.invalid_argument",
                "default_message": "api_releases must list 1 to 128 release ids of at most 64 characters",
                "args": []
            }]}),
        );
    };
    let chosen = releases
        .into_iter()
        .find(|r| RELEASES.contains(r))
        .unwrap_or("");
    json(StatusCode::OK, &json!({ "api_release": chosen }))
}

async fn vi_json(req: Request<Incoming>, shared: &Arc<Shared>, rest: &str) -> Response<Body> {
    let parts: Vec<String> = rest.split('/').map(str::to_owned).collect();
    let [release, typ, moid, name] = parts.as_slice() else {
        return text(StatusCode::NOT_FOUND, "not a VI/JSON path");
    };
    if !RELEASES.contains(&release.as_str()) {
        return text(StatusCode::NOT_FOUND, format!("unknown release {release}"));
    }
    let token = session_token(&req);
    let (typ, moid, name) = (typ.clone(), moid.clone(), name.clone());
    // Named as `calls` names them: a method, or `GET <property>`.
    let held = if *req.method() == Method::GET {
        format!("GET {name}")
    } else {
        name.clone()
    };
    let outcome = match *req.method() {
        Method::GET => vim::get(&mut shared.lock(), token.as_deref(), &typ, &moid, &name),
        Method::POST => {
            let body = match read_json(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let shared = shared.clone();
            // Tasks' work and disk writes touch files: off the reactor.
            match tokio::task::spawn_blocking(move || {
                vim::call(&shared, token.as_deref(), &typ, &moid, &name, &body)
            })
            .await
            {
                Ok(r) => r,
                Err(_) => return text(StatusCode::INTERNAL_SERVER_ERROR, "the simulator failed"),
            }
        }
        _ => return text(StatusCode::METHOD_NOT_ALLOWED, "VI/JSON takes GET and POST"),
    };
    shared.wait_unheld(&held).await;
    let lost = {
        let mut st = shared.lock();
        let at = st.lose_answer.iter().position(|m| *m == held);
        at.map(|i| st.lose_answer.remove(i)).is_some()
    };
    if lost {
        return text(
            StatusCode::GATEWAY_TIMEOUT,
            "the proxy in front of vCenter gave up waiting (simulated)",
        );
    }
    match outcome {
        Ok(Reply::Json(v)) => json(StatusCode::OK, &v),
        Ok(Reply::Void) => no_content(),
        Ok(Reply::LoggedIn { token, body }) => {
            let mut r = json(StatusCode::OK, &body);
            if let Ok(v) = HeaderValue::from_str(&token) {
                r.headers_mut().insert(SESSION_HEADER, v);
            }
            r
        }
        Err(CallError::Fault(f)) => json(StatusCode::INTERNAL_SERVER_ERROR, &f.to_json()),
        Err(CallError::NoSuchPath) => text(StatusCode::NOT_FOUND, "no such method or property"),
    }
}
