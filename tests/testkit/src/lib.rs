//! Test fixtures for cbtstream integration tests:
//!
//! * [`certs`]: a test PKI (CA + server/client leaves) and a XenServer-style self-signed
//!   RSA certificate, written as PEM files, plus rustls config helpers.
//! * [`servers`]: qemu-nbd / nbdkit child processes on 127.0.0.1, with or without TLS.
//! * [`images`]: deterministic raw images, in-place mutations and CBT bitmaps.
//! * [`s3`]: an S3 server (s3s-fs) as a child process on 127.0.0.1, over a directory.
//! * [`tls_accept`]: the simulators' HTTPS accept loop and query-string decoding.

pub mod certs;
pub mod hostile;
pub mod images;
pub mod s3;
pub mod servers;
pub mod tls_accept;
pub mod xen_nbd;

pub use certs::{
    rustls_client_config, rustls_server_config, rustls_server_config_from_pem,
    xapi_style_self_signed, SelfSignedCert, TestPki,
};
pub use images::{
    changed_bitmap_base64, make_image, mutate_blocks, random_bitmap, CbtBitmap, Pattern, Prng,
    BLOCK,
};
pub use s3::S3Server;
pub use servers::{
    have, missing_prerequisite, require_tools, NbdKitOpts, NbdServer, QemuOpts, ServerKind,
};
