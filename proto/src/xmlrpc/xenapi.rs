//! The XenAPI envelope: `{Status: "Success", Value: v}` or
//! `{Status: "Failure", ErrorDescription: [code, args...]}`.
//!
//! Redaction: some failures carry the caller's session reference, a bearer credential
//! (`SESSION_INVALID [ref]`), and export names carry one too (`/<uuid>?session_id=<ref>`).
//! `Display` and `Debug` of [`XenApiError`] therefore hide the arguments of the codes in
//! [`SECRET_ARG_CODES`] and any argument that contains `session_id=`, so the error can go
//! through `anyhow`, `tracing` or an `unwrap` without leaking. Code that needs the exact text
//! reads the `args` field, or formats [`XenApiError::unredacted`] on purpose.

use super::decode::decode_response_with;
use super::{clean, CleanList, Limits, Value, XmlRpcError};
use std::fmt;

/// Failure codes whose arguments are a session reference.
pub const SECRET_ARG_CODES: &[&str] = &["SESSION_INVALID", "SESSION_NOT_REGISTERED"];

/// A XenAPI call that did not succeed.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
pub enum XenApiError {
    /// The host reported a failure: `ErrorDescription = [code, args...]`.
    #[error("XenAPI error {}{}", clean(.code, 80), ArgsDisplay { code, args, redact: true })]
    Failure { code: String, args: Vec<String> },
    /// The response is valid XML-RPC but not a XenAPI envelope.
    #[error("malformed XenAPI response: {0}")]
    Envelope(&'static str),
    /// The response is not valid XML-RPC, or is an XML-RPC fault.
    #[error(transparent)]
    Rpc(#[from] XmlRpcError),
}

impl XenApiError {
    /// Whether this is a host failure with this code, e.g. `e.is("SESSION_INVALID")`.
    pub fn is(&self, code: &str) -> bool {
        self.code() == Some(code)
    }

    /// The failure code, if the host reported a failure.
    pub fn code(&self) -> Option<&str> {
        match self {
            XenApiError::Failure { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The failure arguments (unredacted), if the host reported a failure.
    pub fn args(&self) -> Option<&[String]> {
        match self {
            XenApiError::Failure { args, .. } => Some(args),
            _ => None,
        }
    }

    /// Whether `Display` and `Debug` hide some arguments of this error.
    pub fn is_redacted(&self) -> bool {
        match self {
            XenApiError::Failure { code, args } => args.iter().any(|a| secret(code, a)),
            _ => false,
        }
    }

    /// The full text, secrets included: only for explicit, local debugging.
    pub fn unredacted(&self) -> impl fmt::Display + '_ {
        Unredacted(self)
    }
}

struct Unredacted<'a>(&'a XenApiError);

impl fmt::Display for Unredacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            XenApiError::Failure { code, args } => write!(
                f,
                "XenAPI error {}{}",
                clean(code, 80),
                ArgsDisplay {
                    code,
                    args,
                    redact: false
                }
            ),
            e => e.fmt(f),
        }
    }
}

impl fmt::Debug for XenApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            XenApiError::Failure { code, args } => {
                let shown: Vec<String> = args
                    .iter()
                    .map(|a| {
                        if secret(code, a) {
                            "<redacted>".to_owned()
                        } else {
                            a.clone()
                        }
                    })
                    .collect();
                f.debug_struct("Failure")
                    .field("code", code)
                    .field("args", &shown)
                    .finish()
            }
            XenApiError::Envelope(why) => f.debug_tuple("Envelope").field(why).finish(),
            XenApiError::Rpc(e) => f.debug_tuple("Rpc").field(e).finish(),
        }
    }
}

fn secret(code: &str, arg: &str) -> bool {
    SECRET_ARG_CODES.contains(&code) || arg.contains("session_id=")
}

struct ArgsDisplay<'a> {
    code: &'a str,
    args: &'a [String],
    redact: bool,
}

impl fmt::Display for ArgsDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.args.is_empty() {
            return Ok(());
        }
        f.write_str(" ")?;
        if self.redact && self.args.iter().any(|a| secret(self.code, a)) {
            let shown: Vec<String> = self
                .args
                .iter()
                .map(|a| {
                    if secret(self.code, a) {
                        "<redacted>".to_owned()
                    } else {
                        a.clone()
                    }
                })
                .collect();
            CleanList(&shown).fmt(f)
        } else {
            CleanList(self.args).fmt(f)
        }
    }
}

/// Decode a XenAPI response: the `Value` of a success, or the failure as an error.
pub fn decode_xenapi(bytes: &[u8]) -> Result<Value, XenApiError> {
    decode_xenapi_with(bytes, Limits::default())
}

pub fn decode_xenapi_with(bytes: &[u8], limits: Limits) -> Result<Value, XenApiError> {
    let Value::Struct(mut m) = decode_response_with(bytes, limits)? else {
        return Err(XenApiError::Envelope("the response is not a struct"));
    };
    match m.get("Status").and_then(Value::as_str) {
        Some("Success") => m
            .remove("Value")
            .ok_or(XenApiError::Envelope("a success without a Value")),
        Some("Failure") => {
            let Some(Value::Array(desc)) = m.remove("ErrorDescription") else {
                return Err(XenApiError::Envelope(
                    "a failure without an ErrorDescription array",
                ));
            };
            let mut parts = desc.into_iter().map(|v| match v {
                Value::String(s) => Ok(s),
                // All strings per the wire-protocol doc; accept an explicit int anyway.
                Value::Int(n) => Ok(n.to_string()),
                _ => Err(XenApiError::Envelope(
                    "an ErrorDescription element is not a string",
                )),
            });
            let code = parts
                .next()
                .ok_or(XenApiError::Envelope("an empty ErrorDescription"))??;
            let args = parts.collect::<Result<Vec<_>, _>>()?;
            Err(XenApiError::Failure { code, args })
        }
        Some(_) => Err(XenApiError::Envelope(
            "Status is neither Success nor Failure",
        )),
        None => Err(XenApiError::Envelope("Status is missing or not a string")),
    }
}
