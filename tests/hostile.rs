//! Against a hostile NBD server ([`cbtstream_testkit::hostile`]): every kind of server
//! misbehaviour must make `cbtstream export` fail cleanly: exit code 3 (source), an error
//! that names the fault, no output under the final name, and in bounded time (a 30 s hang
//! detector, not a timing assertion). The server misbehaves on every connection, so the
//! client's retry and reconnect meet the fault again.

mod common;

use cbtstream_testkit::hostile::{HostileServer, Misbehaviour, ERROR_MESSAGE};
use cbtstream_testkit::TestPki;
use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SIZE: usize = 1 << 20;
/// Past this the run is considered hung and killed.
const HANG: Duration = Duration::from_secs(30);

fn image() -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..SIZE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

struct Outcome {
    code: Option<i32>,
    stderr: String,
    elapsed: Duration,
}

/// Run `cbtstream ARGS` with stderr to a file, polling for exit for up to [`HANG`].
fn run_guarded(args: &[String], dir: &Path) -> Outcome {
    let err_path = dir.join("stderr.txt");
    let err_file = std::fs::File::create(&err_path).unwrap();
    let start = Instant::now();
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("CBTSTREAM_LOG")
        .env("SOURCE_DATE_EPOCH", "1795000000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err_file)
        .spawn()
        .expect("spawning cbtstream");
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > HANG {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
            panic!("cbtstream export still running after {HANG:?} (hang); stderr:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Outcome {
        code: status.code(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
        elapsed: start.elapsed(),
    }
}

/// `export` arguments for `server`, and the trusted (wrong) PKI for the TLS case, which
/// must outlive the run.
fn export_args(server: &HostileServer, out: &Path, dir: &Path) -> (Vec<String>, Option<TestPki>) {
    let script = server.script;
    let mut args: Vec<String> = [
        "export",
        "--nbd",
        &server.uri("disk"),
        "--full",
        "-o",
        p(out),
        "--retries",
        "1",
        "--request-timeout",
        "1",
        "--connect-timeout",
        "5",
        "--request-size",
        "64",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let trusted = if script.tls() {
        // A certificate from another CA than the server's.
        let pki = TestPki::generate(&dir.join("trusted")).unwrap();
        args.extend([
            "--tls-cert".to_string(),
            p(&pki.server_cert_pem_path).to_string(),
            "--tls-server-name".to_string(),
            "localhost".to_string(),
        ]);
        Some(pki)
    } else {
        args.push("--allow-plaintext".into());
        None
    };
    (args, trusted)
}

/// Export from a server misbehaving as `script` and check the failure is clean and that
/// stderr contains every one of `expect` (case-insensitive).
async fn hostile_export(script: Misbehaviour, expect: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let server = HostileServer::start(image(), script).await.unwrap();
    let out = dir.join("out.cbts");
    let (args, _trusted) = export_args(&server, &out, &dir);
    let run_dir = dir.clone();
    let o = tokio::task::spawn_blocking(move || run_guarded(&args, &run_dir))
        .await
        .unwrap();
    let ctx = format!(
        "{script:?}: exit {:?} after {:?}, server saw {} connection(s), {} request(s), \
         {} fault(s); stderr:\n{}",
        o.code,
        o.elapsed,
        server.stats.connections(),
        server.stats.requests(),
        server.stats.misbehaved(),
        o.stderr
    );
    // Shown with --nocapture, and on failure.
    eprintln!("{ctx}");
    assert!(!o.stderr.contains("panicked"), "panic: {ctx}");
    assert_eq!(o.code, Some(3), "wrong exit code: {ctx}");
    let lower = o.stderr.to_lowercase();
    for word in expect {
        assert!(
            lower.contains(&word.to_lowercase()),
            "stderr does not say {word:?}: {ctx}"
        );
    }
    // Nothing but the test's own files: no output, no `.partial`.
    let mut left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    let mut expected = vec!["stderr.txt"];
    if script.tls() {
        expected.push("trusted");
    }
    assert_eq!(left, expected, "files left in the output directory: {ctx}");
    assert!(
        server.stats.misbehaved() > 0,
        "the fault was never sent: {ctx}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_greeting_magic() {
    hostile_export(Misbehaviour::BadGreetingMagic, &["bad greeting magic"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_reply_magic() {
    hostile_export(Misbehaviour::BadReplyMagic, &["bad reply magic 0xbadc0ffe"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_cookie() {
    hostile_export(Misbehaviour::UnknownCookie, &["unknown cookie"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_payload_short() {
    hostile_export(Misbehaviour::SimplePayloadShort, &["closed the connection"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_longer_than_request() {
    hostile_export(Misbehaviour::ChunkLonger, &["outside the request"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_overlap() {
    hostile_export(Misbehaviour::ChunkOverlap, &["overlap"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_leave_a_gap() {
    hostile_export(Misbehaviour::ChunkGap, &["covered"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_done_flag() {
    hostile_export(Misbehaviour::MissingDone, &["no reply"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_chunk_length() {
    hostile_export(Misbehaviour::HugeLength, &["exceeds the limit"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_chunk() {
    hostile_export(
        Misbehaviour::ErrorChunk,
        &["server error", "EIO", ERROR_MESSAGE, "at offset"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_mid_reply() {
    hostile_export(Misbehaviour::StallMidReply, &["no reply"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_mid_reply() {
    hostile_export(Misbehaviour::DisconnectMidReply, &["closed"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_certificate() {
    hostile_export(Misbehaviour::WrongCertificate, &["TLS handshake"]).await;
}

/// Block status whose last extent runs 4 GiB past the request and the export: allowed by
/// the protocol, so the export must clamp it and succeed, reading the data half and
/// planning the zero half as zeroes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_status_past_range_is_clamped() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let mut img = image();
    img[SIZE / 2..].fill(0);
    let img_path = dir.join("disk.raw");
    std::fs::write(&img_path, &img).unwrap();
    let server = HostileServer::start(img, Misbehaviour::BlockStatusPastRange)
        .await
        .unwrap();
    let out = dir.join("out.cbts");
    let (mut args, _) = export_args(&server, &out, &dir);
    args.push("-v".into());
    let run_dir = dir.clone();
    let o = tokio::task::spawn_blocking(move || run_guarded(&args, &run_dir))
        .await
        .unwrap();
    let ctx = format!(
        "exit {:?} after {:?}, {} block status reply(ies); stderr:\n{}",
        o.code,
        o.elapsed,
        server.stats.misbehaved(),
        o.stderr
    );
    eprintln!("{ctx}");
    assert_eq!(o.code, Some(0), "export failed: {ctx}");
    assert!(!partial_of(&out).exists(), "{ctx}");
    assert!(
        server.stats.misbehaved() > 0,
        "no BLOCK_STATUS was asked: {ctx}"
    );
    let restored = dir.join("restored.raw");
    ok(run(&["restore", "--to", p(&restored), p(&out)]));
    assert_same(&restored, &img_path);
}
