//! Encoding, in XAPI's own style: no whitespace between elements, strings as bare
//! `<value>text</value>`, so the simulator's responses match a real host byte for byte.
//!
//! Encoding recurses over the value: values built in code are shallow, and decoded ones are
//! capped at [`super::MAX_DEPTH`] levels.

use super::Value;
use base64::Engine;
use std::fmt::Write;

const DECL: &str = "<?xml version=\"1.0\"?>";

/// A `<methodCall>` document.
pub fn encode_call(method: &str, params: &[Value]) -> String {
    let mut out = String::with_capacity(128);
    out.push_str(DECL);
    out.push_str("<methodCall><methodName>");
    escape_into(&mut out, method);
    out.push_str("</methodName><params>");
    for p in params {
        out.push_str("<param>");
        write_value(&mut out, p);
        out.push_str("</param>");
    }
    out.push_str("</params></methodCall>");
    out
}

/// A `<methodResponse>` with `v` as its one parameter.
pub fn encode_response(v: &Value) -> String {
    let mut out = String::with_capacity(128);
    out.push_str(DECL);
    out.push_str("<methodResponse><params><param>");
    write_value(&mut out, v);
    out.push_str("</param></params></methodResponse>");
    out
}

/// A `<methodResponse>` carrying an XML-RPC fault.
pub fn encode_fault(code: i32, message: &str) -> String {
    let mut out = String::with_capacity(128);
    out.push_str(DECL);
    out.push_str(
        "<methodResponse><fault><value><struct><member><name>faultCode</name><value><int>",
    );
    let _ = write!(out, "{code}");
    out.push_str("</int></value></member><member><name>faultString</name><value>");
    escape_into(&mut out, message);
    out.push_str("</value></member></struct></value></fault></methodResponse>");
    out
}

/// A bare `<value>...</value>` (the format of `task.get_result`).
pub fn encode_value(v: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, v);
    out
}

/// XenAPI success, `{Status: "Success", Value: v}`, members in XAPI's order.
pub fn encode_xenapi_success(v: &Value) -> String {
    let mut out = String::with_capacity(256);
    out.push_str(DECL);
    out.push_str("<methodResponse><params><param><value><struct><member><name>Status</name><value>Success</value></member><member><name>Value</name>");
    write_value(&mut out, v);
    out.push_str("</member></struct></value></param></params></methodResponse>");
    out
}

/// XenAPI failure, `{Status: "Failure", ErrorDescription: [code, args...]}`.
pub fn encode_xenapi_failure<S: AsRef<str>>(code: &str, args: &[S]) -> String {
    let mut out = String::with_capacity(256);
    out.push_str(DECL);
    out.push_str("<methodResponse><params><param><value><struct><member><name>Status</name><value>Failure</value></member><member><name>ErrorDescription</name><value><array><data><value>");
    escape_into(&mut out, code);
    out.push_str("</value>");
    for a in args {
        out.push_str("<value>");
        escape_into(&mut out, a.as_ref());
        out.push_str("</value>");
    }
    out.push_str(
        "</data></array></value></member></struct></value></param></params></methodResponse>",
    );
    out
}

fn write_value(out: &mut String, v: &Value) {
    out.push_str("<value>");
    match v {
        Value::Int(n) => {
            // <i8> is an extension; use the portable spelling whenever the value fits.
            let tag = if i32::try_from(*n).is_ok() {
                "int"
            } else {
                "i8"
            };
            let _ = write!(out, "<{tag}>{n}</{tag}>");
        }
        Value::Bool(b) => out.push_str(if *b {
            "<boolean>1</boolean>"
        } else {
            "<boolean>0</boolean>"
        }),
        Value::String(s) => escape_into(out, s),
        // Debug is the shortest text that parses back to the same bits (1e300, not 301
        // digits); NaN and inf come out as NaN and inf, which Rust, Python and OCaml parse.
        Value::Double(d) => {
            let _ = write!(out, "<double>{d:?}</double>");
        }
        Value::DateTime(s) => {
            out.push_str("<dateTime.iso8601>");
            escape_into(out, s);
            out.push_str("</dateTime.iso8601>");
        }
        Value::Base64(b) => {
            out.push_str("<base64>");
            base64::engine::general_purpose::STANDARD.encode_string(b, out);
            out.push_str("</base64>");
        }
        Value::Struct(m) => {
            out.push_str("<struct>");
            for (k, v) in m {
                out.push_str("<member><name>");
                escape_into(out, k);
                out.push_str("</name>");
                write_value(out, v);
                out.push_str("</member>");
            }
            out.push_str("</struct>");
        }
        Value::Array(a) => {
            out.push_str("<array><data>");
            for v in a {
                write_value(out, v);
            }
            out.push_str("</data></array>");
        }
        Value::Nil => out.push_str("<nil/>"),
    }
    out.push_str("</value>");
}

/// Append `s` as XML character data. `&` and `<` must be escaped, `>` too (for `]]>`), and CR
/// and the other control characters become character references so a parser's end-of-line
/// normalisation cannot change them. Tab and LF pass through.
pub(super) fn escape_into(out: &mut String, s: &str) {
    out.reserve(s.len());
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let rep: &str = match b {
            b'&' => "&amp;",
            b'<' => "&lt;",
            b'>' => "&gt;",
            b'\t' | b'\n' => continue,
            0..=0x1f | 0x7f => "",
            _ => continue,
        };
        // Every byte matched above is ASCII, so `i` is a character boundary.
        out.push_str(&s[start..i]);
        if rep.is_empty() {
            let _ = write!(out, "&#x{b:X};");
        } else {
            out.push_str(rep);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
}
