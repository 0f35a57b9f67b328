//! `QueryChangedDiskAreas` answers into the engine's changed-block bitmap: one bit per
//! 64 KiB block, most significant bit first (the format of `VDI.list_changed_blocks`, see
//! `cbtstream_proto::cbt`). Areas are byte ranges of any alignment; each marks every block
//! it touches (rounded outward: a false positive costs a read, a miss loses data).

use cbtstream_proto::cbt::{blocks_for, CBT_BLOCK};

/// The largest disk planned (the engine's limit): its bitmap is 128 MiB.
pub const MAX_CAPACITY: u64 = crate::engine::plan::MAX_DISK_SIZE;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AreaError {
    #[error("the disk's capacity {0} bytes is beyond the {MAX_CAPACITY}-byte limit")]
    Capacity(u64),
    #[error("a page starts at {got}, not at the {asked} asked for")]
    PageStart { asked: u64, got: u64 },
    #[error("a page of length 0 at offset {0} below the capacity (no progress)")]
    EmptyPage(u64),
    #[error("a page [{start}, +{length}) ends past the {capacity}-byte capacity")]
    PagePastEnd {
        start: u64,
        length: u64,
        capacity: u64,
    },
    #[error(
        "a changed area [{start}, +{length}) lies outside its page [{page_start}, {page_end})"
    )]
    OutsidePage {
        start: u64,
        length: u64,
        page_start: u64,
        page_end: u64,
    },
}

/// The bitmap of one disk being filled page by page.
#[derive(Debug, Clone)]
pub struct ChangedMap {
    capacity: u64,
    bitmap: Vec<u8>,
    /// Where the next page must start.
    next: u64,
    /// Bytes marked (whole blocks, clipped to the capacity).
    areas: u64,
}

impl ChangedMap {
    pub fn new(capacity: u64) -> Result<ChangedMap, AreaError> {
        if capacity > MAX_CAPACITY {
            return Err(AreaError::Capacity(capacity));
        }
        let bytes = usize::try_from(blocks_for(capacity).div_ceil(8))
            .map_err(|_| AreaError::Capacity(capacity))?;
        Ok(ChangedMap {
            capacity,
            bitmap: vec![0; bytes],
            next: 0,
            areas: 0,
        })
    }

    /// Where the next `QueryChangedDiskAreas` starts; None once the capacity is covered.
    pub fn next_offset(&self) -> Option<u64> {
        (self.next < self.capacity).then_some(self.next)
    }

    /// One answer (`DiskChangeInfo`): it must start where asked, make progress, stay inside
    /// the capacity, and hold its areas inside itself.
    pub fn add_page(
        &mut self,
        start: u64,
        length: u64,
        areas: &[(u64, u64)],
    ) -> Result<(), AreaError> {
        if start != self.next {
            return Err(AreaError::PageStart {
                asked: self.next,
                got: start,
            });
        }
        if length == 0 {
            return Err(AreaError::EmptyPage(start));
        }
        let end = start
            .checked_add(length)
            .filter(|e| *e <= self.capacity)
            .ok_or(AreaError::PagePastEnd {
                start,
                length,
                capacity: self.capacity,
            })?;
        for &(a, len) in areas {
            let inside = a >= start && a.checked_add(len).is_some_and(|e| e <= end);
            if !inside {
                return Err(AreaError::OutsidePage {
                    start: a,
                    length: len,
                    page_start: start,
                    page_end: end,
                });
            }
            self.mark(a, len);
        }
        self.next = end;
        Ok(())
    }

    fn mark(&mut self, start: u64, length: u64) {
        if length == 0 {
            return;
        }
        let first = start / CBT_BLOCK;
        let last = (start + length - 1) / CBT_BLOCK;
        for block in first..=last {
            let (byte, bit) = ((block / 8) as usize, block % 8);
            if self.bitmap[byte] & (0x80 >> bit) == 0 {
                self.bitmap[byte] |= 0x80 >> bit;
                self.areas += CBT_BLOCK.min(self.capacity - block * CBT_BLOCK);
            }
        }
    }

    /// Bytes the bitmap marks (whole blocks, the last clipped to the capacity).
    pub fn marked_bytes(&self) -> u64 {
        self.areas
    }

    /// The bitmap, once every page is in.
    pub fn into_bitmap(self) -> Vec<u8> {
        self.bitmap
    }

    /// Whether block `i` is marked.
    #[cfg(test)]
    pub fn is_marked(&self, block: u64) -> bool {
        let byte = (block / 8) as usize;
        byte < self.bitmap.len() && self.bitmap[byte] & (0x80 >> (block % 8)) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn areas_of_any_alignment_mark_every_block_they_touch() {
        let cap = 4 * CBT_BLOCK + 37 * 1024;
        let mut m = ChangedMap::new(cap).unwrap();
        m.add_page(0, 2 * CBT_BLOCK, &[(CBT_BLOCK - 1, 2)]).unwrap();
        assert_eq!(m.next_offset(), Some(2 * CBT_BLOCK));
        m.add_page(2 * CBT_BLOCK, cap - 2 * CBT_BLOCK, &[(cap - 1, 1)])
            .unwrap();
        assert_eq!(m.next_offset(), None);
        assert_eq!(
            (0..5).map(|b| m.is_marked(b)).collect::<Vec<_>>(),
            [true, true, false, false, true]
        );
        assert_eq!(m.marked_bytes(), 2 * CBT_BLOCK + 37 * 1024);
        assert_eq!(m.into_bitmap(), vec![0b1100_1000]);
    }

    #[test]
    fn hostile_pages_are_refused() {
        let cap = 10 * CBT_BLOCK;
        let page = |start, len, areas: &[(u64, u64)]| {
            let mut m = ChangedMap::new(cap).unwrap();
            m.add_page(start, len, areas)
        };
        assert_eq!(
            page(1, 5, &[]),
            Err(AreaError::PageStart { asked: 0, got: 1 })
        );
        assert_eq!(page(0, 0, &[]), Err(AreaError::EmptyPage(0)));
        assert!(matches!(
            page(0, cap + 1, &[]),
            Err(AreaError::PagePastEnd { .. })
        ));
        assert!(matches!(
            page(0, u64::MAX, &[]),
            Err(AreaError::PagePastEnd { .. })
        ));
        assert!(matches!(
            page(0, CBT_BLOCK, &[(CBT_BLOCK - 1, 2)]),
            Err(AreaError::OutsidePage { .. })
        ));
        assert!(matches!(
            page(0, cap, &[(5, u64::MAX)]),
            Err(AreaError::OutsidePage { .. })
        ));
        assert_eq!(
            ChangedMap::new(MAX_CAPACITY + 1).unwrap_err(),
            AreaError::Capacity(MAX_CAPACITY + 1)
        );
    }

    proptest::proptest! {
        #[test]
        fn every_byte_of_every_area_is_in_a_marked_block(
            cap_blocks in 1u64..64, tail in 0u64..CBT_BLOCK,
            areas in proptest::collection::vec((0u64..1 << 22, 1u64..300_000), 0..20),
        ) {
            let cap = cap_blocks * CBT_BLOCK + tail;
            let areas: Vec<(u64, u64)> = areas.into_iter()
                .map(|(s, l)| (s % cap, l.min(cap - s % cap)))
                .collect();
            let mut m = ChangedMap::new(cap).unwrap();
            m.add_page(0, cap, &areas).unwrap();
            for &(s, l) in &areas {
                for b in s / CBT_BLOCK..=(s + l - 1) / CBT_BLOCK {
                    proptest::prop_assert!(m.is_marked(b));
                }
            }
            // Nothing outside the areas is marked.
            for b in 0..blocks_for(cap) {
                let touched = areas.iter().any(|&(s, l)| s / CBT_BLOCK <= b && b <= (s + l - 1) / CBT_BLOCK);
                proptest::prop_assert_eq!(m.is_marked(b), touched);
            }
        }
    }
}
