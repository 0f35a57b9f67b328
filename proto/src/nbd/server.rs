//! Server-side encoders and parsers, for the test servers (a XenServer-profile server and a
//! hostile server). Each function appends wire bytes to `out` or parses one client message.

use super::consts::*;
use super::NbdError;
use crate::reader::Reader;

/// The 18-byte greeting. XenServer sends `FLAG_FIXED_NEWSTYLE` only.
pub fn encode_greeting(out: &mut Vec<u8>, handshake_flags: u16) {
    out.extend_from_slice(&NBDMAGIC.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&handshake_flags.to_be_bytes());
}

/// Parse the client's 4-byte flags.
pub fn parse_client_flags(buf: &[u8]) -> Option<u32> {
    Reader::new(buf).u32_be().ok()
}

/// Longest option data a server accepts from a client.
pub const MAX_OPTION_DATA: u32 = 16 * 1024;

/// One option sent by a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOption {
    pub option: u32,
    pub data: Vec<u8>,
}

/// Parse the option at the front of `buf`; returns it and its length, or `Ok(None)` if more
/// bytes are needed.
pub fn parse_client_option(buf: &[u8]) -> Result<Option<(ClientOption, usize)>, NbdError> {
    if buf.len() < 16 {
        return Ok(None);
    }
    let mut r = Reader::new(buf);
    let short = |_| NbdError::MalformedOptionReply("short option");
    let magic = r.u64_be().map_err(short)?;
    if magic != IHAVEOPT {
        return Err(NbdError::BadOptionReplyMagic(magic));
    }
    let option = r.u32_be().map_err(short)?;
    let len = r.u32_be().map_err(short)?;
    if len > MAX_OPTION_DATA {
        return Err(NbdError::OptionReplyTooLong(len));
    }
    let Ok(data) = r.take(len as usize) else {
        return Ok(None);
    };
    Ok(Some((
        ClientOption {
            option,
            data: data.to_vec(),
        },
        16 + len as usize,
    )))
}

/// An option reply (ACK, INFO, an error...).
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, typ: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&typ.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// The reply to NBD_OPT_EXPORT_NAME: size, flags, and 124 zero bytes unless NO_ZEROES.
pub fn encode_export_name_reply(out: &mut Vec<u8>, size: u64, flags: u16, no_zeroes: bool) {
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
}

/// The data of an NBD_INFO_EXPORT reply.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut d = Vec::with_capacity(12);
    d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    d
}

/// The data of an NBD_INFO_BLOCK_SIZE reply.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut d = Vec::with_capacity(14);
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    d.extend_from_slice(&min.to_be_bytes());
    d.extend_from_slice(&preferred.to_be_bytes());
    d.extend_from_slice(&max.to_be_bytes());
    d
}

/// A simple reply header (the READ data, if any, follows).
pub fn encode_simple_reply(out: &mut Vec<u8>, cookie: u64, error: u32) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// A structured (or, with `extended = Some(request offset)`, extended) chunk header.
pub fn encode_chunk_header(
    out: &mut Vec<u8>,
    extended: Option<u64>,
    flags: u16,
    typ: u16,
    cookie: u64,
    length: u64,
) {
    match extended {
        Some(offset) => {
            out.extend_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
            out.extend_from_slice(&typ.to_be_bytes());
            out.extend_from_slice(&cookie.to_be_bytes());
            out.extend_from_slice(&offset.to_be_bytes());
            out.extend_from_slice(&length.to_be_bytes());
        }
        None => {
            out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
            out.extend_from_slice(&typ.to_be_bytes());
            out.extend_from_slice(&cookie.to_be_bytes());
            out.extend_from_slice(&(length as u32).to_be_bytes());
        }
    }
}

/// An ERROR (or ERROR_OFFSET, with `offset`) chunk payload.
pub fn error_payload(code: u32, message: &str, offset: Option<u64>) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(4096)];
    let mut p = Vec::new();
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    p.extend_from_slice(msg);
    if let Some(o) = offset {
        p.extend_from_slice(&o.to_be_bytes());
    }
    p
}
