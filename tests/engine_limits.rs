//! The engine against servers at the edges: a disk too large to be real, read errors that
//! must be retried with backoff, a maximum block size below 64 KiB, block status that takes
//! time, and sparse disks far larger than memory.

use cbtstream_testkit::hostile::{HostileServer, Misbehaviour};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_cbtstream");
const MIB: u64 = 1 << 20;

fn cbtstream(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("CBTSTREAM_LOG")
        .env("SOURCE_DATE_EPOCH", "1795000000")
        .stdin(Stdio::null())
        .output()
        .expect("running cbtstream")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn ok(o: Output) -> Output {
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    o
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// nbdkit serving on a Unix socket in `dir`, killed when dropped.
struct Nbdkit {
    child: Child,
    socket: PathBuf,
}

impl Nbdkit {
    /// `nbdkit -f -U SOCKET ARGS...`; waits (bounded) for the socket to appear.
    fn start(dir: &Path, args: &[&str]) -> Nbdkit {
        let socket = dir.join("nbdkit.sock");
        let log = std::fs::File::create(dir.join("nbdkit.log")).unwrap();
        let child = Command::new("nbdkit")
            .args(["-f", "-U", p(&socket)])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nbdkit must be installed");
        let mut server = Nbdkit { child, socket };
        for _ in 0..1000 {
            if server.socket.exists() {
                return server;
            }
            if let Ok(Some(st)) = server.child.try_wait() {
                let log = std::fs::read_to_string(dir.join("nbdkit.log")).unwrap_or_default();
                panic!("nbdkit {args:?} exited at start: {st}: {log}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("nbdkit {args:?} did not create its socket");
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", p(&self.socket))
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A file of `size` bytes: pseudo-random data with zero runs every few blocks.
fn make_image(path: &Path, size: u64) {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut data = vec![0u8; size as usize];
    for (i, chunk) in data.chunks_mut(4096).enumerate() {
        if i % 7 == 3 {
            continue;
        }
        for b in chunk {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
    std::fs::write(path, data).unwrap();
}

/// The `--json` line of a run's stderr.
fn summary(o: &Output) -> serde_json::Value {
    let text = stderr(o);
    let line = text
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON summary in: {text}"));
    serde_json::from_str(line).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_disk_of_2_pow_62_bytes_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let server = HostileServer::start(vec![0x55; MIB as usize], Misbehaviour::HugeSize)
        .await
        .unwrap();
    let out = tmp.path().join("out.cbts");
    let args = [
        "export",
        "--nbd",
        &server.uri("disk"),
        "--allow-plaintext",
        "--full",
        "-o",
        p(&out),
    ]
    .map(String::from);
    let o = tokio::task::spawn_blocking(move || {
        cbtstream(&args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(
            "the server reports a disk of 4611686018427387904 bytes, more than the 70368744177664 bytes (64 TiB) cbtstream supports"
        ),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());
    assert!(!tmp.path().join("out.cbts.partial").exists());
    // Refused before reading anything.
    assert_eq!(server.stats.requests(), 0);
}

#[test]
fn read_errors_are_retried_with_backoff() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Nbdkit::start(
        tmp.path(),
        &[
            "--filter=error",
            "pattern",
            "1M",
            "error-pread=EIO",
            "error-pread-rate=1",
        ],
    );
    let out = tmp.path().join("out.cbts");
    let started = Instant::now();
    let o = cbtstream(&[
        "export",
        "--nbd",
        &server.uri(),
        "--full",
        "-o",
        p(&out),
        "--retries",
        "2",
        "--connections",
        "1",
    ]);
    let elapsed = started.elapsed();
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("at offset 0 failed after 3 attempt(s)"),
        "{}",
        stderr(&o)
    );
    // Two retries, after 200 ms and 400 ms: not all at once.
    assert!(elapsed >= Duration::from_millis(600), "{elapsed:?}");
    assert!(!out.exists());
}

#[test]
fn reads_are_split_for_a_server_maximum_below_64_kib() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("disk.raw");
    make_image(&img, 3 * MIB + 4096);
    // Requests over 32 KiB get EINVAL.
    let server = Nbdkit::start(
        tmp.path(),
        &[
            "--filter=blocksize-policy",
            "file",
            p(&img),
            "blocksize-maximum=32K",
            "blocksize-error-policy=error",
        ],
    );
    let out = tmp.path().join("out.cbts");
    let o = ok(cbtstream(&[
        "export",
        "--nbd",
        &server.uri(),
        "--full",
        "-o",
        p(&out),
        "--retries",
        "0",
        "--json",
    ]));
    let s = summary(&o);
    // One record per planned read of 64 KiB or more, not one per 32 KiB request.
    assert!(s["records"].as_u64().unwrap() < (3 * MIB + 4096) / (32 << 10));
    let restored = tmp.path().join("restored.raw");
    ok(cbtstream(&["restore", "--to", p(&restored), p(&out)]));
    assert!(std::fs::read(&restored).unwrap() == std::fs::read(&img).unwrap());
}

#[test]
fn the_summary_counts_block_status_time_and_measured_reads() {
    let tmp = tempfile::tempdir().unwrap();
    // 8 MiB, data in the first and the sixth MiB; every block-status answer takes 300 ms.
    let server = Nbdkit::start(
        tmp.path(),
        &[
            "--filter=delay",
            "data",
            "1 2 3 @5242880 4 5 6",
            "size=8M",
            "delay-extents=300ms",
        ],
    );
    let out = tmp.path().join("out.cbts");
    let o = ok(cbtstream(&[
        "export",
        "--nbd",
        &server.uri(),
        "--full",
        "-o",
        p(&out),
        "--json",
    ]));
    let s = summary(&o);
    assert!(s["seconds"].as_f64().unwrap() >= 0.3, "{s}");
    let read = s["bytes_read"].as_u64().unwrap();
    assert!(read > 0 && read < 8 * MIB, "{s}");
    assert_eq!(
        s["data_bytes"].as_u64().unwrap() + s["zero_bytes"].as_u64().unwrap(),
        8 * MIB,
        "{s}"
    );
}

#[test]
fn sparse_disk_of_64_gib_exports_and_restores() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 64u64 << 30;
    let server = Nbdkit::start(
        tmp.path(),
        &["sparse-random", "64G", "percent=0.0025", "seed=7"],
    );
    let out = tmp.path().join("out.cbts");
    let o = ok(cbtstream(&[
        "export",
        "--nbd",
        &server.uri(),
        "--full",
        "-o",
        p(&out),
        "--json",
    ]));
    let s = summary(&o);
    assert_eq!(
        s["data_bytes"].as_u64().unwrap() + s["zero_bytes"].as_u64().unwrap(),
        size,
        "{s}"
    );
    // Block status skipped almost all of it.
    assert!(s["bytes_read"].as_u64().unwrap() < size / 1000, "{s}");
    // Byte-identical: restore, and compare what nbdcopy reads from the same server.
    let restored = tmp.path().join("restored.raw");
    ok(cbtstream(&["restore", "--to", p(&restored), p(&out)]));
    let copied = tmp.path().join("copied.raw");
    let st = Command::new("nbdcopy")
        .args([&server.uri(), p(&copied)])
        .status()
        .expect("nbdcopy must be installed");
    assert!(st.success());
    assert_same_sparse(&restored, &copied);
}

/// Compare two large sparse files by their data: SEEK_DATA walks only allocated ranges of
/// `a`, and everything else must read as zero in `b` (checked where `b` has data).
fn assert_same_sparse(a: &Path, b: &Path) {
    assert_eq!(
        std::fs::metadata(a).unwrap().len(),
        std::fs::metadata(b).unwrap().len()
    );
    let ranges_a = data_ranges(a);
    let ranges_b = data_ranges(b);
    let fa = std::fs::File::open(a).unwrap();
    let fb = std::fs::File::open(b).unwrap();
    use std::os::unix::fs::FileExt;
    for (start, end) in ranges_a.iter().chain(ranges_b.iter()) {
        let mut off = *start;
        while off < *end {
            let n = (end - off).min(MIB) as usize;
            let (mut x, mut y) = (vec![0u8; n], vec![0u8; n]);
            fa.read_exact_at(&mut x, off).unwrap();
            fb.read_exact_at(&mut y, off).unwrap();
            assert!(x == y, "files differ in the MiB at {off}");
            off += n as u64;
        }
    }
}

/// The allocated ranges of a file (SEEK_DATA / SEEK_HOLE).
fn data_ranges(path: &Path) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as i64;
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    while pos < len {
        // SAFETY: lseek on an open descriptor we own; no memory is touched.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        out.push((data as u64, hole as u64));
        pos = hole;
    }
    out
}

#[test]
fn a_bitmap_of_several_mib_of_text_is_read_in_pieces() {
    let tmp = tempfile::tempdir().unwrap();
    // 512 GiB: 2^23 blocks, a 1 MiB bitmap, 1.4 MB of base64 (more than one read of it).
    let size = 512u64 << 30;
    let blocks = size / (64 << 10);
    let server = Nbdkit::start(
        tmp.path(),
        &["-r", "sparse-random", "512G", "percent=0.0025", "seed=3"],
    );
    let mut bm = vec![0u8; (blocks / 8) as usize];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut set = 0u64;
    for _ in 0..1000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x % blocks;
        if bm[(b / 8) as usize] & (0x80 >> (b % 8)) == 0 {
            bm[(b / 8) as usize] |= 0x80 >> (b % 8);
            set += 1;
        }
    }
    let text = cbtstream_proto::cbt::encode_base64(&bm) + "\n";
    assert!(text.len() > 1 << 20);
    let bitmap = tmp.path().join("bitmap.b64");
    std::fs::write(&bitmap, &text).unwrap();
    let out = tmp.path().join("out.cbts");
    let o = ok(cbtstream(&[
        "export",
        "--nbd",
        &server.uri(),
        "--changed-blocks",
        p(&bitmap),
        "-o",
        p(&out),
        "--json",
    ]));
    let s = summary(&o);
    assert_eq!(s["bytes_read"].as_u64().unwrap(), set * (64 << 10), "{s}");
    // Whitespace inside the text is refused, as a usage error naming the bitmap.
    let bad = tmp.path().join("bad.b64");
    std::fs::write(&bad, format!("{}\n{}", &text[..8], &text[8..])).unwrap();
    let o = cbtstream(&[
        "export",
        "--nbd",
        &server.uri(),
        "--changed-blocks",
        p(&bad),
        "-o",
        p(&out),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o)
            .contains("the changed-block bitmap is not valid base64: whitespace inside the text"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn bad_request_sizes_and_thread_counts_are_refused_before_connecting() {
    // Nothing listens there: a connection attempt would fail with exit 3, not 2.
    let uri = "nbd+unix:///?socket=/nonexistent/cbtstream.sock";
    for (flag, value, want) in [
        (
            "--request-size",
            "100",
            "must be a multiple of 64 between 64 and 32768",
        ),
        (
            "--request-size",
            "0",
            "must be a multiple of 64 between 64 and 32768",
        ),
        (
            "--request-size",
            "32832",
            "must be a multiple of 64 between 64 and 32768",
        ),
        ("--threads", "0", "0 is not in 1..=256"),
        ("--threads", "257", "257 is not in 1..=256"),
    ] {
        let o = cbtstream(&[
            "export",
            "--nbd",
            uri,
            "--full",
            "-o",
            "/dev/null",
            flag,
            value,
        ]);
        assert_eq!(o.status.code(), Some(2), "{flag} {value}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "{flag} {value}: {}", stderr(&o));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_later_connection_with_a_smaller_maximum_gets_split_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("disk.raw");
    make_image(&img, 8 * MIB);
    let server = HostileServer::start_file(&img, Misbehaviour::ShrinkingMaxBlock)
        .await
        .unwrap();
    let out = tmp.path().join("out.cbts");
    let args = [
        "export",
        "--nbd",
        &server.uri("disk"),
        "--allow-plaintext",
        "--full",
        "-o",
        p(&out),
        "--connections",
        "4",
        "--request-size",
        "256",
        // One read at a time each: the slow first connection leaves work for the others.
        "--inflight",
        "1",
        // One refused read would fail the export.
        "--retries",
        "0",
    ]
    .map(String::from);
    let o = tokio::task::spawn_blocking(move || {
        cbtstream(&args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .unwrap();
    ok(o);
    // The later connections (at most 32 KiB a read) did read: 256 KiB reads split in 8.
    assert!(server.stats.connections() >= 2);
    assert!(server.stats.limited_reads() >= 8, "{:?}", server.stats);
    let restored = tmp.path().join("restored.raw");
    ok(cbtstream(&["restore", "--to", p(&restored), p(&out)]));
    assert!(std::fs::read(&restored).unwrap() == std::fs::read(&img).unwrap());
}
