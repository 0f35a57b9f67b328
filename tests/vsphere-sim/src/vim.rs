//! The VI/JSON methods (`POST /sdk/vim25/{release}/{type}/{moid}/{method}`) and the
//! session check every call but the two bootstrap ones goes through.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::disk::ChangeIdError;
use crate::json::{moref, moref_any, now, Fault};
use crate::props;
use crate::state::{Session, Shared, SnapDisk, Snapshot, State, Task, TaskState, Ticket};

/// The HTTP header carrying the session token (Login's answer, every later request).
pub const SESSION_HEADER: &str = "vmware-api-session-id";

/// A method's answer.
#[derive(Debug)]
pub enum Reply {
    /// 200 with this JSON body.
    Json(Value),
    /// 204, no body (a void method, or an unset value).
    Void,
    /// 200 with the UserSession, and the new token in the session header.
    LoggedIn { token: String, body: Value },
}

/// Why a call has no answer.
#[derive(Debug)]
pub enum CallError {
    /// HTTP 500 with the fault body.
    Fault(Fault),
    /// HTTP 404: no such method or property in the API.
    NoSuchPath,
}

impl From<Fault> for CallError {
    fn from(f: Fault) -> CallError {
        CallError::Fault(f)
    }
}

type CallResult = Result<Reply, CallError>;

/// The session behind `token`, if it is live.
pub fn session_user(st: &State, token: Option<&str>) -> Option<String> {
    st.sessions.get(token?).map(|s| s.user.clone())
}

fn field<'a>(body: &'a Value, name: &str) -> Result<&'a Value, Fault> {
    body.get(name).filter(|v| !v.is_null()).ok_or_else(|| {
        Fault::invalid_argument(
            name,
            format!("A specified parameter was not correct: {name}"),
        )
    })
}

fn str_field<'a>(body: &'a Value, name: &str) -> Result<&'a str, Fault> {
    field(body, name)?
        .as_str()
        .ok_or_else(|| Fault::invalid_argument(name, format!("{name} must be a string")))
}

fn moref_value<'a>(v: &'a Value, typ: &str, name: &str) -> Result<&'a str, Fault> {
    let bad = || Fault::invalid_argument(name, format!("{name} must be a {typ} reference"));
    if v.get("type").and_then(Value::as_str) != Some(typ) {
        return Err(bad());
    }
    v.get("value").and_then(Value::as_str).ok_or_else(bad)
}

/// Dispatches one method call. `token` is the request's session header.
pub fn call(
    shared: &Arc<Shared>,
    token: Option<&str>,
    typ: &str,
    moid: &str,
    method: &str,
    body: &Value,
) -> CallResult {
    let mut st = shared.lock();
    st.count(method);
    if (typ, moid, method) == ("SessionManager", "SessionManager", "Login") {
        return login(&mut st, body);
    }
    let Some(user) = session_user(&st, token) else {
        return Err(Fault::not_authenticated().into());
    };
    if let Some(f) = (!method.ends_with("_Task"))
        .then(|| st.take_failure(method))
        .flatten()
    {
        return Err(f.into());
    }
    match (typ, method) {
        ("SessionManager", "Logout") if moid == "SessionManager" => {
            if let Some(t) = token {
                st.sessions.remove(t);
            }
            Ok(Reply::Void)
        }
        ("SessionManager", "AcquireGenericServiceTicket") if moid == "SessionManager" => {
            generic_ticket(&mut st, body)
        }
        ("SearchIndex", "FindByUuid") if moid == "SearchIndex" => find_by_uuid(&st, body),
        ("VirtualMachine", "QueryChangedDiskAreas") => query_changed(&st, moid, body),
        ("VirtualMachine", "ReconfigVM_Task") => reconfig(shared, &mut st, &user, moid, body),
        ("VirtualMachine", "CreateSnapshotEx_Task" | "CreateSnapshot_Task") => {
            create_snapshot(shared, &mut st, &user, moid, method, body)
        }
        ("VirtualMachineSnapshot", "RemoveSnapshot_Task") => {
            remove_snapshot(shared, &mut st, &user, moid, body)
        }
        ("Datastore", "UpdateVirtualMachineFiles_Task") => {
            update_vm_files(shared, &mut st, &user, moid, body)
        }
        _ => Err(CallError::NoSuchPath),
    }
}

fn user_session(st: &State, s: &Session) -> Value {
    json!({
        "_typeName": "UserSession",
        "key": s.key,
        "userName": s.user,
        "fullName": s.user,
        "loginTime": s.login_time,
        "lastActiveTime": now(),
        "locale": "en",
        "messageLocale": "en",
        "extensionSession": false,
        "ipAddress": "127.0.0.1",
        "userAgent": "",
        "callCount": st.calls.values().sum::<u64>()
    })
}

pub fn current_session(st: &State, token: Option<&str>) -> Option<Value> {
    st.sessions.get(token?).map(|s| user_session(st, s))
}

fn login(st: &mut State, body: &Value) -> CallResult {
    let user = str_field(body, "userName")?;
    let password = str_field(body, "password")?;
    if user != st.user || password != st.password {
        return Err(Fault::new(
            "InvalidLogin",
            "Cannot complete login due to an incorrect user name or password.",
        )
        .into());
    }
    let token = new_secret();
    let session = Session {
        user: user.to_owned(),
        key: uuid::Uuid::new_v4().to_string(),
        login_time: now(),
    };
    let body = user_session(st, &session);
    st.sessions.insert(token.clone(), session);
    Ok(Reply::LoggedIn { token, body })
}

/// A session token or ticket: 160 random bits in hex.
pub fn new_secret() -> String {
    let a = uuid::Uuid::new_v4().simple().to_string();
    let b = uuid::Uuid::new_v4().simple().to_string();
    format!("{a}{}", &b[..8])
}

fn generic_ticket(st: &mut State, body: &Value) -> CallResult {
    let spec = field(body, "spec")?;
    if spec.get("_typeName").and_then(Value::as_str) != Some("SessionManagerHttpServiceRequestSpec")
    {
        return Err(Fault::invalid_argument(
            "spec",
            "spec must be a SessionManagerHttpServiceRequestSpec",
        )
        .into());
    }
    let method = spec
        .get("method")
        .and_then(Value::as_str)
        .unwrap_or("httpGet");
    let url = str_field(spec, "url")?;
    let path_and_query = url
        .strip_prefix("https://")
        .and_then(|rest| rest.find('/').map(|i| &rest[i..]))
        .ok_or_else(|| Fault::invalid_argument("url", "url must be an https URL"))?;
    let id = new_secret();
    st.tickets.insert(
        id.clone(),
        Ticket {
            path_and_query: path_and_query.to_owned(),
            method: method.to_owned(),
        },
    );
    Ok(Reply::Json(json!({
        "_typeName": "SessionManagerGenericServiceTicket",
        "id": id,
        "hostName": "127.0.0.1"
    })))
}

fn find_by_uuid(st: &State, body: &Value) -> CallResult {
    let uuid = str_field(body, "uuid")?.to_ascii_lowercase();
    let vm_search = field(body, "vmSearch")?.as_bool().unwrap_or(false);
    let instance = body
        .get("instanceUuid")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if !vm_search {
        return Ok(Reply::Void);
    }
    let found = st.vms.iter().find(|v| {
        let id = if instance {
            &v.instance_uuid
        } else {
            &v.bios_uuid
        };
        id.eq_ignore_ascii_case(&uuid)
    });
    Ok(match found {
        Some(v) => Reply::Json(moref("VirtualMachine", &v.moid)),
        None => Reply::Void,
    })
}

fn vm_exists(st: &State, moid: &str) -> Result<(), Fault> {
    st.vm(moid)
        .map(|_| ())
        .ok_or_else(|| Fault::object_not_found("VirtualMachine", moid))
}

fn query_changed(st: &State, moid: &str, body: &Value) -> CallResult {
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

fn disk_file(st: &State, vm: &crate::state::Vm, key: i32) -> String {
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
fn start_task(
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
            name: method.trim_end_matches("_Task").to_owned(),
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

fn reconfig(
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

fn create_snapshot(
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
    let mut disks = Vec::new();
    for d in &mut vm.disks {
        let change = d.cbt.active.then(|| {
            let point = d.cbt.seq;
            d.cbt.seq += 1;
            (format!("{}/{point}", d.cbt.uuid), point)
        });
        let base = d.layers[0].descriptor.trim_end_matches(".vmdk").to_owned();
        let delta = delta_dir.join(format!("{}-{}-{n:06}.raw", vm.name, d.key));
        d.push_delta(delta.clone(), format!("{base}-{n:06}.vmdk"))
            .map_err(|e| Fault::new("FileFault", format!("creating the delta disk: {e:#}")))?;
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
fn stun(vm: &mut crate::state::Vm) {
    for d in &mut vm.disks {
        if vm.change_tracking_enabled && !d.cbt.active {
            d.cbt.activate();
        } else if !vm.change_tracking_enabled {
            d.cbt.active = false;
        }
    }
}

fn remove_snapshot(
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

fn update_vm_files(
    shared: &Arc<Shared>,
    st: &mut State,
    user: &str,
    moid: &str,
    body: &Value,
) -> CallResult {
    let ds = st
        .datastore(moid)
        .ok_or_else(|| Fault::object_not_found("Datastore", moid))?;
    let ds_name = ds.name.clone();
    let pairs = field(body, "mountPathDatastoreMapping")?
        .as_array()
        .filter(|a| !a.is_empty())
        .ok_or_else(|| {
            Fault::invalid_argument("mountPathDatastoreMapping", "the mapping is empty")
        })?;
    let mut seen: Vec<(String, String)> = Vec::new();
    for p in pairs {
        let old = str_field(p, "oldMountPath")?.to_owned();
        let target = moref_value(field(p, "datastore")?, "Datastore", "datastore")?.to_owned();
        if st.datastore(&target).is_none() {
            return Err(Fault::invalid_argument(
                "datastore",
                format!("The datastore {target} cannot be found"),
            )
            .into());
        }
        if seen.iter().any(|(o, t)| *o == old && *t != target) {
            return Err(Fault::invalid_argument(
                "mountPathDatastoreMapping",
                format!("The old mount path {old} is mapped to more than one datastore"),
            )
            .into());
        }
        seen.push((old, target));
    }
    if moid == crate::state::DATASTORE_MOID && !st.vms.is_empty() {
        return Err(Fault::new(
            "ResourceInUse",
            format!("The datastore {ds_name} has registered virtual machines"),
        )
        .with("type", json!("Datastore"))
        .with("name", json!(ds_name))
        .into());
    }
    let prefix = format!("[{ds_name}] ");
    start_task(
        shared,
        st,
        user,
        "UpdateVirtualMachineFiles_Task",
        "Datastore.updateVirtualMachineFiles",
        moref("Datastore", moid),
        &ds_name,
        Box::new(move |st| {
            let failed: Vec<Value> = st
                .unupdatable_files
                .iter()
                .filter(|f| f.starts_with(&prefix))
                .map(|f| {
                    json!({
                        "_typeName": "UpdateVirtualMachineFilesResultFailedVmFileInfo",
                        "vmFile": f,
                        "fault": Fault::new("FileFault", format!("Cannot update {f}"))
                            .with("file", json!(f))
                            .to_localized()
                    })
                })
                .collect();
            let mut result = json!({"_typeName": "UpdateVirtualMachineFilesResult"});
            if !failed.is_empty() {
                result["failedVmFile"] = json!(failed);
            }
            Ok(Some(result))
        }),
    )
}

/// The task delay's default: long enough that a client sees `queued`/`running` when it
/// polls at once.
pub const DEFAULT_TASK_DELAY: Duration = Duration::from_millis(20);

/// `GET` of a property (plus `SessionManager.currentSession`, which needs the token).
pub fn get(st: &mut State, token: Option<&str>, typ: &str, moid: &str, prop: &str) -> CallResult {
    st.count(&format!("GET {prop}"));
    if (typ, moid, prop) == ("ServiceInstance", "ServiceInstance", "content") {
        return Ok(Reply::Json(props::service_content(st)));
    }
    if session_user(st, token).is_none() {
        return Err(Fault::not_authenticated().into());
    }
    if (typ, moid, prop) == ("SessionManager", "SessionManager", "currentSession") {
        return Ok(current_session(st, token).map_or(Reply::Void, Reply::Json));
    }
    match props::get(st, typ, moid, prop) {
        Ok(Some(v)) => Ok(Reply::Json(v)),
        Ok(None) => Ok(Reply::Void),
        Err(()) if props::known_type(typ) && !props::exists(st, typ, moid) => {
            Err(Fault::object_not_found(typ, moid).into())
        }
        Err(()) => Err(CallError::NoSuchPath),
    }
}
