//! Snapshots, changed-block tracking and tasks: `ReconfigVM_Task`, `CreateSnapshotEx_Task`,
//! `RemoveSnapshot_Task`, `QueryChangedDiskAreas`, and the task runner they share.

use std::sync::Arc;

use serde_json::{json, Value};

use crate::disk::ChangeIdError;
use crate::json::{moref, moref_any, now, Fault};
use crate::state::{Shared, SnapDisk, Snapshot, State, Task, TaskState, Vm};
use crate::vim::{field, moref_value, str_field, CallResult, Reply};

pub(crate) fn vm_exists(st: &State, moid: &str) -> Result<(), Fault> {
    st.vm(moid)
        .map(|_| ())
        .ok_or_else(|| Fault::object_not_found("VirtualMachine", moid))
}

pub(crate) fn query_changed(st: &State, moid: &str, body: &Value) -> CallResult {
    let vm = st
        .vm(moid)
        .ok_or_else(|| Fault::object_not_found("VirtualMachine", moid))?;
    let snap_ref = body.get("snapshot").filter(|v| !v.is_null()).ok_or_else(|| {
        Fault::invalid_argument(
            "snapshot",
            "Without a snapshot, changes are computed against the current state, which needs a powered-off virtual machine",
        )
    })?;
    let snap_id = moref_value(snap_ref, "VirtualMachineSnapshot", "snapshot")?;
    let snap = st
        .snapshots
        .get(snap_id)
        .filter(|s| s.vm == vm.moid)
        .ok_or_else(|| Fault::new("NotFound", format!("The snapshot {snap_id} does not exist")))?;
    let key = field(body, "deviceKey")?
        .as_i64()
        .ok_or_else(|| Fault::invalid_argument("deviceKey", "deviceKey must be an integer"))?;
    let (disk, sd) = vm
        .disks
        .iter()
        .find(|d| i64::from(d.key) == key)
        .and_then(|d| Some((d, snap.disks.iter().find(|s| s.key == d.key)?)))
        .ok_or_else(|| {
            Fault::invalid_argument(
                "deviceKey",
                format!("{key} is not a virtual disk of {moid}"),
            )
        })?;
    let start = field(body, "startOffset")?
        .as_u64()
        .filter(|&s| s <= disk.capacity)
        .ok_or_else(|| {
            Fault::invalid_argument(
                "startOffset",
                "startOffset is beyond the end of the virtual disk",
            )
        })?;
    let change_id = str_field(body, "changeId")?;
    let (snap_change, point) = sd.change.clone().ok_or_else(|| {
        Fault::invalid_argument(
            "changeId",
            "Change tracking is not active for this disk in this snapshot",
        )
    })?;
    let uuid = snap_change.rsplit_once('/').map(|x| x.0).unwrap_or("");
    let from = disk.changes_from(uuid, point, change_id).map_err(|e| match e {
        ChangeIdError::OtherTracking => Fault::new(
            "FileFault",
            format!(
                "Error caused by file {}: the change id is not from the disk's current change tracking",
                disk_file(st, vm, disk.key)
            ),
        )
        .with("file", json!(disk_file(st, vm, disk.key))),
        ChangeIdError::Malformed | ChangeIdError::OutOfRange => {
            Fault::invalid_argument("changeId", "A specified parameter was not correct: changeId")
        }
    })?;
    let (length, areas) =
        disk.changed_areas(point, from, start, st.qcda_max_areas, st.qcda_max_bytes);
    let changed: Vec<Value> = areas
        .iter()
        .map(|&(s, l)| json!({"_typeName": "DiskChangeExtent", "start": s, "length": l}))
        .collect();
    Ok(Reply::Json(json!({
        "_typeName": "DiskChangeInfo",
        "startOffset": start,
        "length": length,
        "changedArea": changed
    })))
}

fn disk_file(st: &State, vm: &Vm, key: i32) -> String {
    let d = vm.disks.iter().find(|d| d.key == key);
    let desc = d.map(|d| d.layers[0].descriptor.as_str()).unwrap_or("");
    format!("[{}] {desc}", st.datastores[0].name)
}

/// The work a task does when it runs.
type TaskWork = Box<dyn FnOnce(&mut State) -> Result<Option<Value>, Fault> + Send>;

/// Queues a task on `entity` and runs `work` after the task delay: queued, then running,
/// then success or error. A switched-on failure for `method` makes it end in error without
/// doing the work.
#[allow(clippy::too_many_arguments)]
pub(crate) fn start_task(
    shared: &Arc<Shared>,
    st: &mut State,
    user: &str,
    method: &str,
    description_id: &str,
    entity: Value,
    entity_name: &str,
    work: TaskWork,
) -> CallResult {
    let moid = st.new_moid("task");
    let fail = st.take_failure(method);
    let chain = st.next_id as u32;
    st.tasks.insert(
        moid.clone(),
        Task {
            moid: moid.clone(),
            name: method.to_owned(),
            description_id: description_id.to_owned(),
            entity,
            entity_name: entity_name.to_owned(),
            state: TaskState::Queued,
            queue_time: now(),
            start_time: None,
            complete_time: None,
            event_chain_id: chain,
            user: user.to_owned(),
        },
    );
    let (shared, id) = (shared.clone(), moid.clone());
    let delay = st.task_delay;
    tokio::runtime::Handle::current().spawn(async move {
        tokio::time::sleep(delay).await;
        if let Some(t) = shared.lock().tasks.get_mut(&id) {
            t.state = TaskState::Running;
            t.start_time = Some(now());
        }
        tokio::time::sleep(delay).await;
        let done = tokio::task::spawn_blocking(move || {
            let mut st = shared.lock();
            let outcome = match fail {
                Some(f) => Err(f),
                None => work(&mut st),
            };
            if let Some(t) = st.tasks.get_mut(&id) {
                t.state = match outcome {
                    Ok(v) => TaskState::Success(v),
                    Err(f) => TaskState::Error(f),
                };
                t.complete_time = Some(now());
            }
        });
        let _ = done.await;
    });
    Ok(Reply::Json(moref("Task", &moid)))
}

/// VMware refuses a second snapshot operation while one runs on the VM.
fn ensure_idle(st: &State, vm: &str) -> Result<(), Fault> {
    let busy = st.tasks.values().any(|t| {
        matches!(t.state, TaskState::Queued | TaskState::Running)
            && t.entity.get("value").and_then(Value::as_str) == Some(vm)
    });
    if busy {
        return Err(Fault::new(
            "TaskInProgress",
            "The operation is not allowed in the current state: another task is in progress.",
        )
        .with("task", moref("VirtualMachine", vm)));
    }
    Ok(())
}

pub(crate) fn reconfig(
    shared: &Arc<Shared>,
    st: &mut State,
    user: &str,
    moid: &str,
    body: &Value,
) -> CallResult {
    vm_exists(st, moid)?;
    let spec = field(body, "spec")?;
    let cbt = spec.get("changeTrackingEnabled").and_then(Value::as_bool);
    let (vm_id, name) = (
        moid.to_owned(),
        st.vm(moid).map(|v| v.name.clone()).unwrap_or_default(),
    );
    start_task(
        shared,
        st,
        user,
        "ReconfigVM_Task",
        "VirtualMachine.reconfigure",
        moref("VirtualMachine", moid),
        &name,
        Box::new(move |st| {
            if let (Some(on), Some(vm)) = (cbt, st.vm_mut(&vm_id)) {
                // Takes effect on the disks at the next stun (snapshot create or remove).
                vm.change_tracking_enabled = on;
            }
            Ok(None)
        }),
    )
}

pub(crate) fn create_snapshot(
    shared: &Arc<Shared>,
    st: &mut State,
    user: &str,
    moid: &str,
    method: &str,
    body: &Value,
) -> CallResult {
    vm_exists(st, moid)?;
    let name = str_field(body, "name")?.to_owned();
    let description = body
        .get("description")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    if body.get("memory").and_then(Value::as_bool) == Some(true) {
        return Err(Fault::new("NotSupported", "The simulator takes no memory snapshots").into());
    }
    let quiesced = match body.get("quiesceSpec").filter(|v| !v.is_null()) {
        None => body
            .get("quiesce")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        Some(q) => match q.get("_typeName").and_then(Value::as_str) {
            Some("VirtualMachineGuestQuiesceSpec" | "VirtualMachineWindowsQuiesceSpec") => true,
            _ => {
                return Err(Fault::invalid_argument("quiesceSpec", "quiesceSpec is invalid").into())
            }
        },
    };
    ensure_idle(st, moid)?;
    let vm_id = moid.to_owned();
    let vm_name = st.vm(moid).map(|v| v.name.clone()).unwrap_or_default();
    start_task(
        shared,
        st,
        user,
        method,
        "VirtualMachine.createSnapshot",
        moref("VirtualMachine", moid),
        &vm_name,
        Box::new(move |st| {
            let snap = take_snapshot(st, &vm_id, name, description, quiesced)?;
            Ok(Some(moref_any("VirtualMachineSnapshot", &snap)))
        }),
    )
}

/// Takes a snapshot now (the stun applies a pending tracking change first): a delta on top
/// of every disk, the tracking point frozen. Returns the snapshot's moid.
pub fn take_snapshot(
    st: &mut State,
    vm_id: &str,
    name: String,
    description: String,
    quiesced: bool,
) -> Result<String, Fault> {
    let snap_moid = st.new_moid("snapshot");
    let delta_dir = st.delta_dir.clone();
    let vm = st
        .vm_mut(vm_id)
        .ok_or_else(|| Fault::object_not_found("VirtualMachine", vm_id))?;
    stun(vm);
    vm.next_delta += 1;
    let n = vm.next_delta;
    // Every delta first, so that a failure leaves the disks and their tracking as they were.
    let mut deltas = Vec::new();
    for d in &mut vm.disks {
        let base = d.layers[0].descriptor.trim_end_matches(".vmdk").to_owned();
        let delta = delta_dir.join(format!("{}-{}-{n:06}.raw", vm.name, d.key));
        if let Err(e) = d.push_delta(delta.clone(), format!("{base}-{n:06}.vmdk")) {
            for (d, _) in vm.disks.iter_mut().zip(&deltas) {
                if let Some(layer) = d.layers.pop() {
                    let _ = std::fs::remove_file(layer.path);
                }
            }
            return Err(Fault::new(
                "FileFault",
                format!("creating the delta disk: {e:#}"),
            ));
        }
        deltas.push(delta);
    }
    let mut disks = Vec::new();
    for (d, delta) in vm.disks.iter_mut().zip(deltas) {
        let change = d.cbt.active.then(|| {
            let point = d.cbt.seq;
            d.cbt.seq += 1;
            (format!("{}/{point}", d.cbt.uuid), point)
        });
        disks.push(SnapDisk {
            key: d.key,
            change,
            delta,
        });
    }
    vm.snapshots.push(snap_moid.clone());
    let id = n;
    st.snapshots.insert(
        snap_moid.clone(),
        Snapshot {
            moid: snap_moid.clone(),
            vm: vm_id.to_owned(),
            id,
            name,
            description,
            create_time: now(),
            quiesced,
            disks,
        },
    );
    Ok(snap_moid)
}

/// A stun applies a pending `changeTrackingEnabled` change to the disks.
fn stun(vm: &mut Vm) {
    for d in &mut vm.disks {
        if vm.change_tracking_enabled && !d.cbt.active {
            d.cbt.activate();
        } else if !vm.change_tracking_enabled {
            d.cbt.active = false;
        }
    }
}

pub(crate) fn remove_snapshot(
    shared: &Arc<Shared>,
    st: &mut State,
    user: &str,
    moid: &str,
    body: &Value,
) -> CallResult {
    let vm_id = st
        .snapshots
        .get(moid)
        .map(|s| s.vm.clone())
        .ok_or_else(|| Fault::object_not_found("VirtualMachineSnapshot", moid))?;
    let remove_children = body
        .get("removeChildren")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    ensure_idle(st, &vm_id)?;
    let vm_name = st.vm(&vm_id).map(|v| v.name.clone()).unwrap_or_default();
    let snap = moid.to_owned();
    start_task(
        shared,
        st,
        user,
        "RemoveSnapshot_Task",
        "VirtualMachineSnapshot.remove",
        moref("VirtualMachine", &vm_id),
        &vm_name,
        Box::new(move |st| {
            let chain = st
                .vm(&vm_id)
                .map(|v| v.snapshots.clone())
                .unwrap_or_default();
            let pos = chain
                .iter()
                .position(|s| *s == snap)
                .ok_or_else(|| Fault::object_not_found("VirtualMachineSnapshot", &snap))?;
            let doomed: Vec<String> = if remove_children {
                chain[pos..].iter().rev().cloned().collect()
            } else {
                vec![snap]
            };
            for s in doomed {
                consolidate(st, &vm_id, &s)?;
            }
            Ok(None)
        }),
    )
}

/// Removes snapshot `snap`: each disk's delta it created merges into the layer below.
pub fn consolidate(st: &mut State, vm_id: &str, snap: &str) -> Result<(), Fault> {
    let s = st
        .snapshots
        .remove(snap)
        .ok_or_else(|| Fault::object_not_found("VirtualMachineSnapshot", snap))?;
    let vm = st
        .vm_mut(vm_id)
        .ok_or_else(|| Fault::object_not_found("VirtualMachine", vm_id))?;
    vm.snapshots.retain(|x| x != snap);
    for sd in &s.disks {
        let Some(d) = vm.disks.iter_mut().find(|d| d.key == sd.key) else {
            continue;
        };
        if let Some(i) = d.layers.iter().position(|l| l.path == sd.delta) {
            d.merge_down(i)
                .map_err(|e| Fault::new("FileFault", format!("consolidating: {e:#}")))?;
        }
    }
    stun(vm);
    Ok(())
}
