//! The vSphere simulator as the integration tests use it: started in a temporary directory,
//! and cbtstream's command lines against it with the password in the environment.
#![allow(dead_code)]

use cbtstream_vsphere_sim::{SimConfig, Simulator};
use std::path::Path;
use std::process::Output;

pub const BIN: &str = env!("CARGO_BIN_EXE_cbtstream");

/// A simulator whose datastore is `<tmp>/ds`.
pub async fn start(cfg: impl FnOnce(&Path) -> SimConfig) -> (tempfile::TempDir, Simulator) {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::start(cfg(&dir.path().join("ds"))).await.unwrap();
    (dir, sim)
}

/// `COMMAND --vsphere URL --vm VM --user U --vsphere-ca CA EXTRA...`.
pub fn args(sim: &Simulator, command: &str, extra: &[&str]) -> Vec<String> {
    args_for(sim, sim.vm(), command, extra)
}

/// [`args`] naming the VM by `vm` (a moId or a UUID).
pub fn args_for(sim: &Simulator, vm: &str, command: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        command,
        "--vsphere",
        &sim.url(),
        "--vm",
        vm,
        "--user",
        sim.user(),
        "--vsphere-ca",
        sim.ca_path().to_str().unwrap(),
    ]
    .map(str::to_owned)
    .to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// That command line, with the password in $VSPHERE_PASSWORD and no CBTSTREAM_LOG.
pub fn command(sim: &Simulator, command: &str, extra: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args(sim, command, extra))
        .env("VSPHERE_PASSWORD", sim.password())
        .env_remove("CBTSTREAM_LOG");
    cmd
}

/// Runs [`command`] to its end.
pub async fn run(sim: &Simulator, cmd: &str, extra: &[&str]) -> Output {
    command(sim, cmd, extra).output().await.unwrap()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
