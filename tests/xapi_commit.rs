//! When a point may become the chain's base, and who may touch a chain at the same time.
//! A stream to a pipe is durable only once its reader says so: such a point stays pending
//! until `cbtstream commit`, `--to-command` commits when its command exits 0, and a later
//! export drops a pending point that was never committed. Export, commit and gc of one state
//! file exclude each other. gc never removes what a chain still needs.

mod common;
#[path = "xapi_env/mod.rs"]
mod xapi_env;

use common::*;
use std::path::Path;
use xapi_env::*;

fn state_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `export -o - --state S > FILE` through bash, with `after` run after the export in the
/// same pipeline's shell (`&& cbtstream commit ...`, or nothing). Returns the export's exit
/// status as bash saw it.
async fn piped_export(e: &Env, state: &Path, reader: &str) -> i32 {
    let script = format!(
        "{BIN} export --xapi {} --xapi-ca {} --vdi {} --state {} -o - | {reader}; echo ${{PIPESTATUS[0]}} ${{PIPESTATUS[1]}}",
        e.sim.url(),
        p(e.sim.ca_path()),
        e.sim.vdi_uuid(),
        p(state),
    );
    let pw = e.sim.password().to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("bash")
            .args(["-c", &script])
            .env("XAPI_PASSWORD", pw)
            .env("SOURCE_DATE_EPOCH", "1795000000")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let export_status = text.split_whitespace().next().unwrap_or("?");
    export_status.parse().unwrap_or(-1)
}

/// A stream to stdout whose reader fails (remote disk full, ssh dropped): the point stays
/// pending, the committed base does not move; the next export drops the pending point and
/// exports from the committed base, so the chain restores byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn piped_stream_whose_reader_fails_never_advances_the_chain() {
    let e = env().await;
    let state = e.state();
    let restored = e.dir.join("restored.raw");
    e.guest_writes(1);
    let full = e.dir.join("full.cbts");
    ok(e.export(&full, &["--state", p(&state)]).await);
    ok(run(&["restore", "--to", p(&restored), p(&full)]));
    let base0 = state_base(&state);

    e.guest_writes(2);
    let lost = e.dir.join("lost.cbts");
    // The reader stores part of the stream, then fails; the export itself succeeds.
    let status = piped_export(
        &e,
        &state,
        &format!("(head -c 100 > {}; cat > /dev/null; exit 1)", p(&lost)),
    )
    .await;
    assert_eq!(status, 0);
    let s = state_json(&state);
    assert_eq!(s["base"], base0.as_str(), "the committed base moved: {s}");
    let pending = s["pending"]["snapshot"].as_str().unwrap().to_string();
    assert_eq!(s["pending"]["stream_base"], base0.as_str());
    // The pending point's snapshot is still a full, tagged snapshot; the base is untouched.
    let snaps = e.snapshots();
    assert_eq!(snaps.len(), 2, "{snaps:?}");
    assert!(snaps.contains(&(base0.clone(), "cbt_metadata".into(), true)));
    assert!(snaps.contains(&(pending.clone(), "user".into(), true)));

    // The next export: the pending point goes, the incremental starts from the committed base
    // and holds both rounds of guest writes.
    e.guest_writes(3);
    let inc = e.dir.join("inc.cbts");
    let o = ok(e.export(&inc, &["--state", p(&state)]).await);
    assert!(
        stderr(&o).contains(&format!(
            "the point {pending} exported earlier was never committed"
        )),
        "{}",
        stderr(&o)
    );
    let o = ok(run(&["inspect", p(&inc)]));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&base0),
        "not from the committed base"
    );
    ok(run(&["restore", "--to", p(&restored), p(&inc)]));
    assert_same(&restored, &e.live_image());
    let snaps = e.snapshots();
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert!(!snaps.iter().any(|s| s.0 == pending));
    assert!(state_json(&state)["pending"].is_null());
}

/// `export -o - | store && cbtstream commit`: the point becomes the base only at the commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn piped_stream_is_committed_by_commit() {
    let e = env().await;
    let state = e.state();
    let restored = e.dir.join("restored.raw");
    e.guest_writes(1);
    let full = e.dir.join("full.cbts");
    assert_eq!(
        piped_export(&e, &state, &format!("cat > {}", p(&full))).await,
        0
    );
    let s = state_json(&state);
    assert!(s["base"].is_null(), "{s}");
    let point = s["pending"]["snapshot"].as_str().unwrap().to_string();
    assert!(s["pending"]["stream_base"].is_null());

    let o = ok(e.commit(&["--state", p(&state)]).await);
    assert!(
        stderr(&o).contains(&format!("committed point {point}")),
        "{}",
        stderr(&o)
    );
    let s = state_json(&state);
    assert_eq!(s["base"], point.as_str());
    assert_eq!(s["base_is_metadata"], true);
    assert!(s["pending"].is_null());
    assert_eq!(
        e.snapshots(),
        vec![(point.clone(), "cbt_metadata".into(), true)]
    );
    ok(run(&["restore", "--to", p(&restored), p(&full)]));
    assert_same(&restored, &e.live_image());

    // Nothing left to commit: a usage error that changes nothing.
    let before = std::fs::read(&state).unwrap();
    let o = e.commit(&["--state", p(&state)]).await;
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("no pending point"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&state).unwrap(), before);

    // An incremental through the pipe, committed: the old base goes.
    e.guest_writes(2);
    let inc = e.dir.join("inc.cbts");
    assert_eq!(
        piped_export(&e, &state, &format!("cat > {}", p(&inc))).await,
        0
    );
    ok(e.commit(&["--state", p(&state)]).await);
    ok(run(&["restore", "--to", p(&restored), p(&inc)]));
    assert_same(&restored, &e.live_image());
    let snaps = e.snapshots();
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert_eq!(snaps[0].0, state_base(&state));
}

/// A pending point whose snapshot disappeared (someone removed it) cannot be committed: a
/// clear error that changes nothing; the next export starts from the committed base.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_of_a_vanished_snapshot_fails() {
    let e = env().await;
    let state = e.state();
    ok(e.export(&e.dir.join("full.cbts"), &["--state", p(&state)])
        .await);
    e.guest_writes(1);
    assert_eq!(piped_export(&e, &state, "cat > /dev/null").await, 0);
    let pending = state_json(&state)["pending"]["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let session = login(&e);
    let r = e.sim.vdi_ref_of(&pending).unwrap();
    // The snapshot stays attached to dom0 for the NBD lag after the export: retry until the
    // host lets it go.
    let mut attempts = 0;
    while let Err(err) = e
        .sim
        .call_local("VDI.destroy", &[session.clone(), r.clone().into()])
    {
        attempts += 1;
        assert!(err.0 == "VDI_IN_USE" && attempts < 500, "{err:?}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let before = std::fs::read(&state).unwrap();
    let o = e.commit(&["--state", p(&state)]).await;
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(stderr(&o).contains("no longer exists"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&state).unwrap(), before);
    // The chain goes on from the committed base.
    let restored = e.dir.join("r.raw");
    let inc = e.dir.join("inc.cbts");
    ok(e.export(&inc, &["--state", p(&state)]).await);
    ok(run(&[
        "restore",
        "--to",
        p(&restored),
        p(&e.dir.join("full.cbts")),
        p(&inc),
    ]));
    assert_same(&restored, &e.live_image());
    let s = state_json(&state);
    assert!(
        s["pending"].is_null() && s["abandoned"].as_array().unwrap().is_empty(),
        "{s}"
    );
}

/// `export | reader && commit` where tonight's export fails early (here: at login) while the
/// reader, seeing an empty stream, exits 0: the commit must not commit last night's pending
/// point, whose stream was never stored. Any export that starts sets the pending point aside.
/// And `commit --point ID` refuses a pending point that is not ID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_export_supersedes_the_pending_point_even_when_it_fails() {
    let e = env().await;
    let state = e.state();
    let full = e.dir.join("full.cbts");
    ok(e.export(&full, &["--state", p(&state)]).await);
    let base = state_base(&state);
    e.guest_writes(1);
    assert_eq!(
        piped_export(&e, &state, "(cat > /dev/null; exit 1)").await,
        0
    );
    let night1 = state_json(&state)["pending"]["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let o = e
        .commit(&["--state", p(&state), "--point", "some-other-point"])
        .await;
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("the pending point is {night1}")),
        "{}",
        stderr(&o)
    );

    // Night 2: the export fails at login (a password the host refuses).
    let script = format!(
        "set -o pipefail; {BIN} export --xapi {} --xapi-ca {} --vdi {} --state {} -o - | cat > /dev/null; \
         {BIN} commit --xapi-ca {} --state {}; echo $?",
        e.sim.url(),
        p(e.sim.ca_path()),
        e.sim.vdi_uuid(),
        p(&state),
        p(e.sim.ca_path()),
        p(&state),
    );
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("bash")
            .args(["-c", &script])
            .env("XAPI_PASSWORD", "wrong")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no pending point"), "{err}");
    let s = state_json(&state);
    assert_eq!(s["base"], base.as_str());
    assert!(s["pending"].is_null(), "{s}");
    assert_eq!(s["abandoned"][0], night1.as_str());
    // The next export removes the abandoned snapshot and goes on from the committed base.
    e.guest_writes(2);
    let inc = e.dir.join("inc.cbts");
    ok(e.export(&inc, &["--state", p(&state)]).await);
    let restored = e.dir.join("r.raw");
    ok(run(&["restore", "--to", p(&restored), p(&full), p(&inc)]));
    assert_same(&restored, &e.live_image());
    assert_eq!(e.snapshots().len(), 1, "{:?}", e.snapshots());
    assert!(state_json(&state)["abandoned"]
        .as_array()
        .unwrap()
        .is_empty());
}

/// A signal that comes while the point is being committed (here while data_destroy is
/// retried on VDI_IN_USE) does not stop the commit: the export ends 0, the new point is the
/// base, and nothing that the chain needs is destroyed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_during_the_commit_lets_it_finish() {
    let e = env().await;
    let state = e.state();
    ok(e.export(&e.dir.join("full.cbts"), &["--state", p(&state)])
        .await);
    e.guest_writes(1);
    e.sim.fail_next(
        "VDI.data_destroy",
        "VDI_IN_USE",
        &["OpaqueRef:x", "data_destroy"],
        Some(3),
    );
    let destroys = e.sim.calls("VDI.data_destroy");
    let out = e.dir.join("inc.cbts");
    let child = std::process::Command::new(BIN)
        .args([
            "export",
            "--xapi",
            &e.sim.url(),
            "--xapi-ca",
            p(e.sim.ca_path()),
        ])
        .args([
            "--vdi",
            e.sim.vdi_uuid(),
            "--state",
            p(&state),
            "-o",
            p(&out),
        ])
        .env("XAPI_PASSWORD", e.sim.password())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while e.sim.calls("VDI.data_destroy") == destroys {
        assert!(
            std::time::Instant::now() < deadline,
            "the commit never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let o = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = state_json(&state);
    assert_eq!(s["base_is_metadata"], true, "{s}");
    let snaps = e.snapshots();
    assert_eq!(
        snaps,
        vec![(state_base(&state), "cbt_metadata".into(), true)]
    );
}

/// gc --state with a state file that is not there (a typo) is refused: without the state it
/// would take the chain's bases for leftovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_with_a_missing_state_file_is_refused() {
    let e = env().await;
    let state = e.state();
    ok(e.export(&e.dir.join("full.cbts"), &["--state", p(&state)])
        .await);
    let o = e.gc(&["--state", p(&e.dir.join("chain.jsno"))]).await;
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("no chain state at"), "{}", stderr(&o));
    assert_eq!(e.snapshots().len(), 1);
}

/// --to-command: committed when the command exits 0; a failing command fails the export
/// (exit 5) and leaves the chain as it was, with no snapshot behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn to_command_commits_only_when_the_command_succeeds() {
    let e = env().await;
    let state = e.state();
    let restored = e.dir.join("restored.raw");
    e.guest_writes(1);
    let full = e.dir.join("full.cbts");
    let cmd = format!("cat > {}", p(&full));
    let o = ok(e
        .export_to(&["--state", p(&state), "--to-command", &cmd, "--json"])
        .await);
    let json: serde_json::Value = serde_json::from_str(stderr(&o).lines().last().unwrap()).unwrap();
    assert_eq!(json["committed"], true, "{json}");
    assert_eq!(json["point"], state_base(&state).as_str());
    assert!(json["base"].is_null());
    assert_eq!(
        json["bytes_written"].as_u64().unwrap(),
        std::fs::metadata(&full).unwrap().len()
    );
    ok(run(&["restore", "--to", p(&restored), p(&full)]));
    assert_same(&restored, &e.live_image());
    let before = std::fs::read(&state).unwrap();

    e.guest_writes(2);
    let o = e
        .export_to(&[
            "--state",
            p(&state),
            "--to-command",
            "cat > /dev/null; exit 3",
            "--json",
        ])
        .await;
    assert_eq!(code(&o), 5, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--to-command command failed"),
        "{}",
        stderr(&o)
    );
    assert!(
        !stderr(&o).contains("\"committed\""),
        "a summary line for a failed run"
    );
    assert_eq!(std::fs::read(&state).unwrap(), before);
    assert_eq!(e.snapshots().len(), 1, "{:?}", e.snapshots());
    // A command that stops reading early: the same.
    let o = e
        .export_to(&[
            "--state",
            p(&state),
            "--to-command",
            "head -c 10 > /dev/null",
            "--compress",
            "none",
        ])
        .await;
    assert_eq!(code(&o), 5, "{}", stderr(&o));
    assert_eq!(std::fs::read(&state).unwrap(), before);
    assert_eq!(e.snapshots().len(), 1, "{:?}", e.snapshots());
}

/// --commit-on-eof keeps the old behaviour: commit once the pipe took the last byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_on_eof_commits_at_once() {
    let e = env().await;
    let state = e.state();
    let o = ok(e
        .export_to(&["--state", p(&state), "-o", "-", "--commit-on-eof"])
        .await);
    assert!(!o.stdout.is_empty());
    let s = state_json(&state);
    assert!(
        s["pending"].is_null() && s["base_is_metadata"] == true,
        "{s}"
    );
}

/// Usage errors come before anything happens on the host: no login, no snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_take_no_snapshot() {
    let e = env().await;
    let state = e.state();
    let cases: [&[&str]; 8] = [
        &["--state", p(&state), "-o", "x.cbts", "--commit-on-eof"],
        &[
            "--state",
            p(&state),
            "-o",
            "x.cbts",
            "--full",
            "--fallback-full",
        ],
        &[
            "--state",
            p(&state),
            "-o",
            "x.cbts",
            "--full",
            "--keep-bases",
            "2",
        ],
        // A pipe with nowhere to record a pending point.
        &["--full", "-o", "-"],
        &[
            "--state",
            p(&state),
            "-o",
            "x.cbts",
            "--request-size",
            "100",
        ],
        &[
            "--state",
            p(&state),
            "-o",
            "x.cbts",
            "--tls-insecure-no-verify",
        ],
        &["--state", p(&state), "-o", "x.cbts", "--threads", "0"],
        &["--state", p(&state), "-o", "x.cbts", "--to-command", "cat"],
    ];
    for args in cases {
        let o = e.export_to(args).await;
        assert_eq!(code(&o), 2, "{args:?}: {}", stderr(&o));
        assert_eq!(
            e.sim.calls("session.login_with_password"),
            0,
            "{args:?} logged in"
        );
        assert_eq!(e.sim.calls("VDI.snapshot"), 0, "{args:?} took a snapshot");
        assert!(!state.exists());
    }
    // Options that only mean something with --xapi are refused with --nbd.
    let o = run(&[
        "export",
        "--nbd",
        "nbd+unix:///x?socket=/nonexistent",
        "--full",
        "-o",
        "x",
        "--keep-bases",
        "2",
    ]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    let o = run(&[
        "export",
        "--nbd",
        "nbd+unix:///x?socket=/nonexistent",
        "--full",
        "-o",
        "x",
        "--point-id",
        "a\u{7}b",
    ]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("control character"), "{}", stderr(&o));
}

/// Two runs on one chain: the second fails at once (exit 6) naming the first one's pid, and
/// so does gc; nothing of the first run is disturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_runs_on_one_chain_are_refused() {
    use cbtstream_testkit::xen_nbd::StallAt;
    let e = env().await;
    let state = e.state();
    ok(e.export(&e.dir.join("full.cbts"), &["--state", p(&state)])
        .await);
    e.guest_writes(1);
    let faults = e.sim.nbd().faults.clone();
    faults.stall(StallAt::Request(faults.requests() + 1));
    let out = e.dir.join("inc.cbts");
    let mut first = std::process::Command::new(BIN)
        .args([
            "export",
            "--xapi",
            &e.sim.url(),
            "--xapi-ca",
            p(e.sim.ca_path()),
        ])
        .args([
            "--vdi",
            e.sim.vdi_uuid(),
            "--state",
            p(&state),
            "-o",
            p(&out),
        ])
        .env("XAPI_PASSWORD", e.sim.password())
        .spawn()
        .unwrap();
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        faults.wait_until(|f| f.stalls() == 1),
    )
    .await
    .expect("the export never reached the NBD server");
    let pid = first.id();

    let o = e
        .export(&e.dir.join("other.cbts"), &["--state", p(&state)])
        .await;
    assert_eq!(code(&o), 6, "{}", stderr(&o));
    assert!(stderr(&o).contains(&format!("pid {pid}")), "{}", stderr(&o));
    let o = e.gc(&["--state", p(&state)]).await;
    assert_eq!(code(&o), 6, "{}", stderr(&o));
    let o = e.commit(&["--state", p(&state)]).await;
    assert_eq!(code(&o), 6, "{}", stderr(&o));
    assert_eq!(
        e.snapshots().len(),
        2,
        "the running export's snapshot must stay"
    );

    faults.release_stall();
    let status = tokio::task::spawn_blocking(move || first.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success());
    assert_eq!(e.snapshots().len(), 1);
    let restored = e.dir.join("r.raw");
    ok(run(&[
        "restore",
        "--to",
        p(&restored),
        p(&e.dir.join("full.cbts")),
        p(&out),
    ]));
    assert_same(&restored, &e.live_image());
}

/// gc without --state only lists (a tagged snapshot may be a base kept after data_destroy
/// failed, or belong to a running export); --force removes. With --state it keeps the base
/// and the pending point, and lists an untagged snapshot taken after the base (a run killed
/// between VDI.snapshot and tagging it) without removing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_keeps_what_a_chain_needs() {
    let e = env().await;
    let state = e.state();
    ok(e.export(&e.dir.join("full.cbts"), &["--state", p(&state)])
        .await);
    let base = state_base(&state);
    e.guest_writes(1);
    assert_eq!(piped_export(&e, &state, "cat > /dev/null").await, 0);
    let pending = state_json(&state)["pending"]["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let leftover = e.host_snapshot(true);
    let untagged = e.host_snapshot(false);
    assert_eq!(e.snapshots().len(), 4);

    // Without --state: a list, nothing removed.
    let o = ok(e.gc(&[]).await);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        out.contains(&format!("would remove snapshot {leftover}")),
        "{out}"
    );
    assert!(
        out.contains(&format!("would remove snapshot {pending}")),
        "{out}"
    );
    assert!(out.contains(&format!("kept snapshot {base}")), "{out}");
    assert_eq!(e.snapshots().len(), 4);

    // With --state: the leftover goes; base, pending point and the untagged one stay.
    let o = ok(e.gc(&["--state", p(&state)]).await);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        out.contains(&format!("removed snapshot {leftover}")),
        "{out}"
    );
    assert!(
        out.contains(&format!("kept snapshot {pending}: the pending point")),
        "{out}"
    );
    assert!(
        out.contains(&format!("possibly ours: untagged snapshot {untagged}")),
        "{out}"
    );
    let mut left: Vec<String> = e.snapshots().into_iter().map(|s| s.0).collect();
    left.sort();
    let mut want = vec![base.clone(), pending.clone(), untagged.clone()];
    want.sort();
    assert_eq!(left, want);

    // --force without a state file removes the tagged non-base snapshots (the pending one).
    let o = ok(e.gc(&["--force"]).await);
    assert!(String::from_utf8_lossy(&o.stdout).contains(&format!("removed snapshot {pending}")));
    let o = e.gc(&["--force", "--state", p(&state)]).await;
    assert_eq!(code(&o), 2, "{}", stderr(&o));

    // After a later export moved the base past it, the untagged one is still listed.
    e.guest_writes(2);
    ok(e.export(&e.dir.join("inc.cbts"), &["--state", p(&state)])
        .await);
    let o = ok(e.gc(&["--state", p(&state), "--dry-run"]).await);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        out.contains(&format!("possibly ours: untagged snapshot {untagged}")),
        "{out}"
    );
}

/// The session dies mid-export and every NBD connection drops after that: the export name
/// held by the client carries the dead session, so the reconnect asks get_nbd_info again
/// (logging in again) and the export completes, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expired_then_reconnect_gets_a_fresh_export_name() {
    use cbtstream_testkit::xen_nbd::StallAt;
    let e = env().await;
    let state = e.state();
    let restored = e.dir.join("restored.raw");
    let full = e.dir.join("full.cbts");
    ok(e.export(&full, &["--state", p(&state)]).await);
    ok(run(&["restore", "--to", p(&restored), p(&full)]));
    // Enough changed data for several reads.
    let noise: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    e.sim.write(e.sim.vdi_uuid(), 0, &noise).unwrap();
    let faults = e.sim.nbd().faults.clone();
    faults.stall(StallAt::Request(faults.requests() + 2));
    let opened = faults.connections_opened();
    let out = e.dir.join("inc.cbts");
    let args = [
        "--state",
        p(&state),
        "--connections",
        "1",
        "--request-size",
        "64",
        "-vv",
    ];
    let run_export = e.export(&out, &args);
    let expire_and_cut = async {
        tokio::time::timeout(
            std::time::Duration::from_secs(30),
            faults.wait_until(|f| f.stalls() == 1),
        )
        .await
        .expect("the export never reached the NBD server");
        e.sim.expire_sessions();
        faults.cut_next_read_after(100);
        faults.release_stall();
    };
    let (o, ()) = tokio::join!(run_export, expire_and_cut);
    let o = ok(o);
    assert_eq!(faults.cuts(), 1);
    assert!(
        faults.connections_opened() >= opened + 2,
        "no reconnect happened"
    );
    assert!(
        stderr(&o).contains("asking VDI.get_nbd_info again"),
        "{}",
        stderr(&o)
    );
    ok(run(&["restore", "--to", p(&restored), p(&out)]));
    assert_same(&restored, &e.live_image());
}

/// The keepalive uses the session during a long export (here every second, while the NBD
/// server stalls): it finds the session dead and logs in again, and the next connection
/// then asks get_nbd_info for an export name with the new session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_renews_the_session_and_the_export_name_follows() {
    use cbtstream_testkit::xen_nbd::StallAt;
    let e = env().await;
    let state = e.state();
    let restored = e.dir.join("restored.raw");
    let full = e.dir.join("full.cbts");
    ok(e.export(&full, &["--state", p(&state)]).await);
    ok(run(&["restore", "--to", p(&restored), p(&full)]));
    e.guest_writes(4);
    let faults = e.sim.nbd().faults.clone();
    faults.stall(StallAt::Request(faults.requests() + 1));
    let out = e.dir.join("inc.cbts");
    let args = [
        "--state",
        p(&state),
        "--connections",
        "1",
        "--xapi-keepalive",
        "1",
        "-v",
    ];
    let run_export = e.export(&out, &args);
    let renew_then_cut = async {
        tokio::time::timeout(
            std::time::Duration::from_secs(30),
            faults.wait_until(|f| f.stalls() == 1),
        )
        .await
        .expect("the export never reached the NBD server");
        let logins = e.sim.calls("session.login_with_password");
        e.sim.expire_sessions();
        // Nothing but the keepalive talks to XenAPI while the NBD server stalls.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while e.sim.calls("session.login_with_password") == logins {
            assert!(std::time::Instant::now() < deadline, "no keepalive call");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        faults.cut_next_read_after(100);
        faults.release_stall();
    };
    let (o, ()) = tokio::join!(run_export, renew_then_cut);
    let o = ok(o);
    assert!(
        stderr(&o).contains("the XenAPI session was renewed; asking VDI.get_nbd_info again"),
        "{}",
        stderr(&o)
    );
    ok(run(&["restore", "--to", p(&restored), p(&out)]));
    assert_same(&restored, &e.live_image());
}

/// Streams, the state file and its lock hold whole disks or name their snapshots: 0600.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_created_private() {
    use std::os::unix::fs::PermissionsExt;
    let e = env().await;
    let state = e.state();
    let full = e.dir.join("full.cbts");
    ok(e.export(&full, &["--state", p(&state)]).await);
    let restored = e.dir.join("r.raw");
    ok(run(&["restore", "--to", p(&restored), p(&full)]));
    let sidecar = e.dir.join("r.raw.cbtstream");
    for f in [
        &full,
        &state,
        &e.dir.join("chain.json.lock"),
        &restored,
        &sidecar,
    ] {
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
    }
}
