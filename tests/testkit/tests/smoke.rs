//! Smoke tests of the fixtures against the real tools (qemu-nbd, nbdkit, nbdinfo, nbdcopy).
//! A missing tool fails the test (see `require_tools`).

use std::path::Path;
use std::process::Command;

use cbtstream_testkit::images::expected_block;
use cbtstream_testkit::*;

const SIZE: u64 = 4 << 20;

/// `nbdinfo --size URI`; Ok(size) or Err(stderr).
fn nbdinfo_size(uri: &str) -> Result<u64, String> {
    let out = Command::new("nbdinfo")
        .args(["--size", uri])
        .output()
        .expect("running nbdinfo");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let s = String::from_utf8_lossy(&out.stdout);
    s.trim()
        .parse()
        .map_err(|e| format!("bad nbdinfo output {s:?}: {e}"))
}

fn setup(dir: &Path) -> (TestPki, std::path::PathBuf) {
    let pki = TestPki::generate(&dir.join("pki")).unwrap();
    let img = dir.join("disk.raw");
    make_image(&img, SIZE, 1, Pattern::Mixed).unwrap();
    (pki, img)
}

#[test]
fn tls_and_plain_servers_report_size() {
    if !require_tools(
        "tls_and_plain_servers_report_size",
        &["qemu-nbd", "nbdkit", "nbdinfo"],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (pki, img) = setup(tmp.path());
    let other = TestPki::generate(&tmp.path().join("other-pki")).unwrap();

    let servers = [
        NbdServer::qemu_nbd(&img, Some(&pki), QemuOpts::default()).unwrap(),
        NbdServer::qemu_nbd(&img, None, QemuOpts::default()).unwrap(),
        NbdServer::nbdkit(&img, Some(&pki), NbdKitOpts::default()).unwrap(),
        NbdServer::nbdkit(&img, None, NbdKitOpts::default()).unwrap(),
    ];
    for s in &servers {
        let uri = if s.tls {
            assert!(s.uri().starts_with("nbds://127.0.0.1:"), "{}", s.uri());
            s.uri_with_certs(&pki.dir)
        } else {
            assert!(s.uri().starts_with("nbd://127.0.0.1:"), "{}", s.uri());
            s.uri()
        };
        assert_eq!(s.export, "disk");
        assert_eq!(
            nbdinfo_size(&uri).unwrap_or_else(|e| panic!(
                "{:?} {uri}: {e}\nserver log:\n{}",
                s.kind,
                s.stderr_contents()
            )),
            SIZE,
            "{:?} {uri}",
            s.kind
        );
        if s.tls {
            // Verification is real: a different CA must be rejected.
            let bad = s.uri_with_certs(&other.dir);
            let err = nbdinfo_size(&bad).expect_err("a foreign CA must not verify");
            assert!(err.contains("certificate verification"), "{err}");
            // A TLS-only server refuses plaintext clients.
            let plain = s.uri().replacen("nbds://", "nbd://", 1);
            assert!(
                nbdinfo_size(&plain).is_err(),
                "{:?} accepted plaintext",
                s.kind
            );
        }
    }
}

#[test]
fn qemu_mutual_tls_needs_client_cert() {
    if !require_tools(
        "qemu_mutual_tls_needs_client_cert",
        &["qemu-nbd", "nbdinfo"],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (pki, img) = setup(tmp.path());
    let s = NbdServer::qemu_nbd(
        &img,
        Some(&pki),
        QemuOpts {
            verify_peer: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(nbdinfo_size(&s.uri_with_certs(&pki.dir)).is_err());
    assert_eq!(
        nbdinfo_size(&s.uri_with_certs(&pki.client_dir)).unwrap(),
        SIZE
    );
}

#[test]
fn nbdkit_serves_xapi_style_cert_and_filters() {
    if !require_tools(
        "nbdkit_serves_xapi_style_cert_and_filters",
        &["nbdkit", "nbdinfo", "openssl", "nbdcopy"],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (_pki, img) = setup(tmp.path());
    let x = xapi_style_self_signed(&tmp.path().join("xapi")).unwrap();
    assert!(x.is_rsa, "openssl is installed but the key is not RSA");
    let opts = NbdKitOpts::new().filter("delay").param("delay-read=1ms");
    let s = NbdServer::nbdkit_tls_dir(&img, Some(&x.dir), opts).unwrap();
    assert_eq!(nbdinfo_size(&s.uri_with_certs(&x.dir)).unwrap(), SIZE);

    let opts = NbdKitOpts::from_args(&["error", "error-rate=1", "error=EIO"]);
    assert_eq!(opts.filters, vec!["error"]);
    assert_eq!(opts.params, vec!["error-rate=1", "error=EIO"]);
    let s = NbdServer::nbdkit(&img, None, opts).unwrap();
    // The handshake is unaffected by the error filter ...
    assert_eq!(nbdinfo_size(&s.uri()).unwrap(), SIZE);
    // ... but every read fails.
    let st = Command::new("nbdcopy")
        .args([&s.uri(), "null:"])
        .output()
        .unwrap();
    assert!(!st.status.success(), "reads through error-rate=1 succeeded");
}

#[test]
fn tls_content_matches_image() {
    if !require_tools(
        "tls_content_matches_image",
        &["qemu-nbd", "nbdkit", "nbdcopy"],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (pki, img) = setup(tmp.path());
    let changes = mutate_blocks(&img, 5, 12).unwrap();
    let want = std::fs::read(&img).unwrap();
    // Mutations changed exactly the blocks in the bitmap.
    let bm = CbtBitmap::from_changes(&changes, SIZE);
    for b in 0..bm.blocks() {
        let s = (b * BLOCK) as usize;
        let orig = expected_block(SIZE, 1, Pattern::Mixed, b);
        assert_eq!(
            want[s..s + BLOCK as usize] != orig[..],
            bm.is_set(b),
            "block {b}"
        );
    }
    assert_eq!(changed_bitmap_base64(&changes, SIZE), bm.to_base64());
    assert_eq!(bm.to_base64().len(), 12); // 64 blocks -> 8 bytes -> 12 base64 chars

    for (i, s) in [
        NbdServer::qemu_nbd(&img, Some(&pki), QemuOpts::default()).unwrap(),
        NbdServer::nbdkit(&img, Some(&pki), NbdKitOpts::default()).unwrap(),
    ]
    .iter()
    .enumerate()
    {
        let out = tmp.path().join(format!("copy{i}.raw"));
        let o = Command::new("nbdcopy")
            .arg(s.uri_with_certs(&pki.dir))
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(
            std::fs::read(&out).unwrap() == want,
            "{:?} served other data",
            s.kind
        );
    }
}

#[test]
fn start_failure_reports_stderr_and_drop_kills() {
    if !require_tools(
        "start_failure_reports_stderr_and_drop_kills",
        &["qemu-nbd", "nbdkit"],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-image.raw");
    let err = NbdServer::qemu_nbd(&missing, None, QemuOpts::default()).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("no-such-image.raw") && msg.contains("stderr"),
        "{msg}"
    );
    let err = NbdServer::nbdkit(&missing, None, NbdKitOpts::default()).unwrap_err();
    assert!(format!("{err:#}").contains("no-such-image.raw"), "{err:#}");

    let (_pki, img) = setup(tmp.path());
    let mut s = NbdServer::nbdkit(&img, None, NbdKitOpts::default()).unwrap();
    assert!(s.is_running());
    let (pid, addr) = (s.pid(), s.addr());
    drop(s);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "server {pid} survived drop"
    );
    assert!(std::net::TcpStream::connect(addr).is_err());
}

#[tokio::test]
async fn rustls_configs_handshake_with_xapi_cert() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tmp = tempfile::tempdir().unwrap();
    for (server_cfg, roots) in [
        {
            let x = xapi_style_self_signed(&tmp.path().join("xapi")).unwrap();
            (x.server_config().unwrap(), vec![x.cert_der.clone()])
        },
        {
            let pki = TestPki::generate(&tmp.path().join("pki")).unwrap();
            (pki.server_config().unwrap(), vec![pki.ca_cert_der.clone()])
        },
    ] {
        let client_cfg = rustls_client_config(&roots).unwrap();
        for name in ["localhost", "127.0.0.1"] {
            let (a, b) = tokio::io::duplex(64 * 1024);
            let acceptor = tokio_rustls::TlsAcceptor::from(server_cfg.clone());
            let srv = tokio::spawn(async move {
                let mut s = acceptor.accept(a).await.unwrap();
                s.write_all(b"NBDMAGIC").await.unwrap();
                s.shutdown().await.unwrap();
            });
            let connector = tokio_rustls::TlsConnector::from(client_cfg.clone());
            let sn = rustls::pki_types::ServerName::try_from(name).unwrap();
            let mut c = connector.connect(sn, b).await.unwrap();
            let mut buf = Vec::new();
            c.read_to_end(&mut buf).await.unwrap();
            assert_eq!(buf, b"NBDMAGIC");
            srv.await.unwrap();
        }
    }
}
