//! The async NBD client: connect (TCP or Unix, with STARTTLS), negotiate, and run many
//! requests in flight over one connection. The protocol logic is in `cbtstream_proto::nbd`;
//! this module only moves bytes.

pub mod connection;
pub mod uri;

pub use connection::{ConnectOptions, Connection};
pub use uri::{Address, NbdUri};

use cbtstream_proto::nbd::{NbdError, ServerError};
use std::sync::Arc;

/// Why a connection could not be used. Never contains the export name.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnError {
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: Arc<std::io::Error>,
    },
    #[error("connect to {0} timed out")]
    ConnectTimeout(String),
    #[error("NBD handshake with {0} timed out")]
    HandshakeTimeout(String),
    #[error("TLS handshake with {addr} failed: {why}")]
    Tls { addr: String, why: String },
    // Not `#[from]`: that would also make the inner error the source, and the CLI's error
    // chain would print its text twice.
    #[error("NBD protocol error: {0}")]
    Protocol(NbdError),
    #[error("connection I/O error: {0}")]
    Io(Arc<std::io::Error>),
    #[error("the server closed the connection")]
    Eof,
    #[error("the connection was shut down")]
    Closed,
}

impl From<NbdError> for ConnError {
    fn from(e: NbdError) -> Self {
        ConnError::Protocol(e)
    }
}

impl From<std::io::Error> for ConnError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ConnError::Eof
        } else {
            ConnError::Io(Arc::new(e))
        }
    }
}

/// Why one request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RequestError {
    /// The server answered with an error; the connection is still good.
    #[error("{0}")]
    Server(ServerError),
    /// The connection broke; the request may be retried on a new one.
    #[error("{0}")]
    Connection(ConnError),
}
