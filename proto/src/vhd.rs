//! Which blocks of a dynamic VHD are allocated, read from the start of its byte stream.
//!
//! XenServer's NBD server offers no block status, but `GET /export_raw_vdi?format=vhd` starts
//! with the footer copy, the dynamic header and the block allocation table (BAT). A client
//! reads that far, closes the stream and reads only the allocated blocks over NBD, as Xen
//! Orchestra does; a block the BAT leaves out is zero in the snapshot.
//!
//! Layout (VHD specification, "Hard Disk Footer Format" and "Dynamic Disk Header Format";
//! vhd-tool's stream as docs/XENSERVER.md section 11 describes it). Every field is big-endian.
//! - Footer copy at 0, 512 bytes: cookie `conectix` at 0, file format version 0x00010000 at
//!   12, the header's offset (`data_offset`, u64) at 16, `current_size` (u64) at 48, disk type
//!   at 60 (2 fixed, 3 dynamic, 4 differencing), checksum at 64.
//! - Dynamic header at `data_offset` (512 from vhd-tool and qemu), 1024 bytes: cookie
//!   `cxsparse` at 0, `table_offset` (u64) at 16, version 0x00010000 at 24,
//!   `max_table_entries` at 28, `block_size` at 32, checksum at 36.
//! - BAT at `table_offset` (2048 from vhd-tool, 1536 from qemu): `max_table_entries` u32
//!   sector numbers of each block's sector bitmap, `0xFFFFFFFF` = not allocated, padded to a
//!   multiple of 512 bytes. Blocks follow the BAT.
//! - Checksum: the one's complement of the sum of the structure's bytes, the checksum field
//!   counted as zero.
//!
//! The reader only moves forward and never buffers more than one header: the bytes between
//! the parts are skipped, and the BAT is read entry by entry into one bit per block.

use bytes::{Buf, BytesMut};
use std::ops::Range;

/// The footer (and its copy at the start of the stream).
const FOOTER_LEN: usize = 512;
/// The dynamic disk header.
const HEADER_LEN: usize = 1024;
/// The only version the specification defines, for the footer and the header.
const VERSION: u32 = 0x0001_0000;
const DISK_DYNAMIC: u32 = 3;
const UNALLOCATED: u32 = u32::MAX;
const SECTOR: u64 = 512;

/// The smallest block size accepted. Every known writer (vhd-tool, vhd-util, qemu, Hyper-V)
/// uses 2 MiB; smaller blocks would only multiply the client's reads.
pub const MIN_BLOCK_SIZE: u64 = 512 << 10;
/// The largest block size accepted: a block must stay a reasonable single read.
pub const MAX_BLOCK_SIZE: u64 = 256 << 20;
/// The most BAT entries accepted: 64 TiB at 2 MiB, far above XenServer's 2040 GiB VHD limit.
/// The allocation then takes at most 4 MiB (one bit per entry).
pub const MAX_TABLE_ENTRIES: u64 = 1 << 25;
/// The header and the BAT must start within the first MiB. vhd-tool puts the BAT at 2048,
/// qemu and vhd-util at 1536; this bounds the bytes skipped before it.
pub const MAX_METADATA_OFFSET: u64 = 1 << 20;
/// The most bytes asked for at once while skipping.
const SKIP_STEP: u64 = 64 << 10;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VhdError {
    #[error("the VHD stream ended before the end of the {part} that starts at byte {offset}")]
    Truncated { part: &'static str, offset: u64 },
    #[error("no VHD {part} at byte {offset}: cookie {found}, expected {expected:?}")]
    Cookie {
        part: &'static str,
        offset: u64,
        found: String,
        expected: &'static str,
    },
    #[error("bad VHD {part} checksum at byte {offset}: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        part: &'static str,
        offset: u64,
        stored: u32,
        computed: u32,
    },
    #[error("unknown VHD {part} version {version:#010x} at byte {offset} (expected 0x00010000)")]
    Version {
        part: &'static str,
        offset: u64,
        version: u32,
    },
    #[error("the VHD is a {0} disk (footer byte 60); only dynamic disks have an allocation table to read")]
    DiskType(&'static str),
    #[error(
        "the VHD's current_size {0} (footer byte 48) is not a whole number of 512-byte sectors"
    )]
    VirtualSize(u64),
    #[error("the VHD footer puts the dynamic header at byte {0} (footer byte 16); it must be between 512 and 1 MiB")]
    HeaderOffset(u64),
    #[error("the VHD header at byte {header} puts the BAT at byte {table_offset}; it must follow the header and start within the first MiB")]
    TableOffset { header: u64, table_offset: u64 },
    #[error("the VHD block size {size} (header at byte {header}) is not a power of two between 512 KiB and 256 MiB")]
    BlockSize { header: u64, size: u64 },
    #[error("the VHD header at byte {header} has {entries} BAT entries of {block_size} bytes: too few for the {virtual_size}-byte disk")]
    TooFewEntries {
        header: u64,
        entries: u64,
        block_size: u64,
        virtual_size: u64,
    },
    #[error("the VHD header at byte {header} has {entries} BAT entries, more than the {MAX_TABLE_ENTRIES} accepted")]
    TooManyEntries { header: u64, entries: u64 },
    #[error("VHD BAT entry {index} at byte {offset} points at sector {sector}, inside the VHD's metadata (blocks start at sector {first_sector} or later)")]
    BatEntry {
        index: u64,
        offset: u64,
        sector: u32,
        first_sector: u64,
    },
    #[error("the VHD allocation was already returned")]
    AlreadyDone,
}

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Read from the stream until the buffer holds at least this many bytes (at end of stream,
    /// fail with [`VhdAllocationReader::end_of_stream`]).
    NeedBytes(usize),
    /// The allocation is known; the rest of the stream is not needed.
    Done(VhdAllocation),
}

/// The allocated blocks of a dynamic VHD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhdAllocation {
    /// The footer's `current_size`. vhd-tool rounds it up to whole 2 MiB blocks, so it may
    /// exceed the VDI's `virtual_size`.
    pub virtual_size: u64,
    pub block_size: u64,
    /// One bit per block inside `virtual_size`, least significant bit first.
    allocated: Vec<u64>,
}

impl VhdAllocation {
    /// Number of blocks (the last may be partial): `ceil(virtual_size / block_size)`.
    pub fn blocks(&self) -> u64 {
        self.virtual_size.div_ceil(self.block_size)
    }

    /// An allocation map from a changed-block bitmap (one bit per `block_size` block, most
    /// significant bit first, as `VDI.list_changed_blocks`): what vSphere's
    /// `QueryChangedDiskAreas(changeId "*")` reports allocated, read as a full stream's map.
    /// Bits past the last block are ignored; missing bytes read as unallocated.
    pub fn from_block_bitmap(virtual_size: u64, block_size: u64, bitmap: &[u8]) -> VhdAllocation {
        let block_size = block_size.max(1);
        let blocks = virtual_size.div_ceil(block_size);
        let mut allocated = vec![0u64; usize::try_from(blocks.div_ceil(64)).unwrap_or(0)];
        for (i, byte) in bitmap.iter().enumerate() {
            for bit in 0..8u64 {
                let block = i as u64 * 8 + bit;
                if block < blocks && byte & (0x80 >> bit) != 0 {
                    allocated[(block / 64) as usize] |= 1 << (block % 64);
                }
            }
        }
        VhdAllocation {
            virtual_size,
            block_size,
            allocated,
        }
    }

    pub fn is_allocated(&self, block: u64) -> bool {
        let word = usize::try_from(block / 64).ok();
        word.and_then(|w| self.allocated.get(w))
            .is_some_and(|w| w & (1 << (block % 64)) != 0)
    }

    /// Allocated byte ranges in ascending order, clipped to the virtual size, neighbours
    /// merged.
    pub fn allocated_ranges(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        let mut block = 0;
        std::iter::from_fn(move || {
            let blocks = self.blocks();
            while block < blocks && !self.is_allocated(block) {
                block += 1;
            }
            if block == blocks {
                return None;
            }
            let start = block;
            while block < blocks && self.is_allocated(block) {
                block += 1;
            }
            let end = (block * self.block_size).min(self.virtual_size);
            Some(start * self.block_size..end)
        })
    }

    pub fn allocated_bytes(&self) -> u64 {
        self.allocated_ranges().map(|r| r.end - r.start).sum()
    }
}

#[derive(Debug)]
enum State {
    Footer,
    Header,
    Table { next: u64 },
    Failed(VhdError),
    Returned,
}

/// Reads the allocation of a dynamic VHD from the start of its byte stream, incrementally.
///
/// The driver keeps the bytes it read in a buffer, calls [`poll`](Self::poll) (which
/// consumes what it has used) and reads more while it answers [`Step::NeedBytes`].
#[derive(Debug)]
pub struct VhdAllocationReader {
    state: State,
    /// Stream offset of the buffer's first byte.
    pos: u64,
    /// Bytes up to here are skipped before the current part.
    skip_to: u64,
    virtual_size: u64,
    header_offset: u64,
    table_offset: u64,
    entries: u64,
    block_size: u64,
    allocated: Vec<u64>,
}

impl Default for VhdAllocationReader {
    fn default() -> Self {
        Self::new()
    }
}

impl VhdAllocationReader {
    pub fn new() -> Self {
        Self {
            state: State::Footer,
            pos: 0,
            skip_to: 0,
            virtual_size: 0,
            header_offset: 0,
            table_offset: 0,
            entries: 0,
            block_size: 0,
            allocated: Vec::new(),
        }
    }

    /// Consumes what it can of `buf` and says what comes next. An error is final: later calls
    /// return it again.
    pub fn poll(&mut self, buf: &mut BytesMut) -> Result<Step, VhdError> {
        let step = self.advance(buf);
        if let Err(e) = &step {
            self.state = State::Failed(e.clone());
        }
        step
    }

    /// The error for a stream that ended while [`poll`](Self::poll) still needed bytes.
    pub fn end_of_stream(&self) -> VhdError {
        let (part, offset) = match self.state {
            State::Footer => ("footer copy", 0),
            State::Header => ("dynamic header", self.header_offset),
            State::Table { .. } => ("BAT", self.table_offset),
            State::Failed(ref e) => return e.clone(),
            State::Returned => return VhdError::AlreadyDone,
        };
        VhdError::Truncated { part, offset }
    }

    fn advance(&mut self, buf: &mut BytesMut) -> Result<Step, VhdError> {
        loop {
            if self.pos < self.skip_to {
                let n = (self.skip_to - self.pos).min(buf.len() as u64);
                buf.advance(n as usize);
                self.pos += n;
                if self.pos < self.skip_to {
                    return Ok(Step::NeedBytes(
                        (self.skip_to - self.pos).min(SKIP_STEP) as usize
                    ));
                }
            }
            match self.state {
                State::Footer => {
                    let Some(footer) = buf.get(..FOOTER_LEN) else {
                        return Ok(Step::NeedBytes(FOOTER_LEN));
                    };
                    self.parse_footer(footer)?;
                    self.consume(buf, FOOTER_LEN);
                    self.skip_to = self.header_offset;
                    self.state = State::Header;
                }
                State::Header => {
                    let Some(header) = buf.get(..HEADER_LEN) else {
                        return Ok(Step::NeedBytes(HEADER_LEN));
                    };
                    self.parse_header(header)?;
                    self.consume(buf, HEADER_LEN);
                    self.skip_to = self.table_offset;
                    self.state = State::Table { next: 0 };
                }
                State::Table { next } => return self.read_table(buf, next),
                State::Failed(ref e) => return Err(e.clone()),
                State::Returned => return Err(VhdError::AlreadyDone),
            }
        }
    }

    fn consume(&mut self, buf: &mut BytesMut, n: usize) {
        buf.advance(n);
        self.pos += n as u64;
    }

    fn parse_footer(&mut self, f: &[u8]) -> Result<(), VhdError> {
        check_cookie(f, "conectix", "footer copy", 0)?;
        check_checksum(f, 64, "footer copy", 0)?;
        check_version(be32(f, 12), "footer copy", 0)?;
        match be32(f, 60) {
            DISK_DYNAMIC => {}
            2 => return Err(VhdError::DiskType("fixed")),
            4 => return Err(VhdError::DiskType("differencing")),
            _ => return Err(VhdError::DiskType("unknown")),
        }
        let size = be64(f, 48);
        if size % SECTOR != 0 {
            return Err(VhdError::VirtualSize(size));
        }
        let header = be64(f, 16);
        if !(FOOTER_LEN as u64..=MAX_METADATA_OFFSET).contains(&header) {
            return Err(VhdError::HeaderOffset(header));
        }
        self.virtual_size = size;
        self.header_offset = header;
        Ok(())
    }

    fn parse_header(&mut self, h: &[u8]) -> Result<(), VhdError> {
        let at = self.header_offset;
        check_cookie(h, "cxsparse", "dynamic header", at)?;
        check_checksum(h, 36, "dynamic header", at)?;
        check_version(be32(h, 24), "dynamic header", at)?;
        let table_offset = be64(h, 16);
        if !(at + HEADER_LEN as u64..=MAX_METADATA_OFFSET).contains(&table_offset) {
            return Err(VhdError::TableOffset {
                header: at,
                table_offset,
            });
        }
        let block_size = u64::from(be32(h, 32));
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(VhdError::BlockSize {
                header: at,
                size: block_size,
            });
        }
        let entries = u64::from(be32(h, 28));
        if entries > MAX_TABLE_ENTRIES {
            return Err(VhdError::TooManyEntries {
                header: at,
                entries,
            });
        }
        // Both factors are bounded, so this cannot overflow.
        if entries * block_size < self.virtual_size {
            return Err(VhdError::TooFewEntries {
                header: at,
                entries,
                block_size,
                virtual_size: self.virtual_size,
            });
        }
        self.table_offset = table_offset;
        self.entries = entries;
        self.block_size = block_size;
        Ok(())
    }

    /// Reads whole BAT entries from `buf`, starting with entry `next`.
    fn read_table(&mut self, buf: &mut BytesMut, mut next: u64) -> Result<Step, VhdError> {
        // Blocks come after the BAT, which is padded to whole sectors.
        let first_sector = (self.table_offset + self.entries * 4).div_ceil(SECTOR);
        let blocks = self.virtual_size.div_ceil(self.block_size);
        while next < self.entries && buf.len() >= 4 {
            let sector = buf.get_u32();
            let offset = self.pos;
            self.pos += 4;
            if sector != UNALLOCATED {
                if u64::from(sector) < first_sector {
                    return Err(VhdError::BatEntry {
                        index: next,
                        offset,
                        sector,
                        first_sector,
                    });
                }
                if next < blocks {
                    self.mark(next);
                }
            }
            next += 1;
        }
        if next < self.entries {
            self.state = State::Table { next };
            return Ok(Step::NeedBytes(4));
        }
        self.state = State::Returned;
        Ok(Step::Done(VhdAllocation {
            virtual_size: self.virtual_size,
            block_size: self.block_size,
            allocated: std::mem::take(&mut self.allocated),
        }))
    }

    fn mark(&mut self, block: u64) {
        // Grows with the entries actually read, never from a length field alone.
        let word = (block / 64) as usize;
        if self.allocated.len() <= word {
            self.allocated.resize(word + 1, 0);
        }
        self.allocated[word] |= 1 << (block % 64);
    }
}

fn check_cookie(
    b: &[u8],
    expected: &'static str,
    part: &'static str,
    offset: u64,
) -> Result<(), VhdError> {
    if &b[..8] == expected.as_bytes() {
        return Ok(());
    }
    Err(VhdError::Cookie {
        part,
        offset,
        found: b[..8].escape_ascii().to_string(),
        expected,
    })
}

fn check_checksum(b: &[u8], at: usize, part: &'static str, offset: u64) -> Result<(), VhdError> {
    let stored = be32(b, at);
    let field: u32 = b[at..at + 4].iter().map(|&x| u32::from(x)).sum();
    let sum = b.iter().fold(0u32, |a, &x| a.wrapping_add(u32::from(x)));
    let computed = !sum.wrapping_sub(field);
    if stored == computed {
        return Ok(());
    }
    Err(VhdError::Checksum {
        part,
        offset,
        stored,
        computed,
    })
}

fn check_version(version: u32, part: &'static str, offset: u64) -> Result<(), VhdError> {
    if version == VERSION {
        return Ok(());
    }
    Err(VhdError::Version {
        part,
        offset,
        version,
    })
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

#[cfg(test)]
mod tests;
