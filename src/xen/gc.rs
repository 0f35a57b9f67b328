//! `cbtstream gc`: find the snapshots that killed runs left behind.
//!
//! With `--state`, the chain's lock is taken (so gc never runs beside an export of the same
//! chain) and every snapshot the chain still needs (its base, the older bases kept, a
//! pending point) is kept; the other snapshots cbtstream tagged are removed. Without
//! `--state` nothing says which tagged snapshot is a base or belongs to an export still
//! running, so gc only lists them unless `--force`.
//!
//! A run killed between `VDI.snapshot` and tagging its snapshot leaves an untagged
//! snapshot: gc lists the VDI's untagged snapshots (not `cbt_metadata`) as "possibly ours",
//! with their time, and never removes them. (Only those taken after the chain's base would
//! miss one left before the next successful export moved the base past it.)

use super::{
    load_state, load_vm_state, lock_chain, lock_repo_vm, login, retry_in_use, src, XapiLogin,
    TAG_SNAPSHOT,
};
use crate::exit::{fail, Code, Failure};
use crate::repo::state::StateHome;
use crate::repo::store::Store;
use crate::xapi::XapiSession;
use std::path::PathBuf;

/// `cbtstream gc`, as the CLI gathered it.
#[derive(Debug, Clone)]
pub struct GcOptions {
    pub login: XapiLogin,
    pub target: GcTarget,
    pub state: Option<PathBuf>,
    /// `--repo`: the chain state of `backup --repo` (when no --state), and the VM's lock there.
    pub repo: Option<RepoGc>,
    /// List what would be removed, remove nothing.
    pub dry_run: bool,
    /// Without a state file: remove every tagged snapshot that is not `cbt_metadata`.
    pub force: bool,
}

/// The repository a chain's state lives in.
#[derive(Debug, Clone)]
pub struct RepoGc {
    pub repo: crate::repo::Repo,
    pub break_lock: bool,
}

/// What to collect: one VDI's chain, or every disk of a VM (`backup --vm`).
#[derive(Debug, Clone)]
pub enum GcTarget {
    Vdi(String),
    Vm(String),
}

/// What gc found, one line each (printed on stdout by the CLI).
#[derive(Debug, Default)]
pub struct GcReport {
    pub lines: Vec<String>,
    pub removed: usize,
}

pub async fn run(mut opts: GcOptions) -> Result<GcReport, Failure> {
    let _lock = match &opts.state {
        Some(p) => Some(lock_chain(p)?),
        None => None,
    };
    // A chain kept in a repository: its lock there (no gc beside a backup of it), and its
    // state from there when no --state names it.
    let mut repo_state = None;
    let repo_lock = match (&opts.repo, &opts.target) {
        (Some(r), target) => {
            let id = match target {
                GcTarget::Vdi(v) | GcTarget::Vm(v) => v.clone(),
            };
            let lock = lock_repo_vm(&r.repo, &id, "gc", r.break_lock).await?;
            if opts.state.is_none() {
                match (target, &r.repo.store) {
                    (GcTarget::Vm(vm), _) => {
                        repo_state = Some(StateHome::Repo {
                            repo: r.repo.clone(),
                            vm: vm.clone(),
                        })
                    }
                    (GcTarget::Vdi(vdi), Store::Local(root)) => {
                        opts.state = Some(root.join(crate::repo::vm_dir(vdi)).join("chain.json"))
                    }
                    (GcTarget::Vdi(_), Store::S3 { .. }) => {
                        return Err(fail(
                            Code::Usage,
                            "the chain state of a disk exported to S3 is a file: give --state FILE",
                        ))
                    }
                }
            }
            Some(lock)
        }
        (None, _) => None,
    };
    // What the chain needs, by VDI: nothing without a state file. A state file that is not
    // there is refused: nothing would be marked as needed, and every base would go.
    let missing =
        |p: &std::path::Path| fail(Code::Usage, format!("no chain state at {}", p.display()));
    let mut kept: Vec<Kept> = Vec::new();
    match (&opts.target, &opts.state) {
        (GcTarget::Vdi(vdi), Some(p)) => {
            let s = load_state(p)?.ok_or_else(|| missing(p))?;
            if &s.vdi != vdi {
                return Err(fail(
                    Code::Usage,
                    format!("the state file is for VDI {}, not {vdi}", s.vdi),
                ));
            }
            kept.push(Kept {
                vdi: vdi.clone(),
                needed: s.needed(),
                pending: s.pending.map(|p| p.snapshot),
            });
        }
        (GcTarget::Vm(vm), None) if repo_state.is_some() => {
            let home = repo_state.as_ref().expect("checked by the guard");
            let s = load_vm_state(home, vm).await?.ok_or_else(|| {
                fail(
                    Code::Usage,
                    format!("the repository holds no chain state for VM {vm}"),
                )
            })?;
            kept.extend(s.disks.into_iter().map(|(vdi, b)| Kept {
                vdi,
                needed: vec![b.base],
                pending: None,
            }));
        }
        (GcTarget::Vm(vm), Some(p)) => {
            let s = load_vm_state(&crate::repo::state::StateHome::File(p.clone()), vm)
                .await?
                .ok_or_else(|| missing(p))?;
            kept.extend(s.disks.into_iter().map(|(vdi, b)| Kept {
                vdi,
                needed: vec![b.base],
                pending: None,
            }));
        }
        (_, None) => {}
    }
    let session = login(&opts.login).await?;
    let result = async {
        let vdis = match &opts.target {
            GcTarget::Vdi(vdi) => vec![vdi.clone()],
            GcTarget::Vm(vm) => {
                let vm = session.vm_get_by_uuid(vm).await.map_err(src)?;
                super::vm::disk_vdis(&session, &vm).await?
            }
        };
        let mut report = GcReport::default();
        if let GcTarget::Vm(vm) = &opts.target {
            snapshot_vms(&session, &opts, vm, &mut report).await?;
        }
        for vdi in vdis {
            let k = kept.iter().find(|k| k.vdi == vdi);
            collect(&session, &opts, &vdi, k, &mut report).await?;
        }
        tracing::info!(removed = report.removed, "gc done");
        Ok(report)
    }
    .await;
    session.logout().await;
    if let Some(lock) = repo_lock {
        lock.release().await;
    }
    result
}

/// Snapshot VMs that `backup` took (named `cbtstream backup <time>`) and that a killed run
/// left: records only (their disks are collected with the VDIs), so removing them loses
/// nothing; like the VDIs, removed only with `--state` or `--force`.
async fn snapshot_vms(
    session: &XapiSession,
    opts: &GcOptions,
    vm: &str,
    report: &mut GcReport,
) -> Result<(), Failure> {
    let vm = session.vm_get_by_uuid(vm).await.map_err(src)?;
    let act = !opts.dry_run && (opts.state.is_some() || opts.repo.is_some() || opts.force);
    for snap in session.vm_get_snapshots(&vm).await.map_err(src)? {
        let rec = session.vm_get_record(&snap).await.map_err(src)?;
        if !rec.name_label.starts_with(super::vm::SNAPSHOT_NAME) {
            continue;
        }
        if act {
            session.vm_destroy(&snap).await.map_err(src)?;
            report
                .lines
                .push(format!("removed snapshot VM {}", rec.uuid));
            report.removed += 1;
        } else {
            report
                .lines
                .push(format!("would remove snapshot VM {}", rec.uuid));
        }
    }
    Ok(())
}

/// What one disk's chain needs kept.
struct Kept {
    vdi: String,
    needed: Vec<String>,
    pending: Option<String>,
}

async fn collect(
    session: &XapiSession,
    opts: &GcOptions,
    vdi_uuid: &str,
    kept: Option<&Kept>,
    report: &mut GcReport,
) -> Result<(), Failure> {
    let vdi = session.vdi_get_by_uuid(vdi_uuid).await.map_err(src)?;
    let needed = kept.map(|k| k.needed.clone()).unwrap_or_default();
    let pending = kept.and_then(|k| k.pending.clone());
    let act = !opts.dry_run && (opts.state.is_some() || opts.repo.is_some() || opts.force);
    for snap in &session.vdi_get_snapshots(&vdi).await.map_err(src)? {
        let s = session.vdi_get_record(snap).await.map_err(src)?;
        let ours = s.other_config.get(TAG_SNAPSHOT).map(String::as_str) == Some(vdi_uuid);
        if needed.contains(&s.uuid) {
            if pending.as_deref() == Some(s.uuid.as_str()) {
                report.lines.push(format!(
                    "kept snapshot {}: the pending point, awaiting `cbtstream commit`",
                    s.uuid
                ));
            }
            continue;
        }
        if !ours {
            if s.vdi_type != "cbt_metadata" {
                report.lines.push(format!(
                    "possibly ours: untagged snapshot {} taken {} (a run killed between \
                     VDI.snapshot and tagging it leaves one); not removed: check it and remove \
                     it with `xe vdi-destroy uuid={}`",
                    s.uuid,
                    s.snapshot_time.as_deref().unwrap_or("at an unknown time"),
                    s.uuid
                ));
            }
            continue;
        }
        // Without a state file a cbt_metadata snapshot may be some chain's base.
        if opts.state.is_none() && opts.repo.is_none() && s.vdi_type == "cbt_metadata" {
            report.lines.push(format!(
                "kept snapshot {} (cbt_metadata): possibly a chain's base; give --state to decide",
                s.uuid
            ));
            continue;
        }
        if !act {
            let why = if opts.dry_run {
                ""
            } else {
                " (without --state it may be a base kept after data_destroy failed, or belong to \
                 an export still running: give --state, or --force)"
            };
            report.lines.push(format!(
                "would remove snapshot {} ({}){why}",
                s.uuid, s.vdi_type
            ));
            continue;
        }
        retry_in_use(|| session.vdi_destroy(snap))
            .await
            .map_err(src)?;
        report
            .lines
            .push(format!("removed snapshot {} ({})", s.uuid, s.vdi_type));
        report.removed += 1;
    }
    Ok(())
}
