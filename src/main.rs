//! cbtstream: incremental backups of XenServer / XCP-ng virtual disks over NBD.

mod chain;
mod cli;
mod command;
mod durable;
mod engine;
mod exit;
mod export;
mod http_body;
mod https;
mod lock;
mod merge;
mod nbd;
mod progress;
mod repo;
mod repo_cli;
mod restore;
mod source;
mod tls;
mod vsphere;
mod xapi;
mod xen;

fn main() -> std::process::ExitCode {
    cli::main()
}
