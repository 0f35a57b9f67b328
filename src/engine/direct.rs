//! Output files are written with O_DIRECT, in aligned 1 MiB blocks; restore writes images
//! the same way (every record but a disk's unaligned tail is aligned).
//!
//! Why: a backup writes terabytes its host will not read again. Through the page cache every
//! byte is copied by the kernel into pages that then push out the host's useful cache; on
//! virtual machines whose free memory goes back to the hypervisor, each of those pages also
//! costs a fault on first touch (measured here: 0.5 GB/s of system time for new page-cache
//! pages, against 2.2 GB/s direct). Direct writes go from our buffer to the device.
//!
//! O_DIRECT needs the buffer address, the length and the file offset aligned to the device's
//! block size; 4096 covers every common device. The buffer is a `Vec` with 4 KiB of slack, of
//! which the aligned window is used, so no unsafe allocation is needed. Where the file system
//! refuses O_DIRECT (at open or at the first write), the file is reopened without it and the
//! same code writes through the page cache.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

const ALIGN: usize = 4096;
const WINDOW: usize = 1 << 20;

/// A 1 MiB buffer whose start is 4 KiB aligned, carved out of a `Vec` with 4 KiB of slack.
pub struct AlignedBuf {
    buf: Vec<u8>,
    start: usize,
}

impl Default for AlignedBuf {
    fn default() -> Self {
        let buf = vec![0u8; WINDOW + ALIGN];
        let start = (ALIGN - buf.as_ptr() as usize % ALIGN) % ALIGN;
        AlignedBuf { buf, start }
    }
}

impl AlignedBuf {
    pub fn window(&self) -> &[u8] {
        &self.buf[self.start..self.start + WINDOW]
    }

    pub fn window_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + WINDOW]
    }
}

/// True for the error a file system gives for an O_DIRECT open or write it will not do.
fn refused(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL)
}

pub struct DirectFile {
    file: File,
    path: PathBuf,
    direct: bool,
    buf: AlignedBuf,
    /// Bytes filled in the window.
    filled: usize,
    /// File offset of the window's first byte (a multiple of WINDOW).
    offset: u64,
}

impl DirectFile {
    /// Create (truncate) `path`, with O_DIRECT when `direct` and the file system allows it.
    pub fn create(path: &Path, direct: bool) -> io::Result<DirectFile> {
        let open = |flags| {
            crate::durable::private_options()
                .truncate(true)
                .custom_flags(flags)
                .open(path)
        };
        let (file, direct) = match direct.then(|| open(libc::O_DIRECT)) {
            Some(Ok(f)) => (f, true),
            Some(Err(e)) if !refused(&e) => return Err(e),
            _ => (open(0)?, false),
        };
        Ok(DirectFile {
            file,
            path: path.to_path_buf(),
            direct,
            buf: AlignedBuf::default(),
            filled: 0,
            offset: 0,
        })
    }

    /// True while writes bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Write the first `len` bytes of the window (a multiple of ALIGN, or the padded tail)
    /// at the window's offset.
    fn write_window(&mut self, len: usize) -> io::Result<()> {
        let data = &self.buf.window()[..len];
        match self.file.write_all_at(data, self.offset) {
            Err(e) if self.direct && refused(&e) => {
                // Accepted at open, refused at write (some network and FUSE file systems):
                // carry on through the page cache.
                tracing::debug!("O_DIRECT write refused; writing through the page cache");
                self.file = OpenOptions::new().write(true).open(&self.path)?;
                self.direct = false;
                self.file.write_all_at(data, self.offset)
            }
            other => other,
        }
    }

    fn take(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(WINDOW - self.filled);
        let at = self.filled;
        self.buf.window_mut()[at..at + n].copy_from_slice(&data[..n]);
        self.filled += n;
        if self.filled == WINDOW {
            self.write_window(WINDOW)?;
            self.offset += WINDOW as u64;
            self.filled = 0;
        }
        Ok(n)
    }
}

impl Write for DirectFile {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.take(data)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut total = 0;
        for b in bufs {
            let n = self.take(b)?;
            total += n;
            if n < b.len() {
                break;
            }
        }
        Ok(total)
    }

    /// Write the partly filled window (padded to the alignment) and cut the file to its true
    /// length. The window keeps its bytes, so later writes carry on where these ended.
    fn flush(&mut self) -> io::Result<()> {
        if self.filled > 0 {
            let padded = self.filled.div_ceil(ALIGN) * ALIGN;
            let filled = self.filled;
            self.buf.window_mut()[filled..padded].fill(0);
            self.write_window(padded)?;
        }
        self.file.set_len(self.offset + self.filled as u64)
    }
}

/// Writes aligned ranges of an existing file (an image being restored) with O_DIRECT,
/// through an aligned bounce buffer.
pub struct DirectWriter {
    file: File,
    buf: AlignedBuf,
}

impl DirectWriter {
    /// `None` where the file system does not allow O_DIRECT: then everything goes through
    /// the caller's ordinary handle.
    pub fn open(path: &Path) -> Option<DirectWriter> {
        let file = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok()?;
        Some(DirectWriter {
            file,
            buf: AlignedBuf::default(),
        })
    }

    fn write_aligned(&mut self, data: &[u8], offset: u64) -> io::Result<()> {
        for (i, chunk) in data.chunks(WINDOW).enumerate() {
            self.buf.window_mut()[..chunk.len()].copy_from_slice(chunk);
            self.file.write_all_at(
                &self.buf.window()[..chunk.len()],
                offset + (i * WINDOW) as u64,
            )?;
        }
        Ok(())
    }
}

/// Write `data` at `offset`: directly when `direct` is set and the range is aligned (every
/// record but a disk's last partial block), else through `file`. A refused direct write turns
/// direct writing off and goes through `file`.
pub fn write_at(
    direct: &mut Option<DirectWriter>,
    file: &File,
    data: &[u8],
    offset: u64,
) -> io::Result<()> {
    if let Some(d) = direct {
        if offset.is_multiple_of(ALIGN as u64) && data.len().is_multiple_of(ALIGN) {
            match d.write_aligned(data, offset) {
                Ok(()) => return Ok(()),
                Err(e) if refused(&e) => {
                    tracing::debug!("O_DIRECT write refused; writing through the page cache");
                    *direct = None;
                }
                Err(e) => return Err(e),
            }
        }
    }
    file.write_all_at(data, offset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn roundtrip(direct: bool) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let mut f = DirectFile::create(&path, direct).unwrap();
        let mut expect = Vec::new();
        // Sizes straddling the window and the alignment, a flush in the middle, vectored
        // writes, and an unaligned tail.
        for (i, n) in [1, 4095, 4097, WINDOW - 3, 70_000, 3 * WINDOW + 17, 5]
            .into_iter()
            .enumerate()
        {
            let a = pattern(n, i as u8);
            if i % 2 == 0 {
                f.write_all(&a).unwrap();
            } else {
                let (x, y) = a.split_at(n / 2);
                let mut slices = [IoSlice::new(x), IoSlice::new(y)];
                let mut rest: &mut [IoSlice<'_>] = &mut slices;
                while !rest.is_empty() {
                    let n = f.write_vectored(rest).unwrap();
                    IoSlice::advance_slices(&mut rest, n);
                }
            }
            expect.extend_from_slice(&a);
            if i == 3 {
                f.flush().unwrap();
            }
        }
        f.flush().unwrap();
        drop(f);
        let mut got = Vec::new();
        File::open(&path).unwrap().read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), expect.len());
        assert!(got == expect, "content differs");
    }

    #[test]
    fn direct_writes_are_exact() {
        roundtrip(true);
    }

    #[test]
    fn buffered_fallback_writes_are_exact() {
        roundtrip(false);
    }

    #[test]
    fn image_writes_mix_direct_and_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let size = 3 * WINDOW + 5000;
        let file = crate::durable::private_options()
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(size as u64).unwrap();
        let mut direct = DirectWriter::open(&path);
        let mut expect = vec![0u8; size];
        // Aligned (direct, spanning windows), unaligned offset, unaligned tail (buffered).
        for (off, len, seed) in [
            (0, 2 * WINDOW + ALIGN, 1u8),
            (WINDOW + 100, 300, 2),
            (3 * WINDOW, 5000, 3),
            (ALIGN, ALIGN, 4),
        ] {
            let data = pattern(len, seed);
            write_at(&mut direct, &file, &data, off as u64).unwrap();
            expect[off..off + len].copy_from_slice(&data);
        }
        file.sync_all().unwrap();
        let got = std::fs::read(&path).unwrap();
        assert!(got == expect, "content differs");
    }

    #[test]
    fn empty_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let mut f = DirectFile::create(&path, true).unwrap();
        f.flush().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    }
}
