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
use super::point::{self, PointDisk, PointInfo};
use super::{
    destroy_if_ours, load_vm_state, lock_chain, lock_repo_vm, login, retry_in_use, src, XapiLogin,
    TAG_SNAPSHOT,
};
use crate::chain::{DiskBase, VmState};
use crate::engine::ExportSummary;
use crate::exit::{fail, Code, Failure, WithCode};
use crate::export::{created_now, send_stream, shutdown_signal, DataPlaneOptions, StreamIds, What};
use crate::repo::point_writer::{base_point_present, PointTarget, PointWriter};
use crate::repo::state::StateHome;
use crate::xapi::{Ref, XapiSession};
use cbtstream_proto::cbt;
use http_body_util::BodyExt;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The name of every snapshot VM `backup` takes (then the time), which `gc --vm` looks for.
pub const SNAPSHOT_NAME: &str = "cbtstream backup ";
/// How long the body of an HTTP handler's answer may take.
pub(super) const READ_TIMEOUT: Duration = Duration::from_secs(600);
/// XenServer serves at most 16 NBD connections per host: the disks share them.
const HOST_NBD_CONNECTIONS: usize = 16;

/// `cbtstream backup`, as the CLI gathered it.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    pub login: XapiLogin,
    pub vm: String,
    /// Where points go: a directory, or a repository.
    pub target: PointTarget,
    /// The VM's chain (a file, or the repository); without it every backup is full and
    /// keeps no base.
    pub state: Option<StateHome>,
    /// `--break-lock`: take the repository's lock of the VM when it is stale.
    pub break_lock: bool,
    /// Turn CBT on for disks that have it off (their export is a full one).
    pub enable_cbt: bool,
    pub keepalive: Duration,
    pub dp: DataPlaneOptions,
}

/// What a backup did.
#[derive(Debug, Clone)]
pub struct BackupReport {
    pub point: PointInfo,
    /// Where the point is (its directory, or its place in the repository).
    pub location: String,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub seconds: f64,
}

/// A disk of the VM to back up.
#[derive(Debug, Clone)]
struct VmDisk {
    vdi: String,
    vdi_ref: Ref,
    slot: String,
    /// CBT was just turned on: its export is a full one, whatever the chain says.
    full: bool,
}

/// The VM's disks: those to back up, and the uuids of every disk VBD's VDI (the skipped ones
/// too), to see whether the VM's disks change during the backup.
struct VmDisks {
    backed_up: Vec<VmDisk>,
    all: Vec<String>,
    skipped: Vec<String>,
}

/// A disk being backed up.
#[derive(Debug, Clone)]
struct Disk {
    vdi: String,
    slot: String,
    /// Its snapshot, and that snapshot's uuid.
    snapshot: (Ref, String),
    /// The snapshot's virtual size.
    size: u64,
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
        Some(StateHome::File(p)) => Some(lock_chain(p)?),
        _ => None,
    };
    let repo_lock = match &opts.target {
        PointTarget::Repo(repo) => {
            Some(lock_repo_vm(repo, &opts.vm, "backup", opts.break_lock).await?)
        }
        PointTarget::Dir(_) => None,
    };
    let state = match &opts.state {
        Some(home) => load_vm_state(home, &opts.vm).await?,
        None => None,
    };
    let point = state.as_ref().and_then(|s| s.point.as_deref());
    let bases_usable = base_point_present(&opts.target, &opts.vm, point)
        .await
        .code(Code::Output)?;
    let session = Arc::new(login(&opts.login).await?);
    let taken: Arc<Mutex<Taken>> = Arc::default();
    let result = tokio::select! {
        r = backup(&session, &opts, state.as_ref(), bases_usable, taken.clone()) => r,
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
    if let Some(lock) = repo_lock {
        lock.release().await;
    }
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
) -> Result<VmDisks, Failure> {
    let mut disks = VmDisks {
        backed_up: Vec::new(),
        all: Vec::new(),
        skipped: Vec::new(),
    };
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
        if !is_uuid(&v.uuid) || !rec.userdevice.bytes().all(|b| b.is_ascii_digit()) {
            return Err(fail(
                Code::Source,
                "the host named a disk or a slot in an unexpected form",
            ));
        }
        disks.all.push(v.uuid.clone());
        let mut full = false;
        if !v.cbt_enabled {
            if !enable_cbt {
                tracing::warn!(
                    "skipping the disk in slot {} (VDI {}): changed block tracking is off (--enable-cbt turns it on)",
                    rec.userdevice,
                    v.uuid
                );
                disks.skipped.push(v.uuid);
                continue;
            }
            tracing::warn!(
                "turning changed block tracking on for VDI {}; its export is a full one",
                v.uuid
            );
            session.vdi_enable_cbt(&vdi).await.map_err(src)?;
            full = true;
        }
        disks.backed_up.push(VmDisk {
            vdi: v.uuid,
            vdi_ref: vdi,
            slot: rec.userdevice,
            full,
        });
    }
    disks.backed_up.sort_by(|a, b| a.slot.cmp(&b.slot));
    disks.all.sort();
    Ok(disks)
}

/// The uuids of the VDIs behind a VM's disk VBDs, sorted.
pub(super) async fn disk_vdis(session: &XapiSession, vm: &Ref) -> Result<Vec<String>, Failure> {
    let mut out = Vec::new();
    for vbd in session.vm_get_record(vm).await.map_err(src)?.vbds {
        let r = session.vbd_get_record(&vbd).await.map_err(src)?;
        if let Some(vdi) = r.vdi.filter(|_| r.vbd_type == "Disk") {
            out.push(session.vdi_get_uuid(&vdi).await.map_err(src)?);
        }
    }
    out.sort();
    Ok(out)
}

/// A uuid as XenServer writes them (what point ids and file names are made of).
fn is_uuid(s: &str) -> bool {
    s.len() == 36 && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

async fn backup(
    session: &Arc<XapiSession>,
    opts: &BackupOptions,
    state: Option<&VmState>,
    bases_usable: bool,
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
    if vm_disks.backed_up.is_empty() {
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
    if !is_uuid(&snap_rec.uuid) {
        return Err(fail(
            Code::Source,
            "the host named the snapshot in an unexpected form",
        ));
    }
    // Each snapshot VDI, by the disk it is a snapshot of; every one tagged at once, so that
    // gc finds them whatever happens next (the skipped disks' too).
    let mut by_source: BTreeMap<Ref, (Ref, String, u64)> = BTreeMap::new();
    for vbd in &snap_rec.vbds {
        let r = session.vbd_get_record(vbd).await.map_err(src)?;
        let Some(vdi) = r.vdi.filter(|_| r.vbd_type == "Disk") else {
            continue;
        };
        taken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .vdis
            .push(vdi.clone());
        let v = session.vdi_get_record(&vdi).await.map_err(src)?;
        let Some(of) = v.snapshot_of else {
            return Err(fail(
                Code::Source,
                "VM.snapshot made a disk that is no snapshot",
            ));
        };
        let source = session.vdi_get_uuid(&of).await.map_err(src)?;
        session
            .vdi_add_to_other_config(&vdi, TAG_SNAPSHOT, &source)
            .await
            .map_err(src)?;
        by_source.insert(of, (vdi, v.uuid, v.virtual_size));
    }
    let (vm_disks_all, skipped) = (vm_disks.all.clone(), vm_disks.skipped.clone());
    let mut disks = Vec::new();
    for d in vm_disks.backed_up {
        let Some((snap, uuid, size)) = by_source.get(&d.vdi_ref).cloned() else {
            return Err(fail(
                Code::Source,
                format!(
                    "VM.snapshot made no snapshot of VDI {} (slot {}): the VM's disks changed \
                     during the backup; try again",
                    d.vdi, d.slot
                ),
            ));
        };
        // The disk's base, when the chain has one, it is still there, and CBT was on.
        let mut base = None;
        match state.and_then(|s| s.disks.get(&d.vdi)) {
            Some(_) if d.full || !bases_usable => {}
            Some(b) => match session.vdi_get_by_uuid(&b.base).await {
                Ok(r) => base = Some((b.base.clone(), r)),
                Err(e) if e.is("UUID_INVALID") || e.is("HANDLE_INVALID") => tracing::warn!(
                    "the base {} of VDI {} is gone: its export is a full one",
                    b.base,
                    d.vdi
                ),
                Err(e) => return Err(src(e)),
            },
            None if state.is_some() => {
                tracing::info!("VDI {} is new in the VM: its export is a full one", d.vdi)
            }
            None => {}
        }
        disks.push(Disk {
            vdi: d.vdi,
            slot: d.slot,
            snapshot: (snap, uuid),
            size,
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
                    cbt::validate(&bm, d.size).code(Code::Source)?;
                    What::Changed(bm)
                }
                Err(e) if super::export::is_chain_broken(&e) => {
                    tracing::warn!("the chain of VDI {} from {base_uuid} is broken ({e}): its export is a full one", d.vdi);
                    d.base = None;
                    allocation::full_export_reads(session, &snap_uuid, d.size).await
                }
                Err(e) => return Err(src(e)),
            },
            None => allocation::full_export_reads(session, &snap_uuid, d.size).await,
        };
        reads.push(what);
    }

    let mut partial = PointWriter::create(&opts.target, &rec.uuid, &snap_rec.uuid)
        .await
        .code(Code::Output)?;
    let exported = async {
        // The VM's own configuration, not the snapshot VM's: imported, a snapshot's would come
        // back as a snapshot (xapi keeps `is_a_snapshot`), not as a VM that can start.
        let metadata = read_metadata(session, &rec.uuid).await?;
        partial
            .put(point::METADATA_FILE, metadata)
            .await
            .code(Code::Output)?;
        // The metadata must describe the disks that were snapshotted: a disk plugged or
        // unplugged meanwhile would come back wrong (or as the VM's live disk).
        if disk_vdis(session, &vm).await? != vm_disks_all {
            return Err(fail(
                Code::Source,
                format!(
                    "VM {}'s disks changed during the backup; try again",
                    opts.vm
                ),
            ));
        }
        let summaries = export_disks(session, opts, &disks, reads, &mut partial).await?;
        let mut entries = Vec::new();
        for d in &disks {
            let stream = stream_name(&d.slot);
            let sha256 = partial.sha256(&stream).await.code(Code::Output)?;
            let size = d.size;
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
        Ok(done) => done,
        Err(e) => {
            partial.discard().await;
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
        skipped,
    };
    let location = partial.finish(&info).await.code(Code::Output)?;
    let report = BackupReport {
        point: info,
        location,
        bytes_read: summaries.iter().map(|s| s.bytes_read).sum(),
        bytes_written: summaries.iter().map(|s| s.bytes_written).sum(),
        seconds: 0.0,
    };
    Ok((report, disks))
}

fn stream_name(slot: &str) -> String {
    format!("disk{slot}.cbts")
}

/// `GET /export_metadata?uuid=<VM>&export_snapshots=false`.
async fn read_metadata(session: &XapiSession, vm_uuid: &str) -> Result<Vec<u8>, Failure> {
    let resp = session
        .http_get(
            "/export_metadata",
            &[("uuid", vm_uuid), ("export_snapshots", "false")],
        )
        .await
        .map_err(src)?;
    let limit = point::MAX_METADATA_BYTES as usize;
    let read = http_body_util::Limited::new(resp.into_body(), limit).collect();
    // XAPI answers 200 before it reads anything: the body has a time limit of its own.
    let body = tokio::time::timeout(READ_TIMEOUT, read)
        .await
        .map_err(|_| fail(Code::Source, "reading the VM's metadata timed out"))?
        .map_err(|e| fail(Code::Source, format!("reading the VM's metadata: {e}")))?
        .to_bytes();
    Ok(body.to_vec())
}

/// Every disk over NBD at once, sharing the host's connections.
async fn export_disks(
    session: &Arc<XapiSession>,
    opts: &BackupOptions,
    disks: &[Disk],
    reads: Vec<What>,
    partial: &mut PointWriter,
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
        let destination = partial
            .stream(&stream_name(&d.slot), d.size + d.size / 64 + (1 << 20))
            .await
            .code(Code::Output)?;
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
    let Some(home) = &opts.state else {
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
    home.save(&state).await.code(Code::Output)?;
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
    home.save(&state).await.code(Code::Output)?;
    // The old bases, and the bases of disks no longer in the VM.
    for (vdi, b) in old.map(|s| s.disks).unwrap_or_default() {
        destroy_if_ours(session, &vdi, &b.base, "previous base").await;
    }
    Ok(())
}
