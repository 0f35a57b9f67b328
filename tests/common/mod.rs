//! Shared helpers for the integration tests: run the cbtstream binary, build chains.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub const BIN: &str = env!("CARGO_BIN_EXE_cbtstream");

/// The steps of prune's kill hook (`CBTSTREAM_TEST_KILL_AT`), in order (src/repo/prune.rs).
pub const PRUNE_STEPS: &[&str] = &[
    "locked",
    "merge-written",
    "merge-stored",
    "verified",
    "recorded",
    "point-forgotten",
    "point-deleted",
    "old-streams-deleted",
];

/// Run cbtstream with `args`; stdin is closed unless given.
pub fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("CBTSTREAM_LOG")
        .env("SOURCE_DATE_EPOCH", "1795000000")
        .stdin(Stdio::null())
        .output()
        .expect("running cbtstream")
}

pub fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
pub fn ok(o: Output) -> Output {
    assert!(
        o.status.success(),
        "cbtstream failed ({}): {}",
        code(&o),
        stderr(&o)
    );
    o
}

pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Assert two files have the same bytes (and say where they first differ).
#[track_caller]
pub fn assert_same(a: &Path, b: &Path) {
    let x = std::fs::read(a).unwrap();
    let y = std::fs::read(b).unwrap();
    assert_eq!(
        x.len(),
        y.len(),
        "{} and {} differ in size",
        a.display(),
        b.display()
    );
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!("{} and {} differ at byte {i}", a.display(), b.display());
    }
}

/// Write a bitmap file and return its path.
pub fn bitmap_file(dir: &Path, name: &str, b64: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{b64}\n")).unwrap();
    path
}

/// `cbtstream export --nbd URI --tls-ca CA -o OUT EXTRA...`
pub fn export_tls(uri: &str, ca: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["export", "--nbd", uri, "--tls-ca", p(ca), "-o", p(out)];
    args.extend_from_slice(extra);
    run(&args)
}

/// `PATH.partial`, where an export writes before it renames the file to `PATH`.
pub fn partial_of(out: &Path) -> PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

/// A failed export left nothing behind: no `out`, no `out.partial`.
#[track_caller]
pub fn assert_nothing_written(out: &Path) {
    assert!(!out.exists(), "{} was left behind", out.display());
    let partial = partial_of(out);
    assert!(!partial.exists(), "{} was left behind", partial.display());
}

/// Assert the exit code and that stderr contains `want`.
#[track_caller]
pub fn assert_fails(o: &Output, exit: i32, want: &str) {
    let e = stderr(o);
    assert_eq!(code(o), exit, "{e}");
    assert!(e.contains(want), "stderr does not say {want:?}: {e}");
}

/// The `--json` summary: the last line on stderr.
#[track_caller]
pub fn json_summary(o: &Output) -> serde_json::Value {
    let e = stderr(o);
    let last = e.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|err| panic!("no JSON summary ({err}): {e}"))
}

/// The number at the start of `field:` in `cbtstream inspect STREAM`'s report.
#[track_caller]
pub fn inspect_number(stream: &Path, field: &str) -> u64 {
    let o = ok(run(&["inspect", p(stream)]));
    let report = String::from_utf8_lossy(&o.stdout);
    let line = report
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field:?} in: {report}"));
    let number = line.split_whitespace().next().unwrap_or_default();
    number
        .parse()
        .unwrap_or_else(|_| panic!("{field}: {line:?} is not a number"))
}
