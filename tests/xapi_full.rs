//! Full exports from XenServer read only the blocks the snapshot's VHD allocates: its NBD
//! server has no block status, so without the allocation table of `GET /export_raw_vdi
//! ?format=vhd` every byte of the disk, zeros included, would cross the wire.

mod common;
#[path = "xapi_env/mod.rs"]
mod xapi_env;

use common::*;
use xapi_env::*;

/// A 1 GiB disk with 5% of its 2 MiB blocks written: the full export reads at most those
/// blocks over NBD, and restores byte-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_export_reads_only_allocated_blocks() {
    const GIB: u64 = 1 << 30;
    const BLOCK: u64 = 2 << 20;
    let e = env_with(|c| c.disk_size = GIB + 512).await;
    let vdi = e.sim.vdi_uuid().to_string();
    // 26 of the 513 blocks (5%), spread over the disk, each written partly and at odd offsets.
    let blocks: Vec<u64> = (0..26u64).map(|i| i * 19 + 3).collect();
    for &b in &blocks {
        let data: Vec<u8> = (0..70_000u32).map(|i| (i as u8) ^ (b as u8)).collect();
        e.sim
            .write(&vdi, b * BLOCK + 4096 + b * 512, &data)
            .unwrap();
    }
    // And the last, partial block.
    e.sim.write(&vdi, GIB, &[7u8; 512]).unwrap();
    let before = e.sim.nbd().faults.bytes_read();
    let full = e.dir.join("full.cbts");
    let o = ok(e
        .export(&full, &["--state", p(&e.state()), "--json", "-v"])
        .await);
    let read = e.sim.nbd().faults.bytes_read() - before;
    let allowed = (blocks.len() as u64 + 1) * BLOCK;
    assert!(
        read > 0 && read <= allowed,
        "read {read} bytes over NBD, at most {allowed} expected"
    );
    let json = json_summary(&o);
    assert_eq!(json["bytes_read"].as_u64(), Some(read));
    assert!(
        stderr(&o).contains("reading only the blocks the snapshot's VHD allocates"),
        "{}",
        stderr(&o)
    );
    let restored = e.dir.join("restored.raw");
    ok(run(&["restore", "--to", p(&restored), p(&full)]));
    assert_same(&restored, &e.live_image());
}

/// Without an allocation map (the VHD export fails), the full export reads the whole disk
/// and says so: the map only ever removes reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_vhd_export_the_whole_disk_is_read() {
    let e = env().await;
    e.guest_writes(1);
    e.sim
        .fail_next("GET /export_raw_vdi", "INTERNAL_ERROR", &["no vhd"], None);
    let before = e.sim.nbd().faults.bytes_read();
    let full = e.dir.join("full.cbts");
    let o = ok(e.export(&full, &["--state", p(&e.state())]).await);
    assert!(
        stderr(&o).contains("reading the whole disk"),
        "{}",
        stderr(&o)
    );
    assert_eq!(e.sim.nbd().faults.bytes_read() - before, SIZE);
    let restored = e.dir.join("restored.raw");
    ok(run(&["restore", "--to", p(&restored), p(&full)]));
    assert_same(&restored, &e.live_image());
}
