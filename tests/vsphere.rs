//! `cbtstream backup --vsphere`, `export --vsphere` and `vsphere update-paths` against the
//! vSphere simulator: control-plane behaviours (usage errors, refusals, faults, snapshot
//! removal, secrets). Points restored byte for byte: tests/vsphere_chain.rs.

use base64::Engine;
#[path = "vsphere_env/mod.rs"]
mod vsphere_env;

use cbtstream_vsphere_sim::{SimConfig, Simulator};
use std::path::Path;
use std::process::Output;
use vsphere_env::*;

async fn start_default() -> (tempfile::TempDir, Simulator) {
    start(|d| SimConfig::for_tests(d)).await
}

/// `cbtstream ARGS` with `password` in $VSPHERE_PASSWORD.
async fn cbtstream(password: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args)
        .env_remove("VSPHERE_PASSWORD")
        .env_remove("CBTSTREAM_LOG");
    if let Some(p) = password {
        cmd.env("VSPHERE_PASSWORD", p);
    }
    cmd.output().await.unwrap()
}

/// `backup --vsphere URL --vm vm-42 --out OUT --user U --vsphere-ca CA EXTRA...`.
async fn backup(sim: &Simulator, out: &Path, extra: &[&str]) -> Output {
    let mut all = vec!["--out", out.to_str().unwrap()];
    all.extend_from_slice(extra);
    run(sim, "backup", &all).await
}

/// A run that went through: snapshot, changed areas, reads of the frozen extent, the point.
fn went_through(o: &Output) {
    assert_eq!(o.status.code(), Some(0), "{}", stderr(o));
}

fn out_dir(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_errors_come_before_any_login() {
    let (dir, sim) = start_default().await;
    let out = out_dir(&dir);
    let url = sim.url();
    let o = cbtstream(
        None,
        &[
            "backup",
            "--vsphere",
            &url,
            "--vm",
            "vm-42",
            "--out",
            out.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("$VSPHERE_PASSWORD"), "{}", stderr(&o));
    let plain = url.replace("https://", "http://");
    for args in [
        vec![
            "backup",
            "--vsphere",
            plain.as_str(),
            "--vm",
            "vm-42",
            "--out",
            "x",
        ],
        vec![
            "backup",
            "--vsphere",
            &url,
            "--vm",
            "vm-42",
            "--out",
            "x",
            "--vsphere-pin",
            "abc",
        ],
        vec!["backup", "--vsphere", &url, "--vm", "../x", "--out", "x"],
        vec!["export", "--vsphere", &url, "--vm", "vm-42", "-o", "x"],
        vec![
            "export",
            "--vsphere",
            &url,
            "--vm",
            "vm-42",
            "--disk",
            "2000",
            "-o",
            "x",
            "--keep-bases",
            "2",
        ],
        vec![
            "backup",
            "--xapi",
            "https://h",
            "--vsphere",
            &url,
            "--vm",
            "vm-42",
            "--out",
            "x",
        ],
        vec![
            "vsphere",
            "update-paths",
            "--vsphere",
            &url,
            "--datastore",
            "datastore-12",
            "--map",
            "nothing",
            "--user",
            "u",
        ],
    ] {
        let o = cbtstream(Some(sim.password()), &args).await;
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
    }
    assert_eq!(sim.calls("Login"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vm_with_an_older_snapshot_is_refused_before_any_snapshot() {
    let (dir, sim) = start_default().await;
    let out = out_dir(&dir);
    let user_snap = sim.take_snapshot(sim.vm(), "before the upgrade").unwrap();
    let o = backup(&sim, &out, &[]).await;
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("has 1 snapshot(s)") && e.contains(&user_snap) && e.contains("delta links"),
        "{e}"
    );
    assert_eq!(sim.calls("CreateSnapshotEx_Task"), 0);
    assert_eq!(sim.snapshots(sim.vm()), [user_snap]);
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_snapshot_task_is_named_and_leaves_nothing() {
    let (dir, sim) = start_default().await;
    let out = out_dir(&dir);
    sim.fail_next("CreateSnapshotEx_Task", "FileFault");
    let o = backup(&sim, &out, &[]).await;
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("VirtualMachine.CreateSnapshotEx_Task: vSphere fault FileFault"),
        "{e}"
    );
    assert!(sim.snapshots(sim.vm()).is_empty());
    assert_eq!(sim.calls("RemoveSnapshot_Task"), 0);
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_removes_its_snapshot_and_a_failed_removal_is_a_warning_naming_it() {
    let (dir, sim) = start_default().await;
    let out = out_dir(&dir);
    let o = backup(&sim, &out, &[]).await;
    went_through(&o);
    assert_eq!(sim.calls("RemoveSnapshot_Task"), 1);
    assert!(sim.snapshots(sim.vm()).is_empty());

    sim.fail_next("RemoveSnapshot_Task", "InvalidState");
    let o = backup(&sim, &out, &[]).await;
    went_through(&o);
    let left = sim.snapshots(sim.vm());
    assert_eq!(left.len(), 1);
    let e = stderr(&o);
    assert!(
        e.contains(&format!("could not remove the snapshot {}", left[0]))
            && e.contains("InvalidState")
            && e.contains("remove it in vCenter"),
        "{e}"
    );
    // Both points were stored: the removal comes after the point is durable.
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn tracking_off_is_refused_unless_enable_cbt_turns_it_on() {
    let (dir, sim) = start(|d| SimConfig {
        cbt_enabled: false,
        ..SimConfig::for_tests(d)
    })
    .await;
    let out = out_dir(&dir);
    let o = backup(&sim, &out, &[]).await;
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("changed block tracking is off on VM vm-42; --enable-cbt"),
        "{}",
        stderr(&o)
    );
    assert_eq!(sim.calls("CreateSnapshotEx_Task"), 0);
    let o = backup(&sim, &out, &["--enable-cbt"]).await;
    went_through(&o);
    assert!(
        stderr(&o).contains("takes effect with the snapshot"),
        "{}",
        stderr(&o)
    );
    assert_eq!(sim.calls("ReconfigVM_Task"), 1);
    assert!(sim.snapshots(sim.vm()).is_empty());
}

/// A run of 40 hex digits: the shape of the simulator's session tokens.
fn has_token_shape(text: &str) -> bool {
    let mut run = 0;
    for c in text.chars() {
        run = if c.is_ascii_hexdigit() { run + 1 } else { 0 };
        if run >= 40 {
            return true;
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_never_reach_verbose_output() {
    // Both ways into the file service: the VI/JSON token as its cookie, and (when it refuses
    // that) its own basic-auth login, whose password and cookie must not show either.
    for takes_token in [true, false] {
        let (dir, sim) = start(|d| SimConfig {
            folder_takes_api_token: takes_token,
            ..SimConfig::for_tests(d)
        })
        .await;
        let out = out_dir(&dir);
        sim.write(sim.vm(), 2001, 1_000, &[1; 5_000]).unwrap();
        let url = sim.url();
        let ca = sim.ca_path().to_str().unwrap().to_owned();
        let o = cbtstream(
            Some(sim.password()),
            &[
                "-vv",
                "export",
                "--vsphere",
                &url,
                "--vm",
                sim.vm(),
                "--disk",
                "2001",
                "-o",
                out.join("d.cbts").to_str().unwrap(),
                "--user",
                sim.user(),
                "--vsphere-ca",
                &ca,
                "--quiesce",
            ],
        )
        .await;
        went_through(&o);
        let e = stderr(&o);
        assert!(
            e.contains("vSphere call") && e.contains("QueryChangedDiskAreas"),
            "{e}"
        );
        assert_eq!(sim.calls("folder basic auth"), u64::from(!takes_token));
        if !takes_token {
            assert!(e.contains("logged in to the datastore file service"), "{e}");
        }
        assert!(!e.contains(sim.password()), "the password leaked");
        let basic = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            sim.user(),
            sim.password()
        ));
        assert!(!e.contains(&basic), "the basic credentials leaked");
        assert!(!has_token_shape(&e), "a session token leaked: {e}");
        assert!(
            !e.to_ascii_lowercase().contains("vmware_soap_session="),
            "{e}"
        );
        assert!(sim.snapshots(sim.vm()).is_empty());
        assert!(out.join("d.cbts").exists());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn export_of_a_disk_the_vm_does_not_have_is_refused_before_any_snapshot() {
    let (dir, sim) = start_default().await;
    let out = out_dir(&dir);
    let url = sim.url();
    let ca = sim.ca_path().to_str().unwrap().to_owned();
    let o = cbtstream(
        Some(sim.password()),
        &[
            "export",
            "--vsphere",
            &url,
            "--vm",
            &sim.vm_instance_uuid(),
            "--disk",
            "2007",
            "-o",
            out.join("d.cbts").to_str().unwrap(),
            "--user",
            sim.user(),
            "--vsphere-ca",
            &ca,
        ],
    )
    .await;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("VM vm-42 has no disk with key 2007 (its disks: 2000, 2001)"),
        "{}",
        stderr(&o)
    );
    assert_eq!(sim.calls("CreateSnapshotEx_Task"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn update_paths_prints_the_files_it_could_not_update() {
    let (_dir, sim) = start_default().await;
    sim.add_unupdatable_file("[ds2] old/old.vmx");
    sim.add_unupdatable_file("[ds2] old/old_1.vmdk");
    let url = sim.url();
    let ca = sim.ca_path().to_str().unwrap().to_owned();
    let update = |ds: &'static str| {
        let (url, ca) = (url.clone(), ca.clone());
        let sim = &sim;
        async move {
            cbtstream(
                Some(sim.password()),
                &[
                    "vsphere",
                    "update-paths",
                    "--vsphere",
                    &url,
                    "--datastore",
                    ds,
                    "--map",
                    "/vmfs/volumes/5f00aaaa-old=datastore-12",
                    "--user",
                    sim.user(),
                    "--vsphere-ca",
                    &ca,
                ],
            )
            .await
        }
    };
    let o = update("datastore-12").await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let stdout = String::from_utf8(o.stdout.clone()).unwrap();
    let files: Vec<&str> = stdout
        .lines()
        .map(|l| l.split('\t').next().unwrap())
        .collect();
    assert_eq!(files, ["[ds2] old/old.vmx", "[ds2] old/old_1.vmdk"]);
    assert!(stderr(&o).contains("2 file(s) could not be updated"));
    // ds1 has a registered VM: the server refuses, and says why.
    let o = update("datastore-11").await;
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("ResourceInUse"), "{}", stderr(&o));
}

/// `gc --vsphere URL --vm vm-42 --user U --vsphere-ca CA EXTRA...`.
async fn gc(sim: &Simulator, extra: &[&str]) -> Output {
    run(sim, "gc", extra).await
}

#[tokio::test(flavor = "multi_thread")]
async fn gc_removes_the_snapshot_a_failed_removal_left_once_the_chain_is_locked() {
    let (dir, sim) = start_default().await;
    let out = out_dir(&dir);
    let state = dir.path().join("vm.json");
    let st = state.to_str().unwrap();
    went_through(&backup(&sim, &out, &["--state", st]).await);
    sim.fail_next("RemoveSnapshot_Task", "InvalidState");
    went_through(&backup(&sim, &out, &["--state", st]).await);
    let left = sim.snapshots(sim.vm());
    assert_eq!(left.len(), 1);

    // The next backup cannot read delta links, and says which command clears them.
    let o = backup(&sim, &out, &["--state", st]).await;
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("left by an interrupted cbtstream run")
            && e.contains(&format!("cbtstream gc --vsphere URL --vm {}", sim.vm())),
        "{e}"
    );

    let o = gc(&sim, &["--dry-run"]).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stdout(&o).starts_with(&format!("would remove snapshot {} \"cbtstream-", left[0])),
        "{}",
        stdout(&o)
    );
    // Without the chain's lock a running backup could own it: listed, kept.
    let o = gc(&sim, &[]).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("or --force"), "{}", stdout(&o));
    // A state file that is not there locks nothing: refused.
    let o = gc(
        &sim,
        &["--state", dir.path().join("nope.json").to_str().unwrap()],
    )
    .await;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("no chain state at"), "{}", stderr(&o));
    assert_eq!(sim.snapshots(sim.vm()), left);

    let o = gc(&sim, &["--state", st]).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stdout(&o).starts_with(&format!("removed snapshot {}", left[0])),
        "{}",
        stdout(&o)
    );
    assert!(sim.snapshots(sim.vm()).is_empty());
    went_through(&backup(&sim, &out, &["--state", st]).await);
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn gc_never_touches_a_snapshot_cbtstream_did_not_take() {
    let (_dir, sim) = start_default().await;
    let user_snap = sim.take_snapshot(sim.vm(), "cbtstream-not-a-uuid").unwrap();
    let o = gc(&sim, &["--force"]).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stdout(&o).contains(&format!("kept snapshot {user_snap}"))
            && stdout(&o).contains("not taken by cbtstream"),
        "{}",
        stdout(&o)
    );
    assert_eq!(sim.snapshots(sim.vm()), [user_snap]);
    assert_eq!(sim.calls("RemoveSnapshot_Task"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_answer_to_the_snapshot_call_still_removes_the_snapshot() {
    // vCenter takes the snapshot but a proxy answers 504: the run does not know the task. Each
    // task state lasts a second, so the snapshot is not there yet when the run ends its try.
    let (dir, sim) = start(|d| SimConfig {
        task_delay: std::time::Duration::from_secs(1),
        ..SimConfig::for_tests(d)
    })
    .await;
    let out = out_dir(&dir);
    sim.lose_answer_next("CreateSnapshotEx_Task");
    let o = backup(&sim, &out, &[]).await;
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("504"), "{}", stderr(&o));
    assert_eq!(sim.calls("CreateSnapshotEx_Task"), 1);
    assert_eq!(sim.calls("RemoveSnapshot_Task"), 1, "{}", stderr(&o));
    assert!(sim.snapshots(sim.vm()).is_empty());
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
}
