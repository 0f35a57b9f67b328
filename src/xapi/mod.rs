//! XenAPI client: XML-RPC over HTTPS (hyper on tokio-rustls), session handling, typed calls.
//!
//! * [`transport`]: one endpoint, `POST /` with `text/xml`, a kept-alive connection reused
//!   between calls, connect and request timeouts, a cap on the response size, and TLS trust
//!   from [`crate::tls`] (the same `rustls::ClientConfig` machinery as NBD). `http://` only
//!   when the caller explicitly allowed plaintext.
//! * [`session`]: [`XapiSession::login`] follows `HOST_IS_SLAVE` to the pool master once;
//!   [`XapiSession::call`] prepends the session reference and logs in again once on
//!   `SESSION_INVALID`; [`XapiSession::logout`] must be called on every exit path (dropping a
//!   session only attempts a background logout).
//! * [`calls`]: the VDI, VBD, VM, SR and task calls the flows need, parsed into small structs.
//! * [`import`]: `PUT /import_raw_vdi` in vhd-tool's chunked framing, for `restore --xapi`.
//!
//! Secrets: the password, the session reference and NBD export names (which embed the
//! session reference) are held in [`Secret`], whose `Debug`/`Display` print `***`. Request
//! bodies are never logged, and errors never quote them; failure arguments go through
//! [`XenApiError`]'s redaction.
//!
//! Wire conventions: docs/XENSERVER.md section 5.

pub mod calls;
pub mod import;
pub mod metadata;
pub mod session;
pub mod transport;
pub mod vm_calls;

pub use calls::NbdInfo;
pub use session::XapiSession;

use crate::tls::TlsError;
use cbtstream_proto::xmlrpc::{XenApiError, XmlRpcError};
use std::fmt;
use std::future::Future;
use std::time::Duration;

/// A credential or bearer token: the password, a session reference, an NBD export name.
/// `Debug` and `Display` print `***`; [`Secret::expose`] is the one way to read it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// The secret text, for putting it on the wire. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// A password from `file`, or else from the environment variable `env_var`; never from argv.
/// `what` names the system in the error (`XenAPI`, `vSphere`).
pub fn read_password(
    file: Option<&std::path::Path>,
    env_var: &str,
    what: &str,
) -> Result<Secret, crate::exit::Failure> {
    use crate::exit::{fail, Code};
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            fail(
                Code::Usage,
                format!("reading the password file {}: {e}", path.display()),
            )
        })?;
        return Ok(Secret::new(text.trim_end_matches(['\n', '\r']).to_string()));
    }
    std::env::var(env_var).map(Secret::new).map_err(|_| {
        fail(
            Code::Usage,
            format!("no {what} password: set ${env_var} or give --password-file FILE"),
        )
    })
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret(s)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// An object reference, `OpaqueRef:<uuid>` (not a secret, unlike a session reference).
/// References are opaque: compare them only with what the same host returned.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ref(String);

impl Ref {
    pub const NULL: &'static str = "OpaqueRef:NULL";

    /// A reference as XAPI spells it; `None` unless it starts with `OpaqueRef:`.
    pub fn parse(s: impl Into<String>) -> Option<Ref> {
        let s = s.into();
        s.starts_with("OpaqueRef:").then_some(Ref(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_null(&self) -> bool {
        self.0 == Self::NULL
    }
}

impl fmt::Display for Ref {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Ref {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a XenAPI call failed. `Display` and `Debug` never show the password, the session
/// reference or an export name.
#[derive(Debug, thiserror::Error)]
pub enum XapiError {
    #[error("invalid XenAPI URL: {0}")]
    Url(String),
    #[error(
        "refusing plaintext http:// to XenAPI at {0}: the password and session would travel \
         unencrypted (allow it explicitly with --xapi-allow-plaintext)"
    )]
    PlaintextRefused(String),
    #[error("XenAPI TLS setup: {0}")]
    TlsConfig(#[from] TlsError),
    #[error("cannot connect to XenAPI at {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS handshake with XenAPI at {addr} failed: {reason}")]
    Tls { addr: String, reason: String },
    #[error("XenAPI at {addr}: {what} timed out after {after:?}")]
    Timeout {
        addr: String,
        /// The method, or `connecting`.
        what: String,
        after: Duration,
    },
    #[error("XenAPI HTTP exchange with {addr} failed: {source}")]
    Transport { addr: String, source: hyper::Error },
    #[error("XenAPI at {addr} answered {method} with HTTP {status}")]
    Http {
        addr: String,
        method: String,
        status: u16,
    },
    /// Writing to or reading from an HTTP handler's connection (`/import_raw_vdi`) failed.
    #[error("{what} at {addr} failed: {source}")]
    Io {
        addr: String,
        what: String,
        source: std::io::Error,
    },
    #[error("{method}: the response is larger than the {limit}-byte limit")]
    TooLarge { method: String, limit: u64 },
    #[error("{method}: undecodable response: {source}")]
    Decode { method: String, source: XmlRpcError },
    /// The host reported a failure. `failure` is always [`XenApiError::Failure`], whose
    /// `Display`/`Debug` redact session references.
    #[error("{method}: {failure}")]
    Failure {
        method: String,
        failure: XenApiError,
    },
    /// The response decoded but is not what the call returns (a field missing or of the
    /// wrong type). Never quotes the value.
    #[error("{method}: unexpected response: {what}")]
    Protocol { method: String, what: String },
}

impl XapiError {
    /// Whether the host reported a failure with this code, e.g. `e.is("VDI_IN_USE")`.
    pub fn is(&self, code: &str) -> bool {
        self.code() == Some(code)
    }

    /// The XenAPI failure code, if the host reported a failure.
    pub fn code(&self) -> Option<&str> {
        match self {
            XapiError::Failure { failure, .. } => failure.code(),
            _ => None,
        }
    }

    /// The failure arguments, unredacted (the master's address of `HOST_IS_SLAVE`, say).
    pub fn args(&self) -> Option<&[String]> {
        match self {
            XapiError::Failure { failure, .. } => failure.args(),
            _ => None,
        }
    }

    pub(crate) fn protocol(method: &str, what: impl Into<String>) -> XapiError {
        XapiError::Protocol {
            method: method.to_owned(),
            what: what.into(),
        }
    }
}

/// Exponential backoff between attempts: `first`, doubling, at most `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

/// Run `op` up to `attempts` times (at least once), sleeping with `backoff` between tries,
/// while it fails with one of the XenAPI failure `codes`. Any other outcome is returned at
/// once; after the last attempt its error is returned.
pub async fn retry_on<T, F, Fut>(
    codes: &[&str],
    attempts: u32,
    backoff: Backoff,
    mut op: F,
) -> Result<T, XapiError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, XapiError>>,
{
    let mut delay = backoff.first;
    let mut attempt = 1;
    loop {
        match op().await {
            Err(e) if attempt < attempts && codes.iter().any(|c| e.is(c)) => {
                tracing::info!(
                    "{e}; retrying in {delay:?} (attempt {attempt} of {attempts})",
                    attempt = attempt + 1
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(backoff.max);
                attempt += 1;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests;
