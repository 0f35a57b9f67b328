//! Disk image files and the CBT log (the bitmap of changed 64 KiB blocks).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use cbtstream_proto::cbt::{blocks_for, CBT_BLOCK};

/// Creates a sparse file of `size` bytes (all zeroes), mode 0600 as a disk image is.
pub(crate) fn create_sparse(path: &Path, size: u64) -> io::Result<()> {
    let f = new_image(path)?;
    f.set_len(size)
}

/// A new disk image file, mode 0600; an existing one is an error.
fn new_image(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// Copies `src` into a new sparse file `dst` of `size` bytes, writing only the 64 KiB blocks
/// that hold a non-zero byte. Holes of the source are skipped with `SEEK_DATA`/`SEEK_HOLE`,
/// so a mostly empty multi-GiB disk copies in milliseconds.
pub(crate) fn sparse_copy(src: &Path, dst: &Path, size: u64) -> io::Result<()> {
    let s = File::open(src)?;
    let d = new_image(dst)?;
    let res = (|| {
        d.set_len(size)?;
        let len = s.metadata()?.len().min(size);
        let mut buf = vec![0u8; CBT_BLOCK as usize];
        let mut pos = 0;
        while pos < len {
            let Some(start) = seek(&s, pos, libc::SEEK_DATA)? else {
                break;
            };
            if start >= len {
                break;
            }
            let end = seek(&s, start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
            let mut off = start - start % CBT_BLOCK;
            while off < end {
                let n = (len - off).min(CBT_BLOCK) as usize;
                s.read_exact_at(&mut buf[..n], off)?;
                if buf[..n].iter().any(|&b| b != 0) {
                    d.write_all_at(&buf[..n], off)?;
                }
                off += n as u64;
            }
            pos = end.max(start + 1);
        }
        d.sync_data()
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    res
}

/// `lseek(SEEK_DATA | SEEK_HOLE)`: `None` when there is no more data (ENXIO). File systems
/// without hole support behave as one big data region, which the callers handle.
fn seek(f: &File, from: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let Ok(off) = libc::off_t::try_from(from) else {
        return Ok(None);
    };
    // SAFETY: lseek on a valid, owned descriptor; it only moves the file offset, which no
    // other code of ours uses (all I/O here is positional).
    let r = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            // No SEEK_DATA support: treat everything as data (or the end as the hole).
            Some(libc::EINVAL) if whence == libc::SEEK_DATA => Ok(Some(from)),
            Some(libc::EINVAL) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(r as u64))
}

/// Writes guest data into an image file.
pub(crate) fn write_at(path: &Path, offset: u64, data: &[u8]) -> io::Result<()> {
    let f = OpenOptions::new().write(true).open(path)?;
    f.write_all_at(data, offset)
}

/// Grows an image file (the new bytes read as zeroes).
pub(crate) fn grow(path: &Path, size: u64) -> io::Result<()> {
    let f = OpenOptions::new().write(true).open(path)?;
    if f.metadata()?.len() < size {
        f.set_len(size)?;
    }
    Ok(())
}

/// The `block`-sized blocks of the first `size` bytes of `path` that hold a non-zero byte,
/// ascending (vhd-tool's `Raw_input.vhd`: `SEEK_DATA`, then a zero check per block).
pub(crate) fn data_blocks(f: &File, size: u64, block: u64) -> io::Result<Vec<u64>> {
    let len = f.metadata()?.len().min(size);
    let mut buf = vec![0u8; block as usize];
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < len {
        let Some(start) = seek(f, pos, libc::SEEK_DATA)? else {
            break;
        };
        if start >= len {
            break;
        }
        let end = seek(f, start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        let mut b = start / block;
        while b * block < end {
            let off = b * block;
            let n = (len - off).min(block) as usize;
            f.read_exact_at(&mut buf[..n], off)?;
            if buf[..n].iter().any(|&x| x != 0) && out.last() != Some(&b) {
                out.push(b);
            }
            b += 1;
        }
        pos = end.max(start + 1);
    }
    Ok(out)
}

/// Reads `buf.len()` bytes at `offset`; bytes past the end of the file read as zeroes.
pub(crate) fn read_padded(f: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], offset + got as u64)? {
            0 => break,
            n => got += n,
        }
    }
    buf[got..].fill(0);
    Ok(())
}

/// Writes `data` at `offset`, keeping the image sparse: an all-zero range becomes a hole
/// (falling back to writing the zeroes where holes cannot be punched).
pub(crate) fn write_sparse(f: &File, offset: u64, data: &[u8]) -> io::Result<()> {
    // In 64 KiB pieces, so sparse data stays sparse.
    let mut done = 0;
    while done < data.len() {
        let n = (data.len() - done).min(CBT_BLOCK as usize);
        write_piece(f, offset + done as u64, &data[done..done + n])?;
        done += n;
    }
    Ok(())
}

fn write_piece(f: &File, offset: u64, data: &[u8]) -> io::Result<()> {
    if data.iter().all(|&b| b == 0) {
        if let (Ok(off), Ok(len)) = (
            libc::off_t::try_from(offset),
            libc::off_t::try_from(data.len()),
        ) {
            // SAFETY: fallocate on a valid, owned descriptor; it only changes the file's
            // allocation within the range, which reads as zeroes afterwards.
            let r = unsafe {
                libc::fallocate(
                    f.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off,
                    len,
                )
            };
            if r == 0 {
                return Ok(());
            }
        }
    }
    f.write_all_at(data, offset)
}

/// Bytes of a CBT bitmap for a disk of `size` bytes: `ceil(ceil(size / 64 KiB) / 8)`.
pub(crate) fn bitmap_len(size: u64) -> usize {
    blocks_for(size).div_ceil(8) as usize
}

/// A changed-block bitmap in the API's bit order (block `i` = `byte[i/8] & 0x80 >> i%8`), so
/// `list_changed_blocks` can OR logs byte-wise and encode the result as it is. (tapdisk keeps
/// its on-disk log LSB first and SM flips it; only the API order is observable.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Bitmap {
    bits: Vec<u8>,
    /// The disk size the log covers (cbt-util's `size` field).
    size: u64,
}

impl Bitmap {
    pub(crate) fn new(size: u64) -> Bitmap {
        Bitmap {
            bits: vec![0; bitmap_len(size)],
            size,
        }
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bits
    }

    /// Marks every block touched by `[offset, offset + len)`; the range must be in the disk.
    pub(crate) fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / CBT_BLOCK;
        let last = (offset + len - 1) / CBT_BLOCK;
        for b in first..=last.min(blocks_for(self.size).saturating_sub(1)) {
            self.bits[(b / 8) as usize] |= 0x80 >> (b % 8);
        }
    }

    /// Grows the covered size (resize): the new blocks start clean.
    pub(crate) fn grow(&mut self, size: u64) {
        if size > self.size {
            self.size = size;
            self.bits.resize(bitmap_len(size), 0);
        }
    }

    /// ORs `other` in, growing to its size first if it is larger.
    pub(crate) fn or(&mut self, other: &Bitmap) {
        self.grow(other.size);
        for (a, b) in self.bits.iter_mut().zip(&other.bits) {
            *a |= b;
        }
    }

    /// The set block numbers (for tests and debugging).
    pub(crate) fn blocks(&self) -> Vec<u64> {
        (0..blocks_for(self.size))
            .filter(|&b| self.bits[(b / 8) as usize] & (0x80 >> (b % 8)) != 0)
            .collect()
    }
}

/// Now as XAPI writes datetimes: `YYYYMMDDTHH:MM:SSZ` (no dashes).
pub(crate) fn xapi_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    xapi_datetime(secs)
}

/// Seconds since the epoch as `YYYYMMDDTHH:MM:SSZ`.
pub(crate) fn xapi_datetime(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datetime_format() {
        assert_eq!(xapi_datetime(0), "19700101T00:00:00Z");
        assert_eq!(xapi_datetime(1_659_101_526), "20220729T13:32:06Z");
        assert_eq!(xapi_datetime(951_782_400), "20000229T00:00:00Z");
    }

    #[test]
    fn bitmap_marks_msb_first_and_grows() {
        let mut b = Bitmap::new(10 << 20);
        assert_eq!(b.bytes().len(), 20);
        b.mark(0, 1);
        b.mark(9 * CBT_BLOCK + 100, 10);
        b.mark(159 * CBT_BLOCK, CBT_BLOCK);
        assert_eq!(
            cbtstream_proto::cbt::encode_base64(b.bytes()),
            "gEAAAAAAAAAAAAAAAAAAAAAAAAE="
        );
        // Across a boundary: both blocks.
        let mut c = Bitmap::new(1 << 20);
        c.mark(CBT_BLOCK - 1, 2);
        assert_eq!(c.blocks(), vec![0, 1]);
        c.grow(3 << 20);
        assert_eq!(c.bytes().len(), 6);
        let mut d = Bitmap::new(1 << 20);
        d.or(&c);
        assert_eq!(d.size(), 3 << 20);
        assert_eq!(d.blocks(), vec![0, 1]);
    }

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("a");
        let dst = dir.path().join("b");
        let size = (3 << 20) + 512;
        create_sparse(&src, size).unwrap();
        write_at(&src, 5, b"hello").unwrap();
        write_at(&src, size - 3, b"end").unwrap();
        write_at(&src, 2 << 20, &[7u8; 70_000]).unwrap();
        sparse_copy(&src, &dst, size).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        // Sparse: far fewer bytes allocated than the size.
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&dst).unwrap().blocks() * 512 < size / 2);
    }
}
