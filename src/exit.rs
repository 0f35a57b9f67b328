//! Exit codes (documented in README.md).

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// Anything not covered below.
    Failure = 1,
    /// Bad command line or arguments (clap also exits with 2).
    Usage = 2,
    /// The source failed: connection, TLS, NBD protocol, a read error, XenAPI.
    Source = 3,
    /// A stream or image failed its integrity checks (damaged, truncated, wrong chain).
    Integrity = 4,
    /// Writing the output or the image failed (disk full, broken pipe, permissions).
    Output = 5,
    /// Another run holds the chain's lock (export, commit and gc of one state file).
    Locked = 6,
    /// Stopped by SIGINT or SIGTERM; nothing was committed.
    Interrupted = 130,
}

/// An error with the exit code it maps to.
pub struct Failure {
    pub code: Code,
    pub error: anyhow::Error,
}

impl fmt::Debug for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.error)
    }
}

pub trait WithCode<T> {
    fn code(self, code: Code) -> Result<T, Failure>;
}

impl<T, E: Into<anyhow::Error>> WithCode<T> for Result<T, E> {
    fn code(self, code: Code) -> Result<T, Failure> {
        self.map_err(|e| Failure {
            code,
            error: e.into(),
        })
    }
}

pub fn fail(code: Code, msg: impl fmt::Display) -> Failure {
    Failure {
        code,
        error: anyhow::anyhow!("{msg}"),
    }
}
