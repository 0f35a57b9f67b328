//! A VMware vSphere simulator for cbtstream's tests and demo.
//!
//! It speaks VI/JSON (vCenter 8.0U1+'s JSON wire protocol: `_typeName` discriminators,
//! managed object references, faults as HTTP 500 bodies) over HTTPS for the calls a CBT
//! backup makes, takes snapshots that really freeze the disks (copy-on-write deltas over real
//! sparse flat extents), tracks changed blocks per disk with `changeId`s, and serves the
//! datastore file service (`/folder`) with byte ranges. `README.md` beside this file lists
//! every behaviour with its source.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use cbtstream_vsphere_sim::{SimConfig, Simulator};
//! let dir = tempfile::tempdir()?;
//! let sim = Simulator::start(SimConfig::for_tests(dir.path())).await?;
//! sim.write(sim.vm(), 2000, 4096, b"guest data")?;
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use cbtstream_testkit::TestPki;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

mod disk;
mod folder;
mod http;
mod json;
mod props;
mod simapi;
mod snapshots;
mod state;
mod vim;

pub use disk::GRAIN;
pub use vim::SESSION_HEADER;

use state::{Datastore, Shared, State, Vm, DATASTORE_MOID, SPARE_DATASTORE_MOID};

/// Default size of each disk with `--disk-size` not given (the second disk gets
/// [`ODD_TAIL`] more).
pub const DEFAULT_DISK_SIZE: u64 = 64 << 20;
/// Added to the second disk's default size so that it is not a multiple of 64 KiB (but is
/// one of 1 KiB: `capacityInKB` stays exact).
pub const ODD_TAIL: u64 = 37 << 10;
pub const MAX_DISKS: usize = 15;
/// The largest disk accepted (CBT keeps a map entry per written 64 KiB grain).
pub const MAX_DISK_SIZE: u64 = 2 << 40;
/// The schema release the simulator announces (`about.apiVersion`).
pub const RELEASE: &str = "8.0.2.0";
pub const VM_MOID: &str = "vm-42";
pub const VM_NAME: &str = "testvm";
pub const DATACENTER: &str = "dc1";
pub const DATASTORE: &str = "ds1";
pub const SPARE_DATASTORE: &str = "ds2";

/// Disk sizes for `disks` disks: all `size` if given, else [`DEFAULT_DISK_SIZE`]-like `base`
/// with the second disk [`ODD_TAIL`] longer.
pub fn disk_sizes(disks: usize, size: Option<u64>, base: u64) -> Vec<u64> {
    (0..disks)
        .map(|i| match size {
            Some(s) => s,
            None if i == 1 => base + ODD_TAIL,
            None => base,
        })
        .collect()
}

/// How to start a [`Simulator`].
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The datastore `ds1`'s root: `<vm>/<vm>.vmdk` descriptors and `-flat.vmdk` extents
    /// (sparse), plus `.sim/` (the TLS PKI, the delta files). Created if missing; must not
    /// already hold the VM's directory.
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// One entry per disk (keys 2000, 2001, ...); each a positive multiple of 1024.
    pub disk_sizes: Vec<u64>,
    pub user: String,
    /// `None`: random.
    pub password: Option<String>,
    /// Whether the VM starts with changed-block tracking on (and active).
    pub cbt_enabled: bool,
    /// Most changed areas one QueryChangedDiskAreas answer carries.
    pub qcda_max_areas: usize,
    /// Most bytes of disk one QueryChangedDiskAreas answer describes.
    pub qcda_max_bytes: u64,
    /// A task stays queued this long, then running this long.
    pub task_delay: Duration,
    /// Log each request's method, path and status on stderr (never bodies or tokens).
    pub log_calls: bool,
    /// Whether the file service takes a VI/JSON session token as its `vmware_soap_session`
    /// cookie (unchecked on a real vCenter); `false`: only basic auth opens a session there.
    pub folder_takes_api_token: bool,
    /// Put the datacenter in a folder of this name below the root folder (its `dcPath`
    /// then is `<folder>/<datacenter>`).
    pub datacenter_folder: Option<String>,
}

impl SimConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> SimConfig {
        SimConfig {
            data_dir: data_dir.into(),
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            disk_sizes: disk_sizes(1, None, DEFAULT_DISK_SIZE),
            user: "administrator@vsphere.local".into(),
            password: None,
            cbt_enabled: true,
            qcda_max_areas: 1024,
            qcda_max_bytes: 1 << 30,
            task_delay: vim::DEFAULT_TASK_DELAY,
            log_calls: false,
            folder_takes_api_token: true,
            datacenter_folder: None,
        }
    }

    /// Two disks of 4 MiB and 4 MiB + 37 KiB, answers paged at 4 areas or 1 MiB, 5 ms tasks.
    pub fn for_tests(data_dir: impl Into<PathBuf>) -> SimConfig {
        SimConfig {
            disk_sizes: disk_sizes(2, None, 4 << 20),
            qcda_max_areas: 4,
            qcda_max_bytes: 1 << 20,
            task_delay: Duration::from_millis(5),
            ..SimConfig::new(data_dir)
        }
    }
}

/// A running simulator. Dropping it stops the listener and its connections; the files stay.
pub struct Simulator {
    shared: Arc<Shared>,
    addr: SocketAddr,
    ca_path: PathBuf,
    ca_der: Vec<u8>,
    data_dir: PathBuf,
    user: String,
    password: String,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Simulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulator")
            .field("addr", &self.addr)
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn new_uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

impl Simulator {
    /// Creates the PKI, the VM's disks (all zeroes) and starts the HTTPS listener on the
    /// current tokio runtime.
    pub async fn start(cfg: SimConfig) -> Result<Simulator> {
        if !(1..=MAX_DISKS).contains(&cfg.disk_sizes.len()) {
            bail!(
                "the VM has 1 to {MAX_DISKS} disks, not {}",
                cfg.disk_sizes.len()
            );
        }
        for &s in &cfg.disk_sizes {
            if s == 0 || s % 1024 != 0 || s > MAX_DISK_SIZE {
                bail!("a disk size must be a positive multiple of 1024 up to 2 TiB, not {s}");
            }
        }
        if cfg.qcda_max_areas == 0 || cfg.qcda_max_bytes == 0 {
            bail!("QueryChangedDiskAreas pages must hold at least one area and one byte");
        }
        std::fs::create_dir_all(&cfg.data_dir)
            .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
        let data_dir = cfg.data_dir.canonicalize()?;
        let vm_dir = data_dir.join(VM_NAME);
        if vm_dir.exists() {
            bail!(
                "{} already exists: give the simulator an empty data directory",
                vm_dir.display()
            );
        }
        let pki =
            TestPki::generate(&data_dir.join(".sim/tls")).context("generating the TLS PKI")?;
        let delta_dir = data_dir.join(".sim/deltas");
        std::fs::create_dir_all(&delta_dir)?;
        std::fs::create_dir_all(&vm_dir)?;
        let password = cfg
            .password
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());

        let mut disks = Vec::new();
        for (i, &size) in cfg.disk_sizes.iter().enumerate() {
            let stem = match i {
                0 => VM_NAME.to_owned(),
                n => format!("{VM_NAME}_{n}"),
            };
            let flat = vm_dir.join(format!("{stem}-flat.vmdk"));
            disk::create_sparse(&flat, size)?;
            let key = 2000 + i as i32;
            disks.push(disk::Disk::new(
                key,
                size,
                flat,
                format!("{VM_NAME}/{stem}.vmdk"),
                cfg.cbt_enabled,
            ));
        }
        let st = State {
            user: cfg.user.clone(),
            password: password.clone(),
            release: RELEASE.into(),
            delta_dir,
            datacenter: DATACENTER.into(),
            datacenter_folder: cfg.datacenter_folder.clone(),
            datastores: vec![
                Datastore {
                    moid: DATASTORE_MOID.into(),
                    name: DATASTORE.into(),
                    mount_path: format!("/vmfs/volumes/{}", new_uuid()),
                },
                Datastore {
                    moid: SPARE_DATASTORE_MOID.into(),
                    name: SPARE_DATASTORE.into(),
                    mount_path: format!("/vmfs/volumes/{}", new_uuid()),
                },
            ],
            vms: vec![Vm {
                moid: VM_MOID.into(),
                name: VM_NAME.into(),
                bios_uuid: new_uuid(),
                instance_uuid: new_uuid(),
                change_tracking_enabled: cfg.cbt_enabled,
                disks,
                snapshots: Vec::new(),
                next_delta: 0,
            }],
            snapshots: BTreeMap::new(),
            tasks: BTreeMap::new(),
            sessions: HashMap::new(),
            tickets: HashMap::new(),
            fail_next: Vec::new(),
            held: Default::default(),
            lose_answer: Vec::new(),
            unupdatable_files: Vec::new(),
            calls: BTreeMap::new(),
            next_id: 100,
            qcda_max_areas: cfg.qcda_max_areas,
            task_delay: cfg.task_delay,
            qcda_max_bytes: cfg.qcda_max_bytes,
            log_calls: cfg.log_calls,
            folder_takes_api_token: cfg.folder_takes_api_token,
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(st),
            released: tokio::sync::Notify::new(),
        });
        let acceptor = TlsAcceptor::from(pki.server_config()?);
        let listener = TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("binding {}", cfg.listen))?;
        let addr = listener.local_addr()?;
        let task = http::spawn(listener, acceptor, shared.clone());
        Ok(Simulator {
            shared,
            addr,
            ca_path: pki.ca_pem_path.clone(),
            ca_der: pki.ca_cert_der.clone(),
            data_dir,
            user: cfg.user,
            password,
            task,
        })
    }

    /// `https://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("https://{}/", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// PEM of the CA that signed the server certificate (like vCenter's VMCA root).
    pub fn ca_path(&self) -> &Path {
        &self.ca_path
    }

    pub fn ca_der(&self) -> &[u8] {
        &self.ca_der
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    pub fn vm(&self) -> &'static str {
        VM_MOID
    }

    pub fn release(&self) -> &'static str {
        RELEASE
    }

    /// The VM's instance UUID (what `SearchIndex.FindByUuid` with `instanceUuid` finds).
    pub fn vm_instance_uuid(&self) -> String {
        self.shared.lock().vms[0].instance_uuid.clone()
    }

    /// The VM's disks: (device key, capacity in bytes).
    pub fn disks(&self) -> Vec<(i32, u64)> {
        self.shared.lock().vms[0]
            .disks
            .iter()
            .map(|d| (d.key, d.capacity))
            .collect()
    }

    /// The binary's JSON line. It holds the password: print it nowhere else.
    pub fn info_json(&self) -> String {
        json!({
            "url": self.url(),
            "ca": self.ca_path,
            "user": self.user,
            "password": self.password,
            "vm": VM_MOID,
            "vm_name": VM_NAME,
            "vm_instance_uuid": self.vm_instance_uuid(),
            "release": RELEASE,
            "datacenter": DATACENTER,
            "datastore": DATASTORE,
            "datastore_moid": DATASTORE_MOID,
            "spare_datastore": SPARE_DATASTORE,
            "spare_datastore_moid": SPARE_DATASTORE_MOID,
            "disks": self.disks().iter().map(|(k, c)| json!({"key": k, "capacity": c})).collect::<Vec<_>>(),
            "data_dir": self.data_dir,
        })
        .to_string()
    }

    /// A guest write to disk `key` of `vm` (what `POST /sim/write` does).
    pub fn write(&self, vm: &str, key: i32, offset: u64, data: &[u8]) -> Result<()> {
        simapi::write(&mut self.shared.lock(), vm, key, offset, data)
            .map_err(|(_, m)| anyhow::anyhow!(m))
    }

    /// A CBT reset of one disk (what `POST /sim/reset_cbt` does).
    pub fn reset_cbt(&self, vm: &str, key: i32) -> Result<()> {
        simapi::reset_cbt(&mut self.shared.lock(), vm, key).map_err(|(_, m)| anyhow::anyhow!(m))
    }

    /// Grows disk `key` to `size` bytes (what `POST /sim/resize` does).
    pub fn resize(&self, vm: &str, key: i32, size: u64) -> Result<()> {
        simapi::resize(&mut self.shared.lock(), vm, key, size).map_err(|(_, m)| anyhow::anyhow!(m))
    }

    /// The next call of `method` fails with fault `fault` (a task: ends in error).
    pub fn fail_next(&self, method: &str, fault: &str) {
        self.shared.lock().fail_next.push(state::FailNext {
            method: method.into(),
            fault: fault.into(),
        });
    }

    /// The answers of `name` (a method such as `CreateSnapshotEx_Task`, or `GET /folder`)
    /// wait until [`Simulator::let_go`]: the call itself is done and counted at once.
    pub fn hold(&self, name: &str) {
        self.shared.lock().held.insert(name.into());
    }

    /// Lets the answers [`Simulator::hold`] kept waiting go.
    pub fn let_go(&self, name: &str) {
        self.shared.lock().held.remove(name);
        self.shared.released.notify_waiters();
    }

    /// The next call of `method` is done, but its answer is lost: a 504 Gateway Timeout, as
    /// a proxy in front of vCenter that gave up waiting would send.
    pub fn lose_answer_next(&self, method: &str) {
        self.shared.lock().lose_answer.push(method.into());
    }

    /// Ends every session (later calls answer `NotAuthenticated`) and voids every ticket.
    pub fn expire_sessions(&self) {
        let mut st = self.shared.lock();
        st.sessions.clear();
        st.tickets.clear();
    }

    /// `UpdateVirtualMachineFiles_Task` will report `file` (`[ds] path`) as not updated.
    pub fn add_unupdatable_file(&self, file: &str) {
        self.shared.lock().unupdatable_files.push(file.into());
    }

    /// Takes a snapshot of `vm` at once, outside any task (a user's older snapshot, say).
    pub fn take_snapshot(&self, vm: &str, name: &str) -> Result<String> {
        snapshots::take_snapshot(
            &mut self.shared.lock(),
            vm,
            name.into(),
            String::new(),
            false,
        )
        .map_err(|f| anyhow::anyhow!("{}: {}", f.type_name, f.message))
    }

    /// Removes snapshot `snap` at once, consolidating its delta.
    pub fn remove_snapshot(&self, snap: &str) -> Result<()> {
        let mut st = self.shared.lock();
        let vm = st
            .snapshots
            .get(snap)
            .map(|s| s.vm.clone())
            .context("no such snapshot")?;
        snapshots::consolidate(&mut st, &vm, snap)
            .map_err(|f| anyhow::anyhow!("{}: {}", f.type_name, f.message))
    }

    /// The VM's snapshots, oldest first (moids).
    pub fn snapshots(&self, vm: &str) -> Vec<String> {
        self.shared
            .lock()
            .vm(vm)
            .map(|v| v.snapshots.clone())
            .unwrap_or_default()
    }

    /// How often `method` was called (`GET <property>` for property reads, `GET /folder`).
    pub fn calls(&self, method: &str) -> u64 {
        self.shared.lock().calls.get(method).copied().unwrap_or(0)
    }

    /// Disk `key` as the VM sees it now.
    pub fn read_disk(&self, vm: &str, key: i32) -> Result<Vec<u8>> {
        let st = self.shared.lock();
        let d = st
            .vm(vm)
            .and_then(|v| v.disks.iter().find(|d| d.key == key))
            .context("no such VM or disk")?;
        let mut buf = vec![0u8; usize::try_from(d.capacity)?];
        d.read_view(d.layers.len(), 0, &mut buf)?;
        Ok(buf)
    }

    /// Disk `key` as snapshot `snap` froze it.
    pub fn read_snapshot(&self, snap: &str, key: i32) -> Result<Vec<u8>> {
        let st = self.shared.lock();
        let s = st.snapshots.get(snap).context("no such snapshot")?;
        let sd = s
            .disks
            .iter()
            .find(|d| d.key == key)
            .context("no such disk")?;
        let d = st
            .vm(&s.vm)
            .and_then(|v| v.disks.iter().find(|d| d.key == key))
            .context("no such disk")?;
        let depth = d
            .layers
            .iter()
            .position(|l| l.path == sd.delta)
            .context("the snapshot's delta is gone")?;
        let mut buf = vec![0u8; usize::try_from(d.capacity)?];
        d.read_view(depth, 0, &mut buf)?;
        Ok(buf)
    }
}
