//! The simulated inventory: one datacenter, two datastores, VMs with disks, snapshots,
//! tasks, sessions, tickets and the fault switches.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use serde_json::Value;

use crate::disk::Disk;
use crate::json::Fault;

pub const DATACENTER_MOID: &str = "datacenter-3";
pub const VM_FOLDER_MOID: &str = "group-v4";
/// The inventory's root folder (`ServiceContent.rootFolder`).
pub const ROOT_FOLDER_MOID: &str = "group-d1";
/// The folder the datacenter sits in, when [`State::datacenter_folder`] names one.
pub const DATACENTER_FOLDER_MOID: &str = "group-d50";
pub const DATASTORE_MOID: &str = "datastore-11";
/// A second datastore with no registered VM: the one `UpdateVirtualMachineFiles_Task` may
/// update (it refuses a volume with registered VMs).
pub const SPARE_DATASTORE_MOID: &str = "datastore-12";

#[derive(Debug)]
pub struct Datastore {
    pub moid: String,
    pub name: String,
    /// `/vmfs/volumes/<uuid>`, the mount path `UpdateVirtualMachineFiles_Task` rewrites.
    pub mount_path: String,
}

#[derive(Debug)]
pub struct Vm {
    pub moid: String,
    pub name: String,
    pub bios_uuid: String,
    pub instance_uuid: String,
    /// `config.changeTrackingEnabled`; takes effect on the disks at the next stun.
    pub change_tracking_enabled: bool,
    pub disks: Vec<Disk>,
    /// Snapshot moids, oldest first; each one's child is the next (no reverts, so the tree
    /// is a line).
    pub snapshots: Vec<String>,
    /// Numbers the delta files, `vm-000001.vmdk`, ...
    pub next_delta: u32,
}

/// What one disk looked like when a snapshot was taken.
#[derive(Debug, Clone)]
pub struct SnapDisk {
    pub key: i32,
    /// `change_id` and the tracking it belongs to, if CBT was active.
    pub change: Option<(String, u64)>,
    /// The delta this snapshot created (its path identifies the layer).
    pub delta: PathBuf,
}

#[derive(Debug)]
pub struct Snapshot {
    pub moid: String,
    pub vm: String,
    pub id: u32,
    pub name: String,
    pub description: String,
    pub create_time: String,
    pub quiesced: bool,
    pub disks: Vec<SnapDisk>,
}

#[derive(Debug, Clone)]
pub enum TaskState {
    Queued,
    Running,
    Success(Option<Value>),
    Error(Fault),
}

#[derive(Debug)]
pub struct Task {
    pub moid: String,
    /// `TaskInfo.name` (the method) and `descriptionId`.
    pub name: String,
    pub description_id: String,
    pub entity: Value,
    pub entity_name: String,
    pub state: TaskState,
    pub queue_time: String,
    pub start_time: Option<String>,
    pub complete_time: Option<String>,
    pub event_chain_id: u32,
    pub user: String,
}

#[derive(Debug)]
pub struct Session {
    pub user: String,
    pub key: String,
    pub login_time: String,
    /// Opened by basic auth on the file service, not by `SessionManager.Login`.
    pub by_file_service: bool,
}

/// A generic service ticket: single use, for one URL and HTTP method.
#[derive(Debug)]
pub struct Ticket {
    pub path_and_query: String,
    pub method: String,
}

/// A fault switch: the next call of `method` fails with `fault`.
#[derive(Debug, Clone)]
pub struct FailNext {
    pub method: String,
    pub fault: String,
}

/// No `Debug`: it holds the password, session tokens and tickets.
pub struct State {
    pub user: String,
    pub password: String,
    pub release: String,
    /// Where delta files live (not on the datastore the file service serves).
    pub delta_dir: PathBuf,
    pub datacenter: String,
    /// A folder between the root folder and the datacenter (its name), or none.
    pub datacenter_folder: Option<String>,
    pub datastores: Vec<Datastore>,
    pub vms: Vec<Vm>,
    pub snapshots: BTreeMap<String, Snapshot>,
    pub tasks: BTreeMap<String, Task>,
    /// Session id → session.
    pub sessions: HashMap<String, Session>,
    pub tickets: HashMap<String, Ticket>,
    pub fail_next: Vec<FailNext>,
    /// Methods (and `GET /folder`) whose answers wait until released.
    pub held: std::collections::BTreeSet<String>,
    /// Methods whose next call is done but answered 504, as by a proxy that timed out.
    pub lose_answer: Vec<String>,
    /// Files `UpdateVirtualMachineFiles_Task` reports it could not update.
    pub unupdatable_files: Vec<String>,
    /// Calls per method name (VI/JSON methods, property reads as `GET <property>`, `/folder`).
    pub calls: BTreeMap<String, u64>,
    pub next_id: u64,
    pub qcda_max_areas: usize,
    /// How long a task stays queued, then running.
    pub task_delay: std::time::Duration,
    pub qcda_max_bytes: u64,
    pub log_calls: bool,
    /// Whether the file service takes a VI/JSON session token as its session cookie.
    pub folder_takes_api_token: bool,
}

impl State {
    pub fn new_moid(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}-{}", self.next_id)
    }

    pub fn vm(&self, moid: &str) -> Option<&Vm> {
        self.vms.iter().find(|v| v.moid == moid)
    }

    pub fn vm_mut(&mut self, moid: &str) -> Option<&mut Vm> {
        self.vms.iter_mut().find(|v| v.moid == moid)
    }

    /// The datacenter's inventory path: the file service's `dcPath`.
    pub fn dc_path(&self) -> String {
        match &self.datacenter_folder {
            Some(folder) => format!("{folder}/{}", self.datacenter),
            None => self.datacenter.clone(),
        }
    }

    pub fn datastore(&self, moid: &str) -> Option<&Datastore> {
        self.datastores.iter().find(|d| d.moid == moid)
    }

    /// Takes the fault switch for `method`, if one is set.
    pub fn take_failure(&mut self, method: &str) -> Option<Fault> {
        let i = self.fail_next.iter().position(|f| f.method == method)?;
        let f = self.fail_next.remove(i);
        Some(Fault::new(
            &f.fault,
            format!("{method} failed (simulated fault)"),
        ))
    }

    pub fn count(&mut self, method: &str) {
        *self.calls.entry(method.to_owned()).or_default() += 1;
    }
}

pub struct Shared {
    pub state: Mutex<State>,
    /// Woken when a held answer is released.
    pub released: tokio::sync::Notify,
}

impl Shared {
    /// The state; a panic while it was held (a simulator bug) does not wedge later calls.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Returns once `name` (a method, or `GET /folder`) is not held: the work of the call is
    /// done, only its answer waits (what a slow network or a stalled vCenter looks like).
    pub async fn wait_unheld(&self, name: &str) {
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            // Registered before the check, so a release in between is not missed.
            released.as_mut().enable();
            if !self.lock().held.contains(name) {
                return;
            }
            released.await;
        }
    }
}
