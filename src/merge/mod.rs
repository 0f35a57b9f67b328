//! `merge`: a full stream and the incrementals that follow it, made into one full stream of
//! the last point (a synthetic full).
//!
//! One pass over all inputs at once, each read front to back (see [`sweep`]). For every range
//! the newest input's record wins. A record no newer record overlaps is copied as stored (its
//! frame and checksum unchanged: the input's digest vouches for those bytes); one that newer
//! records cover in part is decompressed, checked, and only its visible pieces written again;
//! one covered whole is decompressed and checked, then dropped. The inputs are read and the
//! range decisions made on the caller's thread; compressing and checking run on workers and
//! one thread writes (see [`output`]). Memory: one current record (stored and decompressed)
//! per input plus a few records in flight per worker, whatever the disk size.

mod output;
mod sweep;

use crate::exit::Code;
use crate::restore::verified::{open_chain, OpenStream, Payloads};
use crate::restore::{RestoreError, StreamInput};
use bytes::Bytes;
use cbtstream_proto::stream::{Codec, Encoder, Header, Item};
use output::{Piece, Pipeline};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use sweep::{clip, next_step, visible_bounds, Span, Step};

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

/// [`merge`] from any inputs (files, or objects of a repository) into any writer, which is
/// left to the caller to make durable. `name` names the output in errors.
pub fn merge_into(
    inputs: Vec<StreamInput>,
    out: &mut (dyn Write + Send),
    name: &str,
) -> Result<MergeReport, MergeError> {
    let started = Instant::now();
    let streams = open_merge_chain(inputs)?;
    let mut report = write_merged(streams, out, name)?;
    out.flush().map_err(|e| output_error(name, e))?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Merges `inputs` (a full stream, then incrementals, each onto the previous point) into one
/// full stream written to `output` (`-`: stdout). A file is written as `OUTPUT.partial`,
/// fsynced and renamed; on any failure it is removed.
pub fn merge(inputs: &[PathBuf], output: &Path) -> Result<MergeReport, MergeError> {
    let started = Instant::now();
    let streams = open_merge_chain(StreamInput::paths(inputs))?;
    let mut report = if output.as_os_str() == "-" {
        let mut out = io::BufWriter::with_capacity(1 << 20, io::stdout());
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
fn open_merge_chain(inputs: Vec<StreamInput>) -> Result<Vec<OpenStream>, MergeError> {
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
    /// The input's name, for the errors of checks on worker threads.
    input: Arc<str>,
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
        let data = payloads.decode(
            &self.input,
            r.index,
            r.offset,
            r.length,
            d.codec,
            d.checksum,
            &d.payload,
        )?;
        self.plain.clear();
        self.plain.extend_from_slice(data);
        r.decoded = true;
        Ok(())
    }

    /// Leaves the current record (if nothing of it was written: counted as dropped, and a
    /// DATA record handed over to be checked) and moves to the next.
    fn finish_current(
        &mut self,
        pipeline: &mut Pipeline<'_>,
        report: &mut MergeReport,
    ) -> Result<(), MergeError> {
        if let Some(r) = self.current.take() {
            if !r.written {
                report.dropped += 1;
                if let Some(d) = r.data {
                    pipeline.send(Piece::Check {
                        input: self.input.clone(),
                        index: r.index,
                        offset: r.offset,
                        length: r.length,
                        codec: d.codec,
                        checksum: d.checksum,
                        payload: d.payload,
                    })?;
                }
            }
        }
        self.advance()
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
    out: &mut (dyn Write + Send),
    name: &str,
) -> Result<MergeReport, MergeError> {
    let header = merged_header(&streams)?;
    let limit = header.virtual_size;
    let (encoder, header_bytes) = Encoder::new(&header)
        .map_err(|e| MergeError::Internal(format!("the merged stream was refused: {e}")))?;
    let mut report = MergeReport {
        point_id: header.point_id.clone(),
        ..MergeReport::default()
    };
    let mut cursors = Vec::with_capacity(streams.len());
    for stream in streams {
        cursors.push(Cursor {
            input: stream.name().into(),
            stream,
            current: None,
            plain: Vec::new(),
        });
    }
    let written = std::thread::scope(|scope| {
        let mut pipeline = Pipeline::start(scope, encoder, header_bytes, out, name)?;
        let swept = sweep(&mut cursors, limit, &mut pipeline, &mut report);
        pipeline.finish(swept)
    })?;
    report.bytes_in = cursors.iter().map(|c| c.stream.bytes_read()).sum();
    report.records_out = written.records;
    report.bytes_out = written.bytes;
    Ok(report)
}

/// Hands the merged stream's pieces over in disk order, reading every input to its verified
/// trailer.
fn sweep(
    cursors: &mut [Cursor],
    limit: u64,
    pipeline: &mut Pipeline<'_>,
    report: &mut MergeReport,
) -> Result<(), MergeError> {
    let mut payloads = Payloads::new()?;
    let sizes: Vec<u64> = cursors
        .iter()
        .map(|c| c.stream.header.virtual_size)
        .collect();
    let bounds = visible_bounds(&sizes);
    for c in cursors.iter_mut() {
        c.advance()?;
    }
    let mut position = 0u64;
    let mut spans = Vec::with_capacity(cursors.len());
    loop {
        for c in cursors.iter_mut() {
            while c.current.as_ref().is_some_and(|r| r.span().end <= position) {
                c.finish_current(pipeline, report)?;
            }
        }
        spans.clear();
        spans.extend(cursors.iter().zip(&bounds).map(|(c, &bound)| {
            c.current
                .as_ref()
                .and_then(|r| clip(r.span(), bound, position))
        }));
        match next_step(position, limit, &spans) {
            None => break,
            Some(Step::Gap { until }) => position = until,
            Some(Step::Take { input, end }) => {
                take(
                    &mut cursors[input],
                    position,
                    end,
                    pipeline,
                    &mut payloads,
                    report,
                )?;
                position = end;
            }
        }
    }
    // What a shrink of the disk cut off is dropped, but checked, and every input is read to
    // its verified trailer.
    for c in cursors.iter_mut() {
        while c.current.is_some() {
            c.finish_current(pipeline, report)?;
        }
    }
    Ok(())
}

/// Hands over `[position, end)` of the cursor's current record: the record as stored when
/// that is all of it and nothing of it was written yet, else a piece of it.
fn take(
    cursor: &mut Cursor,
    position: u64,
    end: u64,
    pipeline: &mut Pipeline<'_>,
    payloads: &mut Payloads,
    report: &mut MergeReport,
) -> Result<(), MergeError> {
    let Some(r) = &mut cursor.current else {
        return Err(MergeError::Internal("no record to take".into()));
    };
    let first_use = !r.written;
    let whole = first_use && position == r.offset && end == r.span().end;
    r.written = true;
    let length = end - position;
    let piece = match (&r.data, whole) {
        (None, _) => {
            if whole {
                report.copied += 1;
            } else if first_use {
                report.zero_cut += 1;
            }
            Piece::Zero {
                offset: position,
                length,
            }
        }
        (Some(d), true) => {
            report.copied += 1;
            Piece::Stored {
                offset: position,
                length,
                codec: d.codec,
                checksum: d.checksum,
                payload: d.payload.clone(),
            }
        }
        (Some(d), false) => {
            if first_use {
                report.recompressed += 1;
            }
            let (offset, compress) = (r.offset, d.codec == Codec::Zstd);
            cursor.decode(payloads)?;
            let from = (position - offset) as usize;
            Piece::Cut {
                offset: position,
                bytes: cursor.plain[from..from + length as usize].to_vec(),
                compress,
            }
        }
    };
    pipeline.send(piece)
}
