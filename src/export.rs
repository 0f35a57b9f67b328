//! `cbtstream export --nbd URI`: the data plane on its own, for any NBD server; and
//! [`run_data_plane`], which the XenServer flow (`backup`) uses too.

use crate::cli::{CompressArg, DataPlaneArgs, ExportArgs};
use crate::engine::fetch::{self, FetchConfig};
use crate::engine::plan::Plan;
use crate::engine::sink::Output;
use crate::engine::{self, Connector, EngineConfig, EngineError, ExportSummary};
use crate::exit::{fail, Code, Failure, WithCode};
use crate::nbd::{Address, ConnectOptions, Connection, NbdUri};
use crate::tls;
use cbtstream_proto::cbt::{self, CBT_BLOCK};
use cbtstream_proto::stream::{Codec, Header};
use std::io::{IsTerminal, Read};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

fn read_bitmap(path: &Path) -> Result<Vec<u8>, Failure> {
    let mut text = Vec::new();
    if path == Path::new("-") {
        std::io::stdin().read_to_end(&mut text).code(Code::Usage)?;
    } else {
        text = std::fs::read(path).map_err(|e| {
            fail(
                Code::Usage,
                format!("reading the changed-block bitmap {}: {e}", path.display()),
            )
        })?;
    }
    cbt::decode_base64(&text).code(Code::Usage)
}

fn connect_options(args: &ExportArgs, uri: &NbdUri) -> Result<ConnectOptions, Failure> {
    let t = &args.tls;
    let tls_flags = t.tls_ca.is_some()
        || t.tls_cert.is_some()
        || t.tls_pin.is_some()
        || t.tls_insecure_no_verify
        || t.tls_server_name.is_some();
    let tls = if uri.tls {
        let trust = tls::trust_from_flags(
            t.tls_ca.as_deref(),
            t.tls_cert.as_deref(),
            t.tls_pin.as_deref(),
            t.tls_insecure_no_verify,
        )
        .code(Code::Usage)?;
        let config = tls::client_config(&trust).code(Code::Usage)?;
        let name = match (&t.tls_server_name, &uri.address) {
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
    let timeout = Duration::from_secs(args.dp.connect_timeout.max(1));
    Ok(ConnectOptions {
        address: uri.address.clone(),
        export: uri.export.clone(),
        tls,
        connect_timeout: timeout,
        handshake_timeout: timeout,
        extended_headers: !args.dp.no_extended_headers,
        meta_context: true,
    })
}

pub fn progress_bar(total: u64) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::with_draw_target(
        Some(total),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
    ) {
        pb.set_style(style);
    }
    pb
}

pub fn engine_code(e: &EngineError) -> Code {
    match e {
        EngineError::Fetch(_) => Code::Source,
        EngineError::Sink(crate::engine::sink::SinkError::Io { .. }) => Code::Output,
        _ => Code::Failure,
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

pub async fn export_nbd(args: ExportArgs) -> Result<ExportSummary, Failure> {
    let Some(nbd) = &args.nbd else {
        return Err(fail(Code::Usage, "give --nbd URI or --xapi URL"));
    };
    let uri: NbdUri = nbd.parse().code(Code::Usage)?;
    let opts = connect_options(&args, &uri)?;
    if args.changed_blocks.is_none() && !args.full {
        return Err(fail(
            Code::Usage,
            "give --changed-blocks FILE (an incremental) or --full",
        ));
    }
    if args.base_id.is_some() && args.full {
        return Err(fail(Code::Usage, "--base-id makes no sense with --full"));
    }
    let bitmap = match &args.changed_blocks {
        Some(p) => Some(read_bitmap(p)?),
        None => None,
    };
    if bitmap.is_some() && args.base_id.is_none() {
        tracing::warn!(
            "incremental export without --base-id: restore will apply it onto any image"
        );
    }
    let first = Connection::connect(&opts).await.code(Code::Source)?;
    let ids = StreamIds {
        source_id: args.source_id.clone(),
        point_id: args
            .point_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        base_id: args.base_id.clone(),
    };
    let destination = args.destination();
    send_stream(first, Arc::new(opts), bitmap, ids, &args.dp, &destination).await
}

/// Where the stream goes.
#[derive(Debug, Clone)]
pub enum Destination {
    /// `-o PATH`, `-o -` (stdout), or a FIFO or device.
    Output(std::path::PathBuf),
    /// `--to-command CMD`: `sh -c CMD` reads the stream on its stdin.
    Command(String),
}

/// [`run_data_plane`] into `destination`; for `--to-command`, also wait for the command and
/// fail unless it exits 0 (when the stream fails, the command is killed).
pub async fn send_stream(
    first: Connection,
    connector: Arc<dyn Connector>,
    bitmap: Option<Vec<u8>>,
    ids: StreamIds,
    dp: &DataPlaneArgs,
    destination: &Destination,
) -> Result<ExportSummary, Failure> {
    let cmd = match destination {
        Destination::Output(path) => {
            let output = Output::from_arg(path);
            return run_data_plane(first, connector, bitmap, ids, dp, output).await;
        }
        Destination::Command(cmd) => cmd,
    };
    let (child, stdin) = crate::command::StreamCommand::spawn(cmd).code(Code::Output)?;
    // The engine drops its copies of the pipe when it returns: the command's EOF.
    let output = Output::Pipe(Arc::new(stdin));
    match run_data_plane(first, connector, bitmap, ids, dp, output).await {
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

/// The ids that go into the stream header.
pub struct StreamIds {
    pub source_id: String,
    pub point_id: String,
    pub base_id: Option<String>,
}

/// Plan, read, encode and write one export from an open connection: an incremental when
/// `bitmap` is given, else a full export. Shared by `--nbd` and `--xapi`. On success the
/// output is complete and durable.
pub async fn run_data_plane(
    first: Connection,
    connector: Arc<dyn Connector>,
    bitmap: Option<Vec<u8>>,
    ids: StreamIds,
    dp: &DataPlaneArgs,
    output: Output,
) -> Result<ExportSummary, Failure> {
    if !dp.request_size.is_multiple_of(64) || !(64..=32768).contains(&dp.request_size) {
        return Err(fail(
            Code::Usage,
            "--request-size must be a multiple of 64 KiB between 64 and 32768",
        ));
    }
    let n = first.negotiated.clone();
    let size = n.size;
    let mut connections = usize::from(dp.connections);
    if connections > 1 && !(n.can_multi_conn() || n.read_only()) {
        tracing::info!(
            "the server allows neither multi-conn nor read-only access: using one connection"
        );
        connections = 1;
    }
    // Requests: what was asked, within the server's maximum, in whole CBT blocks.
    let request = (dp.request_size * 1024).min(n.max_request()) / CBT_BLOCK * CBT_BLOCK;
    if request == 0 {
        return Err(fail(
            Code::Source,
            format!(
                "the server's maximum request ({} bytes) is below 64 KiB",
                n.max_request()
            ),
        ));
    }
    let timeout = Duration::from_secs(dp.request_timeout.max(1));
    let plan = match &bitmap {
        Some(bm) => Plan::from_bitmap(bm, size, request).code(Code::Usage)?,
        None if n.meta_context.is_some() => {
            match fetch::allocation_map(&first, size, n.alignment(), timeout).await {
                Ok(map) => Plan::from_allocation(&map, request),
                // Block status only saves reads: without it, read everything.
                Err(fetch::FetchError::Read { error, .. }) => {
                    tracing::warn!("block status failed ({error}); reading the whole disk");
                    Plan::full(size, request)
                }
                Err(e) => return Err(e).code(Code::Source),
            }
        }
        None => Plan::full(size, request),
    };
    tracing::info!(
        disk_size = size,
        read_bytes = plan.read_bytes,
        zero_bytes = plan.zero_bytes,
        items = plan.items.len(),
        "planned"
    );
    let header = Header {
        virtual_size: size,
        block_size: CBT_BLOCK as u32,
        source_id: ids.source_id,
        point_id: ids.point_id,
        incremental: bitmap.is_some(),
        base_id: if bitmap.is_some() { ids.base_id } else { None },
        created_unix_secs: created_now(),
        codec: match dp.compress {
            CompressArg::Zstd => Codec::Zstd,
            CompressArg::None => Codec::None,
        },
    };
    header.validate().code(Code::Usage)?;
    let threads = dp
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let pipeline = engine::size_pipeline(
        first.rtt,
        connections,
        plan.read_bytes / plan.reads.max(1),
        request,
        dp.inflight,
    );
    tracing::debug!(
        round_trip_us = first.rtt.map(|r| r.as_micros() as u64),
        inflight = pipeline.inflight,
        budget = pipeline.budget,
        "pipeline sized"
    );
    let inflight = pipeline.inflight;
    let cfg = EngineConfig {
        connections,
        fetch: FetchConfig {
            inflight,
            request_timeout: timeout,
            retries: dp.retries,
            reconnects: dp.retries.max(1) + 2,
        },
        codec: header.codec,
        level: dp.level,
        threads,
        budget: pipeline.budget,
        block: CBT_BLOCK,
    };
    let pb = progress_bar(plan.read_bytes + plan.zero_bytes);
    let run = engine::run(
        first,
        connector,
        plan,
        header.clone(),
        output.clone(),
        &cfg,
        pb.clone(),
    );
    let summary = tokio::select! {
        r = run => r.map_err(|e| Failure { code: engine_code(&e), error: e.into() })?,
        sig = shutdown_signal() => {
            // Dropping the engine closes the NBD connections; the partial output goes.
            if let Output::File(path) = &output {
                let _ = std::fs::remove_file(crate::engine::sink::partial_path(path));
            }
            return Err(fail(Code::Interrupted, format!("interrupted by {sig}; nothing was committed")));
        }
    };
    pb.finish_and_clear();
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
