//! The changed-block bitmap of `VDI.list_changed_blocks`.
//!
//! Encoding (docs/XENSERVER.md section 1): base64 (standard alphabet, padded) of
//! a bitmap with one bit per 64 KiB block, most significant bit first: block `i` changed when
//! `byte[i / 8] & (0x80 >> (i % 8)) != 0`. Its length is `ceil(ceil(size / 64 KiB) / 8)` bytes
//! for the disk size the host knew; a bitmap longer than the disk is fine as long as the bits
//! past the end are clear.

use base64::Engine;

/// One CBT block.
pub const CBT_BLOCK: u64 = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CbtError {
    #[error("the changed-block bitmap is not valid base64: {0}")]
    Base64(String),
    #[error(
        "the changed-block bitmap has {bytes} bytes but a disk of {disk_size} bytes needs {needed}"
    )]
    TooShort {
        bytes: usize,
        needed: u64,
        disk_size: u64,
    },
    #[error("the changed-block bitmap marks block {block} changed, past the end of the {disk_size}-byte disk")]
    PastEnd { block: u64, disk_size: u64 },
    #[error("invalid request size {0}: must be a multiple of 64 KiB between 64 KiB and 32 MiB")]
    BadRequestSize(u64),
    #[error("the changed-block bitmap is longer than {max} bytes (the bitmap of the largest disk supported)")]
    TooLong { max: usize },
}

/// A range of the disk to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
}

/// The number of 64 KiB blocks a disk of `disk_size` bytes has (the last may be partial).
pub fn blocks_for(disk_size: u64) -> u64 {
    disk_size.div_ceil(CBT_BLOCK)
}

/// Decode the base64 text (surrounding whitespace is ignored, as `xe` prints a newline).
pub fn decode_base64(text: &[u8]) -> Result<Vec<u8>, CbtError> {
    let trimmed = text.trim_ascii();
    base64::engine::general_purpose::STANDARD
        .decode(trimmed)
        .map_err(|e| CbtError::Base64(e.to_string()))
}

/// Decodes base64 bitmap text given in pieces (as read from a file), so the text and the
/// bitmap are never both held whole: a 16 TiB disk's bitmap is 32 MiB, its text 43 MB.
/// Accepts exactly what [`decode_base64`] accepts, and refuses a bitmap longer than
/// `max_len` bytes as soon as it gets there.
#[derive(Debug)]
pub struct Base64Decoder {
    /// Characters decoded at a time.
    batch: usize,
    out: Vec<u8>,
    /// Characters not decoded yet.
    partial: Vec<u8>,
    /// Characters decoded so far (for error messages).
    consumed: u64,
    /// Whitespace came after data: only more whitespace may follow.
    trailing: bool,
    max_len: usize,
}

impl Base64Decoder {
    pub fn new(max_len: usize) -> Base64Decoder {
        Base64Decoder {
            batch: 4096,
            out: Vec::new(),
            partial: Vec::with_capacity(4096),
            consumed: 0,
            trailing: false,
            max_len,
        }
    }

    /// Decode the next piece of text.
    pub fn push(&mut self, text: &[u8]) -> Result<(), CbtError> {
        for &c in text {
            if c.is_ascii_whitespace() {
                // Leading whitespace is skipped; after data it may only end the text.
                self.trailing |= self.consumed > 0 || !self.partial.is_empty();
                continue;
            }
            if self.trailing {
                return Err(CbtError::Base64(format!(
                    "whitespace inside the text, before character {}",
                    self.consumed + self.partial.len() as u64
                )));
            }
            self.partial.push(c);
            if self.partial.len() >= self.batch {
                self.decode_groups(false)?;
            }
        }
        Ok(())
    }

    /// The bitmap, once all the text was given.
    pub fn finish(mut self) -> Result<Vec<u8>, CbtError> {
        self.decode_groups(true)?;
        Ok(self.out)
    }

    /// Decode the complete groups of `partial` but the last (which may hold the padding that
    /// ends the text), or all of it at the end.
    fn decode_groups(&mut self, last: bool) -> Result<(), CbtError> {
        let n = if last {
            self.partial.len()
        } else {
            (self.partial.len() / 4).saturating_sub(1) * 4
        };
        // Padding ends the text, and a group follows these.
        if !last && self.partial[..n].contains(&b'=') {
            return Err(CbtError::Base64(format!(
                "padding before the end of the text (in the characters after {})",
                self.consumed
            )));
        }
        if self.out.len() + n / 4 * 3 > self.max_len + 2 {
            return Err(CbtError::TooLong { max: self.max_len });
        }
        base64::engine::general_purpose::STANDARD
            .decode_vec(&self.partial[..n], &mut self.out)
            .map_err(|e| {
                CbtError::Base64(format!("{e} (in the characters after {})", self.consumed))
            })?;
        if self.out.len() > self.max_len {
            return Err(CbtError::TooLong { max: self.max_len });
        }
        self.consumed += n as u64;
        self.partial.drain(..n);
        Ok(())
    }
}

/// Encode a bitmap the way XenServer does.
pub fn encode_base64(bitmap: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bitmap)
}

/// Check a decoded bitmap against the disk size.
pub fn validate(bitmap: &[u8], disk_size: u64) -> Result<(), CbtError> {
    let blocks = blocks_for(disk_size);
    let needed = blocks.div_ceil(8);
    if (bitmap.len() as u64) < needed {
        return Err(CbtError::TooShort {
            bytes: bitmap.len(),
            needed,
            disk_size,
        });
    }
    // Bits at or past `blocks` must be clear.
    let first_byte = (blocks / 8) as usize;
    for (i, &b) in bitmap.iter().enumerate().skip(first_byte) {
        let base = i as u64 * 8;
        let mask = if base >= blocks {
            0xff
        } else {
            0xffu8 >> (blocks - base)
        };
        if b & mask != 0 {
            let bit = (b & mask).leading_zeros() as u64;
            return Err(CbtError::PastEnd {
                block: base + bit,
                disk_size,
            });
        }
    }
    Ok(())
}

/// Iterate over the changed blocks as extents, coalescing adjacent blocks into requests of
/// at most `max_request` bytes and clamping the last one to the disk size. The bitmap must
/// have passed [`validate`]. Works a byte (eight blocks) at a time, so an empty 16 TiB
/// bitmap (32 MiB) is scanned in milliseconds.
pub fn extents(
    bitmap: &[u8],
    disk_size: u64,
    max_request: u64,
) -> Result<impl Iterator<Item = Extent> + '_, CbtError> {
    if max_request < CBT_BLOCK || max_request % CBT_BLOCK != 0 || max_request > 32 << 20 {
        return Err(CbtError::BadRequestSize(max_request));
    }
    validate(bitmap, disk_size)?;
    let blocks = blocks_for(disk_size);
    let max_blocks = max_request / CBT_BLOCK;
    Ok(Runs {
        bitmap,
        blocks,
        next: 0,
    }
    .flat_map(move |(start, count)| {
        let mut pos = 0;
        std::iter::from_fn(move || {
            if pos >= count {
                return None;
            }
            let n = (count - pos).min(max_blocks);
            let offset = (start + pos) * CBT_BLOCK;
            let end = ((start + pos + n) * CBT_BLOCK).min(disk_size);
            pos += n;
            Some(Extent {
                offset,
                length: end - offset,
            })
        })
    }))
}

/// Runs of set bits: (first block, count).
struct Runs<'a> {
    bitmap: &'a [u8],
    blocks: u64,
    next: u64,
}

impl Runs<'_> {
    fn bit(&self, i: u64) -> bool {
        self.bitmap[(i / 8) as usize] & (0x80 >> (i % 8)) != 0
    }
    /// The next set bit at or after `i`, skipping zero bytes whole.
    fn next_set(&self, mut i: u64) -> Option<u64> {
        while i < self.blocks {
            if i % 8 == 0 {
                let byte = (i / 8) as usize;
                let zeros = self.bitmap[byte..].iter().take_while(|&&b| b == 0).count() as u64;
                if zeros > 0 {
                    i += zeros * 8;
                    continue;
                }
            }
            if self.bit(i) {
                return Some(i);
            }
            i += 1;
        }
        None
    }
    fn next_clear(&self, mut i: u64) -> u64 {
        while i < self.blocks {
            if i % 8 == 0 {
                let byte = (i / 8) as usize;
                let ones = self.bitmap[byte..]
                    .iter()
                    .take_while(|&&b| b == 0xff)
                    .count() as u64;
                if ones > 0 {
                    i += ones * 8;
                    continue;
                }
            }
            if !self.bit(i) {
                return i;
            }
            i += 1;
        }
        self.blocks
    }
}

impl Iterator for Runs<'_> {
    type Item = (u64, u64);
    fn next(&mut self) -> Option<(u64, u64)> {
        let start = self.next_set(self.next)?;
        let end = self.next_clear(start).min(self.blocks);
        self.next = end;
        Some((start, end - start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn documented_example() {
        // 10 MiB disk, blocks 0, 9 and 159 changed.
        let bm = decode_base64(b"gEAAAAAAAAAAAAAAAAAAAAAAAAE=\n").unwrap();
        let e: Vec<_> = extents(&bm, 10 * MIB, MIB).unwrap().collect();
        assert_eq!(
            e,
            vec![
                Extent {
                    offset: 0,
                    length: CBT_BLOCK
                },
                Extent {
                    offset: 9 * CBT_BLOCK,
                    length: CBT_BLOCK
                },
                Extent {
                    offset: 159 * CBT_BLOCK,
                    length: CBT_BLOCK
                },
            ]
        );
    }

    #[test]
    fn coalesces_and_clamps() {
        // 20 blocks, disk ends 512 bytes into block 19; all set.
        let size = 19 * CBT_BLOCK + 512;
        let bm = [0xff, 0xff, 0xf0];
        let e: Vec<_> = extents(&bm, size, 8 * CBT_BLOCK).unwrap().collect();
        assert_eq!(
            e,
            vec![
                Extent {
                    offset: 0,
                    length: 8 * CBT_BLOCK
                },
                Extent {
                    offset: 8 * CBT_BLOCK,
                    length: 8 * CBT_BLOCK
                },
                Extent {
                    offset: 16 * CBT_BLOCK,
                    length: 3 * CBT_BLOCK + 512
                },
            ]
        );
    }

    #[test]
    fn errors() {
        assert!(matches!(
            decode_base64(b"not base64!"),
            Err(CbtError::Base64(_))
        ));
        assert!(matches!(
            validate(&[0xff], 16 * CBT_BLOCK),
            Err(CbtError::TooShort { .. })
        ));
        // 3 blocks: bit 3 is past the end.
        assert_eq!(
            validate(&[0x10], 3 * CBT_BLOCK),
            Err(CbtError::PastEnd {
                block: 3,
                disk_size: 3 * CBT_BLOCK
            })
        );
        // Longer than needed but clear: fine.
        assert!(validate(&[0xe0, 0, 0], 3 * CBT_BLOCK).is_ok());
        assert!(validate(&[0xe0, 0, 1], 3 * CBT_BLOCK).is_err());
        assert!(extents(&[0], CBT_BLOCK, 1000).is_err());
    }

    /// Decode `text` in pieces of `piece` bytes.
    fn decode_in_pieces(text: &[u8], piece: usize, max: usize) -> Result<Vec<u8>, CbtError> {
        let mut d = Base64Decoder::new(max);
        // Small batches, so that short texts go through several.
        d.batch = 8;
        for chunk in text.chunks(piece.max(1)) {
            d.push(chunk)?;
        }
        d.finish()
    }

    #[test]
    fn decoder_in_pieces() {
        let bm: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let text = format!("\n  {}\n\n", encode_base64(&bm));
        for piece in [1, 3, 4, 5, 4096, 100_000] {
            assert_eq!(
                decode_in_pieces(text.as_bytes(), piece, 10_000).unwrap(),
                bm
            );
        }
        assert_eq!(
            decode_in_pieces(text.as_bytes(), 7, 9_999),
            Err(CbtError::TooLong { max: 9_999 })
        );
        assert!(decode_in_pieces(b"AAAA AAAA", 2, 100).is_err());
        assert!(decode_in_pieces(b"AA==AAAA", 2, 100).is_err());
        assert!(decode_in_pieces(b"AAA", 2, 100).is_err());
        assert_eq!(decode_in_pieces(b"", 2, 100).unwrap(), Vec::<u8>::new());
        assert_eq!(decode_in_pieces(b"AA==\n", 1, 100).unwrap(), vec![0]);
        // Padding right at the end of a batch.
        assert_eq!(decode_in_pieces(b"AAAAAA==\n", 8, 100).unwrap(), vec![0; 4]);
        assert!(decode_in_pieces(b"AA==AAAA", 8, 100).is_err());
    }

    proptest! {
        #[test]
        fn decoder_accepts_what_decode_base64_accepts(text in proptest::collection::vec(prop_oneof![Just(b'A'), Just(b'/'), Just(b'='), Just(b' '), Just(b'!'), any::<u8>()], 0..64), piece in 1usize..9) {
            let whole = decode_base64(&text).ok();
            let pieces = decode_in_pieces(&text, piece, 1 << 20).ok();
            prop_assert_eq!(whole, pieces);
        }

        #[test]
        fn decoder_round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..100), piece in 1usize..9, lead in 0usize..3, trail in 0usize..3) {
            let text = format!("{}{}{}", " ".repeat(lead), encode_base64(&bytes), "\n".repeat(trail));
            prop_assert_eq!(decode_in_pieces(text.as_bytes(), piece, 100).unwrap(), bytes);
        }

        #[test]
        fn extents_match_bits(bits in proptest::collection::vec(any::<bool>(), 1..300), tail in 0u64..CBT_BLOCK, req in 1u64..6) {
            let blocks = bits.len() as u64;
            let size = (blocks - 1) * CBT_BLOCK + tail.max(512);
            let mut bm = vec![0u8; bits.len().div_ceil(8)];
            for (i, &b) in bits.iter().enumerate() { if b { bm[i / 8] |= 0x80 >> (i % 8); } }
            let ex: Vec<_> = extents(&bm, size, req * CBT_BLOCK).unwrap().collect();
            let mut covered = vec![false; bits.len()];
            let mut last_end = 0;
            for e in &ex {
                prop_assert!(e.offset >= last_end);
                prop_assert!(e.length <= req * CBT_BLOCK && e.length > 0);
                prop_assert!(e.offset + e.length <= size);
                last_end = e.offset + e.length;
                for b in e.offset / CBT_BLOCK..(e.offset + e.length).div_ceil(CBT_BLOCK) { covered[b as usize] = true; }
            }
            prop_assert_eq!(covered, bits);
        }

        #[test]
        fn decode_never_panics(text in proptest::collection::vec(any::<u8>(), 0..64), size in 0u64..(1<<30)) {
            if let Ok(bm) = decode_base64(&text) {
                if let Ok(it) = extents(&bm, size, CBT_BLOCK) { for _ in it {} }
            }
        }
    }
}
