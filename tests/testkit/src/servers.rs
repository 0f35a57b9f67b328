//! qemu-nbd and nbdkit as child processes on 127.0.0.1, with or without TLS.
//!
//! Each server runs in the foreground as our child; `Drop` kills it (SIGKILL) and reaps it.
//! The port is chosen by binding 127.0.0.1:0; if the server then fails to start (e.g. the
//! port was taken in between) it is retried on a new port a few times. Readiness = a TCP
//! connect that yields the 18-byte NBD newstyle greeting (sent in clear text even by
//! TLS-only servers).

use std::fs::File;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::certs::TestPki;

/// Export name used by every server started here.
pub const EXPORT: &str = "disk";

/// 8-byte `NBDMAGIC` + 8-byte `IHAVEOPT`.
const GREETING_MAGIC: [u8; 16] = *b"NBDMAGICIHAVEOPT";

const START_ATTEMPTS: usize = 5;
const READY_TIMEOUT: Duration = Duration::from_secs(10);
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Environment variable: set to `1` to let a test whose tools are missing skip (with a
/// printed notice) instead of failing. Failing is the default, so that no test passes by
/// skipping; `scripts/install-deps.sh` installs everything the tests need.
pub const ALLOW_MISSING_TOOLS_ENV: &str = "CBTSTREAM_ALLOW_MISSING_TOOLS";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    QemuNbd,
    NbdKit,
}

/// Options for [`NbdServer::qemu_nbd`].
#[derive(Debug, Clone, Default)]
pub struct QemuOpts {
    /// Demand a client certificate (qemu `verify-peer=on`, mutual TLS). Default off, like
    /// XAPI. Clients then need [`TestPki::client_dir`].
    pub verify_peer: bool,
    /// Image format (`-f`), default `raw`.
    pub format: Option<String>,
    /// Extra arguments inserted before the image path (e.g. `--cache=none`).
    pub extra_args: Vec<String>,
}

/// Options for [`NbdServer::nbdkit`].
///
/// The command line is
/// `nbdkit -f -r -i 127.0.0.1 -p PORT [TLS] EXTRA_ARGS... --filter=F... file IMAGE PARAMS...`.
#[derive(Debug, Clone, Default)]
pub struct NbdKitOpts {
    /// Filter names, each becomes `--filter=NAME` (order matters: first = outermost).
    pub filters: Vec<String>,
    /// `key=value` parameters after the plugin, for the plugin and filters
    /// (e.g. `error-rate=0.1`, `error=EIO`, `delay-read=10ms`).
    pub params: Vec<String>,
    /// Extra server options before the plugin name (e.g. `--threads=4`, `-v`).
    pub extra_args: Vec<String>,
    /// `--tls-verify-peer` (mutual TLS). Only meaningful with a PKI.
    pub verify_peer: bool,
}

impl NbdKitOpts {
    pub fn new() -> Self {
        Self::default()
    }
    /// Add `--filter=NAME`.
    pub fn filter(mut self, name: &str) -> Self {
        self.filters.push(name.to_string());
        self
    }
    /// Add a `key=value` parameter after the plugin name.
    pub fn param(mut self, kv: &str) -> Self {
        self.params.push(kv.to_string());
        self
    }
    /// Add a server option before the plugin name.
    pub fn arg(mut self, arg: &str) -> Self {
        self.extra_args.push(arg.to_string());
        self
    }
    /// Build from a flat list: items containing `=` that do not start with `-` are
    /// parameters, other items starting with `-` are server options, and bare words are
    /// filter names. `["error", "error-rate=0.1", "error-file=/tmp/x"]`.
    pub fn from_args(args: &[&str]) -> Self {
        let mut o = Self::default();
        for a in args {
            if let Some(f) = a.strip_prefix("--filter=") {
                o.filters.push(f.to_string());
            } else if a.starts_with('-') {
                o.extra_args.push(a.to_string());
            } else if a.contains('=') {
                o.params.push(a.to_string());
            } else {
                o.filters.push(a.to_string());
            }
        }
        o
    }
}

/// A running NBD server (child process). Killed and reaped on drop.
#[derive(Debug)]
pub struct NbdServer {
    pub port: u16,
    pub export: String,
    pub kind: ServerKind,
    pub tls: bool,
    child: Child,
    stderr_path: PathBuf,
    // Keeps the stderr log file alive for the server's lifetime.
    _logdir: tempfile::TempDir,
}

/// True if `binary` is an executable file on `$PATH` (or an existing path if it has a `/`).
pub fn have(binary: &str) -> bool {
    if binary.contains('/') {
        return is_executable(Path::new(binary));
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| is_executable(&d.join(binary))))
        .unwrap_or(false)
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Returns true if all `tools` are installed. Otherwise fails the test (panics) with a
/// message naming the test, the missing tools and how to install them; or, when
/// `$CBTSTREAM_ALLOW_MISSING_TOOLS=1`, prints that the test is skipped and returns false,
/// and the caller returns.
///
/// ```no_run
/// # use cbtstream_testkit::require_tools;
/// if !require_tools("my_test", &["qemu-nbd", "nbdinfo"]) {
///     return;
/// }
/// ```
#[track_caller]
pub fn require_tools(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !have(t)).collect();
    missing.is_empty() || missing_prerequisite(test, &missing.join(", "))
}

/// `test` cannot run because `what` is not installed: panics, or, when
/// `$CBTSTREAM_ALLOW_MISSING_TOOLS=1`, prints the skip and returns false.
#[track_caller]
pub fn missing_prerequisite(test: &str, what: &str) -> bool {
    let allowed = std::env::var(ALLOW_MISSING_TOOLS_ENV).is_ok_and(|v| v == "1");
    match skip_notice(test, what, allowed) {
        Ok(notice) => {
            // Written with io::stderr() directly, not eprintln!, so that libtest's output
            // capture does not hide it for a skipped (= passing) test.
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "\n!!!!!!!! {notice} !!!!!!!!\n");
            false
        }
        Err(failure) => panic!("{failure}"),
    }
}

/// The notice of a skip when missing tools are `allowed`, else the failure message.
fn skip_notice(test: &str, what: &str, allowed: bool) -> Result<String, String> {
    let msg = format!("{test}: not installed: {what}; run scripts/install-deps.sh");
    if allowed {
        Ok(format!("SKIPPED {msg} ({ALLOW_MISSING_TOOLS_ENV}=1)"))
    } else {
        Err(format!(
            "{msg} (or set {ALLOW_MISSING_TOOLS_ENV}=1 to skip such tests)"
        ))
    }
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn abs(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("absolute path of {}", p.display()))
}

impl NbdServer {
    /// `qemu-nbd -r -t -f raw --shared=0 -x disk -b 127.0.0.1 -p PORT [TLS] IMAGE`, with TLS
    /// `--object tls-creds-x509,id=tls0,dir=PKI.dir,endpoint=server,verify-peer=off --tls-creds tls0`.
    pub fn qemu_nbd(image: &Path, pki: Option<&TestPki>, opts: QemuOpts) -> Result<NbdServer> {
        Self::qemu_nbd_tls_dir(image, pki.map(|p| p.dir.as_path()), opts)
    }

    /// Like [`qemu_nbd`](Self::qemu_nbd) with an explicit `tls-creds-x509` directory
    /// (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`); `None` = plaintext.
    pub fn qemu_nbd_tls_dir(
        image: &Path,
        tls_dir: Option<&Path>,
        opts: QemuOpts,
    ) -> Result<NbdServer> {
        let image = abs(image)?;
        let pki_dir = tls_dir.map(abs).transpose()?;
        Self::start(ServerKind::QemuNbd, pki_dir.is_some(), |port| {
            let mut c = Command::new("qemu-nbd");
            c.args(["-r", "-t", "-f"])
                .arg(opts.format.as_deref().unwrap_or("raw"))
                .args(["--shared=0", "-x", EXPORT, "-b", "127.0.0.1", "-p"])
                .arg(port.to_string());
            if let Some(dir) = &pki_dir {
                let dir = dir.to_str().context("PKI dir is not UTF-8")?;
                if dir.contains(',') {
                    bail!("qemu --object cannot take a dir= containing ',': {dir}");
                }
                c.arg("--object")
                    .arg(format!(
                        "tls-creds-x509,id=tls0,dir={dir},endpoint=server,verify-peer={}",
                        if opts.verify_peer { "on" } else { "off" }
                    ))
                    .args(["--tls-creds", "tls0"]);
            }
            c.args(&opts.extra_args).arg(&image);
            Ok(c)
        })
    }

    /// `nbdkit -f -r -i 127.0.0.1 -p PORT [--tls=require --tls-certificates=PKI.dir]
    /// [--filter=...] file IMAGE [params]`.
    pub fn nbdkit(image: &Path, pki: Option<&TestPki>, opts: NbdKitOpts) -> Result<NbdServer> {
        Self::nbdkit_tls_dir(image, pki.map(|p| p.dir.as_path()), opts)
    }

    /// Like [`nbdkit`](Self::nbdkit) with an explicit `--tls-certificates` directory; e.g.
    /// `SelfSignedCert::dir` to serve the XAPI-style certificate. `None` = plaintext.
    pub fn nbdkit_tls_dir(
        image: &Path,
        tls_dir: Option<&Path>,
        opts: NbdKitOpts,
    ) -> Result<NbdServer> {
        let image = abs(image)?;
        let pki_dir = tls_dir.map(abs).transpose()?;
        Self::start(ServerKind::NbdKit, pki_dir.is_some(), |port| {
            let mut c = Command::new("nbdkit");
            c.args(["-f", "-r", "-i", "127.0.0.1", "-p"])
                .arg(port.to_string());
            if let Some(dir) = &pki_dir {
                c.arg("--tls=require")
                    .arg(format!("--tls-certificates={}", dir.display()));
                if opts.verify_peer {
                    c.arg("--tls-verify-peer");
                }
            }
            c.args(&opts.extra_args);
            for f in &opts.filters {
                c.arg(format!("--filter={f}"));
            }
            c.arg("file").arg(&image).args(&opts.params);
            Ok(c)
        })
    }

    fn start(
        kind: ServerKind,
        tls: bool,
        mut build: impl FnMut(u16) -> Result<Command>,
    ) -> Result<NbdServer> {
        let mut last_err = anyhow!("not started");
        for attempt in 1..=START_ATTEMPTS {
            let port = free_port()?;
            let logdir = tempfile::Builder::new()
                .prefix("cbtstream-nbd-server-")
                .tempdir()?;
            let stderr_path = logdir.path().join("stderr.log");
            let stderr = File::create(&stderr_path)?;
            let mut cmd = build(port)?;
            cmd.stdin(Stdio::null())
                .stdout(Stdio::from(stderr.try_clone()?))
                .stderr(Stdio::from(stderr));
            let cmdline = format!("{cmd:?}");
            let child = cmd.spawn().with_context(|| format!("spawning {cmdline}"))?;
            let mut server = NbdServer {
                port,
                export: EXPORT.to_string(),
                kind,
                tls,
                child,
                stderr_path,
                _logdir: logdir,
            };
            match server.wait_ready() {
                Ok(()) => return Ok(server),
                Err(e) => {
                    // Drop kills the child if it is still running.
                    let exited = server.child.try_wait().ok().flatten().is_some();
                    let log = server.stderr_contents();
                    last_err = anyhow!(
                        "{kind:?} did not become ready on port {port} (attempt {attempt}/{START_ATTEMPTS}): {e:#}\n\
                         command: {cmdline}\nstderr:\n{log}"
                    );
                    drop(server);
                    // Only a port clash (another process grabbed the port between our
                    // probe bind and the server's bind) is worth retrying on a new port.
                    let lower = log.to_ascii_lowercase();
                    if !(exited && (lower.contains("in use") || lower.contains("bind"))) {
                        break;
                    }
                }
            }
        }
        Err(last_err)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("server exited with {status}");
            }
            let last = match probe_greeting(&addr) {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                bail!("timed out after {READY_TIMEOUT:?}; last probe error: {last:#}");
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// `nbds://127.0.0.1:PORT/disk` with TLS, `nbd://127.0.0.1:PORT/disk` without.
    pub fn uri(&self) -> String {
        format!(
            "{}://127.0.0.1:{}/{}",
            if self.tls { "nbds" } else { "nbd" },
            self.port,
            self.export
        )
    }

    /// [`uri`](Self::uri) plus `?tls-certificates=DIR` (for nbdinfo/nbdcopy/libnbd).
    /// With `pki.dir` the client verifies the server against `ca-cert.pem` and presents no
    /// client certificate; with `pki.client_dir` it also presents the client certificate.
    pub fn uri_with_certs(&self, dir: &Path) -> String {
        format!("{}?tls-certificates={}", self.uri(), dir.display())
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whatever the server wrote to stdout/stderr so far.
    pub fn stderr_contents(&self) -> String {
        std::fs::read(&self.stderr_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| format!("<could not read server log: {e}>"))
    }

    /// True while the server process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connect and read the 18-byte newstyle greeting; checks the two magics.
fn probe_greeting(addr: &SocketAddr) -> Result<()> {
    let mut s = TcpStream::connect_timeout(addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_millis(1000)))?;
    let mut buf = [0u8; 18];
    s.read_exact(&mut buf).context("reading the NBD greeting")?;
    if buf[..16] != GREETING_MAGIC {
        bail!("unexpected greeting {buf:02x?}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installed_tools_are_found() {
        assert!(have("sh"));
        assert!(!have("cbtstream-no-such-tool"));
        assert!(require_tools("t", &["sh"]));
    }

    #[test]
    fn a_missing_tool_fails_unless_skipping_is_allowed() {
        assert_eq!(
            skip_notice("some_test", "qemu-nbd, nbdkit", false),
            Err(
                "some_test: not installed: qemu-nbd, nbdkit; run scripts/install-deps.sh \
                 (or set CBTSTREAM_ALLOW_MISSING_TOOLS=1 to skip such tests)"
                    .to_string()
            )
        );
        assert_eq!(
            skip_notice("some_test", "qemu-nbd, nbdkit", true),
            Ok("SKIPPED some_test: not installed: qemu-nbd, nbdkit; run \
                scripts/install-deps.sh (CBTSTREAM_ALLOW_MISSING_TOOLS=1)"
                .to_string())
        );
    }
}
