//! Restore never gives up a good image for a stream that has not verified, and says with the
//! right exit code which file was wrong. Streams are made with the encoder of cbtstream-proto;
//! the real binary restores them.

mod common;

use cbtstream_proto::stream::{checksum, Codec, Encoder, Header};
use common::{code, ok, p, run, stderr, BIN};
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Every record covers this much of the disk.
const RECORD: usize = 64 << 10;
/// Records per disk.
const RECORDS: usize = 16;
const DISK: usize = RECORD * RECORDS;

/// A disk whose every byte depends on `seed`.
fn disk(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A stream of raw DATA records for the `records` (indexes of RECORD-sized pieces) of `disk`.
fn stream(disk: &[u8], point: &str, base: Option<&str>, records: &[usize]) -> Vec<u8> {
    let header = Header {
        virtual_size: disk.len() as u64,
        block_size: RECORD as u32,
        source_id: "vdi".into(),
        point_id: point.into(),
        incremental: base.is_some(),
        base_id: base.map(str::to_owned),
        created_unix_secs: 1_700_000_000,
        codec: Codec::None,
    };
    let (mut enc, mut out) = Encoder::new(&header).unwrap();
    for &i in records {
        let data = &disk[i * RECORD..(i + 1) * RECORD];
        let h = enc
            .data(
                (i * RECORD) as u64,
                RECORD as u64,
                Codec::None,
                checksum(data),
                data,
            )
            .unwrap();
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
    }
    out.extend(enc.finish());
    out
}

fn full(disk: &[u8], point: &str) -> Vec<u8> {
    let all: Vec<usize> = (0..disk.len() / RECORD).collect();
    stream(disk, point, None, &all)
}

/// Where record `index`'s payload starts in a stream made by [`stream`].
fn payload_at(stream: &[u8], index: usize) -> usize {
    let header_len = u32::from_le_bytes(stream[12..16].try_into().unwrap()) as usize;
    header_len + index * (40 + RECORD) + 40
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// A directory with a good image at point `p0` and the files around it.
struct Setup {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    image: PathBuf,
    sidecar: PathBuf,
    partial: PathBuf,
    /// The image's disk content and sidecar text at `p0`.
    disk: Vec<u8>,
    sidecar_text: Vec<u8>,
}

impl Setup {
    fn new() -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        let image = dir.join("disk.raw");
        let disk = disk(1, DISK);
        let s = dir.join("p0.cbts");
        fs::write(&s, full(&disk, "p0")).unwrap();
        ok(run(&["restore", "--to", p(&image), p(&s)]));
        let sidecar = dir.join("disk.raw.cbtstream");
        Setup {
            sidecar_text: fs::read(&sidecar).unwrap(),
            partial: dir.join("disk.raw.partial"),
            _tmp: tmp,
            dir,
            image,
            sidecar,
            disk,
        }
    }

    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.dir.join(name);
        fs::write(&path, bytes).unwrap();
        path
    }

    fn restore(&self, streams: &[&Path]) -> Output {
        let mut args = vec!["restore", "--to", p(&self.image)];
        args.extend(streams.iter().map(|s| p(s)));
        run(&args)
    }

    /// The image and its sidecar are byte for byte what they were at `p0`, and no partial
    /// file is left.
    #[track_caller]
    fn assert_untouched(&self, what: &str) {
        assert!(
            fs::read(&self.image).unwrap() == self.disk,
            "{what}: the image changed"
        );
        assert_eq!(
            fs::read(&self.sidecar).unwrap(),
            self.sidecar_text,
            "{what}: the sidecar changed"
        );
        assert!(
            !self.partial.exists(),
            "{what}: {} left",
            self.partial.display()
        );
    }
}

#[track_caller]
fn assert_fails(o: &Output, want_code: i32, wants: &[&str]) {
    let e = stderr(o);
    assert_eq!(code(o), want_code, "{e}");
    for want in wants {
        assert!(e.contains(want), "missing {want:?} in: {e}");
    }
}

#[test]
fn damaged_full_stream_leaves_the_old_image_and_sidecar_alone() {
    let s = Setup::new();
    let new_disk = disk(2, DISK);
    let good = full(&new_disk, "p1");

    let mut bad = good.clone();
    bad[payload_at(&good, 5) + 100] ^= 0x04;
    let bad_path = s.write("bad.cbts", &bad);
    let o = s.restore(&[&bad_path]);
    assert_fails(
        &o,
        4,
        &[
            p(&bad_path),
            "record 5 (offset 0x50000)",
            "checksum mismatch",
        ],
    );
    s.assert_untouched("record 5 damaged");

    let cut = s.write("cut.cbts", &good[..payload_at(&good, 9) + 10]);
    let o = s.restore(&[&cut]);
    assert_fails(&o, 4, &[p(&cut), "stream truncated in record 9"]);
    s.assert_untouched("cut in record 9");

    // A good full stream and a damaged incremental in one call: all or nothing.
    let good_path = s.write("p1.cbts", &good);
    let mut inc = stream(&disk(3, DISK), "p2", Some("p1"), &[2, 3]);
    let last = inc.len() - 1;
    inc[last] ^= 1;
    let inc_path = s.write("p2.cbts", &inc);
    let o = s.restore(&[&good_path, &inc_path]);
    assert_fails(&o, 4, &[p(&inc_path)]);
    s.assert_untouched("full, then a damaged incremental");

    // The good stream replaces the image, which (like its sidecar) is private.
    fs::set_permissions(&s.image, fs::Permissions::from_mode(0o644)).unwrap();
    ok(s.restore(&[&good_path]));
    assert!(fs::read(&s.image).unwrap() == new_disk);
    let sidecar = fs::read_to_string(&s.sidecar).unwrap();
    assert!(
        sidecar.contains("state=complete\npoint_id=p1\n"),
        "{sidecar}"
    );
    assert_eq!(mode(&s.image), 0o600);
    assert_eq!(mode(&s.sidecar), 0o600);
    assert!(!s.partial.exists());
}

/// Starts `cbtstream restore --to IMAGE -` reading from `stdin`.
fn restore_from(image: &Path, stdin: Stdio) -> Child {
    Command::new(BIN)
        .args(["restore", "--to", p(image), "-"])
        .stdin(stdin)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits (at most a minute) until `path` exists.
#[track_caller]
fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn killed_full_restore_leaves_the_old_image() {
    let s = Setup::new();
    let new_disk = disk(2, DISK);
    let good = full(&new_disk, "p1");
    let mut child = restore_from(&s.image, Stdio::piped());
    let mut stdin = child.stdin.take().unwrap();
    // Half the stream; the restore then waits for more, midway through writing the partial file.
    stdin.write_all(&good[..payload_at(&good, 8)]).unwrap();
    wait_for(&s.partial);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    drop(stdin);

    assert!(fs::read(&s.image).unwrap() == s.disk, "the image changed");
    assert_eq!(fs::read(&s.sidecar).unwrap(), s.sidecar_text);
    // The image is still complete at p0: an incremental onto it works.
    let next = {
        let mut d = s.disk.clone();
        d[3 * RECORD..4 * RECORD].copy_from_slice(&new_disk[3 * RECORD..4 * RECORD]);
        d
    };
    let inc = s.write("p1-inc.cbts", &stream(&next, "p1", Some("p0"), &[3]));
    ok(s.restore(&[&inc]));
    assert!(fs::read(&s.image).unwrap() == next);
    // The next full restore overwrites the leftover partial file and removes it.
    assert!(s.partial.exists(), "SIGKILL leaves the partial file");
    let full_path = s.write("p1.cbts", &good);
    ok(s.restore(&[&full_path]));
    assert!(fs::read(&s.image).unwrap() == new_disk);
    assert!(!s.partial.exists());
}

#[test]
fn inputs_that_cannot_be_opened_are_usage_errors() {
    let s = Setup::new();
    let missing = s.dir.join("missing.cbts");
    for (input, why) in [(&missing, "No such file"), (&s.dir, "directory")] {
        let o = s.restore(&[input]);
        assert_fails(&o, 2, &["cannot open", p(input), why]);
        let o = run(&["inspect", p(input)]);
        assert_fails(&o, 2, &["cannot open", p(input), why]);
    }
    s.assert_untouched("unopenable input");
}

#[test]
fn damaged_streams_and_broken_chains_are_integrity_errors() {
    let s = Setup::new();
    let mut bad = full(&disk(2, DISK), "p1");
    let at = payload_at(&bad, 5);
    bad[at] ^= 1;
    let bad_path = s.write("bad.cbts", &bad);
    let o = run(&["inspect", p(&bad_path)]);
    assert_fails(&o, 4, &[p(&bad_path), "record 5"]);

    let elsewhere = s.write("inc.cbts", &stream(&s.disk, "p9", Some("p8"), &[1]));
    let o = s.restore(&[&elsewhere]);
    assert_fails(&o, 4, &[p(&elsewhere), "does not follow on", "`p8`"]);
    let o = run(&["restore", "--to", p(&s.dir.join("none.raw")), p(&elsewhere)]);
    assert_fails(&o, 4, &["none.raw does not exist", p(&elsewhere)]);
    // An image without a sidecar holds no known point.
    let bare = s.dir.join("bare.raw");
    fs::copy(&s.image, &bare).unwrap();
    let next = s.write("next.cbts", &stream(&s.disk, "p1", Some("p0"), &[1]));
    let o = run(&["restore", "--to", p(&bare), p(&next)]);
    assert_fails(&o, 4, &[p(&bare), "no sidecar"]);
    s.assert_untouched("integrity errors");
}

/// Runs cbtstream with files limited to `max_file` bytes (RLIMIT_FSIZE): writing or growing a
/// file past it fails with EFBIG, as on a full disk.
fn run_with_file_limit(args: &[&str], max_file: u64) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).stdin(Stdio::null());
    // SAFETY: between fork and exec only async-signal-safe calls (signal, setrlimit) are made.
    unsafe {
        cmd.pre_exec(move || {
            // Ignored, SIGXFSZ turns into the EFBIG error a restore must report.
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit {
                rlim_cur: max_file,
                rlim_max: max_file,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().unwrap()
}

#[test]
fn an_image_that_cannot_be_written_is_an_output_error() {
    let s = Setup::new();
    // A full restore whose partial file cannot grow to the disk size.
    let bigger = disk(2, 2 * DISK);
    let big = s.write("big.cbts", &full(&bigger, "p1"));
    let o = run_with_file_limit(&["restore", "--to", p(&s.image), p(&big)], DISK as u64);
    assert_fails(&o, 5, &[p(&s.partial), "too large"]);
    s.assert_untouched("full restore that cannot write");

    // An incremental, applied in place, that cannot grow the image: the image is marked
    // half-applied.
    let grown = s.write("grown.cbts", &stream(&bigger, "p1", Some("p0"), &[20]));
    let o = run_with_file_limit(&["restore", "--to", p(&s.image), p(&grown)], DISK as u64);
    assert_fails(&o, 5, &[p(&s.image), "too large"]);
    let sidecar = fs::read_to_string(&s.sidecar).unwrap();
    assert!(
        sidecar.contains("state=applying\npoint_id=p1\n"),
        "{sidecar}"
    );
    // ... and nothing but a full stream goes onto it.
    let o = run(&["restore", "--to", p(&s.image), p(&grown)]);
    assert_fails(&o, 4, &[p(&s.image), "did not finish"]);

    // A sidecar that cannot be read.
    let other = s.dir.join("other.raw");
    fs::write(&other, &s.disk).unwrap();
    let other_sidecar = s.dir.join("other.raw.cbtstream");
    fs::create_dir(&other_sidecar).unwrap();
    let o = run(&["restore", "--to", p(&other), p(&grown)]);
    assert_fails(&o, 5, &[p(&other_sidecar)]);

    // A directory that does not exist.
    let nowhere = s.dir.join("no-such-dir").join("disk.raw");
    let o = run(&["restore", "--to", p(&nowhere), p(&big)]);
    assert_fails(&o, 5, &[p(&nowhere), "No such file"]);
}

/// A TCP connection whose far end resets it: the next read on `near` fails (ECONNRESET).
fn reset_pair() -> (std::net::TcpStream, std::net::TcpStream) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let near = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (far, _) = listener.accept().unwrap();
    (near, far)
}

/// Closes `far` with a reset rather than an orderly end (SO_LINGER with a zero timeout).
fn reset(far: std::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads `linger` (size given) and the descriptor is `far`'s, still open.
    let r = unsafe {
        libc::setsockopt(
            far.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    drop(far);
}

#[test]
fn a_read_error_midway_is_a_source_error() {
    let s = Setup::new();
    let good = full(&disk(2, DISK), "p1");

    let (near, mut far) = reset_pair();
    let child = restore_from(&s.image, Stdio::from(std::os::fd::OwnedFd::from(near)));
    far.write_all(&good[..payload_at(&good, 6)]).unwrap();
    wait_for(&s.partial); // Past the header: applying records.
    reset(far);
    let o = child.wait_with_output().unwrap();
    assert_fails(&o, 3, &["reading <stdin>", "reset"]);
    s.assert_untouched("read error midway");

    let (near, mut far) = reset_pair();
    let child = Command::new(BIN)
        .args(["inspect", "-"])
        .stdin(std::os::fd::OwnedFd::from(near))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    far.write_all(&good[..payload_at(&good, 6)]).unwrap();
    reset(far);
    let o = child.wait_with_output().unwrap();
    assert_fails(&o, 3, &["reading <stdin>", "reset"]);
}
