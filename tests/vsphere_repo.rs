//! `backup --vsphere --repo` with the chain state kept in the repository (no `--state`):
//! incrementals build on the repository's `vms/<vm>/state.json`, every point restores
//! byte-identical from the repository, and prune keeps the point the chain state names.

#[path = "vsphere_env/mod.rs"]
mod vsphere_env;

use cbtstream_vsphere_sim::{SimConfig, Simulator};
use serde_json::Value;
use std::path::Path;
use std::process::Output;
use vsphere_env::{command, stderr, BIN};

/// `cbtstream ARGS` (no vCenter): exit 0 or the test fails.
fn cbt(args: &[&str]) -> Output {
    let o = std::process::Command::new(BIN)
        .args(args)
        .env_remove("CBTSTREAM_LOG")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
    o
}

async fn backup(sim: &Simulator, repo: &str) -> Output {
    command(sim, "backup", &["--repo", repo])
        .output()
        .await
        .unwrap()
}

fn list(repo: &str) -> Vec<Value> {
    let o = cbt(&["list", "--repo", repo, "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    v.as_array().unwrap().clone()
}

/// Every disk of `point` restored from the repository equals `expected`.
fn restore_and_compare(
    repo: &str,
    vm: &str,
    point: &str,
    expected: &[(i32, Vec<u8>)],
    work: &Path,
) {
    let to = work.join(point);
    std::fs::create_dir_all(&to).unwrap();
    cbt(&[
        "restore",
        "--repo",
        repo,
        "--vm",
        vm,
        "--point",
        point,
        "--to",
        to.to_str().unwrap(),
    ]);
    for (key, want) in expected {
        let got = std::fs::read(to.join(format!("disk{key}.raw"))).unwrap();
        assert!(got == *want, "disk {key} of point {point} differs");
    }
}

fn disks_now(sim: &Simulator) -> Vec<(i32, Vec<u8>)> {
    sim.disks()
        .iter()
        .map(|&(key, _)| (key, sim.read_disk(sim.vm(), key).unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chain_state_lives_in_the_repository_and_prune_keeps_its_point() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::start(SimConfig::for_tests(dir.path().join("ds")))
        .await
        .unwrap();
    let repo_path = dir.path().join("repo");
    let repo = repo_path.to_str().unwrap();
    let work = dir.path().join("w");
    cbt(&["repo", "init", repo]);
    let vm = sim.vm();
    let state_path = repo_path.join("vms").join(vm).join("state.json");
    let mut expected = Vec::new();
    let mut second_state = Vec::new();
    for round in 0..3u64 {
        for &(key, capacity) in &sim.disks() {
            let at = (round * 131_071 + 4_097) % (capacity - 70_000);
            sim.write(vm, key, at, &[round as u8 + 1; 65_537]).unwrap();
        }
        expected.push(disks_now(&sim));
        let o = backup(&sim, repo).await;
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        sim.write(vm, sim.disks()[0].0, 0, b"after the snapshot")
            .unwrap();
        if round == 1 {
            second_state = std::fs::read(&state_path).unwrap();
        }
    }
    let points = list(repo);
    assert_eq!(points.len(), 3);
    let ids: Vec<String> = points
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(points[0]["base"].is_null());
    assert_eq!(points[1]["base"], points[0]["id"]);
    assert_eq!(points[2]["base"], points[1]["id"]);
    let state: Value = serde_json::from_slice(&std::fs::read(&state_path).unwrap()).unwrap();
    assert_eq!(
        (state["source"].as_str(), state["point"].as_str()),
        (Some("vsphere"), Some(ids[2].as_str()))
    );
    for (id, want) in ids.iter().zip(&expected) {
        restore_and_compare(repo, vm, id, want, &work);
    }

    // As if the third backup had died before its state: the chain state names the second
    // point. Prune to one point keeps the newest AND the state's (merged into a full), and
    // the next backup is an incremental on the state's point.
    std::fs::write(&state_path, &second_state).unwrap();
    cbt(&["prune", "--repo", repo, "--keep-last", "1"]);
    let kept: Vec<String> = list(repo)
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kept, [ids[1].clone(), ids[2].clone()]);
    restore_and_compare(repo, vm, &ids[1], &expected[1], &work.join("pruned"));
    restore_and_compare(repo, vm, &ids[2], &expected[2], &work.join("pruned"));
    sim.write(vm, sim.disks()[1].0, 99_999, &[9; 1_000])
        .unwrap();
    let want = disks_now(&sim);
    let o = backup(&sim, repo).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let state: Value = serde_json::from_slice(&std::fs::read(&state_path).unwrap()).unwrap();
    let last = state["point"].as_str().unwrap().to_owned();
    let points = list(repo);
    let new = points.iter().find(|p| p["id"] == last.as_str()).unwrap();
    assert_eq!(new["base"], ids[1].as_str());
    restore_and_compare(repo, vm, &last, &want, &work.join("after"));
    // gc of the chain in the repository: nothing left behind to remove.
    let o = command(&sim, "gc", &["--repo", repo])
        .output()
        .await
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        o.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(sim.snapshots(vm).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_whose_last_point_left_the_directory_starts_over_with_a_full() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::start(SimConfig::for_tests(dir.path().join("ds")))
        .await
        .unwrap();
    let (out, state) = (dir.path().join("out"), dir.path().join("vm.json"));
    std::fs::create_dir(&out).unwrap();
    let target = [
        "--out",
        out.to_str().unwrap(),
        "--state",
        state.to_str().unwrap(),
    ];
    let backup = || async {
        let o = command(&sim, "backup", &target).output().await.unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        o
    };
    sim.write(sim.vm(), 2000, 4_096, &[1; 70_000]).unwrap();
    backup().await;
    let first: Value = serde_json::from_slice(&std::fs::read(state.as_path()).unwrap()).unwrap();
    let gone = first["point"].as_str().unwrap().to_owned();
    std::fs::remove_dir_all(out.join(&gone)).unwrap();
    sim.write(sim.vm(), 2001, 99_999, &[2; 1_000]).unwrap();
    let o = backup().await;
    assert!(
        stderr(&o).contains(&format!("the chain's last point {gone} is not in")),
        "{}",
        stderr(&o)
    );
    let second: Value = serde_json::from_slice(&std::fs::read(state.as_path()).unwrap()).unwrap();
    let id = second["point"].as_str().unwrap();
    let info: Value =
        serde_json::from_slice(&std::fs::read(out.join(id).join("point.json")).unwrap()).unwrap();
    assert!(info["base"].is_null(), "{info}");
    assert!(info["disks"]
        .as_array()
        .unwrap()
        .iter()
        .all(|d| d["base"].is_null()));
    // Restored from that one full point: the disks as they are.
    for (key, want) in disks_now(&sim) {
        let image = dir.path().join(format!("{key}.raw"));
        cbt(&[
            "restore",
            "--to",
            image.to_str().unwrap(),
            out.join(id)
                .join(format!("disk-{key}.cbts"))
                .to_str()
                .unwrap(),
        ]);
        assert!(std::fs::read(&image).unwrap() == want, "disk {key} differs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_given_by_its_uuid_is_kept_under_its_moid() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::start(SimConfig::for_tests(dir.path().join("ds")))
        .await
        .unwrap();
    let repo_path = dir.path().join("repo");
    let repo = repo_path.to_str().unwrap();
    cbt(&["repo", "init", repo]);
    let uuid = sim.vm_instance_uuid().to_owned();
    let by_uuid = |n: u8| {
        sim.write(sim.vm(), 2000, u64::from(n) * 70_000, &[n; 5_000])
            .unwrap();
        let mut cmd = tokio::process::Command::new(BIN);
        cmd.args(vsphere_env::args_for(
            &sim,
            &uuid,
            "backup",
            &["--repo", repo],
        ))
        .env("VSPHERE_PASSWORD", sim.password())
        .env_remove("CBTSTREAM_LOG");
        cmd
    };
    for n in 1..=2u8 {
        let o = by_uuid(n).output().await.unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    }
    let points = list(repo);
    assert_eq!(points.len(), 2);
    assert!(points.iter().all(|p| p["vm"] == sim.vm()));
    assert_eq!(points[1]["base"], points[0]["id"]);
    assert!(repo_path
        .join("vms")
        .join(sim.vm())
        .join("state.json")
        .exists());
    assert!(!repo_path.join("vms").join(&uuid).exists());
}
