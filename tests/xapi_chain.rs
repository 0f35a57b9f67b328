//! The XenServer flow end to end against the simulator: a full export and incrementals with
//! guest writes in between, each point restored and compared byte for byte; after every run
//! exactly one snapshot of the VDI remains, of type cbt_metadata. And the failure paths: each
//! leaves no extra snapshot, keeps the state and the old base, and the next run succeeds.

mod common;
#[path = "xapi_env/mod.rs"]
mod xapi_env;

use cbtstream_proto::xmlrpc::Value;
use common::*;
use std::path::Path;
use xapi_env::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_then_three_incrementals() {
    let e = env().await;
    e.guest_writes(1);
    let restored = e.dir.join("restored.raw");
    let state = e.state();
    let full = e.dir.join("full.cbts");
    let o = ok(e.export(&full, &["--state", p(&state), "-vv"]).await);
    // Secrets never reach the log, even at -vv.
    let log = stderr(&o);
    assert!(!log.contains(e.sim.password()), "password in the log");
    assert!(!log.contains("session_id="), "export name in the log");
    assert!(!log.contains("OpaqueRef:"), "a reference in the log: {log}");
    ok(run(&["restore", "--to", p(&restored), p(&full)]));
    assert_same(&restored, &e.live_image());
    let snaps = e.snapshots();
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert_eq!(snaps[0].1, "cbt_metadata");
    assert_eq!(state_base(&state), snaps[0].0);
    assert!(!std::fs::read_to_string(&state)
        .unwrap()
        .contains(e.sim.password()));

    for i in 1..=3u8 {
        e.guest_writes(i + 1);
        let inc = e.dir.join(format!("inc{i}.cbts"));
        ok(e.export(&inc, &["--state", p(&state)]).await);
        ok(run(&["restore", "--to", p(&restored), p(&inc)]));
        assert_same(&restored, &e.live_image());
        let snaps = e.snapshots();
        assert_eq!(snaps.len(), 1, "after incremental {i}: {snaps:?}");
        assert_eq!(snaps[0].1, "cbt_metadata");
        assert_eq!(state_base(&state), snaps[0].0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_leave_the_chain_as_it_was() {
    let e = env().await;
    let state = e.state();
    let restored = e.dir.join("restored.raw");
    let full = e.dir.join("full.cbts");
    ok(e.export(&full, &["--state", p(&state)]).await);
    ok(run(&["restore", "--to", p(&restored), p(&full)]));
    let base0 = state_base(&state);
    let state0 = std::fs::read(&state).unwrap();

    // The snapshot fails.
    e.guest_writes(7);
    e.sim.fail_next(
        "VDI.snapshot",
        "SR_BACKEND_FAILURE_44",
        &["", "no space", ""],
        Some(1),
    );
    let out = e.dir.join("x.cbts");
    let o = e.export(&out, &["--state", p(&state)]).await;
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert_eq!(std::fs::read(&state).unwrap(), state0);
    assert_eq!(e.snapshots().len(), 1);

    // The chain is broken: a clear error, the new snapshot removed; --fallback-full works.
    e.sim.fail_next(
        "VDI.list_changed_blocks",
        "SR_BACKEND_FAILURE_460",
        &["", "Failed to calculate changed blocks for given VDIs. [opterr=Source and target VDI are unrelated]", ""],
        Some(1),
    );
    let o = e.export(&out, &["--state", p(&state)]).await;
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(stderr(&o).contains("--fallback-full"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&state).unwrap(), state0);
    assert_eq!(e.snapshots().len(), 1, "{:?}", e.snapshots());
    assert!(!out.exists());

    // data_destroy answers VDI_IN_USE a few times: retried, and it succeeds.
    e.sim.fail_next(
        "VDI.data_destroy",
        "VDI_IN_USE",
        &["OpaqueRef:x", "data_destroy"],
        Some(3),
    );
    let inc = e.dir.join("inc1.cbts");
    ok(e.export(&inc, &["--state", p(&state)]).await);
    ok(run(&["restore", "--to", p(&restored), p(&inc)]));
    assert_same(&restored, &e.live_image());
    let snaps = e.snapshots();
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert_eq!(snaps[0].1, "cbt_metadata");
    assert_ne!(state_base(&state), base0);

    // data_destroy fails for good: the export still succeeds, the full snapshot is the base.
    e.guest_writes(8);
    e.sim.fail_next(
        "VDI.data_destroy",
        "SR_BACKEND_FAILURE_1",
        &["", "broken", ""],
        None,
    );
    let inc2 = e.dir.join("inc2.cbts");
    let o = ok(e.export(&inc2, &["--state", p(&state)]).await);
    assert!(stderr(&o).contains("data_destroy failed"), "{}", stderr(&o));
    e.sim.clear_failures();
    ok(run(&["restore", "--to", p(&restored), p(&inc2)]));
    assert_same(&restored, &e.live_image());
    // And the next run works from that base.
    e.guest_writes(9);
    let inc3 = e.dir.join("inc3.cbts");
    ok(e.export(&inc3, &["--state", p(&state)]).await);
    ok(run(&["restore", "--to", p(&restored), p(&inc3)]));
    assert_same(&restored, &e.live_image());
    let snaps = e.snapshots();
    assert_eq!(snaps.len(), 1, "{snaps:?}");

    // The output pipe closes early: failure, state untouched, no snapshot left.
    let before = std::fs::read(&state).unwrap();
    let o = e
        .export(Path::new("/dev/full"), &["--state", p(&state)])
        .await;
    assert_eq!(code(&o), 5, "{}", stderr(&o));
    assert_eq!(std::fs::read(&state).unwrap(), before);
    assert_eq!(e.snapshots().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_removes_what_a_killed_run_left() {
    let e = env().await;
    let state = e.state();
    ok(e.export(&e.dir.join("full.cbts"), &["--state", p(&state)])
        .await);
    // A killed run leaves a tagged snapshot: make one the way the flow does.
    e.host_snapshot(true);
    assert_eq!(e.snapshots().len(), 2);
    let o = ok(e.gc(&["--state", p(&state), "--dry-run"]).await);
    assert!(String::from_utf8_lossy(&o.stdout).contains("would remove"));
    assert_eq!(e.snapshots().len(), 2);
    let o = ok(e.gc(&["--state", p(&state), "-vv"]).await);
    let log = stderr(&o);
    assert!(
        !log.contains(e.sim.password()) && !log.contains("OpaqueRef:"),
        "secret in the gc log: {log}"
    );
    let snaps = e.snapshots();
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0].0, state_base(&state));
    // The chain still works.
    e.guest_writes(3);
    ok(e.export(&e.dir.join("inc.cbts"), &["--state", p(&state)])
        .await);
}

/// The disk grows between two backups: the incremental carries the new size and restore
/// grows the image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_grows_between_backups() {
    let e = env().await;
    let state = e.state();
    let restored = e.dir.join("restored.raw");
    ok(e.export(&e.dir.join("full.cbts"), &["--state", p(&state)])
        .await);
    ok(run(&[
        "restore",
        "--to",
        p(&restored),
        p(&e.dir.join("full.cbts")),
    ]));
    let vdi: Value = e.sim.vdi_ref_of(e.sim.vdi_uuid()).unwrap().into();
    let bigger = SIZE + (1 << 20) + 512;
    e.sim
        .call_local("VDI.resize", &[login(&e), vdi, bigger.to_string().into()])
        .unwrap();
    e.sim
        .write(e.sim.vdi_uuid(), bigger - 4096, &[0x5a; 4096])
        .unwrap();
    let inc = e.dir.join("inc.cbts");
    ok(e.export(&inc, &["--state", p(&state)]).await);
    ok(run(&["restore", "--to", p(&restored), p(&inc)]));
    assert_eq!(std::fs::metadata(&restored).unwrap().len(), bigger);
    assert_same(&restored, &e.live_image());
}

/// HOST_IS_SLAVE: the export follows the redirect to the pool master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_host_is_slave_to_the_master() {
    let e = env_with(|c| c.slave_listener = Some("127.0.0.1:0".parse().unwrap())).await;
    let slave = e.sim.slave_url().unwrap();
    let state = e.state();
    ok(
        e.export_via(&slave, &e.dir.join("full.cbts"), &["--state", p(&state)])
            .await,
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    assert_eq!(
        v["host"].as_str().unwrap().trim_end_matches('/'),
        e.sim.url().trim_end_matches('/')
    );
}

/// CBT off: a clear error with a hint; --enable-cbt turns it on and does a full export.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cbt_off_needs_enable_cbt() {
    let e = env_with(|c| c.cbt_enabled = false).await;
    let state = e.state();
    let out = e.dir.join("full.cbts");
    let o = e.export(&out, &["--state", p(&state)]).await;
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(stderr(&o).contains("--enable-cbt"), "{}", stderr(&o));
    assert!(e.snapshots().is_empty());
    ok(e.export(&out, &["--state", p(&state), "--enable-cbt"])
        .await);
    let restored = e.dir.join("r.raw");
    ok(run(&["restore", "--to", p(&restored), p(&out)]));
    assert_same(&restored, &e.live_image());
}

/// No network with the nbd purpose: a clear error, no snapshot left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_nbd_network_is_a_clear_error() {
    let e = env().await;
    e.sim.set_nbd_available(false);
    let o = e
        .export(&e.dir.join("full.cbts"), &["--state", p(&e.state())])
        .await;
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(stderr(&o).contains("purpose"), "{}", stderr(&o));
    assert!(e.snapshots().is_empty(), "{:?}", e.snapshots());
    assert!(!e.state().exists());
}

/// SIGTERM mid-export: exit 130, the snapshot removed, the state as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_export_removes_the_snapshot() {
    use cbtstream_testkit::xen_nbd::StallAt;
    let e = env().await;
    let state = e.state();
    ok(e.export(&e.dir.join("full.cbts"), &["--state", p(&state)])
        .await);
    let before = std::fs::read(&state).unwrap();
    e.guest_writes(4);
    let faults = e.sim.nbd().faults.clone();
    faults.stall(StallAt::Request(faults.requests() + 1));
    let out = e.dir.join("inc.cbts");
    let child = std::process::Command::new(BIN)
        .args([
            "export",
            "--xapi",
            &e.sim.url(),
            "--xapi-ca",
            p(e.sim.ca_path()),
            "--vdi",
            e.sim.vdi_uuid(),
        ])
        .args(["--state", p(&state), "-o", p(&out)])
        .env("XAPI_PASSWORD", e.sim.password())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let f = faults.clone();
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        f.wait_until(|f| f.stalls() == 1),
    )
    .await
    .expect("the export never reached the NBD server");
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let o = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(std::fs::read(&state).unwrap(), before);
    assert!(!out.exists());
    let snaps = e.snapshots();
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert_eq!(snaps[0].1, "cbt_metadata");
    // And the next run works.
    faults.release_stall();
    ok(e.export(&out, &["--state", p(&state)]).await);
}

/// The session expires in the middle of the export: the reads already under way finish, the
/// client logs in again for the commit, and the chain advances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expiring_mid_run_is_survived() {
    use cbtstream_testkit::xen_nbd::StallAt;
    let e = env().await;
    let state = e.state();
    let restored = e.dir.join("restored.raw");
    ok(e.export(&e.dir.join("full.cbts"), &["--state", p(&state)])
        .await);
    ok(run(&[
        "restore",
        "--to",
        p(&restored),
        p(&e.dir.join("full.cbts")),
    ]));
    e.guest_writes(5);
    let faults = e.sim.nbd().faults.clone();
    faults.stall(StallAt::Request(faults.requests() + 1));
    let out = e.dir.join("inc.cbts");
    let args = ["--state", p(&state), "--connections", "1"];
    let run_export = e.export(&out, &args);
    let expire = async {
        tokio::time::timeout(
            std::time::Duration::from_secs(30),
            faults.wait_until(|f| f.stalls() == 1),
        )
        .await
        .expect("the export never reached the NBD server");
        e.sim.expire_sessions();
        faults.release_stall();
    };
    let (o, ()) = tokio::join!(run_export, expire);
    ok(o);
    ok(run(&["restore", "--to", p(&restored), p(&out)]));
    assert_same(&restored, &e.live_image());
    let snaps = e.snapshots();
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert_eq!(snaps[0].1, "cbt_metadata");
}

/// The reader of the stream goes away (`| head -c 1000`): exit 5, the state as it was, no
/// snapshot left, and the next run succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_output_pipe_keeps_the_chain() {
    let e = env().await;
    let state = e.state();
    ok(e.export(&e.dir.join("full.cbts"), &["--state", p(&state)])
        .await);
    let before = std::fs::read(&state).unwrap();
    // Far more than a pipe holds, so the export must still be writing when `head` leaves.
    let noise: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    e.sim.write(e.sim.vdi_uuid(), 0, &noise).unwrap();
    let (url, ca, vdi, pw, st) = (
        e.sim.url(),
        e.sim.ca_path().to_path_buf(),
        e.sim.vdi_uuid().to_string(),
        e.sim.password().to_string(),
        state.clone(),
    );
    let status = tokio::task::spawn_blocking(move || {
        let script = format!(
            "{BIN} export --xapi {url} --xapi-ca {} --vdi {vdi} --state {} --compress none -o - | head -c 1000 > /dev/null; echo ${{PIPESTATUS[0]}}",
            p(&ca),
            p(&st)
        );
        let o = std::process::Command::new("bash").args(["-c", &script]).env("XAPI_PASSWORD", pw).output().unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    })
    .await
    .unwrap();
    assert_eq!(status, "5");
    assert_eq!(std::fs::read(&state).unwrap(), before);
    assert_eq!(e.snapshots().len(), 1, "{:?}", e.snapshots());
    ok(e.export(&e.dir.join("inc.cbts"), &["--state", p(&state)])
        .await);
}

/// The NBD connection drops in the middle of a read: the export reconnects (the session and
/// the export name are still good) and the stream is correct.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_connection_drop_is_survived() {
    let e = env().await;
    let state = e.state();
    let restored = e.dir.join("restored.raw");
    e.guest_writes(2);
    e.sim.nbd().faults.cut_next_read_after(1000);
    let full = e.dir.join("full.cbts");
    ok(e.export(&full, &["--state", p(&state)]).await);
    assert_eq!(e.sim.nbd().faults.cuts(), 1);
    ok(run(&["restore", "--to", p(&restored), p(&full)]));
    assert_same(&restored, &e.live_image());
}

/// cbtstream killed outright (SIGKILL) mid-export: the snapshot stays behind, the state and
/// the old base are untouched, the next run succeeds from the old base, and gc removes the
/// leftover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_leftover_is_collected() {
    use cbtstream_testkit::xen_nbd::StallAt;
    let e = env().await;
    let state = e.state();
    let restored = e.dir.join("restored.raw");
    ok(e.export(&e.dir.join("full.cbts"), &["--state", p(&state)])
        .await);
    ok(run(&[
        "restore",
        "--to",
        p(&restored),
        p(&e.dir.join("full.cbts")),
    ]));
    let before = std::fs::read(&state).unwrap();
    e.guest_writes(3);
    let faults = e.sim.nbd().faults.clone();
    faults.stall(StallAt::Request(faults.requests() + 1));
    let out = e.dir.join("killed.cbts");
    let mut child = std::process::Command::new(BIN)
        .args([
            "export",
            "--xapi",
            &e.sim.url(),
            "--xapi-ca",
            p(e.sim.ca_path()),
            "--vdi",
            e.sim.vdi_uuid(),
        ])
        .args(["--state", p(&state), "-o", p(&out)])
        .env("XAPI_PASSWORD", e.sim.password())
        .spawn()
        .unwrap();
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        faults.wait_until(|f| f.stalls() == 1),
    )
    .await
    .expect("the export never reached the NBD server");
    child.kill().unwrap();
    let _ = child.wait();
    faults.release_stall();
    assert_eq!(std::fs::read(&state).unwrap(), before);
    assert!(!out.exists(), "no output under the final name");
    // The partial output has no trailer: restore refuses it.
    let partial = e.dir.join("killed.cbts.partial");
    if partial.exists() {
        let o = run(&["inspect", p(&partial)]);
        assert_eq!(code(&o), 4);
    }
    assert_eq!(
        e.snapshots().len(),
        2,
        "the killed run's snapshot is left behind"
    );
    // The next run works from the old base, even with the leftover there.
    let inc = e.dir.join("inc.cbts");
    ok(e.export(&inc, &["--state", p(&state)]).await);
    ok(run(&["restore", "--to", p(&restored), p(&inc)]));
    assert_same(&restored, &e.live_image());
    // gc removes the leftover and keeps the base.
    ok(e.gc(&["--state", p(&state)]).await);
    let snaps = e.snapshots();
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert_eq!(snaps[0].0, state_base(&state));
}

/// A broken chain with --fallback-full: a full export that starts a new chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_full_starts_a_new_chain() {
    let e = env().await;
    let state = e.state();
    ok(e.export(&e.dir.join("full.cbts"), &["--state", p(&state)])
        .await);
    e.guest_writes(2);
    e.sim.fail_next(
        "VDI.list_changed_blocks",
        "SR_BACKEND_FAILURE_460",
        &["", "Failed to calculate changed blocks for given VDIs. [opterr=Source and target VDI are unrelated]", ""],
        Some(1),
    );
    let out = e.dir.join("new-full.cbts");
    let o = ok(e
        .export(&out, &["--state", p(&state), "--fallback-full"])
        .await);
    assert!(stderr(&o).contains("--fallback-full"), "{}", stderr(&o));
    let o = ok(run(&["inspect", p(&out)]));
    assert!(String::from_utf8_lossy(&o.stdout).contains("full export"));
    // Restored onto a fresh image it is the whole disk.
    let restored = e.dir.join("fresh.raw");
    ok(run(&["restore", "--to", p(&restored), p(&out)]));
    assert_same(&restored, &e.live_image());
    let snaps = e.snapshots();
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert_eq!(state_base(&state), snaps[0].0);
}

/// --keep-bases 2 keeps the previous base on the host too, and no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_bases_keeps_older_bases() {
    let e = env().await;
    let state = e.state();
    for i in 0..3u8 {
        e.guest_writes(i);
        ok(e.export(
            &e.dir.join(format!("s{i}.cbts")),
            &["--state", p(&state), "--keep-bases", "2"],
        )
        .await);
    }
    let snaps = e.snapshots();
    assert_eq!(snaps.len(), 2, "{snaps:?}");
    assert!(snaps.iter().all(|s| s.1 == "cbt_metadata"));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    assert_eq!(v["older_bases"].as_array().unwrap().len(), 1);
}

/// The whole flow with real NBD servers behind get_nbd_info (qemu-nbd with extended headers
/// and structured replies, nbdkit with structured replies) instead of the XenServer profile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_through_real_nbd_servers() {
    use cbtstream_testkit::require_tools;
    use cbtstream_xapi_sim::NbdServerChoice;
    if !require_tools("chain_through_real_nbd_servers", &["qemu-nbd", "nbdkit"]) {
        return;
    }
    for choice in [NbdServerChoice::QemuNbd, NbdServerChoice::NbdKit] {
        let e = env_with(|c| c.nbd_server = choice).await;
        let state = e.state();
        let restored = e.dir.join("restored.raw");
        e.guest_writes(1);
        let full = e.dir.join("full.cbts");
        ok(e.export(&full, &["--state", p(&state)]).await);
        ok(run(&["restore", "--to", p(&restored), p(&full)]));
        assert_same(&restored, &e.live_image());
        e.guest_writes(2);
        let inc = e.dir.join("inc.cbts");
        ok(e.export(&inc, &["--state", p(&state)]).await);
        ok(run(&["restore", "--to", p(&restored), p(&inc)]));
        assert_same(&restored, &e.live_image());
        let snaps = e.snapshots();
        assert_eq!(snaps.len(), 1, "{choice:?}: {snaps:?}");
    }
}

/// Every command at -vv: the password, session references and NBD export names appear
/// nowhere: not in stdout (the stream included), stderr, or the state file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_leak() {
    let e = env().await;
    let state = e.state();
    let mut outputs: Vec<Vec<u8>> = Vec::new();
    e.guest_writes(1);
    let full = e.dir.join("full.cbts");
    let o = ok(e
        .export(&full, &["--state", p(&state), "-vv", "--json"])
        .await);
    outputs.extend([o.stdout, o.stderr, std::fs::read(&full).unwrap()]);
    e.guest_writes(2);
    let inc = e.dir.join("inc.cbts");
    let o = ok(e.export(&inc, &["--state", p(&state), "-vv"]).await);
    outputs.extend([o.stdout, o.stderr, std::fs::read(&inc).unwrap()]);
    // To stdout: the stream itself.
    e.guest_writes(3);
    let o = ok(e
        .export(Path::new("-"), &["--state", p(&state), "-vv"])
        .await);
    outputs.extend([o.stdout, o.stderr]);
    // The pending point it left, in the state file, then committed.
    outputs.push(std::fs::read(&state).unwrap());
    let o = ok(e.commit(&["--state", p(&state), "-vv"]).await);
    outputs.extend([o.stdout, o.stderr]);
    let o = ok(e.gc(&["--state", p(&state), "-vv", "--dry-run"]).await);
    outputs.extend([o.stdout, o.stderr]);
    let restored = e.dir.join("r.raw");
    for args in [
        vec!["restore", "-vv", "--to", p(&restored), p(&full), p(&inc)],
        vec!["inspect", "-vv", p(&inc)],
    ] {
        let o = ok(run(&args));
        outputs.extend([o.stdout, o.stderr]);
    }
    outputs.push(std::fs::read(&state).unwrap());
    outputs.push(std::fs::read(e.dir.join("r.raw.cbtstream")).unwrap());
    let password = e.sim.password().as_bytes().to_vec();
    for (i, out) in outputs.iter().enumerate() {
        let has = |needle: &[u8]| out.windows(needle.len()).any(|w| w == needle);
        assert!(!has(&password), "output {i} holds the password");
        assert!(!has(b"OpaqueRef:"), "output {i} holds a XenAPI reference");
        assert!(!has(b"session_id="), "output {i} holds an NBD export name");
    }
}
