//! Plan: which ranges of the disk to read, and which are already known to be zero.

use cbtstream_proto::cbt::{self, CbtError};
use cbtstream_proto::nbd::consts::STATE_ZERO;
use cbtstream_proto::nbd::BlockStatusExtent;

/// One step of the plan, in ascending offset order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanItem {
    Read { offset: u64, len: u64 },
    Zero { offset: u64, len: u64 },
}

/// The whole plan. The extent list is held in memory (a 16 TiB bitmap with every block
/// changed is 256 Mi blocks, but coalesced into requests it is at most size/request_size).
#[derive(Debug, Default)]
pub struct Plan {
    pub items: Vec<PlanItem>,
    /// Bytes to read from the server.
    pub read_bytes: u64,
    /// Bytes known to be zero without reading.
    pub zero_bytes: u64,
    /// How many reads, and the longest.
    pub reads: u64,
    pub largest_read: u64,
}

impl Plan {
    fn push(&mut self, item: PlanItem) {
        match item {
            PlanItem::Read { len, .. } => {
                self.read_bytes += len;
                self.reads += 1;
                self.largest_read = self.largest_read.max(len);
            }
            PlanItem::Zero { len, .. } => self.zero_bytes += len,
        }
        self.items.push(item);
    }

    /// Every block the bitmap marks changed, coalesced into reads of at most `request`.
    pub fn from_bitmap(bitmap: &[u8], disk_size: u64, request: u64) -> Result<Plan, CbtError> {
        let mut plan = Plan::default();
        for e in cbt::extents(bitmap, disk_size, request)? {
            plan.push(PlanItem::Read {
                offset: e.offset,
                len: e.length,
            });
        }
        Ok(plan)
    }

    /// The whole disk, in reads of at most `request`.
    pub fn full(disk_size: u64, request: u64) -> Plan {
        let mut plan = Plan::default();
        let mut off = 0;
        while off < disk_size {
            let len = request.min(disk_size - off);
            plan.push(PlanItem::Read { offset: off, len });
            off += len;
        }
        plan
    }

    /// The whole disk, skipping what block status reports as zero. `map` is the list of
    /// (offset, length, is_zero) covering the disk in order, as built from BLOCK_STATUS.
    pub fn from_allocation(map: &[(u64, u64, bool)], request: u64) -> Plan {
        let mut plan = Plan::default();
        for &(offset, len, zero) in map {
            if zero {
                plan.push(PlanItem::Zero { offset, len });
                continue;
            }
            let mut off = offset;
            while off < offset + len {
                let n = request.min(offset + len - off);
                plan.push(PlanItem::Read {
                    offset: off,
                    len: n,
                });
                off += n;
            }
        }
        plan
    }
}

/// Fold block-status extents for `[offset, offset + asked)` into `map`, clamping the last
/// extent (servers may run past the request) and merging neighbours of the same kind.
/// Returns how many bytes were covered (at least 1 on success). Ranges are aligned to
/// `align` so reads stay aligned: an unaligned zero/data boundary is treated as data.
pub fn add_block_status(
    map: &mut Vec<(u64, u64, bool)>,
    offset: u64,
    asked: u64,
    extents: &[BlockStatusExtent],
) -> u64 {
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
    pos - offset
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

    #[test]
    fn block_status_clamps_and_merges() {
        let mut map = Vec::new();
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
        assert_eq!(add_block_status(&mut map, 0, 65536, &ext), 65536);
        assert_eq!(map, vec![(0, 4096, false), (4096, 61440, true)]);
        let aligned = align_map(&[(0, 100, false), (100, 9000, true)], 4096);
        assert_eq!(
            aligned,
            vec![(0, 4096, false), (4096, 4096, true), (8192, 908, false)]
        );
    }

    #[test]
    fn full_plan_covers_disk() {
        let p = Plan::full(10 * 65536 + 512, 4 * 65536);
        assert_eq!(p.read_bytes, 10 * 65536 + 512);
        assert_eq!(p.items.len(), 3);
        assert_eq!((p.reads, p.largest_read), (3, 4 * 65536));
        let zeros = Plan::from_allocation(&[(0, 65536, true), (65536, 65536 + 512, false)], 65536);
        assert_eq!(
            (zeros.reads, zeros.largest_read, zeros.zero_bytes),
            (2, 65536, 65536)
        );
    }
}
