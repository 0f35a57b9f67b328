//! Command-line interface: argument definitions, their conversion into each command's plain
//! options, and dispatch. The work lives in `export` (any NBD server), `xen` (the XenServer
//! flows), `restore` and `engine`.

use crate::exit::{fail, Code, Failure, WithCode};
use crate::export::Destination;
use crate::xen::commit::CommitOptions;
use crate::xen::export::{ExportOptions, ExportTarget};
use crate::xen::gc::GcOptions;
use crate::xen::XapiLogin;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "cbtstream",
    version,
    about = "Incremental backups of virtual disks over NBD, streamed zstd-compressed and checksummed"
)]
pub struct Cli {
    /// More logging on stderr (-v info, -vv debug). Secrets are never logged.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Export changed (or all) blocks of a disk to a stream.
    Export(Box<ExportArgs>),
    /// Back up a whole XenServer VM: one crash-consistent snapshot of every disk and the VM's
    /// configuration, as one point directory DIR/<point-id>/.
    Backup(Box<BackupArgs>),
    /// Restore a point of `backup` into the pool as a new VM: its disks created and filled,
    /// its configuration imported with the disks in their slots.
    RestoreVm(Box<RestoreVmArgs>),
    /// Apply a full stream and/or incrementals, in order, to a raw disk image.
    Restore(RestoreArgs),
    /// Check a stream (every checksum and the trailer) and print what it holds.
    Inspect(InspectArgs),
    /// Merge a full stream and the incrementals that follow it into one full stream of the
    /// last point (a synthetic full).
    Merge(MergeArgs),
    /// Commit a point whose stream went to a pipe, once its reader stored it.
    Commit(CommitArgs),
    /// Remove snapshots that cbtstream took but did not commit (left by a killed run).
    Gc(GcArgs),
    /// vSphere maintenance.
    #[command(subcommand)]
    Vsphere(VsphereCommand),
    /// Manage a repository (a directory or S3) that keeps points.
    #[command(subcommand)]
    Repo(crate::repo_cli::RepoCommand),
    /// List the points in a repository.
    List(crate::repo_cli::ListArgs),
    /// Check a repository: every point's chain, every stream's SHA-256 (and with
    /// --read-data every record); changes nothing.
    Verify(crate::repo_cli::VerifyArgs),
    /// Forget old points of a repository: the kept ones that needed them are first merged
    /// into full points, verified and recorded.
    Prune(crate::repo_cli::PruneArgs),
}

#[derive(Clone, Copy, ValueEnum, Debug, PartialEq, Eq)]
pub enum CompressArg {
    Zstd,
    None,
}

#[derive(Args, Debug, Clone)]
pub struct TlsArgs {
    /// PEM file of trusted CA certificates (a self-signed server certificate works too).
    #[arg(long, value_name = "FILE", group = "trust", conflicts_with = "xapi")]
    pub tls_ca: Option<PathBuf>,
    /// Trust exactly this server certificate (PEM), compared byte for byte.
    #[arg(long, value_name = "FILE", group = "trust", conflicts_with = "xapi")]
    pub tls_cert: Option<PathBuf>,
    /// Trust the server certificate whose DER has this SHA-256 (64 hex digits).
    #[arg(long, value_name = "SHA256", group = "trust", conflicts_with = "xapi", value_parser = pin_arg)]
    pub tls_pin: Option<String>,
    /// Name to verify the certificate against and send as SNI (default: the URI host).
    #[arg(long, value_name = "NAME", conflicts_with = "xapi", value_parser = server_name_arg)]
    pub tls_server_name: Option<String>,
    /// Accept any TLS certificate. The connection is encrypted but NOT authenticated.
    #[arg(long, group = "trust", conflicts_with = "xapi")]
    pub tls_insecure_no_verify: bool,
    /// Allow an nbd:// URI over TCP: data crosses the network unencrypted.
    #[arg(long, conflicts_with = "xapi")]
    pub allow_plaintext: bool,
}

/// `--tls-pin` and `--xapi-pin`: checked while parsing, so a bad pin is a usage error
/// before anything runs.
fn pin_arg(text: &str) -> Result<String, crate::tls::TlsError> {
    crate::tls::Trust::pin_from_hex(text).map(|_| text.to_string())
}

/// `--tls-server-name`: a DNS name or an IP address.
fn server_name_arg(text: &str) -> Result<String, crate::tls::TlsError> {
    crate::tls::server_name(text).map(|_| text.to_string())
}

/// How to reach and authenticate to XenAPI.
#[derive(Args, Debug, Clone)]
pub struct XapiArgs {
    /// XenAPI user (with --vsphere: the vCenter user, e.g. backup@vsphere.local).
    #[arg(long, default_value = "root")]
    pub user: String,
    /// File holding the password (else $XAPI_PASSWORD; with --vsphere, $VSPHERE_PASSWORD).
    /// Never on the command line.
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// PEM CA file for the pool master's certificate (a self-signed one works too).
    #[arg(long, value_name = "FILE", group = "xapi_trust")]
    pub xapi_ca: Option<PathBuf>,
    /// Trust the pool master's certificate whose DER has this SHA-256 (64 hex digits).
    #[arg(long, value_name = "SHA256", group = "xapi_trust", value_parser = pin_arg)]
    pub xapi_pin: Option<String>,
    /// Accept any certificate from the pool master: encrypted but NOT authenticated.
    #[arg(long, group = "xapi_trust")]
    pub xapi_insecure: bool,
    /// Allow an http:// XenAPI URL: the password crosses the network unencrypted.
    #[arg(long)]
    pub xapi_allow_plaintext: bool,
}

/// How to check vCenter's certificate and which VI/JSON release to speak.
#[derive(Args, Debug, Clone)]
pub struct VsphereArgs {
    /// PEM CA file for vCenter's certificate (a self-signed one works too).
    #[arg(long, value_name = "FILE", group = "vsphere_trust")]
    pub vsphere_ca: Option<PathBuf>,
    /// Trust vCenter's certificate whose DER has this SHA-256 (64 hex digits).
    #[arg(long, value_name = "SHA256", group = "vsphere_trust", value_parser = pin_arg)]
    pub vsphere_pin: Option<String>,
    /// Accept any certificate from vCenter: encrypted but NOT authenticated.
    #[arg(long, group = "vsphere_trust")]
    pub vsphere_insecure: bool,
    /// The VI/JSON release in the URLs (default: the server's about.apiVersion).
    #[arg(long, value_name = "RELEASE", value_parser = release_arg)]
    pub vsphere_release: Option<String>,
}

fn release_arg(text: &str) -> Result<String, String> {
    if crate::vsphere::client::is_release(text) {
        Ok(text.to_string())
    } else {
        Err("a release is dotted numbers, e.g. 8.0.2.0".into())
    }
}

/// `cbtstream vsphere ...`.
#[derive(Subcommand)]
enum VsphereCommand {
    /// After a datastore was resignatured or remounted: point the VMs' files at their new
    /// datastore (Datastore.UpdateVirtualMachineFiles_Task); prints the files it could not update.
    UpdatePaths(UpdatePathsArgs),
}

#[derive(Args, Debug)]
struct UpdatePathsArgs {
    /// vCenter URL (https://host/).
    #[arg(long, value_name = "URL")]
    vsphere: String,
    /// The datastore (moId) whose VMs' files to update.
    #[arg(long, value_name = "ID")]
    datastore: String,
    /// Old mount paths and the datastores (moIds) they now are: /vmfs/volumes/OLD=datastore-12 ...
    /// (several after one --map, or --map repeated).
    #[arg(long, value_name = "OLD=NEW", required = true, num_args = 1.., value_parser = map_arg)]
    map: Vec<(String, String)>,
    /// vSphere user.
    #[arg(long)]
    user: String,
    /// File holding the password (else $VSPHERE_PASSWORD). Never on the command line.
    #[arg(long, value_name = "FILE")]
    password_file: Option<PathBuf>,
    #[command(flatten)]
    vs: VsphereArgs,
}

fn map_arg(text: &str) -> Result<(String, String), String> {
    match text.rsplit_once('=') {
        Some((old, new)) if !old.is_empty() && crate::vsphere::client::path_safe(new) => {
            Ok((old.to_string(), new.to_string()))
        }
        _ => Err("give OLD_MOUNT_PATH=DATASTORE_MOID".into()),
    }
}

/// The data plane's knobs, shared by both sources.
#[derive(Args, Debug, Clone)]
pub struct DataPlaneArgs {
    /// NBD connections (used when the server allows multi-conn or the export is read-only; at most 16).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub connections: u16,
    /// Reads in flight per connection. Default: sized to the bandwidth-delay product, enough
    /// to move 2 GB/s at the round trip measured during the handshake (at least 32, at most
    /// 1024).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub inflight: Option<u16>,
    /// Largest read, in KiB: a multiple of 64 between 64 and 32768. Also the largest record.
    #[arg(long, value_name = "KIB", default_value_t = 1024, value_parser = parse_request_size)]
    pub request_size: u64,
    /// Compression codec.
    #[arg(long, value_enum, default_value_t = CompressArg::Zstd)]
    pub compress: CompressArg,
    /// zstd level (1 is fast; 3-9 smaller and slower). Level 1 uses a hash table twice
    /// zstd's size for 1 MiB records: 2.6% smaller output for about 7% more compression time.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(-7..=22))]
    pub level: i32,
    /// Compression threads (default: the number of cores; at most 256).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub threads: Option<u16>,
    /// Seconds to wait for a connection and for the NBD handshake.
    #[arg(long, default_value_t = 30)]
    pub connect_timeout: u64,
    /// Seconds without any reply, with reads outstanding, before a connection is dropped and reopened.
    #[arg(long, default_value_t = 60)]
    pub request_timeout: u64,
    /// Times one read is retried after a server error or a lost connection.
    #[arg(long, default_value_t = 3)]
    pub retries: u32,
    /// Print a one-line JSON summary on stderr at the end.
    #[arg(long)]
    pub json: bool,
    /// Do not try NBD extended headers (for servers that mishandle the option).
    #[arg(long, hide = true)]
    pub no_extended_headers: bool,
}

fn parse_request_size(text: &str) -> Result<u64, String> {
    match text.parse::<u64>() {
        Ok(kib) if kib.is_multiple_of(64) && (64..=32768).contains(&kib) => Ok(kib),
        _ => Err("must be a multiple of 64 between 64 and 32768 (KiB)".into()),
    }
}

impl DataPlaneArgs {
    pub fn options(&self) -> crate::export::DataPlaneOptions {
        crate::export::DataPlaneOptions {
            connections: usize::from(self.connections),
            inflight: self.inflight,
            request_size: self.request_size * 1024,
            codec: match self.compress {
                CompressArg::Zstd => cbtstream_proto::stream::Codec::Zstd,
                CompressArg::None => cbtstream_proto::stream::Codec::None,
            },
            level: self.level,
            threads: self.threads.map_or_else(
                || std::thread::available_parallelism().map_or(2, |n| n.get()),
                usize::from,
            ),
            connect_timeout: std::time::Duration::from_secs(self.connect_timeout),
            request_timeout: std::time::Duration::from_secs(self.request_timeout),
            retries: self.retries,
            retry_delay: std::time::Duration::from_millis(200),
            extended_headers: !self.no_extended_headers,
        }
    }
}

impl ExportArgs {
    fn nbd_options(&self) -> crate::export::NbdExportOptions {
        let t = &self.tls;
        crate::export::NbdExportOptions {
            uri: self.nbd.clone().unwrap_or_default(),
            changed_blocks: self.changed_blocks.clone(),
            full: self.full,
            destination: self.destination(),
            tls: crate::export::NbdTlsOptions {
                ca: t.tls_ca.clone(),
                cert: t.tls_cert.clone(),
                pin: t.tls_pin.clone(),
                server_name: t.tls_server_name.clone(),
                insecure_no_verify: t.tls_insecure_no_verify,
                allow_plaintext: t.allow_plaintext,
            },
            source_id: self.source_id.clone(),
            point_id: self.point_id.clone(),
            base_id: self.base_id.clone(),
            dp: self.dp.options(),
        }
    }
}

#[derive(Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["nbd", "xapi", "vsphere"])))]
#[command(group(clap::ArgGroup::new("hypervisor").args(["xapi", "vsphere"])))]
#[command(group(clap::ArgGroup::new("destination").required(true).args(["output", "to_command", "location"])))]
pub struct ExportArgs {
    /// NBD URI of the disk: nbds://host[:port]/export, nbd://, nbd+unix:///export?socket=PATH.
    #[arg(long, value_name = "URI")]
    pub nbd: Option<String>,
    /// XenAPI URL of the pool master (https://host/): back up a VDI with CBT.
    #[arg(long, value_name = "URL", requires = "vdi")]
    pub xapi: Option<String>,
    /// vCenter URL (https://host/): back up one disk of a VM with CBT (--vm, --disk).
    #[arg(long, value_name = "URL", requires_all = ["vm", "disk"], conflicts_with_all = ["location", "base", "keep_bases", "commit_on_eof"])]
    pub vsphere: Option<String>,
    /// With --vsphere: the VM (moId, or instance or BIOS UUID).
    #[arg(long, value_name = "ID", requires = "vsphere")]
    pub vm: Option<String>,
    /// With --vsphere: the disk's device key (2000, ...).
    #[arg(long, value_name = "KEY", requires = "vsphere")]
    pub disk: Option<i32>,
    /// With --vsphere: quiesce the guest's file systems for the snapshot (VMware Tools).
    #[arg(long, requires = "vsphere")]
    pub quiesce: bool,
    #[command(flatten)]
    pub vs: VsphereArgs,
    /// With --nbd: the changed-block bitmap (base64, as VDI.list_changed_blocks returns it); "-" for stdin.
    #[arg(long, value_name = "FILE|-", conflicts_with_all = ["full", "xapi"])]
    pub changed_blocks: Option<PathBuf>,
    /// Export the whole disk (with --nbd, skipping what the server reports as zero).
    #[arg(long)]
    pub full: bool,
    /// Output file, or "-" for stdout. A file is written as PATH.partial and renamed when done.
    /// With --xapi and --state, a stream to stdout (or a FIFO) leaves the point pending until
    /// `cbtstream commit`.
    #[arg(short, long, value_name = "PATH|-", group = "destination")]
    pub output: Option<PathBuf>,
    /// Send the stream to `sh -c CMD` on its stdin; with --xapi the point is committed only
    /// when CMD exits 0.
    #[arg(long, value_name = "CMD", group = "destination")]
    pub to_command: Option<String>,
    #[command(flatten)]
    pub repo: crate::repo_cli::RepoTarget,
    /// With --xapi and a stream to stdout: commit as soon as the pipe took the last byte,
    /// trusting its reader to have stored it.
    #[arg(long, requires = "xapi", conflicts_with = "to_command")]
    pub commit_on_eof: bool,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// With --nbd: id of the point in time this export captures (default: a fresh UUID).
    #[arg(long, value_name = "ID", conflicts_with = "xapi", value_parser = stream_id("point id"))]
    pub point_id: Option<String>,
    /// With --nbd: id of the point in time this incremental applies on top of.
    #[arg(long, value_name = "ID", conflicts_with_all = ["xapi", "full"], requires = "changed_blocks", value_parser = stream_id("base id"))]
    pub base_id: Option<String>,
    /// With --nbd: id of the source disk, recorded in the stream header.
    #[arg(long, value_name = "ID", default_value = "", conflicts_with = "xapi", value_parser = stream_id("source id"))]
    pub source_id: String,
    /// With --xapi: the VDI to back up.
    #[arg(long, value_name = "UUID", requires = "xapi")]
    pub vdi: Option<String>,
    /// With --xapi: the chain's state file (created by the first export, updated by each).
    #[arg(
        long,
        value_name = "FILE",
        requires = "hypervisor",
        conflicts_with = "base"
    )]
    pub state: Option<PathBuf>,
    /// With --xapi: start the incremental from this snapshot instead of the state file's base.
    #[arg(
        long,
        value_name = "SNAPSHOT_UUID",
        requires = "xapi",
        conflicts_with = "full"
    )]
    pub base: Option<String>,
    /// With --xapi: turn CBT on for the VDI if it is off (the export is then a full one).
    #[arg(long, requires = "hypervisor")]
    pub enable_cbt: bool,
    /// With --xapi: when the chain is broken (base gone, CBT reset), do a full export instead of failing.
    #[arg(long, requires = "hypervisor", conflicts_with = "full")]
    pub fallback_full: bool,
    /// With --xapi: how many bases to keep on the host (default 1: only the newest).
    #[arg(long, requires = "xapi", conflicts_with = "full", value_parser = clap::value_parser!(u32).range(1..=100))]
    pub keep_bases: Option<u32>,
    /// With --xapi: seconds between the cheap XenAPI calls that keep the session in use
    /// during a long export (its NBD export name is only good while the session lives).
    #[arg(long, value_name = "SECS", default_value_t = 300, requires = "xapi", value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub xapi_keepalive: u64,
    #[command(flatten)]
    pub xapi_args: XapiArgs,
    #[command(flatten)]
    pub dp: DataPlaneArgs,
}

impl ExportArgs {
    /// Where the stream goes (clap makes sure exactly one of -o and --to-command is given).
    pub fn destination(&self) -> Destination {
        match (&self.to_command, &self.output) {
            (Some(cmd), _) => Destination::Command(cmd.clone()),
            (None, path) => Destination::Output(path.clone().unwrap_or_else(|| "-".into())),
        }
    }
}

/// `cbtstream backup`: one point of a whole VM.
#[derive(Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("hypervisor").required(true).args(["xapi", "vsphere"])))]
pub struct BackupArgs {
    /// XenAPI URL of the pool master (https://host/).
    #[arg(long, value_name = "URL")]
    pub xapi: Option<String>,
    /// vCenter URL (https://host/): back up a vSphere VM with CBT.
    #[arg(long, value_name = "URL")]
    pub vsphere: Option<String>,
    /// The VM to back up (vSphere: its moId, or its instance or BIOS UUID).
    #[arg(long, value_name = "UUID")]
    pub vm: String,
    /// With --vsphere: quiesce the guest's file systems for the snapshot (VMware Tools).
    #[arg(long, requires = "vsphere")]
    pub quiesce: bool,
    /// With --vsphere: when the chain is broken (CBT reset), do a full backup instead of failing.
    #[arg(long, requires = "vsphere")]
    pub fallback_full: bool,
    #[command(flatten)]
    pub vs: VsphereArgs,
    /// Where the point directories go (DIR/<point-id>/).
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "location",
        conflicts_with = "location"
    )]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub repo: crate::repo_cli::RepoTarget,
    /// The VM's chain state (each disk's base); without it every backup is full.
    #[arg(long, value_name = "FILE")]
    pub state: Option<PathBuf>,
    /// Turn CBT on for disks that have it off (their export is a full one); without it
    /// they are skipped with a warning.
    #[arg(long)]
    pub enable_cbt: bool,
    /// Seconds between the cheap XenAPI calls that keep the session in use.
    #[arg(long, value_name = "SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub xapi_keepalive: u64,
    #[command(flatten)]
    pub xapi_args: XapiArgs,
    #[command(flatten)]
    pub dp: DataPlaneArgs,
}

/// `cbtstream restore-vm`.
#[derive(Args, Debug, Clone)]
pub struct RestoreVmArgs {
    /// XenAPI URL of the pool master.
    #[arg(long, value_name = "URL")]
    pub xapi: String,
    /// The SR the disks are created in.
    #[arg(long, value_name = "SR_UUID")]
    pub sr: String,
    /// Keep the VM's uuid and MACs (disaster recovery); XenServer refuses if they exist.
    #[arg(long)]
    pub preserve: bool,
    /// Print what would be created; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print a JSON summary on stderr when done.
    #[arg(long)]
    pub json: bool,
    /// The point directory (DIR/<point-id>); the points of its chain are its siblings.
    #[arg(
        value_name = "POINT_DIR",
        required_unless_present = "location",
        conflicts_with = "location"
    )]
    pub point_dir: Option<PathBuf>,
    #[command(flatten)]
    pub repo: crate::repo_cli::RepoPoint,
    #[command(flatten)]
    pub xapi_args: XapiArgs,
}

/// `cbtstream gc`: remove snapshots left by killed runs.
#[derive(Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("gc_target").required(true).args(["vdi", "vm"])))]
#[command(group(clap::ArgGroup::new("hypervisor").required(true).args(["xapi", "vsphere"])))]
pub struct GcArgs {
    /// XenAPI URL of the pool master.
    #[arg(long, value_name = "URL")]
    pub xapi: Option<String>,
    /// vCenter URL: remove the `cbtstream-<uuid>` snapshots interrupted runs left on --vm.
    #[arg(long, value_name = "URL", conflicts_with = "vdi")]
    pub vsphere: Option<String>,
    #[command(flatten)]
    pub vs: VsphereArgs,
    /// The VDI whose leftover snapshots to remove.
    #[arg(long, value_name = "UUID", group = "gc_target")]
    pub vdi: Option<String>,
    /// Every disk of this VM (the chain of `cbtstream backup --vm`; vSphere: its moId or UUID).
    #[arg(long, value_name = "UUID", group = "gc_target")]
    pub vm: Option<String>,
    /// The chain's state file (of `export` or `backup`): its bases are kept, and its lock is
    /// taken (no gc beside a running backup of that chain).
    #[arg(long, value_name = "FILE")]
    pub state: Option<PathBuf>,
    #[command(flatten)]
    pub repo: crate::repo_cli::RepoTarget,
    /// List what would be removed, remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Without --state: remove every snapshot cbtstream tagged that is not cbt_metadata
    /// (one may be a base kept after data_destroy failed, or belong to a running export);
    /// vSphere: every `cbtstream-<uuid>` snapshot (one may belong to a running backup).
    #[arg(long, conflicts_with_all = ["state", "location"])]
    pub force: bool,
    #[command(flatten)]
    pub xapi_args: XapiArgs,
}

/// `cbtstream commit`: finish a pending point.
#[derive(Args, Debug, Clone)]
pub struct CommitArgs {
    /// The chain's state file, which records the pending point.
    #[arg(long, value_name = "FILE")]
    pub state: PathBuf,
    /// XenAPI URL of the pool master (default: the one the state file recorded).
    #[arg(long, value_name = "URL")]
    pub xapi: Option<String>,
    /// Commit only if the pending point is this one (the id the export printed): a later
    /// export that started meanwhile supersedes it.
    #[arg(long, value_name = "UUID")]
    pub point: Option<String>,
    #[command(flatten)]
    pub xapi_args: XapiArgs,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("restore_target").required(true).args(["to", "xapi"])))]
struct RestoreArgs {
    /// The raw disk image to create (full stream) or update (incrementals).
    #[arg(long, value_name = "IMAGE")]
    to: Option<PathBuf>,
    /// Restore into the pool instead: XenAPI URL of the pool master.
    #[arg(long, value_name = "URL", requires = "pool_target")]
    xapi: Option<String>,
    /// With --xapi: create a new VDI in this SR.
    #[arg(long, value_name = "UUID", requires = "xapi", group = "pool_target")]
    sr: Option<String>,
    /// With --xapi: write into this existing VDI (not attached to a running VM; for an
    /// incremental, it must hold the stream's base point).
    #[arg(long, value_name = "UUID", requires = "xapi", group = "pool_target")]
    vdi: Option<String>,
    /// With --vdi: roll the VDI back to the streams' point (the whole chain, from its full
    /// stream, or one point directory of `backup`), writing only the blocks that changed
    /// since it; the VDI must still have the point's CBT metadata on the host.
    #[arg(long, requires = "vdi")]
    rollback: bool,
    /// With --xapi: print a JSON summary on stderr when done.
    #[arg(long, requires = "xapi")]
    json: bool,
    #[command(flatten)]
    xapi_args: XapiArgs,
    #[command(flatten)]
    repo: crate::repo_cli::RepoPoint,
    /// With --repo: the disk of the point (its slot or VDI uuid); with --to it is restored
    /// into that image, without it every disk goes to DIR/disk<slot>.raw.
    #[arg(long, value_name = "SLOT|VDI_UUID", requires = "location")]
    disk: Option<String>,
    /// Streams, in order; "-" reads stdin.
    #[arg(
        value_name = "STREAM",
        required_unless_present = "location",
        conflicts_with = "location"
    )]
    streams: Vec<PathBuf>,
}

#[derive(Args, Debug)]
struct InspectArgs {
    /// The stream; "-" reads stdin.
    #[arg(value_name = "STREAM")]
    stream: PathBuf,
}

#[derive(Args, Debug)]
struct MergeArgs {
    /// The merged stream; "-" writes stdout. A file is written as OUT.partial and renamed.
    #[arg(short, long, value_name = "OUT")]
    output: PathBuf,
    /// Print a JSON summary on stderr when done.
    #[arg(long)]
    json: bool,
    /// The full stream, then its incrementals in order; "-" reads stdin.
    #[arg(required = true, value_name = "STREAM")]
    streams: Vec<PathBuf>,
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info,cbtstream=info",
        _ => "debug,cbtstream=debug,rustls=info,tokio=info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CBTSTREAM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { Code::Usage as u8 } else { 0 });
        }
    };
    init_logging(cli.verbose);
    let result = match cli.command {
        Command::Export(args) => export(*args),
        Command::Commit(args) => commit(args),
        Command::Gc(args) => gc(args),
        Command::Backup(args) => backup(*args),
        Command::RestoreVm(args) => restore_vm(*args),
        Command::Restore(args) => restore(args),
        Command::Inspect(args) => inspect(args),
        Command::Merge(args) => merge(args),
        Command::Vsphere(VsphereCommand::UpdatePaths(args)) => update_paths(args),
        Command::Repo(cmd) => run_async(crate::repo_cli::repo_command(cmd)),
        Command::List(args) => run_async(crate::repo_cli::list(args)),
        Command::Verify(args) => run_async(crate::repo_cli::verify(args)),
        Command::Prune(args) => run_async(crate::repo_cli::prune(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("cbtstream: error: {}", describe(&f.error));
            ExitCode::from(f.code as u8)
        }
    }
}

/// How to log in to XenAPI, from the flags: the password is read (and its absence is a
/// usage error) before anything happens.
fn xapi_login(url: &str, a: &XapiArgs) -> Result<XapiLogin, Failure> {
    let password = crate::xen::read_password(a.password_file.as_deref())?;
    let trust = crate::tls::trust_from_flags(
        a.xapi_ca.as_deref(),
        None,
        a.xapi_pin.as_deref(),
        a.xapi_insecure,
    )
    .code(Code::Usage)?;
    Ok(XapiLogin {
        url: url.to_string(),
        user: a.user.clone(),
        password,
        trust,
        allow_plaintext: a.xapi_allow_plaintext,
    })
}

fn xen_export_options(args: ExportArgs, url: &str) -> Result<ExportOptions, Failure> {
    if args.state.is_none() && args.base.is_none() && !args.full && args.repo.location.is_none() {
        return Err(fail(
            Code::Usage,
            "give --state FILE (the chain), --base SNAPSHOT_UUID, or --full",
        ));
    }
    let destination = args.destination();
    if args.commit_on_eof
        && (args.repo.location.is_some()
            || matches!(&destination, Destination::Output(p) if matches!(crate::engine::sink::Output::from_arg(p), crate::engine::sink::Output::File(_))))
    {
        return Err(fail(
            Code::Usage,
            "--commit-on-eof is for a stream to stdout or a FIFO; a file is committed once it is complete",
        ));
    }
    let vdi = args.vdi.unwrap_or_default();
    let mut state = args.state;
    let destination = match &args.repo.location {
        None => ExportTarget::Stream(destination),
        Some(location) => {
            if !crate::repo::store::valid_name(&vdi) {
                return Err(fail(
                    Code::Usage,
                    format!("--vdi {vdi:?} is not a VDI uuid"),
                ));
            }
            let repo = crate::repo_cli::open_for_writing(location, args.repo.s3_endpoint.clone())?;
            if state.is_none() {
                // The chain state of one disk lives beside its points in a local repository.
                match &repo.store {
                    crate::repo::store::Store::Local(root) => {
                        let dir = root.join(crate::repo::vm_dir(&vdi));
                        crate::repo::store::create_parents(&dir.join("chain.json"))
                            .code(Code::Output)?;
                        state = Some(dir.join("chain.json"));
                    }
                    crate::repo::store::Store::S3 { .. } => {
                        return Err(fail(
                            Code::Usage,
                            "export --repo s3://... keeps the disk's chain state in a file: give --state FILE",
                        ))
                    }
                }
            }
            ExportTarget::Repo {
                repo,
                break_lock: args.repo.break_lock,
            }
        }
    };
    Ok(ExportOptions {
        login: xapi_login(url, &args.xapi_args)?,
        vdi,
        state,
        base: args.base,
        full: args.full,
        enable_cbt: args.enable_cbt,
        fallback_full: args.fallback_full,
        keep_bases: args.keep_bases.unwrap_or(1),
        destination,
        commit_on_eof: args.commit_on_eof,
        keepalive: std::time::Duration::from_secs(args.xapi_keepalive),
        dp: args.dp.options(),
    })
}

fn export(args: ExportArgs) -> Result<(), Failure> {
    let json = args.dp.json;
    let Some(url) = args.xapi.clone().or(args.vsphere.clone()) else {
        if args.repo.location.is_some() {
            return Err(fail(Code::Usage, "--repo is for --xapi exports"));
        }
        let progress = std::sync::Arc::new(crate::progress::Bar::stderr());
        let summary = run_async(crate::export::export_nbd(args.nbd_options(), progress))?;
        if json {
            eprintln!("{}", summary.json());
        }
        return Ok(());
    };
    if args.vsphere.is_some() {
        return crate::vsphere::cli::export(args);
    }
    let opts = xen_export_options(args, &url)?;
    let report = run_async(crate::xen::export::run(opts))?;
    // After the commit, so that the line says what happened to the point.
    if json {
        let mut v = report.summary.json_value();
        v["point"] = report.point.into();
        v["base"] = report.base.into();
        v["committed"] = report.committed.into();
        eprintln!("{v}");
    }
    Ok(())
}

fn commit(args: CommitArgs) -> Result<(), Failure> {
    if let Some(point) = crate::vsphere::state::commit_pending(&args.state, args.point.as_deref())?
    {
        eprintln!("cbtstream: committed point {point}");
        return Ok(());
    }
    let opts = CommitOptions {
        login: xapi_login(args.xapi.as_deref().unwrap_or_default(), &args.xapi_args)?,
        url: args.xapi,
        point: args.point,
        state: args.state,
    };
    let point = run_async(crate::xen::commit::run(opts))?;
    eprintln!("cbtstream: committed point {point}");
    Ok(())
}

fn backup(args: BackupArgs) -> Result<(), Failure> {
    let json = args.dp.json;
    use crate::repo::point_writer::PointTarget;
    use crate::repo::state::StateHome;
    let Some(xapi) = &args.xapi else {
        return crate::vsphere::cli::backup(args);
    };
    let login = xapi_login(xapi, &args.xapi_args)?;
    let target = args.repo.point_target(args.out.as_deref())?;
    if !crate::repo::store::valid_name(&args.vm) {
        return Err(fail(
            Code::Usage,
            format!("--vm {:?} is not a VM uuid", args.vm),
        ));
    }
    let state = match (args.state, &target) {
        (Some(p), _) => Some(StateHome::File(p)),
        (None, PointTarget::Repo(repo)) => Some(StateHome::Repo {
            repo: repo.clone(),
            vm: args.vm.clone(),
        }),
        (None, PointTarget::Dir(_)) => None,
    };
    let opts = crate::xen::vm::BackupOptions {
        login,
        vm: args.vm,
        target,
        state,
        break_lock: args.repo.break_lock,
        enable_cbt: args.enable_cbt,
        keepalive: std::time::Duration::from_secs(args.xapi_keepalive),
        dp: args.dp.options(),
    };
    let report = run_async(crate::xen::vm::run(opts))?;
    println!("{}", report.location);
    if json {
        let v = serde_json::json!({
            "point": report.point.id,
            "base": report.point.base,
            "location": report.location,
            "disks": report.point.disks.len(),
            "bytes_read": report.bytes_read,
            "bytes_written": report.bytes_written,
            "seconds": (report.seconds * 1000.0).round() / 1000.0,
        });
        eprintln!("{v}");
    }
    Ok(())
}

fn update_paths(args: UpdatePathsArgs) -> Result<(), Failure> {
    let login = crate::vsphere::cli::login(
        &args.vsphere,
        &args.user,
        args.password_file.as_deref(),
        &args.vs,
    )?;
    let failed = run_async(crate::vsphere::flow::update_paths(
        &login,
        &args.datastore,
        &args.map,
    ))?;
    for (file, why) in &failed {
        println!("{file}\t{why}");
    }
    if !failed.is_empty() {
        eprintln!("cbtstream: {} file(s) could not be updated", failed.len());
    }
    Ok(())
}

fn restore_vm(args: RestoreVmArgs) -> Result<(), Failure> {
    let started = std::time::Instant::now();
    let json = args.json;
    use crate::xen::restore_vm::{PointSource, RestoreVmOptions};
    let login = xapi_login(&args.xapi, &args.xapi_args)?;
    let report = run_async(async {
        let source = match (args.repo.open().await?, args.point_dir) {
            (Some(repo), _) => {
                let (vm, point) = args.repo.vm_point();
                PointSource::Repo {
                    repo,
                    vm: vm.to_owned(),
                    point: point.to_owned(),
                }
            }
            (None, Some(dir)) => PointSource::Dir(dir),
            (None, None) => return Err(fail(Code::Usage, "give POINT_DIR or --repo LOCATION")),
        };
        let opts = RestoreVmOptions {
            login,
            sr: args.sr,
            source,
            preserve: args.preserve,
            dry_run: args.dry_run,
        };
        crate::xen::restore_vm::run(opts).await
    })?;
    for line in &report.plan {
        println!("{line}");
    }
    for (slot, vdi) in &report.disks {
        eprintln!("cbtstream: slot {slot}: VDI {vdi}");
    }
    if let Some(vm) = &report.vm {
        println!("{vm}");
    }
    if json {
        let disks: Vec<_> = report
            .disks
            .iter()
            .map(|(slot, vdi)| serde_json::json!({"slot": slot, "vdi": vdi}))
            .collect();
        let seconds = (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0;
        eprintln!(
            "{}",
            serde_json::json!({"vm": report.vm, "disks": disks, "seconds": seconds})
        );
    }
    Ok(())
}

fn gc(args: GcArgs) -> Result<(), Failure> {
    let Some(xapi) = &args.xapi else {
        return crate::vsphere::cli::gc(args);
    };
    let opts = GcOptions {
        login: xapi_login(xapi, &args.xapi_args)?,
        target: match (args.vdi, args.vm) {
            (_, Some(vm)) => crate::xen::gc::GcTarget::Vm(vm),
            (vdi, None) => crate::xen::gc::GcTarget::Vdi(vdi.unwrap_or_default()),
        },
        state: args.state,
        repo: repo_gc(&args.repo)?,
        dry_run: args.dry_run,
        force: args.force,
    };
    let report = run_async(crate::xen::gc::run(opts))?;
    for line in &report.lines {
        println!("{line}");
    }
    Ok(())
}

/// The repository `gc --repo` takes the VM's lock in (and reads the chain state from).
pub(crate) fn repo_gc(
    args: &crate::repo_cli::RepoTarget,
) -> Result<Option<crate::xen::gc::RepoGc>, Failure> {
    Ok(args.open()?.map(|repo| crate::xen::gc::RepoGc {
        repo,
        break_lock: args.break_lock,
    }))
}

/// A clap value parser for a stream header id: checked as the header checks it, so a bad
/// id is a usage error before anything runs.
fn stream_id(what: &'static str) -> impl Fn(&str) -> Result<String, String> + Clone {
    move |s: &str| {
        cbtstream_proto::stream::check_id(what, s, what == "source id")
            .map(|()| s.to_string())
            .map_err(|e| e.to_string())
    }
}

/// The error and its causes on one line. Many of our errors already include their cause's
/// text in their own message; a cause whose text is already there is not repeated.
fn describe(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if msg.contains(&text) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&text);
    }
    msg
}

pub(crate) fn run_async<T, F: std::future::Future<Output = Result<T, Failure>>>(
    fut: F,
) -> Result<T, Failure> {
    // The reactor threads decrypt TLS; compression and the sink have threads of their own,
    // so half the cores is enough (measured: fewer wake-ups, less CPU per GB).
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let io_threads = std::env::var("CBTSTREAM_IO_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or((cores / 2).max(1));
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(io_threads);
    let rt = builder.enable_all().build().code(Code::Failure)?;
    rt.block_on(fut)
}

fn restore(args: RestoreArgs) -> Result<(), Failure> {
    if let Some(url) = &args.xapi {
        return pool_restore(url, &args);
    }
    let Some(to) = &args.to else {
        return Err(fail(Code::Usage, "give --to IMAGE or --xapi URL"));
    };
    if args.repo.location.is_some() {
        let reports = run_async(async {
            let Some(repo) = args.repo.open().await? else {
                return Err(fail(Code::Failure, "internal error: no repository"));
            };
            let (vm, point) = args.repo.vm_point();
            crate::repo::restore::restore_images(&repo, vm, point, args.disk.as_deref(), to).await
        })?;
        for report in reports {
            eprintln!("{report}");
        }
        return Ok(());
    }
    match crate::restore::restore(to, &args.streams) {
        Ok(report) => {
            eprintln!("{report}");
            Ok(())
        }
        Err(e) => Err(Failure {
            code: e.exit_code(),
            error: e.into(),
        }),
    }
}

/// `restore --xapi`: the VDI's uuid on stdout.
fn pool_restore(url: &str, args: &RestoreArgs) -> Result<(), Failure> {
    use crate::repo::restore::InputSpec;
    use crate::xen::restore::{PoolRestoreOptions, Target};
    let target = match (&args.sr, &args.vdi) {
        (Some(sr), None) => Target::NewIn { sr: sr.clone() },
        (None, Some(vdi)) if args.rollback => Target::Rollback { vdi: vdi.clone() },
        (None, Some(vdi)) => Target::Existing { vdi: vdi.clone() },
        _ => return Err(fail(Code::Usage, "give --sr UUID or --vdi UUID")),
    };
    let login = xapi_login(url, &args.xapi_args)?;
    let progress = std::sync::Arc::new(crate::progress::Bar::stderr());
    let report = run_async(async {
        let streams = match args.repo.open().await? {
            Some(repo) => {
                // A rollback is of the VDI's own disk unless --disk says otherwise.
                let rolled_back = match &target {
                    Target::Rollback { vdi } => Some(vdi.as_str()),
                    _ => None,
                };
                let disk = args.disk.as_deref().or(rolled_back);
                let (vm, point) = args.repo.vm_point();
                crate::repo::restore::pool_inputs(&repo, vm, point, disk).await?
            }
            // `--rollback DIR/<point-id>`: that disk's chain in the point directories.
            None => match (&target, args.streams.as_slice()) {
                (Target::Rollback { vdi }, [dir]) if dir.is_dir() => {
                    InputSpec::paths(&crate::xen::restore_vm::disk_chain(dir, vdi)?)
                }
                _ => InputSpec::paths(&args.streams),
            },
        };
        let opts = PoolRestoreOptions {
            login,
            target,
            streams,
        };
        crate::xen::restore::run(opts, progress).await
    })?;
    if args.json {
        eprintln!("{}", report.json_value());
    }
    println!("{}", report.vdi);
    Ok(())
}

fn inspect(args: InspectArgs) -> Result<(), Failure> {
    match crate::restore::inspect(&args.stream) {
        Ok(report) => {
            println!("{report}");
            Ok(())
        }
        Err(e) => Err(Failure {
            code: e.exit_code(),
            error: e.into(),
        }),
    }
}

fn merge(args: MergeArgs) -> Result<(), Failure> {
    match crate::merge::merge(&args.streams, &args.output) {
        Ok(report) => {
            if args.json {
                eprintln!("{}", report.json_value());
            } else {
                eprintln!("{report}");
            }
            Ok(())
        }
        Err(e) => Err(Failure {
            code: e.exit_code(),
            error: e.into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from([&["cbtstream", "export", "--full", "-o", "out"], args].concat())
    }

    #[test]
    fn bad_pins_and_server_names_are_usage_errors() {
        // 64 bytes, not 64 characters: slicing it by byte pairs used to panic (exit 101).
        let multibyte = "€".repeat(21) + "a";
        for args in [
            ["--nbd", "nbds://h/e", "--tls-pin", multibyte.as_str()],
            ["--nbd", "nbds://h/e", "--tls-pin", "abc"],
            ["--xapi", "https://h", "--xapi-pin", multibyte.as_str()],
            ["--nbd", "nbds://h/e", "--tls-server-name", "bad name"],
        ] {
            let err = parse(&args).err().expect("rejected");
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::ValueValidation,
                "{args:?}"
            );
            // main() exits with Code::Usage for every error clap prints to stderr.
            assert!(err.use_stderr());
        }
        let pin = "0a".repeat(32);
        let cli = parse(&["--nbd", "nbds://h/e", "--tls-pin", &pin]).unwrap();
        let Command::Export(args) = cli.command else {
            panic!("not export")
        };
        assert_eq!(args.tls.tls_pin.as_deref(), Some(pin.as_str()));
    }

    proptest::proptest! {
        #[test]
        fn value_parsers_never_panic(text in ".*") {
            let _ = pin_arg(&text);
            let _ = server_name_arg(&text);
            let _ = text.parse::<crate::nbd::NbdUri>();
        }
    }

    #[test]
    fn update_paths_takes_several_maps_after_one_flag_or_repeated() {
        let base = [
            "cbtstream",
            "vsphere",
            "update-paths",
            "--vsphere",
            "https://vc/",
            "--datastore",
            "datastore-11",
            "--user",
            "u",
        ];
        let maps = |cli: Cli| match cli.command {
            Command::Vsphere(VsphereCommand::UpdatePaths(a)) => a.map,
            _ => panic!("not update-paths"),
        };
        let want = vec![
            ("/vmfs/volumes/a".to_owned(), "datastore-12".to_owned()),
            ("/vmfs/volumes/b".to_owned(), "datastore-13".to_owned()),
        ];
        let one_flag = [
            &base[..],
            &[
                "--map",
                "/vmfs/volumes/a=datastore-12",
                "/vmfs/volumes/b=datastore-13",
            ],
        ]
        .concat();
        assert_eq!(maps(Cli::try_parse_from(one_flag).unwrap()), want);
        let repeated = [
            &base[..],
            &[
                "--map",
                "/vmfs/volumes/a=datastore-12",
                "--map",
                "/vmfs/volumes/b=datastore-13",
            ],
        ]
        .concat();
        assert_eq!(maps(Cli::try_parse_from(repeated).unwrap()), want);
        let bad = [&base[..], &["--map", "/vmfs/volumes/a=not a moid"]].concat();
        assert!(Cli::try_parse_from(bad).is_err());
    }
}
