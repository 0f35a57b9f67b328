//! Sink: write the records (in the order the reorder window gives them), then the trailer,
//! then make the output durable.

use super::direct::DirectFile;
use super::order::InOrder;
use super::pool::Pools;
use super::{Encoded, Payload, Progress, Record};
use cbtstream_proto::stream::{Encoder, Header, StreamError};
use std::fs::File;
use std::io::{IoSlice, Write};
use std::path::{Path, PathBuf};

/// Where the stream goes.
#[derive(Debug, Clone)]
pub enum Output {
    Stdout,
    /// Written to `PATH.partial`, fsynced, then renamed to PATH: a failed run never leaves a
    /// file at PATH that looks like a finished export.
    File(PathBuf),
    /// Something that is not a regular file (a FIFO, /dev/null): written directly.
    Special(PathBuf),
    /// The write end of a pipe to a command (`--to-command`).
    Pipe(std::sync::Arc<std::os::fd::OwnedFd>),
    /// A writer that must be told when the stream is whole (an upload to object storage).
    /// Taken by the first [`open`].
    Finishing(SharedFinishing),
}

/// A target that must be told the stream is whole: `finish` runs on the sink's thread once
/// the trailer is written. Dropped without it, the target discards what it got.
pub trait FinishingWriter: Write + Send {
    fn finish(self: Box<Self>) -> std::io::Result<()>;
}

/// An [`Output::Finishing`] writer, until the sink takes it.
#[derive(Clone)]
pub struct SharedFinishing(std::sync::Arc<std::sync::Mutex<Option<Box<dyn FinishingWriter>>>>);

impl SharedFinishing {
    pub fn new(writer: Box<dyn FinishingWriter>) -> SharedFinishing {
        SharedFinishing(std::sync::Arc::new(std::sync::Mutex::new(Some(writer))))
    }
}

impl std::fmt::Debug for SharedFinishing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedFinishing")
    }
}

/// The open output: written, then finished (for a [`FinishingWriter`]) by [`run`].
pub enum SinkFile {
    Plain(Box<dyn Write + Send>),
    Finishing(Box<dyn FinishingWriter>),
}

impl Write for SinkFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            SinkFile::Plain(w) => w.write(buf),
            SinkFile::Finishing(w) => w.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        match self {
            SinkFile::Plain(w) => w.write_vectored(bufs),
            SinkFile::Finishing(w) => w.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            SinkFile::Plain(w) => w.flush(),
            SinkFile::Finishing(w) => w.flush(),
        }
    }
}

impl Output {
    pub fn from_arg(arg: &Path) -> Output {
        if arg == Path::new("-") {
            Output::Stdout
        } else if std::fs::metadata(arg).is_ok_and(|m| !m.is_file() && !m.is_dir()) {
            Output::Special(arg.to_path_buf())
        } else {
            Output::File(arg.to_path_buf())
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("writing the output {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("stream encoder: {0}")]
    Stream(#[from] StreamError),
    #[error("internal error: {0}")]
    Internal(String),
}

#[derive(Debug, Clone, Copy, Default)]
pub struct SinkStats {
    pub records: u64,
    pub bytes_written: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
}

pub fn partial_path(path: &Path) -> PathBuf {
    crate::durable::with_suffix(path, ".partial")
}

/// Open the output (for files, the `.partial` file).
pub fn open(output: &Output) -> Result<SinkFile, SinkError> {
    if let Output::Finishing(shared) = output {
        let taken = shared.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        return taken
            .map(SinkFile::Finishing)
            .ok_or_else(|| SinkError::Internal("the output was opened twice".into()));
    }
    Ok(SinkFile::Plain(match output {
        Output::Finishing(_) => unreachable!("handled above"),
        Output::Stdout => Box::new(std::io::stdout()),
        Output::File(path) => {
            let p = partial_path(path);
            let f = DirectFile::create(&p, true).map_err(|source| SinkError::Io {
                what: p.display().to_string(),
                source,
            })?;
            tracing::debug!(direct = f.is_direct(), "output file opened");
            Box::new(f)
        }
        Output::Pipe(fd) => {
            let f = fd.try_clone().map_err(|source| SinkError::Io {
                what: "the --to-command pipe".into(),
                source,
            })?;
            Box::new(File::from(f))
        }
        Output::Special(path) => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|source| SinkError::Io {
                    what: path.display().to_string(),
                    source,
                })?;
            Box::new(f)
        }
    }))
}

/// Buffers small writes (record headers, small payloads) and sends large payloads with one
/// vectored write together with what is buffered, so payload bytes are never copied.
struct RecordWriter<W: Write> {
    inner: W,
    buf: Vec<u8>,
}

const SMALL: usize = 16 * 1024;
const FLUSH_AT: usize = 256 * 1024;

impl<W: Write> RecordWriter<W> {
    fn new(inner: W) -> Self {
        RecordWriter {
            inner,
            buf: Vec::with_capacity(FLUSH_AT + SMALL),
        }
    }

    fn small(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= FLUSH_AT {
            self.flush_buf()?;
        }
        Ok(())
    }

    fn payload(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if bytes.len() < SMALL {
            return self.small(bytes);
        }
        let mut bufs = [IoSlice::new(&self.buf), IoSlice::new(bytes)];
        let mut slices: &mut [IoSlice<'_>] = &mut bufs;
        while !slices.is_empty() {
            match self.inner.write_vectored(slices) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut slices, n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.buf.clear();
        Ok(())
    }

    fn flush_buf(&mut self) -> std::io::Result<()> {
        self.inner.write_all(&self.buf)?;
        self.buf.clear();
        Ok(())
    }

    fn finish(mut self) -> std::io::Result<W> {
        self.flush_buf()?;
        self.inner.flush()?;
        Ok(self.inner)
    }
}

/// Write the items in the order `items` yields them, then the trailer. Fails unless every
/// item of the plan came. `progress` is told the bytes of disk each item covers.
pub fn run(
    out: SinkFile,
    header: &Header,
    items: &mut InOrder,
    pools: &Pools,
    progress: &dyn Progress,
) -> Result<(SinkFile, SinkStats), SinkError> {
    let what = "stream".to_string();
    let io = |source| SinkError::Io {
        what: what.clone(),
        source,
    };
    let mut w = RecordWriter::new(out);
    let (mut enc, head) = Encoder::new(header)?;
    w.small(&head).map_err(io)?;
    let mut stats = SinkStats::default();
    for item in items.by_ref() {
        let mut covered = 0;
        for rec in &item.records {
            match rec {
                Record::Zero { offset, len } => {
                    w.small(&enc.zero(*offset, *len)?).map_err(io)?;
                    stats.zero_bytes += len;
                    covered += len;
                }
                Record::Data {
                    offset,
                    len,
                    codec,
                    checksum,
                    payload,
                } => {
                    let bytes: &[u8] = match payload {
                        Payload::Compressed(v) => v,
                        Payload::Raw(r) => item
                            .raw
                            .as_ref()
                            .and_then(|b| b.get(r.clone()))
                            .ok_or_else(|| SinkError::Internal("raw payload missing".into()))?,
                    };
                    let h = enc.data(*offset, *len, *codec, *checksum, bytes)?;
                    w.small(&h).map_err(io)?;
                    w.payload(bytes).map_err(io)?;
                    stats.data_bytes += len;
                    covered += len;
                }
            }
        }
        recycle(item, pools);
        progress.advance(covered);
    }
    if !items.complete() {
        let (written, total) = items.progress();
        let total = total.map_or("?".to_string(), |t| t.to_string());
        return Err(SinkError::Internal(format!(
            "stream ended after {written} of {total} items"
        )));
    }
    stats.records = enc.records();
    let before_trailer = enc.bytes_written();
    let trailer = enc.finish();
    w.small(&trailer).map_err(io)?;
    let inner = match w.finish().map_err(io)? {
        SinkFile::Finishing(f) => {
            f.finish().map_err(io)?;
            SinkFile::Plain(Box::new(std::io::sink()))
        }
        plain => plain,
    };
    stats.bytes_written = before_trailer + trailer.len() as u64;
    Ok((inner, stats))
}

/// Give a written item's buffers back to the pools, and its budget back to the planner.
fn recycle(item: Encoded, pools: &Pools) {
    let Encoded {
        records,
        raw,
        permit,
        ..
    } = item;
    for rec in records {
        if let Record::Data {
            payload: Payload::Compressed(v),
            ..
        } = rec
        {
            pools.out.put(v);
        }
    }
    if let Some(raw) = raw {
        pools.read.put(raw);
    }
    drop(permit);
}

/// Make a finished file output durable and give it its final name.
pub fn commit(output: &Output, file: SinkFile) -> Result<(), SinkError> {
    match output {
        Output::Special(_) | Output::Pipe(_) | Output::Finishing(_) => Ok(()),
        Output::Stdout => {
            // stdout redirected to a file (`-o - > FILE`): make that durable too.
            use std::os::fd::AsFd;
            drop(file);
            if let Ok(fd) = std::io::stdout().as_fd().try_clone_to_owned() {
                let f = File::from(fd);
                if f.metadata().is_ok_and(|m| m.is_file()) {
                    f.sync_all().map_err(|source| SinkError::Io {
                        what: "stdout".into(),
                        source,
                    })?;
                }
            }
            Ok(())
        }
        Output::File(path) => {
            drop(file);
            crate::durable::commit_rename(&partial_path(path), path).map_err(|source| {
                SinkError::Io {
                    what: path.display().to_string(),
                    source,
                }
            })?;
            Ok(())
        }
    }
}
