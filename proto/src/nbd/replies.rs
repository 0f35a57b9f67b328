//! The client's side of the transmission phase as a state machine, sans I/O: which requests
//! are outstanding, and what every reply byte means for them.
//!
//! The driver keeps the bytes it has read in a buffer, calls [`Replies::poll`] and does what
//! the returned [`Event`] says. Every check lives here: reply magic and length limits, the
//! chunk type against the command, OFFSET_DATA/OFFSET_HOLE covering a READ exactly once, the
//! DONE flag, error chunks, the block-status context and extents. READ data never passes
//! through the machine: [`Event::Data`] tells the driver to move the next bytes of the
//! stream straight into the request's own buffer.

use super::consts::*;
use super::transmission::{
    parse_chunk_payload, parse_offset_data_prefix, parse_reply_header, BlockStatusExtent, Chunk,
    ReadAssembly, ReplyHeader, MAX_CHUNK_PAYLOAD, MAX_REQUEST_LEN,
};
use super::{NbdError, Negotiated, ServerError};
use bytes::{Buf, BytesMut};
use std::collections::HashMap;
use std::ops::Range;

/// The largest error chunk: code, message length, a message of up to 65535 bytes, offset.
const MAX_ERROR_CHUNK: u64 = 4 + 2 + 65535 + 8;

/// A request sent to the server, as the machine needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outstanding {
    /// `CMD_READ` or `CMD_BLOCK_STATUS`.
    pub cmd: u16,
    pub offset: u64,
    pub length: u64,
}

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Read from the stream until the buffer holds at least this many bytes.
    NeedBytes(usize),
    /// A reply for this cookie arrived and the machine has not been told about it: call
    /// [`Replies::begin`] with the request sent under it, or fail with
    /// [`NbdError::UnknownCookie`] if there is none.
    NeedRequest(u64),
    /// The next `range.len()` bytes of the stream (the buffered ones first) are data of the
    /// READ `cookie`: move them to `range` of its buffer (positions relative to the request's
    /// offset; always inside `0..length`, never overlapping earlier data or holes).
    Data { cookie: u64, range: Range<usize> },
    /// `range` of the READ `cookie`'s buffer reads as zeroes (same guarantees as `Data`).
    Hole { cookie: u64, range: Range<usize> },
    /// The request is finished and forgotten.
    Done { cookie: u64, outcome: Outcome },
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `Data` and `Hole` events covered every byte of the READ exactly once.
    Read,
    /// The block status of the request's range: at least one extent, each non-empty, in
    /// order from the request's offset, clipped to the request.
    BlockStatus(Vec<BlockStatusExtent>),
    /// The server failed the request (the first error it reported); the connection is
    /// still usable.
    Failed(ServerError),
}

struct Request {
    cmd: u16,
    offset: u64,
    length: u64,
    /// A structured reply chunk has arrived for it.
    started: bool,
    coverage: ReadAssembly,
    extents: Option<Vec<BlockStatusExtent>>,
    error: Option<ServerError>,
}

/// The reply side of one connection.
pub struct Replies {
    structured: bool,
    extended: bool,
    meta_context: Option<u32>,
    requests: HashMap<u64, Request>,
    /// A header read but not acted on yet: its request or its payload is still to come.
    header: Option<ReplyHeader>,
    /// A request whose final payload was just handed out as `Data`: finish it next.
    finish_next: Option<u64>,
}

impl Replies {
    pub fn new(negotiated: &Negotiated) -> Self {
        Replies {
            structured: negotiated.structured,
            extended: negotiated.extended,
            meta_context: negotiated.meta_context,
            requests: HashMap::new(),
            header: None,
            finish_next: None,
        }
    }

    /// Requests begun and not finished.
    pub fn outstanding(&self) -> usize {
        self.requests.len()
    }

    /// Tell the machine about the request sent under `cookie` (typically when it asks with
    /// [`Event::NeedRequest`]).
    pub fn begin(&mut self, cookie: u64, req: Outstanding) -> Result<(), NbdError> {
        let max = match req.cmd {
            CMD_READ => MAX_REQUEST_LEN,
            CMD_BLOCK_STATUS => u64::from(u32::MAX),
            other => return Err(NbdError::UnsupportedCommand(other)),
        };
        if req.length == 0 || req.length > max || req.offset.checked_add(req.length).is_none() {
            return Err(NbdError::BadRequestLength(req.length));
        }
        if self.requests.contains_key(&cookie) {
            return Err(NbdError::DuplicateCookie(cookie));
        }
        self.requests.insert(
            cookie,
            Request {
                cmd: req.cmd,
                offset: req.offset,
                length: req.length,
                started: false,
                coverage: ReadAssembly::new(req.offset, req.length),
                extents: None,
                error: None,
            },
        );
        Ok(())
    }

    /// Consume what `input` holds of the reply stream and say what to do next. After
    /// [`Event::Data`] the driver must take exactly that many bytes off the stream (from
    /// `input` first) before polling again. Any error means the connection is unusable.
    pub fn poll(&mut self, input: &mut BytesMut) -> Result<Event, NbdError> {
        loop {
            if let Some(event) = self.step(input)? {
                return Ok(event);
            }
        }
    }

    /// One move: an event, or None when a chunk was absorbed and the next header is due.
    fn step(&mut self, input: &mut BytesMut) -> Result<Option<Event>, NbdError> {
        if let Some(cookie) = self.finish_next.take() {
            return self.finish(cookie).map(Some);
        }
        let header = match self.header {
            Some(h) => h,
            None => match parse_reply_header(input, self.structured, self.extended)? {
                Some((h, n)) => {
                    input.advance(n);
                    self.header = Some(h);
                    h
                }
                None => return Ok(Some(Event::NeedBytes(input.len() + 1))),
            },
        };
        let cookie = header.cookie();
        let Some(req) = self.requests.get_mut(&cookie) else {
            return Ok(Some(Event::NeedRequest(cookie)));
        };
        match header {
            ReplyHeader::Simple { error, .. } => {
                self.header = None;
                if req.started {
                    return Err(NbdError::UnexpectedSimpleReply);
                }
                if error != 0 {
                    self.requests.remove(&cookie);
                    let e = ServerError {
                        code: error,
                        message: None,
                        offset: None,
                    };
                    let outcome = Outcome::Failed(e);
                    return Ok(Some(Event::Done { cookie, outcome }));
                }
                // A successful simple reply carries data only for READ, and only when
                // structured replies are off.
                if req.cmd != CMD_READ || self.structured {
                    return Err(NbdError::UnexpectedSimpleReply);
                }
                let range = req.coverage.cover(req.offset, req.length)?;
                self.finish_next = Some(cookie);
                Ok(Some(Event::Data { cookie, range }))
            }
            ReplyHeader::Chunk {
                flags,
                typ,
                offset,
                length,
                ..
            } => {
                if let Some(got) = offset {
                    if got != req.offset {
                        let expected = req.offset;
                        return Err(NbdError::HeaderOffsetMismatch { expected, got });
                    }
                }
                req.started = true;
                let done = flags & REPLY_FLAG_DONE != 0;
                if typ == CHUNK_OFFSET_DATA {
                    if req.cmd != CMD_READ {
                        return Err(NbdError::UnexpectedChunk("OFFSET_DATA"));
                    }
                    // Before waiting for the 8-byte offset.
                    if length < 9 {
                        return Err(NbdError::MalformedChunk {
                            kind: "OFFSET_DATA",
                            why: "shorter than 9 bytes",
                        });
                    }
                    if input.len() < 8 {
                        return Ok(Some(Event::NeedBytes(8)));
                    }
                    let (data_offset, data_len) = parse_offset_data_prefix(length, &input[..8])?;
                    let range = req.coverage.cover(data_offset, data_len)?;
                    input.advance(8);
                    self.header = None;
                    if done {
                        self.finish_next = Some(cookie);
                    }
                    return Ok(Some(Event::Data { cookie, range }));
                }
                // Every other chunk is bounded by its type, then buffered whole.
                if length > chunk_limit(typ)? {
                    return Err(NbdError::ChunkTooLong(length));
                }
                let len = length as usize;
                if input.len() < len {
                    return Ok(Some(Event::NeedBytes(len)));
                }
                let payload = input.split_to(len);
                self.header = None;
                let chunk = parse_chunk_payload(typ, &payload, self.extended)?;
                let event = absorb(req, cookie, chunk, done, self.meta_context)?;
                match (event, done) {
                    (Some(event), true) => {
                        self.finish_next = Some(cookie);
                        Ok(Some(event))
                    }
                    (None, true) => self.finish(cookie).map(Some),
                    (event, false) => Ok(event),
                }
            }
        }
    }

    fn finish(&mut self, cookie: u64) -> Result<Event, NbdError> {
        let req = self
            .requests
            .remove(&cookie)
            .ok_or(NbdError::UnknownCookie(cookie))?;
        let outcome = if let Some(e) = req.error {
            Outcome::Failed(e)
        } else if req.cmd == CMD_READ {
            match req.coverage.finish() {
                Ok(()) => Outcome::Read,
                Err(Ok(e)) => Outcome::Failed(e),
                Err(Err(e)) => return Err(e),
            }
        } else {
            match req.extents {
                Some(extents) => Outcome::BlockStatus(extents),
                None => {
                    let expected = req.length;
                    return Err(NbdError::Incomplete {
                        covered: 0,
                        expected,
                    });
                }
            }
        };
        Ok(Event::Done { cookie, outcome })
    }
}

/// The longest payload a chunk of this type (not OFFSET_DATA) may have.
fn chunk_limit(typ: u16) -> Result<u64, NbdError> {
    match typ {
        CHUNK_NONE => Ok(0),
        CHUNK_OFFSET_HOLE => Ok(12),
        CHUNK_BLOCK_STATUS | CHUNK_BLOCK_STATUS_EXT => Ok(MAX_CHUNK_PAYLOAD),
        t if t & CHUNK_ERROR_BIT != 0 => Ok(MAX_ERROR_CHUNK),
        other => Err(NbdError::UnknownChunkType(other)),
    }
}

/// Apply one buffered chunk (not OFFSET_DATA) to its request; returns the event it makes.
fn absorb(
    req: &mut Request,
    cookie: u64,
    chunk: Chunk,
    done: bool,
    meta_context: Option<u32>,
) -> Result<Option<Event>, NbdError> {
    match chunk {
        Chunk::None if !done => Err(NbdError::MalformedChunk {
            kind: "NONE",
            why: "without the DONE flag",
        }),
        Chunk::None => Ok(None),
        Chunk::OffsetHole { offset, length } => {
            if req.cmd != CMD_READ {
                return Err(NbdError::UnexpectedChunk("OFFSET_HOLE"));
            }
            let range = req.coverage.cover(offset, length)?;
            Ok(Some(Event::Hole { cookie, range }))
        }
        Chunk::BlockStatus {
            context,
            mut extents,
        } => {
            if req.cmd != CMD_BLOCK_STATUS {
                return Err(NbdError::UnexpectedChunk("BLOCK_STATUS"));
            }
            if Some(context) != meta_context {
                return Err(NbdError::UnexpectedChunk(
                    "BLOCK_STATUS for a meta context that was not negotiated",
                ));
            }
            if req.extents.is_some() {
                return Err(NbdError::UnexpectedChunk("second BLOCK_STATUS"));
            }
            clip(&mut extents, req.length);
            req.extents = Some(extents);
            Ok(None)
        }
        Chunk::Error(e) => {
            if let Some(at) = e.offset {
                let end = req.offset + req.length;
                if !(req.offset..end).contains(&at) {
                    return Err(NbdError::OutOfRange {
                        start: at,
                        end: at.saturating_add(1),
                        req_start: req.offset,
                        req_end: end,
                    });
                }
            }
            req.error.get_or_insert(e);
            Ok(None)
        }
    }
}

/// Drop the extents past the request's end and shorten the one that crosses it.
fn clip(extents: &mut Vec<BlockStatusExtent>, length: u64) {
    let mut pos = 0u64;
    let mut kept = 0;
    for e in extents.iter_mut() {
        if pos >= length {
            break;
        }
        e.length = e.length.min(length - pos);
        pos += e.length;
        kept += 1;
    }
    extents.truncate(kept);
}

#[cfg(test)]
mod tests;
