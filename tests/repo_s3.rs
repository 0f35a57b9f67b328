//! The repository on S3, against a real S3 server (s3s-fs, started by the tests): backups
//! stored as multipart uploads with point.json last; a server that goes away mid-backup
//! leaves no point, no advanced chain and, once the next run of the VM has cleaned up, no
//! parts; a lock left by a dead process is reported, and broken only on request.

mod common;
#[path = "xapi_env/mod.rs"]
mod xapi_env;

use cbtstream_testkit::xen_nbd::StallAt;
use cbtstream_testkit::{require_tools, S3Server};
use common::*;
use std::process::{Command, Output};
use xapi_env::*;

fn server(test: &str, e: &Env) -> Option<S3Server> {
    if !require_tools(test, &[cbtstream_testkit::s3::S3S_FS]) {
        return None;
    }
    Some(S3Server::start(&e.dir.join("s3")).unwrap())
}

fn location(s3: &S3Server) -> String {
    format!("s3://{}/site-a", s3.bucket())
}

/// cbtstream with the S3 server's credentials and endpoint in the environment (as an
/// administrator's AWS settings would be), and the XenServer password.
fn cbtstream<S: AsRef<std::ffi::OsStr>>(e: &Env, s3: &S3Server, args: &[S]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("XAPI_PASSWORD", e.sim.password())
        .env("SOURCE_DATE_EPOCH", "1795000000")
        .env_remove("CBTSTREAM_LOG")
        .stdin(std::process::Stdio::null());
    s3.apply_env(&mut cmd);
    cmd
}

fn backup_args(e: &Env, repo: &str) -> Vec<String> {
    let url = e.sim.url();
    let ca = p(e.sim.ca_path());
    let args = [
        "backup",
        "--xapi",
        &url,
        "--xapi-ca",
        ca,
        "--vm",
        e.sim.vm_uuid(),
        "--repo",
        repo,
    ];
    args.iter().map(|s| s.to_string()).collect()
}

async fn output(mut cmd: Command) -> Output {
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

fn list(e: &Env, s3: &S3Server, repo: &str) -> Vec<serde_json::Value> {
    let o = ok(cbtstream(e, s3, &["list", "--repo", repo, "--json"])
        .output()
        .unwrap());
    serde_json::from_slice(&o.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_to_s3_chain_and_restore() {
    let e = env_with(|c| c.disks = 2).await;
    let Some(s3) = server("backups_to_s3_chain_and_restore", &e) else {
        return;
    };
    let repo = location(&s3);
    // The endpoint from --s3-endpoint works as well as from the environment.
    let mut init = cbtstream(
        &e,
        &s3,
        &["repo", "init", &repo, "--s3-endpoint", &s3.endpoint()],
    );
    init.env_remove("AWS_ENDPOINT_URL");
    ok(init.output().unwrap());
    let images = e.dir.join("images");
    std::fs::create_dir(&images).unwrap();
    for round in 0..3u8 {
        e.guest_writes(round);
        ok(output(cbtstream(&e, &s3, &backup_args(&e, &repo))).await);
        let points = list(&e, &s3, &repo);
        assert_eq!(points.len(), usize::from(round) + 1);
        let last = points.last().unwrap();
        let id = last["id"].as_str().unwrap();
        // Restore each disk from the objects as the server stores them.
        for (slot, vdi) in e.sim.disks().iter().enumerate() {
            let key = format!("site-a/vms/{}/points/{id}/disk{slot}.cbts", e.sim.vm_uuid());
            let image = images.join(format!("{slot}.raw"));
            ok(run(&[
                "restore",
                "--to",
                p(&image),
                p(&s3.object_path(&key)),
            ]));
            assert_same(&image, &e.sim.vdi_path(vdi).unwrap());
        }
    }
    assert_eq!(s3.open_uploads().unwrap(), 0);
    // The chain state lives in the repository.
    let state = s3.object_path(&format!("site-a/vms/{}/state.json", e.sim.vm_uuid()));
    assert!(state.exists());
    // A plain-HTTP endpoint off this machine is refused before anything happens.
    let o = cbtstream(
        &e,
        &s3,
        &[
            "list",
            "--repo",
            &repo,
            "--s3-endpoint",
            "http://192.0.2.1:9000",
        ],
    )
    .output()
    .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("loopback"), "{}", stderr(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_stopped_during_a_backup_leaves_no_point_and_no_parts() {
    let e = env().await;
    let Some(mut s3) = server(
        "s3_stopped_during_a_backup_leaves_no_point_and_no_parts",
        &e,
    ) else {
        return;
    };
    let repo = location(&s3);
    ok(cbtstream(&e, &s3, &["repo", "init", &repo])
        .output()
        .unwrap());
    e.guest_writes(0);
    ok(output(cbtstream(&e, &s3, &backup_args(&e, &repo))).await);
    let state_key = format!("site-a/vms/{}/state.json", e.sim.vm_uuid());
    let state_before = std::fs::read(s3.object_path(&state_key)).unwrap();

    // The next backup stops at its first NBD read; meanwhile the S3 server goes away.
    e.guest_writes(1);
    let faults = e.sim.nbd().faults.clone();
    faults.stall(StallAt::Request(faults.requests() + 1));
    let child = cbtstream(&e, &s3, &backup_args(&e, &repo))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        faults.wait_until(|f| f.stalls() == 1),
    )
    .await
    .expect("the backup never reached the NBD server");
    s3.stop().unwrap();
    faults.release_stall();
    let o = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    s3.restart().unwrap();
    // No new point; the chain did not move; the snapshot was cleaned up on the host.
    assert_eq!(list(&e, &s3, &repo).len(), 1);
    assert_eq!(
        std::fs::read(s3.object_path(&state_key)).unwrap(),
        state_before
    );
    // The upload the dead server could not abort is aborted by the next backup of the VM,
    // which chains onto the committed point.
    assert!(
        s3.open_uploads().unwrap() >= 1,
        "the fault did not cut an upload"
    );
    e.guest_writes(2);
    ok(output(cbtstream(&e, &s3, &backup_args(&e, &repo))).await);
    assert_eq!(s3.open_uploads().unwrap(), 0);
    assert_eq!(s3.orphan_parts().unwrap(), 0);
    let points = list(&e, &s3, &repo);
    assert_eq!(points.len(), 2);
    assert_eq!(points[1]["base"], points[0]["id"]);
    // Nothing but complete points under points/.
    let prefix = format!("site-a/vms/{}/points/", e.sim.vm_uuid());
    for key in s3.keys().unwrap().iter().filter(|k| k.starts_with(&prefix)) {
        let id = key[prefix.len()..].split('/').next().unwrap();
        assert!(points.iter().any(|p| p["id"] == id), "leftover {key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_left_behind_are_reported_and_broken_only_when_stale() {
    let e = env().await;
    let Some(s3) = server(
        "locks_left_behind_are_reported_and_broken_only_when_stale",
        &e,
    ) else {
        return;
    };
    let repo = location(&s3);
    ok(cbtstream(&e, &s3, &["repo", "init", &repo])
        .output()
        .unwrap());
    // A backup killed while it holds the VM's lock: its owner is provably gone (this host,
    // no such process), so the next backup says so and takes the lock over.
    let faults = e.sim.nbd().faults.clone();
    faults.stall(StallAt::Request(faults.requests() + 1));
    let mut child = cbtstream(&e, &s3, &backup_args(&e, &repo)).spawn().unwrap();
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        faults.wait_until(|f| f.stalls() == 1),
    )
    .await
    .expect("the backup never reached the NBD server");
    let dead = child.id();
    child.kill().unwrap();
    let _ = child.wait();
    faults.release_stall();
    let lock = format!("site-a/vms/{}/lock.json", e.sim.vm_uuid());
    let lock_path = s3.object_path(&lock);
    assert!(lock_path.exists());
    let o = ok(output(cbtstream(&e, &s3, &backup_args(&e, &repo))).await);
    let msg = stderr(&o);
    assert!(
        msg.contains("stale lock")
            && msg.contains(&format!(":{dead}"))
            && msg.contains("no longer running"),
        "{msg}"
    );
    assert_eq!(list(&e, &s3, &repo).len(), 1);
    // Released at the end; the killed run's upload aborted.
    assert!(!lock_path.exists());
    assert_eq!(s3.open_uploads().unwrap(), 0);

    // Another host's lock: refused while it has not expired, even with --break-lock.
    let other = |expires: u64| {
        serde_json::json!({
            "host": "backup-02", "pid": 4242, "operation": "prune", "token": "t",
            "created_unix_secs": 1_700_000_000u64, "expires_unix_secs": expires,
        })
        .to_string()
    };
    std::fs::write(&lock_path, other(u64::MAX / 2)).unwrap();
    let mut args = backup_args(&e, &repo);
    args.push("--break-lock".into());
    let o = output(cbtstream(&e, &s3, &args)).await;
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("locked by backup-02:4242 (prune)"),
        "{}",
        stderr(&o)
    );
    // Expired: reported with its owner and age, and broken only with --break-lock.
    std::fs::write(&lock_path, other(1_700_000_600)).unwrap();
    let o = output(cbtstream(&e, &s3, &backup_args(&e, &repo))).await;
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
    let msg = stderr(&o);
    assert!(
        msg.contains("stale lock of backup-02:4242") && msg.contains("expired"),
        "{msg}"
    );
    assert!(msg.contains("--break-lock"), "{msg}");
    assert_eq!(list(&e, &s3, &repo).len(), 1);
    ok(output(cbtstream(&e, &s3, &args)).await);
    assert_eq!(list(&e, &s3, &repo).len(), 2);
    assert!(!lock_path.exists());
}
