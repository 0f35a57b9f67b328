//! `restore`: apply cbtstream streams to a raw image; `inspect`: verify a stream end to end.
//!
//! Synchronous std::io on purpose: restore is one sequential read of each stream and positioned
//! writes to one file. Two threads per stream: one reads and decodes (structure, order, XXH3-128
//! digest), the caller's thread decompresses, checks and writes, so hashing and reading overlap
//! with zstd. Buffers are reused; the only per-record allocations are the decoder's.
//!
//! An image is never left looking complete while it is half-applied: a sidecar file next to it
//! (`IMAGE.cbtstream`, see `docs/FORMAT.md`) says `applying` before the first byte of a stream
//! touches the image, and `complete` only after the stream's trailer and digest verified and the
//! image was fsynced. Incrementals are only applied onto an image whose sidecar says `complete`
//! at exactly their base point.

use crate::engine::direct::{write_at, DirectWriter};
use bytes::BytesMut;
use cbtstream_proto::stream::{
    self, Codec, Decoder, Header, Item, StreamError, Trailer, MAX_RECORD_LEN,
};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Size of each read from a stream while applying it.
const READ_CHUNK: usize = 4 << 20;
/// Size of each read while only the header is wanted (every input's header is read up front).
const HEADER_READ_CHUNK: usize = 64 << 10;
/// Items decoded ahead of the one being decompressed and written.
const PIPELINE_DEPTH: usize = 4;
/// Largest single write of zeroes when holes cannot be punched.
const ZERO_CHUNK: usize = 1 << 20;

/// Suffix appended to the image path to name its sidecar.
pub const SIDECAR_SUFFIX: &str = ".cbtstream";
/// First line of a sidecar file (format name and version).
const SIDECAR_MAGIC: &str = "cbtstream-image 1";

/// Everything that can stop a restore or an inspect.
///
/// Each message is complete on its own (the underlying error is part of it, not a `source`),
/// so printing the error with `{}` says which input, which record and what went wrong.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("invalid restore request: {0}")]
    Usage(String),
    #[error("reading {input}: {error}")]
    Input { input: String, error: io::Error },
    #[error("image {}: {error}", path.display())]
    Image { path: PathBuf, error: io::Error },
    #[error("{input}: {error}")]
    Damaged { input: String, error: StreamError },
    #[error("{input} does not follow on: {reason}")]
    ChainMismatch { input: String, reason: String },
    #[error("image {} does not exist: {input} is an incremental stream and needs the image it applies to", path.display())]
    MissingImage { path: PathBuf, input: String },
    #[error("image {} is not known to be complete: {reason}", path.display())]
    IncompleteImage { path: PathBuf, reason: String },
}

impl RestoreError {
    /// True if a stream is damaged (corrupt, altered or truncated): exit code 4.
    pub fn is_integrity(&self) -> bool {
        matches!(self, RestoreError::Damaged { .. })
    }
}

/// What [`restore`] did.
#[derive(Clone, Debug, Default)]
pub struct RestoreReport {
    pub image: PathBuf,
    /// Streams applied, and how many of them were full.
    pub streams: u64,
    pub full_streams: u64,
    /// Records read (DATA + ZERO).
    pub records: u64,
    pub data_records: u64,
    pub zero_records: u64,
    /// Bytes of data written to the image.
    pub bytes_written: u64,
    /// Bytes zeroed in the image (punched or written); ranges already known to be zero are
    /// skipped and not counted.
    pub bytes_zeroed: u64,
    /// Stream bytes read.
    pub input_bytes: u64,
    /// The point in time the image is at now.
    pub point_id: String,
    pub virtual_size: u64,
    pub seconds: f64,
}

impl fmt::Display for RestoreReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let incr = self.streams - self.full_streams;
        write!(
            f,
            "restored {} to point {} ({}) from {} stream{} ({} full, {} incremental): {} records, \
             {} written, {} zeroed, {} read in {:.2} s ({}/s)",
            self.image.display(),
            self.point_id,
            human(self.virtual_size),
            self.streams,
            if self.streams == 1 { "" } else { "s" },
            self.full_streams,
            incr,
            self.records,
            human(self.bytes_written),
            human(self.bytes_zeroed),
            human(self.input_bytes),
            self.seconds,
            human(rate(self.bytes_written + self.bytes_zeroed, self.seconds)),
        )
    }
}

/// What [`inspect`] found in a stream that verified completely.
#[derive(Clone, Debug)]
pub struct InspectReport {
    pub input: String,
    pub header: Header,
    pub trailer: Trailer,
    /// DATA records stored as zstd frames, and stored raw.
    pub zstd_records: u64,
    pub raw_records: u64,
    /// Total stream length, trailer included.
    pub stream_len: u64,
    pub seconds: f64,
}

impl fmt::Display for InspectReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = &self.header;
        let t = &self.trailer;
        writeln!(f, "stream:        {}", self.input)?;
        writeln!(f, "format:        cbtstream v{}", stream::FORMAT_VERSION)?;
        writeln!(f, "source id:     {}", h.source_id)?;
        writeln!(f, "point id:      {}", h.point_id)?;
        match (&h.base_id, h.incremental) {
            (Some(b), _) => writeln!(f, "base id:       {b} (incremental)")?,
            (None, true) => writeln!(f, "base id:       none (incremental onto any image)")?,
            (None, false) => writeln!(f, "base id:       none (full export)")?,
        }
        writeln!(
            f,
            "created:       {} ({})",
            utc(h.created_unix_secs),
            h.created_unix_secs
        )?;
        writeln!(
            f,
            "virtual size:  {} ({})",
            h.virtual_size,
            human(h.virtual_size)
        )?;
        writeln!(f, "block size:    {}", h.block_size)?;
        writeln!(f, "codec:         {}", h.codec)?;
        writeln!(
            f,
            "records:       {} ({} data: {} zstd + {} raw; {} zero)",
            t.records, t.data_records, self.zstd_records, self.raw_records, t.zero_records
        )?;
        writeln!(
            f,
            "data bytes:    {} ({}), stored as {} ({})",
            t.data_bytes,
            human(t.data_bytes),
            t.stored_bytes,
            human(t.stored_bytes)
        )?;
        writeln!(
            f,
            "zero bytes:    {} ({})",
            t.zero_bytes,
            human(t.zero_bytes)
        )?;
        if t.stored_bytes > 0 {
            writeln!(
                f,
                "compression:   {:.2}x",
                t.data_bytes as f64 / t.stored_bytes as f64
            )?;
        } else {
            writeln!(f, "compression:   n/a")?;
        }
        writeln!(
            f,
            "stream size:   {} ({})",
            self.stream_len,
            human(self.stream_len)
        )?;
        writeln!(f, "digest:        xxh3-128 {}", t.digest_hex())?;
        write!(
            f,
            "status:        OK (every record checksum, the trailer and the digest verified in {:.2} s)",
            self.seconds
        )
    }
}

/// The state a sidecar records for an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageStatus {
    /// A stream is (or was, if the restore died) being applied: the content is undefined.
    Applying,
    /// The image holds exactly `point_id`.
    Complete,
}

/// The content of an image's sidecar (`IMAGE.cbtstream`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageState {
    pub status: ImageStatus,
    pub point_id: String,
    pub source_id: String,
    pub base_id: Option<String>,
    pub virtual_size: u64,
    /// XXH3-128 digest of the last stream applied (only when complete).
    pub stream_digest: Option<String>,
    pub updated_unix_secs: u64,
}

impl ImageState {
    fn render(&self) -> String {
        let mut s = String::with_capacity(256);
        s.push_str(SIDECAR_MAGIC);
        s.push('\n');
        let status = match self.status {
            ImageStatus::Applying => "applying",
            ImageStatus::Complete => "complete",
        };
        s.push_str(&format!("state={status}\n"));
        s.push_str(&format!("point_id={}\n", self.point_id));
        s.push_str(&format!("source_id={}\n", self.source_id));
        s.push_str(&format!(
            "base_id={}\n",
            self.base_id.as_deref().unwrap_or("")
        ));
        s.push_str(&format!("virtual_size={}\n", self.virtual_size));
        if let Some(d) = &self.stream_digest {
            s.push_str(&format!("stream_digest={d}\n"));
        }
        s.push_str(&format!("updated_unix_secs={}\n", self.updated_unix_secs));
        s
    }

    fn parse(text: &str) -> Result<ImageState, String> {
        let mut lines = text.lines();
        match lines.next() {
            Some(SIDECAR_MAGIC) => {}
            Some(l) if l.starts_with("cbtstream-image ") => {
                return Err(format!("unsupported sidecar version `{l}`"))
            }
            _ => return Err("not a cbtstream sidecar".into()),
        }
        let (mut status, mut point, mut source, mut base, mut size, mut digest, mut updated) =
            (None, None, None, None, None, None, 0);
        for line in lines {
            let Some((key, value)) = line.split_once('=') else {
                return Err(format!("malformed line `{line}`"));
            };
            match key {
                "state" => {
                    status = Some(match value {
                        "applying" => ImageStatus::Applying,
                        "complete" => ImageStatus::Complete,
                        other => return Err(format!("unknown state `{other}`")),
                    })
                }
                "point_id" => point = Some(value.to_owned()),
                "source_id" => source = Some(value.to_owned()),
                "base_id" => base = (!value.is_empty()).then(|| value.to_owned()),
                "virtual_size" => {
                    size = Some(
                        value
                            .parse::<u64>()
                            .map_err(|_| format!("bad virtual_size `{value}`"))?,
                    )
                }
                "stream_digest" => digest = Some(value.to_owned()),
                "updated_unix_secs" => updated = value.parse().unwrap_or(0),
                _ => {} // Unknown keys are for newer writers; ignore them.
            }
        }
        match (status, point, source, size) {
            (Some(status), Some(point_id), Some(source_id), Some(virtual_size)) => Ok(ImageState {
                status,
                point_id,
                source_id,
                base_id: base,
                virtual_size,
                stream_digest: digest,
                updated_unix_secs: updated,
            }),
            _ => Err("missing state, point_id, source_id or virtual_size".into()),
        }
    }
}

/// The sidecar path of an image: the image path with [`SIDECAR_SUFFIX`] appended.
pub fn sidecar_path(image: &Path) -> PathBuf {
    crate::durable::with_suffix(image, SIDECAR_SUFFIX)
}

/// The state recorded in an image's sidecar; `Ok(None)` if there is no sidecar.
pub fn image_state(image: &Path) -> Result<Option<ImageState>, RestoreError> {
    let path = sidecar_path(image);
    let text = match fs::read(&path) {
        Ok(bytes) if bytes.len() > 64 * 1024 => {
            return Err(RestoreError::IncompleteImage {
                path: image.to_owned(),
                reason: format!("sidecar {} is too large to be one", path.display()),
            })
        }
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(RestoreError::Image { path, error }),
    };
    let text = String::from_utf8(text).map_err(|_| RestoreError::IncompleteImage {
        path: image.to_owned(),
        reason: format!("sidecar {} is not UTF-8", path.display()),
    })?;
    ImageState::parse(&text)
        .map(Some)
        .map_err(|e| RestoreError::IncompleteImage {
            path: image.to_owned(),
            reason: format!("sidecar {} is unreadable: {e}", path.display()),
        })
}

/// Writes the sidecar atomically: temp file, fsync, rename, fsync of the directory.
fn write_image_state(image: &Path, state: &ImageState) -> Result<(), RestoreError> {
    let path = sidecar_path(image);
    crate::durable::replace(&path, state.render().as_bytes())
        .map_err(|error| RestoreError::Image { path, error })
}

/// One input stream being read.
struct Input {
    name: String,
    reader: Box<dyn Read + Send>,
    /// Bytes read but not yet decoded.
    buf: BytesMut,
    /// Staging area for reads (reused; a BytesMut's spare capacity cannot be read into safely).
    chunk: Vec<u8>,
    decoder: Decoder,
    eof: bool,
    bytes_read: u64,
}

impl Input {
    fn open(path: &Path) -> Result<Input, RestoreError> {
        let (name, reader): (String, Box<dyn Read + Send>) = if path.as_os_str() == "-" {
            ("<stdin>".to_owned(), Box::new(io::stdin()))
        } else {
            let name = path.display().to_string();
            match File::open(path) {
                Ok(f) => (name, Box::new(f)),
                Err(error) => return Err(RestoreError::Input { input: name, error }),
            }
        };
        Ok(Input::from_reader(name, reader))
    }

    fn from_reader(name: String, reader: Box<dyn Read + Send>) -> Input {
        Input {
            name,
            reader,
            buf: BytesMut::new(),
            chunk: Vec::new(),
            decoder: Decoder::new(),
            eof: false,
            bytes_read: 0,
        }
    }

    fn damaged(&self, error: StreamError) -> RestoreError {
        RestoreError::Damaged {
            input: self.name.clone(),
            error,
        }
    }

    /// Reads up to `size` more bytes into `buf`; sets `eof` when there are none.
    fn fill(&mut self, size: usize) -> Result<(), RestoreError> {
        if self.chunk.len() < size {
            // Zeroed allocation (calloc): no memset of pages that are never read into.
            self.chunk = vec![0; size];
        }
        // Room for the whole pending record at once, rather than growing (and copying) the
        // buffer once per read while a large record arrives.
        let want = self.decoder.bytes_needed().max(self.buf.len() + size);
        self.buf.reserve(want - self.buf.len());
        let n = loop {
            match self.reader.read(&mut self.chunk[..size]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    return Err(RestoreError::Input {
                        input: self.name.clone(),
                        error,
                    })
                }
            }
        };
        if n == 0 {
            self.eof = true;
        } else {
            self.buf.extend_from_slice(&self.chunk[..n]);
            self.bytes_read += n as u64;
        }
        Ok(())
    }

    /// The next verified-structure item; `None` once the trailer was seen and the input ended
    /// right after it.
    fn next_item(&mut self, read_size: usize) -> Result<Option<Item>, RestoreError> {
        loop {
            match self.decoder.decode(&mut self.buf) {
                Ok(Some(item)) => return Ok(Some(item)),
                Ok(None) => {}
                Err(e) => return Err(self.damaged(e)),
            }
            if self.eof {
                self.decoder
                    .finish(self.buf.len())
                    .map_err(|e| self.damaged(e))?;
                return Ok(None);
            }
            self.fill(read_size)?;
        }
    }

    fn read_header(&mut self) -> Result<Header, RestoreError> {
        match self.next_item(HEADER_READ_CHUNK)? {
            Some(Item::Header(h)) => Ok(h),
            _ => Err(self.damaged(StreamError::Header("no header".into()))),
        }
    }
}

/// Reads and decodes `input` (structure, order, XXH3-128 digest) on a second thread while `each`
/// decompresses, verifies and writes items on this one, so hashing and reading overlap with
/// zstd. At most [`PIPELINE_DEPTH`] items wait between the two.
///
/// If `each` fails, its error is returned (it is about an earlier record than anything the
/// reader could have failed on since); otherwise the reader's.
fn pipelined(
    input: &mut Input,
    mut each: impl FnMut(Item) -> Result<(), RestoreError>,
) -> Result<(), RestoreError> {
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Item>(PIPELINE_DEPTH);
        let reader = scope.spawn(move || -> Result<(), RestoreError> {
            while let Some(item) = input.next_item(READ_CHUNK)? {
                if tx.send(item).is_err() {
                    break; // The consumer stopped on an error.
                }
            }
            Ok(())
        });
        let mut consumed = Ok(());
        for item in rx.iter() {
            if let Err(e) = each(item) {
                consumed = Err(e);
                break;
            }
        }
        drop(rx);
        let read = match reader.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        consumed.and(read)
    })
}

/// Decompresses (if needed) and verifies one DATA record; returns the bytes to write.
struct PayloadDecoder {
    dctx: zstd::bulk::Decompressor<'static>,
    scratch: Vec<u8>,
}

impl PayloadDecoder {
    fn new() -> io::Result<Self> {
        Ok(PayloadDecoder {
            dctx: zstd::bulk::Decompressor::new()?,
            scratch: Vec::new(),
        })
    }

    fn decode<'a>(
        &'a mut self,
        index: u64,
        offset: u64,
        length: u64,
        codec: Codec,
        checksum: u64,
        payload: &'a [u8],
    ) -> Result<&'a [u8], StreamError> {
        let problem = |problem: String| StreamError::Record {
            index,
            offset,
            problem,
        };
        let data: &[u8] = match codec {
            Codec::None => payload,
            Codec::Zstd => {
                // The decoder bounds length by MAX_RECORD_LEN; check again before allocating.
                if length > MAX_RECORD_LEN {
                    return Err(problem(format!("length {length} is too large")));
                }
                let len = length as usize;
                match zstd::zstd_safe::find_frame_compressed_size(payload) {
                    Ok(n) if n == payload.len() => {}
                    Ok(n) => {
                        let all = payload.len();
                        return Err(problem(format!(
                            "payload is not exactly one zstd frame (the first is {n} of {all} bytes)"
                        )));
                    }
                    Err(code) => {
                        return Err(problem(format!(
                            "payload is not a valid zstd frame: {}",
                            zstd::zstd_safe::get_error_name(code)
                        )))
                    }
                }
                if self.scratch.len() < len {
                    self.scratch = vec![0; len];
                }
                // Decompressing into exactly `len` bytes: a frame that expands to more fails.
                let n = self
                    .dctx
                    .decompress_to_buffer(payload, &mut self.scratch[..len])
                    .map_err(|e| {
                        problem(format!(
                            "zstd frame does not decompress to {len} bytes: {e}"
                        ))
                    })?;
                &self.scratch[..n]
            }
        };
        stream::verify_data(index, offset, length, checksum, data)?;
        Ok(data)
    }
}

/// Applies `inputs` in order to the raw image `to`. See the module documentation.
pub fn restore(to: &Path, inputs: &[PathBuf]) -> Result<RestoreReport, RestoreError> {
    let started = Instant::now();
    if inputs.is_empty() {
        return Err(RestoreError::Usage("no input streams".into()));
    }
    if inputs.iter().filter(|p| p.as_os_str() == "-").count() > 1 {
        return Err(RestoreError::Usage(
            "standard input (-) can be given only once".into(),
        ));
    }
    match fs::metadata(to) {
        Ok(m) if !m.is_file() => {
            return Err(RestoreError::Usage(format!(
                "{} is not a regular file (only raw image files are supported)",
                to.display()
            )))
        }
        _ => {}
    }

    // Every header first, so a broken chain is refused before the image is touched.
    let mut streams = Vec::with_capacity(inputs.len());
    for path in inputs {
        let mut input = Input::open(path)?;
        let header = input.read_header()?;
        streams.push((input, header));
    }
    check_chain(to, &streams)?;

    let mut applier = Applier {
        image: to.to_owned(),
        payload: PayloadDecoder::new().map_err(|error| RestoreError::Input {
            input: "zstd decompressor".into(),
            error,
        })?,
        zeros: Vec::new(),
        punch_holes: true,
    };
    let mut report = RestoreReport {
        image: to.to_owned(),
        ..RestoreReport::default()
    };
    for (input, header) in streams {
        applier.apply(input, &header, &mut report)?;
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Where the image will be before a stream: (point, source, where that comes from): the
/// previous stream of this restore, or else the image's recorded complete state.
fn before(
    previous: Option<(String, String, String)>,
    to: &Path,
    input: &str,
) -> Result<(String, String, String), RestoreError> {
    if let Some(p) = previous {
        return Ok(p);
    }
    let state = complete_image_state(to, input)?;
    Ok((
        state.point_id,
        state.source_id,
        format!("the image {}", to.display()),
    ))
}

/// Checks that each stream follows on from the previous one, and the first incremental from
/// the image's recorded state.
fn check_chain(to: &Path, streams: &[(Input, Header)]) -> Result<(), RestoreError> {
    // (point, source, where it comes from) the image will be at before each stream.
    let mut current: Option<(String, String, String)> = None;
    for (i, (input, h)) in streams.iter().enumerate() {
        if h.incremental && h.base_id.is_none() {
            // An incremental whose base was not named: it applies onto any complete image.
            let (_, source, from) = before(current.take(), to, &input.name)?;
            tracing::warn!(
                input = %input.name,
                "incremental without a base id: applied onto {from} without checking that it is the right base"
            );
            current = Some((h.point_id.clone(), source, input.name.clone()));
            continue;
        }
        let Some(base) = &h.base_id else {
            if i > 0 {
                tracing::warn!(
                    input = %input.name,
                    "full stream after other streams: it replaces everything they restored"
                );
            }
            current = Some((h.point_id.clone(), h.source_id.clone(), input.name.clone()));
            continue;
        };
        let (point, source, from) = before(current.take(), to, &input.name)?;
        if *base != point {
            return Err(RestoreError::ChainMismatch {
                input: input.name.clone(),
                reason: format!("its base is point `{base}`, but {from} is at point `{point}`"),
            });
        }
        if h.source_id != source {
            return Err(RestoreError::ChainMismatch {
                input: input.name.clone(),
                reason: format!(
                    "it comes from source `{}`, but {from} comes from source `{source}`",
                    h.source_id
                ),
            });
        }
        current = Some((h.point_id.clone(), h.source_id.clone(), input.name.clone()));
    }
    Ok(())
}

/// The image's recorded state, which must say `complete` and match the image's size.
fn complete_image_state(to: &Path, input: &str) -> Result<ImageState, RestoreError> {
    let len = match fs::metadata(to) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(RestoreError::MissingImage {
                path: to.to_owned(),
                input: input.to_owned(),
            })
        }
        Err(error) => {
            return Err(RestoreError::Image {
                path: to.to_owned(),
                error,
            })
        }
    };
    let incomplete = |reason: String| RestoreError::IncompleteImage {
        path: to.to_owned(),
        reason,
    };
    let Some(state) = image_state(to)? else {
        return Err(incomplete(format!(
            "it has no sidecar {}, so which point in time it holds is unknown; restore a full stream first",
            sidecar_path(to).display()
        )));
    };
    if state.status != ImageStatus::Complete {
        return Err(incomplete(format!(
            "a restore to point `{}` was started and did not finish, so the image is half-applied; \
             restore again starting from a full stream",
            state.point_id
        )));
    }
    if len != state.virtual_size {
        return Err(incomplete(format!(
            "its size {len} differs from the {} bytes recorded for point `{}`",
            state.virtual_size, state.point_id
        )));
    }
    Ok(state)
}

struct Applier {
    image: PathBuf,
    payload: PayloadDecoder,
    /// A block of zeroes, allocated the first time holes cannot be punched.
    zeros: Vec<u8>,
    punch_holes: bool,
}

impl Applier {
    fn image_error(&self, error: io::Error) -> RestoreError {
        RestoreError::Image {
            path: self.image.clone(),
            error,
        }
    }

    fn apply(
        &mut self,
        mut input: Input,
        header: &Header,
        report: &mut RestoreReport,
    ) -> Result<(), RestoreError> {
        let now = unix_now();
        let mut state = ImageState {
            status: ImageStatus::Applying,
            point_id: header.point_id.clone(),
            source_id: header.source_id.clone(),
            base_id: header.base_id.clone(),
            virtual_size: header.virtual_size,
            stream_digest: None,
            updated_unix_secs: now,
        };
        // Durable before the image changes at all.
        write_image_state(&self.image, &state)?;

        let full = header.is_full();
        let file = if full {
            crate::durable::private_options()
                .truncate(true)
                .open(&self.image)
        } else {
            OpenOptions::new().write(true).open(&self.image)
        }
        .map_err(|e| self.image_error(e))?;
        let old_len = if full {
            0
        } else {
            file.metadata().map_err(|e| self.image_error(e))?.len()
        };
        if full || old_len != header.virtual_size {
            file.set_len(header.virtual_size)
                .map_err(|e| self.image_error(e))?;
        }
        // Everything from here on reads as zeroes already (fresh or grown): ZERO records there
        // need no work.
        let zero_from = old_len.min(header.virtual_size);
        // Data goes around the page cache: a restore writes the whole disk once and the host
        // has better use for its memory (see engine/direct.rs).
        let mut direct = DirectWriter::open(&self.image);

        let name = input.name.clone();
        let mut trailer = None;
        pipelined(&mut input, |item| {
            match item {
                Item::Header(_) => {}
                Item::Data {
                    index,
                    offset,
                    length,
                    codec,
                    checksum,
                    payload,
                } => {
                    let data = self
                        .payload
                        .decode(index, offset, length, codec, checksum, &payload)
                        .map_err(|error| RestoreError::Damaged {
                            input: name.clone(),
                            error,
                        })?;
                    write_at(&mut direct, &file, data, offset).map_err(|error| {
                        RestoreError::Image {
                            path: self.image.clone(),
                            error,
                        }
                    })?;
                    report.data_records += 1;
                    report.bytes_written += length;
                }
                Item::Zero { offset, length, .. } => {
                    report.zero_records += 1;
                    let end = offset.saturating_add(length).min(zero_from);
                    if offset < end {
                        self.zero_range(&file, offset, end - offset)
                            .map_err(|e| self.image_error(e))?;
                        report.bytes_zeroed += end - offset;
                    }
                }
                Item::End(t) => trailer = Some(t),
            }
            Ok(())
        })?;
        // The reader ends without error only after Decoder::finish accepted the end of the
        // stream, which requires the verified trailer.
        let Some(trailer) = trailer else {
            return Err(input.damaged(StreamError::Truncated {
                records: input.decoder.records(),
                at: "without a trailer".into(),
            }));
        };
        file.sync_all().map_err(|e| self.image_error(e))?;
        drop(file);

        state.status = ImageStatus::Complete;
        state.stream_digest = Some(trailer.digest_hex());
        state.updated_unix_secs = unix_now();
        write_image_state(&self.image, &state)?;

        tracing::info!(
            input = %input.name,
            point = %header.point_id,
            records = trailer.records,
            "stream applied"
        );
        report.streams += 1;
        report.full_streams += u64::from(full);
        report.records += trailer.records;
        report.input_bytes += input.bytes_read;
        report.point_id = header.point_id.clone();
        report.virtual_size = header.virtual_size;
        Ok(())
    }

    /// Makes `[offset, offset + len)` read as zeroes: punch a hole, or write zeroes where the
    /// filesystem cannot.
    fn zero_range(&mut self, file: &File, offset: u64, len: u64) -> io::Result<()> {
        if self.punch_holes {
            match punch_hole(file, offset, len) {
                Ok(()) => return Ok(()),
                Err(e)
                    if e.kind() == io::ErrorKind::Unsupported
                        || matches!(
                            e.raw_os_error(),
                            Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)
                        ) =>
                {
                    self.punch_holes = false;
                }
                Err(e) => return Err(e),
            }
        }
        if self.zeros.is_empty() {
            self.zeros = vec![0; ZERO_CHUNK];
        }
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let n = (end - pos).min(ZERO_CHUNK as u64) as usize;
            file.write_all_at(&self.zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let invalid = |_| io::Error::from(io::ErrorKind::InvalidInput);
    let off = libc::off_t::try_from(offset).map_err(invalid)?;
    let len = libc::off_t::try_from(len).map_err(invalid)?;
    // SAFETY: fallocate takes a descriptor and three integers and touches no memory of ours;
    // the descriptor belongs to `file`, which is borrowed for the duration of the call.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn punch_hole(_file: &File, _offset: u64, _len: u64) -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

/// Reads a whole stream, decompresses every record and checks every checksum, the trailer and
/// the digest. `-` reads standard input.
pub fn inspect(input: &Path) -> Result<InspectReport, RestoreError> {
    inspect_input(Input::open(input)?)
}

fn inspect_input(mut input: Input) -> Result<InspectReport, RestoreError> {
    let started = Instant::now();
    let header = input.read_header()?;
    let mut payloads = PayloadDecoder::new().map_err(|error| RestoreError::Input {
        input: "zstd decompressor".into(),
        error,
    })?;
    let (mut zstd_records, mut raw_records) = (0, 0);
    let mut trailer = None;
    let name = input.name.clone();
    pipelined(&mut input, |item| {
        match item {
            Item::Data {
                index,
                offset,
                length,
                codec,
                checksum,
                payload,
            } => {
                payloads
                    .decode(index, offset, length, codec, checksum, &payload)
                    .map_err(|error| RestoreError::Damaged {
                        input: name.clone(),
                        error,
                    })?;
                match codec {
                    Codec::Zstd => zstd_records += 1,
                    Codec::None => raw_records += 1,
                }
            }
            Item::End(t) => trailer = Some(t),
            Item::Header(_) | Item::Zero { .. } => {}
        }
        Ok(())
    })?;
    let Some(trailer) = trailer else {
        return Err(input.damaged(StreamError::Truncated {
            records: input.decoder.records(),
            at: "without a trailer".into(),
        }));
    };
    Ok(InspectReport {
        input: input.name.clone(),
        header,
        trailer,
        zstd_records,
        raw_records,
        stream_len: input.bytes_read,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn rate(bytes: u64, seconds: f64) -> u64 {
    if seconds > 0.0 {
        (bytes as f64 / seconds) as u64
    } else {
        0
    }
}

/// `1536` → `1.5 KiB`.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Seconds since the epoch as `YYYY-MM-DD HH:MM:SS UTC` (civil-from-days, H. Hinnant).
fn utc(secs: u64) -> String {
    // Beyond year 9999 a date is meaningless; show the number.
    if secs > 253_402_300_799 {
        return format!("{secs} s after the epoch");
    }
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use cbtstream_proto::stream::{checksum, max_stored_len, Encoder};

    /// xorshift64*: a tiny deterministic PRNG for test data.
    struct Prng(u64);

    impl Prng {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            x.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    const BLOCK: usize = 4096;

    /// A disk of `blocks` blocks: random, compressible text, or zero blocks.
    fn disk(rng: &mut Prng, blocks: usize) -> Vec<u8> {
        let mut d = vec![0u8; blocks * BLOCK];
        for b in 0..blocks {
            fill_block(rng, &mut d[b * BLOCK..(b + 1) * BLOCK]);
        }
        d
    }

    fn fill_block(rng: &mut Prng, block: &mut [u8]) {
        match rng.below(3) {
            0 => block.fill(0),
            1 => block.iter_mut().for_each(|x| *x = rng.next() as u8),
            _ => {
                let word = rng.next().to_le_bytes();
                for (i, x) in block.iter_mut().enumerate() {
                    *x = word[i % 8] ^ (i / 512) as u8;
                }
            }
        }
    }

    /// Exports `extents` (block indexes, each run of blocks one record or ZERO) of `disk`.
    fn export(disk: &[u8], point: &str, base: Option<&str>, blocks: &[usize]) -> Vec<u8> {
        let h = Header {
            virtual_size: disk.len() as u64,
            block_size: BLOCK as u32,
            source_id: "vdi-a".into(),
            point_id: point.into(),
            incremental: base.is_some(),
            base_id: base.map(str::to_owned),
            created_unix_secs: 1_700_000_000,
            codec: Codec::Zstd,
        };
        let (mut enc, mut out) = Encoder::new(&h).unwrap();
        for &b in blocks {
            let off = (b * BLOCK) as u64;
            let data = &disk[b * BLOCK..((b + 1) * BLOCK).min(disk.len())];
            if data.iter().all(|&x| x == 0) {
                out.extend_from_slice(&enc.zero(off, data.len() as u64).unwrap());
                continue;
            }
            let packed = zstd::bulk::compress(data, 3).unwrap();
            let (codec, payload) = if packed.len() < data.len() {
                (Codec::Zstd, &packed[..])
            } else {
                (Codec::None, data)
            };
            let hdr = enc
                .data(off, data.len() as u64, codec, checksum(data), payload)
                .unwrap();
            out.extend_from_slice(&hdr);
            out.extend_from_slice(payload);
        }
        out.extend_from_slice(&enc.finish());
        out
    }

    struct Chain {
        dir: tempfile::TempDir,
        disks: Vec<Vec<u8>>,
        streams: Vec<PathBuf>,
    }

    /// A full export and two incrementals; the second grows the disk.
    fn chain() -> Chain {
        let mut rng = Prng(0x1234_5678_9abc_def1);
        let dir = tempfile::tempdir().unwrap();
        let d0 = disk(&mut rng, 64);
        let all: Vec<usize> = (0..64).collect();
        let mut d1 = d0.clone();
        let changed1: Vec<usize> = vec![0, 1, 5, 17, 18, 19, 40, 63];
        for &b in &changed1 {
            fill_block(&mut rng, &mut d1[b * BLOCK..(b + 1) * BLOCK]);
        }
        d1[40 * BLOCK..41 * BLOCK].fill(0); // a block that becomes zero
        let mut d2 = d1.clone();
        d2.resize(80 * BLOCK, 0);
        let mut changed2: Vec<usize> = vec![2, 17, 33];
        for &b in &changed2 {
            fill_block(&mut rng, &mut d2[b * BLOCK..(b + 1) * BLOCK]);
        }
        for b in 70..80 {
            fill_block(&mut rng, &mut d2[b * BLOCK..(b + 1) * BLOCK]);
            changed2.push(b);
        }
        let s = [
            export(&d0, "p0", None, &all),
            export(&d1, "p1", Some("p0"), &changed1),
            export(&d2, "p2", Some("p1"), &changed2),
        ];
        let mut streams = Vec::new();
        for (i, bytes) in s.iter().enumerate() {
            let p = dir.path().join(format!("s{i}.cbt"));
            fs::write(&p, bytes).unwrap();
            streams.push(p);
        }
        Chain {
            dir,
            disks: vec![d0, d1, d2],
            streams,
        }
    }

    fn sidecar_text(image: &Path) -> String {
        fs::read_to_string(sidecar_path(image)).unwrap()
    }

    #[test]
    fn restore_full_and_two_incrementals_in_one_go() {
        let c = chain();
        let img = c.dir.path().join("disk.raw");
        let r = restore(&img, &c.streams).unwrap();
        assert_eq!(fs::read(&img).unwrap(), c.disks[2]);
        assert_eq!(r.streams, 3);
        assert_eq!(r.full_streams, 1);
        assert_eq!(r.point_id, "p2");
        assert_eq!(r.virtual_size, c.disks[2].len() as u64);
        assert!(r.to_string().contains("to point p2"), "{r}");
        let state = image_state(&img).unwrap().unwrap();
        assert_eq!(state.status, ImageStatus::Complete);
        assert_eq!(state.point_id, "p2");
        assert_eq!(state.base_id.as_deref(), Some("p1"));
        assert_eq!(state.virtual_size, 80 * BLOCK as u64);
        assert!(sidecar_text(&img).starts_with("cbtstream-image 1\nstate=complete\n"));
    }

    #[test]
    fn restore_one_stream_at_a_time_and_shrink() {
        let c = chain();
        let img = c.dir.path().join("disk.raw");
        for (i, s) in c.streams.iter().enumerate() {
            restore(&img, std::slice::from_ref(s)).unwrap();
            assert_eq!(fs::read(&img).unwrap(), c.disks[i], "after stream {i}");
        }
        // An incremental that shrinks the disk to 10 blocks and zeroes one that had data.
        let mut d3 = c.disks[2][..10 * BLOCK].to_vec();
        d3[3 * BLOCK..4 * BLOCK].fill(0);
        d3[4 * BLOCK] = 7;
        let s3 = c.dir.path().join("s3.cbt");
        fs::write(&s3, export(&d3, "p3", Some("p2"), &[3, 4])).unwrap();
        restore(&img, &[s3]).unwrap();
        assert_eq!(fs::read(&img).unwrap(), d3);
        // A full stream over an existing image replaces it.
        restore(&img, &c.streams[..1]).unwrap();
        assert_eq!(fs::read(&img).unwrap(), c.disks[0]);
    }

    #[test]
    fn chain_mismatch_is_refused_before_writing() {
        let c = chain();
        let img = c.dir.path().join("disk.raw");
        // full then the second incremental: p0 -> (p1 missing) -> p2.
        let e = restore(&img, &[c.streams[0].clone(), c.streams[2].clone()]).unwrap_err();
        assert!(matches!(e, RestoreError::ChainMismatch { .. }), "{e}");
        assert!(e.to_string().contains("its base is point `p1`"), "{e}");
        assert!(!e.is_integrity());
        assert!(!img.exists(), "nothing may be written on a chain mismatch");
        assert!(!sidecar_path(&img).exists());

        // Against the image's recorded state.
        restore(&img, &c.streams[..1]).unwrap();
        let e = restore(&img, &c.streams[2..]).unwrap_err();
        assert!(matches!(e, RestoreError::ChainMismatch { .. }), "{e}");
        assert!(e.to_string().contains("is at point `p0`"), "{e}");
        assert_eq!(fs::read(&img).unwrap(), c.disks[0]);
        // Applying the same incremental twice is a mismatch too.
        restore(&img, &c.streams[1..2]).unwrap();
        let e = restore(&img, &c.streams[1..2]).unwrap_err();
        assert!(matches!(e, RestoreError::ChainMismatch { .. }), "{e}");
        assert_eq!(fs::read(&img).unwrap(), c.disks[1]);
    }

    #[test]
    fn incremental_needs_an_image_with_a_complete_sidecar() {
        let c = chain();
        let img = c.dir.path().join("disk.raw");
        let e = restore(&img, &c.streams[1..2]).unwrap_err();
        assert!(matches!(e, RestoreError::MissingImage { .. }), "{e}");
        fs::write(&img, &c.disks[0]).unwrap();
        let e = restore(&img, &c.streams[1..2]).unwrap_err();
        assert!(matches!(e, RestoreError::IncompleteImage { .. }), "{e}");
        assert!(e.to_string().contains("no sidecar"), "{e}");
        fs::write(sidecar_path(&img), "garbage").unwrap();
        let e = restore(&img, &c.streams[1..2]).unwrap_err();
        assert!(matches!(e, RestoreError::IncompleteImage { .. }), "{e}");
        // A complete sidecar whose size disagrees with the image.
        restore(&img, &c.streams[..1]).unwrap();
        fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len(1)
            .unwrap();
        let e = restore(&img, &c.streams[1..2]).unwrap_err();
        assert!(e.to_string().contains("differs"), "{e}");
    }

    #[test]
    fn truncated_stream_leaves_image_applying_and_blocks_incrementals() {
        let c = chain();
        let img = c.dir.path().join("disk.raw");
        restore(&img, &c.streams[..1]).unwrap();
        let good = fs::read(&c.streams[1]).unwrap();
        let cut = c.dir.path().join("cut.cbt");
        // Cut inside the trailer: every record is applied, the stream is still refused.
        fs::write(&cut, &good[..good.len() - 5]).unwrap();
        let e = restore(&img, std::slice::from_ref(&cut)).unwrap_err();
        assert!(e.is_integrity(), "{e}");
        assert!(
            matches!(&e, RestoreError::Damaged { error, .. } if error.is_truncation()),
            "{e}"
        );
        assert!(e.to_string().contains("stream truncated"), "{e}");
        assert!(sidecar_text(&img).contains("state=applying\npoint_id=p1\n"));
        // The good incremental cannot go on top of a half-applied image.
        let e = restore(&img, &c.streams[1..2]).unwrap_err();
        assert!(matches!(e, RestoreError::IncompleteImage { .. }), "{e}");
        assert!(e.to_string().contains("did not finish"), "{e}");
        // Cut in the middle.
        fs::write(&cut, &good[..good.len() / 2]).unwrap();
        restore(&img, &c.streams[..1]).unwrap();
        let e = restore(&img, std::slice::from_ref(&cut)).unwrap_err();
        assert!(e.is_integrity(), "{e}");
        assert_eq!(
            image_state(&img).unwrap().unwrap().status,
            ImageStatus::Applying
        );
        // Starting again from the full stream works.
        restore(&img, &c.streams).unwrap();
        assert_eq!(fs::read(&img).unwrap(), c.disks[2]);
    }

    #[test]
    fn flipped_bytes_are_refused() {
        let c = chain();
        let good = fs::read(&c.streams[0]).unwrap();
        let bad = c.dir.path().join("bad.cbt");
        let mut rng = Prng(99);
        for round in 0..40 {
            let img = c.dir.path().join(format!("img{round}"));
            let mut m = good.clone();
            let pos = if round == 0 {
                // Inside the first payload (header, then a 40-byte record header).
                u32::from_le_bytes(good[12..16].try_into().unwrap()) as usize + 45
            } else {
                rng.below(good.len() as u64) as usize
            };
            m[pos] ^= 1 << rng.below(8);
            fs::write(&bad, &m).unwrap();
            let e = restore(&img, std::slice::from_ref(&bad)).unwrap_err();
            assert!(e.is_integrity(), "flip at {pos}: {e}");
            if round == 0 {
                assert!(e.to_string().contains("record 0 (offset 0x0)"), "{e}");
            }
            assert!(inspect(&bad).unwrap_err().is_integrity());
            if let Ok(Some(state)) = image_state(&img) {
                assert_eq!(state.status, ImageStatus::Applying);
            }
        }
    }

    #[test]
    fn every_byte_flip_and_cut_of_a_small_zstd_stream_is_refused() {
        let mut d = vec![0u8; 3 * BLOCK];
        for (i, x) in d[..BLOCK + 100].iter_mut().enumerate() {
            *x = (i % 7) as u8;
        }
        let mut rng = Prng(5);
        d[2 * BLOCK..]
            .iter_mut()
            .for_each(|x| *x = rng.next() as u8);
        let good = export(&d, "p", None, &[0, 1, 2]);
        let check = |bytes: Vec<u8>| {
            inspect_input(Input::from_reader(
                "mem".into(),
                Box::new(io::Cursor::new(bytes)),
            ))
        };
        let r = check(good.clone()).unwrap();
        assert_eq!((r.zstd_records, r.raw_records), (2, 1));
        for pos in 0..good.len() {
            let mut m = good.clone();
            m[pos] ^= 0x10;
            let e = check(m).unwrap_err();
            assert!(e.is_integrity(), "flip at {pos}: {e}");
        }
        for cut in 0..good.len() {
            let e = check(good[..cut].to_vec()).unwrap_err();
            assert!(e.is_integrity(), "cut at {cut}: {e}");
        }
    }

    #[test]
    fn largest_records_round_trip() {
        // One 32 MiB zstd record, one raw record, across many 4 MiB reads.
        let big = MAX_RECORD_LEN as usize;
        let mut d = vec![0u8; big + BLOCK];
        let mut rng = Prng(3);
        for (i, x) in d[..big].iter_mut().enumerate() {
            *x = (i >> 12) as u8;
        }
        d[big..].iter_mut().for_each(|x| *x = rng.next() as u8);
        let h = Header {
            virtual_size: d.len() as u64,
            block_size: BLOCK as u32,
            source_id: "vdi-big".into(),
            point_id: "big".into(),
            incremental: false,
            base_id: None,
            created_unix_secs: 0,
            codec: Codec::Zstd,
        };
        let (mut enc, mut out) = Encoder::new(&h).unwrap();
        let packed = zstd::bulk::compress(&d[..big], 1).unwrap();
        out.extend(
            enc.data(0, big as u64, Codec::Zstd, checksum(&d[..big]), &packed)
                .unwrap(),
        );
        out.extend_from_slice(&packed);
        let tail = &d[big..];
        out.extend(
            enc.data(big as u64, BLOCK as u64, Codec::None, checksum(tail), tail)
                .unwrap(),
        );
        out.extend_from_slice(tail);
        out.extend(enc.finish());
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path().join("big.cbt");
        fs::write(&s, &out).unwrap();
        let img = dir.path().join("img");
        let r = restore(&img, &[s]).unwrap();
        assert_eq!(r.bytes_written, d.len() as u64);
        assert!(fs::read(&img).unwrap() == d);
    }

    #[test]
    fn zstd_payload_problems_name_the_record() {
        let mut p = PayloadDecoder::new().unwrap();
        let data = vec![7u8; 10_000];
        let frame = zstd::bulk::compress(&data, 3).unwrap();
        let sum = checksum(&data);
        assert_eq!(
            p.decode(3, 0x3000, 10_000, Codec::Zstd, sum, &frame)
                .unwrap(),
            &data[..]
        );
        // Expands to more than the record says.
        let e = p
            .decode(3, 0x3000, 9_999, Codec::Zstd, sum, &frame)
            .unwrap_err();
        assert!(
            e.to_string().starts_with("record 3 (offset 0x3000): "),
            "{e}"
        );
        // Expands to less.
        let e = p
            .decode(3, 0x3000, 10_001, Codec::Zstd, sum, &frame)
            .unwrap_err();
        assert!(e.to_string().contains("decodes to 10000 bytes"), "{e}");
        // Two frames.
        let mut two = frame.clone();
        two.extend_from_slice(&frame);
        let e = p
            .decode(3, 0x3000, 20_000, Codec::Zstd, sum, &two)
            .unwrap_err();
        assert!(e.to_string().contains("exactly one zstd frame"), "{e}");
        // Not zstd.
        let e = p
            .decode(3, 0x3000, 10_000, Codec::Zstd, sum, b"hello")
            .unwrap_err();
        assert!(e.to_string().contains("not a valid zstd frame"), "{e}");
        // Wrong checksum.
        let e = p
            .decode(3, 0x3000, 10_000, Codec::Zstd, sum ^ 1, &frame)
            .unwrap_err();
        assert!(e.to_string().contains("checksum mismatch"), "{e}");
    }

    #[test]
    fn zero_range_punches_or_writes_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let n = 3 * ZERO_CHUNK as u64 + 5;
        fs::write(&path, vec![0xaa; n as usize + 10]).unwrap();
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        for punch_holes in [true, false] {
            let mut a = Applier {
                image: path.clone(),
                payload: PayloadDecoder::new().unwrap(),
                zeros: Vec::new(),
                punch_holes,
            };
            file.write_all_at(&vec![0xaa; n as usize], 0).unwrap();
            a.zero_range(&file, 3, n - 3).unwrap();
            let got = fs::read(&path).unwrap();
            assert_eq!(&got[..3], &[0xaa; 3]);
            assert!(got[3..n as usize].iter().all(|&b| b == 0));
            assert_eq!(&got[n as usize..], &[0xaa; 10]);
        }
    }

    #[test]
    fn stored_bound_matches_zstd() {
        for len in [
            0u64,
            1,
            100,
            4096,
            131_071,
            131_072,
            1 << 20,
            MAX_RECORD_LEN,
        ] {
            assert_eq!(
                max_stored_len(len),
                zstd::zstd_safe::compress_bound(len as usize) as u64,
                "length {len}"
            );
        }
    }

    #[test]
    fn inspect_reports_everything() {
        let c = chain();
        let r = inspect(&c.streams[1]).unwrap();
        assert_eq!(r.header.point_id, "p1");
        assert_eq!(r.trailer.records, 8);
        assert_eq!(r.zstd_records + r.raw_records, r.trailer.data_records);
        assert_eq!(r.stream_len, fs::metadata(&c.streams[1]).unwrap().len());
        let text = r.to_string();
        for want in [
            "point id:      p1",
            "base id:       p0 (incremental)",
            "created:       2023-11-14 22:13:20 UTC",
            "records:       8 (",
            "compression:",
            "status:        OK",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }

    #[test]
    fn sidecar_round_trips() {
        let s = ImageState {
            status: ImageStatus::Complete,
            point_id: "p=1 x".into(),
            source_id: String::new(),
            base_id: None,
            virtual_size: 42,
            stream_digest: Some("ab".into()),
            updated_unix_secs: 5,
        };
        assert_eq!(ImageState::parse(&s.render()).unwrap(), s);
        let mut t = s.clone();
        t.status = ImageStatus::Applying;
        t.base_id = Some("b".into());
        t.stream_digest = None;
        assert_eq!(ImageState::parse(&t.render()).unwrap(), t);
        assert!(ImageState::parse("cbtstream-image 2\n").is_err());
        assert!(ImageState::parse("cbtstream-image 1\nstate=complete\n").is_err());
        assert!(ImageState::parse(&s.render().replace("complete", "done")).is_err());
        assert_eq!(
            sidecar_path(Path::new("/a/b.raw")),
            PathBuf::from("/a/b.raw.cbtstream")
        );
    }

    #[test]
    fn usage_errors() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("x");
        assert!(matches!(restore(&img, &[]), Err(RestoreError::Usage(_))));
        let dash = PathBuf::from("-");
        assert!(matches!(
            restore(&img, &[dash.clone(), dash]),
            Err(RestoreError::Usage(_))
        ));
        assert!(matches!(
            restore(dir.path(), &[dir.path().join("nope")]),
            Err(RestoreError::Usage(_))
        ));
        let e = restore(&img, &[dir.path().join("nope")]).unwrap_err();
        assert!(matches!(e, RestoreError::Input { .. }), "{e}");
        assert!(!e.is_integrity());
    }

    #[test]
    fn formatting_helpers() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(10 << 30), "10.0 GiB");
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(253_402_300_799), "9999-12-31 23:59:59 UTC");
        assert!(utc(u64::MAX).contains("after the epoch"));
    }
}
