//! The export engine: plan → fetch → compress → order → sink.
//!
//! ```text
//!  planner task ──jobs──► N connection workers (async, M reads in flight each)
//!       │                         │ Fetched (buffer from the pool)
//!       └── zero ranges ──────────┤
//!                                 ▼
//!                      compression threads (zstd, zero detection)
//!                                 │ Encoded
//!                                 ▼
//!                      sink thread: reorder by id, write records, trailer, fsync
//! ```
//!
//! Memory is bounded by a byte budget: the planner takes permits for a range before it is
//! read, and the sink gives them back once the range is written. The output is the same
//! whatever the number of connections or threads, because records are written in plan order.

pub mod direct;
pub mod encode;
pub mod fetch;
pub mod plan;
pub mod pool;
pub mod sink;

use crate::nbd::{ConnError, ConnectOptions, Connection};
use bytes::BytesMut;
use cbtstream_proto::stream::{Codec, Header};
use fetch::{FetchConfig, FetchError};
use plan::{Plan, PlanItem};
use pool::Pools;
use sink::{Output, SinkError, SinkStats};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Opens connections to the export being read: for reconnects and extra connections.
pub trait Connector: Send + Sync {
    /// Open and negotiate one more connection to the same export.
    fn connect(
        &self,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Connection, ConnError>> + Send + '_>,
    >;
}

impl Connector for ConnectOptions {
    fn connect(
        &self,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Connection, ConnError>> + Send + '_>,
    > {
        Box::pin(Connection::connect(self))
    }
}

/// A read to do.
pub struct Job {
    pub id: u64,
    pub offset: u64,
    pub len: u64,
    pub attempts: u32,
    pub permit: Option<OwnedSemaphorePermit>,
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
}

/// Where fetched ranges go: to the compression workers, or (without compression) straight to
/// the sink.
#[derive(Clone)]
pub enum Downstream {
    Compress(std::sync::mpsc::Sender<Fetched>),
    Sink(std::sync::mpsc::Sender<ToSink>),
}

/// A fetch worker's way downstream. Without compression the records are made here, on the
/// reactor thread, while the bytes the TLS reader just wrote are still in this core's cache
/// (checksumming them on the sink thread's core read them from memory again), and sent to
/// the sink in batches. With zstd, ranges go to the compression threads one by one, so that
/// every thread gets work.
pub struct Batch {
    down: Downstream,
    pools: Arc<Pools>,
    ecfg: encode::EncodeConfig,
    items: Vec<Encoded>,
    bytes: u64,
}

impl Batch {
    const MAX_ITEMS: usize = 32;
    const MAX_BYTES: u64 = 2 << 20;

    pub fn new(down: Downstream, pools: Arc<Pools>, ecfg: encode::EncodeConfig) -> Batch {
        Batch {
            down,
            pools,
            ecfg,
            items: Vec::new(),
            bytes: 0,
        }
    }

    /// Pass on one fetched range.
    pub fn push(&mut self, f: Fetched) -> Result<(), FetchError> {
        match &self.down {
            Downstream::Compress(tx) => tx.send(f).map_err(|_| FetchError::OutputClosed),
            Downstream::Sink(_) => {
                self.bytes += f.len;
                let e =
                    encode::encode(f, None, &self.pools, &self.ecfg).map_err(FetchError::Encode)?;
                self.items.push(e);
                if self.items.len() >= Self::MAX_ITEMS || self.bytes >= Self::MAX_BYTES {
                    self.flush()
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Send what is queued. Workers flush whenever they have no read outstanding, so items
    /// never wait here for reads that are not coming (they hold budget the planner needs).
    pub fn flush(&mut self) -> Result<(), FetchError> {
        if self.items.is_empty() {
            return Ok(());
        }
        self.bytes = 0;
        let items = std::mem::take(&mut self.items);
        match &self.down {
            Downstream::Sink(tx) => tx
                .send(ToSink::Batch(items))
                .map_err(|_| FetchError::OutputClosed),
            // Compression workers are never batched.
            Downstream::Compress(_) => Ok(()),
        }
    }
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

/// The rate the default pipeline is sized for: enough reads in flight to move 2 GB/s at the
/// measured round trip (a bandwidth-delay product), so a distant server is not read at the
/// pace of one round trip per few requests.
const TARGET_RATE: f64 = 2e9;

/// Reads in flight per connection, and the byte budget (read but not yet written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pipeline {
    pub inflight: usize,
    pub budget: u64,
}

/// Size the pipeline: `inflight` as given, or enough for the bandwidth-delay product at the
/// handshake's round trip (`rtt`) with reads of `avg_read` bytes spread over `connections`,
/// at least 32 and at most 1024 a connection. The budget covers the reads in flight and a
/// reorder window: 8-32 MiB as before, or twice the bandwidth-delay product (at most 256 MiB)
/// when that is more.
pub fn size_pipeline(
    rtt: Option<std::time::Duration>,
    connections: usize,
    avg_read: u64,
    request: u64,
    inflight: Option<u16>,
) -> Pipeline {
    let bdp = rtt.map_or(0.0, |r| r.as_secs_f64() * TARGET_RATE) as u64;
    let connections = connections.max(1) as u64;
    let inflight = match inflight {
        Some(n) => usize::from(n.max(1)),
        None => {
            let per_conn = bdp.div_ceil(connections * avg_read.max(1));
            per_conn.clamp(32, 1024) as usize
        }
    };
    let budget = (connections * inflight as u64 * request)
        .clamp(8 << 20, 32 << 20)
        .max((2 * bdp).min(256 << 20));
    Pipeline { inflight, budget }
}

/// Run one export: `first` is an already negotiated connection (the caller used it to learn
/// the disk size and plan); more are opened as configured.
pub async fn run(
    first: Connection,
    opts: Arc<dyn Connector>,
    plan: Plan,
    header: Header,
    output: Output,
    cfg: &EngineConfig,
    progress: indicatif::ProgressBar,
) -> Result<ExportSummary, EngineError> {
    let result = run_inner(first, opts, plan, header, output.clone(), cfg, progress).await;
    if result.is_err() {
        // A failed export leaves nothing behind (a killed one leaves PATH.partial, which has
        // no trailer, so restore and inspect refuse it).
        if let Output::File(path) = &output {
            let _ = std::fs::remove_file(sink::partial_path(path));
        }
    }
    result
}

async fn run_inner(
    first: Connection,
    opts: Arc<dyn Connector>,
    plan: Plan,
    header: Header,
    output: Output,
    cfg: &EngineConfig,
    progress: indicatif::ProgressBar,
) -> Result<ExportSummary, EngineError> {
    let started = Instant::now();
    // Extra connections are opened one after another (XenServer's server dislikes parallel
    // connects) while the first one is already reading: at 10 ms round trip a TLS + NBD
    // handshake takes about 100 ms, too long to wait for before starting.
    let opened = Arc::new(std::sync::atomic::AtomicUsize::new(1));
    tracing::debug!(
        connections = cfg.connections,
        inflight = cfg.fetch.inflight,
        "fetching"
    );
    let pools = Arc::new(Pools::default());
    let max_item = plan.largest_read;
    let budget = cfg.budget.max(max_item).min(u64::from(u32::MAX) / 2) as usize;
    let budget_sem = Arc::new(Semaphore::new(budget));
    let expected = plan.items.len() as u64;
    let read_bytes = plan.read_bytes;
    let ecfg = encode::EncodeConfig {
        level: cfg.level,
        block: cfg.block,
        window_log: encode::EncodeConfig::window_for(max_item),
    };

    // Stage channels. Zero ranges and (without compression) fetched data go straight to the
    // sink; with zstd, fetched data goes through the compression threads.
    let (sink_tx, sink_rx) = std::sync::mpsc::channel::<ToSink>();
    let (job_tx, jobs) = async_channel::bounded::<Job>(256);

    // Sink thread.
    let sink_pools = pools.clone();
    let out = sink::open(&output)?;
    let sink_header = header.clone();
    let sink = std::thread::Builder::new()
        .name("cbtstream-sink".into())
        .spawn(move || {
            sink::run(out, &sink_header, sink_rx, expected, sink_pools, |n| {
                progress.inc(n)
            })
        })
        .map_err(|e| EngineError::Internal(e.to_string()))?;

    // Compression threads.
    let mut encoders = Vec::new();
    let downstream = match cfg.codec {
        Codec::None => Downstream::Sink(sink_tx.clone()),
        Codec::Zstd => {
            let (fetched_tx, fetched_rx) = std::sync::mpsc::channel::<Fetched>();
            let fetched_rx = Arc::new(Mutex::new(fetched_rx));
            for i in 0..cfg.threads.max(1) {
                let (rx, tx, p) = (fetched_rx.clone(), sink_tx.clone(), pools.clone());
                encoders.push(
                    std::thread::Builder::new()
                        .name(format!("cbtstream-zstd-{i}"))
                        .spawn(move || encode::worker(rx, tx, p, ecfg))
                        .map_err(|e| EngineError::Internal(e.to_string()))?,
                );
            }
            Downstream::Compress(fetched_tx)
        }
    };

    // Planner: hand out jobs in order, within the byte budget.
    let planner_tx = sink_tx.clone();
    drop(sink_tx);
    let planner_sem = budget_sem.clone();
    let planner = tokio::spawn(async move {
        for (id, item) in plan.items.into_iter().enumerate() {
            let id = id as u64;
            let cost = match item {
                PlanItem::Read { len, .. } => len.max(1) as u32,
                PlanItem::Zero { .. } => 1,
            };
            let Ok(permit) = planner_sem.clone().acquire_many_owned(cost).await else {
                return;
            };
            match item {
                PlanItem::Read { offset, len } => {
                    let job = Job {
                        id,
                        offset,
                        len,
                        attempts: 0,
                        permit: Some(permit),
                    };
                    if job_tx.send(job).await.is_err() {
                        return;
                    }
                }
                PlanItem::Zero { offset, len } => {
                    let e = Encoded {
                        id,
                        records: vec![Record::Zero { offset, len }],
                        raw: None,
                        permit: Some(permit),
                    };
                    if planner_tx.send(ToSink::Encoded(e)).is_err() {
                        return;
                    }
                }
            }
        }
    });

    // Workers: one on the first connection now, and one on each extra connection as it opens.
    let mut workers = tokio::task::JoinSet::new();
    let spawn_worker = {
        let (opts, jobs, downstream, pools, fcfg) = (
            opts.clone(),
            jobs.clone(),
            downstream.clone(),
            pools.clone(),
            cfg.fetch.clone(),
        );
        move |conn| {
            fetch::worker(
                conn,
                opts.clone(),
                jobs.clone(),
                Batch::new(downstream.clone(), pools.clone(), ecfg),
                pools.clone(),
                fcfg.clone(),
            )
        }
    };
    workers.spawn(spawn_worker(first));
    // The opener runs even for one connection (its loop then ends at once): it owns the
    // closure, whose senders must close when the workers end.
    let (opts, count, want, queue) = (opts.clone(), opened.clone(), cfg.connections, jobs.clone());
    workers.spawn(async move {
        let mut extra = tokio::task::JoinSet::new();
        // Stop once there is nothing left to hand out.
        loop {
            let have = count.load(std::sync::atomic::Ordering::Relaxed);
            if have >= want || (queue.is_closed() && queue.is_empty()) {
                break;
            }
            let Some(conn) = fetch::open_one(opts.as_ref(), have).await else {
                break;
            };
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            extra.spawn(spawn_worker(conn));
        }
        drop(spawn_worker);
        while let Some(res) = extra.join_next().await {
            res.map_err(|e| {
                fetch::FetchError::Reconnect(crate::nbd::ConnError::Io(Arc::new(
                    std::io::Error::other(e),
                )))
            })??;
        }
        Ok(())
    });
    drop(downstream);
    let mut fetch_result: Result<(), EngineError> = Ok(());
    while let Some(res) = workers.join_next().await {
        match res {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                fetch_result = Err(e.into());
                break;
            }
            Err(e) => {
                fetch_result = Err(EngineError::Internal(format!("fetch worker: {e}")));
                break;
            }
        }
    }
    if fetch_result.is_err() {
        // Stop everything: aborting the workers and the planner drops every sender, so the
        // compressors and the sink see their inputs close.
        workers.abort_all();
        while workers.join_next().await.is_some() {}
        planner.abort();
        budget_sem.close();
    }
    let _ = planner.await;
    drop(jobs);

    // Wait for the threads off the reactor.
    let (encoders_res, sink_res) = tokio::task::spawn_blocking(move || {
        let mut enc_res = Ok(());
        for h in encoders {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => enc_res = Err(EngineError::Compress(e)),
                Err(_) => {
                    enc_res = Err(EngineError::Internal("compression thread panicked".into()))
                }
            }
        }
        let sink_res = sink
            .join()
            .map_err(|_| EngineError::Internal("sink thread panicked".into()));
        (enc_res, sink_res)
    })
    .await
    .map_err(|e| EngineError::Internal(e.to_string()))?;
    let sink_out = sink_res?;
    if let Err(e) = fetch_result {
        // When reading stopped because the output failed, the output's error is the one to tell.
        if matches!(e, EngineError::Fetch(FetchError::OutputClosed)) {
            sink_out?;
            encoders_res?;
        }
        return Err(e);
    }
    encoders_res?;
    let (file, stats): (_, SinkStats) = sink_out?;
    sink::commit(&output, file)?;
    Ok(ExportSummary {
        bytes_read: read_bytes,
        bytes_written: stats.bytes_written,
        records: stats.records,
        data_bytes: stats.data_bytes,
        zero_bytes: stats.zero_bytes,
        connections: opened.load(std::sync::atomic::Ordering::Relaxed),
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn pipeline_follows_the_bandwidth_delay_product() {
        let ms = |n: u64| Some(Duration::from_millis(n));
        // Loopback, or no measurement: the floor of 32 and the old 8-32 MiB budget.
        let p = size_pipeline(Some(Duration::from_micros(60)), 4, 64 << 10, 2 << 20, None);
        assert_eq!(
            p,
            Pipeline {
                inflight: 32,
                budget: 32 << 20
            }
        );
        assert_eq!(size_pipeline(None, 4, 64 << 10, 2 << 20, None).inflight, 32);
        // 10 ms: 20 MB in flight: 77 reads of 64 KiB on each of 4 connections, 40 MB budget.
        let p = size_pipeline(ms(10), 4, 64 << 10, 2 << 20, None);
        assert_eq!(p.inflight, 77);
        assert_eq!(p.budget, 40_000_000);
        // Large reads need few requests; the budget still covers the product.
        let p = size_pipeline(ms(10), 4, 2 << 20, 2 << 20, None);
        assert_eq!(p.inflight, 32);
        assert_eq!(p.budget, 40_000_000);
        // A far server: capped.
        let p = size_pipeline(ms(500), 1, 64 << 10, 64 << 10, None);
        assert_eq!(
            p,
            Pipeline {
                inflight: 1024,
                budget: 256 << 20
            }
        );
        // Given by the user: kept; the budget still follows the round trip.
        let p = size_pipeline(ms(10), 1, 64 << 10, 2 << 20, Some(8));
        assert_eq!(p.inflight, 8);
        assert_eq!(p.budget, 40_000_000);
        assert_eq!(
            size_pipeline(None, 2, 64 << 10, 1 << 20, Some(4)).budget,
            8 << 20
        );
    }
}
