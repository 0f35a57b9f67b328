//! `restore --repo` and `restore-vm --repo`: a point of a local directory repository
//! restored by VM and point id (or `latest`), its chain found in the repository, into
//! image files, a new VDI, or a new VM; byte-identical to the VM's disks at that point.

mod common;
#[path = "xapi_env/mod.rs"]
mod xapi_env;

use cbtstream_proto::xmlrpc::Value;
use cbtstream_testkit::{require_tools, S3Server};
use common::*;
use std::path::PathBuf;
use xapi_env::*;

/// Guest writes on both disks: across a 64 KiB boundary, a block, the last sector.
fn guest_writes(e: &Env, round: u8) {
    let disks = e.sim.disks();
    let data =
        |n: usize| -> Vec<u8> { (0..n).map(|i| (i as u8).wrapping_mul(13) ^ round).collect() };
    e.sim
        .write(
            &disks[0],
            65536 - 200 + u64::from(round) * 8192,
            &data(3000),
        )
        .unwrap();
    e.sim
        .write(&disks[0], (8 + u64::from(round)) * 65536, &data(65536))
        .unwrap();
    e.sim.write(&disks[1], SIZE - 512, &data(512)).unwrap();
    e.sim
        .write(&disks[1], u64::from(round) * 4096, &data(100))
        .unwrap();
}

fn list_ids(repo: &str) -> Vec<String> {
    let o = ok(run(&["list", "--repo", repo, "--json"]));
    let points: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    points
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect()
}

/// Three points with guest writes between, each disk's image saved right after each
/// backup: `saved/<round>/disk<slot>.raw`. Returns (repo, point ids, saved dir).
async fn three_points(e: &Env) -> (String, Vec<String>, PathBuf) {
    let repo = p(&e.dir.join("repo")).to_string();
    ok(run(&["repo", "init", &repo]));
    let saved = e.dir.join("saved");
    for round in 0..3u8 {
        guest_writes(e, round);
        ok(e.backup_repo(&repo, &[]).await);
        let dir = saved.join(round.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        for (slot, vdi) in e.sim.disks().iter().enumerate() {
            std::fs::copy(
                e.sim.vdi_path(vdi).unwrap(),
                dir.join(format!("disk{slot}.raw")),
            )
            .unwrap();
        }
    }
    let ids = list_ids(&repo);
    assert_eq!(ids.len(), 3);
    (repo, ids, saved)
}

fn restore_repo(repo: &str, vm: &str, point: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["restore", "--repo", repo, "--vm", vm, "--point", point];
    args.extend_from_slice(extra);
    run(&args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_point_restores_into_images() {
    let e = env_with(|c| c.disks = 2).await;
    let (repo, ids, saved) = three_points(&e).await;
    let vm = e.sim.vm_uuid();
    let disks = e.sim.disks();
    let moving = e.dir.join("moving.raw");
    for (round, id) in ids.iter().enumerate() {
        let want = saved.join(round.to_string());
        // Every disk into DIR/disk<slot>.raw.
        let out = e.dir.join(format!("all{round}"));
        std::fs::create_dir(&out).unwrap();
        ok(restore_repo(&repo, vm, id, &["--to", p(&out)]));
        for slot in 0..2 {
            let name = format!("disk{slot}.raw");
            assert_same(&out.join(&name), &want.join(&name));
        }
        // One disk by its slot, the other by its VDI uuid.
        let one = e.dir.join(format!("one{round}.raw"));
        ok(restore_repo(
            &repo,
            vm,
            id,
            &["--disk", "1", "--to", p(&one)],
        ));
        assert_same(&one, &want.join("disk1.raw"));
        let other = e.dir.join(format!("other{round}.raw"));
        ok(restore_repo(
            &repo,
            vm,
            id,
            &["--disk", &disks[0], "--to", p(&other)],
        ));
        assert_same(&other, &want.join("disk0.raw"));
        // One image brought forward point by point: only the newest stream is applied.
        let o = ok(restore_repo(
            &repo,
            vm,
            id,
            &["--disk", "0", "--to", p(&moving)],
        ));
        let applied = if round == 0 {
            "from 1 stream (1 full, 0 incremental)"
        } else {
            "from 1 stream (0 full, 1 incremental)"
        };
        assert!(stderr(&o).contains(applied), "{}", stderr(&o));
        assert_same(&moving, &want.join("disk0.raw"));
    }
    // `latest` is the newest point, which the moving image holds already.
    let o = ok(restore_repo(
        &repo,
        vm,
        "latest",
        &["--disk", "0", "--to", p(&moving)],
    ));
    assert!(
        stderr(&o).contains(&format!("holds point {} already", ids[2])),
        "{}",
        stderr(&o)
    );
    let latest = e.dir.join("latest.raw");
    ok(restore_repo(
        &repo,
        vm,
        "latest",
        &["--disk", "0", "--to", p(&latest)],
    ));
    assert_same(&latest, &saved.join("2/disk0.raw"));
    // Back to the first point: its full stream replaces the image.
    let o = ok(restore_repo(
        &repo,
        vm,
        &ids[0],
        &["--disk", "0", "--to", p(&moving)],
    ));
    assert!(
        stderr(&o).contains("(1 full, 0 incremental)"),
        "{}",
        stderr(&o)
    );
    assert_same(&moving, &saved.join("0/disk0.raw"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_names_and_a_missing_object() {
    let e = env_with(|c| c.disks = 2).await;
    let (repo, ids, _) = three_points(&e).await;
    let vm = e.sim.vm_uuid();
    let image = e.dir.join("x.raw");
    let to = ["--disk", "0", "--to", p(&image)];
    let o = restore_repo(&repo, vm, "no-such-point", &to);
    assert_fails(&o, 2, "has no point \"no-such-point\"");
    let o = restore_repo(&repo, "f00dcafe-0000-0000-0000-000000000000", "latest", &to);
    assert_fails(&o, 2, "has no point of VM f00dcafe");
    let o = restore_repo(&repo, vm, "latest", &["--disk", "7", "--to", p(&image)]);
    assert_fails(&o, 2, "has no disk \"7\"");
    // Several disks and no --disk: --to must be a directory.
    let o = restore_repo(&repo, vm, "latest", &["--to", p(&image)]);
    assert_fails(&o, 2, "is not a directory");
    // Without --vm, clap refuses.
    assert_eq!(
        code(&run(&[
            "restore", "--repo", &repo, "--point", "latest", "--to", "x"
        ])),
        2
    );
    assert!(!image.exists());

    // The middle point's stream of disk 0 is gone: the newest point of disk 0 does not
    // restore (exit 4, naming the point and the file); disk 1 still does.
    let stream = e
        .dir
        .join("repo/vms")
        .join(vm)
        .join("points")
        .join(&ids[1])
        .join("disk0.cbts");
    std::fs::remove_file(&stream).unwrap();
    let o = restore_repo(&repo, vm, &ids[2], &to);
    assert_fails(&o, 4, &format!("point {} of VM {vm}", ids[1]));
    assert!(
        stderr(&o).contains("disk0.cbts is missing"),
        "{}",
        stderr(&o)
    );
    assert!(!image.exists());
    let dir = e.dir.join("all");
    std::fs::create_dir(&dir).unwrap();
    let o = restore_repo(&repo, vm, &ids[2], &["--to", p(&dir)]);
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    // Checked before any image is written.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    ok(restore_repo(
        &repo,
        vm,
        &ids[2],
        &["--disk", "1", "--to", p(&image)],
    ));
    // A repository that cannot be read is the restore's failed source: exit 3.
    let points = e.dir.join("repo/vms").join(vm).join("points");
    std::fs::rename(&points, e.dir.join("points-aside")).unwrap();
    std::fs::write(&points, b"").unwrap();
    let o = restore_repo(&repo, vm, "latest", &["--disk", "1", "--to", p(&image)]);
    assert_fails(&o, 3, "points");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_into_a_new_vdi_and_a_point_as_a_new_vm() {
    let e = env_with(|c| c.disks = 2).await;
    let (repo, ids, saved) = three_points(&e).await;
    let vm = e.sim.vm_uuid().to_string();
    let sr = e.sr_uuid();
    // One disk of the middle point into a new VDI.
    let o = ok(e
        .command(
            &["restore", "--xapi", &e.sim.url()],
            false,
            &[
                "--sr", &sr, "--repo", &repo, "--vm", &vm, "--point", &ids[1], "--disk", "1",
            ],
        )
        .await);
    let vdi = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert_same(&e.sim.vdi_path(&vdi).unwrap(), &saved.join("1/disk1.raw"));
    // Without --disk, a point of two disks is refused.
    let o = e
        .command(
            &["restore", "--xapi", &e.sim.url()],
            false,
            &[
                "--sr", &sr, "--repo", &repo, "--vm", &vm, "--point", "latest",
            ],
        )
        .await;
    assert_fails(&o, 2, "choose one with --disk");

    // The first point as a new VM: its disks, in their slots, as they were then.
    let o = ok(e
        .command(
            &["restore-vm", "--xapi", &e.sim.url()],
            false,
            &[
                "--sr", &sr, "--repo", &repo, "--vm", &vm, "--point", &ids[0],
            ],
        )
        .await);
    let new_vm = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert_ne!(new_vm, vm);
    let restored = e.vm_disks(&new_vm);
    assert_eq!(restored.len(), 2, "{restored:?}");
    for (slot, vdi) in &restored {
        assert_same(
            &e.sim.vdi_path(vdi).unwrap(),
            &saved.join(format!("0/disk{slot}.raw")),
        );
    }
    // --dry-run names the metadata object in the repository.
    let o = ok(e
        .command(
            &["restore-vm", "--xapi", &e.sim.url()],
            false,
            &[
                "--sr",
                &sr,
                "--repo",
                &repo,
                "--vm",
                &vm,
                "--point",
                "latest",
                "--dry-run",
            ],
        )
        .await);
    let plan = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        plan.contains(&format!("points/{}/metadata.xva", ids[2])),
        "{plan}"
    );
}

/// cbtstream with the S3 server's endpoint and credentials in the environment.
fn with_s3(e: &Env, s3: &S3Server, args: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(args);
    if args[0] == "backup" {
        cmd.args(["--xapi-ca", p(e.sim.ca_path())]);
    }
    cmd.env("XAPI_PASSWORD", e.sim.password())
        .env("SOURCE_DATE_EPOCH", "1795000000")
        .env_remove("CBTSTREAM_LOG")
        .stdin(std::process::Stdio::null());
    s3.apply_env(&mut cmd);
    cmd
}

async fn output(mut cmd: std::process::Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

/// The same on S3: each point restores from the objects read with range requests, verify
/// reads them too, and a flipped byte in a stored object is named by both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_restore_and_verify_from_s3() {
    let test = "points_restore_and_verify_from_s3";
    let e = env_with(|c| c.disks = 2).await;
    if !require_tools(test, &[cbtstream_testkit::s3::S3S_FS]) {
        return;
    }
    let s3 = S3Server::start(&e.dir.join("s3")).unwrap();
    let repo = format!("s3://{}/site-a", s3.bucket());
    let vm = e.sim.vm_uuid().to_string();
    ok(output(with_s3(&e, &s3, &["repo", "init", &repo])).await);
    let saved = e.dir.join("saved");
    for round in 0..2u8 {
        guest_writes(&e, round);
        let url = e.sim.url();
        let backup = ["backup", "--xapi", &url, "--vm", &vm, "--repo", &repo];
        ok(output(with_s3(&e, &s3, &backup)).await);
        let dir = saved.join(round.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        for (slot, vdi) in e.sim.disks().iter().enumerate() {
            let to = dir.join(format!("disk{slot}.raw"));
            std::fs::copy(e.sim.vdi_path(vdi).unwrap(), to).unwrap();
        }
    }
    let o = ok(output(with_s3(&e, &s3, &["list", "--repo", &repo, "--json"])).await);
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    let ids: Vec<&str> = listed.iter().map(|p| p["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 2);
    for (round, id) in ids.iter().enumerate() {
        let out = e.dir.join(format!("all{round}"));
        std::fs::create_dir(&out).unwrap();
        let args = [
            "restore",
            "--repo",
            &repo,
            "--vm",
            &vm,
            "--point",
            id,
            "--to",
            p(&out),
        ];
        ok(output(with_s3(&e, &s3, &args)).await);
        for slot in 0..2 {
            let name = format!("disk{slot}.raw");
            assert_same(&out.join(&name), &saved.join(round.to_string()).join(&name));
        }
    }
    ok(output(with_s3(
        &e,
        &s3,
        &["verify", "--repo", &repo, "--read-data"],
    ))
    .await);

    let key = format!("site-a/vms/{vm}/points/{}/disk0.cbts", ids[1]);
    let object = s3.object_path(&key);
    let mut bytes = std::fs::read(&object).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&object, &bytes).unwrap();
    let o = output(with_s3(&e, &s3, &["verify", "--repo", &repo, "--json"])).await;
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["problems"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["problems"][0]["point"], ids[1]);
    assert_eq!(v["problems"][0]["file"], "disk0.cbts");
    let image = e.dir.join("damaged.raw");
    let args = [
        "restore", "--repo", &repo, "--vm", &vm, "--point", "latest", "--disk", "0",
    ];
    let mut cmd = with_s3(&e, &s3, &args);
    cmd.args(["--to", p(&image)]);
    let o = output(cmd).await;
    assert_fails(&o, 4, &format!("points/{}/disk0.cbts", ids[1]));
    assert!(!image.exists());
}

/// One-disk points of `export --repo` (under the VDI): restored into an image without
/// --disk, and a VDI rolled back to the newest one (only the blocks changed since it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vdi_rolls_back_to_a_point_of_the_repository() {
    let e = env().await;
    let vdi = e.blank_vdi(SIZE);
    let session = login(&e);
    let r: Value = e.sim.vdi_ref_of(&vdi).unwrap().into();
    e.sim.call_local("VDI.enable_cbt", &[session, r]).unwrap();
    let repo = p(&e.dir.join("repo")).to_string();
    ok(run(&["repo", "init", &repo]));
    let url = e.sim.url();
    for round in 0..2u8 {
        e.sim
            .write(&vdi, u64::from(round) * 3 * 65536, &[round + 1; 70_000])
            .unwrap();
        let export = ["--vdi", vdi.as_str(), "--repo", &repo];
        ok(e.command(&["export", "--xapi", &url], false, &export).await);
    }
    let at_point = e.dir.join("at-point.raw");
    std::fs::copy(e.sim.vdi_path(&vdi).unwrap(), &at_point).unwrap();
    let image = e.dir.join("image.raw");
    ok(restore_repo(&repo, &vdi, "latest", &["--to", p(&image)]));
    assert_same(&image, &at_point);

    e.sim.write(&vdi, 10 * 65536, &[9; 4096]).unwrap();
    e.sim.write(&vdi, 65536, &[0; 65536]).unwrap();
    let imported = e.sim.bytes_imported();
    let args = [
        "--vdi",
        &vdi,
        "--rollback",
        "--repo",
        &repo,
        "--vm",
        &vdi,
        "--point",
        "latest",
    ];
    ok(e.command(&["restore", "--xapi", &url], false, &args).await);
    assert_same(&e.sim.vdi_path(&vdi).unwrap(), &at_point);
    let sent = e.sim.bytes_imported() - imported;
    assert!(sent > 0 && sent <= 2 * 65536, "{sent} bytes written back");
}
