//! `GET /export_metadata` and `PUT /import_metadata`: a tar holding one `ova.xml`, an
//! XML-RPC value `{version, objects}` whose objects are `{class, id, snapshot}` with the
//! references between them rewritten to `Ref:<n>` ids (xen-api `export.ml` / `import.ml`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use cbtstream_proto::xmlrpc::{decode_value, encode_value, Value};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::http_disk::{authenticate, task_for, unauthorised};
use crate::http_raw::{error_page, send_and_close, Body, Head};
use crate::pool::task_finish;
use crate::state::{new_ref, new_uuid, Fail, Shared, State, Vbd, VbdType, Vm, NULL_REF};
use crate::{disk, tar};

/// The xapi version the simulator claims (an import from a newer one is refused).
const XAPI_VERSION: (i64, i64) = (25, 6);
/// The largest metadata archive accepted.
const MAX_ARCHIVE: u64 = 16 << 20;

pub(crate) async fn export<S: AsyncWrite + Unpin>(shared: &Arc<Shared>, head: &Head, s: &mut S) {
    let reply = {
        let mut st = shared.lock();
        if !authenticate(&mut st, head) {
            unauthorised(head)
        } else {
            let vm = match (head.query_param("uuid"), head.query_param("ref")) {
                (Some(u), _) => st
                    .vms
                    .iter()
                    .find(|(_, v)| v.uuid == u)
                    .map(|(r, _)| r.clone()),
                (None, Some(r)) => st.vms.contains_key(r).then(|| r.to_owned()),
                (None, None) => None,
            };
            match vm {
                None => error_page("HTTP/1.0", 500, &[]),
                Some(vm) => {
                    let task = task_for(&mut st, head, "Export of VM metadata");
                    let snapshots = head.query_param("export_snapshots") != Some("false");
                    let archive =
                        tar::single_file("ova.xml", ova_xml(&st, &vm, snapshots).as_bytes());
                    task_finish(&mut st, &task, Ok(String::new()));
                    let mut r = format!(
                        "HTTP/1.0 200 OK\r\nConnection: close\r\nCache-Control: no-cache, no-store\r\n\
                         task-id: {task}\r\nServer: xapi-sim\r\ncontent-type: application/octet-stream\r\n\
                         Content-Length: {}\r\nContent-Disposition: attachment; filename=\"export.xva\"\r\n\r\n",
                        archive.len()
                    )
                    .into_bytes();
                    r.extend_from_slice(&archive);
                    r
                }
            }
        }
    };
    send_and_close(s, &reply).await;
}

/// The `ova.xml` of `vm` (and its snapshots): the VMs, their VBDs, the VDIs behind them and
/// the SR.
fn ova_xml(st: &State, vm: &str, with_snapshots: bool) -> String {
    let mut vms = vec![vm.to_owned()];
    if with_snapshots {
        vms.extend(
            st.vms
                .iter()
                .filter(|(_, v)| v.snapshot_of == vm)
                .map(|(r, _)| r.clone()),
        );
    }
    let vbds: Vec<&String> = st
        .vbds
        .iter()
        .filter(|(_, b)| vms.contains(&b.vm))
        .map(|(r, _)| r)
        .collect();
    let mut vdis: Vec<String> = vbds
        .iter()
        .filter_map(|b| st.vbds.get(*b))
        .filter(|b| st.vdis.contains_key(&b.vdi))
        .map(|b| b.vdi.clone())
        .collect();
    vdis.sort();
    vdis.dedup();
    let mut objects: Vec<(&str, String, Value)> = Vec::new();
    for r in &vms {
        objects.extend(st.vm_record(r).ok().map(|v| ("VM", r.clone(), v)));
    }
    for r in vbds {
        objects.extend(st.vbd_record(r).ok().map(|v| ("VBD", r.clone(), v)));
    }
    for r in &vdis {
        objects.extend(st.vdi_record(r).ok().map(|v| ("VDI", r.clone(), v)));
    }
    if !vdis.is_empty() {
        objects.extend(
            st.sr_record(&st.sr_ref)
                .ok()
                .map(|v| ("SR", st.sr_ref.clone(), v)),
        );
    }
    let ids: HashMap<String, String> = objects
        .iter()
        .enumerate()
        .map(|(i, (_, r, _))| (r.clone(), format!("Ref:{i}")))
        .collect();
    let objects = objects
        .into_iter()
        .map(|(class, r, rec)| {
            Value::record([
                ("class", Value::from(class)),
                ("id", Value::from(ids[&r].as_str())),
                ("snapshot", rewrite_refs(rec, &ids)),
            ])
        })
        .collect();
    let version = Value::record([
        ("hostname", Value::from("xapi-sim")),
        ("date", "2025-01-01".into()),
        ("product_version", "8.4.0".into()),
        ("product_brand", "XenServer".into()),
        ("build_number", "xapi-sim".into()),
        ("xapi_major", Value::Int(XAPI_VERSION.0)),
        ("xapi_minor", Value::Int(XAPI_VERSION.1)),
        ("export_vsn", Value::Int(2)),
    ]);
    encode_value(&Value::record([
        ("version", version),
        ("objects", Value::Array(objects)),
    ]))
}

/// References to exported objects become their ids; others become `OpaqueRef:NULL` (and
/// are dropped from sets).
fn rewrite_refs(v: Value, ids: &HashMap<String, String>) -> Value {
    match v {
        Value::String(s) if s.starts_with("OpaqueRef:") => {
            Value::from(ids.get(&s).map_or(NULL_REF, String::as_str))
        }
        Value::Array(a) => Value::Array(
            a.into_iter()
                .map(|x| rewrite_refs(x, ids))
                .filter(|x| x.as_str() != Some(NULL_REF))
                .collect(),
        ),
        Value::Struct(m) => Value::Struct(
            m.into_iter()
                .map(|(k, x)| (k, rewrite_refs(x, ids)))
                .collect(),
        ),
        other => other,
    }
}

pub(crate) async fn import<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Arc<Shared>,
    head: &Head,
    mut body: Body<'_, S>,
) {
    let task = {
        let mut st = shared.lock();
        authenticate(&mut st, head).then(|| task_for(&mut st, head, "VM metadata import"))
    };
    let Some(task) = task else {
        return send_and_close(body.s, &unauthorised(head)).await;
    };
    let ok = format!(
        "HTTP/1.1 200 OK\r\nConnection: close\r\nCache-Control: no-cache, no-store\r\n\
         task-id:{task}\r\ncontent-type: application/octet-stream\r\n\r\n"
    );
    if body.s.write_all(ok.as_bytes()).await.is_err() || body.s.flush().await.is_err() {
        return task_finish(&mut shared.lock(), &task, Err(premature_eof()));
    }
    let outcome = match read_archive(&mut body, head.content_length()).await {
        Err(f) => Err(f),
        Ok(bytes) => {
            let opts = Options {
                dry_run: head.flag("dry_run"),
                restore: head.flag("restore"),
                force: head.flag("force"),
                vdi_map: head
                    .query
                    .iter()
                    // xapi drops the 4th character, meant to be the `:` of `vdi:`.
                    .filter(|(k, _)| k.starts_with("vdi"))
                    .filter_map(|(k, v)| {
                        Some((k.get(4..).filter(|o| !o.is_empty())?.to_owned(), v.clone()))
                    })
                    .collect(),
            };
            import_archive(&mut shared.lock(), &bytes, &opts)
        }
    };
    let failed = outcome.is_err();
    task_finish(&mut shared.lock(), &task, outcome);
    let page = if failed {
        error_page("HTTP/1.1", 500, &[])
    } else {
        Vec::new()
    };
    send_and_close(body.s, &page).await;
}

fn premature_eof() -> Fail {
    Fail::new("IMPORT_ERROR_PREMATURE_EOF", Vec::<String>::new())
}

fn generic(msg: impl Into<String>) -> Fail {
    Fail::new("IMPORT_ERROR_GENERIC", [msg.into()])
}

/// The body: `Content-Length` bytes, else up to the end of the stream; at most
/// [`MAX_ARCHIVE`].
async fn read_archive<S: AsyncRead + Unpin>(
    body: &mut Body<'_, S>,
    len: Option<u64>,
) -> Result<Vec<u8>, Fail> {
    if len.is_some_and(|l| l > MAX_ARCHIVE) {
        return Err(generic("the metadata archive is too large"));
    }
    let limit = len.unwrap_or(MAX_ARCHIVE + 1) as usize;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    while out.len() < limit {
        let want = (limit - out.len()).min(buf.len());
        match body.read(&mut buf[..want]).await {
            Ok(0) if len.is_some() => return Err(premature_eof()),
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => return Err(premature_eof()),
        }
    }
    if out.len() as u64 > MAX_ARCHIVE {
        return Err(generic("the metadata archive is too large"));
    }
    Ok(out)
}

struct Options {
    dry_run: bool,
    force: bool,
    /// `restore=true`: the VM keeps its uuid (xen-api import.ml: `Db.VM.set_uuid`); an
    /// existing VM with that uuid must be halted (`VM_BAD_POWER_STATE`) and is replaced,
    /// which the simulator does not do (`IMPORT_ERROR_GENERIC`).
    restore: bool,
    /// `vdi:<old uuid>=<new uuid>`.
    vdi_map: BTreeMap<String, String>,
}

/// One object of `ova.xml`.
struct Object<'a> {
    class: &'a str,
    id: &'a str,
    rec: &'a Value,
}

impl Object<'_> {
    fn field(&self, name: &str) -> &str {
        self.rec.get(name).and_then(Value::as_str).unwrap_or("")
    }
}

/// Checks everything first, then (unless `dry_run`) creates the VMs and their VBDs, so a
/// failure leaves nothing behind. The result: the new VM refs as an XML-RPC array.
fn import_archive(st: &mut State, archive: &[u8], opts: &Options) -> Result<String, Fail> {
    if archive.starts_with(&[0x1f, 0x8b]) || archive.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return Err(generic("compressed metadata archives are not simulated"));
    }
    let (name, data) = tar::first_file(archive).ok_or_else(premature_eof)?;
    if name != "ova.xml" {
        return Err(Fail::new(
            "IMPORT_ERROR_UNEXPECTED_FILE",
            ["ova.xml", &name],
        ));
    }
    let ova = decode_value(data).map_err(|e| generic(format!("ova.xml: {e}")))?;
    check_version(ova.get("version"))?;
    let objects: Vec<Object> = ova
        .get("objects")
        .and_then(Value::as_array)
        .ok_or_else(|| generic("ova.xml has no objects"))?
        .iter()
        .map(|o| {
            Some(Object {
                class: o.get("class")?.as_str()?,
                id: o.get("id")?.as_str()?,
                rec: o.get("snapshot").filter(|s| s.as_struct().is_some())?,
            })
        })
        .collect::<Option<_>>()
        .ok_or_else(|| generic("an object of ova.xml is not {class, id, snapshot}"))?;
    let of_class = |c: &'static str| objects.iter().filter(move |o| o.class == c);
    let srs: HashMap<&str, Option<String>> = of_class("SR")
        .map(|o| {
            (
                o.id,
                (o.field("uuid") == st.sr_uuid).then(|| st.sr_ref.clone()),
            )
        })
        .collect();
    // VDIs are never created: each is found, or skipped with `force`.
    let mut vdis: HashMap<&str, Option<String>> = HashMap::new();
    for o in of_class("VDI") {
        let found = find_vdi(st, o, &srs, opts);
        match found {
            Ok(r) => vdis.insert(o.id, Some(r)),
            Err(_) if opts.force => vdis.insert(o.id, None),
            Err(f) => return Err(f),
        };
    }
    if opts.restore {
        for o in of_class("VM") {
            let uuid = o.field("uuid");
            if let Some((r, vm)) = st.vms.iter().find(|(_, v)| v.uuid == uuid) {
                return Err(if vm.power_state == "Running" {
                    Fail::new("VM_BAD_POWER_STATE", [r.as_str(), "halted", "running"])
                } else {
                    generic("replacing an existing VM (restore=true) is not simulated")
                });
            }
        }
    }
    let vms: Vec<(&str, String, Vm)> = of_class("VM")
        .map(|o| {
            let vm = Vm {
                uuid: if opts.restore {
                    o.field("uuid").to_owned()
                } else {
                    new_uuid()
                },
                name_label: o.field("name_label").to_owned(),
                power_state: "Halted",
                is_a_snapshot: o.rec.get("is_a_snapshot").and_then(Value::as_bool) == Some(true),
                snapshot_of: o.field("snapshot_of").to_owned(),
                snapshot_time: disk::xapi_datetime(0),
                other_config: BTreeMap::new(),
            };
            (o.id, new_ref(), vm)
        })
        .collect();
    let new_vm = |id: &str| {
        vms.iter()
            .find(|(i, _, _)| *i == id)
            .map(|(_, r, _)| r.clone())
    };
    let mut vbds = Vec::new();
    for o in of_class("VBD") {
        let Some(vm) = new_vm(o.field("VM")) else {
            continue;
        };
        let typ = if o.field("type") == "CD" {
            VbdType::CD
        } else {
            VbdType::Disk
        };
        let vdi = vdis.get(o.field("VDI")).cloned().flatten();
        if typ == VbdType::Disk && vdi.is_none() {
            // Its VDI was skipped (force) or not exported.
            continue;
        }
        let mut vbd = Vbd::disk(
            &vm,
            vdi.as_deref().unwrap_or(NULL_REF),
            o.field("userdevice"),
            false,
        );
        vbd.typ = typ;
        vbd.empty = vdi.is_none();
        vbd.mode = if o.field("mode") == "RO" { "RO" } else { "RW" };
        vbd.bootable = o.rec.get("bootable").and_then(Value::as_bool) == Some(true);
        vbds.push(vbd);
    }
    let result: Vec<Value> = {
        let non_snapshots: Vec<&(&str, String, Vm)> =
            vms.iter().filter(|(_, _, v)| !v.is_a_snapshot).collect();
        let chosen: Vec<&(&str, String, Vm)> = if non_snapshots.is_empty() {
            vms.iter().collect()
        } else {
            non_snapshots
        };
        chosen
            .iter()
            .map(|(_, r, _)| Value::from(r.as_str()))
            .collect()
    };
    if opts.dry_run {
        return Ok(encode_value(&Value::Array(vec![])));
    }
    for (_, r, vm) in &vms {
        // Snapshot links point at the VM imported alongside, if any.
        let snapshot_of = new_vm(&vm.snapshot_of).unwrap_or_else(|| NULL_REF.into());
        st.vms.insert(
            r.clone(),
            Vm {
                snapshot_of,
                ..vm.clone()
            },
        );
    }
    for vbd in vbds {
        st.vbds.insert(new_ref(), vbd);
    }
    Ok(encode_value(&Value::Array(result)))
}

/// The local VDI for an exported one: through the `vdi:` map (by uuid), else by its SR and
/// `location`.
fn find_vdi(
    st: &State,
    o: &Object,
    srs: &HashMap<&str, Option<String>>,
    opts: &Options,
) -> Result<String, Fail> {
    if let Some(new) = opts.vdi_map.get(o.field("uuid")) {
        return st
            .vdi_ref_by_uuid(new)
            .ok_or_else(|| Fail::new("UUID_INVALID", ["VDI", new]));
    }
    let Some(Some(sr)) = srs.get(o.field("SR")) else {
        return Err(Fail::new("VDI_CONTENT_ID_MISSING", Vec::<String>::new()));
    };
    // The simulator's `location` is the VDI's uuid.
    let location = o.field("location");
    st.vdi_ref_by_uuid(location)
        .ok_or_else(|| Fail::new("VDI_LOCATION_MISSING", [sr.as_str(), location]))
}

/// `IMPORT_INCOMPATIBLE_VERSION` when the exporting xapi is newer than ours.
fn check_version(v: Option<&Value>) -> Result<(), Fail> {
    let num = |k: &str| {
        let x = v?.get(k)?;
        x.as_int().or_else(|| x.as_str()?.parse().ok())
    };
    let (Some(major), Some(minor)) = (num("xapi_major"), num("xapi_minor")) else {
        return Err(generic("ova.xml has no xapi version"));
    };
    if (major, minor) > XAPI_VERSION {
        return Err(Fail::new(
            "IMPORT_INCOMPATIBLE_VERSION",
            Vec::<String>::new(),
        ));
    }
    Ok(())
}
