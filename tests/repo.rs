//! The repository (`repo init`, `backup --repo`, `list`) on a local directory: points stored
//! under their VM, point.json last, the chain state kept in the repository.

mod common;
#[path = "xapi_env/mod.rs"]
mod xapi_env;

use common::*;
use std::path::Path;
use xapi_env::*;

fn list_json(repo: &str) -> Vec<serde_json::Value> {
    let o = ok(run(&["list", "--repo", repo, "--json"]));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_into_a_local_repository_chain_and_list() {
    let e = env_with(|c| c.disks = 2).await;
    let repo = e.dir.join("repo");
    let repo_s = p(&repo).to_string();
    // Not a repository yet: refused, exit 2, nothing taken on the host.
    let o = e.backup_repo(&repo_s, &[]).await;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("repo init"), "{}", stderr(&o));
    assert!(e.sim.calls("VM.snapshot") == 0);
    ok(run(&["repo", "init", &repo_s]));
    let again = run(&["repo", "init", &repo_s]);
    assert_eq!(again.status.code(), Some(2));
    assert!(list_json(&repo_s).is_empty());

    let mut ids: Vec<String> = Vec::new();
    for round in 0..3u8 {
        e.guest_writes(round);
        ok(e.backup_repo(&repo_s, &[]).await);
        let points = list_json(&repo_s);
        assert_eq!(points.len(), usize::from(round) + 1, "{points:?}");
        let last = points.last().unwrap();
        assert_eq!(last["vm"], e.sim.vm_uuid());
        assert_eq!(last["disks"], 2);
        assert!(last["bytes"].as_u64().unwrap() > 0);
        if round == 0 {
            assert_eq!(last["kind"], "full");
            assert!(last["base"].is_null());
        } else {
            assert_eq!(last["kind"], "incremental");
            assert_eq!(last["base"].as_str(), ids.last().map(String::as_str));
        }
        ids.push(last["id"].as_str().unwrap().to_string());
    }
    // The layout: the state in the repository, every file private.
    let vm_dir = repo.join("vms").join(e.sim.vm_uuid());
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(vm_dir.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["point"].as_str(), ids.last().map(String::as_str));
    for id in &ids {
        let dir = vm_dir.join("points").join(id);
        for f in ["point.json", "metadata.xva", "disk0.cbts", "disk1.cbts"] {
            assert_private(&dir.join(f));
        }
    }
    let table = String::from_utf8(ok(run(&["list", "--repo", &repo_s])).stdout).unwrap();
    assert!(
        table.contains(&ids[2]) && table.contains("incremental"),
        "{table}"
    );
}

fn assert_private(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{}", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_of_one_disk_are_points_under_the_vdi() {
    let e = env().await;
    let repo = e.dir.join("repo");
    let repo_s = p(&repo).to_string();
    ok(run(&["repo", "init", &repo_s]));
    let images = e.dir.join("img.raw");
    let mut streams = Vec::new();
    for round in 0..2u8 {
        e.guest_writes(round);
        ok(e.export_to(&["--repo", &repo_s]).await);
        let points = list_json(&repo_s);
        assert_eq!(points.len(), usize::from(round) + 1, "{points:?}");
        let last = points.last().unwrap();
        assert_eq!(last["vm"], e.sim.vdi_uuid());
        assert_eq!(
            last["kind"],
            if round == 0 { "full" } else { "incremental" }
        );
        let stream = repo
            .join("vms")
            .join(e.sim.vdi_uuid())
            .join("points")
            .join(last["id"].as_str().unwrap())
            .join("disk0.cbts");
        streams.push(stream.clone());
        ok(run(&["restore", "--to", p(&images), p(&stream)]));
        assert_same(&images, &e.live_image());
    }
    // The chain state of the disk lives in the repository; the host keeps one base.
    let chain = repo.join("vms").join(e.sim.vdi_uuid()).join("chain.json");
    assert_eq!(
        state_base(&chain),
        list_json(&repo_s)[1]["id"].as_str().unwrap()
    );
    // --repo is for --xapi exports; an export to a repository cannot also go to a file.
    let o = run(&[
        "export",
        "--nbd",
        "nbd://127.0.0.1/x",
        "--full",
        "--repo",
        &repo_s,
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = e.export_to(&["--repo", &repo_s, "-o", "x.cbts"]).await;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

/// A backup into a repository killed mid-transfer: `gc --vm --repo` finds the chain state in
/// the repository, keeps its bases and removes the rest; the repository's leftovers go with
/// the next backup, which chains on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_of_a_killed_backup_uses_the_state_in_the_repository() {
    let e = env_with(|c| c.disks = 2).await;
    let repo = e.dir.join("repo");
    let repo_s = p(&repo).to_string();
    ok(run(&["repo", "init", &repo_s]));
    e.guest_writes(0);
    ok(e.backup_repo(&repo_s, &[]).await);
    e.guest_writes(1);
    e.kill_backup_mid_transfer(&["--repo", &repo_s]).await;
    assert_eq!(e.snapshot_vms(), 1);
    // The killed run's streams are in the repository, without point.json: not a point.
    assert_eq!(list_json(&repo_s).len(), 1);
    let o = ok(e
        .command(
            &["gc", "--xapi", &e.sim.url()],
            false,
            &["--vm", e.sim.vm_uuid(), "--repo", &repo_s],
        )
        .await);
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(text.contains("removed snapshot VM"), "{text}");
    assert_eq!(e.snapshot_vms(), 0);
    // The bases stayed: the next backup is an incremental of the committed point.
    let points_dir = repo.join("vms").join(e.sim.vm_uuid()).join("points");
    assert_eq!(
        std::fs::read_dir(&points_dir).unwrap().count(),
        1,
        "gc cleared the leftovers"
    );
    ok(e.backup_repo(&repo_s, &[]).await);
    let points = list_json(&repo_s);
    assert_eq!(points.len(), 2);
    assert_eq!(points[1]["kind"], "incremental");
    assert_eq!(points[1]["base"], points[0]["id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_whose_last_point_left_the_repository_starts_over_with_a_full() {
    // The chain state is a file the repository cannot see: a prune (or a hand) may take the
    // point it names. An incremental on it could never be restored; a full is made instead.
    let e = env_with(|c| c.disks = 2).await;
    let repo = e.dir.join("repo");
    let repo_s = p(&repo).to_string();
    let state = e.dir.join("chain.json");
    ok(run(&["repo", "init", &repo_s]));
    for round in 0..2u8 {
        e.guest_writes(round);
        ok(e.backup_repo(&repo_s, &["--state", p(&state)]).await);
    }
    let gone = list_json(&repo_s)[1]["id"].as_str().unwrap().to_string();
    let vm_dir = repo.join("vms").join(e.sim.vm_uuid());
    std::fs::remove_dir_all(vm_dir.join("points").join(&gone)).unwrap();
    e.guest_writes(2);
    let o = ok(e.backup_repo(&repo_s, &["--state", p(&state)]).await);
    let err = stderr(&o);
    assert!(
        err.contains(&format!(
            "the chain's last point {gone} is not in the repository"
        )) && err.contains("a full one"),
        "{err}"
    );
    // The simulator's clock stands still: the new point is the one the state names.
    let new_point = |state: &Path| -> String {
        let chain: serde_json::Value =
            serde_json::from_slice(&std::fs::read(state).unwrap()).unwrap();
        chain["point"].as_str().unwrap().to_string()
    };
    let id = new_point(&state);
    let points = list_json(&repo_s);
    let new = points.iter().find(|p| p["id"] == id.as_str()).unwrap();
    assert_eq!(
        (new["kind"].as_str(), &new["base"]),
        (Some("full"), &serde_json::Value::Null)
    );
    let to = e.dir.join("restored");
    std::fs::create_dir(&to).unwrap();
    let vm = e.sim.vm_uuid();
    ok(run(&[
        "restore",
        "--repo",
        &repo_s,
        "--vm",
        vm,
        "--point",
        &id,
        "--to",
        p(&to),
    ]));
    for (slot, vdi) in e.sim.disks().iter().enumerate() {
        assert_same(
            &to.join(format!("disk{slot}.raw")),
            &e.sim.vdi_path(vdi).unwrap(),
        );
    }
    // The next backup chains on the new full again.
    e.guest_writes(3);
    ok(e.backup_repo(&repo_s, &["--state", p(&state)]).await);
    let next = new_point(&state);
    let points = list_json(&repo_s);
    let next = points.iter().find(|p| p["id"] == next.as_str()).unwrap();
    assert_eq!(next["base"], id.as_str());
}
