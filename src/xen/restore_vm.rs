//! `cbtstream restore-vm --xapi URL --sr SR_UUID DIR/<point-id>` (or `--repo LOCATION --vm
//! UUID --point ID|latest`): a VM backed up with `backup` comes back into the pool as a new
//! VM: every disk of the point is created in the SR and filled with its chain of streams
//! (`restore --xapi`; from a repository, read as objects), then `PUT /import_metadata`
//! with a `vdi:<old-uuid>=<new-uuid>` mapping per disk rebuilds the VM with its
//! configuration and its disks in their slots. If anything fails, the VDIs this run created
//! are destroyed.

use super::point::{PointInfo, MAX_METADATA_BYTES, METADATA_FILE, POINT_FILE};
use super::restore::{restore, PoolRestoreOptions, Target};
use super::{login, retry_in_use, src, XapiLogin};
use crate::exit::{fail, Code, Failure};
use crate::export::shutdown_signal;
use crate::repo::restore::{disk_inputs, find_point, found, read_failure, InputSpec};
use crate::repo::store::StoreError;
use crate::repo::{point_dir, Repo, RepoError};
use crate::xapi::metadata::MetadataImport;
use crate::xapi::{Ref, XapiSession};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// `point.json` is a few KiB; refuse anything absurd.
const MAX_POINT_JSON: u64 = 1 << 20;

#[derive(Debug, Clone)]
pub struct RestoreVmOptions {
    pub login: XapiLogin,
    pub sr: String,
    pub source: PointSource,
    /// Keep the VM's uuid and MACs (disaster recovery; XenServer refuses if they exist).
    pub preserve: bool,
    /// Print what would be created, change nothing.
    pub dry_run: bool,
}

/// Where the point comes from.
#[derive(Debug, Clone)]
pub enum PointSource {
    /// A point directory `DIR/<point-id>`; its chain's points are its siblings.
    Dir(PathBuf),
    /// A point of a repository (`latest`: the VM's newest).
    Repo {
        repo: Repo,
        vm: String,
        point: String,
    },
}

/// A disk to create: (its id, its slot, its chain oldest first).
type DiskChain = (String, String, Vec<InputSpec>);

/// The point, each disk's chain, and where the VM's metadata is (for messages).
struct Loaded {
    point: PointInfo,
    chains: Vec<DiskChain>,
    metadata: String,
}

async fn load(source: &PointSource) -> Result<Loaded, Failure> {
    match source {
        PointSource::Dir(dir) => {
            let point = read_point(dir)?;
            let chains = disk_chains(dir, &point)?
                .into_iter()
                .map(|(id, slot, paths)| (id, slot, InputSpec::paths(&paths)))
                .collect();
            Ok(Loaded {
                point,
                chains,
                metadata: dir.join(METADATA_FILE).display().to_string(),
            })
        }
        PointSource::Repo { repo, vm, point } => {
            let (points, id) = find_point(repo, vm, point).await?;
            let stored = found(&points, &id)?;
            let mut chains = Vec::new();
            for d in &stored.info.disks {
                let streams = disk_inputs(repo, &points, vm, &id, &d.id)?;
                chains.push((d.id.clone(), d.slot.clone(), streams));
            }
            Ok(Loaded {
                point: stored.info.clone(),
                chains,
                metadata: repo
                    .store
                    .describe(&format!("{}/{METADATA_FILE}", point_dir(vm, &id))),
            })
        }
    }
}

/// The VM's metadata archive of the point.
async fn read_metadata(source: &PointSource, point: &PointInfo) -> Result<Vec<u8>, Failure> {
    let too_large = |what: &str| {
        fail(
            Code::Integrity,
            format!("{what} is larger than any VM's metadata"),
        )
    };
    match source {
        PointSource::Dir(dir) => {
            let metadata = dir.join(METADATA_FILE);
            let mut archive = Vec::new();
            std::fs::File::open(&metadata)
                .and_then(|f| f.take(MAX_METADATA_BYTES + 1).read_to_end(&mut archive))
                .map_err(|e| fail(Code::Usage, format!("reading {}: {e}", metadata.display())))?;
            if archive.len() as u64 > MAX_METADATA_BYTES {
                return Err(too_large(&metadata.display().to_string()));
            }
            Ok(archive)
        }
        PointSource::Repo { repo, vm, .. } => {
            let key = format!("{}/{METADATA_FILE}", point_dir(vm, &point.id));
            match repo.store.get(&key, MAX_METADATA_BYTES).await {
                Ok(Some(archive)) => Ok(archive),
                Ok(None) => Err(fail(
                    Code::Integrity,
                    format!(
                        "point {} of VM {vm}: its {METADATA_FILE} is missing ({})",
                        point.id,
                        repo.store.describe(&key)
                    ),
                )),
                Err(StoreError::TooLarge { what, .. }) => Err(too_large(&what)),
                Err(e) => Err(read_failure(RepoError::Store(e))),
            }
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct RestoreVmReport {
    /// The new VM's uuid; `None` for a dry run.
    pub vm: Option<String>,
    /// (slot, new VDI uuid) of each disk.
    pub disks: Vec<(String, String)>,
    /// What a dry run would do, one line each.
    pub plan: Vec<String>,
}

fn read_point(dir: &Path) -> Result<PointInfo, Failure> {
    let path = dir.join(POINT_FILE);
    let mut text = Vec::new();
    std::fs::File::open(&path)
        .and_then(|f| f.take(MAX_POINT_JSON + 1).read_to_end(&mut text))
        .map_err(|e| fail(Code::Usage, format!("reading {}: {e}", path.display())))?;
    if text.len() as u64 > MAX_POINT_JSON {
        return Err(fail(
            Code::Integrity,
            format!("{} is too large", path.display()),
        ));
    }
    serde_json::from_slice(&text).map_err(|e| {
        fail(
            Code::Integrity,
            format!("{} is damaged: {e}", path.display()),
        )
    })
}

/// Each disk's streams, oldest first: follow each disk's `base` through the sibling point
/// directories back to its full stream.
fn disk_chains(
    dir: &Path,
    point: &PointInfo,
) -> Result<Vec<(String, String, Vec<PathBuf>)>, Failure> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    let mut chains = Vec::new();
    let plain =
        |name: &str| !name.is_empty() && !name.contains(['/', '\\']) && !name.starts_with('.');
    for disk in &point.disks {
        if !plain(&disk.stream) {
            return Err(fail(
                Code::Integrity,
                format!(
                    "point {} names a stream {:?} outside it",
                    point.id, disk.stream
                ),
            ));
        }
        let mut streams = vec![dir.join(&disk.stream)];
        let mut base = disk.base.clone();
        // A chain longer than the points on disk would loop: bound it.
        let mut left = 100_000;
        while let Some(b) = base {
            left -= 1;
            if left == 0 {
                return Err(fail(
                    Code::Integrity,
                    format!("the chain of disk {} loops", disk.id),
                ));
            }
            let bdir = parent.join(&b);
            let info = read_point(&bdir).map_err(|e| {
                fail(
                    Code::Integrity,
                    format!("the chain of disk {} needs point {b}: {}", disk.id, e.error),
                )
            })?;
            let Some(d) = info.disks.iter().find(|d| d.id == disk.id) else {
                return Err(fail(
                    Code::Integrity,
                    format!("point {b} has no stream of disk {}", disk.id),
                ));
            };
            if !plain(&d.stream) {
                return Err(fail(
                    Code::Integrity,
                    format!("point {b} names a stream {:?} outside it", d.stream),
                ));
            }
            streams.push(bdir.join(&d.stream));
            base = d.base.clone();
        }
        streams.reverse();
        chains.push((disk.id.clone(), disk.slot.clone(), streams));
    }
    Ok(chains)
}

/// The streams of one disk (`disk_id`) of the point `dir`, oldest first: what a rollback of
/// that disk to the point needs.
pub fn disk_chain(dir: &Path, disk_id: &str) -> Result<Vec<PathBuf>, Failure> {
    let point = read_point(dir)?;
    disk_chains(dir, &point)?
        .into_iter()
        .find(|(id, _, _)| id == disk_id)
        .map(|(_, _, streams)| streams)
        .ok_or_else(|| {
            fail(
                Code::Usage,
                format!("point {} holds no disk {disk_id}", dir.display()),
            )
        })
}

pub async fn run(opts: RestoreVmOptions) -> Result<RestoreVmReport, Failure> {
    let Loaded {
        point,
        chains,
        metadata,
    } = load(&opts.source).await?;
    if !point.skipped.is_empty() {
        // The VM's metadata lists them; unmapped, XenServer would attach the VM's live disks
        // (found by SR and location) to the new VM.
        return Err(fail(
            Code::Usage,
            format!(
                "point {} does not hold the VM's disks {} (changed block tracking was off): \
                 restoring it as a VM would attach those live disks to the new VM; restore \
                 its disks one by one with `restore --xapi` instead",
                point.id,
                point.skipped.join(", ")
            ),
        ));
    }
    if opts.dry_run {
        let mut plan = Vec::new();
        for (id, slot, streams) in &chains {
            plan.push(format!(
                "would create a VDI in SR {} for slot {slot} (disk {id}) from {} stream(s)",
                opts.sr,
                streams.len()
            ));
        }
        plan.push(format!(
            "would import the VM {} ({}) from {} as a new VM{}",
            point.vm,
            point.name,
            metadata,
            if opts.preserve {
                ", keeping its uuid and MACs"
            } else {
                ""
            }
        ));
        return Ok(RestoreVmReport {
            plan,
            ..Default::default()
        });
    }
    let archive = read_metadata(&opts.source, &point).await?;
    let session = login(&opts.login).await?;
    let created: Arc<Mutex<Vec<Ref>>> = Arc::default();
    let result = tokio::select! {
        r = restore_vm(&session, &opts, &chains, &archive, &created) => r,
        sig = shutdown_signal() => Err(fail(Code::Interrupted, format!("interrupted by {sig}; the VDIs this run created are destroyed"))),
    };
    if result.is_err() {
        let vdis = std::mem::take(&mut *created.lock().unwrap_or_else(|p| p.into_inner()));
        for vdi in vdis {
            if let Err(e) = retry_in_use(|| session.vdi_destroy(&vdi)).await {
                let uuid = session.vdi_get_uuid(&vdi).await.unwrap_or_default();
                tracing::warn!("could not destroy the VDI {uuid} this restore created: {e}");
            }
        }
    }
    session.logout().await;
    result
}

async fn restore_vm(
    session: &XapiSession,
    opts: &RestoreVmOptions,
    chains: &[DiskChain],
    archive: &[u8],
    created: &Mutex<Vec<Ref>>,
) -> Result<RestoreVmReport, Failure> {
    let mut report = RestoreVmReport::default();
    let mut how = MetadataImport {
        preserve: opts.preserve,
        ..Default::default()
    };
    for (id, slot, streams) in chains {
        let one = PoolRestoreOptions {
            login: opts.login.clone(),
            target: Target::NewIn {
                sr: opts.sr.clone(),
            },
            streams: streams.clone(),
        };
        let new = Mutex::new(None);
        let progress = crate::progress::Bar::stderr();
        let done = restore(session, &one, &new, &progress).await;
        // The VDI is ours to destroy until the VM holds it, whatever restore() left.
        if let Some(vdi) = new.lock().unwrap_or_else(|p| p.into_inner()).take() {
            created.lock().unwrap_or_else(|p| p.into_inner()).push(vdi);
        }
        let done = done?;
        let vdi = session.vdi_get_by_uuid(&done.vdi).await.map_err(src)?;
        {
            let mut c = created.lock().unwrap_or_else(|p| p.into_inner());
            if !c.contains(&vdi) {
                c.push(vdi);
            }
        }
        // The archive (the VM's configuration) names the disk by its own id.
        how.vdi_map.push((id.clone(), done.vdi.clone()));
        report.disks.push((slot.clone(), done.vdi));
    }
    let vm = session
        .import_metadata(archive, &how)
        .await
        .map_err(|e| Failure {
            code: Code::Source,
            error: anyhow::Error::new(e).context("importing the VM's metadata"),
        })?;
    // The VM holds the disks now.
    created.lock().unwrap_or_else(|p| p.into_inner()).clear();
    if let Some(vm) = vm {
        report.vm = Some(session.vm_get_record(&vm).await.map_err(src)?.uuid);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xen::point::PointDisk;

    fn write_point(root: &Path, id: &str, base: Option<&str>, disks: &[(&str, Option<&str>)]) {
        let dir = root.join(id);
        std::fs::create_dir_all(&dir).unwrap();
        let info = PointInfo {
            id: id.into(),
            vm: "vm".into(),
            name: "vm".into(),
            time: "2026-11-30T00:00:00Z".into(),
            base: base.map(Into::into),
            skipped: vec![],
            disks: disks
                .iter()
                .enumerate()
                .map(|(slot, (disk, base))| PointDisk {
                    id: (*disk).into(),
                    slot: slot.to_string(),
                    size: 512,
                    stream: format!("disk{slot}.cbts"),
                    sha256: String::new(),
                    base: base.map(Into::into),
                })
                .collect(),
        };
        std::fs::write(dir.join(POINT_FILE), serde_json::to_vec(&info).unwrap()).unwrap();
    }

    /// Each disk's chain follows its own `base` links: a disk added at p2 starts there.
    #[test]
    fn disk_chains_follow_each_disks_bases() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        write_point(r, "p1", None, &[("a", None)]);
        write_point(r, "p2", Some("p1"), &[("a", Some("p1")), ("b", None)]);
        write_point(r, "p3", Some("p2"), &[("a", Some("p2")), ("b", Some("p2"))]);
        let a = disk_chain(&r.join("p3"), "a").unwrap();
        assert_eq!(
            a,
            vec![
                r.join("p1/disk0.cbts"),
                r.join("p2/disk0.cbts"),
                r.join("p3/disk0.cbts")
            ]
        );
        let b = disk_chain(&r.join("p3"), "b").unwrap();
        assert_eq!(b, vec![r.join("p2/disk1.cbts"), r.join("p3/disk1.cbts")]);
        assert_eq!(
            disk_chain(&r.join("p3"), "c").unwrap_err().code,
            Code::Usage
        );
        // A missing point in the chain is an integrity failure.
        std::fs::remove_dir_all(r.join("p1")).unwrap();
        assert_eq!(
            disk_chain(&r.join("p3"), "a").unwrap_err().code,
            Code::Integrity
        );
    }
}
