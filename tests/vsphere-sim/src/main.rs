//! `vsphere-sim`: the vSphere simulator as a process, for the demo, for tests driving it over
//! HTTPS and for outside checks. Prints one JSON line with what a client needs, then serves
//! until SIGTERM or SIGINT.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use cbtstream_vsphere_sim::{disk_sizes, SimConfig, Simulator, DEFAULT_DISK_SIZE};
use clap::Parser;

/// A VMware vSphere simulator: VI/JSON over HTTPS, snapshots, changed-block tracking, the
/// datastore file service.
#[derive(Parser, Debug)]
#[command(name = "vsphere-sim", version)]
struct Args {
    /// Address of the HTTPS listener.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The datastore's directory (the VM's disks, sparse) and `.sim/` (PKI, deltas).
    #[arg(long)]
    data_dir: PathBuf,
    /// How many disks the VM has (1 to 15), keys 2000, 2001, ...
    #[arg(long, default_value_t = 1)]
    disks: usize,
    /// Size of every disk in bytes (a multiple of 1024). Default: 64 MiB, the second disk
    /// 37 KiB more (not a multiple of 64 KiB).
    #[arg(long)]
    disk_size: Option<u64>,
    /// Most changed areas per QueryChangedDiskAreas answer.
    #[arg(long, default_value_t = 1024)]
    qcda_max_areas: usize,
    /// Most bytes of disk one QueryChangedDiskAreas answer covers.
    #[arg(long, default_value_t = 1 << 30)]
    qcda_max_bytes: u64,
    /// Start with changed-block tracking off (ReconfigVM_Task turns it on).
    #[arg(long)]
    no_cbt: bool,
    /// The user name to accept.
    #[arg(long, default_value = "administrator@vsphere.local")]
    user: String,
    /// Log each request's method, path and status on stderr (never bodies or tokens).
    #[arg(long, short)]
    verbose: bool,
    /// The file service refuses the VI/JSON session token as its cookie: only basic auth
    /// opens a session there (whether vCenter takes the token is unchecked).
    #[arg(long)]
    folder_refuses_api_token: bool,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let a = Args::parse();
    let cfg = SimConfig {
        listen: a.listen,
        disk_sizes: disk_sizes(a.disks, a.disk_size, DEFAULT_DISK_SIZE),
        qcda_max_areas: a.qcda_max_areas,
        qcda_max_bytes: a.qcda_max_bytes,
        cbt_enabled: !a.no_cbt,
        user: a.user,
        log_calls: a.verbose,
        folder_takes_api_token: !a.folder_refuses_api_token,
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
