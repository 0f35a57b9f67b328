//! The VHD allocation reader against any stream, fed in pieces.
//!
//! Input: a control byte, then the stream. Bit 0 of the control byte re-seals the footer's
//! and the header's checksums (header at the footer's `data_offset`) so that mutations reach
//! the field checks; the other bits choose the piece size. Besides "no panic", the target
//! checks the reader's promises: it asks for 1..=64 KiB at a time, and the ranges are
//! ascending, non-empty, merged, block-aligned at the start and inside the virtual size.
#![no_main]
use bytes::BytesMut;
use cbtstream_proto::vhd::{Step, VhdAllocationReader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&control, stream)) = data.split_first() else {
        return;
    };
    let mut stream = stream.to_vec();
    if control & 1 != 0 {
        reseal(&mut stream);
    }
    let piece = usize::from(control >> 1) * 7 + 1;
    let mut reader = VhdAllocationReader::new();
    let mut buf = BytesMut::new();
    let mut rest = &stream[..];
    let allocation = loop {
        match reader.poll(&mut buf) {
            Ok(Step::Done(a)) => break a,
            Ok(Step::NeedBytes(n)) => {
                assert!((1..=64 << 10).contains(&n), "asked for {n} bytes");
                if rest.is_empty() {
                    let _ = reader.end_of_stream().to_string();
                    return;
                }
                let take = piece.min(rest.len());
                buf.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
            }
            Err(e) => {
                assert_eq!(reader.poll(&mut buf), Err(e.clone()));
                let _ = e.to_string();
                return;
            }
        }
    };
    let mut end = None;
    let mut total = 0;
    for r in allocation.allocated_ranges() {
        assert!(r.start < r.end && r.end <= allocation.virtual_size);
        assert!(end.is_none_or(|e| r.start > e), "ranges out of order or not merged");
        assert_eq!(r.start % allocation.block_size, 0);
        total += r.end - r.start;
        end = Some(r.end);
    }
    assert_eq!(allocation.allocated_bytes(), total);
});

/// Writes the VHD checksums (one's complement of the byte sum) of the footer at 0 and of the
/// header where the footer says it is.
fn reseal(stream: &mut [u8]) {
    seal(stream, 0, 512, 64);
    if let Some(field) = stream.get(16..24) {
        let header = u64::from_be_bytes(field.try_into().unwrap_or([0xff; 8]));
        if let Ok(header) = usize::try_from(header) {
            seal(stream, header, 1024, 36);
        }
    }
}

fn seal(stream: &mut [u8], start: usize, len: usize, at: usize) {
    let Some(part) = start
        .checked_add(len)
        .and_then(|end| stream.get_mut(start..end))
    else {
        return;
    };
    part[at..at + 4].fill(0);
    let sum = !part.iter().fold(0u32, |a, &x| a.wrapping_add(u32::from(x)));
    part[at..at + 4].copy_from_slice(&sum.to_be_bytes());
}
