//! The HTTPS range source against an in-process HTTPS server (hyper over tokio-rustls) that
//! serves a test image by ranges, with scripted faults: every export goes through
//! [`crate::export::run_data_plane`], the same call as the NBD flows, and is restored and
//! compared byte for byte.

use super::http_range::*;
use crate::engine::sink::{partial_path, Output};
use crate::engine::{Connector, Progress, SourceConnection};
use crate::exit::{Code, Failure};
use crate::export::{run_data_plane, DataPlaneOptions, StreamIds, What};
use crate::tls::Trust;
use bytes::Bytes;
use cbtstream_proto::stream::Codec;
use cbtstream_testkit::{make_image, mutate_blocks, CbtBitmap, Pattern, TestPki};
use futures_util::stream;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// 4 MiB plus three sectors: not a multiple of the 64 KiB block.
const SIZE: u64 = (4 << 20) + 3 * 512;
const COOKIE: &str = "vmware_soap_session=SECRET-COOKIE-52a1f0";
const FRESH_COOKIE: &str = "vmware_soap_session=FRESH-COOKIE-77c3e9";

// ---------------------------------------------------------------------------------------
// The scripted server

/// What the server saw of one GET.
#[derive(Debug, Clone)]
struct Seen {
    /// Counts the GETs, from 0.
    n: usize,
    offset: u64,
    len: u64,
    cookie: String,
}

/// How the server answers one GET.
enum Answer {
    /// 206 with the range.
    Serve,
    Status(u16),
    /// 200 with the whole image.
    Whole,
    /// 206 with the right bytes but this Content-Range.
    ContentRange(String),
    /// 206 sent chunked (no Content-Length) with this many bytes more (or fewer) than asked.
    Chunked(i64),
    /// 206 with the right Content-Length, then the connection drops halfway.
    Cut,
}

type Script = Arc<dyn Fn(&Seen) -> Answer + Send + Sync>;

struct RangeServer {
    port: u16,
    image: Arc<Mutex<Vec<u8>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RangeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RangeServer {
    async fn start(pki: &TestPki, image: Vec<u8>, script: Script) -> RangeServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let tls = tokio_rustls::TlsAcceptor::from(pki.server_config().unwrap());
        let image = Arc::new(Mutex::new(image));
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let connections = Arc::new(AtomicUsize::new(0));
        let task = {
            let (image, seen, connections) = (image.clone(), seen.clone(), connections.clone());
            tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    connections.fetch_add(1, Ordering::SeqCst);
                    let (image, seen, script, tls) =
                        (image.clone(), seen.clone(), script.clone(), tls.clone());
                    tokio::spawn(async move {
                        let Ok(s) = tls.accept(tcp).await else { return };
                        let service = service_fn(move |req| {
                            respond(req, image.clone(), seen.clone(), script.clone())
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(s), service)
                            .await;
                    });
                }
            })
        };
        RangeServer {
            port,
            image,
            seen,
            connections,
            task,
        }
    }

    fn url(&self) -> String {
        format!(
            "https://127.0.0.1:{}/folder/vm1/disk-flat.vmdk?dcPath=dc1&dsName=ds1",
            self.port
        )
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

type Body = BoxBody<Bytes, std::io::Error>;

fn full(bytes: Vec<u8>) -> Body {
    Full::new(Bytes::from(bytes))
        .map_err(|never| match never {})
        .boxed()
}

fn reply(status: u16, body: Body, headers: &[(&'static str, String)]) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    for (k, v) in headers {
        r.headers_mut().insert(*k, v.parse().unwrap());
    }
    r
}

/// `bytes=a-b` of a Range header.
fn parse_range(value: &str) -> (u64, u64) {
    let (a, b) = value
        .strip_prefix("bytes=")
        .unwrap()
        .split_once('-')
        .unwrap();
    let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
    (a, b - a + 1)
}

async fn respond(
    req: Request<Incoming>,
    image: Arc<Mutex<Vec<u8>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    script: Script,
) -> Result<Response<Body>, Infallible> {
    assert_eq!(req.uri().path(), "/folder/vm1/disk-flat.vmdk");
    assert_eq!(req.uri().query(), Some("dcPath=dc1&dsName=ds1"));
    let cookie = req.headers()["cookie"].to_str().unwrap().to_owned();
    let size = image.lock().unwrap().len() as u64;
    if req.method() == Method::HEAD {
        let status = if cookie == COOKIE { 200 } else { 401 };
        return Ok(reply(
            status,
            full(Vec::new()),
            &[("content-length", size.to_string())],
        ));
    }
    let (offset, len) = parse_range(req.headers()["range"].to_str().unwrap());
    let s = {
        let mut seen = seen.lock().unwrap();
        let s = Seen {
            n: seen.len(),
            offset,
            len,
            cookie,
        };
        seen.push(s.clone());
        s
    };
    let data = image.lock().unwrap()[offset as usize..(offset + len) as usize].to_vec();
    let range = |first: u64, last: u64| ("content-range", format!("bytes {first}-{last}/{size}"));
    let last = offset + len - 1;
    Ok(match script(&s) {
        Answer::Serve => reply(206, full(data), &[range(offset, last)]),
        Answer::Status(code) => reply(code, full(b"no".to_vec()), &[]),
        Answer::Whole => reply(200, full(image.lock().unwrap().clone()), &[]),
        Answer::ContentRange(value) => reply(206, full(data), &[("content-range", value)]),
        Answer::Chunked(extra) => {
            let mut body = data;
            body.resize((len as i64 + extra) as usize, 0xa5);
            let frames = stream::iter([Ok(Frame::data(Bytes::from(body)))]);
            reply(206, StreamBody::new(frames).boxed(), &[range(offset, last)])
        }
        Answer::Cut => {
            let half = Bytes::copy_from_slice(&data[..data.len() / 2]);
            let frames = stream::iter([Ok(Frame::data(half)), Err(std::io::Error::other("cut"))]);
            let headers = [range(offset, last), ("content-length", len.to_string())];
            reply(206, StreamBody::new(frames).boxed(), &headers)
        }
    })
}

// ---------------------------------------------------------------------------------------
// The client side

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    pki: TestPki,
    image: Vec<u8>,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let pki = TestPki::generate(&dir.join("pki")).unwrap();
    let img = dir.join("source.raw");
    make_image(&img, SIZE, 12, Pattern::Mixed).unwrap();
    let image = std::fs::read(&img).unwrap();
    Fixture {
        _tmp: tmp,
        dir,
        pki,
        image,
    }
}

fn options(server: &RangeServer, pki: &TestPki) -> HttpRangeOptions {
    let headers = RequestHeaders::cookie(COOKIE).unwrap();
    let mut opts = HttpRangeOptions::new(
        server.url(),
        Trust::CaFile(pki.ca_pem_path.clone()),
        headers,
    );
    opts.connect_timeout = Duration::from_secs(10);
    opts
}

fn data_plane() -> DataPlaneOptions {
    DataPlaneOptions {
        connections: 4,
        inflight: None,
        request_size: 256 << 10,
        codec: Codec::Zstd,
        level: 1,
        threads: 2,
        connect_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(30),
        retries: 2,
        retry_delay: Duration::from_millis(10),
        extended_headers: false,
    }
}

struct Quiet;

impl Progress for Quiet {
    fn start(&self, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}

fn ids(point: &str, base: Option<&str>) -> StreamIds {
    StreamIds {
        source_id: "vm1-disk0".into(),
        point_id: point.into(),
        base_id: base.map(String::from),
    }
}

/// One export through the same call as the NBD flows.
async fn export(
    connector: Arc<dyn Connector>,
    first: Box<dyn SourceConnection>,
    what: What,
    ids: StreamIds,
    out: &Path,
) -> Result<crate::engine::ExportSummary, Failure> {
    let output = Output::File(out.to_path_buf());
    run_data_plane(
        first,
        connector,
        what,
        ids,
        &data_plane(),
        output,
        Arc::new(Quiet),
    )
    .await
}

/// A full export of the fixture's image through `script`, restored and compared.
async fn full_through(f: &Fixture, script: Script) -> (RangeServer, crate::engine::ExportSummary) {
    let server = RangeServer::start(&f.pki, f.image.clone(), script).await;
    let (source, first) = HttpRange::open(options(&server, &f.pki), None)
        .await
        .unwrap();
    let stream = f.dir.join("full.cbts");
    let summary = export(source, first, What::Full, ids("p1", None), &stream)
        .await
        .unwrap_or_else(|e| panic!("export failed: {:#}", e.error));
    let restored = f.dir.join("restored.raw");
    crate::restore::restore(&restored, &[stream]).unwrap();
    assert!(
        std::fs::read(&restored).unwrap() == f.image,
        "the restored image differs"
    );
    (server, summary)
}

/// A full export through `script` that must fail: its message, with nothing left behind.
async fn failing_export(f: &Fixture, script: Script) -> (RangeServer, String) {
    let server = RangeServer::start(&f.pki, f.image.clone(), script).await;
    let (source, first) = HttpRange::open(options(&server, &f.pki), None)
        .await
        .unwrap();
    let stream = f.dir.join("failed.cbts");
    let Err(failure) = export(source, first, What::Full, ids("p1", None), &stream).await else {
        panic!("the export succeeded");
    };
    assert_eq!(failure.code, Code::Source);
    assert!(!stream.exists() && !partial_path(&stream).exists());
    let text = format!("{:#}", failure.error);
    let debug = format!("{failure:?}");
    for secret in ["SECRET-COOKIE", "FRESH-COOKIE"] {
        assert!(
            !text.contains(secret) && !debug.contains(secret),
            "{text} / {debug}"
        );
    }
    (server, text)
}

fn script(f: impl Fn(&Seen) -> Answer + Send + Sync + 'static) -> Script {
    Arc::new(f)
}

// ---------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn a_full_and_a_bitmap_export_restore_byte_identical() {
    let f = fixture();
    let server = RangeServer::start(&f.pki, f.image.clone(), script(|_| Answer::Serve)).await;
    let (source, first) = HttpRange::open(options(&server, &f.pki), None)
        .await
        .unwrap();
    assert_eq!(first.size(), SIZE, "the size comes from HEAD");
    let full = f.dir.join("full.cbts");
    let summary = export(source, first, What::Full, ids("p1", None), &full)
        .await
        .unwrap_or_else(|e| panic!("{:#}", e.error));
    assert_eq!(summary.bytes_read, SIZE);
    let restored = f.dir.join("restored.raw");
    crate::restore::restore(&restored, std::slice::from_ref(&full)).unwrap();
    assert!(std::fs::read(&restored).unwrap() == f.image);
    let seen = server.seen();
    assert!(seen
        .iter()
        .all(|s| s.cookie == COOKIE && s.len <= 256 << 10));
    assert_eq!(seen.iter().map(|s| s.len).sum::<u64>(), SIZE);
    // HTTP/1.1: one connection per engine connection, kept alive for all its reads.
    assert_eq!(
        server.connections.load(Ordering::SeqCst),
        summary.connections
    );

    // Change some blocks, then read only what a CBT bitmap marks.
    let changed = f.dir.join("changed.raw");
    std::fs::write(&changed, &f.image).unwrap();
    let changes = mutate_blocks(&changed, 3, 10).unwrap();
    let after = std::fs::read(&changed).unwrap();
    *server.image.lock().unwrap() = after.clone();
    let bitmap = CbtBitmap::from_changes(&changes, SIZE);
    let blocks = bitmap.blocks();
    let marked = bitmap.set_blocks().len() as u64;
    let (source, first) = HttpRange::open(options(&server, &f.pki), None)
        .await
        .unwrap();
    let incr = f.dir.join("incr.cbts");
    let what = What::Changed(bitmap.bytes);
    let summary = export(source, first, what, ids("p2", Some("p1")), &incr)
        .await
        .unwrap_or_else(|e| panic!("{:#}", e.error));
    // Only the marked blocks (the last one is short).
    assert!(summary.bytes_read <= marked << 16 && summary.bytes_read > (marked - 1) << 16);
    assert!(marked < blocks);
    crate::restore::restore(&restored, &[incr]).unwrap();
    assert!(std::fs::read(&restored).unwrap() == after);
}

#[tokio::test]
async fn a_server_error_is_retried_on_the_same_connection() {
    let f = fixture();
    let (server, summary) = full_through(
        &f,
        script(|s| match s.n {
            3 => Answer::Status(500),
            _ => Answer::Serve,
        }),
    )
    .await;
    let seen = server.seen();
    // The failed read was asked again; no connection was lost.
    assert_eq!(
        seen.iter().filter(|s| s.offset == seen[3].offset).count(),
        2
    );
    assert_eq!(
        server.connections.load(Ordering::SeqCst),
        summary.connections
    );
}

#[tokio::test]
async fn a_connection_dropped_mid_body_is_reopened_and_the_read_retried() {
    let f = fixture();
    let (server, summary) = full_through(
        &f,
        script(|s| match s.n {
            2 => Answer::Cut,
            _ => Answer::Serve,
        }),
    )
    .await;
    assert_eq!(summary.bytes_read, SIZE);
    let seen = server.seen();
    assert_eq!(
        seen.iter().filter(|s| s.offset == seen[2].offset).count(),
        2
    );
    let opened = server.connections.load(Ordering::SeqCst);
    assert_eq!(opened, summary.connections + 1, "one reconnect");
}

#[tokio::test]
async fn answers_that_are_not_the_range_asked_for_fail_naming_the_offset() {
    let f = fixture();
    let cases: Vec<(Script, &str)> = vec![
        (
            script(|_| Answer::Whole),
            "with 200 and the whole file: it ignores Range",
        ),
        (
            script(|s| {
                Answer::ContentRange(format!(
                    "bytes {}-{}/{SIZE}",
                    s.offset + 1,
                    s.offset + s.len
                ))
            }),
            "does not match the request for bytes",
        ),
        (
            script(|_| Answer::ContentRange("bytes 0-1".into())),
            "is not `bytes FIRST-LAST/LENGTH`",
        ),
        (script(|_| Answer::Chunked(-1)), "the body ended after"),
        (
            script(|_| Answer::Chunked(1)),
            "the body is longer than asked for",
        ),
        (script(|_| Answer::Status(404)), "with HTTP 404"),
    ];
    for (script, expect) in cases {
        let (_server, text) = failing_export(&f, script).await;
        assert!(text.contains(expect), "{text}");
        assert!(text.contains("at offset "), "{text}");
        assert!(text.contains("after 3 attempt(s)"), "{text}");
    }
}

#[tokio::test]
async fn a_refused_cookie_is_a_clear_error_and_never_quoted() {
    let f = fixture();
    let (server, text) = failing_export(&f, script(|_| Answer::Status(401))).await;
    assert!(text.contains("with HTTP 401: not authorized"), "{text}");
    assert!(text.contains("at offset "), "{text}");
    // Reconnected (the engine's retries), the same cookie each time: there is no renewal.
    assert!(server.seen().iter().all(|s| s.cookie == COOKIE));

    // Refused at the start (HEAD): the same error before any read.
    let server = RangeServer::start(&f.pki, f.image.clone(), script(|_| Answer::Serve)).await;
    let mut opts = options(&server, &f.pki);
    opts.headers = RequestHeaders::cookie("vmware_soap_session=SECRET-COOKIE-expired").unwrap();
    let Err(e) = HttpRange::open(opts.clone(), None).await else {
        panic!("opened with a refused cookie");
    };
    let text = e.to_string();
    assert!(text.contains("HTTP 401: not authorized"), "{text}");
    let debug = format!("{e:?} {opts:?}");
    assert!(
        !text.contains("SECRET") && !debug.contains("SECRET"),
        "{text} / {debug}"
    );
    assert!(debug.contains("\"cookie\""), "{debug}");
}

/// Gives the fresh cookie, and counts the calls.
struct Renewer(AtomicUsize);

impl RenewHeaders for Renewer {
    fn renew(
        &self,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<RequestHeaders, RenewError>> + Send + '_>>
    {
        self.0.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(RequestHeaders::cookie(FRESH_COOKIE)?) })
    }
}

#[tokio::test]
async fn a_refused_cookie_is_renewed_once_and_the_export_goes_on() {
    let f = fixture();
    // The old cookie expires after four reads.
    let server = RangeServer::start(
        &f.pki,
        f.image.clone(),
        script(|s| match (s.n, s.cookie.as_str()) {
            (_, FRESH_COOKIE) => Answer::Serve,
            (0..4, _) => Answer::Serve,
            _ => Answer::Status(401),
        }),
    )
    .await;
    let renewer = Arc::new(Renewer(AtomicUsize::new(0)));
    let (source, first) = HttpRange::open(options(&server, &f.pki), Some(renewer.clone()))
        .await
        .unwrap();
    let stream = f.dir.join("full.cbts");
    export(source, first, What::Full, ids("p1", None), &stream)
        .await
        .unwrap_or_else(|e| panic!("{:#}", e.error));
    let restored = f.dir.join("restored.raw");
    crate::restore::restore(&restored, &[stream]).unwrap();
    assert!(std::fs::read(&restored).unwrap() == f.image);
    assert_eq!(
        renewer.0.load(Ordering::SeqCst),
        1,
        "renewed once for all connections"
    );
    assert_eq!(server.seen().last().unwrap().cookie, FRESH_COOKIE);
}

#[test]
fn only_https_urls_without_credentials() {
    let headers = RequestHeaders::cookie(COOKIE).unwrap();
    for (url, why) in [
        (
            "http://esx1/folder/a-flat.vmdk",
            "the scheme must be https://",
        ),
        (
            "https://root:pw@esx1/folder/a-flat.vmdk",
            "credentials in the URL",
        ),
        ("not a url", "not a URL"),
    ] {
        let opts = HttpRangeOptions::new(url, Trust::InsecureNoVerify, headers.clone());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let Err(e) = rt.block_on(HttpRange::open(opts, None)) else {
            panic!("{url} was accepted");
        };
        assert!(e.to_string().contains(why), "{e}");
        assert!(!e.to_string().contains("pw"), "{e}");
    }
    // A header value that cannot be sent is refused without being quoted.
    let e = RequestHeaders::cookie("vmware_soap_session=SECRET\n").unwrap_err();
    assert!(!e.to_string().contains("SECRET"), "{e}");
    assert!(!format!("{e:?}").contains("SECRET"));
}
