//! vim_rs, a client generated from VMware's published VI/JSON specification, drives the vSphere
//! simulator through a changed-block-tracking backup cycle: every request is vim_rs's encoding
//! and every answer must decode into vim_rs's generated types, so a shape the simulator made up
//! fails here even where cbtstream's own client would accept it.

use std::sync::Arc;
use std::time::Duration;

use cbtstream_vsphere_sim::{SimConfig, Simulator, GRAIN};
use vim_rs::core::client::{Client, Error};
use vim_rs::core::ClientBuilder;
use vim_rs::mo::{
    Datacenter, Datastore, Folder, SearchIndex, SessionManager, Task, VirtualMachine,
    VirtualMachineSnapshot,
};
use vim_rs::types::enums::{MoTypesEnum, TaskInfoStateEnum};
use vim_rs::types::struct_enum::StructType;
use vim_rs::types::structs::{
    ManagedObjectReference, MethodFault, SessionManagerHttpServiceRequestSpec, TaskInfo,
    VirtualDisk, VirtualDiskFlatVer2BackingInfo, VirtualMachineConfigInfo,
    VirtualMachineGuestQuiesceSpec,
};
use vim_rs::types::vim_any::VimAny;

/// A reqwest client that trusts only the simulator's CA (rustls over ring, no platform roots).
fn http_client(sim: &Simulator) -> reqwest::Client {
    // Several tests in one process: the second install finds the first one's provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pem = std::fs::read(sim.ca_path()).expect("the simulator's CA certificate");
    let ca = reqwest::Certificate::from_pem(&pem).expect("a PEM certificate");
    reqwest::Client::builder()
        .tls_certs_only([ca])
        .build()
        .expect("a reqwest client")
}

/// Negotiates the release (Hello), reads the service content and logs in, as vim_rs does.
async fn connect(sim: &Simulator, password: &str) -> Result<Arc<Client>, Error> {
    ClientBuilder::new(&sim.addr().to_string(), http_client(sim))
        .basic_authn(sim.user(), password)
        .app_details(env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"))
        .build()
        .await
}

fn method_fault(e: &Error) -> &MethodFault {
    match e {
        Error::MethodFault(f) => f,
        other => panic!("expected a MethodFault, got {other:?}"),
    }
}

/// The fault's own string field (`file`, `invalidProperty`), kept by vim_rs by its wire name.
fn fault_field<'a>(f: &'a MethodFault, name: &str) -> &'a str {
    match f.extra_fields_.get(name) {
        Some(miniserde::json::Value::String(s)) => s,
        other => panic!("fault field {name}: {other:?} in {f:?}"),
    }
}

/// Polls `Task.info` until the task ends (the simulator has no PropertyCollector, which
/// vim_rs's TaskTracker needs). The pause only spaces the polls; nothing asserts on time.
async fn wait_task(client: &Arc<Client>, task: &ManagedObjectReference) -> TaskInfo {
    assert!(matches!(task.r#type, MoTypesEnum::Task), "{task:?}");
    let task = Task::new(client.clone(), &task.value);
    let poll = async {
        loop {
            let info = task.info().await.expect("Task.info");
            match info.state {
                TaskInfoStateEnum::Success | TaskInfoStateEnum::Error => return info,
                TaskInfoStateEnum::Queued | TaskInfoStateEnum::Running => {}
                TaskInfoStateEnum::Other_(ref s) => panic!("unknown task state {s}"),
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), poll)
        .await
        .expect("the task never ended")
}

/// The managed object reference a successful task returned (`TaskInfo.result`).
fn task_result_moref(info: TaskInfo) -> ManagedObjectReference {
    assert!(matches!(info.state, TaskInfoStateEnum::Success), "{info:?}");
    match info.result {
        Some(any @ VimAny::Object(_)) => *any
            .into_any()
            .downcast::<ManagedObjectReference>()
            .expect("a ManagedObjectReference result"),
        other => panic!("expected an object result, got {other:?}"),
    }
}

#[derive(Debug, PartialEq)]
struct DiskView {
    key: i32,
    capacity: u64,
    file_name: String,
    datastore: Option<String>,
    change_id: Option<String>,
    parent_file_name: Option<String>,
}

/// The VirtualDisk devices of a configuration, through vim_rs's trait objects.
fn disks(config: &VirtualMachineConfigInfo) -> Vec<DiskView> {
    let devices = config.hardware.device.as_deref().unwrap_or_default();
    let mut out = Vec::new();
    for dev in devices {
        let Some(disk) = dev.as_any_ref().downcast_ref::<VirtualDisk>() else {
            continue;
        };
        let backing = disk
            .backing
            .as_ref()
            .and_then(|b| {
                b.as_any_ref()
                    .downcast_ref::<VirtualDiskFlatVer2BackingInfo>()
            })
            .expect("a VirtualDiskFlatVer2BackingInfo backing");
        let capacity = disk.capacity_in_bytes.expect("capacityInBytes");
        assert_eq!(capacity, disk.capacity_in_kb * 1024, "{disk:?}");
        out.push(DiskView {
            key: disk.key,
            capacity: u64::try_from(capacity).unwrap(),
            file_name: backing.file_name.clone(),
            datastore: backing.datastore.as_ref().map(|d| d.value.clone()),
            change_id: backing.change_id.clone(),
            parent_file_name: backing.parent.as_ref().map(|p| p.file_name.clone()),
        });
    }
    out
}

fn change_id(config: &VirtualMachineConfigInfo, key: i32) -> String {
    disks(config)
        .into_iter()
        .find(|d| d.key == key)
        .and_then(|d| d.change_id)
        .unwrap_or_else(|| panic!("disk {key} has no changeId"))
}

/// Pages QueryChangedDiskAreas from offset 0 to the capacity; returns the areas and the pages.
async fn changed_areas(
    vm: &VirtualMachine,
    snapshot: &ManagedObjectReference,
    key: i32,
    capacity: u64,
    change_id: &str,
) -> Result<(Vec<(u64, u64)>, usize), Error> {
    let (mut areas, mut pages, mut offset) = (Vec::new(), 0, 0u64);
    while offset < capacity {
        let info = vm
            .query_changed_disk_areas(Some(snapshot), key, offset as i64, change_id)
            .await?;
        let (start, length) = (info.start_offset as u64, info.length as u64);
        assert_eq!(start, offset, "{info:?}");
        assert!(length > 0 && start + length <= capacity, "{info:?}");
        for a in info.changed_area.unwrap_or_default() {
            let (s, l) = (a.start as u64, a.length as u64);
            assert!(
                l > 0 && s >= start && s + l <= start + length,
                "{a:?} in {start}+{length}"
            );
            areas.push((s, l));
        }
        offset = start + length;
        pages += 1;
    }
    Ok((areas, pages))
}

/// Whether the areas cover every byte of `[offset, offset + len)`.
fn covers(areas: &[(u64, u64)], offset: u64, len: u64) -> bool {
    let mut pos = offset;
    while pos < offset + len {
        match areas.iter().find(|&&(s, l)| s <= pos && pos < s + l) {
            Some(&(s, l)) => pos = s + l,
            None => return false,
        }
    }
    true
}

/// The 64 KiB grains `[offset, offset + len)` touches.
fn grains(offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
    offset / GRAIN..=(offset + len - 1) / GRAIN
}

/// The first `len` bytes of a datastore file through the file service (`/folder`) with a
/// generic service ticket; the datacenter and datastore names come from the inventory.
async fn read_with_ticket(
    client: &Arc<Client>,
    sim: &Simulator,
    vm: &VirtualMachine,
    datastore: &str,
    path: &str,
    len: usize,
) -> Vec<u8> {
    let folder = vm.parent().await.unwrap().expect("the VM's folder");
    let dc = Folder::new(client.clone(), &folder.value)
        .parent()
        .await
        .unwrap()
        .expect("the folder's datacenter");
    assert!(matches!(dc.r#type, MoTypesEnum::Datacenter), "{dc:?}");
    let dc_name = Datacenter::new(client.clone(), &dc.value)
        .name()
        .await
        .unwrap();
    let ds = Datastore::new(client.clone(), datastore);
    let ds_name = ds.name().await.unwrap();
    let summary = ds.summary().await.expect("DatastoreSummary");
    assert!(
        summary.url.starts_with("ds:///vmfs/volumes/"),
        "{summary:?}"
    );
    let url = format!(
        "https://{}/folder/{path}?dcPath={dc_name}&dsName={ds_name}",
        sim.addr()
    );
    let spec = SessionManagerHttpServiceRequestSpec {
        method: Some("httpGet".into()),
        url: url.clone(),
    };
    let sm = client.service_content().session_manager.clone().unwrap();
    let ticket = SessionManager::new(client.clone(), &sm.value)
        .acquire_generic_service_ticket(&spec)
        .await
        .expect("AcquireGenericServiceTicket");
    let resp = http_client(sim)
        .get(&url)
        .header("Cookie", format!("vmware_cgi_ticket={}", ticket.id))
        .header("Range", format!("bytes=0-{}", len - 1))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 206);
    resp.bytes().await.unwrap().to_vec()
}

async fn create_snapshot(
    client: &Arc<Client>,
    vm: &VirtualMachine,
    name: &str,
) -> ManagedObjectReference {
    let quiesce = VirtualMachineGuestQuiesceSpec { timeout: Some(5) };
    let task = vm
        .create_snapshot_ex_task(name, Some("vim_rs interop"), false, Some(&quiesce))
        .await
        .expect("CreateSnapshotEx_Task");
    let snap = task_result_moref(wait_task(client, &task).await);
    assert!(
        matches!(snap.r#type, MoTypesEnum::VirtualMachineSnapshot),
        "{snap:?}"
    );
    snap
}

async fn remove_snapshot(client: &Arc<Client>, snap: &ManagedObjectReference, children: bool) {
    let task = VirtualMachineSnapshot::new(client.clone(), &snap.value)
        .remove_snapshot_task(children, Some(true))
        .await
        .expect("RemoveSnapshot_Task");
    let info = wait_task(client, &task).await;
    assert!(matches!(info.state, TaskInfoStateEnum::Success), "{info:?}");
    assert!(info.result.is_none(), "{info:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_cycle_through_vim_rs() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::start(SimConfig::for_tests(dir.path()))
        .await
        .unwrap();
    let vm_id = sim.vm();
    let (d0, d1) = (sim.disks()[0], sim.disks()[1]);

    // Hello, the service content, Login; the session header rides on every later call.
    let client = connect(&sim, sim.password())
        .await
        .expect("vim_rs connects");
    assert_eq!(client.api_release(), sim.release());
    let content = client.service_content();
    assert_eq!(content.about.api_type, "VirtualCenter");
    assert_eq!(content.about.api_version, sim.release());
    let sm = content.session_manager.as_ref().expect("a SessionManager");
    let session = SessionManager::new(client.clone(), &sm.value)
        .current_session()
        .await
        .expect("currentSession")
        .expect("a live session");
    assert_eq!(session.user_name, sim.user());

    // The VM by instance UUID (any case), then its configuration.
    let search = content.search_index.as_ref().expect("a SearchIndex");
    let found = SearchIndex::new(client.clone(), &search.value)
        .find_by_uuid(
            None,
            &sim.vm_instance_uuid().to_uppercase(),
            true,
            Some(true),
        )
        .await
        .expect("FindByUuid")
        .expect("the VM is found");
    assert!(matches!(found.r#type, MoTypesEnum::VirtualMachine));
    assert_eq!(found.value, vm_id);
    let vm = VirtualMachine::new(client.clone(), &found.value);
    let config = vm.config().await.expect("config").expect("a config");
    assert_eq!(
        config.instance_uuid.as_deref(),
        Some(&*sim.vm_instance_uuid())
    );
    assert_eq!(config.change_tracking_enabled, Some(true));
    let live = disks(&config);
    let keys: Vec<(i32, u64)> = live.iter().map(|d| (d.key, d.capacity)).collect();
    assert_eq!(keys, sim.disks());
    assert_eq!(live[0].file_name, "[ds1] testvm/testvm.vmdk");
    assert_eq!(live[1].file_name, "[ds1] testvm/testvm_1.vmdk");
    assert!(live
        .iter()
        .all(|d| d.change_id.is_some() && d.parent_file_name.is_none()));

    // Guest writes, then the full backup's snapshot and its allocated areas ("*").
    sim.write(vm_id, d0.0, 0, &[0xa5; 4096]).unwrap();
    let tail = d1.1 - 1000;
    sim.write(vm_id, d1.0, tail, &[0x5a; 1000]).unwrap();
    let base = create_snapshot(&client, &vm, "base").await;
    assert_eq!(sim.snapshots(vm_id), [base.value.as_str()]);
    let base_config = VirtualMachineSnapshot::new(client.clone(), &base.value)
        .config()
        .await
        .expect("the snapshot's config");
    let frozen = disks(&base_config);
    assert_eq!(frozen[0].file_name, "[ds1] testvm/testvm.vmdk");
    // The frozen flat extent, read as a backup's data plane does.
    let ds = frozen[0]
        .datastore
        .as_deref()
        .expect("the disk's datastore");
    let data = read_with_ticket(&client, &sim, &vm, ds, "testvm/testvm-flat.vmdk", 4096).await;
    assert!(data == [0xa5; 4096], "the frozen extent differs");
    let live = disks(&vm.config().await.unwrap().unwrap());
    assert_eq!(live[0].file_name, "[ds1] testvm/testvm-000001.vmdk");
    assert_eq!(
        live[0].parent_file_name.as_deref(),
        Some("[ds1] testvm/testvm.vmdk")
    );

    let (all0, pages) = changed_areas(&vm, &base, d0.0, d0.1, "*").await.unwrap();
    assert!(covers(&all0, 0, 4096), "{all0:?}");
    assert_eq!(all0.iter().map(|a| a.1).sum::<u64>(), GRAIN);
    assert_eq!(pages, 4, "4 MiB in pages of at most 1 MiB");
    let (all1, pages) = changed_areas(&vm, &base, d1.0, d1.1, "*").await.unwrap();
    assert!(covers(&all1, tail, 1000), "{all1:?}");
    assert_eq!(
        all1.last().map(|&(s, l)| s + l),
        Some(d1.1),
        "clipped to the capacity"
    );
    assert_eq!(pages, 5, "4 MiB + 37 KiB in pages of at most 1 MiB");

    // Incremental: writes after the base, the next snapshot, the areas since the base's id.
    let base_id = change_id(&base_config, d0.0);
    let writes: [(u64, u64); 9] = [
        (GRAIN - 10, 20),
        // Four more separate areas in the first MiB: that page ends by area count.
        (3 * GRAIN + 1, 1),
        (5 * GRAIN, 1),
        (7 * GRAIN, GRAIN),
        (9 * GRAIN + 100, 50),
        (1 << 20, 3 * GRAIN),
        ((2 << 20) + 7, 4096),
        ((3 << 20) + GRAIN / 2, 100),
        (d0.1 - 1, 1),
    ];
    for &(offset, len) in &writes {
        sim.write(vm_id, d0.0, offset, &vec![0x11; len as usize])
            .unwrap();
    }
    let incr = create_snapshot(&client, &vm, "incr").await;
    let incr_config = VirtualMachineSnapshot::new(client.clone(), &incr.value)
        .config()
        .await
        .unwrap();
    assert_ne!(change_id(&incr_config, d0.0), base_id);
    let (areas, pages) = changed_areas(&vm, &incr, d0.0, d0.1, &base_id)
        .await
        .unwrap();
    let mut touched: Vec<u64> = writes.iter().flat_map(|&(o, l)| grains(o, l)).collect();
    touched.sort_unstable();
    touched.dedup();
    for &(offset, len) in &writes {
        assert!(
            covers(&areas, offset, len),
            "{offset}+{len} not in {areas:?}"
        );
    }
    assert_eq!(
        areas.iter().map(|a| a.1).sum::<u64>(),
        touched.len() as u64 * GRAIN
    );
    assert!(
        pages > 4,
        "paged by area count as well as by bytes: {pages}"
    );

    // The base goes; the incremental snapshot stays, now the root of the tree.
    remove_snapshot(&client, &base, false).await;
    assert_eq!(sim.snapshots(vm_id), [incr.value.as_str()]);
    let tree = vm.snapshot().await.unwrap().expect("a snapshot tree");
    assert_eq!(
        tree.current_snapshot.as_ref().map(|s| &*s.value),
        Some(&*incr.value)
    );
    assert_eq!(tree.root_snapshot_list.len(), 1);
    assert_eq!(tree.root_snapshot_list[0].name, "incr");

    // After a CBT reset an older change id is a FileFault naming the disk.
    let incr_id = change_id(&incr_config, d0.0);
    sim.reset_cbt(vm_id, d0.0).unwrap();
    sim.write(vm_id, d0.0, 0, b"x").unwrap();
    let after = create_snapshot(&client, &vm, "after-reset").await;
    let err = changed_areas(&vm, &after, d0.0, d0.1, &incr_id)
        .await
        .expect_err("a change id from before the reset");
    let fault = method_fault(&err);
    assert_eq!(fault.type_, Some(StructType::FileFault), "{fault:?}");
    assert_eq!(fault_field(fault, "file"), "[ds1] testvm/testvm.vmdk");

    // Removing the older snapshot with its children leaves none.
    remove_snapshot(&client, &incr, true).await;
    assert!(sim.snapshots(vm_id).is_empty());
    assert!(vm.snapshot().await.unwrap().is_none());

    // Logout; the closed client's calls are then unauthenticated.
    client.close().await.expect("Logout");
    assert_eq!(sim.calls("Logout"), 1);
    let err = vm.name().await.expect_err("a call after Logout");
    assert_eq!(method_fault(&err).type_, Some(StructType::NotAuthenticated));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vim_rs_decodes_the_simulators_faults() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::start(SimConfig::for_tests(dir.path()))
        .await
        .unwrap();
    let vm_id = sim.vm();
    let key = sim.disks()[0].0;

    let err = connect(&sim, "not the password")
        .await
        .map(|_| ())
        .expect_err("a wrong password");
    assert_eq!(method_fault(&err).type_, Some(StructType::InvalidLogin));

    let client = connect(&sim, sim.password()).await.unwrap();
    let search = client.service_content().search_index.clone().unwrap();
    let missing = SearchIndex::new(client.clone(), &search.value)
        .find_by_uuid(
            None,
            "00000000-0000-0000-0000-000000000000",
            true,
            Some(true),
        )
        .await
        .expect("FindByUuid");
    assert!(missing.is_none(), "{missing:?}");

    // A task that fails: TaskInfo.error is the fault.
    let vm = VirtualMachine::new(client.clone(), vm_id);
    sim.fail_next("CreateSnapshotEx_Task", "FileFault");
    let task = vm
        .create_snapshot_ex_task("doomed", None, false, None)
        .await
        .unwrap();
    let info = wait_task(&client, &task).await;
    assert!(matches!(info.state, TaskInfoStateEnum::Error), "{info:?}");
    let fault = info.error.as_ref().expect("TaskInfo.error");
    assert_eq!(fault.type_, Some(StructType::FileFault), "{fault:?}");
    assert!(sim.snapshots(vm_id).is_empty());

    // A malformed change id: InvalidArgument naming the property.
    let snap = sim.take_snapshot(vm_id, "s").unwrap();
    let snap = ManagedObjectReference {
        r#type: MoTypesEnum::VirtualMachineSnapshot,
        value: snap,
    };
    let err = vm
        .query_changed_disk_areas(Some(&snap), key, 0, "not a change id")
        .await
        .expect_err("a malformed change id");
    let fault = method_fault(&err);
    assert_eq!(fault.type_, Some(StructType::InvalidArgument), "{fault:?}");
    assert_eq!(fault_field(fault, "invalidProperty"), "changeId");

    client.close().await.unwrap();
}
