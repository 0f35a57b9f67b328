//! cbtstream: incremental backups of XenServer / XCP-ng virtual disks over NBD.

mod backup;
mod chain;
mod cli;
mod durable;
mod engine;
mod exit;
mod export;
mod nbd;
mod progress;
mod restore;
mod tls;
mod xapi;

fn main() -> std::process::ExitCode {
    cli::main()
}
