//! Command-line interface: argument definitions and dispatch. The work lives in `export`,
//! `restore` and `engine`.

use crate::exit::{fail, Code, Failure, WithCode};
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
    /// Apply a full stream and/or incrementals, in order, to a raw disk image.
    Restore(RestoreArgs),
    /// Check a stream (every checksum and the trailer) and print what it holds.
    Inspect(InspectArgs),
    /// Remove snapshots that cbtstream took but did not commit (left by a killed run).
    Gc(GcArgs),
}

#[derive(Clone, Copy, ValueEnum, Debug, PartialEq, Eq)]
pub enum CompressArg {
    Zstd,
    None,
}

#[derive(Args, Debug, Clone)]
pub struct TlsArgs {
    /// PEM file of trusted CA certificates (a self-signed server certificate works too).
    #[arg(long, value_name = "FILE", group = "trust")]
    pub tls_ca: Option<PathBuf>,
    /// Trust exactly this server certificate (PEM), compared byte for byte.
    #[arg(long, value_name = "FILE", group = "trust")]
    pub tls_cert: Option<PathBuf>,
    /// Trust the server certificate whose DER has this SHA-256 (64 hex digits).
    #[arg(long, value_name = "SHA256", group = "trust")]
    pub tls_pin: Option<String>,
    /// Name to verify the certificate against and send as SNI (default: the URI host).
    #[arg(long, value_name = "NAME")]
    pub tls_server_name: Option<String>,
    /// Accept any TLS certificate. The connection is encrypted but NOT authenticated.
    #[arg(long, group = "trust")]
    pub tls_insecure_no_verify: bool,
    /// Allow an nbd:// URI over TCP: data crosses the network unencrypted.
    #[arg(long)]
    pub allow_plaintext: bool,
}

/// How to reach and authenticate to XenAPI.
#[derive(Args, Debug, Clone)]
pub struct XapiArgs {
    /// XenAPI user.
    #[arg(long, default_value = "root")]
    pub user: String,
    /// File holding the XenAPI password (else $XAPI_PASSWORD). Never on the command line.
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// PEM CA file for the pool master's certificate (a self-signed one works too).
    #[arg(long, value_name = "FILE", group = "xapi_trust")]
    pub xapi_ca: Option<PathBuf>,
    /// Trust the pool master's certificate whose DER has this SHA-256 (64 hex digits).
    #[arg(long, value_name = "SHA256", group = "xapi_trust")]
    pub xapi_pin: Option<String>,
    /// Accept any certificate from the pool master: encrypted but NOT authenticated.
    #[arg(long, group = "xapi_trust")]
    pub xapi_insecure: bool,
    /// Allow an http:// XenAPI URL: the password crosses the network unencrypted.
    #[arg(long)]
    pub xapi_allow_plaintext: bool,
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
        Ok(kib) if kib % 64 == 0 && (64..=32768).contains(&kib) => Ok(kib),
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
            output: self.output.clone(),
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

/// `export --nbd`, then the `--json` summary.
async fn export_nbd(args: ExportArgs) -> Result<(), Failure> {
    let progress = std::sync::Arc::new(crate::progress::Bar::stderr());
    let summary = crate::export::export_nbd(args.nbd_options(), progress).await?;
    if args.dp.json {
        eprintln!("{}", summary.json());
    }
    Ok(())
}

#[derive(Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["nbd", "xapi"])))]
pub struct ExportArgs {
    /// NBD URI of the disk: nbds://host[:port]/export, nbd://, nbd+unix:///export?socket=PATH.
    #[arg(long, value_name = "URI")]
    pub nbd: Option<String>,
    /// XenAPI URL of the pool master (https://host/): back up a VDI with CBT.
    #[arg(long, value_name = "URL", requires = "vdi")]
    pub xapi: Option<String>,
    /// With --nbd: the changed-block bitmap (base64, as VDI.list_changed_blocks returns it); "-" for stdin.
    #[arg(long, value_name = "FILE|-", conflicts_with_all = ["full", "xapi"])]
    pub changed_blocks: Option<PathBuf>,
    /// Export the whole disk (with --nbd, skipping what the server reports as zero).
    #[arg(long)]
    pub full: bool,
    /// Output file, or "-" for stdout. A file is written as PATH.partial and renamed when done.
    #[arg(short, long, value_name = "PATH|-")]
    pub output: PathBuf,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// With --nbd: id of the point in time this export captures (default: a fresh UUID).
    #[arg(long, value_name = "ID", conflicts_with = "xapi")]
    pub point_id: Option<String>,
    /// With --nbd: id of the point in time this incremental applies on top of.
    #[arg(long, value_name = "ID", conflicts_with = "xapi")]
    pub base_id: Option<String>,
    /// With --nbd: id of the source disk, recorded in the stream header.
    #[arg(long, value_name = "ID", default_value = "", conflicts_with = "xapi")]
    pub source_id: String,
    /// With --xapi: the VDI to back up.
    #[arg(long, value_name = "UUID", requires = "xapi")]
    pub vdi: Option<String>,
    /// With --xapi: the chain's state file (created by the first export, updated by each).
    #[arg(long, value_name = "FILE", requires = "xapi", conflicts_with = "base")]
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
    #[arg(long, requires = "xapi")]
    pub enable_cbt: bool,
    /// With --xapi: when the chain is broken (base gone, CBT reset), do a full export instead of failing.
    #[arg(long, requires = "xapi")]
    pub fallback_full: bool,
    /// With --xapi: how many bases to keep on the host (1: only the newest).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub keep_bases: u32,
    #[command(flatten)]
    pub xapi_args: XapiArgs,
    #[command(flatten)]
    pub dp: DataPlaneArgs,
}

/// `cbtstream gc`: remove snapshots left by killed runs.
#[derive(Args, Debug, Clone)]
pub struct GcArgs {
    /// XenAPI URL of the pool master.
    #[arg(long, value_name = "URL")]
    pub xapi: String,
    /// The VDI whose leftover snapshots to remove.
    #[arg(long, value_name = "UUID")]
    pub vdi: String,
    /// The chain's state file: its bases are kept.
    #[arg(long, value_name = "FILE")]
    pub state: Option<PathBuf>,
    /// List what would be removed, remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub xapi_args: XapiArgs,
}

#[derive(Args, Debug)]
struct RestoreArgs {
    /// The raw disk image to create (full stream) or update (incrementals).
    #[arg(long, value_name = "IMAGE")]
    to: PathBuf,
    /// Streams, in order; "-" reads stdin.
    #[arg(required = true, value_name = "STREAM")]
    streams: Vec<PathBuf>,
}

#[derive(Args, Debug)]
struct InspectArgs {
    /// The stream; "-" reads stdin.
    #[arg(value_name = "STREAM")]
    stream: PathBuf,
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
        Command::Export(args) if args.xapi.is_some() => {
            run_async(crate::backup::export_xapi(*args))
        }
        Command::Export(args) => run_async(export_nbd(*args)),
        Command::Gc(args) => run_async(crate::backup::gc(args)),
        Command::Restore(args) => restore(args),
        Command::Inspect(args) => inspect(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("cbtstream: error: {}", describe(&f.error));
            ExitCode::from(f.code as u8)
        }
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

fn run_async<F: std::future::Future<Output = Result<(), Failure>>>(fut: F) -> Result<(), Failure> {
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

fn restore_code(e: &crate::restore::RestoreError) -> Code {
    use crate::restore::RestoreError as E;
    if e.is_integrity() {
        Code::Integrity
    } else {
        match e {
            E::Usage(..) => Code::Usage,
            E::Image { .. } => Code::Output,
            E::Input { .. } => Code::Source,
            _ => Code::Integrity,
        }
    }
}

fn restore(args: RestoreArgs) -> Result<(), Failure> {
    if args.streams.iter().filter(|s| s.as_os_str() == "-").count() > 1 {
        return Err(fail(Code::Usage, "stdin (\"-\") can be given only once"));
    }
    match crate::restore::restore(&args.to, &args.streams) {
        Ok(report) => {
            eprintln!("{report}");
            Ok(())
        }
        Err(e) => Err(Failure {
            code: restore_code(&e),
            error: e.into(),
        }),
    }
}

fn inspect(args: InspectArgs) -> Result<(), Failure> {
    match crate::restore::inspect(&args.stream) {
        Ok(report) => {
            println!("{report}");
            Ok(())
        }
        Err(e) => Err(Failure {
            code: restore_code(&e),
            error: e.into(),
        }),
    }
}
