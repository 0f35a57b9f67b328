//! `restore --xapi --vdi UUID --rollback STREAM...`: a VDI rolled back to a point of its own
//! chain writes only the blocks that changed since that point (list_changed_blocks from the
//! point's CBT metadata to a snapshot taken now).

mod common;
#[path = "xapi_env/mod.rs"]
mod xapi_env;

use cbtstream_proto::xmlrpc::Value;
use common::*;
use std::path::{Path, PathBuf};
use xapi_env::*;

const DISK: u64 = 64 << 20;

impl Env {
    /// `export --xapi ... --vdi VDI --state STATE -o OUT`.
    async fn export_vdi(&self, vdi: &str, state: &Path, out: &Path) -> std::process::Output {
        self.command(
            &["export", "--xapi", &self.sim.url()],
            false,
            &["--vdi", vdi, "--state", p(state), "-o", p(out)],
        )
        .await
    }

    async fn rollback(&self, vdi: &str, streams: &[&Path]) -> std::process::Output {
        let mut args = vec!["--vdi", vdi, "--rollback", "--json"];
        args.extend(streams.iter().map(|s| p(s)));
        self.command(&["restore", "--xapi", &self.sim.url()], false, &args)
            .await
    }
}

/// Writes `pattern` over `blocks` 64 KiB blocks starting at every `stride`-th block.
fn write_blocks(e: &Env, vdi: &str, first: u64, count: u64, stride: u64, seed: u8) {
    let data: Vec<u8> = (0..65536u32)
        .map(|i| (i as u8).wrapping_mul(13) ^ seed)
        .collect();
    for i in 0..count {
        e.sim
            .write(vdi, (first + i * stride) * 65536, &data)
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_writes_only_what_changed_since_the_point() {
    let e = env().await;
    let vdi = e.blank_vdi(DISK);
    let session = login(&e);
    let r: Value = e.sim.vdi_ref_of(&vdi).unwrap().into();
    e.sim.call_local("VDI.enable_cbt", &[session, r]).unwrap();
    let state = e.dir.join("chain.json");
    // The chain: a full and an incremental (the point to roll back to).
    write_blocks(&e, &vdi, 0, 200, 5, 1);
    let full = e.dir.join("full.cbts");
    ok(e.export_vdi(&vdi, &state, &full).await);
    write_blocks(&e, &vdi, 3, 100, 7, 2);
    let inc = e.dir.join("inc.cbts");
    ok(e.export_vdi(&vdi, &state, &inc).await);
    let at_point: PathBuf = e.dir.join("at-point.raw");
    ok(run(&["restore", "--to", p(&at_point), p(&full), p(&inc)]));
    assert_same(&at_point, &e.sim.vdi_path(&vdi).unwrap());

    // The guest changes 3% of the disk (30 of 1024 blocks), some of them zeroed.
    write_blocks(&e, &vdi, 11, 30, 31, 3);
    e.sim.write(&vdi, 5 * 65536, &[0u8; 65536]).unwrap();
    let imported = e.sim.bytes_imported();
    let o = ok(e.rollback(&vdi, &[&full, &inc]).await);
    assert_same(&e.sim.vdi_path(&vdi).unwrap(), &at_point);
    let sent = e.sim.bytes_imported() - imported;
    assert!(
        sent > 0 && sent <= 31 * 65536,
        "{sent} bytes written back for 31 changed blocks"
    );
    let json: serde_json::Value = serde_json::from_str(stderr(&o).lines().last().unwrap()).unwrap();
    assert_eq!(json["bytes_sent"].as_u64(), Some(sent));

    // The chain goes on from its base: the next incremental holds the rollback's writes.
    write_blocks(&e, &vdi, 500, 3, 1, 4);
    let inc2 = e.dir.join("inc2.cbts");
    ok(e.export_vdi(&vdi, &state, &inc2).await);
    ok(run(&["restore", "--to", p(&at_point), p(&inc2)]));
    assert_same(&at_point, &e.sim.vdi_path(&vdi).unwrap());
}

/// Refusals before anything is written: the point's CBT metadata gone, streams of another
/// disk, a chain without its full stream, a VDI attached to the running VM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_refusals() {
    let e = env().await;
    // The VM's own disk is attached to the running VM.
    let state = e.state();
    let full = e.dir.join("full.cbts");
    ok(e.export(&full, &["--state", p(&state)]).await);
    let o = e.rollback(e.sim.vdi_uuid(), &[&full]).await;
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("attached to the running VM"),
        "{}",
        stderr(&o)
    );

    let vdi = e.blank_vdi(DISK);
    let session = login(&e);
    let r: Value = e.sim.vdi_ref_of(&vdi).unwrap().into();
    e.sim.call_local("VDI.enable_cbt", &[session, r]).unwrap();
    let own_state = e.dir.join("own.json");
    let own_full = e.dir.join("own-full.cbts");
    ok(e.export_vdi(&vdi, &own_state, &own_full).await);
    write_blocks(&e, &vdi, 0, 4, 1, 9);
    let own_inc = e.dir.join("own-inc.cbts");
    ok(e.export_vdi(&vdi, &own_state, &own_inc).await);
    let imported = e.sim.bytes_imported();
    // Streams of another disk.
    let o = e.rollback(&vdi, &[&full]).await;
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    // No full stream first.
    let o = e.rollback(&vdi, &[&own_inc]).await;
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("from its full stream"),
        "{}",
        stderr(&o)
    );
    // The full stream's point: its snapshot was destroyed when the next point was
    // committed, so what changed since it is unknown.
    let o = e.rollback(&vdi, &[&own_full]).await;
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("no longer on the host"),
        "{}",
        stderr(&o)
    );
    assert_eq!(e.sim.bytes_imported(), imported, "something was written");
}
