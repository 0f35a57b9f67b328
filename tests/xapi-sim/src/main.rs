//! `xapi-sim`: the XenServer simulator as a process, for the demo and for clients in other
//! languages (tests/xapi_sdk.py). Prints one JSON line with what a client needs, then serves
//! until SIGTERM or SIGINT.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use cbtstream_xapi_sim::{NbdServerChoice, SimConfig, Simulator, DEFAULT_DISK_SIZE};
use clap::Parser;

/// A XenServer simulator: XenAPI (XML-RPC over HTTPS), CBT over real disk images, NBD.
#[derive(Parser, Debug)]
#[command(name = "xapi-sim", version)]
struct Args {
    /// Address of the XenAPI HTTPS listener.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Directory for the disk images and the certificate (created if missing).
    #[arg(long)]
    data_dir: PathBuf,
    /// Size of each of the VM's disks in bytes (a multiple of 512).
    #[arg(long, default_value_t = DEFAULT_DISK_SIZE)]
    disk_size: u64,
    /// How many disks the VM has (1 to 15), in slots 0..N-1; an empty CD drive follows.
    #[arg(long, default_value_t = 1)]
    disks: usize,
    /// How long a VDI stays attached after its last NBD connection closed.
    #[arg(long, default_value_t = 1000)]
    nbd_lag_ms: u64,
    /// How long VDI.data_destroy waits for the VDI to be detached.
    #[arg(long, default_value_t = 4000)]
    data_destroy_timeout_ms: u64,
    /// Also listen here as a pool member answering HOST_IS_SLAVE to every call.
    #[arg(long)]
    slave_listen: Option<SocketAddr>,
    /// The user name to accept.
    #[arg(long, default_value = "root")]
    user: String,
    /// The password to accept (default: random, printed in the JSON line).
    #[arg(long)]
    password: Option<String>,
    /// Start with CBT disabled on the disk.
    #[arg(long)]
    no_cbt: bool,
    /// The NBD server VDI.get_nbd_info hands out: the built-in XenServer-profile server
    /// (`xen`), or a real qemu-nbd / nbdkit process started per VDI and export name on first
    /// get_nbd_info (read-only, TLS required, 127.0.0.1, a free port). The real servers check
    /// no session and never report the VDI attached; nbdkit serves any export name, and
    /// qemu-nbd gets its own CA-signed certificate (DATA_DIR/qemu-tls, JSON `nbd_tls_dir`).
    #[arg(long, value_enum, default_value_t = NbdServerChoice::Xen)]
    nbd_server: NbdServerChoice,
    /// Log each call's method and outcome on stderr (never its arguments).
    #[arg(long, short)]
    verbose: bool,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let a = Args::parse();
    let cfg = SimConfig {
        listen: a.listen,
        slave_listener: a.slave_listen,
        disk_size: a.disk_size,
        disks: a.disks,
        nbd_lag: Duration::from_millis(a.nbd_lag_ms),
        data_destroy_timeout: Duration::from_millis(a.data_destroy_timeout_ms),
        user: a.user,
        password: a.password,
        cbt_enabled: !a.no_cbt,
        log_calls: a.verbose,
        nbd_server: a.nbd_server,
        ..SimConfig::new(a.data_dir)
    };
    let sim = Simulator::start(cfg).await?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", sim.info_json())?;
        out.flush()?;
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    drop(sim);
    Ok(())
}
