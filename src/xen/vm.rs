//! `cbtstream backup --xapi URL --vm UUID --out DIR`: one point of a whole VM.
//!
//! ```text
//! lock → login → the VM's disks (VBD type Disk; CD drives and disks without CBT skipped)
//!   → VM.snapshot (crash-consistent across the disks) → tag each snapshot VDI
//!   → list_changed_blocks per disk from its base (or the VHD allocation for a full one)
//!   → GET /export_metadata of the VM → every disk over NBD, in parallel, sharing
//!     the host's 16 NBD connections → point.json → rename DIR/<point>.partial to DIR/<point>
//!   → commit: VM.destroy(snapshot VM), state file, data_destroy of each snapshot VDI,
//!     destroy the bases no longer needed
//! ```
//!
//! A failure on any disk, or a signal, before the point directory is renamed leaves every
//! disk's chain where it was: every snapshot VDI and the snapshot VM are destroyed, and the
//! partial directory removed.

use super::allocation;
use super::nbd::{keepalive, NbdParams, XenNbd};
use super::point::{self, PartialPoint, PointDisk, PointInfo};
use super::{destroy_if_ours, lock_chain, login, retry_in_use, src, XapiLogin, TAG_SNAPSHOT};
use crate::chain::{self, DiskBase, VmState};
use crate::engine::ExportSummary;
use crate::exit::{fail, Code, Failure, WithCode};
use crate::export::{
    created_now, send_stream, shutdown_signal, DataPlaneOptions, Destination, StreamIds, What,
};
use crate::xapi::{Ref, XapiSession};
use cbtstream_proto::cbt;
use http_body_util::BodyExt;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The name of every snapshot VM `backup` takes (then the time), which `gc --vm` looks for.
pub const SNAPSHOT_NAME: &str = "cbtstream backup ";
/// XenServer serves at most 16 NBD connections per host: the disks share them.
const HOST_NBD_CONNECTIONS: usize = 16;
/// The VM's configuration is a few hundred KiB; refuse anything absurd.
const MAX_METADATA_BYTES: usize = 64 << 20;

/// `cbtstream backup`, as the CLI gathered it.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    pub login: XapiLogin,
    pub vm: String,
    /// Where point directories go.
    pub out: PathBuf,
    /// The VM's chain; without it every backup is full and keeps no base.
    pub state: Option<PathBuf>,
    /// Turn CBT on for disks that have it off (their export is a full one).
    pub enable_cbt: bool,
    pub keepalive: Duration,
    pub dp: DataPlaneOptions,
}

/// What a backup did.
#[derive(Debug, Clone)]
pub struct BackupReport {
    pub point: PointInfo,
    pub dir: PathBuf,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub seconds: f64,
}

/// A disk of the VM to back up.
#[derive(Debug, Clone)]
struct VmDisk {
    vdi: String,
    slot: String,
}

/// A disk being backed up.
#[derive(Debug, Clone)]
struct Disk {
    vdi: String,
    slot: String,
    /// Its snapshot, and that snapshot's uuid.
    snapshot: (Ref, String),
    /// The base it continues from (snapshot VDI uuid), when it has one.
    base: Option<(String, Ref)>,
}

/// What the host holds for this run until it is committed or cleaned up.
#[derive(Default)]
struct Taken {
    snapshot_vm: Option<Ref>,
    /// Every snapshot VDI of the snapshot VM.
    vdis: Vec<Ref>,
}

pub async fn run(opts: BackupOptions) -> Result<BackupReport, Failure> {
    let started = std::time::Instant::now();
    let _lock = match &opts.state {
        Some(p) => Some(lock_chain(p)?),
        None => None,
    };
    let state = match &opts.state {
        Some(p) => chain::load_vm(p).map_err(|e| Failure {
            code: Code::Usage,
            error: e.into(),
        })?,
        None => None,
    };
    if let Some(s) = &state {
        if s.vm != opts.vm {
            return Err(fail(
                Code::Usage,
                format!("the state file is for VM {}, not {}", s.vm, opts.vm),
            ));
        }
    }
    let session = Arc::new(login(&opts.login).await?);
    let taken: Arc<Mutex<Taken>> = Arc::default();
    let result = tokio::select! {
        r = backup(&session, &opts, state.as_ref(), taken.clone()) => r,
        sig = shutdown_signal() => Err(fail(Code::Interrupted, format!("interrupted by {sig}; nothing was committed"))),
    };
    // The point is durable: the commit runs to its end, whatever signal comes now.
    let result = match result {
        Ok((report, disks)) => commit(&session, &opts, state, &report, &disks, &taken)
            .await
            .map(|()| report),
        Err(e) => Err(e),
    };
    clean_up(&session, &taken).await;
    session.logout().await;
    result.map(|mut r| {
        r.seconds = started.elapsed().as_secs_f64();
        r
    })
}

/// Destroy what this run took and did not hand over to the chain.
async fn clean_up(session: &XapiSession, taken: &Mutex<Taken>) {
    let t = std::mem::take(&mut *taken.lock().unwrap_or_else(|p| p.into_inner()));
    if let Some(vm) = &t.snapshot_vm {
        if let Err(e) = session.vm_destroy(vm).await {
            tracing::warn!("could not destroy the snapshot VM: {e}");
        }
    }
    for vdi in &t.vdis {
        if let Err(e) = retry_in_use(|| session.vdi_destroy(vdi)).await {
            tracing::warn!("could not remove a snapshot of this run ({e}); `cbtstream gc` will");
        }
    }
}

/// The VM's disks that can be backed up, by slot.
async fn vm_disks(
    session: &XapiSession,
    vbds: &[Ref],
    enable_cbt: bool,
) -> Result<Vec<VmDisk>, Failure> {
    let mut disks = Vec::new();
    for vbd in vbds {
        let rec = session.vbd_get_record(vbd).await.map_err(src)?;
        let Some(vdi) = rec.vdi.filter(|_| rec.vbd_type == "Disk") else {
            tracing::info!(
                slot = %rec.userdevice,
                "skipping a {} drive: not a disk",
                rec.vbd_type
            );
            continue;
        };
        let v = session.vdi_get_record(&vdi).await.map_err(src)?;
        if !v.cbt_enabled {
            if !enable_cbt {
                tracing::warn!(
                    "skipping the disk in slot {} (VDI {}): changed block tracking is off (--enable-cbt turns it on)",
                    rec.userdevice,
                    v.uuid
                );
                continue;
            }
            tracing::warn!(
                "turning changed block tracking on for VDI {}; its export is a full one",
                v.uuid
            );
            session.vdi_enable_cbt(&vdi).await.map_err(src)?;
        }
        disks.push(VmDisk {
            vdi: v.uuid,
            slot: rec.userdevice,
        });
    }
    disks.sort_by(|a, b| a.slot.cmp(&b.slot));
    Ok(disks)
}

async fn backup(
    session: &Arc<XapiSession>,
    opts: &BackupOptions,
    state: Option<&VmState>,
    taken: Arc<Mutex<Taken>>,
) -> Result<(BackupReport, Vec<Disk>), Failure> {
    let vm = session.vm_get_by_uuid(&opts.vm).await.map_err(src)?;
    let rec = session.vm_get_record(&vm).await.map_err(src)?;
    if rec.is_a_snapshot {
        return Err(fail(
            Code::Usage,
            format!("VM {} is a snapshot; give the VM itself", opts.vm),
        ));
    }
    let vm_disks = vm_disks(session, &rec.vbds, opts.enable_cbt).await?;
    if vm_disks.is_empty() {
        return Err(fail(
            Code::Source,
            format!(
                "VM {} has no disk with changed block tracking to back up",
                opts.vm
            ),
        ));
    }

    // One snapshot of every disk. From here on, a failure destroys what it made.
    let now = created_now();
    let snap_vm = session
        .vm_snapshot(
            &vm,
            &format!("{SNAPSHOT_NAME}{}", crate::restore::report::rfc3339(now)),
        )
        .await
        .map_err(src)?;
    taken.lock().unwrap_or_else(|p| p.into_inner()).snapshot_vm = Some(snap_vm.clone());
    let snap_rec = session.vm_get_record(&snap_vm).await.map_err(src)?;
    let mut by_slot = BTreeMap::new();
    for vbd in &snap_rec.vbds {
        let r = session.vbd_get_record(vbd).await.map_err(src)?;
        if let Some(vdi) = r.vdi.filter(|_| r.vbd_type == "Disk") {
            taken
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .vdis
                .push(vdi.clone());
            by_slot.insert(r.userdevice, vdi);
        }
    }
    let mut disks = Vec::new();
    for d in vm_disks {
        let Some(snap) = by_slot.get(&d.slot) else {
            return Err(fail(
                Code::Source,
                format!(
                    "VM.snapshot made no snapshot of the disk in slot {}",
                    d.slot
                ),
            ));
        };
        session
            .vdi_add_to_other_config(snap, TAG_SNAPSHOT, &d.vdi)
            .await
            .map_err(src)?;
        let uuid = session.vdi_get_uuid(snap).await.map_err(src)?;
        // The disk's base, when the chain has one and it is still there.
        let mut base = None;
        if let Some(b) = state.and_then(|s| s.disks.get(&d.vdi)) {
            match session.vdi_get_by_uuid(&b.base).await {
                Ok(r) => base = Some((b.base.clone(), r)),
                Err(e) if e.is("UUID_INVALID") => tracing::warn!(
                    "the base {} of VDI {} is gone: its export is a full one",
                    b.base,
                    d.vdi
                ),
                Err(e) => return Err(src(e)),
            }
        } else if state.is_some() {
            tracing::info!("VDI {} is new in the VM: its export is a full one", d.vdi);
        }
        disks.push(Disk {
            vdi: d.vdi,
            slot: d.slot,
            snapshot: (snap.clone(), uuid),
            base,
        });
    }

    // What each disk reads, before any NBD connection (an open one plugs the snapshot into
    // dom0, and list_changed_blocks would fail with VDI_IN_USE).
    let mut reads = Vec::new();
    for d in &mut disks {
        let (snap, snap_uuid) = d.snapshot.clone();
        let what = match &d.base {
            Some((base_uuid, base)) => match session.vdi_list_changed_blocks(base, &snap).await {
                Ok(b64) => {
                    let bm = cbt::decode_base64(b64.as_bytes()).code(Code::Source)?;
                    What::Changed(bm)
                }
                Err(e)
                    if e.is("SR_BACKEND_FAILURE_460")
                        || e.is("SR_BACKEND_FAILURE_459")
                        || e.is("VDI_NO_CBT_METADATA") =>
                {
                    tracing::warn!("the chain of VDI {} from {base_uuid} is broken ({e}): its export is a full one", d.vdi);
                    d.base = None;
                    allocation::full_export_reads(session, &snap_uuid).await
                }
                Err(e) => return Err(src(e)),
            },
            None => allocation::full_export_reads(session, &snap_uuid).await,
        };
        reads.push(what);
    }

    let partial = PartialPoint::create(&opts.out, &snap_rec.uuid).map_err(|e| {
        fail(
            Code::Output,
            format!(
                "creating the point directory in {}: {e}",
                opts.out.display()
            ),
        )
    })?;
    let exported = async {
        // The VM's own configuration, not the snapshot VM's: imported, a snapshot's would come
        // back as a snapshot (xapi keeps `is_a_snapshot`), not as a VM that can start.
        save_metadata(session, &rec.uuid, &partial.file(point::METADATA_FILE)).await?;
        let summaries = export_disks(session, opts, &disks, reads, &partial).await?;
        let mut entries = Vec::new();
        for d in &disks {
            let stream = stream_name(&d.slot);
            let path = partial.file(&stream);
            let sha256 = tokio::task::spawn_blocking(move || point::sha256_file(&path))
                .await
                .map_err(|e| fail(Code::Failure, e))?
                .map_err(|e| fail(Code::Output, format!("reading back {stream}: {e}")))?;
            let size = session
                .vdi_get_record(&d.snapshot.0)
                .await
                .map_err(src)?
                .virtual_size;
            entries.push(PointDisk {
                id: d.vdi.clone(),
                slot: d.slot.clone(),
                size,
                stream,
                sha256,
                base: d
                    .base
                    .as_ref()
                    .and_then(|_| state.and_then(|s| s.point.clone())),
            });
        }
        Ok::<_, Failure>((summaries, entries))
    }
    .await;
    let (summaries, entries) = match exported {
        Ok(x) => x,
        Err(e) => {
            partial.discard();
            return Err(e);
        }
    };
    let info = PointInfo {
        id: snap_rec.uuid.clone(),
        vm: rec.uuid.clone(),
        name: rec.name_label.clone(),
        time: crate::restore::report::rfc3339(now),
        base: entries.iter().find_map(|d| d.base.clone()),
        disks: entries,
    };
    let dir = partial
        .finish(&info)
        .map_err(|e| fail(Code::Output, format!("finishing the point directory: {e}")))?;
    let report = BackupReport {
        point: info,
        dir,
        bytes_read: summaries.iter().map(|s| s.bytes_read).sum(),
        bytes_written: summaries.iter().map(|s| s.bytes_written).sum(),
        seconds: 0.0,
    };
    Ok((report, disks))
}

fn stream_name(slot: &str) -> String {
    format!("disk{slot}.cbts")
}

/// `GET /export_metadata?uuid=<VM>&export_snapshots=false` into `path`.
async fn save_metadata(session: &XapiSession, vm_uuid: &str, path: &Path) -> Result<(), Failure> {
    let resp = session
        .http_get(
            "/export_metadata",
            &[("uuid", vm_uuid), ("export_snapshots", "false")],
        )
        .await
        .map_err(src)?;
    let body = http_body_util::Limited::new(resp.into_body(), MAX_METADATA_BYTES)
        .collect()
        .await
        .map_err(|e| fail(Code::Source, format!("reading the VM's metadata: {e}")))?
        .to_bytes();
    crate::durable::replace(path, &body)
        .map_err(|e| fail(Code::Output, format!("writing {}: {e}", path.display())))
}

/// Every disk over NBD at once, sharing the host's connections.
async fn export_disks(
    session: &Arc<XapiSession>,
    opts: &BackupOptions,
    disks: &[Disk],
    reads: Vec<What>,
    partial: &PartialPoint,
) -> Result<Vec<ExportSummary>, Failure> {
    let mut dp = opts.dp.clone();
    dp.connections = dp
        .connections
        .min(HOST_NBD_CONNECTIONS / disks.len().max(1))
        .max(1);
    let params = NbdParams {
        connect_timeout: dp.connect_timeout.max(Duration::from_secs(1)),
        extended_headers: dp.extended_headers,
    };
    let progress = Arc::new(crate::progress::Bar::stderr());
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (d, what)) in disks.iter().zip(reads).enumerate() {
        let (snap, snap_uuid) = d.snapshot.clone();
        let ids = StreamIds {
            source_id: d.vdi.clone(),
            point_id: snap_uuid,
            base_id: d.base.as_ref().map(|(u, _)| u.clone()),
        };
        let destination = Destination::Output(partial.file(&stream_name(&d.slot)));
        let (session, dp, progress) = (session.clone(), dp.clone(), progress.clone());
        tasks.spawn(async move {
            let (nbd, first) = XenNbd::open(session, snap, params).await?;
            let summary = send_stream(first, nbd, what, ids, &dp, &destination, progress).await?;
            Ok::<_, Failure>((i, summary))
        });
    }
    let transfer = async {
        let mut summaries = vec![None; disks.len()];
        while let Some(joined) = tasks.join_next().await {
            let (i, summary) = joined.map_err(|e| fail(Code::Failure, e))??;
            summaries[i] = Some(summary);
        }
        Ok::<_, Failure>(summaries.into_iter().flatten().collect())
    };
    // Any disk failing ends the others (dropping the JoinSet aborts them).
    match disks.first() {
        Some(d) => keepalive(session, &d.snapshot.0, opts.keepalive, transfer).await,
        None => transfer.await,
    }
}

/// The point is durable: make each disk's snapshot its base.
async fn commit(
    session: &XapiSession,
    opts: &BackupOptions,
    old: Option<VmState>,
    report: &BackupReport,
    disks: &[Disk],
    taken: &Mutex<Taken>,
) -> Result<(), Failure> {
    // The snapshot VM record goes first: its VBDs would keep the VDIs in use.
    let snapshot_vm = taken
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .snapshot_vm
        .take();
    if let Some(vm) = snapshot_vm {
        if let Err(e) = session.vm_destroy(&vm).await {
            tracing::warn!("could not destroy the snapshot VM: {e}");
        }
    }
    let Some(path) = &opts.state else {
        // No chain: nothing builds on these snapshots; clean_up destroys them.
        return Ok(());
    };
    let ours: Vec<Ref> = disks.iter().map(|d| d.snapshot.0.clone()).collect();
    let mut state = VmState {
        version: 1,
        vm: opts.vm.clone(),
        host: session.endpoint().url(),
        point: Some(report.point.id.clone()),
        disks: disks
            .iter()
            .map(|d| {
                let base = DiskBase {
                    base: d.snapshot.1.clone(),
                    base_is_metadata: false,
                    slot: d.slot.clone(),
                };
                (d.vdi.clone(), base)
            })
            .collect(),
        updated_unix_secs: created_now(),
    };
    chain::save_vm(path, &state).code(Code::Output)?;
    // These are the chain's now; the snapshots of skipped disks stay for clean_up.
    taken
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .vdis
        .retain(|v| !ours.contains(v));
    for (d, snap) in disks.iter().zip(&ours) {
        match retry_in_use(|| session.vdi_data_destroy(snap)).await {
            Ok(()) => {
                if let Some(b) = state.disks.get_mut(&d.vdi) {
                    b.base_is_metadata = true;
                }
            }
            Err(e) => tracing::warn!(
                "VDI.data_destroy failed for the snapshot of VDI {} ({e}): the full snapshot stays as its base",
                d.vdi
            ),
        }
    }
    chain::save_vm(path, &state).code(Code::Output)?;
    // The old bases, and the bases of disks no longer in the VM.
    for (vdi, b) in old.map(|s| s.disks).unwrap_or_default() {
        destroy_if_ours(session, &vdi, &b.base, "previous base").await;
    }
    Ok(())
}
