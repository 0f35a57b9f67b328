//! The simulated pool: sessions, one SR, VMs, VBDs, VDIs with their disk files and CBT logs.
//!
//! Everything lives behind one mutex. Calls are short, except `VDI.snapshot` (a file copy)
//! and `VDI.data_destroy` (which waits on the condition variable, releasing the lock, for
//! NBD connections to go away). Holding the lock during the copy keeps guest writes
//! (`sim.write`) and the move of the CBT log atomic with respect to the copied data: a write
//! lands either in the snapshot's data and log, or in neither.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cbtstream_proto::xmlrpc::Value;

use crate::disk::Bitmap;
use crate::nbd::RealNbd;

/// `OpaqueRef:NULL`, XAPI's null reference.
pub(crate) const NULL_REF: &str = "OpaqueRef:NULL";

/// A XenAPI failure: `ErrorDescription = [code, args...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fail {
    pub code: String,
    pub args: Vec<String>,
}

impl Fail {
    pub(crate) fn new<S: Into<String>>(code: &str, args: impl IntoIterator<Item = S>) -> Fail {
        Fail {
            code: code.to_owned(),
            args: args.into_iter().map(Into::into).collect(),
        }
    }

    /// `SR_BACKEND_FAILURE_<n>` as XAPI wraps SMAPIv1 errors: `["", reason, stderr]`.
    pub(crate) fn sr_backend(n: u32, reason: &str) -> Fail {
        Fail::new(&format!("SR_BACKEND_FAILURE_{n}"), ["", reason, ""])
    }

    pub(crate) fn handle_invalid(class: &str, r: &str) -> Fail {
        Fail::new("HANDLE_INVALID", [class, r])
    }

    pub(crate) fn incompatible_type(r: &str, ty: &str) -> Fail {
        Fail::new("VDI_INCOMPATIBLE_TYPE", [r, ty])
    }

    pub(crate) fn in_use(r: &str, op: &str) -> Fail {
        Fail::new("VDI_IN_USE", [r, op])
    }
}

pub(crate) fn new_ref() -> String {
    format!("OpaqueRef:{}", uuid::Uuid::new_v4())
}

pub(crate) fn new_uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VdiType {
    User,
    /// Data destroyed, CBT log kept (`VDI.data_destroy`).
    CbtMetadata,
}

impl VdiType {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            VdiType::User => "user",
            VdiType::CbtMetadata => "cbt_metadata",
        }
    }
}

/// A CBT log (sm's `<uuid>.cbtlog`): the blocks written while it was the leaf's log, and the
/// chain pointers. A snapshot takes over the VDI's log, so each snapshot's log holds the
/// changes between the previous snapshot and itself.
#[derive(Debug, Clone)]
pub(crate) struct CbtLog {
    pub bitmap: Bitmap,
    /// The older VDI on the chain (by ref).
    pub parent: Option<String>,
    /// The newer VDI on the chain (by ref).
    pub child: Option<String>,
}

#[derive(Debug)]
pub(crate) struct Vdi {
    pub uuid: String,
    pub name_label: String,
    pub name_description: String,
    pub typ: VdiType,
    pub virtual_size: u64,
    pub cbt_enabled: bool,
    pub is_a_snapshot: bool,
    pub snapshot_of: String,
    pub snapshot_time: String,
    pub other_config: BTreeMap<String, String>,
    /// The raw image; `None` once the data is destroyed.
    pub path: Option<PathBuf>,
    /// `None` when CBT is disabled (or was never enabled on the source of a snapshot).
    pub log: Option<CbtLog>,
    /// Open NBD connections (each is a dom0 VBD on a real host).
    pub nbd_conns: usize,
    /// After the last NBD connection closed, the VDI stays attached until then (xapi-nbd
    /// unplugs and destroys its dom0 VBD a little after the client leaves).
    pub linger_until: Option<Instant>,
}

impl Vdi {
    /// Attached to dom0 by an NBD connection, now or within the lag after one closed.
    pub(crate) fn attached_to_dom0(&self, now: Instant) -> bool {
        self.nbd_conns > 0 || self.linger_until.is_some_and(|t| t > now)
    }
}

#[derive(Debug)]
pub(crate) struct Vm {
    pub uuid: String,
    pub name_label: String,
    pub power_state: &'static str,
    pub is_a_snapshot: bool,
    pub snapshot_of: String,
    pub snapshot_time: String,
    pub other_config: BTreeMap<String, String>,
}

#[derive(Debug)]
pub(crate) struct Vbd {
    pub uuid: String,
    pub vm: String,
    pub vdi: String,
    pub userdevice: String,
    pub currently_attached: bool,
}

#[derive(Debug)]
pub(crate) struct Session {
    pub uuid: String,
    /// Kept for the record; never logged.
    #[allow(dead_code)]
    pub user: String,
    pub last_active: Instant,
}

/// A failure injected with `sim.fail_next` / [`crate::Simulator::fail_next`].
#[derive(Debug, Clone)]
pub(crate) struct FailRule {
    pub method: String,
    pub fail: Fail,
    /// `None`: every call from now on.
    pub remaining: Option<u32>,
}

pub(crate) struct State {
    pub user: String,
    pub password: String,
    pub data_dir: PathBuf,
    pub nbd_lag: Duration,
    pub data_destroy_timeout: Duration,
    pub log_calls: bool,
    /// How many times each method was called (a probe for tests).
    pub calls: BTreeMap<String, u64>,
    pub sessions: HashMap<String, Session>,
    pub vms: BTreeMap<String, Vm>,
    pub vbds: BTreeMap<String, Vbd>,
    pub vdis: BTreeMap<String, Vdi>,
    pub sr_ref: String,
    pub sr_uuid: String,
    pub nbd_available: bool,
    pub failures: Vec<FailRule>,
    /// Filled in once the NBD server is up.
    pub nbd_port: u16,
    /// PEM of the leaf certificate (what `get_nbd_info` returns as `cert`).
    pub cert_pem: String,
    /// `Some` with `--nbd-server qemu-nbd|nbdkit`: `get_nbd_info` hands out these servers.
    pub real_nbd: Option<RealNbd>,
}

impl State {
    pub(crate) fn vdi(&self, r: &str) -> Result<&Vdi, Fail> {
        self.vdis
            .get(r)
            .ok_or_else(|| Fail::handle_invalid("VDI", r))
    }

    pub(crate) fn vdi_mut(&mut self, r: &str) -> Result<&mut Vdi, Fail> {
        self.vdis
            .get_mut(r)
            .ok_or_else(|| Fail::handle_invalid("VDI", r))
    }

    pub(crate) fn vdi_ref_by_uuid(&self, uuid: &str) -> Option<String> {
        self.vdis
            .iter()
            .find(|(_, v)| v.uuid == uuid)
            .map(|(r, _)| r.clone())
    }

    pub(crate) fn image_path(&self, uuid: &str) -> PathBuf {
        self.data_dir.join(format!("{uuid}.raw"))
    }

    fn vbds_of_vdi(&self, r: &str) -> Vec<Value> {
        self.vbds
            .iter()
            .filter(|(_, b)| b.vdi == r)
            .map(|(k, _)| Value::from(k.as_str()))
            .collect()
    }

    /// The VDI record with XAPI's field names and wire types (ints as decimal strings).
    pub(crate) fn vdi_record(&self, r: &str) -> Result<Value, Fail> {
        let v = self.vdi(r)?;
        let snapshots: Vec<Value> = self
            .vdis
            .iter()
            .filter(|(_, s)| s.snapshot_of == r)
            .map(|(k, _)| Value::from(k.as_str()))
            .collect();
        let physical = match &v.path {
            Some(p) => std::fs::metadata(p)
                .map(|m| {
                    use std::os::unix::fs::MetadataExt;
                    m.blocks() * 512
                })
                .unwrap_or(0),
            None => 0,
        };
        let location = v.uuid.clone();
        Ok(Value::record([
            ("uuid", Value::from(v.uuid.as_str())),
            ("name_label", v.name_label.as_str().into()),
            ("name_description", v.name_description.as_str().into()),
            ("allowed_operations", Value::Array(vec![])),
            ("current_operations", Value::Struct(BTreeMap::new())),
            ("SR", self.sr_ref.as_str().into()),
            ("VBDs", Value::Array(self.vbds_of_vdi(r))),
            ("crash_dumps", Value::Array(vec![])),
            ("virtual_size", Value::int64_str(v.virtual_size as i64)),
            ("physical_utilisation", Value::int64_str(physical as i64)),
            ("type", v.typ.as_str().into()),
            ("sharable", false.into()),
            ("read_only", false.into()),
            ("other_config", string_map(&v.other_config)),
            ("storage_lock", false.into()),
            ("location", location.into()),
            ("managed", true.into()),
            ("missing", false.into()),
            ("parent", NULL_REF.into()),
            ("xenstore_data", Value::Struct(BTreeMap::new())),
            ("sm_config", Value::Struct(BTreeMap::new())),
            ("is_a_snapshot", v.is_a_snapshot.into()),
            ("snapshot_of", v.snapshot_of.as_str().into()),
            ("snapshots", Value::Array(snapshots)),
            ("snapshot_time", Value::DateTime(v.snapshot_time.clone())),
            ("tags", Value::Array(vec![])),
            ("allow_caching", false.into()),
            ("on_boot", "persist".into()),
            ("metadata_of_pool", NULL_REF.into()),
            ("metadata_latest", false.into()),
            ("is_tools_iso", false.into()),
            ("cbt_enabled", v.cbt_enabled.into()),
        ]))
    }

    pub(crate) fn vm_record(&self, r: &str) -> Result<Value, Fail> {
        let vm = self
            .vms
            .get(r)
            .ok_or_else(|| Fail::handle_invalid("VM", r))?;
        let vbds: Vec<Value> = self
            .vbds
            .iter()
            .filter(|(_, b)| b.vm == r)
            .map(|(k, _)| Value::from(k.as_str()))
            .collect();
        let snapshots: Vec<Value> = self
            .vms
            .iter()
            .filter(|(_, s)| s.snapshot_of == r)
            .map(|(k, _)| Value::from(k.as_str()))
            .collect();
        let running = vm.power_state == "Running";
        Ok(Value::record([
            ("uuid", Value::from(vm.uuid.as_str())),
            ("name_label", vm.name_label.as_str().into()),
            ("name_description", "".into()),
            ("power_state", vm.power_state.into()),
            ("allowed_operations", Value::Array(vec![])),
            ("current_operations", Value::Struct(BTreeMap::new())),
            ("is_a_template", false.into()),
            ("is_control_domain", false.into()),
            ("is_a_snapshot", vm.is_a_snapshot.into()),
            ("snapshot_of", vm.snapshot_of.as_str().into()),
            ("snapshots", Value::Array(snapshots)),
            ("snapshot_time", Value::DateTime(vm.snapshot_time.clone())),
            ("VBDs", Value::Array(vbds)),
            ("VIFs", Value::Array(vec![])),
            ("domid", Value::int64_str(if running { 1 } else { -1 })),
            ("resident_on", NULL_REF.into()),
            ("memory_static_max", Value::int64_str(1 << 30)),
            ("VCPUs_max", Value::int64_str(1)),
            ("other_config", string_map(&vm.other_config)),
            ("tags", Value::Array(vec![])),
        ]))
    }

    pub(crate) fn vbd_record(&self, r: &str) -> Result<Value, Fail> {
        let b = self
            .vbds
            .get(r)
            .ok_or_else(|| Fail::handle_invalid("VBD", r))?;
        Ok(Value::record([
            ("uuid", Value::from(b.uuid.as_str())),
            ("allowed_operations", Value::Array(vec![])),
            ("current_operations", Value::Struct(BTreeMap::new())),
            ("VM", b.vm.as_str().into()),
            ("VDI", b.vdi.as_str().into()),
            (
                "device",
                format!("xvd{}", device_letter(&b.userdevice)).into(),
            ),
            ("userdevice", b.userdevice.as_str().into()),
            ("bootable", (b.userdevice == "0").into()),
            ("mode", "RW".into()),
            ("type", "Disk".into()),
            ("unpluggable", false.into()),
            ("storage_lock", false.into()),
            ("empty", false.into()),
            ("other_config", Value::Struct(BTreeMap::new())),
            ("currently_attached", b.currently_attached.into()),
            ("status_code", Value::int64_str(0)),
            ("status_detail", "".into()),
            ("runtime_properties", Value::Struct(BTreeMap::new())),
            ("qos_algorithm_type", "".into()),
            ("qos_algorithm_params", Value::Struct(BTreeMap::new())),
            ("qos_supported_algorithms", Value::Array(vec![])),
            ("metrics", NULL_REF.into()),
        ]))
    }

    pub(crate) fn sr_record(&self, r: &str) -> Result<Value, Fail> {
        if r != self.sr_ref {
            return Err(Fail::handle_invalid("SR", r));
        }
        let vdis: Vec<Value> = self.vdis.keys().map(|k| Value::from(k.as_str())).collect();
        Ok(Value::record([
            ("uuid", Value::from(self.sr_uuid.as_str())),
            ("name_label", "Local storage".into()),
            ("name_description", "".into()),
            ("allowed_operations", Value::Array(vec![])),
            ("current_operations", Value::Struct(BTreeMap::new())),
            ("VDIs", Value::Array(vdis)),
            ("PBDs", Value::Array(vec![])),
            ("type", "ext".into()),
            ("content_type", "user".into()),
            ("shared", false.into()),
            ("other_config", Value::Struct(BTreeMap::new())),
            ("sm_config", Value::Struct(BTreeMap::new())),
            ("tags", Value::Array(vec![])),
        ]))
    }
}

fn device_letter(userdevice: &str) -> char {
    let n: u8 = userdevice.parse().unwrap_or(0);
    char::from(b'a' + n.min(25))
}

pub(crate) fn string_map(m: &BTreeMap<String, String>) -> Value {
    Value::Struct(
        m.iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect(),
    )
}

/// The state and a condition variable signalled whenever an NBD connection ends.
pub(crate) struct Shared {
    pub state: Mutex<State>,
    pub changed: Condvar,
    /// `data_destroy` calls waiting for a detach (lets tests act at the right moment).
    pub waiters: AtomicUsize,
}

impl Shared {
    /// Locks the state. A panic while holding the lock cannot leave it half-updated in a way
    /// that matters to a test simulator, so a poisoned lock is simply taken over.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}
