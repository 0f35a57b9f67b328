//! `export --nbd ... --to-command CMD`: the stream goes to `sh -c CMD` on its stdin; the
//! export succeeds only when CMD exits 0.

mod common;

use cbtstream_testkit::*;
use common::*;

#[test]
fn to_command_gets_the_stream_and_its_failure_fails_the_export() {
    if !require_tools("to_command_gets_the_stream", &["qemu-nbd"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = TestPki::generate(&dir.join("pki")).unwrap();
    let img = dir.join("disk.raw");
    make_image(&img, 4 << 20, 3, Pattern::Mixed).unwrap();
    let server = NbdServer::qemu_nbd(&img, Some(&pki), QemuOpts::default()).unwrap();
    let uri = server.uri();
    let ca = p(&pki.ca_pem_path);

    let stored = dir.join("stored.cbts");
    let cmd = format!("cat > {}", p(&stored));
    ok(run(&[
        "export",
        "--nbd",
        &uri,
        "--tls-ca",
        ca,
        "--full",
        "--to-command",
        &cmd,
    ]));
    let restored = dir.join("restored.raw");
    ok(run(&["restore", "--to", p(&restored), p(&stored)]));
    assert_same(&restored, &img);

    // A command that fails, or stops reading: exit 5, naming the command's failure.
    for cmd in ["cat > /dev/null; exit 7", "head -c 10 > /dev/null"] {
        let o = run(&[
            "export",
            "--nbd",
            &uri,
            "--tls-ca",
            ca,
            "--full",
            "--compress",
            "none",
            "--to-command",
            cmd,
        ]);
        assert_eq!(code(&o), 5, "{cmd}: {}", stderr(&o));
    }
    let o = run(&[
        "export",
        "--nbd",
        &uri,
        "--tls-ca",
        ca,
        "--full",
        "--to-command",
        "exit 7",
    ]);
    assert_eq!(code(&o), 5, "{}", stderr(&o));
    assert!(stderr(&o).contains("exit status: 7"), "{}", stderr(&o));
}
