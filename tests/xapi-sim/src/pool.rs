//! The objects a whole-VM backup and restore needs beyond one disk: `VDI.create`, `VBD.*`,
//! `network.*` purposes and `task.*` (the HTTP handlers report into tasks).

use std::collections::BTreeMap;

use cbtstream_proto::xmlrpc::Value;

use crate::disk;
use crate::state::{
    new_ref, new_uuid, string_map, Fail, Network, State, Task, Vbd, VbdType, Vdi, VdiType, NULL_REF,
};
use crate::MAX_VDI_SIZE;

type R = Result<Value, Fail>;

pub(crate) const NETWORK_FIELDS: &[&str] = &[
    "uuid",
    "name_label",
    "name_description",
    "allowed_operations",
    "current_operations",
    "VIFs",
    "PIFs",
    "MTU",
    "other_config",
    "bridge",
    "managed",
    "tags",
    "purpose",
];

pub(crate) const TASK_FIELDS: &[&str] = &[
    "uuid",
    "name_label",
    "name_description",
    "allowed_operations",
    "current_operations",
    "created",
    "finished",
    "status",
    "resident_on",
    "progress",
    "type",
    "result",
    "error_info",
    "other_config",
    "subtask_of",
    "subtasks",
];

/// A record argument (`VDI.create`, `VBD.create`): a struct.
pub(crate) struct Record<'a>(pub &'a BTreeMap<String, Value>);

impl Record<'_> {
    /// A field without a default: absent or of the wrong type is `FIELD_TYPE_ERROR [name]`.
    fn str(&self, name: &str) -> Result<&str, Fail> {
        self.0
            .get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| Fail::new("FIELD_TYPE_ERROR", [name]))
    }

    fn str_or<'b>(&'b self, name: &str, default: &'b str) -> Result<&'b str, Fail> {
        match self.0.get(name) {
            None => Ok(default),
            Some(_) => self.str(name),
        }
    }

    fn bool(&self, name: &str) -> Result<bool, Fail> {
        self.0
            .get(name)
            .and_then(Value::as_bool)
            .ok_or_else(|| Fail::new("FIELD_TYPE_ERROR", [name]))
    }

    fn bool_or(&self, name: &str, default: bool) -> Result<bool, Fail> {
        match self.0.get(name) {
            None => Ok(default),
            Some(_) => self.bool(name),
        }
    }

    fn u64(&self, name: &str) -> Result<u64, Fail> {
        self.0
            .get(name)
            .and_then(Value::as_u64)
            .ok_or_else(|| Fail::new("FIELD_TYPE_ERROR", [name]))
    }

    fn string_map(&self, name: &str) -> Result<BTreeMap<String, String>, Fail> {
        let bad = || Fail::new("FIELD_TYPE_ERROR", [name]);
        let m = self
            .0
            .get(name)
            .and_then(Value::as_struct)
            .ok_or_else(bad)?;
        m.iter()
            .map(|(k, v)| Ok((k.clone(), v.as_str().ok_or_else(bad)?.to_owned())))
            .collect()
    }

    fn string_map_or(&self, name: &str) -> Result<BTreeMap<String, String>, Fail> {
        match self.0.get(name) {
            None => Ok(BTreeMap::new()),
            Some(_) => self.string_map(name),
        }
    }
}

/// `VDI.create(record)`: the fields without a default (`SR`, `virtual_size`, `type`,
/// `sharable`, `read_only`, `other_config`) must be present. Makes an empty sparse image,
/// the size rounded up to a whole sector (as SM may), CBT off.
pub(crate) fn vdi_create(st: &mut State, rec: &Record) -> R {
    let sr = rec.str("SR")?;
    let size = rec.u64("virtual_size")?;
    let typ = rec.str("type")?;
    let sharable = rec.bool("sharable")?;
    let read_only = rec.bool("read_only")?;
    let other_config = rec.string_map("other_config")?;
    let name_label = rec.str_or("name_label", "")?.to_owned();
    let name_description = rec.str_or("name_description", "")?.to_owned();
    if sr != st.sr_ref {
        return Err(Fail::handle_invalid("SR", sr));
    }
    match typ {
        "user" => {}
        "cbt_metadata" => return Err(Fail::incompatible_type("", "cbt_metadata")),
        _ => {
            return Err(Fail::new(
                "VALUE_NOT_SUPPORTED",
                ["type", typ, "the simulator creates user VDIs only"],
            ))
        }
    }
    if sharable {
        return Err(Fail::new(
            "VALUE_NOT_SUPPORTED",
            [
                "sharable",
                "true",
                "the simulator's SR holds no sharable VDIs",
            ],
        ));
    }
    let size = size
        .checked_next_multiple_of(512)
        .filter(|&s| s <= MAX_VDI_SIZE)
        .ok_or_else(|| {
            Fail::sr_backend(
                79,
                "VDI Invalid size [opterr=the largest supported size is 16 TiB]",
            )
        })?;
    let uuid = new_uuid();
    let path = st.image_path(&uuid);
    disk::create_sparse(&path, size)
        .map_err(|e| Fail::sr_backend(78, &format!("VDI Creation failed [opterr=error {e}]")))?;
    let r = new_ref();
    st.vdis.insert(
        r.clone(),
        Vdi {
            uuid,
            name_label,
            name_description,
            typ: VdiType::User,
            virtual_size: size,
            cbt_enabled: false,
            is_a_snapshot: false,
            snapshot_of: NULL_REF.into(),
            snapshot_time: disk::xapi_datetime(0),
            other_config,
            read_only,
            path: Some(path),
            // CBT starts off; `VDI.enable_cbt` makes the first log.
            log: None,
            nbd_conns: 0,
            linger_until: None,
        },
    );
    Ok(r.into())
}

/// `VBD.create(record)`: `VM`, `VDI`, `userdevice`, `mode`, `type` and `empty` are needed;
/// `userdevice` `autodetect` takes the lowest free slot. The new VBD is not plugged.
pub(crate) fn vbd_create(st: &mut State, rec: &Record) -> R {
    let vm = rec.str("VM")?.to_owned();
    let vdi = rec.str("VDI")?.to_owned();
    let userdevice = rec.str("userdevice")?;
    let mode = match rec.str("mode")? {
        "RW" => "RW",
        "RO" => "RO",
        m => return Err(Fail::new("FIELD_TYPE_ERROR", [format!("mode: {m}")])),
    };
    let typ = match rec.str("type")? {
        "Disk" => VbdType::Disk,
        "CD" => VbdType::CD,
        t => {
            return Err(Fail::new(
                "VALUE_NOT_SUPPORTED",
                ["type", t, "the simulator has Disk and CD VBDs only"],
            ))
        }
    };
    let empty = rec.bool("empty")?;
    let bootable = rec.bool_or("bootable", false)?;
    let other_config = rec.string_map_or("other_config")?;
    if !st.vms.contains_key(&vm) {
        return Err(Fail::handle_invalid("VM", &vm));
    }
    if empty {
        if typ != VbdType::CD {
            return Err(Fail::new("VBD_NOT_REMOVABLE_MEDIA", [NULL_REF]));
        }
    } else {
        let v = st.vdi(&vdi)?;
        if v.typ == VdiType::CbtMetadata {
            return Err(Fail::incompatible_type(&vdi, "cbt_metadata"));
        }
    }
    let used: Vec<&str> = st
        .vbds
        .values()
        .filter(|b| b.vm == vm)
        .map(|b| b.userdevice.as_str())
        .collect();
    let userdevice = if userdevice == "autodetect" {
        (0..16)
            .map(|n: u32| n.to_string())
            .find(|n| !used.contains(&n.as_str()))
            .ok_or_else(|| Fail::new("ALL_DEVICES_USED", Vec::<String>::new()))?
    } else {
        if userdevice.parse::<u32>().is_err() {
            return Err(Fail::new("INVALID_DEVICE", [userdevice]));
        }
        if used.contains(&userdevice) {
            return Err(Fail::new("DEVICE_ALREADY_EXISTS", [userdevice]));
        }
        userdevice.to_owned()
    };
    let r = new_ref();
    st.vbds.insert(
        r.clone(),
        Vbd {
            uuid: new_uuid(),
            vm,
            vdi: if empty { NULL_REF.into() } else { vdi },
            userdevice,
            typ,
            mode,
            bootable,
            empty,
            currently_attached: false,
            other_config,
        },
    );
    Ok(r.into())
}

/// `VBD.destroy`: refused while attached (the VBD of a running VM).
pub(crate) fn vbd_destroy(st: &mut State, r: &str) -> R {
    let b = st
        .vbds
        .get(r)
        .ok_or_else(|| Fail::handle_invalid("VBD", r))?;
    if b.currently_attached {
        return Err(Fail::new(
            "OPERATION_NOT_ALLOWED",
            ["VBD currently attached to a running VM"],
        ));
    }
    st.vbds.remove(r);
    Ok(void())
}

fn void() -> Value {
    Value::from("")
}

/// The default network: a host's first, with the `nbd` purpose.
pub(crate) fn default_network() -> (String, Network) {
    (
        new_ref(),
        Network {
            uuid: new_uuid(),
            name_label: "Pool-wide network associated with eth0".into(),
            bridge: "xenbr0".into(),
            purpose: vec!["nbd".into()],
        },
    )
}

pub(crate) fn network_record(st: &State, r: &str) -> R {
    let n = st
        .networks
        .get(r)
        .ok_or_else(|| Fail::handle_invalid("network", r))?;
    Ok(Value::record([
        ("uuid", Value::from(n.uuid.as_str())),
        ("name_label", n.name_label.as_str().into()),
        ("name_description", "".into()),
        ("allowed_operations", Value::Array(vec![])),
        ("current_operations", Value::Struct(BTreeMap::new())),
        ("VIFs", Value::Array(vec![])),
        ("PIFs", Value::Array(vec![])),
        ("MTU", Value::int64_str(1500)),
        ("other_config", Value::Struct(BTreeMap::new())),
        ("bridge", n.bridge.as_str().into()),
        ("managed", true.into()),
        ("tags", Value::Array(vec![])),
        (
            "purpose",
            Value::Array(n.purpose.iter().map(|p| Value::from(p.as_str())).collect()),
        ),
    ]))
}

/// `network.add_purpose`: present already is a no-op; `nbd` and `insecure_nbd` exclude each
/// other pool-wide (`NETWORK_INCOMPATIBLE_PURPOSES [new, conflicting]`).
pub(crate) fn add_purpose(st: &mut State, r: &str, purpose: &str) -> R {
    let conflicting = match purpose {
        "nbd" => "insecure_nbd",
        "insecure_nbd" => "nbd",
        _ => return Err(Fail::new("ENUM_INVALID", ["network_purpose", purpose])),
    };
    if !st.networks.contains_key(r) {
        return Err(Fail::handle_invalid("network", r));
    }
    if st
        .networks
        .values()
        .any(|n| n.purpose.iter().any(|p| p == conflicting))
    {
        return Err(Fail::new(
            "NETWORK_INCOMPATIBLE_PURPOSES",
            [purpose, conflicting],
        ));
    }
    let n = st.networks.get_mut(r).expect("checked above");
    if !n.purpose.iter().any(|p| p == purpose) {
        n.purpose.push(purpose.to_owned());
    }
    Ok(void())
}

/// `network.remove_purpose`: absent is a no-op.
pub(crate) fn remove_purpose(st: &mut State, r: &str, purpose: &str) -> R {
    if !matches!(purpose, "nbd" | "insecure_nbd") {
        return Err(Fail::new("ENUM_INVALID", ["network_purpose", purpose]));
    }
    let n = st
        .networks
        .get_mut(r)
        .ok_or_else(|| Fail::handle_invalid("network", r))?;
    n.purpose.retain(|p| p != purpose);
    Ok(void())
}

/// `sim.set_nbd_available`: on adds `nbd` to the first network (dropping `insecure_nbd`
/// everywhere), off removes `nbd` from every network.
pub(crate) fn set_nbd_available(st: &mut State, on: bool) {
    for n in st.networks.values_mut() {
        n.purpose
            .retain(|p| p != if on { "insecure_nbd" } else { "nbd" });
    }
    if on {
        if let Some(n) = st.networks.values_mut().next() {
            if !n.purpose.iter().any(|p| p == "nbd") {
                n.purpose.push("nbd".into());
            }
        }
    }
}

/// A new pending task.
pub(crate) fn task_create(st: &mut State, label: &str, description: &str) -> String {
    let r = new_ref();
    st.tasks.insert(
        r.clone(),
        Task {
            uuid: new_uuid(),
            name_label: label.to_owned(),
            name_description: description.to_owned(),
            status: "pending",
            result: String::new(),
            error_info: Vec::new(),
            created: disk::xapi_now(),
            finished: disk::xapi_datetime(0),
        },
    );
    r
}

pub(crate) fn task_record(st: &State, r: &str) -> R {
    let t = st
        .tasks
        .get(r)
        .ok_or_else(|| Fail::handle_invalid("task", r))?;
    let progress = if t.status == "pending" { 0.0 } else { 1.0 };
    Ok(Value::record([
        ("uuid", Value::from(t.uuid.as_str())),
        ("name_label", t.name_label.as_str().into()),
        ("name_description", t.name_description.as_str().into()),
        ("allowed_operations", Value::Array(vec![])),
        ("current_operations", Value::Struct(BTreeMap::new())),
        ("created", Value::DateTime(t.created.clone())),
        ("finished", Value::DateTime(t.finished.clone())),
        ("status", t.status.into()),
        ("resident_on", NULL_REF.into()),
        ("progress", Value::Double(progress)),
        ("type", "<none/>".into()),
        ("result", t.result.as_str().into()),
        (
            "error_info",
            Value::Array(
                t.error_info
                    .iter()
                    .map(|e| Value::from(e.as_str()))
                    .collect(),
            ),
        ),
        ("other_config", string_map(&BTreeMap::new())),
        ("subtask_of", NULL_REF.into()),
        ("subtasks", Value::Array(vec![])),
    ]))
}
/// Ends a task: `Ok(result value XML)` or `Err(failure)`. An unknown task is ignored (it may
/// have been destroyed meanwhile).
pub(crate) fn task_finish(st: &mut State, r: &str, outcome: Result<String, Fail>) {
    if let Some(t) = st.tasks.get_mut(r) {
        t.finished = disk::xapi_now();
        match outcome {
            Ok(result) => {
                t.status = "success";
                t.result = result;
            }
            Err(f) => {
                t.status = "failure";
                t.error_info = std::iter::once(f.code).chain(f.args).collect();
            }
        }
    }
}
