//! The XenServer simulator as the integration tests use it: one VDI, the cbtstream binary
//! run against it with the password in the environment, and probes of the host's snapshots.
#![allow(dead_code)]

use super::common::*;
use cbtstream_proto::xmlrpc::Value;
use cbtstream_xapi_sim::{SimConfig, Simulator};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

pub const SIZE: u64 = (3 << 20) + 512; // a multiple of 512, not of 64 KiB

pub struct Env {
    pub _tmp: tempfile::TempDir,
    pub dir: PathBuf,
    pub sim: Simulator,
}

pub async fn env() -> Env {
    env_with(|_| {}).await
}

pub async fn env_with(tweak: impl FnOnce(&mut SimConfig)) -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let mut cfg = SimConfig::for_tests(dir.join("sim"));
    cfg.disk_size = SIZE;
    tweak(&mut cfg);
    let sim = Simulator::start(cfg).await.unwrap();
    Env {
        _tmp: tmp,
        dir,
        sim,
    }
}

impl Env {
    /// `cbtstream backup --xapi ... --vm VM TARGET...` killed (SIGKILL) while its first NBD
    /// read after now is stalled: a run that died mid-transfer.
    pub async fn kill_backup_mid_transfer(&self, target: &[&str]) {
        use cbtstream_testkit::xen_nbd::StallAt;
        let faults = self.sim.nbd().faults.clone();
        faults.stall(StallAt::Request(faults.requests() + 1));
        let mut child = std::process::Command::new(BIN)
            .args([
                "backup",
                "--xapi",
                &self.sim.url(),
                "--xapi-ca",
                p(self.sim.ca_path()),
                "--vm",
                self.sim.vm_uuid(),
            ])
            .args(target)
            .env("XAPI_PASSWORD", self.sim.password())
            .spawn()
            .unwrap();
        tokio::time::timeout(
            std::time::Duration::from_secs(30),
            faults.wait_until(|f| f.stalls() == 1),
        )
        .await
        .expect("the backup never reached the NBD server");
        child.kill().unwrap();
        let _ = child.wait();
        faults.release_stall();
    }

    /// Snapshot VMs of the VM still on the host.
    pub fn snapshot_vms(&self) -> usize {
        let session = login(self);
        let vm: Value = self.sim.vm_ref().into();
        let snaps = self
            .sim
            .call_local("VM.get_snapshots", &[session, vm])
            .unwrap();
        snaps.as_array().map_or(0, <[Value]>::len)
    }

    /// `cbtstream backup --xapi ... --vm VM --repo REPO EXTRA...`.
    pub async fn backup_repo(&self, repo: &str, extra: &[&str]) -> Output {
        let mut args = vec!["--vm", self.sim.vm_uuid(), "--repo", repo];
        args.extend_from_slice(extra);
        self.command(&["backup", "--xapi", &self.sim.url()], false, &args)
            .await
    }

    pub fn sr_uuid(&self) -> String {
        let session = login(self);
        let srs = self
            .sim
            .call_local("SR.get_all", std::slice::from_ref(&session))
            .unwrap();
        let sr = srs.as_array().unwrap()[0].clone();
        let uuid = self.sim.call_local("SR.get_uuid", &[session, sr]).unwrap();
        uuid.as_str().unwrap().to_string()
    }

    /// The disks of the VM `vm_uuid`, by slot: (slot, VDI uuid).
    pub fn vm_disks(&self, vm_uuid: &str) -> Vec<(String, String)> {
        let session = login(self);
        let vm = self
            .sim
            .call_local("VM.get_by_uuid", &[session.clone(), vm_uuid.into()])
            .unwrap();
        let vbds = self
            .sim
            .call_local("VM.get_VBDs", &[session.clone(), vm])
            .unwrap();
        let mut out = Vec::new();
        for vbd in vbds.as_array().unwrap() {
            let rec = self
                .sim
                .call_local("VBD.get_record", &[session.clone(), vbd.clone()])
                .unwrap();
            if rec.get("type").and_then(Value::as_str) != Some("Disk") {
                continue;
            }
            let vdi = rec.get("VDI").unwrap().clone();
            let uuid = self
                .sim
                .call_local("VDI.get_uuid", &[session.clone(), vdi])
                .unwrap();
            let slot = rec.get("userdevice").and_then(Value::as_str).unwrap();
            out.push((slot.to_string(), uuid.as_str().unwrap().to_string()));
        }
        out.sort();
        out
    }

    pub fn state(&self) -> PathBuf {
        self.dir.join("chain.json")
    }

    /// `cbtstream export --xapi ... --vdi ... -o OUT EXTRA...`.
    pub async fn export(&self, out: &Path, extra: &[&str]) -> Output {
        self.export_via(&self.sim.url(), out, extra).await
    }

    pub async fn export_via(&self, url: &str, out: &Path, extra: &[&str]) -> Output {
        let mut args = vec!["-o", p(out)];
        args.extend_from_slice(extra);
        self.command(&["export", "--xapi", url], true, &args).await
    }

    /// `cbtstream export --xapi ... --vdi ... EXTRA...` (the output is in EXTRA).
    pub async fn export_to(&self, extra: &[&str]) -> Output {
        self.command(&["export", "--xapi", &self.sim.url()], true, extra)
            .await
    }

    pub async fn gc(&self, extra: &[&str]) -> Output {
        self.command(&["gc", "--xapi", &self.sim.url()], true, extra)
            .await
    }

    /// `cbtstream commit --xapi-ca CA EXTRA...` (the pool master from the state file).
    pub async fn commit(&self, extra: &[&str]) -> Output {
        self.command(&["commit"], false, extra).await
    }

    /// Run cbtstream `head` `--xapi-ca CA` [`--vdi VDI`] `extra`, with the password in the
    /// environment.
    pub async fn command(&self, head: &[&str], vdi: bool, extra: &[&str]) -> Output {
        let mut args: Vec<String> = head.iter().map(|s| s.to_string()).collect();
        args.extend(["--xapi-ca".into(), p(self.sim.ca_path()).into()]);
        if vdi {
            args.extend(["--vdi".into(), self.sim.vdi_uuid().into()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let pw = self.sim.password().to_string();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(BIN)
                .args(&args)
                .env("XAPI_PASSWORD", pw)
                .env("SOURCE_DATE_EPOCH", "1795000000")
                .env_remove("CBTSTREAM_LOG")
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap()
        })
        .await
        .unwrap()
    }

    /// A blank VDI of `size` bytes made on the host directly; its uuid.
    pub fn blank_vdi(&self, size: u64) -> String {
        let session = login(self);
        let srs = self
            .sim
            .call_local("SR.get_all", std::slice::from_ref(&session))
            .unwrap();
        let record = Value::record([
            ("SR", srs.as_array().unwrap()[0].clone()),
            ("virtual_size", Value::int64_str(size as i64)),
            ("name_label", "blank".into()),
            ("type", "user".into()),
            ("sharable", Value::Bool(false)),
            ("read_only", Value::Bool(false)),
            ("other_config", Value::Struct(BTreeMap::new())),
        ]);
        let vdi = self
            .sim
            .call_local("VDI.create", &[session.clone(), record])
            .unwrap();
        let uuid = self
            .sim
            .call_local("VDI.get_uuid", &[session, vdi])
            .unwrap();
        uuid.as_str().unwrap().to_string()
    }

    /// A snapshot of the VDI taken directly on the host (as a run killed right after
    /// `VDI.snapshot` leaves one), tagged as cbtstream tags its own when `tagged`. Its uuid.
    pub fn host_snapshot(&self, tagged: bool) -> String {
        let session = login(self);
        let vdi: Value = self.sim.vdi_ref_of(self.sim.vdi_uuid()).unwrap().into();
        let snap = self
            .sim
            .call_local(
                "VDI.snapshot",
                &[session.clone(), vdi, Value::Struct(Default::default())],
            )
            .unwrap();
        if tagged {
            self.sim
                .call_local(
                    "VDI.add_to_other_config",
                    &[
                        session.clone(),
                        snap.clone(),
                        "cbtstream_snapshot_of".into(),
                        self.sim.vdi_uuid().into(),
                    ],
                )
                .unwrap();
        }
        self.sim
            .call_local("VDI.get_uuid", &[session, snap])
            .unwrap()
            .as_str()
            .unwrap()
            .to_string()
    }

    /// (uuid, type, tagged by cbtstream) of every snapshot of the VDI.
    pub fn snapshots(&self) -> Vec<(String, String, bool)> {
        let session = self
            .sim
            .call_local(
                "session.login_with_password",
                &[self.sim.user().into(), self.sim.password().into()],
            )
            .unwrap();
        let rec = self.sim.vdi_record(self.sim.vdi_uuid()).unwrap();
        let mut out = Vec::new();
        for r in rec
            .get("snapshots")
            .and_then(Value::as_array)
            .map(<[Value]>::to_vec)
            .unwrap_or_default()
        {
            let s = self
                .sim
                .call_local("VDI.get_record", &[session.clone(), r])
                .unwrap();
            let uuid = s.get("uuid").and_then(Value::as_str).unwrap().to_string();
            let typ = s.get("type").and_then(Value::as_str).unwrap().to_string();
            let tagged = s
                .get("other_config")
                .and_then(|m| m.get("cbtstream_snapshot_of"))
                .is_some();
            out.push((uuid, typ, tagged));
        }
        out
    }

    pub fn live_image(&self) -> PathBuf {
        self.sim.vdi_path(self.sim.vdi_uuid()).unwrap()
    }

    /// Guest writes: across a 64 KiB boundary, an aligned block, and the last partial block.
    pub fn guest_writes(&self, seed: u8) {
        let vdi = self.sim.vdi_uuid().to_string();
        let pattern = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
                .collect()
        };
        self.sim
            .write(&vdi, 65536 - 100 + u64::from(seed) * 4096, &pattern(300))
            .unwrap();
        self.sim.write(&vdi, 10 * 65536, &pattern(65536)).unwrap();
        self.sim.write(&vdi, SIZE - 512, &pattern(512)).unwrap();
    }
}

pub fn state_base(path: &Path) -> String {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["base"].as_str().unwrap().to_string()
}

pub fn login(e: &Env) -> Value {
    e.sim
        .call_local(
            "session.login_with_password",
            &[e.sim.user().into(), e.sim.password().into()],
        )
        .unwrap()
}
