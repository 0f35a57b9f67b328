//! The `vsphere-sim` binary: its one JSON line, its disk sizes, and nothing secret on stderr.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

use common::Client;
use serde_json::{json, Value};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::CertificateDer;

struct Sim {
    child: std::process::Child,
    info: Value,
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(dir: &std::path::Path, args: &[&str]) -> Sim {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vsphere-sim"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let info = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    Sim { child, info }
}

#[tokio::test]
async fn the_json_line_says_how_to_reach_the_vm_and_secrets_stay_off_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let mut sim = spawn(dir.path(), &["--disks", "2", "-v"]);
    let i = sim.info.clone();
    for key in [
        "url",
        "ca",
        "user",
        "password",
        "vm",
        "release",
        "datacenter",
        "datastore",
    ] {
        assert!(i[key].is_string(), "{key} missing: {i}");
    }
    assert_eq!(i["vm"], "vm-42");
    assert_eq!(i["release"], "8.0.2.0");
    assert_eq!(i["datacenter"], "dc1");
    assert_eq!(i["datastore"], "ds1");
    assert_eq!(
        i["disks"],
        json!([{"key": 2000, "capacity": 64u64 << 20}, {"key": 2001, "capacity": (64u64 << 20) + (37 << 10)}])
    );
    let flat = dir.path().join("testvm/testvm_1-flat.vmdk");
    let meta = std::fs::metadata(&flat).unwrap();
    assert_eq!(meta.len(), (64 << 20) + (37 << 10));
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(meta.blocks(), 0, "sparse");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    let url = i["url"].as_str().unwrap();
    let addr = url
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let ca = CertificateDer::from_pem_file(i["ca"].as_str().unwrap()).unwrap();
    let c = Client::with_ca(addr, &ca, "8.0.2.0");
    let password = i["password"].as_str().unwrap();
    let token = c.login(i["user"].as_str().unwrap(), password).await;
    let r = c
        .sim(
            &token,
            "write",
            json!({"vm": "vm-42", "disk": 2001, "offset": 5, "data": "aGVsbG8="}),
        )
        .await;
    assert_eq!(r.status, 204);
    let snap = c.snapshot(&token, "vm-42", "s").await;
    let cookie = format!("vmware_soap_session={token}");
    let r = c
        .request(
            "GET",
            "/folder/testvm/testvm_1-flat.vmdk?dcPath=dc1&dsName=ds1",
            &[("cookie", cookie.as_str()), ("range", "bytes=5-9")],
            None,
        )
        .await
        .unwrap();
    assert_eq!((r.status, r.body.as_slice()), (206, b"hello".as_slice()));
    c.remove_snapshot(&token, &snap).await;

    let _ = sim.child.kill();
    let _ = sim.child.wait();
    let mut err = String::new();
    sim.child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(
        err.contains("POST /sdk/vim25/8.0.2.0/VirtualMachine/vm-42/CreateSnapshotEx_Task -> 200"),
        "{err}"
    );
    assert!(
        !err.contains(password) && !err.contains(&token),
        "a secret on stderr: {err}"
    );
}

#[tokio::test]
async fn disk_size_sets_every_disk() {
    let dir = tempfile::tempdir().unwrap();
    let sim = spawn(dir.path(), &["--disks", "3", "--disk-size", "1048576"]);
    let sizes: Vec<u64> = sim.info["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["capacity"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, vec![1 << 20; 3]);
}

#[test]
fn a_bad_disk_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vsphere-sim"))
        .args(["--data-dir"])
        .arg(dir.path())
        .args(["--disk-size", "1000"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("multiple of 1024"), "{err}");
}
