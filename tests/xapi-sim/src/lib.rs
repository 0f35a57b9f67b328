//! A XenServer simulator for cbtstream's tests and demo.
//!
//! It speaks the real XenAPI wire format (XML-RPC over HTTPS, XAPI's encodings and error
//! codes), keeps real CBT logs over real raw disk images, and hands out real NBD servers
//! (`VDI.get_nbd_info` → the XenServer-profile server of `cbtstream-testkit`, TLS with an
//! xapi-style self-signed certificate; or, with [`SimConfig::nbd_server`], a qemu-nbd or
//! nbdkit process per export name). See `README.md` beside this file for the supported
//! methods, the `sim.*` test methods and the differences from a real host; the behaviour
//! follows `docs/XENSERVER.md` sections 1, 2, 4, 5 and 9.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use cbtstream_xapi_sim::{SimConfig, Simulator};
//! let dir = tempfile::tempdir()?;
//! let sim = Simulator::start(SimConfig::for_tests(dir.path())).await?;
//! let client = sim.client()?;
//! let session = client.login(sim.user(), sim.password()).await?;
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use cbtstream_proto::xmlrpc::Value;
use cbtstream_testkit::xen_nbd::{xapi_tls_server_config, XenNbdConfig, XenNbdServer};
use cbtstream_testkit::{xapi_style_self_signed, SelfSignedCert, ServerKind, TestPki};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

mod api;
pub mod client;
mod disk;
mod http;
mod nbd;
mod state;

pub use client::XapiClient;

use state::{new_ref, new_uuid, CbtLog, Fail, FailRule, Shared, State, Vbd, Vdi, VdiType, Vm};

/// Default size of the VM's disk.
pub const DEFAULT_DISK_SIZE: u64 = 64 << 20;
/// The largest disk the simulator accepts (XenServer's limit on GFS2; its CBT bitmap is
/// 32 MiB).
pub const MAX_VDI_SIZE: u64 = 16 << 40;
/// XAPI's `_data_destroy ~timeout:4`.
pub const DEFAULT_DATA_DESTROY_TIMEOUT: Duration = Duration::from_secs(4);
/// How long a VDI stays attached after its last NBD connection closed.
pub const DEFAULT_NBD_LAG: Duration = Duration::from_secs(1);

/// Which NBD server `VDI.get_nbd_info` hands out (`--nbd-server`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum NbdServerChoice {
    /// The built-in XenServer-profile server (`XenNbdServer`): session checks, attachment
    /// tracking (`VDI_IN_USE` while connected), xapi's TLS policy.
    #[default]
    #[value(name = "xen")]
    Xen,
    /// One `qemu-nbd` process per export name, `-x <exportname>`, TLS with a CA-signed
    /// leaf from a separate test PKI (`DIR/qemu-tls/`): qemu-nbd refuses xapi's self-signed
    /// certificate.
    #[value(name = "qemu-nbd")]
    QemuNbd,
    /// One `nbdkit file` process per export name, TLS with the xapi-style certificate; it
    /// serves any export name.
    #[value(name = "nbdkit")]
    NbdKit,
}

impl NbdServerChoice {
    /// The `--nbd-server` value: `xen`, `qemu-nbd` or `nbdkit`.
    pub fn as_str(self) -> &'static str {
        match self {
            NbdServerChoice::Xen => "xen",
            NbdServerChoice::QemuNbd => "qemu-nbd",
            NbdServerChoice::NbdKit => "nbdkit",
        }
    }
}

/// How to start a [`Simulator`].
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Holds the disk images (`<vdi-uuid>.raw`, sparse) and `tls/` (the certificate);
    /// created if missing.
    pub data_dir: PathBuf,
    /// The XenAPI HTTPS listener (default `127.0.0.1:0`, an ephemeral port).
    pub listen: SocketAddr,
    /// A second HTTPS listener playing a pool member: every call answers
    /// `HOST_IS_SLAVE ["127.0.0.1:<master port>"]`.
    pub slave_listener: Option<SocketAddr>,
    /// Size of the VM's one disk in bytes; a multiple of 512 (default 64 MiB).
    pub disk_size: u64,
    /// A VDI stays attached this long after its last NBD connection closed (default 1 s).
    pub nbd_lag: Duration,
    /// How long `VDI.data_destroy` waits for the VDI to be detached (default 4 s, as XAPI).
    pub data_destroy_timeout: Duration,
    pub user: String,
    /// `None`: a random password (see [`Simulator::password`]).
    pub password: Option<String>,
    /// Whether the VM's disk starts with CBT enabled (default true).
    pub cbt_enabled: bool,
    /// Log each call's method and outcome on stderr (never arguments: they hold passwords
    /// and session refs).
    pub log_calls: bool,
    /// The NBD server `VDI.get_nbd_info` hands out (default the built-in xen profile).
    pub nbd_server: NbdServerChoice,
}

impl SimConfig {
    /// Defaults of a real host where they matter: 4 s `data_destroy` wait, 1 s NBD lag.
    pub fn new(data_dir: impl Into<PathBuf>) -> SimConfig {
        SimConfig {
            data_dir: data_dir.into(),
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            slave_listener: None,
            disk_size: DEFAULT_DISK_SIZE,
            nbd_lag: DEFAULT_NBD_LAG,
            data_destroy_timeout: DEFAULT_DATA_DESTROY_TIMEOUT,
            user: "root".into(),
            password: None,
            cbt_enabled: true,
            log_calls: false,
            nbd_server: NbdServerChoice::Xen,
        }
    }

    /// For tests: a 4 MiB disk, 50 ms NBD lag, 300 ms `data_destroy` wait.
    pub fn for_tests(data_dir: impl Into<PathBuf>) -> SimConfig {
        SimConfig {
            disk_size: 4 << 20,
            nbd_lag: Duration::from_millis(50),
            data_destroy_timeout: Duration::from_millis(300),
            ..SimConfig::new(data_dir)
        }
    }
}

/// A running simulator. Dropping it stops the listeners and the NBD server (and aborts their
/// connections); the files in the data directory stay.
pub struct Simulator {
    shared: Arc<Shared>,
    nbd: XenNbdServer,
    addr: SocketAddr,
    slave_addr: Option<SocketAddr>,
    cert: SelfSignedCert,
    cert_pem: String,
    nbd_server: NbdServerChoice,
    /// libnbd's `tls-certificates=` for the server `get_nbd_info` hands out.
    nbd_tls_dir: PathBuf,
    user: String,
    password: String,
    vm_ref: String,
    vm_uuid: String,
    vdi_ref: String,
    vdi_uuid: String,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Simulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulator")
            .field("addr", &self.addr)
            .field("nbd_port", &self.nbd.port)
            .field("vm", &self.vm_uuid)
            .field("vdi", &self.vdi_uuid)
            .finish_non_exhaustive()
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(real) = self.shared.lock().real_nbd.as_mut() {
            real.stop_all();
        }
    }
}

impl Simulator {
    /// Creates the certificate, one running VM with one disk (all zeroes), starts the NBD
    /// server and the HTTPS listener(s) on the current tokio runtime.
    pub async fn start(cfg: SimConfig) -> Result<Simulator> {
        if cfg.disk_size == 0 || cfg.disk_size % 512 != 0 || cfg.disk_size > MAX_VDI_SIZE {
            bail!(
                "the disk size must be a positive multiple of 512 up to 16 TiB, not {}",
                cfg.disk_size
            );
        }
        std::fs::create_dir_all(&cfg.data_dir)
            .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
        let data_dir = cfg.data_dir.canonicalize()?;
        let cert = xapi_style_self_signed(&data_dir.join("tls"))?;
        let cert_pem = std::fs::read_to_string(&cert.cert_pem_path)?;
        let password = cfg
            .password
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());

        let (real_nbd, nbd_tls_dir) = match cfg.nbd_server {
            NbdServerChoice::Xen => (None, cert.dir.clone()),
            NbdServerChoice::NbdKit => (
                Some(nbd::RealNbd::new(
                    ServerKind::NbdKit,
                    cert.dir.clone(),
                    cert_pem.clone(),
                )),
                cert.dir.clone(),
            ),
            NbdServerChoice::QemuNbd => {
                let pki = TestPki::generate(&data_dir.join("qemu-tls"))
                    .context("generating the qemu-nbd test PKI")?;
                let leaf = std::fs::read_to_string(&pki.server_cert_pem_path)?;
                (
                    Some(nbd::RealNbd::new(
                        ServerKind::QemuNbd,
                        pki.dir.clone(),
                        leaf,
                    )),
                    pki.dir,
                )
            }
        };
        let (vm_ref, vm_uuid, vdi_ref, vdi_uuid) = (new_ref(), new_uuid(), new_ref(), new_uuid());
        let mut st = State {
            user: cfg.user.clone(),
            password: password.clone(),
            data_dir: data_dir.clone(),
            nbd_lag: cfg.nbd_lag,
            data_destroy_timeout: cfg.data_destroy_timeout,
            log_calls: cfg.log_calls,
            calls: BTreeMap::new(),
            sessions: HashMap::new(),
            vms: BTreeMap::new(),
            vbds: BTreeMap::new(),
            vdis: BTreeMap::new(),
            sr_ref: new_ref(),
            sr_uuid: new_uuid(),
            nbd_available: true,
            failures: Vec::new(),
            nbd_port: 0,
            cert_pem: cert_pem.clone(),
            real_nbd,
        };
        let path = st.image_path(&vdi_uuid);
        disk::create_sparse(&path, cfg.disk_size)
            .with_context(|| format!("creating {}", path.display()))?;
        st.vms.insert(
            vm_ref.clone(),
            Vm {
                uuid: vm_uuid.clone(),
                name_label: "cbtstream test VM".into(),
                power_state: "Running",
                is_a_snapshot: false,
                snapshot_of: state::NULL_REF.into(),
                snapshot_time: disk::xapi_datetime(0),
                other_config: BTreeMap::new(),
            },
        );
        st.vbds.insert(
            new_ref(),
            Vbd {
                uuid: new_uuid(),
                vm: vm_ref.clone(),
                vdi: vdi_ref.clone(),
                userdevice: "0".into(),
                currently_attached: true,
            },
        );
        st.vdis.insert(
            vdi_ref.clone(),
            Vdi {
                uuid: vdi_uuid.clone(),
                name_label: "cbtstream test disk".into(),
                name_description: "".into(),
                typ: VdiType::User,
                virtual_size: cfg.disk_size,
                cbt_enabled: cfg.cbt_enabled,
                is_a_snapshot: false,
                snapshot_of: state::NULL_REF.into(),
                snapshot_time: disk::xapi_datetime(0),
                other_config: BTreeMap::new(),
                path: Some(path),
                log: cfg.cbt_enabled.then(|| CbtLog {
                    bitmap: disk::Bitmap::new(cfg.disk_size),
                    parent: None,
                    child: None,
                }),
                nbd_conns: 0,
                linger_until: None,
            },
        );
        let shared = Arc::new(Shared {
            state: Mutex::new(st),
            changed: Condvar::new(),
            waiters: AtomicUsize::new(0),
        });

        let nbd = XenNbdServer::start(XenNbdConfig::new(
            &cert.cert_pem_path,
            &cert.key_pem_path,
            nbd::resolver(shared.clone()),
        ))
        .await
        .context("starting the NBD server")?;
        shared.lock().nbd_port = nbd.port;

        // The same TLS policy as xapi's stunnel and xapi-nbd: TLS 1.2, ECDHE-RSA-AES-GCM.
        let acceptor = TlsAcceptor::from(xapi_tls_server_config(
            &cert.cert_pem_path,
            &cert.key_pem_path,
        )?);
        let listener = TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("binding {}", cfg.listen))?;
        let addr = listener.local_addr()?;
        let mut tasks = vec![http::spawn(
            listener,
            acceptor.clone(),
            Arc::new(http::Role::Master(shared.clone())),
        )];
        let mut slave_addr = None;
        if let Some(sl) = cfg.slave_listener {
            let l = TcpListener::bind(sl)
                .await
                .with_context(|| format!("binding {sl}"))?;
            slave_addr = Some(l.local_addr()?);
            // A real host names the master by address alone (port 443); the simulator adds
            // its port, so clients must accept `host` and `host:port`.
            let master = format!("{}:{}", addr.ip(), addr.port());
            tasks.push(http::spawn(
                l,
                acceptor,
                Arc::new(http::Role::Slave { master }),
            ));
        }
        Ok(Simulator {
            shared,
            nbd,
            addr,
            slave_addr,
            cert,
            cert_pem,
            nbd_server: cfg.nbd_server,
            nbd_tls_dir,
            user: cfg.user,
            password,
            vm_ref,
            vm_uuid,
            vdi_ref,
            vdi_uuid,
            tasks,
        })
    }

    /// `https://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("https://{}/", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The pool-member listener's URL, if configured.
    pub fn slave_url(&self) -> Option<String> {
        self.slave_addr.map(|a| format!("https://{a}/"))
    }

    /// PEM file of the server certificate (HTTPS and NBD), self-signed like xapi's.
    pub fn ca_path(&self) -> &Path {
        &self.cert.cert_pem_path
    }

    /// The certificate's PEM text (what `get_nbd_info` returns as `cert`).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The certificate's DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert.cert_der
    }

    /// A directory with the certificate as `ca-cert.pem`: libnbd's `tls-certificates=`.
    pub fn tls_dir(&self) -> &Path {
        &self.cert.dir
    }

    /// The NBD server `get_nbd_info` hands out.
    pub fn nbd_server(&self) -> NbdServerChoice {
        self.nbd_server
    }

    /// A directory whose `ca-cert.pem` verifies the NBD server `get_nbd_info` hands out
    /// (libnbd's `tls-certificates=`): [`tls_dir`](Self::tls_dir), or with qemu-nbd the
    /// directory of its test PKI (`DATA_DIR/qemu-tls`).
    pub fn nbd_tls_dir(&self) -> &Path {
        &self.nbd_tls_dir
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    pub fn vm_uuid(&self) -> &str {
        &self.vm_uuid
    }

    pub fn vm_ref(&self) -> &str {
        &self.vm_ref
    }

    pub fn vdi_uuid(&self) -> &str {
        &self.vdi_uuid
    }

    pub fn vdi_ref(&self) -> &str {
        &self.vdi_ref
    }

    pub fn data_dir(&self) -> PathBuf {
        self.shared.lock().data_dir.clone()
    }

    pub fn nbd_port(&self) -> u16 {
        self.nbd.port
    }

    /// The built-in NBD server, for its fault switches and counters (it runs with every
    /// [`NbdServerChoice`], but only `Xen` hands it out).
    pub fn nbd(&self) -> &XenNbdServer {
        &self.nbd
    }

    /// The JSON line the binary prints: url, ca, user, password, vm, vdi (and extras).
    pub fn info_json(&self) -> serde_json::Value {
        let mut j = serde_json::json!({
            "url": self.url(),
            "ca": self.ca_path(),
            "user": self.user,
            "password": self.password,
            "vm": self.vm_uuid,
            "vdi": self.vdi_uuid,
            "nbd_port": self.nbd.port,
            "tls_dir": self.tls_dir(),
            "nbd_server": self.nbd_server.as_str(),
            "nbd_tls_dir": self.nbd_tls_dir(),
            "data_dir": self.data_dir(),
        });
        if let Some(u) = self.slave_url() {
            j["slave_url"] = u.into();
        }
        j
    }

    /// A client of this simulator, trusting its certificate.
    pub fn client(&self) -> Result<XapiClient> {
        XapiClient::new(&self.url(), self.cert_der())
    }

    /// Like `sim.set_nbd_available`: off, `get_nbd_info` returns `[]` and the NBD server
    /// refuses every export (no network with the `nbd` purpose).
    pub fn set_nbd_available(&self, on: bool) {
        self.shared.lock().nbd_available = on;
    }

    /// Like `sim.fail_next`: the next `times` calls of `method` (`None`: every call) fail
    /// with `[code, args...]` after the session check.
    pub fn fail_next(&self, method: &str, code: &str, args: &[&str], times: Option<u32>) {
        if times == Some(0) {
            return;
        }
        self.shared.lock().failures.push(FailRule {
            method: method.into(),
            fail: Fail::new(code, args.iter().copied()),
            remaining: times,
        });
    }

    /// Drops every injected failure still pending.
    pub fn clear_failures(&self) {
        self.shared.lock().failures.clear();
    }

    /// Like `sim.expire_sessions`: every session becomes invalid (`SESSION_INVALID`, and NBD
    /// export names carrying them stop resolving).
    pub fn expire_sessions(&self) {
        self.shared.lock().sessions.clear();
    }

    /// `VDI.data_destroy` calls now waiting for their VDI to be detached.
    pub fn data_destroy_waiters(&self) -> usize {
        self.shared.waiters.load(Ordering::SeqCst)
    }

    /// How many times `method` was called since the simulator started.
    pub fn calls(&self, method: &str) -> u64 {
        self.shared.lock().calls.get(method).copied().unwrap_or(0)
    }

    /// Sessions currently logged in.
    pub fn session_count(&self) -> usize {
        self.shared.lock().sessions.len()
    }

    /// Like `sim.write`: guest data into a live VDI (by uuid), marked in its CBT log.
    pub fn write(&self, vdi_uuid: &str, offset: u64, data: &[u8]) -> Result<()> {
        let mut st = self.shared.lock();
        let r = st
            .vdi_ref_by_uuid(vdi_uuid)
            .with_context(|| format!("no VDI {vdi_uuid}"))?;
        api::write(&mut st, &r, offset, data).map_err(fail_to_anyhow)
    }

    /// The ref of a VDI by uuid.
    pub fn vdi_ref_of(&self, vdi_uuid: &str) -> Option<String> {
        self.shared.lock().vdi_ref_by_uuid(vdi_uuid)
    }

    /// The image file of a VDI (by uuid), `None` once its data is destroyed.
    pub fn vdi_path(&self, vdi_uuid: &str) -> Option<PathBuf> {
        let st = self.shared.lock();
        let r = st.vdi_ref_by_uuid(vdi_uuid)?;
        st.vdis.get(&r)?.path.clone()
    }

    /// Whether the VDI (by uuid) is attached to dom0: an NBD connection open, or closed less
    /// than the lag ago.
    pub fn is_attached(&self, vdi_uuid: &str) -> bool {
        let st = self.shared.lock();
        st.vdi_ref_by_uuid(vdi_uuid)
            .and_then(|r| st.vdis.get(&r))
            .is_some_and(|v| v.attached_to_dom0(std::time::Instant::now()))
    }

    /// The VDI record (by uuid), as `VDI.get_record` returns it.
    pub fn vdi_record(&self, vdi_uuid: &str) -> Option<Value> {
        let st = self.shared.lock();
        let r = st.vdi_ref_by_uuid(vdi_uuid)?;
        st.vdi_record(&r).ok()
    }

    /// The blocks set in the VDI's current CBT log (by uuid); `None` without a log.
    pub fn cbt_log_blocks(&self, vdi_uuid: &str) -> Option<Vec<u64>> {
        let st = self.shared.lock();
        let r = st.vdi_ref_by_uuid(vdi_uuid)?;
        Some(st.vdis.get(&r)?.log.as_ref()?.bitmap.blocks())
    }

    /// Calls a XenAPI method in-process, without HTTP (same checks, same results).
    pub fn call_local(
        &self,
        method: &str,
        params: &[Value],
    ) -> Result<Value, (String, Vec<String>)> {
        api::dispatch(&self.shared, method, params).map_err(|f| (f.code, f.args))
    }

    /// Stops everything (the same as dropping the simulator).
    pub fn shutdown(self) {}
}

fn fail_to_anyhow(f: Fail) -> anyhow::Error {
    anyhow::anyhow!("{} {:?}", f.code, f.args)
}
