//! `cbtstream verify --repo`: a clean repository exits 0; a flipped byte, a missing stream
//! and a missing base point exit 4 naming the point and the file; verify never changes a
//! byte of the repository.

mod common;
#[path = "xapi_env/mod.rs"]
mod xapi_env;

use common::*;
use std::path::{Path, PathBuf};
use xapi_env::*;

/// A repository of three points of a VM with two disks (guest writes between); its
/// location, its point ids oldest first, and the VM's directory of points.
async fn three_points(e: &Env) -> (String, Vec<String>, PathBuf) {
    let repo = p(&e.dir.join("repo")).to_string();
    ok(run(&["repo", "init", &repo]));
    for round in 0..3u8 {
        e.guest_writes(round);
        let data = vec![round ^ 0x5a; 70_000];
        e.sim.write(&e.sim.disks()[1], 4096, &data).unwrap();
        ok(e.backup_repo(&repo, &[]).await);
    }
    let o = ok(run(&["list", "--repo", &repo, "--json"]));
    let points: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    let ids: Vec<String> = points
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 3);
    let points_dir = e.dir.join("repo/vms").join(e.sim.vm_uuid()).join("points");
    (repo, ids, points_dir)
}

fn verify(repo: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["verify", "--repo", repo];
    args.extend_from_slice(extra);
    run(&args)
}

fn verify_json(repo: &str, extra: &[&str]) -> (i32, serde_json::Value) {
    let mut args = vec!["--json"];
    args.extend_from_slice(extra);
    let o = verify(repo, &args);
    let v = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("no JSON on stdout ({e}): {}", stderr(&o)));
    (code(&o), v)
}

/// Every file and directory under `root` with its bytes and permissions.
fn snapshot(root: &Path) -> Vec<(PathBuf, u32, Vec<u8>)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let mode = meta.permissions().mode();
            if meta.is_dir() {
                dirs.push(path.clone());
                out.push((path, mode, Vec::new()));
            } else {
                let bytes = std::fs::read(&path).unwrap();
                out.push((path, mode, bytes));
            }
        }
    }
    out.sort();
    out
}

/// The problems of a `--json` report as (point, file, problem).
fn problems(v: &serde_json::Value) -> Vec<(String, String, String)> {
    v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["point"].as_str().unwrap().to_string(),
                p["file"].as_str().unwrap().to_string(),
                p["problem"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_repository_verifies_and_is_left_as_it_was() {
    let e = env_with(|c| c.disks = 2).await;
    let (repo, _, points_dir) = three_points(&e).await;
    // A directory without point.json (a backup that did not finish) is a note, not damage.
    let leftover = points_dir.join("leftover-point");
    std::fs::create_dir(&leftover).unwrap();
    std::fs::write(leftover.join("disk0.cbts"), b"half a stream").unwrap();
    let before = snapshot(Path::new(&repo));

    let o = ok(verify(&repo, &[]));
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        text.contains("verified 3 point(s) of 1 VM(s), 6 stream(s)")
            && text.contains("no problems"),
        "{text}"
    );
    assert!(
        text.contains("note: VM") && text.contains("leftover-point"),
        "{text}"
    );
    ok(verify(&repo, &["--read-data", "--vm", e.sim.vm_uuid()]));
    let (status, v) = verify_json(&repo, &["--read-data"]);
    assert_eq!(status, 0, "{v}");
    assert_eq!(v["points"], 3);
    assert_eq!(v["ok"], true);
    assert_eq!(v["problems"].as_array().unwrap().len(), 0);
    assert_eq!(v["notes"].as_array().unwrap().len(), 1);
    assert!(
        before == snapshot(Path::new(&repo)),
        "verify changed the repository"
    );

    // Usage errors: an unknown VM, a directory that is no repository.
    let o = verify(&repo, &["--vm", "f00dcafe-0000-0000-0000-000000000000"]);
    assert_fails(&o, 2, "has no VM");
    let o = verify(p(&e.dir.join("sim")), &[]);
    assert_fails(&o, 2, "not a cbtstream repository");
    // A repository that cannot be read (its points directory is a file): exit 5.
    std::fs::rename(&points_dir, e.dir.join("points-aside")).unwrap();
    std::fs::write(&points_dir, b"").unwrap();
    let o = verify(&repo, &[]);
    assert_fails(&o, 5, "points");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_is_named_by_point_and_file() {
    let e = env_with(|c| c.disks = 2).await;
    let (repo, ids, points_dir) = three_points(&e).await;
    let stream = points_dir.join(&ids[1]).join("disk1.cbts");
    let mut bytes = std::fs::read(&stream).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&stream, &bytes).unwrap();
    let before = snapshot(Path::new(&repo));

    // Without --read-data: the SHA-256.
    let o = verify(&repo, &[]);
    assert_fails(&o, 4, "1 problem(s) found");
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        text.contains(&format!("point {} disk1.cbts: its SHA-256", ids[1])),
        "{text}"
    );
    let (status, v) = verify_json(&repo, &[]);
    assert_eq!(status, 4);
    assert_eq!(v["ok"], false);
    let found = problems(&v);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!((&found[0].0, found[0].1.as_str()), (&ids[1], "disk1.cbts"));
    assert_eq!(v["problems"][0]["vm"], e.sim.vm_uuid());

    // With --read-data: the record (or the digest) as well.
    let (status, v) = verify_json(&repo, &["--read-data"]);
    assert_eq!(status, 4);
    let found = problems(&v);
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(found
        .iter()
        .all(|(point, file, _)| point == &ids[1] && file == "disk1.cbts"));
    assert!(found[0].2.contains("SHA-256"), "{found:?}");
    assert!(
        found[1].2.contains("record ") || found[1].2.contains("digest"),
        "{found:?}"
    );
    assert!(
        before == snapshot(Path::new(&repo)),
        "verify changed the repository"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_stream_and_a_missing_base_point() {
    let e = env_with(|c| c.disks = 2).await;
    let (repo, ids, points_dir) = three_points(&e).await;
    std::fs::remove_file(points_dir.join(&ids[2]).join("disk0.cbts")).unwrap();
    let (status, v) = verify_json(&repo, &[]);
    assert_eq!(status, 4, "{v}");
    assert_eq!(
        problems(&v),
        [(
            ids[2].clone(),
            "disk0.cbts".to_string(),
            "missing".to_string()
        )]
    );

    // The middle point gone: the newest one, which needs it, is named; the first is fine.
    std::fs::remove_dir_all(points_dir.join(&ids[1])).unwrap();
    let before = snapshot(Path::new(&repo));
    let o = verify(&repo, &["--read-data"]);
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        text.contains(&format!(
            "point {} point.json: point {} needs point {}, which is not in the repository",
            ids[2], ids[2], ids[1]
        )),
        "{text}"
    );
    assert!(text.contains("verified 2 point(s)"), "{text}");
    let (_, v) = verify_json(&repo, &[]);
    let found = problems(&v);
    assert!(
        found.iter().all(|(point, _, _)| point == &ids[2]),
        "{found:?}"
    );
    assert!(
        before == snapshot(Path::new(&repo)),
        "verify changed the repository"
    );
}

fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A stream of the wrong disk under the right name, its SHA-256 recorded: the hashes
/// agree, and only --read-data sees that its header's ids do not fit the chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_data_checks_the_headers_against_the_chain() {
    let e = env_with(|c| c.disks = 2).await;
    let (repo, ids, points_dir) = three_points(&e).await;
    let first = points_dir.join(&ids[0]);
    let wrong = std::fs::read(first.join("disk0.cbts")).unwrap();
    std::fs::write(first.join("disk1.cbts"), &wrong).unwrap();
    let json_path = first.join("point.json");
    let mut info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json_path).unwrap()).unwrap();
    assert_eq!(info["disks"][1]["stream"], "disk1.cbts");
    info["disks"][1]["sha256"] = sha256_hex(&wrong).into();
    std::fs::write(&json_path, serde_json::to_vec(&info).unwrap()).unwrap();

    ok(verify(&repo, &[]));
    let (status, v) = verify_json(&repo, &["--read-data"]);
    assert_eq!(status, 4, "{v}");
    let found = problems(&v);
    assert_eq!(found.len(), 2, "{found:?}");
    let disk1 = &e.sim.disks()[1];
    assert_eq!((&found[0].0, found[0].1.as_str()), (&ids[0], "disk1.cbts"));
    assert!(
        found[0].2.contains("source id") && found[0].2.contains(disk1.as_str()),
        "{found:?}"
    );
    // The next point's stream of that disk names a base the first point's does not hold.
    assert_eq!((&found[1].0, found[1].1.as_str()), (&ids[1], "disk1.cbts"));
    assert!(
        found[1]
            .2
            .contains(&format!("point {}'s stream of the disk", ids[0])),
        "{found:?}"
    );
}
