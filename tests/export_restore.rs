//! End-to-end: export from real NBD servers over TLS (qemu-nbd, nbdkit), restore, compare
//! byte for byte; chains of incrementals; bitmaps of every shape; 1 and 4 connections.

mod common;

use cbtstream_testkit::*;
use common::*;
use std::path::{Path, PathBuf};

/// 8 MiB plus three sectors: a multiple of 512 but not of 64 KiB, as XenServer sizes can be.
const SIZE: u64 = (8 << 20) + 3 * 512;

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    pki: TestPki,
    img: PathBuf,
}

fn fixture(seed: u64) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let pki = TestPki::generate(&dir.join("pki")).unwrap();
    let img = dir.join("disk.raw");
    make_image(&img, SIZE, seed, Pattern::Mixed).unwrap();
    Fixture {
        _tmp: tmp,
        dir,
        pki,
        img,
    }
}

fn export(server: &NbdServer, pki: &TestPki, out: &Path, extra: &[&str]) -> std::process::Output {
    export_tls(&server.uri(), &pki.ca_pem_path, out, extra)
}

/// Full export, then three incrementals with random writes in between, each restored and
/// compared; with `conns` connections.
fn chain(kind: ServerKind, conns: &str) {
    let f = fixture(7);
    let server = match kind {
        ServerKind::QemuNbd => {
            NbdServer::qemu_nbd(&f.img, Some(&f.pki), QemuOpts::default()).unwrap()
        }
        _ => NbdServer::nbdkit(&f.img, Some(&f.pki), NbdKitOpts::default()).unwrap(),
    };
    let restored = f.dir.join("restored.raw");
    let full = f.dir.join("full.cbts");
    ok(export(
        &server,
        &f.pki,
        &full,
        &["--full", "--point-id", "p0", "--connections", conns],
    ));
    ok(run(&["restore", "--to", p(&restored), p(&full)]));
    assert_same(&restored, &f.img);
    for i in 1..=3u64 {
        let changes = mutate_blocks(&f.img, 100 + i, 12).unwrap();
        let mut bm = CbtBitmap::from_changes(&changes, SIZE);
        // The last, partial block too.
        let last = bm.blocks() - 1;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&f.img)
            .and_then(|file| {
                std::os::unix::fs::FileExt::write_all_at(&file, &[0xa5; 100], SIZE - 100)
            })
            .unwrap();
        bm.set(last);
        let bmf = bitmap_file(&f.dir, &format!("bm{i}"), &bm.to_base64());
        let inc = f.dir.join(format!("inc{i}.cbts"));
        let (base, point) = (format!("p{}", i - 1), format!("p{i}"));
        ok(export(
            &server,
            &f.pki,
            &inc,
            &[
                "--changed-blocks",
                p(&bmf),
                "--base-id",
                &base,
                "--point-id",
                &point,
                "--connections",
                conns,
            ],
        ));
        ok(run(&["restore", "--to", p(&restored), p(&inc)]));
        assert_same(&restored, &f.img);
    }
    // The whole chain again, onto a fresh image, in one command.
    let again = f.dir.join("again.raw");
    let streams: Vec<String> = ["full", "inc1", "inc2", "inc3"]
        .iter()
        .map(|n| p(&f.dir.join(format!("{n}.cbts"))).to_string())
        .collect();
    let mut args = vec!["restore", "--to", p(&again)];
    args.extend(streams.iter().map(String::as_str));
    ok(run(&args));
    assert_same(&again, &f.img);
}

#[test]
fn chain_qemu_nbd_one_connection() {
    if require_tools("chain_qemu_nbd_one_connection", &["qemu-nbd"]) {
        chain(ServerKind::QemuNbd, "1");
    }
}

#[test]
fn chain_qemu_nbd_four_connections() {
    if require_tools("chain_qemu_nbd_four_connections", &["qemu-nbd"]) {
        chain(ServerKind::QemuNbd, "4");
    }
}

#[test]
fn chain_nbdkit_one_connection() {
    if require_tools("chain_nbdkit_one_connection", &["nbdkit"]) {
        chain(ServerKind::NbdKit, "1");
    }
}

#[test]
fn chain_nbdkit_four_connections() {
    if require_tools("chain_nbdkit_four_connections", &["nbdkit"]) {
        chain(ServerKind::NbdKit, "4");
    }
}

/// Empty, all-ones and random bitmaps (a superset of what changed), against both servers.
#[test]
fn bitmap_shapes() {
    if !require_tools("bitmap_shapes", &["qemu-nbd", "nbdkit"]) {
        return;
    }
    let f = fixture(11);
    let servers = [
        NbdServer::qemu_nbd(&f.img, Some(&f.pki), QemuOpts::default()).unwrap(),
        NbdServer::nbdkit(&f.img, Some(&f.pki), NbdKitOpts::default()).unwrap(),
    ];
    let restored = f.dir.join("restored.raw");
    for (n, server) in servers.iter().enumerate() {
        let full = f.dir.join(format!("full{n}.cbts"));
        ok(export(
            server,
            &f.pki,
            &full,
            &["--full", "--point-id", "base"],
        ));
        ok(run(&["restore", "--to", p(&restored), p(&full)]));
        assert_same(&restored, &f.img);

        // Empty bitmap: nothing to read, a valid stream with no records.
        let empty = bitmap_file(&f.dir, "empty", &CbtBitmap::empty(SIZE).to_base64());
        let out = f.dir.join(format!("empty{n}.cbts"));
        ok(export(
            server,
            &f.pki,
            &out,
            &[
                "--changed-blocks",
                p(&empty),
                "--base-id",
                "base",
                "--point-id",
                "e",
            ],
        ));
        assert_eq!(inspect_number(&out, "records"), 0);
        ok(run(&["restore", "--to", p(&restored), p(&out)]));
        assert_same(&restored, &f.img);

        // Random superset of the real changes.
        let changes = mutate_blocks(&f.img, 200 + n as u64, 8).unwrap();
        let mut bm = CbtBitmap::random(SIZE, 300 + n as u64, 0.3);
        for b in CbtBitmap::from_changes(&changes, SIZE).set_blocks() {
            bm.set(b);
        }
        let bmf = bitmap_file(&f.dir, "random", &bm.to_base64());
        let out = f.dir.join(format!("random{n}.cbts"));
        ok(export(
            server,
            &f.pki,
            &out,
            &[
                "--changed-blocks",
                p(&bmf),
                "--base-id",
                "e",
                "--point-id",
                "r",
                "--request-size",
                "256",
            ],
        ));
        ok(run(&["restore", "--to", p(&restored), p(&out)]));
        assert_same(&restored, &f.img);

        // All ones: every block, the last one partial.
        let mut all = CbtBitmap::empty(SIZE);
        for b in 0..all.blocks() {
            all.set(b);
        }
        let bmf = bitmap_file(&f.dir, "all", &all.to_base64());
        let out = f.dir.join(format!("all{n}.cbts"));
        ok(export(
            server,
            &f.pki,
            &out,
            &[
                "--changed-blocks",
                p(&bmf),
                "--base-id",
                "r",
                "--point-id",
                "a",
                "--compress",
                "none",
            ],
        ));
        ok(run(&["restore", "--to", p(&restored), p(&out)]));
        assert_same(&restored, &f.img);
    }
}

/// The same disk gives the same bytes whatever the connection count and parallelism.
#[test]
fn output_is_deterministic() {
    if !require_tools("output_is_deterministic", &["qemu-nbd"]) {
        return;
    }
    let f = fixture(13);
    let server = NbdServer::qemu_nbd(&f.img, Some(&f.pki), QemuOpts::default()).unwrap();
    let a = f.dir.join("a.cbts");
    let b = f.dir.join("b.cbts");
    ok(export(
        &server,
        &f.pki,
        &a,
        &[
            "--full",
            "--point-id",
            "x",
            "--connections",
            "1",
            "--inflight",
            "1",
            "--threads",
            "1",
        ],
    ));
    ok(export(
        &server,
        &f.pki,
        &b,
        &[
            "--full",
            "--point-id",
            "x",
            "--connections",
            "4",
            "--inflight",
            "64",
            "--threads",
            "3",
        ],
    ));
    assert_same(&a, &b);
}

/// A pipe from export into restore; the `--json` summary counts the bytes that went
/// through the pipe.
#[test]
fn export_pipes_into_restore() {
    if !require_tools("export_pipes_into_restore", &["qemu-nbd"]) {
        return;
    }
    let f = fixture(17);
    let server = NbdServer::qemu_nbd(&f.img, Some(&f.pki), QemuOpts::default()).unwrap();
    let restored = f.dir.join("restored.raw");
    let mut exp = std::process::Command::new(BIN)
        .args([
            "export",
            "--nbd",
            &server.uri(),
            "--tls-ca",
            p(&f.pki.ca_pem_path),
            "--full",
            "-o",
            "-",
            "--json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut res = std::process::Command::new(BIN)
        .args(["restore", "--to", p(&restored), "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Through the test, to count the stream's bytes.
    let (mut from, mut to) = (exp.stdout.take().unwrap(), res.stdin.take().unwrap());
    let piped = std::thread::spawn(move || std::io::copy(&mut from, &mut to).unwrap());
    let exp = exp.wait_with_output().unwrap();
    let piped = piped.join().unwrap();
    let res = res.wait_with_output().unwrap();
    let exp = ok(exp);
    ok(res);
    assert_same(&restored, &f.img);
    let json = json_summary(&exp);
    assert_eq!(json["bytes_written"], piped, "{json}");
    let image = std::fs::read(&f.img).unwrap();
    let data = nonzero_block_bytes(&image, 0..SIZE.div_ceil(BLOCK));
    assert_eq!(json["data_bytes"], data, "{json}");
    assert_eq!(json["zero_bytes"], SIZE - data, "{json}");
}

/// The `--json` summary of a file export: exactly the file's size, the stream's records,
/// the data and zero bytes of the disk and, for an incremental, the changed bytes read.
#[test]
fn json_summary_counts_what_was_written() {
    if !require_tools("json_summary_counts_what_was_written", &["qemu-nbd"]) {
        return;
    }
    let f = fixture(19);
    let server = NbdServer::qemu_nbd(&f.img, Some(&f.pki), QemuOpts::default()).unwrap();
    let full = f.dir.join("full.cbts");
    let o = ok(export(
        &server,
        &f.pki,
        &full,
        &["--full", "--point-id", "p0", "--json"],
    ));
    let json = json_summary(&o);
    let image = std::fs::read(&f.img).unwrap();
    let data = nonzero_block_bytes(&image, 0..SIZE.div_ceil(BLOCK));
    assert_summary(&json, &full, data, SIZE - data);
    // Blocks reported as holes need not be read.
    let read = json["bytes_read"].as_u64().unwrap();
    assert!((data..=SIZE).contains(&read), "{json}");

    // An incremental: the blocks written to, and two unchanged zero blocks (CBT may report
    // more than changed).
    let changes = mutate_blocks(&f.img, 29, 6).unwrap();
    let image = std::fs::read(&f.img).unwrap();
    let mut bm = CbtBitmap::from_changes(&changes, SIZE);
    let zero_blocks: Vec<u64> = (0..bm.blocks())
        .filter(|&b| !bm.is_set(b) && nonzero_block_bytes(&image, [b]) == 0)
        .take(2)
        .collect();
    assert_eq!(
        zero_blocks.len(),
        2,
        "the image has no unchanged zero blocks"
    );
    for &b in &zero_blocks {
        bm.set(b);
    }
    let bmf = bitmap_file(&f.dir, "bm", &bm.to_base64());
    let inc = f.dir.join("inc.cbts");
    let o = ok(export(
        &server,
        &f.pki,
        &inc,
        &["--changed-blocks", p(&bmf), "--base-id", "p0", "--json"],
    ));
    let json = json_summary(&o);
    let changed: u64 = bm.set_blocks().iter().map(|&b| block_len(b)).sum();
    let data = nonzero_block_bytes(&image, bm.set_blocks());
    assert_eq!(json["bytes_read"], changed, "{json}");
    assert_summary(&json, &inc, data, changed - data);
    let restored = f.dir.join("restored.raw");
    ok(run(&["restore", "--to", p(&restored), p(&full), p(&inc)]));
    assert_same(&restored, &f.img);
}

/// `json` says `stream` holds `data` bytes of data and `zero` bytes of zeroes, in as many
/// records and bytes as `inspect` finds in it.
#[track_caller]
fn assert_summary(json: &serde_json::Value, stream: &Path, data: u64, zero: u64) {
    let size = std::fs::metadata(stream).unwrap().len();
    assert_eq!(json["bytes_written"], size, "{json}");
    assert_eq!(json["data_bytes"], data, "{json}");
    assert_eq!(json["zero_bytes"], zero, "{json}");
    assert_eq!(inspect_number(stream, "data bytes"), data);
    assert_eq!(inspect_number(stream, "zero bytes"), zero);
    assert_eq!(json["records"], inspect_number(stream, "records"), "{json}");
    assert_eq!(inspect_number(stream, "stream size"), size);
}

/// Length of 64 KiB block `b` of the disk (the last one is partial).
fn block_len(b: u64) -> u64 {
    BLOCK.min(SIZE - b * BLOCK)
}

/// Bytes in those of `blocks` that hold a non-zero byte: what an export stores as data.
fn nonzero_block_bytes(image: &[u8], blocks: impl IntoIterator<Item = u64>) -> u64 {
    blocks
        .into_iter()
        .map(|b| {
            let start = (b * BLOCK) as usize;
            let block = &image[start..start + block_len(b) as usize];
            if block.iter().any(|&x| x != 0) {
                block_len(b)
            } else {
                0
            }
        })
        .sum()
}

/// nbds+unix:// (TLS over a Unix socket), with qemu-nbd.
#[test]
fn tls_over_unix_socket() {
    if !require_tools("tls_over_unix_socket", &["qemu-nbd"]) {
        return;
    }
    let f = fixture(23);
    let sock = f.dir.join("nbd.sock");
    let mut child = std::process::Command::new("qemu-nbd")
        .args([
            "-r",
            "-t",
            "-f",
            "raw",
            "--shared=0",
            "-x",
            "disk",
            "-k",
            p(&sock),
        ])
        .arg("--object")
        .arg(format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=off",
            p(&f.pki.dir)
        ))
        .args(["--tls-creds", "tls0", p(&f.img)])
        .spawn()
        .unwrap();
    // Readiness: the socket appears (bounded wait).
    for _ in 0..500 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = f.dir.join("full.cbts");
    let uri = format!("nbds+unix:///disk?socket={}", p(&sock));
    let o = export_tls(
        &uri,
        &f.pki.ca_pem_path,
        &out,
        &["--full", "--tls-server-name", "localhost"],
    );
    let _ = child.kill();
    let _ = child.wait();
    ok(o);
    let restored = f.dir.join("r.raw");
    ok(run(&["restore", "--to", p(&restored), p(&out)]));
    assert_same(&restored, &f.img);
}
