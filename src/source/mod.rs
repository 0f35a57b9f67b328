//! Disk sources besides NBD, for the engine's [`crate::engine::source::SourceConnection`]
//! seam.
//!
//! * [`http_range`]: one file of an HTTPS server read by byte ranges (the vSphere datastore
//!   file service).

pub mod http_range;

#[cfg(test)]
mod tests;
