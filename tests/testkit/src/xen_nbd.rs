//! A test NBD server with XenServer's profile: it imitates `xapi-nbd` (the OCaml server in
//! xapi-project/nbd `lib/server.ml`, run by xen-api `ocaml/nbd/src/main.ml`), as described in
//! `docs/XENSERVER.md` section 3. All wire encoding and parsing goes through
//! `cbtstream_proto::nbd` (`server.rs` encoders, `transmission::parse_request`).
//!
//! What it reproduces:
//!
//! * **TLS** ("FORCEDTLS"): TLS 1.2 only, `ECDHE-RSA-AES256-GCM-SHA384` and
//!   `ECDHE-RSA-AES128-GCM-SHA256` only, key exchange group secp384r1 only
//!   ([`xapi_crypto_provider`]). Use an RSA certificate ([`crate::xapi_style_self_signed`]):
//!   with an ECDSA key no cipher suite matches and every handshake fails, as on a real host.
//! * **Handshake**: greeting with handshake flags `FIXED_NEWSTYLE` only (no `NO_ZEROES`).
//!   In TLS mode a client without `C_FIXED_NEWSTYLE` is disconnected. Before STARTTLS:
//!   `STARTTLS` → ACK + TLS handshake, `EXPORT_NAME` or `ABORT` → connection dropped, anything
//!   else → `ERR_TLS_REQD`. After TLS (or in plaintext mode): `EXPORT_NAME` → transmission,
//!   `ABORT` → ACK + close, `LIST` → `ERR_POLICY`, `STARTTLS` → `ERR_INVALID` (`ERR_POLICY` in
//!   plaintext mode), everything else (`INFO`, `GO`, `STRUCTURED_REPLY`, meta contexts,
//!   extended headers, unknown) → `ERR_UNSUP`.
//! * **Export**: the name goes through a [`Resolver`]; unknown → connection closed without a
//!   reply; known → `u64 size`, `u16 flags = HAS_FLAGS|READ_ONLY`, 124 zero bytes.
//! * **Transmission**: 28-byte requests; command flags and type are one 32-bit field, so any
//!   non-zero command flag → `EINVAL`. `READ` with an offset or length that is not a multiple
//!   of 512, or past the end → `EINVAL`; `WRITE` → `EPERM` (its payload is *not* consumed, as
//!   in xapi-nbd: the bytes are then parsed as requests and the connection usually dies on a
//!   bad magic); `DISC` → close; anything else → `EINVAL`. Simple replies only, strictly in
//!   request order; READ data follows the header, read from the file in 512 KiB pieces with
//!   positional reads. Requests are read ahead (pipelining), replies are sequential. A real
//!   I/O error after the header was sent is a hard disconnect, as in xapi-nbd.
//! * **Connection limit**: at most `max_connections` (default 16) connections across the
//!   server; the next one is accepted and closed before the greeting.
//! * **Fault switches** ([`Faults`]) for tests: EIO on reads in a range (N times or forever),
//!   a cut in the middle of one READ payload, a stall on one request, and counters.

use std::any::Any;
use std::fmt;
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::{Buf, BytesMut};
use cbtstream_proto::nbd::consts::*;
use cbtstream_proto::nbd::server::{
    encode_export_name_reply, encode_greeting, encode_option_reply, encode_simple_reply,
    parse_client_flags, parse_client_option, ClientOption, MAX_OPTION_DATA,
};
use cbtstream_proto::nbd::transmission::{parse_request, Request};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

/// The port xapi-nbd listens on.
pub const XAPI_NBD_PORT: u16 = 10809;
/// `Consts.connection_limit` in xen-api `ocaml/nbd/lib/consts.ml`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16;
/// The block device sector size: READ offsets and lengths must be multiples of it.
pub const SECTOR: u64 = 512;
/// READ data is read and sent in pieces of this size (`Io_page.get 128`).
pub const READ_PIECE: usize = 512 * 1024;
/// Handshake flags of the greeting.
pub const HANDSHAKE_FLAGS: u16 = FLAG_FIXED_NEWSTYLE;
/// Transmission flags of every export.
pub const EXPORT_FLAGS: u16 = TFLAG_HAS_FLAGS | TFLAG_READ_ONLY;

const CMD_WRITE: u16 = 1;

/// What an export name resolves to.
pub struct Export {
    /// A raw image file; bytes past its end (up to `size`) read as zeroes.
    pub path: PathBuf,
    /// The export size announced to the client.
    pub size: u64,
    /// Dropped when the connection closes (e.g. the simulator marks a VDI attached to dom0
    /// while this is alive).
    pub guard: Option<Box<dyn Any + Send + Sync>>,
}

impl Export {
    /// An export of a whole file (size = file length), without a guard.
    pub fn file(path: impl Into<PathBuf>) -> Result<Export> {
        let path = path.into();
        let size = std::fs::metadata(&path)
            .with_context(|| format!("stat {}", path.display()))?
            .len();
        Ok(Export {
            path,
            size,
            guard: None,
        })
    }
}

impl fmt::Debug for Export {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Export")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("guard", &self.guard.is_some())
            .finish()
    }
}

/// Maps an export name (for XenServer `/<vdi-uuid>?session_id=<ref>`) to an export, or
/// `None` to close the connection without a reply (bad session, unknown VDI...).
pub type Resolver = Arc<dyn Fn(&str) -> Option<Export> + Send + Sync>;

/// A resolver serving one file: under `name`, or under any name if `name` is `None`.
/// The size is taken from the file when the name is resolved.
pub fn file_resolver(name: Option<String>, path: impl Into<PathBuf>) -> Resolver {
    let path = path.into();
    Arc::new(move |asked: &str| {
        if name.as_deref().is_some_and(|n| n != asked) {
            return None;
        }
        Export::file(&path).ok()
    })
}

/// Server configuration.
#[derive(Clone)]
pub struct XenNbdConfig {
    /// PEM file with the certificate (chain); may also hold the key (like `xapi-ssl.pem`).
    pub cert_pem: PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key_pem: PathBuf,
    pub resolver: Resolver,
    /// Connections allowed at once across the server (default 16).
    pub max_connections: usize,
    /// true (default): FORCEDTLS. false: NOTLS mode (no STARTTLS; cert/key unused).
    pub tls: bool,
    /// Where to listen; default `127.0.0.1:0` (an ephemeral port, see [`XenNbdServer::port`]).
    pub bind: SocketAddr,
    /// Close the connection right after sending an error reply (EINVAL, EPERM, EIO). Off by
    /// default. One stored version of xapi-project/nbd `lib/server.ml` does this (its serve
    /// loop does not recurse after `error t handle ...`); the research notes do not say it,
    /// so the default follows the notes.
    pub close_after_error: bool,
}

impl XenNbdConfig {
    /// FORCEDTLS with the given certificate and key, 16 connections, 127.0.0.1, any port.
    pub fn new(
        cert_pem: impl Into<PathBuf>,
        key_pem: impl Into<PathBuf>,
        resolver: Resolver,
    ) -> Self {
        XenNbdConfig {
            cert_pem: cert_pem.into(),
            key_pem: key_pem.into(),
            resolver,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            tls: true,
            bind: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            close_after_error: false,
        }
    }

    /// NOTLS mode (xapi-nbd with an `insecure_nbd` network).
    pub fn plaintext(resolver: Resolver) -> Self {
        XenNbdConfig {
            tls: false,
            ..Self::new(PathBuf::new(), PathBuf::new(), resolver)
        }
    }
}

impl fmt::Debug for XenNbdConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XenNbdConfig")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &self.key_pem)
            .field("max_connections", &self.max_connections)
            .field("tls", &self.tls)
            .field("bind", &self.bind)
            .field("close_after_error", &self.close_after_error)
            .finish_non_exhaustive()
    }
}

/// The rustls ring provider restricted to xapi's default TLS policy
/// (xen-api `ocaml/xapi-consts/tls_policy.ml`): ciphers
/// `ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-AES128-GCM-SHA256`, group secp384r1.
pub fn xapi_crypto_provider() -> rustls::crypto::CryptoProvider {
    use rustls::crypto::ring::{cipher_suite, kx_group};
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cipher_suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        cipher_suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    ];
    p.kx_groups = vec![kx_group::SECP384R1];
    p
}

/// A TLS 1.2-only rustls server config with [`xapi_crypto_provider`], from PEM files.
pub fn xapi_tls_server_config(
    cert_pem: &Path,
    key_pem: &Path,
) -> Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    let chain = CertificateDer::pem_file_iter(cert_pem)
        .with_context(|| format!("reading {}", cert_pem.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", cert_pem.display()))?;
    if chain.is_empty() {
        bail!("no certificate in {}", cert_pem.display());
    }
    let key = PrivateKeyDer::from_pem_file(key_pem)
        .with_context(|| format!("reading a private key from {}", key_pem.display()))?;
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(xapi_crypto_provider()))
        .with_protocol_versions(&[&rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("certificate and key do not match or are unsupported")?;
    Ok(Arc::new(cfg))
}

/// Make `dir` a libnbd `tls-certificates=` directory trusting the (self-signed) certificate
/// in `cert_pem`: copies it to `dir/ca-cert.pem`. Returns `dir`.
pub fn libnbd_tls_dir(cert_pem: &Path, dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::copy(cert_pem, dir.join("ca-cert.pem"))
        .with_context(|| format!("copying {}", cert_pem.display()))?;
    Ok(dir.to_path_buf())
}

/// Where to stall (stop replying until [`Faults::release_stall`] or the client leaves).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StallAt {
    /// The first READ whose range contains this offset.
    ReadAt(u64),
    /// The n-th transmission request received by the server (counted from 1, across all
    /// connections; see [`Faults::requests`]).
    Request(u64),
}

#[derive(Debug, Clone)]
struct ReadErrorFault {
    range: Range<u64>,
    /// None: forever.
    remaining: Option<u64>,
}

/// Fault switches and counters shared by all connections of one server. Tests flip them
/// at any time; each switch affects requests handled after it is set.
#[derive(Debug)]
pub struct Faults {
    read_errors: Mutex<Option<ReadErrorFault>>,
    cut_after: Mutex<Option<u64>>,
    stall_at: Mutex<Option<StallAt>>,
    release: watch::Sender<u64>,
    changed: Notify,
    opened: AtomicU64,
    closed: AtomicU64,
    rejected: AtomicU64,
    requests: AtomicU64,
    reads_ok: AtomicU64,
    bytes_read: AtomicU64,
    eio_injected: AtomicU64,
    cuts: AtomicU64,
    stalls: AtomicU64,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            read_errors: Mutex::new(None),
            cut_after: Mutex::new(None),
            stall_at: Mutex::new(None),
            release: watch::channel(0).0,
            changed: Notify::new(),
            opened: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            reads_ok: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            eio_injected: AtomicU64::new(0),
            cuts: AtomicU64::new(0),
            stalls: AtomicU64::new(0),
        }
    }
}

impl Faults {
    /// READs overlapping `range` get a simple reply with EIO (no payload), `times` times
    /// (`None` = forever). Replaces any previous read-error setting.
    pub fn fail_reads(&self, range: Range<u64>, times: Option<u64>) {
        *self.read_errors.lock().unwrap() = match times {
            Some(0) => None,
            _ => Some(ReadErrorFault {
                range,
                remaining: times,
            }),
        };
    }

    pub fn clear_read_failures(&self) {
        *self.read_errors.lock().unwrap() = None;
    }

    /// The next READ longer than `bytes` sends its header and `bytes` bytes of data, then the
    /// connection is closed (once).
    pub fn cut_next_read_after(&self, bytes: u64) {
        *self.cut_after.lock().unwrap() = Some(bytes);
    }

    /// Stall once at the given request: the connection sends nothing more until
    /// [`release_stall`](Self::release_stall) (then the request is served normally) or until
    /// the client disconnects or the server is dropped.
    pub fn stall(&self, at: StallAt) {
        *self.stall_at.lock().unwrap() = Some(at);
    }

    /// Resume every stalled request and disarm a stall that has not triggered yet.
    pub fn release_stall(&self) {
        *self.stall_at.lock().unwrap() = None;
        self.release.send_modify(|g| *g += 1);
    }

    /// Connections accepted and served (the rejected ones are not counted).
    pub fn connections_opened(&self) -> u64 {
        self.opened.load(Ordering::SeqCst)
    }
    /// Served connections that have ended (export guard already dropped).
    pub fn connections_closed(&self) -> u64 {
        self.closed.load(Ordering::SeqCst)
    }
    /// Connections closed before the greeting because of the connection limit.
    pub fn connections_rejected(&self) -> u64 {
        self.rejected.load(Ordering::SeqCst)
    }
    /// Transmission requests received (all commands, all connections).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
    /// READs answered with data (including cut ones).
    pub fn reads_ok(&self) -> u64 {
        self.reads_ok.load(Ordering::SeqCst)
    }
    /// READs answered with an injected EIO.
    pub fn eio_injected(&self) -> u64 {
        self.eio_injected.load(Ordering::SeqCst)
    }
    /// Bytes of READ requests answered with data (cut ones counted whole).
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::SeqCst)
    }

    /// Connections cut in the middle of a READ payload.
    pub fn cuts(&self) -> u64 {
        self.cuts.load(Ordering::SeqCst)
    }
    /// Requests that have stalled (counted when the stall begins).
    pub fn stalls(&self) -> u64 {
        self.stalls.load(Ordering::SeqCst)
    }

    /// Wait until `cond` holds; re-checked after every counter change. Wrap it in a timeout.
    pub async fn wait_until(&self, mut cond: impl FnMut(&Faults) -> bool) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if cond(self) {
                return;
            }
            notified.await;
        }
    }

    fn bump(&self, counter: &AtomicU64) -> u64 {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        self.changed.notify_waiters();
        n
    }

    fn take_read_error(&self, offset: u64, len: u64) -> bool {
        let mut g = self.read_errors.lock().unwrap();
        let Some(f) = g.as_mut() else { return false };
        let end = offset.saturating_add(len.max(1));
        if offset >= f.range.end || end <= f.range.start {
            return false;
        }
        if let Some(n) = f.remaining.as_mut() {
            *n -= 1;
            if *n == 0 {
                *g = None;
            }
        }
        true
    }

    fn take_cut(&self, len: u64) -> Option<u64> {
        let mut g = self.cut_after.lock().unwrap();
        match *g {
            Some(k) if k < len => g.take(),
            _ => None,
        }
    }

    fn take_stall(&self, request_no: u64, req: &Request) -> bool {
        let mut g = self.stall_at.lock().unwrap();
        let hit = match *g {
            Some(StallAt::Request(n)) => n == request_no,
            Some(StallAt::ReadAt(off)) => {
                req.cmd == CMD_READ
                    && req.flags == 0
                    && off >= req.offset
                    && off < req.offset.saturating_add(req.length.max(1))
            }
            None => false,
        };
        if hit {
            *g = None;
        }
        hit
    }
}

struct Shared {
    resolver: Resolver,
    acceptor: Option<TlsAcceptor>,
    max_connections: usize,
    close_after_error: bool,
    active: AtomicUsize,
    faults: Arc<Faults>,
}

/// A running server. Dropping it stops the accept loop and aborts every connection.
pub struct XenNbdServer {
    pub port: u16,
    pub addr: SocketAddr,
    pub faults: Arc<Faults>,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl fmt::Debug for XenNbdServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XenNbdServer")
            .field("addr", &self.addr)
            .field("tls", &self.shared.acceptor.is_some())
            .field("active", &self.active_connections())
            .finish_non_exhaustive()
    }
}

impl XenNbdServer {
    /// Bind and start serving on the current tokio runtime.
    pub async fn start(cfg: XenNbdConfig) -> Result<Self> {
        let acceptor = if cfg.tls {
            Some(TlsAcceptor::from(xapi_tls_server_config(
                &cfg.cert_pem,
                &cfg.key_pem,
            )?))
        } else {
            None
        };
        let listener = TcpListener::bind(cfg.bind)
            .await
            .with_context(|| format!("binding {}", cfg.bind))?;
        let addr = listener.local_addr()?;
        let faults = Arc::new(Faults::default());
        let shared = Arc::new(Shared {
            resolver: cfg.resolver,
            acceptor,
            max_connections: cfg.max_connections,
            close_after_error: cfg.close_after_error,
            active: AtomicUsize::new(0),
            faults: faults.clone(),
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(XenNbdServer {
            port: addr.port(),
            addr,
            faults,
            shared,
            task,
        })
    }

    /// Connections being served right now.
    pub fn active_connections(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }

    pub fn is_tls(&self) -> bool {
        self.shared.acceptor.is_some()
    }

    /// `nbds://127.0.0.1:PORT/NAME` (`nbd://` in plaintext mode), for libnbd tools. Add
    /// `?tls-certificates=DIR` (see [`libnbd_tls_dir`]) for TLS.
    pub fn uri(&self, export_name: &str) -> String {
        format!(
            "{}://{}:{}/{}",
            if self.is_tls() { "nbds" } else { "nbd" },
            self.addr.ip(),
            self.port,
            export_name
        )
    }

    /// Stop accepting and abort all connections now (the same as dropping the server).
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for XenNbdServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Decrements the active count and counts the close, even when the task is aborted.
struct ConnGuard(Arc<Shared>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
        self.0.faults.bump(&self.0.faults.closed);
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    // Dropping the JoinSet (when this task is aborted) aborts every connection.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            res = listener.accept() => {
                let tcp = match res {
                    Ok((tcp, _)) => tcp,
                    Err(_) => {
                        // EMFILE and friends: back off a little instead of spinning.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                if shared.active.load(Ordering::SeqCst) >= shared.max_connections {
                    // xapi-nbd: accepted, then closed before the greeting. Counted before
                    // the close, so a client that sees the close also sees the count.
                    shared.faults.bump(&shared.faults.rejected);
                    drop(tcp);
                    continue;
                }
                shared.active.fetch_add(1, Ordering::SeqCst);
                shared.faults.bump(&shared.faults.opened);
                let sh = shared.clone();
                conns.spawn(async move {
                    let _guard = ConnGuard(sh.clone());
                    let _ = serve_connection(tcp, &sh).await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn serve_connection(mut tcp: TcpStream, sh: &Arc<Shared>) -> Result<()> {
    let _ = tcp.set_nodelay(true);
    let mut out = Vec::with_capacity(18);
    encode_greeting(&mut out, HANDSHAKE_FLAGS);
    tcp.write_all(&out).await?;
    let mut flags = [0u8; 4];
    tcp.read_exact(&mut flags).await?;
    let flags = parse_client_flags(&flags).unwrap_or(0);
    let Some(acceptor) = &sh.acceptor else {
        // NOTLS mode: xapi-nbd only logs a client without C_FIXED_NEWSTYLE and continues.
        return options_and_serve(tcp, sh, false).await;
    };
    if flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Ok(());
    }
    loop {
        let opt = read_option(&mut tcp).await?;
        match opt.option {
            OPT_STARTTLS => {
                send_option_reply(&mut tcp, opt.option, REP_ACK).await?;
                break;
            }
            // Cleartext EXPORT_NAME or ABORT: the connection is dropped.
            OPT_EXPORT_NAME | OPT_ABORT => return Ok(()),
            other => send_option_reply(&mut tcp, other, REP_ERR_TLS_REQD).await?,
        }
    }
    // read_option reads exactly one option, so no cleartext bytes are buffered here.
    let tls = acceptor.accept(tcp).await?;
    options_and_serve(tls, sh, true).await
}

/// Read exactly one client option (shared with the hostile server).
pub(crate) async fn read_option<S: AsyncRead + Unpin>(s: &mut S) -> Result<ClientOption> {
    let mut buf = vec![0u8; 16];
    s.read_exact(&mut buf).await?;
    let len = u32::from_be_bytes([buf[12], buf[13], buf[14], buf[15]]);
    if len > MAX_OPTION_DATA {
        bail!("option data of {len} bytes");
    }
    buf.resize(16 + len as usize, 0);
    s.read_exact(&mut buf[16..]).await?;
    match parse_client_option(&buf)? {
        Some((opt, _)) => Ok(opt),
        None => bail!("short option"),
    }
}

/// Send an option reply without data (shared with the hostile server).
pub(crate) async fn send_option_reply<S: AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
    typ: u32,
) -> Result<()> {
    let mut out = Vec::with_capacity(20);
    encode_option_reply(&mut out, option, typ, &[]);
    s.write_all(&out).await?;
    s.flush().await?;
    Ok(())
}

async fn options_and_serve<S>(mut s: S, sh: &Arc<Shared>, is_tls: bool) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let name = loop {
        let opt = read_option(&mut s).await?;
        let typ = match opt.option {
            OPT_EXPORT_NAME => break opt.data,
            OPT_ABORT => {
                send_option_reply(&mut s, opt.option, REP_ACK).await?;
                let _ = s.shutdown().await;
                return Ok(());
            }
            OPT_LIST => REP_ERR_POLICY,
            OPT_STARTTLS if is_tls => REP_ERR_INVALID,
            OPT_STARTTLS => REP_ERR_POLICY,
            _ => REP_ERR_UNSUP,
        };
        send_option_reply(&mut s, opt.option, typ).await?;
    };
    // Unknown name, bad session, unreadable image: close without replying.
    let Ok(name) = String::from_utf8(name) else {
        return Ok(());
    };
    let Some(export) = (sh.resolver)(&name) else {
        return Ok(());
    };
    let Ok(file) = File::open(&export.path) else {
        return Ok(());
    };
    let mut out = Vec::with_capacity(134);
    encode_export_name_reply(&mut out, export.size, EXPORT_FLAGS, false);
    s.write_all(&out).await?;
    s.flush().await?;
    let res = transmission(s, Arc::new(file), export.size, sh).await;
    drop(export); // the guard goes before the connection is counted as closed
    res
}

enum Incoming {
    Req(Request),
    /// Bad request magic: xapi-nbd fails the connection.
    Bad,
}

async fn transmission<S>(s: S, file: Arc<File>, size: u64, sh: &Arc<Shared>) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let faults = &sh.faults;
    let (mut rd, mut wr) = tokio::io::split(s);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (gone_tx, gone_rx) = watch::channel(false);
    // Read requests ahead so pipelining clients are not throttled and a disconnect is seen
    // even while the reply side is stalled. Replies are still produced one at a time.
    let _reader = AbortOnDrop(tokio::spawn(async move {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        'outer: loop {
            loop {
                match parse_request(&buf, false) {
                    Ok(Some((req, n))) => {
                        buf.advance(n);
                        if tx.send(Incoming::Req(req)).is_err() {
                            break 'outer;
                        }
                    }
                    Ok(None) => break,
                    Err(_) => {
                        let _ = tx.send(Incoming::Bad);
                        break 'outer;
                    }
                }
            }
            match rd.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let _ = gone_tx.send(true);
    }));

    let mut data: Vec<u8> = Vec::with_capacity(16 + READ_PIECE);
    while let Some(incoming) = rx.recv().await {
        let Incoming::Req(req) = incoming else {
            return Ok(());
        };
        let n = faults.bump(&faults.requests);
        if faults.take_stall(n, &req) {
            let mut release = faults.release.subscribe();
            release.mark_unchanged();
            faults.bump(&faults.stalls);
            let mut gone = gone_rx.clone();
            tokio::select! {
                _ = release.changed() => {}
                _ = gone.wait_for(|g| *g) => return Ok(()),
            }
        }
        // xapi reads flags + type as one 32-bit "type": any flag makes it unknown.
        let error = if req.flags != 0 {
            Some(EINVAL)
        } else {
            match req.cmd {
                CMD_READ => {
                    let aligned = req.offset % SECTOR == 0 && req.length % SECTOR == 0;
                    let in_range = req
                        .offset
                        .checked_add(req.length)
                        .is_some_and(|e| e <= size);
                    if !aligned || !in_range {
                        Some(EINVAL)
                    } else if faults.take_read_error(req.offset, req.length) {
                        faults.bump(&faults.eio_injected);
                        Some(EIO)
                    } else {
                        None
                    }
                }
                CMD_WRITE => Some(EPERM),
                CMD_DISC => {
                    let _ = wr.shutdown().await;
                    return Ok(());
                }
                _ => Some(EINVAL),
            }
        };
        if let Some(code) = error {
            data.clear();
            encode_simple_reply(&mut data, req.cookie, code);
            wr.write_all(&data).await?;
            wr.flush().await?;
            if sh.close_after_error {
                return Ok(());
            }
            continue;
        }

        // READ: header first (xapi sends it before reading), then the data in pieces.
        let cut = faults.take_cut(req.length);
        faults.bump(&faults.reads_ok);
        faults.bytes_read.fetch_add(req.length, Ordering::SeqCst);
        data.clear();
        encode_simple_reply(&mut data, req.cookie, 0);
        let end = req.offset + req.length;
        let mut pos = req.offset;
        let mut sent = 0u64;
        loop {
            let piece = (end - pos).min(READ_PIECE as u64) as usize;
            let header = data.len();
            // A real read error after the header: hard disconnect, as in xapi-nbd.
            data = read_piece(file.clone(), data, pos, piece).await?;
            if let Some(k) = cut {
                if sent + piece as u64 > k {
                    let keep = header + (k - sent) as usize;
                    wr.write_all(&data[..keep]).await?;
                    wr.flush().await?;
                    faults.bump(&faults.cuts);
                    return Ok(());
                }
            }
            wr.write_all(&data).await?;
            data.clear();
            pos += piece as u64;
            sent += piece as u64;
            if pos >= end {
                break;
            }
        }
        wr.flush().await?;
    }
    Ok(())
}

/// Append `n` bytes of `file` at `pos` to `buf` (zeroes past the end of the file).
async fn read_piece(file: Arc<File>, mut buf: Vec<u8>, pos: u64, n: usize) -> io::Result<Vec<u8>> {
    if n == 0 {
        return Ok(buf);
    }
    tokio::task::spawn_blocking(move || {
        let start = buf.len();
        buf.resize(start + n, 0);
        let mut done = 0;
        while done < n {
            match file.read_at(&mut buf[start + done..start + n], pos + done as u64) {
                Ok(0) => break,
                Ok(k) => done += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(buf)
    })
    .await
    .map_err(io::Error::other)?
}
