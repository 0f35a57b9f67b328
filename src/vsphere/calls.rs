//! The vSphere calls a backup makes, parsed into small structs. Parsing is tolerant (unknown
//! fields are ignored) but checks the `_typeName` where it decides what we do (a
//! `VirtualDisk`, a flat backing).

use super::changed::{AreaError, ChangedMap};
use super::client::{clean, Client, MoRef, VsphereError};
use serde_json::{json, Value};

/// Pages of `QueryChangedDiskAreas` before we call the answer hostile: a real server pages
/// by thousands of areas, so even a 64 TiB disk needs far fewer.
const MAX_QCDA_PAGES: u64 = 1 << 20;

/// One `VirtualDisk` of a VM's (or a snapshot's) `config.hardware.device`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub key: i32,
    pub capacity: u64,
    /// `[ds1] testvm/testvm.vmdk`: the link the configuration points at.
    pub file_name: String,
    pub datastore: Option<MoRef>,
    /// The backing's uuid (may be absent).
    pub uuid: Option<String>,
    /// The point CBT is at (absent when tracking is not active on the disk).
    pub change_id: Option<String>,
    /// The backing's `_typeName`.
    pub backing_type: String,
    /// Whether the link has a parent (a delta over older links).
    pub has_parent: bool,
}

/// What we read of a VM's `config`.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub name: String,
    pub change_tracking: bool,
    pub disks: Vec<Disk>,
}

fn s(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(|x| x.as_str()).map(str::to_owned)
}

/// A `VirtualMachineConfigInfo` (of a VM or a snapshot).
pub fn parse_config(v: &Value, what: &str) -> Result<VmConfig, VsphereError> {
    let devices = v
        .pointer("/hardware/device")
        .and_then(|d| d.as_array())
        .ok_or_else(|| VsphereError::protocol(what, "no hardware.device list"))?;
    let mut disks = Vec::new();
    for d in devices {
        if d.get("_typeName").and_then(|t| t.as_str()) != Some("VirtualDisk") {
            continue;
        }
        disks.push(parse_disk(d, what)?);
    }
    Ok(VmConfig {
        name: s(v, "name").map(|n| clean(&n, 200)).unwrap_or_default(),
        change_tracking: v
            .get("changeTrackingEnabled")
            .and_then(|c| c.as_bool())
            .unwrap_or(false),
        disks,
    })
}

fn parse_disk(d: &Value, what: &str) -> Result<Disk, VsphereError> {
    let key = d
        .get("key")
        .and_then(|k| k.as_i64())
        .and_then(|k| i32::try_from(k).ok())
        .ok_or_else(|| VsphereError::protocol(what, "a VirtualDisk without a key"))?;
    let bad = |why: &str| VsphereError::protocol(what, format!("disk {key}: {why}"));
    let capacity = match d.get("capacityInBytes").and_then(|c| c.as_u64()) {
        Some(c) => c,
        None => d
            .get("capacityInKB")
            .and_then(|c| c.as_u64())
            .and_then(|kb| kb.checked_mul(1024))
            .ok_or_else(|| bad("no capacity"))?,
    };
    let backing = d.get("backing").ok_or_else(|| bad("no backing"))?;
    let file_name = s(backing, "fileName").ok_or_else(|| bad("no backing fileName"))?;
    Ok(Disk {
        key,
        capacity,
        file_name,
        datastore: backing.get("datastore").and_then(MoRef::parse),
        uuid: s(backing, "uuid"),
        change_id: s(backing, "changeId"),
        backing_type: s(backing, "_typeName").unwrap_or_default(),
        has_parent: backing.get("parent").is_some_and(|p| !p.is_null()),
    })
}

/// A VM by moId (`vm-42`) or by instance or BIOS UUID (through `SearchIndex.FindByUuid`).
pub async fn find_vm(client: &Client, id: &str) -> Result<MoRef, VsphereError> {
    let what = format!("finding the VM {id:?}");
    if !looks_like_uuid(id) {
        if !super::client::path_safe(id) {
            return Err(VsphereError::protocol(&what, "not a moId or a UUID"));
        }
        return Ok(MoRef::new("VirtualMachine", id));
    }
    let index = client
        .content()
        .get("searchIndex")
        .and_then(MoRef::parse)
        .unwrap_or_else(|| MoRef::new("SearchIndex", "SearchIndex"));
    for instance in [true, false] {
        let body = json!({"uuid": id, "vmSearch": true, "instanceUuid": instance});
        if let Some(found) = client.invoke(&index, "FindByUuid", body).await? {
            let vm = MoRef::parse(&found)
                .filter(|m| m.kind == "VirtualMachine")
                .ok_or_else(|| VsphereError::protocol(&what, "not a VirtualMachine reference"))?;
            return Ok(vm);
        }
    }
    Err(VsphereError::protocol(&what, "no VM has this UUID"))
}

fn looks_like_uuid(id: &str) -> bool {
    let parts: Vec<&str> = id.split('-').collect();
    parts.iter().map(|p| p.len()).eq([8, 4, 4, 4, 12])
        && parts
            .iter()
            .all(|p| p.bytes().all(|b| b.is_ascii_hexdigit()))
}

pub async fn vm_config(client: &Client, vm: &MoRef) -> Result<VmConfig, VsphereError> {
    let what = format!("{vm} config");
    let v = client
        .property(vm, "config")
        .await?
        .ok_or_else(|| VsphereError::protocol(&what, "unset (is it a template being created?)"))?;
    parse_config(&v, &what)
}

/// One snapshot in a VM's snapshot tree.
#[derive(Debug, Clone)]
pub struct SnapshotEntry {
    pub snapshot: MoRef,
    pub name: String,
    /// `createTime`, as vCenter wrote it.
    pub created: Option<String>,
}

/// The prefix of the snapshots cbtstream takes (`cbtstream-<point uuid>`).
pub const SNAPSHOT_PREFIX: &str = "cbtstream-";

impl SnapshotEntry {
    /// Whether cbtstream took it: named `cbtstream-<uuid>`, as no person names a snapshot.
    pub fn is_ours(&self) -> bool {
        self.name
            .strip_prefix(SNAPSHOT_PREFIX)
            .is_some_and(|id| uuid::Uuid::try_parse(id).is_ok())
    }
}

/// Every snapshot of the VM (the whole tree, `VirtualMachine.snapshot`).
pub async fn vm_snapshots(client: &Client, vm: &MoRef) -> Result<Vec<SnapshotEntry>, VsphereError> {
    let Some(info) = client.property(vm, "snapshot").await? else {
        return Ok(Vec::new());
    };
    let mut found = Vec::new();
    let mut todo: Vec<&Value> = info
        .get("rootSnapshotList")
        .and_then(|l| l.as_array())
        .map(|l| l.iter().collect())
        .unwrap_or_default();
    while let Some(tree) = todo.pop() {
        if found.len() > 10_000 {
            return Err(VsphereError::protocol(
                "VirtualMachine.snapshot",
                "more than 10000 snapshots",
            ));
        }
        if let Some(snapshot) = tree.get("snapshot").and_then(MoRef::parse) {
            found.push(SnapshotEntry {
                snapshot,
                name: s(tree, "name").unwrap_or_default(),
                created: s(tree, "createTime"),
            });
        }
        if let Some(children) = tree.get("childSnapshotList").and_then(|c| c.as_array()) {
            todo.extend(children);
        }
    }
    Ok(found)
}

/// `ReconfigVM_Task` with `changeTrackingEnabled: true`.
pub async fn enable_cbt(client: &Client, vm: &MoRef) -> Result<(), VsphereError> {
    let spec =
        json!({"spec": {"_typeName": "VirtualMachineConfigSpec", "changeTrackingEnabled": true}});
    client.run_task(vm, "ReconfigVM_Task", spec).await.map(drop)
}

/// Start `CreateSnapshotEx_Task` without memory, quiesced on request: its task.
pub async fn start_snapshot(
    client: &Client,
    vm: &MoRef,
    name: &str,
    quiesce: bool,
) -> Result<MoRef, VsphereError> {
    let mut body = json!({
        "name": name,
        "description": "taken by cbtstream for a backup; removed when it ends",
        "memory": false,
    });
    if quiesce {
        body["quiesceSpec"] = json!({"_typeName": "VirtualMachineGuestQuiesceSpec"});
    }
    client.start_task(vm, "CreateSnapshotEx_Task", body).await
}

/// The snapshot a `CreateSnapshotEx_Task` made, once it ended.
pub async fn snapshot_of(client: &Client, task: &MoRef) -> Result<MoRef, VsphereError> {
    let what = "VirtualMachine.CreateSnapshotEx_Task";
    let result = client.wait_task(task, what).await?.unwrap_or_default();
    MoRef::parse(&result)
        .filter(|m| m.kind == "VirtualMachineSnapshot")
        .ok_or_else(|| {
            VsphereError::protocol(what, "the result is not a VirtualMachineSnapshot reference")
        })
}

/// [`start_snapshot`] and [`snapshot_of`].
#[cfg(test)]
pub async fn create_snapshot(
    client: &Client,
    vm: &MoRef,
    name: &str,
    quiesce: bool,
) -> Result<MoRef, VsphereError> {
    let task = start_snapshot(client, vm, name, quiesce).await?;
    snapshot_of(client, &task).await
}

pub async fn snapshot_config(client: &Client, snap: &MoRef) -> Result<VmConfig, VsphereError> {
    let what = format!("{snap} config");
    let v = client
        .property(snap, "config")
        .await?
        .ok_or_else(|| VsphereError::protocol(&what, "unset"))?;
    parse_config(&v, &what)
}

pub async fn remove_snapshot(client: &Client, snap: &MoRef) -> Result<(), VsphereError> {
    let body = json!({"removeChildren": false, "consolidate": true});
    client
        .run_task(snap, "RemoveSnapshot_Task", body)
        .await
        .map(drop)
}

/// Why the changed areas of a disk could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ChangedError {
    #[error(transparent)]
    Call(#[from] VsphereError),
    #[error("QueryChangedDiskAreas of disk {key}: {source}")]
    Area { key: i32, source: AreaError },
}

/// `QueryChangedDiskAreas` of one disk of a snapshot from `change_id` (`*`: the allocated
/// areas), page after page from `startOffset + length` until the capacity: the bitmap.
pub async fn changed_areas(
    client: &Client,
    vm: &MoRef,
    snap: &MoRef,
    key: i32,
    capacity: u64,
    change_id: &str,
) -> Result<ChangedMap, ChangedError> {
    let what = "VirtualMachine.QueryChangedDiskAreas";
    let area = |source| ChangedError::Area { key, source };
    let mut map = ChangedMap::new(capacity).map_err(area)?;
    let mut pages = 0u64;
    while let Some(offset) = map.next_offset() {
        pages += 1;
        if pages > MAX_QCDA_PAGES {
            return Err(VsphereError::protocol(what, "more than a million pages").into());
        }
        let body = json!({"snapshot": snap.json(), "deviceKey": key, "startOffset": offset, "changeId": change_id});
        let info = client
            .invoke(vm, "QueryChangedDiskAreas", body)
            .await?
            .ok_or_else(|| VsphereError::protocol(what, "no DiskChangeInfo"))?;
        let num = |v: &Value, k: &str| {
            v.get(k)
                .and_then(|n| n.as_u64())
                .ok_or_else(|| VsphereError::protocol(what, format!("no valid {k}")))
        };
        let mut areas = Vec::new();
        if let Some(list) = info.get("changedArea").filter(|l| !l.is_null()) {
            let list = list
                .as_array()
                .ok_or_else(|| VsphereError::protocol(what, "changedArea is not a list"))?;
            for a in list {
                areas.push((num(a, "start")?, num(a, "length")?));
            }
        }
        map.add_page(num(&info, "startOffset")?, num(&info, "length")?, &areas)
            .map_err(area)?;
    }
    tracing::debug!(
        disk = key,
        pages,
        marked = map.marked_bytes(),
        "changed areas"
    );
    Ok(map)
}

/// `[ds1] dir/name.vmdk` → (`ds1`, `dir/name.vmdk`).
pub fn split_datastore_path(file: &str) -> Option<(&str, &str)> {
    let rest = file.strip_prefix('[')?;
    let (ds, path) = rest.split_once(']')?;
    let path = path.trim_start();
    (!ds.is_empty() && !path.is_empty()).then_some((ds, path))
}

/// The flat extent of a `FlatVer2` disk: `name.vmdk` is the descriptor, `name-flat.vmdk`
/// the data (VMware's naming of monolithic flat disks).
pub fn flat_extent(path: &str) -> Option<String> {
    path.strip_suffix(".vmdk").map(|p| format!("{p}-flat.vmdk"))
}

/// The file service's `dcPath` of a VM: its datacenter's inventory path, the names of the
/// folders the datacenter sits in below the root folder, then its own (`dc1`, or
/// `Europe/dc1`): the vSphere Web Services SDK programming guide ("Datastore Access
/// (/folder)") gives `dcPath` as the datacenter's inventory path. Found by walking up the
/// `parent`s.
pub async fn datacenter_of(client: &Client, vm: &MoRef) -> Result<String, VsphereError> {
    let root = client.content().get("rootFolder").and_then(MoRef::parse);
    let mut at = vm.clone();
    let mut path: Vec<String> = Vec::new();
    for _ in 0..64 {
        let parent = client
            .property(&at, "parent")
            .await?
            .as_ref()
            .and_then(MoRef::parse);
        let Some(parent) = parent else {
            if path.is_empty() {
                return Err(VsphereError::protocol(
                    &format!("{at} parent"),
                    "no datacenter above the VM",
                ));
            }
            // `at` has no parent: the root folder, which is not part of the path.
            path.pop();
            return Ok(inventory_path(path));
        };
        if !path.is_empty() || parent.kind == "Datacenter" {
            if Some(&parent) == root.as_ref() {
                return Ok(inventory_path(path));
            }
            path.push(name_of(client, &parent).await?);
        }
        at = parent;
    }
    Err(VsphereError::protocol(
        "finding the datacenter",
        "more than 64 folders deep",
    ))
}

/// Names gathered walking up, as the path down from the root.
fn inventory_path(mut upwards: Vec<String>) -> String {
    upwards.reverse();
    upwards.join("/")
}

pub async fn name_of(client: &Client, object: &MoRef) -> Result<String, VsphereError> {
    client
        .property(object, "name")
        .await?
        .and_then(|n| n.as_str().map(str::to_owned))
        .ok_or_else(|| VsphereError::protocol(&format!("{object} name"), "not a string"))
}

/// Percent-encode a path or query component, keeping `/` when `keep_slash`.
pub fn escape(v: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The datastore file service URL of a flat extent:
/// `https://HOST/folder/<path>-flat.vmdk?dcPath=<datacenter>&dsName=<datastore>`.
pub fn folder_url(authority: &str, datacenter: &str, datastore: &str, path: &str) -> String {
    format!(
        "https://{authority}/folder/{}?dcPath={}&dsName={}",
        escape(path, true),
        escape(datacenter, true),
        escape(datastore, false)
    )
}

/// `Datastore.UpdateVirtualMachineFiles_Task`: each old mount path mapped to a datastore;
/// the files it could not update, with why.
pub async fn update_vm_files(
    client: &Client,
    datastore: &MoRef,
    map: &[(String, MoRef)],
) -> Result<Vec<(String, String)>, VsphereError> {
    let pairs: Vec<Value> = map
        .iter()
        .map(|(old, ds)| {
            json!({"_typeName": "DatastoreMountPathDatastorePair", "oldMountPath": old, "datastore": ds.json()})
        })
        .collect();
    let result = client
        .run_task(
            datastore,
            "UpdateVirtualMachineFiles_Task",
            json!({"mountPathDatastoreMapping": pairs}),
        )
        .await?;
    let mut failed = Vec::new();
    let list = result
        .as_ref()
        .and_then(|r| r.get("failedVmFile"))
        .and_then(|f| f.as_array());
    for f in list.into_iter().flatten() {
        let file = f
            .get("vmFile")
            .and_then(|v| v.as_str())
            .map(|v| clean(v, 500))
            .unwrap_or_else(|| "(unnamed file)".into());
        let why = f
            .get("fault")
            .and_then(|e| {
                super::client::VimFault::parse_localized(e)
                    .or_else(|| super::client::VimFault::parse(e))
            })
            .map(|f| f.to_string())
            .unwrap_or_default();
        failed.push((file, why));
    }
    Ok(failed)
}

/// `SessionManager.AcquireGenericServiceTicket` for one `GET` of `url` (the datastore file
/// service takes it once, as the cookie `vmware_cgi_ticket`). A secret.
#[allow(dead_code)] // for the datastore reader, should the session cookie be refused
pub async fn generic_ticket(
    client: &Client,
    url: &str,
) -> Result<crate::xapi::Secret, VsphereError> {
    let what = "SessionManager.AcquireGenericServiceTicket";
    let sm = client
        .content()
        .get("sessionManager")
        .and_then(MoRef::parse)
        .unwrap_or_else(|| MoRef::new("SessionManager", "SessionManager"));
    let spec = json!({"spec": {"_typeName": "SessionManagerHttpServiceRequestSpec", "method": "httpGet", "url": url}});
    let ticket = client
        .invoke(&sm, "AcquireGenericServiceTicket", spec)
        .await?;
    ticket
        .as_ref()
        .and_then(|t| t.get("id"))
        .and_then(|id| id.as_str())
        .filter(|id| !id.is_empty())
        .map(crate::xapi::Secret::new)
        .ok_or_else(|| VsphereError::protocol(what, "no ticket id"))
}
