//! Property values as VI/JSON serves them (`GET /sdk/vim25/{release}/{type}/{moid}/{property}`):
//! ServiceContent, VirtualMachineConfigInfo (live or as a snapshot froze it), the snapshot
//! tree, TaskInfo, datastore summaries.

use serde_json::{json, Value};

use crate::disk::Disk;
use crate::json::moref;
use crate::state::{
    Datastore, Snapshot, State, Task, TaskState, Vm, DATACENTER_FOLDER_MOID, DATACENTER_MOID,
    DATASTORE_MOID, ROOT_FOLDER_MOID, VM_FOLDER_MOID,
};

pub const CONTROLLER_KEY: i32 = 1000;
pub const NIC_KEY: i32 = 4000;

pub fn service_content(st: &State) -> Value {
    json!({
        "_typeName": "ServiceContent",
        "rootFolder": moref("Folder", ROOT_FOLDER_MOID),
        "propertyCollector": moref("PropertyCollector", "propertyCollector"),
        "viewManager": moref("ViewManager", "ViewManager"),
        "about": {
            "_typeName": "AboutInfo",
            "name": "VMware vCenter Server",
            "fullName": "VMware vCenter Server 8.0.2 build-22385739 (cbtstream vsphere-sim)",
            "vendor": "VMware, Inc.",
            "version": "8.0.2",
            "build": "22385739",
            "localeVersion": "INTL",
            "localeBuild": "000",
            "osType": "linux-x64",
            "productLineId": "vpx",
            "apiType": "VirtualCenter",
            "apiVersion": st.release,
            "instanceUuid": "6f3a1c2e-5b7d-4e8f-9a0b-1c2d3e4f5a6b",
            "licenseProductName": "VMware VirtualCenter Server",
            "licenseProductVersion": "8.0"
        },
        "setting": moref("OptionManager", "VpxSettings"),
        "userDirectory": moref("UserDirectory", "UserDirectory"),
        "sessionManager": moref("SessionManager", "SessionManager"),
        "authorizationManager": moref("AuthorizationManager", "AuthorizationManager"),
        "searchIndex": moref("SearchIndex", "SearchIndex"),
        "fileManager": moref("FileManager", "FileManager"),
        "virtualDiskManager": moref("VirtualDiskManager", "virtualDiskManager"),
        "taskManager": moref("TaskManager", "TaskManager"),
        "eventManager": moref("EventManager", "EventManager")
    })
}

fn backing(st: &State, d: &Disk, depth: usize, change_id: Option<&str>) -> Value {
    let ds = &st.datastores[0].name;
    let mut b = json!({"_typeName": "VirtualDiskFlatVer2BackingInfo"});
    // Innermost (the flat extent) first, each next layer wrapping the previous as `parent`.
    for (i, layer) in d.layers[..depth].iter().enumerate() {
        let mut this = json!({
            "_typeName": "VirtualDiskFlatVer2BackingInfo",
            "fileName": format!("[{ds}] {}", layer.descriptor),
            "datastore": moref("Datastore", DATASTORE_MOID),
            "diskMode": "persistent",
            "split": false,
            "writeThrough": false,
            "thinProvisioned": true,
            "eagerlyScrub": false,
            "uuid": d.uuid,
            "contentId": format!("{:032x}", i + 1),
            "digestEnabled": false,
            "sharing": "sharingNone",
        });
        if i > 0 {
            this["deltaDiskFormat"] = json!("seSparseFormat");
            this["deltaGrainSize"] = json!(8);
            this["parent"] = b;
        }
        b = this;
    }
    if let Some(id) = change_id {
        b["changeId"] = json!(id);
    }
    b
}

fn virtual_disk(st: &State, d: &Disk, unit: usize, depth: usize, change_id: Option<&str>) -> Value {
    json!({
        "_typeName": "VirtualDisk",
        "key": d.key,
        "deviceInfo": {
            "_typeName": "Description",
            "label": format!("Hard disk {}", unit + 1),
            "summary": format!("{} KB", d.capacity / 1024)
        },
        "backing": backing(st, d, depth, change_id),
        "controllerKey": CONTROLLER_KEY,
        "unitNumber": unit,
        "capacityInKB": d.capacity / 1024,
        "capacityInBytes": d.capacity,
        "diskObjectId": format!("1-{}", d.key),
        "nativeUnmanagedLinkedClone": false
    })
}

/// The VM's configuration: live (the top of every chain, the running change id), or as
/// `snap` froze it (the layer below its delta, the snapshot's change id).
pub fn config_info(st: &State, vm: &Vm, snap: Option<&Snapshot>) -> Value {
    let ds = &st.datastores[0].name;
    let mut devices = vec![json!({
        "_typeName": "VirtualLsiLogicController",
        "key": CONTROLLER_KEY,
        "deviceInfo": {"_typeName": "Description", "label": "SCSI controller 0", "summary": "LSI Logic"},
        "busNumber": 0,
        "device": vm.disks.iter().map(|d| d.key).collect::<Vec<_>>(),
        "hotAddRemove": true,
        "sharedBus": "noSharing",
        "scsiCtlrUnitNumber": 7
    })];
    for (unit, d) in vm.disks.iter().enumerate() {
        let (depth, change) = match snap {
            None => (d.layers.len(), d.cbt.live_change_id()),
            Some(s) => {
                let sd = s.disks.iter().find(|x| x.key == d.key);
                let depth = sd
                    .and_then(|sd| d.layers.iter().position(|l| l.path == sd.delta))
                    .unwrap_or(d.layers.len());
                (
                    depth,
                    sd.and_then(|sd| sd.change.as_ref().map(|c| c.0.clone())),
                )
            }
        };
        devices.push(virtual_disk(st, d, unit, depth, change.as_deref()));
    }
    devices.push(json!({
        "_typeName": "VirtualVmxnet3",
        "key": NIC_KEY,
        "deviceInfo": {"_typeName": "Description", "label": "Network adapter 1", "summary": "VM Network"},
        "backing": {"_typeName": "VirtualEthernetCardNetworkBackingInfo", "deviceName": "VM Network"},
        "addressType": "assigned",
        "macAddress": "00:50:56:aa:bb:01"
    }));
    let dir = format!("[{ds}] {}/", vm.name);
    json!({
        "_typeName": "VirtualMachineConfigInfo",
        "changeVersion": "2026-01-01T00:00:00.000000Z",
        "modified": "1970-01-01T00:00:00.000Z",
        "name": vm.name,
        "guestFullName": "Other Linux (64-bit)",
        "version": "vmx-19",
        "uuid": vm.bios_uuid,
        "instanceUuid": vm.instance_uuid,
        "template": false,
        "guestId": "otherLinux64Guest",
        "alternateGuestName": "",
        "changeTrackingEnabled": vm.change_tracking_enabled,
        "firmware": "bios",
        "files": {
            "_typeName": "VirtualMachineFileInfo",
            "vmPathName": format!("{dir}{}.vmx", vm.name),
            "snapshotDirectory": dir,
            "suspendDirectory": dir,
            "logDirectory": dir
        },
        "flags": {"_typeName": "VirtualMachineFlagInfo"},
        "defaultPowerOps": {"_typeName": "VirtualMachineDefaultPowerOpInfo"},
        "hardware": {
            "_typeName": "VirtualHardware",
            "numCPU": 1,
            "numCoresPerSocket": 1,
            "memoryMB": 1024,
            "device": devices
        }
    })
}

/// `VirtualMachine.snapshot`: `None` when the VM has no snapshots (the property is unset).
pub fn snapshot_info(st: &State, vm: &Vm) -> Option<Value> {
    let mut tree: Option<Value> = None;
    for moid in vm.snapshots.iter().rev() {
        let s = st.snapshots.get(moid)?;
        let mut node = json!({
            "_typeName": "VirtualMachineSnapshotTree",
            "snapshot": moref("VirtualMachineSnapshot", &s.moid),
            "vm": moref("VirtualMachine", &vm.moid),
            "name": s.name,
            "description": s.description,
            "id": s.id,
            "createTime": s.create_time,
            "state": "poweredOff",
            "quiesced": s.quiesced,
            "replaySupported": false
        });
        if let Some(child) = tree.take() {
            node["childSnapshotList"] = json!([child]);
        }
        tree = Some(node);
    }
    let current = vm.snapshots.last()?;
    Some(json!({
        "_typeName": "VirtualMachineSnapshotInfo",
        "currentSnapshot": moref("VirtualMachineSnapshot", current),
        "rootSnapshotList": [tree?]
    }))
}

pub fn task_info(t: &Task) -> Value {
    let (state, result, error, progress) = match &t.state {
        TaskState::Queued => ("queued", None, None, None),
        TaskState::Running => ("running", None, None, Some(json!(50))),
        TaskState::Success(r) => ("success", r.clone(), None, None),
        TaskState::Error(f) => ("error", None, Some(f.to_json()), None),
    };
    let mut v = json!({
        "_typeName": "TaskInfo",
        "key": t.moid,
        "task": moref("Task", &t.moid),
        "name": t.name,
        "descriptionId": t.description_id,
        "entity": t.entity,
        "entityName": t.entity_name,
        "state": state,
        "cancelled": false,
        "cancelable": false,
        "reason": {"_typeName": "TaskReasonUser", "userName": t.user},
        "queueTime": t.queue_time,
        "eventChainId": t.event_chain_id
    });
    let opt = [
        ("result", result),
        ("error", error),
        ("progress", progress),
        ("startTime", t.start_time.clone().map(Value::from)),
        ("completeTime", t.complete_time.clone().map(Value::from)),
    ];
    for (k, val) in opt {
        if let Some(val) = val {
            v[k] = val;
        }
    }
    v
}

pub fn datastore_summary(ds: &Datastore) -> Value {
    json!({
        "_typeName": "DatastoreSummary",
        "datastore": moref("Datastore", &ds.moid),
        "name": ds.name,
        "url": format!("ds://{}/", ds.mount_path),
        "capacity": 1u64 << 40,
        "freeSpace": 1u64 << 39,
        "accessible": true,
        "multipleHostAccess": false,
        "type": "VMFS"
    })
}

/// `GET {type}/{moid}/{property}`: `Ok(None)` is an unset property (204), `Err(())` an
/// unknown object or property.
pub fn get(st: &State, typ: &str, moid: &str, prop: &str) -> Result<Option<Value>, ()> {
    let some = |v: Value| Ok(Some(v));
    match typ {
        "ServiceInstance" if moid == "ServiceInstance" && prop == "content" => {
            some(service_content(st))
        }
        "VirtualMachine" => {
            let vm = st.vm(moid).ok_or(())?;
            match prop {
                "config" => some(config_info(st, vm, None)),
                "snapshot" => Ok(snapshot_info(st, vm)),
                "rootSnapshot" => some(json!(vm
                    .snapshots
                    .first()
                    .map(|s| vec![moref("VirtualMachineSnapshot", s)])
                    .unwrap_or_default())),
                "name" => some(json!(vm.name)),
                "parent" => some(moref("Folder", VM_FOLDER_MOID)),
                "datastore" => some(json!([moref("Datastore", DATASTORE_MOID)])),
                // ManagedEntity.recentTask: the tasks on the VM (a short-lived simulator
                // keeps them all).
                "recentTask" => some(json!(st
                    .tasks
                    .values()
                    .filter(|t| t.entity.get("value").and_then(|v| v.as_str()) == Some(&vm.moid))
                    .map(|t| moref("Task", &t.moid))
                    .collect::<Vec<_>>())),
                "runtime" => some(json!({
                    "_typeName": "VirtualMachineRuntimeInfo",
                    "connectionState": "connected",
                    "powerState": "poweredOn",
                    "consolidationNeeded": false
                })),
                "capability" => some(json!({
                    "_typeName": "VirtualMachineCapability",
                    "snapshotOperationsSupported": true,
                    "multipleSnapshotsSupported": true,
                    "snapshotConfigSupported": true,
                    "changeTrackingSupported": true,
                    "diskOnlySnapshotOnSuspendedVMSupported": true
                })),
                _ => Err(()),
            }
        }
        "VirtualMachineSnapshot" => {
            let s = st.snapshots.get(moid).ok_or(())?;
            let vm = st.vm(&s.vm).ok_or(())?;
            match prop {
                "config" => some(config_info(st, vm, Some(s))),
                "vm" => some(moref("VirtualMachine", &vm.moid)),
                _ => Err(()),
            }
        }
        "Task" => {
            let t = st.tasks.get(moid).ok_or(())?;
            match prop {
                "info" => some(task_info(t)),
                _ => Err(()),
            }
        }
        "Datacenter" if moid == DATACENTER_MOID => match prop {
            "name" => some(json!(st.datacenter)),
            "parent" => some(match st.datacenter_folder {
                Some(_) => moref("Folder", DATACENTER_FOLDER_MOID),
                None => moref("Folder", ROOT_FOLDER_MOID),
            }),
            "vmFolder" => some(moref("Folder", VM_FOLDER_MOID)),
            "datastore" => some(json!(st
                .datastores
                .iter()
                .map(|d| moref("Datastore", &d.moid))
                .collect::<Vec<_>>())),
            _ => Err(()),
        },
        "Folder" if moid == ROOT_FOLDER_MOID => match prop {
            "name" => some(json!("Datacenters")),
            "parent" => Ok(None),
            "childEntity" => some(json!([match st.datacenter_folder {
                Some(_) => moref("Folder", DATACENTER_FOLDER_MOID),
                None => moref("Datacenter", DATACENTER_MOID),
            }])),
            _ => Err(()),
        },
        "Folder" if moid == DATACENTER_FOLDER_MOID && st.datacenter_folder.is_some() => {
            match prop {
                "name" => some(json!(st.datacenter_folder)),
                "parent" => some(moref("Folder", ROOT_FOLDER_MOID)),
                "childEntity" => some(json!([moref("Datacenter", DATACENTER_MOID)])),
                _ => Err(()),
            }
        }
        "Folder" if moid == VM_FOLDER_MOID => match prop {
            "name" => some(json!("vm")),
            "parent" => some(moref("Datacenter", DATACENTER_MOID)),
            "childEntity" => some(json!(st
                .vms
                .iter()
                .map(|v| moref("VirtualMachine", &v.moid))
                .collect::<Vec<_>>())),
            _ => Err(()),
        },
        "Datastore" => {
            let ds = st.datastore(moid).ok_or(())?;
            match prop {
                "name" => some(json!(ds.name)),
                "summary" => some(datastore_summary(ds)),
                "parent" => some(moref("Folder", "group-s5")),
                "vm" => some(json!(st
                    .vms
                    .iter()
                    .filter(|_| ds.moid == DATASTORE_MOID)
                    .map(|v| moref("VirtualMachine", &v.moid))
                    .collect::<Vec<_>>())),
                _ => Err(()),
            }
        }
        _ => Err(()),
    }
}

/// Managed object types `get` knows.
pub fn known_type(typ: &str) -> bool {
    matches!(
        typ,
        "VirtualMachine"
            | "VirtualMachineSnapshot"
            | "Task"
            | "Datacenter"
            | "Folder"
            | "Datastore"
    )
}

pub fn exists(st: &State, typ: &str, moid: &str) -> bool {
    match typ {
        "VirtualMachine" => st.vm(moid).is_some(),
        "VirtualMachineSnapshot" => st.snapshots.contains_key(moid),
        "Task" => st.tasks.contains_key(moid),
        "Datacenter" => moid == DATACENTER_MOID,
        "Folder" => moid == VM_FOLDER_MOID,
        "Datastore" => st.datastore(moid).is_some(),
        _ => false,
    }
}
