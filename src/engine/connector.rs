//! How the engine opens connections after the first one (extra connections, reconnects).

use crate::nbd::{ConnError, ConnectOptions, Connection};
use std::future::Future;
use std::pin::Pin;

/// Opens one more connection to the same export. The XenServer flow implements it by asking
/// the host for fresh NBD details when the old ones stop working.
pub trait Connector: Send + Sync {
    /// Open and negotiate one more connection to the same export.
    fn connect(&self) -> Pin<Box<dyn Future<Output = Result<Connection, ConnError>> + Send + '_>>;
}

impl Connector for ConnectOptions {
    fn connect(&self) -> Pin<Box<dyn Future<Output = Result<Connection, ConnError>> + Send + '_>> {
        Box::pin(Connection::connect(self))
    }
}
