//! Plan: which ranges of the disk to read, and which are already known to be zero. The plan
//! is lazy: items are made as the planner hands them out, so its memory does not depend on
//! the size of the disk or on how fragmented it is.

use cbtstream_proto::cbt::{self, CbtError, CBT_BLOCK};
use cbtstream_proto::nbd::consts::STATE_ZERO;
use cbtstream_proto::nbd::BlockStatusExtent;
use cbtstream_proto::vhd::VhdAllocation;

/// The largest disk cbtstream exports: 64 TiB. XenServer's largest VDI is 16 TiB and
/// VMware's 62 TB; a server advertising more (2^63, say) is refused before anything is
/// planned rather than trusted.
pub const MAX_DISK_SIZE: u64 = 64 << 40;

/// One step of the plan, in ascending offset order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanItem {
    Read { offset: u64, len: u64 },
    Zero { offset: u64, len: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("the server reports a disk of {size} bytes, more than the {max} bytes (64 TiB) cbtstream supports", max = MAX_DISK_SIZE)]
    TooLarge { size: u64 },
    #[error(transparent)]
    Bitmap(#[from] CbtError),
}

/// How the plan is made.
#[derive(Debug)]
pub enum Source {
    /// The blocks a CBT bitmap marks changed (validated against the disk size).
    Bitmap(Vec<u8>),
    /// The whole disk.
    Full,
    /// The whole disk, skipping what BLOCK_STATUS (`base:allocation`) reports as zero.
    /// Zero ranges are shrunk to `align` boundaries so the reads around them stay aligned.
    Allocation { align: u64 },
    /// The whole disk, reading only the blocks a VHD block allocation table marks allocated
    /// (XenServer's VHD export of the snapshot): a block it does not allocate is zero.
    Allocated(VhdAllocation),
}

/// What to export, and what is known of it before reading.
#[derive(Debug)]
pub struct Plan {
    pub source: Source,
    pub disk_size: u64,
    /// The longest read (reads are at most this long).
    pub request: u64,
    /// Bytes of disk the export covers (the progress total).
    pub covered: u64,
    /// The average read, to size the pipeline (exact for a bitmap, an estimate otherwise).
    pub average_read: u64,
    /// The longest read of the plan (exact for a bitmap, `request` otherwise).
    pub largest_read: u64,
}

impl Plan {
    fn new(source: Source, disk_size: u64, request: u64) -> Result<Plan, PlanError> {
        if disk_size > MAX_DISK_SIZE {
            return Err(PlanError::TooLarge { size: disk_size });
        }
        if request < CBT_BLOCK || !request.is_multiple_of(CBT_BLOCK) || request > 32 << 20 {
            return Err(CbtError::BadRequestSize(request).into());
        }
        Ok(Plan {
            source,
            disk_size,
            request,
            covered: disk_size,
            average_read: request,
            largest_read: request,
        })
    }

    /// Every block the bitmap marks changed, coalesced into reads of at most `request`.
    /// Counts the reads with one pass over the bitmap (no allocation).
    pub fn from_bitmap(bitmap: Vec<u8>, disk_size: u64, request: u64) -> Result<Plan, PlanError> {
        let (mut reads, mut bytes, mut largest) = (0u64, 0u64, 0u64);
        if disk_size <= MAX_DISK_SIZE {
            for e in cbt::extents(&bitmap, disk_size, request)? {
                reads += 1;
                bytes += e.length;
                largest = largest.max(e.length);
            }
        }
        let mut plan = Plan::new(Source::Bitmap(bitmap), disk_size, request)?;
        plan.covered = bytes;
        plan.average_read = bytes / reads.max(1);
        plan.largest_read = largest;
        Ok(plan)
    }

    /// The whole disk, in reads of at most `request`.
    pub fn full(disk_size: u64, request: u64) -> Result<Plan, PlanError> {
        Plan::new(Source::Full, disk_size, request)
    }

    /// The whole disk, reading only what `alloc` marks allocated (clipped to the disk: a
    /// VHD's size is rounded up to whole blocks).
    pub fn allocated(
        alloc: VhdAllocation,
        disk_size: u64,
        request: u64,
    ) -> Result<Plan, PlanError> {
        let read: u64 = alloc
            .allocated_ranges()
            .map(|r| r.end.min(disk_size).saturating_sub(r.start))
            .sum();
        let mut plan = Plan::new(Source::Allocated(alloc), disk_size, request)?;
        plan.covered = disk_size;
        plan.average_read = request.min(read.max(1));
        Ok(plan)
    }

    /// The whole disk, asking the server which ranges are zero. The reads are not known
    /// yet: the pipeline is sized as for a full read (most disks are mostly allocated).
    pub fn allocation(disk_size: u64, request: u64, align: u64) -> Result<Plan, PlanError> {
        Plan::new(Source::Allocation { align }, disk_size, request)
    }
}

/// Turns ranges known to be data or zero, given in order, into plan items: zero ranges
/// merge into one ZERO item, data ranges into reads of at most `request` bytes. Full reads
/// come out as soon as they are known, so a long data range never piles up here.
#[derive(Debug)]
pub struct Items {
    request: u64,
    /// The range not yet handed out: (offset, length, is_zero).
    pending: Option<(u64, u64, bool)>,
}

impl Items {
    pub fn new(request: u64) -> Items {
        Items {
            request,
            pending: None,
        }
    }

    /// Add the next range; items now complete go to `out`.
    pub fn push(&mut self, offset: u64, len: u64, zero: bool, out: &mut Vec<PlanItem>) {
        if len == 0 {
            return;
        }
        match &mut self.pending {
            Some(p) if p.2 == zero && p.0 + p.1 == offset => p.1 += len,
            _ => {
                self.flush(out);
                self.pending = Some((offset, len, zero));
            }
        }
        if let Some((off, len, false)) = &mut self.pending {
            while *len >= self.request {
                out.push(PlanItem::Read {
                    offset: *off,
                    len: self.request,
                });
                *off += self.request;
                *len -= self.request;
            }
        }
    }

    /// Hand out what is pending (at the end of the disk, or before a range of the other kind).
    pub fn flush(&mut self, out: &mut Vec<PlanItem>) {
        match self.pending.take() {
            Some((_, 0, _)) | None => {}
            Some((offset, len, true)) => out.push(PlanItem::Zero { offset, len }),
            Some((offset, len, false)) => out.push(PlanItem::Read { offset, len }),
        }
    }
}

/// The ranges of one block-status reply for `[offset, offset + asked)`, in order, clamped to
/// the request (servers may run past it) with neighbours of the same kind merged. Returns
/// the ranges and how many bytes they cover (0 when the reply covers nothing).
pub fn block_status_ranges(
    offset: u64,
    asked: u64,
    extents: &[BlockStatusExtent],
) -> (Vec<(u64, u64, bool)>, u64) {
    let mut map: Vec<(u64, u64, bool)> = Vec::new();
    let mut pos = offset;
    let end = offset + asked;
    for e in extents {
        if pos >= end {
            break;
        }
        let len = e.length.min(end - pos);
        // Only ZERO promises that reads return zeroes; a HOLE alone does not.
        let zero = e.flags & u64::from(STATE_ZERO) != 0;
        match map.last_mut() {
            Some(last) if last.2 == zero && last.0 + last.1 == pos => last.1 += len,
            _ => map.push((pos, len, zero)),
        }
        pos += len;
    }
    (map, pos - offset)
}

/// Make every zero range of `map` start and end on `align` boundaries, turning the unaligned
/// edges into data, so that the reads around them are aligned.
pub fn align_map(map: &[(u64, u64, bool)], align: u64) -> Vec<(u64, u64, bool)> {
    let mut out: Vec<(u64, u64, bool)> = Vec::with_capacity(map.len());
    let mut push = |o: u64, l: u64, z: bool| {
        if l == 0 {
            return;
        }
        match out.last_mut() {
            Some(last) if last.2 == z && last.0 + last.1 == o => last.1 += l,
            _ => out.push((o, l, z)),
        }
    };
    for &(o, l, z) in map {
        if !z {
            push(o, l, false);
            continue;
        }
        let start = o.div_ceil(align) * align;
        let end = ((o + l) / align) * align;
        if end <= start {
            push(o, l, false);
        } else {
            push(o, start - o, false);
            push(start, end - start, true);
            push(end, o + l - end, false);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(ranges: &[(u64, u64, bool)], request: u64) -> Vec<PlanItem> {
        let mut it = Items::new(request);
        let mut out = Vec::new();
        for &(o, l, z) in ranges {
            it.push(o, l, z, &mut out);
        }
        it.flush(&mut out);
        out
    }

    #[test]
    fn block_status_clamps_and_merges() {
        let ext = [
            BlockStatusExtent {
                length: 4096,
                flags: 0,
            },
            BlockStatusExtent {
                length: 4096,
                flags: 3,
            },
            BlockStatusExtent {
                length: u64::from(u32::MAX),
                flags: 3,
            },
        ];
        let (map, covered) = block_status_ranges(0, 65536, &ext);
        assert_eq!(covered, 65536);
        assert_eq!(map, vec![(0, 4096, false), (4096, 61440, true)]);
        assert_eq!(block_status_ranges(4096, 4096, &[]), (vec![], 0));
        let aligned = align_map(&[(0, 100, false), (100, 9000, true)], 4096);
        assert_eq!(
            aligned,
            vec![(0, 4096, false), (4096, 4096, true), (8192, 908, false)]
        );
    }

    #[test]
    fn items_split_reads_and_merge_zeroes() {
        use PlanItem::*;
        let r = 4 * CBT_BLOCK;
        // Data ranges from two replies merge; zero ranges merge into one item.
        let got = items(
            &[
                (0, 3 * CBT_BLOCK, false),
                (3 * CBT_BLOCK, 2 * CBT_BLOCK, false),
                (5 * CBT_BLOCK, CBT_BLOCK, true),
                (6 * CBT_BLOCK, 100 * CBT_BLOCK, true),
                (106 * CBT_BLOCK, 512, false),
            ],
            r,
        );
        assert_eq!(
            got,
            vec![
                Read { offset: 0, len: r },
                Read {
                    offset: r,
                    len: CBT_BLOCK
                },
                Zero {
                    offset: 5 * CBT_BLOCK,
                    len: 101 * CBT_BLOCK
                },
                Read {
                    offset: 106 * CBT_BLOCK,
                    len: 512
                },
            ]
        );
    }

    #[test]
    fn items_come_out_before_the_range_ends() {
        // A huge data range yields its full reads at once: nothing piles up.
        let mut it = Items::new(CBT_BLOCK);
        let mut out = Vec::new();
        it.push(0, 1000 * CBT_BLOCK + 7, false, &mut out);
        assert_eq!(out.len(), 1000);
        out.clear();
        it.flush(&mut out);
        assert_eq!(
            out,
            vec![PlanItem::Read {
                offset: 1000 * CBT_BLOCK,
                len: 7
            }]
        );
    }

    #[test]
    fn plan_sizes() {
        let p = Plan::from_bitmap(vec![0xe0, 0x80], 16 * CBT_BLOCK, 2 * CBT_BLOCK).unwrap();
        assert_eq!(
            (p.covered, p.average_read, p.largest_read),
            (4 * CBT_BLOCK, 4 * CBT_BLOCK / 3, 2 * CBT_BLOCK)
        );
        let e = Plan::full(1 << 63, CBT_BLOCK).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the server reports a disk of 9223372036854775808 bytes, more than the 70368744177664 bytes (64 TiB) cbtstream supports"
        );
        assert!(matches!(
            Plan::from_bitmap(vec![0], 1 << 63, CBT_BLOCK),
            Err(PlanError::TooLarge { .. })
        ));
        assert!(Plan::full(MAX_DISK_SIZE, CBT_BLOCK).is_ok());
        assert!(Plan::full(1 << 20, 1000).is_err());
    }
}
