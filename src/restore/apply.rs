//! Applying one stream's records to a file: the image itself, or the partial file a full restore
//! writes before it replaces the image.

use super::input::{pipelined, Input};
use super::report::RestoreReport;
use super::{PayloadDecoder, RestoreError};
use crate::engine::direct::{write_at, DirectWriter};
use cbtstream_proto::stream::{Header, Item, StreamError, Trailer};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Largest single write of zeroes when holes cannot be punched.
const ZERO_CHUNK: usize = 1 << 20;

/// Writes streams' records into a file; keeps its buffers from one stream to the next.
pub(super) struct Applier {
    payload: PayloadDecoder,
    /// A block of zeroes, allocated the first time holes cannot be punched.
    zeros: Vec<u8>,
    punch_holes: bool,
}

impl Applier {
    pub(super) fn new() -> Result<Applier, RestoreError> {
        Ok(Applier {
            payload: PayloadDecoder::new().map_err(|e| {
                RestoreError::Internal(format!("cannot create a zstd decompressor: {e}"))
            })?,
            zeros: Vec::new(),
            punch_holes: true,
        })
    }

    /// Applies one stream to the file at `path`: a full stream to a new (or emptied) file, an
    /// incremental to the existing one. Returns the stream's verified trailer once the file is
    /// fsynced. The sidecar is the caller's business.
    pub(super) fn apply(
        &mut self,
        path: &Path,
        mut input: Input,
        header: &Header,
        report: &mut RestoreReport,
    ) -> Result<Trailer, RestoreError> {
        let image_error = |error| RestoreError::Image {
            path: path.to_owned(),
            error,
        };
        let full = header.is_full();
        let file = if full {
            crate::durable::private_options().truncate(true).open(path)
        } else {
            OpenOptions::new().write(true).open(path)
        }
        .map_err(image_error)?;
        let old_len = if full {
            0
        } else {
            file.metadata().map_err(image_error)?.len()
        };
        if full || old_len != header.virtual_size {
            file.set_len(header.virtual_size).map_err(image_error)?;
        }
        // Everything from here on reads as zeroes already (fresh or grown): ZERO records there
        // need no work.
        let zero_from = old_len.min(header.virtual_size);
        // Data goes around the page cache: a restore writes the whole disk once and the host
        // has better use for its memory (see engine/direct.rs).
        let mut direct = DirectWriter::open(path);

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
                    write_at(&mut direct, &file, data, offset).map_err(image_error)?;
                    report.data_records += 1;
                    report.bytes_written += length;
                }
                Item::Zero { offset, length, .. } => {
                    report.zero_records += 1;
                    let end = offset.saturating_add(length).min(zero_from);
                    if offset < end {
                        self.zero_range(&file, offset, end - offset)
                            .map_err(image_error)?;
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
        file.sync_all().map_err(image_error)?;

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
        Ok(trailer)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn zero_range_punches_or_writes_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let n = 3 * ZERO_CHUNK as u64 + 5;
        fs::write(&path, vec![0xaa; n as usize + 10]).unwrap();
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        for punch_holes in [true, false] {
            let mut a = Applier::new().unwrap();
            a.punch_holes = punch_holes;
            file.write_all_at(&vec![0xaa; n as usize], 0).unwrap();
            a.zero_range(&file, 3, n - 3).unwrap();
            let got = fs::read(&path).unwrap();
            assert_eq!(&got[..3], &[0xaa; 3]);
            assert!(got[3..n as usize].iter().all(|&b| b == 0));
            assert_eq!(&got[n as usize..], &[0xaa; 10]);
        }
    }
}
