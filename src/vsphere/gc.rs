//! `cbtstream gc --vsphere`: remove the snapshots that interrupted runs left on a VM.
//!
//! On vSphere no snapshot outlives a run: the next incremental starts from each disk's
//! `changeId`, which stays valid without the snapshot (VMware's CBT guide). So every snapshot
//! named `cbtstream-<uuid>` is a leftover, unless a backup of the VM is running right now.
//! `--state FILE` or `--repo` take that chain's lock, which a running backup of that chain
//! holds; a backup into another chain (another state file or repository, or none) is not
//! excluded by it. Without either, nothing says no backup runs, so gc only lists them unless
//! `--force`. Snapshots someone else took are never touched.

use super::calls;
use super::flow::{with_vm, VsphereLogin};
use crate::exit::{fail, Code, Failure};
use crate::xen::gc::{GcReport, RepoGc};
use std::path::PathBuf;

#[derive(Debug, Clone)]
pub struct GcOptions {
    pub login: VsphereLogin,
    /// The VM (moId or UUID), as the backups named it.
    pub vm: String,
    /// The chain's state file: its lock is taken.
    pub state: Option<PathBuf>,
    /// The repository the backups go to: the VM's lock there is taken.
    pub repo: Option<RepoGc>,
    pub dry_run: bool,
    /// Remove without a lock saying no backup of the VM is running.
    pub force: bool,
}

pub async fn run(opts: GcOptions) -> Result<GcReport, Failure> {
    let _lock = match &opts.state {
        Some(p) => Some(crate::xen::lock_chain(p)?),
        None => None,
    };
    // A state file that is not there locks nothing a backup would hold: a wrong path.
    let chain_vm = match &opts.state {
        Some(p) => {
            let state = crate::chain::load_vsphere(p)
                .map_err(|e| fail(Code::Integrity, e))?
                .ok_or_else(|| fail(Code::Usage, format!("no chain state at {}", p.display())))?;
            Some(state.vm)
        }
        None => None,
    };
    let lock = opts.repo.as_ref().map(|r| (&r.repo, "gc", r.break_lock));
    with_vm(&opts.login, &opts.vm, lock, async |client, vm| {
        collect(client, &opts, vm, chain_vm.as_deref()).await
    })
    .await
}

async fn collect(
    client: &super::client::Client,
    opts: &GcOptions,
    vm: &super::client::MoRef,
    chain_vm: Option<&str>,
) -> Result<GcReport, Failure> {
    let src = |e| fail(Code::Source, e);
    if let Some(other) = chain_vm.filter(|c| *c != vm.value) {
        return Err(fail(
            Code::Usage,
            format!("the state file belongs to VM {other}, not to {}", vm.value),
        ));
    }
    let locked = opts.state.is_some() || opts.repo.is_some();
    let act = !opts.dry_run && (locked || opts.force);
    let mut report = GcReport::default();
    for snap in calls::vm_snapshots(client, vm).await.map_err(src)? {
        let what = format!(
            "snapshot {} \"{}\" taken {}",
            snap.snapshot.value,
            snap.name.escape_debug(),
            snap.created.as_deref().unwrap_or("at an unknown time")
        );
        if !snap.is_ours() {
            report
                .lines
                .push(format!("kept {what}: not taken by cbtstream"));
            continue;
        }
        if !act {
            let why = if opts.dry_run {
                ""
            } else {
                " (without --state or --repo nothing says no backup of this VM is running: \
                 give the chain's --state or --repo, or --force)"
            };
            report.lines.push(format!("would remove {what}{why}"));
            continue;
        }
        calls::remove_snapshot(client, &snap.snapshot)
            .await
            .map_err(|e| fail(Code::Source, format!("removing {what}: {e}")))?;
        report.lines.push(format!("removed {what}"));
        report.removed += 1;
    }
    tracing::info!(removed = report.removed, "gc done");
    Ok(report)
}
