//! Decoding: a pull parser over quick-xml events with an explicit stack (no recursion).
//!
//! Text is borrowed from the input while it is collected and copied once when it becomes a
//! `String`; it is only rebuilt when it needs work (an entity, CDATA, a CR to normalise), so
//! the multi-megabyte `list_changed_blocks` string costs one UTF-8 check and one copy.

use super::{clean_bytes, Limits, Value, XmlRpcError};
use base64::Engine;
use quick_xml::events::Event;
use quick_xml::Reader;
use std::borrow::Cow;
use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::fmt;

/// Decode a `<methodResponse>`: its single parameter, or [`XmlRpcError::Fault`].
pub fn decode_response(bytes: &[u8]) -> Result<Value, XmlRpcError> {
    decode_response_with(bytes, Limits::default())
}

pub fn decode_response_with(bytes: &[u8], limits: Limits) -> Result<Value, XmlRpcError> {
    let mut p = Parser::new(bytes, limits);
    p.expect_start(Tag::MethodResponse, "<methodResponse>")?;
    match p.tag("<params> or <fault>")? {
        Tok::Start(Tag::Params) => {
            p.expect_start(Tag::Param, "<param>")?;
            p.expect_start(Tag::Value, "<value>")?;
            let v = p.value()?;
            p.expect_end(Tag::Param, "</param>")?;
            p.expect_end(
                Tag::Params,
                "</params> (a response has exactly one <param>)",
            )?;
            p.expect_end(Tag::MethodResponse, "</methodResponse>")?;
            p.finish()?;
            Ok(v)
        }
        Tok::Start(Tag::Fault) => {
            p.expect_start(Tag::Value, "<value>")?;
            let v = p.value()?;
            p.expect_end(Tag::Fault, "</fault>")?;
            p.expect_end(Tag::MethodResponse, "</methodResponse>")?;
            p.finish()?;
            Err(fault(v))
        }
        t => Err(p.unexpected(t, "<params> or <fault>")),
    }
}

/// Decode a `<methodCall>` (server side): the method name and its parameters.
pub fn decode_call(bytes: &[u8]) -> Result<(String, Vec<Value>), XmlRpcError> {
    decode_call_with(bytes, Limits::default())
}

pub fn decode_call_with(bytes: &[u8], limits: Limits) -> Result<(String, Vec<Value>), XmlRpcError> {
    let mut p = Parser::new(bytes, limits);
    p.expect_start(Tag::MethodCall, "<methodCall>")?;
    p.expect_start(Tag::MethodName, "<methodName>")?;
    let method = p
        .text_until(Tag::MethodName, "the method name")?
        .into_string();
    let mut params = Vec::new();
    // `<params>` may be left out when there are none.
    match p.tag("<params> or </methodCall>")? {
        Tok::End(Tag::MethodCall) => {}
        Tok::Start(Tag::Params) => {
            loop {
                match p.tag("<param> or </params>")? {
                    Tok::Start(Tag::Param) => {
                        p.expect_start(Tag::Value, "<value>")?;
                        params.push(p.value()?);
                        p.expect_end(Tag::Param, "</param>")?;
                    }
                    Tok::End(Tag::Params) => break,
                    t => return Err(p.unexpected(t, "<param> or </params>")),
                }
            }
            p.expect_end(Tag::MethodCall, "</methodCall>")?;
        }
        t => return Err(p.unexpected(t, "<params> or </methodCall>")),
    }
    p.finish()?;
    Ok((method, params))
}

/// Decode a document that is a single `<value>` (what `task.get_result` returns).
pub fn decode_value(bytes: &[u8]) -> Result<Value, XmlRpcError> {
    decode_value_with(bytes, Limits::default())
}

pub fn decode_value_with(bytes: &[u8], limits: Limits) -> Result<Value, XmlRpcError> {
    let mut p = Parser::new(bytes, limits);
    p.expect_start(Tag::Value, "<value>")?;
    let v = p.value()?;
    p.finish()?;
    Ok(v)
}

/// Turn the value of a `<fault>` into the error it stands for.
fn fault(v: Value) -> XmlRpcError {
    let Value::Struct(mut m) = v else {
        return XmlRpcError::MalformedFault("the fault value is not a struct");
    };
    let Some(code) = m.get("faultCode").and_then(Value::as_i64) else {
        return XmlRpcError::MalformedFault("faultCode is missing or not an int");
    };
    match m.remove("faultString") {
        Some(Value::String(message)) => XmlRpcError::Fault { code, message },
        _ => XmlRpcError::MalformedFault("faultString is missing or not a string"),
    }
}

/// The element names XML-RPC uses; anything else is an error wherever it appears.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tag {
    MethodCall,
    MethodName,
    MethodResponse,
    Params,
    Param,
    Fault,
    Value,
    Struct,
    Member,
    Name,
    Array,
    Data,
    I4,
    Int,
    I8,
    Boolean,
    String,
    Double,
    DateTime,
    Base64,
    Nil,
    /// Cleaned-up name, kept for the error message.
    Other(String),
}

impl Tag {
    fn of(name: &[u8]) -> Tag {
        match name {
            b"methodCall" => Tag::MethodCall,
            b"methodName" => Tag::MethodName,
            b"methodResponse" => Tag::MethodResponse,
            b"params" => Tag::Params,
            b"param" => Tag::Param,
            b"fault" => Tag::Fault,
            b"value" => Tag::Value,
            b"struct" => Tag::Struct,
            b"member" => Tag::Member,
            b"name" => Tag::Name,
            b"array" => Tag::Array,
            b"data" => Tag::Data,
            b"i4" => Tag::I4,
            b"int" => Tag::Int,
            b"i8" => Tag::I8,
            b"boolean" => Tag::Boolean,
            b"string" => Tag::String,
            b"double" => Tag::Double,
            b"dateTime.iso8601" => Tag::DateTime,
            b"base64" => Tag::Base64,
            // Apache's extension namespace spells it ex:nil.
            b"nil" | b"ex:nil" => Tag::Nil,
            other => Tag::Other(clean_bytes(other, 40)),
        }
    }

    fn name(&self) -> &str {
        match self {
            Tag::MethodCall => "methodCall",
            Tag::MethodName => "methodName",
            Tag::MethodResponse => "methodResponse",
            Tag::Params => "params",
            Tag::Param => "param",
            Tag::Fault => "fault",
            Tag::Value => "value",
            Tag::Struct => "struct",
            Tag::Member => "member",
            Tag::Name => "name",
            Tag::Array => "array",
            Tag::Data => "data",
            Tag::I4 => "i4",
            Tag::Int => "int",
            Tag::I8 => "i8",
            Tag::Boolean => "boolean",
            Tag::String => "string",
            Tag::Double => "double",
            Tag::DateTime => "dateTime.iso8601",
            Tag::Base64 => "base64",
            Tag::Nil => "nil",
            Tag::Other(s) => s,
        }
    }
}

/// A piece of character data, as quick-xml splits it.
enum Piece<'a> {
    /// Text between markup: needs a UTF-8 check and end-of-line normalisation.
    Raw(Cow<'a, [u8]>),
    /// `<![CDATA[...]]>` content: taken literally apart from end-of-line normalisation.
    CData(Cow<'a, [u8]>),
    /// The name inside `&...;`.
    Ref(Cow<'a, [u8]>),
}

impl Piece<'_> {
    /// Only XML whitespace (allowed, and ignored, between elements).
    fn is_whitespace(&self) -> bool {
        match self {
            Piece::Raw(b) => b.iter().all(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r')),
            Piece::CData(_) | Piece::Ref(_) => false,
        }
    }
}

/// The events the parser acts on (comments and processing instructions are dropped).
enum Ev<'a> {
    Start(Tag),
    End(Tag),
    Text(Piece<'a>),
    Eof,
}

/// A tag event or the end of input, once whitespace has been skipped.
enum Tok {
    Start(Tag),
    End(Tag),
    Eof,
}

impl fmt::Display for Tok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Start(t) => write!(f, "<{}>", t.name()),
            Tok::End(t) => write!(f, "</{}>", t.name()),
            Tok::Eof => f.write_str("end of input"),
        }
    }
}

/// Character data being collected: borrowed from the input as long as it is one plain piece.
#[derive(Default)]
struct Text<'a>(Cow<'a, str>);

impl<'a> Text<'a> {
    fn push(&mut self, piece: Piece<'a>, at: u64) -> Result<(), XmlRpcError> {
        match piece {
            Piece::Raw(b) | Piece::CData(b) => {
                let s = match b {
                    Cow::Borrowed(b) => Cow::Borrowed(
                        std::str::from_utf8(b).map_err(|_| XmlRpcError::InvalidUtf8 { at })?,
                    ),
                    Cow::Owned(b) => Cow::Owned(
                        String::from_utf8(b).map_err(|_| XmlRpcError::InvalidUtf8 { at })?,
                    ),
                };
                // XML turns CR LF and lone CR into LF before parsing; a CR that must survive
                // is written as a character reference (as the encoder does).
                let s = if s.as_bytes().contains(&b'\r') {
                    Cow::Owned(s.replace("\r\n", "\n").replace('\r', "\n"))
                } else {
                    s
                };
                if self.0.is_empty() {
                    self.0 = s;
                } else {
                    self.0.to_mut().push_str(&s);
                }
            }
            Piece::Ref(name) => {
                let c = resolve(&name).ok_or_else(|| XmlRpcError::BadReference {
                    name: clean_bytes(&name, 20),
                    at,
                })?;
                self.0.to_mut().push(c);
            }
        }
        Ok(())
    }

    fn is_whitespace(&self) -> bool {
        self.0
            .bytes()
            .all(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
    }

    fn as_str(&self) -> &str {
        &self.0
    }

    fn into_string(self) -> String {
        self.0.into_owned()
    }
}

/// The five predefined entities and character references. `&#0;` is accepted (XML forbids
/// it, but the encoder has to write NUL somehow to round-trip every Rust string).
fn resolve(name: &[u8]) -> Option<char> {
    match name {
        b"lt" => Some('<'),
        b"gt" => Some('>'),
        b"amp" => Some('&'),
        b"apos" => Some('\''),
        b"quot" => Some('"'),
        [b'#', b'x', hex @ ..] => char_from(hex, 16),
        [b'#', dec @ ..] => char_from(dec, 10),
        _ => None,
    }
}

fn char_from(digits: &[u8], radix: u32) -> Option<char> {
    // from_str_radix would accept a sign; a reference has digits only.
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(|d| d.is_ascii_hexdigit()) {
        return None;
    }
    let s = std::str::from_utf8(digits).ok()?;
    char::from_u32(u32::from_str_radix(s, radix).ok()?)
}

/// A struct or array whose members are being read.
enum Frame {
    Struct {
        members: BTreeMap<String, Value>,
        /// The name of the member whose value is being read.
        key: String,
    },
    Array(Vec<Value>),
}

/// What followed a `<value>` start tag.
enum Body {
    Done(Value),
    Struct,
    Array,
}

struct Parser<'a> {
    reader: Reader<&'a [u8]>,
    limits: Limits,
    values: usize,
    /// Whether anything but an XML declaration has been seen.
    started: bool,
}

impl<'a> Parser<'a> {
    fn new(bytes: &'a [u8], limits: Limits) -> Self {
        let mut reader = Reader::from_reader(bytes);
        let config = reader.config_mut();
        // `<value/>` then reads as `<value></value>`: one code path for both.
        config.expand_empty_elements = true;
        config.check_end_names = true;
        Parser {
            reader,
            limits,
            values: 0,
            started: false,
        }
    }

    fn pos(&self) -> u64 {
        self.reader.buffer_position()
    }

    fn next(&mut self) -> Result<Ev<'a>, XmlRpcError> {
        loop {
            let ev = self.reader.read_event().map_err(|e| XmlRpcError::Syntax {
                at: self.reader.error_position(),
                msg: super::clean(&e.to_string(), 120),
            })?;
            let ev = match ev {
                Event::Start(e) => Ev::Start(Tag::of(e.name().as_ref())),
                Event::End(e) => Ev::End(Tag::of(e.name().as_ref())),
                Event::Empty(e) => {
                    // Not produced with expand_empty_elements; refuse rather than misparse.
                    return Err(XmlRpcError::UnexpectedTag {
                        found: format!("<{}/>", Tag::of(e.name().as_ref()).name()),
                        expected: "an expanded element",
                        at: self.pos(),
                    });
                }
                Event::Text(t) => Ev::Text(Piece::Raw(t.into_inner())),
                Event::CData(t) => Ev::Text(Piece::CData(t.into_inner())),
                Event::GeneralRef(r) => Ev::Text(Piece::Ref(r.into_inner())),
                Event::Comment(_) | Event::PI(_) => continue,
                Event::Decl(_) if !self.started => continue,
                Event::Decl(_) => {
                    return Err(XmlRpcError::Syntax {
                        at: self.pos(),
                        msg: "XML declaration not at the start".into(),
                    })
                }
                // Entity declarations are how XML bombs work; XML-RPC never needs one.
                Event::DocType(_) => return Err(XmlRpcError::DocType),
                Event::Eof => Ev::Eof,
            };
            self.started = true;
            return Ok(ev);
        }
    }

    /// The next tag, skipping whitespace between elements.
    fn tag(&mut self, expected: &'static str) -> Result<Tok, XmlRpcError> {
        loop {
            match self.next()? {
                Ev::Text(p) if p.is_whitespace() => {}
                Ev::Text(_) => {
                    return Err(XmlRpcError::UnexpectedText {
                        expected,
                        at: self.pos(),
                    })
                }
                Ev::Start(t) => return Ok(Tok::Start(t)),
                Ev::End(t) => return Ok(Tok::End(t)),
                Ev::Eof => return Ok(Tok::Eof),
            }
        }
    }

    fn unexpected(&self, found: Tok, expected: &'static str) -> XmlRpcError {
        match found {
            Tok::Eof => XmlRpcError::UnexpectedEof { expected },
            t => XmlRpcError::UnexpectedTag {
                found: t.to_string(),
                expected,
                at: self.pos(),
            },
        }
    }

    fn expect_start(&mut self, want: Tag, expected: &'static str) -> Result<(), XmlRpcError> {
        match self.tag(expected)? {
            Tok::Start(t) if t == want => Ok(()),
            t => Err(self.unexpected(t, expected)),
        }
    }

    fn expect_end(&mut self, want: Tag, expected: &'static str) -> Result<(), XmlRpcError> {
        match self.tag(expected)? {
            Tok::End(t) if t == want => Ok(()),
            t => Err(self.unexpected(t, expected)),
        }
    }

    /// After the root element: only whitespace, comments and processing instructions.
    fn finish(&mut self) -> Result<(), XmlRpcError> {
        loop {
            match self.next() {
                Ok(Ev::Eof) => return Ok(()),
                Ok(Ev::Text(p)) if p.is_whitespace() => {}
                _ => return Err(XmlRpcError::TrailingGarbage { at: self.pos() }),
            }
        }
    }

    /// The character data up to `</end>`; any element inside is an error.
    fn text_until(&mut self, end: Tag, expected: &'static str) -> Result<Text<'a>, XmlRpcError> {
        let mut text = Text::default();
        loop {
            match self.next()? {
                Ev::Text(p) => {
                    let at = self.pos();
                    text.push(p, at)?;
                }
                Ev::End(t) if t == end => return Ok(text),
                Ev::Start(t) => return Err(self.unexpected(Tok::Start(t), expected)),
                Ev::End(t) => return Err(self.unexpected(Tok::End(t), expected)),
                Ev::Eof => return Err(XmlRpcError::UnexpectedEof { expected }),
            }
        }
    }

    /// A value, its `<value>` start tag already read, up to and including `</value>`.
    fn value(&mut self) -> Result<Value, XmlRpcError> {
        let mut stack: Vec<Frame> = Vec::new();
        // Each turn of the outer loop starts just after a `<value>` start tag.
        'value: loop {
            self.values += 1;
            if self.values > self.limits.max_values {
                return Err(XmlRpcError::TooManyValues {
                    limit: self.limits.max_values,
                });
            }
            let mut done = match self.value_body()? {
                Body::Done(v) => Some(v),
                opened => {
                    if stack.len() >= self.limits.max_depth {
                        return Err(XmlRpcError::TooDeep {
                            limit: self.limits.max_depth,
                        });
                    }
                    stack.push(match opened {
                        Body::Array => {
                            self.expect_start(Tag::Data, "<data>")?;
                            Frame::Array(Vec::new())
                        }
                        _ => Frame::Struct {
                            members: BTreeMap::new(),
                            key: String::new(),
                        },
                    });
                    None
                }
            };
            // Attach finished values to their container and read the container's next
            // item, until a new `<value>` starts or the outermost value is complete.
            loop {
                if let Some(v) = done.take() {
                    match stack.last_mut() {
                        None => return Ok(v),
                        Some(Frame::Array(items)) => items.push(v),
                        Some(Frame::Struct { members, key }) => {
                            let at = self.pos();
                            match members.entry(std::mem::take(key)) {
                                Entry::Vacant(e) => {
                                    e.insert(v);
                                }
                                Entry::Occupied(e) => {
                                    return Err(XmlRpcError::DuplicateMember {
                                        name: super::clean(e.key(), 40),
                                        at,
                                    })
                                }
                            }
                            self.expect_end(Tag::Member, "</member>")?;
                        }
                    }
                }
                match stack.last_mut() {
                    Some(Frame::Struct { key, .. }) => match self.tag("<member> or </struct>")? {
                        Tok::Start(Tag::Member) => {
                            self.expect_start(Tag::Name, "<name>")?;
                            *key = self.text_until(Tag::Name, "the member name")?.into_string();
                            self.expect_start(Tag::Value, "<value>")?;
                            continue 'value;
                        }
                        Tok::End(Tag::Struct) => {
                            self.expect_end(Tag::Value, "</value>")?;
                            if let Some(Frame::Struct { members, .. }) = stack.pop() {
                                done = Some(Value::Struct(members));
                            }
                        }
                        t => return Err(self.unexpected(t, "<member> or </struct>")),
                    },
                    Some(Frame::Array(_)) => match self.tag("<value> or </data>")? {
                        Tok::Start(Tag::Value) => continue 'value,
                        Tok::End(Tag::Data) => {
                            self.expect_end(Tag::Array, "</array>")?;
                            self.expect_end(Tag::Value, "</value>")?;
                            if let Some(Frame::Array(items)) = stack.pop() {
                                done = Some(Value::Array(items));
                            }
                        }
                        t => return Err(self.unexpected(t, "<value> or </data>")),
                    },
                    // Unreachable: a value that opened no container returned above.
                    None => {
                        return Err(XmlRpcError::UnexpectedEof {
                            expected: "a value",
                        })
                    }
                }
            }
        }
    }

    /// What follows `<value>`: a scalar (read through `</value>`), or an opened container.
    fn value_body(&mut self) -> Result<Body, XmlRpcError> {
        let mut text = Text::default();
        loop {
            match self.next()? {
                Ev::Text(p) => {
                    let at = self.pos();
                    text.push(p, at)?;
                }
                // Untyped text is a string.
                Ev::End(Tag::Value) => return Ok(Body::Done(Value::String(text.into_string()))),
                Ev::Start(t) => {
                    if !text.is_whitespace() {
                        return Err(XmlRpcError::MixedContent { at: self.pos() });
                    }
                    return match t {
                        Tag::Struct => Ok(Body::Struct),
                        Tag::Array => Ok(Body::Array),
                        Tag::I4
                        | Tag::Int
                        | Tag::I8
                        | Tag::Boolean
                        | Tag::String
                        | Tag::Double
                        | Tag::DateTime
                        | Tag::Base64
                        | Tag::Nil => {
                            let text = self.text_until(t.clone(), "the end of the scalar")?;
                            let at = self.pos();
                            let v = scalar(&t, text, at)?;
                            self.expect_end(Tag::Value, "</value>")?;
                            Ok(Body::Done(v))
                        }
                        t => Err(self.unexpected(Tok::Start(t), "a value type")),
                    };
                }
                Ev::End(t) => return Err(self.unexpected(Tok::End(t), "</value>")),
                Ev::Eof => {
                    return Err(XmlRpcError::UnexpectedEof {
                        expected: "</value>",
                    })
                }
            }
        }
    }
}

/// Convert the text of a typed scalar element.
fn scalar(tag: &Tag, text: Text<'_>, at: u64) -> Result<Value, XmlRpcError> {
    let bad = |ty: &'static str, text: &Text<'_>| XmlRpcError::BadScalar {
        ty,
        text: super::clean(text.as_str(), 40),
        at,
    };
    let trimmed = text
        .as_str()
        .trim_matches(|c| matches!(c, ' ' | '\t' | '\n' | '\r'));
    Ok(match tag {
        // XML-RPC's int is 32-bit, but XAPI's parser takes any 64-bit value in any of the
        // three, and so do we.
        Tag::I4 | Tag::Int | Tag::I8 => Value::Int(trimmed.parse().map_err(|_| bad("int", &text))?),
        Tag::Boolean => Value::Bool(match trimmed {
            "1" | "true" => true,
            "0" | "false" => false,
            _ => return Err(bad("boolean", &text)),
        }),
        Tag::Double => Value::Double(trimmed.parse().map_err(|_| bad("double", &text))?),
        Tag::Base64 => {
            Value::Base64(decode_base64(text.as_str()).ok_or_else(|| bad("base64", &text))?)
        }
        Tag::Nil if trimmed.is_empty() => Value::Nil,
        Tag::Nil => return Err(bad("nil", &text)),
        Tag::DateTime => Value::DateTime(text.into_string()),
        _ => Value::String(text.into_string()),
    })
}

/// Standard base64; line breaks (which many encoders insert every 76 characters) are ignored.
fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let engine = &base64::engine::general_purpose::STANDARD;
    if s.bytes().any(|c| c.is_ascii_whitespace()) {
        let compact: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
        engine.decode(compact).ok()
    } else {
        engine.decode(s).ok()
    }
}
