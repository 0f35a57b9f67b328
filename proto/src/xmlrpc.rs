//! XML-RPC as XenAPI speaks it, and the XenAPI `Status`/`Value`/`ErrorDescription` envelope.
//!
//! Wire conventions (docs/XENSERVER.md section 5):
//! * XAPI emits strings and 64-bit ints as bare `<value>text</value>` (ints are decimal strings:
//!   use [`Value::as_i64`]), booleans as `<boolean>0|1</boolean>`, datetimes as
//!   `<dateTime.iso8601>20220729T13:32:06Z</dateTime.iso8601>`, void as `<value></value>`.
//! * Every call answers HTTP 200 with a struct: `{Status: "Success", Value: v}` or
//!   `{Status: "Failure", ErrorDescription: [code, args...]}`. An XML-RPC `<fault>` only
//!   comes with HTTP 500 for a request XAPI could not parse.
//! * The `VDI.list_changed_blocks` result is one base64 string of up to several MB, so the
//!   decoder borrows text from the input and copies it once, into the returned `String`.
//!
//! The decoder is a pull parser over quick-xml events with an explicit stack instead of
//! recursion; nesting depth and the number of values are capped ([`Limits`]). The encoder
//! writes XAPI's own style (bare `<value>` strings), which every XML-RPC parser accepts, so the
//! simulator's responses match a real host byte for byte.

use std::collections::BTreeMap;
use std::fmt;

mod decode;
mod encode;
mod xenapi;

pub use decode::{
    decode_call, decode_call_with, decode_response, decode_response_with, decode_value,
    decode_value_with,
};
pub use encode::{
    encode_call, encode_fault, encode_response, encode_value, encode_xenapi_failure,
    encode_xenapi_success,
};
pub use xenapi::{decode_xenapi, decode_xenapi_with, XenApiError, SECRET_ARG_CODES};

/// Default cap on nested structs and arrays inside one value.
pub const MAX_DEPTH: usize = 64;
/// Default cap on the number of `<value>` elements in one document. A `VM.get_all_records`
/// of a big pool is a few hundred thousand; this stops a small hostile document from
/// building a huge tree (each value costs more memory than the 15 bytes of `<value></value>`).
pub const MAX_VALUES: usize = 1 << 22;

/// Hard limits applied while decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Structs and arrays nested inside the top-level value (the top-level one counts).
    pub max_depth: usize,
    /// `<value>` elements in the whole document.
    pub max_values: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_depth: MAX_DEPTH,
            max_values: MAX_VALUES,
        }
    }
}

/// An XML-RPC value.
///
/// Structs are maps: XML-RPC member order carries no meaning and a duplicate member name is
/// rejected when decoding. `Double` compares with `==` (so `NaN != NaN`).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `<int>`, `<i4>` or `<i8>`. XAPI itself sends 64-bit ints as strings instead.
    Int(i64),
    Bool(bool),
    /// `<string>` or untyped `<value>` text.
    String(String),
    Double(f64),
    /// The text of `<dateTime.iso8601>`, unparsed (XAPI writes `YYYYMMDDTHH:MM:SSZ`).
    DateTime(String),
    Base64(Vec<u8>),
    Struct(BTreeMap<String, Value>),
    Array(Vec<Value>),
    /// `<nil/>` (an extension XAPI does not emit).
    Nil,
}

impl Value {
    /// A struct from `(name, value)` pairs; a later duplicate name replaces an earlier one.
    pub fn record<K: Into<String>>(pairs: impl IntoIterator<Item = (K, Value)>) -> Value {
        Value::Struct(pairs.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }

    /// A 64-bit int the way XAPI sends one: a decimal string.
    pub fn int64_str(n: i64) -> Value {
        Value::String(n.to_string())
    }

    /// The XML-RPC type name, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Int(_) => "int",
            Value::Bool(_) => "boolean",
            Value::String(_) => "string",
            Value::Double(_) => "double",
            Value::DateTime(_) => "dateTime.iso8601",
            Value::Base64(_) => "base64",
            Value::Struct(_) => "struct",
            Value::Array(_) => "array",
            Value::Nil => "nil",
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// An explicit `<int>`/`<i4>`/`<i8>` only.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(n) => Some(*n),
            _ => None,
        }
    }

    /// A string of decimal digits (optional sign), the XenAPI encoding of `int`.
    pub fn as_i64_str(&self) -> Option<i64> {
        self.as_str()?.parse().ok()
    }

    /// An int in either encoding, like XAPI's own `int64_of_rpc`: what callers usually want.
    pub fn as_i64(&self) -> Option<i64> {
        self.as_int().or_else(|| self.as_i64_str())
    }

    /// [`Value::as_i64`], non-negative (sizes, counts).
    pub fn as_u64(&self) -> Option<u64> {
        u64::try_from(self.as_i64()?).ok()
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Double(d) => Some(*d),
            _ => None,
        }
    }

    pub fn as_datetime(&self) -> Option<&str> {
        match self {
            Value::DateTime(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Base64(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_struct(&self) -> Option<&BTreeMap<String, Value>> {
        match self {
            Value::Struct(m) => Some(m),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A member of a struct (`None` if this is not a struct or has no such member).
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.as_struct()?.get(key)
    }

    pub fn is_nil(&self) -> bool {
        matches!(self, Value::Nil)
    }

    /// The string, moved out (no copy of a multi-megabyte bitmap).
    pub fn into_string(self) -> Option<String> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn into_struct(self) -> Option<BTreeMap<String, Value>> {
        match self {
            Value::Struct(m) => Some(m),
            _ => None,
        }
    }

    pub fn into_array(self) -> Option<Vec<Value>> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::String(s.to_owned())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::String(s)
    }
}

impl From<i64> for Value {
    fn from(n: i64) -> Self {
        Value::Int(n)
    }
}

impl From<i32> for Value {
    fn from(n: i32) -> Self {
        Value::Int(n.into())
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}

impl From<f64> for Value {
    fn from(d: f64) -> Self {
        Value::Double(d)
    }
}

impl From<Vec<Value>> for Value {
    fn from(a: Vec<Value>) -> Self {
        Value::Array(a)
    }
}

impl From<BTreeMap<String, Value>> for Value {
    fn from(m: BTreeMap<String, Value>) -> Self {
        Value::Struct(m)
    }
}

/// What was wrong with an XML-RPC document. Peer-supplied text in these messages is cut to a
/// few dozen characters with control characters replaced, so they are safe to log; none of
/// them quotes a string value (which could be a session reference or a password).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XmlRpcError {
    /// The server answered with an XML-RPC fault.
    #[error("XML-RPC fault {code}: {}", clean(.message, 200))]
    Fault { code: i64, message: String },
    #[error("malformed XML-RPC fault: {0}")]
    MalformedFault(&'static str),
    #[error("XML syntax error at byte {at}: {msg}")]
    Syntax { at: u64, msg: String },
    #[error("invalid UTF-8 in text near byte {at}")]
    InvalidUtf8 { at: u64 },
    #[error("unknown entity or bad character reference &{name}; near byte {at}")]
    BadReference { name: String, at: u64 },
    #[error("unexpected {found} at byte {at}, expected {expected}")]
    UnexpectedTag {
        found: String,
        expected: &'static str,
        at: u64,
    },
    #[error("unexpected text at byte {at}, expected {expected}")]
    UnexpectedText { expected: &'static str, at: u64 },
    #[error("the document ended early, expected {expected}")]
    UnexpectedEof { expected: &'static str },
    #[error("text mixed with a typed value at byte {at}")]
    MixedContent { at: u64 },
    #[error("bad <{ty}> value {text:?} at byte {at}")]
    BadScalar {
        ty: &'static str,
        text: String,
        at: u64,
    },
    #[error("duplicate struct member {name:?} at byte {at}")]
    DuplicateMember { name: String, at: u64 },
    #[error("values nested deeper than {limit} levels")]
    TooDeep { limit: usize },
    #[error("more than {limit} values in one document")]
    TooManyValues { limit: usize },
    #[error("DOCTYPE declarations are not allowed")]
    DocType,
    #[error("trailing data after the document at byte {at}")]
    TrailingGarbage { at: u64 },
}

/// Peer text made safe for a log line: at most `max` characters, control characters
/// replaced by `?`.
pub(crate) fn clean(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .take(max)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if s.chars().nth(max).is_some() {
        out.push_str("...");
    }
    out
}

/// [`clean`] for raw bytes, which may not be UTF-8.
pub(crate) fn clean_bytes(b: &[u8], max: usize) -> String {
    clean(&String::from_utf8_lossy(&b[..b.len().min(max * 4)]), max)
}

/// Formats a list of strings as `[a, b]` with each item cleaned.
pub(crate) struct CleanList<'a>(pub &'a [String]);

impl fmt::Display for CleanList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, a) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{:?}", clean(a, 200))?;
        }
        f.write_str("]")
    }
}

#[cfg(test)]
mod tests;
