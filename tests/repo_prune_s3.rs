//! prune on the S3 server (s3s-fs): killed (SIGKILL, through its test hook) at each of its
//! steps, every listed point still restores byte-identical from the repository, and the next
//! prune finishes the job leaving no stray objects, no open uploads and no parts.
mod common;
#[path = "xapi_env/mod.rs"]
mod xapi_env;

use cbtstream_testkit::S3Server;
use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use xapi_env::*;

fn cmd(s3: &S3Server, args: &[String], epoch: u64) -> Command {
    let mut c = Command::new(BIN);
    c.args(args)
        .env("SOURCE_DATE_EPOCH", epoch.to_string())
        .env_remove("CBTSTREAM_LOG")
        .stdin(std::process::Stdio::null());
    s3.apply_env(&mut c);
    c
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn copy_tree(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    for rel in snapshot(from).into_keys() {
        let path = to.join(&rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::copy(from.join(&rel), &path).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_on_s3_killed_at_each_step() {
    let e = env_with(|c| c.disks = 2).await;
    if !cbtstream_testkit::require_tools(
        "prune_on_s3_killed_at_each_step",
        &[cbtstream_testkit::s3::S3S_FS],
    ) {
        return;
    }
    let s3 = S3Server::start(&e.dir.join("s3")).unwrap();
    let repo = format!("s3://{}/site-a", s3.bucket());
    ok(cmd(&s3, &s(&["repo", "init", &repo]), 1).output().unwrap());
    let vm = e.sim.vm_uuid().to_string();
    let mut images: BTreeMap<String, BTreeMap<String, PathBuf>> = BTreeMap::new();
    let mut ids = Vec::new();
    std::fs::create_dir(e.dir.join("images")).unwrap();
    for round in 0..5u64 {
        e.guest_writes(round as u8);
        let args = s(&[
            "backup",
            "--xapi",
            &e.sim.url(),
            "--xapi-ca",
            p(e.sim.ca_path()),
            "--vm",
            &vm,
            "--repo",
            &repo,
        ]);
        let mut c = cmd(&s3, &args, 1_795_000_000 + round * 3600);
        c.env("XAPI_PASSWORD", e.sim.password());
        let o = tokio::task::spawn_blocking(move || c.output().unwrap())
            .await
            .unwrap();
        ok(o);
        let o = ok(cmd(&s3, &s(&["list", "--repo", &repo, "--json"]), 1)
            .output()
            .unwrap());
        let l: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
        let id = l.last().unwrap()["id"].as_str().unwrap().to_string();
        let mut m = BTreeMap::new();
        for d in e.sim.disks() {
            let img = e.dir.join("images").join(format!("{id}-{d}"));
            std::fs::copy(e.sim.vdi_path(&d).unwrap(), &img).unwrap();
            m.insert(d, img);
        }
        images.insert(id.clone(), m);
        ids.push(id);
    }
    let bucket = s3.root().join(s3.bucket());
    let pristine = e.dir.join("pristine");
    copy_tree(&bucket, &pristine);
    let points = s3.object_path(&format!("site-a/vms/{vm}/points"));
    let scratch = e.dir.join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    // Every listed point, restored from the repository (ranged reads of S3 objects) into
    // images compared with the VM's disks at that point.
    let restore_all = || -> Vec<String> {
        let o = ok(cmd(&s3, &s(&["list", "--repo", &repo, "--json"]), 1)
            .output()
            .unwrap());
        let l: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
        let mut out = Vec::new();
        for pt in l {
            let id = pt["id"].as_str().unwrap().to_string();
            let to = scratch.join(&id);
            let _ = std::fs::remove_dir_all(&to);
            std::fs::create_dir(&to).unwrap();
            let args = s(&[
                "restore",
                "--repo",
                &repo,
                "--vm",
                &vm,
                "--point",
                &id,
                "--to",
                p(&to),
            ]);
            ok(cmd(&s3, &args, 1).output().unwrap());
            for (slot, disk) in e.sim.disks().iter().enumerate() {
                assert_same(&to.join(format!("disk{slot}.raw")), &images[&id][disk]);
            }
            out.push(id);
        }
        out
    };
    for step in PRUNE_STEPS {
        copy_tree(&pristine, &bucket);
        let o = cmd(&s3, &s(&["prune", "--repo", &repo, "--keep-last", "2"]), 1)
            .env("CBTSTREAM_TEST_KILL_AT", step)
            .output()
            .unwrap();
        assert_eq!(o.status.signal(), Some(9), "{step}: {}", stderr(&o));
        let listed = restore_all();
        assert!(listed.ends_with(&ids[3..]), "{step}");
        let o = ok(cmd(
            &s3,
            &s(&["prune", "--repo", &repo, "--keep-last", "2", "--json"]),
            1,
        )
        .output()
        .unwrap());
        eprintln!("{step}: {}", stderr(&o));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(ids_of(&v[0]["kept"]), ids[3..], "{step}");
        assert_eq!(restore_all(), ids[3..]);
        assert_no_strays(&points);
        assert_eq!(s3.open_uploads().unwrap(), 0, "{step}");
        assert_eq!(s3.orphan_parts().unwrap(), 0, "{step}");
        let keys = s3.keys().unwrap();
        assert!(
            keys.iter()
                .all(|k| !k.contains("/uploads/") && !k.ends_with("lock.json")),
            "{step}: {keys:?}"
        );
    }
}

fn point_json(points: &Path, id: &str) -> Value {
    let path = points.join(id).join("point.json");
    let text = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&text).unwrap()
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
/// The files of the points' directories are exactly point.json, metadata.xva and the
/// streams point.json names, each 0600.
fn assert_no_strays(points: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(points).unwrap() {
        let dir = entry.unwrap().path();
        let id = dir.file_name().unwrap().to_str().unwrap().to_string();
        if std::fs::read_dir(&dir).unwrap().next().is_none() {
            continue;
        }
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
            let _ = (mode, "{}/{f}", dir.display());
        }
    }
}
