//! The vSphere client and flow against the simulator, in process (the data plane is not
//! connected yet, so these stop where the flow hands a disk to `data::read_disk`).

use super::calls;
use super::changed::ChangedMap;
use super::client::{Client, MoRef};
use super::flow::{self, Output, RunOptions, VsphereLogin};
use crate::chain::{self, VsphereDisk, VsphereState};
use crate::exit::Code;
use crate::tls::Trust;
use crate::xapi::Secret;
use cbtstream_proto::cbt::CBT_BLOCK;
use cbtstream_vsphere_sim::{SimConfig, Simulator};

async fn start() -> (tempfile::TempDir, Simulator) {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::start(SimConfig::for_tests(dir.path().join("ds")))
        .await
        .unwrap();
    (dir, sim)
}

fn login_of(sim: &Simulator) -> VsphereLogin {
    VsphereLogin {
        url: sim.url(),
        user: sim.user().to_owned(),
        password: Secret::new(sim.password()),
        trust: Trust::CaFile(sim.ca_path().to_path_buf()),
        release: None,
    }
}

async fn client(sim: &Simulator) -> Client {
    flow::login(&login_of(sim)).await.unwrap()
}

fn vm(sim: &Simulator) -> MoRef {
    MoRef::new("VirtualMachine", sim.vm())
}

/// A snapshot through the client; its disks' change ids.
async fn snapshot(c: &Client, sim: &Simulator) -> (MoRef, Vec<calls::Disk>) {
    let snap = calls::create_snapshot(c, &vm(sim), "t", false)
        .await
        .unwrap();
    let disks = calls::snapshot_config(c, &snap).await.unwrap().disks;
    (snap, disks)
}

/// Odd sizes at odd offsets, across 64 KiB borders, up to the last byte of the disk.
fn odd_writes(capacity: u64, round: u8) -> Vec<(u64, Vec<u8>)> {
    let data = |n: usize| (0..n).map(|i| (i as u8) ^ round).collect::<Vec<u8>>();
    let r = u64::from(round);
    vec![
        (CBT_BLOCK - 3 + r * 4099, data(7)),
        (5 * CBT_BLOCK + 1234 + r * 77, data(200_001)),
        (capacity / 2 + 17 * r, data(1)),
        (capacity - 1, data(1)),
    ]
}

fn assert_covers(map: &ChangedMap, writes: &[(u64, Vec<u8>)]) {
    for (offset, data) in writes {
        let last = offset + data.len() as u64 - 1;
        for block in offset / CBT_BLOCK..=last / CBT_BLOCK {
            assert!(map.is_marked(block), "block {block} of write at {offset}");
        }
    }
}

#[tokio::test]
async fn login_uses_the_servers_release_and_debug_hides_the_secrets() {
    let (_dir, sim) = start().await;
    let c = client(&sim).await;
    assert_eq!(c.release(), sim.release());
    let config = calls::vm_config(&c, &vm(&sim)).await.unwrap();
    assert_eq!(config.disks.len(), 2);
    assert_eq!(
        config
            .disks
            .iter()
            .map(|d| (d.key, d.capacity))
            .collect::<Vec<_>>(),
        sim.disks()
    );
    let token = c.session_token().await;
    let debug = format!("{c:?}");
    assert!(!debug.contains(sim.password()) && !debug.contains(token.expose()));
    c.logout().await;
    // A wrong password is the server's InvalidLogin, named.
    let mut bad = login_of(&sim);
    bad.password = Secret::new("wrong");
    let e = flow::login(&bad).await.unwrap_err();
    assert_eq!(e.code, Code::Source);
    let text = format!("{:#}", e.error);
    assert!(
        text.contains("InvalidLogin") && !text.contains("wrong"),
        "{text}"
    );
}

#[tokio::test]
async fn paged_changed_areas_cover_every_byte_written_since_the_change_id() {
    let (_dir, sim) = start().await;
    let c = client(&sim).await;
    let (first, disks) = snapshot(&c, &sim).await;
    calls::remove_snapshot(&c, &first).await.unwrap();
    let mut writes = std::collections::BTreeMap::new();
    for (key, capacity) in sim.disks() {
        let w = odd_writes(capacity, 3);
        for (offset, data) in &w {
            sim.write(sim.vm(), key, *offset, data).unwrap();
        }
        writes.insert(key, w);
    }
    let (second, _) = snapshot(&c, &sim).await;
    let before = sim.calls("QueryChangedDiskAreas");
    for d in &disks {
        let from = d.change_id.as_deref().unwrap();
        let map = calls::changed_areas(&c, &vm(&sim), &second, d.key, d.capacity, from)
            .await
            .unwrap();
        assert_covers(&map, &writes[&d.key]);
        // Not the whole disk: only what was written (in whole grains).
        assert!(map.marked_bytes() < 8 * CBT_BLOCK, "{}", map.marked_bytes());
    }
    // The simulator's pages hold at most 4 areas or 1 MiB: paging was needed.
    assert!(sim.calls("QueryChangedDiskAreas") - before > 2 * 4);
    calls::remove_snapshot(&c, &second).await.unwrap();
    assert!(sim.snapshots(sim.vm()).is_empty());
    c.logout().await;
}

#[tokio::test]
async fn star_lists_exactly_the_allocated_blocks() {
    let (_dir, sim) = start().await;
    let c = client(&sim).await;
    let (key, capacity) = sim.disks()[1];
    let w = odd_writes(capacity, 1);
    for (offset, data) in &w {
        sim.write(sim.vm(), key, *offset, data).unwrap();
    }
    let (snap, _) = snapshot(&c, &sim).await;
    let map = calls::changed_areas(&c, &vm(&sim), &snap, key, capacity, "*")
        .await
        .unwrap();
    assert_covers(&map, &w);
    let touched: std::collections::BTreeSet<u64> = w
        .iter()
        .flat_map(|(o, d)| o / CBT_BLOCK..=(o + d.len() as u64 - 1) / CBT_BLOCK)
        .collect();
    let marked: std::collections::BTreeSet<u64> = (0..capacity.div_ceil(CBT_BLOCK))
        .filter(|b| map.is_marked(*b))
        .collect();
    assert_eq!(marked, touched);
    calls::remove_snapshot(&c, &snap).await.unwrap();
    c.logout().await;
}

#[tokio::test]
async fn an_expired_session_is_replaced_once_and_the_call_goes_through() {
    let (_dir, sim) = start().await;
    let c = client(&sim).await;
    let old = c.session_token().await;
    sim.expire_sessions();
    let config = calls::vm_config(&c, &vm(&sim)).await.unwrap();
    assert_eq!(config.disks.len(), 2);
    assert_eq!(c.relogins(), 1);
    assert_ne!(c.session_token().await, old);
    // A task polled across an expiry too.
    let (snap, _) = snapshot(&c, &sim).await;
    sim.expire_sessions();
    calls::remove_snapshot(&c, &snap).await.unwrap();
    assert_eq!(c.relogins(), 2);
    assert!(sim.snapshots(sim.vm()).is_empty());
    c.logout().await;
}

/// A state whose disks start at a snapshot taken (and removed) now.
async fn state_now(sim: &Simulator, path: &std::path::Path) -> VsphereState {
    let c = client(sim).await;
    let (snap, disks) = snapshot(&c, sim).await;
    calls::remove_snapshot(&c, &snap).await.unwrap();
    c.logout().await;
    let mut state = VsphereState::new(sim.vm(), sim.url());
    state.point = Some("p0".into());
    for d in disks {
        state.disks.insert(
            d.key,
            VsphereDisk {
                backing_uuid: d.uuid,
                change_id: d.change_id.unwrap(),
                capacity: d.capacity,
                point: "p0".into(),
            },
        );
    }
    chain::save_vsphere(path, &state).unwrap();
    state
}

fn run_options(sim: &Simulator, out: &std::path::Path, state: &std::path::Path) -> RunOptions {
    RunOptions {
        login: login_of(sim),
        vm: sim.vm().to_owned(),
        output: Output::Point(crate::repo::point_writer::PointTarget::Dir(
            out.to_path_buf(),
        )),
        state: flow::StateAt::File(state.to_path_buf()),
        full: false,
        enable_cbt: false,
        quiesce: false,
        fallback_full: false,
        break_lock: false,
        dp: crate::export::DataPlaneOptions {
            connections: 2,
            inflight: None,
            request_size: 1 << 20,
            codec: cbtstream_proto::stream::Codec::Zstd,
            level: 1,
            threads: 1,
            connect_timeout: std::time::Duration::from_secs(5),
            request_timeout: std::time::Duration::from_secs(5),
            retries: 1,
            retry_delay: std::time::Duration::from_millis(10),
            extended_headers: true,
        },
    }
}

#[tokio::test]
async fn a_cbt_reset_is_a_broken_chain_and_leaves_the_state_and_no_snapshot() {
    let (dir, sim) = start().await;
    let (out, state) = (dir.path().join("out"), dir.path().join("vm.json"));
    state_now(&sim, &state).await;
    // The chain's point is where this one goes (else the run starts over with a full).
    std::fs::create_dir_all(out.join("p0")).unwrap();
    std::fs::write(out.join("p0").join("point.json"), b"{}").unwrap();
    let before = std::fs::read(&state).unwrap();
    sim.reset_cbt(sim.vm(), 2001).unwrap();
    let e = flow::run(run_options(&sim, &out, &state))
        .await
        .unwrap_err();
    assert_eq!(e.code, Code::Source);
    let text = format!("{:#}", e.error);
    assert!(
        text.contains("broken chain") && text.contains("disk 2001") && text.contains("FileFault"),
        "{text}"
    );
    assert!(text.contains("--fallback-full"), "{text}");
    assert_eq!(std::fs::read(&state).unwrap(), before);
    assert!(sim.snapshots(sim.vm()).is_empty());
    assert_eq!(
        std::fs::read_dir(&out).unwrap().count(),
        1,
        "only the chain's point"
    );
}

#[tokio::test]
async fn fallback_full_plans_the_allocated_areas_of_a_reset_disk() {
    let (dir, sim) = start().await;
    let state_path = dir.path().join("vm.json");
    let (key, capacity) = sim.disks()[1];
    let w = odd_writes(capacity, 2);
    for (offset, data) in &w {
        sim.write(sim.vm(), key, *offset, data).unwrap();
    }
    let state = state_now(&sim, &state_path).await;
    sim.reset_cbt(sim.vm(), key).unwrap();
    let c = client(&sim).await;
    let (snap, disks) = snapshot(&c, &sim).await;
    let disk = disks.iter().find(|d| d.key == key).unwrap();
    let mut opts = run_options(&sim, dir.path(), &state_path);
    let broken = flow::plan_disk(&c, &opts, &vm(&sim), &snap, disk, Some(&state)).await;
    assert_eq!(broken.err().map(|e| e.code), Some(Code::Source));
    opts.fallback_full = true;
    let planned = flow::plan_disk(&c, &opts, &vm(&sim), &snap, disk, Some(&state))
        .await
        .unwrap();
    assert!(planned.base.is_none(), "a full");
    assert_eq!(Some(&planned.change_id), disk.change_id.as_ref());
    // Every written block is in the full's allocated areas.
    for (offset, data) in &w {
        let last = offset + data.len() as u64 - 1;
        for b in offset / CBT_BLOCK..=last / CBT_BLOCK {
            assert!(planned.bitmap[(b / 8) as usize] & (0x80 >> (b % 8)) != 0);
        }
    }
    // The other disk still continues its chain.
    let other = disks.iter().find(|d| d.key != key).unwrap();
    let planned = flow::plan_disk(&c, &opts, &vm(&sim), &snap, other, Some(&state))
        .await
        .unwrap();
    assert_eq!(planned.base.map(|b| b.point), Some("p0".to_owned()));
    calls::remove_snapshot(&c, &snap).await.unwrap();
    c.logout().await;
}

#[tokio::test]
async fn a_grown_disk_is_read_whole() {
    let (dir, sim) = start().await;
    let state_path = dir.path().join("vm.json");
    let state = state_now(&sim, &state_path).await;
    let (key, capacity) = sim.disks()[0];
    sim.resize(sim.vm(), key, capacity + 1024 * 1024).unwrap();
    let c = client(&sim).await;
    let (snap, disks) = snapshot(&c, &sim).await;
    let disk = disks.iter().find(|d| d.key == key).unwrap();
    assert_eq!(disk.capacity, capacity + 1024 * 1024);
    let opts = run_options(&sim, dir.path(), &state_path);
    let planned = flow::plan_disk(&c, &opts, &vm(&sim), &snap, disk, Some(&state))
        .await
        .unwrap();
    assert!(planned.base.is_none());
    calls::remove_snapshot(&c, &snap).await.unwrap();
    c.logout().await;
}

#[tokio::test]
async fn a_failed_run_removes_its_snapshot_and_keeps_the_state() {
    let (dir, sim) = start().await;
    let (out, state) = (dir.path().join("out"), dir.path().join("vm.json"));
    // Where the point directory should go is a file: writing the point fails.
    std::fs::write(&out, b"not a directory").unwrap();
    state_now(&sim, &state).await;
    let before = std::fs::read(&state).unwrap();
    let e = flow::run(run_options(&sim, &out, &state))
        .await
        .unwrap_err();
    assert_eq!(e.code, Code::Output, "{:#}", e.error);
    assert_eq!(
        sim.calls("CreateSnapshotEx_Task"),
        sim.calls("RemoveSnapshot_Task")
    );
    assert!(sim.snapshots(sim.vm()).is_empty());
    assert_eq!(std::fs::read(&state).unwrap(), before);
    assert_eq!(std::fs::read(&out).unwrap(), b"not a directory");
}

#[tokio::test]
async fn a_state_of_another_vm_or_source_is_refused_before_any_snapshot() {
    let (dir, sim) = start().await;
    let state = dir.path().join("vm.json");
    chain::save_vsphere(&state, &VsphereState::new("vm-7", sim.url())).unwrap();
    let e = flow::run(run_options(&sim, dir.path(), &state))
        .await
        .unwrap_err();
    assert_eq!(e.code, Code::Usage);
    assert!(format!("{:#}", e.error).contains("belongs to VM vm-7"));
    std::fs::write(&state, "{\"version\": 1, \"vm\": \"x\"}").unwrap();
    let e = flow::run(run_options(&sim, dir.path(), &state))
        .await
        .unwrap_err();
    assert_eq!(e.code, Code::Integrity);
    assert_eq!(sim.calls("CreateSnapshotEx_Task"), 0);
}

#[tokio::test]
async fn a_vm_found_by_instance_uuid() {
    let (_dir, sim) = start().await;
    let c = client(&sim).await;
    let found = calls::find_vm(&c, &sim.vm_instance_uuid()).await.unwrap();
    assert_eq!(found, vm(&sim));
    let e = calls::find_vm(&c, "00000000-0000-0000-0000-000000000000")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no VM has this UUID"), "{e}");
    c.logout().await;
}

#[tokio::test]
async fn the_file_service_url_names_the_flat_extent_datacenter_and_datastore() {
    let (_dir, sim) = start().await;
    let c = client(&sim).await;
    let dc = calls::datacenter_of(&c, &vm(&sim)).await.unwrap();
    assert_eq!(dc, "dc1");
    let config = calls::vm_config(&c, &vm(&sim)).await.unwrap();
    let (ds, path) = calls::split_datastore_path(&config.disks[1].file_name).unwrap();
    let url = calls::folder_url(
        &c.endpoint().authority(),
        &dc,
        ds,
        &calls::flat_extent(path).unwrap(),
    );
    assert_eq!(
        url,
        format!(
            "https://{}/folder/testvm/testvm_1-flat.vmdk?dcPath=dc1&dsName=ds1",
            c.endpoint().authority()
        )
    );
    c.logout().await;
}

#[tokio::test]
async fn a_datacenter_in_a_folder_has_the_folder_in_its_dc_path() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::start(SimConfig {
        datacenter_folder: Some("Europe West".into()),
        ..SimConfig::for_tests(dir.path().join("ds"))
    })
    .await
    .unwrap();
    let c = client(&sim).await;
    let dc = calls::datacenter_of(&c, &vm(&sim)).await.unwrap();
    assert_eq!(dc, "Europe West/dc1");
    let url = calls::folder_url(&c.endpoint().authority(), &dc, "ds1", "testvm/testvm.vmdk");
    assert!(
        url.ends_with("?dcPath=Europe%20West/dc1&dsName=ds1"),
        "{url}"
    );
    c.logout().await;
}

/// A server that answers every request with what `answer(path)` says, over TLS with a
/// test CA: (status, session header, body).
type Answer = (u16, Option<&'static str>, Vec<u8>);

async fn hostile(
    answer: impl Fn(&str) -> Answer + Send + Sync + 'static,
) -> (tempfile::TempDir, String, Trust) {
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    let dir = tempfile::tempdir().unwrap();
    let pki = cbtstream_testkit::certs::TestPki::generate(dir.path()).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config().unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "https://127.0.0.1:{}/",
        listener.local_addr().unwrap().port()
    );
    let answer = std::sync::Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, answer) = (acceptor.clone(), answer.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (status, token, body) = answer(req.uri().path());
                    let mut resp = hyper::Response::builder().status(status);
                    if let Some(t) = token {
                        resp = resp.header("vmware-api-session-id", t);
                    }
                    let resp = resp.body(http_body_util::Full::new(bytes::Bytes::from(body)));
                    async move { resp }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    let trust = Trust::CaFile(pki.ca_pem_path.clone());
    (dir, url, trust)
}

fn content(version: &str) -> Vec<u8> {
    serde_json::json!({"_typeName": "ServiceContent", "about": {"apiVersion": version},
        "sessionManager": {"_typeName": "ManagedObjectReference", "type": "SessionManager", "value": "SessionManager"}})
    .to_string()
    .into_bytes()
}

async fn login_to(url: &str, trust: &Trust) -> Result<Client, super::client::VsphereError> {
    let opts = super::client::ClientOptions::new(trust.clone());
    Client::login(url, "u", &Secret::new("pw"), &opts).await
}

#[tokio::test]
async fn hostile_answers_are_clear_errors_without_unbounded_reads() {
    use super::client::VsphereError;
    // 17 MiB of content: refused at the 16 MiB cap.
    let (_d, url, trust) = hostile(|_| (200, None, vec![b' '; 17 << 20])).await;
    let e = login_to(&url, &trust).await.unwrap_err();
    assert!(
        matches!(e, VsphereError::TooLarge { limit, .. } if limit == 16 << 20),
        "{e}"
    );
    // A release that would leave the URL path.
    let (_d, url, trust) = hostile(|_| (200, None, content("../../x"))).await;
    let e = login_to(&url, &trust).await.unwrap_err().to_string();
    assert!(e.contains("is not a release"), "{e}");
    // A 500 that is not a fault; then a login without a token.
    let (_d, url, trust) = hostile(|p| match p.ends_with("/Login") {
        true => (500, None, b"<html>proxy error</html>".to_vec()),
        false => (200, None, content("8.0.2.0")),
    })
    .await;
    let e = login_to(&url, &trust).await.unwrap_err().to_string();
    assert!(
        e.contains("answered SessionManager.Login with HTTP 500"),
        "{e}"
    );
    let (_d, url, trust) = hostile(|p| match p.ends_with("/Login") {
        true => (200, None, b"{}".to_vec()),
        false => (200, None, content("8.0.2.0")),
    })
    .await;
    let e = login_to(&url, &trust).await.unwrap_err().to_string();
    assert!(e.contains("no vmware-api-session-id header"), "{e}");
}

#[tokio::test]
async fn a_fault_is_typed_and_its_text_cleaned_and_capped() {
    let (_d, url, trust) = hostile(|p| {
        if p.ends_with("/content") {
            return (200, None, content("8.0.2.0"));
        }
        if p.ends_with("/Login") {
            return (200, Some("tok"), b"{}".to_vec());
        }
        let fault = serde_json::json!({"_typeName": "InvalidState",
            "faultMessage": [{"message": format!("bad\u{1b}[31m{}", "x".repeat(5000))}]});
        (500, None, fault.to_string().into_bytes())
    })
    .await;
    let c = login_to(&url, &trust).await.unwrap();
    let e = calls::vm_config(&c, &MoRef::new("VirtualMachine", "vm-1"))
        .await
        .unwrap_err();
    let fault = e.fault().unwrap();
    assert_eq!(fault.type_name, "InvalidState");
    assert!(fault.message.starts_with("bad[31mxxx") && fault.message.len() <= 503);
    assert!(!e.to_string().contains('\u{1b}'));
}

#[test]
fn commit_moves_a_pending_point_into_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.json");
    let disk = |point: &str, change: &str| VsphereDisk {
        backing_uuid: None,
        change_id: change.into(),
        capacity: 1 << 20,
        point: point.into(),
    };
    let mut state = VsphereState::new("vm-42", "https://vc/".into());
    state.point = Some("p1".into());
    state.disks.insert(2000, disk("p1", "u/1"));
    state.pending = Some(chain::VspherePending {
        point: "p2".into(),
        disks: [(2000, disk("p2", "u/2"))].into(),
        created_unix_secs: 0,
    });
    chain::save_vsphere(&path, &state).unwrap();
    let e = super::state::commit_pending(&path, Some("p9")).unwrap_err();
    assert_eq!(e.code, Code::Usage);
    assert_eq!(chain::load_vsphere(&path).unwrap(), Some(state));
    assert_eq!(
        super::state::commit_pending(&path, Some("p2"))
            .unwrap()
            .as_deref(),
        Some("p2")
    );
    let after = chain::load_vsphere(&path).unwrap().unwrap();
    assert_eq!(after.point.as_deref(), Some("p2"));
    assert_eq!(after.disks[&2000].change_id, "u/2");
    assert!(after.pending.is_none());
    assert_eq!(
        super::state::commit_pending(&path, None).unwrap_err().code,
        Code::Usage
    );
    // A XenServer state is not ours.
    let xen = dir.path().join("chain.json");
    std::fs::write(&xen, "{\"version\": 2}").unwrap();
    assert!(super::state::commit_pending(&xen, None).unwrap().is_none());
}

#[tokio::test]
async fn a_generic_service_ticket_for_the_flat_extent() {
    let (_dir, sim) = start().await;
    let c = client(&sim).await;
    let url = calls::folder_url(
        &c.endpoint().authority(),
        "dc1",
        "ds1",
        "testvm/testvm-flat.vmdk",
    );
    let ticket = calls::generic_ticket(&c, &url).await.unwrap();
    assert!(!ticket.expose().is_empty());
    assert_eq!(format!("{ticket:?}"), "***");
    c.logout().await;
}
