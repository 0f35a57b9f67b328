//! Deterministic raw disk images, block mutations and XenServer-style CBT bitmaps.
//!
//! Everything is derived from a `u64` seed with a small SplitMix64 PRNG ([`Prng`]), so a
//! test can regenerate the expected contents of any 64 KiB block ([`expected_block`])
//! without reading the file back.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{bail, Context, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

/// CBT granularity: XenServer's changed-block bitmap has one bit per 64 KiB.
pub const BLOCK: u64 = 64 * 1024;

/// SplitMix64: tiny, fast, deterministic; good enough for test data (not crypto).
#[derive(Debug, Clone)]
pub struct Prng(u64);

impl Prng {
    pub fn new(seed: u64) -> Self {
        Prng(seed)
    }

    /// A generator for sub-stream `index` of `seed` (independent-looking streams).
    pub fn derive(seed: u64, index: u64) -> Self {
        let mut p = Prng(seed ^ index.wrapping_add(1).wrapping_mul(0xD1B5_4A32_D192_ED03));
        p.next_u64();
        p
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`; the tiny modulo bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Prng::below(0)");
        self.next_u64() % n
    }

    /// Uniform in `lo..=hi`.
    pub fn range_inclusive(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(lo <= hi);
        if hi - lo == u64::MAX {
            return self.next_u64();
        }
        lo + self.below(hi - lo + 1)
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn fill_bytes(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let v = self.next_u64().to_le_bytes();
            rest.copy_from_slice(&v[..rest.len()]);
        }
    }
}

/// What an image is filled with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// All zeroes; the file is sparse (no data written at all).
    Zero,
    /// Incompressible pseudo-random bytes everywhere.
    Random,
    /// First half (rounded down to 64 KiB) random, second half text-like compressible data.
    HalfRandomHalfText,
    /// Each 64 KiB block is zero (left as a hole), random or text, chosen by the PRNG
    /// (see [`mixed_block_kind`]), roughly a third each.
    Mixed,
}

/// Content class of one 64 KiB block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    Zero,
    Random,
    Text,
}

/// Number of 64 KiB blocks (CBT bits) for a disk of `disk_size` bytes (rounded up).
pub fn block_count(disk_size: u64) -> u64 {
    disk_size.div_ceil(BLOCK)
}

/// The kind of block `index` in a [`Pattern::Mixed`] image made with `seed`.
pub fn mixed_block_kind(seed: u64, index: u64) -> BlockKind {
    match Prng::derive(seed ^ 0x6D69_7865_6421, index).below(3) {
        0 => BlockKind::Zero,
        1 => BlockKind::Random,
        _ => BlockKind::Text,
    }
}

/// The kind of block `index` of an image of `size` bytes.
pub fn block_kind(size: u64, seed: u64, pattern: Pattern, index: u64) -> BlockKind {
    match pattern {
        Pattern::Zero => BlockKind::Zero,
        Pattern::Random => BlockKind::Random,
        Pattern::HalfRandomHalfText => {
            if index * BLOCK < (size / 2) / BLOCK * BLOCK {
                BlockKind::Random
            } else {
                BlockKind::Text
            }
        }
        Pattern::Mixed => mixed_block_kind(seed, index),
    }
}

const WORDS: &[&str] = &[
    "the",
    "disk",
    "block",
    "backup",
    "snapshot",
    "virtual",
    "machine",
    "xen",
    "server",
    "changed",
    "tracking",
    "network",
    "device",
    "export",
    "stream",
    "zstd",
    "frame",
    "data",
    "of",
    "and",
    "to",
    "in",
    "is",
    "for",
    "with",
    "on",
    "read",
    "write",
    "request",
    "reply",
    "handshake",
    "certificate",
    "offset",
    "length",
    "bitmap",
    "incremental",
    "full",
    "vdi",
    "pool",
    "host",
    "storage",
    "repository",
    "metadata",
    "checksum",
    "error",
    "retry",
];

/// Text-like data: lines of words from a small vocabulary (zstd -1 ratio around 3-5).
fn fill_text(prng: &mut Prng, buf: &mut [u8]) {
    let mut pos = 0;
    let mut line = 0usize;
    while pos < buf.len() {
        let r = prng.next_u64();
        let w = WORDS[(r % WORDS.len() as u64) as usize].as_bytes();
        let sep: &[u8] = if line > 60 + (r >> 32) as usize % 20 {
            line = 0;
            b".\n"
        } else {
            b" "
        };
        for piece in [w, sep] {
            let n = piece.len().min(buf.len() - pos);
            buf[pos..pos + n].copy_from_slice(&piece[..n]);
            pos += n;
            line += n;
        }
    }
}

/// The exact contents of block `index` (64 KiB, shorter for a partial last block) of an
/// image created by [`make_image`] with these arguments (before any [`mutate_blocks`]).
pub fn expected_block(size: u64, seed: u64, pattern: Pattern, index: u64) -> Vec<u8> {
    let start = index * BLOCK;
    assert!(
        start < size,
        "block {index} is past the end of a {size}-byte image"
    );
    let len = BLOCK.min(size - start) as usize;
    let mut buf = vec![0u8; len];
    let mut prng = Prng::derive(seed, index);
    match block_kind(size, seed, pattern, index) {
        BlockKind::Zero => {}
        BlockKind::Random => prng.fill_bytes(&mut buf),
        BlockKind::Text => fill_text(&mut prng, &mut buf),
    }
    buf
}

/// Create (or truncate) a raw image of `size` bytes at `path`. Zero blocks are left as
/// holes, so [`Pattern::Zero`] images are fully sparse. Deterministic in `seed`.
pub fn make_image(path: &Path, size: u64, seed: u64, pattern: Pattern) -> Result<()> {
    let f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.set_len(size)?;
    for index in 0..block_count(size) {
        if block_kind(size, seed, pattern, index) == BlockKind::Zero {
            continue;
        }
        let data = expected_block(size, seed, pattern, index);
        f.write_all_at(&data, index * BLOCK)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    f.sync_all()?;
    Ok(())
}

/// Overwrite `count` random byte ranges of the image at `path` in place and return them as
/// `(offset, len)` in the order written (ranges may overlap each other). Every byte in each
/// range is guaranteed to change (XOR with a non-zero byte). Roughly a third of the ranges
/// straddle a 64 KiB boundary, a third are sector-aligned (512 B multiples) and a third are
/// arbitrary, 1 byte to 64 KiB. The file size is unchanged.
pub fn mutate_blocks(path: &Path, seed: u64, count: usize) -> Result<Vec<(u64, u64)>> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let size = f.metadata()?.len();
    if size == 0 {
        bail!("cannot mutate an empty image");
    }
    let mut prng = Prng::derive(seed ^ 0x6D75_7461_7465, 0);
    let mut changes = Vec::with_capacity(count);
    for i in 0..count {
        let (off, len) = match i % 3 {
            // straddles the boundary `b` between two 64 KiB blocks
            0 if size > BLOCK => {
                let b = BLOCK * prng.range_inclusive(1, (size - 1) / BLOCK);
                let before = prng.range_inclusive(1, BLOCK.min(b));
                let after = prng.range_inclusive(1, BLOCK.min(size - b));
                (b - before, before + after)
            }
            // 512-byte aligned, 512 B .. 64 KiB
            1 if size >= 512 => {
                let sectors = size / 512;
                let off = prng.below(sectors) * 512;
                let max = (BLOCK / 512).min(sectors - off / 512);
                (off, prng.range_inclusive(1, max) * 512)
            }
            // anything
            _ => {
                let off = prng.below(size);
                (off, prng.range_inclusive(1, BLOCK.min(size - off)))
            }
        };
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, off)?;
        let mut noise = vec![0u8; len as usize];
        prng.fill_bytes(&mut noise);
        for (b, n) in buf.iter_mut().zip(&noise) {
            *b ^= n | 1;
        }
        f.write_all_at(&buf, off)?;
        changes.push((off, len));
    }
    f.sync_all()?;
    Ok(changes)
}

/// A CBT bitmap in XenServer's encoding: one bit per 64 KiB block, MSB first (block `i` is
/// set when `bytes[i / 8] & (0x80 >> (i % 8)) != 0`), `ceil(blocks / 8)` bytes; bits past the
/// last block are zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CbtBitmap {
    pub disk_size: u64,
    pub bytes: Vec<u8>,
}

impl CbtBitmap {
    /// All-clear bitmap for a disk of `disk_size` bytes.
    pub fn empty(disk_size: u64) -> Self {
        CbtBitmap {
            disk_size,
            bytes: vec![0u8; block_count(disk_size).div_ceil(8) as usize],
        }
    }

    /// Bitmap with every block touched by any `(offset, len)` range set.
    pub fn from_changes(changes: &[(u64, u64)], disk_size: u64) -> Self {
        let mut bm = Self::empty(disk_size);
        for &(off, len) in changes {
            if len == 0 {
                continue;
            }
            assert!(
                off + len <= disk_size,
                "change ({off}, {len}) past the end of the disk ({disk_size})"
            );
            for b in off / BLOCK..=(off + len - 1) / BLOCK {
                bm.set(b);
            }
        }
        bm
    }

    /// Each block set independently with probability `fraction`.
    pub fn random(disk_size: u64, seed: u64, fraction: f64) -> Self {
        let mut bm = Self::empty(disk_size);
        let mut prng = Prng::derive(seed ^ 0x6269_746D_6170, 0);
        for b in 0..bm.blocks() {
            if prng.next_f64() < fraction {
                bm.set(b);
            }
        }
        bm
    }

    /// Decode a base64 bitmap (as returned by XAPI `VDI.list_changed_blocks`).
    pub fn from_base64(b64: &str, disk_size: u64) -> Result<Self> {
        let bytes = B64.decode(b64.trim()).context("decoding base64 bitmap")?;
        Ok(CbtBitmap { disk_size, bytes })
    }

    pub fn blocks(&self) -> u64 {
        block_count(self.disk_size)
    }

    pub fn set(&mut self, block: u64) {
        assert!(block < self.blocks(), "block {block} out of range");
        self.bytes[(block / 8) as usize] |= 0x80 >> (block % 8);
    }

    pub fn is_set(&self, block: u64) -> bool {
        self.bytes
            .get((block / 8) as usize)
            .is_some_and(|b| b & (0x80 >> (block % 8)) != 0)
    }

    /// Indices of the set blocks, ascending (only those `< blocks()`).
    pub fn set_blocks(&self) -> Vec<u64> {
        (0..self.blocks()).filter(|&b| self.is_set(b)).collect()
    }

    /// Standard base64 with padding.
    pub fn to_base64(&self) -> String {
        B64.encode(&self.bytes)
    }
}

/// XenServer-encoded CBT bitmap (standard base64, padded) of the blocks touched by
/// `changes` (`(offset, len)` pairs, e.g. from [`mutate_blocks`]).
pub fn changed_bitmap_base64(changes: &[(u64, u64)], disk_size: u64) -> String {
    CbtBitmap::from_changes(changes, disk_size).to_base64()
}

/// A random CBT bitmap: each block set with probability `fraction`. Use `.to_base64()`
/// for the XAPI string and `.set_blocks()` for the expected block list.
pub fn random_bitmap(disk_size: u64, seed: u64, fraction: f64) -> CbtBitmap {
    CbtBitmap::random(disk_size, seed, fraction)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_encoding() {
        // 20 blocks -> 3 bytes. Block 0 and block 9 and block 19.
        let size = 20 * BLOCK - 5;
        let bm = CbtBitmap::from_changes(&[(0, 1), (9 * BLOCK + 7, 3), (19 * BLOCK, 1)], size);
        assert_eq!(bm.bytes, vec![0x80, 0x40, 0x10]);
        assert_eq!(bm.to_base64(), "gEAQ");
        // straddling change sets both blocks
        let bm = CbtBitmap::from_changes(&[(BLOCK - 1, 2)], 2 * BLOCK);
        assert_eq!(bm.bytes, vec![0xC0]);
        assert_eq!(changed_bitmap_base64(&[(BLOCK - 1, 2)], 2 * BLOCK), "wA==");
        let back = CbtBitmap::from_base64("wA==", 2 * BLOCK).unwrap();
        assert_eq!(back.set_blocks(), vec![0, 1]);
    }

    #[test]
    fn random_bitmap_fraction() {
        let bm = random_bitmap(4096 * BLOCK, 7, 0.25);
        let n = bm.set_blocks().len();
        assert!((800..1250).contains(&n), "{n}");
        assert_eq!(bm, random_bitmap(4096 * BLOCK, 7, 0.25));
    }

    #[test]
    fn image_and_mutation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let size = 40 * BLOCK + 1000;
        make_image(&p, size, 42, Pattern::Mixed).unwrap();
        let data = std::fs::read(&p).unwrap();
        assert_eq!(data.len() as u64, size);
        let mut kinds = [0; 3];
        for i in 0..block_count(size) {
            let s = (i * BLOCK) as usize;
            let e = (s + BLOCK as usize).min(data.len());
            assert_eq!(data[s..e], expected_block(size, 42, Pattern::Mixed, i)[..]);
            kinds[mixed_block_kind(42, i) as usize] += 1;
        }
        assert!(kinds.iter().all(|&k| k > 3), "{kinds:?}");

        let changes = mutate_blocks(&p, 9, 30).unwrap();
        assert_eq!(changes.len(), 30);
        let after = std::fs::read(&p).unwrap();
        assert_eq!(after.len() as u64, size);
        let bm = CbtBitmap::from_changes(&changes, size);
        let mut straddles = 0;
        for &(o, l) in &changes {
            assert!(l > 0 && o + l <= size);
            if o / BLOCK != (o + l - 1) / BLOCK {
                straddles += 1;
            }
        }
        assert!(straddles >= 10);
        for i in 0..block_count(size) {
            let s = (i * BLOCK) as usize;
            let e = (s + BLOCK as usize).min(data.len());
            assert_eq!(data[s..e] != after[s..e], bm.is_set(i), "block {i}");
        }
    }
}
