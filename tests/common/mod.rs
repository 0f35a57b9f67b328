//! Shared helpers for the integration tests: run the cbtstream binary, build chains.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub const BIN: &str = env!("CARGO_BIN_EXE_cbtstream");

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
