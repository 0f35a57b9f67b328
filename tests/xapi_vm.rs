//! Whole-VM backups (`cbtstream backup --vm`): one VM.snapshot of every disk, a point
//! directory per backup (the VM's metadata, a stream per disk, point.json written last),
//! each disk's chain committed only once the whole point is durable.

mod common;
#[path = "xapi_env/mod.rs"]
mod xapi_env;

use cbtstream_proto::xmlrpc::Value;
use common::*;
use std::path::{Path, PathBuf};
use xapi_env::*;

fn point_json(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("point.json")).unwrap()).unwrap()
}

/// Guest writes on every disk: across a 64 KiB boundary on each, more on disk 0, the last
/// sector of disk 1; disk 2 stays mostly empty.
fn guest_writes(e: &Env, round: u8) {
    let disks = e.sim.disks();
    let data =
        |n: usize| -> Vec<u8> { (0..n).map(|i| (i as u8).wrapping_mul(7) ^ round).collect() };
    e.sim
        .write(
            &disks[0],
            65536 - 300 + u64::from(round) * 8192,
            &data(5000),
        )
        .unwrap();
    e.sim
        .write(&disks[0], (20 + u64::from(round)) * 65536, &data(70_000))
        .unwrap();
    e.sim.write(&disks[1], SIZE - 512, &data(512)).unwrap();
    if let Some(d) = disks.get(2) {
        e.sim.write(d, u64::from(round) * 4096, &data(100)).unwrap();
    }
}

impl Env {
    async fn backup(&self, out: &Path, extra: &[&str]) -> std::process::Output {
        let mut args = vec!["--vm", self.sim.vm_uuid(), "--out", p(out)];
        args.extend_from_slice(extra);
        self.command(&["backup", "--xapi", &self.sim.url()], false, &args)
            .await
    }

    /// Snapshot VDIs of every disk: (type, tagged).
    fn disk_snapshots(&self) -> Vec<(String, bool)> {
        let session = login(self);
        let mut out = Vec::new();
        for d in self.sim.disks() {
            let r: Value = self.sim.vdi_ref_of(&d).unwrap().into();
            let snaps = self
                .sim
                .call_local("VDI.get_snapshots", &[session.clone(), r])
                .unwrap();
            for s in snaps.as_array().unwrap() {
                let rec = self
                    .sim
                    .call_local("VDI.get_record", &[session.clone(), s.clone()])
                    .unwrap();
                let typ = rec.get("type").and_then(Value::as_str).unwrap().to_string();
                let tagged = rec
                    .get("other_config")
                    .and_then(|m| m.get("cbtstream_snapshot_of"))
                    .is_some();
                out.push((typ, tagged));
            }
        }
        out
    }
}

impl Env {
    async fn restore_vm(&self, point: &Path, extra: &[&str]) -> std::process::Output {
        let sr = self.sr_uuid();
        let mut args = vec!["--sr", sr.as_str()];
        args.extend_from_slice(extra);
        args.push(p(point));
        self.command(&["restore-vm", "--xapi", &self.sim.url()], false, &args)
            .await
    }
}

/// Restore every disk of the chain of points `dirs` (oldest first) into `images` and
/// compare each with the VM's disk now.
fn restore_and_compare(e: &Env, dirs: &[PathBuf], images: &Path) {
    let last = point_json(dirs.last().unwrap());
    for disk in last["disks"].as_array().unwrap() {
        let vdi = disk["id"].as_str().unwrap();
        let image = images.join(format!("{vdi}.raw"));
        // Only the newest point's stream is new; the older ones were applied before.
        let stream = dirs.last().unwrap().join(disk["stream"].as_str().unwrap());
        ok(run(&["restore", "--to", p(&image), p(&stream)]));
        assert_same(&image, &e.sim.vdi_path(vdi).unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_with_three_disks_full_then_three_incrementals() {
    let e = env_with(|c| c.disks = 3).await;
    let state = e.dir.join("vm.json");
    let out = e.dir.join("points");
    std::fs::create_dir(&out).unwrap();
    let images = e.dir.join("images");
    std::fs::create_dir(&images).unwrap();
    let mut dirs: Vec<PathBuf> = Vec::new();
    for round in 0..4u8 {
        guest_writes(&e, round);
        let o = ok(e.backup(&out, &["--state", p(&state), "--json"]).await);
        let dir = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
        let info = point_json(&dir);
        assert_eq!(info["vm"], e.sim.vm_uuid());
        assert_eq!(dir.file_name().unwrap().to_str().unwrap(), info["id"]);
        let disks = info["disks"].as_array().unwrap();
        assert_eq!(disks.len(), 3);
        for (slot, d) in disks.iter().enumerate() {
            assert_eq!(d["slot"], slot.to_string());
            assert_eq!(d["id"], e.sim.disks()[slot].as_str());
            assert_eq!(d["size"].as_u64(), Some(SIZE));
            let file = dir.join(d["stream"].as_str().unwrap());
            let o = ok(run(&["inspect", p(&file)]));
            let text = String::from_utf8_lossy(&o.stdout).to_string();
            if round == 0 {
                assert!(d["base"].is_null(), "{info}");
                assert!(text.contains("full export"), "{text}");
            } else {
                assert_eq!(d["base"], point_json(dirs.last().unwrap())["id"]);
            }
        }
        // The VM's configuration: XenServer's XVA-style tar holding ova.xml.
        let xva = std::fs::read(dir.join("metadata.xva")).unwrap();
        assert_eq!(&xva[..7], b"ova.xml", "not a tar starting with ova.xml");
        if round == 0 {
            assert!(info["base"].is_null());
        } else {
            assert_eq!(info["base"], point_json(dirs.last().unwrap())["id"]);
        }
        dirs.push(dir.clone());
        restore_and_compare(&e, &dirs, &images);
        // Back into the pool as a new VM: its disks equal the source's, in the same slots.
        let o = ok(e.restore_vm(&dir, &["--json"]).await);
        let new_vm = String::from_utf8_lossy(&o.stdout).trim().to_string();
        let json: serde_json::Value =
            serde_json::from_str(stderr(&o).lines().last().unwrap()).unwrap();
        assert_eq!(json["vm"], new_vm.as_str());
        assert_eq!(json["disks"].as_array().unwrap().len(), 3);
        assert_ne!(new_vm, e.sim.vm_uuid());
        // A VM that can start, not a snapshot.
        let session = login(&e);
        let vm_ref = e
            .sim
            .call_local("VM.get_by_uuid", &[session.clone(), new_vm.as_str().into()])
            .unwrap();
        let rec = e
            .sim
            .call_local("VM.get_record", &[session, vm_ref])
            .unwrap();
        assert_eq!(
            rec.get("is_a_snapshot").and_then(Value::as_bool),
            Some(false)
        );
        assert_eq!(
            rec.get("power_state").and_then(Value::as_str),
            Some("Halted")
        );
        let restored = e.vm_disks(&new_vm);
        assert_eq!(restored.len(), 3, "{restored:?}");
        for (slot, vdi) in &restored {
            let source = &e.sim.disks()[slot.parse::<usize>().unwrap()];
            assert_ne!(vdi, source);
            assert_same(
                &e.sim.vdi_path(vdi).unwrap(),
                &e.sim.vdi_path(source).unwrap(),
            );
        }
        // After each run: one cbt_metadata base per disk, no snapshot VM, no partial point.
        let snaps = e.disk_snapshots();
        assert_eq!(
            snaps,
            vec![("cbt_metadata".to_string(), true); 3],
            "round {round}"
        );
        assert_eq!(e.snapshot_vms(), 0);
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), dirs.len());
    }
}

/// `--dry-run` prints what would be created and creates nothing; a failing metadata import
/// destroys the VDIs the run created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_vm_dry_run_and_a_failed_import() {
    let e = env_with(|c| c.disks = 2).await;
    let out = e.dir.join("points");
    std::fs::create_dir(&out).unwrap();
    guest_writes(&e, 0);
    let o = ok(e.backup(&out, &[]).await);
    let dir = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
    let vdis_before = e.sim.calls("VDI.create");
    let o = ok(e.restore_vm(&dir, &["--dry-run"]).await);
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        text.contains("would create a VDI") && text.contains("would import the VM"),
        "{text}"
    );
    assert_eq!(e.sim.calls("VDI.create"), vdis_before);
    // --preserve keeps the VM's uuid: refused while that VM is running (XenServer's
    // VM_BAD_POWER_STATE), and the disks created for it go.
    let disks_before = login_count_vdis(&e);
    let o = e.restore_vm(&dir, &["--preserve"]).await;
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(stderr(&o).contains("VM_BAD_POWER_STATE"), "{}", stderr(&o));
    assert_eq!(login_count_vdis(&e), disks_before, "created VDIs were left");
    let vdis_before = e.sim.calls("VDI.create");
    // A metadata archive the host refuses: the disks created for it go.
    std::fs::write(dir.join("metadata.xva"), b"not a tar").unwrap();
    let disks_before = login_count_vdis(&e);
    let o = e.restore_vm(&dir, &[]).await;
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("importing the VM's metadata"),
        "{}",
        stderr(&o)
    );
    assert_eq!(e.sim.calls("VDI.create"), vdis_before + 2);
    assert_eq!(login_count_vdis(&e), disks_before, "created VDIs were left");
}

fn login_count_vdis(e: &Env) -> usize {
    let session = login(e);
    let all = e.sim.call_local("VDI.get_all", &[session]).unwrap();
    all.as_array().unwrap().len()
}

/// One disk's reads fail for good mid-backup: no disk of the VM advances, no snapshot and no
/// snapshot VM is left, no point (not even a partial one) appears; the next backup works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_disk_leaves_every_chain_as_it_was() {
    let e = env_with(|c| c.disks = 3).await;
    let state = e.dir.join("vm.json");
    let out = e.dir.join("points");
    std::fs::create_dir(&out).unwrap();
    guest_writes(&e, 0);
    ok(e.backup(&out, &["--state", p(&state)]).await);
    let before = std::fs::read(&state).unwrap();
    guest_writes(&e, 1);
    e.sim.nbd().faults.fail_reads(0..SIZE, None);
    let o = e
        .backup(&out, &["--state", p(&state), "--retries", "0"])
        .await;
    e.sim.nbd().faults.clear_read_failures();
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert_eq!(std::fs::read(&state).unwrap(), before);
    assert_eq!(
        e.disk_snapshots(),
        vec![("cbt_metadata".to_string(), true); 3]
    );
    assert_eq!(e.snapshot_vms(), 0);
    assert_eq!(
        std::fs::read_dir(&out).unwrap().count(),
        1,
        "a point or a partial one was left"
    );
    ok(e.backup(&out, &["--state", p(&state)]).await);
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 2);
}

/// A backup killed outright (SIGKILL) mid-transfer leaves its snapshot VM and snapshot VDIs
/// and a partial point directory: the chain is untouched, the next backup works, and
/// `gc --vm --state` removes the leftovers and keeps every disk's base.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_backup_is_collected_by_gc_vm() {
    let e = env_with(|c| c.disks = 2).await;
    let state = e.dir.join("vm.json");
    let out = e.dir.join("points");
    std::fs::create_dir(&out).unwrap();
    guest_writes(&e, 0);
    ok(e.backup(&out, &["--state", p(&state)]).await);
    let before = std::fs::read(&state).unwrap();
    guest_writes(&e, 1);
    e.kill_backup_mid_transfer(&["--out", p(&out), "--state", p(&state)])
        .await;
    assert_eq!(std::fs::read(&state).unwrap(), before);
    assert_eq!(e.snapshot_vms(), 1);
    assert_eq!(e.disk_snapshots().len(), 4);
    let o = ok(e
        .command(
            &["gc", "--xapi", &e.sim.url()],
            false,
            &["--vm", e.sim.vm_uuid(), "--state", p(&state)],
        )
        .await);
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(text.contains("removed snapshot VM"), "{text}");
    assert_eq!(e.snapshot_vms(), 0);
    assert_eq!(
        e.disk_snapshots(),
        vec![("cbt_metadata".to_string(), true); 2]
    );
    // The chain goes on; the partial directory of the killed run is not a point.
    ok(e.backup(&out, &["--state", p(&state)]).await);
    let points: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|d| d.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.ends_with(".partial"))
        .collect();
    assert_eq!(points.len(), 2, "{points:?}");
}

/// A disk added to the VM since the last point gets a full stream while the others go on
/// incrementally; a disk removed from the VM is dropped from the chain and its base goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disks_added_and_removed_between_points() {
    let e = env_with(|c| c.disks = 2).await;
    let state = e.dir.join("vm.json");
    let out = e.dir.join("points");
    std::fs::create_dir(&out).unwrap();
    guest_writes(&e, 0);
    ok(e.backup(&out, &["--state", p(&state)]).await);

    // A new disk in slot 5, with CBT on and some data.
    let session = login(&e);
    let added = e.blank_vdi(SIZE);
    let added_ref: Value = e.sim.vdi_ref_of(&added).unwrap().into();
    e.sim
        .call_local("VDI.enable_cbt", &[session.clone(), added_ref.clone()])
        .unwrap();
    let vbd = Value::record([
        ("VM", e.sim.vm_ref().into()),
        ("VDI", added_ref),
        ("userdevice", "5".into()),
        ("mode", "RW".into()),
        ("type", "Disk".into()),
        ("empty", Value::Bool(false)),
        ("bootable", Value::Bool(false)),
        ("other_config", Value::Struct(Default::default())),
    ]);
    e.sim
        .call_local("VBD.create", &[session.clone(), vbd])
        .unwrap();
    e.sim.write(&added, 65536, &[9u8; 4096]).unwrap();
    guest_writes(&e, 1);
    let o = ok(e.backup(&out, &["--state", p(&state)]).await);
    let dir = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
    let info = point_json(&dir);
    let disks = info["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 3, "{info}");
    for d in disks {
        assert_eq!(d["base"].is_null(), d["id"] == added.as_str(), "{d}");
    }
    let image = e.dir.join("added.raw");
    ok(run(&[
        "restore",
        "--to",
        p(&image),
        p(&dir.join("disk5.cbts")),
    ]));
    assert_same(&image, &e.sim.vdi_path(&added).unwrap());

    // The added disk leaves the VM again (its VBD was never plugged; a plugged one of a
    // running VM cannot be destroyed): the next point has the two others, its base is gone.
    let removed = added.clone();
    let vbds = e
        .sim
        .call_local("VM.get_VBDs", &[session.clone(), e.sim.vm_ref().into()])
        .unwrap();
    for v in vbds.as_array().unwrap() {
        let rec = e
            .sim
            .call_local("VBD.get_record", &[session.clone(), v.clone()])
            .unwrap();
        if rec.get("userdevice").and_then(Value::as_str) == Some("5") {
            e.sim
                .call_local("VBD.destroy", &[session.clone(), v.clone()])
                .unwrap();
        }
    }
    ok(e.backup(&out, &["--state", p(&state)]).await);
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    let ids: Vec<&String> = s["disks"].as_object().unwrap().keys().collect();
    assert_eq!(ids.len(), 2, "{s}");
    assert!(!ids.contains(&&removed));
    let r: Value = e.sim.vdi_ref_of(&removed).unwrap().into();
    let snaps = e
        .sim
        .call_local("VDI.get_snapshots", &[session, r])
        .unwrap();
    assert!(
        snaps.as_array().unwrap().is_empty(),
        "the removed disk's base stayed"
    );
}

/// A disk without CBT is skipped (with a warning) and named in point.json; such a point is
/// not restored as a VM, whose metadata would attach the VM's live disk to the new VM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_without_cbt_is_skipped_and_its_point_not_restored_as_a_vm() {
    let e = env_with(|c| c.disks = 2).await;
    let out = e.dir.join("points");
    std::fs::create_dir(&out).unwrap();
    let off = e.sim.disks()[1].clone();
    let session = login(&e);
    let r: Value = e.sim.vdi_ref_of(&off).unwrap().into();
    e.sim.call_local("VDI.disable_cbt", &[session, r]).unwrap();
    guest_writes(&e, 0);
    let o = ok(e.backup(&out, &[]).await);
    assert!(
        stderr(&o).contains("changed block tracking is off"),
        "{}",
        stderr(&o)
    );
    let dir = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
    let info = point_json(&dir);
    assert_eq!(info["disks"].as_array().unwrap().len(), 1);
    assert_eq!(info["skipped"][0], off.as_str());
    let creates = e.sim.calls("VDI.create");
    let o = e.restore_vm(&dir, &[]).await;
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("does not hold the VM's disks"),
        "{}",
        stderr(&o)
    );
    assert_eq!(e.sim.calls("VDI.create"), creates);
    // Every snapshot of this run is gone, the skipped disk's included.
    assert_eq!(e.disk_snapshots(), vec![]);
}
