//! The simulator in-process, driven over HTTPS like a real XenServer.

mod common;

use std::time::{Duration, Instant};

use cbtstream_proto::xmlrpc::{encode_call, Value};
use cbtstream_xapi_sim::XapiClient;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_records_and_wire_format() {
    bounded(async {
        let env = Env::start(|_| {}).await;
        let (c, sim) = (&env.c, &env.sim);
        assert!(env.session.starts_with("OpaqueRef:"));

        let e = c
            .call_err(
                "session.login_with_password",
                &[sim.user().into(), "nope".into()],
            )
            .await
            .unwrap();
        assert_eq!(e.code(), Some("SESSION_AUTHENTICATION_FAILED"));

        let vm = env.call("VM.get_by_uuid", &[sim.vm_uuid()]).await;
        assert_eq!(vm.as_str(), Some(sim.vm_ref()));
        let rec = env.call("VM.get_record", &[sim.vm_ref()]).await;
        assert_eq!(rec.get("uuid").unwrap().as_str(), Some(sim.vm_uuid()));
        assert_eq!(rec.get("power_state").unwrap().as_str(), Some("Running"));
        assert_eq!(rec.get("is_a_snapshot").unwrap().as_bool(), Some(false));
        let vbds = env.call("VM.get_VBDs", &[sim.vm_ref()]).await;
        let vbds = vbds.as_array().unwrap();
        // The disk and the empty CD drive.
        assert_eq!(vbds.len(), 2);
        let vbd = env.disk_vbds(sim.vm_ref()).await.remove(0);
        let vbd = env.call("VBD.get_record", &[&vbd]).await;
        assert_eq!(vbd.get("VDI").unwrap().as_str(), Some(env.vdi.as_str()));
        assert_eq!(vbd.get("VM").unwrap().as_str(), Some(sim.vm_ref()));
        assert_eq!(vbd.get("currently_attached").unwrap().as_bool(), Some(true));

        let vdi = env.call("VDI.get_by_uuid", &[sim.vdi_uuid()]).await;
        assert_eq!(vdi.as_str(), Some(env.vdi.as_str()));
        let rec = env.call("VDI.get_record", &[&env.vdi]).await;
        // XAPI's wire types: ints as decimal strings, booleans as <boolean>, enums as strings.
        assert_eq!(rec.get("virtual_size"), Some(&Value::from("4194304")));
        assert_eq!(rec.get("cbt_enabled"), Some(&Value::Bool(true)));
        assert_eq!(rec.get("type"), Some(&Value::from("user")));
        assert_eq!(rec.get("snapshot_of"), Some(&Value::from("OpaqueRef:NULL")));
        assert_eq!(
            rec.get("snapshot_time"),
            Some(&Value::DateTime("19700101T00:00:00Z".into()))
        );
        for f in ["SR", "VBDs", "snapshots", "other_config", "read_only", "sharable", "managed", "missing"] {
            assert!(rec.get(f).is_some(), "no {f} in the VDI record");
        }
        assert_eq!(env.call("VDI.get_virtual_size", &[&env.vdi]).await, Value::from("4194304"));
        assert_eq!(env.call("VDI.get_is_a_snapshot", &[&env.vdi]).await, Value::Bool(false));

        // The exact bytes of a success, as XAPI's serializer writes them.
        let (status, body) = c
            .post(
                None,
                "POST",
                encode_call("VDI.get_type", &env.params(&[&env.vdi])).as_bytes(),
            )
            .await
            .unwrap();
        assert_eq!(status, 200);
        assert_eq!(
            String::from_utf8(body).unwrap(),
            "<?xml version=\"1.0\"?><methodResponse><params><param><value><struct><member><name>Status</name><value>Success</value></member><member><name>Value</name><value>user</value></member></struct></value></param></params></methodResponse>"
        );
        // Void is an empty value.
        assert_eq!(
            env.call("VDI.remove_from_other_config", &[&env.vdi, "absent"]).await,
            Value::from("")
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_of_bad_calls() {
    bounded(async {
        let env = Env::start(|_| {}).await;
        assert_code(
            &env.fail("VDI.no_such_call", &[&env.vdi]).await,
            "MESSAGE_METHOD_UNKNOWN",
            &["VDI.no_such_call"],
        );
        assert_code(
            &env.fail("VDI.get_record", &[]).await,
            "MESSAGE_PARAMETER_COUNT_MISMATCH",
            &["VDI.get_record", "2", "1"],
        );
        assert_code(
            &env.fail("VDI.get_record", &["OpaqueRef:nope"]).await,
            "HANDLE_INVALID",
            &["VDI", "OpaqueRef:nope"],
        );
        assert_code(
            &env.fail("VDI.get_by_uuid", &["nope"]).await,
            "UUID_INVALID",
            &["VDI", "nope"],
        );
        let e = env
            .c
            .call_err(
                "VDI.resize",
                &[
                    env.session.as_str().into(),
                    env.vdi.as_str().into(),
                    Value::Bool(true),
                ],
            )
            .await
            .unwrap();
        assert_code(&e, "FIELD_TYPE_ERROR", &["size"]);
        // A session that is not a string is not a session.
        let e = env
            .c
            .call_err("VDI.get_record", &[Value::Int(3), env.vdi.as_str().into()])
            .await
            .unwrap();
        assert_code(&e, "FIELD_TYPE_ERROR", &["session_id"]);

        // Not XML-RPC: HTTP 500 with a fault. Other paths and methods: plain HTTP errors.
        let (status, body) = env.c.post(None, "POST", b"<nonsense").await.unwrap();
        assert_eq!(status, 500);
        assert!(String::from_utf8_lossy(&body).contains("<fault>"));
        let (status, _) = env.c.post(None, "GET", b"").await.unwrap();
        assert_eq!(status, 405);
        let (status, _) = env.c.post(Some("/nope"), "POST", b"").await.unwrap();
        assert_eq!(status, 404);
        // /RPC2 and /xmlrpc are the same endpoint.
        for path in ["/RPC2", "/xmlrpc"] {
            let body = encode_call("VDI.get_type", &env.params(&[&env.vdi]));
            let (status, body) = env
                .c
                .post(Some(path), "POST", body.as_bytes())
                .await
                .unwrap();
            assert_eq!(status, 200);
            assert!(String::from_utf8_lossy(&body).contains("<value>user</value>"));
        }
        // The simulator is still fine.
        env.call("VDI.get_record", &[&env.vdi]).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_config_map() {
    bounded(async {
        let env = Env::start(|_| {}).await;
        env.call("VDI.add_to_other_config", &[&env.vdi, "k", "v"])
            .await;
        assert_code(
            &env.fail("VDI.add_to_other_config", &[&env.vdi, "k", "w"])
                .await,
            "MAP_DUPLICATE_KEY",
            &["VDI", "other_config", &env.vdi, "k"],
        );
        let m = env.call("VDI.get_other_config", &[&env.vdi]).await;
        assert_eq!(m.get("k"), Some(&Value::from("v")));
        env.call("VDI.remove_from_other_config", &[&env.vdi, "k"])
            .await;
        env.call("VDI.remove_from_other_config", &[&env.vdi, "k"])
            .await;
        let map = Value::record([("a", Value::from("b"))]);
        env.c
            .call(
                "VDI.set_other_config",
                &[
                    env.session.as_str().into(),
                    env.vdi.as_str().into(),
                    map.clone(),
                ],
            )
            .await
            .unwrap();
        assert_eq!(env.call("VDI.get_other_config", &[&env.vdi]).await, map);
        // A snapshot's other_config starts empty.
        let s = env.snapshot(&env.vdi).await;
        assert_eq!(
            env.call("VDI.get_other_config", &[&s]).await,
            Value::Struct(Default::default())
        );
    })
    .await;
}

/// Writes in the first block, across a 64 KiB boundary and into the partial last block of
/// a disk whose size is a multiple of 512 but not of 64 KiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_blocks_cover_every_write() {
    bounded(async {
        let size = (4 << 20) + 512; // 65 blocks, the last one 512 bytes
        let env = Env::start(|c| c.disk_size = size).await;
        env.write(10, b"before").await;
        let s1 = env.snapshot(&env.vdi).await;
        let rec = env.call("VDI.get_record", &[&s1]).await;
        assert_eq!(rec.get("is_a_snapshot"), Some(&Value::Bool(true)));
        assert_eq!(rec.get("snapshot_of"), Some(&Value::from(env.vdi.as_str())));
        assert_eq!(rec.get("cbt_enabled"), Some(&Value::Bool(true)));
        let snaps = env.call("VDI.get_snapshots", &[&env.vdi]).await;
        assert_eq!(snaps, Value::Array(vec![s1.as_str().into()]));

        env.write(3, b"a").await;
        env.write(2 * BLOCK - 2, b"bcde").await; // blocks 1 and 2
        env.write(size - 512, &[7; 512]).await; // block 64
        let s2 = env.snapshot(&env.vdi).await;
        assert_eq!(env.changed(&s1, &s2, size).await, vec![0, 1, 2, 64]);

        env.write(40 * BLOCK, &vec![1; 3 * BLOCK as usize]).await; // 40, 41, 42
        let s3 = env.snapshot(&env.vdi).await;
        assert_eq!(env.changed(&s2, &s3, size).await, vec![40, 41, 42]);
        // Over two increments: the OR of both logs.
        assert_eq!(env.changed(&s1, &s3, size).await, vec![0, 1, 2, 40, 41, 42, 64]);
        // To the live leaf (not attached): its current log.
        env.write(5 * BLOCK, b"live").await;
        assert_eq!(env.changed(&s3, &env.vdi, size).await, vec![5]);
        // The snapshots are real copies: they kept their data.
        let p2 = env.sim.vdi_path(&env.uuid_of(&s2).await).unwrap();
        let data = std::fs::read(p2).unwrap();
        assert_eq!(data.len() as u64, size);
        assert_eq!(&data[2 * BLOCK as usize - 2..2 * BLOCK as usize + 2], b"bcde");
        assert_eq!(&data[40 * BLOCK as usize..40 * BLOCK as usize + 1], &[0]);

        // Backwards, unrelated or the same VDI: 460.
        let unrelated = [
            "",
            "Failed to calculate changed blocks for given VDIs. [opterr=Source and target VDI are unrelated]",
            "",
        ];
        assert_code(
            &env.fail("VDI.list_changed_blocks", &[&s3, &s1]).await,
            "SR_BACKEND_FAILURE_460",
            &unrelated,
        );
        assert_code(
            &env.fail("VDI.list_changed_blocks", &[&s2, &s2]).await,
            "SR_BACKEND_FAILURE_460",
            &[
                "",
                "Failed to calculate changed blocks for given VDIs. [opterr=Source and target VDI are same]",
                "",
            ],
        );
        // A snapshot of a snapshot is outside the chain.
        let ss = env.snapshot(&s2).await;
        assert_code(
            &env.fail("VDI.list_changed_blocks", &[&s1, &ss]).await,
            "SR_BACKEND_FAILURE_460",
            &unrelated,
        );
        // Writing past the end is refused.
        let e = env.fail("sim.write", &[&env.vdi, &(size - 1).to_string(), "AAA="]).await;
        assert_eq!(e.code(), Some("VALUE_NOT_SUPPORTED"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_serves_the_snapshot_and_attaches_it() {
    bounded(async {
        let env = Env::start(|_| {}).await;
        let pattern: Vec<u8> = (0..3 * BLOCK as usize).map(|i| (i % 251) as u8).collect();
        env.write(BLOCK / 2, &pattern).await;
        let s0 = env.snapshot(&env.vdi).await;
        env.write(0, b"changed").await;
        let s1 = env.snapshot(&env.vdi).await;
        env.write(100, b"later, not in s1").await;

        let uuid = env.uuid_of(&s1).await;
        let v = env.call("VDI.get_nbd_info", &[&s1]).await;
        let rec = &v.as_array().unwrap()[0];
        assert_eq!(
            rec.get("exportname").unwrap().as_str().unwrap(),
            format!("/{uuid}?session_id={}", env.session)
        );
        assert_eq!(rec.get("address"), Some(&Value::from("127.0.0.1")));
        assert_eq!(
            rec.get("port"),
            Some(&Value::from(env.sim.nbd_port().to_string()))
        );
        assert_eq!(rec.get("cert"), Some(&Value::from(env.sim.cert_pem())));
        assert_eq!(rec.get("subject"), Some(&Value::from("localhost")));

        let mut nbd = env.nbd_connect(&s1).await.unwrap();
        assert_eq!(nbd.size, 4 << 20);
        let data = nbd.read_all().await.unwrap();
        let mut expected = vec![0u8; 4 << 20];
        expected[BLOCK as usize / 2..BLOCK as usize / 2 + pattern.len()].copy_from_slice(&pattern);
        expected[..7].copy_from_slice(b"changed");
        assert!(data == expected, "the NBD export differs from the snapshot");
        assert!(env.sim.is_attached(&uuid));

        // Attached to dom0: list_changed_blocks, data_destroy and destroy refuse.
        assert_code(
            &env.fail("VDI.list_changed_blocks", &[&s0, &s1]).await,
            "VDI_IN_USE",
            &[&s1, "list_changed_blocks"],
        );
        let t = Instant::now();
        assert_code(
            &env.fail("VDI.data_destroy", &[&s1]).await,
            "VDI_IN_USE",
            &[&s1, "data_destroy"],
        );
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "data_destroy did not wait"
        );
        assert_code(
            &env.fail("VDI.destroy", &[&s1]).await,
            "VDI_IN_USE",
            &[&s1, "destroy"],
        );
        // ... while another snapshot is not affected.
        assert_eq!(
            env.changed(&s0, &env.vdi, 4 << 20).await,
            vec![0],
            "s1's log plus the live log"
        );

        nbd.disconnect().await;
        // A client retries data_destroy until the VDI is detached (the lag is 50 ms and
        // data_destroy waits 300 ms, so the first retry normally succeeds).
        let mut tries = 0;
        loop {
            tries += 1;
            match env
                .c
                .try_call("VDI.data_destroy", &env.params(&[&s1]))
                .await
                .unwrap()
            {
                Ok(_) => break,
                Err(e) if e.is("VDI_IN_USE") && tries < 20 => continue,
                Err(e) => panic!("data_destroy: {}", e.unredacted()),
            }
        }
        assert!(!env.sim.is_attached(&uuid));
        assert_eq!(
            env.call("VDI.get_type", &[&s1]).await,
            Value::from("cbt_metadata")
        );
        assert_eq!(env.sim.vdi_path(&uuid), None);
        assert!(!env.sim.data_dir().join(format!("{uuid}.raw")).exists());
        // Idempotent.
        env.call("VDI.data_destroy", &[&s1]).await;
        assert_code(
            &env.fail("VDI.get_nbd_info", &[&s1]).await,
            "VDI_INCOMPATIBLE_TYPE",
            &[&s1, "cbt_metadata"],
        );
        // The old export name no longer resolves: the server closes the connection.
        let (port, name) = (
            env.sim.nbd_port(),
            format!("/{uuid}?session_id={}", env.session),
        );
        assert!(Nbd::connect(port, &name, env.sim.cert_der()).await.is_err());
        // The metadata still serves as a base and as a target.
        assert_eq!(env.changed(&s0, &s1, 4 << 20).await, vec![0]);
        let s2 = env.snapshot(&env.vdi).await;
        assert_eq!(env.changed(&s1, &s2, 4 << 20).await, vec![0]);
    })
    .await;
}

/// A `data_destroy` that starts while the VDI is attached succeeds once the connection
/// closes and the lag runs out, within its wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_destroy_waits_for_the_detach() {
    bounded(async {
        let env = Env::start(|c| c.data_destroy_timeout = Duration::from_secs(20)).await;
        let s = env.snapshot(&env.vdi).await;
        let nbd = env.nbd_connect(&s).await.unwrap();
        let (c, params) = (env.c.clone(), env.params(&[&s]));
        let call = tokio::spawn(async move { c.try_call("VDI.data_destroy", &params).await });
        // Close the connection once the call is waiting in the server (a bounded poll).
        while env.sim.data_destroy_waiters() == 0 {
            assert!(!call.is_finished(), "data_destroy returned while attached");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        nbd.disconnect().await;
        call.await.unwrap().unwrap().unwrap();
        assert_eq!(
            env.call("VDI.get_type", &[&s]).await,
            Value::from("cbt_metadata")
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_refuses_bad_exports() {
    bounded(async {
        let env = Env::start(|_| {}).await;
        let s = env.snapshot(&env.vdi).await;
        let (port, name) = env.nbd_info(&s).await;
        let cert = env.sim.cert_der().to_vec();
        // Unknown VDI, unknown session, garbage.
        let uuid = env.uuid_of(&s).await;
        for bad in [
            name.replace(&uuid, "00000000-0000-0000-0000-000000000000"),
            format!("/{uuid}?session_id=OpaqueRef:nope"),
            format!("/{uuid}"),
            String::new(),
        ] {
            assert!(
                Nbd::connect(port, &bad, &cert).await.is_err(),
                "{bad:?} was served"
            );
        }
        // No nbd network: get_nbd_info returns [] and the server refuses.
        env.call_values("sim.set_nbd_available", vec![Value::Bool(false)])
            .await;
        assert_eq!(
            env.call("VDI.get_nbd_info", &[&s]).await,
            Value::Array(vec![])
        );
        assert!(Nbd::connect(port, &name, &cert).await.is_err());
        env.sim.set_nbd_available(true);
        Nbd::connect(port, &name, &cert)
            .await
            .unwrap()
            .disconnect()
            .await;
        // After logout, the export name (which carries the session) is dead.
        env.call("session.logout", &[]).await;
        assert!(Nbd::connect(port, &name, &cert).await.is_err());
    })
    .await;
}

/// nbdcopy (libnbd) reads the export with the URI a user would build from get_nbd_info.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_reads_the_export() {
    if !cbtstream_testkit::require_tools("nbdcopy_reads_the_export", &["nbdcopy"]) {
        return;
    }
    bounded(async {
        let env = Env::start(|_| {}).await;
        env.write(12345, b"seen by nbdcopy").await;
        let s = env.snapshot(&env.vdi).await;
        let copy = env.nbdcopy_snapshot(&s).await;
        assert_eq!(&copy[12345..12345 + 15], b"seen by nbdcopy");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_destroy_rules_and_disable_cbt() {
    bounded(async {
        let env = Env::start(|_| {}).await;
        assert_code(
            &env.fail("VDI.data_destroy", &[&env.vdi]).await,
            "OPERATION_NOT_ALLOWED",
            &[&format!("VDI is not a snapshot: {}", env.vdi)],
        );
        let s1 = env.snapshot(&env.vdi).await;
        env.write(0, b"x").await;

        env.call("VDI.disable_cbt", &[&env.vdi]).await;
        env.call("VDI.disable_cbt", &[&env.vdi]).await; // idempotent
        assert_eq!(
            env.call("VDI.get_cbt_enabled", &[&env.vdi]).await,
            Value::Bool(false)
        );
        // The old snapshot keeps its flag; a new one has no CBT.
        assert_eq!(
            env.call("VDI.get_cbt_enabled", &[&s1]).await,
            Value::Bool(true)
        );
        let s2 = env.snapshot(&env.vdi).await;
        assert_eq!(
            env.call("VDI.get_cbt_enabled", &[&s2]).await,
            Value::Bool(false)
        );
        assert_code(
            &env.fail("VDI.data_destroy", &[&s2]).await,
            "VDI_NO_CBT_METADATA",
            &[&s2],
        );
        assert_eq!(
            env.fail("VDI.list_changed_blocks", &[&s1, &s2])
                .await
                .code(),
            Some("SR_BACKEND_FAILURE_460")
        );
        assert_code(
            &env.fail("VDI.enable_cbt", &[&s1]).await,
            "OPERATION_NOT_ALLOWED",
            &[&format!("VDI is a snapshot: {s1}")],
        );

        // Re-enabling starts a new chain: the old snapshot stays unrelated.
        env.call("VDI.enable_cbt", &[&env.vdi]).await;
        env.call("VDI.enable_cbt", &[&env.vdi]).await;
        let s3 = env.snapshot(&env.vdi).await;
        env.write(BLOCK * 3, b"y").await;
        let s4 = env.snapshot(&env.vdi).await;
        assert_eq!(env.changed(&s3, &s4, 4 << 20).await, vec![3]);
        assert_eq!(
            env.fail("VDI.list_changed_blocks", &[&s1, &s4])
                .await
                .code(),
            Some("SR_BACKEND_FAILURE_460")
        );

        // cbt_metadata refuses what XAPI refuses.
        env.call("VDI.data_destroy", &[&s3]).await;
        for m in ["VDI.snapshot", "VDI.get_nbd_info"] {
            assert_code(
                &env.fail(m, &[&s3]).await,
                "VDI_INCOMPATIBLE_TYPE",
                &[&s3, "cbt_metadata"],
            );
        }
        assert_code(
            &env.fail("VDI.resize", &[&s3, "8388608"]).await,
            "VDI_INCOMPATIBLE_TYPE",
            &[&s3, "cbt_metadata"],
        );
        // destroy works on it.
        env.call("VDI.destroy", &[&s3]).await;
        assert_code(
            &env.fail("VDI.get_record", &[&s3]).await,
            "HANDLE_INVALID",
            &["VDI", &s3],
        );
        // The live disk is attached to the running VM.
        assert_code(
            &env.fail("VDI.destroy", &[&env.vdi]).await,
            "VDI_IN_USE",
            &[&env.vdi, "destroy"],
        );
    })
    .await;
}

/// Destroying a snapshot in the middle of the chain merges its log into the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroying_an_intermediate_snapshot_keeps_the_chain() {
    bounded(async {
        let env = Env::start(|_| {}).await;
        let s1 = env.snapshot(&env.vdi).await;
        env.write(BLOCK, b"a").await;
        let s2 = env.snapshot(&env.vdi).await;
        env.write(BLOCK * 7, b"b").await;
        let s3 = env.snapshot(&env.vdi).await;
        env.call("VDI.data_destroy", &[&s2]).await;
        env.call("VDI.destroy", &[&s2]).await;
        assert_eq!(env.changed(&s1, &s3, 4 << 20).await, vec![1, 7]);
        // Destroying the oldest one leaves the rest usable.
        env.call("VDI.destroy", &[&s1]).await;
        env.write(BLOCK * 9, b"c").await;
        let s4 = env.snapshot(&env.vdi).await;
        assert_eq!(env.changed(&s3, &s4, 4 << 20).await, vec![9]);
        let all = env.call("sim.list_vdis", &[]).await;
        assert_eq!(all.as_array().unwrap().len(), 3, "vdi, s3, s4");
    })
    .await;
}

/// After a resize the bitmap is sized for the new size; new blocks count only if written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resize_grows_the_bitmap() {
    bounded(async {
        let env = Env::start(|c| c.disk_size = 1 << 20).await;
        let s1 = env.snapshot(&env.vdi).await;
        env.write(0, b"a").await;
        env.call("VDI.resize", &[&env.vdi, "3145000"]).await; // rounded up to 3145216
        assert_eq!(
            env.call("VDI.get_virtual_size", &[&env.vdi]).await,
            Value::from("3145216")
        );
        env.write(3145216 - 11, b"end of disk").await;
        env.write(2 << 20, b"b").await;
        let s2 = env.snapshot(&env.vdi).await;
        assert_eq!(env.changed(&s1, &s2, 3145216).await, vec![0, 32, 47]);
        assert_eq!(
            env.fail("VDI.resize", &[&env.vdi, "1048576"]).await.code(),
            Some("SR_BACKEND_FAILURE_79")
        );
        // Absurd sizes are refused, not allocated.
        for huge in ["9223372036854775807", "17592186044417"] {
            assert_eq!(
                env.fail("VDI.resize", &[&env.vdi, huge]).await.code(),
                Some("SR_BACKEND_FAILURE_79")
            );
        }
        assert_eq!(
            env.fail("VDI.resize", &[&env.vdi, "-5"]).await.code(),
            Some("FIELD_TYPE_ERROR")
        );
        let p = env.sim.vdi_path(&env.uuid_of(&s2).await).unwrap();
        assert_eq!(std::fs::metadata(p).unwrap().len(), 3145216);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_expire_and_faults_fire() {
    bounded(async {
        let env = Env::start(|_| {}).await;
        // Injected failures: once, N times, for good.
        env.c
            .call(
                "sim.fail_next",
                &[
                    env.session.as_str().into(),
                    "VDI.snapshot".into(),
                    "SR_BACKEND_FAILURE_82".into(),
                    Value::Array(vec!["".into(), "snapshot failed".into(), "".into()]),
                ],
            )
            .await
            .unwrap();
        assert_code(
            &env.fail("VDI.snapshot", &[&env.vdi]).await,
            "SR_BACKEND_FAILURE_82",
            &["", "snapshot failed", ""],
        );
        let s = env.snapshot(&env.vdi).await;
        env.sim.fail_next(
            "VDI.data_destroy",
            "VDI_IN_USE",
            &[&s, "data_destroy"],
            Some(2),
        );
        for _ in 0..2 {
            assert_code(
                &env.fail("VDI.data_destroy", &[&s]).await,
                "VDI_IN_USE",
                &[&s, "data_destroy"],
            );
        }
        env.call("VDI.data_destroy", &[&s]).await;
        env.c
            .call(
                "sim.fail_next",
                &[
                    env.session.as_str().into(),
                    "VDI.get_uuid".into(),
                    "INTERNAL_ERROR".into(),
                    Value::Array(vec![]),
                    "always".into(),
                ],
            )
            .await
            .unwrap();
        for _ in 0..3 {
            assert_code(
                &env.fail("VDI.get_uuid", &[&s]).await,
                "INTERNAL_ERROR",
                &[],
            );
        }
        env.call("sim.clear_failures", &[]).await;
        env.call("VDI.get_uuid", &[&s]).await;

        // Sessions: a second one, then expire them all.
        let other = env
            .c
            .login(env.sim.user(), env.sim.password())
            .await
            .unwrap();
        assert_ne!(other, env.session);
        assert_eq!(env.sim.session_count(), 2);
        env.call("sim.expire_sessions", &[]).await;
        assert_eq!(env.sim.session_count(), 0);
        assert_code(
            &env.fail("VDI.get_record", &[&env.vdi]).await,
            "SESSION_INVALID",
            &[&env.session],
        );
        let e = env
            .c
            .call_err(
                "VDI.get_record",
                &[other.as_str().into(), env.vdi.as_str().into()],
            )
            .await
            .unwrap();
        assert_code(&e, "SESSION_INVALID", &[&other]);
        // Redacted when displayed.
        assert!(!e.to_string().contains(&other));
        // A new login works.
        env.c
            .login(env.sim.user(), env.sim.password())
            .await
            .unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_member_answers_host_is_slave() {
    bounded(async {
        let env = Env::start(|c| c.slave_listener = Some("127.0.0.1:0".parse().unwrap())).await;
        let slave = XapiClient::new(&env.sim.slave_url().unwrap(), env.sim.cert_der()).unwrap();
        let master = format!("127.0.0.1:{}", env.sim.addr().port());
        let e = slave
            .call_err(
                "session.login_with_password",
                &[env.sim.user().into(), env.sim.password().into()],
            )
            .await
            .unwrap();
        assert_code(&e, "HOST_IS_SLAVE", &[&master]);
        // Any call, even with a session of the master.
        let e = slave
            .call_err("VDI.get_record", &env.params(&[&env.vdi]))
            .await
            .unwrap();
        assert_code(&e, "HOST_IS_SLAVE", &[&master]);
        // The master behind it works.
        env.call("VDI.get_record", &[&env.vdi]).await;
    })
    .await;
}

/// `VM.snapshot` snapshots every disk; the VDI snapshots form the same CBT chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_snapshots() {
    bounded(async {
        let env = Env::start(|_| {}).await;
        let vm = env.sim.vm_ref().to_owned();
        let snap1 = env.call("VM.snapshot", &[&vm, "first"]).await;
        let snap1 = snap1.as_str().unwrap();
        let rec = env.call("VM.get_record", &[snap1]).await;
        assert_eq!(rec.get("is_a_snapshot"), Some(&Value::Bool(true)));
        assert_eq!(rec.get("snapshot_of"), Some(&Value::from(vm.as_str())));
        assert_eq!(rec.get("name_label"), Some(&Value::from("first")));
        assert_eq!(rec.get("VBDs").unwrap().as_array().unwrap().len(), 2);
        let vbd = env.disk_vbds(snap1).await.remove(0);
        let vbd = env.call("VBD.get_record", &[&vbd]).await;
        assert_eq!(vbd.get("currently_attached"), Some(&Value::Bool(false)));
        let d1 = vbd.get("VDI").unwrap().as_str().unwrap().to_owned();
        env.write(BLOCK * 2, b"z").await;
        let snap2 = env.call("VM.snapshot", &[&vm, "second"]).await;
        let vbd = env.disk_vbds(snap2.as_str().unwrap()).await.remove(0);
        let d2 = env
            .call("VBD.get_VDI", &[&vbd])
            .await
            .into_string()
            .unwrap();
        assert_eq!(env.changed(&d1, &d2, 4 << 20).await, vec![2]);
        // data_destroy drops the snapshot VM's disk VBD with the data; the CD drive stays.
        env.call("VDI.data_destroy", &[&d1]).await;
        assert_eq!(env.disk_vbds(snap1).await, Vec::<String>::new());
        assert_eq!(
            env.call("VM.get_VBDs", &[snap1])
                .await
                .as_array()
                .unwrap()
                .len(),
            1
        );
        env.call("VM.destroy", &[snap1]).await;
        assert_eq!(
            env.fail("VM.destroy", &[&vm]).await.code(),
            Some("VM_BAD_POWER_STATE")
        );
        let snaps = env.call("VM.get_snapshots", &[&vm]).await;
        assert_eq!(snaps.as_array().unwrap().len(), 1);
    })
    .await;
}

/// Every field of every record has its `get_FIELD`, returning the same value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_field_has_a_getter() {
    bounded(async {
        let env = Env::start(|_| {}).await;
        let vbd = env.call("VM.get_VBDs", &[env.sim.vm_ref()]).await;
        let vbd = vbd.as_array().unwrap()[0].as_str().unwrap().to_owned();
        let sr = env
            .call("VDI.get_SR", &[&env.vdi])
            .await
            .into_string()
            .unwrap();
        let net = env.call("network.get_all", &[]).await.into_array().unwrap();
        let net = net[0].as_str().unwrap().to_owned();
        let task = env
            .call("task.create", &["t", ""])
            .await
            .into_string()
            .unwrap();
        for (class, r) in [
            ("VM", env.sim.vm_ref()),
            ("VBD", vbd.as_str()),
            ("VDI", env.vdi.as_str()),
            ("SR", sr.as_str()),
            ("network", net.as_str()),
            ("task", task.as_str()),
        ] {
            let rec = env.call(&format!("{class}.get_record"), &[r]).await;
            for (field, value) in rec.as_struct().unwrap() {
                if field == "physical_utilisation" {
                    continue; // may change between the two calls
                }
                let got = env.call(&format!("{class}.get_{field}"), &[r]).await;
                assert_eq!(&got, value, "{class}.get_{field}");
            }
            assert_code(
                &env.fail(&format!("{class}.get_no_such_field"), &[r]).await,
                "MESSAGE_METHOD_UNKNOWN",
                &[&format!("{class}.get_no_such_field")],
            );
        }
        let uuid = env.call("SR.get_uuid", &[&sr]).await.into_string().unwrap();
        assert_eq!(
            env.call("SR.get_by_uuid", &[&uuid]).await,
            Value::from(sr.as_str())
        );
    })
    .await;
}

/// Wrong types and counts on every method: always a XenAPI failure, never a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_arguments_never_break_the_simulator() {
    bounded(async {
        let env = Env::start(|c| c.data_destroy_timeout = Duration::from_millis(10)).await;
        let methods = [
            "session.login_with_password",
            "session.get_uuid",
            "VM.get_all",
            "VM.get_by_uuid",
            "VM.get_record",
            "VM.snapshot",
            "VM.destroy",
            "VM.get_VBDs",
            "VBD.get_record",
            "VBD.get_VDI",
            "SR.get_record",
            "VDI.get_all",
            "VDI.get_all_records",
            "VDI.get_by_uuid",
            "VDI.get_record",
            "VDI.get_nbd_info",
            "VDI.data_destroy",
            "VDI.destroy",
            "VDI.enable_cbt",
            "VDI.disable_cbt",
            "VDI.snapshot",
            "VDI.list_changed_blocks",
            "VDI.resize",
            "VDI.set_other_config",
            "VDI.remove_from_other_config",
            "VDI.add_to_other_config",
            "VDI.set_name_label",
            "VDI.get_virtual_size",
            "VDI.create",
            "VBD.create",
            "VBD.destroy",
            "VBD.get_all",
            "SR.get_all",
            "network.get_all",
            "network.get_record",
            "network.get_purpose",
            "network.add_purpose",
            "network.remove_purpose",
            "task.create",
            "task.get_record",
            "task.destroy",
            "sim.write",
            "sim.fail_next",
            "sim.set_nbd_available",
            "sim.list_vdis",
            "sim.clear_failures",
        ];
        let junk = [
            Value::Int(-1),
            Value::Bool(true),
            Value::Double(f64::NAN),
            Value::Nil,
            Value::Base64(vec![0xff; 3]),
            Value::Array(vec![Value::Nil]),
            Value::Struct([("k".to_owned(), Value::Int(1))].into()),
            Value::from("OpaqueRef:NULL"),
            Value::from("-1"),
            Value::from("%%%"),
        ];
        let session = Value::from(env.session.as_str());
        let vdi = Value::from(env.vdi.as_str());
        let mut calls = Vec::new();
        for m in methods {
            for n in 0..5 {
                for j in &junk {
                    let mut p = vec![session.clone(), vdi.clone()];
                    p.truncate(n.min(2));
                    while p.len() < n {
                        p.push(j.clone());
                    }
                    calls.push((m, p));
                }
            }
        }
        // In-process (the HTTP layer is the same for every call, and TLS per call is slow);
        // a sample goes over HTTPS too.
        for (m, p) in calls.iter().step_by(97) {
            let r = env.c.try_call(m, p).await.unwrap();
            if let Err(e) = r {
                assert!(e.code().is_some(), "{m}: {e}");
            }
        }
        let n = calls.len();
        let sim = std::sync::Arc::new(env);
        let s2 = sim.clone();
        tokio::task::spawn_blocking(move || {
            for (m, p) in calls {
                if let Err((code, _)) = s2.sim.call_local(m, &p) {
                    assert!(!code.is_empty(), "{m}");
                }
            }
        })
        .await
        .unwrap();
        let env = sim;
        let calls = n;
        assert!(calls > 1000);
        // Still alive, the disk still tracked.
        env.call("VDI.get_record", &[&env.vdi]).await;
    })
    .await;
}
