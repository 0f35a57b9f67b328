//! Sans-I/O codecs for cbtstream.
//!
//! Everything that parses bytes coming from the network or from a file lives here: the NBD
//! wire protocol, the CBT bitmap of `VDI.list_changed_blocks`, the export stream format, and
//! the allocation table at the start of a VHD export, and the `Content-Range` of HTTP range
//! reads.
//! No sockets, no async runtime: callers feed bytes in and get typed values (or typed errors)
//! out, which keeps every parser easy to test and to fuzz.
#![forbid(unsafe_code)]

pub mod aws_config;
pub mod cbt;
pub mod http_range;
pub mod nbd;
pub mod reader;
pub mod stream;
pub mod vhd;
pub mod xmlrpc;
