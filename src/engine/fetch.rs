//! Fetch: N connections, each with up to M requests in flight, fed from one job queue.
//!
//! Each connection (any [`SourceConnection`]) is driven by one worker task. A worker keeps
//! its own outstanding requests; when its connection breaks or stalls it reconnects (bounded
//! attempts, with backoff) and sends them again. A server error on a read is retried a bounded number of
//! times, each after a growing delay, then the export fails naming the offset and the
//! server's error. Block-status jobs (the planner's questions) go over the same connections.

use super::connector::Connector;
use super::pool::Pools;
use super::source::{
    Completion, EngineSideError, Reply, RequestError, SourceConnection, SourceError,
};
use super::{Batch, Fetched};
use bytes::BytesMut;
use cbtstream_proto::nbd::BlockStatusExtent;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct FetchConfig {
    pub inflight: usize,
    pub request_timeout: Duration,
    /// How many times one read may be retried (server errors and lost connections).
    pub retries: u32,
    /// How many times in a row a connection may fail to reopen.
    pub reconnects: u32,
    /// The first wait before a retry or a reconnect; it doubles each time, up to 5 s.
    pub retry_delay: Duration,
}

impl FetchConfig {
    /// The wait before attempt `attempt + 1` (`attempt` counts from 1).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(16);
        (self.retry_delay * (1 << doublings)).min(Duration::from_secs(5))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("read of {len} bytes at offset {offset} failed after {attempts} attempt(s): {error}")]
    Read {
        offset: u64,
        len: u64,
        attempts: u32,
        error: SourceError,
    },
    #[error("read of {len} bytes at offset {offset} failed after {attempts} attempt(s); last connection error: {error}")]
    Lost {
        offset: u64,
        len: u64,
        attempts: u32,
        error: SourceError,
    },
    #[error("could not reconnect to {server}: {error}")]
    Reconnect {
        server: &'static str,
        error: SourceError,
    },
    #[error("the server's block status for {len} bytes at offset {offset} covers no bytes")]
    EmptyBlockStatus { offset: u64, len: u64 },
    #[error("the output stage stopped")]
    OutputClosed,
    #[error("encoding a record: {0}")]
    Encode(std::io::Error),
}

/// A request to make.
pub struct Job {
    /// The plan item's id (reads); block-status jobs use 0.
    pub id: u64,
    pub offset: u64,
    pub len: u64,
    pub attempts: u32,
    pub work: Work,
}

pub enum Work {
    /// Read the range; the permit is the budget it holds until written.
    Read(Option<OwnedSemaphorePermit>),
    /// Ask `base:allocation` about the range and send the answer back.
    Status(mpsc::UnboundedSender<StatusAnswer>),
}

/// The answer to a block-status job. An error (the server's, or a connection without block
/// status) means "not known": the planner reads the range.
pub struct StatusAnswer {
    pub offset: u64,
    pub extents: Result<Vec<BlockStatusExtent>, String>,
}

/// The shared job queue. A multi-consumer channel: a worker waiting for a job holds no lock,
/// so an idle worker never keeps the others from filling their pipelines.
pub type JobQueue = async_channel::Receiver<Job>;

/// One request on the wire.
enum InFlight {
    Whole(Job),
    /// Part of a read longer than the connection's maximum: `at` bytes into job `id`.
    Part {
        id: u64,
        at: usize,
    },
}

/// A read split into parts, being put together.
struct Assembly {
    job: Job,
    buf: BytesMut,
    parts_left: usize,
}

/// The requests of one connection.
struct Wire {
    tx: mpsc::UnboundedSender<Completion>,
    inflight: HashMap<u64, InFlight>,
    assembling: HashMap<u64, Assembly>,
    next_tag: u64,
    /// The longest read this connection's server accepts, rounded down to its alignment.
    max_read: u64,
    /// Requests in flight at most: the configured pipeline, or less if the connection
    /// holds fewer (HTTP/1.1 answers one request at a time).
    max_inflight: usize,
}

impl Wire {
    fn new(
        conn: &dyn SourceConnection,
        cfg: &FetchConfig,
        tx: mpsc::UnboundedSender<Completion>,
    ) -> Wire {
        let align = conn.alignment().max(1);
        Wire {
            tx,
            inflight: HashMap::new(),
            assembling: HashMap::new(),
            next_tag: 0,
            max_read: (conn.max_request() / align * align).max(align),
            max_inflight: cfg.inflight.min(conn.max_inflight()).max(1),
        }
    }

    fn tag(&mut self) -> u64 {
        self.next_tag += 1;
        self.next_tag
    }

    /// Send one job; a read longer than the server allows goes as several requests.
    fn submit(&mut self, conn: &dyn SourceConnection, pools: &Pools, job: Job) {
        match &job.work {
            Work::Status(answer) => {
                if !conn.has_block_status() {
                    let _ = answer.send(StatusAnswer {
                        offset: job.offset,
                        extents: Err("no block status on this connection".into()),
                    });
                    return;
                }
                let tag = self.tag();
                conn.block_status(tag, job.offset, job.len, self.tx.clone());
                self.inflight.insert(tag, InFlight::Whole(job));
            }
            Work::Read(_) if job.len <= self.max_read => {
                let tag = self.tag();
                let buf = pools.read.get(job.len as usize);
                conn.read(tag, job.offset, job.len, buf, self.tx.clone());
                self.inflight.insert(tag, InFlight::Whole(job));
            }
            Work::Read(_) => {
                let mut buf = pools.read.get(job.len as usize);
                buf.resize(job.len as usize, 0);
                let mut at = 0u64;
                let mut parts_left = 0;
                while at < job.len {
                    let n = self.max_read.min(job.len - at);
                    let tag = self.tag();
                    let part = pools.read.get(n as usize);
                    conn.read(tag, job.offset + at, n, part, self.tx.clone());
                    let (id, at_usize) = (job.id, at as usize);
                    self.inflight
                        .insert(tag, InFlight::Part { id, at: at_usize });
                    at += n;
                    parts_left += 1;
                }
                let id = job.id;
                self.assembling.insert(
                    id,
                    Assembly {
                        job,
                        buf,
                        parts_left,
                    },
                );
            }
        }
    }

    /// Every job this connection still holds (when it broke), parts put back together.
    fn take_jobs(&mut self) -> Vec<Job> {
        let mut jobs: Vec<Job> = Vec::new();
        for (_, f) in self.inflight.drain() {
            if let InFlight::Whole(job) = f {
                jobs.push(job);
            }
        }
        jobs.extend(self.assembling.drain().map(|(_, a)| a.job));
        jobs
    }
}

/// What became of one reply.
enum Outcome {
    Nothing,
    Fetched(Fetched),
    Failed(Job, SourceError),
    Broken(Job, SourceError),
}

fn complete(wire: &mut Wire, pools: &Pools, c: Completion) -> Outcome {
    let Some(f) = wire.inflight.remove(&c.tag) else {
        return Outcome::Nothing;
    };
    match f {
        InFlight::Whole(job) => match (c.result, job.work) {
            (Ok(Reply::Read(data)), Work::Read(permit)) => Outcome::Fetched(Fetched {
                id: job.id,
                offset: job.offset,
                len: job.len,
                data,
                permit,
            }),
            (result, Work::Status(answer)) => {
                let extents = match result {
                    Ok(Reply::BlockStatus(e)) => e,
                    Err(RequestError::Connection(e)) => {
                        let job = Job {
                            work: Work::Status(answer),
                            ..job
                        };
                        return Outcome::Broken(job, e);
                    }
                    Err(RequestError::Server(e)) => {
                        let _ = answer.send(StatusAnswer {
                            offset: job.offset,
                            extents: Err(e.to_string()),
                        });
                        return Outcome::Nothing;
                    }
                    Ok(Reply::Read(_)) => Vec::new(),
                };
                let _ = answer.send(StatusAnswer {
                    offset: job.offset,
                    extents: Ok(extents),
                });
                Outcome::Nothing
            }
            (Err(RequestError::Server(e)), work) => Outcome::Failed(Job { work, ..job }, e),
            (Err(RequestError::Connection(e)), work) => Outcome::Broken(Job { work, ..job }, e),
            (Ok(Reply::BlockStatus(_)), work) => {
                // Cannot happen (a connection matches replies to requests); read it again.
                let e = SourceError::new(EngineSideError::WrongReply);
                Outcome::Broken(Job { work, ..job }, e)
            }
        },
        InFlight::Part { id, at } => {
            let result = c.result;
            let Some(a) = wire.assembling.get_mut(&id) else {
                // The read already failed; this part is not needed.
                if let Ok(Reply::Read(data)) = result {
                    pools.read.put(data);
                }
                return Outcome::Nothing;
            };
            match result {
                Ok(Reply::Read(data)) => {
                    if let Some(dst) = a.buf.get_mut(at..at + data.len()) {
                        dst.copy_from_slice(&data);
                    }
                    pools.read.put(data);
                    a.parts_left -= 1;
                    if a.parts_left > 0 {
                        return Outcome::Nothing;
                    }
                    let Some(Assembly { job, buf, .. }) = wire.assembling.remove(&id) else {
                        return Outcome::Nothing;
                    };
                    let Work::Read(permit) = job.work else {
                        return Outcome::Nothing;
                    };
                    Outcome::Fetched(Fetched {
                        id: job.id,
                        offset: job.offset,
                        len: job.len,
                        data: buf,
                        permit,
                    })
                }
                Err(e) => {
                    let Some(a) = wire.assembling.remove(&id) else {
                        return Outcome::Nothing;
                    };
                    pools.read.put(a.buf);
                    match e {
                        RequestError::Server(e) => Outcome::Failed(a.job, e),
                        RequestError::Connection(e) => Outcome::Broken(a.job, e),
                    }
                }
                Ok(Reply::BlockStatus(_)) => Outcome::Nothing,
            }
        }
    }
}

/// Jobs waiting to be sent: retries first, then (once due) reads waiting out a backoff.
#[derive(Default)]
struct Backlog {
    ready: VecDeque<Job>,
    delayed: Vec<(Instant, Job)>,
}

impl Backlog {
    fn promote_due(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.delayed.len() {
            if self.delayed[i].0 <= now {
                let (_, job) = self.delayed.swap_remove(i);
                self.ready.push_back(job);
            } else {
                i += 1;
            }
        }
    }

    fn next_due(&self) -> Option<Instant> {
        self.delayed.iter().map(|(t, _)| *t).min()
    }
}

/// Sleep until `t`, or forever when there is nothing to wait for.
async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Drive one connection until the job queue is drained. Returns the bytes read.
pub async fn worker(
    mut conn: Box<dyn SourceConnection>,
    connector: Arc<dyn Connector>,
    jobs: JobQueue,
    mut out: Batch,
    pools: Arc<Pools>,
    cfg: FetchConfig,
) -> Result<u64, FetchError> {
    let mut backlog = Backlog::default();
    let mut input_done = false;
    let mut bytes_read = 0u64;
    loop {
        let (tx, mut rx) = mpsc::unbounded_channel::<Completion>();
        let mut wire = Wire::new(conn.as_ref(), &cfg, tx);
        let mut last_progress = Instant::now();
        let broken: SourceError = loop {
            // Keep the pipe full.
            backlog.promote_due();
            while wire.inflight.len() < wire.max_inflight {
                let job = if let Some(j) = backlog.ready.pop_front() {
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
                if wire.inflight.is_empty() {
                    last_progress = Instant::now();
                }
                wire.submit(conn.as_ref(), &pools, job);
            }
            let due = backlog.next_due();
            if wire.inflight.is_empty() {
                out.flush()?;
                if input_done && due.is_none() && backlog.ready.is_empty() {
                    conn.close().await;
                    return Ok(bytes_read);
                }
                tokio::select! {
                    j = jobs.recv(), if !input_done => match j {
                        Ok(j) => backlog.ready.push_back(j),
                        Err(_) => input_done = true,
                    },
                    _ = sleep_until(due) => {}
                }
                continue;
            }
            let room = wire.inflight.len() < wire.max_inflight && !input_done;
            tokio::select! {
                biased;
                c = rx.recv() => {
                    let Some(c) = c else { break SourceError::new(EngineSideError::Closed) };
                    last_progress = Instant::now();
                    match complete(&mut wire, &pools, c) {
                        Outcome::Nothing => {}
                        Outcome::Fetched(f) => {
                            bytes_read += f.len;
                            // Fails when the later stages are gone (the output failed): stop reading.
                            out.push(f)?;
                        }
                        Outcome::Failed(mut job, error) => {
                            job.attempts += 1;
                            if job.attempts > cfg.retries {
                                return Err(FetchError::Read { offset: job.offset, len: job.len, attempts: job.attempts, error });
                            }
                            let wait = cfg.backoff(job.attempts);
                            tracing::warn!(offset = job.offset, len = job.len, attempt = job.attempts, "read failed ({error}); retrying in {wait:?}");
                            backlog.delayed.push((Instant::now() + wait, job));
                        }
                        Outcome::Broken(job, e) => {
                            wire.inflight.insert(u64::MAX, InFlight::Whole(job));
                            break e;
                        }
                    }
                }
                _ = tokio::time::sleep_until(last_progress + cfg.request_timeout) => {
                    break SourceError::new(EngineSideError::Stalled(cfg.request_timeout));
                }
                _ = sleep_until(due) => {}
                j = jobs.recv(), if room => {
                    match j { Ok(j) => backlog.ready.push_back(j), Err(_) => input_done = true }
                }
            }
        };
        // The connection is gone: pass on what was read, requeue what it held, then reconnect.
        drop(conn);
        out.flush()?;
        for mut job in wire.take_jobs() {
            job.attempts += 1;
            if job.attempts > cfg.retries {
                return Err(FetchError::Lost {
                    offset: job.offset,
                    len: job.len,
                    attempts: job.attempts,
                    error: broken,
                });
            }
            backlog.ready.push_back(job);
        }
        backlog.ready.make_contiguous().sort_by_key(|j| j.id);
        tracing::warn!(
            "connection to {} lost ({broken}); reconnecting",
            connector.server()
        );
        conn = reconnect(connector.as_ref(), &cfg).await?;
    }
}

async fn reconnect(
    connector: &dyn Connector,
    cfg: &FetchConfig,
) -> Result<Box<dyn SourceConnection>, FetchError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match connector.connect().await {
            Ok(c) => return Ok(c),
            Err(error) if attempt >= cfg.reconnects.max(1) => {
                let server = connector.server();
                return Err(FetchError::Reconnect { server, error });
            }
            Err(e) => {
                let delay = cfg.backoff(attempt);
                tracing::warn!(attempt, "reconnect failed: {e}; retrying in {delay:?}");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Open one more connection, or `None` to stop opening more: the server's connection limit
/// is reached (XenServer: 16 per host, seen as a connection closed before the greeting), or
/// another failure, which is logged; either way the export carries on with the connections
/// it has.
pub async fn open_one(connector: &dyn Connector, have: usize) -> Option<Box<dyn SourceConnection>> {
    match connector.connect().await {
        Ok(c) => Some(c),
        Err(e) if e.is_connection_limit() => {
            tracing::info!(
                have,
                "server connection limit reached; continuing with the connections open"
            );
            None
        }
        Err(e) => {
            tracing::warn!(
                have,
                "extra connection to {} failed ({e}); continuing with the connections open",
                connector.server()
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_five_seconds() {
        let cfg = FetchConfig {
            inflight: 1,
            request_timeout: Duration::from_secs(1),
            retries: 3,
            reconnects: 3,
            retry_delay: Duration::from_millis(200),
        };
        let ms = |a| cfg.backoff(a).as_millis();
        assert_eq!((ms(1), ms(2), ms(3)), (200, 400, 800));
        assert_eq!(ms(6), 5000);
        assert_eq!(ms(u32::MAX), 5000);
    }
}
