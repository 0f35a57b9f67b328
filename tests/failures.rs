//! Failure paths: wrong trust, plaintext servers, server errors, damaged streams. Each must
//! end with the documented exit code and a message naming the fault.

mod common;

use cbtstream_testkit::*;
use common::*;
use std::path::PathBuf;

const SIZE: u64 = 4 << 20;

fn setup() -> (tempfile::TempDir, PathBuf, TestPki, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let pki = TestPki::generate(&dir.join("pki")).unwrap();
    let img = dir.join("disk.raw");
    make_image(&img, SIZE, 3, Pattern::Mixed).unwrap();
    (tmp, dir, pki, img)
}

#[test]
fn wrong_pin_is_refused() {
    if !require_tools("wrong_pin_is_refused", &["qemu-nbd"]) {
        return;
    }
    let (_t, dir, pki, img) = setup();
    let server = NbdServer::qemu_nbd(&img, Some(&pki), QemuOpts::default()).unwrap();
    let out = dir.join("x.cbts");
    let o = run(&[
        "export",
        "--nbd",
        &server.uri(),
        "--tls-pin",
        &"ab".repeat(32),
        "--full",
        "-o",
        p(&out),
    ]);
    assert_fails(&o, 3, "does not match --tls-pin");
    assert_nothing_written(&out);

    // The right pin, and the exact certificate, both work.
    let pin = {
        use std::fmt::Write;
        let d = ring::digest::digest(&ring::digest::SHA256, &pki.server_cert_der);
        d.as_ref().iter().fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    };
    ok(run(&[
        "export",
        "--nbd",
        &server.uri(),
        "--tls-pin",
        &pin,
        "--full",
        "-o",
        p(&out),
    ]));
    ok(run(&[
        "export",
        "--nbd",
        &server.uri(),
        "--tls-cert",
        p(&pki.server_cert_pem_path),
        "--full",
        "-o",
        p(&out),
    ]));
    // A CA that did not sign the server's certificate is refused.
    let other = TestPki::generate(&dir.join("other")).unwrap();
    let refused = dir.join("refused.cbts");
    let o = run(&[
        "export",
        "--nbd",
        &server.uri(),
        "--tls-ca",
        p(&other.ca_pem_path),
        "--full",
        "-o",
        p(&refused),
    ]);
    assert_fails(&o, 3, "TLS handshake");
    assert_nothing_written(&refused);
}

#[test]
fn nbds_against_plaintext_server_is_refused() {
    if !require_tools(
        "nbds_against_plaintext_server_is_refused",
        &["qemu-nbd", "nbdkit"],
    ) {
        return;
    }
    let (_t, dir, pki, img) = setup();
    let out = dir.join("x.cbts");
    let refused = dir.join("refused.cbts");
    for server in [
        NbdServer::qemu_nbd(&img, None, QemuOpts::default()).unwrap(),
        NbdServer::nbdkit(&img, None, NbdKitOpts::default()).unwrap(),
    ] {
        let tls_uri = server.uri().replacen("nbd://", "nbds://", 1);
        let o = run(&[
            "export",
            "--nbd",
            &tls_uri,
            "--tls-ca",
            p(&pki.ca_pem_path),
            "--full",
            "-o",
            p(&refused),
        ]);
        assert_fails(&o, 3, "does not support TLS");
        assert_nothing_written(&refused);
        // Plaintext needs a flag that says so.
        let o = run(&[
            "export",
            "--nbd",
            &server.uri(),
            "--full",
            "-o",
            p(&refused),
        ]);
        assert_fails(
            &o,
            2,
            "unencrypted over the network; use nbds:// (TLS), or pass --allow-plaintext",
        );
        assert_nothing_written(&refused);
        ok(run(&[
            "export",
            "--nbd",
            &server.uri(),
            "--allow-plaintext",
            "--full",
            "-o",
            p(&out),
        ]));
    }
    // And a TLS-only server refuses a plaintext client.
    let server = NbdServer::qemu_nbd(&img, Some(&pki), QemuOpts::default()).unwrap();
    let plain = server.uri().replacen("nbds://", "nbd://", 1);
    let o = run(&[
        "export",
        "--nbd",
        &plain,
        "--allow-plaintext",
        "--full",
        "-o",
        p(&refused),
    ]);
    assert_fails(&o, 3, "requires TLS");
    assert_nothing_written(&refused);
}

#[test]
fn permanent_read_error_names_the_offset() {
    if !require_tools("permanent_read_error_names_the_offset", &["nbdkit"]) {
        return;
    }
    let (_t, dir, pki, img) = setup();
    let server = NbdServer::nbdkit(
        &img,
        Some(&pki),
        NbdKitOpts::from_args(&["error", "error-pread-rate=1", "error-pread=EIO"]),
    )
    .unwrap();
    let out = dir.join("x.cbts");
    let o = export_tls(
        &server.uri(),
        &pki.ca_pem_path,
        &out,
        &["--full", "--retries", "2"],
    );
    assert_fails(&o, 3, "at offset");
    assert_fails(&o, 3, "EIO");
    assert_fails(&o, 3, "3 attempt(s)");
    assert_nothing_written(&out);
}

#[test]
fn transient_read_errors_are_retried() {
    if !require_tools("transient_read_errors_are_retried", &["nbdkit"]) {
        return;
    }
    let (_t, dir, pki, img) = setup();
    let server = NbdServer::nbdkit(
        &img,
        Some(&pki),
        NbdKitOpts::from_args(&["error", "error-pread-rate=0.2", "error-pread=EIO"]),
    )
    .unwrap();
    let out = dir.join("x.cbts");
    let restored = dir.join("r.raw");
    let o = ok(export_tls(
        &server.uri(),
        &pki.ca_pem_path,
        &out,
        &["--full", "--retries", "12", "--request-size", "64"],
    ));
    // The filter did fail reads (about 1 in 5 of some 40), and they were retried.
    assert!(stderr(&o).contains("retrying"), "{}", stderr(&o));
    ok(run(&["restore", "--to", p(&restored), p(&out)]));
    assert_same(&restored, &img);
}

#[test]
fn bad_bitmaps_are_refused() {
    if !require_tools("bad_bitmaps_are_refused", &["qemu-nbd"]) {
        return;
    }
    let (_t, dir, pki, img) = setup();
    let server = NbdServer::qemu_nbd(&img, Some(&pki), QemuOpts::default()).unwrap();
    let out = dir.join("x.cbts");
    let blocks = SIZE / 65536;
    let cases = [
        (
            "not base64!!",
            "the changed-block bitmap is not valid base64",
        ),
        // One byte short.
        (
            "AAAAAAAAAA==",
            "the changed-block bitmap has 7 bytes but a disk of 4194304 bytes needs 8",
        ),
    ];
    for (b64, want) in cases {
        let bm = bitmap_file(&dir, "bm", b64);
        let o = export_tls(
            &server.uri(),
            &pki.ca_pem_path,
            &out,
            &["--changed-blocks", p(&bm)],
        );
        assert_fails(&o, 2, want);
        assert_nothing_written(&out);
    }
    // A bit past the end of the disk.
    let mut bytes = vec![0u8; (blocks as usize).div_ceil(8) + 1];
    bytes[blocks as usize / 8] = 0x80;
    let bm = bitmap_file(&dir, "bm", &cbtstream_proto_b64(&bytes));
    let o = export_tls(
        &server.uri(),
        &pki.ca_pem_path,
        &out,
        &["--changed-blocks", p(&bm)],
    );
    assert_fails(
        &o,
        2,
        "the changed-block bitmap marks block 64 changed, past the end of the 4194304-byte disk",
    );
    assert_nothing_written(&out);
}

fn cbtstream_proto_b64(bytes: &[u8]) -> String {
    cbtstream_proto::cbt::encode_base64(bytes)
}

/// Truncated and altered streams are refused by inspect and restore (exit 4, naming the
/// stream). A restore refused in the header leaves no image; one refused later leaves the
/// image marked as being applied, so an incremental onto it is refused.
#[test]
fn damaged_streams_are_refused() {
    if !require_tools("damaged_streams_are_refused", &["qemu-nbd"]) {
        return;
    }
    let (_t, dir, pki, img) = setup();
    let server = NbdServer::qemu_nbd(&img, Some(&pki), QemuOpts::default()).unwrap();
    let good = dir.join("good.cbts");
    ok(export_tls(
        &server.uri(),
        &pki.ca_pem_path,
        &good,
        &["--full", "--point-id", "p0"],
    ));
    let inc = dir.join("inc.cbts");
    let bm = bitmap_file(&dir, "empty", &CbtBitmap::empty(SIZE).to_base64());
    ok(export_tls(
        &server.uri(),
        &pki.ca_pem_path,
        &inc,
        &["--changed-blocks", p(&bm), "--base-id", "p0"],
    ));
    let bytes = std::fs::read(&good).unwrap();
    // header_len, at byte 12 (docs/FORMAT.md).
    let header_len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    let mut prng = Prng::new(99);
    let mut positions: Vec<usize> = (0..12)
        .map(|_| prng.below(bytes.len() as u64) as usize)
        .collect();
    positions.extend([
        0,
        10,
        header_len - 1,
        header_len,
        bytes.len() - 1,
        bytes.len() - 50,
    ]);
    for &pos in &positions {
        let mut flipped = bytes.clone();
        flipped[pos] ^= 0x40;
        for (damage, stream, want) in [
            ("cut", &bytes[..pos], "stream truncated"),
            ("flip", &flipped[..], ""),
        ] {
            let name = format!("{damage}{pos}");
            let bad = dir.join(format!("{name}.cbts"));
            std::fs::write(&bad, stream).unwrap();
            let named = format!("cbtstream: error: {}: {want}", p(&bad));
            assert_fails(&run(&["inspect", p(&bad)]), 4, &named);
            let target = dir.join(format!("{name}.raw"));
            let o = run(&["restore", "--to", p(&target), p(&bad)]);
            assert_fails(&o, 4, &named);
            // A full stream is restored into IMAGE.partial and renamed only once verified:
            // a damaged one leaves no image, no sidecar and no partial file.
            assert_no_image(&target);
            assert!(!partial_of(&target).exists(), "{name}: partial left");
            let onto = run(&["restore", "--to", p(&target), p(&inc)]);
            assert_fails(&onto, 4, "does not exist");
        }
    }
}

#[test]
fn chain_mistakes_are_refused() {
    if !require_tools("chain_mistakes_are_refused", &["qemu-nbd"]) {
        return;
    }
    let (_t, dir, pki, img) = setup();
    let server = NbdServer::qemu_nbd(&img, Some(&pki), QemuOpts::default()).unwrap();
    let full = dir.join("full.cbts");
    ok(export_tls(
        &server.uri(),
        &pki.ca_pem_path,
        &full,
        &["--full", "--point-id", "p0"],
    ));
    let bm = bitmap_file(&dir, "empty", &CbtBitmap::empty(SIZE).to_base64());
    let inc = dir.join("inc.cbts");
    ok(export_tls(
        &server.uri(),
        &pki.ca_pem_path,
        &inc,
        &[
            "--changed-blocks",
            p(&bm),
            "--base-id",
            "other",
            "--point-id",
            "p1",
        ],
    ));
    let target = dir.join("r.raw");
    // Incremental onto a missing image.
    let o = run(&["restore", "--to", p(&target), p(&inc)]);
    assert_fails(
        &o,
        4,
        "is an incremental stream and needs the image it applies to",
    );
    assert_no_image(&target);
    // Base id that does not follow on: refused before the image is touched.
    let o = run(&["restore", "--to", p(&target), p(&full), p(&inc)]);
    assert_fails(
        &o,
        4,
        "inc.cbts does not follow on: its base is point `other`, but",
    );
    assert_fails(&o, 4, "full.cbts is at point `p0`");
    assert_no_image(&target);
}

/// Neither `image` nor its sidecar exists.
#[track_caller]
fn assert_no_image(image: &std::path::Path) {
    assert!(!image.exists(), "{} was created", image.display());
    let sidecar = sidecar_of(image);
    assert!(!sidecar.exists(), "{} was created", sidecar.display());
}

/// `IMAGE.cbtstream`, the sidecar that records the image's state.
fn sidecar_of(image: &std::path::Path) -> PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(".cbtstream");
    PathBuf::from(name)
}

/// An incremental exported without --base-id applies onto any complete image, with a warning,
/// and still never onto a missing or half-restored one.
#[test]
fn incremental_without_base_applies_onto_any_image() {
    if !require_tools(
        "incremental_without_base_applies_onto_any_image",
        &["qemu-nbd"],
    ) {
        return;
    }
    let (_t, dir, pki, img) = setup();
    let server = NbdServer::qemu_nbd(&img, Some(&pki), QemuOpts::default()).unwrap();
    let full = dir.join("full.cbts");
    ok(export_tls(
        &server.uri(),
        &pki.ca_pem_path,
        &full,
        &["--full"],
    ));
    let target = dir.join("r.raw");
    ok(run(&["restore", "--to", p(&target), p(&full)]));
    let changes = mutate_blocks(&img, 5, 6).unwrap();
    let bm = bitmap_file(
        &dir,
        "bm",
        &CbtBitmap::from_changes(&changes, SIZE).to_base64(),
    );
    let inc = dir.join("inc.cbts");
    let o = ok(export_tls(
        &server.uri(),
        &pki.ca_pem_path,
        &inc,
        &["--changed-blocks", p(&bm)],
    ));
    assert!(stderr(&o).contains("without --base-id"), "{}", stderr(&o));
    let o = ok(run(&["inspect", p(&inc)]));
    assert!(String::from_utf8_lossy(&o.stdout).contains("onto any image"));
    let o = ok(run(&["restore", "--to", p(&target), p(&inc)]));
    assert!(stderr(&o).contains("without a base id"), "{}", stderr(&o));
    assert_same(&target, &img);
    let missing = dir.join("missing.raw");
    let o = run(&["restore", "--to", p(&missing), p(&inc)]);
    assert_fails(
        &o,
        4,
        "is an incremental stream and needs the image it applies to",
    );
    assert_no_image(&missing);
}

/// nbdkit's delay filter: replies slower than --request-timeout are a stall: the connection is
/// dropped and reopened, the read retried, and after the retries a clean failure naming it.
/// Replies within the timeout just make a slower, correct export.
#[test]
fn slow_server_times_out_or_succeeds() {
    if !require_tools("slow_server_times_out_or_succeeds", &["nbdkit"]) {
        return;
    }
    let (_t, dir, pki, img) = setup();
    let out = dir.join("x.cbts");
    let slow = NbdServer::nbdkit(
        &img,
        Some(&pki),
        NbdKitOpts::from_args(&["delay", "delay-read=3"]),
    )
    .unwrap();
    let o = export_tls(
        &slow.uri(),
        &pki.ca_pem_path,
        &out,
        &[
            "--full",
            "--request-timeout",
            "1",
            "--retries",
            "1",
            "--connections",
            "1",
            "--request-size",
            "1024",
        ],
    );
    assert_fails(&o, 3, "no reply");
    assert_nothing_written(&out);
    let mild = NbdServer::nbdkit(
        &img,
        Some(&pki),
        NbdKitOpts::from_args(&["delay", "delay-read=20ms"]),
    )
    .unwrap();
    ok(export_tls(
        &mild.uri(),
        &pki.ca_pem_path,
        &out,
        &["--full", "--request-timeout", "5"],
    ));
    let restored = dir.join("r.raw");
    ok(run(&["restore", "--to", p(&restored), p(&out)]));
    assert_same(&restored, &img);
}

/// The NBD server process is killed in the middle of an export: reconnecting fails, and the
/// export ends cleanly (exit 3, nothing under the final name) instead of hanging.
#[test]
fn server_killed_mid_export_fails_cleanly() {
    if !require_tools("server_killed_mid_export_fails_cleanly", &["nbdkit"]) {
        return;
    }
    let (_t, dir, pki, img) = setup();
    let server = NbdServer::nbdkit(
        &img,
        Some(&pki),
        NbdKitOpts::from_args(&["delay", "delay-read=50ms"]),
    )
    .unwrap();
    let out = dir.join("x.cbts");
    let child = std::process::Command::new(BIN)
        .args([
            "export",
            "--nbd",
            &server.uri(),
            "--tls-ca",
            p(&pki.ca_pem_path),
            "--full",
            "-o",
            p(&out),
        ])
        .args([
            "--request-size",
            "64",
            "--connections",
            "1",
            "--inflight",
            "1",
            "--retries",
            "2",
            "--connect-timeout",
            "2",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Mid-export: the partial output has started to grow (bounded wait).
    let partial = partial_of(&out);
    for _ in 0..1000 {
        if std::fs::metadata(&partial).is_ok_and(|m| m.len() > 0) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    drop(server); // SIGKILL to nbdkit
    let o = child.wait_with_output().unwrap();
    assert_fails(&o, 3, "could not reconnect to the NBD server");
    assert_nothing_written(&out);
}
