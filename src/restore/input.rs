//! One input stream: read in chunks, decoded (structure, order, digest) on its own thread.

use super::RestoreError;
use bytes::BytesMut;
use cbtstream_proto::stream::{Decoder, Header, Item, StreamError};
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

/// Size of each read from a stream while applying it.
const READ_CHUNK: usize = 4 << 20;
/// Size of each read while only the header is wanted (every input's header is read up front).
const HEADER_READ_CHUNK: usize = 64 << 10;
/// Items decoded ahead of the one being decompressed and written.
const PIPELINE_DEPTH: usize = 4;

/// One input stream being read.
pub(super) struct Input {
    pub(super) name: String,
    reader: Box<dyn Read + Send>,
    /// Bytes read but not yet decoded.
    buf: BytesMut,
    /// Staging area for reads (reused; a BytesMut's spare capacity cannot be read into safely).
    chunk: Vec<u8>,
    pub(super) decoder: Decoder,
    eof: bool,
    pub(super) bytes_read: u64,
}

/// A stream to read: a file (`-` for stdin), or any reader with a name for messages (an
/// object in a repository).
pub enum StreamInput {
    Path(std::path::PathBuf),
    Reader {
        name: String,
        reader: Box<dyn Read + Send>,
    },
}

impl From<std::path::PathBuf> for StreamInput {
    fn from(p: std::path::PathBuf) -> Self {
        StreamInput::Path(p)
    }
}

impl StreamInput {
    pub fn paths(paths: &[std::path::PathBuf]) -> Vec<StreamInput> {
        paths.iter().cloned().map(StreamInput::Path).collect()
    }

    pub(super) fn is_stdin(&self) -> bool {
        matches!(self, StreamInput::Path(p) if p.as_os_str() == "-")
    }
}

impl Input {
    pub(super) fn open_input(input: StreamInput) -> Result<Input, RestoreError> {
        match input {
            StreamInput::Path(p) => Input::open(&p),
            StreamInput::Reader { name, reader } => Ok(Input::from_reader(name, reader)),
        }
    }

    pub(super) fn open(path: &Path) -> Result<Input, RestoreError> {
        if path.as_os_str() == "-" {
            return Ok(Input::from_reader(
                "<stdin>".to_owned(),
                Box::new(io::stdin()),
            ));
        }
        let name = path.display().to_string();
        let opened = File::open(path).and_then(|f| {
            // A directory opens, and only fails when read: refuse it as the bad argument it is.
            if f.metadata()?.is_dir() {
                return Err(io::Error::from(io::ErrorKind::IsADirectory));
            }
            Ok(f)
        });
        match opened {
            Ok(f) => Ok(Input::from_reader(name, Box::new(f))),
            Err(error) => Err(RestoreError::Open { input: name, error }),
        }
    }

    pub(super) fn from_reader(name: String, reader: Box<dyn Read + Send>) -> Input {
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

    pub(super) fn damaged(&self, error: StreamError) -> RestoreError {
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
    pub(super) fn next_item(&mut self, read_size: usize) -> Result<Option<Item>, RestoreError> {
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

    pub(super) fn read_header(&mut self) -> Result<Header, RestoreError> {
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
pub(super) fn pipelined(
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
