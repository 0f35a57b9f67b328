use super::full::{new_stream_name, verify_stored};
use super::*;
use crate::repo::store::Store;
use crate::repo::upload::{self, Stored};
use crate::xen::point::{PointDisk, PointInfo};
use cbtstream_proto::stream::{checksum, Codec, Encoder, Header};

fn point(id: &str, base: Option<&str>, disks: &[(&str, Option<&str>)]) -> StoredPoint {
    StoredPoint {
        info: PointInfo {
            id: id.into(),
            vm: "vm".into(),
            name: "a vm".into(),
            time: "2026-11-30T00:00:00Z".into(),
            base: base.map(Into::into),
            disks: disks
                .iter()
                .enumerate()
                .map(|(slot, (disk, base))| PointDisk {
                    id: (*disk).into(),
                    slot: slot.to_string(),
                    size: 4096,
                    stream: format!("disk{slot}.cbts"),
                    sha256: String::new(),
                    base: base.map(Into::into),
                })
                .collect(),
            skipped: vec![],
        },
        files: vec![],
    }
}

/// p1 holds disk a; p2 adds disk b (a full stream) to a's incremental; p3 has two
/// incrementals.
fn points() -> Points {
    Points {
        points: vec![
            point("p1", None, &[("a", None)]),
            point("p2", Some("p1"), &[("a", Some("p1")), ("b", None)]),
            point("p3", Some("p2"), &[("a", Some("p2")), ("b", Some("p2"))]),
        ],
        incomplete: vec![],
    }
}

fn rewrites(keep: [bool; 3]) -> (Vec<String>, Vec<String>) {
    let decisions: Vec<Option<Keep>> = keep.iter().map(|&k| k.then_some(Keep::Last)).collect();
    let plan = plan("vm", &points(), &decisions).unwrap();
    (plan.rewrite, plan.delete)
}

#[test]
fn only_kept_points_whose_chain_loses_a_point_are_made_full() {
    assert_eq!(rewrites([true, true, true]), (vec![], vec![]));
    assert_eq!(
        rewrites([false, true, true]),
        (vec!["p2".into()], vec!["p1".into()])
    );
    // p3 needs p2 and p1; once p2 is full, p3 needs nothing that goes.
    assert_eq!(
        rewrites([false, false, true]),
        (vec!["p3".into()], vec!["p1".into(), "p2".into()])
    );
    assert_eq!(
        rewrites([true, false, true]),
        (vec!["p3".into()], vec!["p2".into()])
    );
    assert_eq!(rewrites([true, true, false]), (vec![], vec!["p3".into()]));
}

#[test]
fn a_broken_chain_is_refused_before_anything_happens() {
    let mut found = points();
    found.points.remove(0);
    let e = plan("vm", &found, &[None, Some(Keep::Newest)])
        .err()
        .unwrap();
    assert_eq!(e.exit_code(), Code::Integrity);
    assert!(e.to_string().contains("p1"), "{e}");
    let mut found = points();
    found.points[0].info.disks[0].stream = "../../x".into();
    let e = plan("vm", &found, &[None, None, Some(Keep::Newest)])
        .err()
        .unwrap();
    assert_eq!(e.exit_code(), Code::Integrity);
    assert!(e.to_string().contains("not a file name"), "{e}");
}

#[test]
fn points_are_deleted_before_the_points_they_need() {
    let found = points();
    let all = ["p1".to_string(), "p2".into(), "p3".into()];
    assert_eq!(deletion_order(&found, &all), ["p3", "p2", "p1"]);
    assert_eq!(deletion_order(&found, &all[..2]), ["p2", "p1"]);
}

#[test]
fn new_stream_names_avoid_every_file_of_the_point() {
    let dir = "vms/vm/points/p";
    let mut taken = BTreeSet::new();
    assert_eq!(
        new_stream_name("0", dir, &taken).unwrap(),
        "disk0.full.cbts"
    );
    taken.insert(format!("{dir}/disk0.full.cbts"));
    assert_eq!(
        new_stream_name("0", dir, &taken).unwrap(),
        "disk0.full1.cbts"
    );
    assert_eq!(new_stream_name("../x", dir, &taken), None);
}

fn full_stream(data: &[u8]) -> Vec<u8> {
    let h = Header {
        virtual_size: data.len() as u64,
        block_size: 4096,
        source_id: "a".into(),
        point_id: "snap".into(),
        incremental: false,
        base_id: None,
        created_unix_secs: 1_700_000_000,
        codec: Codec::None,
    };
    let (mut enc, mut out) = Encoder::new(&h).unwrap();
    let hdr = enc
        .data(0, data.len() as u64, Codec::None, checksum(data), data)
        .unwrap();
    out.extend_from_slice(&hdr);
    out.extend_from_slice(data);
    out.extend_from_slice(&enc.finish());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_stream_that_does_not_read_back_whole_fails_verification() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::Local(dir.path().to_path_buf());
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    let stream = full_stream(&data);
    let stored = Stored {
        sha256: upload::hex(ring::digest::digest(&ring::digest::SHA256, &stream).as_ref()),
        bytes: stream.len() as u64,
    };
    store.put("p/s.cbts", stream.clone()).await.unwrap();
    verify_stored(&store, "p/s.cbts", &stored, 4096)
        .await
        .unwrap();
    // Another disk size, another digest: refused.
    let e = verify_stored(&store, "p/s.cbts", &stored, 8192)
        .await
        .unwrap_err();
    assert_eq!(e.exit_code(), Code::Integrity, "{e}");
    let other = Stored {
        sha256: "0".repeat(64),
        ..stored.clone()
    };
    let e = verify_stored(&store, "p/s.cbts", &other, 4096)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("SHA-256"), "{e}");
    // A flipped byte in the record: its checksum fails.
    let mut bad = stream;
    let at = bad.len() - 2000;
    bad[at] ^= 1;
    store.put("p/s.cbts", bad).await.unwrap();
    let e = verify_stored(&store, "p/s.cbts", &stored, 4096)
        .await
        .unwrap_err();
    assert_eq!(e.exit_code(), Code::Integrity, "{e}");
    assert!(e.to_string().contains("p/s.cbts"), "{e}");
}
