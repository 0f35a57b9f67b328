//! The VI/JSON pieces the client and the calls share: faults, errors, managed object
//! references, the vCenter endpoint.

use crate::tls;
use serde_json::Value;
use std::fmt;
use std::time::Duration;

/// A vSphere fault: the `_typeName` of the fault object and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VimFault {
    /// `InvalidArgument`, `FileFault`, `InvalidState`, `TaskInProgress`, `NotAuthenticated`, ...
    pub type_name: String,
    pub message: String,
    /// `InvalidArgument.invalidProperty`.
    pub invalid_property: Option<String>,
    /// `FileFault.file`.
    pub file: Option<String>,
}

impl fmt::Display for VimFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.type_name)?;
        if let Some(p) = &self.invalid_property {
            write!(f, " ({p})")?;
        }
        if let Some(file) = &self.file {
            write!(f, " ({file})")?;
        }
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

impl VimFault {
    /// A fault object as VI/JSON sends it (MethodFault: `faultMessage[].message`, or a
    /// LocalizedMethodFault's `localizedMessage`); None without a `_typeName`.
    pub fn parse(v: &Value) -> Option<VimFault> {
        let type_name = clean(v.get("_typeName")?.as_str()?, 100);
        let message = v
            .get("faultMessage")
            .and_then(|m| m.as_array())
            .and_then(|m| m.iter().find_map(|m| m.get("message")?.as_str()))
            .or_else(|| v.get("localizedMessage").and_then(|m| m.as_str()))
            .unwrap_or("");
        let field = |name: &str| v.get(name).and_then(|p| p.as_str()).map(|s| clean(s, 300));
        Some(VimFault {
            type_name,
            message: clean(message, 500),
            invalid_property: field("invalidProperty"),
            file: field("file"),
        })
    }

    /// A `LocalizedMethodFault` (TaskInfo.error): its `fault`, with the localized message
    /// when the fault has none.
    pub fn parse_localized(v: &Value) -> Option<VimFault> {
        let mut fault = VimFault::parse(v.get("fault")?)?;
        if fault.message.is_empty() {
            if let Some(m) = v.get("localizedMessage").and_then(|m| m.as_str()) {
                fault.message = clean(m, 500);
            }
        }
        Some(fault)
    }
}

/// Server text for a message: control characters out, at most `max` characters.
pub fn clean(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .filter(|c| !c.is_control())
        .take(max + 1)
        .collect();
    if out.chars().count() > max {
        out = out.chars().take(max).collect::<String>() + "...";
    }
    out
}

/// Why a vSphere call failed. Never shows the password or the session token.
#[derive(Debug, thiserror::Error)]
pub enum VsphereError {
    #[error("invalid vSphere URL {url:?}: {why}")]
    Url { url: String, why: String },
    #[error("vSphere TLS setup: {0}")]
    TlsConfig(#[from] tls::TlsError),
    #[error("cannot connect to vSphere at {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS handshake with vSphere at {addr} failed: {reason}")]
    Tls { addr: String, reason: String },
    #[error("vSphere at {addr}: {what} timed out after {after:?}")]
    Timeout {
        addr: String,
        what: String,
        after: Duration,
    },
    #[error("vSphere HTTP exchange with {addr} failed: {source}")]
    Transport { addr: String, source: hyper::Error },
    #[error("vSphere at {addr} answered {what} with HTTP {status}")]
    Http {
        addr: String,
        what: String,
        status: u16,
    },
    #[error("{what}: the answer is larger than the {limit}-byte limit")]
    TooLarge { what: String, limit: usize },
    /// The server reported a fault (HTTP 500, or a task that ended in error).
    #[error("{what}: vSphere fault {fault}")]
    Fault { what: String, fault: VimFault },
    /// The answer is not what the call returns. Never quotes the body.
    #[error("{what}: unexpected answer: {why}")]
    Protocol { what: String, why: String },
}

impl VsphereError {
    /// The fault's `_typeName`, when the server reported one.
    pub fn fault(&self) -> Option<&VimFault> {
        match self {
            VsphereError::Fault { fault, .. } => Some(fault),
            _ => None,
        }
    }

    pub fn is_fault(&self, type_name: &str) -> bool {
        self.fault().is_some_and(|f| f.type_name == type_name)
    }

    pub(crate) fn protocol(what: &str, why: impl Into<String>) -> VsphereError {
        VsphereError::Protocol {
            what: what.to_owned(),
            why: why.into(),
        }
    }
}

/// A managed object reference: `{"type": "VirtualMachine", "value": "vm-42"}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MoRef {
    pub kind: String,
    pub value: String,
}

impl MoRef {
    pub fn new(kind: &str, value: &str) -> MoRef {
        MoRef {
            kind: kind.to_owned(),
            value: value.to_owned(),
        }
    }

    /// A reference as VI/JSON writes it, plain or wrapped in `_value` (as an `Any` such as
    /// `TaskInfo.result` is); the type and value must be path-safe.
    pub fn parse(v: &Value) -> Option<MoRef> {
        let inner = v.get("_value").unwrap_or(v);
        let kind = inner.get("type")?.as_str()?;
        let value = inner.get("value")?.as_str()?;
        (path_safe(kind) && path_safe(value)).then(|| MoRef::new(kind, value))
    }

    pub fn json(&self) -> Value {
        serde_json::json!({"_typeName": "ManagedObjectReference", "type": self.kind, "value": self.value})
    }
}

impl fmt::Display for MoRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.value)
    }
}

/// A type, moId, method or property name that can go into a URL path as it is.
pub fn path_safe(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// Where vCenter listens.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl Endpoint {
    /// `https://host[:port][/]`, or a bare `host[:port]`. Credentials, a path or a query are
    /// refused (they would end up in logs, or mean another service).
    pub fn parse(url: &str) -> Result<Endpoint, VsphereError> {
        let url = url.trim();
        let bad = |why: &str| VsphereError::Url {
            url: if url.contains('@') {
                "(with credentials)".into()
            } else {
                url.to_owned()
            },
            why: why.into(),
        };
        let full = if url.contains("://") {
            url.to_owned()
        } else {
            format!("https://{url}")
        };
        let uri: hyper::Uri = full.parse().map_err(|_| bad("not a URL"))?;
        if !uri
            .scheme_str()
            .is_some_and(|s| s.eq_ignore_ascii_case("https"))
        {
            return Err(bad("the scheme must be https://"));
        }
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("credentials in the URL are not supported"));
        }
        if uri.query().is_some() || !matches!(uri.path(), "" | "/" | "/sdk" | "/sdk/") {
            return Err(bad("give the server only (https://host[:port]/)"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("no host"));
        }
        Ok(Endpoint {
            host: host.to_owned(),
            port: authority.port_u16().unwrap_or(443),
        })
    }

    /// `host[:port]` for the Host header (IPv6 in brackets, 443 left out).
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == 443 {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    pub fn label(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// `8.0.2.0`: digits and dots.
pub fn is_release(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 20
        && s.split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}
