//! `merge`: a full stream and the incrementals that follow it, made into one full stream of
//! the last point (a synthetic full).
//!
//! One pass over all inputs at once, each read front to back (see [`sweep`]). For every range
//! the newest input's record wins. A record no newer record overlaps is copied as stored (its
//! frame and checksum unchanged: the input's digest vouches for those bytes); one that newer
//! records cover in part is decompressed, checked, and only its visible pieces written again;
//! one covered whole is decompressed and checked, then dropped. Memory: one current record
//! (stored and decompressed) per input, whatever the disk size.

mod sweep;

use crate::exit::Code;
use crate::restore::verified::{open_chain, OpenStream, Payloads};
use crate::restore::RestoreError;
use bytes::Bytes;
use cbtstream_proto::stream::{checksum, Codec, Encoder, Header, Item, StreamError};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;
use sweep::{next_step, Span, Step};

/// Level of the zstd frames written for the pieces of cut records (export's default).
const ZSTD_LEVEL: i32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error(transparent)]
    Input(#[from] RestoreError),
    #[error("{} does not follow on: {reason}", input)]
    Chain { input: String, reason: String },
    #[error("writing {output}: {error}")]
    Output { output: String, error: io::Error },
    #[error("internal error: {0}")]
    Internal(String),
}

impl MergeError {
    pub fn exit_code(&self) -> Code {
        match self {
            MergeError::Input(e) => e.exit_code(),
            MergeError::Chain { .. } => Code::Integrity,
            MergeError::Output { .. } => Code::Output,
            MergeError::Internal(_) => Code::Failure,
        }
    }
}

/// What a merge did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct MergeReport {
    pub point_id: String,
    /// Records written with their stored bytes unchanged (DATA and ZERO).
    pub copied: u64,
    /// DATA records newer records cover in part: decompressed, cut, their pieces written.
    pub recompressed: u64,
    /// ZERO records newer records cover in part (cut without any compression).
    pub zero_cut: u64,
    /// Records newer records cover whole (DATA ones decompressed to check them).
    pub dropped: u64,
    pub records_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub seconds: f64,
}

impl MergeReport {
    pub fn json_value(&self) -> serde_json::Value {
        serde_json::json!({
            "point_id": self.point_id,
            "records_copied": self.copied,
            "records_recompressed": self.recompressed,
            "zero_records_cut": self.zero_cut,
            "records_dropped": self.dropped,
            "records_out": self.records_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "seconds": self.seconds,
        })
    }
}

impl std::fmt::Display for MergeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "merged to a full stream of point {}: {} records copied as stored, {} recompressed \
             (cut), {} zero records cut, {} dropped; {} records, {} bytes out of {} bytes in, \
             {:.2} s",
            self.point_id,
            self.copied,
            self.recompressed,
            self.zero_cut,
            self.dropped,
            self.records_out,
            self.bytes_out,
            self.bytes_in,
            self.seconds
        )
    }
}

/// Merges `inputs` (a full stream, then incrementals, each onto the previous point) into one
/// full stream written to `output` (`-`: stdout). A file is written as `OUTPUT.partial`,
/// fsynced and renamed; on any failure it is removed.
pub fn merge(inputs: &[PathBuf], output: &Path) -> Result<MergeReport, MergeError> {
    let started = Instant::now();
    let streams = open_merge_chain(inputs)?;
    let mut report = if output.as_os_str() == "-" {
        let stdout = io::stdout().lock();
        let mut out = io::BufWriter::with_capacity(1 << 20, stdout);
        let report = write_merged(streams, &mut out, "<stdout>")?;
        out.flush()
            .map_err(|error| output_error("<stdout>", error))?;
        report
    } else {
        let name = output.display().to_string();
        let partial = crate::durable::with_suffix(output, crate::restore::PARTIAL_SUFFIX);
        let written = write_file(streams, &partial, &name).and_then(|report| {
            crate::durable::commit_rename(&partial, output)
                .map_err(|error| output_error(&name, error))?;
            Ok(report)
        });
        if written.is_err() {
            if let Err(e) = fs::remove_file(&partial) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %partial.display(), "could not remove a failed merge's output: {e}");
                }
            }
        }
        written?
    };
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

fn output_error(output: &str, error: io::Error) -> MergeError {
    MergeError::Output {
        output: output.to_owned(),
        error,
    }
}

fn write_file(
    streams: Vec<OpenStream>,
    partial: &Path,
    name: &str,
) -> Result<MergeReport, MergeError> {
    // A stale OUTPUT.partial from an earlier run is replaced by a new 0600 file.
    match fs::remove_file(partial) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(output_error(name, e)),
        _ => {}
    }
    let file = crate::durable::private_options()
        .create_new(true)
        .open(partial)
        .map_err(|e| output_error(name, e))?;
    let mut out = io::BufWriter::with_capacity(1 << 20, file);
    let report = write_merged(streams, &mut out, name)?;
    out.flush().map_err(|e| output_error(name, e))?;
    Ok(report)
}

/// Opens every input and checks, before anything is written, that they form one chain
/// starting with a full stream.
fn open_merge_chain(inputs: &[PathBuf]) -> Result<Vec<OpenStream>, MergeError> {
    let streams = open_chain(inputs, &|input| {
        Err(RestoreError::ChainMismatch {
            input: input.to_owned(),
            reason: "merge starts from a full stream, and this is an incremental".into(),
        })
    })?;
    for s in streams.iter().skip(1) {
        let reason = if s.header.is_full() {
            "it is a full stream: merge takes one full stream, first, then its incrementals"
        } else if s.header.base_id.is_none() {
            "it is an incremental without a base id, so its place in the chain is unknown"
        } else {
            continue;
        };
        return Err(MergeError::Chain {
            input: s.name().to_owned(),
            reason: reason.into(),
        });
    }
    Ok(streams)
}

/// One input and its current record: the first one that ends after the sweep position.
struct Cursor {
    stream: OpenStream,
    current: Option<Record>,
    /// The current record's uncompressed bytes, once they were needed.
    plain: Vec<u8>,
}

struct Record {
    index: u64,
    offset: u64,
    length: u64,
    /// `None` for a ZERO record.
    data: Option<StoredData>,
    /// Some part of it was written (whole, or as pieces).
    written: bool,
    decoded: bool,
}

struct StoredData {
    codec: Codec,
    checksum: u64,
    payload: Bytes,
}

impl Record {
    fn span(&self) -> Span {
        Span {
            start: self.offset,
            end: self.offset + self.length,
        }
    }
}

impl Cursor {
    /// Moves to the next record; `None` at the end (the trailer and digest verified).
    fn advance(&mut self) -> Result<(), MergeError> {
        self.current = match self.stream.next_item()? {
            None => None,
            Some(Item::Data {
                index,
                offset,
                length,
                codec,
                checksum,
                payload,
            }) => Some(Record {
                index,
                offset,
                length,
                data: Some(StoredData {
                    codec,
                    checksum,
                    payload,
                }),
                written: false,
                decoded: false,
            }),
            Some(Item::Zero {
                index,
                offset,
                length,
            }) => Some(Record {
                index,
                offset,
                length,
                data: None,
                written: false,
                decoded: false,
            }),
            Some(Item::End(_)) => return self.advance(),
            Some(Item::Header(_)) => {
                return Err(MergeError::Internal("a second header item".into()));
            }
        };
        Ok(())
    }

    /// Decompresses and checks the current DATA record into `plain`, once.
    fn decode(&mut self, payloads: &mut Payloads) -> Result<(), MergeError> {
        let Some(r) = &mut self.current else {
            return Ok(());
        };
        let Some(d) = &r.data else { return Ok(()) };
        if r.decoded {
            return Ok(());
        }
        let name = self.stream.name().to_owned();
        let data = payloads.decode(
            &name, r.index, r.offset, r.length, d.codec, d.checksum, &d.payload,
        )?;
        self.plain.clear();
        self.plain.extend_from_slice(data);
        r.decoded = true;
        Ok(())
    }

    /// Leaves the current record (counted as dropped if nothing of it was written, and
    /// checked first) and moves to the next.
    fn finish_current(
        &mut self,
        payloads: &mut Payloads,
        report: &mut MergeReport,
    ) -> Result<(), MergeError> {
        if let Some(r) = &self.current {
            if !r.written {
                report.dropped += 1;
                self.decode(payloads)?;
            }
        }
        self.advance()
    }
}

/// The merged stream's encoder and where its bytes go.
struct Output<'a> {
    encoder: Encoder,
    out: &'a mut dyn Write,
    name: &'a str,
    compressor: zstd::bulk::Compressor<'static>,
    compressed: Vec<u8>,
}

impl Output<'_> {
    fn write(&mut self, parts: &[&[u8]]) -> Result<(), MergeError> {
        for p in parts {
            self.out
                .write_all(p)
                .map_err(|e| output_error(self.name, e))?;
        }
        Ok(())
    }

    fn encoded<T>(r: Result<T, StreamError>) -> Result<T, MergeError> {
        r.map_err(|e| MergeError::Internal(format!("the merged stream was refused: {e}")))
    }

    fn zero(&mut self, offset: u64, length: u64) -> Result<(), MergeError> {
        let h = Self::encoded(self.encoder.zero(offset, length))?;
        self.write(&[&h])
    }

    fn stored(&mut self, offset: u64, length: u64, d: &StoredData) -> Result<(), MergeError> {
        let h = Self::encoded(
            self.encoder
                .data(offset, length, d.codec, d.checksum, &d.payload),
        )?;
        self.write(&[&h, &d.payload])
    }

    /// Writes a piece of a cut record: ZERO if it is all zeroes, else zstd when the record
    /// was (and it gets smaller), else raw.
    fn piece(&mut self, offset: u64, bytes: &[u8], codec: Codec) -> Result<(), MergeError> {
        let length = bytes.len() as u64;
        if crate::engine::encode::is_zero(bytes) {
            return self.zero(offset, length);
        }
        let sum = checksum(bytes);
        if codec == Codec::Zstd {
            self.compressed.clear();
            self.compressed
                .reserve(zstd::zstd_safe::compress_bound(bytes.len()));
            self.compressor
                .compress_to_buffer(bytes, &mut self.compressed)
                .map_err(|e| MergeError::Internal(format!("zstd compression failed: {e}")))?;
            if self.compressed.len() < bytes.len() {
                let payload = std::mem::take(&mut self.compressed);
                let h =
                    Self::encoded(
                        self.encoder
                            .data(offset, length, Codec::Zstd, sum, &payload),
                    );
                let written = h.and_then(|h| self.write(&[&h, &payload]));
                self.compressed = payload;
                return written;
            }
        }
        let h = Self::encoded(self.encoder.data(offset, length, Codec::None, sum, bytes))?;
        self.write(&[&h, bytes])
    }
}

/// The header of the merged stream: a full stream of the last input's point. Its creation
/// time is the last input's, so the same inputs always give the same bytes.
fn merged_header(streams: &[OpenStream]) -> Result<Header, MergeError> {
    let last = &streams
        .last()
        .ok_or_else(|| MergeError::Internal("no inputs".into()))?
        .header;
    let any_zstd = streams.iter().any(|s| s.header.codec == Codec::Zstd);
    Ok(Header {
        virtual_size: last.virtual_size,
        block_size: last.block_size,
        source_id: last.source_id.clone(),
        point_id: last.point_id.clone(),
        incremental: false,
        base_id: None,
        created_unix_secs: last.created_unix_secs,
        codec: if any_zstd { Codec::Zstd } else { Codec::None },
    })
}

fn write_merged(
    streams: Vec<OpenStream>,
    out: &mut dyn Write,
    name: &str,
) -> Result<MergeReport, MergeError> {
    let header = merged_header(&streams)?;
    let limit = header.virtual_size;
    let (encoder, header_bytes) = Output::encoded(Encoder::new(&header))?;
    let compressor = zstd::bulk::Compressor::new(ZSTD_LEVEL)
        .map_err(|e| MergeError::Internal(format!("cannot create a zstd compressor: {e}")))?;
    let mut output = Output {
        encoder,
        out,
        name,
        compressor,
        compressed: Vec::new(),
    };
    output.write(&[&header_bytes])?;
    let mut payloads = Payloads::new()?;
    let mut report = MergeReport {
        point_id: header.point_id.clone(),
        ..MergeReport::default()
    };
    let mut cursors = Vec::with_capacity(streams.len());
    for stream in streams {
        let mut c = Cursor {
            stream,
            current: None,
            plain: Vec::new(),
        };
        c.advance()?;
        cursors.push(c);
    }

    let mut position = 0u64;
    let mut spans = Vec::with_capacity(cursors.len());
    loop {
        for c in &mut cursors {
            while c.current.as_ref().is_some_and(|r| r.span().end <= position) {
                c.finish_current(&mut payloads, &mut report)?;
            }
        }
        spans.clear();
        spans.extend(cursors.iter().map(|c| c.current.as_ref().map(Record::span)));
        let (input, end) = match next_step(position, limit, &spans) {
            None => break,
            Some(Step::Gap { until }) => {
                position = until;
                continue;
            }
            Some(Step::Take { input, end }) => (input, end),
        };
        take(
            &mut cursors[input],
            position,
            end,
            &mut output,
            &mut payloads,
            &mut report,
        )?;
        position = end;
    }
    // What lies past the last input's size (a disk that shrank) is dropped, but checked, and
    // every input is read to its verified trailer.
    for c in &mut cursors {
        while c.current.is_some() {
            c.finish_current(&mut payloads, &mut report)?;
        }
        report.bytes_in += c.stream.bytes_read();
    }
    report.records_out = output.encoder.records();
    let before_trailer = output.encoder.bytes_written();
    let Output { encoder, out, .. } = output;
    let trailer = encoder.finish();
    out.write_all(&trailer).map_err(|e| output_error(name, e))?;
    report.bytes_out = before_trailer + trailer.len() as u64;
    Ok(report)
}

/// Writes `[position, end)` of the cursor's current record: the record as stored when that
/// is all of it and nothing of it was written yet, else a piece of it.
fn take(
    cursor: &mut Cursor,
    position: u64,
    end: u64,
    output: &mut Output<'_>,
    payloads: &mut Payloads,
    report: &mut MergeReport,
) -> Result<(), MergeError> {
    let Some(r) = &cursor.current else {
        return Err(MergeError::Internal("no record to take".into()));
    };
    let whole = !r.written && position == r.offset && end == r.span().end;
    let first_use = !r.written;
    let (offset, codec) = (r.offset, r.data.as_ref().map(|d| d.codec));
    match (&r.data, whole) {
        (None, true) => {
            output.zero(position, end - position)?;
            report.copied += 1;
        }
        (Some(d), true) => {
            output.stored(position, end - position, d)?;
            report.copied += 1;
        }
        (None, false) => {
            output.zero(position, end - position)?;
            if first_use {
                report.zero_cut += 1;
            }
        }
        (Some(_), false) => {
            cursor.decode(payloads)?;
            if first_use {
                report.recompressed += 1;
            }
            let from = (position - offset) as usize;
            let to = (end - offset) as usize;
            output.piece(
                position,
                &cursor.plain[from..to],
                codec.unwrap_or(Codec::None),
            )?;
        }
    }
    if let Some(r) = &mut cursor.current {
        r.written = true;
    }
    Ok(())
}
