//! How the engine opens connections after the first one (extra connections, reconnects).

use super::source::{SourceConnection, SourceError};
use crate::nbd::{ConnectOptions, Connection};
use std::future::Future;
use std::pin::Pin;

/// What [`Connector::connect`] returns.
pub type Connecting<'a> =
    Pin<Box<dyn Future<Output = Result<Box<dyn SourceConnection>, SourceError>> + Send + 'a>>;

/// Opens one more connection to the same disk. The XenServer flow implements it by asking
/// the host for fresh NBD details when the old ones stop working; the HTTPS range source
/// renews its request headers when the server refused them.
pub trait Connector: Send + Sync {
    /// Open (and negotiate) one more connection to the same disk.
    fn connect(&self) -> Connecting<'_>;

    /// What the connections reach, for messages ("the NBD server").
    fn server(&self) -> &'static str;
}

impl Connector for ConnectOptions {
    fn connect(&self) -> Connecting<'_> {
        Box::pin(async move {
            let conn = Connection::connect(self).await?;
            Ok(Box::new(conn) as Box<dyn SourceConnection>)
        })
    }

    fn server(&self) -> &'static str {
        "the NBD server"
    }
}
