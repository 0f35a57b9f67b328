//! Runs tests/xapi_sdk.py: the official XenAPI Python SDK against the `xapi-sim` binary.
//! The SDK lives in the project's virtual environment `.venv/`, which
//! scripts/install-deps.sh creates; $CBTSTREAM_PYTHON names another interpreter that has it.
//! Without the SDK the test fails (see `cbtstream_testkit::missing_prerequisite`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(120);
const TEST: &str = "the_official_python_sdk_drives_the_simulator";

/// `$CBTSTREAM_PYTHON`, else the workspace's `.venv/bin/python3`.
fn python() -> PathBuf {
    match std::env::var_os("CBTSTREAM_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => {
            // tests/xapi-sim -> the workspace root.
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().nth(2);
            root.expect("workspace root").join(".venv/bin/python3")
        }
    }
}

fn sdk_installed(python: &Path) -> bool {
    Command::new(python)
        .args(["-c", "import XenAPI"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn the_official_python_sdk_drives_the_simulator() {
    let python = python();
    if !sdk_installed(&python) {
        let what = format!(
            "the XenAPI Python SDK ({} cannot import XenAPI; set CBTSTREAM_PYTHON to use \
             another interpreter)",
            python.display()
        );
        cbtstream_testkit::missing_prerequisite(TEST, &what);
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../xapi_sdk.py");
    let mut child = Command::new(&python)
        .arg(&script)
        .arg(env!("CARGO_BIN_EXE_xapi-sim"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting python");
    // A bounded wait: kill the script (and with it the simulator it started) on timeout.
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("waiting for python") {
            break Some(st);
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().expect("collecting the output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    let Some(status) = status else {
        panic!("tests/xapi_sdk.py did not finish in {TIMEOUT:?}");
    };
    assert!(status.success(), "tests/xapi_sdk.py failed ({status})");
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.ends_with(" passed, 0 failed") && !last.starts_with("0 "),
        "unexpected summary: {last:?}"
    );
}
