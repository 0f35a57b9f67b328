//! QueryChangedDiskAreas over HTTPS: paging, `*`, incrementals, CBT resets.

mod common;

use cbtstream_vsphere_sim::{SimConfig, Simulator, GRAIN};
use common::{covered, Client};
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

async fn change_id(c: &Client, token: &str, snap: &str, key: i32) -> String {
    let sc = c
        .get(
            Some(token),
            &format!("VirtualMachineSnapshot/{snap}/config"),
        )
        .await
        .json();
    sc["hardware"]["device"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["key"] == key)
        .unwrap()["backing"]["changeId"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Odd sizes and offsets, across grain borders, up to the last byte of the odd-sized disk.
fn writes(capacity: u64, round: u64) -> Vec<(u64, Vec<u8>)> {
    vec![
        (round * 7919 + 1, vec![0xa1; 3]),
        (GRAIN - 5 + round * 3 * GRAIN, vec![0xb2; 11]),
        (10 * GRAIN + 777 + round * 100, vec![0xc3; 70_001]),
        (capacity - 513 - round, vec![0xd4; 513]),
    ]
}

#[tokio::test]
async fn paged_answers_cover_every_written_byte_and_star_only_allocated_areas() {
    let (_dir, sim, c, token) = start().await;
    let (key, capacity) = sim.disks()[1];
    assert_ne!(capacity % GRAIN, 0);
    let first = writes(capacity, 0);
    for (off, data) in &first {
        sim.write("vm-42", key, *off, data).unwrap();
    }
    let snap1 = c.snapshot(&token, "vm-42", "full").await;
    let (areas, pages) = c
        .changed_areas(&token, "vm-42", &snap1, key, "*", capacity)
        .await
        .unwrap();
    assert!(pages > 1, "4 areas or 1 MiB per page: several pages");
    for (off, data) in &first {
        assert!(covered(&areas, *off, data.len() as u64), "{off} missed");
    }
    // Allocated only: every area is within a grain that was written.
    let written_grains: Vec<u64> = first
        .iter()
        .flat_map(|(o, d)| (o / GRAIN)..=((o + d.len() as u64 - 1) / GRAIN))
        .collect();
    for &(s, l) in &areas {
        for g in (s / GRAIN)..=((s + l - 1) / GRAIN) {
            assert!(written_grains.contains(&g), "area {s}+{l} is not allocated");
        }
    }
    let areas_end = areas.iter().map(|(s, l)| s + l).max().unwrap();
    assert_eq!(
        areas_end, capacity,
        "the last area is clipped to the odd capacity"
    );
    let base = change_id(&c, &token, &snap1, key).await;
    assert_eq!(c.remove_snapshot(&token, &snap1).await["state"], "success");

    // Three incrementals: each reports the writes since the previous point, and not the
    // writes made after its own snapshot.
    let mut base = base;
    for round in 1..=3u64 {
        let w = writes(capacity, round);
        for (off, data) in &w {
            sim.write("vm-42", key, *off, data).unwrap();
        }
        let snap = c.snapshot(&token, "vm-42", "incr").await;
        sim.write("vm-42", key, 3 * GRAIN * 10 + 5, b"after the snapshot")
            .unwrap();
        let (areas, _) = c
            .changed_areas(&token, "vm-42", &snap, key, &base, capacity)
            .await
            .unwrap();
        for (off, data) in &w {
            assert!(
                covered(&areas, *off, data.len() as u64),
                "round {round}: {off} missed"
            );
        }
        if round == 1 {
            assert!(
                !covered(&areas, 3 * GRAIN * 10 + 5, 1),
                "a write after the snapshot is not part of it"
            );
        }
        base = change_id(&c, &token, &snap, key).await;
        assert_eq!(c.remove_snapshot(&token, &snap).await["state"], "success");
    }
}

#[tokio::test]
async fn an_unchanged_disk_has_no_changed_areas_and_the_end_offset_is_an_empty_page() {
    let (_dir, sim, c, token) = start().await;
    let (key, capacity) = sim.disks()[0];
    let snap1 = c.snapshot(&token, "vm-42", "a").await;
    let id1 = change_id(&c, &token, &snap1, key).await;
    c.remove_snapshot(&token, &snap1).await;
    let snap2 = c.snapshot(&token, "vm-42", "b").await;
    let (areas, _) = c
        .changed_areas(&token, "vm-42", &snap2, key, &id1, capacity)
        .await
        .unwrap();
    assert!(areas.is_empty(), "{areas:?}");
    let r = c
        .post(
            Some(&token),
            "VirtualMachine/vm-42/QueryChangedDiskAreas",
            json!({"snapshot": {"type": "VirtualMachineSnapshot", "value": snap2}, "deviceKey": key,
                   "startOffset": capacity, "changeId": id1}),
        )
        .await;
    assert_eq!(r.json()["length"], 0);
}

async fn qcda(c: &Client, token: &str, body: Value) -> Value {
    let r = c
        .post(
            Some(token),
            "VirtualMachine/vm-42/QueryChangedDiskAreas",
            body,
        )
        .await;
    assert_eq!(r.status, 500, "{}", r.text());
    r.json()
}

#[tokio::test]
async fn a_change_id_from_before_a_cbt_reset_is_refused_with_a_file_fault() {
    let (_dir, sim, c, token) = start().await;
    let (key, capacity) = sim.disks()[0];
    let snap1 = c.snapshot(&token, "vm-42", "full").await;
    let old = change_id(&c, &token, &snap1, key).await;
    c.remove_snapshot(&token, &snap1).await;
    let r = c
        .sim(&token, "reset_cbt", json!({"vm": "vm-42", "disk": key}))
        .await;
    assert_eq!(r.status, 204, "{}", r.text());
    sim.write("vm-42", key, 0, b"x").unwrap();
    let snap2 = c.snapshot(&token, "vm-42", "incr").await;
    let new = change_id(&c, &token, &snap2, key).await;
    assert_ne!(
        old.rsplit_once('/').unwrap().0,
        new.rsplit_once('/').unwrap().0
    );

    let snap = json!({"_typeName": "ManagedObjectReference", "type": "VirtualMachineSnapshot", "value": snap2});
    let f = qcda(
        &c,
        &token,
        json!({"snapshot": snap, "deviceKey": key, "startOffset": 0, "changeId": old}),
    )
    .await;
    assert_eq!(f["_typeName"], "FileFault");
    assert_eq!(f["file"], "[ds1] testvm/testvm.vmdk");
    assert!(f["faultMessage"][0]["message"].is_string());
    // The other disk was not reset: its old change id still works.
    // Malformed ids, offsets past the end, non-disks, unknown snapshots: InvalidArgument/NotFound.
    let f = qcda(
        &c,
        &token,
        json!({"snapshot": snap, "deviceKey": key, "startOffset": 0, "changeId": "garbage"}),
    )
    .await;
    assert_eq!(
        (f["_typeName"].clone(), f["invalidProperty"].clone()),
        (json!("InvalidArgument"), json!("changeId"))
    );
    let f = qcda(
        &c,
        &token,
        json!({"snapshot": snap, "deviceKey": key, "startOffset": capacity + 1, "changeId": "*"}),
    )
    .await;
    assert_eq!(f["invalidProperty"], "startOffset");
    let f = qcda(
        &c,
        &token,
        json!({"snapshot": snap, "deviceKey": 4000, "startOffset": 0, "changeId": "*"}),
    )
    .await;
    assert_eq!(f["invalidProperty"], "deviceKey");
    let f = qcda(&c, &token, json!({"snapshot": {"type": "VirtualMachineSnapshot", "value": "snapshot-1"}, "deviceKey": key, "startOffset": 0, "changeId": "*"})).await;
    assert_eq!(f["_typeName"], "NotFound");
    let f = qcda(
        &c,
        &token,
        json!({"deviceKey": key, "startOffset": 0, "changeId": "*"}),
    )
    .await;
    assert_eq!(f["invalidProperty"], "snapshot");

    // `*` and the new id work after the reset.
    let (areas, _) = c
        .changed_areas(&token, "vm-42", &snap2, key, "*", capacity)
        .await
        .unwrap();
    assert_eq!(areas, vec![(0, GRAIN)]);
}

#[tokio::test]
async fn a_grown_disk_reports_its_new_capacity_and_tracking_goes_on() {
    let (_dir, sim, c, token) = start().await;
    let (key, capacity) = sim.disks()[0];
    let snap = c.snapshot(&token, "vm-42", "full").await;
    let base = change_id(&c, &token, &snap, key).await;
    let r = c
        .sim(
            &token,
            "resize",
            json!({"vm": "vm-42", "disk": key, "size": capacity * 2}),
        )
        .await;
    assert_eq!(r.status, 400, "not with a snapshot: {}", r.text());
    c.remove_snapshot(&token, &snap).await;
    let r = c
        .sim(
            &token,
            "resize",
            json!({"vm": "vm-42", "disk": key, "size": capacity / 2}),
        )
        .await;
    assert_eq!(r.status, 400, "never shrinks");
    let r = c
        .sim(
            &token,
            "resize",
            json!({"vm": "vm-42", "disk": key, "size": capacity + 1024}),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.text());
    sim.write("vm-42", key, capacity, b"past the old end")
        .unwrap();
    let snap = c.snapshot(&token, "vm-42", "incr").await;
    let sc = c
        .get(
            Some(&token),
            &format!("VirtualMachineSnapshot/{snap}/config"),
        )
        .await
        .json();
    let disk = sc["hardware"]["device"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["key"] == key)
        .unwrap()
        .clone();
    assert_eq!(disk["capacityInBytes"].as_u64(), Some(capacity + 1024));
    let (areas, _) = c
        .changed_areas(&token, "vm-42", &snap, key, &base, capacity + 1024)
        .await
        .unwrap();
    assert!(covered(&areas, capacity, 16));
    assert_eq!(
        std::fs::metadata(sim.data_dir().join("testvm/testvm-flat.vmdk"))
            .unwrap()
            .len(),
        capacity + 1024
    );
}
