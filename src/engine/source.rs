//! The seam between the engine and what it reads: a [`SourceConnection`] (an NBD connection,
//! or an HTTPS connection reading a file by byte ranges) and a [`super::Connector`] that
//! opens more of them.
//!
//! The engine only sees what a source says about the disk (its size, how reads must be cut,
//! whether it can report where the data is) and reads tagged with a number, whose outcomes
//! come back as [`Completion`]s on a channel. A source never blocks the caller: `read` queues
//! the request and returns.

use bytes::BytesMut;
use cbtstream_proto::nbd::BlockStatusExtent;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// One open connection to a disk source. The engine drives each from one task.
pub trait SourceConnection: Send {
    /// The disk's size in bytes.
    fn size(&self) -> u64;
    /// The longest read one request may ask for.
    fn max_request(&self) -> u64;
    /// Reads and block-status questions start on multiples of this.
    fn alignment(&self) -> u64;
    /// Whether [`SourceConnection::block_status`] can tell data from holes.
    fn has_block_status(&self) -> bool;
    /// Whether reads on several connections at once see the same disk (NBD: multi-conn or
    /// read-only).
    fn multi_conn_safe(&self) -> bool;
    /// Requests this connection usefully holds at once; the engine keeps the rest.
    fn max_inflight(&self) -> usize;
    /// The path's round-trip time, when measured: it sizes the reads in flight.
    fn rtt(&self) -> Option<Duration>;
    /// Queue a read of `len` bytes at `offset` into `buf` (a pooled buffer of any length; on
    /// success it comes back holding exactly `len` bytes). The outcome comes back on
    /// `reply_to` with `tag`.
    fn read(
        &self,
        tag: u64,
        offset: u64,
        len: u64,
        buf: BytesMut,
        reply_to: mpsc::UnboundedSender<Completion>,
    );
    /// Queue a question about which parts of the range hold data. Only asked when
    /// [`SourceConnection::has_block_status`] says so.
    fn block_status(
        &self,
        tag: u64,
        offset: u64,
        len: u64,
        reply_to: mpsc::UnboundedSender<Completion>,
    );
    /// Close cleanly (say goodbye where the protocol has one), waiting briefly.
    fn close(self: Box<Self>) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// A finished request.
#[derive(Debug)]
pub enum Reply {
    Read(BytesMut),
    BlockStatus(Vec<BlockStatusExtent>),
}

/// What a connection sends back to the submitter: its tag and the outcome.
pub struct Completion {
    pub tag: u64,
    pub result: Result<Reply, RequestError>,
}

/// Why one request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RequestError {
    /// The server refused this request; the connection is still good. Retried after a delay.
    #[error("{0}")]
    Server(SourceError),
    /// The connection broke (or can no longer be trusted); the request may be retried on a
    /// new one.
    #[error("{0}")]
    Connection(SourceError),
}

/// A source's own error (its text says what happened), for the engine to pass on, retry on,
/// and report. Never holds a secret. Cheap to clone: one failed connection fails all its
/// requests with the same error.
#[derive(Debug, Clone)]
pub struct SourceError {
    error: Arc<dyn std::error::Error + Send + Sync>,
    connection_limit: bool,
}

impl SourceError {
    pub fn new(error: impl std::error::Error + Send + Sync + 'static) -> SourceError {
        SourceError {
            error: Arc::new(error),
            connection_limit: false,
        }
    }

    /// The server turned a new connection away because it has as many as it allows: the
    /// engine carries on with the connections it has.
    pub fn connection_limit(error: impl std::error::Error + Send + Sync + 'static) -> SourceError {
        SourceError {
            connection_limit: true,
            ..SourceError::new(error)
        }
    }

    pub fn is_connection_limit(&self) -> bool {
        self.connection_limit
    }

    /// The source's error, when it is of type `E`.
    pub fn downcast_ref<E: std::error::Error + 'static>(&self) -> Option<&E> {
        self.error.downcast_ref()
    }
}

impl std::fmt::Display for SourceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

// No `source()`: the text already holds the inner error's, and the CLI's error chain would
// print it twice.
impl std::error::Error for SourceError {}

/// Errors the engine itself finds on a connection.
#[derive(Debug, thiserror::Error)]
pub enum EngineSideError {
    #[error("no reply from the server for {0:?}")]
    Stalled(Duration),
    #[error("the connection was shut down")]
    Closed,
    #[error("the server answered a read with a block status")]
    WrongReply,
}
