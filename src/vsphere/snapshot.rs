//! The run's snapshot on vCenter: taken so that neither a signal nor a lost answer can leave
//! it behind unknown, and removed when the run ends, whatever happened.
//!
//! The snapshot is named `cbtstream-<point uuid>`, unique to the run. Each step records what
//! vCenter may now hold in [`Taken`]. The call that starts `CreateSnapshotEx_Task` runs on a
//! task of its own, so a signal (the flow's `select!` dropping the run) cannot cut it between
//! vCenter creating the task and this run learning its id. When its answer is lost (a proxy's
//! 504, a timeout, a dropped connection) the task is unknown: [`remove`] then waits for the
//! VM's snapshot tasks to end and finds the snapshot by its name.

use super::calls;
use super::client::{Client, MoRef, VsphereError};
use std::sync::Arc;

const WHAT: &str = "VirtualMachine.CreateSnapshotEx_Task";

type StartCall = tokio::task::JoinHandle<Result<MoRef, VsphereError>>;

/// What vCenter may hold of this run, step by step.
#[derive(Default)]
pub(super) struct Taken {
    /// The VM and the run's snapshot name.
    named: Option<(MoRef, String)>,
    /// The start call, while it has not answered.
    start: Option<StartCall>,
    /// The start call ended without an answer saying what vCenter did.
    answer_lost: bool,
    task: Option<MoRef>,
    snapshot: Option<MoRef>,
}

impl Taken {
    /// Whether vCenter may hold something of this run (then [`remove`] has work to do).
    pub(super) fn may_hold_something(&self) -> bool {
        self.start.is_some() || self.answer_lost || self.task.is_some() || self.snapshot.is_some()
    }
}

/// `CreateSnapshotEx_Task` named `name` (no memory, quiesced on request), and its snapshot
/// once the task ended. `taken` follows every step.
pub(super) async fn take(
    client: &Arc<Client>,
    vm: &MoRef,
    name: String,
    quiesce: bool,
    taken: &mut Taken,
) -> Result<MoRef, VsphereError> {
    taken.named = Some((vm.clone(), name.clone()));
    let start: StartCall = tokio::spawn({
        let (client, vm) = (client.clone(), vm.clone());
        async move { calls::start_snapshot(&client, &vm, &name, quiesce).await }
    });
    let answer = taken.start.insert(start).await;
    taken.start = None;
    let task = match answer {
        Ok(Ok(task)) => task,
        Ok(Err(e)) => {
            // A fault is vCenter refusing the call: it made nothing. Anything else says
            // nothing about what it did.
            taken.answer_lost = e.fault().is_none();
            return Err(e);
        }
        Err(e) => {
            taken.answer_lost = true;
            return Err(VsphereError::protocol(
                WHAT,
                format!("the call did not finish: {e}"),
            ));
        }
    };
    taken.task = Some(task.clone());
    let snap = calls::snapshot_of(client, &task).await?;
    taken.snapshot = Some(snap.clone());
    Ok(snap)
}

/// Remove what the run took: let a start call still on the wire answer, wait for its task
/// (the snapshot appears when it ends), or, with no answer, find the snapshot by its name
/// once the VM's snapshot tasks ended. A removal that fails is a warning naming the snapshot.
pub(super) async fn remove(client: &Client, mut taken: Taken) {
    if let Some(start) = taken.start.take() {
        match start.await {
            Ok(Ok(task)) => taken.task = Some(task),
            Ok(Err(e)) if e.fault().is_some() => return,
            Ok(Err(_)) | Err(_) => taken.answer_lost = true,
        }
    }
    let snapshot = match (taken.snapshot.take(), taken.task.take()) {
        (Some(snap), _) => Some(snap),
        (None, Some(task)) => match calls::snapshot_of(client, &task).await {
            Ok(snap) => Some(snap),
            Err(e) if e.fault().is_some() => {
                tracing::debug!("the snapshot task {} made nothing: {e}", task.value);
                return;
            }
            Err(e) => {
                tracing::debug!("waiting for the snapshot task {} failed: {e}", task.value);
                find_named(client, taken.named.as_ref()).await
            }
        },
        (None, None) if taken.answer_lost => find_named(client, taken.named.as_ref()).await,
        (None, None) => return,
    };
    let Some(snapshot) = snapshot else {
        let name = taken.named.map(|(_, name)| name).unwrap_or_default();
        tracing::warn!(
            "no snapshot named {name} is on the VM although this run may have asked for it; \
             if it appears, `cbtstream gc --vsphere` removes it"
        );
        return;
    };
    if let Err(e) = calls::remove_snapshot(client, &snapshot).await {
        tracing::warn!(
            "could not remove the snapshot {} that cbtstream took ({e}); `cbtstream gc \
             --vsphere` lists it, or remove it in vCenter",
            snapshot.value
        );
    }
}

/// The VM's snapshot named as this run's, after the VM's snapshot tasks (the run's own,
/// whose id is unknown, among them) ended: `ManagedEntity.recentTask`, each
/// `TaskInfo.descriptionId` `VirtualMachine.createSnapshot` still queued or running waited for.
async fn find_named(client: &Client, named: Option<&(MoRef, String)>) -> Option<MoRef> {
    let (vm, name) = named?;
    let recent = client.property(vm, "recentTask").await.ok().flatten();
    let tasks: Vec<MoRef> = recent
        .as_ref()
        .and_then(|t| t.as_array())
        .map(|t| t.iter().filter_map(MoRef::parse).take(256).collect())
        .unwrap_or_default();
    for task in tasks.iter().filter(|t| t.kind == "Task") {
        let info = client.property(task, "info").await.ok().flatten();
        let text = |key: &str| {
            info.as_ref()
                .and_then(|i| i.get(key))
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        };
        let snapshotting =
            text("descriptionId").as_deref() == Some("VirtualMachine.createSnapshot");
        let pending = matches!(text("state").as_deref(), Some("queued" | "running"));
        if snapshotting && pending {
            // Its outcome does not matter here, only that it ended.
            let _ = client.wait_task(task, WHAT).await;
        }
    }
    let tree = calls::vm_snapshots(client, vm).await.ok()?;
    tree.into_iter()
        .find(|e| &e.name == name)
        .map(|e| e.snapshot)
}
