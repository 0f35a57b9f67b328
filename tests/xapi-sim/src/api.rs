//! XenAPI method dispatch: argument checks, sessions, injected failures, and the methods.
//!
//! Order of checks, as in XAPI: unknown method → `MESSAGE_METHOD_UNKNOWN [name]`; wrong
//! number of parameters → `MESSAGE_PARAMETER_COUNT_MISMATCH [name, expected, received]`;
//! session (first parameter of everything but login) → `SESSION_INVALID [ref]`; then the
//! arguments (`HANDLE_INVALID [class, ref]`, `FIELD_TYPE_ERROR [name]`) and the method.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Instant;

use base64::Engine;
use cbtstream_proto::cbt::encode_base64;
use cbtstream_proto::xmlrpc::Value;

use crate::disk::{self, Bitmap};
use crate::pool::{self, Record};
use crate::state::{
    new_ref, new_uuid, CbtLog, Fail, FailRule, Session, Shared, State, Vbd, VbdType, Vdi, VdiType,
    Vm,
};
use crate::MAX_VDI_SIZE;

type R = Result<Value, Fail>;

/// Fixed (min, max) parameter counts, session included. Getters `CLASS.get_FIELD` are
/// checked against the record instead (see [`getter`]).
fn arity(method: &str) -> Option<(usize, usize)> {
    Some(match method {
        "session.login_with_password" => (2, 4),
        "session.logout" => (1, 1),
        "session.get_uuid" => (2, 2),
        "VM.get_all"
        | "VDI.get_all"
        | "VDI.get_all_records"
        | "SR.get_all"
        | "VBD.get_all"
        | "network.get_all"
        | "task.get_all" => (1, 1),
        "VDI.create"
        | "VBD.create"
        | "VBD.destroy"
        | "network.get_by_uuid"
        | "network.get_record"
        | "task.get_by_uuid"
        | "task.get_record"
        | "task.destroy" => (2, 2),
        "network.add_purpose" | "network.remove_purpose" | "task.create" => (3, 3),
        "VM.get_by_uuid" | "VM.get_record" | "VM.destroy" => (2, 2),
        "VM.snapshot" => (3, 4),
        "VBD.get_by_uuid" | "VBD.get_record" => (2, 2),
        "SR.get_by_uuid" | "SR.get_record" => (2, 2),
        "VDI.get_by_uuid" | "VDI.get_record" | "VDI.get_nbd_info" | "VDI.data_destroy"
        | "VDI.destroy" | "VDI.enable_cbt" | "VDI.disable_cbt" => (2, 2),
        "VDI.snapshot" => (2, 3),
        "VDI.list_changed_blocks"
        | "VDI.resize"
        | "VDI.set_other_config"
        | "VDI.remove_from_other_config"
        | "VDI.set_name_label" => (3, 3),
        "VDI.add_to_other_config" => (4, 4),
        "sim.write" => (4, 4),
        "sim.expire_sessions" | "sim.list_vdis" | "sim.clear_failures" => (1, 1),
        "sim.set_nbd_available" => (2, 2),
        "sim.fail_next" => (3, 5),
        _ => return None,
    })
}

/// Fields readable with `CLASS.get_FIELD`: those of the records in `state.rs` (a test
/// checks that every record field has its getter).
const VM_FIELDS: &[&str] = &[
    "uuid",
    "name_label",
    "name_description",
    "power_state",
    "allowed_operations",
    "current_operations",
    "is_a_template",
    "is_control_domain",
    "is_a_snapshot",
    "snapshot_of",
    "snapshots",
    "snapshot_time",
    "VBDs",
    "VIFs",
    "domid",
    "resident_on",
    "memory_static_max",
    "VCPUs_max",
    "other_config",
    "tags",
];
const VBD_FIELDS: &[&str] = &[
    "uuid",
    "allowed_operations",
    "current_operations",
    "VM",
    "VDI",
    "device",
    "userdevice",
    "bootable",
    "mode",
    "type",
    "unpluggable",
    "storage_lock",
    "empty",
    "other_config",
    "currently_attached",
    "status_code",
    "status_detail",
    "runtime_properties",
    "qos_algorithm_type",
    "qos_algorithm_params",
    "qos_supported_algorithms",
    "metrics",
];
const VDI_FIELDS: &[&str] = &[
    "uuid",
    "name_label",
    "name_description",
    "allowed_operations",
    "current_operations",
    "SR",
    "VBDs",
    "crash_dumps",
    "virtual_size",
    "physical_utilisation",
    "type",
    "sharable",
    "read_only",
    "other_config",
    "storage_lock",
    "location",
    "managed",
    "missing",
    "parent",
    "xenstore_data",
    "sm_config",
    "is_a_snapshot",
    "snapshot_of",
    "snapshots",
    "snapshot_time",
    "tags",
    "allow_caching",
    "on_boot",
    "metadata_of_pool",
    "metadata_latest",
    "is_tools_iso",
    "cbt_enabled",
];
const SR_FIELDS: &[&str] = &[
    "uuid",
    "name_label",
    "name_description",
    "allowed_operations",
    "current_operations",
    "VDIs",
    "PBDs",
    "type",
    "content_type",
    "shared",
    "other_config",
    "sm_config",
    "tags",
];

/// `CLASS.get_FIELD` for a field of the class's record: the class and the field.
fn getter(method: &str) -> Option<(&str, &str)> {
    let (class, rest) = method.split_once('.')?;
    let field = rest.strip_prefix("get_")?;
    let fields = match class {
        "VM" => VM_FIELDS,
        "VBD" => VBD_FIELDS,
        "VDI" => VDI_FIELDS,
        "SR" => SR_FIELDS,
        "network" => pool::NETWORK_FIELDS,
        "task" => pool::TASK_FIELDS,
        _ => return None,
    };
    fields.contains(&field).then_some((class, field))
}

fn record_of(st: &State, class: &str, r: &str) -> R {
    match class {
        "VM" => st.vm_record(r),
        "VBD" => st.vbd_record(r),
        "VDI" => st.vdi_record(r),
        "SR" => st.sr_record(r),
        "network" => pool::network_record(st, r),
        "task" => pool::task_record(st, r),
        _ => Err(Fail::new("MESSAGE_METHOD_UNKNOWN", [class])),
    }
}

/// Positional parameters with typed accessors.
struct Params<'a>(&'a [Value]);

impl Params<'_> {
    fn str(&self, i: usize, name: &str) -> Result<&str, Fail> {
        self.0
            .get(i)
            .and_then(Value::as_str)
            .ok_or_else(|| Fail::new("FIELD_TYPE_ERROR", [name]))
    }

    fn bool(&self, i: usize, name: &str) -> Result<bool, Fail> {
        self.0
            .get(i)
            .and_then(Value::as_bool)
            .ok_or_else(|| Fail::new("FIELD_TYPE_ERROR", [name]))
    }

    /// An int in either encoding (XAPI sends a decimal string).
    fn u64(&self, i: usize, name: &str) -> Result<u64, Fail> {
        self.0
            .get(i)
            .and_then(Value::as_u64)
            .ok_or_else(|| Fail::new("FIELD_TYPE_ERROR", [name]))
    }

    fn string_map(&self, i: usize, name: &str) -> Result<BTreeMap<String, String>, Fail> {
        let bad = || Fail::new("FIELD_TYPE_ERROR", [name]);
        let m = self.0.get(i).and_then(Value::as_struct).ok_or_else(bad)?;
        m.iter()
            .map(|(k, v)| Ok((k.clone(), v.as_str().ok_or_else(bad)?.to_owned())))
            .collect()
    }

    fn record(&self, i: usize, name: &str) -> Result<Record<'_>, Fail> {
        self.0
            .get(i)
            .and_then(Value::as_struct)
            .map(Record)
            .ok_or_else(|| Fail::new("FIELD_TYPE_ERROR", [name]))
    }

    fn strings(&self, i: usize, name: &str) -> Result<Vec<String>, Fail> {
        let bad = || Fail::new("FIELD_TYPE_ERROR", [name]);
        let a = self.0.get(i).and_then(Value::as_array).ok_or_else(bad)?;
        a.iter()
            .map(|v| v.as_str().map(str::to_owned).ok_or_else(bad))
            .collect()
    }
}

/// Handles one call. Never panics on any input.
pub(crate) fn dispatch(shared: &Shared, method: &str, params: &[Value]) -> R {
    let res = dispatch_inner(shared, method, params);
    let mut st = shared.lock();
    *st.calls.entry(method.to_string()).or_default() += 1;
    let log = st.log_calls;
    drop(st);
    if log {
        // Method and outcome only: arguments may hold passwords and session refs.
        match &res {
            Ok(_) => eprintln!("xapi-sim: {method}: Success"),
            Err(f) => eprintln!("xapi-sim: {method}: Failure {}", f.code),
        }
    }
    res
}

fn dispatch_inner(shared: &Shared, method: &str, params: &[Value]) -> R {
    let p = Params(params);
    let (min, max) = match (arity(method), getter(method)) {
        (Some(a), _) => a,
        (None, Some(_)) => (2, 2),
        (None, None) => return Err(Fail::new("MESSAGE_METHOD_UNKNOWN", [method])),
    };
    if params.len() < min || params.len() > max {
        return Err(Fail::new(
            "MESSAGE_PARAMETER_COUNT_MISMATCH",
            [method.to_owned(), max.to_string(), params.len().to_string()],
        ));
    }
    let mut st = shared.lock();
    if method == "session.login_with_password" {
        take_injected(&mut st, method)?;
        return login(&mut st, &p);
    }
    let session = p.str(0, "session_id")?.to_owned();
    match st.sessions.get_mut(&session) {
        Some(s) => s.last_active = Instant::now(),
        None => return Err(Fail::new("SESSION_INVALID", [session])),
    }
    if !method.starts_with("sim.") {
        take_injected(&mut st, method)?;
    }
    if method == "VDI.data_destroy" {
        // Waits on the condition variable, so it needs the guard itself.
        return data_destroy(shared, st, &p);
    }
    if let (None, Some((class, field))) = (arity(method), getter(method)) {
        let r = p.str(1, "self")?;
        let rec = record_of(&st, class, r)?;
        return rec
            .get(field)
            .cloned()
            .ok_or_else(|| Fail::new("MESSAGE_METHOD_UNKNOWN", [method]));
    }
    let st = &mut *st;
    match method {
        "session.logout" => {
            st.sessions.remove(&session);
            Ok(void())
        }
        "session.get_uuid" => {
            let r = p.str(1, "self")?;
            let s = st
                .sessions
                .get(r)
                .ok_or_else(|| Fail::handle_invalid("session", r))?;
            Ok(s.uuid.as_str().into())
        }
        "VM.get_all" => Ok(refs(st.vms.keys())),
        "VDI.get_all" => Ok(refs(st.vdis.keys())),
        "SR.get_all" => Ok(Value::Array(vec![st.sr_ref.as_str().into()])),
        "VDI.get_all_records" => {
            let mut m = BTreeMap::new();
            for r in st.vdis.keys() {
                m.insert(r.clone(), st.vdi_record(r)?);
            }
            Ok(Value::Struct(m))
        }
        "VM.get_by_uuid" => by_uuid(st.vms.iter().map(|(r, v)| (r, &v.uuid)), "VM", &p),
        "VBD.get_by_uuid" => by_uuid(st.vbds.iter().map(|(r, v)| (r, &v.uuid)), "VBD", &p),
        "VDI.get_by_uuid" => by_uuid(st.vdis.iter().map(|(r, v)| (r, &v.uuid)), "VDI", &p),
        "SR.get_by_uuid" => by_uuid(std::iter::once((&st.sr_ref, &st.sr_uuid)), "SR", &p),
        "VBD.get_all" => Ok(refs(st.vbds.keys())),
        "network.get_all" => Ok(refs(st.networks.keys())),
        "task.get_all" => Ok(refs(st.tasks.keys())),
        "network.get_by_uuid" => {
            by_uuid(st.networks.iter().map(|(r, n)| (r, &n.uuid)), "network", &p)
        }
        "task.get_by_uuid" => by_uuid(st.tasks.iter().map(|(r, t)| (r, &t.uuid)), "task", &p),
        "network.get_record" => pool::network_record(st, p.str(1, "self")?),
        "task.get_record" => pool::task_record(st, p.str(1, "self")?),
        "network.add_purpose" => pool::add_purpose(st, p.str(1, "self")?, p.str(2, "value")?),
        "network.remove_purpose" => pool::remove_purpose(st, p.str(1, "self")?, p.str(2, "value")?),
        "VDI.create" => pool::vdi_create(st, &p.record(1, "args")?),
        "VBD.create" => pool::vbd_create(st, &p.record(1, "args")?),
        "VBD.destroy" => pool::vbd_destroy(st, p.str(1, "self")?),
        "task.create" => {
            let r = pool::task_create(st, p.str(1, "label")?, p.str(2, "description")?);
            Ok(r.into())
        }
        "task.destroy" => {
            let r = p.str(1, "self")?;
            st.tasks
                .remove(r)
                .ok_or_else(|| Fail::handle_invalid("task", r))?;
            Ok(void())
        }
        "VM.get_record" => st.vm_record(p.str(1, "self")?),
        "VBD.get_record" => st.vbd_record(p.str(1, "self")?),
        "VDI.get_record" => st.vdi_record(p.str(1, "self")?),
        "SR.get_record" => st.sr_record(p.str(1, "self")?),
        "VM.snapshot" => vm_snapshot(st, &p),
        "VM.destroy" => vm_destroy(st, &p),
        "VDI.set_name_label" => {
            let label = p.str(2, "value")?.to_owned();
            st.vdi_mut(p.str(1, "self")?)?.name_label = label;
            Ok(void())
        }
        "VDI.add_to_other_config" => {
            let (k, v) = (p.str(2, "key")?.to_owned(), p.str(3, "value")?.to_owned());
            let vdi = st.vdi_mut(p.str(1, "self")?)?;
            if vdi.other_config.contains_key(&k) {
                return Err(Fail::new(
                    "MAP_DUPLICATE_KEY",
                    ["VDI", "other_config", p.str(1, "self")?, &k],
                ));
            }
            vdi.other_config.insert(k, v);
            Ok(void())
        }
        "VDI.remove_from_other_config" => {
            let k = p.str(2, "key")?.to_owned();
            st.vdi_mut(p.str(1, "self")?)?.other_config.remove(&k);
            Ok(void())
        }
        "VDI.set_other_config" => {
            let m = p.string_map(2, "value")?;
            st.vdi_mut(p.str(1, "self")?)?.other_config = m;
            Ok(void())
        }
        "VDI.snapshot" => {
            let vdi = p.str(1, "vdi")?.to_owned();
            if params.len() > 2 {
                p.string_map(2, "driver_params")?;
            }
            vdi_snapshot(st, &vdi, true).map(Value::from)
        }
        "VDI.list_changed_blocks" => list_changed_blocks(st, &p),
        "VDI.get_nbd_info" => get_nbd_info(st, &p, &session),
        "VDI.destroy" => vdi_destroy(st, p.str(1, "self")?),
        "VDI.enable_cbt" => set_cbt(st, p.str(1, "self")?, true),
        "VDI.disable_cbt" => set_cbt(st, p.str(1, "self")?, false),
        "VDI.resize" => resize(st, p.str(1, "vdi")?, p.u64(2, "size")?),
        "sim.write" => {
            let r = p.str(1, "vdi")?.to_owned();
            let offset = p.u64(2, "offset")?;
            let data = base64::engine::general_purpose::STANDARD
                .decode(p.str(3, "data")?.trim_ascii())
                .map_err(|_| Fail::new("FIELD_TYPE_ERROR", ["data"]))?;
            write(st, &r, offset, &data)?;
            Ok(void())
        }
        "sim.expire_sessions" => {
            st.sessions.clear();
            Ok(void())
        }
        "sim.set_nbd_available" => {
            pool::set_nbd_available(st, p.bool(1, "available")?);
            Ok(void())
        }
        "sim.list_vdis" => list_vdis(st),
        "sim.clear_failures" => {
            st.failures.clear();
            Ok(void())
        }
        "sim.fail_next" => {
            let target = p.str(1, "method")?.to_owned();
            let code = p.str(2, "code")?;
            let args = if params.len() > 3 {
                p.strings(3, "args")?
            } else {
                vec![]
            };
            // Times: a count (decimal string or int); "always" or a negative count: forever.
            let remaining = match params.get(4) {
                None => Some(1),
                Some(v) if v.as_str() == Some("always") => None,
                Some(v) => match v.as_i64() {
                    Some(n) if n < 0 => None,
                    Some(n) => Some(u32::try_from(n).unwrap_or(u32::MAX)),
                    None => return Err(Fail::new("FIELD_TYPE_ERROR", ["times"])),
                },
            };
            if code.is_empty() {
                return Err(Fail::new("FIELD_TYPE_ERROR", ["code"]));
            }
            st.failures.push(FailRule {
                method: target,
                fail: Fail::new(code, args),
                remaining,
            });
            Ok(void())
        }
        _ => Err(Fail::new("MESSAGE_METHOD_UNKNOWN", [method])),
    }
}

/// XAPI's void: an empty string value.
fn void() -> Value {
    Value::from("")
}

fn refs<'a>(it: impl Iterator<Item = &'a String>) -> Value {
    Value::Array(it.map(|r| Value::from(r.as_str())).collect())
}

fn by_uuid<'a>(
    mut it: impl Iterator<Item = (&'a String, &'a String)>,
    class: &str,
    p: &Params,
) -> R {
    let uuid = p.str(1, "uuid")?;
    it.find(|(_, u)| u.as_str() == uuid)
        .map(|(r, _)| Value::from(r.as_str()))
        .ok_or_else(|| Fail::new("UUID_INVALID", [class, uuid]))
}

/// Consumes one injected failure for `method`, if any is pending.
pub(crate) fn take_injected(st: &mut State, method: &str) -> Result<(), Fail> {
    let Some(i) = st.failures.iter().position(|f| f.method == method) else {
        return Ok(());
    };
    let fail = st.failures[i].fail.clone();
    match &mut st.failures[i].remaining {
        None => {}
        Some(n) if *n <= 1 => {
            st.failures.remove(i);
        }
        Some(n) => *n -= 1,
    }
    Err(fail)
}

fn login(st: &mut State, p: &Params) -> R {
    let user = p.str(0, "uname")?;
    let pwd = p.str(1, "pwd")?;
    if p.0.len() > 2 {
        p.str(2, "version")?;
    }
    if p.0.len() > 3 {
        p.str(3, "originator")?;
    }
    // XAPI's answer to bad credentials: the code and a generic message, no secrets.
    if user != st.user || pwd != st.password {
        return Err(Fail::new(
            "SESSION_AUTHENTICATION_FAILED",
            [user, "Authentication failure"],
        ));
    }
    let r = new_ref();
    st.sessions.insert(
        r.clone(),
        Session {
            uuid: new_uuid(),
            user: user.to_owned(),
            last_active: Instant::now(),
        },
    );
    Ok(r.into())
}

/// Copies the VDI's data and, for a CBT-enabled VDI, moves its log to the snapshot and
/// starts a fresh one (sm `_cbt_snapshot`). Returns the snapshot's ref.
pub(crate) fn vdi_snapshot(st: &mut State, r: &str, check_type: bool) -> Result<String, Fail> {
    let v = st.vdi(r)?;
    if check_type && v.typ == VdiType::CbtMetadata {
        return Err(Fail::incompatible_type(r, "cbt_metadata"));
    }
    let Some(src) = v.path.clone() else {
        return Err(Fail::incompatible_type(r, "cbt_metadata"));
    };
    let (size, name_label, name_description) = (
        v.virtual_size,
        v.name_label.clone(),
        v.name_description.clone(),
    );
    // A snapshot of a snapshot is a plain copy, outside any CBT chain.
    let chained = !v.is_a_snapshot && v.log.is_some();
    let uuid = new_uuid();
    let dst = st.image_path(&uuid);
    disk::sparse_copy(&src, &dst, size).map_err(|e| {
        Fail::sr_backend(
            82,
            &format!("Failed to snapshot VDI [opterr=copying the image: {e}]"),
        )
    })?;
    let snap_ref = new_ref();
    let mut log = None;
    if chained {
        let v = st.vdi_mut(r)?;
        let mut moved = v.log.take().expect("checked above");
        let parent = moved.parent.clone();
        moved.child = Some(r.to_owned());
        v.log = Some(CbtLog {
            bitmap: Bitmap::new(size),
            parent: Some(snap_ref.clone()),
            child: None,
        });
        if let Some(l) = parent
            .as_ref()
            .and_then(|p| st.vdis.get_mut(p))
            .and_then(|pv| pv.log.as_mut())
        {
            l.child = Some(snap_ref.clone());
        }
        log = Some(moved);
    }
    st.vdis.insert(
        snap_ref.clone(),
        Vdi {
            uuid,
            name_label,
            name_description,
            typ: VdiType::User,
            virtual_size: size,
            cbt_enabled: chained,
            is_a_snapshot: true,
            snapshot_of: r.to_owned(),
            snapshot_time: disk::xapi_now(),
            other_config: BTreeMap::new(),
            read_only: false,
            path: Some(dst),
            log,
            nbd_conns: 0,
            linger_until: None,
        },
    );
    Ok(snap_ref)
}

/// `VM.snapshot(vm, new_name[, ignore_vdis])`: a halted snapshot VM whose VBDs point at
/// snapshots of the VM's disks.
fn vm_snapshot(st: &mut State, p: &Params) -> R {
    let vm = p.str(1, "vm")?.to_owned();
    let name = p.str(2, "new_name")?.to_owned();
    let ignore = if p.0.len() > 3 {
        p.strings(3, "ignore_vdis")?
    } else {
        vec![]
    };
    let src = st
        .vms
        .get(&vm)
        .ok_or_else(|| Fail::handle_invalid("VM", &vm))?;
    if src.is_a_snapshot {
        return Err(Fail::new(
            "OPERATION_NOT_ALLOWED",
            [format!("VM is a snapshot: {vm}")],
        ));
    }
    // Disks are snapshotted; CD drives keep their ISO (or stay empty).
    let vbds: Vec<Vbd> = st
        .vbds
        .values()
        .filter(|b| b.vm == vm && !(b.typ == VbdType::Disk && ignore.contains(&b.vdi)))
        .cloned()
        .collect();
    let snap_vm = new_ref();
    let mut copies = Vec::new();
    for mut b in vbds {
        if b.typ == VbdType::Disk {
            b.vdi = vdi_snapshot(st, &b.vdi, true)?;
            b.other_config = BTreeMap::from([("owner".to_owned(), String::new())]);
        }
        b.uuid = new_uuid();
        b.vm = snap_vm.clone();
        b.currently_attached = false;
        copies.push(b);
    }
    st.vms.insert(
        snap_vm.clone(),
        Vm {
            uuid: new_uuid(),
            name_label: name,
            power_state: "Halted",
            is_a_snapshot: true,
            snapshot_of: vm,
            snapshot_time: disk::xapi_now(),
            other_config: BTreeMap::new(),
        },
    );
    for b in copies {
        st.vbds.insert(new_ref(), b);
    }
    Ok(snap_vm.into())
}

/// `VM.destroy`: snapshots only (the VDIs stay, as in XAPI).
fn vm_destroy(st: &mut State, p: &Params) -> R {
    let vm = p.str(1, "self")?;
    let v = st
        .vms
        .get(vm)
        .ok_or_else(|| Fail::handle_invalid("VM", vm))?;
    if v.power_state != "Halted" {
        return Err(Fail::new(
            "VM_BAD_POWER_STATE",
            [vm, "halted", &v.power_state.to_lowercase()],
        ));
    }
    st.vms.remove(vm);
    st.vbds.retain(|_, b| b.vm != vm);
    Ok(void())
}

/// ORs the logs after `from` up to and including `to` along the child pointers (sm
/// `VDI.list_changed_blocks`), growing the result when a later log covers a bigger disk.
fn list_changed_blocks(st: &mut State, p: &Params) -> R {
    let from = p.str(1, "vdi_from")?;
    let to = p.str(2, "vdi_to")?;
    st.vdi(from)?;
    let vto = st.vdi(to)?;
    if vto.attached_to_dom0(Instant::now()) {
        return Err(Fail::in_use(to, "list_changed_blocks"));
    }
    const FAILED: &str = "Failed to calculate changed blocks for given VDIs.";
    let unrelated = || {
        Fail::sr_backend(
            460,
            &format!("{FAILED} [opterr=Source and target VDI are unrelated]"),
        )
    };
    if from == to {
        return Err(Fail::sr_backend(
            460,
            &format!("{FAILED} [opterr=Source and target VDI are same]"),
        ));
    }
    let from_log = st.vdi(from)?.log.as_ref().ok_or_else(unrelated)?;
    let mut merged: Option<Bitmap> = None;
    let mut cur = from_log.child.clone();
    // The chain has at most one log per VDI; the bound guards against a cycle.
    for _ in 0..st.vdis.len() {
        let Some(c) = cur else { break };
        let Some(log) = st.vdis.get(&c).and_then(|v| v.log.as_ref()) else {
            break;
        };
        match &mut merged {
            None => merged = Some(log.bitmap.clone()),
            Some(m) if log.bitmap.size() < m.size() => {
                return Err(Fail::sr_backend(
                    459,
                    "Changed block tracking log is in an inconsistent state. [opterr=Inconsistent bitmaps]",
                ));
            }
            Some(m) => m.or(&log.bitmap),
        }
        if c == to {
            let bits = merged.expect("set above");
            return Ok(encode_base64(bits.bytes()).into());
        }
        cur = log.child.clone();
    }
    Err(unrelated())
}

fn get_nbd_info(st: &mut State, p: &Params, session: &str) -> R {
    let r = p.str(1, "self")?;
    let v = st.vdi(r)?;
    if v.typ == VdiType::CbtMetadata {
        return Err(Fail::incompatible_type(r, "cbt_metadata"));
    }
    if !st.nbd_available() {
        // No network with the `nbd` purpose: no PIF to list.
        return Ok(Value::Array(vec![]));
    }
    let name = format!("/{}?session_id={session}", v.uuid);
    let image = v.path.clone();
    let (port, cert) = match st.real_nbd.as_mut() {
        None => (st.nbd_port, st.cert_pem.clone()),
        Some(real) => {
            let image = image.ok_or_else(|| Fail::incompatible_type(r, "cbt_metadata"))?;
            let kind = real.kind;
            let port = real
                .port_for(&name, r, &image)
                .map_err(|e| Fail::new("INTERNAL_ERROR", [format!("starting {kind:?}: {e:#}")]))?;
            (port, real.cert_pem.clone())
        }
    };
    Ok(Value::Array(vec![Value::record([
        ("exportname", Value::from(name)),
        ("address", "127.0.0.1".into()),
        ("port", Value::int64_str(i64::from(port))),
        ("cert", cert.into()),
        ("subject", "localhost".into()),
    ])]))
}

/// `VDI.data_destroy`: delete a snapshot's data, keep its CBT log (type → `cbt_metadata`).
/// Waits up to the configured timeout (4 s in XAPI) for NBD connections to go away.
fn data_destroy(shared: &Shared, mut st: std::sync::MutexGuard<'_, State>, p: &Params) -> R {
    let r = p.str(1, "self")?.to_owned();
    let v = st.vdi(&r)?;
    if !v.is_a_snapshot {
        return Err(Fail::new(
            "OPERATION_NOT_ALLOWED",
            [format!("VDI is not a snapshot: {r}")],
        ));
    }
    if !v.cbt_enabled {
        return Err(Fail::new("VDI_NO_CBT_METADATA", [r.as_str()]));
    }
    if v.typ == VdiType::CbtMetadata {
        return Ok(void());
    }
    let deadline = Instant::now() + st.data_destroy_timeout;
    loop {
        let now = Instant::now();
        let v = st.vdi(&r)?;
        if !v.attached_to_dom0(now) {
            break;
        }
        if now >= deadline {
            return Err(Fail::in_use(&r, "data_destroy"));
        }
        // Open connections signal the condvar when they close; a linger just runs out.
        let wake = match v.linger_until {
            Some(t) if v.nbd_conns == 0 => t.min(deadline),
            _ => deadline,
        };
        shared.waiters.fetch_add(1, Ordering::SeqCst);
        st = shared
            .changed
            .wait_timeout(st, wake.saturating_duration_since(now))
            .unwrap_or_else(|e| e.into_inner())
            .0;
        shared.waiters.fetch_sub(1, Ordering::SeqCst);
    }
    if let Some(real) = st.real_nbd.as_mut() {
        real.stop_vdi(&r);
    }
    let v = st.vdi_mut(&r)?;
    if let Some(path) = v.path.take() {
        if let Err(e) = std::fs::remove_file(&path) {
            v.path = Some(path);
            return Err(Fail::sr_backend(
                80,
                &format!("Failed to mark VDI hidden [opterr={e}]"),
            ));
        }
    }
    v.typ = VdiType::CbtMetadata;
    // The VBDs of snapshot VMs go with the data.
    st.vbds.retain(|_, b| b.vdi != r);
    Ok(void())
}

/// `VDI.destroy`. Removing a VDI from the middle of a CBT chain ORs its log into its
/// child's and relinks the neighbours (sm `delete` → `cbt-util coalesce`), so the chain stays
/// valid; only this VDI stops being a usable endpoint.
fn vdi_destroy(st: &mut State, r: &str) -> R {
    let v = st.vdi(r)?;
    if v.attached_to_dom0(Instant::now())
        || st.vbds.values().any(|b| b.vdi == r && b.currently_attached)
    {
        return Err(Fail::in_use(r, "destroy"));
    }
    if let Some(real) = st.real_nbd.as_mut() {
        real.stop_vdi(r);
    }
    let v = st.vdis.remove(r).expect("checked above");
    if let Some(path) = &v.path {
        let _ = std::fs::remove_file(path);
    }
    st.vbds.retain(|_, b| b.vdi != r);
    if let Some(log) = v.log {
        unlink_log(st, &log);
    }
    Ok(void())
}

/// Takes a log out of its chain: its bits go to the child, the neighbours point at each
/// other.
fn unlink_log(st: &mut State, log: &CbtLog) {
    if let Some(cl) = log
        .child
        .as_ref()
        .and_then(|c| st.vdis.get_mut(c))
        .and_then(|cv| cv.log.as_mut())
    {
        cl.bitmap.or(&log.bitmap);
        cl.parent = log.parent.clone();
    }
    if let Some(pl) = log
        .parent
        .as_ref()
        .and_then(|p| st.vdis.get_mut(p))
        .and_then(|pv| pv.log.as_mut())
    {
        pl.child = log.child.clone();
    }
}

/// `VDI.enable_cbt` / `VDI.disable_cbt`, both idempotent. Disabling deletes the leaf's log
/// and cuts the chain (the parent's child pointer is cleared).
fn set_cbt(st: &mut State, r: &str, enable: bool) -> R {
    let v = st.vdi(r)?;
    if v.typ == VdiType::CbtMetadata {
        return Err(Fail::incompatible_type(r, "cbt_metadata"));
    }
    if v.is_a_snapshot {
        return Err(Fail::new(
            "OPERATION_NOT_ALLOWED",
            [format!("VDI is a snapshot: {r}")],
        ));
    }
    if v.cbt_enabled == enable {
        return Ok(void());
    }
    let size = v.virtual_size;
    let v = st.vdi_mut(r)?;
    v.cbt_enabled = enable;
    if enable {
        v.log = Some(CbtLog {
            bitmap: Bitmap::new(size),
            parent: None,
            child: None,
        });
    } else if let Some(log) = v.log.take() {
        if let Some(pl) = log
            .parent
            .as_ref()
            .and_then(|p| st.vdis.get_mut(p))
            .and_then(|pv| pv.log.as_mut())
        {
            pl.child = None;
        }
    }
    Ok(void())
}

/// `VDI.resize`: grow only; the size is rounded up to a whole sector. The CBT log grows
/// with the disk (sm `resize_cbt`), its new blocks clean.
fn resize(st: &mut State, r: &str, size: u64) -> R {
    let v = st.vdi(r)?;
    if v.typ == VdiType::CbtMetadata {
        return Err(Fail::incompatible_type(r, "cbt_metadata"));
    }
    let size = size
        .checked_next_multiple_of(512)
        .ok_or_else(|| Fail::new("FIELD_TYPE_ERROR", ["size"]))?;
    if size > MAX_VDI_SIZE {
        return Err(Fail::sr_backend(
            79,
            "VDI Invalid size [opterr=the largest supported size is 16 TiB]",
        ));
    }
    if size < v.virtual_size {
        return Err(Fail::sr_backend(
            79,
            "VDI Invalid size [opterr=shrinking not allowed]",
        ));
    }
    if let Some(path) = &v.path {
        disk::grow(path, size)
            .map_err(|e| Fail::sr_backend(79, &format!("VDI Invalid size [opterr={e}]")))?;
    }
    let v = st.vdi_mut(r)?;
    v.virtual_size = size;
    if let Some(log) = &mut v.log {
        log.bitmap.grow(size);
    }
    Ok(void())
}

/// Guest writes into a live VDI: the data goes to its image and the blocks to its CBT log.
pub(crate) fn write(st: &mut State, r: &str, offset: u64, data: &[u8]) -> Result<(), Fail> {
    let v = st.vdi_mut(r)?;
    if v.is_a_snapshot {
        return Err(Fail::new(
            "OPERATION_NOT_ALLOWED",
            [format!("VDI is a snapshot: {r}")],
        ));
    }
    let Some(path) = &v.path else {
        return Err(Fail::incompatible_type(r, "cbt_metadata"));
    };
    let end = offset.checked_add(data.len() as u64);
    if end.is_none_or(|e| e > v.virtual_size) {
        return Err(Fail::new(
            "VALUE_NOT_SUPPORTED",
            [
                "offset",
                &offset.to_string(),
                "the write goes past the end of the disk",
            ],
        ));
    }
    disk::write_at(path, offset, data)
        .map_err(|e| Fail::new("INTERNAL_ERROR", [format!("writing the image: {e}")]))?;
    if let Some(log) = &mut v.log {
        log.bitmap.mark(offset, data.len() as u64);
    }
    Ok(())
}

/// `sim.list_vdis`: every VDI record, plus `sim_*` members for assertions.
fn list_vdis(st: &State) -> R {
    let now = Instant::now();
    let mut out = Vec::new();
    for (r, v) in &st.vdis {
        let Value::Struct(mut rec) = st.vdi_record(r)? else {
            continue;
        };
        rec.insert("sim_ref".into(), r.as_str().into());
        rec.insert("sim_attached".into(), v.attached_to_dom0(now).into());
        rec.insert("sim_has_data".into(), v.path.is_some().into());
        let blocks = v
            .log
            .as_ref()
            .map(|l| l.bitmap.blocks())
            .unwrap_or_default();
        rec.insert(
            "sim_cbt_log_blocks".into(),
            Value::Array(
                blocks
                    .into_iter()
                    .map(|b| Value::int64_str(b as i64))
                    .collect(),
            ),
        );
        out.push(Value::Struct(rec));
    }
    Ok(Value::Array(out))
}
