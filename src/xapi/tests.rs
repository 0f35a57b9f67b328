//! The client against an in-process XML-RPC server (hyper over tokio-rustls) that answers
//! with scripted responses in XAPI's encoding, built with our codec.

use super::calls::VdiRecord;
use super::transport::{Endpoint, XapiOptions};
use super::*;
use crate::tls::Trust;
use cbtstream_proto::xmlrpc::{decode_call, encode_xenapi_failure, encode_xenapi_success, Value};
use cbtstream_testkit::TestPki;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

const USER: &str = "root";
const PASSWORD: &str = "s3cret-pw";

// ---------------------------------------------------------------------------------------
// The scripted server

enum Reply {
    Ok(Value),
    Fail(&'static str, Vec<String>),
    Status(u16),
    /// A success body sent chunked, without Content-Length.
    Chunked {
        chunk: usize,
        count: usize,
    },
    /// Never answer.
    Hang,
}

fn fail(code: &'static str, args: &[&str]) -> Reply {
    Reply::Fail(code, args.iter().map(|s| s.to_string()).collect())
}

type Handler = Arc<dyn Fn(&str, &[Value]) -> Reply + Send + Sync>;
type Calls = Arc<Mutex<Vec<(String, Vec<Value>)>>>;

struct Server {
    addr: SocketAddr,
    calls: Calls,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    fn port(&self) -> u16 {
        self.addr.port()
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}/", self.port())
    }

    fn methods(&self) -> Vec<String> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|(m, _)| m.clone())
            .collect()
    }

    fn calls(&self) -> Vec<(String, Vec<Value>)> {
        self.calls.lock().unwrap().clone()
    }
}

async fn serve(
    tls: Option<Arc<rustls::ServerConfig>>,
    keep_alive: bool,
    handler: impl Fn(&str, &[Value]) -> Reply + Send + Sync + 'static,
) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    serve_on(listener, tls, keep_alive, handler)
}

fn serve_on(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    keep_alive: bool,
    handler: impl Fn(&str, &[Value]) -> Reply + Send + Sync + 'static,
) -> Server {
    let addr = listener.local_addr().unwrap();
    let calls: Calls = Arc::default();
    let connections = Arc::new(AtomicUsize::new(0));
    let handler: Handler = Arc::new(handler);
    let task = {
        let (calls, connections) = (calls.clone(), connections.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                connections.fetch_add(1, Ordering::SeqCst);
                let (calls, handler, tls) = (calls.clone(), handler.clone(), tls.clone());
                tokio::spawn(async move {
                    let service =
                        service_fn(move |req| respond(req, handler.clone(), calls.clone()));
                    let mut http = hyper::server::conn::http1::Builder::new();
                    http.keep_alive(keep_alive);
                    match tls {
                        Some(cfg) => {
                            // A client that refuses our certificate ends here.
                            let Ok(s) = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await
                            else {
                                return;
                            };
                            let _ = http.serve_connection(TokioIo::new(s), service).await;
                        }
                        None => {
                            let _ = http.serve_connection(TokioIo::new(tcp), service).await;
                        }
                    }
                });
            }
        })
    };
    Server {
        addr,
        calls,
        connections,
        task,
    }
}

async fn respond(
    req: Request<Incoming>,
    handler: Handler,
    calls: Calls,
) -> Result<Response<BoxBody<Bytes, Infallible>>, Infallible> {
    assert_eq!(req.method(), hyper::Method::POST);
    assert_eq!(req.uri().path(), "/");
    assert_eq!(req.headers()["content-type"], "text/xml");
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let (method, params) = decode_call(&body).unwrap();
    calls.lock().unwrap().push((method.clone(), params.clone()));
    let xml = match handler(&method, &params) {
        Reply::Ok(v) => encode_xenapi_success(&v),
        Reply::Fail(code, args) => encode_xenapi_failure(code, &args),
        Reply::Status(s) => {
            let mut r = Response::new(Full::new(Bytes::from("no")).boxed());
            *r.status_mut() = hyper::StatusCode::from_u16(s).unwrap();
            return Ok(r);
        }
        Reply::Chunked { chunk, count } => {
            let body = Chunks {
                chunk: Bytes::from(vec![b' '; chunk]),
                left: count,
            };
            return Ok(Response::new(body.boxed()));
        }
        Reply::Hang => std::future::pending().await,
    };
    let mut r = Response::new(Full::new(Bytes::from(xml)).boxed());
    r.headers_mut()
        .insert("content-type", "text/xml".parse().unwrap());
    Ok(r)
}

/// A body of unknown length: hyper sends it chunked.
struct Chunks {
    chunk: Bytes,
    left: usize,
}

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        self.left -= 1;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.clone()))))
    }
}

// ---------------------------------------------------------------------------------------
// Fixtures

struct Pki {
    _dir: tempfile::TempDir,
    pki: TestPki,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let pki = TestPki::generate(dir.path()).unwrap();
        Pki { _dir: dir, pki }
    }

    fn server(&self) -> Option<Arc<rustls::ServerConfig>> {
        Some(self.pki.server_config().unwrap())
    }

    fn ca(&self) -> Trust {
        Trust::CaFile(self.pki.ca_pem_path.clone())
    }

    fn pin(&self) -> Trust {
        Trust::pin_from_hex(&crate::tls::sha256_hex(&self.pki.server_cert_der)).unwrap()
    }
}

fn opts(trust: Trust) -> XapiOptions {
    XapiOptions {
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(5),
        ..XapiOptions::new(trust)
    }
}

fn password() -> Secret {
    Secret::new(PASSWORD)
}

/// Every test body runs under this bound, so a hang fails instead of blocking the suite.
async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("the test timed out")
}

/// Answers login and logout like XAPI, checking the login parameters.
fn session_calls(method: &str, params: &[Value], session: &str) -> Option<Reply> {
    match method {
        "session.login_with_password" => {
            let p: Vec<&str> = params.iter().filter_map(Value::as_str).collect();
            Some(if p == [USER, PASSWORD, "1.1", "cbtstream"] {
                Reply::Ok(session.into())
            } else {
                fail(
                    "SESSION_AUTHENTICATION_FAILED",
                    &[p.first().copied().unwrap_or(""), "Authentication failure"],
                )
            })
        }
        "session.logout" => Some(Reply::Ok("".into())),
        _ => None,
    }
}

fn s(v: &str) -> Value {
    Value::from(v)
}

fn vdi_record() -> Value {
    Value::record([
        ("uuid", s("3f1e0c0a-0000-4000-8000-000000000001")),
        ("name_label", s("disk 0")),
        ("name_description", s("")),
        ("type", s("user")),
        // 2 TiB + 512: more than 32 bits, as XAPI sends int64: a decimal string.
        ("virtual_size", Value::int64_str(2_199_023_256_064)),
        ("physical_utilisation", Value::int64_str(4096)),
        ("cbt_enabled", Value::Bool(true)),
        ("is_a_snapshot", Value::Bool(false)),
        ("snapshot_of", s("OpaqueRef:NULL")),
        (
            "snapshots",
            Value::Array(vec![s("OpaqueRef:snap-a"), s("OpaqueRef:snap-b")]),
        ),
        (
            "other_config",
            Value::record([("cbtstream.chain", s("c1")), ("content_id", s("x"))]),
        ),
        ("sm_config", Value::record([("vhd-parent", s("p"))])),
        (
            "snapshot_time",
            Value::DateTime("19700101T00:00:00Z".into()),
        ),
        ("SR", s("OpaqueRef:sr-1")),
        ("VBDs", Value::Array(vec![])),
    ])
}

fn nbd_record(address: &str, session: &str) -> Value {
    Value::record([
        (
            "exportname",
            Value::String(format!(
                "/3f1e0c0a-0000-4000-8000-000000000001?session_id={session}"
            )),
        ),
        ("address", s(address)),
        ("port", Value::int64_str(10809)),
        (
            "cert",
            s("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"),
        ),
        ("subject", s("xs1.example")),
    ])
}

// ---------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn login_and_typed_calls_round_trip() {
    bounded(async {
        let pki = Pki::new();
        const SESSION: &str = "OpaqueRef:sess-1";
        let server = serve(pki.server(), true, |m, p| {
            if let Some(r) = session_calls(m, p, SESSION) {
                return r;
            }
            match m {
                "VDI.get_by_uuid" => Reply::Ok(s("OpaqueRef:vdi-1")),
                "VDI.get_record" => Reply::Ok(vdi_record()),
                "VDI.snapshot" => {
                    assert_eq!(
                        p[2],
                        Value::record([("k", s("v"))]),
                        "driver_params is a string map"
                    );
                    Reply::Ok(s("OpaqueRef:snap-new"))
                }
                "VDI.list_changed_blocks" => Reply::Ok(s("gAE=")),
                "VDI.get_nbd_info" => Reply::Ok(Value::Array(vec![
                    nbd_record("10.0.0.5", SESSION),
                    nbd_record("fd00::5", SESSION),
                ])),
                "VDI.get_uuid" => Reply::Ok(s("3f1e0c0a-0000-4000-8000-000000000001")),
                "VDI.get_type" => Reply::Ok(s("cbt_metadata")),
                "VDI.get_snapshots" => Reply::Ok(Value::Array(vec![s("OpaqueRef:snap-a")])),
                "VDI.data_destroy"
                | "VDI.destroy"
                | "VDI.enable_cbt"
                | "VDI.add_to_other_config"
                | "VDI.remove_from_other_config" => Reply::Ok(s("")),
                _ => fail("MESSAGE_METHOD_UNKNOWN", &[m]),
            }
        })
        .await;

        let x = XapiSession::login_with(&server.url(), USER, &password(), &opts(pki.ca()))
            .await
            .unwrap();
        let vdi = x
            .vdi_get_by_uuid("3f1e0c0a-0000-4000-8000-000000000001")
            .await
            .unwrap();
        assert_eq!(vdi.as_str(), "OpaqueRef:vdi-1");

        let rec = x.vdi_get_record(&vdi).await.unwrap();
        assert_eq!(
            rec,
            VdiRecord {
                uuid: "3f1e0c0a-0000-4000-8000-000000000001".into(),
                name_label: "disk 0".into(),
                vdi_type: "user".into(),
                virtual_size: 2_199_023_256_064,
                cbt_enabled: true,
                is_a_snapshot: false,
                snapshot_of: None,
                snapshots: vec![
                    Ref::parse("OpaqueRef:snap-a").unwrap(),
                    Ref::parse("OpaqueRef:snap-b").unwrap()
                ],
                other_config: BTreeMap::from([
                    ("cbtstream.chain".to_string(), "c1".to_string()),
                    ("content_id".to_string(), "x".to_string()),
                ]),
                sr: Ref::parse("OpaqueRef:sr-1").unwrap(),
                snapshot_time: Some("19700101T00:00:00Z".into()),
            }
        );

        let params = BTreeMap::from([("k".to_string(), "v".to_string())]);
        let snap = x.vdi_snapshot(&vdi, params).await.unwrap();
        assert_eq!(snap.as_str(), "OpaqueRef:snap-new");
        assert_eq!(
            x.vdi_list_changed_blocks(&vdi, &snap).await.unwrap(),
            "gAE="
        );

        let nbd = x.vdi_get_nbd_info(&snap).await.unwrap();
        assert_eq!(nbd.len(), 2);
        assert_eq!(nbd[0].address, "10.0.0.5");
        assert_eq!(nbd[1].address, "fd00::5");
        assert_eq!(nbd[0].port, 10809);
        assert_eq!(nbd[0].subject, "xs1.example");
        assert!(nbd[0].cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(
            nbd[0].exportname.expose(),
            format!("/3f1e0c0a-0000-4000-8000-000000000001?session_id={SESSION}")
        );

        assert_eq!(
            x.vdi_get_uuid(&snap).await.unwrap(),
            "3f1e0c0a-0000-4000-8000-000000000001"
        );
        assert_eq!(x.vdi_get_type(&snap).await.unwrap(), "cbt_metadata");
        assert_eq!(
            x.vdi_get_snapshots(&vdi).await.unwrap(),
            vec![Ref::parse("OpaqueRef:snap-a").unwrap()]
        );
        x.vdi_enable_cbt(&vdi).await.unwrap();
        x.vdi_add_to_other_config(&vdi, "k", "v").await.unwrap();
        x.vdi_remove_from_other_config(&vdi, "k").await.unwrap();
        x.vdi_data_destroy(&snap).await.unwrap();
        x.vdi_destroy(&snap).await.unwrap();
        let unknown = x.call("VDI.nope", &[]).await.unwrap_err();
        assert!(unknown.is("MESSAGE_METHOD_UNKNOWN"), "{unknown}");
        x.logout().await;

        let calls = server.calls();
        assert_eq!(calls.first().unwrap().0, "session.login_with_password");
        assert_eq!(calls.last().unwrap().0, "session.logout");
        for (m, p) in &calls[1..] {
            assert_eq!(p[0], s(SESSION), "{m} gets the session first");
        }
        let by_name = |name: &str| calls.iter().find(|(m, _)| m == name).unwrap().1.clone();
        assert_eq!(by_name("VDI.get_record")[1], s("OpaqueRef:vdi-1"));
        assert_eq!(
            by_name("VDI.list_changed_blocks")[1..],
            [s("OpaqueRef:vdi-1"), s("OpaqueRef:snap-new")]
        );
        assert_eq!(
            by_name("VDI.add_to_other_config")[1..],
            [s("OpaqueRef:vdi-1"), s("k"), s("v")]
        );
        // All calls went over one kept-alive TLS connection.
        assert_eq!(server.connections.load(Ordering::SeqCst), 1);
    })
    .await
}

#[tokio::test]
async fn session_invalid_logs_in_again_once() {
    bounded(async {
        let pki = Pki::new();
        let logins = Arc::new(AtomicUsize::new(0));
        let l = logins.clone();
        let server = serve(pki.server(), true, move |m, p| match m {
            "session.login_with_password" => {
                let n = l.fetch_add(1, Ordering::SeqCst) + 1;
                Reply::Ok(Value::String(format!("OpaqueRef:sess-{n}")))
            }
            // The first session has expired.
            "VDI.get_uuid" if p[0] == s("OpaqueRef:sess-1") => {
                fail("SESSION_INVALID", &["OpaqueRef:sess-1"])
            }
            "VDI.get_uuid" => Reply::Ok(s("u-1")),
            // Never accepted, whatever the session.
            "VDI.get_type" => fail("SESSION_INVALID", &[p[0].as_str().unwrap()]),
            _ => Reply::Ok(s("")),
        })
        .await;
        let x = XapiSession::login_with(&server.url(), USER, &password(), &opts(pki.pin()))
            .await
            .unwrap();
        let vdi = Ref::parse("OpaqueRef:vdi-1").unwrap();
        assert_eq!(x.vdi_get_uuid(&vdi).await.unwrap(), "u-1");
        assert_eq!(logins.load(Ordering::SeqCst), 2);
        assert_eq!(x.relogins(), 1);
        assert_eq!(
            server.methods(),
            [
                "session.login_with_password",
                "VDI.get_uuid",
                "session.login_with_password",
                "VDI.get_uuid"
            ]
        );

        // A session that keeps failing: one re-login, then the error, no loop.
        let e = x.vdi_get_type(&vdi).await.unwrap_err();
        assert!(e.is("SESSION_INVALID"), "{e}");
        assert_eq!(logins.load(Ordering::SeqCst), 3);
        let shown = format!("{e} {e:?}");
        assert!(!shown.contains("sess-"), "session ref leaked: {shown}");
        x.logout().await;
    })
    .await
}

#[tokio::test]
async fn host_is_slave_follows_to_the_master_once() {
    bounded(async {
        let pki = Pki::new();
        let master = serve(pki.server(), true, |m, p| {
            session_calls(m, p, "OpaqueRef:master-sess")
                .unwrap_or_else(|| Reply::Ok(s("from-master")))
        })
        .await;
        // Named by DNS name, so the CA trust also checks the `localhost` SAN.
        let master_addr = format!("localhost:{}", master.port());
        let member = serve(pki.server(), true, move |m, _| match m {
            "session.login_with_password" => fail("HOST_IS_SLAVE", &[&master_addr]),
            _ => fail("HOST_IS_SLAVE", &[&master_addr]),
        })
        .await;

        let x = XapiSession::login_with(&member.url(), USER, &password(), &opts(pki.ca()))
            .await
            .unwrap();
        assert_eq!(x.endpoint().host, "localhost");
        assert_eq!(x.endpoint().port, master.port());
        assert_eq!(
            x.vdi_get_uuid(&Ref::parse("OpaqueRef:v").unwrap())
                .await
                .unwrap(),
            "from-master"
        );
        x.logout().await;
        assert_eq!(member.methods(), ["session.login_with_password"]);
        assert_eq!(
            master.methods(),
            [
                "session.login_with_password",
                "VDI.get_uuid",
                "session.logout"
            ]
        );

        // Two members pointing at each other: one redirect, then the error.
        let b_port = Arc::new(AtomicUsize::new(0));
        let bp = b_port.clone();
        let a = serve(pki.server(), true, move |_, _| {
            fail(
                "HOST_IS_SLAVE",
                &[&format!("127.0.0.1:{}", bp.load(Ordering::SeqCst))],
            )
        })
        .await;
        let a_addr = format!("[::ffff:127.0.0.1]:{}", a.port());
        let b = serve(pki.server(), true, move |_, _| {
            fail("HOST_IS_SLAVE", &[&a_addr])
        })
        .await;
        b_port.store(b.port().into(), Ordering::SeqCst);
        let e = XapiSession::login_with(&a.url(), USER, &password(), &opts(pki.ca()))
            .await
            .unwrap_err();
        assert!(e.is("HOST_IS_SLAVE"), "{e}");
        assert_eq!(a.calls().len(), 1);
        assert_eq!(b.calls().len(), 1);
    })
    .await
}

#[tokio::test]
async fn wrong_pin_is_refused() {
    bounded(async {
        let pki = Pki::new();
        let server = serve(pki.server(), true, |m, p| {
            session_calls(m, p, "OpaqueRef:s").unwrap_or(Reply::Ok(s("")))
        })
        .await;
        let e = XapiSession::login_with(
            &server.url(),
            USER,
            &password(),
            &opts(Trust::Pin([0x11; 32])),
        )
        .await
        .unwrap_err();
        match &e {
            XapiError::Tls { reason, .. } => assert!(reason.contains("pin"), "{reason}"),
            other => panic!("expected a TLS error, got {other:?}"),
        }
        assert!(server.calls().is_empty());

        // The CA trust checks the name: the certificate is for localhost and 127.0.0.1, not
        // 127.0.0.2 (all of 127/8 is loopback on Linux).
        {
            let l = tokio::net::TcpListener::bind("127.0.0.2:0")
                .await
                .expect("binding 127.0.0.2 (loopback on Linux)");
            let other = serve_on(l, pki.server(), true, |_, _| Reply::Ok(s("OpaqueRef:s")));
            let url = format!("https://127.0.0.2:{}/", other.port());
            let e = XapiSession::login_with(&url, USER, &password(), &opts(pki.ca()))
                .await
                .unwrap_err();
            assert!(matches!(e, XapiError::Tls { .. }), "{e:?}");
            assert!(other.calls().is_empty());
        }

        // The right pin works.
        let x = XapiSession::login_with(&server.url(), USER, &password(), &opts(pki.pin()))
            .await
            .unwrap();
        x.logout().await;
    })
    .await
}

#[tokio::test]
async fn plaintext_needs_the_explicit_flag() {
    bounded(async {
        let server = serve(None, true, |m, p| {
            session_calls(m, p, "OpaqueRef:s").unwrap_or(Reply::Ok(s("")))
        })
        .await;
        let url = format!("http://127.0.0.1:{}/", server.port());
        let e = XapiSession::login_with(&url, USER, &password(), &opts(Trust::InsecureNoVerify))
            .await
            .unwrap_err();
        assert!(matches!(e, XapiError::PlaintextRefused(_)), "{e:?}");
        assert!(e.to_string().contains("--xapi-allow-plaintext"), "{e}");
        assert_eq!(server.connections.load(Ordering::SeqCst), 0);

        let mut o = opts(Trust::InsecureNoVerify);
        o.allow_plaintext = true;
        let x = XapiSession::login_with(&url, USER, &password(), &o)
            .await
            .unwrap();
        x.logout().await;
        assert_eq!(
            server.methods(),
            ["session.login_with_password", "session.logout"]
        );

        // The flag does not downgrade an https:// URL.
        let e = XapiSession::login_with(&server.url(), USER, &password(), &o)
            .await
            .unwrap_err();
        assert!(
            matches!(e, XapiError::Tls { .. } | XapiError::Transport { .. }),
            "{e:?}"
        );
    })
    .await
}

#[tokio::test]
async fn oversized_responses_are_refused() {
    bounded(async {
        let pki = Pki::new();
        let server = serve(pki.server(), true, |m, p| {
            if let Some(r) = session_calls(m, p, "OpaqueRef:s") {
                return r;
            }
            match m {
                "VDI.list_changed_blocks" => Reply::Ok(Value::String("A".repeat(10_000))),
                "VDI.get_uuid" => Reply::Chunked {
                    chunk: 1000,
                    count: 10,
                },
                _ => Reply::Ok(s("small")),
            }
        })
        .await;
        let mut o = opts(pki.pin());
        o.max_response_bytes = 4096;
        let x = XapiSession::login_with(&server.url(), USER, &password(), &o)
            .await
            .unwrap();
        let v = Ref::parse("OpaqueRef:v").unwrap();
        // Announced by Content-Length.
        let e = x.vdi_list_changed_blocks(&v, &v).await.unwrap_err();
        assert!(
            matches!(e, XapiError::TooLarge { limit: 4096, .. }),
            "{e:?}"
        );
        // Chunked, found while reading.
        let e = x.vdi_get_uuid(&v).await.unwrap_err();
        assert!(
            matches!(e, XapiError::TooLarge { limit: 4096, .. }),
            "{e:?}"
        );
        // The session still works (on a new connection).
        assert_eq!(x.vdi_get_type(&v).await.unwrap(), "small");
        x.logout().await;
    })
    .await
}

#[tokio::test]
async fn http_errors_timeouts_and_closed_connections() {
    bounded(async {
        let pki = Pki::new();
        let handler = |m: &str, p: &[Value]| {
            if let Some(r) = session_calls(m, p, "OpaqueRef:s") {
                return r;
            }
            match m {
                "VDI.destroy" => Reply::Status(500),
                "VDI.enable_cbt" => Reply::Hang,
                _ => Reply::Ok(s("ok")),
            }
        };
        let server = serve(pki.server(), true, handler).await;
        let mut o = opts(pki.pin());
        o.request_timeout = Duration::from_millis(300);
        let x = XapiSession::login_with(&server.url(), USER, &password(), &o)
            .await
            .unwrap();
        let v = Ref::parse("OpaqueRef:v").unwrap();
        let e = x.vdi_destroy(&v).await.unwrap_err();
        assert!(matches!(e, XapiError::Http { status: 500, .. }), "{e:?}");
        let e = x.vdi_enable_cbt(&v).await.unwrap_err();
        assert!(matches!(e, XapiError::Timeout { .. }), "{e:?}");
        assert!(e.to_string().contains("VDI.enable_cbt"), "{e}");
        assert_eq!(x.vdi_get_uuid(&v).await.unwrap(), "ok");
        x.logout().await;

        // A server that closes the connection after every response.
        let server = serve(pki.server(), false, handler).await;
        let x = XapiSession::login_with(&server.url(), USER, &password(), &opts(pki.pin()))
            .await
            .unwrap();
        for _ in 0..3 {
            assert_eq!(x.vdi_get_uuid(&v).await.unwrap(), "ok");
        }
        x.logout().await;
        assert_eq!(server.connections.load(Ordering::SeqCst), 5);

        // Nothing listening.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let e = XapiSession::login_with(
            &format!("https://127.0.0.1:{closed}"),
            USER,
            &password(),
            &opts(pki.pin()),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, XapiError::Connect { .. }), "{e:?}");
    })
    .await
}

#[tokio::test]
async fn secrets_never_show_in_debug_or_errors() {
    bounded(async {
        let pki = Pki::new();
        const SESSION: &str = "OpaqueRef:sess-secret-77";
        let server = serve(pki.server(), true, |m, p| {
            if let Some(r) = session_calls(m, p, SESSION) {
                return r;
            }
            match m {
                "VDI.get_nbd_info" => {
                    Reply::Ok(Value::Array(vec![nbd_record("10.0.0.5", SESSION)]))
                }
                "VDI.get_uuid" => fail("SESSION_INVALID", &[SESSION]),
                "VDI.get_type" => fail(
                    "VDI_INCOMPATIBLE_TYPE",
                    &["OpaqueRef:v", &format!("/x?session_id={SESSION}")],
                ),
                _ => Reply::Ok(s("")),
            }
        })
        .await;
        let check = |what: &str, text: String| {
            assert!(
                !text.contains(PASSWORD),
                "{what} shows the password: {text}"
            );
            assert!(
                !text.contains("sess-secret"),
                "{what} shows the session: {text}"
            );
        };

        let bad = XapiSession::login_with(
            &server.url(),
            USER,
            &Secret::new("wrong-pw"),
            &opts(pki.pin()),
        )
        .await
        .unwrap_err();
        assert!(bad.is("SESSION_AUTHENTICATION_FAILED"), "{bad}");
        assert!(!format!("{bad} {bad:?}").contains("wrong-pw"));

        let x = XapiSession::login_with(&server.url(), USER, &password(), &opts(pki.pin()))
            .await
            .unwrap();
        check("session Debug", format!("{x:?}"));
        check("password", format!("{} {:?}", password(), password()));
        let v = Ref::parse("OpaqueRef:v").unwrap();
        let nbd = x.vdi_get_nbd_info(&v).await.unwrap();
        check("NbdInfo Debug", format!("{nbd:?}"));
        let e = x.vdi_get_uuid(&v).await.unwrap_err();
        assert!(e.is("SESSION_INVALID"));
        check("SESSION_INVALID", format!("{e} {e:?}"));
        let e = x.vdi_get_type(&v).await.unwrap_err();
        check("export name in a failure", format!("{e} {e:?}"));
        // The exact text is still there for code that needs it.
        assert_eq!(e.args().unwrap()[0], "OpaqueRef:v");
        x.logout().await;
    })
    .await
}

#[tokio::test]
async fn malformed_records_name_the_field() {
    bounded(async {
        let pki = Pki::new();
        let server = serve(pki.server(), true, |m, p| {
            if let Some(r) = session_calls(m, p, "OpaqueRef:s") {
                return r;
            }
            match m {
                "VDI.get_record" => {
                    let mut r = vdi_record().into_struct().unwrap();
                    r.insert("virtual_size".into(), s("lots"));
                    Reply::Ok(Value::Struct(r))
                }
                "VDI.get_nbd_info" => {
                    let mut r = nbd_record("a", "OpaqueRef:s").into_struct().unwrap();
                    r.insert("port".into(), Value::int64_str(70000));
                    Reply::Ok(Value::Array(vec![Value::Struct(r)]))
                }
                "VDI.get_snapshots" => {
                    Reply::Ok(Value::record([("cbt_enabled", Value::Bool(true))]))
                }
                "VDI.snapshot" => Reply::Ok(s("not-a-ref")),
                "VDI.get_uuid" => Reply::Ok(Value::Bool(true)),
                _ => Reply::Ok(s("")),
            }
        })
        .await;
        let x = XapiSession::login_with(&server.url(), USER, &password(), &opts(pki.pin()))
            .await
            .unwrap();
        let v = Ref::parse("OpaqueRef:v").unwrap();
        let cases: Vec<(XapiError, &str)> = vec![
            (x.vdi_get_record(&v).await.unwrap_err(), "\"virtual_size\""),
            (x.vdi_get_nbd_info(&v).await.unwrap_err(), "\"port\""),
            (x.vdi_get_snapshots(&v).await.unwrap_err(), "not an array"),
            (
                x.vdi_snapshot(&v, BTreeMap::new()).await.unwrap_err(),
                "OpaqueRef",
            ),
            (x.vdi_get_uuid(&v).await.unwrap_err(), "not a string"),
        ];
        for (e, needle) in cases {
            assert!(matches!(e, XapiError::Protocol { .. }), "{e:?}");
            assert!(
                e.to_string().contains(needle),
                "{e} should mention {needle}"
            );
        }
        x.logout().await;
    })
    .await
}

#[test]
fn endpoints_parse_and_redirect() {
    let e = Endpoint::parse("xs1.example").unwrap();
    assert_eq!(
        e,
        Endpoint {
            tls: true,
            host: "xs1.example".into(),
            port: 443,
            path: "/".into()
        }
    );
    assert_eq!(e.url(), "https://xs1.example/");
    let e = Endpoint::parse("https://[fd00::1]:8443").unwrap();
    assert_eq!((e.host.as_str(), e.port), ("fd00::1", 8443));
    assert_eq!(e.authority(), "[fd00::1]:8443");
    assert_eq!(e.url(), "https://[fd00::1]:8443/");
    let e = Endpoint::parse("HTTP://10.0.0.1/RPC2").unwrap();
    assert_eq!((e.tls, e.port, e.path.as_str()), (false, 80, "/RPC2"));
    for bad in [
        "ftp://x/",
        "https://root:pw@x/",
        "https://x/?session_id=1",
        "https://",
        "",
    ] {
        let e = Endpoint::parse(bad).unwrap_err();
        assert!(matches!(e, XapiError::Url(_)), "{bad}: {e:?}");
        assert!(!format!("{e} {e:?}").contains("pw@"), "{e}");
    }

    // HOST_IS_SLAVE: the master's address replaces the host; scheme, port and path stay.
    let member = Endpoint::parse("https://10.0.0.2:8443/").unwrap();
    let r = |m: &str| member.redirect(m).map(|e| e.url());
    assert_eq!(r("10.0.0.1").unwrap(), "https://10.0.0.1:8443/");
    assert_eq!(r("master.example").unwrap(), "https://master.example:8443/");
    assert_eq!(r("fd00::1").unwrap(), "https://[fd00::1]:8443/");
    assert_eq!(r("[fd00::1]").unwrap(), "https://[fd00::1]:8443/");
    assert_eq!(r("[fd00::1]:443").unwrap(), "https://[fd00::1]/");
    assert_eq!(r("10.0.0.1:9443").unwrap(), "https://10.0.0.1:9443/");
    for bad in ["", "a/b", "x@y", "[fd00::1", "h:notaport", "[::1]x"] {
        assert!(member.redirect(bad).is_err(), "{bad:?}");
    }
}

#[tokio::test]
async fn retry_on_retries_only_the_listed_codes() {
    let failure = |code: &str| XapiError::Failure {
        method: "VDI.data_destroy".into(),
        failure: cbtstream_proto::xmlrpc::XenApiError::Failure {
            code: code.into(),
            args: vec!["OpaqueRef:v".into(), "data_destroy".into()],
        },
    };
    let no_wait = Backoff {
        first: Duration::ZERO,
        max: Duration::ZERO,
    };
    let tries = AtomicUsize::new(0);
    let r = retry_on(&["VDI_IN_USE"], 5, no_wait, || async {
        match tries.fetch_add(1, Ordering::SeqCst) {
            0 | 1 => Err(failure("VDI_IN_USE")),
            _ => Ok(7),
        }
    })
    .await;
    assert_eq!(r.unwrap(), 7);
    assert_eq!(tries.load(Ordering::SeqCst), 3);

    tries.store(0, Ordering::SeqCst);
    let r: Result<(), _> = retry_on(&["VDI_IN_USE"], 5, no_wait, || async {
        tries.fetch_add(1, Ordering::SeqCst);
        Err(failure("VDI_MISSING"))
    })
    .await;
    assert!(r.unwrap_err().is("VDI_MISSING"));
    assert_eq!(tries.load(Ordering::SeqCst), 1);

    tries.store(0, Ordering::SeqCst);
    let r: Result<(), _> = retry_on(&["VDI_IN_USE"], 4, no_wait, || async {
        tries.fetch_add(1, Ordering::SeqCst);
        Err(failure("VDI_IN_USE"))
    })
    .await;
    assert!(r.unwrap_err().is("VDI_IN_USE"));
    assert_eq!(tries.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn a_dropped_session_logs_out_in_the_background() {
    bounded(async {
        let pki = Pki::new();
        let logged_out = Arc::new(tokio::sync::Notify::new());
        let n = logged_out.clone();
        let server = serve(pki.server(), true, move |m, p| {
            if m == "session.logout" {
                assert_eq!(p, [s("OpaqueRef:dropped")]);
                n.notify_one();
            }
            session_calls(m, p, "OpaqueRef:dropped").unwrap_or(Reply::Ok(s("")))
        })
        .await;
        let x = XapiSession::login_with(&server.url(), USER, &password(), &opts(pki.pin()))
            .await
            .unwrap();
        drop(x);
        logged_out.notified().await;
        assert_eq!(
            server.methods(),
            ["session.login_with_password", "session.logout"]
        );
    })
    .await
}

#[tokio::test]
async fn handler_connections_are_fresh_and_share_the_trust() {
    use super::transport::Transport;
    bounded(async {
        let pki = Pki::new();
        let server = serve(pki.server(), true, |_, _| Reply::Ok(s("pong"))).await;
        let endpoint = Endpoint::parse(&server.url()).unwrap();
        let transport = Transport::new(endpoint.clone(), &opts(pki.ca())).unwrap();
        let mut sender = transport.handler_connection::<Full<Bytes>>().await.unwrap();
        let body = cbtstream_proto::xmlrpc::encode_call("ping", &[]);
        let req = hyper::Request::post("/")
            .header(hyper::header::HOST, endpoint.authority())
            .header(hyper::header::CONTENT_TYPE, "text/xml")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(server.methods(), ["ping"]);
        // A second one is another connection (never the pooled XML-RPC one).
        drop(transport.handler_stream().await.unwrap());
        assert_eq!(server.connections.load(Ordering::SeqCst), 2);

        // The wrong pin fails the same way as for calls.
        let wrong = Transport::new(endpoint, &opts(Trust::Pin([0x11; 32]))).unwrap();
        match wrong.handler_stream().await {
            Err(XapiError::Tls { reason, .. }) => assert!(reason.contains("pin"), "{reason}"),
            Err(other) => panic!("expected a TLS error, got {other:?}"),
            Ok(_) => panic!("connected despite the wrong pin"),
        }
    })
    .await
}
