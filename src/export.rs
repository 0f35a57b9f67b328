//! `cbtstream export --nbd URI`: the data plane on its own, for any NBD server; and
//! [`run_data_plane`], which the XenServer flow (`xen::export`) uses too. Both take plain option
//! structs: the CLI builds them from its arguments.

use crate::engine::fetch::FetchConfig;
use crate::engine::plan::{Plan, PlanError, MAX_DISK_SIZE};
use crate::engine::sink::Output;
use crate::engine::{
    self, Connector, EngineConfig, EngineError, ExportSummary, Progress, SourceConnection,
};
use crate::exit::{fail, Code, Failure, WithCode};
use crate::nbd::{Address, ConnectOptions, Connection, NbdUri};
use crate::tls;
use cbtstream_proto::cbt::{self, CBT_BLOCK};
use cbtstream_proto::stream::{Codec, Header};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The data plane's knobs, as the CLI gives them (already range-checked there).
#[derive(Debug, Clone)]
pub struct DataPlaneOptions {
    /// NBD connections, when the server allows more than one.
    pub connections: usize,
    /// Requests in flight per connection; `None` sizes it from the round trip.
    pub inflight: Option<u16>,
    /// The longest read, in bytes: a multiple of 64 KiB, 64 KiB to 32 MiB.
    pub request_size: u64,
    pub codec: Codec,
    pub level: i32,
    /// Compression threads.
    pub threads: usize,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// Times one read is retried (server errors and lost connections).
    pub retries: u32,
    /// The first wait before a retry or a reconnect (it doubles each time).
    pub retry_delay: Duration,
    /// Try NBD extended headers.
    pub extended_headers: bool,
}

/// How to trust an `nbds://` server, and whether plaintext TCP is allowed.
#[derive(Debug, Clone, Default)]
pub struct NbdTlsOptions {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub pin: Option<String>,
    pub server_name: Option<String>,
    pub insecure_no_verify: bool,
    pub allow_plaintext: bool,
}

/// `export --nbd`. No Debug: the URI holds the export name, a secret.
pub struct NbdExportOptions {
    pub uri: String,
    /// The changed-block bitmap file ("-": stdin); `None` with `full`.
    pub changed_blocks: Option<PathBuf>,
    pub full: bool,
    pub destination: Destination,
    pub tls: NbdTlsOptions,
    pub source_id: String,
    pub point_id: Option<String>,
    pub base_id: Option<String>,
    pub dp: DataPlaneOptions,
}

/// Read and decode the base64 bitmap in pieces, never holding its whole text.
fn read_bitmap(path: &Path) -> Result<Vec<u8>, Failure> {
    let what = || {
        if path == Path::new("-") {
            "the changed-block bitmap on stdin".to_string()
        } else {
            format!("the changed-block bitmap {}", path.display())
        }
    };
    let mut input: Box<dyn Read> = if path == Path::new("-") {
        Box::new(std::io::stdin())
    } else {
        let file = std::fs::File::open(path)
            .map_err(|e| fail(Code::Usage, format!("reading {}: {e}", what())))?;
        Box::new(file)
    };
    // The bitmap of the largest disk cbtstream exports.
    let max = MAX_DISK_SIZE.div_ceil(CBT_BLOCK).div_ceil(8) as usize;
    let mut decoder = cbt::Base64Decoder::new(max);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(fail(Code::Usage, format!("reading {}: {e}", what()))),
        };
        decoder.push(&buf[..n]).code(Code::Usage)?;
    }
    decoder.finish().code(Code::Usage)
}

fn connect_options(
    t: &NbdTlsOptions,
    dp: &DataPlaneOptions,
    uri: &NbdUri,
) -> Result<ConnectOptions, Failure> {
    let tls_flags = t.ca.is_some()
        || t.cert.is_some()
        || t.pin.is_some()
        || t.insecure_no_verify
        || t.server_name.is_some();
    let tls = if uri.tls {
        let trust = tls::trust_from_flags(
            t.ca.as_deref(),
            t.cert.as_deref(),
            t.pin.as_deref(),
            t.insecure_no_verify,
        )
        .code(Code::Usage)?;
        let config = tls::client_config(&trust).code(Code::Usage)?;
        let name = match (&t.server_name, &uri.address) {
            (Some(n), _) => n.clone(),
            (None, Address::Tcp { host, .. }) => host.clone(),
            (None, Address::Unix(_)) => "localhost".to_string(),
        };
        Some((config, tls::server_name(&name).code(Code::Usage)?))
    } else {
        if tls_flags {
            return Err(fail(
                Code::Usage,
                "TLS options given with a plaintext URI; use nbds:// for TLS",
            ));
        }
        if matches!(uri.address, Address::Tcp { .. }) && !t.allow_plaintext {
            return Err(fail(
                Code::Usage,
                "nbd:// sends the disk unencrypted over the network; use nbds:// (TLS), or pass --allow-plaintext",
            ));
        }
        None
    };
    let timeout = dp.connect_timeout.max(Duration::from_secs(1));
    Ok(ConnectOptions {
        address: uri.address.clone(),
        export: uri.export.clone(),
        tls,
        connect_timeout: timeout,
        handshake_timeout: timeout,
        extended_headers: dp.extended_headers,
        meta_context: true,
    })
}

/// The exit code of an engine failure: reading is the source's fault, writing the output's;
/// the rest (a compression or stream-encoder failure, an internal error) is ours.
pub fn engine_code(e: &EngineError) -> Code {
    match e {
        EngineError::Fetch(_) => Code::Source,
        EngineError::Sink(crate::engine::sink::SinkError::Io { .. }) => Code::Output,
        EngineError::Sink(_) | EngineError::Compress(_) | EngineError::Internal(_) => Code::Failure,
    }
}

/// Now, or $SOURCE_DATE_EPOCH when set (for reproducible output, as in reproducible builds).
pub fn created_now() -> u64 {
    if let Some(t) = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return t;
    }
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Resolves on SIGINT or SIGTERM, with the signal's name.
pub async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

/// `export --nbd`: the summary is returned, for the caller to print after the export.
pub async fn export_nbd(
    args: NbdExportOptions,
    progress: Arc<dyn Progress>,
) -> Result<ExportSummary, Failure> {
    let started = Instant::now();
    let uri: NbdUri = args.uri.parse().code(Code::Usage)?;
    let opts = connect_options(&args.tls, &args.dp, &uri)?;
    if args.changed_blocks.is_none() && !args.full {
        return Err(fail(
            Code::Usage,
            "give --changed-blocks FILE (an incremental) or --full",
        ));
    }
    if args.base_id.is_some() && args.full {
        return Err(fail(Code::Usage, "--base-id makes no sense with --full"));
    }
    let what = match &args.changed_blocks {
        Some(p) => What::Changed(read_bitmap(p)?),
        None => What::Full,
    };
    if matches!(what, What::Changed(_)) && args.base_id.is_none() {
        tracing::warn!(
            "incremental export without --base-id: restore will apply it onto any image"
        );
    }
    let first = Box::new(Connection::connect(&opts).await.code(Code::Source)?);
    let ids = StreamIds {
        source_id: args.source_id.clone(),
        point_id: args
            .point_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        base_id: args.base_id.clone(),
    };
    let connector: Arc<dyn Connector> = Arc::new(opts);
    let mut summary = send_stream(
        first,
        connector,
        what,
        ids,
        &args.dp,
        &args.destination,
        progress,
    )
    .await?;
    // The whole run, connecting and planning included.
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// Where the stream goes.
#[derive(Debug, Clone)]
pub enum Destination {
    /// `-o PATH`, `-o -` (stdout), or a FIFO or device.
    Output(std::path::PathBuf),
    /// `--to-command CMD`: `sh -c CMD` reads the stream on its stdin.
    Command(String),
    /// An upload into a repository.
    Upload(crate::engine::sink::SharedFinishing),
}

/// [`run_data_plane`] into `destination`; for `--to-command`, also wait for the command and
/// fail unless it exits 0 (when the stream fails, the command is killed).
pub async fn send_stream(
    first: Box<dyn SourceConnection>,
    connector: Arc<dyn Connector>,
    what: What,
    ids: StreamIds,
    dp: &DataPlaneOptions,
    destination: &Destination,
    progress: Arc<dyn Progress>,
) -> Result<ExportSummary, Failure> {
    let cmd = match destination {
        Destination::Output(path) => {
            let output = Output::from_arg(path);
            return run_data_plane(first, connector, what, ids, dp, output, progress).await;
        }
        Destination::Command(cmd) => cmd,
        Destination::Upload(writer) => {
            let output = Output::Finishing(writer.clone());
            return run_data_plane(first, connector, what, ids, dp, output, progress).await;
        }
    };
    let (child, stdin) = crate::command::StreamCommand::spawn(cmd).code(Code::Output)?;
    // The engine drops its copies of the pipe when it returns: the command's EOF.
    let output = Output::Pipe(Arc::new(stdin));
    match run_data_plane(first, connector, what, ids, dp, output, progress).await {
        Ok(summary) => {
            child.wait_success().await.code(Code::Output)?;
            Ok(summary)
        }
        Err(mut e) => {
            if let Some(failed) = child.kill().await {
                e.error = e.error.context(failed);
            }
            Err(e)
        }
    }
}

/// What an export reads.
#[derive(Debug)]
pub enum What {
    /// The blocks a changed-block bitmap marks: an incremental.
    Changed(Vec<u8>),
    /// The whole disk (skipping what the server's block status reports as zero).
    Full,
    /// The whole disk, reading only what a VHD allocation table marks allocated.
    Allocated(cbtstream_proto::vhd::VhdAllocation),
}

/// The ids that go into the stream header.
pub struct StreamIds {
    pub source_id: String,
    pub point_id: String,
    pub base_id: Option<String>,
}

/// Plan, read, encode and write one export from an open connection (of any source): an
/// incremental for [`What::Changed`], else a full export. Shared by `--nbd` and `--xapi`. On success the
/// output is complete and durable; printing the summary is the caller's.
pub async fn run_data_plane(
    first: Box<dyn SourceConnection>,
    connector: Arc<dyn Connector>,
    what: What,
    ids: StreamIds,
    dp: &DataPlaneOptions,
    output: Output,
    progress: Arc<dyn Progress>,
) -> Result<ExportSummary, Failure> {
    let size = first.size();
    let mut connections = dp.connections.max(1);
    if connections > 1 && !first.multi_conn_safe() {
        tracing::info!(
            "the server allows neither multi-conn nor read-only access: using one connection"
        );
        connections = 1;
    }
    // Requests: what was asked, within the first server's maximum when that is at least one
    // CBT block. A connection allowing less splits each read into several requests.
    let request = (dp.request_size.min(first.max_request()) / CBT_BLOCK * CBT_BLOCK).max(CBT_BLOCK);
    let incremental = matches!(what, What::Changed(_));
    let plan = match what {
        What::Changed(bm) => Plan::from_bitmap(bm, size, request),
        What::Allocated(alloc) => Plan::allocated(alloc, size, request),
        What::Full if first.has_block_status() => {
            Plan::allocation(size, request, first.alignment())
        }
        What::Full => Plan::full(size, request),
    }
    .map_err(|e| {
        let code = match e {
            PlanError::TooLarge { .. } => Code::Source,
            PlanError::Bitmap(_) => Code::Usage,
        };
        Failure {
            code,
            error: e.into(),
        }
    })?;
    tracing::info!(
        disk_size = size,
        covered = plan.covered,
        request,
        block_status = matches!(plan.source, engine::plan::Source::Allocation { .. }),
        "planned"
    );
    let header = Header {
        virtual_size: size,
        block_size: CBT_BLOCK as u32,
        source_id: ids.source_id,
        point_id: ids.point_id,
        incremental,
        base_id: if incremental { ids.base_id } else { None },
        created_unix_secs: created_now(),
        codec: dp.codec,
    };
    header.validate().code(Code::Usage)?;
    let pipeline = engine::size_pipeline(first.rtt(), connections, plan.average_read, dp.inflight);
    tracing::debug!(
        round_trip_us = first.rtt().map(|r| r.as_micros() as u64),
        inflight = pipeline.inflight,
        budget = pipeline.budget,
        "pipeline sized"
    );
    let cfg = EngineConfig {
        connections,
        fetch: FetchConfig {
            inflight: pipeline.inflight,
            request_timeout: dp.request_timeout.max(Duration::from_secs(1)),
            retries: dp.retries,
            reconnects: dp.retries.max(1) + 2,
            retry_delay: dp.retry_delay,
        },
        codec: header.codec,
        level: dp.level,
        threads: dp.threads.max(1),
        budget: pipeline.budget,
        block: CBT_BLOCK,
    };
    progress.start(plan.covered);
    let run = engine::run(
        first,
        connector,
        plan,
        header.clone(),
        output.clone(),
        &cfg,
        progress.clone(),
    );
    let result = tokio::select! {
        r = run => r.map_err(|e| Failure { code: engine_code(&e), error: e.into() }),
        sig = shutdown_signal() => {
            // Dropping the engine closes the NBD connections; the partial output goes.
            if let Output::File(path) = &output {
                let _ = std::fs::remove_file(crate::engine::sink::partial_path(path));
            }
            Err(fail(Code::Interrupted, format!("interrupted by {sig}; nothing was committed")))
        }
    };
    progress.finish();
    let summary = result?;
    tracing::info!(
        point_id = %header.point_id,
        bytes_read = summary.bytes_read,
        bytes_written = summary.bytes_written,
        records = summary.records,
        seconds = summary.seconds,
        "export complete"
    );
    Ok(summary)
}
