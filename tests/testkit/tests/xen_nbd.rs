//! Tests of the XenServer-profile NBD server (`cbtstream_testkit::xen_nbd`): libnbd
//! (nbdinfo/nbdcopy) over TLS 1.2 + secp384r1, and the xapi-nbd quirks with a raw client.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cbtstream_proto::nbd::consts::*;
use cbtstream_proto::nbd::transmission::{
    encode_request, parse_reply_header, ReplyHeader, Request,
};
use cbtstream_testkit::xen_nbd::{
    libnbd_tls_dir, xapi_crypto_provider, Export, Resolver, StallAt, XenNbdConfig, XenNbdServer,
};
use cbtstream_testkit::{
    make_image, require_tools, xapi_style_self_signed, Pattern, SelfSignedCert,
};
use rustls::pki_types::{CertificateDer, ServerName};
use tempfile::TempDir;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);
const TOOL_WAIT: Duration = Duration::from_secs(60);
const SIZE: u64 = 4 * 1024 * 1024 + 3 * 512;
const NAME: &str = "/1d5d9b4e-6f6b-4a35-a0e4-0c6f6f1f0d11?session_id=OpaqueRef:abc";
const CMD_WRITE: u16 = 1;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_CACHE: u16 = 5;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_FLAG_FUA: u16 = 1 << 0;
const CMD_FLAG_DF: u16 = 1 << 2;

async fn within<F: Future>(what: &str, f: F) -> F::Output {
    match timeout(WAIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

struct Fixture {
    dir: TempDir,
    image: PathBuf,
    data: Vec<u8>,
    /// Export guards alive right now.
    attached: Arc<AtomicUsize>,
}

struct Attached(Arc<AtomicUsize>);
impl Drop for Attached {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Fixture {
    fn new(seed: u64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        make_image(&image, SIZE, seed, Pattern::Random).unwrap();
        let data = std::fs::read(&image).unwrap();
        Fixture {
            dir,
            image,
            data,
            attached: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Only [`NAME`] resolves; each connection holds a guard counted in `attached`.
    fn resolver(&self) -> Resolver {
        let image = self.image.clone();
        let attached = self.attached.clone();
        Arc::new(move |name: &str| {
            if name != NAME {
                return None;
            }
            attached.fetch_add(1, Ordering::SeqCst);
            Some(Export {
                path: image.clone(),
                size: SIZE,
                guard: Some(Box::new(Attached(attached.clone()))),
            })
        })
    }

    async fn plain(&self) -> XenNbdServer {
        XenNbdServer::start(XenNbdConfig::plaintext(self.resolver()))
            .await
            .unwrap()
    }

    fn cert(&self) -> SelfSignedCert {
        let c = xapi_style_self_signed(&self.dir.path().join("cert")).unwrap();
        assert!(
            c.is_rsa,
            "the xapi profile needs an RSA certificate (is openssl installed?)"
        );
        c
    }

    async fn tls(&self, cert: &SelfSignedCert) -> XenNbdServer {
        let cfg = XenNbdConfig::new(&cert.cert_pem_path, &cert.key_pem_path, self.resolver());
        XenNbdServer::start(cfg).await.unwrap()
    }
}

// ---- a tiny raw NBD client ----

async fn read_n<S: AsyncRead + Unpin>(s: &mut S, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    within("read", s.read_exact(&mut b)).await.unwrap();
    b
}

/// The peer closes the connection (EOF or reset) without sending anything more.
async fn expect_closed<S: AsyncRead + Unpin>(s: &mut S) {
    let mut b = [0u8; 64];
    match within("connection close", s.read(&mut b)).await {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!(
            "expected the connection to close, got {n} bytes: {:02x?}",
            &b[..n]
        ),
    }
}

/// Connect, check the greeting, send client flags.
async fn greet(port: u16, client_flags: u32) -> TcpStream {
    let mut s = within("connect", TcpStream::connect(("127.0.0.1", port)))
        .await
        .unwrap();
    let g = read_n(&mut s, 18).await;
    assert_eq!(&g[..8], &NBDMAGIC.to_be_bytes());
    assert_eq!(&g[8..16], &IHAVEOPT.to_be_bytes());
    assert_eq!(
        u16::from_be_bytes([g[16], g[17]]),
        FLAG_FIXED_NEWSTYLE,
        "no NO_ZEROES"
    );
    s.write_all(&client_flags.to_be_bytes()).await.unwrap();
    s
}

async fn send_opt<S: AsyncWrite + Unpin>(s: &mut S, opt: u32, data: &[u8]) {
    let mut b = Vec::new();
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).await.unwrap();
    s.flush().await.unwrap();
}

/// Send an option and return the reply type (checking magic, echo and an empty payload).
async fn opt_reply<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, opt: u32, data: &[u8]) -> u32 {
    send_opt(s, opt, data).await;
    let r = read_n(s, 20).await;
    assert_eq!(&r[..8], &OPTION_REPLY_MAGIC.to_be_bytes());
    assert_eq!(u32::from_be_bytes(r[8..12].try_into().unwrap()), opt);
    assert_eq!(
        u32::from_be_bytes(r[16..20].try_into().unwrap()),
        0,
        "reply data length"
    );
    u32::from_be_bytes(r[12..16].try_into().unwrap())
}

/// EXPORT_NAME and the 134-byte reply; returns the size.
async fn export<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, name: &str) -> u64 {
    send_opt(s, OPT_EXPORT_NAME, name.as_bytes()).await;
    let r = read_n(s, 134).await;
    assert_eq!(
        u16::from_be_bytes([r[8], r[9]]),
        TFLAG_HAS_FLAGS | TFLAG_READ_ONLY
    );
    assert!(r[10..].iter().all(|&b| b == 0), "124 zero bytes");
    u64::from_be_bytes(r[..8].try_into().unwrap())
}

fn req(cmd: u16, flags: u16, cookie: u64, offset: u64, length: u64) -> Vec<u8> {
    let mut b = Vec::new();
    encode_request(
        &mut b,
        false,
        &Request {
            cmd,
            flags,
            cookie,
            offset,
            length,
        },
    )
    .unwrap();
    b
}

async fn send_req<S: AsyncWrite + Unpin>(
    s: &mut S,
    cmd: u16,
    flags: u16,
    cookie: u64,
    off: u64,
    len: u64,
) {
    s.write_all(&req(cmd, flags, cookie, off, len))
        .await
        .unwrap();
    s.flush().await.unwrap();
}

/// Read one simple reply header: (cookie, error).
async fn reply<S: AsyncRead + Unpin>(s: &mut S) -> (u64, u32) {
    let h = read_n(s, 16).await;
    match parse_reply_header(&h, false, false).unwrap() {
        Some((ReplyHeader::Simple { cookie, error }, 16)) => (cookie, error),
        other => panic!("not a simple reply: {other:?}"),
    }
}

async fn read_ok<S: AsyncRead + Unpin>(s: &mut S, cookie: u64, want: &[u8]) {
    assert_eq!(reply(s).await, (cookie, 0));
    let got = read_n(s, want.len()).await;
    assert!(got == want, "READ {cookie} data differs");
}

/// Plaintext connection in transmission phase.
async fn plain_session(server: &XenNbdServer) -> TcpStream {
    let mut s = greet(server.port, FLAG_C_FIXED_NEWSTYLE).await;
    assert_eq!(export(&mut s, NAME).await, SIZE);
    s
}

// ---- TLS helpers ----

fn client_config(
    cert: &SelfSignedCert,
    provider: rustls::crypto::CryptoProvider,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(cert.cert_der.clone()))
        .unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(cfg)
}

/// Greeting, STARTTLS, then a TLS handshake with `cfg`.
async fn starttls(
    port: u16,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut s = greet(port, FLAG_C_FIXED_NEWSTYLE).await;
    assert_eq!(opt_reply(&mut s, OPT_STARTTLS, &[]).await, REP_ACK);
    let name = ServerName::try_from("localhost").unwrap();
    within(
        "TLS handshake",
        tokio_rustls::TlsConnector::from(cfg).connect(name, s),
    )
    .await
}

// ---- libnbd ----

async fn run_tool(program: &str, args: &[&str]) -> std::process::Output {
    let child = tokio::process::Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .output();
    match timeout(TOOL_WAIT, child).await {
        Ok(out) => out.unwrap(),
        Err(_) => panic!("{program} timed out"),
    }
}

fn tls_uri(server: &XenNbdServer, libnbd_dir: &Path) -> String {
    // The export name starts with '/', so the URI path has two slashes; '?' must be escaped.
    let name = NAME.replace('?', "%3F");
    format!(
        "{}?tls-certificates={}",
        server.uri(&name),
        libnbd_dir.display()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn nbdinfo_gets_the_size_over_tls12_secp384r1() {
    if !require_tools("nbdinfo_gets_the_size_over_tls12_secp384r1", &["nbdinfo"]) {
        return;
    }
    let fx = Fixture::new(1);
    let cert = fx.cert();
    let server = fx.tls(&cert).await;
    let dir = libnbd_tls_dir(&cert.cert_pem_path, &fx.dir.path().join("libnbd")).unwrap();
    let out = run_tool("nbdinfo", &["--size", &tls_uri(&server, &dir)]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "nbdinfo failed: {stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        SIZE.to_string(),
        "{stderr}"
    );
    let f = server.faults.clone();
    within(
        "connection closed",
        f.wait_until(|f| f.connections_closed() == f.connections_opened()),
    )
    .await;
    assert_eq!(
        fx.attached.load(Ordering::SeqCst),
        0,
        "export guard dropped"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn nbdcopy_copies_the_image_byte_identically() {
    if !require_tools("nbdcopy_copies_the_image_byte_identically", &["nbdcopy"]) {
        return;
    }
    let fx = Fixture::new(2);
    let cert = fx.cert();
    let server = fx.tls(&cert).await;
    let dir = libnbd_tls_dir(&cert.cert_pem_path, &fx.dir.path().join("libnbd")).unwrap();
    let dest = fx.dir.path().join("copy.img");
    let uri = tls_uri(&server, &dir);
    let out = run_tool("nbdcopy", &[&uri, dest.to_str().unwrap()]).await;
    assert!(
        out.status.success(),
        "nbdcopy failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let copy = std::fs::read(&dest).unwrap();
    assert_eq!(copy.len(), fx.data.len());
    assert!(copy == fx.data, "copy differs from the image");
    assert!(server.faults.reads_ok() > 0);
}

// ---- TLS profile ----

#[tokio::test(flavor = "multi_thread")]
async fn tls_is_12_ecdhe_rsa_gcm_secp384r1_only() {
    let fx = Fixture::new(3);
    let cert = fx.cert();
    let server = fx.tls(&cert).await;

    // A client offering everything ends up with TLS 1.2, ECDHE-RSA-AES-GCM, secp384r1.
    let all = rustls::crypto::ring::default_provider();
    let cfg = client_config(&cert, all, rustls::ALL_VERSIONS);
    let mut tls = starttls(server.port, cfg).await.expect("TLS handshake");
    {
        let conn = tls.get_ref().1;
        assert_eq!(
            conn.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_2)
        );
        let suite = conn.negotiated_cipher_suite().unwrap().suite();
        assert!(
            [
                rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
                rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
            ]
            .contains(&suite),
            "{suite:?}"
        );
        assert_eq!(
            conn.negotiated_key_exchange_group().unwrap().name(),
            rustls::NamedGroup::secp384r1
        );
    }
    // After TLS: STARTTLS again is invalid, GO unsupported, then EXPORT_NAME and a READ.
    assert_eq!(
        opt_reply(&mut tls, OPT_STARTTLS, &[]).await,
        REP_ERR_INVALID
    );
    assert_eq!(opt_reply(&mut tls, OPT_GO, &[0; 6]).await, REP_ERR_UNSUP);
    assert_eq!(export(&mut tls, NAME).await, SIZE);
    send_req(&mut tls, CMD_READ, 0, 9, 512, 4096).await;
    read_ok(&mut tls, 9, &fx.data[512..512 + 4096]).await;

    // TLS 1.3 only: refused.
    let cfg = client_config(
        &cert,
        rustls::crypto::ring::default_provider(),
        &[&rustls::version::TLS13],
    );
    assert!(
        starttls(server.port, cfg).await.is_err(),
        "TLS 1.3 must be refused"
    );

    // X25519 / P-256 only: refused.
    let mut p = rustls::crypto::ring::default_provider();
    p.kx_groups = vec![
        rustls::crypto::ring::kx_group::X25519,
        rustls::crypto::ring::kx_group::SECP256R1,
    ];
    let cfg = client_config(&cert, p, &[&rustls::version::TLS12]);
    assert!(
        starttls(server.port, cfg).await.is_err(),
        "only secp384r1 is accepted"
    );

    // CHACHA20 only: refused.
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites =
        vec![rustls::crypto::ring::cipher_suite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256];
    let cfg = client_config(&cert, p, &[&rustls::version::TLS12]);
    assert!(
        starttls(server.port, cfg).await.is_err(),
        "only AES-GCM suites are accepted"
    );

    // The provider itself.
    let p = xapi_crypto_provider();
    assert_eq!(p.cipher_suites.len(), 2);
    assert_eq!(p.kx_groups.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn before_tls_only_starttls_is_accepted() {
    let fx = Fixture::new(4);
    let cert = fx.cert();
    let server = fx.tls(&cert).await;

    let mut s = greet(server.port, FLAG_C_FIXED_NEWSTYLE).await;
    for opt in [
        OPT_LIST,
        OPT_GO,
        OPT_INFO,
        OPT_STRUCTURED_REPLY,
        OPT_SET_META_CONTEXT,
        42,
    ] {
        assert_eq!(
            opt_reply(&mut s, opt, &[]).await,
            REP_ERR_TLS_REQD,
            "option {opt}"
        );
    }
    // EXPORT_NAME in cleartext: dropped without a reply.
    send_opt(&mut s, OPT_EXPORT_NAME, NAME.as_bytes()).await;
    expect_closed(&mut s).await;

    // ABORT in cleartext: dropped.
    let mut s = greet(server.port, FLAG_C_FIXED_NEWSTYLE).await;
    send_opt(&mut s, OPT_ABORT, &[]).await;
    expect_closed(&mut s).await;

    // No C_FIXED_NEWSTYLE: dropped.
    let mut s = greet(server.port, 0).await;
    send_opt(&mut s, OPT_STARTTLS, &[]).await;
    expect_closed(&mut s).await;
    assert_eq!(fx.attached.load(Ordering::SeqCst), 0);
}

// ---- option haggling (plaintext mode) ----

#[tokio::test(flavor = "multi_thread")]
async fn options_after_tls_are_unsupported_except_export_name() {
    let fx = Fixture::new(5);
    let server = fx.plain().await;
    let mut s = greet(server.port, FLAG_C_FIXED_NEWSTYLE).await;
    let mut go = Vec::new();
    go.extend_from_slice(&(NAME.len() as u32).to_be_bytes());
    go.extend_from_slice(NAME.as_bytes());
    go.extend_from_slice(&0u16.to_be_bytes());
    assert_eq!(opt_reply(&mut s, OPT_GO, &go).await, REP_ERR_UNSUP);
    assert_eq!(opt_reply(&mut s, OPT_INFO, &go).await, REP_ERR_UNSUP);
    assert_eq!(
        opt_reply(&mut s, OPT_STRUCTURED_REPLY, &[]).await,
        REP_ERR_UNSUP
    );
    assert_eq!(
        opt_reply(&mut s, OPT_LIST_META_CONTEXT, &[]).await,
        REP_ERR_UNSUP
    );
    assert_eq!(
        opt_reply(&mut s, OPT_SET_META_CONTEXT, &[]).await,
        REP_ERR_UNSUP
    );
    assert_eq!(
        opt_reply(&mut s, OPT_EXTENDED_HEADERS, &[]).await,
        REP_ERR_UNSUP
    );
    assert_eq!(opt_reply(&mut s, 1000, b"junk").await, REP_ERR_UNSUP);
    assert_eq!(opt_reply(&mut s, OPT_LIST, &[]).await, REP_ERR_POLICY);
    // NOTLS mode: STARTTLS is refused by policy.
    assert_eq!(opt_reply(&mut s, OPT_STARTTLS, &[]).await, REP_ERR_POLICY);
    assert_eq!(export(&mut s, NAME).await, SIZE);
    assert_eq!(fx.attached.load(Ordering::SeqCst), 1);

    // ABORT after negotiation: ACK, then close.
    let mut s = greet(server.port, FLAG_C_FIXED_NEWSTYLE).await;
    assert_eq!(opt_reply(&mut s, OPT_ABORT, &[]).await, REP_ACK);
    expect_closed(&mut s).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_export_name_closes_the_connection() {
    let fx = Fixture::new(6);
    let server = fx.plain().await;
    let mut s = greet(server.port, FLAG_C_FIXED_NEWSTYLE).await;
    send_opt(
        &mut s,
        OPT_EXPORT_NAME,
        b"/00000000-0000-0000-0000-000000000000?session_id=x",
    )
    .await;
    expect_closed(&mut s).await;
    let f = server.faults.clone();
    within(
        "close counted",
        f.wait_until(|f| f.connections_closed() == 1),
    )
    .await;
    assert_eq!(server.active_connections(), 0);
}

// ---- transmission ----

#[tokio::test(flavor = "multi_thread")]
async fn transmission_quirks() {
    let fx = Fixture::new(7);
    let server = fx.plain().await;
    let mut s = plain_session(&server).await;

    // Misaligned offset or length, past the end, zero-crossing the end: EINVAL, no payload.
    let bad_reads = [
        (1, 512),
        (512, 100),
        (0, 513),
        (SIZE, 512),
        (SIZE - 512, 1024),
        (u64::MAX - 511, 512),
    ];
    for (i, (off, len)) in bad_reads.into_iter().enumerate() {
        send_req(&mut s, CMD_READ, 0, 100 + i as u64, off, len).await;
        assert_eq!(
            reply(&mut s).await,
            (100 + i as u64, EINVAL),
            "read {off}+{len}"
        );
    }
    // Any command flag turns READ into an unknown command.
    for flag in [CMD_FLAG_FUA, CMD_FLAG_DF, CMD_FLAG_REQ_ONE] {
        send_req(&mut s, CMD_READ, flag, 200, 0, 512).await;
        assert_eq!(reply(&mut s).await, (200, EINVAL), "flag {flag:#x}");
    }
    // WRITE (no payload here) → EPERM; every other command → EINVAL.
    send_req(&mut s, CMD_WRITE, 0, 300, 0, 0).await;
    assert_eq!(reply(&mut s).await, (300, EPERM));
    for cmd in [
        CMD_FLUSH,
        CMD_TRIM,
        CMD_CACHE,
        CMD_WRITE_ZEROES,
        CMD_BLOCK_STATUS,
        99,
    ] {
        send_req(&mut s, cmd, 0, 400 + cmd as u64, 0, 512).await;
        assert_eq!(
            reply(&mut s).await,
            (400 + cmd as u64, EINVAL),
            "command {cmd}"
        );
    }
    // The connection is still in sync: aligned reads work, including the last sector
    // and a zero-length read.
    send_req(&mut s, CMD_READ, 0, 500, 4096, 8192).await;
    read_ok(&mut s, 500, &fx.data[4096..4096 + 8192]).await;
    send_req(&mut s, CMD_READ, 0, 501, SIZE - 512, 512).await;
    read_ok(&mut s, 501, &fx.data[SIZE as usize - 512..]).await;
    send_req(&mut s, CMD_READ, 0, 502, 0, 0).await;
    read_ok(&mut s, 502, &[]).await;
    // DISC closes.
    send_req(&mut s, CMD_DISC, 0, 600, 0, 0).await;
    expect_closed(&mut s).await;
    let f = server.faults.clone();
    within(
        "close counted",
        f.wait_until(|f| f.connections_closed() == 1),
    )
    .await;
    assert_eq!(fx.attached.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn pipelined_reads_are_answered_in_order() {
    let fx = Fixture::new(8);
    let server = fx.plain().await;
    let mut s = plain_session(&server).await;
    let (mut rd, mut wr) = s.split();
    // Several reads in flight, some larger than one 512 KiB piece, one invalid.
    let reads: Vec<(u64, u64)> = (0..64u64)
        .map(|i| match i % 4 {
            0 => ((i * 65536) % (SIZE - 2 * 1024 * 1024), 1024 * 1024 + 512),
            1 => (i * 512, 512),
            2 => (SIZE - 65536, 65536),
            _ => (3, 512),
        })
        .collect();
    let mut all = Vec::new();
    for (i, &(off, len)) in reads.iter().enumerate() {
        all.extend_from_slice(&req(CMD_READ, 0, 1000 + i as u64, off, len));
    }
    let send = async {
        wr.write_all(&all).await.unwrap();
    };
    let recv = async {
        for (i, &(off, len)) in reads.iter().enumerate() {
            let cookie = 1000 + i as u64;
            if off % 512 != 0 {
                assert_eq!(reply(&mut rd).await, (cookie, EINVAL));
            } else {
                read_ok(
                    &mut rd,
                    cookie,
                    &fx.data[off as usize..(off + len) as usize],
                )
                .await;
            }
        }
    };
    within("pipelined reads", async { tokio::join!(send, recv) }).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn seventeenth_connection_is_closed_before_the_greeting() {
    let fx = Fixture::new(9);
    let server = fx.plain().await;
    let mut conns = Vec::new();
    for _ in 0..16 {
        conns.push(greet(server.port, FLAG_C_FIXED_NEWSTYLE).await);
    }
    assert_eq!(server.active_connections(), 16);
    let mut s17 = within("connect", TcpStream::connect(("127.0.0.1", server.port)))
        .await
        .unwrap();
    expect_closed(&mut s17).await;
    assert_eq!(server.faults.connections_rejected(), 1);
    assert_eq!(server.faults.connections_opened(), 16);

    // After one closes, a new connection gets its greeting again.
    drop(conns.pop());
    let f = server.faults.clone();
    within(
        "close counted",
        f.wait_until(|f| f.connections_closed() == 1),
    )
    .await;
    let mut s = greet(server.port, FLAG_C_FIXED_NEWSTYLE).await;
    assert_eq!(export(&mut s, NAME).await, SIZE);
    assert_eq!(server.active_connections(), 16);
}

// ---- fault switches ----

#[tokio::test(flavor = "multi_thread")]
async fn fault_read_errors() {
    let fx = Fixture::new(10);
    let server = fx.plain().await;
    let f = server.faults.clone();
    let mut s = plain_session(&server).await;

    f.fail_reads(65536..65536 * 2, Some(2));
    send_req(&mut s, CMD_READ, 0, 1, 0, 65536).await; // before the range
    read_ok(&mut s, 1, &fx.data[..65536]).await;
    for cookie in [2, 3] {
        send_req(&mut s, CMD_READ, 0, cookie, 65536 - 512, 1024).await; // overlaps
        assert_eq!(reply(&mut s).await, (cookie, EIO));
    }
    send_req(&mut s, CMD_READ, 0, 4, 65536, 512).await; // used up
    read_ok(&mut s, 4, &fx.data[65536..65536 + 512]).await;
    assert_eq!(f.eio_injected(), 2);

    f.fail_reads(0..SIZE, None);
    for cookie in 5..10 {
        send_req(&mut s, CMD_READ, 0, cookie, cookie * 512, 512).await;
        assert_eq!(reply(&mut s).await, (cookie, EIO));
    }
    f.clear_read_failures();
    send_req(&mut s, CMD_READ, 0, 10, 0, 512).await;
    read_ok(&mut s, 10, &fx.data[..512]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fault_cut_in_the_middle_of_a_read() {
    let fx = Fixture::new(11);
    let server = fx.plain().await;
    let f = server.faults.clone();
    let mut s = plain_session(&server).await;
    f.cut_next_read_after(700_000); // inside the second 512 KiB piece
    send_req(&mut s, CMD_READ, 0, 1, 0, 1024 * 1024).await;
    assert_eq!(reply(&mut s).await, (1, 0));
    let mut got = Vec::new();
    within("payload until close", s.read_to_end(&mut got))
        .await
        .ok();
    assert_eq!(got.len(), 700_000);
    assert!(got[..] == fx.data[..700_000]);
    assert_eq!(f.cuts(), 1);

    // Once only: the next connection reads normally.
    let mut s = plain_session(&server).await;
    send_req(&mut s, CMD_READ, 0, 2, 0, 1024 * 1024).await;
    read_ok(&mut s, 2, &fx.data[..1024 * 1024]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fault_stall_and_release() {
    let fx = Fixture::new(12);
    let server = fx.plain().await;
    let f = server.faults.clone();
    let mut s = plain_session(&server).await;
    f.stall(StallAt::ReadAt(8192));
    send_req(&mut s, CMD_READ, 0, 1, 0, 4096).await;
    send_req(&mut s, CMD_READ, 0, 2, 8192, 4096).await; // stalls
    send_req(&mut s, CMD_READ, 0, 3, 16384, 4096).await;
    read_ok(&mut s, 1, &fx.data[..4096]).await;
    within("stall", f.wait_until(|f| f.stalls() == 1)).await;
    // Nothing more is answered until the release.
    let mut b = [0u8; 1];
    assert!(
        timeout(Duration::from_millis(100), s.read(&mut b))
            .await
            .is_err(),
        "stalled"
    );
    f.release_stall();
    read_ok(&mut s, 2, &fx.data[8192..8192 + 4096]).await;
    read_ok(&mut s, 3, &fx.data[16384..16384 + 4096]).await;

    // A client that gives up on a stalled connection frees its slot.
    f.stall(StallAt::Request(f.requests() + 1));
    send_req(&mut s, CMD_READ, 0, 4, 0, 512).await;
    within("second stall", f.wait_until(|f| f.stalls() == 2)).await;
    drop(s);
    within(
        "stalled connection closed",
        f.wait_until(|f| f.connections_closed() == 1),
    )
    .await;
    assert_eq!(server.active_connections(), 0);
    assert_eq!(fx.attached.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn dropping_the_server_closes_connections() {
    let fx = Fixture::new(13);
    let server = fx.plain().await;
    let mut s = plain_session(&server).await;
    let port = server.port;
    drop(server);
    expect_closed(&mut s).await;
    within("guard dropped", async {
        while fx.attached.load(Ordering::SeqCst) != 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(
        TcpStream::connect(("127.0.0.1", port)).await.is_err(),
        "listener closed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn close_after_error_option() {
    let fx = Fixture::new(14);
    let mut cfg = XenNbdConfig::plaintext(fx.resolver());
    cfg.close_after_error = true;
    let server = XenNbdServer::start(cfg).await.unwrap();
    let mut s = plain_session(&server).await;
    send_req(&mut s, CMD_READ, 0, 1, 1, 512).await;
    assert_eq!(reply(&mut s).await, (1, EINVAL));
    expect_closed(&mut s).await;
}
