//! The cbtstream export format, version 1: a header, DATA and ZERO records in strictly ascending
//! offset order, and a trailer carrying counts, totals and an XXH3-128 digest of everything before it.
//!
//! `docs/FORMAT.md` is the normative description; the constants below mirror it. This module is
//! sans-I/O: [`Encoder`] produces the bytes to write, [`Decoder`] consumes bytes the caller has
//! appended to a [`BytesMut`]. Neither compresses nor decompresses: the caller does that, and
//! checks a decompressed record with [`verify_data`].
//!
//! Every field read from a stream is untrusted. Lengths are bounds-checked before anything is
//! buffered on their behalf, so a decoder never asks for more than
//! `RECORD_HEADER_LEN + max_stored_len(MAX_RECORD_LEN)` bytes at a time.

use bytes::{Bytes, BytesMut};
use std::fmt;
use twox_hash::{XxHash3_128, XxHash3_64};

fn xxh3_64(bytes: &[u8]) -> u64 {
    XxHash3_64::oneshot(bytes)
}

/// First 8 bytes of every stream. The high-bit byte, CR LF and ^Z catch 7-bit and
/// text-mode transfers, like PNG's signature.
pub const MAGIC: [u8; 8] = *b"\x89CBT\r\n\x1a\n";
/// Last 8 bytes of every complete stream.
pub const END_MAGIC: [u8; 8] = *b"\x89CBTEND\n";
/// The format version this code writes and the only one it reads.
pub const FORMAT_VERSION: u16 = 1;

/// Largest `length` of a DATA record (the uncompressed size, and thus what a reader allocates).
pub const MAX_RECORD_LEN: u64 = 32 * 1024 * 1024;
/// Largest source, point or base id, in bytes of UTF-8.
pub const MAX_ID_LEN: usize = 256;
/// Largest virtual size: file offsets are signed 64-bit on the platforms we restore to.
pub const MAX_VIRTUAL_SIZE: u64 = i64::MAX as u64;

/// Size of the fixed part of the stream header (before the ids).
pub const HEADER_FIXED_LEN: usize = 48;
/// Size of the header check that ends the stream header.
pub const HEADER_CHECK_LEN: usize = 8;
/// Smallest possible stream header (empty source id is allowed, point id needs >= 1 byte).
pub const MIN_HEADER_LEN: usize = HEADER_FIXED_LEN + 1 + HEADER_CHECK_LEN;
/// Largest possible stream header.
pub const MAX_HEADER_LEN: usize = HEADER_FIXED_LEN + 3 * MAX_ID_LEN + HEADER_CHECK_LEN;
/// Size of a DATA or ZERO record header.
pub const RECORD_HEADER_LEN: usize = 40;
/// Size of the trailer.
pub const TRAILER_LEN: usize = 112;

/// Record type byte of a DATA record.
pub const KIND_DATA: u8 = b'D';
/// Record type byte of a ZERO record.
pub const KIND_ZERO: u8 = b'Z';
/// Record type byte of the trailer.
pub const KIND_TRAILER: u8 = b'T';

/// How a DATA record's payload is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// Raw bytes: the payload is the data itself.
    None,
    /// One independent zstd frame that decompresses to exactly `length` bytes.
    Zstd,
}

impl Codec {
    /// The on-disk code of the codec.
    pub const fn as_u8(self) -> u8 {
        match self {
            Codec::None => 0,
            Codec::Zstd => 1,
        }
    }

    /// The codec with on-disk code `code`, if there is one.
    pub const fn from_u8(code: u8) -> Option<Codec> {
        match code {
            0 => Some(Codec::None),
            1 => Some(Codec::Zstd),
            _ => None,
        }
    }

    /// Lower-case name: `none` or `zstd`.
    pub const fn name(self) -> &'static str {
        match self {
            Codec::None => "none",
            Codec::Zstd => "zstd",
        }
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The stream header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Size of the virtual disk in bytes at the time of the export.
    pub virtual_size: u64,
    /// Changed-block-tracking granularity in bytes (a power of two).
    pub block_size: u32,
    /// Identifies the disk (e.g. the VDI uuid). May be empty.
    pub source_id: String,
    /// The point in time this export brings an image to. Never empty.
    pub point_id: String,
    /// True for an incremental export (only changed blocks), false for a full one.
    pub incremental: bool,
    /// The point in time an incremental applies on top of. `None` for a full export, and for
    /// an incremental that applies onto any image (its base was not named).
    pub base_id: Option<String>,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix_secs: u64,
    /// The codec the writer compresses with. DATA records use it or [`Codec::None`].
    pub codec: Codec,
}

impl Header {
    /// True for a full export.
    pub fn is_full(&self) -> bool {
        !self.incremental
    }

    /// The kind byte of the encoded header: 0 full, 1 incremental onto `base_id`,
    /// 2 incremental onto any image.
    fn kind(&self) -> u8 {
        match (self.incremental, self.base_id.is_some()) {
            (false, _) => 0,
            (true, true) => 1,
            (true, false) => 2,
        }
    }

    /// Checks every field against the limits of the format.
    pub fn validate(&self) -> Result<(), StreamError> {
        if self.virtual_size > MAX_VIRTUAL_SIZE {
            return Err(StreamError::Header(format!(
                "virtual size {} exceeds the maximum {MAX_VIRTUAL_SIZE}",
                self.virtual_size
            )));
        }
        if !self.block_size.is_power_of_two() || u64::from(self.block_size) > MAX_RECORD_LEN {
            return Err(StreamError::Header(format!(
                "block size {} is not a power of two between 1 and {MAX_RECORD_LEN}",
                self.block_size
            )));
        }
        if !self.incremental && self.base_id.is_some() {
            return Err(StreamError::Header(
                "a full export cannot have a base id".into(),
            ));
        }
        check_id("source id", &self.source_id, true)?;
        check_id("point id", &self.point_id, false)?;
        if let Some(base) = &self.base_id {
            check_id("base id", base, false)?;
        }
        Ok(())
    }

    /// The encoded header (after validating it).
    pub fn encode(&self) -> Result<Vec<u8>, StreamError> {
        self.validate()?;
        let base = self.base_id.as_deref().unwrap_or("");
        let len = HEADER_FIXED_LEN
            + self.source_id.len()
            + self.point_id.len()
            + base.len()
            + HEADER_CHECK_LEN;
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes()); // flags
        out.extend_from_slice(&(len as u32).to_le_bytes());
        out.extend_from_slice(&self.virtual_size.to_le_bytes());
        out.extend_from_slice(&self.block_size.to_le_bytes());
        out.push(self.codec.as_u8());
        out.push(self.kind());
        out.extend_from_slice(&0u16.to_le_bytes()); // reserved
        out.extend_from_slice(&self.created_unix_secs.to_le_bytes());
        out.extend_from_slice(&(self.source_id.len() as u16).to_le_bytes());
        out.extend_from_slice(&(self.point_id.len() as u16).to_le_bytes());
        out.extend_from_slice(&(base.len() as u16).to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes()); // reserved
        debug_assert_eq!(out.len(), HEADER_FIXED_LEN);
        out.extend_from_slice(self.source_id.as_bytes());
        out.extend_from_slice(self.point_id.as_bytes());
        out.extend_from_slice(base.as_bytes());
        let check = xxh3_64(&out);
        out.extend_from_slice(&check.to_le_bytes());
        debug_assert_eq!(out.len(), len);
        Ok(out)
    }

    /// Decodes a complete header of `bytes.len()` bytes (the caller has read `header_len`).
    fn decode(bytes: &[u8]) -> Result<Header, StreamError> {
        let len = bytes.len();
        if !(MIN_HEADER_LEN..=MAX_HEADER_LEN).contains(&len) {
            return Err(StreamError::Header(format!(
                "header length {len} out of range"
            )));
        }
        let (body, check) = bytes.split_at(len - HEADER_CHECK_LEN);
        if xxh3_64(body) != le_u64(check, 0) {
            return Err(StreamError::Header(
                "header check mismatch (the header is corrupt)".into(),
            ));
        }
        let flags = le_u16(body, 10);
        if flags != 0 {
            return Err(StreamError::Header(format!(
                "unknown header flags {flags:#06x} (written by a newer version?)"
            )));
        }
        if le_u16(body, 30) != 0 || le_u16(body, 46) != 0 {
            return Err(StreamError::Header(
                "reserved header fields are not zero".into(),
            ));
        }
        let virtual_size = le_u64(body, 16);
        let block_size = le_u32(body, 24);
        let codec = Codec::from_u8(body[28])
            .ok_or_else(|| StreamError::Header(format!("unknown codec {} in header", body[28])))?;
        let (incremental, has_base) = match body[29] {
            0 => (false, false),
            1 => (true, true),
            2 => (true, false),
            other => {
                return Err(StreamError::Header(format!(
                    "kind field is {other}, not 0 (full), 1 (incremental) or 2 (incremental onto any image)"
                )))
            }
        };
        let created_unix_secs = le_u64(body, 32);
        let source_len = usize::from(le_u16(body, 40));
        let point_len = usize::from(le_u16(body, 42));
        let base_len = usize::from(le_u16(body, 44));
        for (what, l) in [
            ("source id", source_len),
            ("point id", point_len),
            ("base id", base_len),
        ] {
            if l > MAX_ID_LEN {
                return Err(StreamError::Header(format!(
                    "{what} length {l} exceeds the maximum {MAX_ID_LEN}"
                )));
            }
        }
        if HEADER_FIXED_LEN + source_len + point_len + base_len != body.len() {
            return Err(StreamError::Header(format!(
                "header length {len} does not match the id lengths {source_len} + {point_len} + {base_len}"
            )));
        }
        if !has_base && base_len != 0 {
            return Err(StreamError::Header(
                "base id present although the header says there is none".into(),
            ));
        }
        let ids = &body[HEADER_FIXED_LEN..];
        let (source, rest) = ids.split_at(source_len);
        let (point, base) = rest.split_at(point_len);
        let id = |what: &str, b: &[u8]| {
            std::str::from_utf8(b)
                .map(str::to_owned)
                .map_err(|_| StreamError::Header(format!("{what} is not valid UTF-8")))
        };
        let header = Header {
            virtual_size,
            block_size,
            source_id: id("source id", source)?,
            point_id: id("point id", point)?,
            incremental,
            base_id: if has_base {
                Some(id("base id", base)?)
            } else {
                None
            },
            created_unix_secs,
            codec,
        };
        header.validate()?;
        Ok(header)
    }
}

/// Check one header id (source, point or base): at most [`MAX_ID_LEN`] bytes, no control
/// characters, and not empty unless `may_be_empty`.
pub fn check_id(what: &str, id: &str, may_be_empty: bool) -> Result<(), StreamError> {
    if id.len() > MAX_ID_LEN {
        return Err(StreamError::Header(format!(
            "{what} is {} bytes long (maximum {MAX_ID_LEN})",
            id.len()
        )));
    }
    if id.is_empty() && !may_be_empty {
        return Err(StreamError::Header(format!("{what} is empty")));
    }
    if let Some(c) = id.chars().find(|c| c.is_control()) {
        return Err(StreamError::Header(format!(
            "{what} contains the control character U+{:04X}",
            u32::from(c)
        )));
    }
    Ok(())
}

/// xxh3-64 of the uncompressed bytes: the per-record checksum.
pub fn checksum(data: &[u8]) -> u64 {
    xxh3_64(data)
}

/// The largest stored (compressed) length a zstd DATA record of `length` bytes may have:
/// zstd's `ZSTD_COMPRESSBOUND(length)`. For [`Codec::None`] the stored length is `length`.
pub const fn max_stored_len(length: u64) -> u64 {
    const SMALL: u64 = 128 * 1024;
    let margin = if length < SMALL {
        (SMALL - length) >> 11
    } else {
        0
    };
    length.saturating_add(length >> 8).saturating_add(margin)
}

/// Checks a record's bytes after decompression: the length must be `length` and the xxh3-64
/// must be `expected`. `index` and `offset` name the record in the error.
pub fn verify_data(
    index: u64,
    offset: u64,
    length: u64,
    expected: u64,
    data: &[u8],
) -> Result<(), StreamError> {
    if data.len() as u64 != length {
        return Err(StreamError::Record {
            index,
            offset,
            problem: format!(
                "payload decodes to {} bytes, the record says {length}",
                data.len()
            ),
        });
    }
    let actual = checksum(data);
    if actual != expected {
        return Err(StreamError::ChecksumMismatch {
            index,
            offset,
            expected,
            actual,
        });
    }
    Ok(())
}

/// One decoded element of a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    /// Always the first item.
    Header(Header),
    /// `length` bytes at `offset`; `payload` is stored with `codec` and not yet verified
    /// against `checksum` (decompress, then call [`verify_data`]).
    Data {
        index: u64,
        offset: u64,
        length: u64,
        codec: Codec,
        checksum: u64,
        payload: Bytes,
    },
    /// `length` zero bytes at `offset`.
    Zero {
        index: u64,
        offset: u64,
        length: u64,
    },
    /// The trailer, verified: counts, totals and digest all match. Always the last item.
    End(Trailer),
}

/// The stream trailer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trailer {
    /// Number of records (DATA + ZERO).
    pub records: u64,
    /// Number of DATA records.
    pub data_records: u64,
    /// Number of ZERO records.
    pub zero_records: u64,
    /// Sum of the `length` of DATA records (uncompressed bytes).
    pub data_bytes: u64,
    /// Sum of the stored length of DATA records (payload bytes in the stream).
    pub stored_bytes: u64,
    /// Sum of the `length` of ZERO records.
    pub zero_bytes: u64,
    /// Number of stream bytes before the trailer (header + records): what the digest covers.
    pub stream_bytes: u64,
    /// XXH3-128 of the first `stream_bytes` bytes of the stream (see [`digest_bytes`]).
    pub digest: [u8; 32],
}

impl Trailer {
    /// The digest as lower-case hex, as `xxh128sum` prints it.
    pub fn digest_hex(&self) -> String {
        self.digest[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The encoded trailer.
    pub fn encode(&self) -> [u8; TRAILER_LEN] {
        let mut t = [0u8; TRAILER_LEN];
        t[0] = KIND_TRAILER;
        // t[1] reserved, t[2..4] flags: zero.
        t[4..8].copy_from_slice(&(self.records as u32).to_le_bytes());
        t[8..16].copy_from_slice(&self.records.to_le_bytes());
        t[16..24].copy_from_slice(&self.data_records.to_le_bytes());
        t[24..32].copy_from_slice(&self.zero_records.to_le_bytes());
        t[32..40].copy_from_slice(&self.data_bytes.to_le_bytes());
        t[40..48].copy_from_slice(&self.stored_bytes.to_le_bytes());
        t[48..56].copy_from_slice(&self.zero_bytes.to_le_bytes());
        t[56..64].copy_from_slice(&self.stream_bytes.to_le_bytes());
        t[64..96].copy_from_slice(&self.digest);
        let check = xxh3_64(&t[..96]);
        t[96..104].copy_from_slice(&check.to_le_bytes());
        t[104..112].copy_from_slice(&END_MAGIC);
        t
    }
}

/// Everything that can be wrong with a stream (when decoding) or with a record the caller
/// asks to encode. Messages name the record by index (from 0) and disk offset.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("not a cbtstream stream (bad magic)")]
    BadMagic,
    #[error("unsupported stream format version {0} (this build reads version {FORMAT_VERSION})")]
    UnsupportedVersion(u16),
    #[error("stream header: {0}")]
    Header(String),
    /// The record header could be read and checked; `problem` is about its content.
    #[error("record {index} (offset {offset:#x}): {problem}")]
    Record {
        index: u64,
        offset: u64,
        problem: String,
    },
    /// The record header itself is unreadable, so its disk offset is unknown; `position`
    /// is where it starts in the stream.
    #[error("record {index} (stream byte {position}): {problem}")]
    RecordHeader {
        index: u64,
        position: u64,
        problem: String,
    },
    #[error("record {index} (offset {offset:#x}): checksum mismatch (expected {expected:#018x}, got {actual:#018x})")]
    ChecksumMismatch {
        index: u64,
        offset: u64,
        expected: u64,
        actual: u64,
    },
    #[error("trailer (after {records} records): {problem}")]
    Trailer { records: u64, problem: String },
    #[error("stream digest mismatch: the stream was altered (trailer says {expected}, content hashes to {actual})")]
    DigestMismatch { expected: String, actual: String },
    /// The stream ended early. `records` complete records were read.
    #[error("stream truncated {at}")]
    Truncated { records: u64, at: String },
    #[error("{count} unexpected bytes after the trailer")]
    TrailingBytes { count: u64 },
}

impl StreamError {
    /// The index of the record the error is about, if it is about one.
    pub fn record_index(&self) -> Option<u64> {
        match self {
            StreamError::Record { index, .. }
            | StreamError::RecordHeader { index, .. }
            | StreamError::ChecksumMismatch { index, .. } => Some(*index),
            _ => None,
        }
    }

    /// True if the stream ended early (as opposed to being altered).
    pub fn is_truncation(&self) -> bool {
        matches!(self, StreamError::Truncated { .. })
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Totals {
    data_records: u64,
    zero_records: u64,
    data_bytes: u64,
    stored_bytes: u64,
    zero_bytes: u64,
}

/// State shared by the encoder and the decoder: order, bounds, counts and the running digest.
#[derive(Clone)]
struct Tracker {
    virtual_size: u64,
    codec: Codec,
    hasher: XxHash3_128,
    /// Bytes hashed so far (header + records).
    position: u64,
    next_index: u64,
    /// End of the previous record (0 before the first).
    prev_end: u64,
    totals: Totals,
}

impl fmt::Debug for Tracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracker")
            .field("position", &self.position)
            .field("next_index", &self.next_index)
            .field("prev_end", &self.prev_end)
            .finish_non_exhaustive()
    }
}

impl Tracker {
    fn new(header: &Header, header_bytes: &[u8]) -> Tracker {
        let mut hasher = XxHash3_128::new();
        hasher.write(header_bytes);
        Tracker {
            virtual_size: header.virtual_size,
            codec: header.codec,
            hasher,
            position: header_bytes.len() as u64,
            next_index: 0,
            prev_end: 0,
            totals: Totals::default(),
        }
    }

    fn record_error(&self, offset: u64, problem: String) -> StreamError {
        StreamError::Record {
            index: self.next_index,
            offset,
            problem,
        }
    }

    /// Order and bounds of the next record.
    fn check_range(&self, offset: u64, length: u64) -> Result<(), StreamError> {
        if length == 0 {
            return Err(self.record_error(offset, "length is zero".into()));
        }
        if offset < self.prev_end {
            return Err(self.record_error(
                offset,
                format!(
                    "out of order or overlapping: starts before the end of the previous record ({:#x})",
                    self.prev_end
                ),
            ));
        }
        match offset.checked_add(length) {
            Some(end) if end <= self.virtual_size => Ok(()),
            _ => Err(self.record_error(
                offset,
                format!(
                    "range of {length} bytes runs past the virtual size {:#x}",
                    self.virtual_size
                ),
            )),
        }
    }

    fn check_data(
        &self,
        offset: u64,
        length: u64,
        codec: Codec,
        stored: u64,
    ) -> Result<(), StreamError> {
        if length > MAX_RECORD_LEN {
            return Err(self.record_error(
                offset,
                format!("length {length} exceeds the maximum record length {MAX_RECORD_LEN}"),
            ));
        }
        self.check_range(offset, length)?;
        match codec {
            Codec::None => {
                if stored != length {
                    return Err(self.record_error(
                        offset,
                        format!("stored length {stored} of an uncompressed record is not its length {length}"),
                    ));
                }
            }
            Codec::Zstd => {
                if self.codec != Codec::Zstd {
                    return Err(self.record_error(
                        offset,
                        "zstd record in a stream whose header declares codec none".into(),
                    ));
                }
                let bound = max_stored_len(length);
                if stored == 0 || stored > bound {
                    return Err(self.record_error(
                        offset,
                        format!("stored length {stored} outside 1..={bound} for length {length}"),
                    ));
                }
            }
        }
        Ok(())
    }

    fn commit(&mut self, kind: u8, offset: u64, length: u64, stored: u64, bytes: &[&[u8]]) {
        for b in bytes {
            self.hasher.write(b);
        }
        self.position += RECORD_HEADER_LEN as u64 + stored;
        self.next_index += 1;
        self.prev_end = offset + length;
        let t = &mut self.totals;
        if kind == KIND_DATA {
            t.data_records += 1;
            t.data_bytes += length;
            t.stored_bytes += stored;
        } else {
            t.zero_records += 1;
            t.zero_bytes += length;
        }
    }

    fn trailer(&self) -> Trailer {
        Trailer {
            records: self.next_index,
            data_records: self.totals.data_records,
            zero_records: self.totals.zero_records,
            data_bytes: self.totals.data_bytes,
            stored_bytes: self.totals.stored_bytes,
            zero_bytes: self.totals.zero_bytes,
            stream_bytes: self.position,
            digest: digest_bytes(self.hasher.finish_128()),
        }
    }
}

/// The 32-byte digest field: XXH3-128 in canonical (big-endian) byte order, then 16 zero
/// bytes reserved for a wider digest in a later version.
pub fn digest_bytes(xxh3_128: u128) -> [u8; 32] {
    let mut d = [0u8; 32];
    d[..16].copy_from_slice(&xxh3_128.to_be_bytes());
    d
}

fn encode_record_header(
    kind: u8,
    codec: Codec,
    stored: u32,
    offset: u64,
    length: u64,
    checksum: u64,
    index: u64,
) -> [u8; RECORD_HEADER_LEN] {
    let mut h = [0u8; RECORD_HEADER_LEN];
    h[0] = kind;
    h[1] = codec.as_u8();
    // h[2..4] flags: zero.
    h[4..8].copy_from_slice(&stored.to_le_bytes());
    h[8..16].copy_from_slice(&offset.to_le_bytes());
    h[16..24].copy_from_slice(&length.to_le_bytes());
    h[24..32].copy_from_slice(&checksum.to_le_bytes());
    h[32..36].copy_from_slice(&(index as u32).to_le_bytes());
    let check = xxh3_64(&h[..36]) as u32;
    h[36..40].copy_from_slice(&check.to_le_bytes());
    h
}

/// Writes a stream: validates each record, and keeps the order, counts, totals and digest
/// the trailer needs.
#[derive(Debug)]
pub struct Encoder {
    tracker: Tracker,
}

impl Encoder {
    /// A new encoder and the header bytes to write first.
    pub fn new(header: &Header) -> Result<(Encoder, Vec<u8>), StreamError> {
        let bytes = header.encode()?;
        let tracker = Tracker::new(header, &bytes);
        Ok((Encoder { tracker }, bytes))
    }

    /// Returns the header of a DATA record; the caller writes it and then `payload`.
    /// `checksum` is [`checksum`] of the uncompressed bytes. Rejects (without changing the
    /// encoder's state) records that are out of order, overlapping, past the virtual size,
    /// longer than [`MAX_RECORD_LEN`], or whose payload size does not fit the codec.
    pub fn data(
        &mut self,
        offset: u64,
        length: u64,
        codec: Codec,
        checksum: u64,
        payload: &[u8],
    ) -> Result<Vec<u8>, StreamError> {
        let stored = payload.len() as u64;
        self.tracker.check_data(offset, length, codec, stored)?;
        // check_data bounds stored by max_stored_len(MAX_RECORD_LEN) < u32::MAX.
        let h = encode_record_header(
            KIND_DATA,
            codec,
            stored as u32,
            offset,
            length,
            checksum,
            self.tracker.next_index,
        );
        self.tracker
            .commit(KIND_DATA, offset, length, stored, &[&h, payload]);
        Ok(h.to_vec())
    }

    /// Returns the bytes of a ZERO record: `length` zero bytes at `offset`.
    pub fn zero(&mut self, offset: u64, length: u64) -> Result<Vec<u8>, StreamError> {
        self.tracker.check_range(offset, length)?;
        let h = encode_record_header(
            KIND_ZERO,
            Codec::None,
            0,
            offset,
            length,
            0,
            self.tracker.next_index,
        );
        self.tracker.commit(KIND_ZERO, offset, length, 0, &[&h]);
        Ok(h.to_vec())
    }

    /// The trailer bytes, to write last.
    pub fn finish(self) -> Vec<u8> {
        self.tracker.trailer().encode().to_vec()
    }

    /// The trailer [`Encoder::finish`] would produce now.
    pub fn trailer(&self) -> Trailer {
        self.tracker.trailer()
    }

    /// Bytes of header and records produced so far.
    pub fn bytes_written(&self) -> u64 {
        self.tracker.position
    }

    /// Number of records produced so far.
    pub fn records(&self) -> u64 {
        self.tracker.next_index
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Header,
    Records,
    Done,
}

/// What the decoder was waiting for when it last returned `Ok(None)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    Nothing,
    Header { need: usize },
    RecordHeader { index: u64 },
    Record { index: u64, offset: u64, need: u64 },
    Trailer,
}

/// Incremental stream decoder: the caller appends bytes to a [`BytesMut`] and calls
/// [`Decoder::decode`] until it returns `Ok(None)`, then reads more; at end of input it calls
/// [`Decoder::finish`]. After an error, every later call returns the same error.
#[derive(Debug)]
pub struct Decoder {
    state: State,
    header: Option<Header>,
    tracker: Option<Tracker>,
    pending: Pending,
    failed: Option<StreamError>,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    pub fn new() -> Self {
        Decoder {
            state: State::Header,
            header: None,
            tracker: None,
            pending: Pending::Nothing,
            failed: None,
        }
    }

    /// The header, once decoded.
    pub fn header(&self) -> Option<&Header> {
        self.header.as_ref()
    }

    /// Number of complete records decoded so far.
    pub fn records(&self) -> u64 {
        self.tracker.as_ref().map_or(0, |t| t.next_index)
    }

    /// Stream bytes consumed so far (header and records; plus the trailer once seen).
    pub fn position(&self) -> u64 {
        match (&self.tracker, self.state) {
            (Some(t), State::Done) => t.position + TRAILER_LEN as u64,
            (Some(t), _) => t.position,
            (None, _) => 0,
        }
    }

    /// How many bytes the buffer must hold for the next [`Decoder::decode`] to make progress,
    /// as far as the decoder knows after the last call that returned `Ok(None)` (e.g. a whole
    /// record once its header was seen). Lets a reader reserve a large record's space at once.
    /// Bounded by `RECORD_HEADER_LEN + max_stored_len(MAX_RECORD_LEN)`.
    pub fn bytes_needed(&self) -> usize {
        match self.pending {
            Pending::Nothing => 1,
            Pending::Header { need } => need,
            Pending::RecordHeader { .. } => RECORD_HEADER_LEN,
            // need <= RECORD_HEADER_LEN + max_stored_len(MAX_RECORD_LEN), checked on decode.
            Pending::Record { need, .. } => need as usize,
            Pending::Trailer => TRAILER_LEN,
        }
    }

    /// True once the trailer has been decoded and verified.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The next item, `Ok(None)` if `buf` does not hold enough bytes yet. Consumes exactly the
    /// bytes of the returned item from the front of `buf`. Verifies structure, order, bounds,
    /// the record and trailer checks, the trailer's counts and totals and the digest; it does
    /// not decompress or verify record checksums.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Item>, StreamError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let result = match self.state {
            State::Header => self.decode_header(buf),
            State::Records => self.decode_record(buf),
            State::Done => {
                if buf.is_empty() {
                    Ok(None)
                } else {
                    Err(StreamError::TrailingBytes {
                        count: buf.len() as u64,
                    })
                }
            }
        };
        if let Err(e) = &result {
            self.failed = Some(e.clone());
        }
        result
    }

    /// At end of input, with `leftover` bytes still undecoded: `Ok(())` only if the trailer was
    /// decoded and nothing follows it.
    pub fn finish(&self, leftover: usize) -> Result<(), StreamError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let records = self.records();
        let truncated = |at: String| Err(StreamError::Truncated { records, at });
        match self.state {
            State::Done if leftover == 0 => Ok(()),
            State::Done => Err(StreamError::TrailingBytes {
                count: leftover as u64,
            }),
            State::Header if leftover == 0 => {
                truncated("before the header: the stream is empty".into())
            }
            State::Header => {
                let need = match self.pending {
                    Pending::Header { need } => need,
                    _ => HEADER_FIXED_LEN,
                };
                truncated(format!("in the header: {leftover} of {need} bytes"))
            }
            State::Records if leftover == 0 => {
                if records == 0 {
                    truncated("after the header: no trailer".into())
                } else {
                    truncated(format!("after record {}: no trailer", records - 1))
                }
            }
            State::Records => match self.pending {
                Pending::Record {
                    index,
                    offset,
                    need,
                } => truncated(format!(
                    "in record {index} (offset {offset:#x}): {leftover} of {need} bytes"
                )),
                Pending::RecordHeader { index } => truncated(format!(
                    "in the header of record {index}: {leftover} of {RECORD_HEADER_LEN} bytes"
                )),
                Pending::Trailer => {
                    truncated(format!("in the trailer: {leftover} of {TRAILER_LEN} bytes"))
                }
                Pending::Nothing | Pending::Header { .. } => truncated(format!(
                    "after {records} records: {leftover} bytes of an incomplete record"
                )),
            },
        }
    }

    fn decode_header(&mut self, buf: &mut BytesMut) -> Result<Option<Item>, StreamError> {
        // Reject garbage as soon as the first bytes disagree with the magic.
        let n = buf.len().min(MAGIC.len());
        if buf[..n] != MAGIC[..n] {
            return Err(StreamError::BadMagic);
        }
        if buf.len() < 16 {
            self.pending = Pending::Header { need: 16 };
            return Ok(None);
        }
        let version = le_u16(buf, 8);
        if version != FORMAT_VERSION {
            return Err(StreamError::UnsupportedVersion(version));
        }
        let len = le_u32(buf, 12) as usize;
        if !(MIN_HEADER_LEN..=MAX_HEADER_LEN).contains(&len) {
            return Err(StreamError::Header(format!(
                "header length {len} outside {MIN_HEADER_LEN}..={MAX_HEADER_LEN}"
            )));
        }
        if buf.len() < len {
            self.pending = Pending::Header { need: len };
            return Ok(None);
        }
        let header = Header::decode(&buf[..len])?;
        let bytes = buf.split_to(len);
        self.tracker = Some(Tracker::new(&header, &bytes));
        self.header = Some(header.clone());
        self.state = State::Records;
        self.pending = Pending::Nothing;
        Ok(Some(Item::Header(header)))
    }

    fn decode_record(&mut self, buf: &mut BytesMut) -> Result<Option<Item>, StreamError> {
        let Some(tracker) = self.tracker.as_mut() else {
            return Err(StreamError::Header("no header decoded".into()));
        };
        let index = tracker.next_index;
        let position = tracker.position;
        let Some(&kind) = buf.first() else {
            self.pending = Pending::Nothing;
            return Ok(None);
        };
        let header_error = |problem: String| StreamError::RecordHeader {
            index,
            position,
            problem,
        };
        match kind {
            KIND_DATA | KIND_ZERO => {}
            KIND_TRAILER => return self.decode_trailer(buf),
            other => {
                return Err(header_error(format!(
                    "bad record type byte {other:#04x} (expected 'D', 'Z' or 'T')"
                )))
            }
        }
        if buf.len() < RECORD_HEADER_LEN {
            self.pending = Pending::RecordHeader { index };
            return Ok(None);
        }
        let h = &buf[..RECORD_HEADER_LEN];
        if xxh3_64(&h[..36]) as u32 != le_u32(h, 36) {
            return Err(header_error(
                "record header check mismatch (the record header is corrupt)".into(),
            ));
        }
        let codec_code = h[1];
        let flags = le_u16(h, 2);
        let stored = u64::from(le_u32(h, 4));
        let offset = le_u64(h, 8);
        let length = le_u64(h, 16);
        let sum = le_u64(h, 24);
        let seq = le_u32(h, 32);
        let record_error = |problem: String| StreamError::Record {
            index,
            offset,
            problem,
        };
        if flags != 0 {
            return Err(record_error(format!("unknown record flags {flags:#06x}")));
        }
        if seq != index as u32 {
            return Err(record_error(format!(
                "sequence number {seq} where {} was expected (a record is missing or repeated)",
                index as u32
            )));
        }
        let codec = if kind == KIND_DATA {
            let codec = Codec::from_u8(codec_code)
                .ok_or_else(|| record_error(format!("unknown codec {codec_code}")))?;
            tracker.check_data(offset, length, codec, stored)?;
            codec
        } else {
            if codec_code != 0 || stored != 0 || sum != 0 {
                return Err(record_error(
                    "ZERO record with non-zero codec, stored length or checksum".into(),
                ));
            }
            tracker.check_range(offset, length)?;
            Codec::None
        };
        let total = RECORD_HEADER_LEN as u64 + stored;
        if (buf.len() as u64) < total {
            self.pending = Pending::Record {
                index,
                offset,
                need: total,
            };
            return Ok(None);
        }
        // total <= RECORD_HEADER_LEN + max_stored_len(MAX_RECORD_LEN) fits in usize.
        let frame = buf.split_to(total as usize).freeze();
        tracker.commit(kind, offset, length, stored, &[&frame]);
        self.pending = Pending::Nothing;
        Ok(Some(if kind == KIND_DATA {
            Item::Data {
                index,
                offset,
                length,
                codec,
                checksum: sum,
                payload: frame.slice(RECORD_HEADER_LEN..),
            }
        } else {
            Item::Zero {
                index,
                offset,
                length,
            }
        }))
    }

    fn decode_trailer(&mut self, buf: &mut BytesMut) -> Result<Option<Item>, StreamError> {
        let Some(tracker) = self.tracker.as_ref() else {
            return Err(StreamError::Header("no header decoded".into()));
        };
        if buf.len() < TRAILER_LEN {
            self.pending = Pending::Trailer;
            return Ok(None);
        }
        let t = &buf[..TRAILER_LEN];
        let records = tracker.next_index;
        let err = |problem: String| StreamError::Trailer { records, problem };
        if t[104..112] != END_MAGIC {
            return Err(err("bad end magic".into()));
        }
        if xxh3_64(&t[..96]) != le_u64(t, 96) {
            return Err(err("trailer check mismatch (the trailer is corrupt)".into()));
        }
        if t[1] != 0 || le_u16(t, 2) != 0 {
            return Err(err("reserved trailer fields are not zero".into()));
        }
        if le_u32(t, 4) != records as u32 {
            return Err(err(format!(
                "sequence number {} where {} was expected (records are missing)",
                le_u32(t, 4),
                records as u32
            )));
        }
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&t[64..96]);
        let found = Trailer {
            records: le_u64(t, 8),
            data_records: le_u64(t, 16),
            zero_records: le_u64(t, 24),
            data_bytes: le_u64(t, 32),
            stored_bytes: le_u64(t, 40),
            zero_bytes: le_u64(t, 48),
            stream_bytes: le_u64(t, 56),
            digest,
        };
        let actual = tracker.trailer();
        for (what, says, is) in [
            ("records", found.records, actual.records),
            ("DATA records", found.data_records, actual.data_records),
            ("ZERO records", found.zero_records, actual.zero_records),
            ("data bytes", found.data_bytes, actual.data_bytes),
            ("stored bytes", found.stored_bytes, actual.stored_bytes),
            ("zero bytes", found.zero_bytes, actual.zero_bytes),
            ("stream bytes", found.stream_bytes, actual.stream_bytes),
        ] {
            if says != is {
                return Err(err(format!(
                    "trailer says {says} {what}, the stream has {is}"
                )));
            }
        }
        if found.digest != actual.digest {
            return Err(StreamError::DigestMismatch {
                expected: found.digest_hex(),
                actual: actual.digest_hex(),
            });
        }
        let _ = buf.split_to(TRAILER_LEN);
        self.state = State::Done;
        self.pending = Pending::Nothing;
        Ok(Some(Item::End(found)))
    }
}

// Fixed-offset little-endian reads. Callers check the slice length first; the offsets are
// constants, so an out-of-range read is a bug in this file, not something input can cause.
fn le_u16(b: &[u8], at: usize) -> u16 {
    let mut x = [0u8; 2];
    x.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(x)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

#[cfg(test)]
mod tests;
