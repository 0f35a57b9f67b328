//! Against the XenServer-profile NBD server (TLS 1.2 + secp384r1 only, EXPORT_NAME only,
//! simple replies in order, 16 connections at most): chains, the connection limit, and
//! faults (a cut mid-reply, a stall, a permanent read error). The certificate is trusted the
//! way `get_nbd_info` hands it out: exactly that leaf (`--tls-cert`).

mod common;

use cbtstream_testkit::xen_nbd::{file_resolver, StallAt, XenNbdConfig, XenNbdServer};
use cbtstream_testkit::*;
use common::*;
use std::path::PathBuf;
use std::process::Output;

const SIZE: u64 = (6 << 20) + 512;
/// What get_nbd_info returns as exportname: it carries the session reference.
const EXPORT: &str = "/3f1c7a4e-1d2b-4c3d-9e8f-001122334455?session_id=OpaqueRef:5ecret-5e55ion";

struct Xen {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    img: PathBuf,
    cert: SelfSignedCert,
    server: XenNbdServer,
}

async fn xen(max_connections: usize) -> Xen {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let img = dir.join("vdi.raw");
    make_image(&img, SIZE, 21, Pattern::Mixed).unwrap();
    let cert = xapi_style_self_signed(&dir.join("xapi")).unwrap();
    let mut cfg = XenNbdConfig::new(
        &cert.cert_pem_path,
        &cert.key_pem_path,
        file_resolver(Some(EXPORT.into()), &img),
    );
    cfg.max_connections = max_connections;
    let server = XenNbdServer::start(cfg).await.unwrap();
    Xen {
        _tmp: tmp,
        dir,
        img,
        cert,
        server,
    }
}

impl Xen {
    fn uri(&self) -> String {
        format!(
            "nbds://127.0.0.1:{}/{}",
            self.server.port,
            EXPORT.replace('?', "%3F")
        )
    }

    async fn export(&self, out: &std::path::Path, extra: &[&str]) -> Output {
        let mut args: Vec<String> = [
            "export",
            "--nbd",
            &self.uri(),
            "--tls-cert",
            p(&self.cert.cert_pem_path),
            "--tls-server-name",
            "localhost",
            "-o",
            p(out),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        tokio::task::spawn_blocking(move || {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            run(&a)
        })
        .await
        .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_against_xenserver_profile() {
    let x = xen(16).await;
    let restored = x.dir.join("restored.raw");
    let full = x.dir.join("full.cbts");
    let o = ok(x
        .export(
            &full,
            &["--full", "--point-id", "s0", "--connections", "4", "-vv"],
        )
        .await);
    // Secrets stay out of the log, even at -vv.
    let log = stderr(&o);
    assert!(
        !log.contains("5ecret") && !log.contains("3f1c7a4e"),
        "secret in log: {log}"
    );
    ok(run(&["restore", "--to", p(&restored), p(&full)]));
    assert_same(&restored, &x.img);
    for i in 1..=2u64 {
        let changes = mutate_blocks(&x.img, 40 + i, 10).unwrap();
        let bmf = bitmap_file(
            &x.dir,
            "bm",
            &CbtBitmap::from_changes(&changes, SIZE).to_base64(),
        );
        let inc = x.dir.join(format!("inc{i}.cbts"));
        let (base, point) = (format!("s{}", i - 1), format!("s{i}"));
        ok(x.export(
            &inc,
            &[
                "--changed-blocks",
                p(&bmf),
                "--base-id",
                &base,
                "--point-id",
                &point,
                "--connections",
                "4",
            ],
        )
        .await);
        ok(run(&["restore", "--to", p(&restored), p(&inc)]));
        assert_same(&restored, &x.img);
    }
    // Every connection was closed (NBD_CMD_DISC), so the host could detach the snapshot.
    let f = x.server.faults.clone();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        f.wait_until(|f| f.connections_closed() == f.connections_opened()),
    )
    .await
    .expect("connections left open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_is_respected() {
    let x = xen(2).await;
    let out = x.dir.join("full.cbts");
    let o = ok(x
        .export(&out, &["--full", "--connections", "8", "--json"])
        .await);
    let json: serde_json::Value = serde_json::from_str(stderr(&o).lines().last().unwrap()).unwrap();
    // Extra connections open while the first one reads, so a small export may finish with
    // fewer; never more than the server allows.
    let used = json["connections"].as_u64().unwrap();
    assert!((1..=2).contains(&used), "{used} connections");
    let restored = x.dir.join("r.raw");
    ok(run(&["restore", "--to", p(&restored), p(&out)]));
    assert_same(&restored, &x.img);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cut_mid_reply_is_retried() {
    let x = xen(16).await;
    x.server.faults.cut_next_read_after(1000);
    let out = x.dir.join("full.cbts");
    ok(x.export(&out, &["--full", "--connections", "2"]).await);
    assert_eq!(x.server.faults.cuts(), 1);
    let restored = x.dir.join("r.raw");
    ok(run(&["restore", "--to", p(&restored), p(&out)]));
    assert_same(&restored, &x.img);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_server_times_out_and_recovers() {
    let x = xen(16).await;
    x.server.faults.stall(StallAt::Request(3));
    let out = x.dir.join("full.cbts");
    ok(x.export(
        &out,
        &["--full", "--connections", "1", "--request-timeout", "1"],
    )
    .await);
    assert_eq!(x.server.faults.stalls(), 1);
    let restored = x.dir.join("r.raw");
    ok(run(&["restore", "--to", p(&restored), p(&out)]));
    assert_same(&restored, &x.img);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_error_fails_with_offset() {
    let x = xen(16).await;
    x.server.faults.fail_reads(2 << 20..(2 << 20) + 512, None);
    let out = x.dir.join("full.cbts");
    let o = x
        .export(&out, &["--full", "--retries", "2", "--request-size", "64"])
        .await;
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("at offset {}", 2 << 20)),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_export_is_a_clear_error() {
    let x = xen(16).await;
    let out = x.dir.join("full.cbts");
    let uri = format!("nbds://127.0.0.1:{}/wrong", x.server.port);
    let o = tokio::task::spawn_blocking(move || {
        run(&[
            "export",
            "--nbd",
            &uri,
            "--tls-cert",
            p(&x.cert.cert_pem_path),
            "--tls-server-name",
            "localhost",
            "--full",
            "-o",
            p(&out),
        ])
    })
    .await
    .unwrap();
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("unknown export or invalid session"),
        "{}",
        stderr(&o)
    );
}

/// The reader of stdout goes away (`| head -c 1000`): the export fails with the output exit
/// code and stops reading instead of pulling the rest of the disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_output_pipe_stops_the_export() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("big.raw");
    // 64 MiB of random data: 1024 reads of 64 KiB, far more than the bytes-in-flight budget.
    make_image(&img, 64 << 20, 5, Pattern::Random).unwrap();
    let cert = xapi_style_self_signed(&tmp.path().join("xapi")).unwrap();
    let server = XenNbdServer::start(XenNbdConfig::new(
        &cert.cert_pem_path,
        &cert.key_pem_path,
        file_resolver(None, &img),
    ))
    .await
    .unwrap();
    let uri = format!("nbds://127.0.0.1:{}/disk", server.port);
    let certp = cert.cert_pem_path.clone();
    let (status, err) = tokio::task::spawn_blocking(move || {
        let mut exp = std::process::Command::new(BIN)
            .args([
                "export",
                "--nbd",
                &uri,
                "--tls-cert",
                p(&certp),
                "--tls-server-name",
                "localhost",
            ])
            .args([
                "--full",
                "--compress",
                "none",
                "--request-size",
                "64",
                "-o",
                "-",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = exp.stdout.take().unwrap();
        let mut first = vec![0u8; 1000];
        std::io::Read::read_exact(&mut out, &mut first).unwrap();
        drop(out);
        let o = exp.wait_with_output().unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    })
    .await
    .unwrap();
    assert_eq!(status, Some(5), "{err}");
    assert!(
        err.contains("Broken pipe") || err.contains("broken pipe"),
        "{err}"
    );
    let reads = server.faults.reads_ok();
    assert!(
        reads < 1024,
        "the export went on reading after the output closed: {reads} reads"
    );
}

/// SIGTERM in the middle of an export: exit 130, no output under the final name, and no
/// partial file left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_export_leaves_nothing() {
    let x = xen(16).await;
    x.server.faults.stall(StallAt::Request(2));
    let out = x.dir.join("full.cbts");
    let child = std::process::Command::new(BIN)
        .args([
            "export",
            "--nbd",
            &x.uri(),
            "--tls-cert",
            p(&x.cert.cert_pem_path),
            "--tls-server-name",
            "localhost",
        ])
        .args(["--full", "--connections", "1", "-o", p(&out)])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The export is certainly under way once the server holds its second request.
    let f = x.server.faults.clone();
    tokio::time::timeout(
        std::time::Duration::from_secs(20),
        f.wait_until(|f| f.stalls() == 1),
    )
    .await
    .expect("the export never reached the server");
    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let o = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("SIGTERM"));
    assert!(!out.exists());
    assert!(!x.dir.join("full.cbts.partial").exists());
}

/// XenServer's self-signed certificate (no basicConstraints) given as a CA file is accepted as
/// its own trust anchor; a pin of it works too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_signed_leaf_works_as_ca_and_pin() {
    let x = xen(16).await;
    let out = x.dir.join("full.cbts");
    let (uri, cert, outp) = (x.uri(), x.cert.cert_pem_path.clone(), out.clone());
    std::fs::write(x.dir.join("cert.der"), &x.cert.cert_der).unwrap();
    let o = std::process::Command::new("sha256sum")
        .arg(x.dir.join("cert.der"))
        .output()
        .unwrap();
    let pin = String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    tokio::task::spawn_blocking(move || {
        ok(run(&[
            "export",
            "--nbd",
            &uri,
            "--tls-ca",
            p(&cert),
            "--tls-server-name",
            "localhost",
            "--full",
            "-o",
            p(&outp),
        ]));
        ok(run(&[
            "export",
            "--nbd",
            &uri,
            "--tls-pin",
            &pin,
            "--full",
            "-o",
            p(&outp),
        ]));
    })
    .await
    .unwrap();
    let restored = x.dir.join("r.raw");
    ok(run(&["restore", "--to", p(&restored), p(&out)]));
    assert_same(&restored, &x.img);
}
