//! vSphere backups end to end on the simulator: a VM with two disks (the second not a
//! multiple of 64 KiB), a full backup and three incrementals with guest writes of odd sizes
//! and offsets between them; every point restores byte-identical to the disks as they were
//! at its snapshot; no snapshot is left on the VM; a CBT reset breaks the chain (a clear
//! error, or a full with --fallback-full).

#[path = "vsphere_env/mod.rs"]
mod vsphere_env;

use cbtstream_vsphere_sim::{SimConfig, Simulator};
use std::path::{Path, PathBuf};
use std::process::Output;
use vsphere_env::*;

fn backup_command(
    sim: &Simulator,
    out: &Path,
    state: &Path,
    extra: &[&str],
) -> tokio::process::Command {
    let mut all = vec![
        "--out",
        out.to_str().unwrap(),
        "--state",
        state.to_str().unwrap(),
    ];
    all.extend_from_slice(extra);
    command(sim, "backup", &all)
}

async fn backup(sim: &Simulator, out: &Path, state: &Path, extra: &[&str]) -> Output {
    backup_command(sim, out, state, extra)
        .output()
        .await
        .unwrap()
}

fn point_json(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("point.json")).unwrap()).unwrap()
}

/// The one point directory in `out` that is not in `known`.
fn newest_point(out: &Path, known: &[PathBuf]) -> PathBuf {
    let mut fresh: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !known.contains(p))
        .collect();
    assert_eq!(fresh.len(), 1, "{fresh:?}");
    fresh.pop().unwrap()
}

/// Odd-sized writes at odd offsets on both disks, the last bytes of the odd-sized disk too.
fn guest_writes(sim: &Simulator, round: u64) {
    let disks = sim.disks();
    for (i, &(key, capacity)) in disks.iter().enumerate() {
        let data = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|j| (j as u64 * 31 + round * 7 + i as u64) as u8)
                .collect()
        };
        sim.write(sim.vm(), key, 65_536 - 333 + round * 10_001, &data(4_999))
            .unwrap();
        sim.write(
            sim.vm(),
            key,
            (round + 3) * 300_017 % (capacity / 2),
            &data(70_001),
        )
        .unwrap();
        sim.write(sim.vm(), key, capacity - 7 - round, &data(5))
            .unwrap();
    }
}

/// Restores every disk of the point in `dirs.last()` from its chain of streams (the point
/// directories `dirs`, oldest first) and compares with `expected` (per disk key).
fn restore_and_compare(dirs: &[PathBuf], expected: &[(i32, Vec<u8>)], work: &Path) {
    let last = point_json(dirs.last().unwrap());
    for disk in last["disks"].as_array().unwrap() {
        let key: i32 = disk["slot"].as_str().unwrap().parse().unwrap();
        let mut streams = Vec::new();
        let (mut entry, mut at) = (disk.clone(), dirs.len() - 1);
        loop {
            streams.push(dirs[at].join(entry["stream"].as_str().unwrap()));
            let Some(base) = entry["base"].as_str() else {
                break;
            };
            at = dirs
                .iter()
                .position(|d| point_json(d)["id"] == base)
                .expect("the base point is one of ours");
            entry = point_json(&dirs[at])["disks"]
                .as_array()
                .unwrap()
                .iter()
                .find(|d| d["id"] == disk["id"])
                .unwrap()
                .clone();
        }
        streams.reverse();
        let image = work.join(format!("{key}.raw"));
        let _ = std::fs::remove_file(&image);
        let _ = std::fs::remove_file(work.join(format!("{key}.raw.cbtstream")));
        let mut args = vec![
            "restore".to_string(),
            "--to".into(),
            image.display().to_string(),
        ];
        args.extend(streams.iter().map(|s| s.display().to_string()));
        let o = std::process::Command::new(BIN)
            .args(&args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let want = &expected.iter().find(|(k, _)| *k == key).unwrap().1;
        let got = std::fs::read(&image).unwrap();
        assert!(got == *want, "disk {key} of point {} differs", last["id"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_and_three_incrementals_restore_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::start(SimConfig::for_tests(dir.path().join("ds")))
        .await
        .unwrap();
    assert!(sim.disks().iter().any(|&(_, c)| c % 65_536 != 0));
    let (out, state, work) = (
        dir.path().join("out"),
        dir.path().join("vm.json"),
        dir.path().join("w"),
    );
    std::fs::create_dir(&out).unwrap();
    std::fs::create_dir(&work).unwrap();
    let mut dirs = Vec::new();
    for round in 0..4u64 {
        guest_writes(&sim, round);
        let expected: Vec<(i32, Vec<u8>)> = sim
            .disks()
            .iter()
            .map(|&(key, _)| (key, sim.read_disk(sim.vm(), key).unwrap()))
            .collect();
        let o = backup(&sim, &out, &state, &[]).await;
        assert!(o.status.success(), "{}", stderr(&o));
        // Written after the snapshot: not in this point.
        guest_writes(&sim, round + 100);
        let point = newest_point(&out, &dirs);
        let info = point_json(&point);
        assert_eq!(info["disks"].as_array().unwrap().len(), 2);
        if round == 0 {
            assert!(info["base"].is_null(), "{info}");
        } else {
            assert_eq!(info["base"], point_json(dirs.last().unwrap())["id"]);
        }
        dirs.push(point);
        restore_and_compare(&dirs, &expected, &work);
        assert!(sim.snapshots(sim.vm()).is_empty(), "a snapshot was left");
    }
    assert_eq!(sim.calls("CreateSnapshotEx_Task"), 4);
    assert_eq!(sim.calls("RemoveSnapshot_Task"), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cbt_reset_breaks_the_chain_and_fallback_full_starts_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    // A file service that refuses the VI/JSON token: every read goes through its own
    // basic-auth session cookie, and the points still restore byte-identical.
    let sim = Simulator::start(SimConfig {
        folder_takes_api_token: false,
        ..SimConfig::for_tests(dir.path().join("ds"))
    })
    .await
    .unwrap();
    let (out, state, work) = (
        dir.path().join("out"),
        dir.path().join("vm.json"),
        dir.path().join("w"),
    );
    std::fs::create_dir(&out).unwrap();
    std::fs::create_dir(&work).unwrap();
    guest_writes(&sim, 0);
    let o = backup(&sim, &out, &state, &[]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let first = newest_point(&out, &[]);
    let before = std::fs::read(&state).unwrap();
    guest_writes(&sim, 1);
    let (key, _) = sim.disks()[0];
    sim.reset_cbt(sim.vm(), key).unwrap();
    let o = backup(&sim, &out, &state, &[]).await;
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("--fallback-full"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&state).unwrap(), before, "the state moved");
    assert!(sim.snapshots(sim.vm()).is_empty());
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
    let expected: Vec<(i32, Vec<u8>)> = sim
        .disks()
        .iter()
        .map(|&(k, _)| (k, sim.read_disk(sim.vm(), k).unwrap()))
        .collect();
    let o = backup(&sim, &out, &state, &["--fallback-full"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let second = newest_point(&out, std::slice::from_ref(&first));
    let info = point_json(&second);
    let reset = info["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["slot"].as_str().and_then(|s| s.parse::<i32>().ok()) == Some(key))
        .unwrap()
        .clone();
    assert!(reset["base"].is_null(), "{info}");
    restore_and_compare(&[first, second], &expected, &work);
    // One file-service login per run that read, whatever its number of disks.
    assert_eq!(sim.calls("folder basic auth"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_expiring_mid_export_are_renewed_and_the_point_restores() {
    let dir = tempfile::tempdir().unwrap();
    // The datacenter in a folder too: the file service's dcPath is its inventory path.
    let sim = Simulator::start(SimConfig {
        datacenter_folder: Some("Europe West".into()),
        ..SimConfig::for_tests(dir.path().join("ds"))
    })
    .await
    .unwrap();
    let (out, state, work) = (
        dir.path().join("out"),
        dir.path().join("vm.json"),
        dir.path().join("w"),
    );
    std::fs::create_dir(&out).unwrap();
    std::fs::create_dir(&work).unwrap();
    guest_writes(&sim, 0);
    guest_writes(&sim, 1);
    let expected: Vec<(i32, Vec<u8>)> = sim
        .disks()
        .iter()
        .map(|&(k, _)| (k, sim.read_disk(sim.vm(), k).unwrap()))
        .collect();
    // The first reads are on their way when every session (and the API token the reads
    // carry) ends: the later reads are refused, and so is the next VI/JSON call.
    sim.hold("GET /folder");
    // One connection: its first two reads are held, the others go out after the expiry.
    let mut child = backup_command(&sim, &out, &state, &["--connections", "1"])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    while sim.calls("GET /folder") == 0 {
        assert!(child.try_wait().unwrap().is_none(), "cbtstream ended early");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    sim.expire_sessions();
    sim.let_go("GET /folder");
    let o = child.wait_with_output().await.unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(sim.calls("folder basic auth"), 1, "{}", stderr(&o));
    assert!(sim.snapshots(sim.vm()).is_empty(), "a snapshot was left");
    restore_and_compare(&[newest_point(&out, &[])], &expected, &work);
}
