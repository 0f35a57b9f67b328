use super::*;
use proptest::prelude::*;

// Byte-exact examples from docs/XENSERVER.md section 5.2.
const LOGIN_CALL: &str = "<?xml version='1.0'?>
<methodCall><methodName>session.login_with_password</methodName><params>
<param><value><string>user</string></value></param>
<param><value><string>passwd</string></value></param>
<param><value><string>version</string></value></param>
<param><value><string>originator</string></value></param>
</params></methodCall>";

const SUCCESS_REF: &str = "<?xml version=\"1.0\"?><methodResponse><params><param><value><struct><member><name>Status</name><value>Success</value></member><member><name>Value</name><value>OpaqueRef:0b2c…</value></member></struct></value></param></params></methodResponse>";

const FAILURE_SLAVE: &str = "<?xml version=\"1.0\"?><methodResponse><params><param><value><struct><member><name>Status</name><value>Failure</value></member><member><name>ErrorDescription</name><value><array><data><value>HOST_IS_SLAVE</value><value>10.0.0.1</value></data></array></value></member></struct></value></param></params></methodResponse>";

/// What Python's xmlrpc.client sends: pretty-printed, typed strings.
const PYTHON_STYLE: &str = "<?xml version='1.0'?>
<methodResponse>
<params>
<param>
<value><struct>
<member>
<name>Status</name>
<value><string>Success</string></value>
</member>
<member>
<name>Value</name>
<value><array><data>
<value><i4>-7</i4></value>
<value><int>42</int></value>
<value><i8>-9223372036854775808</i8></value>
<value><boolean>1</boolean></value>
<value><double>-2.5e-3</double></value>
<value><dateTime.iso8601>20220729T13:32:06Z</dateTime.iso8601></value>
<value><base64>
aGVsbG8g
d29ybGQ=
</base64></value>
<value><nil/></value>
<value/>
<value><string/></value>
<value><struct/></value>
<value><array><data/></array></value>
</data></array></value>
</member>
</struct></value>
</param>
</params>
</methodResponse>
";

fn s(x: &str) -> Value {
    Value::String(x.to_owned())
}

fn respond(inner: &str) -> String {
    format!("<?xml version=\"1.0\"?><methodResponse><params><param>{inner}</param></params></methodResponse>")
}

#[test]
fn research_login_call() {
    let (method, params) = decode_call(LOGIN_CALL.as_bytes()).unwrap();
    assert_eq!(method, "session.login_with_password");
    assert_eq!(
        params,
        vec![s("user"), s("passwd"), s("version"), s("originator")]
    );
}

#[test]
fn research_success_and_failure() {
    assert_eq!(
        decode_xenapi(SUCCESS_REF.as_bytes()).unwrap(),
        s("OpaqueRef:0b2c…")
    );
    let e = decode_xenapi(FAILURE_SLAVE.as_bytes()).unwrap_err();
    assert!(e.is("HOST_IS_SLAVE"));
    assert_eq!(
        e,
        XenApiError::Failure {
            code: "HOST_IS_SLAVE".into(),
            args: vec!["10.0.0.1".into()]
        }
    );
    assert_eq!(e.to_string(), "XenAPI error HOST_IS_SLAVE [\"10.0.0.1\"]");
    assert_eq!(e.args(), Some(&["10.0.0.1".to_owned()][..]));
}

#[test]
fn encoders_match_xapi_byte_for_byte() {
    assert_eq!(encode_xenapi_success(&s("OpaqueRef:0b2c…")), SUCCESS_REF);
    assert_eq!(
        encode_xenapi_failure("HOST_IS_SLAVE", &["10.0.0.1"]),
        FAILURE_SLAVE
    );
    // The generic encoder writes the same bytes (struct members sort Status < Value).
    let v = Value::record([("Status", s("Success")), ("Value", s("OpaqueRef:0b2c…"))]);
    assert_eq!(encode_response(&v), SUCCESS_REF);
}

#[test]
fn list_changed_blocks_result() {
    // Worked example of research section 1.4: 10 MiB disk, blocks 0, 9 and 159 changed.
    let doc = encode_xenapi_success(&s("gEAAAAAAAAAAAAAAAAAAAAAAAAE="));
    let v = decode_xenapi(doc.as_bytes()).unwrap();
    let bitmap = crate::cbt::decode_base64(v.as_str().unwrap().as_bytes()).unwrap();
    let ex: Vec<_> = crate::cbt::extents(&bitmap, 10 << 20, 1 << 20)
        .unwrap()
        .map(|e| e.offset / crate::cbt::CBT_BLOCK)
        .collect();
    assert_eq!(ex, vec![0, 9, 159]);
}

#[test]
fn python_style_document() {
    let v = decode_xenapi(PYTHON_STYLE.as_bytes()).unwrap();
    assert_eq!(
        v,
        Value::Array(vec![
            Value::Int(-7),
            Value::Int(42),
            Value::Int(i64::MIN),
            Value::Bool(true),
            Value::Double(-2.5e-3),
            Value::DateTime("20220729T13:32:06Z".into()),
            Value::Base64(b"hello world".to_vec()),
            Value::Nil,
            s(""),
            s(""),
            Value::Struct(Default::default()),
            Value::Array(vec![]),
        ])
    );
}

#[test]
fn typical_record() {
    let doc = respond(
        "<value><struct>\
         <member><name>uuid</name><value>6e0e8e1c-2b38-4d2f-9a48-5c1b2a8d3e01</value></member>\
         <member><name>virtual_size</name><value>3298534883328</value></member>\
         <member><name>cbt_enabled</name><value><boolean>1</boolean></value></member>\
         <member><name>type</name><value>user</value></member>\
         <member><name>other_config</name><value><struct></struct></value></member>\
         <member><name>VBDs</name><value><array><data><value>OpaqueRef:a</value></data></array></value></member>\
         </struct></value>",
    );
    let v = decode_response(doc.as_bytes()).unwrap();
    assert_eq!(v.get("virtual_size").and_then(Value::as_u64), Some(3 << 40));
    assert_eq!(v.get("virtual_size").and_then(Value::as_int), None);
    assert_eq!(v.get("cbt_enabled").and_then(Value::as_bool), Some(true));
    assert_eq!(v.get("type").and_then(Value::as_str), Some("user"));
    assert_eq!(
        v.get("VBDs").and_then(Value::as_array).map(|a| a.len()),
        Some(1)
    );
    assert!(v
        .get("other_config")
        .unwrap()
        .as_struct()
        .unwrap()
        .is_empty());
    assert_eq!(v.get("missing"), None);
    assert_eq!(s("-12").as_i64(), Some(-12));
    assert_eq!(Value::Int(5).as_i64(), Some(5));
    assert_eq!(s("12x").as_i64(), None);
    assert_eq!(s("-1").as_u64(), None);
}

#[test]
fn text_escapes_entities_cdata_and_line_ends() {
    let doc = respond(
        "<value>a&lt;b&amp;c&gt;&quot;&apos;&#65;&#x42;<![CDATA[<&]]>\r\nx\ry&#13;&#xD;</value>",
    );
    assert_eq!(
        decode_response(doc.as_bytes()).unwrap(),
        s("a<b&c>\"'AB<&\nx\ny\r\r")
    );
    for bad in ["&foo;", "&#;", "&#x;", "&#xD800;", "&#-1;", "&#x110000;"] {
        let doc = respond(&format!("<value>{bad}</value>"));
        assert!(
            matches!(
                decode_response(doc.as_bytes()),
                Err(XmlRpcError::BadReference { .. }) | Err(XmlRpcError::Syntax { .. })
            ),
            "{bad}"
        );
    }
}

#[test]
fn escaping_round_trips() {
    let nasty = "<&>]]>\r\n\r\t \"'\u{0}\u{1}\u{1f}\u{7f}é€😀 &amp; &#65;";
    let v = Value::record([
        (
            nasty,
            Value::Array(vec![s(nasty), Value::DateTime(nasty.into())]),
        ),
        ("  ", s("  \n ")),
    ]);
    assert_eq!(decode_response(encode_response(&v).as_bytes()).unwrap(), v);
    let call = encode_call(nasty, &[v.clone(), Value::Nil]);
    assert_eq!(
        decode_call(call.as_bytes()).unwrap(),
        (nasty.to_owned(), vec![v, Value::Nil])
    );
    assert_eq!(
        decode_value(encode_value(&s("OpaqueRef:x")).as_bytes()).unwrap(),
        s("OpaqueRef:x")
    );
}

#[test]
fn calls_with_and_without_params() {
    let (m, p) =
        decode_call(b"<methodCall><methodName>system.listMethods</methodName></methodCall>")
            .unwrap();
    assert_eq!((m.as_str(), p.len()), ("system.listMethods", 0));
    let (m, p) =
        decode_call(encode_call("VDI.list_changed_blocks", &[s("a"), s("b"), s("c")]).as_bytes())
            .unwrap();
    assert_eq!(m, "VDI.list_changed_blocks");
    assert_eq!(p, vec![s("a"), s("b"), s("c")]);
    let (_, p) =
        decode_call(b"<methodCall><methodName>x</methodName><params/></methodCall>").unwrap();
    assert!(p.is_empty());
}

#[test]
fn faults() {
    let doc = encode_fault(-32700, "parse error: <oops>");
    assert_eq!(
        decode_response(doc.as_bytes()),
        Err(XmlRpcError::Fault {
            code: -32700,
            message: "parse error: <oops>".into()
        })
    );
    // decode_xenapi passes it through.
    assert!(matches!(
        decode_xenapi(doc.as_bytes()),
        Err(XenApiError::Rpc(XmlRpcError::Fault { code: -32700, .. }))
    ));
    let doc = "<methodResponse><fault><value><struct><member><name>faultCode</name><value><string>4</string></value></member><member><name>faultString</name><value>Too many parameters.</value></member></struct></value></fault></methodResponse>";
    assert!(matches!(
        decode_response(doc.as_bytes()),
        Err(XmlRpcError::Fault { code: 4, .. })
    ));
    let doc = "<methodResponse><fault><value>nope</value></fault></methodResponse>";
    assert!(matches!(
        decode_response(doc.as_bytes()),
        Err(XmlRpcError::MalformedFault(_))
    ));
}

#[test]
fn envelope_problems() {
    let cases: &[(Value, &str)] = &[
        (s("x"), "not a struct"),
        (Value::record([("Value", s("x"))]), "Status is missing"),
        (Value::record([("Status", s("Maybe"))]), "neither"),
        (Value::record([("Status", s("Success"))]), "without a Value"),
        (
            Value::record([("Status", s("Failure"))]),
            "without an ErrorDescription",
        ),
        (
            Value::record([
                ("Status", s("Failure")),
                ("ErrorDescription", Value::Array(vec![])),
            ]),
            "empty",
        ),
        (
            Value::record([
                ("Status", s("Failure")),
                ("ErrorDescription", Value::Array(vec![s("X"), Value::Nil])),
            ]),
            "not a string",
        ),
    ];
    for (v, want) in cases {
        let e = decode_xenapi(encode_response(v).as_bytes()).unwrap_err();
        assert!(matches!(e, XenApiError::Envelope(_)), "{e:?}");
        assert!(e.to_string().contains(want), "{e} !~ {want}");
    }
    // A void result is an empty string.
    let doc = encode_xenapi_success(&s(""));
    assert_eq!(decode_xenapi(doc.as_bytes()).unwrap(), s(""));
    // An int code is accepted.
    let v = Value::record([
        ("Status", s("Failure")),
        (
            "ErrorDescription",
            Value::Array(vec![s("SR_BACKEND_FAILURE_460"), Value::Int(3)]),
        ),
    ]);
    let e = decode_xenapi(encode_response(&v).as_bytes()).unwrap_err();
    assert_eq!(e.args(), Some(&["3".to_owned()][..]));
}

#[test]
fn session_refs_are_redacted() {
    let secret = "OpaqueRef:5e0a9c1d-0000-4000-8000-123456789abc";
    let doc = encode_xenapi_failure("SESSION_INVALID", &[secret]);
    let e = decode_xenapi(doc.as_bytes()).unwrap_err();
    assert!(e.is("SESSION_INVALID") && e.is_redacted());
    assert_eq!(e.args(), Some(&[secret.to_owned()][..]));
    for shown in [e.to_string(), format!("{e:?}"), format!("{e:#?}")] {
        assert!(!shown.contains(secret), "{shown}");
        assert!(shown.contains("SESSION_INVALID"), "{shown}");
    }
    assert_eq!(
        e.to_string(),
        "XenAPI error SESSION_INVALID [\"<redacted>\"]"
    );
    assert!(e.unredacted().to_string().contains(secret));
    // An export name anywhere in the args is hidden too.
    let e = XenApiError::Failure {
        code: "INTERNAL_ERROR".into(),
        args: vec![
            "open /abc?session_id=OpaqueRef:s3cret failed".into(),
            "kept".into(),
        ],
    };
    assert!(!e.to_string().contains("s3cret") && e.to_string().contains("kept"));
    // Control characters from the host do not reach the log line.
    let e = XenApiError::Failure {
        code: "X\u{1b}[31m".into(),
        args: vec!["a\nb".into()],
    };
    assert!(!e.to_string().contains('\u{1b}') && !e.to_string().contains('\n'));
    assert!(!XenApiError::Envelope("x").is_redacted());
}

fn nested(depth: usize) -> String {
    respond(&format!(
        "{}<value>x</value>{}",
        "<value><array><data>".repeat(depth),
        "</data></array></value>".repeat(depth)
    ))
}

#[test]
fn limits() {
    assert!(decode_response(nested(MAX_DEPTH).as_bytes()).is_ok());
    assert_eq!(
        decode_response(nested(MAX_DEPTH + 1).as_bytes()),
        Err(XmlRpcError::TooDeep { limit: MAX_DEPTH })
    );
    // A very deep document fails fast, without recursion.
    assert!(matches!(
        decode_response(nested(100_000).as_bytes()),
        Err(XmlRpcError::TooDeep { .. })
    ));
    let small = Limits {
        max_depth: 2,
        max_values: 3,
    };
    let three =
        respond("<value><array><data><value>a</value><value>b</value></data></array></value>");
    assert!(decode_response_with(three.as_bytes(), small).is_ok());
    let four = respond("<value><array><data><value>a</value><value>b</value><value>c</value></data></array></value>");
    assert_eq!(
        decode_response_with(four.as_bytes(), small),
        Err(XmlRpcError::TooManyValues { limit: 3 })
    );
    assert_eq!(
        decode_response_with(
            nested(3).as_bytes(),
            Limits {
                max_depth: 2,
                max_values: 100
            }
        ),
        Err(XmlRpcError::TooDeep { limit: 2 })
    );
}

#[test]
fn malformed_documents_name_the_problem() {
    type Check = fn(&XmlRpcError) -> bool;
    let cases: &[(&str, Check)] = &[
        ("", |e| matches!(e, XmlRpcError::UnexpectedEof { .. })),
        ("<methodResponse>", |e| matches!(e, XmlRpcError::UnexpectedEof { .. })),
        ("<methodCall/>", |e| matches!(e, XmlRpcError::UnexpectedTag { .. })),
        ("hello", |e| matches!(e, XmlRpcError::UnexpectedText { .. })),
        (&respond("<value><int>12a</int></value>"), |e| {
            matches!(e, XmlRpcError::BadScalar { ty: "int", .. })
        }),
        (&respond("<value><i4>99999999999999999999</i4></value>"), |e| {
            matches!(e, XmlRpcError::BadScalar { ty: "int", .. })
        }),
        (&respond("<value><boolean>yes</boolean></value>"), |e| {
            matches!(e, XmlRpcError::BadScalar { ty: "boolean", .. })
        }),
        (&respond("<value><double>1,5</double></value>"), |e| {
            matches!(e, XmlRpcError::BadScalar { ty: "double", .. })
        }),
        (&respond("<value><base64>!!</base64></value>"), |e| {
            matches!(e, XmlRpcError::BadScalar { ty: "base64", .. })
        }),
        (&respond("<value><nil>x</nil></value>"), |e| {
            matches!(e, XmlRpcError::BadScalar { ty: "nil", .. })
        }),
        (&respond("<value><float>1</float></value>"), |e| {
            matches!(e, XmlRpcError::UnexpectedTag { found, .. } if found == "<float>")
        }),
        (&respond("<value>x<int>1</int></value>"), |e| matches!(e, XmlRpcError::MixedContent { .. })),
        (&respond("<value><int>1</int>x</value>"), |e| matches!(e, XmlRpcError::UnexpectedText { .. })),
        (&respond("<value><int><b>1</b></int></value>"), |e| matches!(e, XmlRpcError::UnexpectedTag { .. })),
        (&respond("<value><struct><member><name>a</name><value>1</value></member><member><name>a</name><value>2</value></member></struct></value>"), |e| {
            matches!(e, XmlRpcError::DuplicateMember { name, .. } if name == "a")
        }),
        (&respond("<value><struct><member><value>1</value></member></struct></value>"), |e| {
            matches!(e, XmlRpcError::UnexpectedTag { expected: "<name>", .. })
        }),
        (&respond("<value><array><value>1</value></array></value>"), |e| {
            matches!(e, XmlRpcError::UnexpectedTag { expected: "<data>", .. })
        }),
        (&respond("<value>a</value><value>b</value>"), |e| matches!(e, XmlRpcError::UnexpectedTag { .. })),
        (&format!("{}<x/>", respond("<value>a</value>")), |e| matches!(e, XmlRpcError::TrailingGarbage { .. })),
        (&format!("{}junk", respond("<value>a</value>")), |e| matches!(e, XmlRpcError::TrailingGarbage { .. })),
        ("<methodResponse><params><param><value>a</param></value></params></methodResponse>", |e| {
            matches!(e, XmlRpcError::Syntax { .. })
        }),
        ("<!DOCTYPE x [<!ENTITY a \"b\">]><methodResponse/>", |e| matches!(e, XmlRpcError::DocType)),
        ("<methodResponse><params><param><value>a</value></param><param><value>b</value></param></params></methodResponse>", |e| {
            matches!(e, XmlRpcError::UnexpectedTag { found, .. } if found == "<param>")
        }),
        ("<methodResponse><params></params></methodResponse>", |e| matches!(e, XmlRpcError::UnexpectedTag { .. })),
    ];
    for (doc, ok) in cases {
        let e = decode_response(doc.as_bytes()).unwrap_err();
        assert!(ok(&e), "{doc:?} gave {e:?}");
        // Every error has a message.
        assert!(!e.to_string().is_empty());
    }
    let mut bad_utf8 = respond("<value>ab</value>").into_bytes();
    let i = bad_utf8.windows(3).position(|w| w == b">ab").unwrap() + 1;
    bad_utf8[i] = 0xff;
    assert!(matches!(
        decode_response(&bad_utf8),
        Err(XmlRpcError::InvalidUtf8 { .. })
    ));
}

#[test]
fn error_messages_do_not_echo_long_peer_text() {
    let long = "A".repeat(10_000);
    let doc = respond(&format!("<value><int>{long}</int></value>"));
    let e = decode_response(doc.as_bytes()).unwrap_err();
    assert!(e.to_string().len() < 200, "{e}");
    let doc = respond(&format!("<value><{long}>1</{long}></value>"));
    let e = decode_response(doc.as_bytes()).unwrap_err();
    assert!(e.to_string().len() < 200, "{e}");
}

#[test]
fn large_base64_string_is_borrowed_then_copied_once() {
    // 1 MiB of base64: decodes to the same text, and a bitmap comes back out.
    let bitmap: Vec<u8> = (0..768 * 1024u32).map(|i| (i * 7) as u8).collect();
    let text = crate::cbt::encode_base64(&bitmap);
    let doc = encode_xenapi_success(&s(&text));
    let v = decode_xenapi(doc.as_bytes()).unwrap();
    assert_eq!(v.as_str(), Some(text.as_str()));
    assert_eq!(
        crate::cbt::decode_base64(v.into_string().unwrap().as_bytes()).unwrap(),
        bitmap
    );
}

/// Equality that compares doubles by their bits (so -0.0 != 0.0 and NaN == NaN).
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

fn arb_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(Value::Int),
        any::<bool>().prop_map(Value::Bool),
        any::<String>().prop_map(Value::String),
        // Every double but NaN payloads other than the canonical one (the text is "NaN").
        any::<f64>().prop_map(|d| Value::Double(if d.is_nan() { f64::NAN } else { d })),
        any::<String>().prop_map(Value::DateTime),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(Value::Base64),
        Just(Value::Nil),
    ];
    leaf.prop_recursive(5, 64, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(any::<String>(), inner, 0..6).prop_map(Value::Struct),
        ]
    })
}

/// Pick a few byte positions and overwrite, insert or delete there.
fn mutate(doc: &[u8], edits: &[(usize, u8, u8)]) -> Vec<u8> {
    let mut d = doc.to_vec();
    for &(pos, op, byte) in edits {
        if d.is_empty() {
            d.push(byte);
            continue;
        }
        let i = pos % d.len();
        match op % 3 {
            0 => d[i] = byte,
            1 => d.insert(i, byte),
            _ => {
                d.remove(i);
            }
        }
    }
    d
}

proptest! {
    #[test]
    fn round_trip(v in arb_value()) {
        let back = decode_response(encode_response(&v).as_bytes()).unwrap();
        prop_assert!(same(&v, &back), "{:?} != {:?}", v, back);
        let back = decode_value(encode_value(&v).as_bytes()).unwrap();
        prop_assert!(same(&v, &back));
    }

    #[test]
    fn call_round_trip(method in any::<String>(), params in proptest::collection::vec(arb_value(), 0..4)) {
        let (m, p) = decode_call(encode_call(&method, &params).as_bytes()).unwrap();
        prop_assert_eq!(m, method);
        prop_assert!(same(&Value::Array(params), &Value::Array(p)));
    }

    #[test]
    fn xenapi_round_trip(v in arb_value(), code in "[A-Z_]{1,20}", args in proptest::collection::vec(any::<String>(), 0..4)) {
        let back = decode_xenapi(encode_xenapi_success(&v).as_bytes()).unwrap();
        prop_assert!(same(&v, &back));
        let e = decode_xenapi(encode_xenapi_failure(&code, &args).as_bytes()).unwrap_err();
        prop_assert_eq!(e, XenApiError::Failure { code, args });
    }

    #[test]
    fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_response(&bytes);
        let _ = decode_xenapi(&bytes);
        let _ = decode_call(&bytes);
        let _ = decode_value(&bytes);
    }

    #[test]
    fn never_panics_on_mutated_documents(v in arb_value(), edits in proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..6)) {
        for doc in [encode_response(&v), encode_xenapi_success(&v), encode_call("m", std::slice::from_ref(&v)), PYTHON_STYLE.to_owned()] {
            let d = mutate(doc.as_bytes(), &edits);
            let _ = decode_response(&d);
            let _ = decode_xenapi(&d);
            let _ = decode_call(&d);
            // Whatever decodes re-encodes to something that decodes the same.
            if let Ok(v) = decode_response(&d) {
                let back = decode_response(encode_response(&v).as_bytes()).unwrap();
                prop_assert!(same(&v, &back));
            }
        }
    }
}

#[test]
fn lenient_where_harmless() {
    // A UTF-8 byte order mark, whitespace and comments around elements, whitespace around a
    // typed value, and CR LF line ends.
    let doc = "\u{feff}<?xml version=\"1.0\" encoding=\"UTF-8\"?>\r\n<!-- hi -->\r\n<methodResponse><params><param>\r\n<value> <int> 7 </int> <!-- c --> </value></param></params></methodResponse>\r\n";
    assert_eq!(decode_response(doc.as_bytes()), Ok(Value::Int(7)));
}
