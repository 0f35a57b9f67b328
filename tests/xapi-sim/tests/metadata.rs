//! `GET /export_metadata` and `PUT /import_metadata`: a VM with three disks restored as a
//! new VM whose VBDs point at new VDIs, `dry_run`, `force`, and the import errors.

mod common;

use std::collections::BTreeMap;

use cbtstream_proto::xmlrpc::{decode_value, Value};
use common::*;

/// The `ova.xml` of a metadata archive (one tar member).
fn ova(archive: &[u8]) -> Value {
    assert_eq!(&archive[..8], b"ova.xml\0");
    let size = usize::from_str_radix(std::str::from_utf8(&archive[124..135]).unwrap(), 8).unwrap();
    // Data padded to 512, then two zero blocks.
    assert_eq!(archive.len(), 512 + size.next_multiple_of(512) + 1024);
    decode_value(&archive[512..512 + size]).unwrap()
}

fn objects<'a>(ova: &'a Value, class: &str) -> Vec<&'a Value> {
    ova.get("objects")
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o.get("class").unwrap().as_str() == Some(class))
        .collect()
}

impl Env {
    async fn export_metadata(&self, vm_uuid: &str, snapshots: bool) -> HttpReply {
        self.http(
            "GET",
            &format!(
                "/export_metadata?session_id={}&uuid={vm_uuid}&export_snapshots={snapshots}",
                self.session
            ),
            b"",
        )
        .await
    }

    async fn import_metadata(&self, query: &str, archive: &[u8]) -> (HttpReply, String) {
        let r = self
            .http(
                "PUT",
                &format!("/import_metadata?session_id={}{query}", self.session),
                archive,
            )
            .await;
        assert_eq!(r.status_line, "HTTP/1.1 200 OK");
        let task = r.header("task-id").unwrap().to_owned();
        (r, task)
    }

    async fn new_vdi(&self, size: u64) -> (String, String) {
        let sr = self
            .call("VDI.get_SR", &[&self.vdi])
            .await
            .into_string()
            .unwrap();
        let args = Value::Struct(BTreeMap::from([
            ("SR".to_owned(), Value::from(sr)),
            ("virtual_size".to_owned(), Value::int64_str(size as i64)),
            ("type".to_owned(), Value::from("user")),
            ("sharable".to_owned(), Value::Bool(false)),
            ("read_only".to_owned(), Value::Bool(false)),
            ("other_config".to_owned(), Value::Struct(BTreeMap::new())),
        ]));
        let r = self
            .call_values("VDI.create", vec![args])
            .await
            .into_string()
            .unwrap();
        let uuid = self.uuid_of(&r).await;
        (r, uuid)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_with_three_disks_is_restored_onto_new_vdis() {
    bounded(async {
        let env = Env::start(|c| c.disks = 3).await;
        let sim = &env.sim;
        let r = env.export_metadata(sim.vm_uuid(), false).await;
        assert_eq!(r.status_line, "HTTP/1.0 200 OK");
        assert_eq!(
            r.header("content-length"),
            Some(r.body.len().to_string().as_str())
        );
        assert_eq!(
            r.header("content-disposition"),
            Some("attachment; filename=\"export.xva\"")
        );
        let ova = ova(&r.body);
        let version = ova.get("version").unwrap();
        assert_eq!(version.get("export_vsn"), Some(&Value::Int(2)));
        let vms = objects(&ova, "VM");
        assert_eq!(vms.len(), 1);
        let vm_id = vms[0].get("id").unwrap().as_str().unwrap();
        assert!(vm_id.starts_with("Ref:"));
        let vm_rec = vms[0].get("snapshot").unwrap();
        assert_eq!(vm_rec.get("uuid").unwrap().as_str(), Some(sim.vm_uuid()));
        assert_eq!(
            vm_rec.get("name_label"),
            Some(&Value::from("cbtstream test VM"))
        );
        // References point at the ids of the archive.
        let vbds = objects(&ova, "VBD");
        assert_eq!(vbds.len(), 4);
        for v in &vbds {
            assert_eq!(
                v.get("snapshot").unwrap().get("VM").unwrap().as_str(),
                Some(vm_id)
            );
        }
        let vdis = objects(&ova, "VDI");
        assert_eq!(vdis.len(), 3);
        assert_eq!(objects(&ova, "SR").len(), 1);

        // Three new disks, mapped old uuid -> new uuid.
        let mut query = String::new();
        let mut new = Vec::new();
        for old in sim.disks() {
            let (r, u) = env.new_vdi(4 << 20).await;
            query.push_str(&format!("&vdi:{old}={u}"));
            new.push(r);
        }
        // A dry run creates nothing.
        let vms_before = env.call("VM.get_all", &[]).await;
        let vbds_before = env.call("VBD.get_all", &[]).await;
        let (_, task) = env
            .import_metadata(&format!("{query}&dry_run=true"), &r.body)
            .await;
        assert_eq!(
            env.call("task.get_status", &[&task]).await,
            Value::from("success")
        );
        assert_eq!(env.call("VM.get_all", &[]).await, vms_before);
        assert_eq!(env.call("VBD.get_all", &[]).await, vbds_before);

        let (reply, task) = env.import_metadata(&query, &r.body).await;
        assert!(reply.body.is_empty());
        assert_eq!(
            env.call("task.get_status", &[&task]).await,
            Value::from("success")
        );
        let result = env
            .call("task.get_result", &[&task])
            .await
            .into_string()
            .unwrap();
        let refs = decode_value(result.as_bytes()).unwrap();
        let refs = refs.as_array().unwrap();
        assert_eq!(refs.len(), 1);
        let vm = refs[0].as_str().unwrap();
        let rec = env.call("VM.get_record", &[vm]).await;
        assert_eq!(rec.get("power_state"), Some(&Value::from("Halted")));
        assert_eq!(
            rec.get("name_label"),
            Some(&Value::from("cbtstream test VM"))
        );
        assert_ne!(rec.get("uuid").unwrap().as_str(), Some(sim.vm_uuid()));
        let disks = env.disk_vbds(vm).await;
        assert_eq!(disks.len(), 3);
        for (slot, vbd) in disks.iter().enumerate() {
            let b = env.call("VBD.get_record", &[vbd]).await;
            assert_eq!(b.get("userdevice"), Some(&Value::from(slot.to_string())));
            assert_eq!(b.get("VDI"), Some(&Value::from(new[slot].as_str())));
            assert_eq!(b.get("currently_attached"), Some(&Value::Bool(false)));
        }
        assert_eq!(rec.get("VBDs").unwrap().as_array().unwrap().len(), 4);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_missing_vdis_force_and_bad_archives() {
    bounded(async {
        let env = Env::start(|c| c.disks = 2).await;
        let sim = &env.sim;
        let snap = env
            .call("VM.snapshot", &[sim.vm_ref(), "s"])
            .await
            .into_string()
            .unwrap();
        // export_snapshots defaults to true: the snapshot VM comes along.
        let r = env
            .http(
                "GET",
                &format!(
                    "/export_metadata?session_id={}&uuid={}",
                    env.session,
                    sim.vm_uuid()
                ),
                b"",
            )
            .await;
        assert_eq!(objects(&ova(&r.body), "VM").len(), 2);

        // The snapshot VM alone; one of its disks then goes away.
        let snap_uuid = env
            .call("VM.get_uuid", &[&snap])
            .await
            .into_string()
            .unwrap();
        let archive = env.export_metadata(&snap_uuid, false).await.body;
        let gone = env
            .call("VBD.get_VDI", &[&env.disk_vbds(&snap).await[1]])
            .await;
        let gone = gone.as_str().unwrap().to_owned();
        let gone_uuid = env.uuid_of(&gone).await;
        env.call("VDI.destroy", &[&gone]).await;
        let sr = env
            .call("VDI.get_SR", &[&env.vdi])
            .await
            .into_string()
            .unwrap();
        let vms_before = env.call("VM.get_all", &[]).await;
        let (r, task) = env.import_metadata("", &archive).await;
        assert!(r.body.starts_with(b"HTTP/1.1 500 Internal Error"));
        assert_eq!(
            env.call("task.get_error_info", &[&task]).await,
            Value::Array(vec![
                "VDI_LOCATION_MISSING".into(),
                sr.as_str().into(),
                gone_uuid.as_str().into()
            ])
        );
        assert_eq!(env.call("VM.get_all", &[]).await, vms_before);
        // With force the missing disk is left out; without a map the other VBD points at the
        // snapshot's own VDI (found by location). A snapshot-only import returns it.
        let (_, task) = env.import_metadata("&force=true", &archive).await;
        assert_eq!(
            env.call("task.get_status", &[&task]).await,
            Value::from("success")
        );
        let result = env
            .call("task.get_result", &[&task])
            .await
            .into_string()
            .unwrap();
        let vm = decode_value(result.as_bytes()).unwrap().as_array().unwrap()[0]
            .as_str()
            .unwrap()
            .to_owned();
        let disks = env.disk_vbds(&vm).await;
        assert_eq!(disks.len(), 1);
        let first = env.call("VBD.get_VDI", &[&disks[0]]).await;
        assert_eq!(
            first,
            env.call("VBD.get_VDI", &[&env.disk_vbds(&snap).await[0]])
                .await
        );
        assert_eq!(
            env.call("VM.get_is_a_snapshot", &[&vm]).await,
            Value::Bool(true)
        );

        // A map to a VDI that does not exist.
        let old = sim.disks()[0].clone();
        let (_, task) = env
            .import_metadata(
                &format!("&vdi:{old}=no-such-uuid"),
                &env.export_metadata(sim.vm_uuid(), false).await.body,
            )
            .await;
        assert!(
            env.failed_task_with(&["UUID_INVALID", "VDI", "no-such-uuid"])
                .await,
            "{task}"
        );

        // Not an ova.xml first, cut short, not XML, newer xapi.
        let mut other = archive.clone();
        other[..8].copy_from_slice(b"disk.img");
        let (_, task) = env.import_metadata("", &other).await;
        assert_eq!(
            env.call("task.get_error_info", &[&task]).await,
            Value::Array(vec![
                "IMPORT_ERROR_UNEXPECTED_FILE".into(),
                "ova.xml".into(),
                "disk.img".into()
            ])
        );
        let (_, task) = env.import_metadata("", &archive[..600]).await;
        assert_eq!(
            env.call("task.get_error_info", &[&task]).await,
            Value::Array(vec!["IMPORT_ERROR_PREMATURE_EOF".into()])
        );
        let mut garbage = archive.clone();
        garbage[512..520].copy_from_slice(b"<<<<<<<<");
        let (_, task) = env.import_metadata("", &garbage).await;
        assert_eq!(
            env.call("task.get_error_info", &[&task])
                .await
                .as_array()
                .unwrap()[0],
            Value::from("IMPORT_ERROR_GENERIC")
        );
        let text = String::from_utf8_lossy(&archive).replace(
            "<name>xapi_major</name><value><int>25</int>",
            "<name>xapi_major</name><value><int>99</int>",
        );
        assert_ne!(text.as_bytes(), &archive[..]);
        let (_, task) = env.import_metadata("", text.as_bytes()).await;
        assert_eq!(
            env.call("task.get_error_info", &[&task]).await,
            Value::Array(vec!["IMPORT_INCOMPATIBLE_VERSION".into()])
        );
        assert_eq!(
            env.call("VM.get_all", &[]).await.as_array().unwrap().len(),
            3
        );

        // Credentials as everywhere.
        let r = env.http("PUT", "/import_metadata", &archive).await;
        assert_eq!(r.status_line, "HTTP/1.1 401 Unauthorised");
        let r = env.http("GET", "/export_metadata?uuid=x", b"").await;
        assert_eq!(r.status_line, "HTTP/1.1 401 Unauthorised");
        let r = env
            .http(
                "GET",
                &format!("/export_metadata?session_id={}&uuid=x", env.session),
                b"",
            )
            .await;
        assert_eq!(r.status_line, "HTTP/1.0 500 Internal Error");
    })
    .await;
}
