//! `restore --xapi`: chains exported from the simulator written back into VDIs through
//! `PUT /import_raw_vdi`, byte for byte; what is refused before anything is written; and
//! what a failure or a signal leaves on the host.

mod common;
#[path = "xapi_env/mod.rs"]
mod xapi_env;

use cbtstream_proto::xmlrpc::Value;
use common::*;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};
use xapi_env::*;

const IMPORT: &str = "PUT /import_raw_vdi";

/// A chain exported with `--state`, and a copy of the live image at each point. The third
/// point zeroes data of the earlier ones.
struct Chain {
    streams: Vec<PathBuf>,
    images: Vec<PathBuf>,
    points: Vec<String>,
}

async fn export_chain(e: &Env, n: usize) -> Chain {
    let mut c = Chain {
        streams: vec![],
        images: vec![],
        points: vec![],
    };
    for i in 0..n {
        e.guest_writes(i as u8 + 1);
        if i == 2 {
            // The guest zeroes what it wrote at the first point: ZERO records to apply.
            e.sim
                .write(e.sim.vdi_uuid(), 10 * 65536, &[0u8; 65536])
                .unwrap();
        }
        let stream = e.dir.join(format!("s{i}.cbts"));
        ok(e.export(&stream, &["--state", p(&e.state())]).await);
        let image = e.dir.join(format!("at{i}.raw"));
        std::fs::copy(e.live_image(), &image).unwrap();
        c.streams.push(stream);
        c.images.push(image);
        c.points.push(state_base(&e.state()));
    }
    c
}

fn paths(streams: &[&PathBuf]) -> Vec<String> {
    streams.iter().map(|s| p(s).to_string()).collect()
}

/// `cbtstream restore --xapi URL --xapi-ca CA TARGET... STREAMS...`.
async fn restore(e: &Env, target: &[&str], streams: &[&PathBuf]) -> Output {
    let mut extra: Vec<String> = target.iter().map(|s| s.to_string()).collect();
    extra.extend(paths(streams));
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    e.command(&["restore", "--xapi", &e.sim.url()], false, &extra)
        .await
}

/// The same, running, with stdin a pipe the test writes.
fn spawn_restore(e: &Env, target: &[&str]) -> Child {
    std::process::Command::new(BIN)
        .args(["restore", "--xapi", &e.sim.url(), "--xapi-ca"])
        .arg(e.sim.ca_path())
        .args(target)
        .arg("-")
        .env("XAPI_PASSWORD", e.sim.password())
        .env_remove("CBTSTREAM_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn sr_uuid(e: &Env) -> String {
    let session = login(e);
    let srs = e
        .sim
        .call_local("SR.get_all", std::slice::from_ref(&session))
        .unwrap();
    let sr = srs.as_array().unwrap()[0].clone();
    let uuid = e.sim.call_local("SR.get_uuid", &[session, sr]).unwrap();
    uuid.as_str().unwrap().to_string()
}

fn vdi_count(e: &Env) -> usize {
    let all = e.sim.call_local("VDI.get_all", &[login(e)]).unwrap();
    all.as_array().unwrap().len()
}

fn other_config(e: &Env, vdi: &str) -> BTreeMap<String, String> {
    let rec = e.sim.vdi_record(vdi).unwrap();
    rec.get("other_config")
        .and_then(Value::as_struct)
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect()
}

fn restore_state(e: &Env, vdi: &str) -> (Option<String>, Option<String>) {
    let oc = other_config(e, vdi);
    (
        oc.get("cbtstream_restore_state").cloned(),
        oc.get("cbtstream_point").cloned(),
    )
}

/// (status, error code) of every import task.
fn import_tasks(e: &Env) -> Vec<(String, String)> {
    let session = login(e);
    let tasks = e
        .sim
        .call_local("task.get_all", std::slice::from_ref(&session))
        .unwrap();
    tasks
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            e.sim
                .call_local("task.get_record", &[session.clone(), t.clone()])
                .unwrap()
        })
        .filter(|r| r.get("name_label").and_then(Value::as_str) == Some("VDI import"))
        .map(|r| {
            let status = r.get("status").and_then(Value::as_str).unwrap();
            let error = r
                .get("error_info")
                .and_then(Value::as_array)
                .and_then(|a| a.first())
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            (status.to_string(), error)
        })
        .collect()
}

fn stdout_uuid(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Polls `cond` until it holds (a failure after 20 s).
fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn terminate(child: Child) -> Output {
    let pid = child.id().to_string();
    tokio::task::spawn_blocking(move || {
        let kill = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(kill.success());
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

/// Everything but the last `cut` bytes of `stream`.
fn truncated(stream: &Path, cut: usize, to: &Path) -> PathBuf {
    let bytes = std::fs::read(stream).unwrap();
    std::fs::write(to, &bytes[..bytes.len() - cut]).unwrap();
    to.to_path_buf()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_restores_into_a_new_vdi_byte_for_byte() {
    let e = env().await;
    let c = export_chain(&e, 3).await;
    let before = vdi_count(&e);
    let sr = sr_uuid(&e);
    let all: Vec<&PathBuf> = c.streams.iter().collect();
    let o = ok(restore(&e, &["--sr", &sr, "--json"], &all).await);
    let uuid = stdout_uuid(&o);
    assert_same(&e.sim.vdi_path(&uuid).unwrap(), &c.images[2]);
    assert_eq!(vdi_count(&e), before + 1);
    let oc = other_config(&e, &uuid);
    assert_eq!(oc["cbtstream_restore_state"], "complete");
    assert_eq!(oc["cbtstream_point"], c.points[2]);
    let rec = e.sim.vdi_record(&uuid).unwrap();
    let name = rec.get("name_label").and_then(Value::as_str).unwrap();
    assert!(name.ends_with(&format!("at {}", c.points[2])), "{name}");

    // One upload; only the data travelled (the guest wrote well under 1 MiB of a
    // 3 MiB disk), and the summary says what was sent.
    assert_eq!(e.sim.calls(IMPORT), 1);
    assert_eq!(import_tasks(&e), [("success".to_string(), String::new())]);
    let imported = e.sim.bytes_imported();
    assert!(
        imported > 0 && imported < SIZE / 3,
        "{imported} bytes imported"
    );
    let summary = json_summary(&o);
    assert_eq!(summary["vdi"], uuid.as_str());
    assert_eq!(summary["point"], c.points[2].as_str());
    assert_eq!(summary["streams"], 3);
    assert_eq!(summary["bytes_sent"], imported);
    assert!(summary["seconds"].as_f64().is_some() && summary["mb_per_s"].as_f64().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incrementals_go_onto_a_vdi_only_at_their_base_point() {
    let e = env().await;
    let c = export_chain(&e, 2).await;
    let sr = sr_uuid(&e);
    let o = ok(restore(&e, &["--sr", &sr], &[&c.streams[0]]).await);
    let uuid = stdout_uuid(&o);
    assert_same(&e.sim.vdi_path(&uuid).unwrap(), &c.images[0]);
    assert_eq!(
        restore_state(&e, &uuid),
        (Some("complete".into()), Some(c.points[0].clone()))
    );

    let o = ok(restore(&e, &["--vdi", &uuid], &[&c.streams[1]]).await);
    assert_eq!(stdout_uuid(&o), uuid);
    assert_same(&e.sim.vdi_path(&uuid).unwrap(), &c.images[1]);
    assert_eq!(
        restore_state(&e, &uuid),
        (Some("complete".into()), Some(c.points[1].clone()))
    );

    // The same incremental again: the VDI is at its point, not at its base. Refused before
    // anything is written or marked.
    let (imports, imported) = (e.sim.calls(IMPORT), e.sim.bytes_imported());
    let o = restore(&e, &["--vdi", &uuid], &[&c.streams[1]]).await;
    assert_fails(&o, 4, "does not follow on");
    assert!(stderr(&o).contains(&c.points[1]), "{}", stderr(&o));
    assert_eq!(e.sim.calls(IMPORT), imports);
    assert_eq!(e.sim.bytes_imported(), imported);
    assert_eq!(
        restore_state(&e, &uuid),
        (Some("complete".into()), Some(c.points[1].clone()))
    );

    // An incremental needs a VDI: with --sr it is a usage error.
    let o = restore(&e, &["--sr", &sr], &[&c.streams[1]]).await;
    assert_fails(&o, 2, "give --vdi");
    assert_eq!(e.sim.calls(IMPORT), imports);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vdi_in_use_by_the_running_vm_is_refused_before_writing() {
    let e = env().await;
    let c = export_chain(&e, 1).await;
    let live = e.sim.vdi_uuid().to_string();
    let o = restore(&e, &["--vdi", &live], &[&c.streams[0]]).await;
    assert_fails(&o, 3, "is attached to the running VM");
    assert!(stderr(&o).contains(e.sim.vm_uuid()), "{}", stderr(&o));
    assert_eq!(e.sim.calls(IMPORT), 0);
    assert_eq!(restore_state(&e, &live), (None, None));
    assert_same(&e.live_image(), &c.images[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_stream_destroys_the_new_vdi_and_leaves_an_old_one_applying() {
    let e = env().await;
    let c = export_chain(&e, 2).await;
    let sr = sr_uuid(&e);
    let before = vdi_count(&e);
    let cut = truncated(&c.streams[1], 20, &e.dir.join("cut.cbts"));
    let o = restore(&e, &["--sr", &sr], &[&c.streams[0], &cut]).await;
    assert_fails(&o, 4, "cut.cbts");
    // The full stream's data went up before the damage showed, but the end marker did not:
    // the host failed the import, and the VDI is gone.
    assert_eq!(e.sim.calls(IMPORT), 1);
    assert!(e.sim.bytes_imported() > 0);
    assert_eq!(
        import_tasks(&e),
        [("failure".to_string(), "VDI_IO_ERROR".to_string())]
    );
    assert_eq!(vdi_count(&e), before);

    // Into an existing VDI: it stays, marked applying, and nothing builds on it.
    let uuid = stdout_uuid(&ok(restore(&e, &["--sr", &sr], &[&c.streams[0]]).await));
    let o = restore(&e, &["--vdi", &uuid], &[&cut]).await;
    assert_fails(&o, 4, "cut.cbts");
    assert_eq!(
        restore_state(&e, &uuid),
        (Some("applying".into()), Some(c.points[1].clone()))
    );
    let o = restore(&e, &["--vdi", &uuid], &[&c.streams[1]]).await;
    assert_fails(&o, 4, "is half-written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_upload_leaves_nothing_that_looks_complete() {
    let e = env().await;
    let c = export_chain(&e, 1).await;
    let sr = sr_uuid(&e);
    let full = std::fs::read(&c.streams[0]).unwrap();
    let half = &full[..full.len() / 2];

    // Into a new VDI: the stream arrives on a pipe that stalls halfway.
    let before = vdi_count(&e);
    let mut child = spawn_restore(&e, &["--sr", &sr]);
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(half).unwrap();
    wait_for("the upload to start", || e.sim.calls(IMPORT) == 1);
    let o = terminate(child).await;
    drop(stdin);
    assert_fails(
        &o,
        130,
        "interrupted by SIGTERM; the new VDI (if it was created) is destroyed",
    );
    assert_eq!(vdi_count(&e), before);

    // Into an existing VDI: left marked applying.
    let uuid = stdout_uuid(&ok(restore(&e, &["--sr", &sr], &[&c.streams[0]]).await));
    let mut child = spawn_restore(&e, &["--vdi", &uuid]);
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(half).unwrap();
    wait_for("the second upload to start", || e.sim.calls(IMPORT) == 3);
    let o = terminate(child).await;
    drop(stdin);
    assert_fails(&o, 130, "is left marked `applying`");
    assert_eq!(restore_state(&e, &uuid).0.as_deref(), Some("applying"));
}

#[test]
fn the_target_is_an_image_or_the_pool_never_both() {
    let url = "https://127.0.0.1:1/";
    for args in [
        &["restore", "s.cbts"][..],
        &[
            "restore", "--to", "img", "--xapi", url, "--sr", "x", "s.cbts",
        ],
        &["restore", "--xapi", url, "s.cbts"],
        &[
            "restore", "--xapi", url, "--sr", "x", "--vdi", "y", "s.cbts",
        ],
        &["restore", "--to", "img", "--sr", "x", "s.cbts"],
        &["restore", "--to", "img", "--json", "s.cbts"],
    ] {
        let o = run(args);
        assert_eq!(code(&o), 2, "{args:?}: {}", stderr(&o));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_stream_grows_a_smaller_vdi_and_never_shrinks_a_larger_one() {
    let e = env().await;
    let c = export_chain(&e, 1).await;
    let small = e.blank_vdi(SIZE / 2 / 512 * 512);
    let o = ok(restore(&e, &["--vdi", &small], &[&c.streams[0]]).await);
    assert_eq!(stdout_uuid(&o), small);
    assert_same(&e.sim.vdi_path(&small).unwrap(), &c.images[0]);

    let large = e.blank_vdi(SIZE + 512);
    let o = restore(&e, &["--vdi", &large], &[&c.streams[0]]).await;
    assert_fails(&o, 2, "shrinking is not supported");
    assert_eq!(restore_state(&e, &large), (None, None));
    assert_eq!(e.sim.calls(IMPORT), 1);
}
