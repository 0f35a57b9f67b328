//! An S3 server for the tests: `s3s-fs` (crates.io, Nugine/s3s) as a child process on
//! 127.0.0.1, storing into a directory the test owns.
//!
//! s3s-fs keeps bucket `B`'s object `K` in the file `ROOT/B/K` and everything else in ROOT
//! itself: object metadata in `.bucket-*.json`, each open multipart upload as
//! `.upload-ID.json`, its parts as `.upload_id-ID.part-N`. So a bucket is made by creating its
//! directory, and what an upload left behind is counted from ROOT.
//!
//! The server is started on port 0 and logs the address it bound (at `info`); readiness is
//! that line, which it writes after `bind`, so the port is already accepting connections.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::servers::have;

/// The binary, installed by `scripts/install-deps.sh`.
pub const S3S_FS: &str = "s3s-fs";
/// The bucket every [`S3Server`] has.
pub const BUCKET: &str = "cbtstream-test";
/// Test credentials: not secrets, the server exists only for the test.
pub const ACCESS_KEY: &str = "cbtstream-test-access";
pub const SECRET_KEY: &str = "cbtstream-test-secret";
/// object_store needs a region to sign requests with; us-east-1 is S3's default.
pub const REGION: &str = "us-east-1";

const READY_TIMEOUT: Duration = Duration::from_secs(10);
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// What s3s-fs logs once it listens, followed by the address.
const READY_LINE: &str = "server is running at http://";

/// A running s3s-fs. Killed and reaped on drop; the root directory is the caller's and stays.
#[derive(Debug)]
pub struct S3Server {
    root: PathBuf,
    port: u16,
    child: Option<Child>,
    log_path: PathBuf,
    // Keeps the log file alive for the server's lifetime.
    _logdir: tempfile::TempDir,
}

impl S3Server {
    /// Starts s3s-fs on a free loopback port, storing into `root` (created if missing), with
    /// the bucket [`BUCKET`] and authentication by [`ACCESS_KEY`] / [`SECRET_KEY`].
    pub fn start(root: &Path) -> Result<S3Server> {
        if !have(S3S_FS) {
            bail!("{S3S_FS} is not installed; run scripts/install-deps.sh");
        }
        std::fs::create_dir_all(root.join(BUCKET))
            .with_context(|| format!("creating the bucket directory in {}", root.display()))?;
        let root = std::path::absolute(root)?;
        let logdir = tempfile::tempdir()?;
        let mut server = S3Server {
            root,
            port: 0,
            child: None,
            log_path: logdir.path().join("s3s-fs.log"),
            _logdir: logdir,
        };
        server.spawn(0)?;
        Ok(server)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn bucket(&self) -> &str {
        BUCKET
    }

    pub fn access_key(&self) -> &str {
        ACCESS_KEY
    }

    pub fn secret_key(&self) -> &str {
        SECRET_KEY
    }

    pub fn region(&self) -> &str {
        REGION
    }

    /// The directory the server stores into.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file s3s-fs keeps the object `key` of the bucket in (to damage it behind the
    /// server's back: a GET returns the file as it is).
    pub fn object_path(&self, key: &str) -> PathBuf {
        self.root.join(BUCKET).join(key)
    }

    /// The variables with which `AmazonS3Builder::from_env()` in a child process reaches
    /// this server. from_env reads every `AWS_*` variable whose lower-cased name is a config
    /// key, so inherited ones (AWS_SESSION_TOKEN, AWS_BUCKET, ...) would count too:
    /// [`S3Server::apply_env`] removes them.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_string()),
            ("AWS_REGION", REGION.to_string()),
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Gives `cmd` the variables of [`S3Server::env`] and no other `AWS_*` variable, set on
    /// it before or inherited (a developer's session token or profile must not reach the test).
    pub fn apply_env(&self, cmd: &mut Command) {
        let inherited = std::env::vars_os().map(|(key, _)| key);
        let set: Vec<_> = cmd.get_envs().map(|(key, _)| key.to_owned()).collect();
        for key in inherited.chain(set) {
            if key.to_str().is_some_and(|k| k.starts_with("AWS_")) {
                cmd.env_remove(key);
            }
        }
        cmd.envs(self.env());
    }

    /// Kills the server (SIGKILL: connections drop mid-request, nothing is flushed) and
    /// reaps it. The data stays in the root directory.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().context("killing s3s-fs")?;
            child.wait().context("reaping s3s-fs")?;
        }
        Ok(())
    }

    /// Freezes the server (SIGSTOP): connections are still accepted by the kernel but no
    /// request is answered, as with a server that hangs. [`S3Server::resume`] undoes it.
    pub fn pause(&self) -> Result<()> {
        self.signal(libc::SIGSTOP)
    }

    /// Lets a paused server go on (SIGCONT).
    pub fn resume(&self) -> Result<()> {
        self.signal(libc::SIGCONT)
    }

    fn signal(&self, signal: libc::c_int) -> Result<()> {
        let child = self.child.as_ref().context("s3s-fs is not running")?;
        let pid = libc::pid_t::try_from(child.id())?;
        // SAFETY: kill(2) takes plain integers; the pid is our unreaped child's, so it is not
        // reused by another process.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(std::io::Error::last_os_error()).context("signalling s3s-fs");
        }
        Ok(())
    }

    /// Starts the server again on the same port and root (stopping it first if it runs).
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.spawn(self.port)
    }

    /// How many parts of multipart uploads neither completed nor aborted are on the server.
    pub fn orphan_parts(&self) -> Result<usize> {
        self.count_root_files(|name| name.starts_with(".upload_id-") && name.contains(".part-"))
    }

    /// How many multipart uploads are open (created, neither completed nor aborted),
    /// including those that have no part yet.
    pub fn open_uploads(&self) -> Result<usize> {
        self.count_root_files(|name| name.starts_with(".upload-") && name.ends_with(".json"))
    }

    /// The keys of the objects in the bucket, sorted, read from the root directory (what is
    /// left behind, without asking the server).
    pub fn keys(&self) -> Result<Vec<String>> {
        let bucket = self.root.join(BUCKET);
        let mut keys = Vec::new();
        let mut dirs = vec![bucket.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in
                std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?
            {
                let path = entry?.path();
                if path.is_dir() {
                    dirs.push(path);
                } else {
                    let key = path
                        .strip_prefix(&bucket)?
                        .to_str()
                        .context("non-UTF-8 key")?;
                    keys.push(key.to_string());
                }
            }
        }
        keys.sort();
        Ok(keys)
    }

    /// What s3s-fs logged so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn count_root_files(&self, wanted: impl Fn(&str) -> bool) -> Result<usize> {
        let mut n = 0;
        for entry in std::fs::read_dir(&self.root)
            .with_context(|| format!("listing {}", self.root.display()))?
        {
            if entry?.file_name().to_str().is_some_and(&wanted) {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Spawns s3s-fs on `port` (0: any) and waits until it listens; sets `self.port`.
    fn spawn(&mut self, port: u16) -> Result<()> {
        let log = File::create(&self.log_path)?;
        let mut child = Command::new(S3S_FS)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&self.root)
            .env("RUST_LOG", "s3s_fs=info,s3s=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {S3S_FS}"))?;
        let ready = self.wait_until_listening(&mut child);
        match ready {
            Ok(bound) => {
                self.port = bound;
                self.child = Some(child);
                Ok(())
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e.context(format!("{S3S_FS} did not start; its log:\n{}", self.log())))
            }
        }
    }

    /// Polls the log for the address line, bounded by [`READY_TIMEOUT`]; returns the port.
    fn wait_until_listening(&self, child: &mut Child) -> Result<u16> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(port) = bound_port(&self.log()) {
                return Ok(port);
            }
            if let Some(status) = child.try_wait()? {
                bail!("{S3S_FS} exited with {status}");
            }
            if Instant::now() > deadline {
                bail!("{S3S_FS} not listening after {READY_TIMEOUT:?}");
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// The port in s3s-fs's "server is running at http://127.0.0.1:PORT" line, once the whole
/// line is logged (a line cut short would give a wrong port).
fn bound_port(log: &str) -> Option<u16> {
    let rest = &log[log.find(READY_LINE)? + READY_LINE.len()..];
    let (line, _) = rest.split_once('\n')?;
    let addr: std::net::SocketAddr = line.trim().parse().ok()?;
    Some(addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_port_reads_the_address_line() {
        let log = "  2026-11-30T03:30:00Z  INFO s3s_fs: server is running at http://127.0.0.1:41234\n    at src/main.rs:140\n";
        assert_eq!(bound_port(log), Some(41234));
        assert_eq!(
            bound_port("  INFO s3s_fs: authentication is enabled\n"),
            None
        );
        assert_eq!(bound_port("server is running at http://127.0.0.1:"), None);
        assert_eq!(
            bound_port("server is running at http://127.0.0.1:412"),
            None
        );
    }
}
