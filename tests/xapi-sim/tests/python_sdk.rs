//! Runs tests/xapi_sdk.py: the official XenAPI Python SDK against the `xapi-sim` binary.
//! Skipped loudly when the SDK is not installed, unless CBTSTREAM_REQUIRE_NBD_TOOLS=1 (CI),
//! where that is a failure.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(120);

fn sdk_installed() -> bool {
    Command::new("python3")
        .args(["-c", "import XenAPI"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn the_official_python_sdk_drives_the_simulator() {
    if !sdk_installed() {
        let msg = "the_official_python_sdk_drives_the_simulator: python3 with the XenAPI SDK \
                   is not available (pip install XenAPI)";
        if std::env::var("CBTSTREAM_REQUIRE_NBD_TOOLS").is_ok_and(|v| !v.is_empty() && v != "0") {
            panic!("{msg} and $CBTSTREAM_REQUIRE_NBD_TOOLS is set");
        }
        // Straight to stderr so libtest's capture does not hide the skip.
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "\n!!!!!!!! SKIPPING {msg} !!!!!!!!\n");
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../xapi_sdk.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .arg(env!("CARGO_BIN_EXE_xapi-sim"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting python3");
    // A bounded wait: kill the script (and with it the simulator it started) on timeout.
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("waiting for python3") {
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
