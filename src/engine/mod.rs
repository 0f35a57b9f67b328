//! The export engine: plan → fetch → compress → order → sink.
//!
//! ```text
//!  planner task ──jobs──► N connection workers (async, M requests in flight each)
//!    │   ▲  block status answers ──┘ │ Fetched (buffer from the pool)
//!    │                               ▼
//!    │                    compression threads (zstd, zero detection)
//!    └── zero ranges ──────────────┐ │ Encoded
//!                                  ▼ ▼
//!                      sink thread: order (reorder window) → records, trailer, fsync
//! ```
//!
//! The connections are [`SourceConnection`]s: the engine does not know whether it reads
//! NBD or HTTPS byte ranges (see [`source`]).
//!
//! Memory is bounded by a byte budget: the planner takes permits for an item before it is
//! read, and the sink gives them back once the item is written. The output is the same
//! whatever the number of connections or threads, because records are written in plan order.

pub mod connector;
pub mod direct;
pub mod encode;
pub mod fetch;
pub mod handoff;
pub mod order;
pub mod pipeline;
pub mod plan;
pub mod planner;
pub mod pool;
pub mod sink;
pub mod source;

pub use connector::Connector;
pub use handoff::{Batch, Downstream};
pub use pipeline::size_pipeline;
pub use source::SourceConnection;

use bytes::BytesMut;
use cbtstream_proto::stream::{Codec, Header};
use fetch::{FetchConfig, FetchError, Job};
use order::InOrder;
use plan::Plan;
use planner::Planner;
use pool::Pools;
use sink::{Output, SinkError, SinkStats};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

/// Where the engine reports progress (the CLI draws a bar).
pub trait Progress: Send + Sync {
    /// The export covers `total` bytes of disk.
    fn start(&self, total: u64);
    /// `bytes` more of the disk are written.
    fn advance(&self, bytes: u64);
    /// The export is over (done or failed).
    fn finish(&self);
}

/// A range read from the server. (Ranges known to be zero go from the planner to the sink as
/// ready-made ZERO records.)
pub struct Fetched {
    pub id: u64,
    pub offset: u64,
    pub len: u64,
    pub data: BytesMut,
    pub permit: Option<OwnedSemaphorePermit>,
}

pub enum Payload {
    /// A range of the item's raw buffer.
    Raw(std::ops::Range<usize>),
    Compressed(Vec<u8>),
}

pub enum Record {
    Zero {
        offset: u64,
        len: u64,
    },
    Data {
        offset: u64,
        len: u64,
        codec: Codec,
        checksum: u64,
        payload: Payload,
    },
}

/// What the sink receives: the records of one plan item, or of several at once.
pub enum ToSink {
    Encoded(Encoded),
    /// One hand-off (and at most one thread wake-up) for many items: waking the sink thread
    /// for every 64 KiB record cost more CPU than writing the record.
    Batch(Vec<Encoded>),
    /// The planner handed out every item: there were this many.
    PlanDone {
        items: u64,
    },
}

/// The records of one plan item, ready to write.
pub struct Encoded {
    pub id: u64,
    pub records: Vec<Record>,
    pub raw: Option<BytesMut>,
    pub permit: Option<OwnedSemaphorePermit>,
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub connections: usize,
    pub fetch: FetchConfig,
    pub codec: Codec,
    pub level: i32,
    pub threads: usize,
    /// Bytes read but not yet written, at most.
    pub budget: u64,
    pub block: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("compression: {0}")]
    Compress(std::io::Error),
    #[error("internal error: {0}")]
    Internal(String),
}

#[derive(Debug, Clone, Copy)]
pub struct ExportSummary {
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub records: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    pub connections: usize,
    pub seconds: f64,
}

impl ExportSummary {
    pub fn json(&self) -> String {
        self.json_value().to_string()
    }

    pub fn json_value(&self) -> serde_json::Value {
        let mbps = if self.seconds > 0.0 {
            self.bytes_read as f64 / self.seconds / 1e6
        } else {
            0.0
        };
        serde_json::json!({
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "records": self.records,
            "data_bytes": self.data_bytes,
            "zero_bytes": self.zero_bytes,
            "connections": self.connections,
            "seconds": (self.seconds * 1000.0).round() / 1000.0,
            "mb_per_s": (mbps * 10.0).round() / 10.0,
        })
    }
}

/// Run one export: `first` is an already negotiated connection (the caller used it to learn
/// the disk size); more are opened with `connector`, which also reopens lost ones.
pub async fn run(
    first: Box<dyn SourceConnection>,
    connector: Arc<dyn Connector>,
    plan: Plan,
    header: Header,
    output: Output,
    cfg: &EngineConfig,
    progress: Arc<dyn Progress>,
) -> Result<ExportSummary, EngineError> {
    let result = run_stages(first, connector, plan, header, &output, cfg, progress).await;
    if result.is_err() {
        // A failed export leaves nothing behind (a killed one leaves PATH.partial, which has
        // no trailer, so restore and inspect refuse it).
        if let Output::File(path) = &output {
            let _ = std::fs::remove_file(sink::partial_path(path));
        }
    }
    result
}

/// Wire the stages: plan → fetch → compress → order → sink.
async fn run_stages(
    first: Box<dyn SourceConnection>,
    connector: Arc<dyn Connector>,
    plan: Plan,
    header: Header,
    output: &Output,
    cfg: &EngineConfig,
    progress: Arc<dyn Progress>,
) -> Result<ExportSummary, EngineError> {
    let started = Instant::now();
    let pools = Arc::new(Pools::default());
    let ecfg = encode::EncodeConfig {
        level: cfg.level,
        block: cfg.block,
        window_log: encode::EncodeConfig::window_for(plan.largest_read),
    };
    let (sink_tx, sink_rx) = std::sync::mpsc::channel::<ToSink>();
    let (job_tx, jobs) = async_channel::bounded::<Job>(256);

    // Every item, ZERO included, costs at least ITEM_COST; the largest read must fit.
    let budget = cfg
        .budget
        .max(plan.request)
        .max(planner::ITEM_COST)
        .min(u64::from(u32::MAX) / 2) as usize;
    let budget = Arc::new(Semaphore::new(budget));
    let sink = spawn_sink(
        sink::open(output)?,
        header,
        sink_rx,
        pools.clone(),
        progress,
        budget.clone(),
    )?;
    let (downstream, encoders) = spawn_encoders(cfg, &sink_tx, &pools, ecfg)?;
    let planner = tokio::spawn(
        Planner {
            jobs: job_tx,
            sink: sink_tx,
            budget: budget.clone(),
            lookahead: (4 * cfg.connections).clamp(4, 16),
        }
        .run(plan),
    );
    let fetchers = Fetchers {
        connector,
        jobs,
        downstream,
        pools,
        ecfg,
        cfg: cfg.fetch.clone(),
        opened: Arc::new(AtomicUsize::new(1)),
    };
    let opened = fetchers.opened.clone();
    let fetched = fetchers.run(first, cfg.connections).await;
    let planned = match &fetched {
        Ok(_) => planner.await,
        Err(_) => {
            // Stop everything: closing the budget and aborting the planner drop the last
            // senders, so the compressors and the sink see their inputs close.
            planner.abort();
            budget.close();
            planner.await
        }
    };
    let planned = match planned {
        Ok(r) => r.map_err(EngineError::from),
        Err(e) if e.is_cancelled() => Ok(()),
        Err(e) => Err(EngineError::Internal(format!("planner: {e}"))),
    };
    let (encoded, written) = join_threads(encoders, sink).await?;
    let (bytes_read, (file, stats)) = first_failure(fetched, planned, encoded, written)?;
    sink::commit(output, file)?;
    Ok(ExportSummary {
        bytes_read,
        bytes_written: stats.bytes_written,
        records: stats.records,
        data_bytes: stats.data_bytes,
        zero_bytes: stats.zero_bytes,
        connections: opened.load(Ordering::Relaxed),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The written output (to commit) and what was written.
type Written = (sink::SinkFile, SinkStats);
type SinkResult = Result<Written, SinkError>;
type Encoders = Vec<std::thread::JoinHandle<std::io::Result<()>>>;

/// The order and sink stages, on a thread of their own. When writing fails, the budget is
/// closed, which stops the planner.
fn spawn_sink(
    out: sink::SinkFile,
    header: Header,
    input: std::sync::mpsc::Receiver<ToSink>,
    pools: Arc<Pools>,
    progress: Arc<dyn Progress>,
    budget: Arc<Semaphore>,
) -> Result<std::thread::JoinHandle<SinkResult>, EngineError> {
    std::thread::Builder::new()
        .name("cbtstream-sink".into())
        .spawn(move || {
            let mut items = InOrder::new(input);
            let written = sink::run(out, &header, &mut items, &pools, progress.as_ref());
            if written.is_err() {
                // Items still queued for the sink hold budget the planner may be waiting
                // for, with no read in flight to notice the sink is gone: stop the planner.
                budget.close();
            }
            written
        })
        .map_err(|e| EngineError::Internal(e.to_string()))
}

/// The compression stage: with zstd, threads fed by the fetch workers; without, the
/// workers encode and send to the sink themselves.
fn spawn_encoders(
    cfg: &EngineConfig,
    sink_tx: &std::sync::mpsc::Sender<ToSink>,
    pools: &Arc<Pools>,
    ecfg: encode::EncodeConfig,
) -> Result<(Downstream, Encoders), EngineError> {
    if cfg.codec == Codec::None {
        return Ok((Downstream::Sink(sink_tx.clone()), Vec::new()));
    }
    let (fetched_tx, fetched_rx) = std::sync::mpsc::channel::<Fetched>();
    let fetched_rx = Arc::new(Mutex::new(fetched_rx));
    let mut encoders = Vec::new();
    for i in 0..cfg.threads.max(1) {
        let (rx, tx, p) = (fetched_rx.clone(), sink_tx.clone(), pools.clone());
        encoders.push(
            std::thread::Builder::new()
                .name(format!("cbtstream-zstd-{i}"))
                .spawn(move || encode::worker(rx, tx, p, ecfg))
                .map_err(|e| EngineError::Internal(e.to_string()))?,
        );
    }
    Ok((Downstream::Compress(fetched_tx), encoders))
}

/// The fetch stage: one worker per connection.
struct Fetchers {
    connector: Arc<dyn Connector>,
    jobs: fetch::JobQueue,
    downstream: Downstream,
    pools: Arc<Pools>,
    ecfg: encode::EncodeConfig,
    cfg: FetchConfig,
    /// Connections opened so far.
    opened: Arc<AtomicUsize>,
}

impl Fetchers {
    fn worker(
        &self,
        conn: Box<dyn SourceConnection>,
    ) -> impl std::future::Future<Output = Result<u64, FetchError>> {
        fetch::worker(
            conn,
            self.connector.clone(),
            self.jobs.clone(),
            Batch::new(self.downstream.clone(), self.pools.clone(), self.ecfg),
            self.pools.clone(),
            self.cfg.clone(),
        )
    }

    /// Read until the planner is done; returns the bytes read. The first worker starts at
    /// once; extra connections are opened one after another (XenServer's server dislikes
    /// parallel connects) while it reads: at 10 ms round trip a TLS + NBD handshake takes
    /// about 100 ms, too long to wait for before starting.
    async fn run(self, first: Box<dyn SourceConnection>, want: usize) -> Result<u64, EngineError> {
        tracing::debug!(connections = want, inflight = self.cfg.inflight, "fetching");
        let mut workers = JoinSet::new();
        workers.spawn(self.worker(first));
        let mut bytes = 0;
        let mut refused = false;
        loop {
            let have = self.opened.load(Ordering::Relaxed);
            let more = have < want && !refused && !(self.jobs.is_closed() && self.jobs.is_empty());
            tokio::select! {
                conn = fetch::open_one(self.connector.as_ref(), have), if more => match conn {
                    Some(conn) => {
                        self.opened.fetch_add(1, Ordering::Relaxed);
                        workers.spawn(self.worker(conn));
                    }
                    None => refused = true,
                },
                done = workers.join_next() => match done {
                    None => break,
                    Some(Ok(Ok(n))) => bytes += n,
                    Some(Ok(Err(e))) => return Err(e.into()),
                    Some(Err(e)) => return Err(EngineError::Internal(format!("fetch worker: {e}"))),
                },
            }
        }
        Ok(bytes)
    }
}

/// Wait for the threads off the reactor.
async fn join_threads(
    encoders: Encoders,
    sink: std::thread::JoinHandle<SinkResult>,
) -> Result<(Result<(), EngineError>, Result<SinkResult, EngineError>), EngineError> {
    tokio::task::spawn_blocking(move || {
        let mut encoded = Ok(());
        for h in encoders {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => encoded = Err(EngineError::Compress(e)),
                Err(_) => {
                    encoded = Err(EngineError::Internal("compression thread panicked".into()))
                }
            }
        }
        let written = sink
            .join()
            .map_err(|_| EngineError::Internal("sink thread panicked".into()));
        (encoded, written)
    })
    .await
    .map_err(|e| EngineError::Internal(e.to_string()))
}

/// The error to report, if any: the first stage that failed on its own. When reading
/// stopped because a later stage was gone, that stage's error is the one to tell.
fn first_failure(
    fetched: Result<u64, EngineError>,
    planned: Result<(), EngineError>,
    encoded: Result<(), EngineError>,
    written: Result<SinkResult, EngineError>,
) -> Result<(u64, Written), EngineError> {
    let written = written?;
    let bytes_read = match fetched {
        Ok(n) => n,
        Err(e) => {
            if matches!(e, EngineError::Fetch(FetchError::OutputClosed)) {
                written?;
                encoded?;
            }
            return Err(e);
        }
    };
    planned?;
    encoded?;
    Ok((bytes_read, written?))
}
