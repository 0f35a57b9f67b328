//! Order and sink: put records back in offset order (a small reorder window, bounded by the
//! bytes-in-flight budget) and write them, then the trailer, then make the output durable.

use super::{Encoded, Payload, Record};
use crate::engine::fetch::BufPool;
use cbtstream_proto::stream::{Encoder, Header, StreamError};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::sync::Arc;

/// Where the stream goes.
#[derive(Debug, Clone)]
pub enum Output {
    Stdout,
    /// Written to `PATH.partial`, fsynced, then renamed to PATH: a failed run never leaves a
    /// file at PATH that looks like a finished export.
    File(PathBuf),
    /// Something that is not a regular file (a FIFO, /dev/null): written directly.
    Special(PathBuf),
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
    let mut s = path.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
}

/// Open the output (for files, the `.partial` file).
pub fn open(output: &Output) -> Result<Box<dyn Write + Send>, SinkError> {
    Ok(match output {
        Output::Stdout => Box::new(std::io::stdout()),
        Output::File(path) => {
            let p = partial_path(path);
            let f = File::create(&p).map_err(|source| SinkError::Io {
                what: p.display().to_string(),
                source,
            })?;
            Box::new(f)
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
    })
}

/// Consume encoded items until the channel closes, writing them in id order.
/// `expected` is the number of plan items; `progress` is called with bytes of disk covered.
pub fn run(
    out: Box<dyn Write + Send>,
    header: &Header,
    input: Receiver<Encoded>,
    expected: u64,
    pool: Arc<BufPool>,
    mut progress: impl FnMut(u64),
) -> Result<(Box<dyn Write + Send>, SinkStats), SinkError> {
    let what = "stream".to_string();
    let io = |source| SinkError::Io {
        what: what.clone(),
        source,
    };
    let mut w = BufWriter::with_capacity(1 << 20, out);
    let (mut enc, head) = Encoder::new(header)?;
    w.write_all(&head).map_err(io)?;
    let mut stats = SinkStats::default();
    let mut waiting: BTreeMap<u64, Encoded> = BTreeMap::new();
    let mut next = 0u64;
    for item in input.iter() {
        waiting.insert(item.id, item);
        while let Some(item) = waiting.remove(&next) {
            let mut covered = 0;
            for rec in &item.records {
                match rec {
                    Record::Zero { offset, len } => {
                        w.write_all(&enc.zero(*offset, *len)?).map_err(io)?;
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
                        w.write_all(&h).map_err(io)?;
                        w.write_all(bytes).map_err(io)?;
                        stats.data_bytes += len;
                        covered += len;
                    }
                }
            }
            if let Some(raw) = item.raw {
                pool.put(raw);
            }
            drop(item.permit);
            progress(covered);
            next += 1;
        }
    }
    if next != expected || !waiting.is_empty() {
        return Err(SinkError::Internal(format!(
            "stream ended after {next} of {expected} items"
        )));
    }
    stats.records = enc.records();
    let before_trailer = enc.bytes_written();
    let trailer = enc.finish();
    w.write_all(&trailer).map_err(io)?;
    w.flush().map_err(io)?;
    stats.bytes_written = before_trailer + trailer.len() as u64;
    let inner = w.into_inner().map_err(|e| SinkError::Io {
        what: what.clone(),
        source: e.into_error(),
    })?;
    Ok((inner, stats))
}

/// Make a finished file output durable and give it its final name.
pub fn commit(output: &Output, file: Box<dyn Write + Send>) -> Result<(), SinkError> {
    match output {
        Output::Special(_) => Ok(()),
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
            let p = partial_path(path);
            let io = |what: &Path, source| SinkError::Io {
                what: what.display().to_string(),
                source,
            };
            File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(|e| io(&p, e))?;
            std::fs::rename(&p, path).map_err(|e| io(path, e))?;
            let dir = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io(dir, e))?;
            Ok(())
        }
    }
}
