//! A VM with several disks and a CD drive; VDI.create / destroy, VBD.*, SR.*, network
//! purposes and tasks, over HTTPS.

mod common;

use std::collections::BTreeMap;

use cbtstream_proto::xmlrpc::Value;
use common::*;

fn vdi_args(sr: &str, size: &str) -> BTreeMap<String, Value> {
    BTreeMap::from([
        ("SR".to_owned(), Value::from(sr)),
        ("virtual_size".to_owned(), Value::from(size)),
        ("name_label".to_owned(), Value::from("restored")),
        ("type".to_owned(), Value::from("user")),
        ("sharable".to_owned(), Value::Bool(false)),
        ("read_only".to_owned(), Value::Bool(false)),
        ("other_config".to_owned(), Value::Struct(BTreeMap::new())),
    ])
}

fn vbd_args(vm: &str, vdi: &str, userdevice: &str) -> BTreeMap<String, Value> {
    BTreeMap::from([
        ("VM".to_owned(), Value::from(vm)),
        ("VDI".to_owned(), Value::from(vdi)),
        ("userdevice".to_owned(), Value::from(userdevice)),
        ("bootable".to_owned(), Value::Bool(false)),
        ("mode".to_owned(), Value::from("RW")),
        ("type".to_owned(), Value::from("Disk")),
        ("empty".to_owned(), Value::Bool(false)),
        ("other_config".to_owned(), Value::Struct(BTreeMap::new())),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_with_three_disks_and_a_cd_drive() {
    bounded(async {
        let size = (3 << 20) + 512;
        let env = Env::start(|c| {
            c.disks = 3;
            c.disk_size = size;
        })
        .await;
        let sim = &env.sim;
        let disks = sim.disks();
        assert_eq!(disks.len(), 3);
        assert_eq!(disks[0], sim.vdi_uuid());
        for d in &disks {
            let path = sim.vdi_path(d).unwrap();
            assert_eq!(path, sim.data_dir().join(format!("{d}.raw")));
            let meta = std::fs::metadata(&path).unwrap();
            assert_eq!(meta.len(), size);
            use std::os::unix::fs::MetadataExt;
            assert_eq!(meta.blocks(), 0, "{d} is not sparse");
        }
        let vm = sim.vm_ref();
        let vbds = env.disk_vbds(vm).await;
        assert_eq!(vbds.len(), 3);
        for (slot, vbd) in vbds.iter().enumerate() {
            let rec = env.call("VBD.get_record", &[vbd]).await;
            assert_eq!(rec.get("userdevice"), Some(&Value::from(slot.to_string())));
            assert_eq!(rec.get("mode"), Some(&Value::from("RW")));
            assert_eq!(rec.get("empty"), Some(&Value::Bool(false)));
            let vdi = rec.get("VDI").unwrap().as_str().unwrap();
            assert_eq!(env.uuid_of(vdi).await, disks[slot]);
        }
        let all = env.call("VM.get_VBDs", &[vm]).await.into_array().unwrap();
        assert_eq!(all.len(), 4);
        let cd = all
            .iter()
            .map(|v| v.as_str().unwrap())
            .find(|v| !vbds.iter().any(|d| d == v))
            .unwrap();
        let rec = env.call("VBD.get_record", &[cd]).await;
        assert_eq!(rec.get("type"), Some(&Value::from("CD")));
        assert_eq!(rec.get("empty"), Some(&Value::Bool(true)));
        assert_eq!(rec.get("VDI"), Some(&Value::from("OpaqueRef:NULL")));
        assert_eq!(rec.get("userdevice"), Some(&Value::from("3")));

        // VM.snapshot covers every disk; the CD drive stays empty in the snapshot.
        env.sim.write(&disks[2], 4096, b"third disk").unwrap();
        let snap = env.call("VM.snapshot", &[vm, "all disks"]).await;
        let snap = snap.as_str().unwrap();
        let snap_vbds = env.disk_vbds(snap).await;
        assert_eq!(snap_vbds.len(), 3);
        let vdi = env.call("VBD.get_VDI", &[&snap_vbds[2]]).await;
        let rec = env.call("VDI.get_record", &[vdi.as_str().unwrap()]).await;
        assert_eq!(
            rec.get("snapshot_of"),
            Some(&Value::from(env.sim.disk_refs()[2].as_str()))
        );
        let copy = std::fs::read(
            sim.vdi_path(rec.get("uuid").unwrap().as_str().unwrap())
                .unwrap(),
        )
        .unwrap();
        assert_eq!(&copy[4096..4106], b"third disk");
        assert_eq!(
            env.call("VM.get_VBDs", &[snap])
                .await
                .as_array()
                .unwrap()
                .len(),
            4
        );
        // VM.destroy of the snapshot drops its VBDs and keeps its VDIs.
        let snap_vdis_before = env.call("VDI.get_all", &[]).await;
        env.call("VM.destroy", &[snap]).await;
        assert_eq!(env.call("VDI.get_all", &[]).await, snap_vdis_before);
        assert_code(
            &env.fail("VBD.get_record", &[&snap_vbds[0]]).await,
            "HANDLE_INVALID",
            &["VBD", &snap_vbds[0]],
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vdi_create_vbd_create_and_destroy() {
    bounded(async {
        let env = Env::start(|_| {}).await;
        let srs = env.call("SR.get_all", &[]).await.into_array().unwrap();
        assert_eq!(srs.len(), 1);
        let sr = srs[0].as_str().unwrap().to_owned();
        let rec = env.call("SR.get_record", &[&sr]).await;
        assert_eq!(rec.get("content_type"), Some(&Value::from("user")));

        // The size is rounded up to a sector; the image is an empty sparse file.
        let vdi = env
            .call_values("VDI.create", vec![Value::Struct(vdi_args(&sr, "1000"))])
            .await
            .into_string()
            .unwrap();
        let rec = env.call("VDI.get_record", &[&vdi]).await;
        assert_eq!(rec.get("virtual_size"), Some(&Value::from("1024")));
        assert_eq!(rec.get("name_label"), Some(&Value::from("restored")));
        assert_eq!(rec.get("type"), Some(&Value::from("user")));
        assert_eq!(rec.get("cbt_enabled"), Some(&Value::Bool(false)));
        assert_eq!(rec.get("SR"), Some(&Value::from(sr.as_str())));
        let uuid = rec.get("uuid").unwrap().as_str().unwrap().to_owned();
        let path = env.sim.vdi_path(&uuid).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), vec![0; 1024]);
        let sr_vdis = env.call("SR.get_VDIs", &[&sr]).await;
        assert!(sr_vdis
            .as_array()
            .unwrap()
            .contains(&Value::from(vdi.as_str())));

        // Missing fields and bad values.
        let mut no_sr = vdi_args(&sr, "1024");
        no_sr.remove("read_only");
        assert_code(
            &env.c
                .call_err(
                    "VDI.create",
                    &[env.session.as_str().into(), Value::Struct(no_sr)],
                )
                .await
                .unwrap(),
            "FIELD_TYPE_ERROR",
            &["read_only"],
        );
        let mut cbt = vdi_args(&sr, "1024");
        cbt.insert("type".into(), "cbt_metadata".into());
        assert_code(
            &env.c
                .call_err(
                    "VDI.create",
                    &[env.session.as_str().into(), Value::Struct(cbt)],
                )
                .await
                .unwrap(),
            "VDI_INCOMPATIBLE_TYPE",
            &["", "cbt_metadata"],
        );
        assert_code(
            &env.c
                .call_err(
                    "VDI.create",
                    &[
                        env.session.as_str().into(),
                        Value::Struct(vdi_args("OpaqueRef:x", "1")),
                    ],
                )
                .await
                .unwrap(),
            "HANDLE_INVALID",
            &["SR", "OpaqueRef:x"],
        );

        // Plugged into the running VM's next slot: attached once "plugged" is not simulated,
        // so the VBD can go; the running VM's own disk cannot.
        let vm = env.sim.vm_ref().to_owned();
        let vbd = env
            .call_values(
                "VBD.create",
                vec![Value::Struct(vbd_args(&vm, &vdi, "autodetect"))],
            )
            .await
            .into_string()
            .unwrap();
        let rec = env.call("VBD.get_record", &[&vbd]).await;
        assert_eq!(rec.get("userdevice"), Some(&Value::from("1")));
        assert_eq!(rec.get("currently_attached"), Some(&Value::Bool(false)));
        assert_eq!(rec.get("VM"), Some(&Value::from(vm.as_str())));
        assert!(env
            .call("VDI.get_VBDs", &[&vdi])
            .await
            .as_array()
            .unwrap()
            .contains(&Value::from(vbd.as_str())));
        assert_code(
            &env.c
                .call_err(
                    "VBD.create",
                    &[
                        env.session.as_str().into(),
                        Value::Struct(vbd_args(&vm, &vdi, "0")),
                    ],
                )
                .await
                .unwrap(),
            "DEVICE_ALREADY_EXISTS",
            &["0"],
        );
        let disk_vbd = env.disk_vbds(&vm).await.remove(0);
        assert_code(
            &env.fail("VBD.destroy", &[&disk_vbd]).await,
            "OPERATION_NOT_ALLOWED",
            &["VBD currently attached to a running VM"],
        );
        assert_code(
            &env.fail("VDI.destroy", &[&env.vdi]).await,
            "VDI_IN_USE",
            &[&env.vdi, "destroy"],
        );
        env.call("VBD.destroy", &[&vbd]).await;
        assert_code(
            &env.fail("VBD.get_record", &[&vbd]).await,
            "HANDLE_INVALID",
            &["VBD", &vbd],
        );

        // VDI.destroy deletes the image; a halted VM's VBD goes with the VDI.
        let snap = env
            .call("VM.snapshot", &[&vm, "s"])
            .await
            .into_string()
            .unwrap();
        env.call_values(
            "VBD.create",
            vec![Value::Struct(vbd_args(&snap, &vdi, "5"))],
        )
        .await;
        env.call("VDI.destroy", &[&vdi]).await;
        assert!(!path.exists());
        assert_code(
            &env.fail("VDI.get_record", &[&vdi]).await,
            "HANDLE_INVALID",
            &["VDI", &vdi],
        );
        assert_eq!(env.disk_vbds(&snap).await.len(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_is_served_only_while_a_network_has_the_nbd_purpose() {
    bounded(async {
        let env = Env::start(|_| {}).await;
        let nets = env.call("network.get_all", &[]).await.into_array().unwrap();
        assert_eq!(nets.len(), 1);
        let net = nets[0].as_str().unwrap().to_owned();
        assert_eq!(
            env.call("network.get_purpose", &[&net]).await,
            Value::Array(vec!["nbd".into()])
        );
        let rec = env.call("network.get_record", &[&net]).await;
        assert_eq!(rec.get("bridge"), Some(&Value::from("xenbr0")));
        let snap = env.snapshot(&env.vdi).await;

        env.call("network.remove_purpose", &[&net, "nbd"]).await;
        env.call("network.remove_purpose", &[&net, "nbd"]).await;
        assert_eq!(
            env.call("network.get_purpose", &[&net]).await,
            Value::Array(vec![])
        );
        assert_eq!(
            env.call("VDI.get_nbd_info", &[&snap]).await,
            Value::Array(vec![])
        );
        let name = format!("/{}?session_id={}", env.uuid_of(&snap).await, env.session);
        assert!(Nbd::connect(env.sim.nbd_port(), &name, env.sim.cert_der())
            .await
            .is_err());

        // insecure_nbd and nbd exclude each other.
        env.call("network.add_purpose", &[&net, "insecure_nbd"])
            .await;
        assert_code(
            &env.fail("network.add_purpose", &[&net, "nbd"]).await,
            "NETWORK_INCOMPATIBLE_PURPOSES",
            &["nbd", "insecure_nbd"],
        );
        assert_eq!(
            env.fail("network.add_purpose", &[&net, "ftp"]).await.code(),
            Some("ENUM_INVALID")
        );
        env.call("network.remove_purpose", &[&net, "insecure_nbd"])
            .await;

        env.call("network.add_purpose", &[&net, "nbd"]).await;
        env.call("network.add_purpose", &[&net, "nbd"]).await;
        assert_eq!(
            env.call("network.get_purpose", &[&net]).await,
            Value::Array(vec!["nbd".into()])
        );
        let mut nbd = env.nbd_connect(&snap).await.unwrap();
        assert_eq!(nbd.read(0, 512).await.unwrap(), vec![0; 512]);
        nbd.disconnect().await;

        // The shortcut is the purpose.
        env.sim.set_nbd_available(false);
        assert_eq!(
            env.call("network.get_purpose", &[&net]).await,
            Value::Array(vec![])
        );
        env.sim.set_nbd_available(true);
        assert_eq!(
            env.call("network.get_purpose", &[&net]).await,
            Value::Array(vec!["nbd".into()])
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks() {
    bounded(async {
        let env = Env::start(|_| {}).await;
        let t = env
            .call("task.create", &["restore", "a test"])
            .await
            .into_string()
            .unwrap();
        let rec = env.call("task.get_record", &[&t]).await;
        assert_eq!(rec.get("status"), Some(&Value::from("pending")));
        assert_eq!(rec.get("name_label"), Some(&Value::from("restore")));
        assert_eq!(
            env.call("task.get_error_info", &[&t]).await,
            Value::Array(vec![])
        );
        assert!(env
            .call("task.get_all", &[])
            .await
            .as_array()
            .unwrap()
            .contains(&Value::from(t.as_str())));
        env.call("task.destroy", &[&t]).await;
        assert_code(
            &env.fail("task.get_status", &[&t]).await,
            "HANDLE_INVALID",
            &["task", &t],
        );
    })
    .await;
}
