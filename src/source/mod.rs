//! Disk sources besides NBD, for the engine's [`crate::engine::source::SourceConnection`]
//! seam.
//!
//! * [`http_range`]: one file of an HTTPS server read by byte ranges (the vSphere datastore
//!   file service): the options, the secret headers, the connector. Its connections are in
//!   `range_connection`, the URL, TLS and HTTP setup in `endpoint`.

mod endpoint;
pub mod http_range;
mod range_connection;

#[cfg(test)]
mod tests;
