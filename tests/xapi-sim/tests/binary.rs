//! The `xapi-sim` binary: one JSON line on stdout, a working API, exit on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cbtstream_xapi_sim::XapiClient;

/// Kills the simulator if the test fails half-way, so no server outlives it.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prints_its_json_line_serves_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_xapi-sim"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--disk-size",
            "1048576",
            "--nbd-lag-ms",
            "50",
            "--disks",
            "2",
        ])
        .args(["--slave-listen", "127.0.0.1:0", "--password", "secret"])
        .arg("--data-dir")
        .arg(dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Reap(child);
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let info: serde_json::Value = serde_json::from_str(&line).unwrap();
    let url = info["url"].as_str().unwrap();
    assert!(url.starts_with("https://127.0.0.1:") && url.ends_with('/'));
    assert_eq!(info["user"], "root");
    assert_eq!(info["password"], "secret");
    let pem = std::fs::read(info["ca"].as_str().unwrap()).unwrap();
    let der = {
        use tokio_rustls::rustls::pki_types::{pem::PemObject, CertificateDer};
        CertificateDer::from_pem_slice(&pem).unwrap().to_vec()
    };

    let c = XapiClient::new(url, &der).unwrap();
    let session = tokio::time::timeout(Duration::from_secs(30), c.login("root", "secret"))
        .await
        .unwrap()
        .unwrap();
    let vdi = c
        .call(
            "VDI.get_by_uuid",
            &[
                session.as_str().into(),
                info["vdi"].as_str().unwrap().into(),
            ],
        )
        .await
        .unwrap();
    let size = c
        .call("VDI.get_virtual_size", &[session.as_str().into(), vdi])
        .await
        .unwrap();
    assert_eq!(size.as_i64_str(), Some(1048576));
    let vm = c
        .call(
            "VM.get_by_uuid",
            &[session.as_str().into(), info["vm"].as_str().unwrap().into()],
        )
        .await
        .unwrap();
    assert!(vm.as_str().unwrap().starts_with("OpaqueRef:"));
    let disks = info["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2);
    assert_eq!(disks[0], info["vdi"]);
    for d in disks {
        let path = dir.path().join(format!("{}.raw", d.as_str().unwrap()));
        assert_eq!(std::fs::metadata(path).unwrap().len(), 1048576);
    }
    assert!(info["slave_url"].as_str().is_some());

    // SIGTERM: a prompt, clean exit.
    let pid = libc::pid_t::try_from(child.0.id()).unwrap();
    // SAFETY: signalling our own child process by its pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.0.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > Duration::from_secs(20) {
            panic!("xapi-sim did not exit on SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(status.success(), "{status}");
}

#[test]
fn refuses_a_bad_disk_size() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_xapi-sim"))
        .args(["--disk-size", "1000"])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("multiple of 512"));
}

#[test]
fn refuses_a_bad_disk_count() {
    let dir = tempfile::tempdir().unwrap();
    for n in ["0", "16"] {
        let out = Command::new(env!("CARGO_BIN_EXE_xapi-sim"))
            .args(["--disks", n])
            .arg("--data-dir")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(out.stdout.is_empty());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("the VM has 1 to 15 disks, not {n}")),
            "{err}"
        );
    }
}
