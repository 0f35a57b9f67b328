//! VI/JSON over HTTPS: sessions, inventory, snapshots, tasks, fault switches.

mod common;

use cbtstream_vsphere_sim::{SimConfig, Simulator, GRAIN, SESSION_HEADER};
use common::Client;
use serde_json::{json, Value};

async fn start() -> (tempfile::TempDir, Simulator, Client, String) {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::start(SimConfig::for_tests(dir.path()))
        .await
        .unwrap();
    let c = Client::new(&sim);
    let token = c.login(sim.user(), sim.password()).await;
    (dir, sim, c, token)
}

fn disks(config: &Value) -> Vec<Value> {
    config["hardware"]["device"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["_typeName"] == "VirtualDisk")
        .cloned()
        .collect()
}

#[tokio::test]
async fn content_is_public_and_every_other_call_needs_the_session_header() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::start(SimConfig::for_tests(dir.path()))
        .await
        .unwrap();
    let c = Client::new(&sim);
    let r = c.get(None, "ServiceInstance/ServiceInstance/content").await;
    assert_eq!(r.status, 200);
    let content = r.json();
    assert_eq!(content["_typeName"], "ServiceContent");
    assert_eq!(content["about"]["apiVersion"], "8.0.2.0");
    assert_eq!(
        content["sessionManager"],
        json!({"_typeName": "ManagedObjectReference", "type": "SessionManager", "value": "SessionManager"})
    );

    let r = c.get(None, "VirtualMachine/vm-42/config").await;
    assert_eq!(r.status, 500);
    assert_eq!(r.json()["_typeName"], "NotAuthenticated");

    let r = c
        .post(
            None,
            "SessionManager/SessionManager/Login",
            json!({"userName": sim.user(), "password": "wrong"}),
        )
        .await;
    assert_eq!(r.status, 500);
    assert_eq!(r.json()["_typeName"], "InvalidLogin");
    assert!(r.header(SESSION_HEADER).is_none());

    let token = c.login(sim.user(), sim.password()).await;
    let r = c
        .get(Some(&token), "SessionManager/SessionManager/currentSession")
        .await;
    assert_eq!(r.json()["_typeName"], "UserSession");
    assert!(
        !r.text().contains(&token),
        "the body must not repeat the token"
    );
    assert_eq!(
        c.get(Some(&token), "VirtualMachine/vm-42/config")
            .await
            .status,
        200
    );

    let r = c
        .post(
            Some(&token),
            "SessionManager/SessionManager/Logout",
            json!({}),
        )
        .await;
    assert_eq!(r.status, 204);
    let r = c.get(Some(&token), "VirtualMachine/vm-42/config").await;
    assert_eq!(r.json()["_typeName"], "NotAuthenticated");

    // Unknown objects are faults; unknown methods and releases are not in the API.
    let token = c.login(sim.user(), sim.password()).await;
    let r = c.get(Some(&token), "VirtualMachine/vm-7/config").await;
    assert_eq!(
        (r.status, r.json()["_typeName"].clone()),
        (500, json!("ManagedObjectNotFound"))
    );
    assert_eq!(
        c.post(Some(&token), "VirtualMachine/vm-42/NoSuchMethod", json!({}))
            .await
            .status,
        404
    );
    let r = c
        .request(
            "GET",
            "/sdk/vim25/7.0.3.0/ServiceInstance/ServiceInstance/content",
            &[],
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 404);
    // One kept-alive connection carried all of it.
    assert_eq!(c.connections.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test]
async fn the_vm_config_lists_its_virtual_disks_with_backing_and_change_id() {
    let (_dir, sim, c, token) = start().await;
    let config = c
        .get(Some(&token), "VirtualMachine/vm-42/config")
        .await
        .json();
    assert_eq!(config["_typeName"], "VirtualMachineConfigInfo");
    assert_eq!(config["changeTrackingEnabled"], true);
    assert_eq!(config["instanceUuid"], sim.vm_instance_uuid());
    let d = disks(&config);
    assert_eq!(d.len(), 2);
    assert_eq!(d[0]["key"], 2000);
    assert_eq!(d[1]["key"], 2001);
    assert_eq!(d[0]["capacityInBytes"], 4u64 << 20);
    let odd = d[1]["capacityInBytes"].as_u64().unwrap();
    assert_ne!(
        odd % GRAIN,
        0,
        "the second disk is not a multiple of 64 KiB"
    );
    assert_eq!(d[1]["capacityInKB"].as_u64().unwrap() * 1024, odd);
    let b = &d[0]["backing"];
    assert_eq!(b["_typeName"], "VirtualDiskFlatVer2BackingInfo");
    assert_eq!(b["fileName"], "[ds1] testvm/testvm.vmdk");
    assert_eq!(d[1]["backing"]["fileName"], "[ds1] testvm/testvm_1.vmdk");
    assert_eq!(b["datastore"]["value"], "datastore-11");
    assert!(b.get("parent").is_none());
    let change_id = b["changeId"].as_str().unwrap();
    let (uuid, point) = change_id.rsplit_once('/').unwrap();
    assert_eq!(uuid.len(), 47, "VMware's spaced hex uuid: {uuid}");
    point.parse::<u64>().unwrap();
    // Other devices are there too, each with its own _typeName.
    assert!(config["hardware"]["device"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["_typeName"] == "VirtualLsiLogicController"));

    // No snapshots: the property is unset.
    assert_eq!(
        c.get(Some(&token), "VirtualMachine/vm-42/snapshot")
            .await
            .status,
        204
    );

    // SearchIndex finds the VM by instance UUID, nothing for an unknown one.
    let r = c
        .post(
            Some(&token),
            "SearchIndex/SearchIndex/FindByUuid",
            json!({"uuid": sim.vm_instance_uuid().to_uppercase(), "vmSearch": true, "instanceUuid": true}),
        )
        .await;
    assert_eq!(
        r.json(),
        json!({"_typeName": "ManagedObjectReference", "type": "VirtualMachine", "value": "vm-42"})
    );
    let r = c
        .post(
            Some(&token),
            "SearchIndex/SearchIndex/FindByUuid",
            json!({"uuid": "00000000-0000-0000-0000-000000000000", "vmSearch": true, "instanceUuid": true}),
        )
        .await;
    assert_eq!(r.status, 204);

    // The datacenter's name (the file service's dcPath) is reachable from the VM.
    assert_eq!(
        c.get(Some(&token), "VirtualMachine/vm-42/parent")
            .await
            .json()["value"],
        "group-v4"
    );
    assert_eq!(
        c.get(Some(&token), "Folder/group-v4/parent").await.json()["value"],
        "datacenter-3"
    );
    assert_eq!(
        c.get(Some(&token), "Datacenter/datacenter-3/name")
            .await
            .json(),
        "dc1"
    );
}

#[tokio::test]
async fn a_snapshot_freezes_the_disk_until_it_is_removed() {
    let (_dir, sim, c, token) = start().await;
    sim.write("vm-42", 2000, 1000, b"before the snapshot")
        .unwrap();
    let r = c
        .post(
            Some(&token),
            "VirtualMachine/vm-42/CreateSnapshotEx_Task",
            json!({"name": "backup", "memory": false,
                   "quiesceSpec": {"_typeName": "VirtualMachineGuestQuiesceSpec", "timeout": 5}}),
        )
        .await;
    assert_eq!(r.status, 200);
    let (info, seen) = c.wait_task(&token, &r.json()).await;
    assert_eq!(seen.last().unwrap(), "success");
    assert_eq!(info["descriptionId"], "VirtualMachine.createSnapshot");
    assert_eq!(info["entity"]["value"], "vm-42");
    let snap = info["result"]["_value"]["value"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(sim.snapshots("vm-42"), vec![snap.clone()]);

    // Guest writes after the snapshot (through the test API over HTTPS).
    let data = base64_encode(b"AFTER");
    let r = c
        .sim(
            &token,
            "write",
            json!({"vm": "vm-42", "disk": 2000, "offset": 1003, "data": data}),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.text());

    let frozen = sim.read_snapshot(&snap, 2000).unwrap();
    assert_eq!(&frozen[1000..1019], b"before the snapshot");
    let live = sim.read_disk("vm-42", 2000).unwrap();
    assert_eq!(&live[1000..1019], b"befAFTERhe snapshot");

    // The tree, the snapshot's config (frozen base link), the VM's (the new delta on top).
    let tree = c
        .get(Some(&token), "VirtualMachine/vm-42/snapshot")
        .await
        .json();
    assert_eq!(tree["currentSnapshot"]["value"], snap.as_str());
    assert_eq!(tree["rootSnapshotList"][0]["name"], "backup");
    assert_eq!(tree["rootSnapshotList"][0]["quiesced"], true);
    let sc = c
        .get(
            Some(&token),
            &format!("VirtualMachineSnapshot/{snap}/config"),
        )
        .await
        .json();
    let sb = &disks(&sc)[0]["backing"];
    assert_eq!(sb["fileName"], "[ds1] testvm/testvm.vmdk");
    let vc = c
        .get(Some(&token), "VirtualMachine/vm-42/config")
        .await
        .json();
    let vb = &disks(&vc)[0]["backing"];
    assert_eq!(vb["fileName"], "[ds1] testvm/testvm-000001.vmdk");
    assert_eq!(vb["parent"]["fileName"], "[ds1] testvm/testvm.vmdk");

    let info = c.remove_snapshot(&token, &snap).await;
    assert_eq!(info["state"], "success", "{info}");
    assert!(sim.snapshots("vm-42").is_empty());
    assert_eq!(sim.read_disk("vm-42", 2000).unwrap(), live);
    assert_eq!(
        c.get(Some(&token), "VirtualMachine/vm-42/snapshot")
            .await
            .status,
        204
    );
    assert_eq!(
        c.get(
            Some(&token),
            &format!("VirtualMachineSnapshot/{snap}/config")
        )
        .await
        .json()["_typeName"],
        "ManagedObjectNotFound"
    );
    // No delta file is left behind.
    assert_eq!(
        std::fs::read_dir(sim.data_dir().join(".sim/deltas"))
            .unwrap()
            .count(),
        0
    );
}

#[tokio::test]
async fn an_older_snapshot_stays_consistent_when_a_newer_one_comes_and_goes() {
    let (_dir, sim, c, token) = start().await;
    sim.write("vm-42", 2001, 0, b"one").unwrap();
    let old = sim.take_snapshot("vm-42", "user snapshot").unwrap();
    sim.write("vm-42", 2001, 0, b"two").unwrap();
    let new = c.snapshot(&token, "vm-42", "backup").await;
    sim.write("vm-42", 2001, 0, b"three").unwrap();
    assert_eq!(&sim.read_snapshot(&old, 2001).unwrap()[..3], b"one");
    assert_eq!(&sim.read_snapshot(&new, 2001).unwrap()[..3], b"two");
    // The newer snapshot's frozen link is the older one's delta.
    let sc = c
        .get(
            Some(&token),
            &format!("VirtualMachineSnapshot/{new}/config"),
        )
        .await
        .json();
    let b = &disks(&sc)[1]["backing"];
    assert_eq!(b["fileName"], "[ds1] testvm/testvm_1-000001.vmdk");
    assert_eq!(b["parent"]["fileName"], "[ds1] testvm/testvm_1.vmdk");
    // Removing the older one first keeps the newer one's view.
    sim.remove_snapshot(&old).unwrap();
    assert_eq!(&sim.read_snapshot(&new, 2001).unwrap()[..3], b"two");
    assert_eq!(c.remove_snapshot(&token, &new).await["state"], "success");
    assert_eq!(&sim.read_disk("vm-42", 2001).unwrap()[..5], b"three");
}

#[tokio::test]
async fn fault_switches_fail_tasks_and_calls() {
    let (_dir, sim, c, token) = start().await;
    // A failed snapshot task: state error, a LocalizedMethodFault, no snapshot.
    let r = c
        .sim(
            &token,
            "fail_next",
            json!({"method": "CreateSnapshotEx_Task", "fault": "FileFault"}),
        )
        .await;
    assert_eq!(r.status, 204);
    let r = c
        .post(
            Some(&token),
            "VirtualMachine/vm-42/CreateSnapshotEx_Task",
            json!({"name": "b", "memory": false}),
        )
        .await;
    let (info, _) = c.wait_task(&token, &r.json()).await;
    assert_eq!(info["state"], "error");
    assert_eq!(info["error"]["_typeName"], "LocalizedMethodFault");
    assert_eq!(info["error"]["fault"]["_typeName"], "FileFault");
    assert!(sim.snapshots("vm-42").is_empty());

    // A failed removal leaves the snapshot.
    let snap = c.snapshot(&token, "vm-42", "b").await;
    sim.fail_next("RemoveSnapshot_Task", "TaskInProgress");
    let info = c.remove_snapshot(&token, &snap).await;
    assert_eq!(info["state"], "error");
    assert_eq!(sim.snapshots("vm-42"), vec![snap.clone()]);
    assert_eq!(c.remove_snapshot(&token, &snap).await["state"], "success");

    // A plain method fails with HTTP 500 and the fault body.
    sim.fail_next("QueryChangedDiskAreas", "InvalidState");
    let snap = c.snapshot(&token, "vm-42", "b").await;
    let err = c
        .changed_areas(&token, "vm-42", &snap, 2000, "*", 4 << 20)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("InvalidState"), "{err}");

    // A second snapshot operation while one runs: TaskInProgress.
    let first = c
        .post(
            Some(&token),
            &format!("VirtualMachineSnapshot/{snap}/RemoveSnapshot_Task"),
            json!({"removeChildren": false}),
        )
        .await;
    let second = c
        .post(
            Some(&token),
            "VirtualMachine/vm-42/CreateSnapshotEx_Task",
            json!({"name": "c", "memory": false}),
        )
        .await;
    assert_eq!(second.status, 500);
    assert_eq!(second.json()["_typeName"], "TaskInProgress");
    assert_eq!(
        c.wait_task(&token, &first.json()).await.0["state"],
        "success"
    );

    // Expired sessions: NotAuthenticated, also for the test API.
    let r = c.sim(&token, "expire_sessions", json!({})).await;
    assert_eq!(r.status, 204);
    let r = c.get(Some(&token), "VirtualMachine/vm-42/config").await;
    assert_eq!(r.json()["_typeName"], "NotAuthenticated");
    assert_eq!(c.sim(&token, "write", json!({})).await.status, 401);
    assert_eq!(sim.calls("CreateSnapshotEx_Task"), 4);
}

#[tokio::test]
async fn enabling_tracking_takes_effect_at_the_next_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SimConfig {
        cbt_enabled: false,
        ..SimConfig::for_tests(dir.path())
    };
    let sim = Simulator::start(cfg).await.unwrap();
    let c = Client::new(&sim);
    let token = c.login(sim.user(), sim.password()).await;
    let config = c
        .get(Some(&token), "VirtualMachine/vm-42/config")
        .await
        .json();
    assert_eq!(config["changeTrackingEnabled"], false);
    assert!(disks(&config)[0]["backing"].get("changeId").is_none());

    let r = c
        .post(
            Some(&token),
            "VirtualMachine/vm-42/ReconfigVM_Task",
            json!({"spec": {"_typeName": "VirtualMachineConfigSpec", "changeTrackingEnabled": true}}),
        )
        .await;
    assert_eq!(c.wait_task(&token, &r.json()).await.0["state"], "success");
    let config = c
        .get(Some(&token), "VirtualMachine/vm-42/config")
        .await
        .json();
    assert_eq!(config["changeTrackingEnabled"], true);
    assert!(
        disks(&config)[0]["backing"].get("changeId").is_none(),
        "not before a stun"
    );

    let snap = c.snapshot(&token, "vm-42", "first").await;
    let sc = c
        .get(
            Some(&token),
            &format!("VirtualMachineSnapshot/{snap}/config"),
        )
        .await
        .json();
    assert!(disks(&sc)[0]["backing"]["changeId"].is_string());
    c.changed_areas(&token, "vm-42", &snap, 2000, "*", 4 << 20)
        .await
        .unwrap();
}

#[tokio::test]
async fn update_virtual_machine_files_reports_the_files_it_could_not_update() {
    let (_dir, sim, c, token) = start().await;
    let mapping = |ds: &str| {
        json!({"mountPathDatastoreMapping": [{
            "_typeName": "DatastoreMountPathDatastorePair",
            "oldMountPath": "/vmfs/volumes/old-volume",
            "datastore": {"_typeName": "ManagedObjectReference", "type": "Datastore", "value": ds}
        }]})
    };
    // A datastore with a registered VM: ResourceInUse.
    let r = c
        .post(
            Some(&token),
            "Datastore/datastore-11/UpdateVirtualMachineFiles_Task",
            mapping("datastore-11"),
        )
        .await;
    assert_eq!(
        (r.status, r.json()["_typeName"].clone()),
        (500, json!("ResourceInUse"))
    );
    // An unknown target datastore: InvalidArgument.
    let r = c
        .post(
            Some(&token),
            "Datastore/datastore-12/UpdateVirtualMachineFiles_Task",
            mapping("datastore-99"),
        )
        .await;
    assert_eq!(r.json()["_typeName"], "InvalidArgument");

    let r = c
        .post(
            Some(&token),
            "Datastore/datastore-12/UpdateVirtualMachineFiles_Task",
            mapping("datastore-12"),
        )
        .await;
    let (info, _) = c.wait_task(&token, &r.json()).await;
    assert_eq!(
        info["result"],
        json!({"_typeName": "UpdateVirtualMachineFilesResult"})
    );

    sim.add_unupdatable_file("[ds2] old/old.vmx");
    let r = c
        .post(
            Some(&token),
            "Datastore/datastore-12/UpdateVirtualMachineFiles_Task",
            mapping("datastore-12"),
        )
        .await;
    let (info, _) = c.wait_task(&token, &r.json()).await;
    let failed = &info["result"]["failedVmFile"];
    assert_eq!(
        failed[0]["_typeName"],
        "UpdateVirtualMachineFilesResultFailedVmFileInfo"
    );
    assert_eq!(failed[0]["vmFile"], "[ds2] old/old.vmx");
    assert_eq!(failed[0]["fault"]["fault"]["_typeName"], "FileFault");
}

fn base64_encode(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

#[tokio::test]
async fn a_snapshot_that_cannot_create_its_deltas_leaves_the_disks_as_they_were() {
    let (_dir, sim, c, token) = start().await;
    let before = c
        .get(Some(&token), "VirtualMachine/vm-42/config")
        .await
        .json();
    // The second disk's delta file exists already: creating it fails.
    let deltas = sim.data_dir().join(".sim/deltas");
    std::fs::write(deltas.join("testvm-2001-000001.raw"), b"in the way").unwrap();
    let r = c
        .post(
            Some(&token),
            "VirtualMachine/vm-42/CreateSnapshotEx_Task",
            json!({"name": "s", "memory": false}),
        )
        .await;
    let (info, _) = c.wait_task(&token, &r.json()).await;
    assert_eq!(info["state"], "error");
    assert_eq!(info["error"]["fault"]["_typeName"], "FileFault");
    assert!(sim.snapshots("vm-42").is_empty());
    assert_eq!(
        c.get(Some(&token), "VirtualMachine/vm-42/config")
            .await
            .json(),
        before
    );
    let left: Vec<_> = std::fs::read_dir(&deltas)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        vec![std::ffi::OsString::from("testvm-2001-000001.raw")]
    );
    // The next snapshot works.
    let snap = c.snapshot(&token, "vm-42", "s").await;
    assert_eq!(c.remove_snapshot(&token, &snap).await["state"], "success");
}
