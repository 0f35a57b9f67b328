//! Transmission phase: requests, reply headers, structured chunks, and the bookkeeping that
//! checks the chunks of one READ cover it exactly once.

use super::consts::*;
use super::{sanitize_message, NbdError, ServerError};
use crate::reader::Reader;
use std::collections::BTreeMap;

/// The largest READ we ever send, and the largest any server should be asked for
/// (the protocol's interoperability limit).
pub const MAX_REQUEST_LEN: u64 = 32 * 1024 * 1024;
/// The largest chunk payload we accept: a full-size read plus its 8-byte offset, or a
/// block-status reply of 2^20 extended descriptors.
pub const MAX_CHUNK_PAYLOAD: u64 = MAX_REQUEST_LEN + 8;
/// Longest error message we keep from a server.
const MAX_ERROR_MESSAGE: usize = 4096;

/// One request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub cmd: u16,
    pub flags: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u64,
}

/// Append the wire form of `req` to `out`: 28 bytes, or 32 with extended headers.
pub fn encode_request(out: &mut Vec<u8>, extended: bool, req: &Request) -> Result<(), NbdError> {
    if extended {
        out.extend_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
    } else {
        if req.length > u64::from(u32::MAX) {
            return Err(NbdError::BadRequestLength(req.length));
        }
        out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    }
    out.extend_from_slice(&req.flags.to_be_bytes());
    out.extend_from_slice(&req.cmd.to_be_bytes());
    out.extend_from_slice(&req.cookie.to_be_bytes());
    out.extend_from_slice(&req.offset.to_be_bytes());
    if extended {
        out.extend_from_slice(&req.length.to_be_bytes());
    } else {
        out.extend_from_slice(&(req.length as u32).to_be_bytes());
    }
    Ok(())
}

/// Decode a request (server side). Returns the request and its encoded length.
pub fn parse_request(buf: &[u8], extended: bool) -> Result<Option<(Request, usize)>, NbdError> {
    let need = if extended { 32 } else { 28 };
    if buf.len() < need {
        return Ok(None);
    }
    let mut r = Reader::new(&buf[..need]);
    let short = |_| NbdError::MalformedChunk {
        kind: "request",
        why: "short",
    };
    let magic = r.u32_be().map_err(short)?;
    let want = if extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    if magic != want {
        return Err(NbdError::BadReplyMagic(magic));
    }
    let flags = r.u16_be().map_err(short)?;
    let cmd = r.u16_be().map_err(short)?;
    let cookie = r.u64_be().map_err(short)?;
    let offset = r.u64_be().map_err(short)?;
    let length = if extended {
        r.u64_be().map_err(short)?
    } else {
        u64::from(r.u32_be().map_err(short)?)
    };
    Ok(Some((
        Request {
            cmd,
            flags,
            cookie,
            offset,
            length,
        },
        need,
    )))
}

/// The fixed part of a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply; for a successful READ, exactly the request's length of data follows.
    Simple { cookie: u64, error: u32 },
    /// A structured (or extended) reply chunk; `length` bytes of payload follow.
    Chunk {
        flags: u16,
        typ: u16,
        cookie: u64,
        /// Extended headers echo the request's offset here.
        offset: Option<u64>,
        length: u64,
    },
}

impl ReplyHeader {
    pub fn cookie(&self) -> u64 {
        match *self {
            ReplyHeader::Simple { cookie, .. } | ReplyHeader::Chunk { cookie, .. } => cookie,
        }
    }
}

/// Parse the reply header at the front of `buf`. `Ok(None)`: more bytes are needed.
/// Returns the header and its length on the wire. Checks the magic against what was
/// negotiated and the payload length against [`MAX_CHUNK_PAYLOAD`].
pub fn parse_reply_header(
    buf: &[u8],
    structured: bool,
    extended: bool,
) -> Result<Option<(ReplyHeader, usize)>, NbdError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let magic = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let short = |_| NbdError::MalformedChunk {
        kind: "reply header",
        why: "short",
    };
    match magic {
        SIMPLE_REPLY_MAGIC => {
            if extended {
                return Err(NbdError::UnexpectedSimpleReply);
            }
            if buf.len() < 16 {
                return Ok(None);
            }
            let mut r = Reader::new(&buf[4..16]);
            let error = r.u32_be().map_err(short)?;
            let cookie = r.u64_be().map_err(short)?;
            Ok(Some((ReplyHeader::Simple { cookie, error }, 16)))
        }
        STRUCTURED_REPLY_MAGIC | EXTENDED_REPLY_MAGIC => {
            let is_ext = magic == EXTENDED_REPLY_MAGIC;
            if !structured || is_ext != extended {
                return Err(NbdError::UnexpectedStructuredReply);
            }
            let need = if is_ext { 32 } else { 20 };
            if buf.len() < need {
                return Ok(None);
            }
            let mut r = Reader::new(&buf[4..need]);
            let flags = r.u16_be().map_err(short)?;
            let typ = r.u16_be().map_err(short)?;
            let cookie = r.u64_be().map_err(short)?;
            let (offset, length) = if is_ext {
                (Some(r.u64_be().map_err(short)?), r.u64_be().map_err(short)?)
            } else {
                (None, u64::from(r.u32_be().map_err(short)?))
            };
            if length > MAX_CHUNK_PAYLOAD {
                return Err(NbdError::ChunkTooLong(length));
            }
            Ok(Some((
                ReplyHeader::Chunk {
                    flags,
                    typ,
                    cookie,
                    offset,
                    length,
                },
                need,
            )))
        }
        other => Err(NbdError::BadReplyMagic(other)),
    }
}

/// One block-status extent: a length and the `base:allocation` flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatusExtent {
    pub length: u64,
    pub flags: u64,
}

/// A parsed chunk payload (everything but OFFSET_DATA, whose data the client streams
/// straight into its buffer; see [`parse_offset_data_prefix`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    None,
    OffsetHole {
        offset: u64,
        length: u64,
    },
    BlockStatus {
        context: u32,
        extents: Vec<BlockStatusExtent>,
    },
    Error(ServerError),
}

/// Validate an OFFSET_DATA chunk's length and read its 8-byte offset from `prefix`.
/// Returns (offset, data length).
pub fn parse_offset_data_prefix(length: u64, prefix: &[u8]) -> Result<(u64, u64), NbdError> {
    if length < 9 {
        return Err(NbdError::MalformedChunk {
            kind: "OFFSET_DATA",
            why: "shorter than 9 bytes",
        });
    }
    let mut r = Reader::new(prefix);
    let offset = r.u64_be().map_err(|_| NbdError::MalformedChunk {
        kind: "OFFSET_DATA",
        why: "short",
    })?;
    Ok((offset, length - 8))
}

/// Parse a whole chunk payload of type `typ` (not OFFSET_DATA).
pub fn parse_chunk_payload(typ: u16, payload: &[u8], extended: bool) -> Result<Chunk, NbdError> {
    let mut r = Reader::new(payload);
    match typ {
        CHUNK_NONE => {
            if !payload.is_empty() {
                return Err(NbdError::MalformedChunk {
                    kind: "NONE",
                    why: "non-empty payload",
                });
            }
            Ok(Chunk::None)
        }
        CHUNK_OFFSET_HOLE => {
            let bad = NbdError::MalformedChunk {
                kind: "OFFSET_HOLE",
                why: "length is not 12",
            };
            if payload.len() != 12 {
                return Err(bad);
            }
            let offset = r.u64_be().map_err(|_| bad.clone())?;
            let length = u64::from(r.u32_be().map_err(|_| bad.clone())?);
            if length == 0 {
                return Err(NbdError::MalformedChunk {
                    kind: "OFFSET_HOLE",
                    why: "zero length",
                });
            }
            Ok(Chunk::OffsetHole { offset, length })
        }
        CHUNK_BLOCK_STATUS | CHUNK_BLOCK_STATUS_EXT => {
            let ext_type = typ == CHUNK_BLOCK_STATUS_EXT;
            if ext_type != extended {
                return Err(NbdError::UnexpectedChunk("BLOCK_STATUS of the wrong width"));
            }
            let kind = "BLOCK_STATUS";
            let bad = |why| NbdError::MalformedChunk { kind, why };
            let context = r.u32_be().map_err(|_| bad("short"))?;
            let mut extents = Vec::new();
            if ext_type {
                let count = r.u32_be().map_err(|_| bad("short"))?;
                if r.remaining() % 16 != 0 || r.remaining() / 16 != count as usize {
                    return Err(bad("descriptor count does not match the length"));
                }
                extents.reserve(count as usize);
                while !r.is_empty() {
                    let length = r.u64_be().map_err(|_| bad("short"))?;
                    let flags = r.u64_be().map_err(|_| bad("short"))?;
                    extents.push(BlockStatusExtent { length, flags });
                }
            } else {
                if r.remaining() % 8 != 0 {
                    return Err(bad("length is not 4 + 8n"));
                }
                extents.reserve(r.remaining() / 8);
                while !r.is_empty() {
                    let length = u64::from(r.u32_be().map_err(|_| bad("short"))?);
                    let flags = u64::from(r.u32_be().map_err(|_| bad("short"))?);
                    extents.push(BlockStatusExtent { length, flags });
                }
            }
            if extents.is_empty() {
                return Err(bad("no descriptors"));
            }
            if extents.iter().any(|e| e.length == 0) {
                return Err(bad("zero-length descriptor"));
            }
            Ok(Chunk::BlockStatus { context, extents })
        }
        t if t & CHUNK_ERROR_BIT != 0 => {
            let kind = "ERROR";
            let bad = |why| NbdError::MalformedChunk { kind, why };
            let code = r.u32_be().map_err(|_| bad("short"))?;
            let mlen = r.u16_be().map_err(|_| bad("short"))? as usize;
            if mlen > r.remaining() {
                return Err(bad("message longer than the chunk"));
            }
            let msg = r.take(mlen).map_err(|_| bad("short"))?;
            let offset = if t == CHUNK_ERROR_OFFSET {
                Some(r.u64_be().map_err(|_| bad("short"))?)
            } else {
                None
            };
            if (t == CHUNK_ERROR || t == CHUNK_ERROR_OFFSET) && !r.is_empty() {
                return Err(bad("trailing bytes"));
            }
            let message = (!msg.is_empty()).then(|| sanitize_message(msg, MAX_ERROR_MESSAGE));
            // An error chunk must carry an error; 0 is a protocol violation we report as EINVAL.
            let code = if code == 0 { EINVAL } else { code };
            Ok(Chunk::Error(ServerError {
                code,
                message,
                offset,
            }))
        }
        CHUNK_OFFSET_DATA => Err(NbdError::UnexpectedChunk("OFFSET_DATA")),
        other => Err(NbdError::UnknownChunkType(other)),
    }
}

/// Tracks which bytes of one READ the reply chunks have covered, so that overlaps, gaps and
/// out-of-range chunks are caught. Chunks may arrive in any order.
#[derive(Debug, Clone)]
pub struct ReadAssembly {
    start: u64,
    len: u64,
    covered: u64,
    /// start -> end of every range covered so far.
    ranges: BTreeMap<u64, u64>,
    error: Option<ServerError>,
}

impl ReadAssembly {
    pub fn new(offset: u64, len: u64) -> Self {
        ReadAssembly {
            start: offset,
            len,
            covered: 0,
            ranges: BTreeMap::new(),
            error: None,
        }
    }

    /// Record that `[offset, offset + len)` was delivered. Returns the position of that range
    /// inside the request's buffer.
    pub fn cover(&mut self, offset: u64, len: u64) -> Result<std::ops::Range<usize>, NbdError> {
        let end = offset.checked_add(len);
        let req_end = self.start + self.len;
        let out_of_range = NbdError::OutOfRange {
            start: offset,
            end: end.unwrap_or(u64::MAX),
            req_start: self.start,
            req_end,
        };
        let Some(end) = end else {
            return Err(out_of_range);
        };
        if len == 0 || offset < self.start || end > req_end {
            return Err(out_of_range);
        }
        if let Some((_, &prev_end)) = self.ranges.range(..=offset).next_back() {
            if prev_end > offset {
                return Err(NbdError::Overlap(offset));
            }
        }
        if let Some((&next_start, _)) = self.ranges.range(offset..).next() {
            if next_start < end {
                return Err(NbdError::Overlap(next_start));
            }
        }
        self.ranges.insert(offset, end);
        self.covered += len;
        let rel = (offset - self.start) as usize;
        Ok(rel..rel + len as usize)
    }

    /// Remember a server error for this request (the first one wins).
    pub fn fail(&mut self, err: ServerError) {
        self.error.get_or_insert(err);
    }

    /// Call when the DONE chunk arrived: Ok if the reply covered the request exactly once,
    /// Err(Ok(server error)) if the server reported one, Err(Err(protocol error)) otherwise.
    pub fn finish(&self) -> Result<(), Result<ServerError, NbdError>> {
        if let Some(e) = &self.error {
            return Err(Ok(e.clone()));
        }
        if self.covered != self.len {
            return Err(Err(NbdError::Incomplete {
                covered: self.covered,
                expected: self.len,
            }));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_round_trip() {
        for ext in [false, true] {
            let req = Request {
                cmd: CMD_READ,
                flags: 0,
                cookie: 7,
                offset: 512,
                length: 65536,
            };
            let mut out = Vec::new();
            encode_request(&mut out, ext, &req).unwrap();
            assert_eq!(out.len(), if ext { 32 } else { 28 });
            assert_eq!(parse_request(&out, ext).unwrap(), Some((req, out.len())));
        }
    }

    #[test]
    fn oversized_chunk_rejected_before_allocation() {
        let mut h = Vec::new();
        h.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        h.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
        h.extend_from_slice(&CHUNK_OFFSET_DATA.to_be_bytes());
        h.extend_from_slice(&1u64.to_be_bytes());
        h.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            parse_reply_header(&h, true, false),
            Err(NbdError::ChunkTooLong(u32::MAX as u64))
        );
    }

    #[test]
    fn assembly_catches_overlap_gap_and_range() {
        let mut a = ReadAssembly::new(4096, 4096);
        assert_eq!(a.cover(4096 + 1024, 1024).unwrap(), 1024..2048);
        assert!(matches!(
            a.cover(4096 + 1536, 1024),
            Err(NbdError::Overlap(_))
        ));
        assert!(matches!(a.cover(4096, 2048), Err(NbdError::Overlap(_))));
        assert!(matches!(a.cover(0, 10), Err(NbdError::OutOfRange { .. })));
        assert!(matches!(
            a.cover(8000, 1000),
            Err(NbdError::OutOfRange { .. })
        ));
        assert!(matches!(
            a.cover(u64::MAX, 2),
            Err(NbdError::OutOfRange { .. })
        ));
        a.cover(4096, 1024).unwrap();
        assert!(matches!(a.finish(), Err(Err(NbdError::Incomplete { .. }))));
        a.cover(4096 + 2048, 2048).unwrap();
        assert_eq!(a.finish(), Ok(()));
    }

    #[test]
    fn error_chunk_parsed() {
        let mut p = Vec::new();
        p.extend_from_slice(&EIO.to_be_bytes());
        p.extend_from_slice(&3u16.to_be_bytes());
        p.extend_from_slice(b"bad");
        p.extend_from_slice(&4096u64.to_be_bytes());
        let c = parse_chunk_payload(CHUNK_ERROR_OFFSET, &p, false).unwrap();
        assert_eq!(
            c,
            Chunk::Error(ServerError {
                code: EIO,
                message: Some("bad".into()),
                offset: Some(4096)
            })
        );
        assert!(parse_chunk_payload(CHUNK_ERROR, &p[..5], false).is_err());
    }

    proptest! {
        #[test]
        fn reply_parsers_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..64),
                                     s in any::<bool>(), e in any::<bool>(), typ in any::<u16>()) {
            let _ = parse_reply_header(&buf, s, e);
            let _ = parse_chunk_payload(typ, &buf, e);
            let _ = parse_request(&buf, e);
        }

        #[test]
        fn assembly_never_panics(ops in proptest::collection::vec((any::<u64>(), any::<u64>()), 0..16)) {
            let mut a = ReadAssembly::new(1 << 20, 1 << 16);
            for (o, l) in ops { let _ = a.cover(o, l); }
            let _ = a.finish();
        }
    }
}
