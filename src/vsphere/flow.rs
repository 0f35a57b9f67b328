//! `backup --vsphere` (every disk, one point directory), `export --vsphere --disk KEY` (one
//! stream) and `vsphere update-paths`.
//!
//! The invariant, as for XenServer: the chain state moves only after the output is durable.
//! A point directory or a file is durable once renamed into place; `--to-command` once its
//! command exited 0; a stream to stdout or a FIFO only once its reader says so, so such a
//! point is recorded as `pending` and the base stays where it was. On a failure or a signal
//! the snapshot is removed and the state is left as it was.
//!
//! Stream ids: the source id is `<VM moId>/<disk key>` (stable across snapshots; a backing
//! uuid is not always set); the point id is a fresh UUID per point, and the base id the
//! point id the state recorded for that disk, so restore's chain checks work unchanged.

use super::calls::{self, Disk};
use super::client::{Client, ClientOptions, MoRef, VsphereError};
use super::data::{read_disk, DiskReads, FileServiceLogin};
use super::snapshot::{self, Taken};
use crate::chain::{VsphereDisk, VsphereState};
use crate::engine::ExportSummary;
use crate::exit::{fail, Code, Failure, WithCode};
use crate::export::{shutdown_signal, DataPlaneOptions, Destination, StreamIds};
use crate::repo::point_writer::{PointTarget, PointWriter};
use crate::repo::state::StateHome;
use crate::tls::Trust;
use crate::xapi::Secret;
use crate::xen::point::{PointDisk, PointInfo};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

/// How to reach and log in to vCenter, as the CLI gathered it.
#[derive(Debug, Clone)]
pub struct VsphereLogin {
    pub url: String,
    pub user: String,
    pub password: Secret,
    pub trust: Trust,
    /// `--vsphere-release`.
    pub release: Option<String>,
}

/// The password, from a file or $VSPHERE_PASSWORD: never from argv.
pub fn read_password(file: Option<&std::path::Path>) -> Result<Secret, Failure> {
    crate::xapi::read_password(file, "VSPHERE_PASSWORD", "vSphere")
}

/// Where a run's output goes.
#[derive(Debug)]
pub enum Output {
    /// `backup`: a point directory (or a repository point) of every disk.
    Point(PointTarget),
    /// `export --disk KEY`: one stream.
    Stream { disk: i32, destination: Destination },
}

/// Where a vSphere chain's state lives.
#[derive(Debug, Clone)]
pub enum StateAt {
    /// No chain: every backup is full.
    Nowhere,
    /// `--state FILE`.
    File(PathBuf),
    /// The repository the point goes to: `vms/<vm moId>/state.json`.
    Repository,
}

#[derive(Debug)]
pub struct RunOptions {
    pub login: VsphereLogin,
    /// moId or instance/BIOS UUID.
    pub vm: String,
    pub output: Output,
    /// Where the chain state lives.
    pub state: StateAt,
    /// Export the whole disk (allocated areas) even with a state.
    pub full: bool,
    pub enable_cbt: bool,
    pub quiesce: bool,
    pub fallback_full: bool,
    /// `--break-lock`: take the repository's lock of the VM when it is stale.
    pub break_lock: bool,
    pub dp: DataPlaneOptions,
}

#[derive(Debug)]
pub struct RunReport {
    pub point: String,
    pub base: Option<String>,
    /// The point directory, or the stream's destination.
    pub location: String,
    /// Whether the chain state moved to this point (false: pending, or no state).
    pub committed: bool,
    pub summaries: Vec<ExportSummary>,
}

fn src(e: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code: Code::Source,
        error: e.into(),
    }
}

pub async fn login(l: &VsphereLogin) -> Result<Client, Failure> {
    let opts = ClientOptions {
        release: l.release.clone(),
        ..ClientOptions::new(l.trust.clone())
    };
    let client = Client::login(&l.url, &l.user, &l.password, &opts).await;
    client.map_err(|e| match e {
        VsphereError::Url { .. } | VsphereError::TlsConfig(_) => fail(Code::Usage, e),
        e => src(e),
    })
}

pub async fn run(opts: RunOptions) -> Result<RunReport, Failure> {
    let _lock = match &opts.state {
        StateAt::File(p) => Some(crate::xen::lock_chain(p)?),
        _ => None,
    };
    let repo = match &opts.output {
        Output::Point(PointTarget::Repo(repo)) => Some(repo),
        _ => None,
    };
    let lock = repo.map(|repo| (repo, "backup", opts.break_lock));
    with_vm(&opts.login, &opts.vm, lock, async |client, vm| {
        run_locked(client, &opts, vm).await
    })
    .await
}

/// Logs in, finds the VM (`vm` a moId or a UUID), takes the repository's lock of it when
/// there is one (`(repo, operation, --break-lock)`), runs `op`, then releases the lock and
/// logs out, whatever `op` returned. The lock names the VM by its moId, as point.json and the
/// repository's keys do, whether `--vm` gave the moId or a UUID.
pub(super) async fn with_vm<T>(
    login_with: &VsphereLogin,
    vm: &str,
    lock: Option<(&crate::repo::Repo, &str, bool)>,
    op: impl AsyncFnOnce(&Arc<Client>, &MoRef) -> Result<T, Failure>,
) -> Result<T, Failure> {
    let client = Arc::new(login(login_with).await?);
    let result = async {
        let vm = calls::find_vm(&client, vm).await.map_err(src)?;
        let repo_lock = match lock {
            Some((repo, operation, break_lock)) => {
                Some(crate::xen::lock_repo_vm(repo, &vm.value, operation, break_lock).await?)
            }
            None => None,
        };
        let result = op(&client, &vm).await;
        if let Some(lock) = repo_lock {
            lock.release().await;
        }
        result
    }
    .await;
    client.logout().await;
    result
}

/// The run once the chain is locked: its state, the point, the state moved, the snapshot gone.
async fn run_locked(
    client: &Arc<Client>,
    opts: &RunOptions,
    vm: &MoRef,
) -> Result<RunReport, Failure> {
    let home = match (&opts.state, &opts.output) {
        (StateAt::File(p), _) => Some(StateHome::File(p.clone())),
        (StateAt::Repository, Output::Point(PointTarget::Repo(repo))) => Some(StateHome::Repo {
            repo: repo.clone(),
            vm: vm.value.clone(),
        }),
        _ => None,
    };
    let state = super::state::load(home.as_ref(), vm, &opts.output).await?;
    let mut taken = Taken::default();
    let result = tokio::select! {
        r = take_point(client, opts, vm, state.clone(), &mut taken) => r,
        sig = shutdown_signal() => Err(fail(Code::Interrupted, format!("interrupted by {sig}; nothing was committed"))),
    };
    // The output is durable: the state moves, whatever signal comes now.
    let result = match result {
        Ok(done) => super::state::commit(home.as_ref(), vm, &client_url(client), state, done).await,
        Err(e) => Err(e),
    };
    // The signal may have reached the data plane first (it stops its streams on its own).
    if let Err(f) = &result {
        if f.code == Code::Interrupted && taken.may_hold_something() {
            tracing::warn!("interrupted: removing what this run created on vCenter");
        }
    }
    snapshot::remove(client, taken).await;
    result
}

/// One disk of the run: what the snapshot froze and where its incremental starts.
pub(super) struct Planned {
    pub(super) disk: Disk,
    pub(super) base: Option<VsphereDisk>,
    pub(super) bitmap: Vec<u8>,
    pub(super) change_id: String,
}

/// A point taken and durable; the chain state is not moved yet.
pub(super) struct Done {
    pub(super) report: RunReport,
    /// Each disk's new base.
    pub(super) disks: BTreeMap<i32, VsphereDisk>,
    /// Whether the output is durable now (false: a pipe, whose reader confirms it later).
    pub(super) durable: bool,
}

async fn take_point(
    client: &Arc<Client>,
    opts: &RunOptions,
    vm: &MoRef,
    state: Option<VsphereState>,
    taken: &mut Taken,
) -> Result<Done, Failure> {
    let config = calls::vm_config(client, vm).await.map_err(src)?;
    if let Output::Stream { disk, .. } = &opts.output {
        if !config.disks.iter().any(|d| d.key == *disk) {
            let keys: Vec<String> = config.disks.iter().map(|d| d.key.to_string()).collect();
            return Err(fail(
                Code::Usage,
                format!(
                    "VM {} has no disk with key {disk} (its disks: {})",
                    vm.value,
                    keys.join(", ")
                ),
            ));
        }
    }
    if config.disks.is_empty() {
        return Err(fail(Code::Source, format!("VM {} has no disk", vm.value)));
    }
    let snapshots = calls::vm_snapshots(client, vm).await.map_err(src)?;
    if let Some(first) = snapshots.first() {
        let why = if snapshots.iter().all(calls::SnapshotEntry::is_ours) {
            format!(
                "left by an interrupted cbtstream run; `cbtstream gc --vsphere URL --vm {}` \
                 removes them",
                opts.vm
            )
        } else {
            "delete or consolidate them first".to_owned()
        };
        return Err(fail(
            Code::Source,
            format!(
                "VM {} has {} snapshot(s) ({} \"{}\" ...): its disks are delta links, which \
                 cbtstream cannot read yet; {why}",
                vm.value,
                snapshots.len(),
                first.snapshot.value,
                first.name.escape_debug()
            ),
        ));
    }
    if !config.change_tracking {
        if !opts.enable_cbt {
            return Err(fail(
                Code::Source,
                format!(
                    "changed block tracking is off on VM {}; --enable-cbt turns it on (it takes \
                     effect at the next snapshot, so that backup is a full one)",
                    vm.value
                ),
            ));
        }
        tracing::warn!(
            "turning changed block tracking on for VM {}: it takes effect with the snapshot \
             this run takes, so this point is a full one",
            vm.value
        );
        calls::enable_cbt(client, vm).await.map_err(src)?;
    }
    let point = uuid::Uuid::new_v4().to_string();
    let name = format!("{}{point}", calls::SNAPSHOT_PREFIX);
    let snap = snapshot::take(client, vm, name, opts.quiesce, taken)
        .await
        .map_err(src)?;
    tracing::info!(snapshot = %snap.value, "snapshot taken");
    let frozen = calls::snapshot_config(client, &snap).await.map_err(src)?;
    let wanted: Vec<&Disk> = frozen
        .disks
        .iter()
        .filter(|d| match &opts.output {
            Output::Stream { disk, .. } => d.key == *disk,
            Output::Point(_) => true,
        })
        .collect();
    let mut planned = Vec::new();
    for disk in wanted {
        planned.push(plan_disk(client, opts, vm, &snap, disk, state.as_ref()).await?);
    }
    let datacenter = calls::datacenter_of(client, vm).await.map_err(src)?;
    let cookie = client.session_token().await;
    let authority = client.endpoint().authority();
    let source_id = |key: i32| format!("{}/{key}", vm.value);
    let file_login = std::sync::OnceLock::new();
    let reads = |p: &Planned| -> Result<DiskReads, Failure> {
        let (ds, path) = calls::split_datastore_path(&p.disk.file_name).ok_or_else(|| {
            fail(
                Code::Source,
                format!(
                    "disk {}: backing file name is not \"[datastore] path\"",
                    p.disk.key
                ),
            )
        })?;
        let flat = calls::flat_extent(path).ok_or_else(|| {
            fail(
                Code::Source,
                format!("disk {}: the backing is not a .vmdk", p.disk.key),
            )
        })?;
        let url = calls::folder_url(&authority, &datacenter, ds, &flat);
        let login = file_login
            .get_or_init(|| {
                Arc::new(FileServiceLogin {
                    url: url.clone(),
                    trust: client.trust().clone(),
                    user: opts.login.user.clone(),
                    password: opts.login.password.clone(),
                    opened: Default::default(),
                    refused: Default::default(),
                })
            })
            .clone();
        Ok(DiskReads {
            login,
            url,
            session_cookie: cookie.clone(),
            trust: client.trust().clone(),
            capacity: p.disk.capacity,
            bitmap: p.bitmap.clone(),
            full: p.base.is_none(),
            ids: StreamIds {
                source_id: source_id(p.disk.key),
                point_id: point.clone(),
                base_id: p.base.as_ref().map(|b| b.point.clone()),
            },
        })
    };
    let progress: Arc<dyn crate::engine::Progress> = Arc::new(crate::progress::Bar::stderr());
    let new_disks: BTreeMap<i32, VsphereDisk> = planned
        .iter()
        .map(|p| {
            let d = VsphereDisk {
                backing_uuid: p.disk.uuid.clone(),
                change_id: p.change_id.clone(),
                capacity: p.disk.capacity,
                point: point.clone(),
            };
            (p.disk.key, d)
        })
        .collect();
    let base = state.as_ref().and_then(|s| s.point.clone());
    let mut summaries = Vec::new();
    let (location, durable) = match &opts.output {
        Output::Stream { destination, .. } => {
            let p = &planned[0];
            summaries.push(read_disk(reads(p)?, destination, &opts.dp, progress).await?);
            let durable = match destination {
                Destination::Output(path) => matches!(
                    crate::engine::sink::Output::from_arg(path),
                    crate::engine::sink::Output::File(_)
                ),
                Destination::Command(_) | Destination::Upload(_) => true,
            };
            let location = match destination {
                Destination::Output(path) => path.display().to_string(),
                Destination::Command(cmd) => format!("command {cmd:?}"),
                Destination::Upload(_) => "upload".into(),
            };
            (location, durable)
        }
        Output::Point(target) => {
            let mut writer = PointWriter::create(target, &vm.value, &point)
                .await
                .code(Code::Output)?;
            let mut disks = Vec::new();
            for p in &planned {
                let name = format!("disk-{}.cbts", p.disk.key);
                let dest = writer
                    .stream(&name, p.disk.capacity)
                    .await
                    .code(Code::Output)?;
                summaries.push(read_disk(reads(p)?, &dest, &opts.dp, progress.clone()).await?);
                disks.push(PointDisk {
                    id: source_id(p.disk.key),
                    slot: p.disk.key.to_string(),
                    size: p.disk.capacity,
                    sha256: writer.sha256(&name).await.code(Code::Output)?,
                    stream: name,
                    base: p.base.as_ref().map(|b| b.point.clone()),
                });
            }
            let info = PointInfo {
                id: point.clone(),
                vm: vm.value.clone(),
                name: config.name.clone(),
                time: crate::restore::report::rfc3339(crate::export::created_now()),
                base: base.clone(),
                disks,
                skipped: vec![],
            };
            (writer.finish(&info).await.code(Code::Output)?, true)
        }
    };
    Ok(Done {
        report: RunReport {
            point,
            base: planned
                .first()
                .and_then(|p| p.base.as_ref().map(|b| b.point.clone())),
            location,
            committed: false,
            summaries,
        },
        disks: new_disks,
        durable,
    })
}

fn client_url(client: &Client) -> String {
    format!("https://{}/", client.endpoint().authority())
}

/// The changed areas of one frozen disk since its base (or its allocated areas).
pub(super) async fn plan_disk(
    client: &Client,
    opts: &RunOptions,
    vm: &MoRef,
    snap: &MoRef,
    disk: &Disk,
    state: Option<&VsphereState>,
) -> Result<Planned, Failure> {
    let key = disk.key;
    if disk.has_parent || disk.backing_type != "VirtualDiskFlatVer2BackingInfo" {
        return Err(fail(
            Code::Source,
            format!(
                "disk {key}: the snapshot's backing is a {} {}; cbtstream reads only flat extents",
                if disk.has_parent { "delta over" } else { "" },
                disk.backing_type
            ),
        ));
    }
    let change_id = disk.change_id.clone().ok_or_else(|| {
        fail(
            Code::Source,
            format!("disk {key}: changed block tracking is not active in the snapshot"),
        )
    })?;
    let mut base = state
        .and_then(|s| s.disks.get(&key))
        .filter(|_| !opts.full)
        .cloned();
    if let Some(b) = &base {
        if b.backing_uuid != disk.uuid {
            tracing::warn!("disk {key} is another disk than in the chain (its backing uuid changed): a full export");
            base = None;
        } else if b.capacity != disk.capacity {
            tracing::warn!(
                "disk {key} changed size ({} → {} bytes): its changed areas are unreliable, a full export",
                b.capacity,
                disk.capacity
            );
            base = None;
        }
    }
    let from = base.as_ref().map_or("*", |b| b.change_id.as_str());
    let map = match calls::changed_areas(client, vm, snap, key, disk.capacity, from).await {
        Ok(m) => m,
        Err(calls::ChangedError::Call(e)) if base.is_some() && is_broken_chain(&e) => {
            if !opts.fallback_full {
                return Err(fail(
                    Code::Source,
                    format!(
                        "broken chain: vCenter rejected the change id of disk {key} ({e}); \
                         changed block tracking was reset or the disk moved; run with \
                         --fallback-full for a full export"
                    ),
                ));
            }
            tracing::warn!("broken chain on disk {key} ({e}): a full export (--fallback-full)");
            base = None;
            calls::changed_areas(client, vm, snap, key, disk.capacity, "*")
                .await
                .map_err(src)?
        }
        Err(e) => return Err(src(e)),
    };
    tracing::info!(
        disk = key,
        full = base.is_none(),
        marked = map.marked_bytes(),
        capacity = disk.capacity,
        "planned"
    );
    Ok(Planned {
        disk: disk.clone(),
        base,
        bitmap: map.into_bitmap(),
        change_id,
    })
}

/// A change id the server no longer knows: `FileFault` after a CBT reset, `InvalidArgument`
/// on the `changeId` for one out of range.
fn is_broken_chain(e: &VsphereError) -> bool {
    match e.fault() {
        Some(f) if f.type_name == "FileFault" => true,
        Some(f) => {
            f.type_name == "InvalidArgument" && f.invalid_property.as_deref() == Some("changeId")
        }
        None => false,
    }
}

/// `vsphere update-paths`: the files UpdateVirtualMachineFiles could not update.
pub async fn update_paths(
    login_with: &VsphereLogin,
    datastore: &str,
    map: &[(String, String)],
) -> Result<Vec<(String, String)>, Failure> {
    for id in std::iter::once(datastore).chain(map.iter().map(|(_, new)| new.as_str())) {
        if !super::client::path_safe(id) {
            return Err(fail(Code::Usage, format!("{id:?} is not a datastore moId")));
        }
    }
    let client = login(login_with).await?;
    let ds = MoRef::new("Datastore", datastore);
    let pairs: Vec<(String, MoRef)> = map
        .iter()
        .map(|(old, new)| (old.clone(), MoRef::new("Datastore", new)))
        .collect();
    let r = calls::update_vm_files(&client, &ds, &pairs)
        .await
        .map_err(src);
    client.logout().await;
    r
}
