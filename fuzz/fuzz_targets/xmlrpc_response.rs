//! XML-RPC decoding (responses, XenAPI envelopes, calls, bare values) on arbitrary bytes,
//! plus a differential check: whatever decodes must re-encode to a document that decodes to
//! the same thing, and the XenAPI view must agree with the plain XML-RPC view.
#![no_main]
use cbtstream_proto::xmlrpc::{self, Value, XenApiError};
use libfuzzer_sys::fuzz_target;

/// Equality with doubles compared by bits: decoded NaNs are canonical, so they compare equal.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Double(x), Value::Double(y)) => x.to_bits() == y.to_bits(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (Value::Struct(x), Value::Struct(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|((ka, a), (kb, b))| ka == kb && same(a, b))
        }
        _ => a == b,
    }
}

fuzz_target!(|data: &[u8]| {
    let response = xmlrpc::decode_response(data);
    if let Ok(v) = &response {
        let again = xmlrpc::decode_response(xmlrpc::encode_response(v).as_bytes());
        assert!(matches!(&again, Ok(w) if same(v, w)), "{v:?} -> {again:?}");
        let again = xmlrpc::decode_value(xmlrpc::encode_value(v).as_bytes());
        assert!(matches!(&again, Ok(w) if same(v, w)));
    }

    match xmlrpc::decode_xenapi(data) {
        Ok(v) => {
            let Ok(Value::Struct(m)) = &response else {
                panic!("xenapi success but response {response:?}")
            };
            assert_eq!(m.get("Status").and_then(Value::as_str), Some("Success"));
            assert!(m.get("Value").is_some_and(|w| same(&v, w)));
            let again = xmlrpc::decode_xenapi(xmlrpc::encode_xenapi_success(&v).as_bytes());
            assert!(matches!(&again, Ok(w) if same(&v, w)));
        }
        Err(XenApiError::Failure { code, args }) => {
            assert!(response.is_ok());
            let again =
                xmlrpc::decode_xenapi(xmlrpc::encode_xenapi_failure(&code, &args).as_bytes());
            assert_eq!(again, Err(XenApiError::Failure { code, args }));
        }
        Err(XenApiError::Rpc(e)) => assert_eq!(response, Err(e)),
        Err(e @ XenApiError::Envelope(_)) => {
            assert!(response.is_ok());
            assert!(!e.to_string().is_empty());
        }
    }

    if let Ok((method, params)) = xmlrpc::decode_call(data) {
        let again = xmlrpc::decode_call(xmlrpc::encode_call(&method, &params).as_bytes());
        let Ok((m2, p2)) = again else {
            panic!("call did not re-decode")
        };
        assert_eq!(m2, method);
        assert!(same(&Value::Array(params), &Value::Array(p2)));
    }

    let _ = xmlrpc::decode_value(data);
});
