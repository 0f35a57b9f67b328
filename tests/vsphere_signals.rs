//! `backup --vsphere` stopped by SIGTERM at each moment it holds something on vCenter: the
//! snapshot is removed (once it exists), the chain state is left as it was, no point is
//! stored. The simulator's `hold` keeps an answer back, so the signal lands exactly where
//! the test wants it, with no timing guesses.

#[path = "vsphere_env/mod.rs"]
mod vsphere_env;

use cbtstream_vsphere_sim::{SimConfig, Simulator};
use std::path::{Path, PathBuf};
use std::process::Output;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, ChildStderr};
use vsphere_env::*;

fn spawn_backup(sim: &Simulator, out: &Path, state: &Path) -> Child {
    let target = [
        "--out",
        out.to_str().unwrap(),
        "--state",
        state.to_str().unwrap(),
    ];
    command(sim, "backup", &target)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Polls the simulator's call counter until `method` was called more than `before` times
/// (a condition, not a timing guess); a child that exits first fails the test.
async fn until_called(sim: &Simulator, method: &str, before: u64, child: &mut Child) {
    while sim.calls(method) == before {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("cbtstream ended ({status}) before calling {method}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

fn sigterm(child: &Child) {
    let pid = child.id().unwrap() as libc::pid_t;
    // SAFETY: kill(2) on the child we spawned and have not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
}

/// Reads the child's stderr up to a line containing `needle`; returns what it read.
async fn read_until(stderr: &mut BufReader<ChildStderr>, needle: &str) -> String {
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        let n = stderr.read_line(&mut line).await.unwrap();
        assert!(n > 0, "stderr ended before {needle:?}: {seen}");
        seen.push_str(&line);
        if line.contains(needle) {
            return seen;
        }
    }
}

/// Waits for the child, its stderr being what `read_until` left plus the rest.
async fn finish(mut child: Child, mut stderr: BufReader<ChildStderr>, seen: String) -> Output {
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).await.unwrap();
    let status = child.wait().await.unwrap();
    Output {
        status,
        stdout: Vec::new(),
        stderr: (seen + &rest).into_bytes(),
    }
}

fn interrupted(o: &Output) {
    assert_eq!(o.status.code(), Some(130), "{}", stderr(o));
    assert!(
        stderr(o).contains("interrupted by SIGTERM; nothing was committed"),
        "{}",
        stderr(o)
    );
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_while_the_snapshot_task_runs_removes_the_snapshot_once_it_exists() {
    // The task's progress reads are held: the signal comes while the run waits for the task.
    let (dir, sim) = start(|d| SimConfig::for_tests(d)).await;
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let state = dir.path().join("vm.json");
    sim.hold("GET info");
    let mut child = spawn_backup(&sim, &out, &state);
    let mut err = BufReader::new(child.stderr.take().unwrap());
    until_called(&sim, "GET info", 0, &mut child).await;
    assert_eq!(sim.calls("CreateSnapshotEx_Task"), 1);
    sigterm(&child);
    let seen = read_until(
        &mut err,
        "interrupted: removing what this run created on vCenter",
    )
    .await;
    sim.let_go("GET info");
    let o = finish(child, err, seen).await;
    interrupted(&o);
    assert_eq!(sim.calls("RemoveSnapshot_Task"), 1);
    assert!(sim.snapshots(sim.vm()).is_empty());
    assert!(!state.exists());
    assert!(entries(&out).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_while_the_snapshot_call_awaits_its_answer_still_removes_the_snapshot() {
    // vCenter has created the task; its answer (the task's id) is on its way when the signal
    // comes. A run that dropped the call there would never learn of the snapshot.
    let (dir, sim) = start(|d| SimConfig::for_tests(d)).await;
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let state = dir.path().join("vm.json");
    sim.hold("CreateSnapshotEx_Task");
    let mut child = spawn_backup(&sim, &out, &state);
    let mut err = BufReader::new(child.stderr.take().unwrap());
    until_called(&sim, "CreateSnapshotEx_Task", 0, &mut child).await;
    sigterm(&child);
    let seen = read_until(
        &mut err,
        "interrupted: removing what this run created on vCenter",
    )
    .await;
    sim.let_go("CreateSnapshotEx_Task");
    let o = finish(child, err, seen).await;
    interrupted(&o);
    assert_eq!(sim.calls("RemoveSnapshot_Task"), 1, "{}", stderr(&o));
    assert!(sim.snapshots(sim.vm()).is_empty());
    assert!(!state.exists());
    assert!(entries(&out).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_mid_export_removes_the_snapshot_and_leaves_the_state_and_the_points() {
    let (dir, sim) = start(|d| SimConfig::for_tests(d)).await;
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let state = dir.path().join("vm.json");
    let o = spawn_backup(&sim, &out, &state)
        .wait_with_output()
        .await
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let state_before = std::fs::read(&state).unwrap();
    let points_before = entries(&out);
    sim.write(sim.vm(), 2000, 12_345, &[7u8; 100_000]).unwrap();

    // The file service's answers wait: the signal lands while the frozen disk is read.
    let reads_before = sim.calls("GET /folder");
    sim.hold("GET /folder");
    let mut child = spawn_backup(&sim, &out, &state);
    let mut err = BufReader::new(child.stderr.take().unwrap());
    until_called(&sim, "GET /folder", reads_before, &mut child).await;
    sigterm(&child);
    let seen = read_until(
        &mut err,
        "interrupted: removing what this run created on vCenter",
    )
    .await;
    let o = finish(child, err, seen).await;
    sim.let_go("GET /folder");
    interrupted(&o);
    assert_eq!(sim.calls("RemoveSnapshot_Task"), 2, "{}", stderr(&o));
    assert!(sim.snapshots(sim.vm()).is_empty());
    assert_eq!(std::fs::read(&state).unwrap(), state_before);
    assert_eq!(entries(&out), points_before);
}

#[tokio::test(flavor = "multi_thread")]
async fn gc_with_the_chain_state_is_refused_while_a_backup_of_the_chain_runs() {
    let (dir, sim) = start(|d| SimConfig::for_tests(d)).await;
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let state = dir.path().join("vm.json");
    let o = spawn_backup(&sim, &out, &state)
        .wait_with_output()
        .await
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    sim.write(sim.vm(), 2000, 0, &[3; 10_000]).unwrap();
    // A backup of the chain is reading its snapshot: gc with the chain's state is refused
    // (the lock is held) and removes nothing.
    let reads = sim.calls("GET /folder");
    sim.hold("GET /folder");
    let mut child = spawn_backup(&sim, &out, &state);
    until_called(&sim, "GET /folder", reads, &mut child).await;
    let o = run(&sim, "gc", &["--state", state.to_str().unwrap()]).await;
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
    assert_eq!(sim.snapshots(sim.vm()).len(), 1);
    sim.let_go("GET /folder");
    let o = child.wait_with_output().await.unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(sim.snapshots(sim.vm()).is_empty());
}
