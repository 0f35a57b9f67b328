//! Fetch: N connections, each with up to M reads in flight, fed from one job queue.
//!
//! Each connection is driven by one worker task. A worker keeps its own outstanding reads;
//! when its connection breaks or stalls it reconnects (bounded attempts, with backoff) and
//! sends them again. A server error on a read is retried a bounded number of times, then the
//! export fails naming the offset and the server's error.

use super::pool::Pools;
use super::{Batch, Fetched, Job};
use crate::nbd::{Completion, ConnError, Connection, Reply, RequestError};
use cbtstream_proto::nbd::{NbdError, ServerError};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct FetchConfig {
    pub inflight: usize,
    pub request_timeout: Duration,
    /// How many times one read may be retried (server errors and lost connections).
    pub retries: u32,
    /// How many times in a row a connection may fail to reopen.
    pub reconnects: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("read of {len} bytes at offset {offset} failed after {attempts} attempt(s): {error}")]
    Read {
        offset: u64,
        len: u64,
        attempts: u32,
        error: ServerError,
    },
    #[error("read of {len} bytes at offset {offset} failed after {attempts} attempt(s); last connection error: {error}")]
    Lost {
        offset: u64,
        len: u64,
        attempts: u32,
        error: ConnError,
    },
    #[error("could not reconnect to the NBD server: {0}")]
    Reconnect(ConnError),
    #[error("the output stage stopped")]
    OutputClosed,
    #[error("encoding a record: {0}")]
    Encode(std::io::Error),
}

/// The shared job queue. A multi-consumer channel: a worker waiting for a job holds no lock,
/// so an idle worker never keeps the others from filling their pipelines (with a mutex around
/// one receiver, a worker parked in `recv` on an empty queue did exactly that, and at 10 ms
/// round trip four connections ran slower than one).
pub type JobQueue = async_channel::Receiver<Job>;

/// Drive one connection until the job queue is drained.
pub async fn worker(
    mut conn: Connection,
    opts: Arc<dyn super::Connector>,
    jobs: JobQueue,
    mut out: Batch,
    pools: Arc<Pools>,
    cfg: FetchConfig,
) -> Result<(), FetchError> {
    let mut retry: VecDeque<Job> = VecDeque::new();
    let mut input_done = false;
    loop {
        let (tx, mut rx) = mpsc::unbounded_channel::<Completion>();
        let mut outstanding: HashMap<u64, Job> = HashMap::new();
        let mut last_progress = Instant::now();
        let broken: ConnError = loop {
            // Keep the pipe full.
            while outstanding.len() < cfg.inflight {
                let job = if let Some(j) = retry.pop_front() {
                    j
                } else if input_done {
                    break;
                } else {
                    match jobs.try_recv() {
                        Ok(j) => j,
                        Err(async_channel::TryRecvError::Empty) => break,
                        Err(async_channel::TryRecvError::Closed) => {
                            input_done = true;
                            break;
                        }
                    }
                };
                if outstanding.is_empty() {
                    last_progress = Instant::now();
                }
                conn.read(
                    job.id,
                    job.offset,
                    job.len,
                    pools.read.get(job.len as usize),
                    tx.clone(),
                );
                outstanding.insert(job.id, job);
            }
            if outstanding.is_empty() {
                out.flush()?;
                if input_done {
                    conn.close().await;
                    return Ok(());
                }
                match jobs.recv().await {
                    Ok(j) => retry.push_back(j),
                    Err(_) => input_done = true,
                }
                continue;
            }
            let room = outstanding.len() < cfg.inflight && !input_done;
            tokio::select! {
                biased;
                c = rx.recv() => {
                    let Some(c) = c else { break ConnError::Closed };
                    let Some(mut job) = outstanding.remove(&c.tag) else { continue };
                    last_progress = Instant::now();
                    match c.result {
                        Ok(Reply::Read(data)) => {
                            let f = Fetched { id: job.id, offset: job.offset, len: job.len, data, permit: job.permit.take() };
                            // Fails when the later stages are gone (the output failed): stop reading.
                            out.push(f)?;
                        }
                        Ok(Reply::BlockStatus(_)) => {}
                        Err(RequestError::Server(error)) => {
                            job.attempts += 1;
                            if job.attempts > cfg.retries {
                                return Err(FetchError::Read { offset: job.offset, len: job.len, attempts: job.attempts, error });
                            }
                            tracing::warn!(offset = job.offset, len = job.len, attempt = job.attempts, "read failed ({error}); retrying");
                            retry.push_back(job);
                        }
                        Err(RequestError::Connection(e)) => {
                            outstanding.insert(job.id, job);
                            break e;
                        }
                    }
                }
                _ = tokio::time::sleep_until(last_progress + cfg.request_timeout) => {
                    break ConnError::Stalled(cfg.request_timeout);
                }
                j = jobs.recv(), if room => {
                    match j { Ok(j) => retry.push_back(j), Err(_) => input_done = true }
                }
            }
        };
        // The connection is gone: pass on what was read, requeue what it held, then reconnect.
        drop(conn);
        out.flush()?;
        let mut requeue: Vec<Job> = outstanding.into_values().collect();
        requeue.sort_by_key(|j| j.id);
        for mut job in requeue {
            job.attempts += 1;
            if job.attempts > cfg.retries {
                return Err(FetchError::Lost {
                    offset: job.offset,
                    len: job.len,
                    attempts: job.attempts,
                    error: broken,
                });
            }
            retry.push_front(job);
        }
        retry.make_contiguous().sort_by_key(|j| j.id);
        tracing::warn!("NBD connection lost ({broken}); reconnecting");
        let mut delay = Duration::from_millis(200);
        let mut attempt = 0;
        conn = loop {
            attempt += 1;
            match opts.connect().await {
                Ok(c) => break c,
                Err(e) if attempt >= cfg.reconnects.max(1) => return Err(FetchError::Reconnect(e)),
                Err(e) => {
                    tracing::warn!(attempt, "reconnect failed: {e}; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        };
    }
}

/// Open one more connection, or `None` to stop opening more: a connection closed before the
/// greeting means the server's connection limit is reached (XenServer: 16 per host), and any
/// other failure is logged; either way the export carries on with the connections it has.
pub async fn open_one(opts: &dyn super::Connector, have: usize) -> Option<Connection> {
    match opts.connect().await {
        Ok(c) => Some(c),
        Err(ConnError::Protocol(NbdError::ClosedBeforeGreeting)) => {
            tracing::info!(
                have,
                "server connection limit reached; continuing with the connections open"
            );
            None
        }
        Err(e) => {
            tracing::warn!(
                have,
                "extra NBD connection failed ({e}); continuing with the connections open"
            );
            None
        }
    }
}

/// Ask for the allocation map of the whole disk with BLOCK_STATUS (base:allocation).
/// Returns (offset, length, is_zero) ranges covering the disk.
pub async fn allocation_map(
    conn: &Connection,
    size: u64,
    align: u64,
    timeout: Duration,
) -> Result<Vec<(u64, u64, bool)>, FetchError> {
    let mut map = Vec::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    // 2 GiB steps keep the length within a 32-bit request and aligned.
    let step: u64 = (1 << 31) - align.max(512);
    let mut off = 0;
    while off < size {
        let asked = step.min(size - off);
        conn.block_status(0, off, asked, tx.clone());
        let c = tokio::time::timeout(timeout, rx.recv())
            .await
            .map_err(|_| FetchError::Lost {
                offset: off,
                len: asked,
                attempts: 1,
                error: ConnError::Stalled(timeout),
            })?
            .ok_or(FetchError::Reconnect(ConnError::Closed))?;
        let extents = match c.result {
            Ok(Reply::BlockStatus(e)) => e,
            Ok(Reply::Read(_)) => Vec::new(),
            Err(RequestError::Server(error)) => {
                return Err(FetchError::Read {
                    offset: off,
                    len: asked,
                    attempts: 1,
                    error,
                })
            }
            Err(RequestError::Connection(error)) => {
                return Err(FetchError::Lost {
                    offset: off,
                    len: asked,
                    attempts: 1,
                    error,
                })
            }
        };
        let covered = super::plan::add_block_status(&mut map, off, asked, &extents);
        if covered == 0 {
            break;
        }
        off += covered;
    }
    Ok(super::plan::align_map(&map, align))
}
