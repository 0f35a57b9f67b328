//! `cbtstream prune` on a local repository: points forgotten, the oldest kept one merged into
//! a full point first, every remaining point restoring byte-identical to the VM's disks at
//! its time; killed at each of its steps, it leaves a repository whose listed points all
//! restore.

mod common;
#[path = "xapi_env/mod.rs"]
mod xapi_env;

use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use xapi_env::*;

/// A VM backed up into a repository, with each point's disk images as they were.
struct Backed {
    e: Env,
    repo: PathBuf,
    /// Point id -> disk id -> image of the disk at that point.
    images: BTreeMap<String, BTreeMap<String, PathBuf>>,
    /// Point ids, oldest first.
    ids: Vec<String>,
}

impl Backed {
    async fn new(disks: usize) -> Backed {
        let e = env_with(|c| c.disks = disks).await;
        let repo = e.dir.join("repo");
        ok(run(&["repo", "init", p(&repo)]));
        std::fs::create_dir(e.dir.join("images")).unwrap();
        Backed {
            e,
            repo,
            images: BTreeMap::new(),
            ids: Vec::new(),
        }
    }

    fn repo_s(&self) -> &str {
        p(&self.repo)
    }

    fn vm(&self) -> &str {
        self.e.sim.vm_uuid()
    }

    /// Guest writes (on every disk, overlapping earlier ones in part), then a backup 12 hours
    /// after the previous one (the first at 2026-11-18T11:06:40Z); the disks' images saved.
    async fn write_and_backup(&mut self) {
        let round = self.ids.len();
        self.e.guest_writes(round as u8);
        for (n, disk) in self.e.sim.disks().iter().enumerate().skip(1) {
            let data: Vec<u8> = (0..70_000u32)
                .map(|i| (i as u8) ^ (round as u8 * 7 + n as u8))
                .collect();
            self.e
                .sim
                .write(disk, 40_000 + round as u64 * 30_000, &data)
                .unwrap();
        }
        let epoch = (1_795_000_000 + round as u64 * 12 * 3600).to_string();
        let args = vec![
            "backup".to_string(),
            "--xapi".into(),
            self.e.sim.url(),
            "--xapi-ca".into(),
            p(self.e.sim.ca_path()).into(),
            "--vm".into(),
            self.vm().into(),
            "--repo".into(),
            self.repo_s().into(),
        ];
        let pw = self.e.sim.password().to_string();
        let o = tokio::task::spawn_blocking(move || {
            std::process::Command::new(BIN)
                .args(&args)
                .env("XAPI_PASSWORD", pw)
                .env("SOURCE_DATE_EPOCH", epoch)
                .env_remove("CBTSTREAM_LOG")
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        ok(o);
        let id = list_json(self.repo_s()).last().unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(!self.ids.contains(&id));
        let mut images = BTreeMap::new();
        for disk in self.e.sim.disks() {
            let img = self.e.dir.join("images").join(format!("{id}-{disk}.raw"));
            std::fs::copy(self.e.sim.vdi_path(&disk).unwrap(), &img).unwrap();
            images.insert(disk, img);
        }
        self.images.insert(id.clone(), images);
        self.ids.push(id);
    }

    fn points_dir(&self, repo: &Path) -> PathBuf {
        repo.join("vms").join(self.vm()).join("points")
    }

    /// Restores every point `list` shows from `repo` and compares it with the VM's disks
    /// at that time; the ids listed.
    fn assert_every_listed_point_restores(&self, repo: &Path, scratch: &Path) -> Vec<String> {
        let listed = list_json(p(repo));
        let mut ids = Vec::new();
        for point in &listed {
            let id = point["id"].as_str().unwrap().to_string();
            for (disk, streams) in disk_chains(&self.points_dir(repo), &id) {
                let img = scratch.join(format!("{id}-{disk}.restored"));
                let _ = std::fs::remove_file(&img);
                let _ =
                    std::fs::remove_file(scratch.join(format!("{id}-{disk}.restored.cbtstream")));
                let mut args = vec!["restore".to_string(), "--to".into(), p(&img).into()];
                args.extend(streams.iter().map(|s| p(s).to_string()));
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                ok(run(&args));
                assert_same(&img, &self.images[&id][&disk]);
            }
            ids.push(id);
        }
        ids
    }
}

fn list_json(repo: &str) -> Vec<Value> {
    let o = ok(run(&["list", "--repo", repo, "--json"]));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn point_json(points: &Path, id: &str) -> Value {
    let path = points.join(id).join("point.json");
    let text = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&text).unwrap()
}

/// For each disk of point `id`: the stream files restoring it, oldest first, found by
/// following each disk's `base` through the point directories (as `restore --repo` will).
fn disk_chains(points: &Path, id: &str) -> BTreeMap<String, Vec<PathBuf>> {
    let info = point_json(points, id);
    let mut out = BTreeMap::new();
    for d in info["disks"].as_array().unwrap() {
        let disk = d["id"].as_str().unwrap().to_string();
        let mut chain = Vec::new();
        let (mut pid, mut entry) = (id.to_string(), d.clone());
        loop {
            chain.push(points.join(&pid).join(entry["stream"].as_str().unwrap()));
            let Some(base) = entry["base"].as_str() else {
                break;
            };
            pid = base.to_string();
            let based = point_json(points, &pid);
            entry = based["disks"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["id"] == d["id"])
                .unwrap()
                .clone();
        }
        chain.reverse();
        out.insert(disk, chain);
    }
    out
}

fn prune(repo: &str, extra: &[&str]) -> Output {
    let mut args = vec!["prune", "--repo", repo];
    args.extend_from_slice(extra);
    run(&args)
}

fn prune_json(repo: &str, extra: &[&str]) -> Value {
    let mut args = vec!["--json"];
    args.extend_from_slice(extra);
    let o = ok(prune(repo, &args));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
    v[0].clone()
}

fn ids_of(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| {
            x.as_str()
                .unwrap_or_else(|| x["id"].as_str().unwrap())
                .to_string()
        })
        .collect()
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else {
                out.insert(
                    path.strip_prefix(dir).unwrap().to_path_buf(),
                    std::fs::read(&path).unwrap(),
                );
            }
        }
    }
    out
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    for rel in snapshot(from).into_keys() {
        let path = to.join(&rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        // std::fs::copy keeps the file's mode (0600).
        std::fs::copy(from.join(&rel), &path).unwrap();
    }
}

/// The files of the points' directories are exactly point.json, metadata.xva and the
/// streams point.json names, each 0600.
fn assert_no_strays(points: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(points).unwrap() {
        let dir = entry.unwrap().path();
        let id = dir.file_name().unwrap().to_str().unwrap().to_string();
        let info = point_json(points, &id);
        let mut want: Vec<String> = vec!["metadata.xva".into(), "point.json".into()];
        want.extend(
            info["disks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["stream"].as_str().unwrap().to_string()),
        );
        want.sort();
        let mut have: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_str().unwrap().to_string())
            .collect();
        have.sort();
        assert_eq!(have, want, "{}", dir.display());
        for f in have {
            let mode = std::fs::metadata(dir.join(&f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{}/{f}", dir.display());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_keep_last_3_of_8_merges_the_oldest_kept_and_every_point_restores() {
    let mut b = Backed::new(2).await;
    for _ in 0..8 {
        b.write_and_backup().await;
    }
    let points = b.points_dir(&b.repo);
    let scratch = b.e.dir.join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    // What `merge` makes of the chain of the point that becomes the oldest kept one.
    let oldest_kept = b.ids[5].clone();
    let mut expected = BTreeMap::new();
    for (disk, streams) in disk_chains(&points, &oldest_kept) {
        assert_eq!(streams.len(), 6);
        let out = scratch.join(format!("{disk}.merged"));
        let mut args = vec!["merge".to_string()];
        args.extend(streams.iter().map(|s| p(s).to_string()));
        args.extend(["-o".into(), p(&out).into(), "--json".into()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = ok(run(&args));
        let report: Value = serde_json::from_slice(&o.stderr).unwrap();
        expected.insert(disk, (std::fs::read(&out).unwrap(), report));
    }

    let v = prune_json(b.repo_s(), &["--keep-last", "3"]);
    assert_eq!(v["vm"], b.vm());
    assert_eq!(v["dry_run"], false);
    assert_eq!(ids_of(&v["kept"]), b.ids[5..]);
    assert_eq!(ids_of(&v["deleted"]).len(), 5);
    for id in &b.ids[..5] {
        assert!(ids_of(&v["deleted"]).contains(id));
        assert!(!points.join(id).exists(), "{id} is still there");
    }
    assert_eq!(ids_of(&v["merged"]), std::slice::from_ref(&oldest_kept));
    let streams = v["merged_streams"].as_array().unwrap();
    assert_eq!(streams.len(), 2, "{v}");
    let info = point_json(&points, &oldest_kept);
    assert!(info["base"].is_null(), "{info}");
    let mut written = 0;
    for s in streams {
        let disk = s["disk"].as_str().unwrap();
        let d = info["disks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"] == disk)
            .unwrap();
        assert!(d["base"].is_null());
        assert_eq!(d["stream"], s["stream"]);
        assert_eq!(d["sha256"], s["sha256"]);
        assert_eq!(
            s["stream"],
            format!("disk{}.full.cbts", d["slot"].as_str().unwrap())
        );
        // The merged full is what `merge` writes for the same chain, byte for byte, with
        // the same counts of records copied as stored and cut (recompressed).
        let (bytes, report) = &expected[disk];
        let stored = std::fs::read(
            points
                .join(&oldest_kept)
                .join(s["stream"].as_str().unwrap()),
        )
        .unwrap();
        assert!(
            stored == *bytes,
            "the merged stream of disk {disk} differs from merge's"
        );
        assert_eq!(s["bytes"].as_u64(), Some(bytes.len() as u64));
        assert_eq!(s["records_recompressed"], report["records_recompressed"]);
        assert_eq!(s["records_copied"], report["records_copied"]);
        assert!(s["records_recompressed"].as_u64().unwrap() > 0, "{s}");
        written += bytes.len() as u64;
    }
    assert_eq!(v["bytes_written"].as_u64(), Some(written));
    assert!(v["bytes_deleted"].as_u64().unwrap() > written);
    assert_eq!(
        v["bytes_freed"].as_i64().unwrap(),
        (v["bytes_deleted"].as_u64().unwrap() - written) as i64
    );

    // The list: a full point, then the two incrementals onto it.
    let listed = list_json(b.repo_s());
    let kinds: Vec<&str> = listed.iter().map(|x| x["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["full", "incremental", "incremental"]);
    assert_eq!(listed[1]["base"].as_str(), Some(oldest_kept.as_str()));
    assert_eq!(
        b.assert_every_listed_point_restores(&b.repo, &scratch),
        b.ids[5..]
    );
    assert_no_strays(&points);

    // A later backup chains onto the latest point, restores, and a second prune merges on.
    b.write_and_backup().await;
    let listed = list_json(b.repo_s());
    assert_eq!(
        listed.last().unwrap()["base"].as_str(),
        Some(b.ids[7].as_str())
    );
    let v = prune_json(b.repo_s(), &["--keep-last", "3"]);
    assert_eq!(ids_of(&v["deleted"]), [oldest_kept]);
    assert_eq!(ids_of(&v["merged"]), [b.ids[6].clone()]);
    assert_eq!(
        b.assert_every_listed_point_restores(&b.repo, &scratch),
        b.ids[6..]
    );
    assert_no_strays(&points);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_killed_at_each_step_leaves_every_listed_point_restorable() {
    let mut b = Backed::new(2).await;
    for _ in 0..5 {
        b.write_and_backup().await;
    }
    let scratch = b.e.dir.join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let work = b.e.dir.join("work");
    for step in PRUNE_STEPS {
        copy_dir(&b.repo, &work);
        let o = std::process::Command::new(BIN)
            .args(["prune", "--repo", p(&work), "--keep-last", "2"])
            .env("CBTSTREAM_TEST_KILL_AT", step)
            .env_remove("CBTSTREAM_LOG")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert_eq!(
            o.status.signal(),
            Some(9),
            "prune was not killed at {step}: {}",
            stderr(&o)
        );
        let listed = b.assert_every_listed_point_restores(&work, &scratch);
        // The two kept points are still there whatever the step.
        assert!(listed.ends_with(&b.ids[3..]), "after {step}: {listed:?}");
        // A prune run to the end then leaves the kept points only, restoring, and nothing
        // else in their directories.
        let v = prune_json(p(&work), &["--keep-last", "2"]);
        assert_eq!(ids_of(&v["kept"]), b.ids[3..], "after {step}");
        assert_eq!(
            b.assert_every_listed_point_restores(&work, &scratch),
            b.ids[3..]
        );
        assert_no_strays(&b.points_dir(&work));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_prints_the_plan_and_changes_nothing() {
    let mut b = Backed::new(1).await;
    for _ in 0..4 {
        b.write_and_backup().await;
    }
    let before = snapshot(&b.repo);
    let v = prune_json(b.repo_s(), &["--keep-last", "2", "--dry-run"]);
    assert_eq!(v["dry_run"], true);
    assert_eq!(ids_of(&v["kept"]), b.ids[2..]);
    assert_eq!(ids_of(&v["deleted"]), b.ids[..2]);
    assert_eq!(ids_of(&v["merged"]), [b.ids[2].clone()]);
    assert!(v["merged_streams"].as_array().unwrap().is_empty());
    assert!(v["bytes_deleted"].as_u64().unwrap() > 0);
    let o = ok(prune(b.repo_s(), &["--keep-last", "2", "--dry-run"]));
    let table = String::from_utf8(o.stdout).unwrap();
    assert!(table.contains("dry run"), "{table}");
    assert!(table.contains(&format!("delete  {}", b.ids[0])), "{table}");
    assert!(table.contains("merged into a full"), "{table}");
    assert!(
        snapshot(&b.repo) == before,
        "a dry run changed the repository"
    );

    // Points at 11:06 and 23:06 on the 18th and on the 19th: the newest of each day that
    // has points (two of them, fewer than 3).
    let v = prune_json(
        b.repo_s(),
        &["--keep-last", "1", "--keep-daily", "3", "--dry-run"],
    );
    let reasons: Vec<(String, &str)> = v["kept"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["id"].as_str().unwrap().to_string(),
                k["reason"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        reasons,
        [(b.ids[1].clone(), "daily"), (b.ids[3].clone(), "newest")]
    );
    assert_eq!(ids_of(&v["merged"]), [b.ids[1].clone(), b.ids[3].clone()]);
    // The point the chain state names is kept whatever the policy.
    let state = b.repo.join("vms").join(b.vm()).join("state.json");
    let text = std::fs::read_to_string(&state).unwrap();
    let mut json: Value = serde_json::from_str(&text).unwrap();
    json["point"] = b.ids[1].clone().into();
    std::fs::write(&state, json.to_string()).unwrap();
    let v = prune_json(b.repo_s(), &["--keep-last", "1", "--dry-run"]);
    assert_eq!(v["kept"][0]["id"].as_str(), Some(b.ids[1].as_str()));
    assert_eq!(v["kept"][0]["reason"], "chain state");
    assert_eq!(ids_of(&v["deleted"]), [b.ids[0].clone(), b.ids[2].clone()]);
    // So is the point a disk's chain state (`chain.json`, export --repo's) names.
    let chain = b.repo.join("vms").join(b.vm()).join("chain.json");
    std::fs::write(&chain, format!(r#"{{"point_id": "{}"}}"#, b.ids[0])).unwrap();
    let v = prune_json(b.repo_s(), &["--keep-last", "1", "--dry-run"]);
    assert_eq!(
        ids_of(&v["kept"]),
        [b.ids[0].clone(), b.ids[1].clone(), b.ids[3].clone()]
    );
    std::fs::write(&chain, "{").unwrap();
    let o = prune(b.repo_s(), &["--keep-last", "1"]);
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    assert!(stderr(&o).contains("chain.json"), "{}", stderr(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_of_a_single_point_or_an_empty_repository_does_nothing() {
    let mut b = Backed::new(1).await;
    let o = ok(prune(b.repo_s(), &["--keep-last", "1", "--json"]));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "[]");
    b.write_and_backup().await;
    let before = snapshot(&b.repo);
    let v = prune_json(b.repo_s(), &["--keep-last", "1"]);
    assert_eq!(ids_of(&v["kept"]), b.ids);
    assert!(v["deleted"].as_array().unwrap().is_empty());
    assert!(v["merged"].as_array().unwrap().is_empty());
    assert_eq!(v["bytes_freed"], 0);
    // Even keep-last 0 keeps the newest point.
    let v = prune_json(b.repo_s(), &["--keep-last", "0"]);
    assert_eq!(ids_of(&v["kept"]), b.ids);
    let after = snapshot(&b.repo);
    let strip_lock = |m: &BTreeMap<PathBuf, Vec<u8>>| {
        m.iter()
            .filter(|(k, _)| k.file_name().unwrap() != "lock")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<BTreeMap<_, _>>()
    };
    assert!(strip_lock(&after) == strip_lock(&before));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_is_refused_while_another_run_holds_the_vm() {
    let mut b = Backed::new(1).await;
    for _ in 0..3 {
        b.write_and_backup().await;
    }
    let lock_path = b.repo.join("vms").join(b.vm()).join("lock");
    // The lock file the backups made (0600): opened, never created here.
    let held = std::fs::OpenOptions::new()
        .write(true)
        .open(&lock_path)
        .unwrap();
    held.try_lock().unwrap();
    let before = snapshot(&b.repo);
    let o = prune(b.repo_s(), &["--keep-last", "1"]);
    assert_eq!(code(&o), 6, "{}", stderr(&o));
    assert!(stderr(&o).contains("lock"), "{}", stderr(&o));
    assert!(snapshot(&b.repo) == before);
    drop(held);
    let v = prune_json(b.repo_s(), &["--keep-last", "1"]);
    assert_eq!(ids_of(&v["deleted"]).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_stream_stops_prune_before_anything_is_deleted() {
    let mut b = Backed::new(1).await;
    for _ in 0..4 {
        b.write_and_backup().await;
    }
    // A byte flipped in the middle of the second point's stream, which the merge reads.
    let points = b.points_dir(&b.repo);
    let stream = points.join(&b.ids[1]).join("disk0.cbts");
    let good = std::fs::read(&stream).unwrap();
    let mut data = good.clone();
    let mid = data.len() / 2;
    data[mid] ^= 0x40;
    std::fs::write(&stream, data).unwrap();
    let before = snapshot(&b.repo);
    let o = prune(b.repo_s(), &["--keep-last", "2"]);
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    assert!(stderr(&o).contains(&b.ids[1]), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("no point was deleted"),
        "{}",
        stderr(&o)
    );
    let strip_lock = |m: BTreeMap<PathBuf, Vec<u8>>| {
        m.into_iter()
            .filter(|(k, _)| k.file_name().unwrap() != "lock")
            .collect::<BTreeMap<_, _>>()
    };
    assert!(
        strip_lock(snapshot(&b.repo)) == strip_lock(before),
        "the failed prune left changes"
    );
    // A missing stream: the same.
    std::fs::remove_file(&stream).unwrap();
    let before = snapshot(&b.repo);
    let o = prune(b.repo_s(), &["--keep-last", "2"]);
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    assert!(stderr(&o).contains("missing"), "{}", stderr(&o));
    assert!(strip_lock(snapshot(&b.repo)) == strip_lock(before));
    // Repaired, the prune goes through.
    std::fs::write(&stream, good).unwrap();
    let v = prune_json(b.repo_s(), &["--keep-last", "2"]);
    assert_eq!(ids_of(&v["deleted"]), b.ids[..2]);
    b.assert_every_listed_point_restores(&b.repo, &b.e.dir);
}

#[test]
fn prune_refuses_a_bad_vm_and_a_missing_repository() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let o = prune(p(&repo), &["--keep-last", "1"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("repo init"), "{}", stderr(&o));
    ok(run(&["repo", "init", p(&repo)]));
    let o = prune(p(&repo), &["--keep-last", "1", "--vm", "../x"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    let o = prune(p(&repo), &[]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
}
